//! Accepted events per second through `POST /api/events`, durable against direct, with a real
//! kube-apiserver + etcd, the operator as a release process, and a real bearer token (so the
//! TokenReview/SubjectAccessReview path and its cache are part of the figures).
//!
//! Each mode gets `HOOKRELAY_BENCH_EVENTS` events (default 2,000), 16 concurrent clients, one
//! event per request, then the same in batches of 50. One Webhook to a loopback receiver.
//!
//! Run: `cargo bench --bench ingest`.

#[path = "../tests/e2e/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use support::{CountingReceiver, Operator, control_plane, eventually};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("HOOKRELAY_BENCH_EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let mut figures = Vec::new();
    for mode in ["durable", "direct"] {
        for batch in [1, 50] {
            figures.push((mode, batch, run(mode, n, batch).await));
        }
    }
    let base = figures[0].2;
    println!("\naccepted events/s ({n} events, 16 concurrent clients)");
    for (mode, batch, rate) in &figures {
        println!(
            "  {mode:<8} {batch:>2} per request: {rate:>8.0}/s  ({:.2}x durable single)",
            rate / base
        );
    }
}

async fn run(mode: &str, n: usize, batch: usize) -> f64 {
    let cp = control_plane();
    let ns = cp.namespace(&format!("ingest-{mode}-{batch}")).await;
    let (receiver, addr) = CountingReceiver::start().await;
    let op = Operator::start(
        cp,
        &[
            "--watch-namespace",
            &ns,
            "--egress-allow-http",
            "--egress-allow-cidr",
            "127.0.0.0/8",
            "--ingest-mode",
            mode,
            "--direct-queue",
            "100000",
        ],
    );
    op.wait_ready().await;
    let listen = op.listen_addr;
    let token = cp.service_account_token(&ns, "bench").await;
    cp.kubectl_ok(
        &[
            "create",
            "rolebinding",
            "bench",
            "--clusterrole=cluster-admin",
            &format!("--serviceaccount={ns}:bench"),
            "-n",
            &ns,
        ],
        None,
    )
    .await;
    cp.kubectl_ok(
        &[
            "create",
            "secret",
            "generic",
            "s",
            "--from-literal=secret=x",
            "-n",
            &ns,
        ],
        None,
    )
    .await;
    let manifest = format!(
        "apiVersion: hookrelay.dev/v1alpha1\nkind: Webhook\nmetadata: {{name: w}}\nspec: {{url: 'http://{addr}/h', events: ['*'], secretRef: {{name: s}}}}\n"
    );
    cp.kubectl_ok(&["apply", "-n", &ns, "-f", "-"], Some(&manifest))
        .await;
    cp.kubectl_ok(
        &[
            "wait",
            "--for=condition=Ready",
            "webhook/w",
            "-n",
            &ns,
            "--timeout=60s",
        ],
        None,
    )
    .await;

    let client = reqwest::Client::new();
    let url = format!("http://{listen}/api/events?namespace={ns}");
    let one = r#"{"event":"document.completed","data":{"document_id":1}}"#;
    let body = if batch == 1 {
        one.to_owned()
    } else {
        format!("[{}]", vec![one; batch].join(","))
    };
    let requests = n / batch;
    let started = Instant::now();
    let accepted: usize = futures::stream::iter(0..requests)
        .map(|_| {
            let (client, url, body, token) =
                (client.clone(), url.clone(), body.clone(), token.clone());
            async move {
                let r = client
                    .post(url)
                    .bearer_auth(token)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(
                    r.status().as_u16(),
                    202,
                    "{}",
                    r.text().await.unwrap_or_default()
                );
                batch
            }
        })
        .buffer_unordered(16)
        .fold(0, |a, b| async move { a + b })
        .await;
    let elapsed = started.elapsed();
    let rate = accepted as f64 / elapsed.as_secs_f64();
    eventually(
        "every accepted event delivered",
        Duration::from_secs(300),
        || async { (receiver.counts().0 >= accepted).then_some(()) },
    )
    .await;
    let delivered_after = started.elapsed();
    println!(
        "{mode}, {batch} per request: {accepted} accepted in {elapsed:.2?} ({rate:.0}/s); all delivered {delivered_after:.2?} after the first request"
    );
    rate
}
