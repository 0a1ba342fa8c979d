//! `start_proxy` and the handle that reports on and stops the running proxy.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use credproxy::embed::{EmbedOptions, Embedded, Snapshot};
use credproxy::proxy::Proxy;
use credproxy::proxy::live::{LiveCredentials, Reload};
use credproxy::serve::Site;

use crate::config::ProxyConfig;
use crate::error::MobileError;
use crate::logging;

/// Starts the proxy on `127.0.0.1:listen_port`; it accepts connections when this returns.
#[uniffi::export]
pub fn start_proxy(config: ProxyConfig) -> Result<Arc<ProxyHandle>, MobileError> {
    let settings = config.settings()?;
    let options = EmbedOptions {
        log: logging::sink(),
        ..EmbedOptions::default()
    };
    let local_token = config.local_token(&settings)?;
    let proxy = Proxy::new(settings.clone(), credentials_for(&config, &settings)?)?;
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, config.listen_port));
    let site = Site {
        local_token,
        ..Site::new(proxy)
    };
    let inner = Embedded::start(site, listen, options)?;
    Ok(Arc::new(ProxyHandle { inner, config }))
}

/// The live credentials of `config`, first read now (with the precise errors of a start).
fn credentials_for(
    config: &ProxyConfig,
    settings: &credproxy::proxy::ProxySettings,
) -> Result<LiveCredentials, MobileError> {
    Ok(LiveCredentials::new(
        config.scheme()?,
        settings.username.clone(),
        config.source(settings)?,
        Some(config.password(settings)?),
    ))
}

/// A running proxy; dropping the last reference stops it.
#[derive(uniffi::Object)]
pub struct ProxyHandle {
    inner: Embedded,
    /// What it was started with: read again by `reload_credentials`.
    config: ProxyConfig,
}

/// Totals since the proxy started.
#[derive(uniffi::Record)]
pub struct ProxyStats {
    /// Requests answered, including the proxy's own error answers.
    pub requests: u64,
    /// Body bytes sent from clients to the server.
    pub bytes_up: u64,
    /// Body bytes sent from the server to clients.
    pub bytes_down: u64,
    /// The most recent warning or error, such as an unreachable server or rejected credentials.
    pub last_error: Option<String>,
    /// Where the credentials stand: `not yet used`, `accepted`, `rejected`, `missing` or
    /// `unusable`.
    pub credentials_state: String,
    /// When the gate last accepted them (RFC 3339, UTC).
    pub last_accepted: Option<String>,
    /// Since when the gate rejects them (RFC 3339, UTC).
    pub rejected_since: Option<String>,
    /// Seconds left before they are sent again, while rejected.
    pub backoff_seconds: Option<u64>,
    /// With a LAN address: `lan` or `public`, the route requests take now.
    pub route: Option<String>,
    /// Why requests take that route (the LAN address answered, or what it did instead).
    pub route_reason: Option<String>,
    /// Changes between the LAN and the public route so far.
    pub route_switches: u64,
    /// Body bytes sent to the server over the LAN route.
    pub lan_bytes_up: u64,
    /// Body bytes received from the server over the LAN route.
    pub lan_bytes_down: u64,
}

#[uniffi::export]
impl ProxyHandle {
    /// The URL clients use, e.g. `http://127.0.0.1:2283`, or with `local_auth`
    /// `http://credproxy:TOKEN@127.0.0.1:2283` (keep that one private).
    pub fn local_url(&self) -> String {
        self.inner.local_url()
    }

    /// The port listened on (the real one when 0 was asked for).
    pub fn port(&self) -> u16 {
        self.inner.local_addr().port()
    }

    /// True until `stop` has closed the port.
    pub fn is_running(&self) -> bool {
        self.inner.is_running()
    }

    /// Closes the port and waits (up to 5 s) for requests in flight; safe to call twice.
    pub fn stop(&self) {
        self.inner.stop();
    }

    /// Requests and bytes so far, the last error, and where the credentials stand.
    pub fn stats(&self) -> ProxyStats {
        self.inner.snapshot().into()
    }

    /// Reads the credentials and the client certificate again now (after the app saved new
    /// ones): true when they changed, and the next request uses them (with a new certificate,
    /// the next connection). Blocks briefly; call it off the UI thread.
    pub fn reload_credentials(&self) -> Result<bool, MobileError> {
        let current = self.inner.proxy();
        let settings = self.config.settings()?;
        if settings.identity != current.settings().identity {
            // A new client certificate: a new TLS client, so a new proxy.
            let credentials = credentials_for(&self.config, &settings)?;
            let proxy = Proxy::replacing(&current, settings, credentials)?;
            self.inner.replace(Site {
                // Clients keep their URL.
                local_token: self.inner.local_token().cloned(),
                ..Site::new(proxy)
            });
            return Ok(true);
        }
        Ok(self.inner.reload_credentials()? == Reload::Changed)
    }
}

impl From<Snapshot> for ProxyStats {
    fn from(s: Snapshot) -> Self {
        Self {
            requests: s.requests,
            bytes_up: s.bytes_up,
            bytes_down: s.bytes_down,
            last_error: s.last_error,
            credentials_state: s.credentials.state.to_owned(),
            last_accepted: s.credentials.last_accepted,
            rejected_since: s.credentials.rejected_since,
            backoff_seconds: s.credentials.backoff_seconds,
            route_switches: s.route.as_ref().map_or(0, |r| r.switches),
            lan_bytes_up: s.route.as_ref().map_or(0, |r| r.lan_bytes_up),
            lan_bytes_down: s.route.as_ref().map_or(0, |r| r.lan_bytes_down),
            route_reason: s.route.as_ref().map(|r| r.why.clone()),
            route: s.route.map(|r| r.route.to_owned()),
        }
    }
}
