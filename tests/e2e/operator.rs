//! The operator process itself against the real API server.

use std::time::Duration;

use hookrelay::crd::Webhook;
use kube::Api;
use serde_json::json;

use crate::support::{
    ControlPlane, CountingReceiver, Operator, OperatorArgs, control_plane, create_event,
    create_webhook, eventually, http_get, metric,
};

const WAIT: Duration = Duration::from_secs(60);
const SECRET: &str = "operator-test-signing-secret-0123456789";

/// A Webhook (and, unless `secret` is None, its Secret) applied with kubectl, without waiting
/// for an operator to make it Ready: there may be none running yet.
async fn apply_webhook(
    cp: &ControlPlane,
    ns: &str,
    name: &str,
    url: &str,
    secret: Option<&str>,
    paused: bool,
) {
    if let Some(secret) = secret {
        // Labelled as a signing Secret: hookrelay signs with labelled Secrets only.
        let manifest = json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": format!("{name}-secret"), "labels": {"hookrelay.dev/signing-secret": "true"}},
            "stringData": {"secret": secret}
        })
        .to_string();
        cp.kubectl_ok(&["apply", "-n", ns, "-f", "-"], Some(&manifest))
            .await;
    }
    let manifest = json!({
        "apiVersion": "hookrelay.dev/v1alpha1", "kind": "Webhook", "metadata": {"name": name},
        "spec": {"url": url, "events": ["*"], "secretRef": {"name": format!("{name}-secret")}, "paused": paused}
    })
    .to_string();
    cp.kubectl_ok(&["apply", "-n", ns, "-f", "-"], Some(&manifest))
        .await;
}

async fn webhooks_in_state(op: &Operator, state: &str) -> Option<f64> {
    metric(
        op.metrics_addr,
        &format!("hookrelay_webhooks{{state=\"{state}\"}}"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_starts_ready_with_every_existing_webhook_routed() {
    let cp = control_plane();
    // Scoped to its own namespace: other tests create Webhooks with public example URLs, and
    // no test may deliver beyond loopback.
    let ns = cp.namespace("process").await;
    let client = cp.client().await;
    let (receiver, addr) = CountingReceiver::start().await;
    let url = format!("http://{addr}/h");

    // Webhooks that exist before the operator starts: two deliverable, one paused, one whose
    // Secret does not exist.
    apply_webhook(cp, &ns, "before-a", &url, Some(SECRET), false).await;
    apply_webhook(cp, &ns, "before-b", &url, Some(SECRET), false).await;
    apply_webhook(cp, &ns, "before-paused", &url, Some(SECRET), true).await;
    apply_webhook(cp, &ns, "before-no-secret", &url, None, false).await;

    let args = OperatorArgs::new(&ns).with_auth();
    // A first run writes their status; the operator under test then starts on Webhooks whose
    // status is already right, so it writes nothing and no echo of a write can fill the routing
    // table after the fact: only its initial list can.
    let mut first = args.start(cp);
    first.wait_ready().await;
    let webhooks: Api<Webhook> = Api::namespaced(client.clone(), &ns);
    eventually("every Webhook's Ready condition written", WAIT, || async {
        let list = webhooks.list(&Default::default()).await.ok()?;
        list.items
            .iter()
            .all(|w| {
                w.status.as_ref().is_some_and(|s| {
                    s.conditions.iter().any(|c| {
                        c.type_ == "Ready" && c.observed_generation == w.metadata.generation
                    })
                })
            })
            .then_some(())
    })
    .await;
    first.child.start_kill().expect("SIGKILL sent");
    first.child.wait().await.unwrap();

    let mut op = args.start(cp);
    op.wait_ready().await;
    // Ready means every existing Webhook is in the routing table: read once, no waiting.
    let counts = [
        webhooks_in_state(&op, "Active").await,
        webhooks_in_state(&op, "Paused").await,
        webhooks_in_state(&op, "Blocked").await,
    ];
    assert_eq!(
        counts,
        [Some(2.0), Some(1.0), Some(1.0)],
        "Active, Paused, Blocked Webhooks in the routing table at /readyz 200 (log: {})",
        op.log.display()
    );
    let (status, body) = http_get(op.metrics_addr, "/healthz")
        .await
        .expect("healthz reachable");
    assert_eq!((status, body.trim()), (200, "ok"));

    // One created while it runs is routed too.
    create_webhook(&client, &ns, "after", &url, SECRET, json!({})).await;
    eventually("the new Webhook counted Active", WAIT, || async {
        (webhooks_in_state(&op, "Active").await == Some(3.0)).then_some(())
    })
    .await;

    // And the routes deliver: one event reaches the three Active Webhooks, and only them.
    create_event(
        &client,
        &ns,
        "doc-1",
        "document.completed",
        json!({"document_id": 1}),
    )
    .await;
    let event = crate::support::wait_phase(&client, &ns, "doc-1", "Delivering")
        .await
        .status
        .unwrap();
    let mut targets: Vec<_> = event.deliveries.iter().map(|d| d.webhook.clone()).collect();
    targets.sort();
    assert_eq!(
        targets,
        [
            "after",
            "before-a",
            "before-b",
            "before-no-secret",
            "before-paused"
        ],
        "every matching Webhook is a target"
    );
    eventually("three deliveries at the receiver", WAIT, || async {
        (receiver.counts() == (3, 3)).then_some(())
    })
    .await;

    // The REST API port serves the OpenAPI document without authentication.
    let (status, body) = http_get(op.listen_addr, "/openapi.json")
        .await
        .expect("API reachable");
    assert_eq!(status, 200);
    assert!(body.contains("\"/api/events\""), "{body}");
    assert!(op.child.try_wait().unwrap().is_none(), "operator exited");
}

/// `hookrelay version` names the version, the commit and the build date (the build gives the last
/// two; `cargo test` does not, so they are unknown here, and say so rather than being empty).
#[tokio::test]
async fn version_prints_the_version_the_commit_and_the_build_date() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_hookrelay"))
        .arg("version")
        .output()
        .await
        .expect("hookrelay runs");
    assert!(out.status.success());
    let line = String::from_utf8_lossy(&out.stdout);
    let expected = format!(
        "hookrelay {} (commit {}, built {})",
        env!("CARGO_PKG_VERSION"),
        option_env!("HOOKRELAY_BUILD_COMMIT").unwrap_or("unknown"),
        option_env!("HOOKRELAY_BUILD_DATE").unwrap_or("unknown")
    );
    assert_eq!(line.trim(), expected);
}
