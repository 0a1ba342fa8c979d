//! Where the app password comes from: a provider the app implements (reading Android Keystore
//! or the iOS Keychain itself), or the platform keyring store by profile; asked again while
//! the gate rejects what it gave, and on `reload_credentials`.

use std::sync::Arc;

use credproxy::credentials::{
    self, ClientIdentity, CredentialStore, Secret, SecretSource, StoreEntry, StoreError,
};

use crate::error::MobileError;

/// Implemented by the app: hands over the secret it keeps for the gate.
///
/// Asked when the proxy starts, again (at most about once a second) while the gate rejects
/// what it returned, and on `ProxyHandle::reload_credentials`: return the new value once the
/// user has saved one, and the proxy uses it without a restart.
#[uniffi::export(foreign)]
pub trait CredentialProvider: Send + Sync {
    /// The secret for `username` at `server_url`, or none when the app has none stored: the
    /// Authentik app password; for `cloudflare-access` the client id and the client secret on
    /// two lines; for `header` one line per header, in the order of the names.
    fn app_password(
        &self,
        server_url: String,
        username: String,
    ) -> Result<Option<String>, MobileError>;

    /// The client certificate to present to `server_url` (mutual TLS), or none when the server
    /// wants none. Asked when the proxy starts, by each check and on `reload_credentials`.
    fn client_certificate(
        &self,
        server_url: String,
    ) -> Result<Option<ClientCertificate>, MobileError>;
}

/// A client certificate as the app has it: PEM text (the chain and its private key), or a
/// PKCS#12 file (`.p12`, `.pfx`) with its password.
#[derive(uniffi::Enum)]
pub enum ClientCertificate {
    /// Certificate chain and private key, PEM.
    Pem {
        /// The PEM text.
        pem: String,
    },
    /// A PKCS#12 file and the password that opens it.
    Pkcs12 {
        /// The file's bytes.
        data: Vec<u8>,
        /// Its password.
        password: String,
    },
}

impl ClientCertificate {
    /// The identity, checked (the key fits, the type is supported, the dates hold).
    pub(crate) fn identity(&self) -> Result<ClientIdentity, MobileError> {
        let identity = match self {
            Self::Pem { pem } => ClientIdentity::from_pem(pem.as_bytes(), None),
            Self::Pkcs12 { data, password } => {
                ClientIdentity::from_pkcs12(data, &Secret::new(password.clone()))
            }
        }
        .and_then(|identity| {
            identity.check_dates(std::time::SystemTime::now())?;
            Ok(identity)
        })
        .map_err(|err| MobileError::InvalidConfig {
            detail: format!("the client certificate cannot be used: {err}"),
        })?;
        Ok(identity)
    }
}

/// Stores a client certificate (chain and private key) for `profile` in the platform keyring
/// store, after checking it; `check` and `start_proxy` with `Credentials.Keyring(profile)`
/// present it.
#[uniffi::export]
pub fn save_client_certificate(
    profile: String,
    certificate: ClientCertificate,
) -> Result<(), MobileError> {
    let profile = credproxy::config::validate_profile_name(&profile)?;
    let identity = certificate.identity()?;
    let stored = Secret::new(format!(
        "{}{}",
        identity.chain_pem(),
        identity.key_pem().expose()
    ));
    Ok(platform::store()?.set(&credentials::client_key_account(&profile), &stored)?)
}

/// The client certificate kept in the keyring for `profile`, if any.
pub(crate) fn keyring_identity(profile: &str) -> Result<Option<ClientIdentity>, MobileError> {
    let Some(stored) = platform::store()?.get(&credentials::client_key_account(profile))? else {
        return Ok(None);
    };
    ClientIdentity::from_pem(stored.expose().as_bytes(), None)
        .map(Some)
        .map_err(|err| MobileError::credentials(format!(
            "the client certificate stored for profile '{profile}' cannot be used ({err}); save it again with save_client_certificate"
        )))
}

/// Stores `password` for `profile` in the platform keyring store (replacing any); a proxy
/// running with that profile picks it up after its next rejected request or on
/// `reload_credentials`.
#[uniffi::export]
pub fn save_app_password(profile: String, password: String) -> Result<(), MobileError> {
    let profile = credproxy::config::validate_profile_name(&profile)?;
    Ok(platform::store()?.set(&profile, &Secret::new(password))?)
}

/// Removes the app password of `profile` (and its client certificate and local credential)
/// from the platform keyring store; true if a password or certificate existed.
#[uniffi::export]
pub fn delete_app_password(profile: String) -> Result<bool, MobileError> {
    let profile = credproxy::config::validate_profile_name(&profile)?;
    Ok(credentials::delete_profile(&platform::store()?, &profile)?)
}

/// The local credential kept in the keyring for `profile`, made and stored on first use.
pub(crate) fn keyring_local_token(profile: &str) -> Result<Secret, MobileError> {
    Ok(credentials::local_token(&platform::store()?, profile)?)
}

/// Reads the app password of `profile` from the platform keyring store.
pub(crate) fn keyring_password(profile: &str) -> Result<Secret, MobileError> {
    platform::store()?
        .get(profile)?
        .filter(|secret| !secret.is_empty())
        .ok_or_else(|| {
            MobileError::credentials(format!(
                "no app password stored for profile '{profile}' in the platform keyring; save one with save_app_password"
            ))
        })
}

/// The keyring entry of `profile`, read again when the gate rejects what it held.
pub(crate) fn keyring_source(profile: &str) -> Result<Arc<dyn SecretSource>, MobileError> {
    let store: Arc<dyn CredentialStore> = Arc::new(platform::store()?);
    Ok(Arc::new(StoreEntry::new(store, profile)))
}

/// Asks the app's provider for the password.
pub(crate) fn provider_password(
    provider: &dyn CredentialProvider,
    server_url: &str,
    username: &str,
) -> Result<Secret, MobileError> {
    provider
        .app_password(server_url.to_owned(), username.to_owned())?
        .map(Secret::new)
        .filter(|secret| !secret.is_empty())
        .ok_or_else(|| {
            MobileError::credentials(format!(
                "the app's credential provider has no app password for '{username}' at {server_url}"
            ))
        })
}

/// The app's provider as the core's [`SecretSource`].
pub(crate) struct ProviderSource {
    pub(crate) provider: Arc<dyn CredentialProvider>,
    pub(crate) server_url: String,
    pub(crate) username: String,
}

impl SecretSource for ProviderSource {
    fn read(&self) -> Result<Option<Secret>, StoreError> {
        match self
            .provider
            .app_password(self.server_url.clone(), self.username.clone())
        {
            Ok(password) => Ok(password.map(Secret::new).filter(|s| !s.is_empty())),
            Err(err) => Err(StoreError::Provider(err.to_string())),
        }
    }
}

/// iOS, macOS, Linux, Windows: the core's keyring store (on iOS the Apple *protected* store,
/// the data-protection keychain).
#[cfg(not(target_os = "android"))]
mod platform {
    use credproxy::credentials::{KeyringStore, StoreError};

    pub(super) fn store() -> Result<KeyringStore, StoreError> {
        Ok(KeyringStore::new())
    }
}

/// Android: SharedPreferences encrypted with a Keystore key (android-native-keyring-store),
/// which needs the app to have initialised the NDK context first (see README).
#[cfg(target_os = "android")]
mod platform {
    use credproxy::credentials::{KeyringStore, StoreError};

    pub(super) fn store() -> Result<KeyringStore, StoreError> {
        let unavailable = |detail: String| StoreError::Unavailable {
            detail,
            hint: "call io.crates.keyring.Keyring.initializeNdkContext(applicationContext) once before using the keyring",
        };
        // ndk-context panics when the app never initialised it: that is a setup step the app
        // missed, so it becomes an error the app can show instead of a crash.
        match std::panic::catch_unwind(android_native_keyring_store::Store::new) {
            Ok(Ok(store)) => Ok(KeyringStore::with_platform(store)),
            Ok(Err(err)) => Err(unavailable(err.to_string())),
            Err(_) => Err(unavailable(
                "the Android context was not initialised".to_owned(),
            )),
        }
    }
}
