//! Durable ingest: each event a DocumentEvent before the reply; keyed events by a name derived
//! from their key, so that a retry stores nothing twice.

use axum::{Json, http::StatusCode};
use futures::StreamExt;
use kube::{Api, api::PostParams};
use serde_json::{Value, json};

use super::{
    CONTENT_ANNOTATION, DURABLE_KEY_LIFETIME, IDEMPOTENCY_KEY_ANNOTATION, IngestEvent,
    OUTCOME_UNKNOWN, fingerprint, idempotency_conflict, keyed_event_name, out_of_time,
    partly_stored, store_deadline,
};
use crate::{
    crd::{ACCEPTED_AT_ANNOTATION, DocumentEvent, DocumentEventSpec},
    http::{ApiError, ApiState},
    ports::CreatedEvents,
};

/// What became of one event of a durable request.
struct Stored {
    name: String,
    /// The key's DocumentEvent existed already, with the same content.
    duplicate: bool,
}

pub(super) async fn durable(
    state: &ApiState,
    namespace: &str,
    events: Vec<IngestEvent>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let api: Api<DocumentEvent> = Api::namespaced(state.client.clone(), namespace);
    let keyed = events.iter().any(|e| e.key.is_some());
    let total = events.len();
    // Only the leader delivers: elsewhere the controller is not running to take them.
    let created = state
        .leadership
        .is_leader()
        .then(|| state.created_events.clone());
    let deadline = store_deadline(state);
    // An API server that does not answer (paused, partitioned) gets the request a 503 that says
    // so before --request-timeout, rather than that timeout's 408, which blames the client.
    let wait = api_server_wait(state.request_timeout);
    let given_up = tokio::time::Instant::now() + wait;
    let results: Vec<Result<Stored, ApiError>> = futures::stream::iter(events)
        .map(|e| {
            // Decided when the store would start (`buffered` pulls lazily).
            let late = tokio::time::Instant::now() >= deadline;
            let stored = store(api.clone(), e, created.clone());
            async move {
                if late {
                    return Err(out_of_time());
                }
                tokio::time::timeout_at(given_up, stored)
                    .await
                    .unwrap_or_else(|_| Err(api_server_silent(wait)))
            }
        })
        .buffered(16)
        .collect()
        .await;
    let mut stored = Vec::new();
    let mut not_stored = Vec::new();
    let mut unknown = Vec::new();
    let mut first_error = None;
    let mut duplicates = Vec::new();
    let mut names = Vec::new();
    for (index, result) in results.into_iter().enumerate() {
        match result {
            Ok(s) => {
                stored.push(json!({"index": index, "name": s.name}));
                if s.duplicate {
                    duplicates.push(index);
                }
                names.push(s.name);
            }
            Err(e) => {
                if e.code == OUTCOME_UNKNOWN {
                    unknown.push(index);
                } else {
                    not_stored.push(index);
                }
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(error) = first_error {
        let error = partly_stored(error, stored, not_stored, unknown, total, keyed);
        return Err(error);
    }
    let mut reply = json!({
        "mode": "durable",
        "namespace": namespace,
        "accepted": names.len(),
        "document_events": names,
        "duplicates": duplicates,
    });
    if keyed {
        reply["idempotency"] = DURABLE_KEY_LIFETIME.into();
    }
    Ok((StatusCode::ACCEPTED, Json(reply)))
}

/// Stores one event: with a key under the name derived from it, so that a repeat finds the
/// first one (same uid, so the same delivery ids); without one under a generated name.
/// How long a durable request waits for the API server to answer the stores it started: three
/// quarters of the request's own limit (no store starts after half of it, [`store_deadline`]),
/// so the client hears which events were stored before that limit's 408.
fn api_server_wait(request_timeout: std::time::Duration) -> std::time::Duration {
    request_timeout * 3 / 4
}

fn api_server_silent(wait: std::time::Duration) -> ApiError {
    let mut error = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        OUTCOME_UNKNOWN,
        format!(
            "the Kubernetes API server did not answer within {}s, so an event may have been \
             stored all the same",
            wait.as_secs_f64()
        ),
    );
    error.retry_after = Some(1);
    error
}

async fn store(
    api: Api<DocumentEvent>,
    e: IngestEvent,
    created: Option<CreatedEvents>,
) -> Result<Stored, ApiError> {
    let hand_over = |de: DocumentEvent| {
        if let Some(created) = &created {
            created.created(de);
        }
    };
    let content = hex::encode(fingerprint(&e));
    let spec = DocumentEventSpec {
        type_: e.event,
        timestamp: e.timestamp,
        data: e.data,
    };
    let mut de = DocumentEvent::new("", spec.clone());
    // Its place under `spec.ordering`, also after a restart (names are random).
    let annotations = de.metadata.annotations.get_or_insert_default();
    annotations.insert(
        ACCEPTED_AT_ANNOTATION.to_owned(),
        k8s_openapi::jiff::Timestamp::now().to_string(),
    );
    // Ingest's span (the current one), when traces are exported: delivery continues it.
    let trace = crate::telemetry::traceparent(&tracing::Span::current());
    if let Some(trace) = &trace {
        annotations.insert(
            crate::telemetry::TRACEPARENT_ANNOTATION.to_owned(),
            trace.clone(),
        );
    }
    let Some(key) = e.key else {
        de.metadata.name = None;
        de.metadata.generate_name = Some(format!("{}-", e.event.as_str().replace('.', "-")));
        return match api.create(&created_by_ingest(), &de).await {
            Ok(de) => {
                let name = de.metadata.name.clone().unwrap_or_default();
                hand_over(de);
                Ok(Stored {
                    name,
                    duplicate: false,
                })
            }
            Err(error) => Err(ApiError::from_kube(error, "namespace")),
        };
    };
    let name = keyed_event_name(&key);
    de.metadata.name = Some(name.clone());
    de.metadata.annotations.get_or_insert_default().extend([
        (IDEMPOTENCY_KEY_ANNOTATION.to_owned(), key.clone()),
        (CONTENT_ANNOTATION.to_owned(), content.clone()),
    ]);
    // Twice at most: the existing one may be deleted (retention) between create and get.
    for _ in 0..2 {
        match api.create(&created_by_ingest(), &de).await {
            Ok(de) => {
                hand_over(de);
                return Ok(Stored {
                    name,
                    duplicate: false,
                });
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(error) => return Err(ApiError::from_kube(error, "namespace")),
        }
        match api.get_opt(&name).await {
            Ok(Some(existing)) if same_content(&existing, &content, &spec) => {
                return Ok(Stored {
                    name,
                    duplicate: true,
                });
            }
            Ok(Some(_)) => return Err(idempotency_conflict(&key)),
            Ok(None) => continue,
            Err(error) => return Err(ApiError::from_kube(error, "namespace")),
        }
    }
    Err(ApiError::unavailable(format!(
        "the DocumentEvent {name} of idempotency key {key:?} was being deleted; retry"
    )))
}

/// The field manager of DocumentEvents made by `POST /api/events`: what the API shows as an
/// event's `source` (`kubectl create` records `kubectl-create`).
pub const INGEST_FIELD_MANAGER: &str = "hookrelay-ingest";

fn created_by_ingest() -> PostParams {
    PostParams {
        field_manager: Some(INGEST_FIELD_MANAGER.into()),
        ..PostParams::default()
    }
}

/// Whether a stored keyed event has the content of a request: by the fingerprint stored with it
/// (the spec read back has its numbers normalised), else by the spec.
fn same_content(existing: &DocumentEvent, content: &str, spec: &DocumentEventSpec) -> bool {
    match existing
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CONTENT_ANNOTATION))
    {
        Some(stored) => stored == content,
        None => existing.spec == *spec,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_silent_api_server_is_answered_within_the_request_limit() {
        assert_eq!(
            api_server_wait(Duration::from_secs(30)),
            Duration::from_millis(22_500)
        );
        assert_eq!(
            api_server_wait(Duration::from_secs(8)),
            Duration::from_secs(6)
        );
        let error = api_server_silent(Duration::from_secs(10));
        assert_eq!(error.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(error.code, OUTCOME_UNKNOWN);
        assert_eq!(error.retry_after, Some(1));
    }
}
