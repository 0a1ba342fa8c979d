//! Where the app password comes from: a provider the app implements (reading Android Keystore
//! or the iOS Keychain itself), or the platform keyring store by profile.

use credproxy::credentials::{self, CredentialStore, Secret};

use crate::error::MobileError;

/// Implemented by the app: hands over the Authentik app password it keeps.
#[uniffi::export(foreign)]
pub trait CredentialProvider: Send + Sync {
    /// The app password for `username` at `server_url`, or none when the app has none stored.
    fn app_password(
        &self,
        server_url: String,
        username: String,
    ) -> Result<Option<String>, MobileError>;
}

/// Stores `password` for `profile` in the platform keyring store (replacing any).
#[uniffi::export]
pub fn save_app_password(profile: String, password: String) -> Result<(), MobileError> {
    let profile = credproxy::config::validate_profile_name(&profile)?;
    Ok(platform::store()?.set(&profile, &Secret::new(password))?)
}

/// Removes the app password of `profile` (and its local credential) from the platform keyring
/// store; true if a password existed.
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

/// iOS, macOS, Linux, Windows: the core's keyring store (on iOS the Apple *protected* store,
/// the data-protection keychain).
#[cfg(not(target_os = "android"))]
mod platform {
    use credproxy::credentials::{CredentialStore, KeyringStore, StoreError};

    pub(super) fn store() -> Result<impl CredentialStore, StoreError> {
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
