//! Certificates for the tests: the upstream's server certificate from a test CA, and client
//! certificates from a client CA the upstream trusts (valid, expired, not yet valid) or from
//! a CA nobody trusts, as PEM or PKCS#12.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, date_time_ymd,
};

/// An upstream's TLS certificate for `host`, from a CA of its own.
pub struct ServerCert {
    /// The CA's certificate, PEM: what the proxy trusts.
    pub ca_pem: String,
    /// The server's certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PKCS#8 PEM.
    pub key_pem: String,
}

impl ServerCert {
    pub fn new(host: &str) -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "credproxy test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![host.to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        Self {
            ca_pem: ca_cert.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// A certificate authority that issues client certificates.
pub struct ClientCa {
    /// Its certificate, PEM.
    pub ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// When a certificate is valid.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Validity {
    /// From 2020 to 4096.
    Current,
    /// 2020 to 2021.
    Expired,
    /// From 4000.
    NotYet,
}

/// A client certificate and its key.
pub struct ClientCert {
    pub cert_pem: String,
    pub key_pem: String,
    cert_der: Vec<u8>,
    key_der: Vec<u8>,
}

impl ClientCa {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        Self {
            ca_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A client certificate for `name`.
    pub fn issue(&self, name: &str, validity: Validity) -> ClientCert {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let (from, until) = match validity {
            Validity::Current => ((2020, 1, 1), (4096, 1, 1)),
            Validity::Expired => ((2020, 1, 1), (2021, 1, 1)),
            Validity::NotYet => ((4000, 1, 1), (4096, 1, 1)),
        };
        params.not_before = date_time_ymd(from.0, from.1, from.2);
        params.not_after = date_time_ymd(until.0, until.1, until.2);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        ClientCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        }
    }
}

impl ClientCert {
    /// Certificate and key in one PEM text.
    pub fn pem(&self) -> String {
        format!("{}{}", self.cert_pem, self.key_pem)
    }

    /// A PKCS#12 file of the certificate and key, locked with `password`.
    pub fn pkcs12(&self, password: &str) -> Vec<u8> {
        use p12_keystore::{Certificate, KeyStore, KeyStoreEntry, PrivateKey, PrivateKeyChain};
        let chain = PrivateKeyChain::new(
            "client",
            PrivateKey::from_der(&self.key_der).unwrap(),
            [Certificate::from_der(&self.cert_der).unwrap()],
        );
        let mut store = KeyStore::new();
        store.add_entry("client", KeyStoreEntry::PrivateKeyChain(chain));
        store.writer(password).write().unwrap()
    }
}
