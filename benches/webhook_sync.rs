//! How fast Webhooks become routable and Ready, and what that costs the operator.
//!
//! For N = 1,000 and 10,000 Webhooks against a real kube-apiserver + etcd, with the operator as
//! its own process (release build), it reports:
//! - the API server's own time to create the N Webhooks (the baseline of this run);
//! - live: time from the first create until all N are in the routing table and all N are Ready;
//! - restart: time from starting a fresh operator until /readyz and all N routes;
//! - the operator's resident memory (now and peak) and the API requests it made, by verb.
//!
//! Run: `cargo bench --bench webhook_sync` (N can be set with `HOOKRELAY_BENCH_SIZES=1000,10000`).

#[path = "../tests/e2e/support.rs"]
#[allow(dead_code)]
mod support;

use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use hookrelay::crd::Webhook;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    api::{ListParams, PostParams},
};
use serde_json::json;
use support::{Operator, control_plane, eventually, http_get, metric};

const TIMEOUT: Duration = Duration::from_secs(600);

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let sizes: Vec<usize> = std::env::var("HOOKRELAY_BENCH_SIZES")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .map(|s| s.trim().parse().expect("sizes are numbers"))
        .collect();
    let cp = control_plane();
    println!(
        "webhook_sync: kube-apiserver {}",
        cp.kubectl_ok(&["version", "-o", "json"], None)
            .await
            .lines()
            .find(|l| l.contains("gitVersion"))
            .unwrap_or_default()
            .trim()
    );
    for n in sizes {
        run(n).await;
    }
}

async fn run(n: usize) {
    let cp = control_plane();
    let client = cp.client().await;
    let ns = cp.namespace(&format!("bench-{n}")).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let secret: Secret = serde_json::from_value(
        json!({"metadata": {"name": "shared"}, "stringData": {"secret": "s"}}),
    )
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let webhooks: Api<Webhook> = Api::namespaced(client.clone(), &ns);

    // Live: the operator runs while the Webhooks are created.
    let mut op = Operator::start(
        cp,
        &[
            "--namespace",
            &ns,
            "--allow-http",
            "--allow-cidr",
            "127.0.0.0/8",
        ],
    );
    op.wait_ready().await;
    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let webhooks = webhooks.clone();
            async move {
                let w: Webhook = serde_json::from_value(json!({
                    "apiVersion": "hookrelay.dev/v1alpha1", "kind": "Webhook",
                    "metadata": {"name": format!("w{i:05}")},
                    "spec": {"url": format!("http://127.0.0.1:9/{i}"), "events": ["document.completed"], "secretRef": {"name": "shared"}}
                }))
                .unwrap();
                webhooks.create(&PostParams::default(), &w).await.map(|_| ())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await
        .expect("webhooks created");
    let created = started.elapsed();
    let addr = op.metrics_addr;
    eventually("all routes active", TIMEOUT, || async move {
        (metric(addr, "hookrelay_webhooks{state=\"Active\"}").await? as usize == n).then_some(())
    })
    .await;
    let routed = started.elapsed();
    eventually("all webhooks Ready", TIMEOUT, || {
        let webhooks = webhooks.clone();
        async move { (ready_count(&webhooks).await == n).then_some(()) }
    })
    .await;
    let ready = started.elapsed();
    let live_requests = requests(addr).await;
    let live_patches = metric(
        addr,
        "hookrelay_status_patches_total{kind=\"Webhook\",result=\"Ok\"}",
    )
    .await
    .unwrap_or(0.0);
    let (rss, peak) = memory(op.child.id().unwrap());
    op.child.kill().await.unwrap();

    // Restart: a fresh operator finds N existing, already Ready Webhooks.
    let started = Instant::now();
    let op = Operator::start(
        cp,
        &[
            "--namespace",
            &ns,
            "--allow-http",
            "--allow-cidr",
            "127.0.0.0/8",
        ],
    );
    op.wait_ready().await;
    let addr = op.metrics_addr;
    let restart_ready = started.elapsed();
    let routes = metric(addr, "hookrelay_webhooks{state=\"Active\"}")
        .await
        .unwrap_or(0.0) as usize;
    let restart_requests = requests(addr).await;
    let restart_patches = metric(
        addr,
        "hookrelay_status_patches_total{kind=\"Webhook\",result=\"Ok\"}",
    )
    .await
    .unwrap_or(0.0);
    let (restart_rss, restart_peak) = memory(op.child.id().unwrap());

    println!("\nN = {n} Webhooks (one shared Secret), operator as a release-build process");
    println!(
        "  baseline: API server created {n} Webhooks in {created:.2?} ({:.0}/s, 32 concurrent creates)",
        n as f64 / created.as_secs_f64()
    );
    println!(
        "  live:     all {n} in the routing table {routed:.2?} after the first create ({:.2}x the create time)",
        routed.as_secs_f64() / created.as_secs_f64()
    );
    println!(
        "            all {n} Ready in status {ready:.2?} after the first create ({:.2}x the create time)",
        ready.as_secs_f64() / created.as_secs_f64()
    );
    println!("            status patches {live_patches}, API requests {live_requests}");
    println!(
        "            operator RSS {:.1} MiB (peak {:.1} MiB)",
        rss, peak
    );
    println!(
        "  restart:  /readyz with {routes} routes {restart_ready:.2?} after start; status patches {restart_patches}, API requests {restart_requests}"
    );
    println!(
        "            operator RSS {:.1} MiB (peak {:.1} MiB)",
        restart_rss, restart_peak
    );
    assert_eq!(routes, n, "readiness implies a complete table");
}

async fn ready_count(webhooks: &Api<Webhook>) -> usize {
    let list = webhooks.list(&ListParams::default()).await.expect("list");
    list.items
        .iter()
        .filter(|w| {
            w.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
        })
        .count()
}

/// API requests by verb, as the operator counted them.
async fn requests(addr: std::net::SocketAddr) -> String {
    let (_, body) = http_get(addr, "/metrics").await.unwrap_or_default();
    let mut by_verb: Vec<String> = body
        .lines()
        .filter_map(|l| l.strip_prefix("hookrelay_kube_api_requests_total{verb=\""))
        .filter_map(|l| l.split_once("\"} "))
        .map(|(verb, n)| format!("{verb} {n}"))
        .collect();
    by_verb.sort();
    let total: f64 = body
        .lines()
        .filter_map(|l| l.strip_prefix("hookrelay_kube_api_requests_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    format!("{total} ({})", by_verb.join(", "))
}

/// Resident and peak resident memory of a process, in MiB.
fn memory(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |field: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0)
    };
    (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
}
