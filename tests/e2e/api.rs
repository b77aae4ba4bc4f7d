//! The document-processing contract's REST API, ingest and Kubernetes-backed auth, against the real API server with
//! real tokens (TokenRequest) and real RBAC objects.

use std::time::Duration;

use hookrelay::{crd::DocumentEvent, http::IngestMode};
use serde_json::{Value, json};

use crate::support::{
    ControlPlane, CountingReceiver, InProcess, Receiver, ReceiverKind, api_call, control_plane,
    default_args, eventually, local_args,
};

/// A ServiceAccount token whose Role in `ns` allows exactly `rules` (kubectl create role syntax).
async fn token_with(cp: &ControlPlane, ns: &str, sa: &str, verbs: &str, resources: &str) -> String {
    let token = cp.service_account_token(ns, sa).await;
    cp.kubectl_ok(
        &[
            "create",
            "role",
            sa,
            &format!("--verb={verbs}"),
            &format!("--resource={resources}"),
            "-n",
            ns,
        ],
        None,
    )
    .await;
    cp.kubectl_ok(
        &[
            "create",
            "rolebinding",
            sa,
            &format!("--role={sa}"),
            &format!("--serviceaccount={ns}:{sa}"),
            "-n",
            ns,
        ],
        None,
    )
    .await;
    token
}

const ALL: &str = "webhooks.hookrelay.dev,documentevents.hookrelay.dev";

/// An operator for `ns` in `mode`, authentication on (these tests are about it), with a direct
/// queue of `queue` events, all of which one namespace may take.
async fn operator(cp: &ControlPlane, ns: &str, mode: IngestMode, queue: usize) -> InProcess {
    let mut args = local_args(&[ns]);
    args.ingest_mode = mode;
    args.direct_queue = queue;
    args.direct_queue_per_namespace = Some(queue);
    InProcess::start_with(cp.config().await, args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_contract_requests_behave_as_the_contract_says() {
    let cp = control_plane();
    let ns = cp.namespace("contract-api").await;
    let op = operator(cp, &ns, IngestMode::Durable, 100).await;
    let api = op.op.listen_addr;
    let token = token_with(cp, &ns, "admin", "*", ALL).await;
    let q = format!("?namespace={ns}");

    // POST /api/webhooks with the contract's request body, verbatim.
    let contract_create = r#"{
  "url": "https://your-application.com/webhooks/file-conversion",
  "events": ["document.completed", "document.error"],
  "description": "Notification endpoint for document processing events"
}"#;
    let (status, created) = api_call(
        api,
        "POST",
        &format!("/api/webhooks{q}"),
        Some(&token),
        Some(contract_create),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(
        created["url"],
        "https://your-application.com/webhooks/file-conversion"
    );
    assert_eq!(
        created["events"],
        json!(["document.completed", "document.error"])
    );
    assert_eq!(
        created["description"],
        "Notification endpoint for document processing events"
    );
    assert!(
        created["created_at"].as_str().unwrap().ends_with('Z'),
        "{created}"
    );
    let secret = created["secret"].as_str().unwrap();
    assert!(
        secret.starts_with("whsec_"),
        "the secret is returned once: {created}"
    );

    // It is a Webhook resource that kubectl shows, with its Secret.
    let shown = cp
        .kubectl_ok(
            &[
                "get",
                "webhook",
                &id,
                "-n",
                &ns,
                "-o",
                "jsonpath={.spec.url} {.spec.secretRef.name}",
            ],
            None,
        )
        .await;
    assert_eq!(
        shown,
        format!("https://your-application.com/webhooks/file-conversion {id}-secret")
    );
    let stored = cp
        .kubectl_ok(
            &[
                "get",
                "secret",
                &format!("{id}-secret"),
                "-n",
                &ns,
                "-o",
                "jsonpath={.data.secret}",
            ],
            None,
        )
        .await;
    assert!(!stored.is_empty());
    // The secret is never shown again.
    let (_, got) = api_call(
        api,
        "GET",
        &format!("/api/webhooks/{id}{q}"),
        Some(&token),
        None,
    )
    .await;
    assert!(got.get("secret").is_none(), "{got}");

    // One applied with kubectl is listed by GET /api/webhooks.
    // A strong value (16 bytes at least), labelled as a signing Secret: hookrelay signs with nothing else.
    cp.kubectl_ok(
        &[
            "create",
            "secret",
            "generic",
            "s",
            "--from-literal=secret=signing-secret-0123456789",
            "-n",
            &ns,
        ],
        None,
    )
    .await;
    cp.kubectl_ok(
        &[
            "label",
            "secret",
            "s",
            "hookrelay.dev/signing-secret=true",
            "-n",
            &ns,
        ],
        None,
    )
    .await;
    cp.kubectl_ok(
        &["apply", "-n", &ns, "-f", "-"],
        Some("apiVersion: hookrelay.dev/v1alpha1\nkind: Webhook\nmetadata: {name: applied}\nspec: {url: 'https://example.com/h', events: ['*'], secretRef: {name: s}, paused: true}\n"),
    ).await;
    let (status, list) =
        api_call(api, "GET", &format!("/api/webhooks{q}"), Some(&token), None).await;
    assert_eq!(status, 200);
    let mut ids: Vec<&str> = list["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["id"].as_str().unwrap())
        .collect();
    ids.sort();
    let mut expected = vec!["applied", id.as_str()];
    expected.sort();
    assert_eq!(ids, expected);

    // PUT with the contract's update body.
    let contract_update = r#"{
  "url": "https://your-application.com/webhooks/new-endpoint",
  "events": ["document.completed", "document.error", "document.deleted"],
  "description": "Updated notification endpoint"
}"#;
    let (status, updated) = api_call(
        api,
        "PUT",
        &format!("/api/webhooks/{id}{q}"),
        Some(&token),
        Some(contract_update),
    )
    .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(
        updated["url"],
        "https://your-application.com/webhooks/new-endpoint"
    );
    assert_eq!(
        updated["events"],
        json!(["document.completed", "document.error", "document.deleted"])
    );
    assert_eq!(updated["description"], "Updated notification endpoint");
    let shown = cp
        .kubectl_ok(
            &[
                "get",
                "webhook",
                &id,
                "-n",
                &ns,
                "-o",
                "jsonpath={.spec.url}",
            ],
            None,
        )
        .await;
    assert_eq!(shown, "https://your-application.com/webhooks/new-endpoint");

    let (status, deliveries) = api_call(
        api,
        "GET",
        &format!("/api/webhooks/{id}/deliveries{q}"),
        Some(&token),
        None,
    )
    .await;
    assert_eq!((status, &deliveries["deliveries"]), (200, &json!([])));

    // DELETE, and the generated Secret goes with it.
    let (status, _) = api_call(
        api,
        "DELETE",
        &format!("/api/webhooks/{id}{q}"),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(status, 204);
    assert!(
        !cp.kubectl(&["get", "webhook", &id, "-n", &ns], None)
            .await
            .success
    );
    assert!(
        !cp.kubectl(&["get", "secret", &format!("{id}-secret"), "-n", &ns], None)
            .await
            .success
    );
    let (status, _) = api_call(
        api,
        "GET",
        &format!("/api/webhooks/{id}{q}"),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(status, 404);

    // The OpenAPI document is served.
    let (status, doc) = api_call(api, "GET", "/openapi.json", None, None).await;
    assert_eq!((status, doc["openapi"].as_str()), (200, Some("3.0.3")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_decides_who_may_ingest_and_manage_webhooks() {
    let cp = control_plane();
    let ns_a = cp.namespace("rbac-a").await;
    let ns_b = cp.namespace("rbac-b").await;
    let op = InProcess::start_with(cp.config().await, default_args(&[&ns_a, &ns_b])).await;
    let api = op.op.listen_addr;
    let ingester = token_with(
        cp,
        &ns_a,
        "ingester",
        "create",
        "documentevents.hookrelay.dev",
    )
    .await;
    let event = r#"{"event":"document.uploaded","data":{"document_id":5}}"#;

    // Its own namespace (from the token), and by name.
    let (status, reply) = api_call(api, "POST", "/api/events", Some(&ingester), Some(event)).await;
    assert_eq!(status, 202, "{reply}");
    assert_eq!(reply["namespace"], ns_a.as_str());
    let name = reply["document_events"][0].as_str().unwrap().to_owned();
    // Durable: the DocumentEvent exists by the time of the reply.
    let stored = cp
        .kubectl_ok(
            &[
                "get",
                "de",
                &name,
                "-n",
                &ns_a,
                "-o",
                "jsonpath={.spec.type}",
            ],
            None,
        )
        .await;
    assert_eq!(stored, "document.uploaded");
    let (status, _) = api_call(
        api,
        "POST",
        &format!("/api/events?namespace={ns_a}"),
        Some(&ingester),
        Some(event),
    )
    .await;
    assert_eq!(status, 202);

    // Another namespace, or webhooks: 403.
    let (status, reply) = api_call(
        api,
        "POST",
        &format!("/api/events?namespace={ns_b}"),
        Some(&ingester),
        Some(event),
    )
    .await;
    assert_eq!(status, 403, "{reply}");
    assert_eq!(reply["error"]["code"], "forbidden");
    let (status, _) = api_call(
        api,
        "POST",
        "/api/webhooks",
        Some(&ingester),
        Some(r#"{"url":"https://example.com/h","events":["*"]}"#),
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = api_call(api, "GET", "/api/webhooks", Some(&ingester), None).await;
    assert_eq!(status, 403);

    // No token, or a bad one: 401.
    let (status, reply) = api_call(api, "POST", "/api/events", None, Some(event)).await;
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let (status, _) = api_call(api, "POST", "/api/events", Some("not-a-token"), Some(event)).await;
    assert_eq!(status, 401);

    // Nothing reached namespace B.
    let left = cp
        .kubectl_ok(&["get", "de,webhooks", "-n", &ns_b, "-o", "name"], None)
        .await;
    assert_eq!(left.trim(), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_their_status_codes_and_change_nothing() {
    let cp = control_plane();
    let ns = cp.namespace("bad-requests").await;
    let op = operator(cp, &ns, IngestMode::Durable, 100).await;
    let api = op.op.listen_addr;
    let token = token_with(cp, &ns, "admin", "*", ALL).await;
    // A strong value (16 bytes at least), labelled as a signing Secret: hookrelay signs with nothing else.
    cp.kubectl_ok(
        &[
            "create",
            "secret",
            "generic",
            "s",
            "--from-literal=secret=signing-secret-0123456789",
            "-n",
            &ns,
        ],
        None,
    )
    .await;
    cp.kubectl_ok(
        &[
            "label",
            "secret",
            "s",
            "hookrelay.dev/signing-secret=true",
            "-n",
            &ns,
        ],
        None,
    )
    .await;
    cp.kubectl_ok(
        &["apply", "-n", &ns, "-f", "-"],
        Some("apiVersion: hookrelay.dev/v1alpha1\nkind: Webhook\nmetadata: {name: existing}\nspec: {url: 'https://example.com/h', events: ['*'], secretRef: {name: s}, paused: true}\n"),
    ).await;
    let snapshot = || async {
        cp.kubectl_ok(&["get", "webhooks,documentevents,secrets", "-n", &ns, "-o", "jsonpath={range .items[*]}{.kind}/{.metadata.name}@{.metadata.resourceVersion} {end}"], None).await
    };
    // The controller's own status write comes first: only the requests may not change a thing.
    eventually(
        "the Webhook reconciled",
        Duration::from_secs(30),
        || async {
            let generation = cp
                .kubectl_ok(
                    &[
                        "get",
                        "webhook",
                        "existing",
                        "-n",
                        &ns,
                        "-o",
                        "jsonpath={.status.observedGeneration}",
                    ],
                    None,
                )
                .await;
            (generation.trim() == "1").then_some(())
        },
    )
    .await;
    let before = snapshot().await;

    let q = format!("?namespace={ns}");
    let big = format!(
        r#"{{"event":"document.completed","data":{{"blob":"{}"}}}}"#,
        "x".repeat(1_100_000)
    );
    let cases: Vec<(&str, &str, String, Option<String>, u16)> = vec![
        (
            "malformed JSON",
            "POST",
            format!("/api/events{q}"),
            Some("{\"event\":".into()),
            400,
        ),
        (
            "empty body",
            "POST",
            format!("/api/events{q}"),
            Some(String::new()),
            400,
        ),
        (
            "not an object",
            "POST",
            format!("/api/events{q}"),
            Some("\"hello\"".into()),
            422,
        ),
        (
            "unknown event type",
            "POST",
            format!("/api/events{q}"),
            Some(r#"{"event":"document.archived","data":{}}"#.into()),
            422,
        ),
        (
            "missing data",
            "POST",
            format!("/api/events{q}"),
            Some(r#"{"event":"document.completed"}"#.into()),
            422,
        ),
        (
            "data not an object",
            "POST",
            format!("/api/events{q}"),
            Some(r#"{"event":"document.completed","data":"x"}"#.into()),
            422,
        ),
        (
            "bad timestamp",
            "POST",
            format!("/api/events{q}"),
            Some(r#"{"event":"document.completed","timestamp":"noon","data":{}}"#.into()),
            422,
        ),
        (
            "one bad event in an array",
            "POST",
            format!("/api/events{q}"),
            Some(r#"[{"event":"document.completed","data":{}},{"event":"x","data":{}}]"#.into()),
            422,
        ),
        (
            "empty array",
            "POST",
            format!("/api/events{q}"),
            Some("[]".into()),
            422,
        ),
        (
            "body over the limit",
            "POST",
            format!("/api/events{q}"),
            Some(big),
            413,
        ),
        (
            "invalid namespace",
            "POST",
            "/api/events?namespace=Not_A_Namespace".into(),
            Some(r#"{"event":"document.completed","data":{}}"#.into()),
            422,
        ),
        (
            "wrong method on ingest",
            "GET",
            format!("/api/events{q}"),
            None,
            405,
        ),
        (
            "webhook: malformed JSON",
            "POST",
            format!("/api/webhooks{q}"),
            Some("{".into()),
            400,
        ),
        (
            "webhook: missing url",
            "POST",
            format!("/api/webhooks{q}"),
            Some(r#"{"events":["document.error"]}"#.into()),
            422,
        ),
        (
            "webhook: relative url",
            "POST",
            format!("/api/webhooks{q}"),
            Some(r#"{"url":"/hooks","events":["document.error"]}"#.into()),
            422,
        ),
        (
            "webhook: unknown event",
            "POST",
            format!("/api/webhooks{q}"),
            Some(r#"{"url":"https://example.com/h","events":["document.archived"]}"#.into()),
            422,
        ),
        (
            "webhook: empty events",
            "POST",
            format!("/api/webhooks{q}"),
            Some(r#"{"url":"https://example.com/h","events":[]}"#.into()),
            422,
        ),
        (
            "webhook: events not a list",
            "POST",
            format!("/api/webhooks{q}"),
            Some(r#"{"url":"https://example.com/h","events":"document.error"}"#.into()),
            422,
        ),
        (
            "update: bad url",
            "PUT",
            format!("/api/webhooks/existing{q}"),
            Some(r#"{"url":"ftp://example.com/h"}"#.into()),
            422,
        ),
        (
            "unknown webhook",
            "GET",
            format!("/api/webhooks/nope{q}"),
            None,
            404,
        ),
        (
            "update unknown webhook",
            "PUT",
            format!("/api/webhooks/nope{q}"),
            Some(r#"{"description":"x"}"#.into()),
            404,
        ),
        (
            "delete unknown webhook",
            "DELETE",
            format!("/api/webhooks/nope{q}"),
            None,
            404,
        ),
        (
            "deliveries of unknown webhook",
            "GET",
            format!("/api/webhooks/nope/deliveries{q}"),
            None,
            404,
        ),
        (
            "test unknown webhook",
            "POST",
            format!("/api/webhooks/nope/test{q}"),
            None,
            404,
        ),
        (
            "redeliver unknown delivery",
            "POST",
            format!("/api/webhooks/existing/deliveries/msg_nope/redeliver{q}"),
            None,
            404,
        ),
        (
            "wrong method on a webhook",
            "PATCH",
            format!("/api/webhooks/existing{q}"),
            Some("{}".into()),
            405,
        ),
        (
            "unknown endpoint",
            "GET",
            format!("/api/nothing{q}"),
            None,
            404,
        ),
    ];
    let mut failures = Vec::new();
    for (name, method, path, body, expected) in &cases {
        let (status, reply) = api_call(api, method, path, Some(&token), body.as_deref()).await;
        let code = reply["error"]["code"].as_str();
        let message = reply["error"]["message"].as_str().unwrap_or_default();
        if status != *expected || code.is_none() || message.is_empty() {
            failures.push(format!(
                "{name}: {status} {reply} (expected {expected} with a JSON error)"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases wrong:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    assert_eq!(
        snapshot().await,
        before,
        "a refused request changed the cluster"
    );
    // And never a 500.
    let metrics = op.op.metrics.encode();
    assert!(!metrics.contains("code=\"500\""), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_and_redeliver_send_signed_deliveries_now() {
    let cp = control_plane();
    let ns = cp.namespace("test-redeliver").await;
    let client = cp.client().await;
    let op = operator(cp, &ns, IngestMode::Durable, 100).await;
    let api = op.op.listen_addr;
    let token = token_with(cp, &ns, "admin", "*", ALL).await;
    let q = format!("?namespace={ns}");
    // Create through the API; the receiver learns the generated secret from the reply.
    let placeholder = Receiver::start(ReceiverKind::Python, "unused", &[]).await;
    let body = json!({"url": placeholder.url("/h"), "events": ["document.completed"]}).to_string();
    let (_, created) = api_call(
        api,
        "POST",
        &format!("/api/webhooks{q}"),
        Some(&token),
        Some(&body),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_owned();
    let receiver =
        Receiver::start(ReceiverKind::Node, created["secret"].as_str().unwrap(), &[]).await;
    let update = json!({"url": receiver.url("/h")}).to_string();
    api_call(
        api,
        "PUT",
        &format!("/api/webhooks/{id}{q}"),
        Some(&token),
        Some(&update),
    )
    .await;
    eventually("the new url routed", Duration::from_secs(30), || async {
        let route = op
            .op
            .routes
            .snapshot()
            .get(&hookrelay::keys::WebhookKey::new(&ns, &id))
            .cloned()?;
        (route.url == receiver.url("/h") && route.signer.is_some()).then_some(())
    })
    .await;

    let (status, result) = api_call(
        api,
        "POST",
        &format!("/api/webhooks/{id}/test{q}"),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(
        (status, &result["success"], &result["status_code"]),
        (200, &json!(true), &json!(200)),
        "{result}"
    );

    // Ingest an event, then redeliver its delivery.
    let (status, reply) = api_call(
        api,
        "POST",
        &format!("/api/events{q}"),
        Some(&token),
        Some(r#"{"event":"document.completed","data":{"document_id":9}}"#),
    )
    .await;
    assert_eq!(status, 202);
    let name = reply["document_events"][0].as_str().unwrap().to_owned();
    let events: kube::Api<DocumentEvent> = kube::Api::namespaced(client.clone(), &ns);
    let delivery_id = eventually("the event delivered", Duration::from_secs(30), || async {
        let d = events
            .get(&name)
            .await
            .ok()?
            .status?
            .deliveries
            .into_iter()
            .next()?;
        (d.http_status == Some(200)).then_some(d.id)
    })
    .await;
    let deliveries = eventually(
        "the delivery in the history",
        Duration::from_secs(30),
        || async {
            let (_, d) = api_call(
                api,
                "GET",
                &format!("/api/webhooks/{id}/deliveries{q}"),
                Some(&token),
                None,
            )
            .await;
            let list = d["deliveries"].as_array()?.clone();
            list.iter()
                .any(|r| r["id"] == delivery_id.as_str())
                .then_some(list)
        },
    )
    .await;
    let record = deliveries
        .iter()
        .find(|r| r["id"] == delivery_id.as_str())
        .unwrap();
    assert_eq!(
        (&record["status_code"], record["response_time_ms"].is_u64()),
        (&json!(200), true),
        "{record}"
    );
    let (status, result) = api_call(
        api,
        "POST",
        &format!("/api/webhooks/{id}/deliveries/{delivery_id}/redeliver{q}"),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(
        (status, &result["success"]),
        (200, &json!(true)),
        "{result}"
    );
    let got = receiver.wait_ok(3).await;
    let same: Vec<&str> = got
        .iter()
        .filter_map(|r| r.delivery_id.as_deref())
        .filter(|d| *d == delivery_id)
        .collect();
    assert_eq!(
        same.len(),
        2,
        "the redelivery reuses the delivery id: {got:?}"
    );
    assert!(
        got.iter().all(|r| r.hex_ok && r.standard_ok == Some(true)),
        "{got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_ingest_delivers_from_memory_and_answers_429_when_full() {
    let cp = control_plane();
    let ns = cp.namespace("direct").await;
    let op = operator(cp, &ns, IngestMode::Direct, 3).await;
    let api = op.op.listen_addr;
    let token = token_with(cp, &ns, "admin", "*", ALL).await;
    let q = format!("?namespace={ns}");
    let (receiver, addr) = CountingReceiver::start().await;
    let dead = crate::support::Blackhole::start().await;
    // A strong value (16 bytes at least), labelled as a signing Secret: hookrelay signs with nothing else.
    cp.kubectl_ok(
        &[
            "create",
            "secret",
            "generic",
            "s",
            "--from-literal=secret=signing-secret-0123456789",
            "-n",
            &ns,
        ],
        None,
    )
    .await;
    cp.kubectl_ok(
        &[
            "label",
            "secret",
            "s",
            "hookrelay.dev/signing-secret=true",
            "-n",
            &ns,
        ],
        None,
    )
    .await;
    for (name, url, events) in [
        ("live", format!("http://{addr}/h"), "document.completed"),
        ("dead", format!("http://{}/h", dead.addr), "document.error"),
    ] {
        let manifest = format!(
            "apiVersion: hookrelay.dev/v1alpha1\nkind: Webhook\nmetadata: {{name: {name}}}\nspec: {{url: '{url}', events: [{events}], secretRef: {{name: s}}, delivery: {{timeoutSeconds: 30}}}}\n"
        );
        cp.kubectl_ok(&["apply", "-n", &ns, "-f", "-"], Some(&manifest))
            .await;
    }
    eventually("both routed", Duration::from_secs(30), || async {
        (op.op.routes.snapshot().len() == 2).then_some(())
    })
    .await;

    let (status, reply) = api_call(
        api,
        "POST",
        &format!("/api/events{q}"),
        Some(&token),
        Some(r#"{"event":"document.completed","data":{"document_id":1}}"#),
    )
    .await;
    assert_eq!(
        (status, reply["mode"].as_str(), reply["deliveries"].as_u64()),
        (202, Some("direct"), Some(1)),
        "{reply}"
    );
    assert!(
        reply["guarantee"]
            .as_str()
            .unwrap()
            .contains("at-most-once")
    );
    eventually("the direct delivery", Duration::from_secs(30), || async {
        (receiver.counts().0 == 1).then_some(())
    })
    .await;
    // Nothing was stored.
    assert_eq!(
        cp.kubectl_ok(&["get", "de", "-n", &ns, "-o", "name"], None)
            .await
            .trim(),
        ""
    );

    // Three deliveries stuck on the dead endpoint fill the queue of three.
    let stuck = r#"[{"event":"document.error","data":{}},{"event":"document.error","data":{}},{"event":"document.error","data":{}}]"#;
    let (status, _) = api_call(
        api,
        "POST",
        &format!("/api/events{q}"),
        Some(&token),
        Some(stuck),
    )
    .await;
    assert_eq!(status, 202);
    let (status, reply) = api_call(
        api,
        "POST",
        &format!("/api/events{q}"),
        Some(&token),
        Some(r#"{"event":"document.completed","data":{}}"#),
    )
    .await;
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (429, Some("queue_full")),
        "{reply}"
    );
    let direct: Value = reply;
    assert!(
        direct["error"]["message"]
            .as_str()
            .unwrap()
            .contains("retry")
    );
}
