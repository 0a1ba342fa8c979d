//! Validated settings: profiles in a TOML file (non-secret only), built once from CLI + file.
//!
//! Owns: the config file and its store, [`Profile`] (what one proxied server needs, from the
//! file or from an app), the value types it is made of (server URL, listen address, key pins)
//! and the `credproxy login` command that re-creates a profile.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use http::uri::{self, Authority, Uri};
use serde::{Deserialize, Serialize};

use crate::credentials::Scheme;
use crate::error::{Error, Result};

/// The profile used when none is named.
pub const DEFAULT_PROFILE: &str = "default";

/// Immich's own default port on loopback, so clients keep their usual URL.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 2283);

/// The config file as stored: a table of profiles, no secrets.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Profiles by name.
    #[serde(default)]
    pub profiles: BTreeMap<String, ProfileEntry>,
}

/// One profile as stored in the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileEntry {
    /// The Authentik-fronted Immich URL, e.g. `https://immich.example.com`.
    pub server: String,
    /// The Authentik service account's username (Basic only).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub username: String,
    /// The auth scheme: `basic` (default), `cloudflare-access` or `header`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<String>,
    /// The header names of the `header` scheme.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
    /// Where `serve` listens, e.g. `127.0.0.1:2283`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// An extra CA certificate (PEM) to trust for this server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
    /// Accepted server key pins (`sha256/BASE64`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pins: Vec<String>,
    /// Whether clients must present the local credential.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub local_auth: bool,
    /// Extra Host names served besides the loopback names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_hosts: Vec<String>,
    /// The client certificate chain (PEM; not secret: its private key is in the keyring).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<String>,
    /// A LAN address of the same server (`https://192.168.1.10:443`), used when it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lan: Option<String>,
    /// Key pins of a LAN front with a certificate of its own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lan_pins: Vec<String>,
    /// The CA (PEM) of a LAN front with a certificate of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lan_ca_cert: Option<PathBuf>,
}

/// A profile after validation: everything the rest of the code needs, in checked form.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// The profile's name (also the keyring account).
    pub name: String,
    /// The one upstream this profile talks to.
    pub server: ServerUrl,
    /// The Authentik username sent in Basic credentials (empty for other schemes).
    pub username: String,
    /// How the gate is authenticated.
    pub auth: Scheme,
    /// The listen address for `serve`.
    pub listen: SocketAddr,
    /// An extra CA certificate to trust.
    pub ca_cert: Option<CaCert>,
    /// Accepted server key pins (`sha256/BASE64`), already checked.
    pub pins: Vec<String>,
    /// Whether clients must present the local credential.
    pub local_auth: bool,
    /// Extra Host names served.
    pub allow_hosts: Vec<String>,
    /// The client certificate chain (PEM) presented to the server; its key is in the keyring.
    pub client_cert: Option<String>,
    /// A LAN address of the same server, used while it answers (see [`LanRoute`]).
    pub lan: Option<LanRoute>,
}

/// A LAN address of the profile's server: while it answers, requests go there instead of
/// out through the uplink and back in through the public route.
///
/// Its certificate is checked as the public server's is (for the public name, with the
/// profile's CA or pins) unless it has pins or a CA of its own: a host at that address on
/// another network gets nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LanRoute {
    /// Where to connect (`https://ADDRESS:PORT`; a LAN host name is looked up).
    pub url: ServerUrl,
    /// Key pins accepted from the LAN front instead of the public name's certificate.
    pub pins: Vec<String>,
    /// A CA whose certificate for the LAN host name or address is accepted instead.
    pub ca_cert: Option<CaCert>,
}

impl LanRoute {
    /// The LAN route of `--lan ADDRESS` (`192.168.1.10`, `192.168.1.10:8443`, `[fd00::2]`,
    /// `nas.lan`, or an `https://` URL of one of these; the port defaults to 443), with its
    /// own `pins` and `ca_cert`, if any. Plain `http://` is refused with the reason.
    pub fn parse(address: &str, pins: &[String], ca_cert: Option<CaCert>) -> Result<Self> {
        let address = address.trim();
        let invalid = |reason: String| Error::Invalid {
            what: "LAN address",
            reason,
        };
        let scheme_end = address.find("://");
        if let Some(end) = scheme_end
            && !address[..end].eq_ignore_ascii_case("https")
        {
            return Err(invalid(format!(
                "'{}' is not https: anything that answers at that address on another network (a café's Wi-Fi) would be sent your photos, your Immich API key and the gate's credentials; give the LAN address of the same HTTPS server, e.g. --lan 192.168.1.10 or --lan https://192.168.1.10:443",
                redact_userinfo(address)
            )));
        }
        let url = match scheme_end {
            Some(_) => address.to_owned(),
            None => format!("https://{address}"),
        };
        let url = ServerUrl::parse(&url).map_err(|err| match err {
            Error::Invalid { reason, .. } => invalid(reason.replace(
                "expected e.g. https://immich.example.com",
                "expected e.g. 192.168.1.10, 192.168.1.10:8443 or https://nas.lan",
            )),
            other => other,
        })?;
        Ok(Self {
            url,
            pins: pins
                .iter()
                .map(|pin| validate_pin(pin))
                .collect::<Result<_>>()?,
            ca_cert,
        })
    }
}

impl Profile {
    /// Validates a stored profile entry.
    pub fn from_entry(name: &str, entry: &ProfileEntry) -> Result<Self> {
        let auth = Scheme::new(entry.auth.as_deref().unwrap_or("basic"), &entry.headers)?;
        let username = if auth == Scheme::Basic {
            validate_username(&entry.username)?
        } else {
            entry.username.clone()
        };
        Ok(Self {
            name: validate_profile_name(name)?,
            server: ServerUrl::parse(&entry.server)?,
            username,
            auth,
            listen: match &entry.listen {
                Some(listen) => parse_listen(listen)?,
                None => DEFAULT_LISTEN,
            },
            ca_cert: entry.ca_cert.clone().map(CaCert::File),
            pins: entry
                .pins
                .iter()
                .map(|pin| validate_pin(pin))
                .collect::<Result<_>>()?,
            local_auth: entry.local_auth,
            allow_hosts: entry.allow_hosts.clone(),
            client_cert: entry
                .client_cert
                .as_deref()
                .map(validate_client_cert)
                .transpose()?,
            lan: match &entry.lan {
                Some(address) => Some(LanRoute::parse(
                    address,
                    &entry.lan_pins,
                    entry.lan_ca_cert.clone().map(CaCert::File),
                )?),
                None => None,
            },
        })
    }

    /// The `credproxy login` command that stores fresh credentials for this profile with the
    /// same settings, ready to paste into a shell: every scheme's own options, the CA file and
    /// pins, and `--config FILE` when the profile lives in a file other than the default.
    ///
    /// This is the one place the fix for missing or rejected credentials is written.
    pub fn login_command(&self, config_file: Option<&Path>) -> String {
        let mut words: Vec<String> = vec!["credproxy".into(), "login".into()];
        let mut flag = |name: &str, value: Cow<'_, str>| {
            words.push(name.to_owned());
            words.push(shell_word(value).into_owned());
        };
        if let Some(file) = config_file {
            flag("--config", file.to_string_lossy());
        }
        flag("--profile", self.name.as_str().into());
        flag("--server", self.server.to_string().into());
        if self.auth != Scheme::Basic {
            flag("--auth", self.auth.name().into());
        }
        for header in self.auth.stored_header_names() {
            flag("--header", header.into());
        }
        if !self.username.is_empty() {
            flag("--username", self.username.as_str().into());
        }
        if let Some(CaCert::File(path)) = &self.ca_cert {
            flag("--ca-cert", path.to_string_lossy());
        }
        for pin in &self.pins {
            flag("--pin", pin.as_str().into());
        }
        if self.listen != DEFAULT_LISTEN {
            flag("--listen", self.listen.to_string().into());
        }
        if let Some(lan) = &self.lan {
            flag("--lan", lan.url.to_string().into());
            for pin in &lan.pins {
                flag("--lan-pin", pin.as_str().into());
            }
            if let Some(CaCert::File(path)) = &lan.ca_cert {
                flag("--lan-ca", path.to_string_lossy());
            }
        }
        words.join(" ")
    }

    /// The entry to store for this profile (an app's PEM text CA is never stored).
    pub fn to_entry(&self) -> ProfileEntry {
        ProfileEntry {
            server: self.server.to_string(),
            username: self.username.clone(),
            auth: (self.auth != Scheme::Basic).then(|| self.auth.name().to_owned()),
            headers: self.auth.stored_header_names(),
            listen: (self.listen != DEFAULT_LISTEN).then(|| self.listen.to_string()),
            ca_cert: match &self.ca_cert {
                Some(CaCert::File(path)) => Some(path.clone()),
                Some(CaCert::Pem(_)) | None => None,
            },
            pins: self.pins.clone(),
            local_auth: self.local_auth,
            allow_hosts: self.allow_hosts.clone(),
            client_cert: self.client_cert.clone(),
            lan: self.lan.as_ref().map(|lan| lan.url.to_string()),
            lan_pins: self
                .lan
                .as_ref()
                .map(|lan| lan.pins.clone())
                .unwrap_or_default(),
            lan_ca_cert: match self.lan.as_ref().and_then(|lan| lan.ca_cert.as_ref()) {
                Some(CaCert::File(path)) => Some(path.clone()),
                Some(CaCert::Pem(_)) | None => None,
            },
        }
    }
}

/// Where a profile's extra CA certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaCert {
    /// A PEM file, read when the proxy starts (what the config file stores).
    File(PathBuf),
    /// PEM text handed over by an app; never written to the config file.
    Pem(String),
}

/// Checks a client certificate chain in PEM: at least one certificate, every block readable.
pub fn validate_client_cert(pem: &str) -> Result<String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let invalid = |reason: String| Error::Invalid {
        what: "client certificate",
        reason,
    };
    let mut found = 0;
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        cert.map_err(|e| {
            invalid(format!(
                "a PEM block cannot be read ({e}); log in again with --client-cert FILE"
            ))
        })?;
        found += 1;
    }
    if found == 0 {
        return Err(invalid(
            "no PEM 'CERTIFICATE' block; log in again with --client-cert FILE".to_owned(),
        ));
    }
    Ok(pem.to_owned())
}

/// Checks an SPKI pin's form (`sha256/BASE64` of 32 bytes).
pub fn validate_pin(pin: &str) -> Result<String> {
    parse_pin(pin).map_err(|reason| Error::Invalid {
        what: "pin",
        reason,
    })?;
    Ok(pin.trim().to_owned())
}

/// Parses `sha256/BASE64` (as `credproxy doctor` prints it) into the 32-byte hash.
pub fn parse_pin(pin: &str) -> Result<[u8; 32], String> {
    use base64::Engine as _;
    let encoded = pin.trim().strip_prefix("sha256/").ok_or_else(|| {
        format!("'{pin}' is not a pin: expected sha256/BASE64 as `credproxy doctor` prints it")
    })?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| format!("'{pin}' is not valid base64"))?;
    bytes
        .try_into()
        .map_err(|_| format!("'{pin}' is not a SHA-256 hash (32 bytes)"))
}

/// An `https://host[:port]` origin: the single upstream a profile is pinned to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerUrl {
    authority: Authority,
    host: String,
    port: u16,
}

impl ServerUrl {
    /// Parses and checks a server URL: https only, no credentials, path or query.
    pub fn parse(input: &str) -> Result<Self> {
        let shown = redact_userinfo(input);
        let invalid = |reason: &str| Error::Invalid {
            what: "server URL",
            reason: format!("'{shown}' {reason}; expected e.g. https://immich.example.com"),
        };
        let uri: Uri = input.trim().parse().map_err(|_| invalid("is not a URL"))?;
        match uri.scheme() {
            Some(s) if *s == uri::Scheme::HTTPS => {}
            Some(_) => {
                return Err(invalid(
                    "is not https: the credentials would travel in plain text",
                ));
            }
            None => return Err(invalid("has no scheme")),
        }
        let authority = uri.authority().ok_or_else(|| invalid("has no host"))?;
        if authority.as_str().contains('@') {
            return Err(invalid(
                "contains credentials: give the username with --username, the password at the prompt",
            ));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(invalid(
                "has a path or query: the proxy forwards whole paths to the server's root",
            ));
        }
        let host = authority
            .host()
            .trim_matches(['[', ']'])
            .to_ascii_lowercase();
        if host.is_empty() {
            return Err(invalid("has no host"));
        }
        // `http` keeps a port it cannot read ("nas:notaport") as no port at all.
        let port = match authority
            .as_str()
            .rsplit_once(':')
            .filter(|(_, after)| !after.contains(']'))
        {
            None => 443,
            Some((_, port)) => port
                .parse::<u16>()
                .ok()
                .filter(|port| *port != 0)
                .ok_or_else(|| invalid("has a port that is not a number from 1 to 65535"))?,
        };
        let authority = if port == 443 {
            authority_for(&host, None)
        } else {
            authority_for(&host, Some(port))
        }
        .ok_or_else(|| invalid("has an invalid host"))?;
        Ok(Self {
            authority,
            host,
            port,
        })
    }

    /// The authority (`host[:port]`) used for `Host` and the request URI.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The host name or address, without brackets: the TLS server name.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// `word` as one POSIX shell word: unchanged when it is plain, in single quotes otherwise.
fn shell_word(word: Cow<'_, str>) -> Cow<'_, str> {
    let plain = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"@%+=:,./_-".contains(&b));
    if plain {
        word
    } else {
        format!("'{}'", word.replace('\'', r"'\''")).into()
    }
}

/// The URL with any `user:password@` part replaced, so errors can quote it safely.
fn redact_userinfo(input: &str) -> String {
    let start = input.find("://").map_or(0, |i| i + 3);
    let end = input[start..]
        .find(['/', '?', '#'])
        .map_or(input.len(), |i| start + i);
    match input[start..end].rfind('@') {
        Some(at) => format!("{}***@{}", &input[..start], &input[start + at + 1..]),
        None => input.to_owned(),
    }
}

fn authority_for(host: &str, port: Option<u16>) -> Option<Authority> {
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    let text = match port {
        Some(port) => format!("{host}:{port}"),
        None => host,
    };
    text.parse().ok()
}

impl fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "https://{}", self.authority)
    }
}

/// Checks a profile name: it names a keyring entry and appears in commands.
pub fn validate_profile_name(name: &str) -> Result<String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(name.to_owned())
    } else {
        Err(Error::Invalid {
            what: "profile name",
            reason: format!("'{name}': use 1 to 64 letters, digits, '-', '_' or '.'"),
        })
    }
}

/// Checks an Authentik username for use in Basic credentials.
pub fn validate_username(name: &str) -> Result<String> {
    if name.is_empty() || name.contains(':') || name.chars().any(char::is_control) {
        return Err(Error::Invalid {
            what: "username",
            reason:
                "it must be the Authentik username: not empty, no ':' and no control characters"
                    .to_owned(),
        });
    }
    Ok(name.to_owned())
}

/// Parses a listen address; `localhost:PORT` means `127.0.0.1:PORT`.
pub fn parse_listen(input: &str) -> Result<SocketAddr> {
    let trimmed = input.trim();
    let parsed = match trimmed.strip_prefix("localhost:") {
        Some(port) => port
            .parse::<u16>()
            .ok()
            .map(|port| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)),
        None => trimmed.parse().ok(),
    };
    parsed.ok_or_else(|| Error::Invalid {
        what: "listen address",
        reason: format!("'{input}': expected ADDR:PORT such as 127.0.0.1:2283 or [::1]:2283"),
    })
}

/// Refuses a non-loopback address unless the caller explicitly allowed remote clients.
pub fn check_loopback(addr: SocketAddr, allow_remote: bool) -> Result<()> {
    if addr.ip().is_loopback() || allow_remote {
        Ok(())
    } else {
        Err(Error::NonLoopback { addr })
    }
}

/// The config file on disk: where it is and how to read and write it.
#[derive(Debug, Clone)]
pub struct ConfigStore {
    path: PathBuf,
    /// Named with `--config` or `CREDPROXY_CONFIG` rather than the platform default.
    explicit: bool,
}

impl ConfigStore {
    /// Uses the given file, or the platform default (`$XDG_CONFIG_HOME/credproxy/config.toml`).
    pub fn locate(explicit: Option<PathBuf>) -> Result<Self> {
        let named = explicit.is_some();
        let path = match explicit {
            Some(path) => path,
            None => dirs::config_dir()
                .ok_or(Error::NoConfigDir)?
                .join("credproxy")
                .join("config.toml"),
        };
        Ok(Self {
            path,
            explicit: named,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `credproxy ARGS` for this file, ready to paste into a shell: with `--config FILE` unless
    /// it is the default one.
    pub fn command(&self, args: &str) -> String {
        let mut words = vec!["credproxy".to_owned()];
        if self.explicit {
            let file = std::path::absolute(&self.path).unwrap_or_else(|_| self.path.clone());
            words.push("--config".to_owned());
            words.push(shell_word(file.to_string_lossy()).into_owned());
        }
        words.push(args.to_owned());
        words.join(" ")
    }

    /// The `credproxy login` command that re-creates `profile` in this file (see
    /// [`Profile::login_command`]); it names the file unless it is the default one.
    pub fn login_command(&self, profile: &Profile) -> String {
        let file = self
            .explicit
            .then(|| std::path::absolute(&self.path).unwrap_or_else(|_| self.path.clone()));
        profile.login_command(file.as_deref())
    }

    /// Reads the file; a file that does not exist yet is an empty config.
    pub fn load(&self) -> Result<ConfigFile> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ConfigFile::default()),
            Err(source) => {
                return Err(Error::ConfigRead {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        toml::from_str(&text).map_err(|e| Error::ConfigParse {
            path: self.path.clone(),
            message: e.to_string().trim().replace('\n', " "),
        })
    }

    /// Loads and validates one profile.
    pub fn profile(&self, name: &str) -> Result<Profile> {
        let file = self.load()?;
        let entry = file
            .profiles
            .get(name)
            .ok_or_else(|| Error::UnknownProfile {
                profile: name.to_owned(),
                path: self.path.clone(),
            })?;
        Profile::from_entry(name, entry)
    }

    /// Reads the file, lets `change` alter it and writes it back, as one step that no other
    /// credproxy process interleaves with: two `login`s (or a `login` and a `logout`) of
    /// different profiles at once both land. Nothing is written when `change` fails or leaves
    /// the file as it was.
    ///
    /// The lock is taken on a file beside the config (`.NAME.lock`, left in place: removing it
    /// would let a third process lock a new one while a second still holds the old). The
    /// config itself cannot carry it, as each write replaces it by rename. Readers need no
    /// lock: the rename shows them the old file or the new one, whole. Waits (blocking the
    /// thread) while another process holds the lock, which it does for milliseconds.
    pub fn update<T>(&self, change: impl FnOnce(&mut ConfigFile) -> Result<T>) -> Result<T> {
        let write_err = |source| Error::ConfigWrite {
            path: self.path.clone(),
            source,
        };
        let dir = self.dir();
        create_private_dir(&dir).map_err(write_err)?;
        let lock = self.lock_file(&dir).map_err(write_err)?;
        lock.lock().map_err(write_err)?;
        let mut file = self.load()?;
        let before = file.clone();
        let value = change(&mut file)?;
        if file != before {
            self.replace(&dir, &file).map_err(write_err)?;
        }
        // Closing the lock file releases the lock.
        drop(lock);
        Ok(value)
    }

    /// The directory the file is in.
    fn dir(&self) -> PathBuf {
        match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }

    fn file_name(&self) -> String {
        self.path
            .file_name()
            .map_or_else(|| "config".into(), |n| n.to_string_lossy().into_owned())
    }

    /// Opens (creating it, owner-only) the lock file beside the config; never through a
    /// symbolic link, which could point anywhere.
    fn lock_file(&self, dir: &Path) -> std::io::Result<std::fs::File> {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            options.mode(0o600).custom_flags(libc::O_NOFOLLOW);
        }
        options.open(dir.join(format!(".{}.lock", self.file_name())))
    }

    /// Replaces the file with `file`: written to a temporary file that is created anew in the
    /// same directory (an unpredictable name, opened exclusively: nothing planted there
    /// beforehand is written through), readable by the owner only, synced, then renamed over
    /// the old file, whatever that file's mode was.
    fn replace(&self, dir: &Path, file: &ConfigFile) -> std::io::Result<()> {
        let text =
            toml::to_string_pretty(file).map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut tmp = tempfile::Builder::new()
            .prefix(&format!(".{}.", self.file_name()))
            .suffix(".tmp")
            .tempfile_in(dir)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            // tempfile creates it 0600 already; a umask cannot have widened that, this makes
            // the rule plain.
            tmp.as_file()
                .set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
        tmp.write_all(b"# credproxy settings; secrets live in the OS keyring, never here.\n")?;
        tmp.write_all(text.as_bytes())?;
        tmp.as_file().sync_all()?;
        // On failure the temporary file is removed when `tmp` drops.
        tmp.persist(&self.path).map_err(|e| e.error)?;
        Ok(())
    }
}

/// Creates `dir` and its missing parents, the new ones private to the owner (mode 0700).
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_url_accepts_https_origins_only() {
        let url = ServerUrl::parse("https://Immich.Example.com/").unwrap();
        assert_eq!(url.to_string(), "https://immich.example.com");
        assert_eq!(url.host(), "immich.example.com");
        assert_eq!(url.port(), 443);
        let url = ServerUrl::parse("https://photos.lan:8443").unwrap();
        assert_eq!(url.authority().as_str(), "photos.lan:8443");
        let url = ServerUrl::parse("https://[::1]:9443").unwrap();
        assert_eq!(url.host(), "::1");
        assert_eq!(url.authority().as_str(), "[::1]:9443");
        for bad in [
            "http://immich.example.com",
            "immich.example.com",
            "https://user:pw@immich.example.com",
            "https://immich.example.com/immich",
            "https://immich.example.com/?a=b",
            "https://immich.example.com:https",
            "https://immich.example.com:0",
            "https://immich.example.com:70000",
            "not a url",
        ] {
            let err = ServerUrl::parse(bad).unwrap_err();
            assert!(err.is_usage(), "{bad}: {err}");
            assert!(!err.to_string().contains("pw@"), "{err}");
        }
    }

    #[test]
    fn usernames_and_profile_names_are_checked() {
        assert!(validate_username("svc-laptop").is_ok());
        assert!(validate_username("a:b").is_err());
        assert!(validate_username("").is_err());
        assert!(validate_profile_name("work.laptop-2").is_ok());
        assert!(validate_profile_name("../etc").is_err());
        assert!(validate_profile_name("").is_err());
    }

    #[test]
    fn listen_addresses_and_loopback_rule() {
        assert_eq!(
            parse_listen("localhost:80").unwrap().to_string(),
            "127.0.0.1:80"
        );
        assert_eq!(
            parse_listen("[::1]:2283").unwrap().to_string(),
            "[::1]:2283"
        );
        assert!(parse_listen("2283").is_err());
        assert!(check_loopback(parse_listen("127.0.0.2:1").unwrap(), false).is_ok());
        let remote = parse_listen("0.0.0.0:2283").unwrap();
        assert!(matches!(
            check_loopback(remote, false),
            Err(Error::NonLoopback { .. })
        ));
        assert!(check_loopback(remote, true).is_ok());
    }

    #[test]
    fn config_round_trips_through_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store = ConfigStore::locate(Some(dir.path().join("sub/config.toml"))).unwrap();
        assert_eq!(store.load().unwrap(), ConfigFile::default());
        let profile = Profile {
            name: "work".into(),
            server: ServerUrl::parse("https://immich.example.com").unwrap(),
            username: "svc".into(),
            auth: Scheme::Basic,
            listen: parse_listen("127.0.0.1:3000").unwrap(),
            ca_cert: Some(CaCert::File("/etc/ca.pem".into())),
            pins: vec!["sha256/47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=".into()],
            local_auth: true,
            allow_hosts: vec!["photos.lan".into()],
            client_cert: None,
            lan: None,
        };
        store
            .update(|file| {
                file.profiles.insert("work".into(), profile.to_entry());
                Ok(())
            })
            .unwrap();
        assert_eq!(store.profile("work").unwrap(), profile);
        assert!(matches!(
            store.profile("home"),
            Err(Error::UnknownProfile { .. })
        ));
        std::fs::write(store.path(), "profiles = 3").unwrap();
        assert!(matches!(store.load(), Err(Error::ConfigParse { .. })));
    }

    fn entry(server: &str) -> ProfileEntry {
        let mut entry = profile(Scheme::Basic, "svc").to_entry();
        entry.server = server.to_owned();
        entry
    }

    #[cfg(unix)]
    #[test]
    fn a_rewritten_config_is_owner_only_even_when_it_was_readable_by_others() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let store = ConfigStore::locate(Some(dir.path().join("config.toml"))).unwrap();
        std::fs::write(
            store.path(),
            "[profiles.home]\nserver = \"https://immich.example.com\"\nusername = \"svc\"\n",
        )
        .unwrap();
        std::fs::set_permissions(store.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
        store
            .update(|file| {
                file.profiles
                    .insert("work".into(), entry("https://photos.example.com"));
                Ok(())
            })
            .unwrap();
        let mode = std::fs::metadata(store.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        let file = store.load().unwrap();
        assert_eq!(
            file.profiles.keys().collect::<Vec<_>>(),
            ["home", "work"],
            "the profile already there is kept"
        );
    }

    #[cfg(unix)]
    #[test]
    fn nothing_planted_beside_the_config_is_written_through() {
        // A link planted where a predictable temporary name would be (this process's id) must
        // not lead the write to another file.
        let dir = tempfile::tempdir().unwrap();
        let store = ConfigStore::locate(Some(dir.path().join("config.toml"))).unwrap();
        let victim = dir.path().join("victim.txt");
        std::fs::write(&victim, "keep me").unwrap();
        for name in [
            format!(".config.toml.tmp{}", std::process::id()),
            ".config.toml.lock".to_owned(),
        ] {
            std::os::unix::fs::symlink(&victim, dir.path().join(name)).unwrap();
        }
        let written = store.update(|file| {
            file.profiles
                .insert("home".into(), entry("https://immich.example.com"));
            Ok(())
        });
        // A planted lock link is refused rather than followed; either way the victim stays.
        assert!(written.is_err(), "the planted lock file was followed");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
        std::fs::remove_file(dir.path().join(".config.toml.lock")).unwrap();
        store
            .update(|file| {
                file.profiles
                    .insert("home".into(), entry("https://immich.example.com"));
                Ok(())
            })
            .unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
        let meta = std::fs::symlink_metadata(store.path()).unwrap();
        assert!(meta.file_type().is_file(), "{meta:?}");
        assert!(store.profile("home").is_ok());
    }

    #[test]
    fn an_update_that_fails_or_changes_nothing_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = ConfigStore::locate(Some(dir.path().join("config.toml"))).unwrap();
        let unchanged = store.update(|file| Ok(file.profiles.remove("home").is_some()));
        assert!(!unchanged.unwrap());
        assert!(!store.path().exists());
        let failed: Result<()> = store.update(|file| {
            file.profiles
                .insert("home".into(), entry("https://immich.example.com"));
            Err(Error::NoConfigDir)
        });
        assert!(failed.is_err());
        assert!(!store.path().exists());
    }

    #[test]
    fn concurrent_updates_of_different_profiles_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let store = ConfigStore::locate(Some(path.clone())).unwrap();
                std::thread::spawn(move || {
                    store
                        .update(|file| {
                            file.profiles
                                .insert(format!("p{i}"), entry("https://immich.example.com"));
                            Ok(())
                        })
                        .unwrap();
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let store = ConfigStore::locate(Some(path)).unwrap();
        assert_eq!(store.load().unwrap().profiles.len(), 16);
    }

    fn profile(auth: Scheme, username: &str) -> Profile {
        Profile {
            name: "home".into(),
            server: ServerUrl::parse("https://immich.example.com").unwrap(),
            username: username.into(),
            auth,
            listen: DEFAULT_LISTEN,
            ca_cert: None,
            pins: Vec::new(),
            local_auth: false,
            allow_hosts: Vec::new(),
            client_cert: None,
            lan: None,
        }
    }

    #[test]
    fn the_login_command_carries_each_schemes_options() {
        assert_eq!(
            profile(Scheme::Basic, "svc").login_command(None),
            "credproxy login --profile home --server https://immich.example.com --username svc"
        );
        assert_eq!(
            profile(Scheme::CloudflareAccess, "").login_command(None),
            "credproxy login --profile home --server https://immich.example.com --auth cloudflare-access"
        );
        let pangolin = Scheme::new(
            "header",
            &["P-Access-Token-Id".into(), "P-Access-Token".into()],
        )
        .unwrap();
        let mut p = profile(pangolin, "");
        p.ca_cert = Some(CaCert::File("/etc/my ca/it's.pem".into()));
        p.pins = vec!["sha256/47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=".into()];
        p.listen = parse_listen("127.0.0.1:3000").unwrap();
        assert_eq!(
            p.login_command(Some(Path::new("/home/u/cfg.toml"))),
            "credproxy login --config /home/u/cfg.toml --profile home \
             --server https://immich.example.com --auth header --header p-access-token-id \
             --header p-access-token --ca-cert '/etc/my ca/it'\\''s.pem' \
             --pin sha256/47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU= --listen 127.0.0.1:3000"
        );
        // An app's PEM text never appears on a command line.
        p.ca_cert = Some(CaCert::Pem("-----BEGIN CERTIFICATE-----".into()));
        assert!(!p.login_command(None).contains("--ca-cert"));
        assert_eq!(
            profile(Scheme::Basic, "svc laptop").login_command(None),
            "credproxy login --profile home --server https://immich.example.com --username 'svc laptop'"
        );
    }

    #[test]
    fn lan_addresses_are_https_with_443_by_default_and_http_is_refused_with_the_reason() {
        for (given, shown) in [
            ("192.168.1.10", "https://192.168.1.10"),
            ("192.168.1.10:8443", "https://192.168.1.10:8443"),
            ("https://192.168.1.10:443", "https://192.168.1.10"),
            ("[fd00::2]", "https://[fd00::2]"),
            ("HTTPS://NAS.lan", "https://nas.lan"),
        ] {
            let lan = LanRoute::parse(given, &[], None).unwrap();
            assert_eq!(lan.url.to_string(), shown, "{given}");
        }
        assert_eq!(
            LanRoute::parse("192.168.1.10", &[], None)
                .unwrap()
                .url
                .port(),
            443
        );
        let err = LanRoute::parse("http://192.168.1.10", &[], None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not https"), "{err}");
        assert!(err.contains("API key"), "{err}");
        let err = LanRoute::parse("ftp://user:secret@nas", &[], None)
            .unwrap_err()
            .to_string();
        assert!(!err.contains("secret"), "{err}");
        for bad in ["192.168.1.10/photos", "https://", "nas:notaport"] {
            let err = LanRoute::parse(bad, &[], None).unwrap_err().to_string();
            assert!(err.contains("LAN address"), "{bad}: {err}");
            assert!(err.contains("192.168.1.10"), "{bad}: {err}");
        }
        assert!(LanRoute::parse("192.168.1.10", &["sha256/nope".into()], None).is_err());
    }

    #[test]
    fn a_lan_route_round_trips_through_the_file_and_the_login_command() {
        let mut profile = profile(Scheme::Basic, "svc");
        let pin = format!("sha256/{}", "A".repeat(43) + "=");
        profile.lan = Some(
            LanRoute::parse(
                "192.168.1.10:8443",
                std::slice::from_ref(&pin),
                Some(CaCert::File("/etc/lan-ca.pem".into())),
            )
            .unwrap(),
        );
        let entry = profile.to_entry();
        assert_eq!(entry.lan.as_deref(), Some("https://192.168.1.10:8443"));
        assert_eq!(Profile::from_entry(&profile.name, &entry).unwrap(), profile);
        let command = profile.login_command(None);
        assert!(
            command.contains(&format!(
                "--lan https://192.168.1.10:8443 --lan-pin {pin} --lan-ca /etc/lan-ca.pem"
            )),
            "{command}"
        );
    }
}
