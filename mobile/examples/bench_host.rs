//! The process `mobile/bench.sh` measures: `upstream` runs the library's stand-in gated host;
//! `proxy` runs nothing but the mobile library (start-to-listening times, then idles on a port).
//!
//! `bench_host upstream` prints one line `URL PASSWORD` and writes the CA to `$BENCH_CA_FILE`;
//! `bench_host proxy` reads `BENCH_URL`, `BENCH_PASSWORD`, `BENCH_CA_FILE`, prints its timings
//! and `ready PORT`, idles until its standard input closes, then prints `served REQUESTS BYTES`.

use std::error::Error;
use std::io::{BufRead, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use credproxy_mobile::{
    CredentialProvider, Credentials, MobileError, ProxyConfig, ProxyHandle, start_proxy,
};

/// Start/stop cycles timed after the first (cold) start.
const WARM_STARTS: usize = 50;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

struct Password(String);

impl CredentialProvider for Password {
    fn app_password(
        &self,
        _: String,
        _: String,
    ) -> std::result::Result<Option<String>, MobileError> {
        Ok(Some(self.0.clone()))
    }

    fn client_certificate(
        &self,
        _: String,
    ) -> std::result::Result<Option<credproxy_mobile::ClientCertificate>, MobileError> {
        Ok(None)
    }
}

fn env(name: &str) -> Result<String> {
    std::env::var(name).map_err(|_| format!("{name} is not set").into())
}

fn config(port: u16) -> Result<ProxyConfig> {
    Ok(ProxyConfig {
        server_url: env("BENCH_URL")?,
        username: "svc-demo".to_owned(),
        credentials: Credentials::Provider {
            provider: Arc::new(Password(env("BENCH_PASSWORD")?)),
        },
        auth: None,
        listen_port: port,
        ca_pem: Some(std::fs::read_to_string(env("BENCH_CA_FILE")?)?),
        pin: None,
        local_auth: false,
        local_token: None,
        // A LAN route (mobile/bench.sh measures idle wake-ups with one configured).
        lan_address: std::env::var("BENCH_LAN").ok(),
        lan_pin: None,
        lan_ca_pem: None,
    })
}

/// Starts the proxy; returns it, the time `start_proxy` took, and until a connect succeeded.
fn timed_start() -> Result<(Arc<ProxyHandle>, Duration, Duration)> {
    let config = config(0)?;
    let start = Instant::now();
    let handle = start_proxy(config)?;
    let returned = start.elapsed();
    TcpStream::connect(("127.0.0.1", handle.port()))?;
    Ok((handle, returned, start.elapsed()))
}

fn micros(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e6)
}

fn proxy() -> Result<()> {
    let (handle, cold_return, cold_connect) = timed_start()?;
    handle.stop();
    let mut warm = Vec::with_capacity(WARM_STARTS);
    for _ in 0..WARM_STARTS {
        let (handle, returned, connected) = timed_start()?;
        handle.stop();
        warm.push((returned, connected));
    }
    warm.sort();
    let median = warm[warm.len() / 2];
    let max = warm.iter().map(|w| w.1).max().unwrap_or_default();
    println!(
        "cold_start_us {} {}",
        micros(cold_return),
        micros(cold_connect)
    );
    println!(
        "warm_start_median_us {} {}",
        micros(median.0),
        micros(median.1)
    );
    println!("warm_start_max_connect_us {}", micros(max));
    let (handle, _, _) = timed_start()?;
    println!("ready {}", handle.port());
    std::io::stdout().flush()?;
    // Idle: a blocking read, so the only threads that could wake are the library's.
    for _ in std::io::stdin().lock().lines() {}
    let stats = handle.stats();
    println!(
        "served {} {} {}",
        stats.requests,
        stats.bytes_down,
        stats.route.as_deref().unwrap_or("none")
    );
    handle.stop();
    Ok(())
}

fn upstream() -> Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let stand_in = credproxy::cli::demo::StandIn::start(listener)?;
        std::fs::write(env("BENCH_CA_FILE")?, &stand_in.ca_pem)?;
        println!("{} {}", stand_in.url(), stand_in.password.expose());
        std::io::stdout().flush()?;
        tokio::task::spawn_blocking(|| for _ in std::io::stdin().lock().lines() {}).await?;
        Ok(())
    })
}

fn main() -> Result<()> {
    match std::env::args().nth(1).as_deref() {
        Some("proxy") => proxy(),
        Some("upstream") => upstream(),
        _ => Err("usage: bench_host proxy|upstream (run by mobile/bench.sh)".into()),
    }
}
