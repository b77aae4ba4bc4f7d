//! The REST endpoints the web page needs: the watched namespaces, a DocumentEvent by
//! name, and the extra fields of Webhooks and deliveries, against the real API server with
//! real tokens.

use std::time::Duration;

use serde_json::json;

use crate::support::{
    CountingReceiver, InProcess, api_call, control_plane, counting_webhook, create_event,
    create_webhook, eventually, free_port, grant, local_args, wait_phase,
};

/// A Webhook `to-app` with its receiver, and the DocumentEvent `name` (document.completed with
/// `document_id`) delivered to it.
async fn one_event_delivered(
    client: &kube::Client,
    ns: &str,
    name: &str,
    document_id: u64,
) -> CountingReceiver {
    let receiver =
        counting_webhook(client, ns, "to-app", "web-api-signing-secret-0123456789").await;
    create_event(
        client,
        ns,
        name,
        "document.completed",
        json!({"document_id": document_id}),
    )
    .await;
    wait_phase(client, ns, name, "Delivered").await;
    receiver
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_lists_the_watched_ones_each_caller_may_use() {
    let cp = control_plane();
    let ns = cp.namespace("web-ns").await;
    let other = cp.namespace("web-ns-other").await;
    let op = InProcess::start_with(cp.config().await, local_args(&[&ns, &other])).await;
    let addr = op.op.listen_addr;
    // The watched namespaces are the tenants: a ServiceAccount without any grant sees none of
    // them, one that may list Webhooks in one namespace sees that one.
    let nobody = cp.service_account_token(&ns, "nobody").await;
    let (status, body) = api_call(addr, "GET", "/api/namespaces", Some(&nobody), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"all_namespaces": false, "namespaces": []}));
    grant(
        &cp.client().await,
        &ns,
        (&ns, "lister"),
        &["webhooks"],
        &["list"],
    )
    .await;
    let lister = cp.service_account_token(&ns, "lister").await;
    let (status, body) = api_call(addr, "GET", "/api/namespaces", Some(&lister), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"all_namespaces": false, "namespaces": [ns]}));
    // Nor does a refusal name the others.
    let (status, body) = api_call(
        addr,
        "GET",
        "/api/webhooks?namespace=not-watched",
        Some(&lister),
        None,
    )
    .await;
    assert_eq!(status, 422, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        !message.contains(&other) && !message.contains(&ns),
        "{message}"
    );
    let (status, body) = api_call(addr, "GET", "/api/namespaces", None, None).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "unauthorized");
    op.stop().await;

    // Without --watch-namespace, every namespace is watched. This operator would deliver the events
    // of the tests running beside this one: it is kept a standby (another holder has the
    // Lease), which serves the API but neither delivers nor writes status.
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(cp.client().await, &ns);
    let lease = k8s_openapi::api::coordination::v1::Lease {
        metadata: kube::api::ObjectMeta {
            name: Some(hookrelay::leader::LEASE_NAME.into()),
            ..Default::default()
        },
        spec: Some(k8s_openapi::api::coordination::v1::LeaseSpec {
            holder_identity: Some("another-replica".into()),
            lease_duration_seconds: Some(3600),
            renew_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                k8s_openapi::jiff::Timestamp::now(),
            )),
            ..Default::default()
        }),
    };
    leases.create(&Default::default(), &lease).await.unwrap();
    // Every namespace.
    let mut all = local_args(&[]);
    all.leader_elect = true;
    all.lease_namespace = Some(ns.clone());
    let op = InProcess::start_with(cp.config().await, all).await;
    let (status, body) = api_call(
        op.op.listen_addr,
        "GET",
        "/api/namespaces",
        Some(&nobody),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"all_namespaces": true, "namespaces": []}));
    op.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_event_by_name_with_its_deliveries() {
    let cp = control_plane();
    let ns = cp.namespace("web-de").await;
    let client = cp.client().await;
    let op = InProcess::start(cp.config().await, &ns).await;
    let addr = op.op.listen_addr;
    let receiver = one_event_delivered(&client, &ns, "invoice-42", 42).await;
    assert_eq!(receiver.counts().0, 1);

    // May get Webhooks but not DocumentEvents: 403 naming the verb and resource.
    let viewer = cp.service_account_token(&ns, "webhooks-only").await;
    grant(
        &client,
        &ns,
        (&ns, "webhooks-only"),
        &["webhooks"],
        &["get", "list"],
    )
    .await;
    let path = format!("/api/documentevents/invoice-42?namespace={ns}");
    let (status, body) = api_call(addr, "GET", &path, Some(&viewer), None).await;
    assert_eq!(status, 403, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("may not get documentevents.hookrelay.dev in namespace"),
        "{message}"
    );
    let (status, _) = api_call(addr, "GET", &path, None, None).await;
    assert_eq!(status, 401);

    // get on documentevents is enough.
    let reader = cp.service_account_token(&ns, "events-reader").await;
    grant(
        &client,
        &ns,
        (&ns, "events-reader"),
        &["documentevents"],
        &["get"],
    )
    .await;
    let (status, body) = api_call(addr, "GET", &path, Some(&reader), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["name"], "invoice-42");
    assert_eq!(body["namespace"], ns.as_str());
    assert_eq!(body["event"], "document.completed");
    assert_eq!(body["timestamp"], "2023-06-15T10:35:00Z");
    assert_eq!(body["phase"], "Delivered");
    assert_eq!(body["data"], json!({"document_id": 42}));
    assert!(body["source"].is_string(), "{body}");
    let deliveries = body["deliveries"].as_array().unwrap();
    assert_eq!(deliveries.len(), 1, "{body}");
    let d = &deliveries[0];
    assert_eq!(d["webhook"], "to-app");
    assert!(
        d["delivery_id"].as_str().unwrap().starts_with("msg_"),
        "{d}"
    );
    assert_eq!(d["attempts"], 1);
    assert_eq!(d["outcome"], "Succeeded");
    assert_eq!(d["http_status"], 200);
    assert_eq!(d["error"], serde_json::Value::Null);
    assert!(d["at"].is_string(), "{d}");

    // Unknown, and names that are no object names: 404 not_found, never another API path.
    for name in ["no-such-event", "x%2Fstatus", "UPPER"] {
        let (status, body) = api_call(
            addr,
            "GET",
            &format!("/api/documentevents/{name}?namespace={ns}"),
            Some(&reader),
            None,
        )
        .await;
        assert_eq!(status, 404, "{name}: {body}");
        assert_eq!(body["error"]["code"], "not_found", "{name}");
    }
    // A namespace this operator does not watch: 422, as for Webhooks.
    let admin = cp.hookrelay_token(&ns, "admin").await;
    let (status, body) = api_call(
        addr,
        "GET",
        "/api/documentevents/invoice-42?namespace=default",
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(status, 422, "{body}");

    // An event from POST /api/events (durable) names its source.
    let (status, body) = api_call(
        addr,
        "POST",
        &format!("/api/events?namespace={ns}"),
        Some(&admin),
        Some(r#"{"event":"document.error","data":{"document_id":43}}"#),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let ingested = body["document_events"][0].as_str().unwrap().to_owned();
    let (status, body) = api_call(
        addr,
        "GET",
        &format!("/api/documentevents/{ingested}?namespace={ns}"),
        Some(&reader),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["source"], "hookrelay-ingest", "{body}");
    assert_eq!(body["event"], "document.error");
    wait_phase(&client, &ns, &ingested, "Delivered").await;

    // The Webhook's delivery rows link to the event; a test delivery has none to link.
    let (status, body) = api_call(
        addr,
        "POST",
        &format!("/api/webhooks/to-app/test?namespace={ns}"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let rows = eventually(
        "the three deliveries recorded",
        Duration::from_secs(30),
        || async {
            let (status, body) = api_call(
                addr,
                "GET",
                &format!("/api/webhooks/to-app/deliveries?namespace={ns}"),
                Some(&admin),
                None,
            )
            .await;
            assert_eq!(status, 200, "{body}");
            let rows = body["deliveries"].as_array().unwrap().clone();
            (rows.len() == 3).then_some(rows)
        },
    )
    .await;
    let of = |source: &str| {
        rows.iter()
            .find(|r| r["source"] == source)
            .unwrap_or_else(|| panic!("no {source} row in {rows:?}"))
    };
    assert_eq!(of("invoice-42")["document_event"], "invoice-42");
    assert_eq!(of("invoice-42")["id"], d["delivery_id"]);
    assert_eq!(of(&ingested)["document_event"], ingested.as_str());
    assert_eq!(of("test")["document_event"], serde_json::Value::Null);
    // A search finds it in the retained event, linked too.
    let (status, body) = api_call(
        addr,
        "GET",
        &format!("/api/webhooks/to-app/deliveries?namespace={ns}&document_id=42"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["deliveries"][0]["document_event"], "invoice-42",
        "{body}"
    );
    op.stop().await;
}

/// `GET /api/webhooks` items by id.
async fn webhooks_by_id(
    addr: std::net::SocketAddr,
    ns: &str,
    token: &str,
) -> std::collections::HashMap<String, serde_json::Value> {
    let (status, body) = api_call(
        addr,
        "GET",
        &format!("/api/webhooks?namespace={ns}"),
        Some(token),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["id"].as_str().unwrap().to_owned(), w.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_show_attempts_in_flight_last_delivery_success_rate_and_degraded() {
    let cp = control_plane();
    let ns = cp.namespace("web-wh").await;
    let client = cp.client().await;
    let op = InProcess::start(cp.config().await, &ns).await;
    let addr = op.op.listen_addr;
    let token = cp.hookrelay_token(&ns, "viewer").await;
    let secret = "web-api-signing-secret-0123456789";
    // Answers once opened; another that never answers (its attempts time out); a closed port.
    let (_held, held_addr, gate) = CountingReceiver::start_gated().await;
    let (_never, never_addr, _closed_gate) = CountingReceiver::start_gated().await;
    let refused_port = free_port();
    create_webhook(
        &client,
        &ns,
        "held",
        &format!("http://{held_addr}/h"),
        secret,
        json!({}),
    )
    .await;
    create_webhook(
        &client,
        &ns,
        "times-out",
        &format!("http://{never_addr}/h"),
        secret,
        json!({"timeoutSeconds": 1, "maxAttempts": 1}),
    )
    .await;
    create_webhook(
        &client,
        &ns,
        "refused",
        &format!("http://127.0.0.1:{refused_port}/h"),
        secret,
        json!({"maxAttempts": 5, "initialBackoffSeconds": 1, "maxBackoffSeconds": 1}),
    )
    .await;
    let before = webhooks_by_id(addr, &ns, &token).await;
    for id in ["held", "times-out", "refused"] {
        let w = &before[id];
        assert_eq!(w["in_flight"], 0, "{w}");
        assert_eq!(w["last_delivery_at"], serde_json::Value::Null, "{w}");
        assert_eq!(w["success_rate"], serde_json::Value::Null, "{w}");
        assert_eq!(w["degraded"], false, "{w}");
        assert_eq!(w["degraded_reason"], serde_json::Value::Null, "{w}");
    }

    create_event(
        &client,
        &ns,
        "ev-1",
        "document.completed",
        json!({"document_id": 1}),
    )
    .await;
    // Both held receivers have the attempt: in flight, in the list and in get.
    eventually("attempts in flight", Duration::from_secs(30), || async {
        let ws = webhooks_by_id(addr, &ns, &token).await;
        (ws["held"]["in_flight"] == 1 && ws["times-out"]["in_flight"] == 1).then_some(())
    })
    .await;
    let (status, one) = api_call(
        addr,
        "GET",
        &format!("/api/webhooks/held?namespace={ns}"),
        Some(&token),
        None,
    )
    .await;
    assert_eq!((status, &one["in_flight"]), (200, &json!(1)), "{one}");

    // Answered: back to 0, one success out of one.
    gate.open();
    let held = eventually("held delivered", Duration::from_secs(30), || async {
        let ws = webhooks_by_id(addr, &ns, &token).await;
        let w = ws["held"].clone();
        (w["in_flight"] == 0 && w["success_rate"] == 1.0).then_some(w)
    })
    .await;
    assert!(held["last_delivery_at"].is_string(), "{held}");
    assert_eq!(held["degraded"], false);

    // Timed out: back to 0 too, a failure.
    let timed_out = eventually("times-out failed", Duration::from_secs(30), || async {
        let ws = webhooks_by_id(addr, &ns, &token).await;
        let w = ws["times-out"].clone();
        (w["in_flight"] == 0 && w["success_rate"] == 0.0).then_some(w)
    })
    .await;
    assert!(timed_out["last_delivery_at"].is_string(), "{timed_out}");
    assert_eq!(
        timed_out["degraded"], false,
        "one failure is no degradation"
    );

    // Five refused attempts in a row: Degraded, with its reason.
    let refused = eventually("refused Degraded", Duration::from_secs(60), || async {
        let ws = webhooks_by_id(addr, &ns, &token).await;
        let w = ws["refused"].clone();
        (w["degraded"] == true).then_some(w)
    })
    .await;
    assert_eq!(
        refused["degraded_reason"], "ConsecutiveFailures",
        "{refused}"
    );
    assert!(
        refused["degraded_message"]
            .as_str()
            .unwrap()
            .contains("consecutive failed attempts"),
        "{refused}"
    );
    assert_eq!(refused["success_rate"], 0.0, "{refused}");
    assert_eq!(refused["in_flight"], 0, "{refused}");
    op.stop().await;
}

/// `method path` with `body` in namespace `ns` is refused to `token`: 403, naming `verb`.
async fn assert_refused(
    addr: std::net::SocketAddr,
    token: &str,
    ns: &str,
    (method, path, body): (&str, &str, Option<&str>),
    verb: &str,
) {
    let path = format!("{path}?namespace={ns}");
    let (status, reply) = api_call(addr, method, &path, Some(token), body).await;
    assert_eq!(status, 403, "{method} {path}: {reply}");
    let message = reply["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("may not {verb} webhooks.hookrelay.dev")),
        "{method} {path}: {reply}"
    );
}

/// Renders the chart's ClusterRole `<release>-<suffix>` from `template` (with `--set` values
/// `set`), applies it, binds it in `ns` to the ServiceAccount `sa` there the way the chart's
/// notes say, and returns that account's token and the role's name.
async fn chart_role_token(
    cp: &crate::support::ControlPlane,
    ns: &str,
    template: &str,
    set: &str,
    suffix: &str,
    sa: &str,
) -> (String, String) {
    // A release name containing "hookrelay" is the full name.
    let release = format!("hookrelay-{ns}");
    let chart = crate::support::repo_root().join("charts/hookrelay");
    let rendered = tokio::process::Command::new(cp.bin.join("helm"))
        .args(["template", &release])
        .arg(&chart)
        .args(["--set", set, "-s", template])
        .output()
        .await
        .expect("helm runs");
    assert!(
        rendered.status.success(),
        "{}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let role = format!("{release}-{suffix}");
    let rendered = String::from_utf8(rendered.stdout).unwrap();
    // The template may hold other roles too: only this one is applied.
    let document = rendered
        .split("\n---")
        .find(|d| d.contains(&format!("name: {role}\n")))
        .unwrap_or_else(|| panic!("{role} is not in {template}: {rendered}"));
    cp.kubectl_ok(&["apply", "-f", "-"], Some(document)).await;
    cp.kubectl_ok(
        &[
            "create",
            "rolebinding",
            &format!("{sa}-{suffix}"),
            "-n",
            ns,
            &format!("--clusterrole={role}"),
            &format!("--serviceaccount={ns}:{sa}"),
        ],
        None,
    )
    .await;
    (cp.service_account_token(ns, sa).await, role)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_viewer_role_reads_what_the_page_shows_and_changes_nothing() {
    let cp = control_plane();
    let ns = cp.namespace("web-viewer").await;
    let client = cp.client().await;
    let op = InProcess::start(cp.config().await, &ns).await;
    let addr = op.op.listen_addr;
    let (token, role) = chart_role_token(
        cp,
        &ns,
        "templates/viewer-role.yaml",
        "web.viewerRole.create=true",
        "viewer",
        "viewer",
    )
    .await;

    let _receiver = one_event_delivered(&client, &ns, "ev-1", 1).await;
    for path in [
        "/api/namespaces".to_owned(),
        format!("/api/webhooks?namespace={ns}"),
        format!("/api/webhooks/to-app?namespace={ns}"),
        format!("/api/webhooks/to-app/deliveries?namespace={ns}"),
        format!("/api/webhooks/to-app/deliveries?namespace={ns}&document_id=1"),
        format!("/api/documentevents/ev-1?namespace={ns}"),
    ] {
        let (status, body) = api_call(addr, "GET", &path, Some(&token), None).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    // The page's buttons need more than a viewer has: 403 naming what is missing.
    for (method, path, body, verb) in [
        (
            "PUT",
            "/api/webhooks/to-app",
            Some(r#"{"paused":true}"#),
            "pause",
        ),
        ("POST", "/api/webhooks/to-app/test", None, "test"),
        ("POST", "/api/webhooks/to-app/resume", None, "resume"),
        (
            "PUT",
            "/api/webhooks/to-app",
            Some(r#"{"url":"http://x"}"#),
            "update",
        ),
    ] {
        assert_refused(addr, &token, &ns, (method, path, body), verb).await;
    }
    cp.kubectl_ok(&["delete", "clusterrole", &role], None).await;
    op.stop().await;
}

/// The chart's support role: every action on deliveries (test, redeliver, recover, pause,
/// resume) but no change to what a Webhook is (403 on PUT of its URL, on delete, on a secret
/// rotation). What the REST API writes for a caller names them: the Webhook's
/// `hookrelay.dev/changed-by` annotation and the field manager `hookrelay-api:<user>`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_support_role_presses_every_button_but_cannot_repoint_a_webhook() {
    let cp = control_plane();
    let ns = cp.namespace("web-support").await;
    let client = cp.client().await;
    let op = InProcess::start(cp.config().await, &ns).await;
    let addr = op.op.listen_addr;
    let (token, role) = chart_role_token(
        cp,
        &ns,
        "templates/user-roles.yaml",
        "rbac.supportRole.create=true",
        "support",
        "support",
    )
    .await;
    let _receiver = one_event_delivered(&client, &ns, "ev-1", 1).await;
    let q = format!("?namespace={ns}");
    let call = async |method: &str, path: &str, body: Option<&str>| {
        api_call(addr, method, &format!("{path}{q}"), Some(&token), body).await
    };
    let (_, deliveries) = call("GET", "/api/webhooks/to-app/deliveries", None).await;
    let delivery = deliveries["deliveries"][0]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("a delivery: {deliveries}"))
        .to_owned();

    for (method, path, body) in [
        ("POST", "/api/webhooks/to-app/test".to_owned(), None),
        (
            "POST",
            format!("/api/webhooks/to-app/deliveries/{delivery}/redeliver"),
            None,
        ),
        ("POST", "/api/webhooks/to-app/recover".to_owned(), None),
        (
            "PUT",
            "/api/webhooks/to-app".to_owned(),
            Some(r#"{"paused":true}"#),
        ),
        (
            "PUT",
            "/api/webhooks/to-app".to_owned(),
            Some(r#"{"paused":false}"#),
        ),
        ("POST", "/api/webhooks/to-app/resume".to_owned(), None),
    ] {
        let path = if path.ends_with("/recover") {
            format!("{path}?since=2020-01-01T00:00:00Z&namespace={ns}")
        } else {
            format!("{path}{q}")
        };
        let (status, reply) = api_call(addr, method, &path, Some(&token), body).await;
        assert_eq!(status, 200, "{method} {path}: {reply}");
    }
    for (method, path, body, verb) in [
        (
            "PUT",
            "/api/webhooks/to-app",
            Some(r#"{"url":"http://127.0.0.1:9/elsewhere"}"#),
            "update",
        ),
        (
            "PUT",
            "/api/webhooks/to-app",
            Some(r#"{"paused":true,"url":"http://127.0.0.1:9/x"}"#),
            "update",
        ),
        ("DELETE", "/api/webhooks/to-app", None, "delete"),
        ("POST", "/api/webhooks/to-app/rotate-secret", None, "rotate"),
    ] {
        assert_refused(addr, &token, &ns, (method, path, body), verb).await;
    }
    // The pause and unpause were made as the operator, for the support account.
    let user = format!("system:serviceaccount:{ns}:support");
    let webhook = kube::Api::<hookrelay::crd::Webhook>::namespaced(client.clone(), &ns)
        .get("to-app")
        .await
        .unwrap();
    assert_eq!(
        webhook
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("hookrelay.dev/changed-by")),
        Some(&user)
    );
    let managers: Vec<String> = webhook
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert!(
        managers.contains(&format!("hookrelay-api:{user}")),
        "{managers:?}"
    );
    cp.kubectl_ok(&["delete", "clusterrole", &role], None).await;
    op.stop().await;
}
