//! Fuzz target for `credproxy::proxy::rewrite::rewrite_request`: an arbitrary client request head
//! (method, URI, version, headers), gate session cookies, upstream and credentials (any auth
//! scheme) in; the upstream request head out.
//!
//! Invariants, checked on every input that forms valid `http` types (others are skipped):
//!
//! - no panic (in `rewrite_request`, `Target::new`, the auth schemes, `merge_cookies`, ...);
//! - `Err(Connect)` exactly for CONNECT; `Err(BadTarget)` only for a target that does not
//!   start with `/` (asterisk form);
//! - on `Ok`: each injected credential header exactly once, with the injected value (the
//!   last one for a name a profile lists twice), so for Basic exactly one `Authorization`,
//!   the injected one; no `Authorization` at all for a scheme that injects none (a client's
//!   credential never goes through); exactly one `Host`, the upstream's authority; URI
//!   `https://{upstream authority}` with the client's path and query unchanged (`/` for an
//!   authority-form target); version HTTP/1.1;
//! - no hop-by-hop header (RFC 9110 7.6.1 plus de-facto ones), except the `Connection: upgrade`
//!   + `Upgrade` pair of an upgrade request: `Connection` is then exactly `upgrade` and
//!   `Upgrade` is the client's own value; an upgrade request keeps that pair;
//! - no header the client named in `Connection` survives (whatever bytes the `Connection`
//!   value holds), unless it is `Connection`/`Upgrade` of an upgrade request or a header the
//!   proxy sets itself (`Authorization`, `Host`, `Cookie` from the gate's jar,
//!   `x-immich-user-token` from a client Bearer token, the injected credential headers), and
//!   then it holds the proxy's value, not the client's;
//! - `x-immich-user-token`: the client's own values untouched when it sent any, else the
//!   client's Bearer token (one value) when it sent one, else absent; so at most one unless
//!   the client itself sent several;
//! - the Authentik session cookies that reach upstream are exactly the jar's: a client's own
//!   `authentik_proxy*` cookies never go through.

#![no_main]

use arbitrary::Arbitrary;
use credproxy::credentials::{self, Injection, Secret};
use credproxy::config::ServerUrl;
use credproxy::proxy::gate::SESSION_COOKIE_PREFIX;
use credproxy::proxy::rewrite::{IMMICH_USER_TOKEN, RewriteError, Target, rewrite_request};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Scheme;
use http::{Method, Request, Uri, Version};
use libfuzzer_sys::fuzz_target;

/// Header names worth hitting often: every hop-by-hop one, the ones the proxy rewrites, and
/// a few ordinary ones (mixed case on purpose: names are case-insensitive).
const NAMES: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "authorization",
    "host",
    "cookie",
    "x-immich-user-token",
    "content-length",
    "content-type",
    "accept",
    "x-custom",
    "cf-access-client-id",
    "cf-access-client-secret",
    "Connection",
    "UPGRADE",
    "Keep-Alive",
    "Authorization",
    "X-Immich-User-Token",
];

/// Header values worth hitting often.
const VALUES: &[&str] = &[
    "upgrade",
    "Upgrade",
    "keep-alive",
    "close",
    "upgrade, keep-alive",
    "keep-alive, Upgrade",
    "websocket",
    "h2c",
    "chunked",
    "trailers",
    "Bearer tok",
    "bearer  tok2 ",
    "BEARER t",
    "Bearer ",
    "Basic dXNlcjpwYXNz",
    "authentik_proxy_1a=client",
    "a=b; authentik_proxy_2b=client; c=d",
    "immich_access_token=t",
    "",
];

const METHODS: &[&str] = &[
    "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE", "CONNECT",
];

const URIS: &[&str] = &[
    "/",
    "/api/server/ping",
    "/api/assets?size=thumbnail&x=%2F",
    "*",
    "example.com:443",
    "http://evil.example/steal?x=1",
    "https://other.example:8443",
    "//double/slash",
    "/a?",
];

const SERVERS: &[&str] = &[
    "https://immich.example.com",
    "https://immich.example.com:8443",
    "https://IMMICH.Example.com:443/",
    "https://[::1]:2283",
    "https://192.0.2.7",
];

const SESSIONS: &[&str] = &[
    "authentik_proxy_1a=s1",
    "authentik_proxy_1a=s1; authentik_proxy_2b=s2",
    "",
];

#[derive(Arbitrary, Debug)]
enum Text {
    Known(u8),
    Raw(Vec<u8>),
}

impl Text {
    fn bytes<'a>(&'a self, known: &'a [&'a str]) -> &'a [u8] {
        match self {
            Text::Known(i) => known[*i as usize % known.len()].as_bytes(),
            Text::Raw(bytes) => bytes,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Value {
    Text(Text),
    /// A comma-separated list of header names, as in `Connection`.
    List(Vec<Text>, bool),
}

impl Value {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Value::Text(text) => text.bytes(VALUES).to_vec(),
            Value::List(names, spaced) => {
                let separator: &[u8] = if *spaced { b" , " } else { b"," };
                names
                    .iter()
                    .map(|n| n.bytes(NAMES))
                    .collect::<Vec<_>>()
                    .join(separator)
            }
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Session {
    None,
    Known(u8),
    Raw(Vec<u8>),
}

/// The profile's auth scheme and its stored secret.
#[derive(Arbitrary, Debug)]
enum Auth {
    Basic {
        username: String,
        password: String,
    },
    CloudflareAccess {
        id: String,
        secret: String,
    },
    /// `--auth header --header NAME...`, one stored value per name.
    Header(Vec<(Text, String)>),
}

impl Auth {
    /// The headers this profile injects; `None` for a profile `login` would refuse.
    fn injection(&self) -> Option<Injection> {
        let (scheme, username, secret) = match self {
            Auth::Basic { username, password } => {
                (credentials::Scheme::Basic, username.as_str(), password.clone())
            }
            Auth::CloudflareAccess { id, secret } => (
                credentials::Scheme::CloudflareAccess,
                "",
                format!("{id}\n{secret}"),
            ),
            Auth::Header(pairs) => {
                let names = pairs
                    .iter()
                    .map(|(n, _)| std::str::from_utf8(n.bytes(NAMES)).map(str::to_owned))
                    .collect::<Result<Vec<_>, _>>()
                    .ok()?;
                let values: Vec<&str> = pairs.iter().map(|(_, v)| v.as_str()).collect();
                (
                    credentials::Scheme::new("header", &names).ok()?,
                    "",
                    values.join("\n"),
                )
            }
        };
        scheme.injection(username, &Secret::new(secret)).ok()
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    method: Text,
    uri: Text,
    version: u8,
    headers: Vec<(Text, Value)>,
    session: Session,
    server: Text,
    auth: Auth,
}

fuzz_target!(|input: Input| check(&input));

fn check(input: &Input) {
    let Some(server) = std::str::from_utf8(input.server.bytes(SERVERS))
        .ok()
        .and_then(|s| ServerUrl::parse(s).ok())
    else {
        return;
    };
    let Ok(method) = Method::from_bytes(input.method.bytes(METHODS)) else {
        return;
    };
    let Ok(uri) = Uri::try_from(input.uri.bytes(URIS)) else {
        return;
    };
    let version = [
        Version::HTTP_09,
        Version::HTTP_10,
        Version::HTTP_11,
        Version::HTTP_2,
        Version::HTTP_3,
    ][input.version as usize % 5];
    let mut headers = HeaderMap::new();
    for (name, value) in &input.headers {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.bytes(NAMES)),
            HeaderValue::from_bytes(&value.bytes()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    let session = match &input.session {
        Session::None => None,
        Session::Known(i) => Some(HeaderValue::from_static(
            SESSIONS[*i as usize % SESSIONS.len()],
        )),
        Session::Raw(bytes) => match HeaderValue::from_bytes(bytes) {
            Ok(value) => Some(value),
            Err(_) => return,
        },
    };

    let Some(injection) = input.auth.injection() else {
        return;
    };
    let target = Target::new(&server);

    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = method.clone();
    parts.uri = uri.clone();
    parts.version = version;
    parts.headers = headers.clone();

    match rewrite_request(&mut parts, &target, &injection, session.clone()) {
        Err(RewriteError::Connect) => assert_eq!(method, Method::CONNECT),
        Err(RewriteError::BadTarget) => {
            assert_ne!(method, Method::CONNECT);
            assert!(
                uri.path_and_query()
                    .is_some_and(|pq| !pq.as_str().starts_with('/')),
                "BadTarget for a forwardable target {uri:?}"
            );
        }
        Ok(()) => {
            assert_ne!(method, Method::CONNECT, "CONNECT was forwarded");
            let injected = injection.headers();
            check_rewritten(&parts, &server, injected, &uri, &headers, session.as_ref());
        }
    }
}

fn check_rewritten(
    out: &http::request::Parts,
    server: &ServerUrl,
    injected: &[(HeaderName, HeaderValue)],
    client_uri: &Uri,
    client: &HeaderMap,
    session: Option<&HeaderValue>,
) {
    let headers = &out.headers;

    // Target, version.
    assert_eq!(out.version, Version::HTTP_11);
    assert_eq!(out.uri.scheme(), Some(&Scheme::HTTPS));
    assert_eq!(out.uri.authority(), Some(server.authority()));
    let expected_pq = client_uri.path_and_query().map_or("/", |pq| pq.as_str());
    assert_eq!(
        out.uri.path_and_query().map(|pq| pq.as_str()),
        Some(expected_pq),
        "path and query changed"
    );

    // Credentials and Host.
    let is_injected = |name: &HeaderName| injected.iter().any(|(n, _)| n == name);
    for (name, _) in injected {
        // A name the profile lists twice is sent once, with its last value.
        let (_, value) = injected.iter().rfind(|(n, _)| n == name).expect("listed");
        assert_eq!(values(headers, name), [value.as_bytes()], "injected {name}");
    }
    if !is_injected(&header::AUTHORIZATION) {
        assert!(
            !headers.contains_key(header::AUTHORIZATION),
            "a client Authorization went through"
        );
    }
    assert_eq!(
        values(headers, &header::HOST),
        [server.authority().as_str().as_bytes()]
    );

    // Hop-by-hop headers.
    let named = connection_tokens(client);
    let asked_upgrade = named.iter().any(|t| t.eq_ignore_ascii_case(b"upgrade"))
        && client.contains_key(header::UPGRADE);
    let out_connection = values(headers, &header::CONNECTION);
    let out_upgrade = values(headers, &header::UPGRADE);
    if !out_connection.is_empty() || !out_upgrade.is_empty() {
        assert!(
            asked_upgrade,
            "Connection/Upgrade kept for a non-upgrade request"
        );
        assert_eq!(out_connection, [b"upgrade".as_slice()]);
        assert_eq!(out_upgrade, [client[header::UPGRADE].as_bytes()]);
    }
    if str_connection_says_upgrade(client) && client.contains_key(header::UPGRADE) {
        assert!(
            !out_upgrade.is_empty(),
            "an upgrade request lost its Upgrade"
        );
    }
    for name in [
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
    ] {
        assert!(!headers.contains_key(name), "hop-by-hop {name} forwarded");
    }

    // x-immich-user-token (unless the profile injects it itself: checked above).
    let bearer = client
        .get(header::AUTHORIZATION)
        .and_then(|v| bearer_token(v.as_bytes()));
    let client_tokens = values(client, &IMMICH_USER_TOKEN);
    let out_tokens = values(headers, &IMMICH_USER_TOKEN);
    let token_named = named_contains(&named, &IMMICH_USER_TOKEN);
    if is_injected(&IMMICH_USER_TOKEN) {
        // The profile's value, checked above.
    } else if !client_tokens.is_empty() && !token_named {
        assert_eq!(
            out_tokens, client_tokens,
            "client's x-immich-user-token changed"
        );
    } else {
        match bearer {
            Some(token) => assert_eq!(out_tokens, [token], "Bearer token not moved"),
            None => assert!(out_tokens.is_empty(), "x-immich-user-token invented"),
        }
    }
    assert!(out_tokens.len() <= client_tokens.len().max(1));

    // Session cookies: exactly the jar's reach upstream.
    let jar = session.and_then(|s| s.to_str().ok());
    let mut jar_pairs = session_pairs(jar.map(str::as_bytes).into_iter());
    let mut out_pairs = session_pairs(headers.get_all(header::COOKIE).iter().map(|v| v.as_bytes()));
    jar_pairs.sort();
    out_pairs.sort();
    assert_eq!(
        out_pairs, jar_pairs,
        "session cookies other than the jar's forwarded"
    );
    if jar.is_some() {
        assert_eq!(
            values(headers, &header::COOKIE).len(),
            1,
            "not one Cookie header"
        );
    }

    // Headers the client named in Connection: gone, or holding the proxy's own value.
    for name in connection_named_headers(&named) {
        if name == header::CONNECTION || name == header::UPGRADE {
            continue; // checked above
        }
        if name == header::AUTHORIZATION
            || name == header::HOST
            || name == IMMICH_USER_TOKEN
            || is_injected(&name)
        {
            continue; // the proxy's values, checked above
        }
        if name == header::COOKIE {
            let expected: Vec<&[u8]> = jar.map(str::as_bytes).into_iter().collect();
            assert_eq!(values(headers, &name), expected, "client Cookie kept");
            continue;
        }
        assert!(
            !headers.contains_key(&name),
            "{name} named in Connection forwarded"
        );
    }
}

fn values<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Vec<&'a [u8]> {
    headers.get_all(name).iter().map(|v| v.as_bytes()).collect()
}

/// Every comma-separated token of every `Connection` value, byte for byte (even in values
/// that are not visible ASCII), trimmed.
fn connection_tokens(headers: &HeaderMap) -> Vec<&[u8]> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
        .collect()
}

fn connection_named_headers(tokens: &[&[u8]]) -> Vec<HeaderName> {
    tokens
        .iter()
        .filter_map(|t| HeaderName::from_bytes(t).ok())
        .collect()
}

fn named_contains(tokens: &[&[u8]], name: &HeaderName) -> bool {
    connection_named_headers(tokens).contains(name)
}

/// Whether `Connection` asks for an upgrade in a value that is visible ASCII (what the proxy
/// honours; an opaque value is not honoured, which is the safe side).
fn str_connection_says_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// The token of `Authorization: Bearer TOKEN` (scheme case-insensitive), when it makes a
/// header value.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty() && HeaderValue::from_bytes(token).is_ok()).then_some(token)
}

/// The `authentik_proxy*` pairs of some `Cookie` values.
fn session_pairs<'a>(values: impl Iterator<Item = &'a [u8]>) -> Vec<Vec<u8>> {
    values
        .flat_map(|v| v.split(|b| *b == b';'))
        .map(<[u8]>::trim_ascii)
        .filter(|p| p.starts_with(SESSION_COOKIE_PREFIX.as_bytes()))
        .map(<[u8]>::to_vec)
        .collect()
}
