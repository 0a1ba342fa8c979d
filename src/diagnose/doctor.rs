//! `credproxy doctor`: every step between a client and Immich, checked in order, each with a
//! verdict and a fix hint.

use std::fmt;
use std::time::SystemTime;

use http::{StatusCode, header};

use super::check::{CertSummary, CheckError, Checker, PING_PATH, is_pong};
use crate::credentials::{ClientIdentity, Injection, Scheme, Secret};
use crate::proxy::gate::{self, Verdict};

/// From how many days before a client certificate expires the doctor warns.
pub const CERTIFICATE_WARN_DAYS: i64 = 30;

/// Immich's socket.io endpoint with the websocket transport, as its clients open it.
pub const SOCKET_IO_PATH: &str = "/api/socket.io/?EIO=4&transport=websocket";

/// How one step went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// It works.
    Pass,
    /// It works, but something deserves attention.
    Warn,
    /// It does not work.
    Fail,
}

impl Status {
    /// The mark printed before the step.
    pub fn mark(self) -> &'static str {
        match self {
            Status::Pass => "✓",
            Status::Warn => "!",
            Status::Fail => "✗",
        }
    }
}

/// One checked step.
#[derive(Debug, Clone)]
pub struct Step {
    /// Short name (`dns`, `tls`, …).
    pub name: &'static str,
    /// The verdict.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do about a failure or warning.
    pub fix: Option<String>,
}

impl Step {
    fn pass(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Pass,
            detail: detail.into(),
            fix: None,
        }
    }

    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    /// A step that could not be checked because an earlier one failed.
    pub fn skipped(name: &'static str, because: &str) -> Self {
        Self {
            name,
            status: Status::Fail,
            detail: format!("not checked: {because}"),
            fix: None,
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:<12} {}",
            self.status.mark(),
            self.name,
            self.detail
        )?;
        if let Some(fix) = &self.fix {
            write!(f, "\n    fix: {fix}")?;
        }
        Ok(())
    }
}

/// What the network checks need to know about the profile.
pub struct Target<'a> {
    /// Runs the individual requests.
    pub checker: &'a Checker,
    /// The Authentik username (Basic only).
    pub username: &'a str,
    /// The profile's auth scheme.
    pub scheme: &'a Scheme,
    /// The stored secret, when there is one.
    pub secret: Option<&'a Secret>,
    /// The command that stores fresh credentials, for fix hints.
    pub login_command: String,
}

/// Runs the network steps in order: DNS, TCP, TLS, the gate without and with credentials,
/// Immich's version and a websocket upgrade. Later steps are skipped once the connection fails.
pub async fn network_steps(target: &Target<'_>) -> Vec<Step> {
    let checker = target.checker;
    let mut steps = Vec::new();
    let addrs = match checker.resolve().await {
        Ok(addrs) => {
            let list: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
            steps.push(Step::pass("dns", list.join(", ")));
            addrs
        }
        Err(e) => {
            steps.push(failure("dns", &e));
            return skip_rest(steps, "the name does not resolve");
        }
    };
    match checker.connect(&addrs).await {
        Ok(stream) => steps.push(Step::pass(
            "tcp",
            stream
                .peer_addr()
                .map_or_else(|_| "connected".to_owned(), |a| format!("connected to {a}")),
        )),
        Err(e) => {
            steps.push(failure("tcp", &e));
            return skip_rest(steps, "no TCP connection");
        }
    }
    match checker.certificates().await {
        Ok(chain) => steps.push(tls_step(&chain)),
        Err(e) => {
            let mut step = failure("tls", &e);
            // For a self-signed homelab host, the fix is to pin the key it presents.
            if let Ok(pin) = checker.presented_pin().await {
                step.fix = Some(format!(
                    "the server presents key pin {pin}; if that is your server, add `--pin {pin}` to {}, or pass its CA with --ca-cert",
                    target.login_command
                ));
            }
            steps.push(step);
            return skip_rest(steps, "no TLS session");
        }
    }
    steps.push(gate_without_credentials(checker).await);

    let Some(secret) = target.secret else {
        for name in ["credentials", "immich", "websocket"] {
            steps.push(Step::skipped(name, "no stored credentials"));
        }
        return steps;
    };
    let auth = match target.scheme.injection(target.username, secret) {
        Ok(auth) => auth,
        Err(e) => {
            steps.push(Step::fail(
                "credentials",
                e.to_string(),
                target.login_command.clone(),
            ));
            steps.push(Step::skipped("immich", "no usable credentials"));
            steps.push(Step::skipped("websocket", "no usable credentials"));
            return steps;
        }
    };
    let accepted = match checker.verify_credentials(target.username, &auth).await {
        Ok(()) => {
            steps.push(Step::pass(
                "credentials",
                format!(
                    "the gate accepts '{}'; {PING_PATH} answers pong",
                    target.username
                ),
            ));
            true
        }
        Err(e @ CheckError::Rejected { .. }) => {
            steps.push(Step::fail(
                "credentials",
                e.to_string(),
                target.login_command.clone(),
            ));
            false
        }
        Err(e) => {
            steps.push(failure("credentials", &e));
            false
        }
    };
    if !accepted {
        steps.push(Step::skipped(
            "immich",
            "the credentials did not get through",
        ));
        steps.push(Step::skipped(
            "websocket",
            "the credentials did not get through",
        ));
        return steps;
    }
    steps.push(immich_version(checker, &auth).await);
    steps.push(match checker.websocket(SOCKET_IO_PATH, Some(&auth)).await {
        Ok(r) if r.status == StatusCode::SWITCHING_PROTOCOLS => {
            Step::pass("websocket", "upgrade to /api/socket.io/ answered 101")
        }
        Ok(r) => Step::fail(
            "websocket",
            format!("upgrade to /api/socket.io/ answered HTTP {}", r.status.as_u16()),
            "let websocket upgrades through every proxy in front of Immich (e.g. nginx `proxy_set_header Upgrade`)",
        ),
        Err(e) => failure("websocket", &e),
    });
    steps
}

/// The LAN route's step (`lan`): the server reached at its LAN address `checker` is set
/// `at` proves its public name, and with credentials, the gate lets Immich's ping through
/// there. Not reachable is a warning (away from home: requests go the public route), as is
/// a host that does not prove the name (it is sent nothing); it comes with the fix for a LAN
/// front with a certificate of its own.
pub async fn lan_step(checker: &Checker, target: &Target<'_>) -> Step {
    let host = checker.server().host().to_owned();
    let auth = target
        .secret
        .and_then(|secret| target.scheme.injection(target.username, secret).ok());
    let checked = match &auth {
        Some(auth) => checker
            .verify_credentials(target.username, auth)
            .await
            .map(|()| {
                format!(
                    "the gate accepts '{}' there; {PING_PATH} answers pong",
                    target.username
                )
            }),
        None => checker
            .certificates()
            .await
            .map(|_| "no credentials to try there".to_owned()),
    };
    let warn = |detail: String, fix: Option<String>| Step {
        name: "lan",
        status: Status::Warn,
        detail,
        fix,
    };
    match checked {
        Ok(what) => Step::pass(
            "lan",
            format!("answers as {host} with a certificate for that name; {what}"),
        ),
        Err(
            e @ (CheckError::Dns { .. } | CheckError::Connect { .. } | CheckError::Timeout { .. }),
        ) => warn(
            format!("{e}; away from home, requests go the public route"),
            None,
        ),
        Err(e @ CheckError::Tls { .. }) => {
            let pin = checker
                .presented_pin()
                .await
                .unwrap_or_else(|_| "sha256/…".to_owned());
            warn(
                format!(
                    "the LAN address did not prove to be {host}, so credproxy sends it nothing: {e}"
                ),
                Some(format!(
                    "on your home network, if that is your server's LAN front with a certificate of its own, add `--lan-pin {pin}` (or --lan-ca FILE) to {}",
                    target.login_command
                )),
            )
        }
        Err(e @ CheckError::Rejected { .. }) => {
            Step::fail("lan", e.to_string(), target.login_command.clone())
        }
        Err(e) => failure("lan", &e),
    }
}

/// The client certificate: subject, issuer and expiry; a warning from
/// [`CERTIFICATE_WARN_DAYS`] before it expires, a failure once it has (or before it is
/// valid). `fix` renews it.
pub fn client_certificate_step(identity: &ClientIdentity, now: SystemTime, fix: &str) -> Step {
    let info = identity.info();
    let days = info.days_left(now);
    let detail = format!(
        "subject {}; issuer {}; expires {} ({days} days)",
        info.subject,
        info.issuer,
        crate::utc::seconds(info.not_after)
    );
    match identity.check_dates(now) {
        Err(err) => Step::fail("client cert", format!("{detail}: {err}"), fix),
        Ok(()) if days < CERTIFICATE_WARN_DAYS => Step {
            name: "client cert",
            status: Status::Warn,
            detail,
            fix: Some(format!("renew it before it expires, then: {fix}")),
        },
        Ok(()) => Step::pass("client cert", detail),
    }
}

fn tls_step(chain: &[CertSummary]) -> Step {
    let Some(leaf) = chain.first() else {
        return Step::pass("tls", "verified (no certificate details available)");
    };
    let detail = format!(
        "verified; subject {}; issuer {}; expires {} ({} days); pin {}",
        leaf.subject, leaf.issuer, leaf.not_after, leaf.days_left, leaf.spki_pin
    );
    if leaf.days_left < 14 {
        Step {
            name: "tls",
            status: Status::Warn,
            detail,
            fix: Some("renew the server certificate soon".to_owned()),
        }
    } else {
        Step::pass("tls", detail)
    }
}

async fn gate_without_credentials(checker: &Checker) -> Step {
    let response = match checker.get(PING_PATH, None).await {
        Ok(response) => response,
        Err(e) => return failure("gate", &e),
    };
    match gate::classify(response.status, &response.headers) {
        Verdict::LoginRedirect => Step::pass(
            "gate",
            "an Authentik outpost answers unauthenticated requests with its login redirect",
        ),
        Verdict::Rejected => Step::pass(
            "gate",
            "an Authentik outpost rejects unauthenticated requests (HTTP 401)",
        ),
        Verdict::AccessLoginRedirect => Step::pass(
            "gate",
            "Cloudflare Access answers unauthenticated requests with its login redirect",
        ),
        Verdict::Passed if is_pong(&response) => Step {
            name: "gate",
            status: Status::Warn,
            detail: "Immich answers without any gate in front: credproxy is not needed here"
                .to_owned(),
            fix: Some("check that this is the Authentik-protected URL".to_owned()),
        },
        Verdict::Passed => Step::fail(
            "gate",
            format!(
                "unrecognised answer without credentials: HTTP {} ({})",
                response.status.as_u16(),
                response
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("no content type")
            ),
            "check that the server URL points at the Authentik proxy provider's external host",
        ),
    }
}

async fn immich_version(checker: &Checker, auth: &Injection) -> Step {
    match checker.get("/api/server/version", Some(auth)).await {
        Ok(r) if r.status == StatusCode::OK => match immich_version_text(&r.body) {
            Some(version) => Step::pass("immich", format!("Immich v{version}")),
            None => Step::fail(
                "immich",
                "/api/server/version did not answer Immich's JSON",
                "check that the server is Immich",
            ),
        },
        Ok(r) => Step::fail(
            "immich",
            format!("/api/server/version answered HTTP {}", r.status.as_u16()),
            "check that the server is Immich",
        ),
        Err(e) => failure("immich", &e),
    }
}

/// `MAJOR.MINOR.PATCH` from Immich's `/api/server/version` answer, or `None` when the
/// body is not that JSON (every part must be a number).
fn immich_version_text(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let part = |name: &str| value.get(name)?.as_u64();
    Some(format!(
        "{}.{}.{}",
        part("major")?,
        part("minor")?,
        part("patch")?
    ))
}

fn failure(name: &'static str, err: &CheckError) -> Step {
    Step {
        name,
        status: Status::Fail,
        detail: err.to_string(),
        fix: None,
    }
}

fn skip_rest(mut steps: Vec<Step>, because: &str) -> Vec<Step> {
    let done: Vec<&str> = steps.iter().map(|s| s.name).collect();
    for name in ["tcp", "tls", "gate", "credentials", "immich", "websocket"] {
        if !done.contains(&name) {
            steps.push(Step::skipped(name, because));
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_immichs_version_json_makes_a_version() {
        assert_eq!(
            immich_version_text(br#"{"major":2,"minor":3,"patch":1}"#).as_deref(),
            Some("2.3.1")
        );
        for body in [
            &b"{}"[..],
            br#"{"major":"2","minor":3,"patch":1}"#,
            br#"{"major":2,"minor":3}"#,
            b"<html>",
            b"",
        ] {
            assert_eq!(immich_version_text(body), None, "{body:?}");
        }
    }

    fn identity_expiring(after: std::time::Duration, before: bool) -> ClientIdentity {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "doctor test");
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(400);
        params.not_after = if before { now - after } else { now + after };
        let cert = params.self_signed(&key).unwrap();
        let pem = format!("{}{}", cert.pem(), key.serialize_pem());
        ClientIdentity::from_pem(pem.as_bytes(), None).unwrap()
    }

    #[test]
    fn a_client_certificate_warns_a_month_before_it_expires_and_fails_after() {
        let day = std::time::Duration::from_secs(86_400);
        let now = SystemTime::now();
        let step = |identity| client_certificate_step(&identity, now, "credproxy login …");
        let fine = step(identity_expiring(day * 100, false));
        assert_eq!(fine.status, Status::Pass, "{fine}");
        assert!(fine.detail.contains("CN=doctor test"), "{fine}");
        assert!(
            fine.detail.contains("(99 days)") || fine.detail.contains("(100 days)"),
            "{fine}"
        );
        let soon = step(identity_expiring(day * 10, false));
        assert_eq!(soon.status, Status::Warn, "{soon}");
        assert!(soon.fix.unwrap().starts_with("renew it before it expires"));
        let gone = step(identity_expiring(day * 2, true));
        assert_eq!(gone.status, Status::Fail, "{gone}");
        assert!(gone.detail.contains("the certificate expired on"), "{gone}");
    }
}
