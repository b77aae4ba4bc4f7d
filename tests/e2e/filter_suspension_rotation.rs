//! Control features: `spec.filter`, suspension after prolonged failure (and
//! resume), and secret rotation through the API.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU16, Ordering},
    },
    time::Duration,
};

use hookrelay::crd::Webhook;
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

use crate::support::{
    INGEST_MODES, ModeOperator, Receiver, ReceiverKind, api_call, control_plane, create_webhook,
    eventually, wait_ready_reason,
};

const WAIT: Duration = Duration::from_secs(60);
const SECRET: &str = "control-signing-secret-0123";

/// A receiver that keeps every body it gets and answers with a status the test sets.
#[derive(Clone)]
struct Recorder {
    /// (status answered, body), in order of arrival.
    bodies: Arc<Mutex<Vec<(u16, Value)>>>,
    status: Arc<AtomicU16>,
    url: String,
}

impl Recorder {
    async fn start(status: u16) -> Recorder {
        let bodies: Arc<Mutex<Vec<(u16, Value)>>> = Arc::default();
        let status = Arc::new(AtomicU16::new(status));
        let (b, s) = (bodies.clone(), status.clone());
        let app = axum::Router::new().fallback(axum::routing::post(move |body: String| {
            let (b, s) = (b.clone(), s.clone());
            async move {
                let status = s.load(Ordering::SeqCst);
                b.lock()
                    .unwrap()
                    .push((status, serde_json::from_str(&body).unwrap_or(Value::Null)));
                axum::http::StatusCode::from_u16(status).unwrap()
            }
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/h", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Recorder {
            bodies,
            status,
            url,
        }
    }

    fn bodies(&self) -> Vec<Value> {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .map(|(_, b)| b.clone())
            .collect()
    }

    /// The document ids that got a 200, sorted.
    fn delivered(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self
            .bodies
            .lock()
            .unwrap()
            .iter()
            .filter(|(status, _)| *status == 200)
            .filter_map(|(_, b)| b["data"]["document_id"].as_i64())
            .collect();
        ids.sort_unstable();
        ids
    }

    fn count(&self) -> usize {
        self.bodies.lock().unwrap().len()
    }

    fn answer(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }
}

/// A signing Secret `<name>-secret` and a Webhook `name` for every event type with `extra`
/// merged into its spec; does not wait for Ready.
async fn webhook_with(client: &Client, ns: &str, name: &str, url: &str, extra: Value) {
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), ns);
    let s = serde_json::from_value(json!({
        "metadata": {"name": format!("{name}-secret"), "labels": {"hookrelay.dev/signing-secret": "true"}},
        "stringData": {"secret": SECRET}
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &s).await.unwrap();
    let mut spec =
        json!({"url": url, "events": ["*"], "secretRef": {"name": format!("{name}-secret")}});
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        spec[k] = v;
    }
    let webhooks: Api<Webhook> = Api::namespaced(client.clone(), ns);
    let w = serde_json::from_value(json!({
        "apiVersion": "hookrelay.dev/v1alpha1", "kind": "Webhook", "metadata": {"name": name},
        "spec": spec
    }))
    .unwrap();
    webhooks.create(&PostParams::default(), &w).await.unwrap();
}

async fn patch_spec(client: &Client, ns: &str, name: &str, spec: Value) {
    let webhooks: Api<Webhook> = Api::namespaced(client.clone(), ns);
    webhooks
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": spec})),
        )
        .await
        .unwrap();
}

fn filter_count(op: &ModeOperator, result: &'static str) -> u64 {
    op.op
        .op
        .metrics
        .filter_evaluations
        .get_or_create(&hookrelay::metrics::FilterLabels { result })
        .get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_delivers_exactly_the_matching_events_in_every_ingest_mode() {
    let cp = control_plane();
    let client = cp.client().await;
    for mode in INGEST_MODES {
        let ns = cp.namespace("filter-mode").await;
        let op = ModeOperator::start(cp, mode, &[&ns], |_| {}).await;
        let everything = Recorder::start(200).await;
        let filtered = Recorder::start(200).await;
        webhook_with(&client, &ns, "everything", &everything.url, json!({})).await;
        webhook_with(
            &client,
            &ns,
            "folder-1-completed",
            &filtered.url,
            json!({"filter": r#"data.folder_id == 1 && data.status == "completed""#}),
        )
        .await;
        for name in ["everything", "folder-1-completed"] {
            wait_ready_reason(&client, &ns, name, "True", "Routed").await;
        }

        let events = [
            json!({"event": "document.completed", "data": {"document_id": 1, "folder_id": 1, "status": "completed"}}),
            json!({"event": "document.completed", "data": {"document_id": 2, "folder_id": 2, "status": "completed"}}),
            json!({"event": "document.error", "data": {"document_id": 3, "folder_id": 1, "status": "error"}}),
            // No folder_id: an evaluation error, which does not match.
            json!({"event": "document.completed", "data": {"document_id": 4, "status": "completed"}}),
        ];
        op.post_events(&ns, &events).await;

        // Every event routed (the filter evaluated on each), and the unfiltered Webhook got all.
        eventually(&format!("{mode:?}: four events routed"), WAIT, || async {
            let counts = (
                filter_count(&op, "matched"),
                filter_count(&op, "not_matched"),
                filter_count(&op, "error"),
                everything.count(),
                filtered.count(),
            );
            (counts == (1, 2, 1, 4, 1)).then_some(())
        })
        .await;
        let got = filtered.bodies();
        assert_eq!(got.len(), 1, "{mode:?}: {got:?}");
        assert_eq!(got[0]["data"]["document_id"], 1, "{mode:?}: {got:?}");

        if mode == hookrelay::http::IngestMode::Durable {
            // A filtered-out event has no delivery to that Webhook at all, not even a record.
            let webhooks: Api<Webhook> = Api::namespaced(client.clone(), &ns);
            let history = eventually("the filtered Webhook's history", WAIT, || async {
                let s = webhooks.get("folder-1-completed").await.ok()?.status?;
                (s.delivery_stats.succeeded == 1).then_some(s)
            })
            .await;
            assert_eq!(history.recent_deliveries.len(), 1, "{history:?}");
            let events: Api<hookrelay::crd::DocumentEvent> = Api::namespaced(client.clone(), &ns);
            let sorted = eventually("every DocumentEvent's targets written", WAIT, || async {
                let mut targets: Vec<usize> = events
                    .list(&Default::default())
                    .await
                    .ok()?
                    .items
                    .iter()
                    .map(|de| de.status.as_ref().map_or(0, |s| s.deliveries.len()))
                    .collect();
                targets.sort_unstable();
                (targets.len() == 4 && targets[0] > 0).then_some(targets)
            })
            .await;
            assert_eq!(sorted, [1, 1, 1, 2], "targets per DocumentEvent");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_filter_is_filter_invalid_with_the_compilers_message_until_fixed() {
    let cp = control_plane();
    let client = cp.client().await;
    let ns = cp.namespace("filter-invalid").await;
    let op = ModeOperator::start(cp, hookrelay::http::IngestMode::Durable, &[&ns], |_| {}).await;
    let receiver = Recorder::start(200).await;
    webhook_with(
        &client,
        &ns,
        "typo",
        &receiver.url,
        json!({"filter": "data.status == "}),
    )
    .await;
    let message = wait_ready_reason(&client, &ns, "typo", "False", "FilterInvalid").await;
    assert!(
        message.starts_with("spec.filter: ERROR: <input>:1:") && message.contains("Syntax error"),
        "{message}"
    );
    // A filter over anything but the event is refused too, naming what a filter sees.
    patch_spec(&client, &ns, "typo", json!({"filter": "request.size > 1"})).await;
    let message = wait_ready_reason(&client, &ns, "typo", "False", "FilterInvalid").await;
    assert!(
        message.contains("undeclared reference to 'request'"),
        "{message}"
    );

    patch_spec(
        &client,
        &ns,
        "typo",
        json!({"filter": r#"data.status == "completed""#}),
    )
    .await;
    wait_ready_reason(&client, &ns, "typo", "True", "Routed").await;
    op.post_event(&ns, "document.completed", json!({"status": "completed"}))
        .await;
    eventually("the fixed filter delivers", WAIT, || async {
        (receiver.count() == 1).then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_api_server_refuses_an_overlong_filter() {
    let cp = control_plane();
    let ns = cp.namespace("filter-refused").await;
    let manifest = format!(
        "apiVersion: hookrelay.dev/v1alpha1\nkind: Webhook\nmetadata: {{name: long}}\nspec:\n  url: https://example.com/h\n  events: ['*']\n  secretRef: {{name: s}}\n  filter: '{}'\n",
        "true && ".repeat(200) + "true"
    );
    let out = cp
        .kubectl(&["apply", "-n", &ns, "-f", "-"], Some(&manifest))
        .await;
    assert!(!out.success, "{}", out.stdout);
    assert!(
        out.stderr.contains("spec.filter") && out.stderr.contains("1024"),
        "{}",
        out.stderr
    );
}

/// Kubernetes Events (events.k8s.io) of the namespace as "reason/type regarding-name".
async fn events_of(ns: &str) -> String {
    control_plane()
        .kubectl_ok(
            &[
                "get",
                "events.events.k8s.io",
                "-n",
                ns,
                "-o",
                "jsonpath={range .items[*]}{.reason}/{.type} {.regarding.name},{end}",
            ],
            None,
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_failing_for_its_period_is_suspended_until_resumed_or_its_spec_changes() {
    let cp = control_plane();
    let client = cp.client().await;
    for mode in INGEST_MODES {
        let ns = cp.namespace("suspend-mode").await;
        let op = ModeOperator::start(cp, mode, &[&ns], |_| {}).await;
        let api = op.op.op.listen_addr;
        let receiver = Recorder::start(500).await;
        let policy = json!({"initialBackoffSeconds": 1, "maxBackoffSeconds": 1, "maxAttempts": 50,
            "suspendAfterFailingFor": "3s"});
        webhook_with(
            &client,
            &ns,
            "flaky",
            &receiver.url,
            json!({"delivery": policy}),
        )
        .await;
        wait_ready_reason(&client, &ns, "flaky", "True", "Routed").await;
        for id in [1, 2] {
            op.post_event(&ns, "document.completed", json!({"document_id": id}))
                .await;
        }

        let message = wait_ready_reason(&client, &ns, "flaky", "False", "FailingTooLong").await;
        assert!(message.contains("suspendAfterFailingFor (3s)"), "{message}");
        let webhooks: Api<Webhook> = Api::namespaced(client.clone(), &ns);
        let status = webhooks.get("flaky").await.unwrap().status.unwrap();
        assert_eq!(
            status.suspended.as_ref().map(|s| s.reason.as_str()),
            Some(message.as_str())
        );
        eventually(
            &format!("{mode:?}: a FailingTooLong Event"),
            WAIT,
            || async {
                events_of(&ns)
                    .await
                    .contains("FailingTooLong/Warning flaky,")
                    .then_some(())
            },
        )
        .await;
        // Held: an attempt already under way when the route changed may still arrive, then
        // nothing more (upper bounds over windows; unsuspended, each event is retried every
        // 1 to 1.5 s).
        let at_suspension = receiver.count();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let settled = receiver.count();
        assert!(
            settled <= at_suspension + 2,
            "{mode:?}: {at_suspension} then {settled}"
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(receiver.count(), settled, "{mode:?}: deliveries are held");
        assert!(receiver.delivered().is_empty());

        // Resume (REST): the held deliveries go out once the receiver answers.
        receiver.answer(200);
        let (code, reply) = api_call(
            api,
            "POST",
            &format!("/api/webhooks/flaky/resume?namespace={ns}"),
            None,
            None,
        )
        .await;
        assert_eq!(code, 200, "{reply}");
        assert!(reply["resumed_at"].is_string(), "{reply}");
        wait_ready_reason(&client, &ns, "flaky", "True", "Routed").await;
        eventually(
            &format!("{mode:?}: held deliveries sent after resume"),
            WAIT,
            || async { (receiver.delivered() == [1, 2]).then_some(()) },
        )
        .await;
        let status = webhooks.get("flaky").await.unwrap().status.unwrap();
        assert_eq!(status.suspended, None, "{mode:?}");
        // Idempotent; an unknown Webhook is 404.
        let (code, _) = api_call(
            api,
            "POST",
            &format!("/api/webhooks/flaky/resume?namespace={ns}"),
            None,
            None,
        )
        .await;
        assert_eq!(code, 200);
        let (code, reply) = api_call(
            api,
            "POST",
            &format!("/api/webhooks/nope/resume?namespace={ns}"),
            None,
            None,
        )
        .await;
        assert_eq!(
            (code, reply["error"]["code"].as_str()),
            (404, Some("not_found")),
            "{reply}"
        );

        // Failing again for the period suspends again; a change of the spec lifts it.
        receiver.answer(500);
        op.post_event(&ns, "document.completed", json!({"document_id": 3}))
            .await;
        wait_ready_reason(&client, &ns, "flaky", "False", "FailingTooLong").await;
        receiver.answer(200);
        patch_spec(&client, &ns, "flaky", json!({"description": "fixed"})).await;
        wait_ready_reason(&client, &ns, "flaky", "True", "Routed").await;
        eventually(
            &format!("{mode:?}: held delivery sent after the spec change"),
            WAIT,
            || async { (receiver.delivered() == [1, 2, 3]).then_some(()) },
        )
        .await;
    }
}

#[tokio::test]
async fn the_api_server_refuses_a_bad_suspension_period() {
    let cp = control_plane();
    let ns = cp.namespace("suspend-refused").await;
    for bad in ["3 days", "500ms", "0s", "9000h"] {
        let manifest = format!(
            "apiVersion: hookrelay.dev/v1alpha1\nkind: Webhook\nmetadata: {{name: bad}}\nspec:\n  url: https://example.com/h\n  events: ['*']\n  secretRef: {{name: s}}\n  delivery: {{suspendAfterFailingFor: '{bad}'}}\n"
        );
        let out = cp
            .kubectl(
                &["apply", "--dry-run=server", "-n", &ns, "-f", "-"],
                Some(&manifest),
            )
            .await;
        assert!(!out.success, "{bad}: {}", out.stdout);
        assert!(
            out.stderr.contains("spec.delivery.suspendAfterFailingFor")
                && out.stderr.contains("such as 72h"),
            "{bad}: {}",
            out.stderr
        );
    }
    let good = "apiVersion: hookrelay.dev/v1alpha1\nkind: Webhook\nmetadata: {name: good}\nspec:\n  url: https://example.com/h\n  events: ['*']\n  secretRef: {name: s}\n  delivery: {suspendAfterFailingFor: 1h30m}\n";
    cp.kubectl_ok(
        &["apply", "--dry-run=server", "-n", &ns, "-f", "-"],
        Some(good),
    )
    .await;
}

/// Posts an event to `ns` (again every 5 s) until `receiver` has a request after the `seen` it
/// had, returning it.
async fn next_receipt(
    op: &ModeOperator,
    ns: &str,
    receiver: &Receiver,
    seen: usize,
) -> crate::support::Received {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        op.post_event(ns, "document.completed", json!({"document_id": seen}))
            .await;
        let wait = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < wait {
            if let Some(got) = receiver.results().await.into_iter().nth(seen) {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no delivery at {} within {WAIT:?}",
            receiver.addr
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_secret_signs_beside_the_old_one_until_the_grace_period_ends() {
    let cp = control_plane();
    let client = cp.client().await;
    let ns = cp.namespace("rotate").await;
    let op = ModeOperator::start(cp, hookrelay::http::IngestMode::Durable, &[&ns], |_| {}).await;
    let api = op.op.op.listen_addr;
    let call = |method: &'static str, path: String, body: Option<String>| async move {
        api_call(api, method, &path, None, body.as_deref()).await
    };

    // A Webhook the API creates, with the secret it generated, delivering to a receiver that
    // verifies with that (soon old) secret.
    let placeholder =
        Receiver::start(ReceiverKind::Python, "placeholder-secret-0123456789", &[]).await;
    let (code, created) = call(
        "POST",
        format!("/api/webhooks?namespace={ns}"),
        Some(json!({"url": placeholder.url("/h"), "events": ["*"]}).to_string()),
    )
    .await;
    assert_eq!(code, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let old_secret = created["secret"].as_str().unwrap().to_owned();
    let old = Receiver::start(ReceiverKind::Python, &old_secret, &[]).await;
    let put_url = |url: String| {
        call(
            "PUT",
            format!("/api/webhooks/{id}?namespace={ns}"),
            Some(json!({ "url": url }).to_string()),
        )
    };
    assert_eq!(put_url(old.url("/h")).await.0, 200);
    wait_ready_reason(&client, &ns, &id, "True", "Routed").await;

    let (code, rotated) = call(
        "POST",
        format!("/api/webhooks/{id}/rotate-secret?namespace={ns}&graceSeconds=15"),
        None,
    )
    .await;
    assert_eq!(code, 200, "{rotated}");
    let new_secret = rotated["secret"].as_str().unwrap().to_owned();
    assert!(new_secret.starts_with("whsec_") && new_secret != old_secret);
    assert!(rotated["previous_expires_at"].is_string(), "{rotated}");
    let new = Receiver::start(ReceiverKind::Python, &new_secret, &[]).await;

    // During the grace: the new secret verifies both signatures...
    assert_eq!(put_url(new.url("/h")).await.0, 200);
    let during = eventually("a delivery signed with the new secret", WAIT, || async {
        let got = next_receipt(&op, &ns, &new, new.results().await.len()).await;
        (got.hex_ok && got.standard_ok == Some(true)).then_some(got)
    })
    .await;
    assert_eq!(during.status, 200);
    // ...and the old one still verifies the Standard Webhooks signature (both keys sign it).
    // X-Webhook-Signature, the contract's single HMAC, is the new secret's from the rotation on
    // (see the signer), so this receiver, which also checks it, answers 401.
    assert_eq!(put_url(old.url("/h")).await.0, 200);
    let before = old.results().await.len();
    let got = next_receipt(&op, &ns, &old, before).await;
    assert_eq!(
        (got.standard_ok, got.hex_ok),
        (Some(true), false),
        "the old secret verifies during the grace period: {got:?}"
    );

    // After the grace period the leader removes `previous`: only the new secret signs.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &ns);
    let secret_name = format!("{id}-secret");
    eventually("previous removed after the grace period", WAIT, || async {
        let s = secrets.get(&secret_name).await.ok()?;
        let data = s.data.unwrap_or_default();
        let annotated = s
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key("hookrelay.dev/previous-expires-at");
        (!data.contains_key("previous") && !annotated).then_some(())
    })
    .await;
    eventually("the old secret no longer verifies", WAIT, || async {
        let got = next_receipt(&op, &ns, &old, old.results().await.len()).await;
        (got.standard_ok == Some(false) && !got.hex_ok).then_some(())
    })
    .await;
    assert_eq!(put_url(new.url("/h")).await.0, 200);
    eventually("the new secret alone verifies", WAIT, || async {
        let got = next_receipt(&op, &ns, &new, new.results().await.len()).await;
        (got.hex_ok && got.standard_ok == Some(true) && got.status == 200).then_some(())
    })
    .await;

    // A Secret the API did not generate is the user's to rotate; bad grace periods and unknown
    // Webhooks are refused.
    create_webhook(
        &client,
        &ns,
        "own",
        &new.url("/h"),
        "own-signing-secret-0123456789",
        json!({}),
    )
    .await;
    let (code, reply) = call(
        "POST",
        format!("/api/webhooks/own/rotate-secret?namespace={ns}"),
        None,
    )
    .await;
    assert_eq!(code, 409, "{reply}");
    // Nor does the leader remove `previous` from it, even past an expiry annotated by hand.
    secrets
        .patch(
            "own-secret",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({
                "metadata": {"annotations": {"hookrelay.dev/previous-expires-at": "2020-01-01T00:00:00Z"}},
                "stringData": {"previous": "own-previous-secret-0123456789"},
            })),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let own = secrets.get("own-secret").await.unwrap();
    assert!(
        own.data.unwrap_or_default().contains_key("previous"),
        "a Secret the API did not generate was changed by the operator"
    );
    assert_eq!(reply["error"]["code"], "secret_not_generated");
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("rotate that Secret itself"),
        "{reply}"
    );
    let (code, reply) = call(
        "POST",
        format!("/api/webhooks/{id}/rotate-secret?namespace={ns}"),
        Some(r#"{"graceSeconds": 9999999}"#.into()),
    )
    .await;
    assert_eq!(code, 422, "{reply}");
    let (code, _) = call(
        "POST",
        format!("/api/webhooks/nope/rotate-secret?namespace={ns}"),
        None,
    )
    .await;
    assert_eq!(code, 404);
}
