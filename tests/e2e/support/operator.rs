//! The operator under test, two ways:
//!
//! - the `hookrelay` binary as a child process ([`Operator`]), started from one builder,
//!   [`OperatorArgs`]: for tests that kill, signal, freeze or restart it, give it another
//!   kubeconfig or environment, read its log or measure its memory;
//! - the operator inside the test process ([`InProcess`], and [`ModeOperator`] for one test body
//!   run in every ingest mode), from `RunArgs` made by [`default_args`], [`local_args`] or
//!   [`ingest_args`]: for tests that read its state directly.
//!
//! Receivers run on loopback, so [`OperatorArgs`], [`local_args`] and [`ingest_args`] allow
//! plain http and 127.0.0.0/8 unless a test says otherwise. Every construction of the in-process operator (`hookrelay::operator::RunArgs`,
//! `hookrelay::operator::start`) is in this module, so that a change of that API touches this
//! file alone.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use hookrelay::{http::IngestMode, operator::RunArgs};
use kube::Config;

use super::{
    control_plane::ControlPlane,
    eventually, free_port,
    http::{http_get, metric, post_events},
    nats::NatsServer,
    resources::EXAMPLE_TIMESTAMP,
};

// ---- the binary ----

/// The flags of one operator binary run, and its environment; [`OperatorArgs::start`] runs it.
///
/// Every run gets `--watch-namespace NS --egress-allow-http --egress-allow-cidr 127.0.0.0/8 --disable-auth` unless
/// a method below changes that; then, in this order, the ingest mode, the NATS URL, leader
/// election, the lease timings and any other flags.
#[derive(Clone, Debug)]
pub struct OperatorArgs {
    /// `--watch-namespace`; None watches every namespace.
    namespaces: Option<String>,
    allow_cidrs: Vec<String>,
    disable_auth: bool,
    mode: Option<String>,
    nats_url: Option<String>,
    leader_elect: bool,
    /// `--lease-duration`, `--lease-renew-deadline`, `--lease-retry-period`.
    lease: Option<[String; 3]>,
    extra: Vec<String>,
    env: Vec<(String, String)>,
}

impl OperatorArgs {
    /// Watching `namespaces` (one, or several comma-separated), plain http and 127.0.0.0/8
    /// allowed, authentication off.
    pub fn new(namespaces: &str) -> Self {
        Self {
            namespaces: Some(namespaces.to_owned()),
            ..Self::cluster_wide()
        }
    }

    /// Watching every namespace (no `--watch-namespace`), otherwise as [`OperatorArgs::new`].
    pub fn cluster_wide() -> Self {
        Self {
            namespaces: None,
            allow_cidrs: vec!["127.0.0.0/8".to_owned()],
            disable_auth: true,
            mode: None,
            nats_url: None,
            leader_elect: false,
            lease: None,
            extra: Vec::new(),
            env: Vec::new(),
        }
    }

    /// Authentication on (no `--disable-auth`): the API wants a token reviewed by the API
    /// server.
    pub fn with_auth(mut self) -> Self {
        self.disable_auth = false;
        self
    }

    /// `--egress-allow-cidr` for each of `cidrs` instead of 127.0.0.0/8. None: private ranges,
    /// loopback included, are refused as in production.
    pub fn allow_cidrs(mut self, cidrs: &[&str]) -> Self {
        self.allow_cidrs = cidrs.iter().map(|c| c.to_string()).collect();
        self
    }

    /// `--ingest-mode` (direct, durable or jetstream); without it the operator's default.
    pub fn mode(mut self, mode: &str) -> Self {
        self.mode = Some(mode.to_owned());
        self
    }

    /// `--nats-url`, for jetstream mode.
    pub fn nats(mut self, url: &str) -> Self {
        self.nats_url = Some(url.to_owned());
        self
    }

    /// `--leader-elect`, with the Lease in the first watched namespace (`--lease-namespace`).
    pub fn leader_elect(mut self) -> Self {
        self.leader_elect = true;
        self
    }

    /// `--lease-duration`, `--lease-renew-deadline` and `--lease-retry-period`.
    pub fn lease(mut self, duration: &str, renew_deadline: &str, retry_period: &str) -> Self {
        self.lease = Some([duration, renew_deadline, retry_period].map(str::to_owned));
        self
    }

    /// A 6 s lease renewed within 4 s, retried every second: a standby takes over within
    /// seconds of a leader's end.
    pub fn fast_lease(self) -> Self {
        self.lease("6s", "4s", "1s")
    }

    /// One more flag with its value.
    pub fn arg(mut self, flag: &str, value: &str) -> Self {
        self.extra.extend([flag.to_owned(), value.to_owned()]);
        self
    }

    /// More arguments, as they are.
    pub fn args<S: AsRef<str>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.extra
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// An environment variable of the process; `KUBECONFIG` and `RUST_LOG` replace the
    /// harness's (the control plane's admin kubeconfig, `info,hookrelay=debug`).
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// The flags after `run` (without the addresses, which [`OperatorArgs::start`] chooses).
    pub fn to_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(namespaces) = &self.namespaces {
            args.extend(["--watch-namespace".to_owned(), namespaces.clone()]);
        }
        args.push("--egress-allow-http".to_owned());
        for cidr in &self.allow_cidrs {
            args.extend(["--egress-allow-cidr".to_owned(), cidr.clone()]);
        }
        if self.disable_auth {
            args.push("--disable-auth".to_owned());
        }
        if let Some(mode) = &self.mode {
            args.extend(["--ingest-mode".to_owned(), mode.clone()]);
        }
        if let Some(url) = &self.nats_url {
            args.extend(["--nats-url".to_owned(), url.clone()]);
        }
        if self.leader_elect {
            args.push("--leader-elect".to_owned());
            if let Some(namespaces) = &self.namespaces {
                let first = namespaces.split(',').next().unwrap_or_default();
                args.extend(["--lease-namespace".to_owned(), first.to_owned()]);
            }
        }
        if let Some([duration, renew_deadline, retry_period]) = &self.lease {
            args.extend([
                "--lease-duration".to_owned(),
                duration.clone(),
                "--lease-renew-deadline".to_owned(),
                renew_deadline.clone(),
                "--lease-retry-period".to_owned(),
                retry_period.clone(),
            ]);
        }
        args.extend(self.extra.iter().cloned());
        args
    }

    /// Starts the binary against `cp` on free loopback ports (not waiting until it is ready:
    /// [`Operator::wait_ready`]). The same arguments may start it again.
    pub fn start(&self, cp: &ControlPlane) -> Operator {
        let args = self.to_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        Operator::start_with_env(cp, &args, &env)
    }
}

/// The operator binary as a child process, killed on drop.
pub struct Operator {
    pub child: tokio::process::Child,
    pub metrics_addr: SocketAddr,
    /// The REST API and ingest.
    pub listen_addr: SocketAddr,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

impl Operator {
    /// Starts `hookrelay run` against `cp` on free loopback ports with `args` as they are (not
    /// waiting until it is ready: [`Operator::wait_ready`]). The benches' way in; tests use
    /// [`OperatorArgs`].
    #[allow(dead_code)]
    pub fn start(cp: &ControlPlane, args: &[&str]) -> Operator {
        Self::start_with_env(cp, args, &[])
    }

    /// [`Operator::start`] with more environment variables.
    pub fn start_with_env(cp: &ControlPlane, args: &[&str], env: &[(&str, &str)]) -> Operator {
        let metrics_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let listen_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
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

    /// Waits until `hookrelay_leader` says that it leads (1) or does not (0).
    pub async fn wait_leader(&self, leads: bool) {
        let addr = self.metrics_addr;
        let want = if leads { 1.0 } else { 0.0 };
        eventually(
            &format!("hookrelay_leader {want} (log: {})", self.log.display()),
            Duration::from_secs(60),
            || async move { (metric(addr, "hookrelay_leader").await == Some(want)).then_some(()) },
        )
        .await;
    }

    /// Its log so far (stdout and stderr).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Waits until exactly one of two replicas leads (`hookrelay_leader` 1 on one, 0 on the other);
/// returns which: 0 for `a`, 1 for `b`.
pub async fn one_leader(a: &Operator, b: &Operator) -> usize {
    let (ma, mb) = (a.metrics_addr, b.metrics_addr);
    eventually(
        "exactly one replica leads",
        Duration::from_secs(60),
        || async move {
            match (
                metric(ma, "hookrelay_leader").await,
                metric(mb, "hookrelay_leader").await,
            ) {
                (Some(1.0), Some(0.0)) => Some(0),
                (Some(0.0), Some(1.0)) => Some(1),
                _ => None,
            }
        },
    )
    .await
}

// ---- in this process ----

/// The operator's defaults for tests (`RunArgs::for_tests`), watching `namespaces`: https only,
/// no private ranges, authentication on.
pub fn default_args(namespaces: &[&str]) -> RunArgs {
    let mut args = RunArgs::for_tests();
    args.namespaces = namespaces.iter().map(|ns| ns.to_string()).collect();
    args
}

/// [`default_args`] with the local demo settings: plain http and 127.0.0.0/8 allowed, for
/// receivers on loopback. Authentication stays on.
pub fn local_args(namespaces: &[&str]) -> RunArgs {
    let mut args = default_args(namespaces);
    args.allow_http = true;
    args.allow_cidrs = vec!["127.0.0.0/8".parse().unwrap()];
    args
}

/// [`local_args`] taking events through `POST /api/events` in `mode` without authentication,
/// through `nats` in jetstream mode.
pub fn ingest_args(namespaces: &[&str], mode: IngestMode, nats: Option<&NatsServer>) -> RunArgs {
    let mut args = local_args(namespaces);
    args.disable_auth = true;
    args.ingest_mode = mode;
    args.nats_url = nats.map(|n| n.url.clone());
    args
}

/// The operator running inside the test process, stopped on drop.
pub struct InProcess {
    pub op: hookrelay::operator::Operator,
    shutdown: tokio_util::sync::CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), hookrelay::operator::Error>>>,
}

impl InProcess {
    /// Starts it watching `namespace` with [`local_args`] and waits until its watches have
    /// synced.
    pub async fn start(config: Config, namespace: &str) -> InProcess {
        Self::start_with(config, local_args(&[namespace])).await
    }

    /// Starts it with [`ingest_args`].
    pub async fn ingesting(
        cp: &ControlPlane,
        namespaces: &[&str],
        mode: IngestMode,
        nats: Option<&NatsServer>,
    ) -> InProcess {
        Self::start_with(cp.config().await, ingest_args(namespaces, mode, nats)).await
    }

    /// Starts it with `args` and waits until its watches have synced.
    pub async fn start_with(config: Config, args: RunArgs) -> InProcess {
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

    /// Starts it with `args` that it must refuse: the error it gives.
    pub async fn start_error(config: Config, args: RunArgs) -> String {
        match hookrelay::operator::start(config, args, Default::default()).await {
            Ok(_) => panic!("the operator started"),
            Err(error) => error.to_string(),
        }
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

/// The three ingest modes, for tests that run in each.
pub const INGEST_MODES: [IngestMode; 3] = [
    IngestMode::Direct,
    IngestMode::Durable,
    IngestMode::JetStream,
];

/// An in-process operator taking events through `POST /api/events` in one ingest mode (with a
/// nats-server of its own for jetstream), so that one test body runs in every mode.
pub struct ModeOperator {
    pub mode: IngestMode,
    pub op: InProcess,
    /// Kept running as long as the operator.
    _nats: Option<NatsServer>,
}

impl ModeOperator {
    /// Starts the operator in `mode` watching `namespaces` ([`ingest_args`]: plain http and
    /// 127.0.0.0/8 allowed, auth off), after `tune` adjusted its flags.
    pub async fn start(
        cp: &ControlPlane,
        mode: IngestMode,
        namespaces: &[&str],
        tune: impl FnOnce(&mut RunArgs),
    ) -> ModeOperator {
        let nats = match mode {
            IngestMode::JetStream => Some(NatsServer::start().await),
            _ => None,
        };
        let mut args = ingest_args(namespaces, mode, nats.as_ref());
        tune(&mut args);
        let op = InProcess::start_with(cp.config().await, args).await;
        ModeOperator {
            mode,
            op,
            _nats: nats,
        }
    }

    /// The nats-server of a jetstream-mode operator.
    pub fn nats(&self) -> Option<&NatsServer> {
        self._nats.as_ref()
    }

    /// Posts `events` (shaped as the contract's events) in one request to namespace `ns`; they
    /// must be accepted.
    pub async fn post_events(&self, ns: &str, events: &[serde_json::Value]) -> serde_json::Value {
        let body = serde_json::Value::Array(events.to_vec()).to_string();
        let (status, reply) = post_events(self.op.op.listen_addr, ns, None, &body).await;
        assert_eq!(
            status, 202,
            "{:?} ingest refused the events: {reply}",
            self.mode
        );
        reply
    }

    /// Posts one event of `type_` with the contract's example timestamp and `data`.
    pub async fn post_event(&self, ns: &str, type_: &str, data: serde_json::Value) {
        self.post_events(
            ns,
            &[serde_json::json!({"event": type_, "timestamp": EXAMPLE_TIMESTAMP, "data": data})],
        )
        .await;
    }
}
