//! A profile's credentials as live state: the headers requests carry now, read again from
//! their store after the gate rejects them (at most about once a second while it does) and
//! whenever the user reloads, the gate's session cookies won with them, and what the gate has
//! said about them: when it last accepted them, since when it rejects them, the back-off.
//!
//! While the credentials work nothing here polls the store and nothing shared is written: a
//! request reads the `blocked` flag and the loaded credentials (arc-swap: a pointer load, no
//! shared reference count touched) on the way in, and on the way out compares generations and
//! stores a timestamp at most once a second.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use super::gate::Verdict;
use super::jar::SessionJar;
use crate::credentials::{Injection, Scheme, Secret, SecretSource, StoreError};
use crate::sync::lock;

/// The first back-off after the gate rejects the credentials; doubles up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(5);
/// The longest back-off between attempts with rejected credentials.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// While the credentials are rejected or missing, the store is read again at most this often
/// (unless [`LiveCredentials::reread_every`] says otherwise).
pub const REREAD_EVERY: Duration = Duration::from_secs(1);

/// One profile's credentials, their session and their standing with the gate.
pub struct LiveCredentials {
    scheme: Scheme,
    username: String,
    source: Arc<dyn SecretSource>,
    current: ArcSwap<Loaded>,
    /// The generation of `current`: what `passed` compares with, without loading it.
    generation: AtomicU64,
    /// False while the credentials work: the check every request makes.
    blocked: AtomicBool,
    state: Mutex<State>,
    /// One store read at a time; requests that waited for it see what it found.
    reading: tokio::sync::Mutex<()>,
    /// Unix seconds of the latest request the gate let through with the current
    /// credentials; 0 before the first.
    accepted_at: AtomicU64,
    jar: SessionJar,
    /// The least time between two reads while rejected or missing.
    reread_every: Duration,
}

/// One set of credentials as read from the store (Debug shows no secret: the secret and
/// the header values are redacted).
#[derive(Debug)]
pub struct Loaded {
    generation: u64,
    secret: Option<Secret>,
    injection: Injection,
    unusable: Option<Unusable>,
    loaded_at: SystemTime,
}

impl Loaded {
    /// The headers these credentials add to a request.
    pub fn injection(&self) -> &Injection {
        &self.injection
    }

    /// Which credentials these are, for reporting the gate's verdict on a request sent with
    /// them.
    pub fn generation(&self) -> Generation {
        Generation(self.generation)
    }
}

/// The credentials a request was admitted with (see [`LiveCredentials::admit`]).
pub type Admitted = arc_swap::Guard<Arc<Loaded>>;

/// Which loaded credentials a request was sent with: a verdict on replaced ones is not held
/// against the new ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation(u64);

/// Why stored credentials cannot be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unusable {
    /// Nothing is stored (logged out, or never logged in).
    Missing,
    /// What is stored does not fit the scheme (the reason says how).
    Invalid(String),
}

#[derive(Default)]
struct State {
    last_read: Option<Instant>,
    rejection: Option<Rejection>,
}

#[derive(Clone, Copy)]
struct Rejection {
    since: SystemTime,
    /// The latest acceptance of the same credentials before the first rejection.
    accepted_until: Option<SystemTime>,
    verdict: Verdict,
    until: Instant,
    delay: Duration,
}

/// Why a request is answered without being sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blocked {
    /// There are no usable credentials to send.
    Unusable(Unusable),
    /// The gate rejected them; they are not sent again before the back-off ends.
    Rejected {
        /// What the gate answered.
        verdict: Verdict,
        /// Since when it rejects them.
        since: SystemTime,
        /// Until when it accepted them, if it ever did since they were loaded.
        accepted_until: Option<SystemTime>,
        /// What is left of the back-off.
        retry_after: Duration,
    },
}

/// What a re-read of the store found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// New credentials: they are sent from the next request on.
    Changed,
    /// The same credentials as before.
    Unchanged,
    /// Nothing is stored any more: nothing is sent.
    Removed,
}

/// The credentials' standing, for `/healthz`, the doctor and apps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Why the credentials cannot be sent, if they cannot.
    pub unusable: Option<Unusable>,
    /// When they were read from the store.
    pub loaded_at: SystemTime,
    /// When the gate last let a request through with them.
    pub last_accepted: Option<SystemTime>,
    /// Since when the gate rejects them, and what it answered.
    pub rejected: Option<(SystemTime, Verdict)>,
    /// What is left of the back-off.
    pub backoff: Option<Duration>,
}

impl LiveCredentials {
    /// Credentials for `scheme` read from `source` (blocking: call it off the async workers).
    pub fn load(
        scheme: Scheme,
        username: String,
        source: Arc<dyn SecretSource>,
    ) -> Result<Self, StoreError> {
        let secret = source.read()?;
        Ok(Self::new(scheme, username, source, secret))
    }

    /// Credentials for `scheme` whose first value, `secret`, the caller has just read from
    /// `source`; later reads go to `source`.
    pub fn new(
        scheme: Scheme,
        username: String,
        source: Arc<dyn SecretSource>,
        secret: Option<Secret>,
    ) -> Self {
        let loaded = Loaded::new(0, secret, &scheme, &username);
        let blocked = loaded.unusable.is_some();
        Self {
            scheme,
            username,
            source,
            current: ArcSwap::from_pointee(loaded),
            generation: AtomicU64::new(0),
            blocked: AtomicBool::new(blocked),
            state: Mutex::new(State {
                last_read: Some(Instant::now()),
                rejection: None,
            }),
            reading: tokio::sync::Mutex::new(()),
            accepted_at: AtomicU64::new(0),
            jar: SessionJar::new(),
            reread_every: REREAD_EVERY,
        }
    }

    /// Reads the store again at most once per `every` while the credentials are rejected or
    /// missing ([`REREAD_EVERY`] by default; tests use zero to see a new value at once).
    pub fn reread_every(mut self, every: Duration) -> Self {
        self.reread_every = every;
        self
    }

    /// The auth scheme.
    pub fn scheme(&self) -> &Scheme {
        &self.scheme
    }

    /// The gate's session cookies, won with the current credentials.
    pub fn jar(&self) -> &SessionJar {
        &self.jar
    }

    /// The credentials loaded now.
    pub fn current(&self) -> Arc<Loaded> {
        self.current.load_full()
    }

    /// The credentials to send with the next request, or why it must not be sent.
    ///
    /// While they are rejected or missing, the store is read again first when the last
    /// read is [`LiveCredentials::reread_every`] old: new credentials end the back-off at once.
    ///
    /// The answer borrows the credentials: hold it only while the request is rewritten
    /// (until then a replacement waits to be freed), and keep its [`Loaded::generation`]
    /// for [`LiveCredentials::passed`] or [`LiveCredentials::rejected`].
    pub async fn admit(&self) -> Result<Admitted, Blocked> {
        if !self.blocked.load(Ordering::Acquire) {
            return Ok(self.current.load());
        }
        let _one = self.reading.lock().await;
        if self.read_due() {
            // A failed read keeps what was loaded; it was logged.
            let _ = self.reread().await;
        }
        let current = self.current.load();
        if let Some(unusable) = &current.unusable {
            return Err(Blocked::Unusable(unusable.clone()));
        }
        let now = Instant::now();
        match lock(&self.state).rejection {
            Some(r) if r.until > now => Err(Blocked::Rejected {
                verdict: r.verdict,
                since: r.since,
                accepted_until: r.accepted_until,
                retry_after: r.until - now,
            }),
            // The back-off is over: this request is the next attempt.
            _ => Ok(current),
        }
    }

    /// Records that the gate let a request sent with the credentials of `generation` through.
    pub fn passed(&self, generation: Generation) {
        let current = self.generation.load(Ordering::Acquire) == generation.0;
        if self.blocked.load(Ordering::Relaxed) {
            let mut state = lock(&self.state);
            if state.rejection.is_some() && current {
                state.rejection = None;
                self.blocked.store(false, Ordering::Release);
                tracing::info!("the gate accepts the credentials again");
            }
        }
        let now = unix_seconds(SystemTime::now());
        // Read first: a write on every request would move this line between cores.
        if current && self.accepted_at.load(Ordering::Relaxed) != now {
            self.accepted_at.store(now, Ordering::Relaxed);
        }
    }

    /// Records that the gate rejected a request sent with the credentials of `generation`;
    /// returns how this request is answered and, when this rejection began a new back-off,
    /// its length.
    pub fn rejected(
        &self,
        generation: Generation,
        verdict: Verdict,
    ) -> (Blocked, Option<Duration>) {
        let now = Instant::now();
        let mut state = lock(&self.state);
        if generation.0 != self.generation.load(Ordering::Acquire) {
            // Sent with credentials replaced meanwhile: the new ones are not to blame.
            return (
                Blocked::Rejected {
                    verdict,
                    since: SystemTime::now(),
                    accepted_until: None,
                    retry_after: Duration::ZERO,
                },
                None,
            );
        }
        let previous = state.rejection;
        if let Some(r) = previous
            && r.until > now
        {
            // Requests already in flight when the pause began: the same burst.
            return (blocked_by(&r, now), None);
        }
        let delay = previous.map_or(FIRST_BACKOFF, |r| (r.delay * 2).min(MAX_BACKOFF));
        let accepted = self.accepted_at.load(Ordering::Relaxed);
        let rejection = Rejection {
            since: previous.map_or_else(SystemTime::now, |r| r.since),
            accepted_until: previous.map_or_else(
                || (accepted != 0).then(|| UNIX_EPOCH + Duration::from_secs(accepted)),
                |r| r.accepted_until,
            ),
            verdict,
            until: now + delay,
            delay,
        };
        state.rejection = Some(rejection);
        self.blocked.store(true, Ordering::Release);
        drop(state);
        self.jar.clear();
        (blocked_by(&rejection, now), Some(delay))
    }

    /// Reads the store now (an explicit reload: no rate limit) and uses what it holds.
    pub async fn reload(&self) -> Result<Reload, StoreError> {
        let _one = self.reading.lock().await;
        self.reread().await
    }

    /// The credentials' standing now.
    pub fn health(&self) -> Health {
        let current = self.current.load();
        let accepted = self.accepted_at.load(Ordering::Relaxed);
        let now = Instant::now();
        let rejection = lock(&self.state).rejection;
        Health {
            unusable: current.unusable.clone(),
            loaded_at: current.loaded_at,
            last_accepted: (accepted != 0).then(|| UNIX_EPOCH + Duration::from_secs(accepted)),
            rejected: rejection.map(|r| (r.since, r.verdict)),
            backoff: rejection.filter(|r| r.until > now).map(|r| r.until - now),
        }
    }

    fn read_due(&self) -> bool {
        lock(&self.state)
            .last_read
            .is_none_or(|at| at.elapsed() >= self.reread_every)
    }

    /// Reads the store and, when it holds something else than what is loaded, uses that.
    async fn reread(&self) -> Result<Reload, StoreError> {
        lock(&self.state).last_read = Some(Instant::now());
        let source = self.source.clone();
        let read = match tokio::task::spawn_blocking(move || source.read()).await {
            Ok(read) => read,
            Err(err) => Err(StoreError::Failed(format!(
                "reading the credentials did not finish: {err}"
            ))),
        };
        let secret = read.inspect_err(|err| {
            tracing::warn!("cannot read the credentials again: {err}");
        })?;
        let current = self.current.load();
        if current.secret == secret {
            return Ok(Reload::Unchanged);
        }
        let removed = secret.is_none();
        let generation = current.generation + 1;
        let loaded = Loaded::new(generation, secret, &self.scheme, &self.username);
        let blocked = loaded.unusable.is_some();
        drop(current);
        self.current.store(Arc::new(loaded));
        self.generation.store(generation, Ordering::Release);
        lock(&self.state).rejection = None;
        self.accepted_at.store(0, Ordering::Relaxed);
        self.jar.clear();
        self.blocked.store(blocked, Ordering::Release);
        if removed {
            tracing::warn!("the credentials were removed from their store: nothing is sent");
            Ok(Reload::Removed)
        } else {
            tracing::info!("new credentials read from their store: sending them from now on");
            Ok(Reload::Changed)
        }
    }
}

impl Loaded {
    fn new(generation: u64, secret: Option<Secret>, scheme: &Scheme, username: &str) -> Self {
        let (injection, unusable) = match &secret {
            // A scheme without a secret of its own (the client certificate alone).
            _ if !scheme.has_secret() => (Injection::none(), None),
            None => (Injection::none(), Some(Unusable::Missing)),
            Some(secret) => match scheme.injection(username, secret) {
                Ok(injection) => (injection, None),
                Err(err) => (Injection::none(), Some(Unusable::Invalid(err.to_string()))),
            },
        };
        Self {
            generation,
            secret,
            injection,
            unusable,
            loaded_at: SystemTime::now(),
        }
    }
}

fn blocked_by(rejection: &Rejection, now: Instant) -> Blocked {
    Blocked::Rejected {
        verdict: rejection.verdict,
        since: rejection.since,
        accepted_until: rejection.accepted_until,
        retry_after: rejection.until.saturating_duration_since(now),
    }
}

fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::{CredentialStore, MemoryStore, StoreEntry};

    fn live(store: &Arc<MemoryStore>) -> LiveCredentials {
        let source: Arc<dyn SecretSource> = Arc::new(StoreEntry::new(store.clone(), "p"));
        LiveCredentials::load(Scheme::Basic, "svc".into(), source).unwrap()
    }

    fn store_with(secret: Option<&str>) -> Arc<MemoryStore> {
        let store = Arc::new(MemoryStore::new());
        if let Some(secret) = secret {
            store.set("p", &Secret::new(secret.into())).unwrap();
        }
        store
    }

    fn retry_after(blocked: &Blocked) -> Duration {
        match blocked {
            Blocked::Rejected { retry_after, .. } => *retry_after,
            other => panic!("not a rejection: {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_backoff_doubles_to_a_cap_and_clears_when_the_gate_accepts() {
        let live = live(&store_with(Some("pw")));
        let loaded = live.admit().await.unwrap();
        let (blocked, began) = live.rejected(loaded.generation(), Verdict::Rejected);
        assert_eq!(began, Some(FIRST_BACKOFF));
        assert_eq!(retry_after(&blocked), FIRST_BACKOFF);
        // A second rejection inside the pause is the same burst: no doubling.
        assert_eq!(
            live.rejected(loaded.generation(), Verdict::Rejected).1,
            None
        );
        assert_eq!(retry_after(&live.admit().await.unwrap_err()), FIRST_BACKOFF);
        let mut expected = FIRST_BACKOFF;
        for _ in 0..10 {
            tokio::time::advance(expected).await;
            let attempt = live.admit().await.expect("the back-off is over");
            expected = (expected * 2).min(MAX_BACKOFF);
            assert_eq!(
                live.rejected(attempt.generation(), Verdict::LoginRedirect)
                    .1,
                Some(expected)
            );
        }
        assert_eq!(expected, MAX_BACKOFF);
        tokio::time::advance(MAX_BACKOFF).await;
        let attempt = live.admit().await.unwrap();
        live.passed(attempt.generation());
        assert!(live.health().rejected.is_none());
        assert_eq!(
            live.rejected(attempt.generation(), Verdict::Rejected).1,
            Some(FIRST_BACKOFF)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_secret_ends_the_backoff_at_the_next_request_but_reads_wait_a_second() {
        let store = store_with(Some("old"));
        let live = live(&store);
        let old = live.admit().await.unwrap();
        live.jar().absorb(&mut session_cookie());
        live.rejected(old.generation(), Verdict::Rejected);
        assert!(
            live.jar().cookie_header().is_none(),
            "the session goes with the rejection"
        );
        store.set("p", &Secret::new("new".into())).unwrap();
        // Read at load time, less than a second ago: not read again yet.
        assert!(live.admit().await.is_err());
        tokio::time::advance(REREAD_EVERY).await;
        let new = live.admit().await.expect("the new secret is read and sent");
        assert_ne!(new.generation, old.generation);
        assert_eq!(new.injection().headers()[0].1, "Basic c3ZjOm5ldw==");
        // A late rejection of the old credentials does not block the new ones.
        assert_eq!(live.rejected(old.generation(), Verdict::Rejected).1, None);
        assert!(live.admit().await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_read_while_the_credentials_work() {
        let store = store_with(Some("pw"));
        let live = live(&store);
        store.set("p", &Secret::new("changed".into())).unwrap();
        tokio::time::advance(Duration::from_secs(3600)).await;
        let loaded = live.admit().await.unwrap();
        live.passed(loaded.generation());
        assert_eq!(loaded.injection().headers()[0].1, "Basic c3ZjOnB3");
        assert!(live.health().last_accepted.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn removed_credentials_are_never_sent_and_come_back_with_a_reload() {
        let store = store_with(Some("pw"));
        let live = live(&store);
        store.delete("p").unwrap();
        assert_eq!(live.reload().await.unwrap(), Reload::Removed);
        assert_eq!(
            live.admit().await.unwrap_err(),
            Blocked::Unusable(Unusable::Missing)
        );
        assert_eq!(live.health().unusable, Some(Unusable::Missing));
        store.set("p", &Secret::new("pw2".into())).unwrap();
        assert_eq!(live.reload().await.unwrap(), Reload::Changed);
        assert_eq!(live.reload().await.unwrap(), Reload::Unchanged);
        assert!(live.admit().await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejection_after_acceptance_remembers_until_when_they_worked() {
        let live = live(&store_with(Some("pw")));
        let loaded = live.admit().await.unwrap();
        assert!(live.health().last_accepted.is_none());
        live.passed(loaded.generation());
        let accepted = live.health().last_accepted.expect("accepted");
        let (blocked, _) = live.rejected(loaded.generation(), Verdict::Rejected);
        match blocked {
            Blocked::Rejected {
                accepted_until,
                since,
                ..
            } => {
                assert_eq!(accepted_until, Some(accepted));
                assert!(since >= accepted);
            }
            other => panic!("{other:?}"),
        }
        let health = live.health();
        assert_eq!(health.rejected.map(|(_, v)| v), Some(Verdict::Rejected));
        assert_eq!(health.backoff, Some(FIRST_BACKOFF));
    }

    #[test]
    fn a_stored_value_the_scheme_cannot_use_is_named_not_sent() {
        let store = store_with(Some("only-one-line"));
        let source: Arc<dyn SecretSource> = Arc::new(StoreEntry::new(store, "p"));
        let live = LiveCredentials::load(Scheme::CloudflareAccess, String::new(), source).unwrap();
        match live.health().unusable {
            Some(Unusable::Invalid(reason)) => {
                assert!(reason.contains("cloudflare-access"), "{reason}");
                assert!(!reason.contains("only-one-line"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    fn session_cookie() -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::SET_COOKIE,
            http::HeaderValue::from_static("authentik_proxy_1a2b3c4d=s; Path=/"),
        );
        headers
    }
}
