//! Step-by-step checks of a server and credentials (DNS, TCP, TLS, gate, Immich), each failing
//! with its own precise error: used by `login` to verify and by diagnostics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::config::ServerUrl;
use crate::credentials::Injection;
use crate::proxy::gate::{self, Verdict};
use crate::upstream::{self, CertificateRequest, Failure, HandshakeWitness};

/// The Immich endpoint that answers `{"res":"pong"}` without Immich authentication.
pub const PING_PATH: &str = "/api/server/ping";

/// The largest response body a check reads.
const MAX_CHECK_BODY: usize = 64 * 1024;

/// One failed check, saying precisely which step failed and what to do.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The host name did not resolve.
    #[error("cannot resolve {host}: {detail}; check the server name and this machine's DNS")]
    Dns {
        /// The host looked up.
        host: String,
        /// The resolver's message.
        detail: String,
    },
    /// No TCP connection could be opened.
    #[error(
        "cannot connect to {server} ({addrs}): {detail}; check that the server is up and reachable"
    )]
    Connect {
        /// The server.
        server: String,
        /// The addresses tried.
        addrs: String,
        /// The last error.
        detail: String,
    },
    /// The TLS handshake failed.
    #[error(
        "TLS handshake with {server} failed: {detail}; if the server uses a private or self-signed CA, pass --ca-cert FILE with that CA"
    )]
    Tls {
        /// The server.
        server: String,
        /// What rustls said.
        detail: String,
    },
    /// The server refused the client certificate, or wanted one and got none.
    #[error("{server} {what}; {fix}")]
    ClientCertificate {
        /// The server.
        server: String,
        /// What the server's TLS alert says.
        what: &'static str,
        /// What to do about it.
        fix: String,
    },
    /// A step took longer than its timeout.
    #[error(
        "{step} with {server} timed out after {secs} s; check that the server is up and reachable"
    )]
    Timeout {
        /// Which step.
        step: &'static str,
        /// The server.
        server: String,
        /// The timeout.
        secs: u64,
    },
    /// The HTTP exchange itself failed.
    #[error("the HTTP request to {server} failed: {detail}")]
    Http {
        /// The server.
        server: String,
        /// What went wrong.
        detail: String,
    },
    /// The Authentik gate did not accept the credentials.
    #[error("Authentik did not accept the credentials of '{username}' at {server}: {explain}")]
    Rejected {
        /// The server.
        server: String,
        /// The username sent.
        username: String,
        /// The verdict's explanation.
        explain: &'static str,
    },
    /// Something answered, but not Immich's ping.
    #[error(
        "{server} answered {PING_PATH} with HTTP {status} ({content_type}) instead of Immich's {{\"res\":\"pong\"}}: is this the Immich host behind Authentik?"
    )]
    NotImmich {
        /// The server.
        server: String,
        /// The status received.
        status: u16,
        /// The content type received.
        content_type: String,
    },
}

/// A response read during a check: head and a bounded body.
#[derive(Debug)]
pub struct CheckResponse {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// Up to 64 KiB of the body.
    pub body: Bytes,
}

/// Runs checks against one server with one TLS configuration.
#[derive(Clone)]
pub struct Checker {
    server: ServerUrl,
    /// Where the server is reached, when not at its name's address (its LAN address).
    address: Option<ServerUrl>,
    tls: Arc<ClientConfig>,
    timeout: Duration,
    /// What to do when the server refuses the client certificate (or wants one).
    certificate_fix: String,
}

impl Checker {
    /// A checker for `server`, trusting what `tls` trusts, with a per-step timeout.
    pub fn new(server: ServerUrl, tls: Arc<ClientConfig>, timeout: Duration) -> Self {
        Self {
            server,
            address: None,
            tls,
            timeout,
            certificate_fix:
                "give it the client certificate it trusts (credproxy login --client-cert FILE)"
                    .to_owned(),
        }
    }

    /// This checker, reaching the server at `address` (its LAN address) while speaking to it
    /// under its name (SNI, certificate check, `Host`).
    pub fn at(mut self, address: ServerUrl) -> Self {
        self.address = Some(address);
        self
    }

    /// The server checked.
    pub fn server(&self) -> &ServerUrl {
        &self.server
    }

    /// The server as errors name it: with the address it is reached at, when that differs.
    fn label(&self) -> String {
        match &self.address {
            Some(address) => format!("{} at {address}", self.server),
            None => self.server.to_string(),
        }
    }

    /// The fix named when the server refuses the client certificate or wants one.
    pub fn certificate_fix(mut self, fix: String) -> Self {
        self.certificate_fix = fix;
        self
    }

    /// The error for a failed handshake (`in_http` false) or exchange over the connection
    /// whose handshake saw `certificate`, named by [`upstream::describe_failure`]: a
    /// client-certificate refusal whenever the server's alert, or its dropping the connection
    /// after asking for one, says so.
    fn failed(
        &self,
        err: &(dyn std::error::Error + 'static),
        certificate: CertificateRequest,
        in_http: bool,
    ) -> CheckError {
        let server = self.label();
        match upstream::describe_failure(err, Some(certificate)) {
            Failure::ClientCertificate(what) => CheckError::ClientCertificate {
                server,
                what,
                fix: self.certificate_fix.clone(),
            },
            Failure::Tls(detail) => CheckError::Tls { server, detail },
            _ if in_http => CheckError::Http {
                server,
                detail: err.to_string(),
            },
            _ => CheckError::Tls {
                server,
                detail: err.to_string(),
            },
        }
    }

    async fn step<T>(
        &self,
        step: &'static str,
        fut: impl Future<Output = Result<T, CheckError>>,
    ) -> Result<T, CheckError> {
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| CheckError::Timeout {
                step,
                server: self.label(),
                secs: self.timeout.as_secs(),
            })?
    }

    /// Resolves the server's host name.
    pub async fn resolve(&self) -> Result<Vec<SocketAddr>, CheckError> {
        let at = self.address.as_ref().unwrap_or(&self.server);
        let host = at.host().to_owned();
        let port = at.port();
        self.step("DNS lookup", async {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|e| CheckError::Dns {
                    host: host.clone(),
                    detail: e.to_string(),
                })?
                .collect();
            if addrs.is_empty() {
                return Err(CheckError::Dns {
                    host,
                    detail: "no addresses".to_owned(),
                });
            }
            Ok(addrs)
        })
        .await
    }

    /// Opens a TCP connection to the first address that accepts.
    pub async fn connect(&self, addrs: &[SocketAddr]) -> Result<TcpStream, CheckError> {
        self.step("TCP connect", async {
            let mut last = String::from("no address to try");
            for addr in addrs {
                match TcpStream::connect(addr).await {
                    Ok(stream) => return Ok(stream),
                    Err(e) => last = e.to_string(),
                }
            }
            Err(CheckError::Connect {
                server: self.label(),
                addrs: addrs
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                detail: last,
            })
        })
        .await
    }

    /// Performs the TLS handshake, verifying the certificate against the configured trust;
    /// says what the handshake saw of client authentication.
    pub async fn handshake(
        &self,
        tcp: TcpStream,
    ) -> Result<(TlsStream<TcpStream>, CertificateRequest), CheckError> {
        let name =
            ServerName::try_from(self.server.host().to_owned()).map_err(|e| CheckError::Tls {
                server: self.label(),
                detail: e.to_string(),
            })?;
        let (config, witness) = HandshakeWitness::watch(&self.tls);
        let connector = TlsConnector::from(Arc::new(config));
        self.step("TLS handshake", async {
            match connector.connect(name, tcp).await {
                Ok(tls) => Ok((tls, witness.request())),
                Err(err) => Err(self.failed(&err, witness.request(), false)),
            }
        })
        .await
    }

    /// Connects and returns what the server's certificate chain says, leaf first.
    pub async fn certificates(&self) -> Result<Vec<CertSummary>, CheckError> {
        let addrs = self.resolve().await?;
        let tcp = self.connect(&addrs).await?;
        let (tls, _) = self.handshake(tcp).await?;
        Ok(tls
            .get_ref()
            .1
            .peer_certificates()
            .unwrap_or_default()
            .iter()
            .filter_map(CertSummary::of)
            .collect())
    }

    /// The key pin of the certificate the server presents, read WITHOUT verifying it: only for
    /// showing the user what to pin after verification failed. Nothing is sent over it.
    pub async fn presented_pin(&self) -> Result<String, CheckError> {
        let addrs = self.resolve().await?;
        let tcp = self.connect(&addrs).await?;
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| CheckError::Tls {
                    server: self.label(),
                    detail: e.to_string(),
                })?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ReadOnly))
                .with_no_client_auth();
        config.alpn_protocols = Vec::new();
        let checker = Checker {
            tls: Arc::new(config),
            ..self.clone()
        };
        let (tls, _) = checker.handshake(tcp).await?;
        tls.get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(CertSummary::of)
            .map(|leaf| leaf.spki_pin)
            .ok_or_else(|| CheckError::Tls {
                server: self.label(),
                detail: "the server presented no readable certificate".to_owned(),
            })
    }

    /// Connects afresh and sends `GET path`, with `credentials` if given.
    pub async fn get(
        &self,
        path: &str,
        credentials: Option<&Injection>,
    ) -> Result<CheckResponse, CheckError> {
        self.send(path, credentials, false).await
    }

    /// Asks for a websocket upgrade of `path`; returns the answer (101 when it worked).
    pub async fn websocket(
        &self,
        path: &str,
        credentials: Option<&Injection>,
    ) -> Result<CheckResponse, CheckError> {
        self.send(path, credentials, true).await
    }

    async fn send(
        &self,
        path: &str,
        credentials: Option<&Injection>,
        websocket: bool,
    ) -> Result<CheckResponse, CheckError> {
        let addrs = self.resolve().await?;
        let tcp = self.connect(&addrs).await?;
        let (tls, certificate) = self.handshake(tcp).await?;
        // A TLS 1.3 server judges the client certificate after the handshake: its alert
        // arrives with the first read, or it drops the connection without one.
        let http_err = |e: &(dyn std::error::Error + 'static)| self.failed(e, certificate, true);
        self.step("HTTP request", async {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| http_err(&e))?;
            let driver = tokio::spawn(conn);
            let mut request = Request::get(path)
                .header(header::HOST, self.server.authority().as_str())
                .header(
                    header::USER_AGENT,
                    concat!("credproxy/", env!("CARGO_PKG_VERSION")),
                )
                .body(Empty::<Bytes>::new())
                .map_err(|e| http_err(&e))?;
            if let Some(credentials) = credentials {
                credentials.apply(request.headers_mut());
            }
            if websocket {
                let headers = request.headers_mut();
                headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
                headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                headers.insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
                headers.insert(
                    header::SEC_WEBSOCKET_KEY,
                    HeaderValue::from_static("Y3JlZHByb3h5IGRvY3Rvcg=="),
                );
            }
            let response = match sender.send_request(request).await {
                Ok(response) => response,
                Err(err) => {
                    // The connection's own error carries the TLS alert, if there was one.
                    return Err(match driver.await {
                        Ok(Err(conn)) => http_err(&conn),
                        _ => http_err(&err),
                    });
                }
            };
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_CHECK_BODY)
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            driver.abort();
            Ok(CheckResponse {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        })
        .await
    }

    /// Checks that the gate accepts `authorization` and Immich answers its ping behind it.
    pub async fn verify_credentials(
        &self,
        username: &str,
        credentials: &Injection,
    ) -> Result<(), CheckError> {
        let response = self.send(PING_PATH, Some(credentials), false).await?;
        match gate::classify(response.status, &response.headers) {
            Verdict::Passed => {}
            verdict => {
                return Err(CheckError::Rejected {
                    server: self.label(),
                    username: username.to_owned(),
                    explain: verdict.explain(),
                });
            }
        }
        if is_pong(&response) {
            Ok(())
        } else if let Some(what) = gate::certificate_refusal(response.status, &response.body) {
            Err(CheckError::ClientCertificate {
                server: self.label(),
                what,
                fix: self.certificate_fix.clone(),
            })
        } else {
            Err(CheckError::NotImmich {
                server: self.label(),
                status: response.status.as_u16(),
                content_type: response
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("no content type")
                    .to_owned(),
            })
        }
    }
}

/// Accepts any certificate: used only by [`Checker::presented_pin`] to read it.
#[derive(Debug)]
struct ReadOnly;

impl rustls::client::danger::ServerCertVerifier for ReadOnly {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// What one certificate in the server's chain says.
#[derive(Debug, Clone)]
pub struct CertSummary {
    /// The subject's distinguished name.
    pub subject: String,
    /// The issuer's distinguished name.
    pub issuer: String,
    /// When it expires, as the certificate states it.
    pub not_after: String,
    /// Whole days until it expires (negative once expired).
    pub days_left: i64,
    /// The SHA-256 pin of its public key, as `sha256/BASE64` (what `--pin` takes).
    pub spki_pin: String,
}

impl CertSummary {
    /// Summarises a DER certificate; `None` if it cannot be parsed.
    pub fn of(der: &rustls::pki_types::CertificateDer<'_>) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
        let not_after = cert.validity().not_after;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        Some(Self {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            not_after: not_after.to_string(),
            days_left: (not_after.timestamp() - now).div_euclid(86_400),
            spki_pin: spki_pin_of(cert.public_key().raw),
        })
    }
}

/// The `sha256/BASE64` pin of a DER SubjectPublicKeyInfo.
pub fn spki_pin_of(spki_der: &[u8]) -> String {
    use base64::Engine as _;
    let digest = ring::digest::digest(&ring::digest::SHA256, spki_der);
    format!(
        "sha256/{}",
        base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
    )
}

/// True when a response is Immich's `{"res":"pong"}`.
pub fn is_pong(response: &CheckResponse) -> bool {
    response.status == StatusCode::OK
        && serde_json::from_slice::<serde_json::Value>(&response.body)
            .is_ok_and(|v| v.get("res").and_then(|r| r.as_str()) == Some("pong"))
}
