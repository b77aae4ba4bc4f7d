//! The Webhook controller and routing table against the real API server.

use std::time::{Duration, Instant};

use hookrelay::{
    crd::{EventType, Webhook},
    keys::WebhookKey,
    metrics::{ObjectKind, PatchResult},
    routing::RouteState,
    wire::Signer,
};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

use crate::support::{InProcess, control_plane, default_args, eventually};

const WAIT: Duration = Duration::from_secs(30);

fn webhook(name: &str, url: &str, events: &[&str]) -> Webhook {
    serde_json::from_value(json!({
        "apiVersion": "hookrelay.dev/v1alpha1",
        "kind": "Webhook",
        "metadata": {"name": name},
        "spec": {"url": url, "events": events, "secretRef": {"name": format!("{name}-secret")}}
    }))
    .unwrap()
}

fn secret(name: &str, value: &str) -> Secret {
    serde_json::from_value(json!({
        // Labelled as a signing Secret: hookrelay signs with labelled Secrets only.
        "metadata": {"name": name, "labels": {"hookrelay.dev/signing-secret": "true"}},
        "stringData": {"secret": value}
    }))
    .unwrap()
}

/// Waits until the Webhook's Ready condition has `status` and `reason`; returns its message.
async fn wait_ready(api: &Api<Webhook>, name: &str, status: &str, reason: &str) -> String {
    eventually(&format!("{name} Ready={status}/{reason}"), WAIT, || async {
        let w = api.get(name).await.ok()?;
        let c = w
            .status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Ready")?;
        (c.status == status && c.reason == reason).then_some(c.message)
    })
    .await
}

fn signature_of(op: &InProcess, ns: &str, name: &str) -> Option<String> {
    let table = op.op.routes.snapshot();
    let route = table.get(&WebhookKey::new(ns, name))?;
    Some(route.signer.as_ref()?.sign("id", 1, b"{}").hex)
}

fn expected_signature(secret: &str) -> String {
    Signer::new(secret.as_bytes(), None)
        .unwrap()
        .sign("id", 1, b"{}")
        .hex
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_follows_its_secret_without_a_restart() {
    let cp = control_plane();
    let ns = cp.namespace("secret-later").await;
    let client = cp.client().await;
    let op = InProcess::start(cp.config().await, &ns).await;
    let webhooks: Api<Webhook> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);

    // The Webhook first: routed, but blocked until its Secret exists.
    webhooks
        .create(
            &PostParams::default(),
            &webhook("w", "http://127.0.0.1:9/hook", &["document.completed"]),
        )
        .await
        .unwrap();
    let message = wait_ready(&webhooks, "w", "False", "SecretNotFound").await;
    assert_eq!(
        message,
        format!(
            "Secret {ns}/w-secret labelled hookrelay.dev/signing-secret=true not found: only Secrets with that label sign deliveries"
        )
    );
    let route = op
        .op
        .routes
        .snapshot()
        .get(&WebhookKey::new(&ns, "w"))
        .cloned()
        .unwrap();
    assert!(matches!(
        route.state,
        RouteState::Blocked {
            reason: "SecretNotFound",
            ..
        }
    ));

    // The Secret arrives: Ready, with `kubectl wait` as a user would check it.
    secrets
        .create(
            &PostParams::default(),
            &secret("w-secret", "first-signing-secret-0123456789"),
        )
        .await
        .unwrap();
    cp.kubectl_ok(
        &[
            "wait",
            "--for=condition=Ready",
            "webhook/w",
            "-n",
            &ns,
            "--timeout=30s",
        ],
        None,
    )
    .await;
    assert_eq!(
        signature_of(&op, &ns, "w"),
        Some(expected_signature("first-signing-secret-0123456789"))
    );
    let w = webhooks.get("w").await.unwrap();
    assert_eq!(
        w.status.as_ref().unwrap().observed_generation,
        w.metadata.generation
    );

    // Rotation: the next signature uses the new value.
    secrets
        .patch(
            "w-secret",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"secret": "second-signing-secret-0123456789"}})),
        )
        .await
        .unwrap();
    let expected = expected_signature("second-signing-secret-0123456789");
    eventually(
        "the route to sign with the rotated secret",
        WAIT,
        || async { (signature_of(&op, &ns, "w").as_ref() == Some(&expected)).then_some(()) },
    )
    .await;

    // A missing key is reported precisely, and fixed by itself too.
    secrets
        .patch(
            "w-secret",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"secret": null}, "stringData": {"other": "x"}})),
        )
        .await
        .unwrap();
    let message = wait_ready(&webhooks, "w", "False", "SecretKeyNotFound").await;
    assert_eq!(
        message,
        format!("Secret {ns}/w-secret has no key \"secret\"")
    );
    secrets
        .patch(
            "w-secret",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"secret": "third-signing-secret-0123456789"}})),
        )
        .await
        .unwrap();
    wait_ready(&webhooks, "w", "True", "Routed").await;

    // Each transition was recorded as a Kubernetes Event.
    let events = cp
        .kubectl_ok(
            &[
                "get",
                "events.events.k8s.io",
                "-n",
                &ns,
                "-o",
                "jsonpath={range .items[*]}{.reason}/{.type} {end}",
            ],
            None,
        )
        .await;
    for expected in [
        "SecretNotFound/Warning",
        "Routed/Normal",
        "SecretKeyNotFound/Warning",
    ] {
        assert!(
            events.contains(expected),
            "no {expected} event in: {events}"
        );
    }

    // Deleting the Webhook removes its route; no finalizer holds it.
    webhooks
        .delete("w", &DeleteParams::default())
        .await
        .unwrap();
    let started = Instant::now();
    eventually("the route to disappear", WAIT, || async {
        op.op
            .routes
            .snapshot()
            .get(&WebhookKey::new(&ns, "w"))
            .is_none()
            .then_some(())
    })
    .await;
    println!(
        "route removed {:?} after the delete was acknowledged",
        started.elapsed()
    );
    assert!(
        webhooks.get_opt("w").await.unwrap().is_none(),
        "deleted without waiting on a finalizer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_follow_changes_of_events_and_url() {
    let cp = control_plane();
    let ns = cp.namespace("follow").await;
    let client = cp.client().await;
    let op = InProcess::start(cp.config().await, &ns).await;
    let webhooks: Api<Webhook> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    secrets
        .create(
            &PostParams::default(),
            &secret("w-secret", "signing-secret-0123456789"),
        )
        .await
        .unwrap();
    webhooks
        .create(
            &PostParams::default(),
            &webhook("w", "http://127.0.0.1:9/a", &["document.completed"]),
        )
        .await
        .unwrap();
    wait_ready(&webhooks, "w", "True", "Routed").await;

    let lookup = |t: EventType| -> Vec<String> {
        op.op
            .routes
            .snapshot()
            .lookup(&ns, t)
            .map(|r| r.url.clone())
            .collect()
    };
    assert_eq!(lookup(EventType::Completed), ["http://127.0.0.1:9/a"]);
    assert!(lookup(EventType::Error).is_empty());

    let started = Instant::now();
    webhooks
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"events": ["document.error"], "url": "http://127.0.0.1:9/b"}}),
            ),
        )
        .await
        .unwrap();
    eventually("lookups to follow the new events and url", WAIT, || async {
        (lookup(EventType::Error) == ["http://127.0.0.1:9/b"]
            && lookup(EventType::Completed).is_empty())
        .then_some(())
    })
    .await;
    println!(
        "lookups followed an events+url change {:?} after the patch was acknowledged",
        started.elapsed()
    );

    webhooks
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"events": ["*"]}})),
        )
        .await
        .unwrap();
    eventually("\"*\" to match every type", WAIT, || async {
        EventType::ALL
            .iter()
            .all(|t| lookup(*t) == ["http://127.0.0.1:9/b"])
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_egress_policy_is_reported_in_the_ready_condition() {
    let cp = control_plane();
    let ns = cp.namespace("egress").await;
    let client = cp.client().await;
    // Default policy: https only, no private ranges.
    let _op = InProcess::start_with(cp.config().await, default_args(&[&ns])).await;
    let webhooks: Api<Webhook> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    for (name, url) in [
        ("plain", "http://example.com/hook"),
        ("metadata", "https://169.254.169.254/latest"),
        ("private", "https://10.0.0.1/hook"),
    ] {
        secrets
            .create(
                &PostParams::default(),
                &secret(&format!("{name}-secret"), "signing-secret-0123456789"),
            )
            .await
            .unwrap();
        webhooks
            .create(&PostParams::default(), &webhook(name, url, &["*"]))
            .await
            .unwrap();
    }
    let plain = wait_ready(&webhooks, "plain", "False", "EgressNotAllowed").await;
    assert!(plain.contains("--egress-allow-http"), "{plain}");
    let metadata = wait_ready(&webhooks, "metadata", "False", "EgressNotAllowed").await;
    assert!(metadata.contains("link-local"), "{metadata}");
    let private = wait_ready(&webhooks, "private", "False", "EgressNotAllowed").await;
    assert!(
        private.contains("private") && private.contains("--egress-allow-cidr"),
        "{private}"
    );
    // Fixing the URL fixes the condition.
    webhooks
        .patch(
            "plain",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"url": "https://example.com/hook"}})),
        )
        .await
        .unwrap();
    wait_ready(&webhooks, "plain", "True", "Routed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_means_every_existing_webhook_is_in_the_table() {
    let cp = control_plane();
    let ns = cp.namespace("presync").await;
    let client = cp.client().await;
    let webhooks: Api<Webhook> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    for i in 0..20 {
        let name = format!("w{i}");
        secrets
            .create(
                &PostParams::default(),
                &secret(&format!("{name}-secret"), "signing-secret-0123456789"),
            )
            .await
            .unwrap();
        webhooks
            .create(
                &PostParams::default(),
                &webhook(&name, "http://127.0.0.1:9/h", &["document.uploaded"]),
            )
            .await
            .unwrap();
    }
    // InProcess::start returns once /readyz would say ready: no waiting after that.
    let op = InProcess::start(cp.config().await, &ns).await;
    let table = op.op.routes.snapshot();
    assert_eq!(table.lookup(&ns, EventType::Uploaded).count(), 20);
    // Secrets were synced first, so none was reported missing on the way.
    assert!(
        table
            .lookup(&ns, EventType::Uploaded)
            .all(|r| r.state == RouteState::Active)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_writes_do_not_retrigger_status_writes() {
    let cp = control_plane();
    let ns = cp.namespace("noloop").await;
    let client = cp.client().await;
    let op = InProcess::start(cp.config().await, &ns).await;
    let webhooks: Api<Webhook> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    secrets
        .create(
            &PostParams::default(),
            &secret("w-secret", "signing-secret-0123456789"),
        )
        .await
        .unwrap();
    webhooks
        .create(
            &PostParams::default(),
            &webhook("w", "http://127.0.0.1:9/h", &["*"]),
        )
        .await
        .unwrap();
    wait_ready(&webhooks, "w", "True", "Routed").await;
    let first = webhooks.get("w").await.unwrap();
    let transition = first.status.unwrap().conditions[0]
        .last_transition_time
        .clone();

    // A change that does not alter readiness (a label) writes nothing; pausing writes once.
    webhooks
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"team": "docs"}}})),
        )
        .await
        .unwrap();
    webhooks
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"paused": true}})),
        )
        .await
        .unwrap();
    wait_ready(&webhooks, "w", "False", "Paused").await;
    // And the reason changing without a flip keeps lastTransitionTime... unpausing flips it back.
    webhooks
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"paused": false}})),
        )
        .await
        .unwrap();
    wait_ready(&webhooks, "w", "True", "Routed").await;
    let last = webhooks.get("w").await.unwrap();
    let condition = &last.status.unwrap().conditions[0];
    assert_ne!(
        condition.last_transition_time, transition,
        "the flips moved lastTransitionTime"
    );

    // A write that the echo of the last patch would trigger comes before anything caused by a
    // later change: a second Webhook made Ready after it is the marker (the controller handles
    // its watch events in order).
    secrets
        .create(
            &PostParams::default(),
            &secret("marker-secret", "marker-signing-secret-0123456789"),
        )
        .await
        .unwrap();
    webhooks
        .create(
            &PostParams::default(),
            &webhook("marker", "http://127.0.0.1:9/h", &["*"]),
        )
        .await
        .unwrap();
    wait_ready(&webhooks, "marker", "True", "Routed").await;
    // Stopped, its status writer has written everything it was sent: the count is final.
    let metrics = op.op.metrics.clone();
    op.stop().await;
    // Ready, Paused, Ready again, and the marker Ready: exactly four patches, whatever the
    // watch echoed back.
    let patches = metrics.status_patch_count(ObjectKind::Webhook, PatchResult::Ok);
    assert_eq!(
        patches, 4,
        "status patches for three transitions and the marker"
    );
}
