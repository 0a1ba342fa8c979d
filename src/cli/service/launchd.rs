//! launchd in the user's GUI domain: the agent plist for a profile, and install, uninstall
//! and status through `launchctl`.

use std::path::PathBuf;

use super::runner::{Runner, call, first_line};
use super::{
    Installed, ServiceSpec, ServiceStatus, Uninstalled, file_state, remove_file, service_path,
    write_file,
};
use crate::cli::{CliError, Result};
use crate::error::Error;

/// The launchd label of a profile's agent, e.g. `credproxy.default`.
pub fn launchd_label(profile: &str) -> String {
    format!("credproxy.{profile}")
}

/// The launchd agent plist that runs the profile's proxy at login, restarts it when it exits
/// with an error, and sends its output to `log_file`.
pub fn launchd_plist(spec: &ServiceSpec, log_file: &str) -> String {
    use plist::{Dictionary, Value};
    let mut keep_alive = Dictionary::new();
    // Restarted after an unsuccessful exit only: a clean stop stays stopped.
    keep_alive.insert("SuccessfulExit".into(), Value::Boolean(false));
    let mut agent = Dictionary::new();
    agent.insert("Label".into(), launchd_label(&spec.profile).into());
    agent.insert(
        "ProgramArguments".into(),
        Value::Array(
            spec.command_line()
                .iter()
                .map(|word| Value::from(*word))
                .collect(),
        ),
    );
    agent.insert("RunAtLoad".into(), Value::Boolean(true));
    agent.insert("KeepAlive".into(), keep_alive.into());
    agent.insert("StandardOutPath".into(), log_file.into());
    agent.insert("StandardErrorPath".into(), log_file.into());
    let mut xml = Vec::new();
    plist::to_writer_xml(&mut xml, &Value::Dictionary(agent))
        .expect("a dictionary of strings and booleans serialises to memory");
    String::from_utf8(xml).expect("an XML plist of UTF-8 strings is UTF-8")
}

/// launchd in the user's GUI domain, driven through `launchctl`, with agents in `agents_dir`.
pub struct Launchd<'a> {
    /// Where agent plists go, normally `~/Library/LaunchAgents`.
    pub agents_dir: PathBuf,
    /// Where agent logs go, normally `~/Library/Logs/credproxy`.
    pub logs_dir: PathBuf,
    /// The user's numeric id, for the `gui/UID` domain.
    pub uid: String,
    /// Runs `launchctl`.
    pub runner: &'a dyn Runner,
}

impl<'a> Launchd<'a> {
    /// The current user's directories under `~/Library` and uid (from `id -u`).
    pub fn from_env(runner: &'a dyn Runner) -> Result<Self> {
        let home = dirs::home_dir().ok_or(Error::NoConfigDir)?;
        let uid = call(runner, "id", &["-u"])
            .ok()
            .and_then(|ran| first_line(&ran.stdout))
            .ok_or_else(|| CliError::ServiceManager {
                done: "nothing changed".to_owned(),
                command: "id -u".to_owned(),
                detail: "no user id".to_owned(),
                fix: "run credproxy as a logged-in user".to_owned(),
            })?;
        Ok(Self {
            agents_dir: home.join("Library").join("LaunchAgents"),
            logs_dir: home.join("Library").join("Logs").join("credproxy"),
            uid,
            runner,
        })
    }

    fn paths(&self, profile: &str) -> (String, PathBuf, PathBuf) {
        let label = launchd_label(profile);
        let plist = self.agents_dir.join(format!("{label}.plist"));
        let log = self.logs_dir.join(format!("{profile}.log"));
        (label, plist, log)
    }

    /// Writes the plist and (re)loads it into `gui/UID`, which starts it.
    pub fn install(&self, spec: &ServiceSpec) -> Result<Installed> {
        let (label, path, log) = self.paths(&spec.profile);
        let log_text = service_path("log file path", &log)?;
        std::fs::create_dir_all(&self.logs_dir).map_err(|source| CliError::ServiceFile {
            action: "create the log directory for",
            path: log.clone(),
            source,
        })?;
        write_file(&path, &launchd_plist(spec, &log_text))?;
        let domain = format!("gui/{}", self.uid);
        // Unload an earlier version first; failing because none is loaded is fine.
        let _ = call(
            self.runner,
            "launchctl",
            &["bootout", &format!("{domain}/{label}")],
        );
        let plist = path.to_string_lossy();
        call(self.runner, "launchctl", &["bootstrap", &domain, &plist]).map_err(|detail| {
            CliError::ServiceManager {
                done: format!("wrote {}", path.display()),
                command: format!("launchctl bootstrap {domain} {plist}"),
                detail,
                fix: format!(
                    "from your logged-in session run `launchctl bootstrap {domain} {plist}`"
                ),
            }
        })?;
        Ok(Installed {
            name: label,
            path,
            logs: log_text,
            note: None,
        })
    }

    /// Unloads the agent and removes its plist.
    pub fn uninstall(&self, profile: &str) -> Result<Uninstalled> {
        let (label, path, _) = self.paths(profile);
        let target = format!("gui/{}/{label}", self.uid);
        let unloaded = call(self.runner, "launchctl", &["bootout", &target]);
        if !remove_file(&path)? && unloaded.is_err() {
            return Err(CliError::ServiceNotInstalled {
                profile: profile.to_owned(),
                path,
            });
        }
        Ok(Uninstalled {
            name: label,
            path: Some(path),
            warning: None,
        })
    }

    /// Reports whether the plist is current and whether launchd has the agent running.
    pub fn status(&self, spec: &ServiceSpec) -> Result<ServiceStatus> {
        let (label, path, log) = self.paths(&spec.profile);
        let log_text = log.to_string_lossy().into_owned();
        let file = file_state(&path, &launchd_plist(spec, &log_text))?;
        let target = format!("gui/{}/{label}", self.uid);
        let state = match call(self.runner, "launchctl", &["print", &target]) {
            Ok(ran) => Ok(ran
                .stdout
                .lines()
                .map(str::trim)
                .find_map(|line| line.strip_prefix("state = "))
                .map_or_else(|| "loaded".to_owned(), |s| format!("loaded, {s}"))),
            Err(_) => Ok("not loaded".to_owned()),
        };
        let running = matches!(&state, Ok(s) if s == "loaded, running");
        Ok(ServiceStatus {
            name: label,
            path,
            file,
            state,
            running,
            logs: log_text,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::service::FileState;
    use crate::cli::service::runner::fake::{Fake, fail, ok};
    use crate::cli::service::tests::spec;

    #[test]
    fn plist_escapes_and_lists_every_argument() {
        let plist = launchd_plist(&spec(), "/Users/u/Library/Logs/credproxy/work.log");
        assert!(plist.contains("<string>credproxy.work</string>"));
        assert!(plist.contains("<string>/opt/cred proxy/credproxy</string>"));
        assert!(
            plist.contains(
                "<string>/home/u/.config/credproxy/100%$HOME &quot;q&quot;.toml</string>"
            )
        );
        assert!(plist.contains("<key>SuccessfulExit</key>\n\t\t<false/>"));
        assert_eq!(plist.matches("work.log</string>").count(), 2);
    }

    #[test]
    fn launchd_reloads_the_agent_in_the_gui_domain() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Fake::default().answer(fail("", "Boot-out failed: 3: No such process"));
        let launchd = Launchd {
            agents_dir: dir.path().join("LaunchAgents"),
            logs_dir: dir.path().join("Logs/credproxy"),
            uid: "501".to_owned(),
            runner: &fake,
        };
        let installed = launchd.install(&spec()).unwrap();
        assert!(
            installed
                .path
                .ends_with("LaunchAgents/credproxy.work.plist")
        );
        assert_eq!(
            *fake.calls.borrow(),
            [
                "launchctl bootout gui/501/credproxy.work".to_owned(),
                format!("launchctl bootstrap gui/501 {}", installed.path.display()),
            ]
        );
        let fake = Fake::default().answer(ok("\tstate = running\n"));
        let launchd = Launchd {
            runner: &fake,
            ..launchd
        };
        let status = launchd.status(&spec()).unwrap();
        assert_eq!(status.file, FileState::Current);
        assert!(status.running);
        launchd.uninstall("work").unwrap();
        assert!(!installed.path.exists());
    }
}
