//! The gate in front of Immich: recognising the Authentik proxy outpost's answers (login
//! redirects, header-auth rejections).

use http::{HeaderMap, StatusCode, header};

/// The path the outpost redirects unauthenticated requests to.
pub const OUTPOST_START: &str = "/outpost.goauthentik.io/start";

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
        }
    }
}

/// Classifies an upstream response's status and headers.
///
/// The outpost's 401 page is rendered HTML without `WWW-Authenticate`; Immich's own 401s are
/// JSON, so they pass through untouched.
pub fn classify(status: StatusCode, headers: &HeaderMap) -> Verdict {
    if status.is_redirection() && redirects_to_outpost(headers) {
        return Verdict::LoginRedirect;
    }
    if status == StatusCode::UNAUTHORIZED
        && !headers.contains_key(header::WWW_AUTHENTICATE)
        && is_html(headers)
    {
        return Verdict::Rejected;
    }
    Verdict::Passed
}

fn redirects_to_outpost(headers: &HeaderMap) -> bool {
    let Some(location) = headers.get(header::LOCATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    match location.parse::<http::Uri>() {
        Ok(uri) => uri.path().starts_with(OUTPOST_START),
        Err(_) => location.contains(OUTPOST_START),
    }
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
}
