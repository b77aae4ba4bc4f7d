//! Many Webhooks: creating them concurrently, counting the Ready ones from a watch, and the
//! scenario "N Webhooks (10,000 by default): time to all Ready, and the operator's memory".

use std::{
    collections::HashSet,
    net::SocketAddr,
    time::{Duration, Instant},
};

use futures::{StreamExt, TryStreamExt};
use hookrelay::crd::Webhook;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;

use crate::{
    cost,
    support::{Operator, control_plane, eventually, metric},
};

/// How many creates are in flight at once.
const CREATE_CONCURRENCY: usize = 32;
/// The longest wait for Webhooks to be routed or Ready.
const SYNC_TIMEOUT: Duration = Duration::from_secs(600);

/// A labelled signing Secret `name` holding `value`, which every bench Webhook shares: one
/// Secret for thousands of Webhooks, as the webhook_sync bench measured before.
pub async fn signing_secret(client: &Client, ns: &str, name: &str, value: &str) {
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"hookrelay.dev/signing-secret": "true"}},
        "stringData": {"secret": value},
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .expect("secret created");
}

/// Webhooks `w00000`... for the indexes `range`, every event type, signing with the Secret
/// `secret`, `CREATE_CONCURRENCY` creates at a time; `url` gives each one's URL.
pub async fn create_webhooks(
    client: &Client,
    ns: &str,
    range: std::ops::Range<usize>,
    secret: &str,
    url: impl Fn(usize) -> String,
) {
    let webhooks: Api<Webhook> = Api::namespaced(client.clone(), ns);
    each_concurrently(range, "webhooks created", |i| {
        let webhooks = webhooks.clone();
        let webhook: Webhook = serde_json::from_value(json!({
            "apiVersion": "hookrelay.dev/v1alpha1", "kind": "Webhook",
            "metadata": {"name": format!("w{i:05}")},
            "spec": {"url": url(i), "events": ["*"], "secretRef": {"name": secret}},
        }))
        .unwrap();
        async move {
            webhooks
                .create(&PostParams::default(), &webhook)
                .await
                .map(|_| ())
        }
    })
    .await;
}

/// Runs `request` for every index of `range`, `CREATE_CONCURRENCY` at a time; panics saying
/// `what` did not happen if one fails.
async fn each_concurrently<F, R>(range: std::ops::Range<usize>, what: &str, request: F)
where
    F: FnMut(usize) -> R,
    R: Future<Output = Result<(), kube::Error>>,
{
    futures::stream::iter(range)
        .map(request)
        .buffer_unordered(CREATE_CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await
        .unwrap_or_else(|e| panic!("not all {what}: {e}"));
}

/// The ceiling under "all Ready": a plain client writing one condition into the status of each
/// of the Webhooks `w00000`... below `n` the way the operator writes `Ready` (server-side
/// apply to the status subresource, `CREATE_CONCURRENCY` at a time), under a field manager and
/// a condition type of its own. Returns how long the API server took.
pub async fn apply_status_conditions(client: &Client, ns: &str, n: usize) -> Duration {
    let webhooks: Api<Webhook> = Api::namespaced(client.clone(), ns);
    let params = PatchParams::apply("hookrelay-bench-ceiling").force();
    let started = Instant::now();
    each_concurrently(0..n, "status conditions applied", |i| {
        let (webhooks, params) = (webhooks.clone(), params.clone());
        let status = json!({
            "apiVersion": "hookrelay.dev/v1alpha1", "kind": "Webhook",
            "status": {"conditions": [{
                "type": "BenchCeiling", "status": "True", "reason": "Measured",
                "message": "written by the bench's ceiling",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            }]},
        });
        async move {
            webhooks
                .patch_status(&format!("w{i:05}"), &params, &Patch::Apply(&status))
                .await
                .map(|_| ())
        }
    })
    .await;
    started.elapsed()
}

/// Waits until the operator's routing table holds `n` active Webhooks.
pub async fn wait_routed(metrics: SocketAddr, n: usize) {
    eventually(&format!("{n} routes active"), SYNC_TIMEOUT, || async move {
        (metric(metrics, "hookrelay_webhooks{state=\"Active\"}").await? as usize == n).then_some(())
    })
    .await
}

/// The number of Webhooks of a namespace whose `Ready` condition is True, kept up to date by a
/// watch: cheaper for the API server than listing thousands of Webhooks over and over, and
/// exact about when the last one turned Ready.
pub struct ReadyWatch {
    ready: tokio::sync::watch::Receiver<usize>,
    task: tokio::task::JoinHandle<()>,
}

impl ReadyWatch {
    pub fn start(client: &Client, ns: &str) -> ReadyWatch {
        let webhooks: Api<Webhook> = Api::namespaced(client.clone(), ns);
        let (count, ready) = tokio::sync::watch::channel(0);
        let task = tokio::spawn(async move {
            let mut names = HashSet::new();
            let mut events =
                std::pin::pin!(watcher(webhooks, watcher::Config::default()).default_backoff());
            while let Some(event) = events.next().await {
                match event {
                    Ok(watcher::Event::Apply(w) | watcher::Event::InitApply(w)) => {
                        if is_ready(&w) {
                            names.insert(w.name_any());
                        } else {
                            names.remove(&w.name_any());
                        }
                    }
                    Ok(watcher::Event::Delete(w)) => {
                        names.remove(&w.name_any());
                    }
                    Ok(watcher::Event::Init) => names.clear(),
                    Ok(watcher::Event::InitDone) | Err(_) => {}
                }
                count.send_replace(names.len());
            }
        });
        ReadyWatch { ready, task }
    }

    /// Waits until at least `n` Webhooks are Ready.
    pub async fn wait_for(&mut self, n: usize) {
        tokio::time::timeout(SYNC_TIMEOUT, self.ready.wait_for(|&ready| ready >= n))
            .await
            .unwrap_or_else(|_| panic!("{n} Webhooks not Ready within {SYNC_TIMEOUT:?}"))
            .expect("the watch runs");
    }
}

impl Drop for ReadyWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn is_ready(webhook: &Webhook) -> bool {
    webhook.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

/// N Webhooks the API server has before the operator starts: the operator makes them all Ready;
/// then a fresh operator finds them Ready already.
#[derive(serde::Serialize)]
pub struct SyncFigure {
    pub webhooks: usize,
    /// The ceiling: how long the API server took to create them (`CREATE_CONCURRENCY` at once).
    pub created_s: f64,
    /// From the operator's start until all are in its routing table.
    pub routed_s: f64,
    /// From the operator's start until all are Ready in their status.
    pub ready_s: f64,
    /// The operator's `VmRSS` once all are Ready, and its peak (`VmHWM`) so far.
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
    /// CPU time the operator spent from its start until all were Ready.
    pub cpu_s: f64,
    pub status_patches: f64,
    pub kube_api_requests: f64,
    /// A fresh operator: from its start until `/readyz` (every route loaded).
    pub restart_ready_s: f64,
    pub restart_rss_mib: f64,
    /// The ceiling for all Ready: the API server taking one status write per Webhook from a
    /// plain client, with no operator running.
    pub status_ceiling_s: f64,
}

fn operator_args(ns: &str) -> [&str; 5] {
    [
        "--watch-namespace",
        ns,
        "--egress-allow-http",
        "--egress-allow-cidr",
        "127.0.0.0/8",
    ]
}

/// `n` Webhooks sharing one Secret, to a port nothing listens on (no event is sent).
pub async fn sync(n: usize) -> SyncFigure {
    let cp = control_plane();
    let client = cp.client().await;
    let ns = cp.namespace(&format!("bench-webhooks-{n}")).await;
    signing_secret(&client, &ns, "shared", crate::SECRET).await;

    let creating = Instant::now();
    create_webhooks(&client, &ns, 0..n, "shared", |i| {
        format!("http://127.0.0.1:9/{i}")
    })
    .await;
    let created = creating.elapsed();
    let mut ready = ReadyWatch::start(&client, &ns);
    let started = Instant::now();
    let op = Operator::start(cp, &operator_args(&ns));
    let pid = cost::pid(&op);
    let route_wait = wait_routed(op.metrics_addr, n);
    let (routed, ()) = tokio::join!(
        async {
            route_wait.await;
            started.elapsed()
        },
        ready.wait_for(n)
    );
    let all_ready = started.elapsed();
    let cpu = cost::cpu_time(pid);
    let (rss, peak) = cost::memory(pid);
    let status_patches = cost::metric_sum(
        op.metrics_addr,
        "hookrelay_status_patches_total{kind=\"Webhook\",result=\"Ok\"}",
    )
    .await;
    let kube_api_requests =
        cost::metric_sum(op.metrics_addr, "hookrelay_kube_api_requests_total{").await;
    drop(op);

    let restarted = Instant::now();
    let op = Operator::start(cp, &operator_args(&ns));
    op.wait_ready().await;
    let restart_ready = restarted.elapsed();
    // Readiness implies a complete routing table.
    wait_routed(op.metrics_addr, n).await;
    let restart_rss = cost::memory(cost::pid(&op)).0;
    drop(op);
    let status_ceiling = apply_status_conditions(&client, &ns, n).await;
    let figure = SyncFigure {
        webhooks: n,
        created_s: created.as_secs_f64(),
        routed_s: routed.as_secs_f64(),
        ready_s: all_ready.as_secs_f64(),
        rss_mib: rss,
        peak_rss_mib: peak,
        cpu_s: cpu.as_secs_f64(),
        status_patches,
        kube_api_requests,
        restart_ready_s: restart_ready.as_secs_f64(),
        restart_rss_mib: restart_rss,
        status_ceiling_s: status_ceiling.as_secs_f64(),
    };
    eprintln!(
        "{n} Webhooks: created in {created:.2?}, routed {routed:.2?}, Ready {all_ready:.2?}; RSS {rss:.1} MiB (peak {peak:.1}); restart ready in {restart_ready:.2?}; the API server applied {n} status conditions in {status_ceiling:.2?}"
    );
    figure
}
