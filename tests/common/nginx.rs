//! A real nginx on loopback, for the answers only the real server gives (its pages, its TLS).
//!
//! The test binds 127.0.0.1:0 and nginx inherits that listening socket as its standard input
//! (named in its `NGINX` environment variable, the mechanism of its binary upgrade), so
//! connections queue from the first moment and nothing waits for nginx to be ready. nginx runs in the foreground as one
//! process and is killed when the value drops.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub struct Nginx {
    pub addr: SocketAddr,
    child: Child,
    dir: tempfile::TempDir,
}

/// The nginx binary: on `PATH` or where Debian puts it. `tests/run` installs it.
fn binary() -> PathBuf {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("nginx"))
        .find(|candidate| candidate.is_file());
    found.expect("these tests need nginx: run the suite with `tests/run`, which installs it")
}

impl Nginx {
    /// Starts nginx with `server` as the body of its one `server { … }` block (the `listen`
    /// line is added); `files` are written to its directory first, and `{dir}` in `server`
    /// stands for that directory.
    pub fn start(server: &str, files: &[(&str, &str)]) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let root = dir.path().display().to_string();
        let config = format!(
            "daemon off;\n\
             worker_processes 1;\n\
             pid {root}/nginx.pid;\n\
             error_log {root}/error.log info;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n\
               access_log off;\n\
               client_body_temp_path {root}/body;\n\
               proxy_temp_path {root}/proxy;\n\
               fastcgi_temp_path {root}/fastcgi;\n\
               uwsgi_temp_path {root}/uwsgi;\n\
               scgi_temp_path {root}/scgi;\n\
               server {{\n\
                 listen {addr} ssl;\n\
                 {}\n\
               }}\n\
             }}\n",
            server.replace("{dir}", &root)
        );
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, config).unwrap();
        let child = Command::new(binary())
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(&conf)
            // The listener becomes nginx's descriptor 0; nginx takes it as its listening socket.
            .env("NGINX", "0;")
            .stdin(Stdio::from(OwnedFd::from(listener)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Nginx { addr, child, dir }
    }

    /// The directory nginx runs in (its config, files and error log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// nginx's error log so far, for failure messages.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its worker first (SIGKILL would leave the worker behind).
        let terminated = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .is_ok_and(|status| status.success());
        if !terminated {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
