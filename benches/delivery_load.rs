//! Sustained delivery load against a real kube-apiserver + etcd, operator as a release process.
//!
//! Runs ~500 deliveries/s (50 DocumentEvents/s to 10 Webhooks) for `HOOKRELAY_BENCH_SECONDS`
//! (default 20 s) and reports the delivery rate reached, status patches per Webhook per second,
//! status patches per DocumentEvent, and how long the backlog took to drain after the last event.
//! Then runs the same load with an 11th Webhook whose endpoint never answers, and reports the
//! drain time of the live ones against the first run (the baseline of this run).
//!
//! Run: `cargo bench --bench delivery_load`.

#[path = "../tests/e2e/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::time::{Duration, Instant};

use hookrelay::crd::{DocumentEvent, Webhook};
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, api::PostParams};
use serde_json::json;
use support::{Blackhole, CountingReceiver, Operator, control_plane, eventually, metric};

const WEBHOOKS: usize = 10;
const EVENTS_PER_SECOND: usize = 50;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let seconds: u64 = std::env::var("HOOKRELAY_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let base = run(seconds, false).await;
    let dead = run(seconds, true).await;
    println!(
        "\nwith a dead endpoint beside them, the live endpoints drained in {:.2?} vs {:.2?} without it ({:.2}x)",
        dead,
        base,
        dead.as_secs_f64() / base.as_secs_f64().max(0.001)
    );
}

async fn run(seconds: u64, with_dead: bool) -> Duration {
    let cp = control_plane();
    let client = cp.client().await;
    let ns = cp
        .namespace(if with_dead { "load-dead" } else { "load" })
        .await;
    let (receiver, addr) = CountingReceiver::start().await;
    let blackhole = Blackhole::start().await;
    let op = Operator::start(
        cp,
        &[
            "--watch-namespace",
            &ns,
            "--egress-allow-http",
            "--egress-allow-cidr",
            "127.0.0.0/8",
        ],
    );
    op.wait_ready().await;

    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    // Labelled and 16 bytes at least, or the Webhooks are not Ready (SecretNotFound,
    // SecretInvalid) and nothing is delivered.
    let s: Secret = serde_json::from_value(json!({
        "metadata": {"name": "s", "labels": {"hookrelay.dev/signing-secret": "true"}},
        "stringData": {"secret": "delivery-load-secret-0123456789"}
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &s).await.unwrap();
    let webhooks: Api<Webhook> = Api::namespaced(client.clone(), &ns);
    let mut targets: Vec<(String, String)> = (0..WEBHOOKS)
        .map(|i| (format!("w{i}"), format!("http://{addr}/{i}")))
        .collect();
    if with_dead {
        targets.push(("dead".into(), format!("http://{}/never", blackhole.addr)));
    }
    for (name, url) in &targets {
        let w: Webhook = serde_json::from_value(json!({
            "apiVersion": "hookrelay.dev/v1alpha1", "kind": "Webhook", "metadata": {"name": name},
            "spec": {"url": url, "events": ["*"], "secretRef": {"name": "s"}, "delivery": {"timeoutSeconds": 30}}
        }))
        .unwrap();
        webhooks.create(&PostParams::default(), &w).await.unwrap();
    }
    let addr_m = op.metrics_addr;
    eventually("webhooks active", Duration::from_secs(60), || async move {
        (metric(addr_m, "hookrelay_webhooks{state=\"Active\"}").await? as usize
            == targets_len(with_dead))
        .then_some(())
    })
    .await;
    let patches_before = metric(
        addr_m,
        "hookrelay_status_patches_total{kind=\"Webhook\",result=\"Ok\"}",
    )
    .await
    .unwrap_or(0.0);
    let event_patches_before = metric(
        addr_m,
        "hookrelay_status_patches_total{kind=\"DocumentEvent\",result=\"Ok\"}",
    )
    .await
    .unwrap_or(0.0);

    // Create events at a steady pace.
    let events: Api<DocumentEvent> = Api::namespaced(client.clone(), &ns);
    let total = EVENTS_PER_SECOND * seconds as usize;
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / EVENTS_PER_SECOND as u32);
    let mut creates = Vec::with_capacity(total);
    for i in 0..total {
        tick.tick().await;
        let events = events.clone();
        creates.push(tokio::spawn(async move {
            let e: DocumentEvent = serde_json::from_value(json!({
                "apiVersion": "hookrelay.dev/v1alpha1", "kind": "DocumentEvent", "metadata": {"name": format!("e{i:05}")},
                "spec": {"type": "document.completed", "data": {"document_id": i}}
            }))
            .unwrap();
            events.create(&PostParams::default(), &e).await.map(|_| ())
        }));
    }
    for c in creates {
        c.await.unwrap().expect("event created");
    }
    let created = started.elapsed();
    let expected = total * WEBHOOKS;
    eventually("every live delivery", Duration::from_secs(300), || async {
        (receiver.counts().0 >= expected).then_some(())
    })
    .await;
    let done = started.elapsed();
    let drain = done.saturating_sub(created);
    // Let the status writer catch up, then count its patches.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let patches = metric(
        addr_m,
        "hookrelay_status_patches_total{kind=\"Webhook\",result=\"Ok\"}",
    )
    .await
    .unwrap_or(0.0)
        - patches_before;
    let event_patches = metric(
        addr_m,
        "hookrelay_status_patches_total{kind=\"DocumentEvent\",result=\"Ok\"}",
    )
    .await
    .unwrap_or(0.0)
        - event_patches_before;
    let (distinct, requests) = receiver.counts();
    let window = done.as_secs_f64() + 2.0;
    println!(
        "\n{} Webhooks{}, {total} DocumentEvents at {EVENTS_PER_SECOND}/s ({expected} live deliveries)",
        WEBHOOKS,
        if with_dead {
            " + 1 that never answers"
        } else {
            ""
        }
    );
    println!(
        "  events created in {created:.2?}; all live deliveries done {done:.2?} after the first ({:.0} deliveries/s), backlog drained {drain:.2?} after the last create",
        distinct as f64 / done.as_secs_f64()
    );
    println!("  receiver requests {requests} for {distinct} deliveries");
    println!(
        "  Webhook status patches: {patches} in {window:.1}s = {:.2} per Webhook per second",
        patches / window / targets.len() as f64
    );
    println!(
        "  DocumentEvent status patches: {event_patches} for {total} events = {:.2} per event",
        event_patches / total as f64
    );
    drain
}

fn targets_len(with_dead: bool) -> usize {
    WEBHOOKS + usize::from(with_dead)
}
