//! The network edge towards the one upstream server: TLS trust, the HTTPS connector, the
//! connection pool, and what kind of failure an error is.
//!
//! Owns: [`TlsTrust`] (roots, CA, pins) and the rustls configuration; the connector (our own
//! name lookup, TCP, TLS via hyper-rustls); [`Pool`]/[`Lane`], upstream HTTP/1.1 connections
//! driven on the client connection's task; [`Failure`], what an error says went wrong.

mod pool;
mod tls;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_rustls::MaybeHttpsStream;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

pub use self::pool::{BoxError, Lane, Pool, SendError, Unanswered, UpstreamBody, WeakPool, origin};
pub use self::tls::{CertificateRequest, ClientAuth, HandshakeWitness, TlsTrust, spki_sha256};

/// Timeouts and pool settings for the upstream client.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// How long a TCP connect may take.
    pub connect_timeout: Duration,
    /// How long an unused pooled connection is kept.
    pub pool_idle_timeout: Duration,
    /// How many idle connections are kept.
    pub pool_max_idle: usize,
    /// How long a TCP connect to a profile's LAN address may take before the proxy takes
    /// itself to be away from home (a LAN answers in a few milliseconds).
    pub lan_connect_timeout: Duration,
    /// How often, at most, the LAN route is tried again while requests flow on the public
    /// route (never while idle).
    pub lan_probe_every: Duration,
    /// How long what was sent on a connection may stay unacknowledged, or its keep-alive
    /// probes unanswered, before the connection counts as dead (`TCP_USER_TIMEOUT`, Linux and
    /// Android): the path broke, as when a laptop moves from home to a café. Without it the
    /// system waits about a quarter of an hour. A server slow to answer is not affected (its
    /// system acknowledges what it receives, however long the answer takes); one that stops
    /// reading an upload for this long is given up on, as nginx's `proxy_send_timeout` (also
    /// 60 s by default) gives up on it.
    pub silence_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            pool_idle_timeout: Duration::from_secs(60),
            pool_max_idle: 64,
            lan_connect_timeout: Duration::from_millis(300),
            lan_probe_every: Duration::from_secs(30),
            silence_timeout: Duration::from_secs(60),
        }
    }
}

/// Opens upstream connections: our own name lookup, TCP with no delay, keep-alive and a bound
/// on silence, then TLS (hyper-rustls), each handshake watched by a [`HandshakeWitness`] of
/// its own.
#[derive(Clone)]
pub struct Connector {
    tls: Arc<ClientConfig>,
    tcp: HttpConnector<Resolver>,
    /// The name sent as SNI and verified, when it is not the host connected to (the LAN
    /// route reaches the public name's server at a LAN address).
    name: Option<ServerName<'static>>,
}

/// An upstream connection as the connector makes it (always TLS: the connector is HTTPS only).
pub type Connection = MaybeHttpsStream<TokioIo<TcpStream>>;

impl Connector {
    /// A connector over a TLS configuration (no ALPN set: HTTP/1.1 only).
    pub fn new(tls: Arc<ClientConfig>, options: &ClientOptions) -> Self {
        let mut tcp = HttpConnector::new_with_resolver(Resolver);
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(options.connect_timeout));
        // An idle connection whose path broke is found by its keep-alive probes going
        // unanswered (first after 30 s idle, then every 10 s until the silence timeout).
        tcp.set_keepalive(Some(Duration::from_secs(30)));
        tcp.set_keepalive_interval(Some(Duration::from_secs(10)));
        #[cfg(any(target_os = "linux", target_os = "android"))]
        tcp.set_tcp_user_timeout(Some(options.silence_timeout));
        Self {
            tls,
            tcp,
            name: None,
        }
    }

    /// This connector, connecting to whatever address it is given but speaking TLS with the
    /// server as `name` (SNI and certificate check): the LAN route to the public name's server.
    /// Its TCP connects time out after `connect_timeout`.
    pub fn under_name(mut self, name: ServerName<'static>, connect_timeout: Duration) -> Self {
        self.tcp.set_connect_timeout(Some(connect_timeout));
        self.name = Some(name);
        self
    }

    /// Connects to `origin` (`https://host:port`); says what the handshake saw of client
    /// authentication, also when it failed.
    pub async fn connect(
        &self,
        origin: Uri,
    ) -> Result<(Connection, CertificateRequest), (BoxError, CertificateRequest)> {
        // A configuration per connection: its witness sees this handshake only.
        let (config, witness) = HandshakeWitness::watch(&self.tls);
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_only();
        let builder = match &self.name {
            Some(name) => builder.with_server_name_resolver(
                hyper_rustls::FixedServerNameResolver::new(name.clone()),
            ),
            None => builder,
        };
        let https = builder.enable_http1().wrap_connector(self.tcp.clone());
        match tower_service::Service::call(&mut { https }, origin).await {
            Ok(io) => Ok((io, witness.request())),
            Err(err) => Err((err, witness.request())),
        }
    }
}

/// The upstream's host name did not resolve.
#[derive(Debug, thiserror::Error)]
#[error("cannot resolve {host}: {detail}")]
pub struct DnsError {
    /// The name looked up.
    pub host: String,
    /// What the resolver said.
    pub detail: String,
}

/// Looks the upstream's name up with the system resolver, failing with a [`DnsError`] that
/// [`describe_failure`] finds in the error chain by its type.
#[derive(Debug, Clone, Copy, Default)]
pub struct Resolver;

impl tower_service::Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = DnsError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, DnsError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), DnsError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            // Port 0: the connector puts the request's port in.
            let found = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map(|addrs| addrs.collect::<Vec<SocketAddr>>());
            match found {
                Ok(addrs) => {
                    if addrs.is_empty() {
                        Err(DnsError {
                            host,
                            detail: "no addresses".to_owned(),
                        })
                    } else {
                        Ok(addrs.into_iter())
                    }
                }
                Err(err) => Err(DnsError {
                    host,
                    detail: err.to_string(),
                }),
            }
        })
    }
}

/// Why an exchange with the upstream failed, named by the types in the error chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The host name did not resolve: the resolver's words.
    Dns(String),
    /// No TCP connection could be made.
    Connect(String),
    /// The TLS handshake failed (often: certificate not trusted): rustls' words.
    Tls(String),
    /// The server refused the client certificate, or wanted one and got none: what it did,
    /// in words that follow the server's name.
    ClientCertificate(&'static str),
    /// Something took longer than its timeout.
    Timeout(String),
    /// Anything else (connection reset, protocol error): the most specific message.
    Other(String),
}

/// Names the failure behind an upstream error. The one walk of the error chain (hyper's
/// error, the io::Error it carries, the rustls error inside that, the connector's DNS
/// error) for the proxy and the checks alike.
///
/// `certificate` is what the handshake of the connection the exchange used saw, when it
/// was made for this exchange. A server that asked for a client certificate and then
/// closed the connection without a TLS alert (Python's asyncio TLS servers do; the
/// alert can also be lost to a reset) refused it, or wanted one: that is said, whatever
/// the transport error.
pub fn describe_failure(
    err: &(dyn std::error::Error + 'static),
    certificate: Option<CertificateRequest>,
) -> Failure {
    let mut timed_out = false;
    let mut unreachable = false;
    let mut detail = err.to_string();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return match client_certificate_refusal(tls) {
                Some(refusal) => Failure::ClientCertificate(refusal),
                None => Failure::Tls(tls.to_string()),
            };
        }
        if let Some(dns) = e.downcast_ref::<DnsError>() {
            return Failure::Dns(dns.detail.clone());
        }
        detail = e.to_string();
        if let Some(io) = e.downcast_ref::<io::Error>() {
            match io.kind() {
                io::ErrorKind::TimedOut => {
                    timed_out = true;
                    if went_silent(io) {
                        detail = "the connection went silent: what was sent was not taken in time (the network path broke, as when this machine changes networks, or the server stopped reading)".to_owned();
                    }
                }
                io::ErrorKind::ConnectionRefused
                | io::ErrorKind::HostUnreachable
                | io::ErrorKind::NetworkUnreachable
                | io::ErrorKind::AddrNotAvailable => unreachable = true,
                _ => {}
            }
            // An io::Error's source() skips the error it wraps; its get_ref() does not.
            cur = io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static));
            continue;
        }
        cur = e.source();
    }
    if timed_out {
        return Failure::Timeout(detail);
    }
    if unreachable {
        return Failure::Connect(detail);
    }
    match certificate {
        Some(CertificateRequest::NoneSent) => Failure::ClientCertificate(
            "asks for a client certificate and none was sent (it closed the connection without a TLS alert)",
        ),
        Some(CertificateRequest::Sent) => Failure::ClientCertificate(
            "asked for a client certificate and closed the connection without a TLS alert once it had the certificate: it does not accept it (not issued by a CA it trusts, expired or revoked; its log says which)",
        ),
        _ => Failure::Other(detail),
    }
}

/// Whether `io` is the system's own timeout of an open connection (`ETIMEDOUT`: the silence
/// timeout or unanswered keep-alive probes), not a timeout of ours.
fn went_silent(io: &io::Error) -> bool {
    #[cfg(unix)]
    {
        io.raw_os_error() == Some(libc::ETIMEDOUT)
    }
    #[cfg(not(unix))]
    {
        io.raw_os_error().is_some()
    }
}

/// What a TLS alert from the server says about the client certificate (in words that follow
/// the server's name), when it is about one.
///
/// Servers that want a certificate and get none answer `certificate_required` (TLS 1.3) or,
/// older ones, `handshake_failure` (which has other causes too: it is named as a possibility).
pub fn client_certificate_refusal(err: &rustls::Error) -> Option<&'static str> {
    use rustls::AlertDescription as Alert;
    let rustls::Error::AlertReceived(alert) = err else {
        return None;
    };
    Some(match alert {
        Alert::CertificateRequired => {
            "asks for a client certificate and none was sent (TLS alert certificate_required)"
        }
        Alert::BadCertificate => {
            "refused the client certificate (TLS alert bad_certificate: it does not check out for this server)"
        }
        Alert::UnknownCA => {
            "does not trust the issuer of the client certificate (TLS alert unknown_ca)"
        }
        Alert::CertificateExpired => {
            "says the client certificate has expired (TLS alert certificate_expired)"
        }
        Alert::CertificateRevoked => {
            "says the client certificate was revoked (TLS alert certificate_revoked)"
        }
        Alert::CertificateUnknown | Alert::UnsupportedCertificate | Alert::AccessDenied => {
            "refused the client certificate (TLS alert certificate_unknown, unsupported_certificate or access_denied)"
        }
        Alert::HandshakeFailure => {
            "ended the TLS handshake (TLS alert handshake_failure): a server that wants a client certificate and gets none, or one it cannot use, answers this way"
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error like the connector's, wrapping `source`.
    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Box<dyn std::error::Error + Send + Sync>);

    #[test]
    fn failures_are_named_by_the_types_in_their_chain() {
        let dns = Outer(Box::new(DnsError {
            host: "immich.invalid".into(),
            detail: "failed to lookup address information".into(),
        }));
        assert_eq!(
            describe_failure(&dns, None),
            Failure::Dns("failed to lookup address information".to_owned())
        );
        let refused = Outer(Box::new(io::Error::from(io::ErrorKind::ConnectionRefused)));
        assert!(matches!(
            describe_failure(&refused, None),
            Failure::Connect(_)
        ));
        let slow = Outer(Box::new(io::Error::new(
            io::ErrorKind::TimedOut,
            "connect timeout",
        )));
        assert_eq!(
            describe_failure(&slow, None),
            Failure::Timeout("connect timeout".to_owned())
        );
        #[cfg(unix)]
        {
            let silent = Outer(Box::new(io::Error::from_raw_os_error(libc::ETIMEDOUT)));
            let Failure::Timeout(said) = describe_failure(&silent, None) else {
                panic!("not a timeout");
            };
            assert!(said.contains("network path broke"), "{said}");
        }
        let tls = Outer(Box::new(io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        )));
        assert!(matches!(describe_failure(&tls, None), Failure::Tls(_)));
        // A message that merely mentions DNS is not a DNS failure.
        let text = Outer("dns error".into());
        assert_eq!(
            describe_failure(&text, None),
            Failure::Other("dns error".to_owned())
        );
    }

    #[test]
    fn an_alert_after_the_handshake_is_found_through_hyper_and_io() {
        let alert = Outer(Box::new(io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired),
        )));
        let Failure::ClientCertificate(what) = describe_failure(&alert, None) else {
            panic!("not a certificate refusal");
        };
        assert!(what.contains("certificate_required"), "{what}");
    }

    #[test]
    fn a_connection_dropped_after_a_certificate_request_is_a_refusal() {
        let reset = || Outer(Box::new(io::Error::from(io::ErrorKind::ConnectionReset)));
        let Failure::ClientCertificate(none) =
            describe_failure(&reset(), Some(CertificateRequest::NoneSent))
        else {
            panic!("not a certificate refusal");
        };
        assert!(none.contains("none was sent"), "{none}");
        let Failure::ClientCertificate(sent) =
            describe_failure(&reset(), Some(CertificateRequest::Sent))
        else {
            panic!("not a certificate refusal");
        };
        assert!(sent.contains("does not accept it"), "{sent}");
        // Not asked, or not known (a connection reused from earlier): only the reset.
        for certificate in [None, Some(CertificateRequest::NotAsked)] {
            assert!(matches!(
                describe_failure(&reset(), certificate),
                Failure::Other(_)
            ));
        }
        // A timeout stays a timeout whatever the handshake saw.
        let slow = Outer(Box::new(io::Error::from(io::ErrorKind::TimedOut)));
        assert!(matches!(
            describe_failure(&slow, Some(CertificateRequest::NoneSent)),
            Failure::Timeout(_)
        ));
    }

    #[tokio::test]
    async fn the_resolver_fails_with_its_own_type() {
        use tower_service::Service as _;
        let name: Name = "immich.invalid".parse().unwrap();
        let err = Resolver.call(name).await.unwrap_err();
        assert_eq!(err.host, "immich.invalid");
        let name: Name = "localhost".parse().unwrap();
        let addrs: Vec<SocketAddr> = Resolver.call(name).await.unwrap().collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
    }
}
