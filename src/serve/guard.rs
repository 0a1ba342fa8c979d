//! Guards against local attackers: loopback is no trust boundary, so every request must name
//! this listener as its host, must not come from a foreign web origin, and may need a local
//! credential, before it is sent on with the user's credentials.

use std::net::SocketAddr;

use base64::Engine as _;
use http::StatusCode;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::credentials::Secret;

/// The username of the local credential clients put in their URL.
pub const LOCAL_USER: &str = "credproxy";

/// The URL clients of a listener at `addr` use when it requires the local credential `token`
/// (keep it private).
pub fn local_url(token: &Secret, addr: SocketAddr) -> String {
    format!("http://{LOCAL_USER}:{}@{addr}", token.expose())
}

/// Which requests may use the proxy.
#[derive(Debug, Clone, Default)]
pub struct Guards {
    /// Exact `Host` values accepted (lowercase `host:port`).
    hosts: Vec<String>,
    /// Exact `Origin` values accepted (`http://host:port`).
    origins: Vec<String>,
    /// The `Authorization` value required from clients, when local auth is on.
    local_auth: Option<HeaderValue>,
}

/// Why a request was refused before anything was forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The `Host` is not one of this listener's names (DNS rebinding, or a misdirected client).
    Host(String),
    /// The request comes from a foreign web origin.
    Origin(String),
    /// A browser says the request is cross-site.
    CrossSite,
    /// The local credential is missing or wrong.
    LocalAuth,
}

impl Refusal {
    /// The status the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Host(_) => StatusCode::MISDIRECTED_REQUEST,
            Refusal::Origin(_) | Refusal::CrossSite => StatusCode::FORBIDDEN,
            Refusal::LocalAuth => StatusCode::UNAUTHORIZED,
        }
    }

    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Host(_) => "host_not_allowed",
            Refusal::Origin(_) => "origin_not_allowed",
            Refusal::CrossSite => "cross_site_request",
            Refusal::LocalAuth => "local_credential_required",
        }
    }

    /// What happened and what to do, for the client and the log.
    pub fn message(&self) -> String {
        match self {
            Refusal::Host(host) => format!(
                "host '{host}' is not served here; use http://127.0.0.1:PORT or http://localhost:PORT, or start credproxy with --allow-host NAME"
            ),
            Refusal::Origin(origin) => format!(
                "requests from web origin '{origin}' are refused: a web page must not use your credentials"
            ),
            Refusal::CrossSite => {
                "cross-site requests are refused: a web page must not use your credentials"
                    .to_owned()
            }
            Refusal::LocalAuth => format!(
                "this proxy needs its local credential: use the local URL (http://{LOCAL_USER}:TOKEN@127.0.0.1:PORT) that `credproxy profiles --show-token` prints"
            ),
        }
    }
}

impl Guards {
    /// Guards for a listener bound at `addr`: its loopback names with its port, plus `extra`
    /// names (`name` or `name:port`), and the local credential `token` if given.
    pub fn for_listener(addr: SocketAddr, extra: &[String], token: Option<&Secret>) -> Self {
        let port = addr.port();
        let mut names: Vec<String> = vec!["127.0.0.1".into(), "localhost".into(), "[::1]".into()];
        names.push(match addr.ip() {
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        });
        let mut hosts: Vec<String> = Vec::new();
        for name in &names {
            hosts.push(format!("{name}:{port}"));
            if port == 80 {
                // Clients leave the default port out of Host.
                hosts.push(name.clone());
            }
        }
        for name in extra {
            let name = name.trim().to_ascii_lowercase();
            if has_port(&name) {
                hosts.push(name);
            } else {
                hosts.push(format!("{name}:{port}"));
            }
        }
        hosts.sort();
        hosts.dedup();
        let origins = hosts.iter().map(|h| format!("http://{h}")).collect();
        Self {
            hosts,
            origins,
            local_auth: token.map(local_auth_value),
        }
    }

    /// Guards that refuse every request (no name can match).
    pub fn refuse_all() -> Self {
        Self {
            hosts: vec![String::from("\0")],
            origins: Vec::new(),
            local_auth: None,
        }
    }

    /// The `Host` values accepted.
    pub fn hosts(&self) -> &[String] {
        &self.hosts
    }

    /// Whether clients must present the local credential.
    pub fn requires_local_auth(&self) -> bool {
        self.local_auth.is_some()
    }

    /// Checks a request's headers; `Ok` means it may be forwarded. Guards built with
    /// `Default` (no hosts) check only the browser headers and the local credential.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        // Compared case-insensitively in place: no allocation on the accepted path.
        let matches = |allowed: &[String], value: &[u8]| {
            allowed
                .iter()
                .any(|a| a.as_bytes().eq_ignore_ascii_case(value))
        };
        if !self.hosts.is_empty() {
            let host = headers.get(header::HOST).map_or(&[][..], |h| h.as_bytes());
            if !matches(&self.hosts, host) {
                return Err(Refusal::Host(String::from_utf8_lossy(host).into_owned()));
            }
        }
        if let Some(origin) = headers.get(header::ORIGIN)
            && !matches(&self.origins, origin.as_bytes())
        {
            return Err(Refusal::Origin(
                String::from_utf8_lossy(origin.as_bytes()).into_owned(),
            ));
        }
        if headers
            .get(&SEC_FETCH_SITE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site"))
        {
            return Err(Refusal::CrossSite);
        }
        if let Some(expected) = &self.local_auth {
            let presented = [header::AUTHORIZATION, header::PROXY_AUTHORIZATION]
                .iter()
                .filter_map(|name| headers.get(name))
                .any(|value| constant_time_eq(value.as_bytes(), expected.as_bytes()));
            if !presented {
                return Err(Refusal::LocalAuth);
            }
        }
        Ok(())
    }
}

/// The browser's statement of where a request comes from (Fetch Metadata).
static SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");

/// True for `host:port` and `[v6]:port`, false for a bare name or IPv6 address.
fn has_port(name: &str) -> bool {
    match name.rsplit_once(':') {
        Some((host, port)) => {
            !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (!host.contains(':') || host.ends_with(']'))
        }
        None => false,
    }
}

/// `Basic base64(credproxy:TOKEN)`, marked sensitive.
fn local_auth_value(token: &Secret) -> HeaderValue {
    let encoded = zeroize::Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .encode(format!("{LOCAL_USER}:{}", token.expose())),
    );
    let mut value = HeaderValue::from_str(&format!("Basic {}", encoded.as_str()))
        .expect("base64 text is a valid header value");
    value.set_sensitive(true);
    value
}

/// Compares without an early exit, so timing does not reveal how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_static(k),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    fn guards() -> Guards {
        Guards::for_listener(
            "127.0.0.1:2283".parse().unwrap(),
            &["photos.lan".into()],
            None,
        )
    }

    #[test]
    fn only_this_listeners_names_are_served() {
        let g = guards();
        for ok in [
            "127.0.0.1:2283",
            "localhost:2283",
            "LOCALHOST:2283",
            "[::1]:2283",
            "photos.lan:2283",
        ] {
            assert_eq!(g.check(&headers(&[("host", ok)])), Ok(()), "{ok}");
        }
        for bad in [
            "evil.example:2283",
            "127.0.0.1:9999",
            "localhost",
            "127.0.0.1.nip.io:2283",
            "",
        ] {
            let refusal = g.check(&headers(&[("host", bad)])).unwrap_err();
            assert_eq!(refusal.status(), StatusCode::MISDIRECTED_REQUEST, "{bad}");
        }
        assert!(matches!(g.check(&HeaderMap::new()), Err(Refusal::Host(_))));
    }

    #[test]
    fn foreign_origins_and_cross_site_fetches_are_refused() {
        let g = guards();
        let ok = headers(&[
            ("host", "127.0.0.1:2283"),
            ("origin", "http://127.0.0.1:2283"),
        ]);
        assert_eq!(g.check(&ok), Ok(()));
        let same_site = headers(&[
            ("host", "localhost:2283"),
            ("sec-fetch-site", "same-origin"),
        ]);
        assert_eq!(g.check(&same_site), Ok(()));
        for origin in [
            "https://evil.example",
            "null",
            "http://127.0.0.1:2284",
            "http://localhost.evil:2283",
        ] {
            let h = headers(&[("host", "127.0.0.1:2283"), ("origin", origin)]);
            assert!(matches!(g.check(&h), Err(Refusal::Origin(_))), "{origin}");
        }
        let cross = headers(&[("host", "127.0.0.1:2283"), ("sec-fetch-site", "cross-site")]);
        assert_eq!(g.check(&cross), Err(Refusal::CrossSite));
    }

    #[test]
    fn local_credential_is_required_when_on() {
        let token = Secret::new("tok-123".into());
        let g = Guards::for_listener("127.0.0.1:2283".parse().unwrap(), &[], Some(&token));
        let host = ("host", "127.0.0.1:2283");
        assert_eq!(g.check(&headers(&[host])), Err(Refusal::LocalAuth));
        let wrong = headers(&[host, ("authorization", "Basic Y3JlZHByb3h5Onh4eA==")]);
        assert_eq!(g.check(&wrong), Err(Refusal::LocalAuth));
        // base64("credproxy:tok-123")
        let right = headers(&[host, ("authorization", "Basic Y3JlZHByb3h5OnRvay0xMjM=")]);
        assert_eq!(g.check(&right), Ok(()));
        assert!(!format!("{g:?}").contains("Y3JlZHByb3h5OnRvay0xMjM="));
    }
}
