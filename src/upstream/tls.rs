//! TLS to the upstream: which server certificates are trusted (public roots, the platform's,
//! an extra CA, key pins), as a value handed in, the client certificate presented when the
//! server asks for one, and the rustls client configuration (ring).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore};

use crate::config::{CaCert, LanRoute, Profile};
use crate::credentials::ClientIdentity;
use crate::error::{Error, Result};

/// Which certificates the upstream may present: public roots plus any extra CAs.
///
/// Verification is always on; there is deliberately no way to turn it off.
#[derive(Debug, Clone, Default)]
pub struct TlsTrust {
    extra_roots: Vec<CertificateDer<'static>>,
    /// SHA-256 hashes of accepted server keys (SubjectPublicKeyInfo); when any are set, the
    /// server's key must match one of them, and a match is trusted without a CA (self-signed).
    pins: Vec<[u8; 32]>,
    /// The name the certificate must be valid for, when it is not the name connected to (a
    /// LAN front with a certificate of its own, reached under the public name); only the
    /// extra CAs are trusted then.
    verify_name: Option<ServerName<'static>>,
}

impl TlsTrust {
    /// Trusts the public web PKI (bundled Mozilla roots and the platform's roots).
    pub fn public() -> Self {
        Self::default()
    }

    /// The trust a profile asks for: the public roots, its extra CA and its key pins.
    pub fn for_profile(profile: &Profile) -> Result<Self> {
        let mut trust = match &profile.ca_cert {
            Some(CaCert::File(path)) => Self::public().with_ca_file(path)?,
            Some(CaCert::Pem(pem)) => {
                Self::public()
                    .with_ca_pem(pem.as_bytes())
                    .map_err(|reason| Error::Invalid {
                        what: "CA certificate",
                        reason,
                    })?
            }
            None => Self::public(),
        };
        for pin in &profile.pins {
            trust = trust.with_pin(pin).map_err(|reason| Error::Invalid {
                what: "pin",
                reason,
            })?;
        }
        Ok(trust)
    }

    /// The trust for a profile's LAN route: the LAN front's own pins, or its own CA for its
    /// own name (the LAN host name or address), or else the profile's trust, for the public
    /// name the connection is made under.
    pub fn for_lan(profile: &Profile, lan: &LanRoute) -> Result<Self> {
        if !lan.pins.is_empty() {
            let mut trust = Self::default();
            for pin in &lan.pins {
                trust = trust.with_pin(pin).map_err(|reason| Error::Invalid {
                    what: "LAN pin",
                    reason,
                })?;
            }
            return Ok(trust);
        }
        let Some(ca) = &lan.ca_cert else {
            return Self::for_profile(profile);
        };
        let trust = match ca {
            CaCert::File(path) => Self::default().with_ca_file(path)?,
            CaCert::Pem(pem) => Self::default()
                .with_ca_pem(pem.as_bytes())
                .map_err(|reason| Error::Invalid {
                    what: "LAN CA certificate",
                    reason,
                })?,
        };
        let name = ServerName::try_from(lan.url.host().to_owned()).map_err(|e| Error::Invalid {
            what: "LAN address",
            reason: e.to_string(),
        })?;
        Ok(Self {
            verify_name: Some(name),
            ..trust
        })
    }

    /// Also trusts every certificate in a PEM file (a homelab or test CA).
    pub fn with_ca_file(self, path: &Path) -> Result<Self> {
        let pem = std::fs::read(path).map_err(|e| Error::CaCert {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        self.with_ca_pem(&pem).map_err(|reason| Error::CaCert {
            path: path.to_owned(),
            reason,
        })
    }

    /// Also trusts every certificate in PEM text; the error says what was wrong.
    pub fn with_ca_pem(mut self, pem: &[u8]) -> Result<Self, String> {
        let mut found = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| format!("not a valid PEM certificate ({e})"))?;
            let mut probe = RootCertStore::empty();
            probe
                .add(cert.clone())
                .map_err(|e| format!("not a usable CA certificate ({e})"))?;
            self.extra_roots.push(cert);
            found += 1;
        }
        if found == 0 {
            return Err("no PEM 'CERTIFICATE' block found".to_owned());
        }
        Ok(self)
    }

    /// Also requires (and accepts) a server key with this `sha256/BASE64` SPKI pin.
    pub fn with_pin(mut self, pin: &str) -> Result<Self, String> {
        self.pins.push(crate::config::parse_pin(pin)?);
        Ok(self)
    }

    /// Whether any key pins are set.
    pub fn is_pinned(&self) -> bool {
        !self.pins.is_empty()
    }

    /// Builds the rustls client configuration (ring provider) for this trust, presenting
    /// `identity` to a server that asks for a client certificate.
    pub fn client_config(
        &self,
        alpn: &[&[u8]],
        identity: Option<&ClientIdentity>,
    ) -> Result<Arc<ClientConfig>> {
        Ok(self.client_config_seen(alpn, identity)?.0)
    }

    /// [`TlsTrust::client_config`], and a record of whether the server asked for a client
    /// certificate (what `login` and the doctor report).
    pub fn client_config_seen(
        &self,
        alpn: &[&[u8]],
        identity: Option<&ClientIdentity>,
    ) -> Result<(Arc<ClientConfig>, Arc<ClientAuth>)> {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for cert in platform_roots() {
            // A platform root rustls cannot parse is skipped, as browsers do.
            let _ = roots.add(cert.clone());
        }
        for cert in &self.extra_roots {
            roots
                .add(cert.clone())
                .map_err(|e| Error::Tls(e.to_string()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let auth = Arc::new(ClientAuth::new(identity, &provider)?);
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(e.to_string()))?;
        let mut config = if let Some(name) = &self.verify_name {
            // Only the extra CAs, for the name they issue for.
            let mut own = RootCertStore::empty();
            for cert in &self.extra_roots {
                own.add(cert.clone())
                    .map_err(|e| Error::Tls(e.to_string()))?;
            }
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(own), provider)
                .build()
                .map_err(|e| Error::Tls(e.to_string()))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NamedVerifier {
                    name: name.clone(),
                    webpki,
                }))
                .with_client_cert_resolver(auth.clone())
        } else if self.pins.is_empty() {
            builder
                .with_root_certificates(roots)
                .with_client_cert_resolver(auth.clone())
        } else {
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| Error::Tls(e.to_string()))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                    pins: self.pins.clone(),
                    webpki,
                }))
                .with_client_cert_resolver(auth.clone())
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok((Arc::new(config), auth))
    }
}

/// The client side of TLS client authentication: the identity presented when the server asks
/// for one (none: the handshake goes on without), and whether it asked.
#[derive(Debug)]
pub struct ClientAuth {
    key: Option<Arc<CertifiedKey>>,
    asked: AtomicBool,
}

impl ClientAuth {
    fn new(
        identity: Option<&ClientIdentity>,
        provider: &rustls::crypto::CryptoProvider,
    ) -> Result<Self> {
        let key = match identity {
            Some(identity) => {
                let (chain, key) = identity.to_rustls();
                let signing = provider
                    .key_provider
                    .load_private_key(key)
                    .map_err(|e| Error::Tls(format!("cannot use the client key: {e}")))?;
                Some(Arc::new(CertifiedKey::new(chain, signing)))
            }
            None => None,
        };
        Ok(Self {
            key,
            asked: AtomicBool::new(false),
        })
    }

    /// Whether a server asked for a client certificate since this configuration was made.
    pub fn asked(&self) -> bool {
        self.asked.load(Ordering::Relaxed)
    }
}

impl ResolvesClientCert for ClientAuth {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.asked.store(true, Ordering::Relaxed);
        self.key.clone()
    }

    fn has_certs(&self) -> bool {
        self.key.is_some()
    }
}

/// What happened to client authentication in one connection's handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateRequest {
    /// The server did not ask for a client certificate.
    NotAsked,
    /// The server asked and none was sent (the profile has none).
    NoneSent,
    /// The server asked and the profile's certificate was sent.
    Sent,
}

/// Watches the handshake of one connection: whether the server asked for a client
/// certificate and whether one was sent. A server that drops the connection after the
/// handshake without a TLS alert (Python's asyncio TLS servers do) leaves nothing else to
/// say why.
#[derive(Debug)]
pub struct HandshakeWitness {
    inner: Arc<dyn ResolvesClientCert>,
    asked: AtomicBool,
    sent: AtomicBool,
}

impl HandshakeWitness {
    /// A copy of `config` for one connection, whose handshake the returned witness watches.
    pub fn watch(config: &ClientConfig) -> (ClientConfig, Arc<Self>) {
        let witness = Arc::new(Self {
            inner: config.client_auth_cert_resolver.clone(),
            asked: AtomicBool::new(false),
            sent: AtomicBool::new(false),
        });
        let mut config = config.clone();
        config.client_auth_cert_resolver = witness.clone();
        (config, witness)
    }

    /// What the handshake saw so far (complete once it finished).
    pub fn request(&self) -> CertificateRequest {
        match (
            self.asked.load(Ordering::Relaxed),
            self.sent.load(Ordering::Relaxed),
        ) {
            (false, _) => CertificateRequest::NotAsked,
            (true, false) => CertificateRequest::NoneSent,
            (true, true) => CertificateRequest::Sent,
        }
    }
}

impl ResolvesClientCert for HandshakeWitness {
    fn resolve(
        &self,
        root_hint_subjects: &[&[u8]],
        sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let key = self.inner.resolve(root_hint_subjects, sigschemes);
        self.asked.store(true, Ordering::Relaxed);
        self.sent.store(key.is_some(), Ordering::Relaxed);
        key
    }

    fn has_certs(&self) -> bool {
        self.inner.has_certs()
    }
}

/// The SHA-256 hash of a certificate's SubjectPublicKeyInfo.
pub fn spki_sha256(cert: &CertificateDer<'_>) -> Option<[u8; 32]> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let digest = ring::digest::digest(&ring::digest::SHA256, parsed.public_key().raw);
    digest.as_ref().try_into().ok()
}

/// Trusts exactly the pinned server keys. The handshake signatures are still checked (by
/// the WebPKI verifier's algorithms), so only a holder of a pinned private key gets through.
#[derive(Debug)]
struct PinnedVerifier {
    pins: Vec<[u8; 32]>,
    webpki: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use base64::Engine as _;
        let hash = spki_sha256(end_entity).ok_or(rustls::Error::InvalidCertificate(
            rustls::CertificateError::BadEncoding,
        ))?;
        if self.pins.contains(&hash) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the server's key does not match the pinned key; it presents sha256/{}",
                base64::engine::general_purpose::STANDARD.encode(hash)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// Verifies the certificate for a name of its own rather than the one connected under: a
/// LAN front's certificate for its LAN name, reached with the public name as SNI.
#[derive(Debug)]
struct NamedVerifier {
    name: ServerName<'static>,
    webpki: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for NamedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.webpki
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// The platform's trusted roots, read once per process.
fn platform_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| rustls_native_certs::load_native_certs().certs)
}
