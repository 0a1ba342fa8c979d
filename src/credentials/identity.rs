//! Client certificates: an identity (a certificate chain and its private key) read from PEM
//! or PKCS#12, checked before it is stored (the key fits the certificate, rustls can sign with
//! it, the dates hold), kept as PEM text, and summarised for the doctor.
//!
//! The private key is a secret: it lives in a [`Secret`] (redacted, wiped on drop) and goes
//! to the keyring only; the chain is not secret and may sit in the config file.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::Secret;

/// The key types credproxy can present, as messages name them.
pub const SUPPORTED_KEYS: &str =
    "ECDSA P-256 or P-384, Ed25519, or RSA (2048 to 8192 bits), in PKCS#8, PKCS#1 or SEC1";

/// A client certificate chain and its private key.
#[derive(Clone)]
pub struct ClientIdentity {
    chain: Vec<CertificateDer<'static>>,
    /// The private key as PEM text.
    key: Secret,
    summary: CertInfo,
}

/// What the leaf certificate of an identity says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The subject's distinguished name.
    pub subject: String,
    /// The issuer's distinguished name.
    pub issuer: String,
    /// From when it is valid.
    pub not_before: SystemTime,
    /// Until when it is valid.
    pub not_after: SystemTime,
}

impl CertInfo {
    /// Whole days until it expires (negative once it has).
    pub fn days_left(&self, now: SystemTime) -> i64 {
        let seconds = |t: SystemTime| {
            t.duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64)
        };
        (seconds(self.not_after) - seconds(now)).div_euclid(86_400)
    }
}

/// Why a client certificate cannot be used; nothing is stored then.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The file is neither PEM nor PKCS#12.
    #[error("it is neither PEM (-----BEGIN CERTIFICATE-----) nor PKCS#12 (.p12/.pfx): {detail}")]
    NotPemOrPkcs12 {
        /// What the PKCS#12 reader said.
        detail: String,
    },
    /// The PKCS#12 password is wrong.
    #[error("the PKCS#12 password is wrong (or the file is damaged)")]
    WrongPassword,
    /// No certificate was found.
    #[error("no certificate in it: expected a PEM 'CERTIFICATE' block or a PKCS#12 key entry")]
    NoCertificate,
    /// No private key was found.
    #[error(
        "no private key in it: put the key in the same PEM file or pass it with --client-key FILE"
    )]
    NoKey,
    /// A PEM block could not be read.
    #[error("a PEM block cannot be read: {0}")]
    BadPem(String),
    /// The certificate cannot be parsed.
    #[error("the certificate cannot be parsed: {0}")]
    BadCertificate(String),
    /// rustls cannot sign with this key.
    #[error("the private key is not of a supported type (supported: {SUPPORTED_KEYS}): {0}")]
    UnsupportedKey(String),
    /// The key belongs to another certificate.
    #[error("the private key does not belong to the certificate (its public key differs)")]
    KeyMismatch,
    /// The certificate has expired.
    #[error("the certificate expired on {not_after} (valid from {not_before}); renew it")]
    Expired {
        /// Start of validity (RFC 3339, UTC).
        not_before: String,
        /// End of validity (RFC 3339, UTC).
        not_after: String,
    },
    /// The certificate is not valid yet.
    #[error(
        "the certificate is not valid before {not_before} (valid until {not_after}); check this machine's clock"
    )]
    NotYetValid {
        /// Start of validity (RFC 3339, UTC).
        not_before: String,
        /// End of validity (RFC 3339, UTC).
        not_after: String,
    },
}

/// Whether `data` is PEM text rather than binary PKCS#12.
pub fn is_pem(data: &[u8]) -> bool {
    data.trim_ascii_start().starts_with(b"-----BEGIN")
}

/// For a PKCS#12 file: whether it needs a password to open (`false` for one made without);
/// an error when `data` is no PKCS#12 at all (asked before prompting for a password).
pub fn pkcs12_needs_password(data: &[u8]) -> Result<bool, IdentityError> {
    match p12_keystore::KeyStore::from_pkcs12(data, "", p12_keystore::Pkcs12ImportPolicy::Strict) {
        Ok(_) => Ok(false),
        Err(p12_keystore::error::Error::MacError(_)) => Ok(true),
        Err(err) => Err(IdentityError::NotPemOrPkcs12 {
            detail: err.to_string(),
        }),
    }
}

impl ClientIdentity {
    /// The identity in `pem` (certificates, and the key unless `key_pem` holds it).
    pub fn from_pem(pem: &[u8], key_pem: Option<&[u8]>) -> Result<Self, IdentityError> {
        let mut chain = Vec::new();
        for cert in CertificateDer::pem_slice_iter(pem) {
            chain.push(cert.map_err(|e| IdentityError::BadPem(e.to_string()))?);
        }
        let key_source = key_pem.unwrap_or(pem);
        let key = match PrivateKeyDer::from_pem_slice(key_source) {
            Ok(key) => key,
            Err(rustls::pki_types::pem::Error::NoItemsFound) => {
                return Err(IdentityError::NoKey);
            }
            Err(err) => return Err(IdentityError::BadPem(err.to_string())),
        };
        Self::new(chain, key)
    }

    /// The identity in a PKCS#12 file opened with `password`.
    pub fn from_pkcs12(data: &[u8], password: &Secret) -> Result<Self, IdentityError> {
        let store = p12_keystore::KeyStore::from_pkcs12(
            data,
            password.expose(),
            p12_keystore::Pkcs12ImportPolicy::Strict,
        )
        .map_err(|err| match err {
            p12_keystore::error::Error::MacError(_) => IdentityError::WrongPassword,
            p12_keystore::error::Error::DerError(err) => IdentityError::NotPemOrPkcs12 {
                detail: err.to_string(),
            },
            other => IdentityError::NotPemOrPkcs12 {
                detail: other.to_string(),
            },
        })?;
        let (_, entry) = store
            .private_key_chain()
            .ok_or(IdentityError::NoCertificate)?;
        let chain = entry
            .certs()
            .iter()
            .map(|cert| CertificateDer::from(cert.as_der().to_vec()))
            .collect();
        let key = PrivateKeyDer::Pkcs8(entry.key().as_der().to_vec().into());
        Self::new(chain, key)
    }

    /// The identity in `data`, PEM or PKCS#12 (`password` opens the latter).
    pub fn from_file_contents(
        data: &[u8],
        key_pem: Option<&[u8]>,
        password: Option<&Secret>,
    ) -> Result<Self, IdentityError> {
        if is_pem(data) {
            Self::from_pem(data, key_pem)
        } else {
            let empty = Secret::new(String::new());
            Self::from_pkcs12(data, password.unwrap_or(&empty))
        }
    }

    fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, IdentityError> {
        let leaf = chain.first().ok_or(IdentityError::NoCertificate)?;
        let summary = cert_info(leaf)?;
        let provider = rustls::crypto::ring::default_provider();
        let signing = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| IdentityError::UnsupportedKey(e.to_string()))?;
        let certified = rustls::sign::CertifiedKey::new(chain.clone(), signing);
        match certified.keys_match() {
            // `Unknown`: the key cannot tell its public half; the server will judge.
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                return Err(IdentityError::KeyMismatch);
            }
            Err(other) => return Err(IdentityError::BadCertificate(other.to_string())),
        }
        Ok(Self {
            chain,
            key: Secret::new(pem_block(private_key_label(&key), key.secret_der())),
            summary,
        })
    }

    /// Fails for a certificate that is not valid at `now`, naming its dates.
    pub fn check_dates(&self, now: SystemTime) -> Result<(), IdentityError> {
        let info = &self.summary;
        let dates = || {
            (
                crate::utc::seconds(info.not_before),
                crate::utc::seconds(info.not_after),
            )
        };
        if now > info.not_after {
            let (not_before, not_after) = dates();
            return Err(IdentityError::Expired {
                not_before,
                not_after,
            });
        }
        if now < info.not_before {
            let (not_before, not_after) = dates();
            return Err(IdentityError::NotYetValid {
                not_before,
                not_after,
            });
        }
        Ok(())
    }

    /// What the leaf certificate says.
    pub fn info(&self) -> &CertInfo {
        &self.summary
    }

    /// The certificate chain as PEM text (not secret: for the config file).
    pub fn chain_pem(&self) -> String {
        self.chain
            .iter()
            .map(|cert| pem_block("CERTIFICATE", cert.as_ref()))
            .collect()
    }

    /// The private key as PEM text (secret: for the keyring only).
    pub fn key_pem(&self) -> &Secret {
        &self.key
    }

    /// The chain and key in rustls' terms.
    pub fn to_rustls(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = PrivateKeyDer::from_pem_slice(self.key.expose().as_bytes())
            .expect("the key was read from this PEM text when the identity was made");
        (self.chain.clone(), key)
    }
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("subject", &self.summary.subject)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl PartialEq for ClientIdentity {
    fn eq(&self, other: &Self) -> bool {
        self.chain == other.chain && self.key == other.key
    }
}

impl Eq for ClientIdentity {}

fn private_key_label(key: &PrivateKeyDer<'_>) -> &'static str {
    match key {
        PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
        PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
        _ => "PRIVATE KEY",
    }
}

/// One PEM block: base64 in lines of 64 characters.
fn pem_block(label: &str, der: &[u8]) -> String {
    let encoded = zeroize::Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(der));
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in encoded.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn cert_info(der: &CertificateDer<'_>) -> Result<CertInfo, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let time = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
        } else {
            UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
        }
    };
    let validity = cert.validity();
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        not_before: time(validity.not_before),
        not_after: time(validity.not_after),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, date_time_ymd};

    fn self_signed(not_before: (i32, u8, u8), not_after: (i32, u8, u8)) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.not_before = date_time_ymd(not_before.0, not_before.1, not_before.2);
        params.not_after = date_time_ymd(not_after.0, not_after.1, not_after.2);
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn a_pem_identity_keeps_its_chain_and_key_apart() {
        let (cert, key) = self_signed((2020, 1, 1), (4096, 1, 1));
        let both = format!("{cert}{key}");
        let identity = ClientIdentity::from_pem(both.as_bytes(), None).unwrap();
        assert_eq!(identity.chain_pem().trim(), cert.trim());
        assert!(identity.key_pem().expose().contains("PRIVATE KEY"));
        assert!(!format!("{identity:?}").contains("PRIVATE KEY"));
        // The key may come from its own file.
        let apart = ClientIdentity::from_pem(cert.as_bytes(), Some(key.as_bytes())).unwrap();
        assert_eq!(apart, identity);
        assert!(identity.check_dates(SystemTime::now()).is_ok());
    }

    #[test]
    fn bad_input_is_named() {
        let (cert, key) = self_signed((2020, 1, 1), (4096, 1, 1));
        let (_, other_key) = self_signed((2020, 1, 1), (4096, 1, 1));
        assert_eq!(
            ClientIdentity::from_pem(cert.as_bytes(), None).unwrap_err(),
            IdentityError::NoKey
        );
        assert_eq!(
            ClientIdentity::from_pem(key.as_bytes(), None).unwrap_err(),
            IdentityError::NoCertificate
        );
        assert_eq!(
            ClientIdentity::from_pem(cert.as_bytes(), Some(other_key.as_bytes())).unwrap_err(),
            IdentityError::KeyMismatch
        );
        let not_either = ClientIdentity::from_file_contents(b"hello", None, None).unwrap_err();
        assert!(
            matches!(not_either, IdentityError::NotPemOrPkcs12 { .. }),
            "{not_either}"
        );
        let p521 = include_bytes!("../../tests/data/p521-client.pem");
        match ClientIdentity::from_pem(p521, None).unwrap_err() {
            IdentityError::UnsupportedKey(_) => {}
            other => panic!("{other}"),
        }
        assert!(
            IdentityError::UnsupportedKey(String::new())
                .to_string()
                .contains("ECDSA P-256 or P-384, Ed25519")
        );
    }

    #[test]
    fn certificates_outside_their_dates_are_refused_with_the_dates() {
        let (cert, key) = self_signed((2020, 1, 1), (2021, 1, 1));
        let expired = ClientIdentity::from_pem(format!("{cert}{key}").as_bytes(), None).unwrap();
        let err = expired.check_dates(SystemTime::now()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the certificate expired on 2021-01-01T00:00:00Z (valid from 2020-01-01T00:00:00Z); renew it"
        );
        let (cert, key) = self_signed((4000, 1, 1), (4096, 1, 1));
        let early = ClientIdentity::from_pem(format!("{cert}{key}").as_bytes(), None).unwrap();
        assert!(matches!(
            early.check_dates(SystemTime::now()),
            Err(IdentityError::NotYetValid { .. })
        ));
        assert!(early.info().days_left(SystemTime::now()) > 700_000);
    }
}
