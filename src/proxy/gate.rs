//! The gate in front of Immich: recognising the Authentik proxy outpost's answers (login
//! redirects, header-auth rejections) and the back-off that stops credproxy from sending
//! rejected credentials again and again.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::{HeaderMap, StatusCode, header};
use tokio::time::Instant;

use crate::sync::lock;

/// The first back-off after the gate rejects the credentials; doubles up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(5);
/// The longest back-off between attempts with rejected credentials.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

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

/// Stops sending rejected credentials for a growing pause, so Authentik is not hammered
/// (every failed Basic check costs it a token-endpoint call and may feed reputation policies).
#[derive(Default)]
pub struct Backoff {
    state: Mutex<Option<Rejection>>,
    active: AtomicBool,
}

#[derive(Clone, Copy)]
struct Rejection {
    until: Instant,
    delay: Duration,
    verdict: Verdict,
}

impl Backoff {
    /// The time left in the current pause, if one is running.
    pub fn active(&self) -> Option<Duration> {
        if !self.active.load(Ordering::Relaxed) {
            return None;
        }
        let now = Instant::now();
        lock(&self.state)
            .filter(|r| r.until > now)
            .map(|r| r.until - now)
    }

    /// The verdict of the last rejection.
    pub fn verdict(&self) -> Verdict {
        lock(&self.state).map_or(Verdict::Rejected, |r| r.verdict)
    }

    /// Records a rejection and returns the pause now in force.
    pub fn reject(&self, verdict: Verdict, profile: &str, server: &str, fix: &str) -> Duration {
        let now = Instant::now();
        let mut state = lock(&self.state);
        if let Some(r) = *state
            && r.until > now
        {
            // Requests already in flight when the pause began: same burst.
            return r.until - now;
        }
        let delay = state.map_or(FIRST_BACKOFF, |r| (r.delay * 2).min(MAX_BACKOFF));
        *state = Some(Rejection {
            until: now + delay,
            delay,
            verdict,
        });
        self.active.store(true, Ordering::Relaxed);
        tracing::warn!(
            "{} for profile '{profile}' at {server}; not sending them again for {} s. Fix: {fix}",
            verdict.explain(),
            delay.as_secs(),
        );
        delay
    }

    /// Forgets any rejection: the gate accepted the credentials.
    pub fn clear(&self) {
        // Read first: a write on every passed request would move this line between cores.
        if self.active.load(Ordering::Relaxed) && self.active.swap(false, Ordering::Relaxed) {
            *lock(&self.state) = None;
            tracing::info!("the gate accepts the credentials again");
        }
    }
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

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_to_a_cap_and_clears_on_success() {
        let backoff = Backoff::default();
        assert_eq!(backoff.active(), None);
        assert_eq!(
            backoff.reject(Verdict::Rejected, "p", "https://immich.example.com", "fix"),
            FIRST_BACKOFF
        );
        assert_eq!(backoff.active(), Some(FIRST_BACKOFF));
        // A second rejection inside the pause is the same burst: no doubling.
        assert_eq!(
            backoff.reject(Verdict::Rejected, "p", "https://immich.example.com", "fix"),
            FIRST_BACKOFF
        );
        let mut expected = FIRST_BACKOFF;
        for _ in 0..10 {
            tokio::time::advance(expected).await;
            assert_eq!(backoff.active(), None);
            expected = (expected * 2).min(MAX_BACKOFF);
            assert_eq!(
                backoff.reject(
                    Verdict::LoginRedirect,
                    "p",
                    "https://immich.example.com",
                    "fix"
                ),
                expected
            );
        }
        assert_eq!(expected, MAX_BACKOFF);
        assert_eq!(backoff.verdict(), Verdict::LoginRedirect);
        backoff.clear();
        assert_eq!(backoff.active(), None);
        assert_eq!(
            backoff.reject(Verdict::Rejected, "p", "https://immich.example.com", "fix"),
            FIRST_BACKOFF
        );
    }
}
