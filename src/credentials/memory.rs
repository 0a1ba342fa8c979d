//! An in-memory credential store for tests, the demo and apps that keep secrets themselves.

use std::collections::HashMap;
use std::sync::Mutex;

use super::{CredentialStore, Secret, StoreError};

/// Keeps secrets in process memory only; nothing survives the process.
#[derive(Default)]
pub struct MemoryStore {
    entries: Mutex<HashMap<String, Secret>>,
}

impl MemoryStore {
    /// Creates an empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Secret>> {
        crate::sync::lock(&self.entries)
    }
}

impl CredentialStore for MemoryStore {
    fn get(&self, profile: &str) -> Result<Option<Secret>, StoreError> {
        Ok(self.entries().get(profile).cloned())
    }

    fn set(&self, profile: &str, secret: &Secret) -> Result<(), StoreError> {
        self.entries().insert(profile.to_owned(), secret.clone());
        Ok(())
    }

    fn delete(&self, profile: &str) -> Result<bool, StoreError> {
        Ok(self.entries().remove(profile).is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_delete() {
        let store = MemoryStore::new();
        assert!(store.get("a").unwrap().is_none());
        store.set("a", &Secret::new("s1".into())).unwrap();
        store.set("a", &Secret::new("s2".into())).unwrap();
        assert_eq!(store.get("a").unwrap().unwrap().expose(), "s2");
        assert!(store.delete("a").unwrap());
        assert!(!store.delete("a").unwrap());
        assert!(store.get("a").unwrap().is_none());
    }
}
