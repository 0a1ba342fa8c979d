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
    Login(LoginArgs),
    /// Run the proxy for a profile until SIGINT/SIGTERM.
    Serve(ServeArgs),
    /// Remove a profile and its keyring entry.
    Logout(ProfileArgs),
    /// List profiles (server, username, listen address); never secrets.
    Profiles,
    /// Check every step from config and keyring to TLS, the gate, Immich and websockets.
    Doctor(ProfileArgs),
    /// Show the proxy working against a built-in local stand-in for an Authentik-gated Immich.
    Demo(DemoArgs),
}

/// Arguments of `login`.
#[derive(Debug, Args)]
pub struct LoginArgs {
    /// The Authentik-fronted Immich URL, e.g. https://immich.example.com.
    #[arg(long, value_name = "URL")]
    pub server: String,
    /// The Authentik service account's username.
    #[arg(long, value_name = "NAME")]
    pub username: String,
    /// Profile name (also the keyring account).
    #[arg(long, default_value = DEFAULT_PROFILE, value_name = "NAME")]
    pub profile: String,
    /// Extra CA certificate (PEM) to trust for this server, e.g. a homelab CA.
    #[arg(long, value_name = "PEM_FILE")]
    pub ca_cert: Option<PathBuf>,
    /// Read the app password from standard input instead of a hidden prompt.
    #[arg(long)]
    pub password_stdin: bool,
    /// Store without checking the credentials against the server.
    #[arg(long)]
    pub no_verify: bool,
    /// Listen address to save for `serve` (default 127.0.0.1:2283).
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<String>,
    /// Accept only a server key with this SPKI pin (as `credproxy doctor` prints it); a pinned
    /// self-signed certificate needs no CA. Repeat for a key rollover.
    #[arg(long = "pin", value_name = "sha256/BASE64")]
    pub pins: Vec<String>,
}

/// Arguments of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Profile to serve.
    #[arg(long, default_value = DEFAULT_PROFILE, value_name = "NAME")]
    pub profile: String,
    /// Listen address, overriding the profile's (default 127.0.0.1:2283).
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<String>,
    /// Allow a non-loopback listen address: anyone who can reach it acts with your credentials.
    #[arg(long)]
    pub allow_remote: bool,
    /// Require a local credential from clients (kept in the keyring; the URL is printed once).
    #[arg(long)]
    pub local_auth: bool,
    /// Also serve requests whose Host is NAME (or NAME:PORT); loopback names are always served.
    #[arg(long = "allow-host", value_name = "NAME")]
    pub allow_hosts: Vec<String>,
    /// Client connections served at once; more are refused with 503.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    pub max_connections: usize,
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
