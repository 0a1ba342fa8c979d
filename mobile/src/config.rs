//! What the app passes in: the server, the account, where to listen, whom to trust, and where
//! the app password comes from; validated once into the core's settings.

use std::sync::Arc;
use std::time::Duration;

use credproxy::Error;
use credproxy::config::{self, CaCert, LanRoute, Profile, ServerUrl};
use credproxy::credentials::{Scheme, Secret, SecretSource};
use credproxy::proxy::ProxySettings;

use crate::credentials::{self, CredentialProvider, ProviderSource};
use crate::error::MobileError;

/// The profile name used in messages when the app supplies the password itself.
const APP_PROFILE: &str = "app";

/// How long a body may stall before a transfer is abandoned (a phone may pause a while).
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// How the gate in front of Immich wants to be authenticated.
#[derive(uniffi::Enum, Debug, Clone, PartialEq, Eq)]
pub enum AuthScheme {
    /// Authentik: `Authorization: Basic` with the service account's app password.
    Basic,
    /// A Cloudflare Access service token: the secret is the client id and the client secret,
    /// one per line.
    CloudflareAccess,
    /// Named headers (e.g. Pangolin's `P-Access-Token-Id` and `P-Access-Token`): the secret is
    /// one value per line, in the order of `names`.
    Header {
        /// The header names.
        names: Vec<String>,
    },
    /// No header: the gate wants only the client certificate (the provider's `app_password`
    /// is not asked).
    None,
}

/// Where the app password comes from.
#[derive(uniffi::Enum)]
pub enum Credentials {
    /// The app's own provider, asked when the proxy starts, by each check, again while the
    /// gate rejects what it gave, and on `reload_credentials`.
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
    /// The Authentik service account's username (needed for `Basic` only; pass "" otherwise).
    pub username: String,
    /// Where the app password comes from.
    pub credentials: Credentials,
    /// How the gate authenticates; `Basic` (Authentik) when not given.
    #[uniffi(default = None)]
    pub auth: Option<AuthScheme>,
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
    /// The same server's LAN address (`192.168.1.10`, `192.168.1.10:8443` or an `https://`
    /// URL): at home requests go there, verified under `server_url`'s name, else the public way.
    #[uniffi(default = None)]
    pub lan_address: Option<String>,
    /// The pin of a LAN front's own certificate (`sha256/BASE64`), when it has one.
    #[uniffi(default = None)]
    pub lan_pin: Option<String>,
    /// The CA (PEM) of a LAN front's own certificate, issued for its LAN name.
    #[uniffi(default = None)]
    pub lan_ca_pem: Option<String>,
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
            username: match self.scheme()? {
                Scheme::Basic => config::validate_username(&self.username)?,
                _ => self.username.clone(),
            },
            auth: self.scheme()?,
            listen: config::DEFAULT_LISTEN,
            ca_cert: non_empty(&self.ca_pem).map(|pem| CaCert::Pem(pem.to_owned())),
            pins: non_empty(&self.pin)
                .map(config::validate_pin)
                .transpose()?
                .into_iter()
                .collect(),
            local_auth: self.local_auth,
            allow_hosts: Vec::new(),
            client_cert: None,
            lan: match non_empty(&self.lan_address) {
                Some(address) => Some(LanRoute::parse(
                    address,
                    &non_empty(&self.lan_pin)
                        .map(str::to_owned)
                        .into_iter()
                        .collect::<Vec<_>>(),
                    non_empty(&self.lan_ca_pem).map(|pem| CaCert::Pem(pem.to_owned())),
                )?),
                None => None,
            },
        };
        let identity = self.identity(&profile)?;
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
        settings.identity = identity;
        settings.certificate_fix = match &self.credentials {
            Credentials::Provider { .. } => "have the app's credential provider hand over the client certificate this server trusts, still valid".to_owned(),
            Credentials::Keyring { profile } => format!(
                "save the client certificate this server trusts with save_client_certificate(\"{profile}\", …)"
            ),
        };
        Ok(settings)
    }

    /// The client certificate to present, from where `credentials` says.
    fn identity(
        &self,
        profile: &Profile,
    ) -> Result<Option<credproxy::credentials::ClientIdentity>, MobileError> {
        match &self.credentials {
            Credentials::Provider { provider } => provider
                .client_certificate(profile.server.to_string())?
                .map(|certificate| certificate.identity())
                .transpose(),
            Credentials::Keyring { profile } => credentials::keyring_identity(profile),
        }
    }

    /// The core's auth scheme.
    pub(crate) fn scheme(&self) -> Result<Scheme, MobileError> {
        Ok(match &self.auth {
            None | Some(AuthScheme::Basic) => Scheme::Basic,
            Some(AuthScheme::CloudflareAccess) => Scheme::CloudflareAccess,
            Some(AuthScheme::Header { names }) => Scheme::new("header", names)?,
            Some(AuthScheme::None) => Scheme::None,
        })
    }

    /// Where the credentials are read again from while the gate rejects them.
    pub(crate) fn source(
        &self,
        settings: &ProxySettings,
    ) -> Result<Arc<dyn SecretSource>, MobileError> {
        if !self.scheme()?.has_secret() {
            return Ok(Arc::new(Secret::new(String::new())));
        }
        Ok(match &self.credentials {
            Credentials::Provider { provider } => Arc::new(ProviderSource {
                provider: provider.clone(),
                server_url: settings.server.to_string(),
                username: settings.username.clone(),
            }),
            Credentials::Keyring { .. } => credentials::keyring_source(&settings.profile)?,
        })
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

    /// Fetches the app password from where `credentials` says (nothing for `AuthScheme::None`).
    pub(crate) fn password(&self, settings: &ProxySettings) -> Result<Secret, MobileError> {
        if !self.scheme()?.has_secret() {
            return Ok(Secret::new(String::new()));
        }
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
