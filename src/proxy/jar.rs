//! The per-profile jar of Authentik session cookies: kept from the gate's `Set-Cookie`, sent
//! back upstream, never handed to clients, dropped when they expire.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap, HeaderValue};
use tokio::time::Instant;

use super::gate::SESSION_COOKIE_PREFIX;
use crate::sync::lock;

/// One session cookie the gate set.
#[derive(Debug, Clone)]
struct Stored {
    name: String,
    value: String,
    expires: Option<Instant>,
}

/// The session cookies of one profile's gate.
///
/// With a live session cookie the outpost skips its credential exchange with Authentik, so
/// a stream of requests costs Authentik one check per session instead of one per minute.
#[derive(Debug, Default)]
pub struct SessionJar {
    state: Mutex<JarState>,
}

#[derive(Debug, Default)]
struct JarState {
    cookies: Vec<Stored>,
    /// The `Cookie` fragment for the current cookies, built once per change.
    header: Option<HeaderValue>,
}

impl SessionJar {
    /// Creates an empty jar.
    pub fn new() -> Self {
        Self::default()
    }

    /// The `name=value; …` fragment to send upstream, without expired cookies.
    pub fn cookie_header(&self) -> Option<HeaderValue> {
        let mut state = lock(&self.state);
        let now = Instant::now();
        if state
            .cookies
            .iter()
            .any(|c| c.expires.is_some_and(|e| e <= now))
        {
            state.cookies.retain(|c| c.expires.is_none_or(|e| e > now));
            state.rebuild();
        }
        state.header.clone()
    }

    /// Takes the gate's session cookies out of a response's headers into the jar.
    pub fn absorb(&self, headers: &mut HeaderMap) {
        if !headers
            .get_all(header::SET_COOKIE)
            .iter()
            .any(|v| is_session_set_cookie(v.as_bytes()))
        {
            return;
        }
        let all: Vec<HeaderValue> = match headers.entry(header::SET_COOKIE) {
            header::Entry::Occupied(entry) => entry.remove_entry_mult().1.collect(),
            header::Entry::Vacant(_) => Vec::new(),
        };
        let mut state = lock(&self.state);
        for value in all {
            if !is_session_set_cookie(value.as_bytes()) {
                headers.append(header::SET_COOKIE, value);
                continue;
            }
            let Some(cookie) = value.to_str().ok().and_then(parse_set_cookie) else {
                continue;
            };
            state.cookies.retain(|c| c.name != cookie.name);
            if cookie.expires.is_none_or(|e| e > Instant::now()) && !cookie.value.is_empty() {
                state.cookies.push(cookie);
            }
        }
        state.rebuild();
    }

    /// Forgets every cookie (the credentials changed).
    pub fn clear(&self) {
        let mut state = lock(&self.state);
        state.cookies.clear();
        state.rebuild();
    }
}

impl JarState {
    fn rebuild(&mut self) {
        self.header = if self.cookies.is_empty() {
            None
        } else {
            let text = self
                .cookies
                .iter()
                .map(|c| format!("{}={}", c.name, c.value))
                .collect::<Vec<_>>()
                .join("; ");
            HeaderValue::from_str(&text).ok().map(|mut v| {
                v.set_sensitive(true);
                v
            })
        };
    }
}

fn is_session_set_cookie(value: &[u8]) -> bool {
    value
        .trim_ascii_start()
        .starts_with(SESSION_COOKIE_PREFIX.as_bytes())
}

/// A `Set-Cookie` value taken apart, without copying: its `name=value` pair and its
/// attributes. The one reader of `Set-Cookie` for the jar and for the client's copy.
pub(crate) struct SetCookie<'a> {
    /// The cookie's name, trimmed.
    pub name: &'a str,
    /// Its value, trimmed.
    pub value: &'a str,
    /// What follows the first `;`.
    attributes: &'a str,
}

/// One attribute of a [`SetCookie`].
pub(crate) struct Attribute<'a> {
    /// Its name, trimmed (`Max-Age`, `Secure`).
    pub name: &'a str,
    /// Its value, trimmed; `None` without `=`.
    pub value: Option<&'a str>,
    /// The attribute as written, trimmed.
    pub text: &'a str,
}

impl<'a> SetCookie<'a> {
    /// Takes `name=value; attr; attr=value…` apart; `None` without a `name=value` pair.
    pub fn parse(text: &'a str) -> Option<Self> {
        let (pair, attributes) = text.split_once(';').unwrap_or((text, ""));
        let (name, value) = pair.trim().split_once('=')?;
        Some(Self {
            name: name.trim(),
            value: value.trim(),
            attributes,
        })
    }

    /// The attributes in order, empty ones left out.
    pub fn attributes(&self) -> impl Iterator<Item = Attribute<'a>> + use<'a> {
        self.attributes
            .split(';')
            .map(str::trim)
            .filter(|attr| !attr.is_empty())
            .map(|text| {
                let (name, value) = match text.split_once('=') {
                    Some((name, value)) => (name.trim(), Some(value.trim())),
                    None => (text, None),
                };
                Attribute { name, value, text }
            })
    }
}

/// Parses `name=value; Max-Age=…; Expires=…` into a stored cookie (Max-Age wins).
fn parse_set_cookie(text: &str) -> Option<Stored> {
    let cookie = SetCookie::parse(text)?;
    let (name, value) = (cookie.name, cookie.value);
    let mut max_age = None;
    let mut expires = None;
    for attr in cookie.attributes() {
        let val = attr.value.unwrap_or("");
        if attr.name.eq_ignore_ascii_case("max-age") {
            max_age = val.parse::<i64>().ok();
        } else if attr.name.eq_ignore_ascii_case("expires") {
            expires = httpdate::parse_http_date(val).ok();
        }
    }
    let now = Instant::now();
    let expires = match (max_age, expires) {
        (Some(secs), _) if secs <= 0 => Some(now),
        (Some(secs), _) => Some(now + Duration::from_secs(secs.unsigned_abs())),
        (None, Some(at)) => Some(match at.duration_since(SystemTime::now()) {
            Ok(left) => now + left,
            Err(_) => now,
        }),
        (None, None) => None,
    };
    Some(Stored {
        name: name.to_owned(),
        value: value.to_owned(),
        expires,
    })
}

/// Sets the upstream `Cookie` header: the client's cookies minus any gate session cookie
/// it sent, plus the jar's.
pub fn merge_cookies(headers: &mut HeaderMap, jar: Option<HeaderValue>) {
    let client_has_session = headers
        .get_all(header::COOKIE)
        .iter()
        .any(|v| contains_session_cookie(v.as_bytes()));
    if jar.is_none() && !client_has_session {
        return;
    }
    let mut pairs: Vec<String> = Vec::new();
    for value in headers.get_all(header::COOKIE) {
        let Ok(text) = value.to_str() else { continue };
        pairs.extend(
            text.split(';')
                .map(str::trim)
                .filter(|p| !p.is_empty() && !p.starts_with(SESSION_COOKIE_PREFIX))
                .map(str::to_owned),
        );
    }
    headers.remove(header::COOKIE);
    if let Some(jar) = jar.as_ref().and_then(|j| j.to_str().ok()) {
        pairs.push(jar.to_owned());
    }
    if pairs.is_empty() {
        return;
    }
    if let Ok(mut value) = HeaderValue::from_str(&pairs.join("; ")) {
        value.set_sensitive(true);
        headers.insert(header::COOKIE, value);
    }
}

fn contains_session_cookie(value: &[u8]) -> bool {
    value.split(|b| *b == b';').any(|pair| {
        pair.trim_ascii_start()
            .starts_with(SESSION_COOKIE_PREFIX.as_bytes())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_cookies(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(header::SET_COOKIE, HeaderValue::from_str(v).unwrap());
        }
        headers
    }

    #[tokio::test(start_paused = true)]
    async fn keeps_gate_cookies_hides_them_and_honours_max_age() {
        let jar = SessionJar::new();
        let mut headers = set_cookies(&[
            "authentik_proxy_1a2b3c4d=sess1; Path=/; Max-Age=60; HttpOnly; Secure; SameSite=Lax",
            "immich_access_token=tok; Path=/; HttpOnly",
        ]);
        jar.absorb(&mut headers);
        let left: Vec<_> = headers.get_all(header::SET_COOKIE).iter().collect();
        assert_eq!(left, ["immich_access_token=tok; Path=/; HttpOnly"]);
        assert_eq!(
            jar.cookie_header().unwrap(),
            "authentik_proxy_1a2b3c4d=sess1"
        );
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(jar.cookie_header().is_some());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(
            jar.cookie_header().is_none(),
            "expired cookies are not sent"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn replacement_deletion_and_expires_attribute() {
        let jar = SessionJar::new();
        jar.absorb(&mut set_cookies(&["authentik_proxy_aa=one; Path=/"]));
        jar.absorb(&mut set_cookies(&["authentik_proxy_aa=two; Path=/"]));
        assert_eq!(jar.cookie_header().unwrap(), "authentik_proxy_aa=two");
        jar.absorb(&mut set_cookies(&["authentik_proxy_aa=; Max-Age=0"]));
        assert!(jar.cookie_header().is_none());
        jar.absorb(&mut set_cookies(&[
            "authentik_proxy_bb=old; Expires=Thu, 01 Jan 1970 00:00:00 GMT",
        ]));
        assert!(jar.cookie_header().is_none(), "a past Expires deletes");
        let future = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3600));
        jar.absorb(&mut set_cookies(&[&format!(
            "authentik_proxy_cc=new; Expires={future}"
        )]));
        assert_eq!(jar.cookie_header().unwrap(), "authentik_proxy_cc=new");
        jar.clear();
        assert!(jar.cookie_header().is_none());
    }

    #[test]
    fn merge_adds_jar_and_drops_client_session_cookies() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("immich_access_token=t; authentik_proxy_ff=forged; a=b"),
        );
        merge_cookies(
            &mut headers,
            Some(HeaderValue::from_static("authentik_proxy_1a=s1")),
        );
        assert_eq!(
            headers[header::COOKIE],
            "immich_access_token=t; a=b; authentik_proxy_1a=s1"
        );

        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_static("a=b"));
        merge_cookies(&mut headers, None);
        assert_eq!(headers[header::COOKIE], "a=b");

        let mut headers = HeaderMap::new();
        merge_cookies(
            &mut headers,
            Some(HeaderValue::from_static("authentik_proxy_1a=s1")),
        );
        assert_eq!(headers[header::COOKIE], "authentik_proxy_1a=s1");
    }
}
