//! The control socket of a running `credproxy serve`: how `login`, `logout` and `doctor`
//! reach the proxies of this user, to make them read credentials again at once and to ask
//! where their credentials stand.
//!
//! Each `serve` listens on a Unix socket `serve-PID.sock` in a directory only this user can
//! enter (`$XDG_RUNTIME_DIR/credproxy`, else a private folder in the temporary directory).
//! One request per connection, one line of JSON each way. Nothing secret crosses it: a
//! reload makes the proxy read its own keyring entry; a status carries no credentials.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How long a client waits for one running proxy to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    /// Where every served profile's credentials stand.
    Status,
    /// Read the config file and the credentials of `profile` (every profile when none)
    /// again now, as SIGHUP does.
    Reload {
        /// The profile, or all.
        profile: Option<String>,
    },
}

/// What a running proxy answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// Its process id.
    pub pid: u32,
    /// The config file it serves from (absolute).
    pub config: PathBuf,
    /// Every profile it serves.
    pub profiles: Vec<ProfileReply>,
}

/// One served profile in a [`Reply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileReply {
    /// The profile.
    pub profile: String,
    /// Where it listens, `http://ADDR`.
    pub url: String,
    /// Its server.
    pub server: String,
    /// Where its credentials stand (the `/healthz` object).
    pub credentials: serde_json::Value,
    /// What a reload did, in words; `None` for a status.
    pub reload: Option<String>,
    /// For a profile with a LAN route, the route in use and why (the `/healthz` object).
    #[serde(default)]
    pub route: serde_json::Value,
}

impl Reply {
    /// The profile `name` of this reply, when this proxy serves it from `config`.
    pub fn serving(&self, config: &Path, name: &str) -> Option<&ProfileReply> {
        if !same_file(&self.config, config) {
            return None;
        }
        self.profiles.iter().find(|p| p.profile == name)
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
    canonical(a) == canonical(b)
}

/// A request that reached a running proxy, and where its answer goes.
#[derive(Debug)]
pub struct Command {
    /// What was asked.
    pub request: Request,
    /// Where the answer goes.
    pub reply: tokio::sync::oneshot::Sender<Reply>,
}

/// Why a connection to the control socket was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The peer runs as another user.
    #[error("refused a connection from uid {peer}: only uid {own} may control this proxy")]
    OtherUser {
        /// The peer's user id.
        peer: u32,
        /// This process's user id.
        own: u32,
    },
    /// The peer's user could not be told.
    #[error("refused a connection whose user cannot be told")]
    Unknown,
}

/// Admits a control connection from a peer running as `peer` (`None`: unknown) to a proxy
/// running as `own`: only the same user may reload it or read its state.
pub fn admit(peer: Option<u32>, own: u32) -> Result<(), Refused> {
    match peer {
        Some(peer) if peer == own => Ok(()),
        Some(peer) => Err(Refused::OtherUser { peer, own }),
        None => Err(Refused::Unknown),
    }
}

/// Whether this platform has the control socket (Unix).
pub const AVAILABLE: bool = cfg!(unix);

#[cfg(unix)]
pub use self::unix::{ask, ask_all, listen, runtime_dir, serve};

#[cfg(not(unix))]
/// Without Unix sockets no running proxy can be asked: always none.
pub async fn ask_all(_request: &Request) -> Vec<Reply> {
    Vec::new()
}

#[cfg(unix)]
mod unix {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    use std::path::PathBuf;

    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
    use tokio::net::{UnixListener, UnixStream};
    use tokio::sync::{mpsc, oneshot};

    use super::{ANSWER_TIMEOUT, Command, Reply, Request};

    /// The directory of the control sockets, created private (mode 0700) when missing;
    /// `None` when no directory is private to this user (then there are no sockets).
    pub fn runtime_dir() -> Option<PathBuf> {
        // SAFETY: getuid cannot fail and touches no memory.
        let uid = unsafe { libc::getuid() };
        let dir = match dirs::runtime_dir() {
            Some(runtime) => runtime.join("credproxy"),
            None => std::env::temp_dir().join(format!("credproxy-{uid}")),
        };
        let mut builder = std::fs::DirBuilder::new();
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        match builder.create(&dir) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(err) => {
                tracing::debug!("no control socket directory {}: {err}", dir.display());
                return None;
            }
        }
        // A directory someone else made, or others may enter, is not ours to trust.
        let meta = std::fs::symlink_metadata(&dir).ok()?;
        let private = meta.is_dir() && meta.uid() == uid && meta.permissions().mode() & 0o077 == 0;
        if !private {
            tracing::warn!(
                "{} is not a private directory of this user: no control socket",
                dir.display()
            );
            return None;
        }
        Some(dir)
    }

    /// Binds this process's control socket; `None` (logged) when it cannot.
    pub fn listen() -> Option<(UnixListener, PathBuf)> {
        let path = runtime_dir()?.join(format!("serve-{}.sock", std::process::id()));
        // A socket left by an earlier process with this pid.
        let _ = std::fs::remove_file(&path);
        match UnixListener::bind(&path) {
            Ok(listener) => {
                let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
                Some((listener, path))
            }
            Err(err) => {
                tracing::warn!("no control socket at {}: {err}", path.display());
                None
            }
        }
    }

    /// Answers control requests on `listener` by handing them to `commands`, until
    /// `shutdown` resolves; removes the socket file at `path` then. Only processes of this
    /// user are answered.
    pub async fn serve(
        listener: UnixListener,
        path: PathBuf,
        commands: mpsc::Sender<Command>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        // SAFETY: getuid cannot fail and touches no memory.
        let uid = unsafe { libc::getuid() };
        serve_for(uid, listener, path, commands, shutdown).await;
    }

    /// [`serve`] for the user `uid`.
    pub(super) async fn serve_for(
        uid: u32,
        listener: UnixListener,
        path: PathBuf,
        commands: mpsc::Sender<Command>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        loop {
            let stream = tokio::select! {
                () = &mut shutdown => break,
                (stream, _) = crate::serve::accept_or_pause(|| listener.accept()) => stream,
            };
            // The socket's directory is private already; this also keeps out a process of
            // another user that was handed a descriptor, or a directory made too open.
            let peer = stream.peer_cred().map(|cred| cred.uid());
            if let Err(refused) = super::admit(peer.as_ref().ok().copied(), uid) {
                match peer {
                    Ok(_) => tracing::warn!("control socket: {refused}"),
                    Err(err) => tracing::warn!("control socket: {refused} ({err})"),
                }
                continue;
            }
            let commands = commands.clone();
            tokio::spawn(async move {
                if let Err(err) = answer(stream, commands).await {
                    tracing::debug!("control request failed: {err}");
                }
            });
        }
        let _ = std::fs::remove_file(&path);
    }

    async fn answer(stream: UnixStream, commands: mpsc::Sender<Command>) -> std::io::Result<()> {
        let (read, mut write) = stream.into_split();
        let mut line = String::new();
        let mut reader = BufReader::new(read).take(64 * 1024);
        tokio::time::timeout(ANSWER_TIMEOUT, reader.read_line(&mut line))
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)??;
        let request: Request = serde_json::from_str(&line)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        let (reply, answered) = oneshot::channel();
        commands
            .send(Command { request, reply })
            .await
            .map_err(|_| std::io::ErrorKind::BrokenPipe)?;
        let reply = answered.await.map_err(|_| std::io::ErrorKind::BrokenPipe)?;
        let mut text = serde_json::to_string(&reply).map_err(std::io::Error::other)?;
        text.push('\n');
        write.write_all(text.as_bytes()).await
    }

    /// Asks every running proxy of this user; those that do not answer are left out (and
    /// sockets nobody listens on any more are removed).
    pub async fn ask_all(request: &Request) -> Vec<Reply> {
        let Some(dir) = runtime_dir() else {
            return Vec::new();
        };
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut replies = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let is_socket = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("serve-") && n.ends_with(".sock"));
            if !is_socket {
                continue;
            }
            match tokio::time::timeout(ANSWER_TIMEOUT, ask(&path, request)).await {
                Ok(Ok(reply)) => replies.push(reply),
                Ok(Err(err)) if err.kind() == std::io::ErrorKind::ConnectionRefused => {
                    // Its process is gone.
                    let _ = std::fs::remove_file(&path);
                }
                Ok(Err(err)) => tracing::debug!("{}: {err}", path.display()),
                Err(_) => tracing::debug!("{} did not answer in time", path.display()),
            }
        }
        replies
    }

    /// Sends `request` to the control socket at `path` and reads the answer.
    pub async fn ask(path: &std::path::Path, request: &Request) -> std::io::Result<Reply> {
        let stream = UnixStream::connect(path).await?;
        let (read, mut write) = stream.into_split();
        let mut text = serde_json::to_string(request).map_err(std::io::Error::other)?;
        text.push('\n');
        write.write_all(text.as_bytes()).await?;
        let mut line = String::new();
        BufReader::new(read)
            .take(4 * 1024 * 1024)
            .read_line(&mut line)
            .await?;
        serde_json::from_str(&line)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_reaches_the_serving_loop_and_its_answer_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serve-1.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (commands, mut received) = tokio::sync::mpsc::channel(1);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, path.clone(), commands, async {
            let _ = stopped.await;
        }));
        let asking = tokio::spawn({
            let path = path.clone();
            async move {
                ask(
                    &path,
                    &Request::Reload {
                        profile: Some("home".into()),
                    },
                )
                .await
            }
        });
        let command = received.recv().await.unwrap();
        assert_eq!(
            command.request,
            Request::Reload {
                profile: Some("home".into())
            }
        );
        let reply = Reply {
            pid: 7,
            config: dir.path().join("config.toml"),
            profiles: vec![ProfileReply {
                profile: "home".into(),
                url: "http://127.0.0.1:2283".into(),
                server: "https://immich.example.com".into(),
                credentials: serde_json::json!({"state": "accepted"}),
                reload: Some("credentials changed".into()),
                route: serde_json::Value::Null,
            }],
        };
        command.reply.send(reply.clone()).unwrap();
        assert_eq!(asking.await.unwrap().unwrap(), reply);
        assert!(
            reply
                .serving(&dir.path().join("config.toml"), "home")
                .is_some()
        );
        assert!(
            reply
                .serving(&dir.path().join("other.toml"), "home")
                .is_none()
        );
        assert!(
            reply
                .serving(&dir.path().join("config.toml"), "work")
                .is_none()
        );
        stop.send(()).unwrap();
        server.await.unwrap();
        assert!(!path.exists(), "the socket file goes with the server");
    }

    #[test]
    fn only_the_same_user_is_admitted() {
        assert_eq!(admit(Some(1000), 1000), Ok(()));
        assert_eq!(
            admit(Some(1001), 1000),
            Err(Refused::OtherUser {
                peer: 1001,
                own: 1000
            })
        );
        assert_eq!(
            admit(Some(0), 1000).map_err(|e| e.to_string()),
            Err("refused a connection from uid 0: only uid 1000 may control this proxy".to_owned())
        );
        assert_eq!(admit(None, 1000), Err(Refused::Unknown));
    }

    #[tokio::test]
    async fn a_peer_of_another_user_gets_no_answer_and_reaches_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serve-1.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (commands, mut received) = tokio::sync::mpsc::channel(1);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // SAFETY: getuid cannot fail and touches no memory.
        let me = unsafe { libc::getuid() };
        // The proxy runs as some other user than this test: the test is the foreign peer.
        let server = tokio::spawn(unix::serve_for(
            me.wrapping_add(1),
            listener,
            path.clone(),
            commands,
            async {
                let _ = stopped.await;
            },
        ));
        // Bounded: a peer let in would wait for an answer that never comes.
        let asked = tokio::time::timeout(ANSWER_TIMEOUT, ask(&path, &Request::Status)).await;
        assert!(
            matches!(asked, Ok(Err(_))),
            "a foreign peer was not turned away: {asked:?}"
        );
        assert!(
            received.try_recv().is_err(),
            "a foreign request got through"
        );
        stop.send(()).unwrap();
        server.await.unwrap();
    }

    #[test]
    fn requests_are_one_line_of_json() {
        let text = serde_json::to_string(&Request::Reload { profile: None }).unwrap();
        assert_eq!(text, r#"{"command":"reload","profile":null}"#);
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"command":"status"}"#).unwrap(),
            Request::Status
        );
    }

    #[test]
    fn the_runtime_directory_is_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = runtime_dir().expect("a private directory can be made");
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
    }
}
