//! Running `systemctl`/`launchctl`: the [`Runner`] seam tests replace, and the real runner that
//! kills a manager program that has not finished within its timeout.

use std::io;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long one `systemctl`/`launchctl` call may take before credproxy kills it.
pub const MANAGER_TIMEOUT: Duration = Duration::from_secs(30);

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

/// Runs programs for real; one that has not finished after `timeout` is killed and reaped.
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
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        finish(child, self.timeout)
    }
}

/// Collects a child's output and status, or kills and reaps it once `timeout` has passed.
///
/// The standard library has no wait with a timeout; polling `try_wait` keeps the `Child` (and
/// so its pid) ours until it is reaped, so the kill can never reach a process that has reused
/// the pid. A few dozen polls per second cost nothing next to a manager call.
fn finish(mut child: Child, timeout: Duration) -> io::Result<Ran> {
    // Drained on their own threads: a child that fills one pipe while we wait would block.
    let stdout = child.stdout.take().map(drain);
    let stderr = child.stderr.take().map(drain);
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    let status = loop {
        let waited = child.try_wait();
        let now = Instant::now();
        match waited {
            Ok(Some(status)) => break status,
            Ok(None) if now < deadline => {
                std::thread::sleep(pause.min(deadline - now));
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            Ok(None) => {
                stop(&mut child);
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {} s; stopped it", timeout.as_secs_f32()),
                ));
            }
            Err(e) => {
                stop(&mut child);
                return Err(e);
            }
        }
    };
    // The drains end at end-of-file: the child has exited, and a manager program leaves no
    // helper holding its output open. (After a kill they are left to finish on their own.)
    Ok(Ran {
        success: status.success(),
        stdout: collect(stdout),
        stderr: collect(stderr),
    })
}

/// Kills the child and reaps it, so neither a hung process nor a zombie outlives the call.
fn stop(child: &mut Child) {
    // Fails only when it has just exited by itself; the wait reaps it either way.
    let _ = child.kill();
    let _ = child.wait();
}

fn drain(mut pipe: impl io::Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        // A read error ends the output early; what came before it is still worth showing.
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
}

fn collect(drain: Option<JoinHandle<Vec<u8>>>) -> String {
    let bytes = drain
        .and_then(|handle| handle.join().ok())
        .unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Runs `program args`; `Err` is a one-line reason fit for an error message.
pub(super) fn call(
    runner: &dyn Runner,
    program: &str,
    args: &[&str],
) -> std::result::Result<Ran, String> {
    match runner.run(program, args) {
        Ok(ran) if ran.success => Ok(ran),
        Ok(ran) => Err(first_line(&ran.stderr)
            .or_else(|| first_line(&ran.stdout))
            .unwrap_or_else(|| "it exited with an error".to_owned())),
        Err(e) => Err(describe(program, &e)),
    }
}

/// Why a program could not be run, in one line.
pub(super) fn describe(program: &str, error: &io::Error) -> String {
    if error.kind() == io::ErrorKind::NotFound {
        format!("{program} is not installed or not on PATH")
    } else {
        format!("cannot run {program}: {error}")
    }
}

/// The first non-blank line of a program's output, trimmed.
pub(super) fn first_line(text: &str) -> Option<String> {
    text.lines()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .map(str::to_owned)
}

/// A scripted [`Runner`] for the managers' unit tests.
#[cfg(test)]
pub(super) mod fake {
    use std::cell::RefCell;
    use std::collections::VecDeque;
    use std::io;

    use super::{Ran, Runner};

    /// Records calls and answers them from a script (default: success, no output).
    #[derive(Default)]
    pub struct Fake {
        pub calls: RefCell<Vec<String>>,
        answers: RefCell<VecDeque<io::Result<Ran>>>,
    }

    impl Fake {
        pub fn answer(self, ran: io::Result<Ran>) -> Self {
            self.answers.borrow_mut().push_back(ran);
            self
        }
    }

    pub fn ok(stdout: &str) -> io::Result<Ran> {
        Ok(Ran {
            success: true,
            stdout: stdout.to_owned(),
            stderr: String::new(),
        })
    }

    pub fn fail(stdout: &str, stderr: &str) -> io::Result<Ran> {
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
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;
    use std::path::{Path, PathBuf};

    /// A stand-in `systemctl` in `dir` running `body` after `#!/bin/sh`.
    fn stand_in(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("systemctl");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// Whether a process with this pid exists (a zombie counts: it has not been reaped).
    fn exists(pid: u32) -> bool {
        let pid = libc::pid_t::try_from(pid).unwrap();
        // SAFETY: kill with signal 0 sends nothing; it only checks the pid.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        alive || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }

    #[test]
    fn collects_output_and_exit_status() {
        let dir = tempfile::tempdir().unwrap();
        let program = stand_in(dir.path(), "echo \"out $*\"; echo err >&2; exit 3");
        let runner = SystemRunner::default();
        let ran = runner
            .run(program.to_str().unwrap(), &["--user", "is-active"])
            .unwrap();
        assert_eq!(
            ran,
            Ran {
                success: false,
                stdout: "out --user is-active\n".to_owned(),
                stderr: "err\n".to_owned(),
            }
        );
    }

    #[test]
    fn a_hung_manager_is_killed_and_reaped_at_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let program = stand_in(dir.path(), "exec sleep 600");
        // Spawned here rather than through `run` so the test knows the pid whether or not the
        // shell got as far as the exec before the timeout.
        let child = Command::new(&program)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        assert!(exists(pid));
        let err = finish(child, Duration::from_millis(50)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("stopped it"), "{err}");
        assert!(!exists(pid), "pid {pid} still exists (running or a zombie)");
    }

    #[test]
    fn the_runner_stops_a_hung_systemctl_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let program = stand_in(
            dir.path(),
            &format!("echo $$ > '{}'\nexec sleep 600", pid_file.display()),
        );
        let runner = SystemRunner {
            timeout: Duration::from_millis(300),
        };
        let err = runner.run(program.to_str().unwrap(), &[]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        // The shell may be killed before it writes its pid on a loaded machine; the test
        // above covers that case with a known pid.
        if let Ok(pid) = std::fs::read_to_string(&pid_file) {
            let pid: u32 = pid.trim().parse().unwrap();
            assert!(!exists(pid), "pid {pid} still exists");
        }
    }
}
