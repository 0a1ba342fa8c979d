//! The systemd user manager: the unit text for a profile, and install, uninstall and status
//! through `systemctl --user`.

use std::path::PathBuf;

use super::runner::{Ran, Runner, call, describe, first_line};
use super::{
    FileState, Installed, ServiceSpec, ServiceStatus, Uninstalled, file_state, remove_file,
    write_file,
};
use crate::cli::{CliError, Result};
use crate::error::Error;

/// The systemd unit name of a profile's service, e.g. `credproxy-default.service`.
pub fn systemd_unit_name(profile: &str) -> String {
    format!("credproxy-{profile}.service")
}

/// Quotes one `ExecStart=` word: specifiers (`%`) and variables (`$`) escaped, quoted when
/// it holds blanks, quotes or backslashes.
fn systemd_word(word: &str) -> String {
    let escaped = word.replace('%', "%%").replace('$', "$$");
    if !escaped.is_empty() && !escaped.contains(|c: char| c.is_whitespace() || "\"'\\;".contains(c))
    {
        return escaped;
    }
    let mut quoted = String::with_capacity(escaped.len() + 2);
    quoted.push('"');
    for c in escaped.chars() {
        if matches!(c, '"' | '\\') {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted
}

/// The systemd user unit that runs the profile's proxy, restarting it when it fails.
pub fn systemd_unit(spec: &ServiceSpec) -> String {
    let exec = spec
        .command_line()
        .iter()
        .map(|word| systemd_word(word))
        .collect::<Vec<_>>()
        .join(" ");
    let profile = &spec.profile;
    format!(
        "\
# Written by `credproxy service install --profile {profile}`: run it again after moving the
# binary or the config file; remove with `credproxy service uninstall --profile {profile}`.
[Unit]
Description=credproxy: Authentik credentials for Immich (profile {profile})
# Only some user managers have this target (it is a system unit); where it is missing these
# lines do nothing and Restart= below covers a network that comes up late.
Wants=network-online.target
After=network-online.target

[Service]
Type=exec
ExecStart={exec}
# `systemctl --user reload`: read the config file and the credentials again, no restart.
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=5s
# Hardening built on seccomp and no_new_privs only: user managers often cannot create the
# namespaces that ProtectSystem=, ProtectHome=, PrivateTmp= or PrivateUsers= need, and
# ProtectHome= would hide /run/user/UID/bus, PrivateNetwork= abstract-socket buses, and a
# RestrictAddressFamilies= without AF_UNIX the session bus: the Secret Service lives there.
NoNewPrivileges=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
RestrictNamespaces=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM
UMask=0077

[Install]
WantedBy=default.target
"
    )
}

/// Where the Debian package installs its unit template (instance = profile).
pub const PACKAGED_TEMPLATE: &str = "/usr/lib/systemd/user/credproxy@.service";

/// Where the README has the release archive's copy of the template installed.
pub const ARCHIVE_TEMPLATE: &str = "/usr/local/lib/systemd/user/credproxy@.service";

/// The unit a profile gets from the package's template, e.g. `credproxy@default.service`.
pub fn packaged_unit_name(profile: &str) -> String {
    format!("credproxy@{profile}.service")
}

/// The systemd user manager, driven through `systemctl --user`, with unit files in `dir`.
pub struct Systemd<'a> {
    /// Where unit files go, normally `$XDG_CONFIG_HOME/systemd/user`.
    pub dir: PathBuf,
    /// The package's unit template ([`PACKAGED_TEMPLATE`] or [`ARCHIVE_TEMPLATE`]); a path
    /// that does not exist when neither is installed.
    pub packaged: PathBuf,
    /// Runs `systemctl`.
    pub runner: &'a dyn Runner,
}

impl<'a> Systemd<'a> {
    /// The user's unit directory: `$XDG_CONFIG_HOME/systemd/user` (default `~/.config/...`).
    pub fn from_env(runner: &'a dyn Runner) -> Result<Self> {
        let dir = dirs::config_dir()
            .ok_or(Error::NoConfigDir)?
            .join("systemd")
            .join("user");
        let packaged = [PACKAGED_TEMPLATE, ARCHIVE_TEMPLATE]
            .into_iter()
            .map(PathBuf::from)
            .find(|path| path.exists())
            .unwrap_or_else(|| PathBuf::from(PACKAGED_TEMPLATE));
        Ok(Self {
            dir,
            packaged,
            runner,
        })
    }

    fn systemctl(&self, args: &[&str]) -> std::result::Result<Ran, String> {
        let mut all = vec!["--user", "--no-pager"];
        all.extend_from_slice(args);
        call(self.runner, "systemctl", &all)
    }

    /// Asks a one-word question (`is-active`, `is-enabled`) whose answer comes on stdout
    /// whatever the exit status.
    fn ask(&self, verb: &str, unit: &str) -> std::result::Result<String, String> {
        match self
            .runner
            .run("systemctl", &["--user", "--no-pager", verb, unit])
        {
            Ok(ran) => first_line(&ran.stdout)
                .ok_or_else(|| first_line(&ran.stderr).unwrap_or_else(|| "no answer".to_owned())),
            Err(e) => Err(describe("systemctl", &e)),
        }
    }

    /// The program the package's template runs, when the package is installed.
    fn packaged_program(&self) -> Option<String> {
        let text = std::fs::read_to_string(&self.packaged).ok()?;
        let exec = text
            .lines()
            .find_map(|line| line.trim().strip_prefix("ExecStart="))?;
        exec.split_whitespace().next().map(str::to_owned)
    }

    /// Whether the package's template can serve `spec` as it stands: same binary, and the
    /// default config file (the template names none).
    fn template_serves(&self, spec: &ServiceSpec) -> bool {
        spec.default_config && self.packaged_program().as_deref() == Some(spec.exe.as_str())
    }

    /// Enables and (re)starts the profile's service: the package's unit when it runs this
    /// binary on the default config (so upgrades of the package carry it), else a unit of
    /// credproxy's own for this binary and config file. Either way the other one is stopped:
    /// two proxies for one profile would fight over its port.
    pub fn install(&self, spec: &ServiceSpec) -> Result<Installed> {
        if self.template_serves(spec) {
            return self.install_packaged(spec);
        }
        let name = systemd_unit_name(&spec.profile);
        let path = self.dir.join(&name);
        write_file(&path, &systemd_unit(spec))?;
        let packaged = self
            .packaged
            .exists()
            .then(|| packaged_unit_name(&spec.profile));
        let mut steps: Vec<Vec<&str>> = vec![vec!["daemon-reload"]];
        if let Some(instance) = &packaged {
            steps.push(vec!["disable", "--now", instance]);
        }
        steps.push(vec!["enable", &name]);
        steps.push(vec!["restart", &name]);
        self.run_steps(&steps, &format!("wrote {}", path.display()), || {
            format!(
                "the systemd user manager is reached over your login session's bus; from a \
                 login session run `systemctl --user daemon-reload && systemctl --user enable \
                 {name} && systemctl --user restart {name}`"
            )
        })?;
        let note = packaged.map(|instance| {
            format!(
                "the package's unit {instance} was not used: it runs {} on the default config \
                 file, this service runs {} with {}",
                self.packaged_program().unwrap_or_default(),
                spec.exe,
                spec.config
            )
        });
        Ok(Installed {
            logs: format!("journalctl --user -u {name}"),
            name,
            path,
            note,
        })
    }

    /// `install` through the package's template: removes a unit credproxy wrote earlier for
    /// the profile, then enables and (re)starts `credproxy@PROFILE`.
    fn install_packaged(&self, spec: &ServiceSpec) -> Result<Installed> {
        let instance = packaged_unit_name(&spec.profile);
        let own_name = systemd_unit_name(&spec.profile);
        let own = self.dir.join(&own_name);
        let mut done = "nothing changed".to_owned();
        let mut steps: Vec<Vec<&str>> = Vec::new();
        if own.exists() {
            // Stopped before its file goes, so the manager still knows what to stop; a
            // manager that cannot be reached fails the enable below with the fix.
            let _ = self.systemctl(&["disable", "--now", &own_name]);
            remove_file(&own)?;
            remove_file(&self.dir.join("default.target.wants").join(&own_name))?;
            done = format!("removed the earlier unit {}", own.display());
            steps.push(vec!["daemon-reload"]);
        }
        steps.push(vec!["enable", &instance]);
        steps.push(vec!["restart", &instance]);
        self.run_steps(&steps, &done, || {
            format!(
                "the systemd user manager is reached over your login session's bus; from a \
                 login session run `systemctl --user enable --now {instance}`"
            )
        })?;
        Ok(Installed {
            logs: format!("journalctl --user -u {instance}"),
            note: Some(format!(
                "this is the package's unit, the same as `systemctl --user enable --now {instance}`"
            )),
            name: instance,
            path: self.packaged.clone(),
        })
    }

    /// Runs `systemctl --user` steps in order, stopping at the first failure with `fix`.
    fn run_steps(&self, steps: &[Vec<&str>], done: &str, fix: impl Fn() -> String) -> Result<()> {
        for step in steps {
            self.systemctl(step)
                .map_err(|detail| CliError::ServiceManager {
                    done: done.to_owned(),
                    command: format!("systemctl --user {}", step.join(" ")),
                    detail,
                    fix: fix(),
                })?;
        }
        Ok(())
    }

    /// Stops and disables the profile's service: the package's unit if it is enabled, and
    /// credproxy's own unit, whose file goes too. An unreachable manager is only a warning
    /// for the own unit, since nothing can start it once its file is gone.
    pub fn uninstall(&self, profile: &str) -> Result<Uninstalled> {
        let name = systemd_unit_name(profile);
        let path = self.dir.join(&name);
        let had_file = path.exists();
        if self.packaged.exists() {
            let instance = packaged_unit_name(profile);
            if self.ask("is-enabled", &instance).as_deref() == Ok("enabled") {
                self.systemctl(&["disable", "--now", &instance])
                    .map_err(|detail| CliError::ServiceManager {
                        done: "nothing changed".to_owned(),
                        command: format!("systemctl --user disable --now {instance}"),
                        detail,
                        fix: format!(
                            "from a login session run `systemctl --user disable --now {instance}`"
                        ),
                    })?;
                if !had_file {
                    return Ok(Uninstalled {
                        name: instance,
                        path: None,
                        warning: None,
                    });
                }
            }
        }
        let stopped = self.systemctl(&["disable", "--now", &name]);
        if !had_file && stopped.is_err() {
            return Err(CliError::ServiceNotInstalled {
                profile: profile.to_owned(),
                path,
            });
        }
        remove_file(&path)?;
        // `disable` removes this link; do it ourselves when the manager could not.
        remove_file(&self.dir.join("default.target.wants").join(&name))?;
        let reloaded = self.systemctl(&["daemon-reload"]);
        let warning = match stopped.and(reloaded) {
            Ok(_) => None,
            Err(detail) => Some(format!(
                "could not reach the systemd user manager ({detail}); if the proxy still runs, \
                 from a login session run `systemctl --user stop {name} && systemctl --user \
                 daemon-reload`"
            )),
        };
        Ok(Uninstalled {
            name,
            path: Some(path),
            warning,
        })
    }

    /// Reports whether the unit file is current and whether the manager has it enabled and
    /// active: credproxy's own unit when there is one, else the package's for the profile.
    pub fn status(&self, spec: &ServiceSpec) -> Result<ServiceStatus> {
        let own_name = systemd_unit_name(&spec.profile);
        let own = self.dir.join(&own_name);
        let (name, path, file) = match file_state(&own, &systemd_unit(spec))? {
            FileState::Missing if self.packaged.exists() => (
                packaged_unit_name(&spec.profile),
                self.packaged.clone(),
                FileState::Packaged,
            ),
            file => (own_name, own, file),
        };
        let state = self
            .ask("is-enabled", &name)
            .and_then(|enabled| Ok(format!("{enabled}, {}", self.ask("is-active", &name)?)));
        let running = matches!(&state, Ok(s) if s.ends_with(", active"));
        Ok(ServiceStatus {
            logs: format!("journalctl --user -u {name}"),
            name,
            path,
            file,
            state,
            running,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::service::runner::fake::{Fake, fail, ok};
    use crate::cli::service::tests::spec;
    use std::io;
    use std::path::Path;

    #[test]
    fn unit_runs_serve_with_absolute_paths_quoted_and_escaped() {
        let unit = systemd_unit(&spec());
        assert!(unit.contains(
            "\nExecStart=\"/opt/cred proxy/credproxy\" --config \
             \"/home/u/.config/credproxy/100%%$$HOME \\\"q\\\".toml\" serve --profile work\n"
        ));
        for line in [
            "Restart=on-failure",
            "ExecReload=/bin/kill -HUP $MAINPID",
            "After=network-online.target",
            "Wants=network-online.target",
            "WantedBy=default.target",
            "NoNewPrivileges=yes",
        ] {
            assert!(unit.lines().any(|l| l == line), "{line}");
        }
        // Directives that would cut the proxy off the session bus (and so the keyring) or
        // need namespaces a user manager may lack.
        for forbidden in [
            "ProtectHome=",
            "PrivateNetwork=",
            "PrivateUsers=",
            "PrivateTmp=",
            "ProtectSystem=",
        ] {
            assert!(
                !unit.lines().any(|l| l.starts_with(forbidden)),
                "{forbidden}"
            );
        }
        let families = unit
            .lines()
            .find_map(|l| l.strip_prefix("RestrictAddressFamilies="))
            .unwrap();
        assert!(families.split(' ').any(|f| f == "AF_UNIX"));
    }

    #[test]
    fn plain_words_stay_unquoted() {
        assert_eq!(systemd_word("/usr/bin/credproxy"), "/usr/bin/credproxy");
        assert_eq!(systemd_word("a b"), "\"a b\"");
        assert_eq!(systemd_word("back\\slash"), "\"back\\\\slash\"");
        assert_eq!(systemd_word(""), "\"\"");
    }

    #[test]
    fn install_writes_reloads_enables_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Fake::default();
        let systemd = Systemd {
            dir: dir.path().join("systemd/user"),
            packaged: dir.path().join("no-package/credproxy@.service"),
            runner: &fake,
        };
        let installed = systemd.install(&spec()).unwrap();
        assert_eq!(installed.name, "credproxy-work.service");
        assert_eq!(
            std::fs::read_to_string(&installed.path).unwrap(),
            systemd_unit(&spec())
        );
        assert_eq!(
            *fake.calls.borrow(),
            [
                "systemctl --user --no-pager daemon-reload",
                "systemctl --user --no-pager enable credproxy-work.service",
                "systemctl --user --no-pager restart credproxy-work.service",
            ]
        );
    }

    #[test]
    fn install_without_a_user_manager_keeps_the_file_and_says_what_to_run() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Fake::default().answer(fail("", "Failed to connect to bus: No medium found\n"));
        let systemd = Systemd {
            dir: dir.path().to_owned(),
            packaged: dir.path().join("no-package/credproxy@.service"),
            runner: &fake,
        };
        let message = systemd.install(&spec()).unwrap_err().to_string();
        assert!(dir.path().join("credproxy-work.service").exists());
        assert!(message.contains("No medium found"), "{message}");
        assert!(
            message.contains("systemctl --user enable credproxy-work.service"),
            "{message}"
        );
        assert_eq!(fake.calls.borrow().len(), 1, "stops at the first failure");
    }

    #[test]
    fn missing_systemctl_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Fake::default().answer(Err(io::ErrorKind::NotFound.into()));
        let systemd = Systemd {
            dir: dir.path().to_owned(),
            packaged: dir.path().join("no-package/credproxy@.service"),
            runner: &fake,
        };
        let message = systemd.install(&spec()).unwrap_err().to_string();
        assert!(message.contains("systemctl is not installed"), "{message}");
    }

    #[test]
    fn uninstall_disables_removes_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Fake::default();
        let systemd = Systemd {
            dir: dir.path().to_owned(),
            packaged: dir.path().join("no-package/credproxy@.service"),
            runner: &fake,
        };
        systemd.install(&spec()).unwrap();
        fake.calls.borrow_mut().clear();
        let done = systemd.uninstall("work").unwrap();
        assert!(!done.path.unwrap().exists());
        assert_eq!(done.warning, None);
        assert_eq!(
            *fake.calls.borrow(),
            [
                "systemctl --user --no-pager disable --now credproxy-work.service",
                "systemctl --user --no-pager daemon-reload",
            ]
        );
        // Nothing left: a second uninstall says so.
        let fake =
            Fake::default().answer(fail("", "Unit file credproxy-work.service does not exist."));
        let systemd = Systemd {
            dir: dir.path().to_owned(),
            packaged: dir.path().join("no-package/credproxy@.service"),
            runner: &fake,
        };
        assert!(matches!(
            systemd.uninstall("work"),
            Err(CliError::ServiceNotInstalled { .. })
        ));
    }

    #[test]
    fn uninstall_without_a_manager_removes_the_file_and_the_link_and_warns() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("credproxy-work.service"), "x").unwrap();
        let wants = dir.path().join("default.target.wants");
        std::fs::create_dir(&wants).unwrap();
        std::fs::write(wants.join("credproxy-work.service"), "x").unwrap();
        let fake = Fake::default()
            .answer(fail("", "Failed to connect to bus"))
            .answer(fail("", "Failed to connect to bus"));
        let systemd = Systemd {
            dir: dir.path().to_owned(),
            packaged: dir.path().join("no-package/credproxy@.service"),
            runner: &fake,
        };
        let done = systemd.uninstall("work").unwrap();
        assert!(!done.path.unwrap().exists());
        assert!(!wants.join("credproxy-work.service").exists());
        assert!(done.warning.unwrap().contains("Failed to connect to bus"));
    }

    #[test]
    fn status_reads_the_answers_whatever_the_exit_code() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Fake::default();
        let systemd = Systemd {
            dir: dir.path().to_owned(),
            packaged: dir.path().join("no-package/credproxy@.service"),
            runner: &fake,
        };
        systemd.install(&spec()).unwrap();
        let fake = Fake::default()
            .answer(ok("enabled\n"))
            .answer(fail("inactive\n", ""));
        let systemd = Systemd {
            dir: dir.path().to_owned(),
            packaged: dir.path().join("no-package/credproxy@.service"),
            runner: &fake,
        };
        let status = systemd.status(&spec()).unwrap();
        assert_eq!(status.file, FileState::Current);
        assert_eq!(status.state, Ok("enabled, inactive".to_owned()));
        assert!(!status.running);

        let other = ServiceSpec::new(
            "work",
            Path::new("/usr/bin/credproxy"),
            Path::new("/c.toml"),
        )
        .unwrap();
        let fake = Fake::default()
            .answer(ok("enabled\n"))
            .answer(ok("active\n"));
        let systemd = Systemd {
            dir: dir.path().to_owned(),
            packaged: dir.path().join("no-package/credproxy@.service"),
            runner: &fake,
        };
        let status = systemd.status(&other).unwrap();
        assert_eq!(status.file, FileState::Stale);
        assert!(status.running);

        let fake = Fake::default().answer(fail("", "Failed to connect to bus: No medium found"));
        let systemd = Systemd {
            dir: dir.path().to_owned(),
            packaged: dir.path().join("no-package/credproxy@.service"),
            runner: &fake,
        };
        let status = systemd.status(&spec()).unwrap();
        assert_eq!(
            status.state,
            Err("Failed to connect to bus: No medium found".to_owned())
        );
        assert!(!status.running);
    }

    /// A home with the package's template installed, and the spec of the packaged binary
    /// on the default config.
    fn packaged_home() -> (tempfile::TempDir, PathBuf, ServiceSpec) {
        let dir = tempfile::tempdir().unwrap();
        let template = dir.path().join("usr-lib/credproxy@.service");
        std::fs::create_dir_all(template.parent().unwrap()).unwrap();
        std::fs::write(
            &template,
            "[Service]\nExecStart=/usr/bin/credproxy serve --profile %i\n",
        )
        .unwrap();
        let spec = ServiceSpec::new(
            "work",
            Path::new("/usr/bin/credproxy"),
            Path::new("/home/u/.config/credproxy/config.toml"),
        )
        .unwrap()
        .with_default_config(true);
        (dir, template, spec)
    }

    #[test]
    fn install_of_the_packaged_binary_enables_the_package_unit_and_drops_an_older_own_one() {
        let (dir, template, spec) = packaged_home();
        let units = dir.path().join("systemd/user");
        std::fs::create_dir_all(units.join("default.target.wants")).unwrap();
        std::fs::write(units.join("credproxy-work.service"), "old").unwrap();
        std::fs::write(
            units.join("default.target.wants/credproxy-work.service"),
            "old",
        )
        .unwrap();
        let fake = Fake::default();
        let systemd = Systemd {
            dir: units.clone(),
            packaged: template.clone(),
            runner: &fake,
        };
        let installed = systemd.install(&spec).unwrap();
        assert_eq!(installed.name, "credproxy@work.service");
        assert_eq!(installed.path, template);
        assert!(
            installed
                .note
                .unwrap()
                .contains("systemctl --user enable --now credproxy@work.service")
        );
        assert_eq!(
            *fake.calls.borrow(),
            [
                "systemctl --user --no-pager disable --now credproxy-work.service",
                "systemctl --user --no-pager daemon-reload",
                "systemctl --user --no-pager enable credproxy@work.service",
                "systemctl --user --no-pager restart credproxy@work.service",
            ]
        );
        assert!(!units.join("credproxy-work.service").exists());
        assert!(
            !units
                .join("default.target.wants/credproxy-work.service")
                .exists()
        );

        // Status then reports the package's unit.
        let fake = Fake::default()
            .answer(ok("enabled\n"))
            .answer(ok("active\n"));
        let systemd = Systemd {
            runner: &fake,
            ..systemd
        };
        let status = systemd.status(&spec).unwrap();
        assert_eq!(status.file, FileState::Packaged);
        assert_eq!(status.name, "credproxy@work.service");
        assert!(status.running);
        assert_eq!(
            *fake.calls.borrow(),
            [
                "systemctl --user --no-pager is-enabled credproxy@work.service",
                "systemctl --user --no-pager is-active credproxy@work.service",
            ]
        );
    }

    #[test]
    fn install_without_the_package_unit_reached_says_what_to_run() {
        let (dir, template, spec) = packaged_home();
        let fake = Fake::default().answer(fail("", "Failed to connect to bus: No medium found"));
        let systemd = Systemd {
            dir: dir.path().join("systemd/user"),
            packaged: template,
            runner: &fake,
        };
        let message = systemd.install(&spec).unwrap_err().to_string();
        assert!(message.contains("No medium found"), "{message}");
        assert!(
            message.contains("systemctl --user enable --now credproxy@work.service"),
            "{message}"
        );
        assert!(!dir.path().join("systemd/user").exists(), "wrote nothing");
    }

    #[test]
    fn another_binary_or_config_gets_its_own_unit_and_the_package_unit_is_stopped() {
        let (dir, template, packaged_spec) = packaged_home();
        let other_config = ServiceSpec::new(
            "work",
            Path::new("/usr/bin/credproxy"),
            Path::new("/srv/credproxy.toml"),
        )
        .unwrap();
        for spec in [spec(), other_config] {
            let fake = Fake::default();
            let systemd = Systemd {
                dir: dir.path().join("systemd/user"),
                packaged: template.clone(),
                runner: &fake,
            };
            let installed = systemd.install(&spec).unwrap();
            assert_eq!(installed.name, "credproxy-work.service");
            assert_eq!(
                std::fs::read_to_string(&installed.path).unwrap(),
                systemd_unit(&spec)
            );
            let note = installed.note.unwrap();
            assert!(
                note.contains("credproxy@work.service was not used"),
                "{note}"
            );
            assert!(note.contains(&spec.config), "{note}");
            assert_eq!(
                *fake.calls.borrow(),
                [
                    "systemctl --user --no-pager daemon-reload",
                    "systemctl --user --no-pager disable --now credproxy@work.service",
                    "systemctl --user --no-pager enable credproxy-work.service",
                    "systemctl --user --no-pager restart credproxy-work.service",
                ]
            );
        }
        // Without the package installed, the packaged spec gets a unit of its own too.
        let fake = Fake::default();
        let systemd = Systemd {
            dir: dir.path().join("systemd/user"),
            packaged: dir.path().join("nowhere/credproxy@.service"),
            runner: &fake,
        };
        let installed = systemd.install(&packaged_spec).unwrap();
        assert_eq!(installed.name, "credproxy-work.service");
        assert_eq!(installed.note, None);
    }

    #[test]
    fn uninstall_disables_an_enabled_package_unit_and_keeps_its_file() {
        let (dir, template, _) = packaged_home();
        let fake = Fake::default().answer(ok("enabled\n"));
        let systemd = Systemd {
            dir: dir.path().join("systemd/user"),
            packaged: template.clone(),
            runner: &fake,
        };
        let done = systemd.uninstall("work").unwrap();
        assert_eq!(done.name, "credproxy@work.service");
        assert_eq!(done.path, None);
        assert!(template.exists());
        assert_eq!(
            *fake.calls.borrow(),
            [
                "systemctl --user --no-pager is-enabled credproxy@work.service",
                "systemctl --user --no-pager disable --now credproxy@work.service",
            ]
        );
        // Neither enabled nor a unit of our own: nothing is installed.
        let fake = Fake::default()
            .answer(fail("disabled\n", ""))
            .answer(fail("", "Unit file credproxy-work.service does not exist."));
        let systemd = Systemd {
            runner: &fake,
            ..systemd
        };
        assert!(matches!(
            systemd.uninstall("work"),
            Err(CliError::ServiceNotInstalled { .. })
        ));
    }
}
