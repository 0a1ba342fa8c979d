//! `credproxy logout`: remove a profile's keyring entries and its config entry.

use std::sync::Arc;

use super::{Result, blocking};
use crate::config::{self, ConfigStore};
use crate::credentials::{self, CredentialStore};
use crate::error::Error;

/// Runs `logout`.
pub async fn run(
    config: &ConfigStore,
    keyring: Arc<dyn CredentialStore>,
    profile: &str,
) -> Result<()> {
    let name = config::validate_profile_name(profile)?;
    // The entry goes first: a config file that cannot be read or written stops the logout
    // before any secret is deleted.
    let had_profile = config.update(|file| Ok(file.profiles.remove(&name).is_some()))?;
    let key = name.clone();
    let had_secret = blocking(move || credentials::delete_profile(keyring.as_ref(), &key)).await?;
    if !had_profile && !had_secret {
        return Err(Error::UnknownProfile {
            profile: name,
            path: config.path().to_owned(),
        }
        .into());
    }
    eprintln!("credproxy: removed profile '{name}' and its keyring entry");
    super::running::tell(config, &name, false).await;
    Ok(())
}
