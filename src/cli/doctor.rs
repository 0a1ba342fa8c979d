//! `credproxy doctor`: the config and keyring steps, then the network steps of
//! [`crate::diagnose::doctor`], one line each; fails when any step failed.

use std::sync::Arc;

use super::{CliError, Result, blocking};
use crate::config::{self, ConfigStore};
use crate::credentials::{CredentialStore, Secret};
use crate::diagnose::check::Checker;
use crate::diagnose::doctor::{self, Status, Step};
use crate::upstream::TlsTrust;

/// Runs `doctor`: checks each step and prints it.
pub async fn run(
    config: &ConfigStore,
    keyring: Arc<dyn CredentialStore>,
    profile: &str,
) -> Result<()> {
    let report = |step: &Step| println!("{step}");
    let profile = match config.profile(&config::validate_profile_name(profile)?) {
        Ok(profile) => profile,
        Err(e) => {
            report(&Step {
                name: "config",
                status: Status::Fail,
                detail: e.to_string(),
                fix: None,
            });
            return Err(CliError::Doctor(1));
        }
    };
    println!(
        "credproxy doctor: profile '{}' -> {} as '{}'",
        profile.name, profile.server, profile.username
    );
    let login = config.login_command(&profile);
    let trust = match TlsTrust::for_profile(&profile) {
        Ok(trust) => trust,
        Err(e) => {
            report(&Step {
                name: "config",
                status: Status::Fail,
                detail: e.to_string(),
                fix: Some(login),
            });
            return Err(CliError::Doctor(1));
        }
    };
    let mut steps = vec![Step {
        name: "config",
        status: Status::Pass,
        detail: format!("{} (listen {})", config.path().display(), profile.listen),
        fix: None,
    }];
    let secret = if profile.auth.has_secret() {
        let (store, name) = (keyring.clone(), profile.name.clone());
        match blocking(move || store.get(&name)).await {
            Ok(Some(secret)) => {
                steps.push(Step {
                    name: "keyring",
                    status: Status::Pass,
                    detail: format!("secret stored for profile '{}'", profile.name),
                    fix: None,
                });
                Some(secret)
            }
            Ok(None) => {
                steps.push(Step {
                    name: "keyring",
                    status: Status::Fail,
                    detail: format!("no secret stored for profile '{}'", profile.name),
                    fix: Some(login.clone()),
                });
                None
            }
            Err(e) => {
                steps.push(Step {
                    name: "keyring",
                    status: Status::Fail,
                    detail: e.to_string(),
                    fix: None,
                });
                None
            }
        }
    } else {
        steps.push(Step {
            name: "keyring",
            status: Status::Pass,
            detail: "--auth none: no secret but the client certificate's key".to_owned(),
            fix: None,
        });
        Some(Secret::new(String::new()))
    };
    let certificate_fix = format!("{login} --client-cert FILE");
    let identity = match &profile.client_cert {
        None => None,
        Some(chain) => match super::serve::client_identity(&keyring, &profile.name, chain).await {
            Ok(identity) => {
                steps.push(doctor::client_certificate_step(
                    &identity,
                    std::time::SystemTime::now(),
                    &certificate_fix,
                ));
                Some(identity)
            }
            Err(e) => {
                steps.push(Step {
                    name: "client cert",
                    status: Status::Fail,
                    detail: e.to_string(),
                    fix: Some(certificate_fix.clone()),
                });
                None
            }
        },
    };
    steps.iter().for_each(report);
    let checker = Checker::new(
        profile.server.clone(),
        trust.client_config(&[b"http/1.1"], identity.as_ref())?,
        super::login::CHECK_TIMEOUT,
    )
    .certificate_fix(certificate_fix);
    let network = doctor::network_steps(&doctor::Target {
        checker: &checker,
        username: &profile.username,
        scheme: &profile.auth,
        secret: secret.as_ref(),
        login_command: login.clone(),
    })
    .await;
    network.iter().for_each(report);
    let mut lan_steps = Vec::new();
    if let Some(lan) = &profile.lan {
        let step = match TlsTrust::for_lan(&profile, lan)
            .and_then(|trust| trust.client_config(&[b"http/1.1"], identity.as_ref()))
        {
            Ok(tls) => {
                let checker =
                    Checker::new(profile.server.clone(), tls, super::login::CHECK_TIMEOUT)
                        .at(lan.url.clone());
                doctor::lan_step(
                    &checker,
                    &doctor::Target {
                        checker: &checker,
                        username: &profile.username,
                        scheme: &profile.auth,
                        secret: secret.as_ref(),
                        login_command: login.clone(),
                    },
                )
                .await
            }
            Err(e) => Step {
                name: "lan",
                status: Status::Fail,
                detail: e.to_string(),
                fix: Some(login.clone()),
            },
        };
        report(&step);
        lan_steps.push(step);
    }
    let running = super::running::doctor_step(config, &profile.name, &login).await;
    report(&running);
    let failed = steps
        .iter()
        .chain(&network)
        .chain(&lan_steps)
        .chain([&running])
        .filter(|s| s.status == Status::Fail)
        .count();
    if failed > 0 {
        Err(CliError::Doctor(failed))
    } else {
        println!("all checks passed");
        Ok(())
    }
}
