//! The test harness: one real etcd + kube-apiserver per test run, a namespace per test, and the
//! operator, receivers and nats-server the tests run against it.
//!
//! The control plane comes from `hack/control-plane.sh` (built once per machine, cached by version).
//! When `HOOKRELAY_TEST_KUBECONFIG` names a running one (as `hack/test.sh` does), it is shared;
//! otherwise this process starts its own, and a watchdog stops it when the process exits.
//!
//! One module per concern, in support/, everything re-exported here so that tests import from
//! `crate::support` alone:
//!
//! - [`control_plane`](mod@control_plane): the shared API server, kubectl, ServiceAccount
//!   tokens, and control planes a test may stop and restart.
//! - [`operator`]: the operator under test, as the binary ([`OperatorArgs`]) or in this process
//!   ([`InProcess`], [`ModeOperator`]).
//! - [`receivers`]: the endpoints Webhooks deliver to.
//! - [`nats`]: nats-server for `--ingest-mode jetstream`.
//! - [`prometheus`]: a real Prometheus scraping an operator, and promtool.
//! - [`http`]: raw HTTP to the operator's API, ingest, metrics and probes.
//! - [`resources`]: the Kubernetes objects tests create and the states they wait for.
//! - [`process`]: running helper programs and reading a process's memory.
//!
//! Here: waiting ([`eventually`], [`within`]), [`free_port`] and [`repo_root`].

pub mod control_plane;
pub mod http;
pub mod nats;
pub mod operator;
pub mod process;
pub mod prometheus;
pub mod receivers;
pub mod resources;

use std::{
    path::Path,
    time::{Duration, Instant},
};

// What tests import from `crate::support`, whichever module it is in. The benches load this file
// too and use a few of these; the rest would be unused imports there.
#[allow(unused_imports)]
pub use self::{
    control_plane::{ControlPlane, Kubectl, OWN_CONTROL_PLANES, OwnControlPlane, control_plane},
    http::{api_call, http_get, http_post, metric, metric_sum, metric_with, post_events, readyz},
    nats::NatsServer,
    operator::{
        INGEST_MODES, InProcess, ModeOperator, Operator, OperatorArgs, default_args, ingest_args,
        local_args, one_leader,
    },
    process::rss_mib,
    prometheus::{Prometheus, ScrapeTarget, promtool},
    receivers::{Blackhole, CountingReceiver, Received, Receiver, ReceiverKind},
    resources::{
        counting_webhook, create_event, create_webhook, create_webhook_to, grant, grant_hookrelay,
        set_paused, wait_phase, wait_ready, wait_ready_reason,
    },
};

/// The repository's root: where `hack/`, `crds/`, `charts/` and `tests/receivers/` are.
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A manifest of `examples/` and how to use it as written.
pub struct Example {
    pub path: std::path::PathBuf,
    /// `create` for DocumentEvents (they have a generateName), else `apply`.
    pub verb: &'static str,
    /// It makes events (a DocumentEvent, the ingest Job): to use once the Webhooks are Ready.
    pub emits: bool,
}

impl Example {
    pub fn path(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }

    /// The path from the repository's root, as a README writes it (`examples/webhook.yaml`).
    pub fn relative(&self) -> String {
        let relative = self.path.strip_prefix(repo_root()).unwrap_or(&self.path);
        relative.to_string_lossy().into_owned()
    }
}

/// Every manifest of `examples/` (not its subfolders), by name.
pub fn examples() -> Vec<Example> {
    let mut files: Vec<_> = std::fs::read_dir(repo_root().join("examples"))
        .expect("examples/")
        .map(|e| e.expect("an entry of examples/").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let event = name.starts_with("document-event");
            Example {
                verb: if event { "create" } else { "apply" },
                emits: event || name.starts_with("ingest-"),
                path,
            }
        })
        .collect()
}

/// Polls `check` until it returns Some, or panics after `timeout` naming what was awaited.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    within(timeout, check)
        .await
        .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// Polls `check` every 50 ms like [`eventually`], but gives up with None after `timeout`
/// instead of panicking: for a wait whose outcome is a figure printed before the assertions.
pub async fn within<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A free loopback port (bound, then released) for a server a test starts.
pub fn free_port() -> u16 {
    // Below the kernel's ephemeral range (32768 and up by default), as hack/control-plane.sh
    // picks its ports: a port the kernel handed out and took back could be given to one of the
    // tests' many outgoing connections before the server that was to listen on it binds it.
    loop {
        let port = 20_000 + rand::random::<u16>() % 12_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}
