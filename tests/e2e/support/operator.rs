//! The operator under test, two ways:
//!
//! - the `hookrelay` binary as a child process ([`Operator`]): for tests that kill, signal,
//!   freeze or restart it, give it another kubeconfig or environment, read its log or measure
//!   its memory;
//! - the operator inside the test process ([`InProcess`], and [`ModeOperator`] for one test body
//!   run in every ingest mode): for tests that read its state directly.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use hookrelay::{http::IngestMode, operator::RunArgs};
use kube::Config;

use super::{
    control_plane::ControlPlane,
    eventually, free_port,
    http::{api_call, http_get},
    nats::NatsServer,
    resources::EXAMPLE_TIMESTAMP,
};

// ---- the binary ----

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
    /// Starts `hookrelay run` against `cp` on free loopback ports, with `args` (not waiting
    /// until it is ready: [`Operator::wait_ready`]).
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

    /// Its log so far (stdout and stderr).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

// ---- in this process ----

/// The operator running inside the test process, stopped on drop.
pub struct InProcess {
    pub op: hookrelay::operator::Operator,
    shutdown: tokio_util::sync::CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), hookrelay::operator::Error>>>,
}

impl InProcess {
    /// Starts it with local demo settings (plain http and 127.0.0.0/8 allowed) and waits until
    /// its watches have synced.
    pub async fn start(config: Config, namespace: &str) -> InProcess {
        let mut args = RunArgs::for_tests();
        args.namespaces = vec![namespace.to_owned()];
        args.allow_http = true;
        args.allow_cidrs = vec!["127.0.0.0/8".parse().unwrap()];
        Self::start_with(config, args).await
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
    /// Starts the operator in `mode` watching `namespaces` (plain http and 127.0.0.0/8 allowed,
    /// auth off), after `tune` adjusted its flags.
    pub async fn start(
        cp: &ControlPlane,
        mode: IngestMode,
        namespaces: &[&str],
        tune: impl FnOnce(&mut RunArgs),
    ) -> ModeOperator {
        let mut args = RunArgs::for_tests();
        args.namespaces = namespaces.iter().map(|ns| ns.to_string()).collect();
        args.allow_http = true;
        args.allow_cidrs = vec!["127.0.0.0/8".parse().unwrap()];
        args.disable_auth = true;
        args.ingest_mode = mode;
        let nats = match mode {
            IngestMode::JetStream => {
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

    /// Posts `events` (shaped as the contract's events) in one request to namespace `ns`; they
    /// must be accepted.
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

    /// Posts one event of `type_` with the contract's example timestamp and `data`.
    pub async fn post_event(&self, ns: &str, type_: &str, data: serde_json::Value) {
        self.post_events(
            ns,
            &[serde_json::json!({"event": type_, "timestamp": EXAMPLE_TIMESTAMP, "data": data})],
        )
        .await;
    }
}
