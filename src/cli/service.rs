//! `credproxy service`: running `credproxy serve` at logon, as a systemd user unit on Linux or
//! a launchd agent on macOS.
//!
//! The unit and plist texts come from pure functions; installing, removing and querying go
//! through a [`Runner`] so tests drive them with a fake and never call the real managers.

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::args::ServiceAction;
use super::{CliError, Result};
use crate::config::{self, ConfigStore};
use crate::error::Error;

/// How long one `systemctl`/`launchctl` call may take before credproxy stops waiting for it.
pub const MANAGER_TIMEOUT: Duration = Duration::from_secs(30);

/// What a service runs: `credproxy --config CONFIG serve --profile PROFILE`, all validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    profile: String,
    exe: String,
    config: String,
}

impl ServiceSpec {
    /// Validates the profile name and that both paths are absolute, UTF-8 and one line each.
    pub fn new(profile: &str, exe: &Path, config: &Path) -> Result<Self> {
        Ok(Self {
            profile: config::validate_profile_name(profile)?,
            exe: service_path("executable path", exe)?,
            config: service_path("config file path", config)?,
        })
    }

    /// The profile the service serves.
    pub fn profile(&self) -> &str {
        &self.profile
    }

    /// The full command line, executable first.
    pub fn command_line(&self) -> [&str; 6] {
        [
            &self.exe,
            "--config",
            &self.config,
            "serve",
            "--profile",
            &self.profile,
        ]
    }
}

fn service_path(what: &'static str, path: &Path) -> Result<String> {
    let invalid = |reason: String| CliError::from(Error::Invalid { what, reason });
    if !path.is_absolute() {
        return Err(invalid(format!("{} is not absolute", path.display())));
    }
    let text = path.to_str().ok_or_else(|| {
        invalid(format!(
            "{} is not valid UTF-8; move it to a plain path",
            path.display()
        ))
    })?;
    if text.chars().any(char::is_control) {
        return Err(invalid(format!(
            "{text:?} contains control characters; move it to a plain path"
        )));
    }
    Ok(text.to_owned())
}

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

/// What one call to a service manager's program printed and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ran {
    /// Whether it exited with status 0.
    pub success: bool,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

/// Runs service-manager programs; the seam through which tests replace the real ones.
pub trait Runner {
    /// Runs `program` with `args`, no stdin, and collects its output.
    fn run(&self, program: &str, args: &[&str]) -> io::Result<Ran>;
}

/// Runs programs for real, giving up on one that has not finished after a timeout.
#[derive(Debug, Clone, Copy)]
pub struct SystemRunner {
    /// How long one program may run.
    pub timeout: Duration,
}

impl Default for SystemRunner {
    fn default() -> Self {
        Self {
            timeout: MANAGER_TIMEOUT,
        }
    }
}

impl Runner for SystemRunner {
    fn run(&self, program: &str, args: &[&str]) -> io::Result<Ran> {
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // A thread rather than the async runtime: a wedged manager must not keep the process
        // alive at exit, and a detached thread does not.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(command.output());
        });
        let output = rx.recv_timeout(self.timeout).map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {} s", self.timeout.as_secs()),
            )
        })??;
        Ok(Ran {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}

/// Runs `program args`; `Err` is a one-line reason fit for an error message.
fn call(runner: &dyn Runner, program: &str, args: &[&str]) -> std::result::Result<Ran, String> {
    match runner.run(program, args) {
        Ok(ran) if ran.success => Ok(ran),
        Ok(ran) => Err(first_line(&ran.stderr)
            .or_else(|| first_line(&ran.stdout))
            .unwrap_or_else(|| "it exited with an error".to_owned())),
        Err(e) => Err(describe(program, &e)),
    }
}

/// Why a program could not be run, in one line.
fn describe(program: &str, error: &io::Error) -> String {
    if error.kind() == io::ErrorKind::NotFound {
        format!("{program} is not installed or not on PATH")
    } else {
        format!("cannot run {program}: {error}")
    }
}

fn first_line(text: &str) -> Option<String> {
    text.lines()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .map(str::to_owned)
}

/// Whether a service file matches what `install` would write now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileState {
    /// No file.
    Missing,
    /// The file is what `install` writes for this binary and config.
    Current,
    /// The file differs (another binary or config path, or an older credproxy).
    Stale,
}

/// What `install` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// The unit name or launchd label.
    pub name: String,
    /// The file written.
    pub path: PathBuf,
    /// Where the service's log goes, as a command or a path.
    pub logs: String,
}

/// What `uninstall` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uninstalled {
    /// The unit name or launchd label.
    pub name: String,
    /// The file removed.
    pub path: PathBuf,
    /// Something the user may still have to do by hand.
    pub warning: Option<String>,
}

/// What `status` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceStatus {
    /// The unit name or launchd label.
    pub name: String,
    /// The service file.
    pub path: PathBuf,
    /// Whether the file is there and current.
    pub file: FileState,
    /// The manager's view (e.g. `enabled, active`), or why it could not be asked.
    pub state: std::result::Result<String, String>,
    /// Whether the proxy is running.
    pub running: bool,
    /// Where the service's log goes, as a command or a path.
    pub logs: String,
}

fn file_state(path: &Path, expected: &str) -> Result<FileState> {
    match std::fs::read_to_string(path) {
        Ok(text) if text == expected => Ok(FileState::Current),
        Ok(_) => Ok(FileState::Stale),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(FileState::Missing),
        Err(source) => Err(CliError::ServiceFile {
            action: "read",
            path: path.to_owned(),
            source,
        }),
    }
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    let file_error = |action, source| CliError::ServiceFile {
        action,
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| file_error("create the directory of", e))?;
    }
    std::fs::write(path, text).map_err(|e| file_error("write", e))
}

/// Removes a file or symlink; false when there was none.
fn remove_file(path: &Path) -> Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(CliError::ServiceFile {
            action: "remove",
            path: path.to_owned(),
            source,
        }),
    }
}

/// The systemd user manager, driven through `systemctl --user`, with unit files in `dir`.
pub struct Systemd<'a> {
    /// Where unit files go, normally `$XDG_CONFIG_HOME/systemd/user`.
    pub dir: PathBuf,
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
        Ok(Self { dir, runner })
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

    /// Writes the unit, reloads the manager, enables the unit and (re)starts it, so a second
    /// install picks up a new binary or config path.
    pub fn install(&self, spec: &ServiceSpec) -> Result<Installed> {
        let name = systemd_unit_name(&spec.profile);
        let path = self.dir.join(&name);
        write_file(&path, &systemd_unit(spec))?;
        let steps: [&[&str]; 3] = [&["daemon-reload"], &["enable", &name], &["restart", &name]];
        for step in steps {
            self.systemctl(step)
                .map_err(|detail| CliError::ServiceManager {
                    done: format!("wrote {}", path.display()),
                    command: format!("systemctl --user {}", step.join(" ")),
                    detail,
                    fix: format!(
                        "the systemd user manager is reached over your login session's bus; from a \
                     login session run `systemctl --user daemon-reload && systemctl --user enable \
                     {name} && systemctl --user restart {name}`"
                    ),
                })?;
        }
        Ok(Installed {
            logs: format!("journalctl --user -u {name}"),
            name,
            path,
        })
    }

    /// Stops and disables the unit and removes its file; an unreachable manager is a warning,
    /// since nothing can start the unit once its file is gone.
    pub fn uninstall(&self, profile: &str) -> Result<Uninstalled> {
        let name = systemd_unit_name(profile);
        let path = self.dir.join(&name);
        let had_file = path.exists();
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
            path,
            warning,
        })
    }

    /// Reports whether the unit file is current and whether the manager has it enabled and
    /// active.
    pub fn status(&self, spec: &ServiceSpec) -> Result<ServiceStatus> {
        let name = systemd_unit_name(&spec.profile);
        let path = self.dir.join(&name);
        let file = file_state(&path, &systemd_unit(spec))?;
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
            path,
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

/// Installs and starts the profile's service with this platform's service manager.
pub fn install(spec: &ServiceSpec) -> Result<Installed> {
    platform(|manager| manager.install(spec))
}

/// Stops and removes the profile's service.
pub fn uninstall(profile: &str) -> Result<Uninstalled> {
    platform(|manager| manager.uninstall(profile))
}

/// Reports the profile's service as `install` would write it for `spec`.
pub fn status(spec: &ServiceSpec) -> Result<ServiceStatus> {
    platform(|manager| manager.status(spec))
}

/// The three operations, whichever the manager.
trait Manager {
    fn install(&self, spec: &ServiceSpec) -> Result<Installed>;
    fn uninstall(&self, profile: &str) -> Result<Uninstalled>;
    fn status(&self, spec: &ServiceSpec) -> Result<ServiceStatus>;
}

impl Manager for Systemd<'_> {
    fn install(&self, spec: &ServiceSpec) -> Result<Installed> {
        Systemd::install(self, spec)
    }
    fn uninstall(&self, profile: &str) -> Result<Uninstalled> {
        Systemd::uninstall(self, profile)
    }
    fn status(&self, spec: &ServiceSpec) -> Result<ServiceStatus> {
        Systemd::status(self, spec)
    }
}

impl Manager for Launchd<'_> {
    fn install(&self, spec: &ServiceSpec) -> Result<Installed> {
        Launchd::install(self, spec)
    }
    fn uninstall(&self, profile: &str) -> Result<Uninstalled> {
        Launchd::uninstall(self, profile)
    }
    fn status(&self, spec: &ServiceSpec) -> Result<ServiceStatus> {
        Launchd::status(self, spec)
    }
}

#[cfg(target_os = "linux")]
fn platform<T>(op: impl FnOnce(&dyn Manager) -> Result<T>) -> Result<T> {
    op(&Systemd::from_env(&SystemRunner::default())?)
}

#[cfg(target_os = "macos")]
fn platform<T>(op: impl FnOnce(&dyn Manager) -> Result<T>) -> Result<T> {
    op(&Launchd::from_env(&SystemRunner::default())?)
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn platform<T>(_op: impl FnOnce(&dyn Manager) -> Result<T>) -> Result<T> {
    Err(CliError::ServiceUnsupported {
        os: std::env::consts::OS,
    })
}

/// The service definition for a profile: this executable, this config file, both absolute.
fn service_spec(config: &ConfigStore, profile: &str) -> Result<ServiceSpec> {
    let exe = std::env::current_exe().map_err(|e| Error::Invalid {
        what: "executable path",
        reason: format!("cannot find this program's own path: {e}"),
    })?;
    let config_path = std::path::absolute(config.path()).map_err(|e| Error::Invalid {
        what: "config file path",
        reason: format!("{}: {e}", config.path().display()),
    })?;
    ServiceSpec::new(profile, &exe, &config_path)
}

/// `service install|uninstall|status`: the profile's proxy as a service started at logon.
pub fn run(config: &ConfigStore, action: ServiceAction) -> Result<()> {
    match action {
        ServiceAction::Install(args) => {
            let name = config::validate_profile_name(&args.profile)?;
            // A service for a profile that does not exist would only fail at every start.
            config.profile(&name)?;
            let installed = install(&service_spec(config, &name)?)?;
            eprintln!(
                "credproxy: installed and started {} ({}); it starts at every logon; logs: {}",
                installed.name,
                installed.path.display(),
                installed.logs
            );
            Ok(())
        }
        ServiceAction::Uninstall(args) => {
            let name = config::validate_profile_name(&args.profile)?;
            let removed = uninstall(&name)?;
            eprintln!(
                "credproxy: stopped {} and removed {}",
                removed.name,
                removed.path.display()
            );
            if let Some(warning) = removed.warning {
                eprintln!("credproxy: warning: {warning}");
            }
            Ok(())
        }
        ServiceAction::Status(args) => {
            let name = config::validate_profile_name(&args.profile)?;
            let status = status(&service_spec(config, &name)?)?;
            let file = match status.file {
                FileState::Missing => "not installed",
                FileState::Current => "installed",
                FileState::Stale => {
                    "installed, but for another binary or config file: run `credproxy service install` again"
                }
            };
            let state = match &status.state {
                Ok(state) => state.clone(),
                Err(reason) => format!("unknown ({reason})"),
            };
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "service: {}", status.name);
            let _ = writeln!(out, "file:    {} ({file})", status.path.display());
            let _ = writeln!(out, "state:   {state}");
            let _ = writeln!(out, "logs:    {}", status.logs);
            drop(out);
            if status.file == FileState::Missing && !status.running {
                Err(CliError::ServiceNotInstalled {
                    profile: name,
                    path: status.path,
                })
            } else if !status.running {
                Err(CliError::ServiceNotRunning {
                    name: status.name,
                    state,
                    fix: format!(
                        "see why in `{}`; start it with `credproxy service install --profile {name}`",
                        status.logs
                    ),
                })
            } else {
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::VecDeque;

    fn spec() -> ServiceSpec {
        ServiceSpec::new(
            "work",
            Path::new("/opt/cred proxy/credproxy"),
            Path::new("/home/u/.config/credproxy/100%$HOME \"q\".toml"),
        )
        .unwrap()
    }

    /// Records calls and answers them from a script (default: success, no output).
    #[derive(Default)]
    struct Fake {
        calls: RefCell<Vec<String>>,
        answers: RefCell<VecDeque<io::Result<Ran>>>,
    }

    impl Fake {
        fn answer(self, ran: io::Result<Ran>) -> Self {
            self.answers.borrow_mut().push_back(ran);
            self
        }
    }

    fn ok(stdout: &str) -> io::Result<Ran> {
        Ok(Ran {
            success: true,
            stdout: stdout.to_owned(),
            stderr: String::new(),
        })
    }

    fn fail(stdout: &str, stderr: &str) -> io::Result<Ran> {
        Ok(Ran {
            success: false,
            stdout: stdout.to_owned(),
            stderr: stderr.to_owned(),
        })
    }

    impl Runner for Fake {
        fn run(&self, program: &str, args: &[&str]) -> io::Result<Ran> {
            self.calls
                .borrow_mut()
                .push(format!("{program} {}", args.join(" ")));
            self.answers.borrow_mut().pop_front().unwrap_or(ok(""))
        }
    }

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
    fn spec_refuses_relative_and_multiline_paths() {
        let exe = Path::new("/usr/bin/credproxy");
        assert!(ServiceSpec::new("a", Path::new("credproxy"), exe).is_err());
        assert!(ServiceSpec::new("a", exe, Path::new("/tmp/x\ny.toml")).is_err());
        assert!(ServiceSpec::new("a b", exe, exe).is_err());
    }

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
    fn install_writes_reloads_enables_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Fake::default();
        let systemd = Systemd {
            dir: dir.path().join("systemd/user"),
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
            runner: &fake,
        };
        systemd.install(&spec()).unwrap();
        fake.calls.borrow_mut().clear();
        let done = systemd.uninstall("work").unwrap();
        assert!(!done.path.exists());
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
            runner: &fake,
        };
        let done = systemd.uninstall("work").unwrap();
        assert!(!done.path.exists());
        assert!(!wants.join("credproxy-work.service").exists());
        assert!(done.warning.unwrap().contains("Failed to connect to bus"));
    }

    #[test]
    fn status_reads_the_answers_whatever_the_exit_code() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Fake::default();
        let systemd = Systemd {
            dir: dir.path().to_owned(),
            runner: &fake,
        };
        systemd.install(&spec()).unwrap();
        let fake = Fake::default()
            .answer(ok("enabled\n"))
            .answer(fail("inactive\n", ""));
        let systemd = Systemd {
            dir: dir.path().to_owned(),
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
            runner: &fake,
        };
        let status = systemd.status(&other).unwrap();
        assert_eq!(status.file, FileState::Stale);
        assert!(status.running);

        let fake = Fake::default().answer(fail("", "Failed to connect to bus: No medium found"));
        let systemd = Systemd {
            dir: dir.path().to_owned(),
            runner: &fake,
        };
        let status = systemd.status(&spec()).unwrap();
        assert_eq!(
            status.state,
            Err("Failed to connect to bus: No medium found".to_owned())
        );
        assert!(!status.running);
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
