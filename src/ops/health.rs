//! What a running proxy reports of each profile: where its credentials stand with the gate,
//! as text (`/healthz`, the control socket's status for `credproxy doctor`, and apps).

use crate::proxy::Proxy;
use crate::proxy::live::{Health, Unusable};

impl Standing {
    /// The standing of credentials whose live state reports `health`.
    pub fn of(health: &Health) -> Self {
        let state = match (&health.unusable, &health.rejected, &health.last_accepted) {
            (Some(Unusable::Missing), ..) => "missing",
            (Some(Unusable::Invalid(_)), ..) => "unusable",
            (None, Some(_), _) => "rejected",
            (None, None, Some(_)) => "accepted",
            (None, None, None) => "not yet used",
        };
        Self {
            state,
            loaded_at: crate::utc::seconds(health.loaded_at),
            last_accepted: health.last_accepted.map(crate::utc::seconds),
            rejected_since: health.rejected.map(|(since, _)| crate::utc::seconds(since)),
            rejection: health.rejected.map(|(_, verdict)| verdict.explain()),
            backoff_seconds: health.backoff.map(|b| b.as_secs().max(1)),
            problem: match &health.unusable {
                Some(Unusable::Invalid(reason)) => Some(reason.clone()),
                _ => None,
            },
        }
    }
}

/// Where credentials stand, as text (times in RFC 3339, UTC): what `/healthz`, the doctor
/// and apps show.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Standing {
    /// `not yet used`, `accepted`, `rejected`, `missing` or `unusable`.
    pub state: &'static str,
    /// When they were read from their store.
    pub loaded_at: String,
    /// When the gate last let a request through with them.
    pub last_accepted: Option<String>,
    /// Since when the gate rejects them.
    pub rejected_since: Option<String>,
    /// What the gate's rejection means.
    pub rejection: Option<&'static str>,
    /// Seconds left before they are sent again.
    pub backoff_seconds: Option<u64>,
    /// Why the stored value cannot be used, when it cannot.
    pub problem: Option<String>,
}

/// One profile's health as JSON: its server and where its credentials stand with the gate
/// (`/healthz`, and what `credproxy doctor` asks a running proxy for).
pub fn profile_health(proxy: &Proxy) -> serde_json::Value {
    let standing = Standing::of(&proxy.credentials().health());
    let certificate = proxy.settings().identity.as_ref().map(|identity| {
        let info = identity.info();
        serde_json::json!({
            "subject": info.subject,
            "issuer": info.issuer,
            "expires": crate::utc::seconds(info.not_after),
            "days_left": info.days_left(std::time::SystemTime::now()),
        })
    });
    serde_json::json!({
        "profile": proxy.settings().profile,
        "server": proxy.settings().server.to_string(),
        "credentials_rejected": standing.backoff_seconds.is_some(),
        "credentials": standing,
        "client_certificate": certificate,
        "route": proxy.routes().map(|routes| routes.status()),
    })
}
