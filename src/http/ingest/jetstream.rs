//! JetStream ingest: each event published to the stream, answered 202 only once JetStream has
//! stored every event of the request (its publish ack).

use axum::{Json, http::StatusCode};
use serde_json::{Value, json};

use super::{IngestEvent, fingerprint, idempotency_conflict, partly_stored};
use crate::{
    delivery::{
        EventBody,
        jetstream::{
            Bus, CONTENT_HEADER, DUPLICATE_WINDOW, EventMessage, keyed_event_id, keyed_msg_id,
        },
    },
    http::{ApiError, ApiState},
};

/// What became of one event of a request.
enum Published {
    Stored { id: String },
    Duplicate { id: String },
}

pub(super) async fn jetstream(
    state: &ApiState,
    namespace: &str,
    events: Vec<IngestEvent>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Some(bus) = &state.bus else {
        return Err(ApiError::unavailable(
            "JetStream is not connected; retry in a second",
        ));
    };
    let keyed = events.iter().any(|e| e.key.is_some());
    let total = events.len();
    // Every publish first, then every ack: one round trip's latency for the whole request.
    let mut pending = Vec::with_capacity(total);
    for e in events {
        let timestamp = e
            .timestamp
            .clone()
            .unwrap_or_else(|| k8s_openapi::jiff::Timestamp::now().to_string());
        let body = EventBody::new(e.event, &timestamp, &e.data);
        let content = hex::encode(fingerprint(&e));
        let (id, msg_id) = match &e.key {
            Some(key) => (keyed_event_id(namespace, key), keyed_msg_id(namespace, key)),
            // Unkeyed: the client's retry is a new event, but the client library's own retry of
            // this publish is deduplicated.
            None => {
                let id = hex::encode(rand::random::<[u8; 16]>());
                (id.clone(), id)
            }
        };
        let message = EventMessage::new(namespace, &id, &msg_id, &body, Some(&content));
        let ack = bus
            .context
            .publish_with_headers(message.subject, message.headers, message.body)
            .await;
        pending.push((id, e.key, content, ack));
    }
    let mut results = Vec::with_capacity(total);
    for (id, key, content, ack) in pending {
        let result = match ack {
            Err(e) => Err(unavailable(&e)),
            Ok(ack) => match ack.await {
                Err(e) => Err(unavailable(&e)),
                Ok(ack) if ack.duplicate => match same_content(bus, ack.sequence, &content).await {
                    Ok(true) => Ok(Published::Duplicate { id }),
                    Ok(false) => Err(idempotency_conflict(key.as_deref().unwrap_or(&id))),
                    Err(e) => Err(e),
                },
                Ok(_) => Ok(Published::Stored { id }),
            },
        };
        results.push(result);
    }
    let mut stored = Vec::new();
    let mut not_stored = Vec::new();
    let mut duplicates = Vec::new();
    let mut ids = Vec::new();
    let mut first_error = None;
    for (index, result) in results.into_iter().enumerate() {
        match result {
            Ok(Published::Stored { id }) => {
                stored.push(json!({"index": index, "id": id}));
                ids.push(id);
            }
            Ok(Published::Duplicate { id }) => {
                stored.push(json!({"index": index, "id": id}));
                duplicates.push(index);
                ids.push(id);
            }
            Err(e) => {
                not_stored.push(index);
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(error) = first_error {
        return Err(partly_stored(error, stored, not_stored, total, keyed));
    }
    let mut reply = json!({
        "mode": "jetstream",
        "namespace": namespace,
        "accepted": ids.len(),
        "events": ids,
        "duplicates": duplicates,
    });
    if keyed {
        reply["idempotency"] = format!(
            "JetStream remembers an idempotency key for {} (its duplicate window); a repeat after that is delivered again, with the same delivery ids",
            humantime::format_duration(DUPLICATE_WINDOW)
        )
        .into();
    }
    Ok((StatusCode::ACCEPTED, Json(reply)))
}

/// Whether the stored event at `sequence` (the one a duplicate publish matched) has `content`.
async fn same_content(bus: &Bus, sequence: u64, content: &str) -> Result<bool, ApiError> {
    let stored = bus
        .stream
        .get_raw_message(sequence)
        .await
        .map_err(|e| unavailable(&e))?;
    Ok(stored
        .headers
        .get(CONTENT_HEADER)
        .is_none_or(|v| v.as_str() == content))
}

fn unavailable(e: &dyn std::fmt::Display) -> ApiError {
    let mut error = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "jetstream_unavailable",
        format!("JetStream did not store the event ({e}); retry in a second"),
    );
    error.retry_after = Some(1);
    error
}
