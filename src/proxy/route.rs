//! Home and away: the LAN route of a profile that names a LAN address of its server, and which
//! route a request takes.
//!
//! The LAN route connects to the LAN address but speaks TLS with the server under its public
//! name (SNI and certificate check, see [`crate::upstream::TlsTrust::for_lan`]): a host that
//! happens to answer at that address on another network cannot prove that name, the
//! handshake fails and it is sent nothing.
//!
//! While at home (the LAN route answered) every request goes there. One that fails before a
//! byte of it was sent goes to the public route instead and the proxy is away; one that failed
//! part-way is not sent again (an upload is never sent twice in part), and the LAN route is
//! tried again at once. While away, the LAN route is tried again when requests flow, at most
//! once per probe interval: never while idle, so a phone is not woken for it. A try is one
//! connect and handshake, bounded in time; a LAN that does not accept the connect within
//! [`ClientOptions::lan_connect_timeout`](crate::upstream::ClientOptions) means away.
//!
//! A laptop that slept may wake somewhere else. Connections from before the sleep are not
//! used again (see [`crate::upstream::Pool`]): at home, the next request opens a new LAN
//! connection, and one that does not connect within the bound goes the public way; while
//! away, the first request after the sleep starts a try of the LAN route at once, as the
//! laptop may have come home.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http::Uri;

use super::Stats;
use crate::asleep::Moment;
use crate::config::ServerUrl;
use crate::upstream::{Connector, Failure};

/// Which way a request goes to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The server's public address (through the uplink, the gate, the tunnel).
    Public,
    /// The server's LAN address.
    Lan,
}

impl Route {
    /// `public` or `lan`, as `/healthz`, `/metrics` and the log say.
    pub fn name(self) -> &'static str {
        match self {
            Route::Public => "public",
            Route::Lan => "lan",
        }
    }

    /// An index for per-route counters.
    pub fn index(self) -> usize {
        match self {
            Route::Public => 0,
            Route::Lan => 1,
        }
    }
}

/// Not tried yet: requests try the LAN route first.
const UNKNOWN: u8 = 0;
/// The LAN route answered: requests go there.
const HOME: u8 = 1;
/// The LAN route did not answer: requests go the public way.
const AWAY: u8 = 2;

/// How long a whole try of the LAN route (connect and TLS handshake) may take.
const TRY_LIMIT: Duration = Duration::from_secs(5);

/// The route state of one profile with a LAN address, shared by its serving threads.
pub struct Routes {
    profile: String,
    public: ServerUrl,
    lan: ServerUrl,
    /// Connects under the public name to the LAN address (the probe's own connections).
    connector: Connector,
    origin: Uri,
    state: AtomicU8,
    /// A try is under way.
    trying: AtomicBool,
    born: Instant,
    /// When the last try began, in milliseconds after `born`.
    last_try: AtomicU64,
    probe_every: Duration,
    /// When the last request chose its route, for noticing that the machine slept since.
    chosen: AtomicI64,
    /// Counts the changes between home and away (across reloads).
    stats: Arc<Stats>,
    /// Why requests take the route they take, and since when.
    why: Mutex<(String, SystemTime)>,
}

impl Routes {
    /// The LAN address, as messages name it (`192.168.1.10:443`).
    pub fn lan_authority(&self) -> &str {
        self.lan.authority().as_str()
    }
}

/// Where a profile with a LAN address stands: what `/healthz`, `doctor` and apps show.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RouteStatus {
    /// `lan` or `public`: where the next request goes.
    pub route: &'static str,
    /// The LAN address.
    pub lan: String,
    /// Why (the LAN route answered, or what it did instead).
    pub why: String,
    /// Since when (RFC 3339, UTC).
    pub since: String,
    /// Changes between the routes so far.
    pub switches: u64,
    /// Requests sent the LAN route, and their body bytes up and down.
    pub lan_requests: u64,
    /// Body bytes sent to the server the LAN route.
    pub lan_bytes_up: u64,
    /// Body bytes received from the server the LAN route.
    pub lan_bytes_down: u64,
    /// Requests sent the public route.
    pub public_requests: u64,
    /// Body bytes sent to the server the public route.
    pub public_bytes_up: u64,
    /// Body bytes received from the server the public route.
    pub public_bytes_down: u64,
}

impl Routes {
    /// The route state of `profile`, whose server `public` is also at `lan`, reached with
    /// `connector` at `origin` (`https://LAN-ADDRESS/`).
    pub fn new(
        profile: String,
        public: ServerUrl,
        lan: ServerUrl,
        connector: Connector,
        probe_every: Duration,
        stats: Arc<Stats>,
    ) -> Self {
        let origin = crate::upstream::origin(lan.authority());
        Self {
            profile,
            public,
            lan,
            connector,
            origin,
            state: AtomicU8::new(UNKNOWN),
            trying: AtomicBool::new(false),
            born: Instant::now(),
            last_try: AtomicU64::new(0),
            probe_every,
            chosen: AtomicI64::new(Moment::now().to_raw()),
            stats,
            why: Mutex::new(("not tried yet".to_owned(), SystemTime::now())),
        }
    }

    /// The route for the next request; while away, starts a try of the LAN route when one
    /// is due (on the calling runtime, without waiting for it).
    pub fn choose(self: &Arc<Self>) -> Route {
        let now = Moment::now();
        let before = Moment::from_raw(self.chosen.swap(now.to_raw(), Ordering::Relaxed));
        let woke = before.slept_before(now);
        if self.state.load(Ordering::Relaxed) != AWAY {
            return Route::Lan;
        }
        let since_last = self
            .now_ms()
            .saturating_sub(self.last_try.load(Ordering::Relaxed));
        if woke || u128::from(since_last) >= self.probe_every.as_millis() {
            if woke {
                tracing::info!(
                    "profile '{}': this machine slept; trying the LAN route {} again (it may be home)",
                    self.profile,
                    self.lan.authority()
                );
            }
            self.try_in_background();
        }
        Route::Public
    }

    /// Tries the LAN route now, unless a try is under way, without waiting for it: at start,
    /// and when a LAN connection broke.
    pub fn try_in_background(self: &Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.trying.swap(true, Ordering::Acquire) {
            return;
        }
        let routes = self.clone();
        runtime.spawn(async move { routes.try_lan().await });
    }

    /// Connects to the LAN address and completes a TLS handshake under the public name;
    /// home when it does, away when not. Returns whether it did.
    pub async fn try_lan(&self) -> bool {
        self.trying.store(true, Ordering::Relaxed);
        self.last_try.store(self.now_ms(), Ordering::Relaxed);
        let connected =
            tokio::time::timeout(TRY_LIMIT, self.connector.connect(self.origin.clone())).await;
        let home = match connected {
            Ok(Ok(_connection)) => {
                self.arrive();
                true
            }
            Ok(Err((err, certificate))) => {
                self.leave(&crate::upstream::describe_failure(&*err, Some(certificate)));
                false
            }
            Err(_) => {
                self.leave(&Failure::Timeout(format!(
                    "no TLS handshake within {} s",
                    TRY_LIMIT.as_secs()
                )));
                false
            }
        };
        self.trying.store(false, Ordering::Release);
        home
    }

    /// A request on the LAN route failed before any of it was sent: away (it goes the public
    /// way).
    pub fn lan_unreachable(&self, failure: &Failure) {
        self.last_try.store(self.now_ms(), Ordering::Relaxed);
        self.leave(failure);
    }

    /// Where the profile stands.
    pub fn status(&self) -> RouteStatus {
        let (why, since) = crate::sync::lock(&self.why).clone();
        let lan = &self.stats.routes[Route::Lan.index()];
        let public = &self.stats.routes[Route::Public.index()];
        RouteStatus {
            route: self.current().name(),
            lan: self.lan.to_string(),
            why,
            since: crate::utc::seconds(since),
            switches: self.stats.route_switches.load(Ordering::Relaxed),
            lan_requests: lan.requests.load(Ordering::Relaxed),
            lan_bytes_up: lan.bytes_up.load(Ordering::Relaxed),
            lan_bytes_down: lan.bytes_down.load(Ordering::Relaxed),
            public_requests: public.requests.load(Ordering::Relaxed),
            public_bytes_up: public.bytes_up.load(Ordering::Relaxed),
            public_bytes_down: public.bytes_down.load(Ordering::Relaxed),
        }
    }

    /// The route the next request takes.
    pub fn current(&self) -> Route {
        if self.state.load(Ordering::Relaxed) == AWAY {
            Route::Public
        } else {
            Route::Lan
        }
    }

    fn arrive(&self) {
        let was = self.state.swap(HOME, Ordering::Relaxed);
        if was == HOME {
            return;
        }
        if was == AWAY {
            self.stats.route_switches.fetch_add(1, Ordering::Relaxed);
        }
        let why = format!(
            "{} answered as {}",
            self.lan.authority(),
            self.public.host()
        );
        tracing::info!(
            "profile '{}': requests go the LAN route ({why})",
            self.profile
        );
        *crate::sync::lock(&self.why) = (why, SystemTime::now());
    }

    fn leave(&self, failure: &Failure) {
        let why = format!(
            "the LAN route {} {}",
            self.lan.authority(),
            lan_failure(failure, self.public.host())
        );
        let was = self.state.swap(AWAY, Ordering::Relaxed);
        if was != AWAY {
            if was == HOME {
                self.stats.route_switches.fetch_add(1, Ordering::Relaxed);
            }
            tracing::info!(
                "profile '{}': requests go the public route {} ({why}; tried again while requests flow, every {} s at most)",
                self.profile,
                self.public,
                self.probe_every.as_secs_f32()
            );
        }
        *crate::sync::lock(&self.why) = (why, SystemTime::now());
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// What a failure of the LAN route says, in words that follow "the LAN route ADDRESS".
fn lan_failure(failure: &Failure, public_host: &str) -> String {
    match failure {
        Failure::Dns(detail) => format!("does not resolve ({detail})"),
        Failure::Connect(detail) => format!("cannot be reached ({detail})"),
        Failure::Timeout(detail) => format!("does not answer ({detail})"),
        Failure::Tls(detail) => format!(
            "did not prove to be {public_host}, so it was sent nothing (TLS: {detail}); if it is your server's LAN front with a certificate of its own, log in again with --lan-pin or --lan-ca"
        ),
        Failure::ClientCertificate(refusal) => format!("answered, but {refusal}"),
        Failure::Other(detail) => format!("failed: {detail}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::{ClientOptions, TlsTrust};

    /// The route state of a profile whose LAN address refuses connections, tried again at
    /// most every hour while requests flow.
    fn routes_with_a_refusing_lan() -> Arc<Routes> {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
        let lan = closed.local_addr().expect("its address");
        drop(closed);
        let tls = TlsTrust::public()
            .client_config(&[], None)
            .expect("a client configuration");
        let name = rustls::pki_types::ServerName::try_from("immich.example.com").expect("a name");
        let connector = Connector::new(tls, &ClientOptions::default())
            .under_name(name, Duration::from_millis(300));
        Arc::new(Routes::new(
            "home".to_owned(),
            ServerUrl::parse("https://immich.example.com").expect("a URL"),
            ServerUrl::parse(&format!("https://{lan}")).expect("a URL"),
            connector,
            Duration::from_secs(3600),
            Arc::default(),
        ))
    }

    #[tokio::test]
    async fn away_the_first_request_after_a_sleep_tries_the_lan_route_at_once() {
        let routes = routes_with_a_refusing_lan();
        assert!(!routes.try_lan().await, "the LAN route refuses");
        assert_eq!(routes.current(), Route::Public);
        // Awake, within the probe interval: no try.
        assert_eq!(routes.choose(), Route::Public);
        assert!(
            !routes.trying.load(Ordering::Acquire),
            "tried while not due"
        );
        // The machine slept since the last request: the next one starts a try.
        let before = Moment::from_raw(routes.chosen.load(Ordering::Relaxed));
        routes.chosen.store(
            before.before_sleeping(Duration::from_secs(600)).to_raw(),
            Ordering::Relaxed,
        );
        assert_eq!(routes.choose(), Route::Public, "this request goes public");
        assert!(
            routes.trying.load(Ordering::Acquire),
            "no try of the LAN route after the sleep"
        );
        // Only once: the next request is awake again.
        for _ in 0..1_000_000 {
            if !routes.trying.load(Ordering::Acquire) {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(
            !routes.trying.load(Ordering::Acquire),
            "the try never ended"
        );
        assert_eq!(routes.choose(), Route::Public);
        assert!(!routes.trying.load(Ordering::Acquire), "tried again");
    }

    #[test]
    fn a_foreign_lan_host_is_named_with_the_fix() {
        let said = lan_failure(
            &Failure::Tls("invalid peer certificate: UnknownIssuer".to_owned()),
            "immich.example.com",
        );
        assert!(
            said.contains("did not prove to be immich.example.com"),
            "{said}"
        );
        assert!(said.contains("--lan-pin"), "{said}");
        assert!(
            lan_failure(&Failure::Connect("refused".into()), "x").contains("cannot be reached")
        );
    }
}
