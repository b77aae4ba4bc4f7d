//! The endpoints Webhooks deliver to, all on loopback:
//!
//! - [`Receiver`]: a process built from the document-processing contract's verification code
//!   (Python or Node, in tests/receivers), which checks every signature as a real consumer
//!   would and reports what it got.
//! - [`CountingReceiver`]: in this process, counting deliveries by delivery id without
//!   verifying anything, for volume, timing and fault tests; it may answer slowly, with another
//!   status, or only once a [`Gate`] opens.
//! - [`Blackhole`]: accepts connections and never answers.

use std::{
    collections::HashMap,
    net::SocketAddr,
    process::Command,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use super::{eventually, http::http_get, process::run_ok, repo_root};

/// Which of the contract's receivers to run (tests/receivers).
#[derive(Clone, Copy, Debug)]
pub enum ReceiverKind {
    Python,
    Node,
}

/// A receiver process built from the document-processing contract's verification code, on a
/// loopback port.
pub struct Receiver {
    _child: tokio::process::Child,
    pub addr: SocketAddr,
}

/// One request a receiver got, with its verdict.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Received {
    pub received_at: f64,
    pub delivery_id: Option<String>,
    pub event: Option<String>,
    pub path: String,
    pub hex_ok: bool,
    pub standard_ok: Option<bool>,
    pub status: u16,
    pub body: String,
    pub user_agent: Option<String>,
    pub content_type: Option<String>,
}

impl Receiver {
    pub async fn start(kind: ReceiverKind, secret: &str, extra: &[&str]) -> Receiver {
        use tokio::io::AsyncBufReadExt;
        static SETUP: OnceLock<()> = OnceLock::new();
        SETUP.get_or_init(|| {
            run_ok(&mut Command::new(repo_root().join("hack/receivers.sh")));
        });
        let dir = repo_root().join("tests/receivers");
        let mut cmd = match kind {
            ReceiverKind::Python => {
                let mut c = tokio::process::Command::new(dir.join(".venv/bin/python"));
                c.arg(dir.join("receiver.py"));
                c
            }
            ReceiverKind::Node => {
                let mut c = tokio::process::Command::new("node");
                c.arg(dir.join("receiver.js"));
                c
            }
        };
        let mut child = cmd
            .args(["--port", "0", "--secret", secret])
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("receiver starts");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        tokio::io::BufReader::new(stdout)
            .read_line(&mut line)
            .await
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("receiver said {line:?}"))
            .parse()
            .unwrap();
        Receiver {
            _child: child,
            addr,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn results(&self) -> Vec<Received> {
        let (status, body) = http_get(self.addr, "/results")
            .await
            .expect("receiver reachable");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("results are JSON")
    }

    /// Waits until `n` requests were answered 200, returning everything received.
    pub async fn wait_ok(&self, n: usize) -> Vec<Received> {
        eventually(
            &format!("{n} accepted deliveries at {}", self.addr),
            Duration::from_secs(60),
            || async {
                let all = self.results().await;
                (all.iter().filter(|r| r.status == 200).count() >= n).then_some(all)
            },
        )
        .await
    }
}

/// An in-process receiver that counts deliveries by delivery id, answering 200 (no
/// verification: for volume tests; the contract's receivers prove the signatures).
#[derive(Clone, Default)]
pub struct CountingReceiver {
    pub seen: Arc<Mutex<HashMap<String, usize>>>,
    /// When each request arrived.
    pub arrivals: Arc<Mutex<Vec<Instant>>>,
}

/// The delivery id a request carries (empty without one).
fn delivery_id(headers: &axum::http::HeaderMap) -> String {
    headers
        .get("x-webhook-delivery")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

impl CountingReceiver {
    pub async fn start() -> (CountingReceiver, SocketAddr) {
        Self::start_slow(Duration::ZERO).await
    }

    /// A receiver that counts each request on arrival and answers only after `delay`, like a
    /// slow endpoint: deliveries stay outstanding longer.
    pub async fn start_slow(delay: Duration) -> (CountingReceiver, SocketAddr) {
        Self::start_answering(axum::http::StatusCode::OK, delay).await
    }

    /// A receiver that counts each request on arrival and answers `status` after `delay` (500:
    /// every delivery keeps retrying).
    pub async fn start_answering(
        status: axum::http::StatusCode,
        delay: Duration,
    ) -> (CountingReceiver, SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (Self::serve(listener, status, delay), addr)
    }

    /// A [`CountingReceiver`] on a given loopback address (a receiver coming back on the port
    /// its Webhook names, after an outage).
    pub async fn start_on(addr: SocketAddr) -> CountingReceiver {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        Self::serve(listener, axum::http::StatusCode::OK, Duration::ZERO)
    }

    /// Serves on `listener`: each request is counted on arrival and answered `status` after
    /// `delay`.
    fn serve(
        listener: tokio::net::TcpListener,
        status: axum::http::StatusCode,
        delay: Duration,
    ) -> CountingReceiver {
        let receiver = CountingReceiver::default();
        let (seen, arrivals) = (receiver.seen.clone(), receiver.arrivals.clone());
        let app = axum::Router::new().fallback(axum::routing::post(
            move |headers: axum::http::HeaderMap| {
                let (seen, arrivals) = (seen.clone(), arrivals.clone());
                async move {
                    arrivals.lock().unwrap().push(Instant::now());
                    *seen
                        .lock()
                        .unwrap()
                        .entry(delivery_id(&headers))
                        .or_default() += 1;
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    (status, "ok")
                }
            },
        ));
        tokio::spawn(async move { axum::serve(listener, app).await });
        receiver
    }

    /// A receiver that counts each request on arrival and answers only once `open` is called:
    /// deliveries stay in flight exactly as long as a test needs, without timing.
    pub async fn start_gated() -> (CountingReceiver, SocketAddr, Gate) {
        let receiver = CountingReceiver::default();
        let seen = receiver.seen.clone();
        let (gate, opened) = tokio::sync::watch::channel(false);
        let app = axum::Router::new().fallback(axum::routing::post(
            move |headers: axum::http::HeaderMap| {
                let seen = seen.clone();
                let mut opened = opened.clone();
                async move {
                    *seen
                        .lock()
                        .unwrap()
                        .entry(delivery_id(&headers))
                        .or_default() += 1;
                    let _ = opened.wait_for(|open| *open).await;
                    "ok"
                }
            },
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (receiver, addr, Gate(gate))
    }

    /// (distinct deliveries, total requests)
    pub fn counts(&self) -> (usize, usize) {
        let seen = self.seen.lock().unwrap();
        (seen.len(), seen.values().sum())
    }

    /// Requests that arrived at or after `t`.
    pub fn arrived_after(&self, t: Instant) -> usize {
        let arrivals = self.arrivals.lock().unwrap();
        arrivals.iter().filter(|at| **at >= t).count()
    }

    /// The first request that arrived at or after `t`.
    pub fn first_after(&self, t: Instant) -> Option<Instant> {
        self.arrivals
            .lock()
            .unwrap()
            .iter()
            .copied()
            .filter(|at| *at >= t)
            .min()
    }
}

/// Holds the answers of a gated [`CountingReceiver`] until opened.
pub struct Gate(tokio::sync::watch::Sender<bool>);

impl Gate {
    /// Lets every request held so far, and every later one, be answered 200.
    pub fn open(&self) {
        self.0.send_replace(true);
    }
}

/// A loopback endpoint that accepts connections and never answers.
pub struct Blackhole {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
}

impl Blackhole {
    pub async fn start() -> Blackhole {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                held.push(socket);
            }
        });
        Blackhole { addr, connections }
    }
}
