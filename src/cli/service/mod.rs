//! `credproxy service`: running `credproxy serve` at logon, as a systemd user unit on Linux or
//! a launchd agent on macOS.
//!
//! Owns the service definition ([`ServiceSpec`]), what the managers report, and `run`;
//! [`systemd`] and [`launchd`] hold each manager's file text and calls, [`runner`] the
//! program runner. The texts come from pure functions; installing, removing and querying go
//! through a [`Runner`] so tests drive them with a fake and never call the real managers.

mod launchd;
mod runner;
mod systemd;

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use super::args::ServiceAction;
use super::{CliError, Result};
use crate::config::{self, ConfigStore};
use crate::error::Error;

pub use self::launchd::{Launchd, launchd_label, launchd_plist};
pub use self::runner::{MANAGER_TIMEOUT, Ran, Runner, SystemRunner};
pub use self::systemd::{
    ARCHIVE_TEMPLATE, PACKAGED_TEMPLATE, Systemd, packaged_unit_name, systemd_unit,
    systemd_unit_name,
};

/// What a service runs: `credproxy --config CONFIG serve --profile PROFILE`, all validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    profile: String,
    exe: String,
    config: String,
    default_config: bool,
}

impl ServiceSpec {
    /// Validates the profile name and that both paths are absolute, UTF-8 and one line each.
    pub fn new(profile: &str, exe: &Path, config: &Path) -> Result<Self> {
        Ok(Self {
            profile: config::validate_profile_name(profile)?,
            exe: service_path("executable path", exe)?,
            config: service_path("config file path", config)?,
            default_config: false,
        })
    }

    /// Records whether the config file is the one credproxy finds by itself, without
    /// `--config`: only then may the package's unit, which names none, serve the profile.
    pub fn with_default_config(mut self, is_default: bool) -> Self {
        self.default_config = is_default;
        self
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

/// A path a service file may name: absolute, UTF-8, no control characters.
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

/// Whether a service file matches what `install` would write now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileState {
    /// No file.
    Missing,
    /// The file is what `install` writes for this binary and config.
    Current,
    /// The file differs (another binary or config path, or an older credproxy).
    Stale,
    /// No file of credproxy's own: the package's unit template serves the profile.
    Packaged,
}

/// What `install` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// The unit name or launchd label.
    pub name: String,
    /// The file written, or the package's unit that now serves the profile.
    pub path: PathBuf,
    /// Where the service's log goes, as a command or a path.
    pub logs: String,
    /// What the user should know about the choice made (the package's unit, or why not).
    pub note: Option<String>,
}

/// What `uninstall` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uninstalled {
    /// The unit name or launchd label.
    pub name: String,
    /// The file removed; none when only the package's unit was disabled (it stays installed).
    pub path: Option<PathBuf>,
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

/// This platform's service manager. Other platforms name systemd's only so that the code
/// type-checks; [`platform`] refuses them before one is made.
#[cfg(not(target_os = "macos"))]
type Platform<'a> = Systemd<'a>;
#[cfg(target_os = "macos")]
type Platform<'a> = Launchd<'a>;

/// The service manager of this platform, driven through `runner`.
fn platform(runner: &dyn Runner) -> Result<Platform<'_>> {
    if cfg!(not(any(target_os = "linux", target_os = "macos"))) {
        return Err(CliError::ServiceUnsupported {
            os: std::env::consts::OS,
        });
    }
    Platform::from_env(runner)
}

/// Installs and starts the profile's service with this platform's service manager.
pub fn install(spec: &ServiceSpec) -> Result<Installed> {
    platform(&SystemRunner::default())?.install(spec)
}

/// Stops and removes the profile's service.
pub fn uninstall(profile: &str) -> Result<Uninstalled> {
    platform(&SystemRunner::default())?.uninstall(profile)
}

/// Reports the profile's service as `install` would write it for `spec`.
pub fn status(spec: &ServiceSpec) -> Result<ServiceStatus> {
    platform(&SystemRunner::default())?.status(spec)
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
    let default = ConfigStore::locate(None)
        .ok()
        .and_then(|store| std::path::absolute(store.path()).ok());
    Ok(ServiceSpec::new(profile, &exe, &config_path)?
        .with_default_config(default.as_deref() == Some(config_path.as_path())))
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
            if let Some(note) = installed.note {
                eprintln!("credproxy: {note}");
            }
            Ok(())
        }
        ServiceAction::Uninstall(args) => {
            let name = config::validate_profile_name(&args.profile)?;
            let removed = uninstall(&name)?;
            match &removed.path {
                Some(path) => eprintln!(
                    "credproxy: stopped {} and removed {}",
                    removed.name,
                    path.display()
                ),
                None => eprintln!(
                    "credproxy: stopped and disabled {} (the package's unit stays installed)",
                    removed.name
                ),
            }
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
                FileState::Packaged => "the package's unit",
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
                let fix = if status.file == FileState::Packaged {
                    format!(
                        "start it with `systemctl --user enable --now {}` (or `credproxy service install --profile {name}`); see why it stopped in `{}`",
                        status.name, status.logs
                    )
                } else {
                    format!(
                        "see why in `{}`; start it with `credproxy service install --profile {name}`",
                        status.logs
                    )
                };
                Err(CliError::ServiceNotRunning {
                    name: status.name,
                    state,
                    fix,
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

    /// A spec with awkward paths: blanks, quotes, `%` and `$`.
    pub(super) fn spec() -> ServiceSpec {
        ServiceSpec::new(
            "work",
            Path::new("/opt/cred proxy/credproxy"),
            Path::new("/home/u/.config/credproxy/100%$HOME \"q\".toml"),
        )
        .unwrap()
    }

    #[test]
    fn spec_refuses_relative_and_multiline_paths() {
        let exe = Path::new("/usr/bin/credproxy");
        assert!(ServiceSpec::new("a", Path::new("credproxy"), exe).is_err());
        assert!(ServiceSpec::new("a", exe, Path::new("/tmp/x\ny.toml")).is_err());
        assert!(ServiceSpec::new("a b", exe, exe).is_err());
    }
}
