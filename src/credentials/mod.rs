//! Where secrets live: a small store trait, the OS keyring behind it, and an in-memory store.

mod keyring;
mod memory;
mod secret;

pub use self::keyring::KeyringStore;
pub use self::memory::MemoryStore;
pub use self::secret::Secret;

/// The keyring service name every credproxy entry is filed under.
pub const SERVICE: &str = "credproxy";

/// The keyring account of a profile's local client credential (`serve --local-auth`);
/// profile names cannot contain ':', so it never clashes with a profile's own entry.
pub fn local_token_account(profile: &str) -> String {
    format!("local-auth:{profile}")
}

/// Why a credential store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No keyring service could be reached at all.
    #[error("the OS keyring is not reachable ({detail}); {hint}")]
    Unavailable {
        /// What the platform said, free of secrets.
        detail: String,
        /// What the user can do about it on this platform.
        hint: &'static str,
    },
    /// The keyring answered but refused or failed the operation.
    #[error("the OS keyring failed: {0}")]
    Failed(String),
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
