//! Auth schemes: what the gate in front of Immich wants to see, and the headers that carry it.
//!
//! `basic` is Authentik's service-account app password; `cloudflare-access` a Cloudflare
//! Access service token; `header` any named headers (e.g. Pangolin's access token pair). In
//! every scheme Immich never receives an `Authorization: Bearer` it did not ask for: Immich
//! treats any Bearer as its own session token.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::Secret;
use crate::error::{Error, Result};

/// The headers Cloudflare Access reads a service token from.
pub const CF_ACCESS_HEADERS: [&str; 2] = ["cf-access-client-id", "cf-access-client-secret"];

/// How a profile authenticates to its gate.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Scheme {
    /// `Authorization: Basic base64(username:password)` (Authentik).
    #[default]
    Basic,
    /// A Cloudflare Access service token: `CF-Access-Client-Id` and `CF-Access-Client-Secret`.
    CloudflareAccess,
    /// Named headers, each with a keyring-stored value.
    Header(Vec<HeaderName>),
    /// No header at all: the gate wants only the client certificate.
    None,
}

impl Scheme {
    /// Builds the scheme from its name and, for `header`, the header names.
    pub fn new(name: &str, header_names: &[String]) -> Result<Self> {
        let invalid = |reason: String| Error::Invalid {
            what: "auth scheme",
            reason,
        };
        let scheme = match name {
            "basic" => Scheme::Basic,
            "cloudflare-access" => Scheme::CloudflareAccess,
            "none" => Scheme::None,
            "header" => {
                if header_names.is_empty() {
                    return Err(invalid(
                        "the header scheme needs at least one --header NAME".to_owned(),
                    ));
                }
                let names = header_names
                    .iter()
                    .map(|n| validate_header_name(n))
                    .collect::<Result<Vec<_>>>()?;
                if (1..names.len()).any(|i| names[..i].contains(&names[i])) {
                    return Err(invalid("each --header name may be given once".to_owned()));
                }
                Scheme::Header(names)
            }
            other => {
                return Err(invalid(format!(
                    "'{other}': use basic, cloudflare-access, header or none"
                )));
            }
        };
        if !matches!(scheme, Scheme::Header(_)) && !header_names.is_empty() {
            return Err(invalid("--header goes only with --auth header".to_owned()));
        }
        Ok(scheme)
    }

    /// Whether the scheme stores a secret of its own (all but `none`).
    pub fn has_secret(&self) -> bool {
        *self != Scheme::None
    }

    /// The scheme's name, as stored and as `--auth` takes it.
    pub fn name(&self) -> &'static str {
        match self {
            Scheme::Basic => "basic",
            Scheme::CloudflareAccess => "cloudflare-access",
            Scheme::Header(_) => "header",
            Scheme::None => "none",
        }
    }

    /// The header names whose values come from the keyring (none for Basic).
    pub fn secret_headers(&self) -> Vec<HeaderName> {
        match self {
            Scheme::Basic | Scheme::None => Vec::new(),
            Scheme::CloudflareAccess => CF_ACCESS_HEADERS
                .iter()
                .map(|n| HeaderName::from_static(n))
                .collect(),
            Scheme::Header(names) => names.clone(),
        }
    }

    /// The header names stored in the profile (only the `header` scheme has any).
    pub fn stored_header_names(&self) -> Vec<String> {
        match self {
            Scheme::Header(names) => names.iter().map(|n| n.as_str().to_owned()).collect(),
            _ => Vec::new(),
        }
    }

    /// What the user is asked for, one prompt per stored value.
    pub fn prompts(&self, username: &str) -> Vec<String> {
        match self {
            Scheme::Basic => vec![format!("App password for {username}")],
            Scheme::None => Vec::new(),
            other => other
                .secret_headers()
                .iter()
                .map(|n| format!("Value for {n}"))
                .collect(),
        }
    }

    /// Builds the headers to inject from the stored secret (values joined by newlines).
    pub fn injection(&self, username: &str, secret: &Secret) -> Result<Injection> {
        match self {
            Scheme::Basic => Ok(Injection {
                headers: vec![(header::AUTHORIZATION, basic_value(username, secret))],
            }),
            Scheme::None => Ok(Injection::none()),
            other => {
                let names = other.secret_headers();
                let values: Vec<&str> = secret.expose().split('\n').collect();
                if values.len() != names.len() || values.iter().any(|v| v.is_empty()) {
                    return Err(Error::Invalid {
                        what: "stored credentials",
                        reason: format!(
                            "the {} scheme needs {} value(s) ({}), one per line; log in again",
                            other.name(),
                            names.len(),
                            names
                                .iter()
                                .map(HeaderName::as_str)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    });
                }
                let headers = names
                    .into_iter()
                    .zip(values)
                    .map(|(name, value)| {
                        let mut value =
                            HeaderValue::from_str(value).map_err(|_| Error::Invalid {
                                what: "stored credentials",
                                reason: format!("the value for {name} is not a valid header value"),
                            })?;
                        value.set_sensitive(true);
                        Ok((name, value))
                    })
                    .collect::<Result<_>>()?;
                Ok(Injection { headers })
            }
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Scheme {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        Scheme::new(name, &[])
    }
}

/// Refuses header names that would break the proxy or hand Immich a credential it never
/// asked for.
fn validate_header_name(name: &str) -> Result<HeaderName> {
    let parsed = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| Error::Invalid {
        what: "header name",
        reason: format!("'{name}' is not a valid HTTP header name"),
    })?;
    let reserved = [
        header::AUTHORIZATION,
        header::PROXY_AUTHORIZATION,
        header::HOST,
        header::COOKIE,
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::CONTENT_LENGTH,
        header::UPGRADE,
        header::TE,
        header::TRAILER,
        header::PROXY_AUTHENTICATE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ];
    if reserved.contains(&parsed) {
        return Err(Error::Invalid {
            what: "header name",
            reason: format!(
                "'{name}' is managed by the proxy; for Authorization: Basic use --auth basic"
            ),
        });
    }
    Ok(parsed)
}

/// `Basic base64(username:password)`, marked sensitive.
pub fn basic_value(username: &str, password: &Secret) -> HeaderValue {
    let joined = zeroize::Zeroizing::new(format!("{username}:{}", password.expose()));
    let encoded = zeroize::Zeroizing::new(
        base64::engine::general_purpose::STANDARD.encode(joined.as_bytes()),
    );
    let mut value = HeaderValue::from_str(&format!("Basic {}", encoded.as_str()))
        .expect("base64 text is a valid header value");
    value.set_sensitive(true);
    value
}

/// The headers a profile's credentials add to every upstream request.
#[derive(Debug, Clone)]
pub struct Injection {
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl Injection {
    /// Injects `Authorization: Basic …` for `username` and `password`.
    pub fn basic(username: &str, password: &Secret) -> Self {
        Self {
            headers: vec![(header::AUTHORIZATION, basic_value(username, password))],
        }
    }

    /// No headers at all (nothing is stored, or the scheme needs none).
    pub fn none() -> Self {
        Self {
            headers: Vec::new(),
        }
    }

    /// Sets every injected header, replacing whatever the client sent under those names.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.headers {
            headers.insert(name.clone(), value.clone());
        }
    }

    /// The injected headers.
    pub fn headers(&self) -> &[(HeaderName, HeaderValue)] {
        &self.headers
    }
}

impl From<HeaderValue> for Injection {
    fn from(authorization: HeaderValue) -> Self {
        Self {
            headers: vec![(header::AUTHORIZATION, authorization)],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_parse_and_refuse_what_would_break_immich() {
        assert_eq!(Scheme::new("basic", &[]).unwrap(), Scheme::Basic);
        assert_eq!(
            Scheme::new("cloudflare-access", &[])
                .unwrap()
                .secret_headers(),
            ["cf-access-client-id", "cf-access-client-secret"]
        );
        let pangolin = Scheme::new(
            "header",
            &["P-Access-Token-Id".into(), "P-Access-Token".into()],
        )
        .unwrap();
        assert_eq!(
            pangolin.stored_header_names(),
            ["p-access-token-id", "p-access-token"]
        );
        assert!(Scheme::new("header", &[]).is_err());
        assert!(Scheme::new("header", &["Authorization".into()]).is_err());
        assert!(
            Scheme::new("header", &["Keep-Alive".into()]).is_err(),
            "hop-by-hop"
        );
        assert!(
            Scheme::new("header", &["X-A".into(), "x-a".into()]).is_err(),
            "duplicate"
        );
        assert!(Scheme::new("header", &["bad name".into()]).is_err());
        assert!(Scheme::new("basic", &["X-A".into()]).is_err());
        assert!(Scheme::new("oauth", &[]).is_err());
    }

    #[test]
    fn injection_splits_stored_values_per_header() {
        let cf = Scheme::CloudflareAccess;
        let injection = cf
            .injection("", &Secret::new("id.access\nsecret-123".into()))
            .unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("cf-access-client-id", HeaderValue::from_static("forged"));
        injection.apply(&mut headers);
        assert_eq!(headers["cf-access-client-id"], "id.access");
        assert_eq!(headers["cf-access-client-secret"], "secret-123");
        assert!(headers["cf-access-client-secret"].is_sensitive());
        assert!(!headers.contains_key(header::AUTHORIZATION));
        let err = cf
            .injection("", &Secret::new("only-one".into()))
            .unwrap_err();
        assert!(!err.to_string().contains("only-one"), "{err}");

        let basic = Scheme::Basic
            .injection("svc", &Secret::new("pw".into()))
            .unwrap();
        assert_eq!(basic.headers()[0].1, "Basic c3ZjOnB3");
    }
}
