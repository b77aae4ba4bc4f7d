//! The test harness: one real etcd + kube-apiserver per test run, a namespace per test.
//!
//! The control plane comes from `hack/control-plane.sh` (built once per machine, cached by version).
//! When `HOOKRELAY_TEST_KUBECONFIG` names a running one (as `hack/test.sh` does), it is shared;
//! otherwise this process starts its own, and a watchdog stops it when the process exits.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client, Config,
    api::PostParams,
    config::{KubeConfigOptions, Kubeconfig},
};

pub struct ControlPlane {
    pub kubeconfig: PathBuf,
    pub bin: PathBuf,
}

pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn script() -> PathBuf {
    repo_root().join("hack/control-plane.sh")
}

/// The control plane of this test run, started on first use.
pub fn control_plane() -> &'static ControlPlane {
    static CP: OnceLock<ControlPlane> = OnceLock::new();
    CP.get_or_init(|| {
        let bin = PathBuf::from(run_ok(Command::new(script()).arg("bindir")).trim());
        let kubeconfig = match std::env::var_os("HOOKRELAY_TEST_KUBECONFIG") {
            Some(path) => PathBuf::from(path),
            None => {
                run_ok(Command::new(script()).arg("build"));
                let dir = std::env::temp_dir().join(format!("hookrelay-cp-{}", std::process::id()));
                run_ok(
                    Command::new(script())
                        .arg("start")
                        .arg(&dir)
                        .arg(std::process::id().to_string()),
                );
                dir.join("kubeconfig")
            }
        };
        let cp = ControlPlane { kubeconfig, bin };
        cp.install_crds();
        cp
    })
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A kubectl invocation's result.
pub struct Kubectl {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Kubectl {
    fn from(out: Output) -> Self {
        Self {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

async fn run_kubectl(
    kubectl: PathBuf,
    kubeconfig: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> Kubectl {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(kubectl)
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("kubectl starts");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input.as_bytes()).await.unwrap();
        // Closed, so that kubectl sees the end of its input.
        drop(pipe);
    }
    child.wait_with_output().await.expect("kubectl runs").into()
}

impl ControlPlane {
    /// Runs the real kubectl (built with the control plane) against this API server, without
    /// blocking a worker of the runtime that may also run an in-process operator.
    pub async fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Kubectl {
        run_kubectl(self.bin.join("kubectl"), &self.kubeconfig, args, stdin).await
    }

    /// Like `kubectl` but the command must succeed.
    pub async fn kubectl_ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.kubectl(args, stdin).await;
        assert!(
            out.success,
            "kubectl {args:?} failed: {}{}",
            out.stdout, out.stderr
        );
        out.stdout
    }

    /// `kubectl_ok` for the one-time set-up outside any runtime (`control_plane()`).
    fn kubectl_ok_blocking(&self, args: &[&str]) -> String {
        run_ok(
            Command::new(self.bin.join("kubectl"))
                .args(args)
                .env("KUBECONFIG", &self.kubeconfig),
        )
    }

    fn install_crds(&self) {
        let crds = repo_root().join("crds");
        self.kubectl_ok_blocking(&["apply", "--server-side", "-f", crds.to_str().unwrap()]);
        self.kubectl_ok_blocking(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/webhooks.hookrelay.dev",
            "crd/documentevents.hookrelay.dev",
        ]);
    }

    /// A kube client with admin rights.
    pub async fn client(&self) -> Client {
        Client::try_from(self.config().await).expect("client builds")
    }

    /// The admin client configuration.
    pub async fn config(&self) -> Config {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig).expect("kubeconfig readable");
        Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .expect("kubeconfig valid")
    }

    /// Creates a fresh namespace for one test. Namespaces are never reused: without a
    /// kube-controller-manager their deletion would not finish.
    pub async fn namespace(&self, prefix: &str) -> String {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!(
            "{prefix}-{:x}{}",
            nanos,
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name}
        }))
        .unwrap();
        Api::<Namespace>::all(self.client().await)
            .create(&PostParams::default(), &ns)
            .await
            .expect("namespace created");
        name
    }
}

/// Polls `check` until it returns Some, or panics after `timeout` naming what was awaited.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A free loopback port (bound, then released) for a server a test starts.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A minimal HTTP/1.1 GET to a loopback server: (status code, body). None if not reachable.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// One sample of a series of an operator's /metrics, such as
/// `hookrelay_webhooks{state="Active"}`.
pub async fn metric(addr: std::net::SocketAddr, series: &str) -> Option<f64> {
    let (_, body) = http_get(addr, "/metrics").await?;
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// The operator binary as a child process, killed on drop.
pub struct Operator {
    pub child: tokio::process::Child,
    pub metrics_addr: std::net::SocketAddr,
    /// The REST API and ingest.
    pub listen_addr: std::net::SocketAddr,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

impl Operator {
    pub fn start(cp: &ControlPlane, args: &[&str]) -> Operator {
        Self::start_with_env(cp, args, &[])
    }

    /// [`Operator::start`] with more environment variables.
    pub fn start_with_env(cp: &ControlPlane, args: &[&str], env: &[(&str, &str)]) -> Operator {
        let metrics_addr: std::net::SocketAddr =
            format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let listen_addr: std::net::SocketAddr =
            format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log =
            std::env::temp_dir().join(format!("hookrelay-operator-{}.log", metrics_addr.port()));
        let out = std::fs::File::create(&log).expect("log file");
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_hookrelay"))
            .arg("run")
            .arg("--metrics-addr")
            .arg(metrics_addr.to_string())
            .arg("--listen-addr")
            .arg(listen_addr.to_string())
            .args(args)
            .env("KUBECONFIG", &cp.kubeconfig)
            .env("RUST_LOG", "info,hookrelay=debug")
            .envs(env.iter().copied())
            .stdout(out.try_clone().expect("log file"))
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .expect("operator starts");
        Operator {
            child,
            metrics_addr,
            listen_addr,
            log,
        }
    }

    /// Waits until /readyz answers 200.
    pub async fn wait_ready(&self) {
        let addr = self.metrics_addr;
        let what = format!(
            "operator /readyz to answer 200 (log: {})",
            self.log.display()
        );
        eventually(&what, Duration::from_secs(60), || async move {
            matches!(http_get(addr, "/readyz").await, Some((200, _))).then_some(())
        })
        .await
    }
}

/// The operator running inside the test process, watching one namespace, stopped on drop.
pub struct InProcess {
    pub op: hookrelay::operator::Operator,
    shutdown: tokio_util::sync::CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), hookrelay::operator::Error>>>,
}

impl InProcess {
    /// Starts it with local demo settings (plain http and 127.0.0.0/8 allowed) and waits until
    /// its watches have synced.
    pub async fn start(config: Config, namespace: &str) -> InProcess {
        let mut args = hookrelay::operator::RunArgs::for_tests();
        args.namespaces = vec![namespace.to_owned()];
        args.allow_http = true;
        args.allow_cidrs = vec!["127.0.0.0/8".parse().unwrap()];
        Self::start_with(config, args).await
    }

    pub async fn start_with(config: Config, args: hookrelay::operator::RunArgs) -> InProcess {
        // Operator logs in test output (shown for failing tests), filtered by RUST_LOG.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "hookrelay=info".into()),
            )
            .with_test_writer()
            .try_init();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let (op, task) = hookrelay::operator::start(config, args, shutdown.clone())
            .await
            .expect("operator starts");
        let task = Some(tokio::spawn(task));
        let readiness = op.readiness.clone();
        eventually(
            "the operator's watches to sync",
            Duration::from_secs(30),
            || {
                let ready = readiness.is_ready();
                async move { ready.then_some(()) }
            },
        )
        .await;
        InProcess { op, shutdown, task }
    }

    /// Shuts it down and waits until every task has ended, the status writer last: what the
    /// metrics count from then on is final.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let task = self.task.take().expect("stopped once");
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("the operator stops within 60s")
            .expect("the operator task did not panic")
            .expect("the operator ran without error");
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl ControlPlane {
    /// A token for hookrelay's audience of a new ServiceAccount `namespace`/`service_account`
    /// that may do everything with hookrelay's resources in `namespace` ([`grant_hookrelay`]).
    pub async fn hookrelay_token(&self, namespace: &str, service_account: &str) -> String {
        let token = self.service_account_token(namespace, service_account).await;
        grant_hookrelay(&self.client().await, namespace, namespace, service_account).await;
        token
    }

    /// A ServiceAccount token for hookrelay's API (`kubectl create token SA --audience
    /// hookrelay`); the API server itself does not accept it.
    pub async fn service_account_token(&self, namespace: &str, service_account: &str) -> String {
        self.service_account_token_for(namespace, service_account, Some("hookrelay"))
            .await
    }

    /// A ServiceAccount token for the API server's own audience (plain `kubectl create
    /// token`): what kubectl uses, and what hookrelay refuses unless `--token-audience ""`.
    pub async fn service_account_token_without_audience(
        &self,
        namespace: &str,
        service_account: &str,
    ) -> String {
        self.service_account_token_for(namespace, service_account, None)
            .await
    }

    async fn service_account_token_for(
        &self,
        namespace: &str,
        service_account: &str,
        audience: Option<&str>,
    ) -> String {
        let exists = self
            .kubectl(
                &["get", "serviceaccount", service_account, "-n", namespace],
                None,
            )
            .await;
        if !exists.success {
            self.kubectl_ok(
                &["create", "serviceaccount", service_account, "-n", namespace],
                None,
            )
            .await;
        }
        let mut args = vec!["create", "token", service_account, "-n", namespace];
        if let Some(audience) = audience {
            args.extend(["--audience", audience]);
        }
        self.kubectl_ok(&args, None).await.trim().to_owned()
    }

    /// A kubeconfig that authenticates with `token` only (no client certificate).
    pub fn token_kubeconfig(&self, token: &str) -> PathBuf {
        let admin = Kubeconfig::read_from(&self.kubeconfig).expect("kubeconfig readable");
        let cluster = admin.clusters[0].cluster.clone().expect("a cluster");
        let yaml = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority-data: {}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\n",
            cluster.server.expect("a server"),
            cluster.certificate_authority_data.expect("CA data"),
        );
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "hookrelay-token-{}-{}.kubeconfig",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, yaml).expect("kubeconfig written");
        path
    }

    /// kubectl with another kubeconfig (a token's, say).
    pub async fn kubectl_as(&self, kubeconfig: &Path, args: &[&str]) -> Kubectl {
        run_kubectl(self.bin.join("kubectl"), kubeconfig, args, None).await
    }
}

/// Which of the seed-derived receivers to run (tests/receivers).
#[derive(Clone, Copy, Debug)]
pub enum ReceiverKind {
    Python,
    Node,
}

/// A receiver process built from the seed's verification code, on a loopback port.
pub struct Receiver {
    _child: tokio::process::Child,
    pub addr: std::net::SocketAddr,
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

/// A minimal HTTP/1.1 POST: status code, or None if unreachable.
pub async fn http_post(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

/// A loopback endpoint that accepts connections and never answers.
pub struct Blackhole {
    pub addr: std::net::SocketAddr,
    pub connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Blackhole {
    pub async fn start() -> Blackhole {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
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

/// An in-process receiver that counts deliveries by delivery id, answering 200 (no
/// verification: for volume tests; the seed receivers prove the signatures).
#[derive(Clone, Default)]
pub struct CountingReceiver {
    pub seen: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    /// When each request arrived.
    pub arrivals: std::sync::Arc<std::sync::Mutex<Vec<std::time::Instant>>>,
}

impl CountingReceiver {
    pub async fn start() -> (CountingReceiver, std::net::SocketAddr) {
        Self::start_slow(Duration::ZERO).await
    }

    /// A receiver that counts each request on arrival and answers only after `delay`, like a
    /// slow endpoint: deliveries stay outstanding longer.
    pub async fn start_slow(delay: Duration) -> (CountingReceiver, std::net::SocketAddr) {
        Self::start_answering(axum::http::StatusCode::OK, delay).await
    }

    /// A receiver that counts each request on arrival and answers `status` after `delay` (500:
    /// every delivery keeps retrying).
    pub async fn start_answering(
        status: axum::http::StatusCode,
        delay: Duration,
    ) -> (CountingReceiver, std::net::SocketAddr) {
        let receiver = CountingReceiver::default();
        let (seen, arrivals) = (receiver.seen.clone(), receiver.arrivals.clone());
        let app = axum::Router::new().fallback(axum::routing::post(
            move |headers: axum::http::HeaderMap| {
                let (seen, arrivals) = (seen.clone(), arrivals.clone());
                async move {
                    arrivals.lock().unwrap().push(std::time::Instant::now());
                    let id = headers
                        .get("x-webhook-delivery")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    *seen.lock().unwrap().entry(id).or_default() += 1;
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    (status, "ok")
                }
            },
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (receiver, addr)
    }

    /// A receiver that counts each request on arrival and answers only once `open` is called:
    /// deliveries stay in flight exactly as long as a test needs, without timing.
    pub async fn start_gated() -> (CountingReceiver, std::net::SocketAddr, Gate) {
        let receiver = CountingReceiver::default();
        let seen = receiver.seen.clone();
        let (gate, opened) = tokio::sync::watch::channel(false);
        let app = axum::Router::new().fallback(axum::routing::post(
            move |headers: axum::http::HeaderMap| {
                let seen = seen.clone();
                let mut opened = opened.clone();
                async move {
                    let id = headers
                        .get("x-webhook-delivery")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    *seen.lock().unwrap().entry(id).or_default() += 1;
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
    pub fn arrived_after(&self, t: std::time::Instant) -> usize {
        let arrivals = self.arrivals.lock().unwrap();
        arrivals.iter().filter(|at| **at >= t).count()
    }

    /// The first request that arrived at or after `t`.
    pub fn first_after(&self, t: std::time::Instant) -> Option<std::time::Instant> {
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

/// A JSON HTTP call to the operator's API: (status, parsed body or Null).
pub async fn api_call(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    let client = reqwest::Client::new();
    let mut req = client.request(method.parse().unwrap(), format!("http://{addr}{path}"));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    if let Some(body) = body {
        req = req
            .header("content-type", "application/json")
            .body(body.to_owned());
    }
    let response = req.send().await.expect("the API answers");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

/// A Secret `<name>-secret` holding `secret`, and a Webhook `name` for every event type that
/// signs with it; waits until it is Ready.
pub async fn create_webhook(
    client: &Client,
    ns: &str,
    name: &str,
    url: &str,
    secret: &str,
    delivery: serde_json::Value,
) {
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), ns);
    let s: k8s_openapi::api::core::v1::Secret = serde_json::from_value(
        // Labelled as a signing Secret: the operator reads no other.
        serde_json::json!({"metadata": {"name": format!("{name}-secret"), "labels": {"hookrelay.dev/signing-secret": "true"}}, "stringData": {"secret": secret}}),
    )
    .unwrap();
    secrets.create(&PostParams::default(), &s).await.unwrap();
    let webhooks: Api<hookrelay::crd::Webhook> = Api::namespaced(client.clone(), ns);
    let w: hookrelay::crd::Webhook = serde_json::from_value(serde_json::json!({
        "apiVersion": "hookrelay.dev/v1alpha1", "kind": "Webhook", "metadata": {"name": name},
        "spec": {"url": url, "events": ["*"], "secretRef": {"name": format!("{name}-secret")}, "delivery": delivery}
    }))
    .unwrap();
    webhooks.create(&PostParams::default(), &w).await.unwrap();
    eventually(
        &format!("webhook {name} Ready"),
        Duration::from_secs(60),
        || async {
            let w = webhooks.get(name).await.ok()?;
            w.status?
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
                .then_some(())
        },
    )
    .await;
}

/// A counting receiver and a Ready Webhook `name` for every event type that delivers to it.
pub async fn counting_webhook(
    client: &Client,
    ns: &str,
    name: &str,
    secret: &str,
) -> CountingReceiver {
    let (receiver, addr) = CountingReceiver::start().await;
    create_webhook(
        client,
        ns,
        name,
        &format!("http://{addr}/h"),
        secret,
        serde_json::json!({}),
    )
    .await;
    receiver
}

/// A DocumentEvent with the seed's timestamp.
pub async fn create_event(
    client: &Client,
    ns: &str,
    name: &str,
    type_: &str,
    data: serde_json::Value,
) {
    let events: Api<hookrelay::crd::DocumentEvent> = Api::namespaced(client.clone(), ns);
    let e: hookrelay::crd::DocumentEvent = serde_json::from_value(serde_json::json!({
        "apiVersion": "hookrelay.dev/v1alpha1", "kind": "DocumentEvent", "metadata": {"name": name},
        "spec": {"type": type_, "timestamp": "2023-06-15T10:35:00Z", "data": data}
    }))
    .unwrap();
    events.create(&PostParams::default(), &e).await.unwrap();
}

/// Waits until the DocumentEvent reaches `phase`.
pub async fn wait_phase(
    client: &Client,
    ns: &str,
    name: &str,
    phase: &str,
) -> hookrelay::crd::DocumentEvent {
    let events: Api<hookrelay::crd::DocumentEvent> = Api::namespaced(client.clone(), ns);
    eventually(
        &format!("{name} phase {phase}"),
        Duration::from_secs(60),
        || async {
            let e = events.get(name).await.ok()?;
            let p = serde_json::to_value(e.status.as_ref()?.phase?).ok()?;
            (p == phase).then_some(e)
        },
    )
    .await
}

/// Waits until the Webhook's Ready condition has `status` and `reason` for its current
/// generation; returns the condition's message.
pub async fn wait_ready_reason(
    client: &Client,
    ns: &str,
    name: &str,
    status: &str,
    reason: &str,
) -> String {
    let webhooks: Api<hookrelay::crd::Webhook> = Api::namespaced(client.clone(), ns);
    eventually(
        &format!("webhook {name} Ready={status}/{reason}"),
        Duration::from_secs(60),
        || async {
            let w = webhooks.get(name).await.ok()?;
            let generation = w.metadata.generation;
            let c = w
                .status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Ready")?;
            (c.status == status && c.reason == reason && c.observed_generation == generation)
                .then_some(c.message)
        },
    )
    .await
}

impl Operator {
    /// Its log so far (stdout and stderr).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A nats-server with JetStream on a free loopback port and its own store, stopped on drop.
/// Built by `hack/nats.sh build` (hack/test.sh does it first).
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

impl NatsServer {
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

    /// `extra`: more arguments, given the server's store directory.
    async fn start_with(extra: impl FnOnce(&Path) -> Vec<String>) -> NatsServer {
        let bin = std::process::Command::new(repo_root().join("hack/nats.sh"))
            .arg("build")
            .output()
            .expect("hack/nats.sh runs");
        assert!(bin.status.success(), "hack/nats.sh build failed: {bin:?}");
        let bin = PathBuf::from(String::from_utf8(bin.stdout).unwrap().trim()).join("nats-server");
        let port = free_port();
        let store = std::env::temp_dir().join(format!("hookrelay-nats-{port}"));
        let _ = std::fs::remove_dir_all(&store);
        let extra = extra(&store);
        let child = std::process::Command::new(bin)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(&store)
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server starts");
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
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
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

/// An in-process operator taking events through `POST /api/events` in one ingest mode (with a
/// nats-server of its own for jetstream), so that one test body runs in every mode.
pub struct ModeOperator {
    pub mode: hookrelay::http::IngestMode,
    pub op: InProcess,
    /// Kept running as long as the operator.
    _nats: Option<NatsServer>,
}

/// The three ingest modes, for tests that run in each.
pub const INGEST_MODES: [hookrelay::http::IngestMode; 3] = [
    hookrelay::http::IngestMode::Direct,
    hookrelay::http::IngestMode::Durable,
    hookrelay::http::IngestMode::JetStream,
];

impl ModeOperator {
    /// Starts the operator in `mode` watching `namespaces` (plain http and 127.0.0.0/8 allowed,
    /// auth off), after `tune` adjusted its flags.
    pub async fn start(
        cp: &ControlPlane,
        mode: hookrelay::http::IngestMode,
        namespaces: &[&str],
        tune: impl FnOnce(&mut hookrelay::operator::RunArgs),
    ) -> ModeOperator {
        let mut args = hookrelay::operator::RunArgs::for_tests();
        args.namespaces = namespaces.iter().map(|ns| ns.to_string()).collect();
        args.allow_http = true;
        args.allow_cidrs = vec!["127.0.0.0/8".parse().unwrap()];
        args.disable_auth = true;
        args.ingest_mode = mode;
        let nats = match mode {
            hookrelay::http::IngestMode::JetStream => {
                let nats = NatsServer::start().await;
                args.nats_url = Some(nats.url.clone());
                Some(nats)
            }
            _ => None,
        };
        tune(&mut args);
        let op = InProcess::start_with(cp.config().await, args).await;
        ModeOperator {
            mode,
            op,
            _nats: nats,
        }
    }

    /// Posts `events` (seed-shaped) in one request to namespace `ns`; they must be accepted.
    pub async fn post_events(&self, ns: &str, events: &[serde_json::Value]) -> serde_json::Value {
        let body = serde_json::Value::Array(events.to_vec()).to_string();
        let (status, reply) = api_call(
            self.op.op.listen_addr,
            "POST",
            &format!("/api/events?namespace={ns}"),
            None,
            Some(&body),
        )
        .await;
        assert_eq!(
            status, 202,
            "{:?} ingest refused the events: {reply}",
            self.mode
        );
        reply
    }

    /// Posts one event of `type_` with the seed's timestamp and `data`.
    pub async fn post_event(&self, ns: &str, type_: &str, data: serde_json::Value) {
        self.post_events(
            ns,
            &[serde_json::json!({"event": type_, "timestamp": "2023-06-15T10:35:00Z", "data": data})],
        )
        .await;
    }
}

// ---- cpfaults: a control plane of a test's own, whose kube-apiserver and etcd it may stop ----

/// Held by every test that starts a control plane of its own and faults it: two of them
/// restarting API servers at once on two cores would measure the machine, not the operator.
pub static OWN_CONTROL_PLANES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A kube-apiserver + etcd of one test's own (not the shared one), for tests that stop, restart
/// or pause them; stopped on drop (and by the script's watchdog if the test process dies).
pub struct OwnControlPlane {
    cp: ControlPlane,
    dir: PathBuf,
}

impl std::ops::Deref for OwnControlPlane {
    type Target = ControlPlane;
    fn deref(&self) -> &ControlPlane {
        &self.cp
    }
}

impl OwnControlPlane {
    /// Starts one in a fresh temporary directory and installs the CRDs.
    pub async fn start(name: &str) -> OwnControlPlane {
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || {
            let bin = PathBuf::from(run_ok(Command::new(script()).arg("build")).trim());
            static SEQ: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "hookrelay-own-cp-{name}-{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            run_ok(
                Command::new(script())
                    .arg("start")
                    .arg(&dir)
                    .arg(std::process::id().to_string()),
            );
            let cp = ControlPlane {
                kubeconfig: dir.join("kubeconfig"),
                bin,
            };
            let own = OwnControlPlane { cp, dir };
            own.cp.install_crds();
            own
        })
        .await
        .expect("the control plane starts")
    }

    async fn script(&self, action: &str) {
        let out = tokio::process::Command::new(script())
            .arg(action)
            .arg(&self.dir)
            .output()
            .await
            .expect("hack/control-plane.sh runs");
        assert!(
            out.status.success(),
            "control-plane.sh {action} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the kube-apiserver (SIGTERM); etcd and its data stay.
    pub async fn stop_apiserver(&self) {
        self.script("stop-apiserver").await
    }

    /// Starts it again on the same port with the same flags; returns once it is ready.
    pub async fn start_apiserver(&self) {
        self.script("start-apiserver").await
    }

    /// Stops etcd; its data directory stays.
    pub async fn stop_etcd(&self) {
        self.script("stop-etcd").await
    }

    /// Starts etcd again on the same ports and data; returns once it is healthy.
    pub async fn start_etcd(&self) {
        self.script("start-etcd").await
    }

    /// SIGSTOP: the kube-apiserver's port still accepts connections, nothing answers.
    pub async fn pause_apiserver(&self) {
        self.script("pause-apiserver").await
    }

    /// SIGCONT.
    pub async fn resume_apiserver(&self) {
        self.script("resume-apiserver").await
    }
}

impl Drop for OwnControlPlane {
    fn drop(&mut self) {
        let _ = Command::new(script()).arg("stop").arg(&self.dir).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The sum of every series of a counter family in an operator's /metrics, such as
/// `hookrelay_status_patches_total` over all its labels.
pub async fn metric_sum(addr: std::net::SocketAddr, family: &str) -> Option<f64> {
    let (_, body) = http_get(addr, "/metrics").await?;
    Some(
        body.lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(family)?;
                let value = match rest.strip_prefix('{') {
                    Some(labelled) => labelled.split_once('}')?.1,
                    None => rest,
                };
                value.trim().parse::<f64>().ok()
            })
            .sum(),
    )
}

// ---- rxfaults (issue 12: receiver faults, leader kill, JetStream restart) ----

impl NatsServer {
    /// Stops the server (SIGKILL, as a crash), leaves it down for `down`, and starts it again
    /// on the same port with the same store, so that streams and durable consumers survive;
    /// waits until it listens. Servers started with extra arguments (TLS) come back without
    /// them.
    pub async fn restart(&mut self, down: Duration) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The outage itself, not a synchronisation.
        tokio::time::sleep(down).await;
        let bin = std::process::Command::new(repo_root().join("hack/nats.sh"))
            .arg("build")
            .output()
            .expect("hack/nats.sh runs");
        assert!(bin.status.success(), "hack/nats.sh build failed: {bin:?}");
        let bin = PathBuf::from(String::from_utf8(bin.stdout).unwrap().trim()).join("nats-server");
        let port = self
            .url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse::<u16>().ok())
            .expect("the server's URL ends with its port");
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        // The port is free once the old process is gone; a new bind may still race a
        // TIME_WAIT, so the start is retried until the server listens.
        self.child = eventually(
            "nats-server to start again on its port",
            Duration::from_secs(30),
            || {
                let (bin, store) = (bin.clone(), self.store.clone());
                async move {
                    let mut child = std::process::Command::new(bin)
                        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
                        .arg(store)
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .spawn()
                        .expect("nats-server starts");
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

impl CountingReceiver {
    /// A [`CountingReceiver`] on a given loopback address (a receiver coming back on the port
    /// its Webhook names, after an outage).
    pub async fn start_on(addr: std::net::SocketAddr) -> CountingReceiver {
        let receiver = CountingReceiver::default();
        let (seen, arrivals) = (receiver.seen.clone(), receiver.arrivals.clone());
        let app = axum::Router::new().fallback(axum::routing::post(
            move |headers: axum::http::HeaderMap| {
                let (seen, arrivals) = (seen.clone(), arrivals.clone());
                async move {
                    arrivals.lock().unwrap().push(std::time::Instant::now());
                    let id = headers
                        .get("x-webhook-delivery")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    *seen.lock().unwrap().entry(id).or_default() += 1;
                    "ok"
                }
            },
        ));
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        receiver
    }
}

/// VmRSS of a process in MiB (Linux /proc), e.g. of an [`Operator`] child.
pub fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc readable");
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status");
    kib / 1024.0
}

/// Every verb on hookrelay's resources (webhooks, documentevents) in `namespace` for the
/// ServiceAccount `sa_namespace`/`sa`: a Role and RoleBinding named `{sa_namespace}-{sa}`.
pub async fn grant_hookrelay(client: &Client, namespace: &str, sa_namespace: &str, sa: &str) {
    grant(
        client,
        namespace,
        (sa_namespace, sa),
        &["webhooks", "documentevents"],
        &["*"],
    )
    .await;
}

/// A Role and RoleBinding in `namespace` that let the ServiceAccount `sa` (namespace, name) do
/// `verbs` on hookrelay's `resources` there.
pub async fn grant(
    client: &Client,
    namespace: &str,
    (sa_namespace, sa): (&str, &str),
    resources: &[&str],
    verbs: &[&str],
) {
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    let name = format!("{sa_namespace}-{sa}");
    let role: Role = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "rules": [{"apiGroups": ["hookrelay.dev"], "resources": resources, "verbs": verbs}],
    }))
    .unwrap();
    let binding: RoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": sa_namespace}],
    }))
    .unwrap();
    Api::<Role>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    Api::<RoleBinding>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
}
