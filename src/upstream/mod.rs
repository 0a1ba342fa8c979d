//! The network edge towards the one upstream server: TLS trust, the HTTPS connector, the
//! connection pool, and what kind of failure an error is.
//!
//! Owns: [`TlsTrust`] (roots, CA, pins) and the rustls configuration; the connector (our own
//! name lookup, TCP, TLS via hyper-rustls); [`Pool`]/[`Lane`], upstream HTTP/1.1 connections
//! driven on the client connection's task; [`FailureKind`].

mod pool;
mod tls;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use rustls::ClientConfig;

pub use self::pool::{BoxError, Lane, Pool, SendError, UpstreamBody, WeakPool, origin};
pub use self::tls::{ClientAuth, TlsTrust, spki_sha256};

/// Timeouts and pool settings for the upstream client.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// How long a TCP connect may take.
    pub connect_timeout: Duration,
    /// How long an unused pooled connection is kept.
    pub pool_idle_timeout: Duration,
    /// How many idle connections are kept.
    pub pool_max_idle: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            pool_idle_timeout: Duration::from_secs(60),
            pool_max_idle: 64,
        }
    }
}

/// The connector the pool opens upstream connections with.
pub type Connector = HttpsConnector<HttpConnector<Resolver>>;

/// The HTTPS-only connector (our own name lookup, TCP with no delay and keep-alive, then
/// TLS) over a TLS configuration; hyper-rustls sets ALPN from the enabled protocols.
pub fn connector(tls: Arc<ClientConfig>, options: &ClientOptions) -> Connector {
    let mut http = HttpConnector::new_with_resolver(Resolver);
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(options.connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(30)));
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(Arc::unwrap_or_clone(tls))
        .https_only()
        .enable_http1()
        .wrap_connector(http)
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

/// Broad kinds of upstream failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The host name did not resolve.
    Dns,
    /// No TCP connection could be made.
    Connect,
    /// The TLS handshake failed (often: certificate not trusted).
    Tls,
    /// The server refused the client certificate, or wanted one and got none.
    ClientCertificate,
    /// Something took longer than its timeout.
    Timeout,
    /// Anything else (connection reset, protocol error).
    Other,
}

/// Names the kind of failure behind an upstream error, by the types in its chain, and the
/// most specific message in it.
pub fn describe_failure(err: &(dyn std::error::Error + 'static)) -> (FailureKind, String) {
    let mut kind = FailureKind::Other;
    let mut detail = err.to_string();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return match client_certificate_refusal(tls) {
                Some(refusal) => (FailureKind::ClientCertificate, refusal.to_owned()),
                None => (FailureKind::Tls, tls.to_string()),
            };
        }
        if let Some(dns) = e.downcast_ref::<DnsError>() {
            return (FailureKind::Dns, dns.detail.clone());
        }
        detail = e.to_string();
        if let Some(io) = e.downcast_ref::<io::Error>() {
            match io.kind() {
                io::ErrorKind::TimedOut => kind = FailureKind::Timeout,
                io::ErrorKind::ConnectionRefused
                | io::ErrorKind::HostUnreachable
                | io::ErrorKind::NetworkUnreachable
                | io::ErrorKind::AddrNotAvailable
                    if kind == FailureKind::Other =>
                {
                    kind = FailureKind::Connect;
                }
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
    (kind, detail)
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
            describe_failure(&dns),
            (
                FailureKind::Dns,
                "failed to lookup address information".to_owned()
            )
        );
        let refused = Outer(Box::new(io::Error::from(io::ErrorKind::ConnectionRefused)));
        assert_eq!(describe_failure(&refused).0, FailureKind::Connect);
        let slow = Outer(Box::new(io::Error::new(
            io::ErrorKind::TimedOut,
            "connect timeout",
        )));
        assert_eq!(
            describe_failure(&slow),
            (FailureKind::Timeout, "connect timeout".to_owned())
        );
        let tls = Outer(Box::new(io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        )));
        assert_eq!(describe_failure(&tls).0, FailureKind::Tls);
        // A message that merely mentions DNS is not a DNS failure.
        let text = Outer("dns error".into());
        assert_eq!(describe_failure(&text).0, FailureKind::Other);
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
