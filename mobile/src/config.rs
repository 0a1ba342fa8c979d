//! What the app passes in: the server, the account, where to listen, whom to trust, and where
//! the app password comes from; validated once into the core's settings.

use std::sync::Arc;
use std::time::Duration;

use credproxy::Error;
use credproxy::config::{self, CaCert, Profile, ServerUrl};
use credproxy::credentials::{Scheme, Secret};
use credproxy::proxy::ProxySettings;

use crate::credentials::{self, CredentialProvider};
use crate::error::MobileError;

/// The profile name used in messages when the app supplies the password itself.
const APP_PROFILE: &str = "app";

/// How long a body may stall before a transfer is abandoned (a phone may pause a while).
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Where the app password comes from.
#[derive(uniffi::Enum)]
pub enum Credentials {
    /// The app's own provider, asked once when the proxy starts (and by each check).
    Provider {
        /// The app's implementation.
        provider: Arc<dyn CredentialProvider>,
    },
    /// The platform keyring store, entry `credproxy` / `profile`, saved with
    /// `save_app_password`.
    Keyring {
        /// The profile name (letters, digits, `-`, `_`, `.`).
        profile: String,
    },
}

/// Everything `start_proxy` and `check` need.
#[derive(uniffi::Record)]
pub struct ProxyConfig {
    /// The Authentik-fronted Immich origin, e.g. `https://immich.example.com`.
    pub server_url: String,
    /// The Authentik service account's username.
    pub username: String,
    /// Where the app password comes from.
    pub credentials: Credentials,
    /// The loopback port to listen on; 0 picks a free one (read it back with `port()`).
    #[uniffi(default = 0)]
    pub listen_port: u16,
    /// Extra CA certificates (PEM) to trust for this server, for a private or homelab CA.
    #[uniffi(default = None)]
    pub ca_pem: Option<String>,
    /// The server's public-key pin, `sha256/BASE64` as `check` shows it in its `tls` step: the
    /// server's key must then match it, and a self-signed server needs no `ca_pem`.
    #[uniffi(default = None)]
    pub pin: Option<String>,
    /// Require the local credential from clients, so other apps on the phone cannot use the
    /// proxy; clients then use `local_url()`, `http://credproxy:TOKEN@127.0.0.1:PORT`.
    #[uniffi(default = false)]
    pub local_auth: bool,
    /// The local credential's token (16 to 128 letters, digits, `-`, `_`). When empty, a
    /// `Keyring` profile keeps one in the keyring (as `credproxy serve --local-auth` does), and
    /// with a `Provider` each start makes a fresh one, which the app may keep and pass here so
    /// that clients' URLs stay the same.
    #[uniffi(default = None)]
    pub local_token: Option<String>,
}

impl ProxyConfig {
    /// Validates the configuration into the core's profile and proxy settings.
    pub(crate) fn settings(&self) -> Result<ProxySettings, MobileError> {
        let profile = Profile {
            name: match &self.credentials {
                Credentials::Provider { .. } => APP_PROFILE.to_owned(),
                Credentials::Keyring { profile } => config::validate_profile_name(profile)?,
            },
            server: ServerUrl::parse(&self.server_url)?,
            username: config::validate_username(&self.username)?,
            auth: Scheme::Basic,
            listen: config::DEFAULT_LISTEN,
            ca_cert: non_empty(&self.ca_pem).map(|pem| CaCert::Pem(pem.to_owned())),
            pins: non_empty(&self.pin)
                .map(config::validate_pin)
                .transpose()?
                .into_iter()
                .collect(),
            local_auth: self.local_auth,
            allow_hosts: Vec::new(),
        };
        let mut settings = ProxySettings::for_profile(&profile, self.fix_credentials_hint())
            .map_err(|err| match err {
                // Named as the app knows them.
                Error::Invalid { what, reason } if what == "CA certificate" || what == "pin" => {
                    MobileError::InvalidConfig {
                        detail: format!(
                            "{} cannot be used: {reason}",
                            if what == "pin" { "pin" } else { "ca_pem" }
                        ),
                    }
                }
                other => other.into(),
            })?;
        settings.idle_timeout = IDLE_TIMEOUT;
        Ok(settings)
    }

    /// The local credential clients must present, or none when `local_auth` is off.
    pub(crate) fn local_token(
        &self,
        settings: &ProxySettings,
    ) -> Result<Option<Secret>, MobileError> {
        if !self.local_auth {
            return Ok(None);
        }
        if let Some(token) = non_empty(&self.local_token) {
            return validate_token(token).map(Some);
        }
        match &self.credentials {
            Credentials::Provider { .. } => Ok(Some(Secret::random())),
            Credentials::Keyring { .. } => {
                credentials::keyring_local_token(&settings.profile).map(Some)
            }
        }
    }

    /// What to do when the gate rejects the credentials, in the app's terms.
    pub(crate) fn fix_credentials_hint(&self) -> String {
        match &self.credentials {
            Credentials::Provider { .. } => format!(
                "check the username '{}' and the app password the app keeps; an Authentik app password (Directory > Tokens and App passwords, intent: app password) may have expired",
                self.username
            ),
            Credentials::Keyring { profile } => format!(
                "save a fresh Authentik app password for '{}' with save_app_password(\"{profile}\", …)",
                self.username
            ),
        }
    }

    /// Fetches the app password from where `credentials` says.
    pub(crate) fn password(&self, settings: &ProxySettings) -> Result<Secret, MobileError> {
        match &self.credentials {
            Credentials::Provider { provider } => credentials::provider_password(
                provider.as_ref(),
                &settings.server.to_string(),
                &settings.username,
            ),
            Credentials::Keyring { .. } => credentials::keyring_password(&settings.profile),
        }
    }
}

/// The text of an optional field, treating blank as absent (apps often pass "" for none).
fn non_empty(field: &Option<String>) -> Option<&str> {
    field.as_deref().filter(|text| !text.trim().is_empty())
}

/// Checks an app-chosen local token: it goes into URLs as userinfo and must be hard to guess.
fn validate_token(token: &str) -> Result<Secret, MobileError> {
    let ok = (16..=128).contains(&token.len())
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(Secret::new(token.to_owned()))
    } else {
        Err(MobileError::InvalidConfig {
            detail: "local_token must be 16 to 128 letters, digits, '-' or '_'; leave it empty to have one made".to_owned(),
        })
    }
}
