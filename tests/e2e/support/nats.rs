//! nats-server for `--ingest-mode jetstream`: one per test, with JetStream, on a free loopback
//! port and a store of its own, optionally requiring TLS ([`NatsCerts`]) or with a
//! configuration file (users and their permissions: [`NatsServer::start_with_config`]), and
//! restartable on the same port and store for the tests of a NATS outage. Built by
//! `hack/nats.sh build` (hack/test.sh does it first).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use super::{eventually, free_port, repo_root};

/// A nats-server with JetStream on a free loopback port and its own store, stopped on drop.
pub struct NatsServer {
    child: std::process::Child,
    pub url: String,
    store: PathBuf,
}

/// A CA and a serving certificate for 127.0.0.1 it signed, as PEM files in `dir`.
pub struct NatsCerts {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl NatsCerts {
    pub fn new(dir: &Path) -> NatsCerts {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer =
            rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        std::fs::create_dir_all(dir).unwrap();
        let certs = NatsCerts {
            ca: dir.join("ca.crt"),
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
        };
        std::fs::write(&certs.ca, issuer.pem()).unwrap();
        std::fs::write(&certs.cert, cert.pem()).unwrap();
        std::fs::write(&certs.key, key.serialize_pem()).unwrap();
        certs
    }
}

/// The nats-server binary, built (or found cached) by `hack/nats.sh build`.
pub fn nats_server_bin() -> PathBuf {
    let bin = std::process::Command::new(repo_root().join("hack/nats.sh"))
        .arg("build")
        .output()
        .expect("hack/nats.sh runs");
    assert!(bin.status.success(), "hack/nats.sh build failed: {bin:?}");
    PathBuf::from(String::from_utf8(bin.stdout).unwrap().trim()).join("nats-server")
}

/// Starts nats-server with JetStream on loopback `port` and `store`, with `extra` arguments.
fn spawn(bin: &Path, port: u16, store: &Path, extra: &[String]) -> std::process::Child {
    std::process::Command::new(bin)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(store)
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("nats-server starts")
}

impl NatsServer {
    /// The server's process id: the throughput bench reads its CPU time beside the operator's.
    #[allow(dead_code)]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn start() -> NatsServer {
        Self::start_with(|_| Vec::new()).await
    }

    /// A nats-server that requires TLS, with a certificate for 127.0.0.1 signed by its own CA
    /// (in the returned [`NatsCerts`]).
    pub async fn start_tls() -> (NatsServer, NatsCerts) {
        let mut certs = None;
        let server = Self::start_with(|store| {
            let made = NatsCerts::new(&store.join("certs"));
            let args = vec![
                "--tls".into(),
                "--tlscert".into(),
                made.cert.display().to_string(),
                "--tlskey".into(),
                made.key.display().to_string(),
            ];
            certs = Some(made);
            args
        })
        .await;
        (server, certs.unwrap())
    }

    /// A nats-server reading `config` (nats-server's configuration format: users, accounts,
    /// permissions) from a file in its store; the command line's JetStream, address, port and
    /// store still apply. It logs to a file, read by [`NatsServer::log_text`].
    pub async fn start_with_config(config: &str) -> NatsServer {
        Self::start_with(|store| {
            std::fs::create_dir_all(store).unwrap();
            let path = store.join("nats-server.conf");
            std::fs::write(&path, config).unwrap();
            vec![
                "-c".into(),
                path.display().to_string(),
                "-l".into(),
                Self::log_path(store).display().to_string(),
            ]
        })
        .await
    }

    fn log_path(store: &Path) -> PathBuf {
        store.join("nats-server.log")
    }

    /// What the server logged so far, when started with [`NatsServer::start_with_config`]
    /// (empty otherwise).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(Self::log_path(&self.store)).unwrap_or_default()
    }

    /// The server's URL with a user and password (`nats://user:password@127.0.0.1:port`).
    pub fn url_as(&self, user: &str, password: &str) -> String {
        self.url
            .replacen("nats://", &format!("nats://{user}:{password}@"), 1)
    }

    /// `extra`: more arguments, given the server's store directory.
    async fn start_with(extra: impl FnOnce(&Path) -> Vec<String>) -> NatsServer {
        let bin = nats_server_bin();
        let port = free_port();
        let store = std::env::temp_dir().join(format!("hookrelay-nats-{port}"));
        let _ = std::fs::remove_dir_all(&store);
        let extra = extra(&store);
        let child = spawn(&bin, port, &store, &extra);
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        eventually(
            "nats-server to listen",
            Duration::from_secs(30),
            || async move { tokio::net::TcpStream::connect(addr).await.ok().map(|_| ()) },
        )
        .await;
        NatsServer {
            child,
            url: format!("nats://127.0.0.1:{port}"),
            store,
        }
    }

    /// Stops the server (SIGKILL, as a crash), leaves it down for `down`, and starts it again
    /// on the same port with the same store, so that streams and durable consumers survive;
    /// waits until it listens. Servers started with extra arguments (TLS) come back without
    /// them.
    pub async fn restart(&mut self, down: Duration) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The outage itself, not a synchronisation.
        tokio::time::sleep(down).await;
        let bin = nats_server_bin();
        let port = self
            .url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse::<u16>().ok())
            .expect("the server's URL ends with its port");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        // The port is free once the old process is gone; a new bind may still race a
        // TIME_WAIT, so the start is retried until the server listens.
        self.child = eventually(
            "nats-server to start again on its port",
            Duration::from_secs(30),
            || {
                let (bin, store) = (bin.clone(), self.store.clone());
                async move {
                    let mut child = spawn(&bin, port, &store, &[]);
                    for _ in 0..100 {
                        if let Ok(Some(_)) = child.try_wait() {
                            return None;
                        }
                        if tokio::net::TcpStream::connect(addr).await.is_ok() {
                            return Some(child);
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    let _ = child.kill();
                    let _ = child.wait();
                    None
                }
            },
        )
        .await;
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}
