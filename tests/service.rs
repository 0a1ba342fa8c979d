//! Desktop integration: the service files as the managers read them, `service` through the
//! binary with a stand-in `systemctl`, shell completions and the man page.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use credproxy::cli::service::{self, ServiceSpec};

const EXE: &str = env!("CARGO_BIN_EXE_credproxy");

/// A spec with awkward paths: a blank and a `%` that systemd would read as a specifier.
fn awkward_spec(dir: &Path) -> ServiceSpec {
    ServiceSpec::new(
        "laptop",
        Path::new(EXE),
        &dir.join("my config").join("100% credproxy.toml"),
    )
    .unwrap()
}

fn on_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}

#[test]
fn systemd_unit_is_accepted_by_systemd_analyze() {
    let dir = tempfile::tempdir().unwrap();
    let spec = awkward_spec(dir.path());
    let unit = service::systemd_unit(&spec);
    let exec = unit
        .lines()
        .find_map(|line| line.strip_prefix("ExecStart="))
        .unwrap();
    assert!(exec.starts_with(EXE), "{exec}");
    assert!(
        exec.contains(" --config \"")
            && exec.ends_with("/my config/100%% credproxy.toml\" serve --profile laptop"),
        "{exec}"
    );
    for line in [
        "Restart=on-failure",
        "After=network-online.target",
        "Wants=network-online.target",
        "WantedBy=default.target",
    ] {
        assert!(unit.lines().any(|l| l == line), "missing {line}");
    }

    let Some(analyze) = on_path("systemd-analyze") else {
        eprintln!(
            "note: systemd-analyze is not installed (Debian package `systemd`); \
             skipping only the `systemd-analyze verify` step"
        );
        return;
    };
    let path = dir.path().join(service::systemd_unit_name("laptop"));
    std::fs::write(&path, &unit).unwrap();
    let verify = Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success(), "systemd-analyze verify: {stderr}");
    // Warnings about the unit itself (unknown or misspelt directives, bad quoting) go to
    // stderr with success; none may name our file.
    let name = path.file_name().unwrap().to_string_lossy();
    assert!(
        !stderr.contains(name.as_ref()),
        "systemd-analyze verify complained: {stderr}"
    );
}

#[test]
fn launchd_plist_is_a_well_formed_agent() {
    let dir = tempfile::tempdir().unwrap();
    let spec = awkward_spec(dir.path());
    let log = "/Users/me/Library/Logs/credproxy/laptop <&>.log";
    let text = service::launchd_plist(&spec, log);
    let value = plist::Value::from_reader_xml(text.as_bytes()).expect("well-formed plist XML");
    let agent = value.as_dictionary().expect("a dictionary at the top");
    assert_eq!(
        agent.get("Label").and_then(|v| v.as_string()),
        Some("credproxy.laptop")
    );
    let arguments: Vec<&str> = agent
        .get("ProgramArguments")
        .and_then(|v| v.as_array())
        .expect("ProgramArguments")
        .iter()
        .map(|v| v.as_string().unwrap())
        .collect();
    assert_eq!(arguments, spec.command_line());
    assert_eq!(arguments[0], EXE);
    assert_eq!(
        agent.get("RunAtLoad").and_then(|v| v.as_boolean()),
        Some(true)
    );
    let keep_alive = agent
        .get("KeepAlive")
        .and_then(|v| v.as_dictionary())
        .expect("KeepAlive dictionary");
    assert_eq!(
        keep_alive
            .get("SuccessfulExit")
            .and_then(|v| v.as_boolean()),
        Some(false),
        "restart only after a failure"
    );
    for key in ["StandardOutPath", "StandardErrorPath"] {
        assert_eq!(
            agent.get(key).and_then(|v| v.as_string()),
            Some(log),
            "{key}"
        );
    }
}

/// A temporary home with a profile, and a `bin` directory that is the whole PATH.
struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        std::fs::write(
            dir.path().join("config.toml"),
            "[profiles.laptop]\nserver = \"https://immich.example.com\"\nusername = \"svc\"\n",
        )
        .unwrap();
        Self { dir }
    }

    #[cfg(unix)]
    /// Puts a stand-in `systemctl` on the PATH: it logs its arguments, then runs `body`.
    fn systemctl(&self, body: &str) {
        use std::os::unix::fs::PermissionsExt as _;
        let log = self.dir.path().join("systemctl.log");
        let path = self.dir.path().join("bin").join("systemctl");
        std::fs::write(
            &path,
            format!("#!/bin/sh\necho \"$*\" >> '{}'\n{body}\n", log.display()),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("systemctl.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn unit(&self) -> PathBuf {
        self.dir
            .path()
            .join("xdg/systemd/user/credproxy-laptop.service")
    }

    fn run(&self, args: &[&str]) -> Output {
        let home = self.dir.path();
        Command::new(EXE)
            .args(args)
            .env("CREDPROXY_CONFIG", home.join("config.toml"))
            .env("HOME", home)
            .env("XDG_CONFIG_HOME", home.join("xdg"))
            .env("PATH", home.join("bin"))
            .env(
                "DBUS_SESSION_BUS_ADDRESS",
                "unix:path=/nonexistent/credproxy-test-bus",
            )
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[cfg(target_os = "linux")]
#[test]
fn service_install_status_uninstall_drive_systemctl_user() {
    let home = Home::new();
    home.systemctl(
        "case \"$3\" in is-enabled) echo enabled; exit 0;; is-active) echo active; exit 0;; esac",
    );
    let install = home.run(&["service", "install", "--profile", "laptop"]);
    assert_eq!(install.status.code(), Some(0), "{}", stderr(&install));
    let unit = std::fs::read_to_string(home.unit()).unwrap();
    assert!(
        unit.contains(&format!("ExecStart={EXE} --config ")),
        "{unit}"
    );
    assert!(unit.contains("serve --profile laptop"), "{unit}");
    assert_eq!(
        home.calls(),
        [
            "--user --no-pager daemon-reload",
            "--user --no-pager enable credproxy-laptop.service",
            "--user --no-pager restart credproxy-laptop.service",
        ]
    );

    let status = home.run(&["service", "status", "--profile", "laptop"]);
    let out = String::from_utf8_lossy(&status.stdout);
    assert_eq!(status.status.code(), Some(0), "{}", stderr(&status));
    assert!(out.contains("(installed)"), "{out}");
    assert!(out.contains("enabled, active"), "{out}");

    let uninstall = home.run(&["service", "uninstall", "--profile", "laptop"]);
    assert_eq!(uninstall.status.code(), Some(0), "{}", stderr(&uninstall));
    assert!(!home.unit().exists());
    assert!(
        home.calls()
            .contains(&"--user --no-pager disable --now credproxy-laptop.service".to_owned())
    );
}

#[cfg(target_os = "linux")]
#[test]
fn service_install_without_a_user_bus_writes_the_unit_and_fails_with_the_commands() {
    let home = Home::new();
    home.systemctl("echo 'Failed to connect to bus: No medium found' >&2; exit 1");
    let install = home.run(&["service", "install", "--profile", "laptop"]);
    let message = stderr(&install);
    assert_eq!(install.status.code(), Some(1), "{message}");
    assert!(home.unit().exists(), "the unit is written anyway");
    assert!(
        message.contains(&home.unit().display().to_string()),
        "{message}"
    );
    assert!(message.contains("No medium found"), "{message}");
    assert!(
        message.contains("systemctl --user enable credproxy-laptop.service"),
        "{message}"
    );

    // status says it is not running, and fails.
    let status = home.run(&["service", "status", "--profile", "laptop"]);
    assert_eq!(status.status.code(), Some(1));
    assert!(
        stderr(&status).contains("No medium found"),
        "{}",
        stderr(&status)
    );

    // uninstall still removes the file, with a warning.
    let uninstall = home.run(&["service", "uninstall", "--profile", "laptop"]);
    assert_eq!(uninstall.status.code(), Some(0), "{}", stderr(&uninstall));
    assert!(!home.unit().exists());
    assert!(
        stderr(&uninstall).contains("warning"),
        "{}",
        stderr(&uninstall)
    );
}

#[cfg(target_os = "linux")]
#[test]
fn service_refuses_unknown_profiles_and_names_a_missing_systemctl() {
    let home = Home::new();
    let unknown = home.run(&["service", "install", "--profile", "nope"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(stderr(&unknown).contains("no profile named 'nope'"));
    assert!(!home.dir.path().join("xdg/systemd").exists());

    // No systemctl on PATH at all.
    let install = home.run(&["service", "install", "--profile", "laptop"]);
    assert_eq!(install.status.code(), Some(1));
    assert!(home.unit().exists());
    assert!(
        stderr(&install).contains("systemctl is not installed"),
        "{}",
        stderr(&install)
    );

    let status = home.run(&["service", "status", "--profile", "nope"]);
    assert_eq!(status.status.code(), Some(1));
    assert!(
        stderr(&status).contains("no service is installed"),
        "{}",
        stderr(&status)
    );
}

#[test]
fn completions_for_each_shell_name_the_subcommands() {
    let home = Home::new();
    for shell in ["bash", "zsh", "fish", "powershell", "elvish"] {
        let output = home.run(&["completions", shell]);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{shell}: {}",
            stderr(&output)
        );
        let script = String::from_utf8_lossy(&output.stdout);
        for word in ["login", "serve", "service", "completions"] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
    }
    assert_eq!(home.run(&["completions", "tcsh"]).status.code(), Some(2));
}

#[test]
fn bash_accepts_the_bash_completion_script() {
    let Some(bash) = on_path("bash") else {
        eprintln!("note: bash is not installed; skipping `bash -n`");
        return;
    };
    let home = Home::new();
    let output = home.run(&["completions", "bash"]);
    let path = home.dir.path().join("credproxy.bash");
    std::fs::write(&path, &output.stdout).unwrap();
    let check = Command::new(bash).arg("-n").arg(&path).output().unwrap();
    assert!(check.status.success(), "bash -n: {}", stderr(&check));
}

#[test]
fn man_page_is_roff_with_the_subcommands() {
    let home = Home::new();
    let output = home.run(&["man"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let page = String::from_utf8_lossy(&output.stdout);
    assert!(
        page.lines().any(|l| l.starts_with(".TH credproxy")),
        "{page}"
    );
    for command in [
        "login",
        "serve",
        "logout",
        "doctor",
        "service",
        "completions",
    ] {
        assert!(page.contains(command), "man page lacks {command}");
    }
}

/// The unit template the package installs, as in the repository.
fn packaged_template() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/credproxy@.service");
    std::fs::read_to_string(path).unwrap()
}

/// The lines of a unit's `[Service]` section other than `ExecStart=` and comments.
fn service_settings(unit: &str) -> Vec<&str> {
    unit.lines()
        .skip_while(|l| *l != "[Service]")
        .take_while(|l| *l != "[Install]")
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with("ExecStart="))
        .collect()
}

#[test]
fn packaged_template_serves_the_instance_with_the_generated_units_settings() {
    let template = packaged_template();
    let exec: Vec<&str> = template
        .lines()
        .filter_map(|l| l.strip_prefix("ExecStart="))
        .collect();
    assert_eq!(exec, ["/usr/bin/credproxy serve --profile %i"]);
    assert!(
        service::PACKAGED_TEMPLATE.ends_with("/credproxy@.service"),
        "{}",
        service::PACKAGED_TEMPLATE
    );
    // One hardening and restart policy: the template and `service install`'s unit agree.
    let dir = tempfile::tempdir().unwrap();
    let generated = service::systemd_unit(&awkward_spec(dir.path()));
    assert_eq!(service_settings(&template), service_settings(&generated));
    assert!(service_settings(&template).contains(&"ExecReload=/bin/kill -HUP $MAINPID"));
    assert!(template.lines().any(|l| l == "WantedBy=default.target"));
}

#[test]
fn packaged_template_is_accepted_by_systemd_analyze() {
    let Some(analyze) = on_path("systemd-analyze") else {
        eprintln!("note: systemd-analyze is not installed; skipping");
        return;
    };
    // The instance as `systemctl --user enable credproxy@laptop` would load it, with this
    // build's binary in place of /usr/bin/credproxy (not installed here).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(service::packaged_unit_name("laptop"));
    std::fs::write(
        &path,
        packaged_template().replace("/usr/bin/credproxy", EXE),
    )
    .unwrap();
    let runtime = dir.path().join("run");
    std::fs::create_dir(&runtime).unwrap();
    let verify = Command::new(analyze)
        .args(["--user", "verify", "--man=no"])
        .arg(&path)
        .env("XDG_RUNTIME_DIR", &runtime)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success(), "systemd-analyze verify: {stderr}");
    assert!(
        !stderr.contains("credproxy@laptop.service"),
        "systemd-analyze verify complained: {stderr}"
    );
}

#[test]
fn man_dir_writes_a_page_per_command() {
    let home = Home::new();
    let dir = home.dir.path().join("man");
    let output = home.run(&["man", "--dir", dir.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    for (page, title) in [
        ("credproxy.1", "credproxy"),
        ("credproxy-login.1", "credproxy-login"),
        ("credproxy-serve.1", "credproxy-serve"),
        ("credproxy-service.1", "credproxy-service"),
        ("credproxy-service-install.1", "credproxy-service-install"),
        ("credproxy-man.1", "credproxy-man"),
    ] {
        let text = std::fs::read_to_string(dir.join(page)).unwrap();
        let th = text.lines().find(|l| l.starts_with(".TH ")).unwrap();
        assert!(th.starts_with(&format!(".TH {title} 1 ")), "{th}");
        assert!(
            th.contains(concat!("credproxy ", env!("CARGO_PKG_VERSION"))),
            "{th}"
        );
    }
    assert!(!dir.join("credproxy-help.1").exists());

    // A file where the directory should be: a clear error naming it.
    let blocked = home.dir.path().join("blocked");
    std::fs::write(&blocked, "").unwrap();
    let output = home.run(&["man", "--dir", blocked.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("cannot write the man pages into"),
        "{}",
        stderr(&output)
    );
}
