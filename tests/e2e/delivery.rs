//! Delivery end to end: real API server, real receivers built from the contract's code.

use std::time::{Duration, Instant};

use hookrelay::crd::{DocumentEvent, Webhook};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

use crate::support::{
    Blackhole, CountingReceiver, INGEST_MODES, InProcess, ModeOperator, Receiver, ReceiverKind,
    control_plane, counting_webhook, create_event, create_webhook, eventually, http_post,
    local_args, repo_root, wait_phase, wait_ready_reason,
};

const WAIT: Duration = Duration::from_secs(60);
const STANDARD_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn contract_payload(file: &str) -> Value {
    let text = std::fs::read_to_string(repo_root().join("examples").join(file)).unwrap();
    let start = text.find("  data:").unwrap();
    let yaml: Value = serde_saphyr::from_str(
        &text[start..]
            .replace("\n    ", "\n  ")
            .replacen("  data:", "data:", 1),
    )
    .unwrap();
    yaml["data"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receivers_from_the_contract_and_standard_webhooks_verify_every_delivery() {
    let cp = control_plane();
    let ns = cp.namespace("contract-receivers").await;
    let client = cp.client().await;
    let _op = InProcess::start(cp.config().await, &ns).await;

    let python = Receiver::start(ReceiverKind::Python, STANDARD_SECRET, &[]).await;
    let node = Receiver::start(ReceiverKind::Node, STANDARD_SECRET, &[]).await;
    let plain = Receiver::start(ReceiverKind::Python, "your_webhook_secret", &[]).await;
    let wrong = Receiver::start(ReceiverKind::Node, "not-the-secret", &[]).await;
    create_webhook(
        &client,
        &ns,
        "python",
        &python.url("/webhooks/file-conversion"),
        STANDARD_SECRET,
        json!({}),
    )
    .await;
    create_webhook(
        &client,
        &ns,
        "node",
        &node.url("/webhooks/file-conversion"),
        STANDARD_SECRET,
        json!({}),
    )
    .await;
    create_webhook(
        &client,
        &ns,
        "plain",
        &plain.url("/webhooks/file-conversion"),
        "your_webhook_secret",
        json!({}),
    )
    .await;
    create_webhook(
        &client,
        &ns,
        "wrong",
        &wrong.url("/hook"),
        "the-real-signing-secret",
        json!({"maxAttempts": 1}),
    )
    .await;

    // The document-processing contract's two payloads, as DocumentEvents.
    let completed = contract_payload("document-event-completed.yaml");
    let error = contract_payload("document-event-error.yaml");
    create_event(
        &client,
        &ns,
        "doc-123",
        "document.completed",
        completed.clone(),
    )
    .await;
    create_event(&client, &ns, "doc-124", "document.error", error.clone()).await;

    // A duplicate would come after the first copy: wait until both events are finished (the
    // "wrong" Webhook fails them after its one attempt), then for a marker event created
    // afterwards to arrive at every receiver, before counting what arrived.
    wait_phase(&client, &ns, "doc-123", "Failed").await;
    wait_phase(&client, &ns, "doc-124", "Failed").await;
    create_event(
        &client,
        &ns,
        "marker",
        "document.uploaded",
        json!({"document_id": 1}),
    )
    .await;
    wait_phase(&client, &ns, "marker", "Failed").await;
    for (name, receiver, standard) in [
        ("python", &python, Some(true)),
        ("node", &node, Some(true)),
        ("plain", &plain, None),
    ] {
        let all = receiver.wait_ok(3).await;
        assert_eq!(
            all.len(),
            3,
            "{name}: exactly one request per event: {all:?}"
        );
        let ids: std::collections::HashSet<_> = all.iter().map(|r| r.delivery_id.clone()).collect();
        assert_eq!(ids.len(), 3, "{name}: distinct delivery ids: {all:?}");
        assert!(ids.iter().all(Option::is_some), "{name}: {all:?}");
        let got: Vec<_> = all
            .into_iter()
            .filter(|r| r.event.as_deref() != Some("document.uploaded"))
            .collect();
        assert_eq!(got.len(), 2, "{name}: the contract's two events: {got:?}");
        for r in &got {
            assert!(r.hex_ok, "{name}: X-Webhook-Signature rejected: {r:?}");
            assert_eq!(r.standard_ok, standard, "{name}: webhook-signature: {r:?}");
            assert_eq!(r.path, "/webhooks/file-conversion");
            assert_eq!(r.content_type.as_deref(), Some("application/json"));
            assert_eq!(
                r.user_agent.as_deref(),
                Some(concat!("hookrelay/", env!("CARGO_PKG_VERSION")))
            );
            let body: Value = serde_json::from_str(&r.body).unwrap();
            let expected = if r.event.as_deref() == Some("document.completed") {
                &completed
            } else {
                &error
            };
            assert_eq!(
                body,
                json!({"event": r.event, "timestamp": "2023-06-15T10:35:00Z", "data": expected}),
                "{name}"
            );
            assert!(
                r.body.starts_with(r#"{"event":"#)
                    && serde_json::to_string(&body).unwrap() == r.body,
                "compact, event first: {}",
                r.body
            );
        }
    }

    // The checks can fail: a receiver with another secret refuses, and the failure is recorded.
    let refused = wrong.results().await;
    assert!(
        refused.iter().all(|r| r.status == 401 && !r.hex_ok),
        "{refused:?}"
    );
    let doc = wait_phase(&client, &ns, "doc-123", "Failed").await;
    let failed = &doc.status.as_ref().unwrap().conditions[0];
    assert_eq!(
        (failed.status.as_str(), failed.reason.as_str()),
        ("False", "Failed")
    );
    assert!(
        failed.message.contains("webhook wrong: HTTP 401"),
        "the Delivered condition names the failure: {}",
        failed.message
    );
    let to_wrong = doc
        .status
        .unwrap()
        .deliveries
        .into_iter()
        .find(|d| d.webhook == "wrong")
        .unwrap();
    assert_eq!((to_wrong.http_status, to_wrong.attempts), (Some(401), 1));
    // ... and a tampered body with a genuine signature is rejected by both libraries.
    let python_results = python.results().await;
    let genuine = python_results
        .iter()
        .find(|r| r.event.as_deref() == Some("document.completed"))
        .unwrap();
    let tampered = genuine.body.replace("123", "999").replace("124", "999");
    let sig_hex = hookrelay::wire::Signer::new(STANDARD_SECRET.as_bytes(), None)
        .unwrap()
        .sign("x", 0, genuine.body.as_bytes())
        .hex;
    let status = http_post(
        python.addr,
        "/webhooks/file-conversion",
        &[
            ("X-Webhook-Signature", &sig_hex),
            ("Content-Type", "application/json"),
        ],
        &tampered,
    )
    .await;
    assert_eq!(status, Some(401), "tampered body accepted");
    let status = http_post(
        python.addr,
        "/webhooks/file-conversion",
        &[
            ("X-Webhook-Signature", &sig_hex),
            ("Content-Type", "application/json"),
        ],
        &genuine.body,
    )
    .await;
    assert_eq!(
        status,
        Some(200),
        "the same signature over the genuine body is accepted"
    );

    // Both Webhooks' status tells what happened; `kubectl get` shows the last delivery.
    let webhooks: Api<Webhook> = Api::namespaced(client.clone(), &ns);
    let python_status = eventually("python's delivery history", WAIT, || async {
        let s = webhooks.get("python").await.ok()?.status?;
        (s.delivery_stats.succeeded == 3).then_some(s)
    })
    .await;
    assert_eq!(python_status.recent_deliveries.len(), 3);
    assert!(
        python_status
            .recent_deliveries
            .iter()
            .all(|r| r.http_status == Some(200))
    );
    let table = cp
        .kubectl_ok(&["get", "webhooks", "-n", &ns, "python"], None)
        .await;
    let row = table.lines().nth(1).unwrap();
    assert!(!row.contains("<none>"), "LAST DELIVERY shown: {table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_gets_retries_with_the_same_id_and_growing_gaps() {
    let cp = control_plane();
    let ns = cp.namespace("retries").await;
    let client = cp.client().await;
    let _op = InProcess::start(cp.config().await, &ns).await;
    let receiver = Receiver::start(
        ReceiverKind::Python,
        "s3cret-signing-secret-0123",
        &["--fail-first", "2"],
    )
    .await;
    create_webhook(
        &client,
        &ns,
        "flaky",
        &receiver.url("/h"),
        "s3cret-signing-secret-0123",
        json!({"initialBackoffSeconds": 1}),
    )
    .await;
    create_event(
        &client,
        &ns,
        "doc-1",
        "document.uploaded",
        json!({"document_id": 1}),
    )
    .await;

    let got = receiver.wait_ok(1).await;
    let statuses: Vec<u16> = got.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [500, 500, 200]);
    let ids: Vec<_> = got.iter().map(|r| r.delivery_id.clone().unwrap()).collect();
    assert!(
        ids.iter().all(|id| *id == ids[0]),
        "one delivery id across retries: {ids:?}"
    );
    let (gap1, gap2) = (
        got[1].received_at - got[0].received_at,
        got[2].received_at - got[1].received_at,
    );
    println!("retry gaps: {gap1:.3}s then {gap2:.3}s");
    // Each gap against its own window (initialBackoffSeconds 1, maxBackoffSeconds 3600): the
    // n-th retry waits initial * 2^(n-1) and jitter goes on top, up to half of that again.
    // Scheduling can only add time; 50 ms below allows for the receiver's clock reading.
    for (n, gap) in [(1, gap1), (2, gap2)] {
        let step = 2f64.powi(n - 1);
        assert!(
            (step - 0.05..=1.5 * step + 0.4).contains(&gap),
            "retry {n} came {gap:.3}s after the previous attempt, outside [{step}s, {}s]",
            1.5 * step
        );
    }

    let doc = wait_phase(&client, &ns, "doc-1", "Delivered").await;
    // Finished: no attempt may follow the success.
    assert_eq!(receiver.results().await.len(), 3);
    // The Delivered condition says so, for the generation it saw, and kubectl can wait on it.
    let waited = cp
        .kubectl_ok(
            &[
                "wait",
                "--for=condition=Delivered",
                "documentevent/doc-1",
                "-n",
                &ns,
                "--timeout=10s",
            ],
            None,
        )
        .await;
    assert!(waited.contains("condition met"), "{waited}");
    let status = doc.status.clone().unwrap();
    let delivered = &status.conditions[0];
    assert_eq!(
        (
            delivered.type_.as_str(),
            delivered.status.as_str(),
            delivered.reason.as_str()
        ),
        ("Delivered", "True", "Delivered")
    );
    assert_eq!(delivered.observed_generation, doc.metadata.generation);
    assert_eq!(status.observed_generation, doc.metadata.generation);
    let target = &doc.status.unwrap().deliveries[0];
    assert_eq!(
        (target.attempts, target.http_status, target.id.as_str()),
        (3, Some(200), ids[0].as_str())
    );
    let webhooks: Api<Webhook> = Api::namespaced(client.clone(), &ns);
    let status = eventually("three attempts in the Webhook status", WAIT, || async {
        let s = webhooks.get("flaky").await.ok()?.status?;
        (s.recent_deliveries.len() == 3).then_some(s)
    })
    .await;
    let history: Vec<_> = status
        .recent_deliveries
        .iter()
        .map(|r| {
            (
                r.attempt,
                serde_json::to_value(r.outcome).unwrap(),
                r.http_status,
            )
        })
        .collect();
    assert_eq!(
        history,
        [
            (3, json!("Succeeded"), Some(200)),
            (2, json!("Retrying"), Some(500)),
            (1, json!("Retrying"), Some(500))
        ]
    );
    assert_eq!(
        (
            status.delivery_stats.succeeded,
            status.delivery_stats.consecutive_failures
        ),
        (1, 0)
    );
}

// The same retries whatever the ingest mode, events posted to /api/events. Direct
// mode records no DocumentEvent, so what every mode shows is the receiver and the Webhook's
// history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_gets_retries_in_every_ingest_mode() {
    let cp = control_plane();
    let client = cp.client().await;
    for mode in INGEST_MODES {
        let ns = cp.namespace("retries-mode").await;
        let op = ModeOperator::start(cp, mode, &[&ns], |_| {}).await;
        let secret = "s3cret-signing-secret-0123";
        let receiver = Receiver::start(ReceiverKind::Python, secret, &["--fail-first", "2"]).await;
        create_webhook(
            &client,
            &ns,
            "flaky",
            &receiver.url("/h"),
            secret,
            json!({"initialBackoffSeconds": 1}),
        )
        .await;
        op.post_event(&ns, "document.uploaded", json!({"document_id": 1}))
            .await;

        let got = receiver.wait_ok(1).await;
        let statuses: Vec<u16> = got.iter().map(|r| r.status).collect();
        assert_eq!(statuses, [500, 500, 200], "{mode:?}");
        assert!(got.iter().all(|r| r.hex_ok), "{mode:?}: {got:?}");
        let ids: std::collections::HashSet<_> = got.iter().map(|r| r.delivery_id.clone()).collect();
        assert_eq!(ids.len(), 1, "{mode:?}: one delivery id across retries");
        let gaps = [
            got[1].received_at - got[0].received_at,
            got[2].received_at - got[1].received_at,
        ];
        println!("{mode:?}: retry gaps {gaps:?}");
        // The second gap is the larger window (jitter can make the first up to 1.5 s).
        assert!(
            gaps[0] >= 0.95 && gaps[1] >= 1.95,
            "{mode:?}: gaps {gaps:?}"
        );
        let webhooks: Api<Webhook> = Api::namespaced(client.clone(), &ns);
        let history = eventually("three attempts in the Webhook status", WAIT, || async {
            let s = webhooks.get("flaky").await.ok()?.status?;
            (s.recent_deliveries.len() == 3).then_some(s.recent_deliveries)
        })
        .await;
        let history: Vec<_> = history
            .iter()
            .map(|r| (r.attempt, serde_json::to_value(r.outcome).unwrap()))
            .collect();
        assert_eq!(
            history,
            [
                (3, json!("Succeeded")),
                (2, json!("Retrying")),
                (1, json!("Retrying"))
            ],
            "{mode:?}"
        );
        op.op.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_does_not_delay_another() {
    let cp = control_plane();
    let ns = cp.namespace("isolation").await;
    let client = cp.client().await;
    let _op = InProcess::start(cp.config().await, &ns).await;
    let dead = Blackhole::start().await;
    let (fast, fast_addr) = CountingReceiver::start().await;
    create_webhook(
        &client,
        &ns,
        "dead",
        &format!("http://{}/h", dead.addr),
        "signing-secret-0123456789",
        json!({"timeoutSeconds": 30}),
    )
    .await;
    create_webhook(
        &client,
        &ns,
        "fast",
        &format!("http://{fast_addr}/h"),
        "signing-secret-0123456789",
        json!({}),
    )
    .await;

    let n = 60;
    let started = Instant::now();
    for i in 0..n {
        create_event(
            &client,
            &ns,
            &format!("doc-{i}"),
            "document.completed",
            json!({"document_id": i}),
        )
        .await;
    }
    eventually("every event at the live endpoint", WAIT, || async {
        (fast.counts().0 == n).then_some(())
    })
    .await;
    let elapsed = started.elapsed();
    println!(
        "{n} events reached the live endpoint {elapsed:.2?} after the first create while the dead one held {} connections",
        dead.connections.load(std::sync::atomic::Ordering::Relaxed)
    );
    // The dead endpoint holds one connection per lane of its Webhook, and no more ...
    let lanes = hookrelay::delivery::DispatcherConfig::default().per_webhook;
    eventually("the dead endpoint's lanes full", WAIT, || async {
        (dead.connections.load(std::sync::atomic::Ordering::Relaxed) == lanes).then_some(())
    })
    .await;
    // ... and no attempt to it has ended yet (each waits 30s for an answer): the live endpoint
    // was served while the dead one's lanes were all taken.
    let webhooks: Api<Webhook> = Api::namespaced(client.clone(), &ns);
    let dead_status = webhooks.get("dead").await.unwrap().status.unwrap();
    assert_eq!(
        dead_status.recent_deliveries.len(),
        0,
        "no attempt to the dead endpoint has finished"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_webhooks_hold_deliveries_and_gone_endpoints_stop_them() {
    let cp = control_plane();
    let ns = cp.namespace("hold-gone").await;
    let client = cp.client().await;
    let _op = InProcess::start(cp.config().await, &ns).await;
    let (receiver, addr) = CountingReceiver::start().await;
    create_webhook(
        &client,
        &ns,
        "paused",
        &format!("http://{addr}/h"),
        "signing-secret-0123456789",
        json!({}),
    )
    .await;
    let webhooks: Api<Webhook> = Api::namespaced(client.clone(), &ns);
    webhooks
        .patch(
            "paused",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"paused": true}})),
        )
        .await
        .unwrap();
    eventually("Paused", WAIT, || async {
        let w = webhooks.get("paused").await.ok()?;
        w.status?
            .conditions
            .iter()
            .any(|c| c.reason == "Paused")
            .then_some(())
    })
    .await;
    create_event(
        &client,
        &ns,
        "held",
        "document.deleted",
        json!({"document_id": 7}),
    )
    .await;
    let events: Api<DocumentEvent> = Api::namespaced(client.clone(), &ns);
    eventually("the delivery held", WAIT, || async {
        let e = events.get("held").await.ok()?;
        let d = e.status?.deliveries.into_iter().next()?;
        (serde_json::to_value(d.state).ok()? == "Held").then_some(())
    })
    .await;
    assert_eq!(receiver.counts(), (0, 0), "nothing sent while paused");
    webhooks
        .patch(
            "paused",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"paused": false}})),
        )
        .await
        .unwrap();
    wait_phase(&client, &ns, "held", "Delivered").await;
    assert_eq!(receiver.counts(), (1, 1));

    // 410 Gone: the delivery fails at once and the Webhook is not Ready until its spec changes.
    let gone = axum::Router::new().fallback(axum::routing::post(|| async {
        axum::http::StatusCode::GONE
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gone_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, gone).await });
    create_webhook(
        &client,
        &ns,
        "gone",
        &format!("http://{gone_addr}/h"),
        "signing-secret-0123456789",
        json!({}),
    )
    .await;
    create_event(
        &client,
        &ns,
        "to-gone",
        "document.error",
        json!({"document_id": 8}),
    )
    .await;
    let e = wait_phase(&client, &ns, "to-gone", "Failed").await;
    let to_gone = e
        .status
        .unwrap()
        .deliveries
        .into_iter()
        .find(|d| d.webhook == "gone")
        .unwrap();
    assert_eq!((to_gone.attempts, to_gone.http_status), (1, Some(410)));
    let message = eventually("EndpointGone", WAIT, || async {
        let w = webhooks.get("gone").await.ok()?;
        w.status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Ready" && c.reason == "EndpointGone")
            .map(|c| c.message)
    })
    .await;
    assert!(message.contains("410 Gone"), "{message}");
    // A new URL clears it.
    webhooks
        .patch(
            "gone",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"url": format!("http://{addr}/new")}})),
        )
        .await
        .unwrap();
    // Ready again after the URL changed.
    crate::support::wait_ready(&webhooks, "gone").await;
}

/// A Webhook's delivery history once it holds `n` records: (attempt, outcome, HTTP status),
/// newest first.
async fn history(
    client: &kube::Client,
    ns: &str,
    name: &str,
    n: usize,
) -> Vec<(i32, Value, Option<i32>)> {
    let webhooks: Api<Webhook> = Api::namespaced(client.clone(), ns);
    let records = eventually(
        &format!("{n} attempts in {name}'s history"),
        WAIT,
        || async {
            let s = webhooks.get(name).await.ok()?.status?;
            (s.recent_deliveries.len() == n).then_some(s.recent_deliveries)
        },
    )
    .await;
    records
        .iter()
        .map(|r| {
            (
                r.attempt,
                serde_json::to_value(r.outcome).unwrap(),
                r.http_status,
            )
        })
        .collect()
}

// The contract's receivers verify every delivery whatever the ingest mode, the contract's
// payloads posted to /api/events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_receivers_verify_every_delivery_in_every_ingest_mode() {
    let cp = control_plane();
    let client = cp.client().await;
    let completed = contract_payload("document-event-completed.yaml");
    let error = contract_payload("document-event-error.yaml");
    let event = |type_: &str, data: &Value| json!({"event": type_, "timestamp": "2023-06-15T10:35:00Z", "data": data});
    for mode in INGEST_MODES {
        let ns = cp.namespace("contract-mode").await;
        let op = ModeOperator::start(cp, mode, &[&ns], |_| {}).await;
        let python = Receiver::start(ReceiverKind::Python, STANDARD_SECRET, &[]).await;
        let node = Receiver::start(ReceiverKind::Node, STANDARD_SECRET, &[]).await;
        let plain = Receiver::start(ReceiverKind::Python, "your_webhook_secret", &[]).await;
        let wrong = Receiver::start(ReceiverKind::Node, "not-the-secret", &[]).await;
        for (name, url, secret, delivery) in [
            (
                "python",
                python.url("/webhooks/file-conversion"),
                STANDARD_SECRET,
                json!({}),
            ),
            (
                "node",
                node.url("/webhooks/file-conversion"),
                STANDARD_SECRET,
                json!({}),
            ),
            (
                "plain",
                plain.url("/webhooks/file-conversion"),
                "your_webhook_secret",
                json!({}),
            ),
            (
                "wrong",
                wrong.url("/hook"),
                "the-real-signing-secret",
                json!({"maxAttempts": 1}),
            ),
        ] {
            create_webhook(&client, &ns, name, &url, secret, delivery).await;
        }
        op.post_events(
            &ns,
            &[
                event("document.completed", &completed),
                event("document.error", &error),
            ],
        )
        .await;

        // A duplicate would come after the first copy: wait until both events are finished at
        // every Webhook, then for a marker posted afterwards to arrive, before counting.
        for name in ["python", "node", "plain"] {
            let done = history(&client, &ns, name, 2).await;
            assert!(
                done.iter()
                    .all(|r| r == &(1, json!("Succeeded"), Some(200))),
                "{mode:?} {name}: {done:?}"
            );
        }
        // The checks can fail: a receiver with another secret refuses, and it is recorded.
        let refused = history(&client, &ns, "wrong", 2).await;
        assert!(
            refused
                .iter()
                .all(|r| r == &(1, json!("Failed"), Some(401))),
            "{mode:?}: {refused:?}"
        );
        let results = wrong.results().await;
        assert!(
            results.iter().all(|r| r.status == 401 && !r.hex_ok),
            "{mode:?}: {results:?}"
        );
        op.post_event(&ns, "document.uploaded", json!({"document_id": 1}))
            .await;
        for (name, receiver, standard) in [
            ("python", &python, Some(true)),
            ("node", &node, Some(true)),
            ("plain", &plain, None),
        ] {
            let all = receiver.wait_ok(3).await;
            assert_eq!(
                all.len(),
                3,
                "{mode:?} {name}: exactly one request per event: {all:?}"
            );
            let ids: std::collections::HashSet<_> =
                all.iter().map(|r| r.delivery_id.clone()).collect();
            assert_eq!(
                ids.len(),
                3,
                "{mode:?} {name}: distinct delivery ids: {all:?}"
            );
            assert!(ids.iter().all(Option::is_some), "{mode:?} {name}: {all:?}");
            let got: Vec<_> = all
                .into_iter()
                .filter(|r| r.event.as_deref() != Some("document.uploaded"))
                .collect();
            assert_eq!(
                got.len(),
                2,
                "{mode:?} {name}: the contract's two events: {got:?}"
            );
            for r in &got {
                assert!(
                    r.hex_ok,
                    "{mode:?} {name}: X-Webhook-Signature rejected: {r:?}"
                );
                assert_eq!(
                    r.standard_ok, standard,
                    "{mode:?} {name}: webhook-signature: {r:?}"
                );
                assert_eq!(r.path, "/webhooks/file-conversion");
                assert_eq!(r.content_type.as_deref(), Some("application/json"));
                let body: Value = serde_json::from_str(&r.body).unwrap();
                let expected = if r.event.as_deref() == Some("document.completed") {
                    &completed
                } else {
                    &error
                };
                assert_eq!(
                    body,
                    event(r.event.as_deref().unwrap(), expected),
                    "{mode:?} {name}"
                );
                assert_eq!(
                    serde_json::to_string(&body).unwrap(),
                    r.body,
                    "{mode:?}: compact, event first"
                );
            }
        }
        op.op.stop().await;
    }
}

// The same isolation whatever the ingest mode, events posted to /api/events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_does_not_delay_another_in_every_ingest_mode() {
    let cp = control_plane();
    let client = cp.client().await;
    let lanes = hookrelay::delivery::DispatcherConfig::default().per_webhook;
    for mode in INGEST_MODES {
        let ns = cp.namespace("isolation-mode").await;
        // The dead endpoint's attempts are cut short on stop.
        let op = ModeOperator::start(cp, mode, &[&ns], |args| {
            args.shutdown_timeout = Duration::from_secs(2);
        })
        .await;
        let dead = Blackhole::start().await;
        create_webhook(
            &client,
            &ns,
            "dead",
            &format!("http://{}/h", dead.addr),
            "signing-secret-0123456789",
            json!({"timeoutSeconds": 30}),
        )
        .await;
        let fast = counting_webhook(&client, &ns, "fast", "signing-secret-0123456789").await;

        let n = 60;
        let events: Vec<Value> = (0..n)
            .map(|i| json!({"event": "document.completed", "data": {"document_id": i}}))
            .collect();
        op.post_events(&ns, &events).await;
        eventually("every event at the live endpoint", WAIT, || async {
            (fast.counts() == (n, n)).then_some(())
        })
        .await;
        // The dead endpoint holds one connection per lane of its Webhook, and no more ...
        eventually("the dead endpoint's lanes full", WAIT, || async {
            (dead.connections.load(std::sync::atomic::Ordering::Relaxed) == lanes).then_some(())
        })
        .await;
        // ... and no attempt to it has ended yet (each waits 30s for an answer): the live
        // endpoint was served while the dead one's lanes were all taken.
        let webhooks: Api<Webhook> = Api::namespaced(client.clone(), &ns);
        let dead_status = webhooks
            .get("dead")
            .await
            .unwrap()
            .status
            .unwrap_or_default();
        assert_eq!(
            dead_status.recent_deliveries.len(),
            0,
            "{mode:?}: no attempt to the dead endpoint has finished"
        );
        op.op.stop().await;
    }
}

// Holds and 410 whatever the ingest mode, events posted to /api/events. Direct mode
// records no DocumentEvent: what every mode shows is the receivers and the Webhook's history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_webhooks_hold_deliveries_and_gone_endpoints_stop_them_in_every_ingest_mode() {
    let cp = control_plane();
    let client = cp.client().await;
    let secret = "signing-secret-0123456789";
    for mode in INGEST_MODES {
        let ns = cp.namespace("hold-gone-mode").await;
        let op = ModeOperator::start(cp, mode, &[&ns], |_| {}).await;
        let webhooks: Api<Webhook> = Api::namespaced(client.clone(), &ns);
        let paused = counting_webhook(&client, &ns, "paused", secret).await;
        let set_paused = |paused: bool| {
            let webhooks = webhooks.clone();
            async move {
                webhooks
                    .patch(
                        "paused",
                        &PatchParams::default(),
                        &Patch::Merge(json!({"spec": {"paused": paused}})),
                    )
                    .await
                    .unwrap();
            }
        };
        set_paused(true).await;
        wait_ready_reason(&client, &ns, "paused", "False", "Paused").await;
        let live = counting_webhook(&client, &ns, "live", secret).await;
        op.post_event(&ns, "document.deleted", json!({"document_id": 7}))
            .await;
        eventually("the event at the live Webhook", WAIT, || async {
            (live.counts() == (1, 1)).then_some(())
        })
        .await;
        assert_eq!(
            paused.counts(),
            (0, 0),
            "{mode:?}: nothing sent while paused"
        );
        set_paused(false).await;
        eventually("the held delivery sent once resumed", WAIT, || async {
            (paused.counts() == (1, 1)).then_some(())
        })
        .await;
        // Holding spent no attempt.
        assert_eq!(
            history(&client, &ns, "paused", 1).await,
            [(1, json!("Succeeded"), Some(200))],
            "{mode:?}"
        );

        // 410 Gone: the delivery fails at once, the Webhook is not Ready and gets nothing more
        // until its spec changes.
        let gone_requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = gone_requests.clone();
        let gone = axum::Router::new().fallback(axum::routing::post(move || async move {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            axum::http::StatusCode::GONE
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gone_addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, gone).await });
        create_webhook(
            &client,
            &ns,
            "gone",
            &format!("http://{gone_addr}/h"),
            secret,
            json!({}),
        )
        .await;
        op.post_event(&ns, "document.error", json!({"document_id": 8}))
            .await;
        assert_eq!(
            history(&client, &ns, "gone", 1).await,
            [(1, json!("Failed"), Some(410))],
            "{mode:?}"
        );
        let message = wait_ready_reason(&client, &ns, "gone", "False", "EndpointGone").await;
        assert!(message.contains("410 Gone"), "{mode:?}: {message}");
        op.post_event(&ns, "document.error", json!({"document_id": 9}))
            .await;
        eventually("the next event at the live Webhook", WAIT, || async {
            (live.counts() == (3, 3)).then_some(())
        })
        .await;
        assert_eq!(
            gone_requests.load(std::sync::atomic::Ordering::Relaxed),
            1,
            "{mode:?}: nothing sent after 410"
        );
        // A new URL clears it.
        webhooks
            .patch(
                "gone",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"url": format!("http://{gone_addr}/new")}})),
            )
            .await
            .unwrap();
        wait_ready_reason(&client, &ns, "gone", "True", "Routed").await;
        op.op.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_events_are_deleted_after_their_retention() {
    let cp = control_plane();
    let ns = cp.namespace("retention").await;
    let client = cp.client().await;
    let mut args = local_args(&[&ns]);
    args.event_retention = Duration::from_secs(2);
    let _op = InProcess::start_with(cp.config().await, args).await;
    let (_receiver, addr) = CountingReceiver::start().await;
    create_webhook(
        &client,
        &ns,
        "w",
        &format!("http://{addr}/h"),
        "signing-secret-0123456789",
        json!({}),
    )
    .await;
    create_event(
        &client,
        &ns,
        "short-lived",
        "document.completed",
        json!({"document_id": 1}),
    )
    .await;
    create_event(
        &client,
        &ns,
        "second",
        "document.processing",
        json!({"document_id": 2}),
    )
    .await;
    wait_phase(&client, &ns, "short-lived", "Delivered").await;
    let events: Api<DocumentEvent> = Api::namespaced(client.clone(), &ns);
    eventually("both events deleted after 2s", WAIT, || async {
        let left = events.list(&Default::default()).await.ok()?;
        left.items.is_empty().then_some(())
    })
    .await;
    // The Webhook keeps the history after the events are gone (written at most once a second,
    // so it may land after the deletions).
    let webhooks: Api<Webhook> = Api::namespaced(client.clone(), &ns);
    let history = eventually("both deliveries in the Webhook's history", WAIT, || async {
        let s = webhooks.get("w").await.ok()?.status?;
        (s.recent_deliveries.len() == 2).then_some(s.recent_deliveries)
    })
    .await;
    let mut events: Vec<_> = history
        .iter()
        .map(|r| (r.event.as_str(), serde_json::to_value(r.outcome).unwrap()))
        .collect();
    events.sort_by_key(|(e, _)| e.to_string());
    assert_eq!(
        events,
        [
            ("document.completed", json!("Succeeded")),
            ("document.processing", json!("Succeeded"))
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_waiting_for_its_secret_holds_deliveries_without_spending_attempts() {
    let cp = control_plane();
    let ns = cp.namespace("held-secret").await;
    let client = cp.client().await;
    let _op = InProcess::start(cp.config().await, &ns).await;
    let (receiver, addr) = CountingReceiver::start().await;
    let webhooks: Api<Webhook> = Api::namespaced(client.clone(), &ns);
    let w: Webhook = serde_json::from_value(json!({
        "apiVersion": "hookrelay.dev/v1alpha1", "kind": "Webhook", "metadata": {"name": "later"},
        "spec": {"url": format!("http://{addr}/h"), "events": ["*"], "secretRef": {"name": "later-secret"},
                 "delivery": {"maxAttempts": 1}}
    }))
    .unwrap();
    webhooks.create(&PostParams::default(), &w).await.unwrap();
    create_event(
        &client,
        &ns,
        "waiting",
        "document.uploaded",
        json!({"document_id": 3}),
    )
    .await;
    let events: Api<DocumentEvent> = Api::namespaced(client.clone(), &ns);
    let held = eventually("the delivery held for the Secret", WAIT, || async {
        let d = events
            .get("waiting")
            .await
            .ok()?
            .status?
            .deliveries
            .into_iter()
            .next()?;
        (serde_json::to_value(d.state).ok()? == "Held").then_some(d)
    })
    .await;
    assert_eq!(held.attempts, 0, "no attempt spent while blocked");
    assert!(
        held.error
            .as_deref()
            .unwrap_or_default()
            .contains("SecretNotFound"),
        "{held:?}"
    );

    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let s: Secret = serde_json::from_value(
        json!({"metadata": {"name": "later-secret", "labels": {"hookrelay.dev/signing-secret": "true"}}, "stringData": {"secret": "signing-secret-0123456789"}}),
    )
    .unwrap();
    secrets.create(&PostParams::default(), &s).await.unwrap();
    let delivered = wait_phase(&client, &ns, "waiting", "Delivered").await;
    assert_eq!(
        delivered.status.unwrap().deliveries[0].attempts,
        1,
        "one attempt, once the Secret existed"
    );
    assert_eq!(receiver.counts(), (1, 1));
}
