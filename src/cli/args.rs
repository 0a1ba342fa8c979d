//! Command-line types (clap) only: parsing, no behaviour.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::DEFAULT_PROFILE;

/// credproxy: a loopback proxy that adds Authentik credentials from the OS keyring to every
/// request for an Authentik-fronted Immich server.
#[derive(Debug, Parser)]
#[command(name = "credproxy", version, about, long_about = None)]
pub struct Cli {
    /// Config file (non-secret settings); default: the platform config directory.
    #[arg(long, global = true, env = "CREDPROXY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Store a service account's app password in the OS keyring and save the profile.
    Login(Box<LoginArgs>),
    /// Run the proxy for a profile until SIGINT/SIGTERM.
    Serve(ServeArgs),
    /// Remove a profile and its keyring entry.
    Logout(ProfileArgs),
    /// List profiles (server, username, listen address), never secrets; or print one
    /// profile's local URL with its local credential (--show-token).
    Profiles(ProfilesArgs),
    /// Check every step from config and keyring to TLS, the gate, Immich and websockets.
    Doctor(ProfileArgs),
    /// Show the proxy working against a built-in local stand-in for an Authentik-gated Immich.
    Demo(DemoArgs),
    /// Run `serve` for a profile at logon: a systemd user unit (Linux) or launchd agent (macOS).
    Service(ServiceArgs),
    /// Print a shell completion script to standard output.
    Completions(CompletionsArgs),
    /// Print the man page (roff) to standard output, or write one page per command.
    Man(ManArgs),
}

/// Arguments of `login`.
#[derive(Debug, Args)]
pub struct LoginArgs {
    /// The Authentik-fronted Immich URL, e.g. https://immich.example.com.
    #[arg(long, value_name = "URL")]
    pub server: String,
    /// The Authentik service account's username (needed for --auth basic).
    #[arg(long, value_name = "NAME")]
    pub username: Option<String>,
    /// How the gate authenticates: basic (Authentik app password), cloudflare-access (service
    /// token id and secret), header (values for the --header names) or none (the client
    /// certificate alone).
    #[arg(long, default_value = "basic", value_name = "SCHEME")]
    pub auth: String,
    /// A header the `header` scheme sets (repeatable, e.g. P-Access-Token-Id, P-Access-Token).
    #[arg(long = "header", value_name = "NAME")]
    pub headers: Vec<String>,
    /// Profile name (also the keyring account).
    #[arg(long, default_value = DEFAULT_PROFILE, value_name = "NAME")]
    pub profile: String,
    /// Extra CA certificate (PEM) to trust for this server, e.g. a homelab CA.
    #[arg(long, value_name = "PEM_FILE")]
    pub ca_cert: Option<PathBuf>,
    /// Read the secret from standard input instead of a hidden prompt (one line per value; a
    /// PKCS#12 --client-cert's password on one more line).
    #[arg(long)]
    pub password_stdin: bool,
    /// Store without checking the credentials against the server.
    #[arg(long)]
    pub no_verify: bool,
    /// Listen address to save for `serve` (default 127.0.0.1:2283).
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<String>,
    /// A client certificate to present to the server: PEM (chain and key, or the key in
    /// --client-key) or PKCS#12 (.p12/.pfx; its password is asked for like the app password).
    /// The key goes to the keyring: the file may be deleted afterwards.
    #[arg(long, value_name = "FILE")]
    pub client_cert: Option<PathBuf>,
    /// The private key (PEM) of a PEM --client-cert that does not hold it.
    #[arg(long, value_name = "FILE", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// Accept only a server key with this SPKI pin (as `credproxy doctor` prints it); a pinned
    /// self-signed certificate needs no CA. Repeat for a key rollover.
    #[arg(long = "pin", value_name = "sha256/BASE64")]
    pub pins: Vec<String>,
    /// A LAN address of the same server (192.168.1.10[:PORT], a LAN host name, or its https://
    /// URL), used while it answers. Its certificate must be the server's, for the public name,
    /// unless --lan-pin or --lan-ca say otherwise; plain http:// is refused.
    #[arg(long, value_name = "ADDRESS")]
    pub lan: Option<String>,
    /// Accept this key pin from the LAN address (a LAN front with a certificate of its own).
    #[arg(long = "lan-pin", value_name = "sha256/BASE64", requires = "lan")]
    pub lan_pins: Vec<String>,
    /// Accept a certificate for the LAN host name or address from this CA (PEM).
    #[arg(long = "lan-ca", value_name = "PEM_FILE", requires = "lan")]
    pub lan_ca: Option<PathBuf>,
}

/// Arguments of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Profile to serve; repeat to serve several, each on its own listen address.
    #[arg(long = "profile", value_name = "NAME")]
    pub profiles: Vec<String>,
    /// Listen address, overriding the profile's (default 127.0.0.1:2283); one profile only.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<String>,
    /// Allow a non-loopback listen address: anyone who can reach it acts with your credentials.
    #[arg(long)]
    pub allow_remote: bool,
    /// Require a local credential from clients (kept in the keyring; the local URL is printed
    /// at start on a terminal, and by `credproxy profiles --show-token`).
    #[arg(long)]
    pub local_auth: bool,
    /// Also serve requests whose Host is NAME (or NAME:PORT); loopback names are always served.
    #[arg(long = "allow-host", value_name = "NAME")]
    pub allow_hosts: Vec<String>,
    /// Client connections served at once; more are refused with 503.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    pub max_connections: usize,
    /// Threads that serve, all in one event loop (a multi-thread runtime when more than one)
    /// [default: the number of CPUs, at most 4].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: Option<u16>,
    /// Serve /healthz and Prometheus /metrics on this loopback address (never a proxied port).
    #[arg(long, value_name = "ADDR:PORT")]
    pub admin: Option<String>,
}

/// Arguments of `profiles`.
#[derive(Debug, Args)]
pub struct ProfilesArgs {
    /// Print the local URL of one profile with its local credential (what clients of
    /// `serve --local-auth` use; keep it private), instead of the list.
    #[arg(long)]
    pub show_token: bool,
    /// The profile whose local URL --show-token prints.
    #[arg(long, default_value = DEFAULT_PROFILE, value_name = "NAME", requires = "show_token")]
    pub profile: String,
}

/// A profile selector.
#[derive(Debug, Args)]
pub struct ProfileArgs {
    /// Profile name.
    #[arg(long, default_value = DEFAULT_PROFILE, value_name = "NAME")]
    pub profile: String,
}

/// Arguments of `demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where the demo proxy listens (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR:PORT")]
    pub listen: String,
    /// Keep the stand-in and proxy running after the demonstration, until Ctrl-C.
    #[arg(long)]
    pub keep_running: bool,
}

/// Arguments of `service`.
#[derive(Debug, Args)]
pub struct ServiceArgs {
    /// What to do with the service.
    #[command(subcommand)]
    pub action: ServiceAction,
}

/// The `service` subcommands.
#[derive(Debug, Subcommand)]
pub enum ServiceAction {
    /// Write the service for a profile, enable it and (re)start it.
    Install(ProfileArgs),
    /// Stop and disable a profile's service and remove its file.
    Uninstall(ProfileArgs),
    /// Show whether a profile's service is installed, current and running.
    Status(ProfileArgs),
}

/// Arguments of `man`.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write a page per command into DIR (credproxy.1, credproxy-login.1,
    /// credproxy-service-install.1, …) instead of printing credproxy(1).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// Arguments of `completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}
