//! Hardening as a user sees it, against the real API server: signing Secrets opt in, a
//! per-namespace cap on attempts in flight, routes re-read once the slots are had, held
//! deliveries that end, flags and SIGTERM, and no secrets in text.

use std::time::Duration;

use hookrelay::{
    crd::{DocumentEvent, EventPhase, TargetState, Webhook},
    http::IngestMode,
    keys::WebhookKey,
    routing::RouteState,
};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;

use crate::support::counting_webhook;
use crate::support::{
    Blackhole, CountingReceiver, InProcess, ModeOperator, Operator, OperatorArgs, control_plane,
    create_event, create_webhook, default_args, eventually, local_args, wait_phase,
    wait_ready_reason,
};

const WAIT: Duration = Duration::from_secs(60);
const SECRET: &str = "hardening-test-signing-secret-0123456789";
const LABEL: &str = "hookrelay.dev/signing-secret";

/// A Secret holding `value` under `secret`, with the signing label or without it.
async fn create_secret(client: &Client, ns: &str, name: &str, value: &str, labelled: bool) {
    let labels = if labelled {
        json!({LABEL: "true"})
    } else {
        json!({})
    };
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "stringData": {"secret": value}
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
}

/// A Webhook for every event type signed with the Secret `secret`, without waiting for it.
async fn create_bare_webhook(client: &Client, ns: &str, name: &str, url: &str, secret: &str) {
    let webhook: Webhook = serde_json::from_value(json!({
        "apiVersion": "hookrelay.dev/v1alpha1", "kind": "Webhook", "metadata": {"name": name},
        "spec": {"url": url, "events": ["*"], "secretRef": {"name": secret}}
    }))
    .unwrap();
    Api::<Webhook>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &webhook)
        .await
        .unwrap();
}

async fn patch_webhook(client: &Client, ns: &str, name: &str, patch: serde_json::Value) {
    Api::<Webhook>::namespaced(client.clone(), ns)
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
}

/// The operator's JSON log lines that are warnings about Webhook `ns/name`.
fn warnings_about(op: &Operator, ns: &str, name: &str) -> Vec<String> {
    let webhook = format!("{ns}/{name}");
    op.log_text()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|l| l["level"] == "WARN" && l["fields"]["webhook"] == webhook.as_str())
        .map(|l| {
            l["fields"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

/// The target of the event's (only) delivery.
async fn only_target(
    events: &Api<DocumentEvent>,
    name: &str,
) -> Option<hookrelay::crd::TargetDelivery> {
    let e = events.get(name).await.ok()?;
    e.status?.deliveries.into_iter().next()
}

// A Secret signs only when it carries the opt-in label, followed live both ways; the
// operator warns once per Webhook whose Secret exists without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_secrets_labelled_for_signing_sign_and_the_upgrade_warning_comes_once() {
    let cp = control_plane();
    let ns = cp.namespace("signing-label").await;
    let client = cp.client().await;
    let op = OperatorArgs::new(&ns)
        .with_auth()
        .arg("--log-format", "json")
        .start(cp);
    op.wait_ready().await;

    // An existing Secret without the label, as before the upgrade.
    create_secret(&client, &ns, "w-secret", SECRET, false).await;
    create_bare_webhook(&client, &ns, "w", "http://127.0.0.1:9/hook", "w-secret").await;
    let message = wait_ready_reason(&client, &ns, "w", "False", "SecretNotFound").await;
    assert_eq!(
        message,
        format!(
            "Secret {ns}/w-secret labelled {LABEL}=true not found: only Secrets with that label sign deliveries"
        )
    );
    eventually("the upgrade warning for w", WAIT, || async {
        (!warnings_about(&op, &ns, "w").is_empty()).then_some(())
    })
    .await;

    // Re-resolutions with the Secret still unlabelled: two spec changes.
    for description in ["first change", "second change"] {
        patch_webhook(
            &client,
            &ns,
            "w",
            json!({"spec": {"description": description}}),
        )
        .await;
        wait_ready_reason(&client, &ns, "w", "False", "SecretNotFound").await;
    }

    // Labelled: it signs, without a restart.
    cp.kubectl_ok(
        &[
            "label",
            "secret",
            "w-secret",
            "-n",
            &ns,
            &format!("{LABEL}=true"),
        ],
        None,
    )
    .await;
    wait_ready_reason(&client, &ns, "w", "True", "Routed").await;

    // Unlabelled again: it no longer signs.
    cp.kubectl_ok(
        &[
            "label",
            "secret",
            "w-secret",
            "-n",
            &ns,
            &format!("{LABEL}-"),
        ],
        None,
    )
    .await;
    let message = wait_ready_reason(&client, &ns, "w", "False", "SecretNotFound").await;
    assert!(message.contains(LABEL), "{message}");

    // A second Webhook in the same situation, resolved after all of w's changes: once its
    // warning is logged, any further warning about w would be too.
    create_secret(&client, &ns, "later-secret", SECRET, false).await;
    create_bare_webhook(
        &client,
        &ns,
        "later",
        "http://127.0.0.1:9/hook",
        "later-secret",
    )
    .await;
    eventually("the upgrade warning for later", WAIT, || async {
        (!warnings_about(&op, &ns, "later").is_empty()).then_some(())
    })
    .await;
    let warnings = warnings_about(&op, &ns, "w");
    assert_eq!(
        warnings.len(),
        1,
        "one warning for w (log: {}): {warnings:#?}",
        op.log.display()
    );
    assert!(
        warnings[0].contains(&format!(
            "kubectl label secret -n {ns} w-secret {LABEL}=true"
        )),
        "the warning says what to do: {}",
        warnings[0]
    );
}

// A namespace whose endpoints never answer holds at most its share of the slots, and
// another namespace's events all go out meanwhile. The same in jetstream mode, where
// the tarpit namespace also has a paused Webhook with many held deliveries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_of_dead_endpoints_cannot_take_every_slot() {
    dead_endpoints_cannot_take_every_slot(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_of_dead_endpoints_cannot_take_every_slot_in_jetstream_mode() {
    dead_endpoints_cannot_take_every_slot(Some(IngestMode::JetStream)).await;
}

/// Events created as DocumentEvents (`ingest` None) or posted in that ingest mode.
async fn dead_endpoints_cannot_take_every_slot(ingest: Option<IngestMode>) {
    let cp = control_plane();
    let tarpit_ns = cp.namespace("tarpit").await;
    let other_ns = cp.namespace("neighbour").await;
    let client = cp.client().await;
    let mode = ingest.unwrap_or(IngestMode::Durable);
    let op = ModeOperator::start(cp, mode, &[&tarpit_ns, &other_ns], |args| {
        args.max_in_flight = 8;
        args.max_in_flight_per_namespace = 4;
    })
    .await;
    let send = |ns: &str, prefix: &str, i: usize| {
        let (client, ns, name, op) = (client.clone(), ns.to_owned(), format!("{prefix}-{i}"), &op);
        async move {
            let data = json!({"document_id": i});
            match ingest {
                None => create_event(&client, &ns, &name, "document.completed", data).await,
                Some(_) => op.post_event(&ns, "document.completed", data).await,
            }
        }
    };

    // Two Webhooks (8 lanes each) and 6 events: 12 attempts want to go, more than all 8 slots.
    let blackhole = Blackhole::start().await;
    let tarpit_url = format!("http://{}/never", blackhole.addr);
    for name in ["dead-a", "dead-b"] {
        create_webhook(
            &client,
            &tarpit_ns,
            name,
            &tarpit_url,
            SECRET,
            json!({"timeoutSeconds": 300}),
        )
        .await;
    }
    // ... and a paused Webhook holding every event sent to the namespace.
    let paused = counting_webhook(&client, &tarpit_ns, "paused", SECRET).await;
    patch_webhook(
        &client,
        &tarpit_ns,
        "paused",
        json!({"spec": {"paused": true}}),
    )
    .await;
    wait_ready_reason(&client, &tarpit_ns, "paused", "False", "Paused").await;
    let stuck = if ingest.is_some() { 30 } else { 6 };
    for i in 0..stuck {
        send(&tarpit_ns, "stuck", i).await;
    }
    let held = || {
        blackhole
            .connections
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    eventually("the tarpit to hold 4 connections", WAIT, || async {
        (held() >= 4).then_some(())
    })
    .await;

    // The other namespace is served while the tarpit holds its share.
    let (receiver, addr) = CountingReceiver::start().await;
    create_webhook(
        &client,
        &other_ns,
        "alive",
        &format!("http://{addr}/h"),
        SECRET,
        json!({}),
    )
    .await;
    const N: usize = 10;
    for i in 0..N {
        send(&other_ns, "doc", i).await;
    }
    if ingest.is_none() {
        for i in 0..N {
            wait_phase(&client, &other_ns, &format!("doc-{i}"), "Delivered").await;
        }
    }
    eventually(
        "every event of the other namespace delivered",
        WAIT,
        || async { (receiver.counts() == (N, N)).then_some(()) },
    )
    .await;
    assert_eq!(receiver.counts(), (N, N));
    // The count only grows: 4 now means never more than the namespace's 4.
    assert_eq!(
        held(),
        4,
        "connections the tarpit namespace opened (its cap is 4)"
    );
    assert_eq!(
        paused.counts(),
        (0, 0),
        "nothing sent to the paused Webhook"
    );
}

// Deliveries that were waiting for a lane when their Webhook was paused are held, not
// sent to the paused Webhook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_waiting_for_a_lane_are_not_sent_once_the_webhook_is_paused() {
    let cp = control_plane();
    let ns = cp.namespace("stale-route").await;
    let client = cp.client().await;
    let op = InProcess::start(cp.config().await, &ns).await;
    let (receiver, addr, gate) = CountingReceiver::start_gated().await;
    create_webhook(
        &client,
        &ns,
        "w",
        &format!("http://{addr}/h"),
        SECRET,
        json!({"timeoutSeconds": 300}),
    )
    .await;

    // 12 events, 8 lanes: 8 in flight at the receiver, 4 waiting for a lane.
    const EVENTS: usize = 12;
    for i in 0..EVENTS {
        create_event(
            &client,
            &ns,
            &format!("doc-{i}"),
            "document.completed",
            json!({"document_id": i}),
        )
        .await;
    }
    eventually("8 in flight and 12 deliveries started", WAIT, || async {
        (receiver.counts() == (8, 8) && op.op.metrics.pending_in(&ns).get() == EVENTS as i64)
            .then_some(())
    })
    .await;

    patch_webhook(&client, &ns, "w", json!({"spec": {"paused": true}})).await;
    eventually("the route paused", WAIT, || async {
        let table = op.op.routes.snapshot();
        (table.get(&WebhookKey::new(&ns, "w"))?.state == RouteState::Paused).then_some(())
    })
    .await;
    gate.open();

    let events: Api<DocumentEvent> = Api::namespaced(client.clone(), &ns);
    let (delivered, held) = eventually("8 delivered and 4 held", WAIT, || async {
        let list = events.list(&Default::default()).await.ok()?;
        let delivered = list
            .items
            .iter()
            .filter(|e| e.status.as_ref().and_then(|s| s.phase) == Some(EventPhase::Delivered))
            .count();
        let held: Vec<_> = list
            .items
            .iter()
            .filter_map(|e| e.status.as_ref()?.deliveries.first().cloned())
            .filter(|t| t.state == TargetState::Held)
            .collect();
        (delivered == 8 && held.len() == 4).then_some((delivered, held))
    })
    .await;
    assert_eq!(delivered, 8);
    for target in &held {
        assert_eq!(target.attempts, 0, "{target:?}");
        assert_eq!(
            target.error.as_deref(),
            Some("held: the webhook is paused"),
            "{target:?}"
        );
    }
    assert_eq!(
        receiver.counts(),
        (8, 8),
        "the receiver got only what was in flight before the pause"
    );

    // Unpaused, the held ones go out.
    patch_webhook(&client, &ns, "w", json!({"spec": {"paused": false}})).await;
    eventually("all 12 received", WAIT, || async {
        (receiver.counts() == (EVENTS, EVENTS)).then_some(())
    })
    .await;
}

// A held delivery fails after --max-hold, so its event finishes and retention
// deletes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_held_longer_than_max_hold_fails_and_its_event_is_retired() {
    let cp = control_plane();
    let ns = cp.namespace("max-hold").await;
    let client = cp.client().await;
    let mut args = local_args(&[&ns]);
    args.max_hold = Duration::from_secs(8);
    args.failed_event_retention = Duration::from_secs(5);
    let _op = InProcess::start_with(cp.config().await, args).await;
    let receiver = counting_webhook(&client, &ns, "w", SECRET).await;
    patch_webhook(&client, &ns, "w", json!({"spec": {"paused": true}})).await;
    wait_ready_reason(&client, &ns, "w", "False", "Paused").await;

    create_event(
        &client,
        &ns,
        "doc-held",
        "document.completed",
        json!({"document_id": 1}),
    )
    .await;
    let events: Api<DocumentEvent> = Api::namespaced(client.clone(), &ns);
    let held = eventually("the target Held with heldSince", WAIT, || async {
        let t = only_target(&events, "doc-held").await?;
        (t.state == TargetState::Held && t.held_since.is_some()).then_some(t)
    })
    .await;
    assert_eq!(held.attempts, 0);

    let failed = wait_phase(&client, &ns, "doc-held", "Failed").await;
    let status = failed.status.unwrap();
    let target = &status.deliveries[0];
    assert_eq!(target.state, TargetState::Failed);
    assert_eq!(target.attempts, 0, "holding spends no attempts");
    assert_eq!(
        target.held_since, held.held_since,
        "the deadline counts from then"
    );
    let error = target.error.as_deref().unwrap_or_default();
    assert!(
        error.starts_with("held for ") && error.contains("--max-hold"),
        "{error}"
    );
    assert!(status.completion_time.is_some());

    // Finished, so the failed-event retention applies.
    eventually("the failed event deleted by retention", WAIT, || async {
        matches!(events.get_opt("doc-held").await, Ok(None)).then_some(())
    })
    .await;
    assert_eq!(
        receiver.counts(),
        (0, 0),
        "nothing sent to a paused Webhook"
    );
}

// A retention the timers cannot hold is refused at startup, with the limit named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periods_longer_than_a_year_are_refused_at_startup() {
    for flag in [
        "--event-retention",
        "--failed-event-retention",
        "--max-hold",
    ] {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_hookrelay"))
            .args(["run", flag, "100y"])
            // Never reached: the flags are checked before any connection.
            .env("KUBECONFIG", "/nonexistent")
            .output()
            .await
            .expect("hookrelay runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag}: {stderr}");
        assert!(
            stderr.contains(flag) && stderr.contains("longest period accepted (365d)"),
            "{flag}: {stderr}"
        );
    }
}

// SIGTERM ends a busy operator (an attempt to an endpoint that never answers in
// flight) with exit code 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_busy_operator_with_exit_code_zero() {
    let cp = control_plane();
    let ns = cp.namespace("sigterm").await;
    let client = cp.client().await;
    let mut op = OperatorArgs::new(&ns)
        .with_auth()
        .arg("--shutdown-timeout", "5s")
        .start(cp);
    op.wait_ready().await;
    let blackhole = Blackhole::start().await;
    create_webhook(
        &client,
        &ns,
        "dead",
        &format!("http://{}/never", blackhole.addr),
        SECRET,
        json!({"timeoutSeconds": 300}),
    )
    .await;
    create_event(
        &client,
        &ns,
        "doc-1",
        "document.completed",
        json!({"document_id": 1}),
    )
    .await;
    eventually("an attempt in flight", WAIT, || async {
        (blackhole
            .connections
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1)
            .then_some(())
    })
    .await;

    let pid = op.child.id().expect("running").to_string();
    let kill = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(kill.success());
    // A bound against a hang, not a measurement.
    let status = tokio::time::timeout(WAIT, op.child.wait())
        .await
        .unwrap_or_else(|_| panic!("still running after SIGTERM (log: {})", op.log.display()))
        .unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "exit after SIGTERM (log: {})",
        op.log.display()
    );
    // The attempt that never ends was abandoned after half the shutdown deadline, so that what
    // else was pending could still be written and the process end in time.
    let log = op.log_text();
    assert!(
        log.contains("attempts still being sent are abandoned"),
        "the hanging attempt held up the shutdown (log: {})",
        op.log.display()
    );
    assert!(
        !log.contains("shutdown deadline passed"),
        "status was still being written at the deadline (log: {})",
        op.log.display()
    );
}

// Stopping an operator in direct mode: its deliveries (in memory only) stop with the other
// producers. No attempt starts once it is stopping, retries included; attempts being sent get
// half the shutdown deadline, and those answered in time are in the Webhook's status before
// the operator has stopped; what was not finished is counted as lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_in_direct_mode_starts_no_attempt_and_records_those_in_flight() {
    let cp = control_plane();
    let client = cp.client().await;
    let failing_ns = cp.namespace("direct-stop").await;
    let hanging_ns = cp.namespace("direct-stop-hang").await;
    let shutdown_timeout = Duration::from_secs(4);
    let grace = shutdown_timeout / 2;
    let op = ModeOperator::start(
        cp,
        IngestMode::Direct,
        &[&failing_ns, &hanging_ns],
        |args| args.shutdown_timeout = shutdown_timeout,
    )
    .await;
    // Each attempt takes 300 ms and fails: every delivery keeps retrying, none finishes.
    let (receiver, addr) = CountingReceiver::start_answering(
        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        Duration::from_millis(300),
    )
    .await;
    create_webhook(
        &client,
        &failing_ns,
        "failing",
        &format!("http://{addr}/h"),
        SECRET,
        json!({"maxAttempts": 50, "initialBackoffSeconds": 1, "maxBackoffSeconds": 1}),
    )
    .await;
    // An attempt that is still being sent when the grace ends.
    let blackhole = Blackhole::start().await;
    create_webhook(
        &client,
        &hanging_ns,
        "hanging",
        &format!("http://{}/never", blackhole.addr),
        SECRET,
        json!({"timeoutSeconds": 300}),
    )
    .await;
    let events: Vec<_> = (0..40)
        .map(|i| json!({"event": "document.completed", "timestamp": "2023-06-15T10:35:00Z", "data": {"document_id": i}}))
        .collect();
    op.post_events(&failing_ns, &events).await;
    op.post_event(&hanging_ns, "document.completed", json!({"document_id": 0}))
        .await;
    eventually("retries under way and an attempt hanging", WAIT, || async {
        let retried = receiver.counts().1 > events.len();
        let hanging = blackhole
            .connections
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1;
        (retried && hanging).then_some(())
    })
    .await;

    let metrics = op.op.op.metrics.clone();
    let started = std::time::Instant::now();
    op.op.stop().await;
    let took = started.elapsed();
    let stopped = std::time::Instant::now();
    let (_, requests) = receiver.counts();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = receiver.arrived_after(stopped);
    println!(
        "stopped in {took:?} (grace {grace:?}); {requests} requests before, {after} in the 3 s after"
    );
    assert_eq!(
        after, 0,
        "requests reached the receiver after the operator had stopped"
    );
    // The hanging attempt held the stop for the grace, not longer: the status writer still had
    // time to flush before the deadline.
    assert!(
        took < grace + Duration::from_secs(1),
        "the stop took {took:?}, the grace is {grace:?}"
    );
    // Every attempt to the failing endpoint was answered within the grace: each is recorded.
    let webhooks: Api<Webhook> = Api::namespaced(client.clone(), &failing_ns);
    let stats = webhooks
        .get("failing")
        .await
        .unwrap()
        .status
        .unwrap_or_default()
        .delivery_stats;
    assert_eq!(
        stats.consecutive_failures as usize, requests,
        "attempts recorded in the Webhook's status against requests the receiver saw"
    );
    // None of the 41 deliveries finished: all are lost, and counted.
    let lost = metrics.encode().lines().find_map(|l| {
        l.strip_prefix("hookrelay_direct_deliveries_lost_total ")?
            .parse::<f64>()
            .ok()
    });
    assert_eq!(lost, Some(41.0), "hookrelay_direct_deliveries_lost_total");
}

// A secret shorter than 16 bytes does not sign.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_secret_is_invalid() {
    let cp = control_plane();
    let ns = cp.namespace("short-secret").await;
    let client = cp.client().await;
    let _op = InProcess::start(cp.config().await, &ns).await;
    create_secret(&client, &ns, "short-secret", "short", true).await;
    create_bare_webhook(
        &client,
        &ns,
        "short",
        "http://127.0.0.1:9/hook",
        "short-secret",
    )
    .await;
    let message = wait_ready_reason(&client, &ns, "short", "False", "SecretInvalid").await;
    assert!(message.contains("at least 16"), "{message}");

    // `whsec_` with nothing after it is no key either.
    create_secret(&client, &ns, "empty-whsec", "whsec_", true).await;
    create_bare_webhook(
        &client,
        &ns,
        "empty",
        "http://127.0.0.1:9/hook",
        "empty-whsec",
    )
    .await;
    wait_ready_reason(&client, &ns, "empty", "False", "SecretInvalid").await;
}

// Credentials in a URL never appear in the condition, the Events, a DocumentEvent's
// status or the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_a_url_are_redacted_everywhere_they_are_shown() {
    let cp = control_plane();
    let ns = cp.namespace("redact").await;
    let client = cp.client().await;
    // Plain http allowed but not loopback: refused, so nothing is ever sent.
    let op = OperatorArgs::new(&ns)
        .with_auth()
        .allow_cidrs(&[])
        .start(cp);
    op.wait_ready().await;
    create_secret(&client, &ns, "w-secret", SECRET, true).await;
    create_bare_webhook(
        &client,
        &ns,
        "w",
        "http://user:hunter2@127.0.0.1:9/hook?token=abc123",
        "w-secret",
    )
    .await;
    let message = wait_ready_reason(&client, &ns, "w", "False", "EgressNotAllowed").await;
    let leaks = |text: &str| text.contains("hunter2") || text.contains("abc123");
    assert!(!leaks(&message) && message.contains("***"), "{message}");

    // A held delivery's error carries the reason too.
    create_event(
        &client,
        &ns,
        "doc-1",
        "document.completed",
        json!({"document_id": 1}),
    )
    .await;
    let events: Api<DocumentEvent> = Api::namespaced(client.clone(), &ns);
    let target = eventually("the target Held with its reason", WAIT, || async {
        let t = only_target(&events, "doc-1").await?;
        (t.state == TargetState::Held && t.error.is_some()).then_some(t)
    })
    .await;
    let error = target.error.unwrap();
    assert!(!leaks(&error) && error.contains("***"), "{error}");

    let kube_events = eventually("the Webhook's EgressNotAllowed Event", WAIT, || async {
        let out = cp
            .kubectl_ok(&["get", "events", "-n", &ns, "-o", "json"], None)
            .await;
        out.contains("EgressNotAllowed").then_some(out)
    })
    .await;
    assert!(
        !leaks(&kube_events) && kube_events.contains("***"),
        "{kube_events}"
    );

    let log = op.log_text();
    assert!(
        !leaks(&log) && log.contains("***"),
        "credentials in the log: {}",
        op.log.display()
    );
}

// `localhost.` and `*.localhost` are loopback, refused without an allowed range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn localhost_with_a_dot_or_a_subdomain_is_loopback() {
    let cp = control_plane();
    let ns = cp.namespace("localhost").await;
    let client = cp.client().await;
    let mut args = default_args(&[&ns]);
    args.allow_http = true;
    let _op = InProcess::start_with(cp.config().await, args).await;
    create_secret(&client, &ns, "s", SECRET, true).await;
    for (name, url) in [
        ("dot", "http://localhost.:9/x"),
        ("sub", "http://api.localhost:9/x"),
        ("subdot", "http://api.localhost.:9/x"),
    ] {
        create_bare_webhook(&client, &ns, name, url, "s").await;
        let message = wait_ready_reason(&client, &ns, name, "False", "EgressNotAllowed").await;
        assert!(!message.is_empty(), "{url}");
    }
}

// A Webhook whose endpoint keeps failing turns Degraded, and hookrelay_webhooks_degraded
// (which the chart's HookrelayWebhooksDegraded alert reads) counts it, then stops counting it
// once it is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_degraded_webhook_is_counted_in_the_metrics() {
    let cp = control_plane();
    let ns = cp.namespace("degraded").await;
    let client = cp.client().await;
    let op = InProcess::start(cp.config().await, &ns).await;
    let failing = axum::Router::new().fallback(axum::routing::post(|| async {
        (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "no")
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, failing).await });
    create_webhook(
        &client,
        &ns,
        "failing",
        &format!("http://{addr}/hook"),
        SECRET,
        json!({"maxAttempts": 6, "initialBackoffSeconds": 1, "maxBackoffSeconds": 1}),
    )
    .await;
    assert_eq!(op.op.metrics.webhooks_degraded.get(), 0);
    create_event(
        &client,
        &ns,
        "doc-1",
        "document.completed",
        json!({"document_id": 1}),
    )
    .await;
    let metrics = op.op.metrics.clone();
    eventually("hookrelay_webhooks_degraded 1", WAIT, || {
        let n = metrics.webhooks_degraded.get();
        async move { (n == 1).then_some(()) }
    })
    .await;
    let webhooks: Api<Webhook> = Api::namespaced(client.clone(), &ns);
    webhooks
        .delete("failing", &Default::default())
        .await
        .unwrap();
    eventually("hookrelay_webhooks_degraded 0", WAIT, || {
        let n = metrics.webhooks_degraded.get();
        async move { (n == 0).then_some(()) }
    })
    .await;
}
