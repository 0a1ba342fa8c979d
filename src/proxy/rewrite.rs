//! Request and response rewriting, pure and unit-tested: what a request looks like once it is
//! pointed at the one upstream with the profile's credentials, and what a response looks like
//! once it is pointed back at the local origin.

use http::header::{self, HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{HeaderMap, Method, StatusCode, Uri, Version};

use super::jar;
use crate::config::ServerUrl;
use crate::credentials::Injection;

/// Immich's header for a user session token: where a client's own Bearer token goes.
pub const IMMICH_USER_TOKEN: HeaderName = HeaderName::from_static("x-immich-user-token");

/// Headers that describe one connection, not the message (RFC 9110 7.6.1, plus de-facto ones).
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Where requests go: the pinned upstream origin.
#[derive(Debug, Clone)]
pub struct Target {
    authority: Authority,
    host: HeaderValue,
    /// The spellings of the upstream origin a `Location` may use (with and without `:443`).
    origins: Vec<String>,
}

impl Target {
    /// The target for a validated server URL.
    pub fn new(server: &ServerUrl) -> Self {
        let authority = server.authority().clone();
        let host = HeaderValue::from_str(authority.as_str())
            .expect("a parsed authority is a valid header value");
        let mut origins = vec![format!("https://{authority}")];
        if server.port() == 443 {
            origins.push(format!("https://{authority}:443"));
        }
        Self {
            authority,
            host,
            origins,
        }
    }

    /// The upstream's `host[:port]`.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }
}

/// Where `name` is in [`HOP_BY_HOP`], if it is a hop-by-hop header.
fn hop_by_hop_index(name: &str) -> Option<usize> {
    Some(match name {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "proxy-authenticate" => 3,
        "proxy-authorization" => 4,
        "te" => 5,
        "trailer" => 6,
        "transfer-encoding" => 7,
        "upgrade" => 8,
        _ => return None,
    })
}

/// The names a `Connection` value lists, as written (`keep-alive`, `Upgrade`, `X-Foo`).
fn connection_tokens(value: &HeaderValue) -> impl Iterator<Item = &str> {
    value
        .as_bytes()
        .split(|b| *b == b',')
        .filter_map(|token| std::str::from_utf8(token.trim_ascii()).ok())
        .filter(|token| !token.is_empty())
}

/// True for a `Connection` token that names a header outside the fixed hop-by-hop set.
fn names_other_header(token: &str) -> bool {
    !HOP_BY_HOP
        .iter()
        .any(|hop| hop.as_str().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers: the fixed set and every header named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names finds which are here; most messages carry none of them or
    // only `Connection: keep-alive`, and nothing else is looked up.
    let mut present = [false; 9];
    for name in headers.keys() {
        if let Some(at) = hop_by_hop_index(name.as_str()) {
            present[at] = true;
        }
    }
    if present[0]
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(connection_tokens)
            .any(names_other_header)
    {
        let listed: Vec<HeaderValue> = headers
            .get_all(header::CONNECTION)
            .iter()
            .cloned()
            .collect();
        for token in listed.iter().flat_map(connection_tokens) {
            // Matched case-insensitively by the map; a token that is no header name
            // matches nothing.
            headers.remove(token);
        }
    }
    for (hop, present) in HOP_BY_HOP.iter().zip(present) {
        if present {
            headers.remove(hop);
        }
    }
}

/// The protocol a request asks to upgrade to (`Connection: upgrade` + `Upgrade: X`), if any.
pub fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let protocol = headers.get(header::UPGRADE)?;
    let connection_says_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(connection_tokens)
        .any(|t| t.eq_ignore_ascii_case("upgrade"));
    connection_says_upgrade.then(|| protocol.clone())
}

/// Why a request cannot be forwarded at all.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RewriteError {
    /// CONNECT asks for a tunnel to anywhere: never offered.
    #[error("CONNECT is not supported: this proxy forwards to one fixed server")]
    Connect,
    /// The request target cannot be expressed against the upstream.
    #[error("the request target cannot be forwarded")]
    BadTarget,
}

/// Rewrites a client request's head into the upstream request's head.
///
/// Path and query stay unchanged; scheme, authority and `Host` become the upstream's;
/// hop-by-hop headers go; a client's `Authorization: Bearer T` moves to
/// `x-immich-user-token` (Immich reads it there), any other client credential is dropped,
/// and the profile's `credentials` are set. The gate's session cookies (`session`) join the client's cookies.
/// Upgrade requests keep `Connection: upgrade` and `Upgrade`.
pub fn rewrite_request(
    parts: &mut http::request::Parts,
    target: &Target,
    credentials: &Injection,
    session: Option<HeaderValue>,
) -> Result<(), RewriteError> {
    if parts.method == Method::CONNECT {
        return Err(RewriteError::Connect);
    }
    let path_and_query = match parts.uri.path_and_query() {
        Some(pq) if pq.as_str().starts_with('/') => pq.clone(),
        None => http::uri::PathAndQuery::from_static("/"),
        Some(_) => return Err(RewriteError::BadTarget),
    };
    parts.uri = Uri::builder()
        .scheme(Scheme::HTTPS)
        .authority(target.authority.clone())
        .path_and_query(path_and_query)
        .build()
        .map_err(|_| RewriteError::BadTarget)?;
    parts.version = Version::HTTP_11;

    let headers = &mut parts.headers;
    let upgrade = upgrade_protocol(headers);
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| bearer_token(v.as_bytes()))
        .and_then(|t| HeaderValue::from_bytes(t).ok());
    strip_hop_by_hop(headers);
    headers.remove(header::AUTHORIZATION);
    if let Some(mut token) = bearer
        && !headers.contains_key(&IMMICH_USER_TOKEN)
    {
        token.set_sensitive(true);
        headers.insert(IMMICH_USER_TOKEN, token);
    }
    credentials.apply(headers);
    headers.insert(header::HOST, target.host.clone());
    jar::merge_cookies(headers, session);
    if let Some(protocol) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol);
    }
    Ok(())
}

/// The token of an `Authorization: Bearer TOKEN` value (scheme matched case-insensitively).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Rewrites an upstream response's head for a client that reached us as `client_host`:
/// hop-by-hop headers go (except the `Connection`/`Upgrade` pair of a protocol switch), a
/// `Location` on the upstream origin points to the local origin instead, and Immich's cookies
/// lose `Domain` and `Secure` so a browser on plain-http loopback keeps them.
pub fn rewrite_response(
    parts: &mut http::response::Parts,
    target: &Target,
    client_host: Option<&HeaderValue>,
) {
    let upgrade = (parts.status == StatusCode::SWITCHING_PROTOCOLS)
        .then(|| parts.headers.get(header::UPGRADE).cloned())
        .flatten();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(protocol) = upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, protocol);
    }
    if let (Some(host), Some(location)) = (client_host, parts.headers.get(header::LOCATION))
        && let Ok(host) = host.to_str()
        && let Some(localized) =
            localize_location(location, &target.origins, &format!("http://{host}"))
    {
        parts.headers.insert(header::LOCATION, localized);
    }
    if parts.headers.contains_key(header::SET_COOKIE) {
        let cookies: Vec<HeaderValue> = parts
            .headers
            .get_all(header::SET_COOKIE)
            .iter()
            .map(localize_set_cookie)
            .collect();
        parts.headers.remove(header::SET_COOKIE);
        for cookie in cookies {
            parts.headers.append(header::SET_COOKIE, cookie);
        }
    }
}

/// Points a `Location` on one of the upstream `origins` at `local_origin`; others stay.
pub fn localize_location(
    location: &HeaderValue,
    origins: &[String],
    local_origin: &str,
) -> Option<HeaderValue> {
    let text = location.to_str().ok()?;
    origins.iter().find_map(|origin| {
        let head = text.get(..origin.len())?;
        let rest = &text[origin.len()..];
        let boundary = rest.is_empty() || rest.starts_with(['/', '?', '#']);
        (head.eq_ignore_ascii_case(origin) && boundary)
            .then(|| HeaderValue::from_str(&format!("{local_origin}{rest}")).ok())
            .flatten()
    })
}

/// Drops `Domain` and `Secure` from a `Set-Cookie` (and makes `SameSite=None`, which needs
/// `Secure`, into `Lax`), so a browser on `http://127.0.0.1` stores it for this origin.
pub fn localize_set_cookie(value: &HeaderValue) -> HeaderValue {
    let Some(cookie) = value.to_str().ok().and_then(jar::SetCookie::parse) else {
        return value.clone();
    };
    let mut out = format!("{}={}", cookie.name, cookie.value);
    for attr in cookie.attributes() {
        if attr.name.eq_ignore_ascii_case("domain") || attr.name.eq_ignore_ascii_case("secure") {
            continue;
        }
        out.push_str("; ");
        if attr.name.eq_ignore_ascii_case("samesite")
            && attr.value.is_some_and(|v| v.eq_ignore_ascii_case("none"))
        {
            out.push_str("SameSite=Lax");
        } else {
            out.push_str(attr.text);
        }
    }
    HeaderValue::from_str(&out).unwrap_or_else(|_| value.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::{Secret, basic_value};
    use http::{Request, Response};

    fn target() -> Target {
        Target::new(&ServerUrl::parse("https://immich.example.com").unwrap())
    }

    fn auth() -> HeaderValue {
        basic_value("svc", &Secret::new("app-pass".into()))
    }

    fn request(builder: http::request::Builder) -> http::request::Parts {
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn basic_auth_encodes_username_and_password() {
        let value = auth();
        assert_eq!(value.to_str().unwrap(), "Basic c3ZjOmFwcC1wYXNz");
        assert!(value.is_sensitive());
        assert!(!format!("{value:?}").contains("c3Zj"));
    }

    #[test]
    fn rewrite_pins_upstream_and_keeps_path_and_query() {
        let mut parts = request(
            Request::get("http://127.0.0.1:2283/api/assets/x/original?size=preview&a=%2F")
                .header("host", "127.0.0.1:2283"),
        );
        rewrite_request(&mut parts, &target(), &auth().into(), None).unwrap();
        assert_eq!(
            parts.uri.to_string(),
            "https://immich.example.com/api/assets/x/original?size=preview&a=%2F"
        );
        assert_eq!(parts.headers["host"], "immich.example.com");
        assert_eq!(parts.headers.get_all("authorization").iter().count(), 1);
        assert_eq!(parts.headers["authorization"], auth());
        assert_eq!(parts.version, Version::HTTP_11);
    }

    #[test]
    fn rewrite_removes_hop_by_hop_and_connection_named_headers() {
        let mut parts = request(
            Request::post("/api/assets")
                .header("connection", "keep-alive, x-private-hop")
                .header("x-private-hop", "1")
                .header("keep-alive", "timeout=5")
                .header("proxy-authorization", "Basic bG9jYWw6eA==")
                .header("te", "trailers")
                .header("trailer", "x-checksum")
                .header("transfer-encoding", "chunked")
                .header("upgrade", "h2c")
                .header("proxy-connection", "keep-alive")
                .header("x-immich-checksum", "abc"),
        );
        rewrite_request(&mut parts, &target(), &auth().into(), None).unwrap();
        for gone in [
            "connection",
            "x-private-hop",
            "keep-alive",
            "proxy-authorization",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-connection",
        ] {
            assert!(!parts.headers.contains_key(gone), "{gone} survived");
        }
        assert_eq!(parts.headers["x-immich-checksum"], "abc");
    }

    #[test]
    fn connection_named_headers_go_even_beside_non_ascii_bytes() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_bytes(b"\xffAA, x-secret-hop").unwrap(),
        );
        headers.insert("x-secret-hop", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        assert!(headers.is_empty(), "{headers:?}");
    }

    #[test]
    fn connection_names_match_any_case_across_several_values() {
        let mut headers = HeaderMap::new();
        headers.append(header::CONNECTION, HeaderValue::from_static("Keep-Alive"));
        headers.append(
            header::CONNECTION,
            HeaderValue::from_static(" X-Hop-One ,x-HOP-two"),
        );
        headers.insert("x-hop-one", HeaderValue::from_static("1"));
        headers.insert("x-hop-two", HeaderValue::from_static("2"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-kept", HeaderValue::from_static("3"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert_eq!(headers["x-kept"], "3");
    }

    #[test]
    fn the_fixed_hop_by_hop_set_is_found_by_name() {
        for (at, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name.as_str()), Some(at), "{name}");
        }
        for name in ["host", "content-length", "x-connection", "connections", ""] {
            assert_eq!(hop_by_hop_index(name), None, "{name}");
        }
    }

    #[test]
    fn client_bearer_moves_to_immich_user_token_and_other_auth_is_dropped() {
        let mut parts =
            request(Request::get("/api/users/me").header("authorization", "bearer tok123"));
        rewrite_request(&mut parts, &target(), &auth().into(), None).unwrap();
        assert_eq!(parts.headers[IMMICH_USER_TOKEN], "tok123");
        assert_eq!(parts.headers["authorization"], auth());

        let mut parts = request(
            Request::get("/api/users/me")
                .header("authorization", "Bearer new")
                .header("x-immich-user-token", "existing"),
        );
        rewrite_request(&mut parts, &target(), &auth().into(), None).unwrap();
        assert_eq!(parts.headers[IMMICH_USER_TOKEN], "existing");

        let mut parts = request(
            Request::get("/")
                .header("authorization", "Basic Zm9vOmJhcg==")
                .header("x-api-key", "k")
                .header("cookie", "immich_access_token=t"),
        );
        rewrite_request(&mut parts, &target(), &auth().into(), None).unwrap();
        assert!(!parts.headers.contains_key(IMMICH_USER_TOKEN));
        assert_eq!(parts.headers["authorization"], auth());
        assert_eq!(parts.headers["x-api-key"], "k");
        assert_eq!(parts.headers["cookie"], "immich_access_token=t");
    }

    #[test]
    fn websocket_upgrade_keeps_its_connection_pair() {
        let mut parts = request(
            Request::get("/api/socket.io/?EIO=4&transport=websocket")
                .header("connection", "keep-alive, Upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        );
        rewrite_request(&mut parts, &target(), &auth().into(), None).unwrap();
        assert_eq!(parts.headers["connection"], "upgrade");
        assert_eq!(parts.headers["upgrade"], "websocket");
        assert_eq!(
            parts.headers["sec-websocket-key"],
            "dGhlIHNhbXBsZSBub25jZQ=="
        );
    }

    #[test]
    fn connect_and_odd_targets_are_refused() {
        let mut parts = request(Request::connect("evil.example:443"));
        assert_eq!(
            rewrite_request(&mut parts, &target(), &auth().into(), None),
            Err(RewriteError::Connect)
        );
        let mut parts = request(Request::options("*"));
        assert_eq!(
            rewrite_request(&mut parts, &target(), &auth().into(), None),
            Err(RewriteError::BadTarget)
        );
    }

    #[test]
    fn response_loses_hop_by_hop_but_switch_keeps_upgrade() {
        let (mut parts, ()) = Response::builder()
            .status(200)
            .header("connection", "close, x-hop")
            .header("x-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("etag", "\"abc\"")
            .body(())
            .unwrap()
            .into_parts();
        rewrite_response(
            &mut parts,
            &target(),
            Some(&HeaderValue::from_static("127.0.0.1:2283")),
        );
        assert!(!parts.headers.contains_key("connection"));
        assert!(!parts.headers.contains_key("x-hop"));
        assert!(!parts.headers.contains_key("keep-alive"));
        assert_eq!(parts.headers["etag"], "\"abc\"");

        let (mut parts, ()) = Response::builder()
            .status(101)
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .body(())
            .unwrap()
            .into_parts();
        rewrite_response(
            &mut parts,
            &target(),
            Some(&HeaderValue::from_static("127.0.0.1:2283")),
        );
        assert_eq!(parts.headers["upgrade"], "websocket");
        assert_eq!(parts.headers["connection"], "upgrade");
    }

    #[test]
    fn upstream_locations_point_back_to_the_local_origin() {
        let t = target();
        let local = "http://127.0.0.1:2283";
        let loc =
            |v: &'static str| localize_location(&HeaderValue::from_static(v), &t.origins, local);
        assert_eq!(
            loc("https://immich.example.com/auth/login?x=1").unwrap(),
            "http://127.0.0.1:2283/auth/login?x=1"
        );
        assert_eq!(
            loc("https://IMMICH.example.com:443").unwrap(),
            "http://127.0.0.1:2283"
        );
        assert_eq!(loc("https://immich.example.com.evil.net/x"), None);
        assert_eq!(loc("https://auth.example.com/outpost"), None);
        assert_eq!(loc("/relative/path"), None);
    }

    #[test]
    fn immich_cookies_are_made_keepable_on_plain_http_loopback() {
        let c = |v: &'static str| localize_set_cookie(&HeaderValue::from_static(v));
        assert_eq!(
            c(
                "immich_access_token=abc; Domain=immich.example.com; Path=/; Secure; HttpOnly; SameSite=Lax"
            ),
            "immich_access_token=abc; Path=/; HttpOnly; SameSite=Lax"
        );
        assert_eq!(c("a=b; secure; SameSite=None"), "a=b; SameSite=Lax");
        assert_eq!(c("a=b"), "a=b");
    }

    #[test]
    fn session_cookies_merge_into_the_upstream_request() {
        let mut parts = request(Request::get("/").header("cookie", "immich_access_token=t"));
        let session = Some(HeaderValue::from_static("authentik_proxy_1a=s1"));
        rewrite_request(&mut parts, &target(), &auth().into(), session).unwrap();
        assert_eq!(
            parts.headers["cookie"],
            "immich_access_token=t; authentik_proxy_1a=s1"
        );
    }
}
