//! The running proxies of this user, as `login`, `logout` and `doctor` see them through the
//! control socket: told to read a profile's credentials again, or asked where they stand.

use crate::config::ConfigStore;
use crate::diagnose::doctor::{Status, Step};
use crate::ops::control::{self, ProfileReply, Request};

/// Tells every running proxy that serves `profile` from this config file to read its
/// credentials (and the config file) again now, and prints what each did; for `login`
/// (`stored`) and `logout`.
pub async fn tell(config: &ConfigStore, profile: &str, stored: bool) {
    if !control::AVAILABLE {
        eprintln!(
            "credproxy: a running `credproxy serve` for '{profile}' reads its credentials again by itself within about a second of its next rejected request; restart it to switch at once"
        );
        return;
    }
    let request = Request::Reload {
        profile: Some(profile.to_owned()),
    };
    let replies = control::ask_all(&request).await;
    let serving: Vec<(u32, &ProfileReply)> = replies
        .iter()
        .filter_map(|reply| Some((reply.pid, reply.serving(config.path(), profile)?)))
        .collect();
    if serving.is_empty() {
        if stored {
            eprintln!(
                "credproxy: no running proxy serves '{profile}' from {}: the next `credproxy serve` uses the new credentials",
                config.path().display()
            );
        }
        return;
    }
    for (pid, one) in serving {
        let outcome = one.reload.as_deref().unwrap_or("did not say");
        eprintln!(
            "credproxy: the running proxy for '{profile}' (pid {pid}, {}): {outcome}",
            one.url
        );
    }
}

/// The doctor's last step: whether a running proxy serves `profile` from this config file,
/// and where its credentials stand with the gate.
pub async fn doctor_step(config: &ConfigStore, profile: &str, fix: &str) -> Step {
    let replies = control::ask_all(&Request::Status).await;
    let Some((pid, one)) = replies
        .iter()
        .find_map(|reply| Some((reply.pid, reply.serving(config.path(), profile)?)))
    else {
        return Step {
            name: "proxy",
            status: Status::Pass,
            detail: if control::AVAILABLE {
                "no running `credproxy serve` serves this profile".to_owned()
            } else {
                "running proxies cannot be asked on this platform".to_owned()
            },
            fix: None,
        };
    };
    let credentials = &one.credentials;
    let text = |key: &str| credentials[key].as_str().map(str::to_owned);
    let last =
        text("last_accepted").map_or_else(|| "never".to_owned(), |at| format!("last at {at}"));
    let at = format!("pid {pid} on {}", one.url);
    let state = text("state").unwrap_or_default();
    let (status, detail) = match state.as_str() {
        "accepted" => (
            Status::Pass,
            format!("{at}: the gate accepts its credentials ({last})"),
        ),
        "not yet used" => (
            Status::Pass,
            format!("{at}: no request has needed its credentials yet"),
        ),
        "rejected" => (
            Status::Fail,
            format!(
                "{at}: the gate rejects its credentials since {} (accepted: {last}); it tries again in {} s",
                text("rejected_since").unwrap_or_default(),
                credentials["backoff_seconds"].as_u64().unwrap_or(0)
            ),
        ),
        "missing" => (Status::Fail, format!("{at}: it has no credentials to send")),
        other => (
            Status::Fail,
            format!(
                "{at}: its credentials are {other}: {}",
                text("problem").unwrap_or_default()
            ),
        ),
    };
    let detail = match (one.route["route"].as_str(), one.route["why"].as_str()) {
        (Some(route), Some(why)) => format!("{detail}; requests go the {route} route: {why}"),
        _ => detail,
    };
    Step {
        name: "proxy",
        status,
        detail,
        fix: (status == Status::Fail)
            .then(|| format!("{fix} (the running proxy picks the new credentials up at once)")),
    }
}
