//! `/api/v1` against the real API server: every answer is read into the types the OpenAPI
//! document is generated from, with unknown fields refused, so a response that strays from the
//! document fails here. Errors are problem details; PUT replaces and refuses unknown fields;
//! PATCH merges; lists page with a cursor; the unversioned calls keep their shapes.

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use hookrelay::http::{
    IngestMode,
    v1::model::{
        Accepted, AttemptOutcome, AttemptPage, AttemptResult, DeliveryState, DocumentEvent,
        Namespaces, ProblemDetails, Recovered, Webhook, WebhookPage, WebhookWithSecret,
    },
};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::support::{
    InProcess, Receiver, ReceiverKind, control_plane, eventually, grant, local_args,
};

/// One call: status, content type and body text.
async fn call(
    api: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    content_type: &str,
    body: Option<&str>,
) -> (u16, String, String) {
    let mut req =
        reqwest::Client::new().request(method.parse().unwrap(), format!("http://{api}{path}"));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    if let Some(body) = body {
        req = req
            .header("content-type", content_type)
            .body(body.to_owned());
    }
    let response = req.send().await.expect("the API answers");
    let status = response.status().as_u16();
    let kind = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, kind, response.text().await.unwrap())
}

/// A call that must answer `status` with a body of type `T` (unknown fields refused).
async fn typed<T: DeserializeOwned>(
    api: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: Option<&str>,
    status: u16,
) -> T {
    let (got, _, text) = call(api, method, path, Some(token), "application/json", body).await;
    assert_eq!(got, status, "{method} {path}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: {e} in {text}"))
}

/// A call that must be refused with `status` and problem `code`, as problem details.
async fn problem(
    api: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
    (status, code): (u16, &str),
) -> ProblemDetails {
    let (got, kind, text) = call(api, method, path, token, "application/json", body).await;
    assert_eq!(got, status, "{method} {path}: {text}");
    assert_eq!(kind, "application/problem+json", "{method} {path}: {text}");
    let problem: ProblemDetails = serde_json::from_str(&text).unwrap();
    assert_eq!(problem.code, code, "{text}");
    assert_eq!(
        problem.type_,
        format!("https://hookrelay.dev/problems/{code}")
    );
    assert_eq!(problem.status, status);
    assert_eq!(problem.instance, path.split('?').next().unwrap());
    assert!(!problem.detail.is_empty());
    problem
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_versioned_api_answers_in_its_documented_shapes() {
    let cp = control_plane();
    let ns = cp.namespace("api-v1").await;
    let client = cp.client().await;
    let mut args = local_args(&[&ns]);
    args.ingest_mode = IngestMode::Durable;
    let op = InProcess::start_with(cp.config().await, args).await;
    let api = op.op.listen_addr;
    grant(
        &client,
        &ns,
        (&ns, "admin"),
        &["webhooks", "documentevents"],
        &["*"],
    )
    .await;
    let token = cp.service_account_token(&ns, "admin").await;
    let t = token.as_str();
    let q = format!("?namespace={ns}");

    // Unknown and read-only fields are refused by name, and nothing is made.
    let refused = problem(
        api,
        "POST",
        &format!("/api/v1/webhooks{q}"),
        Some(t),
        Some(r#"{"url":"https://example.com/h","events":["*"],"id":"wh-mine"}"#),
        (422, "invalid"),
    )
    .await;
    assert!(refused.detail.contains("unknown field `id`"), "{refused:?}");
    problem(
        api,
        "POST",
        &format!("/api/v1/webhooks{q}"),
        Some(t),
        Some("{"),
        (400, "malformed_json"),
    )
    .await;
    let page: WebhookPage = typed(api, "GET", &format!("/api/v1/webhooks{q}"), t, None, 200).await;
    assert!(page.items.is_empty(), "{page:?}");

    // Create: the secret, once.
    let created: WebhookWithSecret = typed(
        api,
        "POST",
        &format!("/api/v1/webhooks{q}"),
        t,
        Some(r#"{"url":"https://example.com/h","events":["document.completed"],"description":"first","filter":"data.document_id > 0"}"#),
        201,
    )
    .await;
    let id = created.webhook.id.clone();
    assert!(created.secret.starts_with("whsec_"));
    assert_eq!(created.webhook.description.as_deref(), Some("first"));
    let receiver = Receiver::start(ReceiverKind::Python, &created.secret, &[]).await;

    // PUT replaces: what is left out takes its default (the description and filter go).
    let replace = json!({"url": receiver.url("/hook"), "events": ["*"]}).to_string();
    let replaced: Webhook = typed(
        api,
        "PUT",
        &format!("/api/v1/webhooks/{id}{q}"),
        t,
        Some(&replace),
        200,
    )
    .await;
    assert_eq!(
        replaced.url.as_deref(),
        Some(receiver.url("/hook").as_str())
    );
    assert_eq!((replaced.description, replaced.filter), (None, None));
    // ... and refuses an unknown field, changing nothing.
    let refused = problem(
        api,
        "PUT",
        &format!("/api/v1/webhooks/{id}{q}"),
        Some(t),
        Some(
            &json!({"url": "https://example.com/other", "events": ["*"], "graceSeconds": 1})
                .to_string(),
        ),
        (422, "invalid"),
    )
    .await;
    assert!(refused.detail.contains("graceSeconds"), "{refused:?}");
    let got: Webhook = typed(
        api,
        "GET",
        &format!("/api/v1/webhooks/{id}{q}"),
        t,
        None,
        200,
    )
    .await;
    assert_eq!(got.url.as_deref(), Some(receiver.url("/hook").as_str()));

    // PATCH merges: what is left out stays, null removes.
    let (status, _, text) = call(
        api,
        "PATCH",
        &format!("/api/v1/webhooks/{id}{q}"),
        Some(t),
        "application/merge-patch+json",
        Some(r#"{"description":"second","headers":{"X-Env":"test"}}"#),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let patched: Webhook = serde_json::from_str(&text).unwrap();
    assert_eq!(patched.description.as_deref(), Some("second"));
    assert_eq!(patched.events, replaced.events);
    assert_eq!(
        patched.headers.get("X-Env").map(String::as_str),
        Some("test")
    );
    let patched: Webhook = typed(
        api,
        "PATCH",
        &format!("/api/v1/webhooks/{id}{q}"),
        t,
        Some(r#"{"headers":null}"#),
        200,
    )
    .await;
    assert!(patched.headers.is_empty(), "{patched:?}");
    assert_eq!(patched.description.as_deref(), Some("second"));

    // Ready, then an event through /api/v1/events reaches the receiver, signed.
    let ready = eventually("the webhook Ready", Duration::from_secs(60), || async {
        let w: Webhook = typed(
            api,
            "GET",
            &format!("/api/v1/webhooks/{id}{q}"),
            t,
            None,
            200,
        )
        .await;
        (w.ready == Some(true)).then_some(w)
    })
    .await;
    assert!(ready.ready_reason.is_some(), "{ready:?}");
    let accepted: Accepted = typed(
        api,
        "POST",
        &format!("/api/v1/events{q}"),
        t,
        Some(r#"{"event":"document.completed","data":{"document_id":12345}}"#),
        202,
    )
    .await;
    assert_eq!((accepted.mode.as_str(), accepted.accepted), ("durable", 1));
    let event_name = accepted
        .document_events
        .expect("durable names its DocumentEvents")[0]
        .clone();
    let received = receiver.wait_ok(1).await;
    assert!(received[0].hex_ok, "{received:?}");

    // The attempt, the same values under the same names everywhere.
    let attempts = eventually(
        "the attempt in the status",
        Duration::from_secs(30),
        || async {
            let page: AttemptPage = typed(
                api,
                "GET",
                &format!("/api/v1/webhooks/{id}/deliveries{q}"),
                t,
                None,
                200,
            )
            .await;
            (!page.items.is_empty()).then_some(page)
        },
    )
    .await;
    let attempt = &attempts.items[0];
    assert_eq!(
        (attempt.outcome, attempt.http_status),
        (Some(AttemptOutcome::Succeeded), Some(200))
    );
    assert_eq!(attempt.document_event.as_deref(), Some(event_name.as_str()));
    assert_eq!(
        attempt.delivery_id,
        received[0].delivery_id.clone().unwrap()
    );
    assert_eq!(attempts.stats.as_ref().map(|s| s.succeeded), Some(1));
    let event: DocumentEvent =
        eventually("the event delivered", Duration::from_secs(30), || async {
            let e: DocumentEvent = typed(
                api,
                "GET",
                &format!("/api/v1/documentevents/{event_name}{q}"),
                t,
                None,
                200,
            )
            .await;
            (e.phase.as_deref() == Some("Delivered")).then_some(e)
        })
        .await;
    assert_eq!(event.deliveries[0].state, DeliveryState::Succeeded);
    assert_eq!(event.deliveries[0].http_status, Some(200));
    assert_eq!(event.deliveries[0].last_attempt_at, attempt.attempted_at);
    let found: AttemptPage = typed(
        api,
        "GET",
        &format!("/api/v1/webhooks/{id}/deliveries{q}&document_id=12345"),
        t,
        None,
        200,
    )
    .await;
    assert_eq!(found.items.len(), 1, "{found:?}");
    assert_eq!(found.items[0].state, Some(DeliveryState::Succeeded));

    // Actions.
    let tested: AttemptResult = typed(
        api,
        "POST",
        &format!("/api/v1/webhooks/{id}/test{q}"),
        t,
        None,
        200,
    )
    .await;
    assert_eq!(
        (tested.outcome, tested.http_status),
        (AttemptOutcome::Succeeded, Some(200))
    );
    let redelivered: AttemptResult = typed(
        api,
        "POST",
        &format!(
            "/api/v1/webhooks/{id}/deliveries/{}/redeliver{q}",
            attempt.delivery_id
        ),
        t,
        None,
        200,
    )
    .await;
    assert_eq!(redelivered.delivery_id, attempt.delivery_id);
    let recovered: Recovered = typed(
        api,
        "POST",
        &format!("/api/v1/webhooks/{id}/recover{q}&since=2020-01-01T00:00:00Z"),
        t,
        None,
        200,
    )
    .await;
    assert_eq!((recovered.queued, recovered.truncated), (0, false));
    problem(
        api,
        "POST",
        &format!("/api/v1/webhooks/{id}/rotate-secret{q}"),
        Some(t),
        Some(r#"{"graceSeconds":60}"#),
        (422, "invalid"),
    )
    .await;
    let rotated: WebhookWithSecret = typed(
        api,
        "POST",
        &format!("/api/v1/webhooks/{id}/rotate-secret{q}"),
        t,
        Some(r#"{"grace_seconds":60}"#),
        200,
    )
    .await;
    assert_ne!(rotated.secret, created.secret);
    assert!(rotated.previous_expires_at.is_some());
    let namespaces: Namespaces = typed(api, "GET", "/api/v1/namespaces", t, None, 200).await;
    assert_eq!(namespaces.items, vec![ns.clone()]);

    // Cursor pagination: four more Webhooks, two a page, each once.
    let mut all = BTreeSet::from([id.clone()]);
    for n in 0..4 {
        let more: WebhookWithSecret = typed(
            api,
            "POST",
            &format!("/api/v1/webhooks{q}"),
            t,
            Some(&json!({"url": format!("https://example.com/{n}"), "events": ["*"]}).to_string()),
            201,
        )
        .await;
        all.insert(more.webhook.id);
    }
    let mut listed = Vec::new();
    let mut cursor = String::new();
    loop {
        let page: WebhookPage = typed(
            api,
            "GET",
            &format!("/api/v1/webhooks{q}&limit=2&cursor={cursor}"),
            t,
            None,
            200,
        )
        .await;
        assert!(page.items.len() <= 2, "{page:?}");
        listed.extend(page.items.into_iter().map(|w| w.id));
        match page.next_cursor {
            Some(next) => cursor = next,
            None => break,
        }
    }
    assert_eq!(listed.len(), all.len(), "each Webhook once: {listed:?}");
    assert_eq!(listed.into_iter().collect::<BTreeSet<_>>(), all);
    problem(
        api,
        "GET",
        &format!("/api/v1/webhooks{q}&limit=0"),
        Some(t),
        None,
        (400, "invalid_query"),
    )
    .await;
    problem(
        api,
        "GET",
        &format!("/api/v1/webhooks/{id}/deliveries{q}&cursor=x"),
        Some(t),
        None,
        (400, "invalid_query"),
    )
    .await;

    // Refusals outside the handlers are problem details too.
    problem(
        api,
        "GET",
        &format!("/api/v1/webhooks{q}"),
        None,
        None,
        (401, "unauthorized"),
    )
    .await;
    problem(
        api,
        "GET",
        "/api/v1/nothing-here",
        Some(t),
        None,
        (404, "not_found"),
    )
    .await;
    problem(
        api,
        "DELETE",
        "/api/v1/namespaces",
        Some(t),
        None,
        (405, "method_not_allowed"),
    )
    .await;

    // The unversioned calls keep their own shapes and envelope.
    let (status, _, text) = call(
        api,
        "GET",
        &format!("/api/webhooks/{id}{q}"),
        Some(t),
        "",
        None,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let legacy: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(legacy["id"], id.as_str());
    let (status, kind, text) = call(
        api,
        "GET",
        &format!("/api/webhooks/nope{q}"),
        Some(t),
        "",
        None,
    )
    .await;
    assert_eq!((status, kind.as_str()), (404, "application/json"));
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["error"]["code"],
        "not_found"
    );

    // Every documented operation is routed (none meets the router's fallback), and the served
    // document is the generated one.
    let (status, _, served) = call(api, "GET", "/api/v1/openapi.json", None, "", None).await;
    assert_eq!(status, 200);
    let served: Value = serde_json::from_str(&served).unwrap();
    assert_eq!(
        served,
        serde_json::from_str::<Value>(&hookrelay::http::v1::openapi_json()).unwrap()
    );
    for (path, operations) in served["paths"].as_object().unwrap() {
        for method in operations.as_object().unwrap().keys() {
            let path = path
                .replace("{id}", "wh-none")
                .replace("{name}", "none")
                .replace("{delivery_id}", "msg_none");
            let (status, _, text) = call(
                api,
                &method.to_uppercase(),
                &format!("{path}{q}"),
                Some(t),
                "application/json",
                Some("{}"),
            )
            .await;
            assert!(
                status != 405 && !text.contains("no such endpoint"),
                "{method} {path} is documented but not routed: {status} {text}"
            );
        }
    }

    // Delete, and it is gone.
    let (status, _, _) = call(
        api,
        "DELETE",
        &format!("/api/v1/webhooks/{id}{q}"),
        Some(t),
        "",
        None,
    )
    .await;
    assert_eq!(status, 204);
    problem(
        api,
        "GET",
        &format!("/api/v1/webhooks/{id}{q}"),
        Some(t),
        None,
        (404, "not_found"),
    )
    .await;
    op.stop().await;
}
