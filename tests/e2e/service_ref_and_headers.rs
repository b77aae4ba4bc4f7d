//! Endpoint features: `spec.serviceRef` (a Service of the Webhook's namespace, its
//! exact ClusterIP allowed through the egress policy) and `spec.headers` / `spec.headersFrom`.
//!
//! There is no kube-proxy here: the operator runs with the `--test-address-map` test seam
//! mapping the test control plane's ClusterIP range (10.0.0.0/24) onto 127.0.0.1, applied after
//! the egress decision; each Service's port is the loopback receiver's port. Deliveries to
//! receiver Pods through real Services, over http and https, are the cluster tests'
//! (tests/cluster/service_ref.rs); here are the Webhook's states and refusals.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use hookrelay::{crd::Webhook, http::IngestMode, wire::Signer};
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

use crate::support::{
    ControlPlane, INGEST_MODES, ModeOperator, Receiver, ReceiverKind, control_plane, eventually,
    wait_ready_reason,
};

const STANDARD_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const WAIT: Duration = Duration::from_secs(60);

/// An operator in `mode` for `ns` that reaches Services through the test seam, and nothing
/// private otherwise: no `--egress-allow-cidr`, so a ClusterIP gets through only as a `serviceRef`.
async fn operator(cp: &ControlPlane, mode: IngestMode, ns: &str) -> ModeOperator {
    ModeOperator::start(cp, mode, &[ns], |args| {
        args.allow_cidrs = Vec::new();
        args.test_address_map =
            vec![("10.0.0.0/24".parse().unwrap(), "127.0.0.1".parse().unwrap())];
    })
    .await
}

/// A Service `name` with `spec`, labelled as a receiver of deliveries; returns its ClusterIP.
async fn create_service(client: &Client, ns: &str, name: &str, spec: Value) -> String {
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let s: Service = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"hookrelay.dev/webhook-receiver": "true"}},
        "spec": spec,
    }))
    .unwrap();
    let created = services.create(&PostParams::default(), &s).await.unwrap();
    created.spec.and_then(|s| s.cluster_ip).unwrap_or_default()
}

fn cluster_ip_service(port: u16) -> Value {
    json!({"ports": [{"name": "http", "port": port, "targetPort": port}]})
}

/// A signing Secret `<name>-secret` and a Webhook `name` with `spec` added (not waited for).
async fn create_webhook_with(client: &Client, ns: &str, name: &str, spec: Value) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let s: Secret = serde_json::from_value(json!({
        "metadata": {"name": format!("{name}-secret"), "labels": {"hookrelay.dev/signing-secret": "true"}},
        "stringData": {"secret": STANDARD_SECRET}
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &s).await.unwrap();
    let mut full = json!({"events": ["*"], "secretRef": {"name": format!("{name}-secret")}});
    full.as_object_mut()
        .unwrap()
        .extend(spec.as_object().unwrap().clone());
    let webhooks: Api<Webhook> = Api::namespaced(client.clone(), ns);
    let w: Webhook = serde_json::from_value(json!({
        "apiVersion": "hookrelay.dev/v1alpha1", "kind": "Webhook", "metadata": {"name": name},
        "spec": full
    }))
    .unwrap();
    webhooks.create(&PostParams::default(), &w).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_refs_wait_for_their_service_and_refuse_what_would_bypass_the_egress_policy() {
    let cp = control_plane();
    let client = cp.client().await;
    for mode in [IngestMode::Direct, IngestMode::Durable] {
        let ns = cp.namespace("svc-refs").await;
        let receiver = Receiver::start(ReceiverKind::Python, STANDARD_SECRET, &[]).await;
        let port = receiver.addr.port();
        let op = operator(cp, mode, &ns).await;

        // Missing, then created: Ready by itself, and it delivers.
        create_webhook_with(
            &client,
            &ns,
            "late",
            json!({"serviceRef": {"name": "late-svc", "port": port}}),
        )
        .await;
        let message = wait_ready_reason(&client, &ns, "late", "False", "ServiceNotFound").await;
        assert!(
            message.contains(&format!("Service {ns}/late-svc labelled")),
            "{message}"
        );
        // Created without the receiver label: as good as absent, its ports unrevealed.
        let services: Api<Service> = Api::namespaced(client.clone(), &ns);
        let unlabelled: Service = serde_json::from_value(json!({
            "metadata": {"name": "late-svc"}, "spec": cluster_ip_service(port),
        }))
        .unwrap();
        services
            .create(&PostParams::default(), &unlabelled)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let message = wait_ready_reason(&client, &ns, "late", "False", "ServiceNotFound").await;
        assert!(message.contains("webhook-receiver=true"), "{message}");
        // The Service opts in: Ready by itself.
        let labelled = services
            .patch(
                "late-svc",
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(
                    json!({"metadata": {"labels": {"hookrelay.dev/webhook-receiver": "true"}}}),
                ),
            )
            .await
            .unwrap();
        let cluster_ip = labelled.spec.and_then(|s| s.cluster_ip).unwrap_or_default();
        wait_ready_reason(&client, &ns, "late", "True", "Routed").await;
        op.post_event(&ns, "document.completed", json!({"document_id": 1}))
            .await;
        let got = receiver.wait_ok(1).await;
        assert!(
            got[0].hex_ok && got[0].path == "/",
            "{mode:?}: {:?}",
            got[0]
        );

        // The same ClusterIP as a url is refused: only a serviceRef names it exactly.
        create_webhook_with(
            &client,
            &ns,
            "by-address",
            json!({"url": format!("http://{cluster_ip}:{port}/h")}),
        )
        .await;
        let message =
            wait_ready_reason(&client, &ns, "by-address", "False", "EgressNotAllowed").await;
        assert!(
            message.contains(&format!("{cluster_ip} is a private address")),
            "{message}"
        );

        // A port the Service does not have.
        create_webhook_with(
            &client,
            &ns,
            "wrong-port",
            json!({"serviceRef": {"name": "late-svc", "port": "https"}}),
        )
        .await;
        let message =
            wait_ready_reason(&client, &ns, "wrong-port", "False", "ServicePortNotFound").await;
        assert!(
            !message.contains(&format!("{port} (http)")),
            "the Service's ports are not revealed: {message}"
        );

        // ExternalName and headless Services are refused, naming why.
        create_service(
            &client,
            &ns,
            "external",
            json!({"type": "ExternalName", "externalName": "metadata.google.internal"}),
        )
        .await;
        create_service(
            &client,
            &ns,
            "headless",
            json!({"clusterIP": "None", "ports": [{"name": "http", "port": port}]}),
        )
        .await;
        for (name, service, why) in [
            ("to-external", "external", "ExternalName"),
            ("to-headless", "headless", "headless"),
        ] {
            create_webhook_with(
                &client,
                &ns,
                name,
                json!({"serviceRef": {"name": service, "port": "http"}}),
            )
            .await;
            let message = wait_ready_reason(&client, &ns, name, "False", "ServiceNotAllowed").await;
            assert!(message.contains(why), "{message}");
        }

        // Only "late" was ever delivered to: one event, one request.
        op.post_event(&ns, "document.completed", json!({"document_id": 2}))
            .await;
        let got = receiver.wait_ok(2).await;
        assert_eq!(got.len(), 2, "{mode:?}: {got:?}");
        op.op.stop().await;
    }
}

#[tokio::test]
async fn bad_service_refs_and_headers_are_refused_by_the_api_server() {
    let cp = control_plane();
    let ns = cp.namespace("endpoint-refused").await;
    let webhook = |spec: &str| {
        format!(
            "apiVersion: hookrelay.dev/v1alpha1\nkind: Webhook\nmetadata: {{name: bad}}\nspec:\n  events: [document.completed]\n  secretRef: {{name: s}}\n{spec}"
        )
    };
    // Sanity: both endpoint forms are valid alone.
    for spec in [
        "  serviceRef: {name: receiver, port: http}\n  headers: {Authorization: Bearer x, X-Env: prod}\n",
        "  url: https://example.com/h\n  headersFrom: {secretRef: {name: hdrs}}\n",
    ] {
        cp.kubectl_ok(
            &["apply", "--dry-run=server", "-n", &ns, "-f", "-"],
            Some(&webhook(spec)),
        )
        .await;
    }
    let example = crate::support::repo_root().join("examples/webhook-service-ref.yaml");
    cp.kubectl_ok(
        &[
            "apply",
            "--dry-run=server",
            "-n",
            &ns,
            "-f",
            example.to_str().unwrap(),
        ],
        None,
    )
    .await;
    let cases: Vec<(&str, String, &[&str])> = vec![
        (
            "url and serviceRef",
            webhook("  url: https://example.com/h\n  serviceRef: {name: receiver, port: 80}\n"),
            &["set exactly one of url", "serviceRef"],
        ),
        (
            "neither url nor serviceRef",
            webhook(""),
            &["set exactly one of url"],
        ),
        (
            "port out of range",
            webhook("  serviceRef: {name: receiver, port: 70000}\n"),
            &["spec.serviceRef.port", "port number (1-65535) or the name"],
        ),
        (
            "bad port name",
            webhook("  serviceRef: {name: receiver, port: HTTP_PORT}\n"),
            &["spec.serviceRef.port", "port number (1-65535) or the name"],
        ),
        (
            "bad service name",
            webhook("  serviceRef: {name: Receiver.x, port: 80}\n"),
            &["spec.serviceRef.name", "must be a Service name"],
        ),
        (
            "relative path",
            webhook("  serviceRef: {name: receiver, port: 80, path: hooks}\n"),
            &["spec.serviceRef.path", "must start with /"],
        ),
        (
            "caBundle without PEM",
            webhook("  serviceRef: {name: receiver, port: 443, caBundle: hello}\n"),
            &["spec.serviceRef.caBundle", "PEM certificates"],
        ),
        (
            "signature header overridden",
            webhook("  url: https://example.com/h\n  headers: {X-Webhook-Signature: forged}\n"),
            &["spec.headers", "header X-Webhook-Signature cannot be set"],
        ),
        (
            "hop-by-hop header",
            webhook("  url: https://example.com/h\n  headers: {Transfer-Encoding: chunked}\n"),
            &["spec.headers", "header Transfer-Encoding cannot be set"],
        ),
        (
            "header name with a space",
            webhook("  url: https://example.com/h\n  headers: {\"X Env\": prod}\n"),
            &["spec.headers", "header names are HTTP tokens", "X Env"],
        ),
        (
            "header value with a line break",
            webhook("  url: https://example.com/h\n  headers: {X-Env: \"a\\r\\nHost: evil\"}\n"),
            &[
                "spec.headers",
                "the value of header X-Env must be printable ASCII on one line",
            ],
        ),
    ];
    let mut failures = Vec::new();
    for (name, manifest, expected) in &cases {
        let out = cp
            .kubectl(&["apply", "-n", &ns, "-f", "-"], Some(manifest))
            .await;
        if out.success {
            failures.push(format!("{name}: accepted\n{manifest}"));
            continue;
        }
        for needle in *expected {
            if !out.stderr.contains(needle) {
                failures.push(format!(
                    "{name}: message lacks {needle:?}: {}",
                    out.stderr.trim()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let left = cp
        .kubectl_ok(&["get", "webhooks", "-n", &ns, "-o", "name"], None)
        .await;
    assert_eq!(left.trim(), "", "refused manifests left objects behind");
}

/// One request as a header-recording receiver saw it.
#[derive(Clone, Debug)]
struct Request {
    headers: axum::http::HeaderMap,
    signature_ok: bool,
}

/// An in-process receiver that records every request's headers and checks its hex signature.
async fn recording_receiver(
    secret: &'static str,
) -> (Arc<Mutex<Vec<Request>>>, std::net::SocketAddr) {
    let seen: Arc<Mutex<Vec<Request>>> = Arc::default();
    let signer = Arc::new(Signer::new(secret.as_bytes(), None).unwrap());
    let record = seen.clone();
    let app = axum::Router::new().fallback(axum::routing::post(
        move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let (record, signer) = (record.clone(), signer.clone());
            async move {
                let text = |n: &str| {
                    headers
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned()
                };
                let ts: i64 = text("webhook-timestamp").parse().unwrap_or_default();
                let expected = signer.sign(&text("x-webhook-delivery"), ts, &body);
                let signature_ok = expected.hex == text("x-webhook-signature");
                record.lock().unwrap().push(Request {
                    headers,
                    signature_ok,
                });
                "ok"
            }
        },
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (seen, addr)
}

fn header(r: &Request, name: &str) -> Option<String> {
    r.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_and_secret_headers_reach_the_receiver_and_follow_the_secret() {
    let cp = control_plane();
    let client = cp.client().await;
    for mode in INGEST_MODES {
        let ns = cp.namespace("headers").await;
        let (seen, addr) = recording_receiver(STANDARD_SECRET).await;
        let op = ModeOperator::start(cp, mode, &[&ns], |_| {}).await;
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
        let hdrs: Secret = serde_json::from_value(json!({
            "metadata": {"name": "hdrs", "labels": {"hookrelay.dev/webhook-headers": "true"}},
            "stringData": {"Authorization": "Bearer first-token", "X-Tenant": "from-secret"}
        }))
        .unwrap();
        secrets.create(&PostParams::default(), &hdrs).await.unwrap();
        create_webhook_with(
            &client,
            &ns,
            "with-headers",
            json!({
                "url": format!("http://{addr}/h"),
                "headers": {"X-Env": "prod", "X-Tenant": "static"},
                "headersFrom": {"secretRef": {"name": "hdrs"}}
            }),
        )
        .await;
        wait_ready_reason(&client, &ns, "with-headers", "True", "Routed").await;
        op.post_event(&ns, "document.completed", json!({"document_id": 1}))
            .await;
        let first = eventually("a delivery with headers", WAIT, || async {
            seen.lock().unwrap().first().cloned()
        })
        .await;
        assert!(first.signature_ok, "{mode:?}: {first:?}");
        assert_eq!(header(&first, "x-env").as_deref(), Some("prod"));
        assert_eq!(
            header(&first, "authorization").as_deref(),
            Some("Bearer first-token")
        );
        // The Secret's value wins over the static one of the same name.
        assert_eq!(header(&first, "x-tenant").as_deref(), Some("from-secret"));

        // A rotated value is sent from then on, without touching the Webhook.
        let rotate = json!({"stringData": {"Authorization": "Bearer second-token"}});
        secrets
            .patch("hdrs", &PatchParams::default(), &Patch::Merge(&rotate))
            .await
            .unwrap();
        let mut n = 1;
        eventually("the rotated header value", WAIT, || {
            n += 1;
            let (seen, op, ns) = (seen.clone(), &op, ns.clone());
            async move {
                op.post_event(&ns, "document.completed", json!({"document_id": n}))
                    .await;
                tokio::task::yield_now().await;
                let seen = seen.lock().unwrap();
                seen.iter()
                    .any(|r| header(r, "authorization").as_deref() == Some("Bearer second-token"))
                    .then_some(())
            }
        })
        .await;

        // Overriding the signature from the Secret: not Ready, naming the header, not its value.
        let forge = json!({"stringData": {"X-Webhook-Signature": "forged-signature-value"}});
        secrets
            .patch("hdrs", &PatchParams::default(), &Patch::Merge(&forge))
            .await
            .unwrap();
        let message =
            wait_ready_reason(&client, &ns, "with-headers", "False", "HeadersInvalid").await;
        assert!(
            message.contains("X-Webhook-Signature") && message.contains("cannot be set"),
            "{message}"
        );
        let webhook = cp
            .kubectl_ok(
                &["get", "webhook", "with-headers", "-n", &ns, "-o", "json"],
                None,
            )
            .await;
        let events = cp
            .kubectl_ok(
                &["get", "events.events.k8s.io", "-n", &ns, "-o", "json"],
                None,
            )
            .await;
        for secret_value in ["forged-signature-value", "second-token", "first-token"] {
            assert!(!webhook.contains(secret_value), "{webhook}");
            assert!(!events.contains(secret_value), "{events}");
        }
        assert!(
            seen.lock().unwrap().iter().all(|r| r.signature_ok),
            "{mode:?}: every request signed by hookrelay"
        );

        // A Secret without the headers label gives no headers, whatever it holds.
        let plain: Secret = serde_json::from_value(json!({
            "metadata": {"name": "plain", "labels": {"hookrelay.dev/signing-secret": "true"}},
            "stringData": {"Authorization": "Bearer not-for-headers"}
        }))
        .unwrap();
        secrets
            .create(&PostParams::default(), &plain)
            .await
            .unwrap();
        create_webhook_with(
            &client,
            &ns,
            "unlabelled",
            json!({"url": format!("http://{addr}/h"), "headersFrom": {"secretRef": {"name": "plain"}}}),
        )
        .await;
        let message =
            wait_ready_reason(&client, &ns, "unlabelled", "False", "SecretNotFound").await;
        assert!(
            message.contains("hookrelay.dev/webhook-headers=true"),
            "{message}"
        );
        op.op.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_api_takes_and_returns_service_ref_and_headers() {
    let cp = control_plane();
    let client = cp.client().await;
    let ns = cp.namespace("svc-api").await;
    let receiver = Receiver::start(ReceiverKind::Python, "unused-secret-0123456789", &[]).await;
    let port = receiver.addr.port();
    create_service(&client, &ns, "receiver", cluster_ip_service(port)).await;
    let op = operator(cp, IngestMode::Durable, &ns).await;
    let api = op.op.op.listen_addr;
    let body = json!({
        "service_ref": {"name": "receiver", "port": "http", "path": "/from-api"},
        "headers": {"X-Env": "prod"},
        "events": ["document.completed"]
    })
    .to_string();
    let path = format!("/api/webhooks?namespace={ns}");
    let (status, created) = crate::support::api_call(api, "POST", &path, None, Some(&body)).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["url"], Value::Null, "{created}");
    assert_eq!(
        created["service_ref"],
        json!({"name": "receiver", "port": "http", "path": "/from-api", "ca_bundle": null})
    );
    assert_eq!(created["headers"], json!({"X-Env": "prod"}));
    let id = created["id"].as_str().unwrap().to_owned();
    wait_ready_reason(&client, &ns, &id, "True", "Routed").await;

    // Both endpoints at once: the API server's message.
    let both = json!({"url": "https://example.com/h", "service_ref": {"name": "receiver", "port": 80}, "events": ["*"]});
    let (status, refused) =
        crate::support::api_call(api, "POST", &path, None, Some(&both.to_string())).await;
    assert_eq!(status, 422, "{refused}");
    let message = refused["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("set exactly one of url"), "{refused}");

    // Back to a url: the serviceRef goes.
    let put = json!({"url": format!("http://127.0.0.1:{port}/h")}).to_string();
    let one = format!("/api/webhooks/{id}?namespace={ns}");
    let (status, updated) = crate::support::api_call(api, "PUT", &one, None, Some(&put)).await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["url"], json!(format!("http://127.0.0.1:{port}/h")));
    assert!(updated.get("service_ref").is_none(), "{updated}");
    // This operator allows no private range: the loopback url is refused.
    wait_ready_reason(&client, &ns, &id, "False", "EgressNotAllowed").await;
    op.op.stop().await;
}
