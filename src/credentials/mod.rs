//! Where secrets live and what they become: a small store trait, the OS keyring behind it, an
//! in-memory store, the [`Secret`] type, and the auth schemes that turn a stored secret into
//! the headers a gate wants.
//!
//! Owns: [`CredentialStore`] and its keyring and memory stores, the keyring accounts a
//! profile uses, the local client credential, [`Scheme`]/[`Injection`], and client
//! certificates ([`ClientIdentity`]).

mod identity;
mod keyring;
mod memory;
mod scheme;
mod secret;

pub use self::identity::{
    CertInfo, ClientIdentity, IdentityError, SUPPORTED_KEYS, is_pem, pkcs12_needs_password,
};
pub use self::keyring::KeyringStore;
pub use self::memory::MemoryStore;
pub use self::scheme::{CF_ACCESS_HEADERS, Injection, Scheme, basic_value};
pub use self::secret::Secret;
pub use crate::error::StoreError;

/// The keyring service name every credproxy entry is filed under.
pub const SERVICE: &str = "credproxy";

/// The keyring account of a profile's local client credential (`serve --local-auth`);
/// profile names cannot contain ':', so it never clashes with a profile's own entry.
pub fn local_token_account(profile: &str) -> String {
    format!("local-auth:{profile}")
}

/// The keyring account of a profile's client certificate key (PEM; for an app, the chain
/// too).
pub fn client_key_account(profile: &str) -> String {
    format!("client-key:{profile}")
}

/// A place that keeps one secret per profile.
///
/// Calls may block (a D-Bus round trip on Linux): async code runs them on a blocking thread.
pub trait CredentialStore: Send + Sync {
    /// Returns the secret stored for `profile`, or `None` when there is none.
    fn get(&self, profile: &str) -> Result<Option<Secret>, StoreError>;
    /// Stores (or replaces) the secret for `profile`.
    fn set(&self, profile: &str, secret: &Secret) -> Result<(), StoreError>;
    /// Removes the secret for `profile`; returns whether one existed.
    fn delete(&self, profile: &str) -> Result<bool, StoreError>;
}

/// Where one profile's secret is read from, and read again whenever it may have changed (the
/// gate rejected it, the user reloaded, an app stored a new one).
///
/// Reads may block (a D-Bus round trip, an app's keystore): async code runs them on a
/// blocking thread.
pub trait SecretSource: Send + Sync {
    /// The secret stored now, or `None` when there is none (logged out, never stored).
    fn read(&self) -> Result<Option<Secret>, StoreError>;
}

/// A profile's entry in a credential store, as a [`SecretSource`].
pub struct StoreEntry {
    store: std::sync::Arc<dyn CredentialStore>,
    account: String,
}

impl StoreEntry {
    /// The entry of `profile` in `store`.
    pub fn new(store: std::sync::Arc<dyn CredentialStore>, profile: &str) -> Self {
        Self {
            store,
            account: profile.to_owned(),
        }
    }
}

impl SecretSource for StoreEntry {
    fn read(&self) -> Result<Option<Secret>, StoreError> {
        Ok(self.store.get(&self.account)?.filter(|s| !s.is_empty()))
    }
}

/// The local client credential of `profile` (what `serve --local-auth` and an app's
/// `local_auth` require from clients), made and stored on first use.
pub fn local_token(store: &dyn CredentialStore, profile: &str) -> Result<Secret, StoreError> {
    let account = local_token_account(profile);
    if let Some(token) = store.get(&account)?.filter(|token| !token.is_empty()) {
        return Ok(token);
    }
    let token = Secret::random();
    store.set(&account, &token)?;
    Ok(token)
}

/// Removes every secret of `profile` (its credentials, its client certificate key and its
/// local client credential); returns whether its credentials or key existed.
pub fn delete_profile(store: &dyn CredentialStore, profile: &str) -> Result<bool, StoreError> {
    store.delete(&local_token_account(profile))?;
    let key = store.delete(&client_key_account(profile))?;
    Ok(store.delete(profile)? || key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_token_is_made_once_and_deleted_with_the_profile() {
        let store = MemoryStore::new();
        store.set("home", &Secret::new("pw".into())).unwrap();
        let first = local_token(&store, "home").unwrap();
        assert_eq!(first.expose().len(), 32, "24 random bytes in base64url");
        assert_eq!(local_token(&store, "home").unwrap(), first);
        assert!(delete_profile(&store, "home").unwrap());
        assert!(store.get(&local_token_account("home")).unwrap().is_none());
        assert!(store.get("home").unwrap().is_none());
        assert!(!delete_profile(&store, "home").unwrap());
        assert_ne!(local_token(&store, "home").unwrap(), first);
    }
}
