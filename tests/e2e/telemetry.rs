//! OpenTelemetry: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, the operator exports spans of
//! ingest -> route -> attempt over OTLP/HTTP, linked to the `traceparent` it was given (or
//! continuing it, with `--trust-client-traces`), and sends each attempt's own `traceparent` to
//! the receiver; in every ingest mode.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, any_value},
};
use prost::Message;
use serde_json::json;

use crate::support::{NatsServer, OperatorArgs, control_plane, create_webhook, eventually};

const WAIT: Duration = Duration::from_secs(60);

/// A span as the collector received it.
#[derive(Clone, Debug)]
struct ExportedSpan {
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: HashMap<String, String>,
    /// (trace id, span id) of each span it links to.
    links: Vec<(String, String)>,
}

fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    }
}

/// A small OTLP/HTTP collector on loopback: `POST /v1/traces` with protobuf bodies.
async fn collector() -> (Arc<Mutex<Vec<ExportedSpan>>>, std::net::SocketAddr) {
    let spans: Arc<Mutex<Vec<ExportedSpan>>> = Arc::default();
    let kept = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let kept = kept.clone();
            async move {
                let request = ExportTraceServiceRequest::decode(body).expect("an OTLP request");
                let mut kept = kept.lock().unwrap();
                for scope in request.resource_spans.iter().flat_map(|r| &r.scope_spans) {
                    for span in &scope.spans {
                        kept.push(ExportedSpan {
                            name: span.name.clone(),
                            trace_id: hex::encode(&span.trace_id),
                            span_id: hex::encode(&span.span_id),
                            parent_span_id: hex::encode(&span.parent_span_id),
                            attributes: span
                                .attributes
                                .iter()
                                .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
                                .collect(),
                            links: span
                                .links
                                .iter()
                                .map(|l| (hex::encode(&l.trace_id), hex::encode(&l.span_id)))
                                .collect(),
                        });
                    }
                }
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (spans, addr)
}

/// A webhook receiver keeping the `traceparent` and delivery id of every request.
async fn receiver() -> (Arc<Mutex<Vec<(String, String)>>>, std::net::SocketAddr) {
    let got: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let kept = got.clone();
    let app = axum::Router::new().fallback(axum::routing::post(
        move |headers: axum::http::HeaderMap| {
            let kept = kept.clone();
            async move {
                let header = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned()
                };
                kept.lock()
                    .unwrap()
                    .push((header("traceparent"), header("x-webhook-delivery")));
                "ok"
            }
        },
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (got, addr)
}

/// An operator in `mode` exporting its spans to a collector of its own (every 100 ms rather
/// than every 5 s), with `extra` flags, and a Ready Webhook `traced` to a receiver: the operator,
/// the spans collected and what the receiver got.
async fn traced_operator(
    cp: &crate::support::ControlPlane,
    ns: &str,
    mode: &str,
    nats: Option<&NatsServer>,
    extra: &[&str],
) -> (
    crate::support::Operator,
    Arc<Mutex<Vec<ExportedSpan>>>,
    Arc<Mutex<Vec<(String, String)>>>,
) {
    let (spans, collector) = collector().await;
    let mut args = OperatorArgs::new(ns)
        .mode(mode)
        .args(extra)
        .env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            &format!("http://{collector}"),
        )
        .env("OTEL_BSP_SCHEDULE_DELAY", "100");
    if let Some(nats) = nats {
        args = args.nats(&nats.url);
    }
    let op = args.start(cp);
    op.wait_ready().await;
    let (got, addr) = receiver().await;
    create_webhook(
        &cp.client().await,
        ns,
        "traced",
        &format!("http://{addr}/h"),
        "otel-signing-secret-0123",
        json!({}),
    )
    .await;
    (op, spans, got)
}

/// Posts one event to `ns` with the `traceparent` of a client span `client_span` in trace
/// `trace_id`; it must be accepted.
async fn post_traced(op: &crate::support::Operator, ns: &str, trace_id: &str, client_span: &str) {
    let response = reqwest::Client::new()
        .post(format!(
            "http://{}/api/events?namespace={ns}",
            op.listen_addr
        ))
        .header("traceparent", format!("00-{trace_id}-{client_span}-01"))
        .header("content-type", "application/json")
        .body(json!({"event": "document.completed", "data": {"document_id": 1}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traceparent_at_ingest_is_continued_through_every_span_to_the_receiver() {
    let cp = control_plane();
    for mode in ["durable", "direct", "jetstream"] {
        let ns = cp.namespace("otel").await;
        let nats = if mode == "jetstream" {
            Some(NatsServer::start().await)
        } else {
            None
        };
        let (op, spans, got) =
            traced_operator(cp, &ns, mode, nats.as_ref(), &["--trust-client-traces"]).await;
        let trace_id = hex::encode(rand::random::<[u8; 16]>());
        let client_span = hex::encode(rand::random::<[u8; 8]>());
        post_traced(&op, &ns, &trace_id, &client_span).await;

        // The receiver got the attempt span's traceparent, in the caller's trace.
        let (sent, delivery_id) = eventually(&format!("{mode}: a delivery"), WAIT, || async {
            got.lock().unwrap().first().cloned()
        })
        .await;
        let parts: Vec<&str> = sent.split('-').collect();
        assert_eq!(parts.len(), 4, "{mode}: traceparent {sent:?}");
        assert_eq!(parts[1], trace_id, "{mode}: the receiver's traceparent");
        let attempt_span_id = parts[2].to_owned();

        let find = |name: &'static str| {
            let (spans, trace_id) = (spans.clone(), trace_id.clone());
            async move {
                spans
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|s| s.name == name && s.trace_id == trace_id)
                    .cloned()
            }
        };
        let attempt = eventually(&format!("{mode}: the attempt span"), WAIT, || {
            find("attempt")
        })
        .await;
        let route = eventually(&format!("{mode}: the route span"), WAIT, || find("route")).await;
        let ingest = eventually(&format!("{mode}: the ingest span"), WAIT, || find("ingest")).await;
        // ingest is the child of the caller's span, route of ingest, the attempt of route.
        assert_eq!(ingest.parent_span_id, client_span, "{mode}");
        assert_eq!(route.parent_span_id, ingest.span_id, "{mode}");
        assert_eq!(attempt.parent_span_id, route.span_id, "{mode}");
        assert_eq!(attempt.span_id, attempt_span_id, "{mode}");
        let attribute = |name: &str| attempt.attributes.get(name).cloned().unwrap_or_default();
        assert_eq!(attribute("hookrelay.delivery_id"), delivery_id, "{mode}");
        assert_eq!(
            attribute("hookrelay.webhook"),
            format!("{ns}/traced"),
            "{mode}"
        );
        assert_eq!(attribute("hookrelay.attempt"), "1", "{mode}");
        assert_eq!(attribute("http.response.status_code"), "200", "{mode}");
        drop(op);
    }
}

/// By default a client's `traceparent` is linked, not joined: the ingest span roots a trace of
/// its own (which the route and attempt spans and the receiver's `traceparent` follow) and links
/// to the client's span, so that no client places hookrelay's spans in a trace it chose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_traceparent_is_linked_not_joined_by_default() {
    let cp = control_plane();
    let ns = cp.namespace("otel-link").await;
    let (op, spans, got) = traced_operator(cp, &ns, "direct", None, &[]).await;
    let trace_id = hex::encode(rand::random::<[u8; 16]>());
    let client_span = hex::encode(rand::random::<[u8; 8]>());
    post_traced(&op, &ns, &trace_id, &client_span).await;
    let (sent, _) = eventually("a delivery", WAIT, || async {
        got.lock().unwrap().first().cloned()
    })
    .await;
    let ingest = eventually("the ingest span", WAIT, || async {
        spans
            .lock()
            .unwrap()
            .iter()
            .find(|s| s.name == "ingest" && s.links.iter().any(|(_, span)| *span == client_span))
            .cloned()
    })
    .await;
    assert_ne!(ingest.trace_id, trace_id, "the client's trace was joined");
    assert_eq!(ingest.parent_span_id, "", "the ingest span is a root");
    assert_eq!(ingest.links, [(trace_id.clone(), client_span)]);
    // The receiver's traceparent is in hookrelay's trace, not the client's.
    assert!(
        sent.contains(&ingest.trace_id) && !sent.contains(&trace_id),
        "{sent}"
    );
    drop(op);
}
