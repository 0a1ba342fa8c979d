//! `credproxy demo`: a local stand-in for an Authentik-gated Immich host over TLS, the proxy in
//! front of it, and requests that show what a client sees with and without credproxy.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::{CliError, Result};
use crate::config::{self, ServerUrl};
use crate::credentials::{Scheme, Secret, basic_value};
use crate::diagnose::check::{Checker, PING_PATH};
use crate::error::Error;
use crate::proxy::gate::OUTPOST_START;
use crate::proxy::{Proxy, ProxySettings};
use crate::serve::{self, ServeOptions, Site};
use crate::upstream::{ClientOptions, TlsTrust};

/// `GET path` from the proxy at `addr`, as a client with no credentials would send it.
async fn get_local(addr: SocketAddr, path: &str) -> Result<(StatusCode, String), hyper::Error> {
    let stream = match tokio::net::TcpStream::connect(addr).await {
        Ok(stream) => stream,
        Err(e) => return Ok((StatusCode::BAD_GATEWAY, e.to_string())),
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(conn);
    let request = Request::get(path)
        .header(header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .expect("a path and a socket address make a request");
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    driver.abort();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The stand-in's service account.
const DEMO_USERNAME: &str = "svc-demo";

/// A running stand-in gated host: TLS on loopback, its CA, and the one valid credential.
pub struct StandIn {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its CA certificate in PEM, to trust it.
    pub ca_pem: String,
    /// The app password it accepts for [`DEMO_USERNAME`].
    pub password: Secret,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StandIn {
    /// Starts the stand-in on an already-bound listener, with a fresh CA and password.
    pub fn start(listener: TcpListener) -> Result<Self> {
        let demo_err =
            |e: &dyn std::fmt::Display| CliError::Demo(format!("cannot make its certificate: {e}"));
        let ca_key = KeyPair::generate().map_err(|e| demo_err(&e))?;
        let mut ca_params =
            CertificateParams::new(Vec::<String>::new()).map_err(|e| demo_err(&e))?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "credproxy demo CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key).map_err(|e| demo_err(&e))?;
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().map_err(|e| demo_err(&e))?;
        let leaf = CertificateParams::new(vec!["localhost".to_owned()])
            .and_then(|p| p.signed_by(&leaf_key, &issuer))
            .map_err(|e| demo_err(&e))?;
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .and_then(|b| {
            b.with_no_client_auth().with_single_cert(
                vec![leaf.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
            )
        })
        .map_err(|e| demo_err(&e))?;
        let password = Secret::random();
        let expected = basic_value(DEMO_USERNAME, &password);
        let addr = listener.local_addr().map_err(|source| Error::Listen {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            source,
        })?;
        let acceptor = TlsAcceptor::from(Arc::new(tls));
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let expected = expected.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |req| {
                        let answer = gated_immich(&req, &expected);
                        async move { Ok::<_, Infallible>(answer) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Ok(Self {
            addr,
            ca_pem: ca_cert.pem(),
            password,
            task,
        })
    }

    /// The stand-in's URL (by name, so TLS verifies the name `localhost`).
    pub fn url(&self) -> ServerUrl {
        ServerUrl::parse(&format!("https://localhost:{}", self.addr.port()))
            .expect("a localhost URL with a port is valid")
    }
}

/// What the Authentik outpost and Immich behind it would answer.
fn gated_immich(req: &Request<Incoming>, expected: &http::HeaderValue) -> Response<Full<Bytes>> {
    match req.headers().get(header::AUTHORIZATION) {
        None => Response::builder()
            .status(StatusCode::FOUND)
            .header(
                header::LOCATION,
                format!("{OUTPOST_START}?rd={}", req.uri().path()),
            )
            .body(Full::default()),
        Some(value) if value != expected => Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
            .body(Full::from(
                "<html><body>Due to &#39;Receive header authentication&#39; being set, no redirect is performed.</body></html>",
            )),
        Some(_) => {
            let body = match req.uri().path() {
                PING_PATH => r#"{"res":"pong"}"#,
                "/api/server/version" => r#"{"major":2,"minor":3,"patch":1}"#,
                "/.well-known/immich" => r#"{"api":{"endpoint":"/api"}}"#,
                _ => {
                    return Response::builder()
                        .status(StatusCode::NOT_FOUND)
                        .header(header::CONTENT_TYPE, "application/json")
                        .body(Full::from(r#"{"message":"Not Found","statusCode":404}"#))
                        .expect("static response");
                }
            };
            Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::from(body))
        }
    }
    .expect("static response parts are valid")
}

/// Runs the demonstration; fails if anything does not behave as expected.
pub async fn run(listen: &str, keep_running: bool) -> Result<()> {
    let listen = config::parse_listen(listen)?;
    config::check_loopback(listen, false)?;
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let standin = StandIn::start(super::bind(loopback).await?)?;
    let server = standin.url();
    let trust = TlsTrust::public()
        .with_ca_pem(standin.ca_pem.as_bytes())
        .map_err(CliError::Demo)?;
    println!("1. Started a stand-in for an Authentik-gated Immich at {server}");
    println!("   (its own test CA; service account '{DEMO_USERNAME}' with a random app password)");

    let checker = Checker::new(
        server.clone(),
        trust.client_config(&[b"http/1.1"], None)?,
        Duration::from_secs(5),
    );
    let direct = checker.get(PING_PATH, None).await?;
    let location = direct
        .headers
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    println!("2. Without credproxy, a client asking {PING_PATH} gets:");
    println!("   HTTP {} -> {location}", direct.status.as_u16());
    let without_ok = direct.status == StatusCode::FOUND && location.starts_with(OUTPOST_START);

    let settings = ProxySettings {
        profile: "demo".to_owned(),
        server: server.clone(),
        username: DEMO_USERNAME.to_owned(),
        trust,
        client: ClientOptions::default(),
        idle_timeout: Duration::from_secs(60),
        fix: "run `credproxy demo` again: it makes a fresh stand-in and password".to_owned(),
        identity: None,
        certificate_fix: "the demo's stand-in wants no client certificate".to_owned(),
        lan: None,
    };
    let proxy = Proxy::with_secret(settings, &Scheme::Basic, &standin.password)?;
    let listener = super::bind(listen).await?;
    let local = listener.local_addr().map_err(|source| Error::Listen {
        addr: listen,
        source,
    })?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(serve::run(
        listener,
        Site::new(proxy),
        ServeOptions::default(),
        async move {
            let _ = stop_rx.await;
        },
    ));
    println!("3. credproxy listens on http://{local} and adds the credentials from its store");

    let mut through_ok = true;
    for path in [PING_PATH, "/api/server/version"] {
        let (status, body) = match get_local(local, path).await {
            Ok(answer) => answer,
            Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()),
        };
        println!(
            "   GET {path} through credproxy -> HTTP {} {body}",
            status.as_u16()
        );
        through_ok &= status == StatusCode::OK;
    }

    if keep_running {
        println!(
            "4. Running until Ctrl-C: try `curl http://{local}{PING_PATH}` or point the Immich CLI at http://{local}"
        );
        super::shutdown_signal().await;
    }
    let _ = stop_tx.send(());
    let _ = serving.await;
    if without_ok && through_ok {
        println!("OK: the gate refused the bare request and let the proxied ones through.");
        Ok(())
    } else {
        Err(CliError::Demo(
            "the requests did not behave as expected (see above)".to_owned(),
        ))
    }
}
