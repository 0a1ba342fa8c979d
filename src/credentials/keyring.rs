//! The OS keyring (Secret Service, Apple Keychain, Windows Credential Manager) as a store.

use std::sync::{Arc, OnceLock};

use keyring_core::{CredentialStore as PlatformStore, Entry, Error as KeyringError};

use super::{CredentialStore, SERVICE, Secret, StoreError};

/// What to do when the platform keyring cannot be reached, per platform.
#[cfg(target_os = "linux")]
const HINT: &str = "credproxy needs a Secret Service provider on the D-Bus session bus: \
    start gnome-keyring-daemon (or KeePassXC with Secret Service enabled) and make sure \
    DBUS_SESSION_BUS_ADDRESS is set; on a headless machine run credproxy inside \
    `dbus-run-session` with an unlocked keyring";
#[cfg(not(target_os = "linux"))]
const HINT: &str = "unlock the login keychain or credential manager and try again";

/// Secrets in the platform keyring, one entry per profile under service `credproxy`.
///
/// The platform store is opened on first use, so commands that never touch a secret
/// (such as `profiles`) work without a keyring.
#[derive(Default)]
pub struct KeyringStore {
    platform: OnceLock<Arc<PlatformStore>>,
}

impl KeyringStore {
    /// Creates a store that connects to the platform keyring on first use.
    pub fn new() -> Self {
        Self::default()
    }

    /// Uses an already opened platform store: Android's, which the host app can open only
    /// after it has handed over its context.
    pub fn with_platform(platform: Arc<PlatformStore>) -> Self {
        Self {
            platform: OnceLock::from(platform),
        }
    }

    fn entry(&self, profile: &str) -> Result<Entry, StoreError> {
        let store = match self.platform.get() {
            Some(store) => store.clone(),
            None => {
                let opened = open_platform_store().map_err(unavailable)?;
                self.platform.get_or_init(|| opened).clone()
            }
        };
        Entry::new_in_store(&store, SERVICE, profile).map_err(failed)
    }
}

impl CredentialStore for KeyringStore {
    fn get(&self, profile: &str) -> Result<Option<Secret>, StoreError> {
        match self.entry(profile)?.get_password() {
            Ok(password) => Ok(Some(Secret::new(password))),
            Err(KeyringError::NoEntry) => Ok(None),
            Err(err) => Err(failed(err)),
        }
    }

    fn set(&self, profile: &str, secret: &Secret) -> Result<(), StoreError> {
        self.entry(profile)?
            .set_password(secret.expose())
            .map_err(failed)
    }

    fn delete(&self, profile: &str) -> Result<bool, StoreError> {
        match self.entry(profile)?.delete_credential() {
            Ok(()) => Ok(true),
            Err(KeyringError::NoEntry) => Ok(false),
            Err(err) => Err(failed(err)),
        }
    }
}

#[cfg(target_os = "linux")]
fn open_platform_store() -> keyring_core::Result<Arc<PlatformStore>> {
    Ok(zbus_secret_service_keyring_store::Store::new()?)
}

#[cfg(target_os = "macos")]
fn open_platform_store() -> keyring_core::Result<Arc<PlatformStore>> {
    Ok(apple_native_keyring_store::keychain::Store::new()?)
}

#[cfg(target_os = "ios")]
fn open_platform_store() -> keyring_core::Result<Arc<PlatformStore>> {
    Ok(apple_native_keyring_store::protected::Store::new()?)
}

#[cfg(target_os = "windows")]
fn open_platform_store() -> keyring_core::Result<Arc<PlatformStore>> {
    Ok(windows_native_keyring_store::Store::new()?)
}

#[cfg(not(any(
    target_os = "linux",
    target_os = "macos",
    target_os = "ios",
    target_os = "windows"
)))]
fn open_platform_store() -> keyring_core::Result<Arc<PlatformStore>> {
    // Android's store needs a JVM context, which only the host app has: it comes with
    // the mobile library, which passes credentials in through its own interface.
    Err(KeyringError::NotSupportedByStore(
        "no OS keyring store is built in for this platform".to_owned(),
    ))
}

fn unavailable(err: KeyringError) -> StoreError {
    StoreError::Unavailable {
        detail: describe(&err),
        hint: HINT,
    }
}

fn failed(err: KeyringError) -> StoreError {
    match err {
        KeyringError::NoStorageAccess(_) => unavailable(err),
        other => StoreError::Failed(describe(&other)),
    }
}

/// Describes a keyring error without ever printing the bytes some variants carry.
fn describe(err: &KeyringError) -> String {
    match err {
        KeyringError::PlatformFailure(e) | KeyringError::NoStorageAccess(e) => e.to_string(),
        KeyringError::BadEncoding(_) => "the stored secret is not valid UTF-8".to_owned(),
        KeyringError::BadDataFormat(_, _) => "the stored secret is in an unknown format".to_owned(),
        KeyringError::Ambiguous(entries) => format!(
            "{} entries match; remove the extra ones with your keyring tool",
            entries.len()
        ),
        other => other.to_string(),
    }
}
