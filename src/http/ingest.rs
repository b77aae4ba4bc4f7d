//! `POST /api/events`: document events from services that do not speak the Kubernetes API.
//!
//! Durable (default): each event is stored as a DocumentEvent before the 202, so accepted means
//! delivered (at least once). Direct: dispatched from memory for the lowest latency, bounded by a
//! queue that answers 429 when full; at-most-once across an operator restart.

use std::sync::Arc;

use axum::{
    Json,
    body::Bytes,
    extract::{Query, State},
    http::{HeaderMap, StatusCode},
};
use futures::StreamExt;
use kube::{Api, api::PostParams};
use serde_json::{Map, Value, json};

use super::{ApiState, NamespaceQuery, error::ApiError, namespace_for};
use crate::{
    crd::{DocumentEvent, DocumentEventSpec, EventType},
    delivery::EventBody,
};

/// How long a direct delivery may wait for a paused or blocked Webhook (it holds queue room).
const DIRECT_MAX_HOLD: std::time::Duration = std::time::Duration::from_secs(60);

/// Events accepted in one request.
pub const MAX_EVENTS_PER_REQUEST: usize = 1000;

/// One event of a request, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct IngestEvent {
    pub event: EventType,
    pub timestamp: Option<String>,
    pub data: Map<String, Value>,
}

/// How accepted events are handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum IngestMode {
    /// Stored as DocumentEvents before the reply: at-least-once.
    Durable,
    /// Dispatched from memory: lowest latency, at-most-once across a restart.
    Direct,
}

/// Parses a request body: one seed-shaped event or an array of them. Pure, so every refusal is
/// a unit test; nothing is created unless every event is valid.
pub fn parse_events(body: &[u8]) -> Result<Vec<IngestEvent>, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    let (items, array) = match value {
        Value::Array(items) => (items, true),
        Value::Object(_) => (vec![value], false),
        _ => {
            return Err(ApiError::invalid(
                "expected an event object or an array of event objects",
            ));
        }
    };
    if items.is_empty() {
        return Err(ApiError::invalid("the array holds no events"));
    }
    if items.len() > MAX_EVENTS_PER_REQUEST {
        return Err(ApiError::invalid(format!(
            "at most {MAX_EVENTS_PER_REQUEST} events per request, got {}",
            items.len()
        )));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let at = if array { format!("events[{i}].") } else { String::new() };
            let Value::Object(mut obj) = item else {
                return Err(ApiError::invalid(format!("events[{i}] must be an object")));
            };
            let event = match obj.remove("event") {
                Some(Value::String(s)) => s.parse::<EventType>().map_err(|e| ApiError::invalid(format!("{at}event: {e}")))?,
                Some(_) => return Err(ApiError::invalid(format!("{at}event must be a string"))),
                None => return Err(ApiError::invalid(format!("{at}event is required"))),
            };
            let timestamp = match obj.remove("timestamp") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) if is_rfc3339(&s) => Some(s),
                Some(other) => {
                    return Err(ApiError::invalid(format!("{at}timestamp must be an RFC 3339 time such as 2023-06-15T10:35:00Z, got {other}")));
                }
            };
            let data = match obj.remove("data") {
                Some(Value::Object(data)) => data,
                Some(_) => return Err(ApiError::invalid(format!("{at}data must be a JSON object"))),
                None => return Err(ApiError::invalid(format!("{at}data is required"))),
            };
            Ok(IngestEvent { event, timestamp, data })
        })
        .collect()
}

/// RFC 3339 as the CRD's `date-time` takes it: at most 64 characters, a `T`, an offset, no
/// RFC 9557 annotations.
fn is_rfc3339(s: &str) -> bool {
    s.len() <= 64
        && !s.contains('[')
        && s.as_bytes()
            .get(10)
            .is_some_and(|b| b.eq_ignore_ascii_case(&b'T'))
        && s.parse::<k8s_openapi::jiff::Timestamp>().is_ok()
}

pub async fn ingest(
    State(state): State<Arc<ApiState>>,
    Query(query): Query<NamespaceQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let caller = state.auth.authenticate(&headers).await?;
    let namespace = namespace_for(&query, &caller)?;
    state
        .auth
        .authorize(&caller, "create", "documentevents", &namespace)
        .await?;
    let events = parse_events(&body)?;
    match state.ingest_mode {
        IngestMode::Durable => durable(&state, &namespace, events).await,
        IngestMode::Direct => direct(&state, &namespace, events),
    }
}

async fn durable(
    state: &ApiState,
    namespace: &str,
    events: Vec<IngestEvent>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let api: Api<DocumentEvent> = Api::namespaced(state.client.clone(), namespace);
    let results: Vec<Result<String, kube::Error>> = futures::stream::iter(events)
        .map(|e| {
            let api = api.clone();
            async move {
                let mut de = DocumentEvent::new(
                    "",
                    DocumentEventSpec {
                        type_: e.event,
                        timestamp: e.timestamp,
                        data: e.data,
                    },
                );
                de.metadata.name = None;
                de.metadata.generate_name =
                    Some(format!("{}-", e.event.as_str().replace('.', "-")));
                api.create(&PostParams::default(), &de)
                    .await
                    .map(|de| de.metadata.name.unwrap_or_default())
            }
        })
        .buffered(16)
        .collect()
        .await;
    let (created, failed): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
    let created: Vec<String> = created.into_iter().filter_map(Result::ok).collect();
    if let Some(Err(error)) = failed.into_iter().next() {
        // All or nothing: take back what was stored, so that a retry does not deliver twice.
        for name in &created {
            let _ = api.delete(name, &Default::default()).await;
        }
        let mut error = ApiError::from_kube(error, "namespace");
        error.message = format!("{} (no event of this request was stored)", error.message);
        return Err(error);
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "mode": "durable",
            "namespace": namespace,
            "accepted": created.len(),
            "document_events": created,
        })),
    ))
}

fn direct(
    state: &ApiState,
    namespace: &str,
    events: Vec<IngestEvent>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let table = state.routes.snapshot();
    let mut deliveries = Vec::new();
    for e in &events {
        let timestamp = e
            .timestamp
            .clone()
            .unwrap_or_else(|| k8s_openapi::jiff::Timestamp::now().to_string());
        let body = Arc::new(EventBody::new(e.event, &timestamp, &e.data));
        let event_id = hex::encode(rand::random::<[u8; 16]>());
        deliveries.extend(
            table
                .lookup(namespace, e.event)
                .map(|route| (route.clone(), body.clone(), event_id.clone())),
        );
    }
    if deliveries.len() > state.direct_capacity {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_deliveries",
            format!(
                "this request makes {} deliveries, more than the direct queue holds ({}); send fewer events per request",
                deliveries.len(),
                state.direct_capacity
            ),
        ));
    }
    let permits = u32::try_from(deliveries.len()).unwrap_or(u32::MAX);
    let Ok(permit) = state.direct_queue.clone().try_acquire_many_owned(permits) else {
        let mut error = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "queue_full",
            "the direct delivery queue is full; retry later or use durable ingest",
        );
        error.retry_after = Some(1);
        return Err(error);
    };
    let count = deliveries.len();
    let permit = Arc::new(permit);
    for (route, body, event_id) in deliveries {
        let delivery = crate::delivery::Delivery {
            webhook: route.key.clone(),
            webhook_uid: route.uid.as_str().into(),
            id: crate::delivery::delivery_id(&event_id, &route.uid),
            event: body,
            source: "ingest".into(),
            manual: false,
        };
        let (dispatcher, permit) = (state.dispatcher.clone(), permit.clone());
        tokio::spawn(async move {
            crate::delivery::deliver_unrecorded(&dispatcher, delivery, DIRECT_MAX_HOLD).await;
            drop(permit);
        });
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "mode": "direct",
            "namespace": namespace,
            "accepted": events.len(),
            "deliveries": count,
            "guarantee": "at-most-once across an operator restart: events are not stored",
        })),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(body: &str) -> u16 {
        parse_events(body.as_bytes())
            .err()
            .map(|e| e.status.as_u16())
            .unwrap_or(202)
    }

    #[test]
    fn the_seed_payload_is_accepted_alone_or_in_an_array() {
        let one = r#"{"event":"document.completed","timestamp":"2023-06-15T10:35:00Z","data":{"document_id":123}}"#;
        let parsed = parse_events(one.as_bytes()).unwrap();
        assert_eq!(parsed[0].event, EventType::Completed);
        assert_eq!(parsed[0].timestamp.as_deref(), Some("2023-06-15T10:35:00Z"));
        assert_eq!(
            parse_events(format!("[{one},{one}]").as_bytes())
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            code(r#"{"event":"document.error","data":{}}"#),
            202,
            "timestamp is optional"
        );
    }

    #[test]
    fn bad_bodies_get_400_or_422_with_the_field_named() {
        assert_eq!(code("{"), 400);
        assert_eq!(code(""), 400);
        assert_eq!(code("42"), 422);
        assert_eq!(code("[]"), 422);
        assert_eq!(code("[1]"), 422);
        assert_eq!(code(r#"{"data":{}}"#), 422);
        assert_eq!(code(r#"{"event":"document.archived","data":{}}"#), 422);
        assert_eq!(code(r#"{"event":7,"data":{}}"#), 422);
        assert_eq!(code(r#"{"event":"document.error"}"#), 422);
        assert_eq!(code(r#"{"event":"document.error","data":[1]}"#), 422);
        assert_eq!(
            code(r#"{"event":"document.error","timestamp":"yesterday","data":{}}"#),
            422
        );
        let e =
            parse_events(br#"[{"event":"document.error","data":{}},{"event":"nope","data":{}}]"#)
                .unwrap_err();
        assert!(
            e.message
                .starts_with("events[1].event: unknown event type \"nope\""),
            "{}",
            e.message
        );
        let many = format!(
            "[{}]",
            vec![r#"{"event":"document.error","data":{}}"#; MAX_EVENTS_PER_REQUEST + 1].join(",")
        );
        assert_eq!(code(&many), 422);
    }
}
