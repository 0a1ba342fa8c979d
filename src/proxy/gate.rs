//! The gates in front of Immich: recognising the Authentik proxy outpost's answers (login
//! redirects, header-auth rejections), Cloudflare Access's login redirect, and a TLS front
//! end's HTTP refusal of the client certificate (nginx `ssl_verify_client`).

use http::{HeaderMap, StatusCode, header};

/// The path the outpost redirects unauthenticated requests to.
pub const OUTPOST_START: &str = "/outpost.goauthentik.io/start";

/// The path Cloudflare Access redirects requests without an accepted service token (or
/// session) to, on the team's `cloudflareaccess.com` domain (cloudflared recognises Access
/// by the same prefix).
pub const ACCESS_LOGIN: &str = "/cdn-cgi/access/login";

/// Prefix of the session cookies the outpost sets (`authentik_proxy_` + 8 hex characters).
pub const SESSION_COOKIE_PREFIX: &str = "authentik_proxy";

/// What an upstream answer says about our credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The gate let the request through (or there is no gate): Immich answered.
    Passed,
    /// The gate redirected to its login flow: it did not accept the credentials sent.
    LoginRedirect,
    /// The gate answered 401 with its HTML page: the credentials were rejected.
    Rejected,
    /// Cloudflare Access redirected to its login page: it did not accept the service token.
    AccessLoginRedirect,
}

impl Verdict {
    /// A short human explanation of a failed verdict.
    pub fn explain(self) -> &'static str {
        match self {
            Verdict::Passed => "the gate accepted the credentials",
            Verdict::LoginRedirect => {
                "the Authentik outpost redirected to its login page: it did not accept the stored credentials"
            }
            Verdict::Rejected => {
                "the Authentik outpost rejected the stored credentials (HTTP 401): wrong username or app password, an expired token, or a policy denies this account"
            }
            Verdict::AccessLoginRedirect => {
                "Cloudflare Access redirected to its login page: it did not accept the stored service token (a wrong, expired or revoked token, or no Service Auth policy of the application includes it)"
            }
        }
    }
}

/// Classifies an upstream response's status and headers.
///
/// The outpost's 401 page is rendered HTML without `WWW-Authenticate`; Immich's own 401s are
/// JSON, so they pass through untouched.
pub fn classify(status: StatusCode, headers: &HeaderMap) -> Verdict {
    if status.is_redirection() {
        match redirect_path(headers) {
            Some(path) if path.starts_with(OUTPOST_START) => return Verdict::LoginRedirect,
            Some(path) if path.starts_with(ACCESS_LOGIN) => return Verdict::AccessLoginRedirect,
            _ => {}
        }
    }
    if status == StatusCode::UNAUTHORIZED
        && !headers.contains_key(header::WWW_AUTHENTICATE)
        && is_html(headers)
    {
        return Verdict::Rejected;
    }
    Verdict::Passed
}

/// The longest page [`certificate_refusal`] reads: nginx's are about 250 bytes.
pub const MAX_REFUSAL_PAGE: u64 = 2048;

/// Whether a response may be a front end's refusal of the client certificate, from its head
/// alone: a 400 HTML page of a known, small length. Only such a page is read whole before it
/// is passed on (every other body streams untouched).
pub fn may_refuse_certificate(status: StatusCode, headers: &HeaderMap) -> bool {
    status == StatusCode::BAD_REQUEST
        && is_html(headers)
        && headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|len| len <= MAX_REFUSAL_PAGE)
}

/// What an HTTP answer says about the client certificate, for front ends that finish the
/// TLS handshake whatever the client sent and answer 400 instead of a TLS alert: nginx with
/// `ssl_verify_client on` (its 496 and 495 errors, sent as 400 pages).
pub fn certificate_refusal(status: StatusCode, body: &[u8]) -> Option<&'static str> {
    if status != StatusCode::BAD_REQUEST {
        return None;
    }
    let body = String::from_utf8_lossy(body);
    if body.contains("No required SSL certificate was sent") {
        Some(
            "asks for a client certificate and none was sent (HTTP 400: No required SSL certificate was sent)",
        )
    } else if body.contains("The SSL certificate error") {
        Some(
            "refused the client certificate (HTTP 400: The SSL certificate error): expired, not yet valid, or not issued by a CA the server trusts (its error log says which)",
        )
    } else {
        None
    }
}

/// The path a redirect points at (of an absolute or a relative `Location`).
fn redirect_path(headers: &HeaderMap) -> Option<&str> {
    let location = headers.get(header::LOCATION)?.to_str().ok()?;
    let path = match location.find("://") {
        Some(scheme_end) => {
            let after = &location[scheme_end + 3..];
            &after[after.find('/')?..]
        }
        None => location,
    };
    Some(path)
}

fn is_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.trim_start()
                .to_ascii_lowercase()
                .starts_with("text/html")
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_static(k),
                    HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    #[test]
    fn outpost_redirects_are_recognised_absolute_or_relative() {
        for loc in [
            "https://immich.example.com/outpost.goauthentik.io/start?rd=%2Fapi",
            "/outpost.goauthentik.io/start?rd=x",
        ] {
            let h = headers(&[("location", loc)]);
            assert_eq!(
                classify(StatusCode::FOUND, &h),
                Verdict::LoginRedirect,
                "{loc}"
            );
        }
        let h = headers(&[("location", "/photos")]);
        assert_eq!(classify(StatusCode::FOUND, &h), Verdict::Passed);
        let h = headers(&[(
            "location",
            "https://example.com/x?rd=/outpost.goauthentik.io/start",
        )]);
        assert_eq!(classify(StatusCode::FOUND, &h), Verdict::Passed);
    }

    #[test]
    fn cloudflare_access_login_redirects_are_recognised() {
        let h = headers(&[(
            "location",
            "https://team.cloudflareaccess.com/cdn-cgi/access/login/immich.example.com?kid=4f2&redirect_url=%2Fapi%2Fserver%2Fping",
        )]);
        assert_eq!(
            classify(StatusCode::FOUND, &h),
            Verdict::AccessLoginRedirect
        );
        assert_eq!(classify(StatusCode::OK, &h), Verdict::Passed);
        let h = headers(&[("location", "https://team.example.com/cdn-cgi/other")]);
        assert_eq!(classify(StatusCode::FOUND, &h), Verdict::Passed);
    }

    #[test]
    fn html_401_without_challenge_is_a_rejection_but_immich_json_401_is_not() {
        let gate = headers(&[("content-type", "text/html; charset=utf-8")]);
        assert_eq!(classify(StatusCode::UNAUTHORIZED, &gate), Verdict::Rejected);
        let immich = headers(&[("content-type", "application/json; charset=utf-8")]);
        assert_eq!(classify(StatusCode::UNAUTHORIZED, &immich), Verdict::Passed);
        let challenged = headers(&[
            ("content-type", "text/html"),
            ("www-authenticate", "Basic realm=x"),
        ]);
        assert_eq!(
            classify(StatusCode::UNAUTHORIZED, &challenged),
            Verdict::Passed
        );
        assert_eq!(classify(StatusCode::OK, &gate), Verdict::Passed);
    }

    #[test]
    fn nginx_pages_about_client_certificates_are_recognised() {
        let none = "<html><center>No required SSL certificate was sent</center>".as_bytes();
        let refusal = certificate_refusal(StatusCode::BAD_REQUEST, none).unwrap();
        assert!(refusal.contains("none was sent"), "{refusal}");
        let bad = "<html><center>The SSL certificate error</center>".as_bytes();
        let refusal = certificate_refusal(StatusCode::BAD_REQUEST, bad).unwrap();
        assert!(refusal.contains("refused"), "{refusal}");
        assert_eq!(
            certificate_refusal(StatusCode::BAD_REQUEST, b"<h1>400 Bad Request</h1>"),
            None
        );
        assert_eq!(certificate_refusal(StatusCode::OK, none), None);
    }

    #[test]
    fn only_small_html_400s_are_read_for_a_certificate_refusal() {
        let page = headers(&[("content-type", "text/html"), ("content-length", "246")]);
        assert!(may_refuse_certificate(StatusCode::BAD_REQUEST, &page));
        assert!(!may_refuse_certificate(StatusCode::OK, &page));
        let json = headers(&[
            ("content-type", "application/json"),
            ("content-length", "40"),
        ]);
        assert!(!may_refuse_certificate(StatusCode::BAD_REQUEST, &json));
        let streamed = headers(&[("content-type", "text/html")]);
        assert!(!may_refuse_certificate(StatusCode::BAD_REQUEST, &streamed));
        let large = headers(&[("content-type", "text/html"), ("content-length", "2049")]);
        assert!(!may_refuse_certificate(StatusCode::BAD_REQUEST, &large));
    }
}
