//! What the web page needs beside the Webhooks: the namespaces this operator watches, and a
//! DocumentEvent by name with where each of its deliveries stands.

use std::sync::Arc;

use axum::{
    Json,
    extract::{Path, Query, State},
    http::HeaderMap,
};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

use super::{ApiState, NamespaceQuery, error::ApiError, is_object_name, namespace_for};
use crate::crd::{DocumentEvent, TargetState};

/// `GET /api/namespaces`: the namespaces this operator watches. Any authenticated caller may
/// ask: it reveals configuration (the `--watch-namespace` flag), not data.
pub async fn namespaces(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let (all, visible) = visible_namespaces(&state, &headers).await?;
    Ok(Json(namespaces_json(all, &visible)))
}

/// Whether this operator watches every namespace, and the watched namespaces the caller may
/// list Webhooks in.
pub(super) async fn visible_namespaces(
    state: &ApiState,
    headers: &HeaderMap,
) -> Result<(bool, Vec<String>), ApiError> {
    let caller = state.auth.authenticate(headers).await?;
    // The watched namespaces are the tenants: each caller sees those it may list Webhooks in.
    let watched = state.auth.watched();
    let answers = futures::future::join_all(
        watched
            .iter()
            .map(|ns| state.auth.authorize(&caller, "list", "webhooks", ns)),
    )
    .await;
    let mut visible = Vec::new();
    for (namespace, answer) in watched.iter().zip(answers) {
        match answer {
            Ok(()) => visible.push(namespace.clone()),
            Err(e) if e.status == axum::http::StatusCode::FORBIDDEN => {}
            Err(e) => return Err(e),
        }
    }
    Ok((watched.is_empty(), visible))
}

fn namespaces_json(all: bool, visible: &[String]) -> Value {
    json!({"all_namespaces": all, "namespaces": visible})
}

/// `GET /api/documentevents/{name}?namespace=`: a DocumentEvent and its deliveries, for whom
/// RBAC lets `get documentevents.hookrelay.dev` there. Only durable ingest and kubectl make
/// DocumentEvents; a direct or JetStream delivery has none (404).
pub async fn document_event(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
    Query(q): Query<NamespaceQuery>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let de = read_document_event(&state, &name, &q, &headers).await?;
    Ok(Json(document_event_json(&de)))
}

/// DocumentEvent `name` of the query's namespace, for a caller RBAC lets `get` it there.
pub(super) async fn read_document_event(
    state: &ApiState,
    name: &str,
    q: &NamespaceQuery,
    headers: &HeaderMap,
) -> Result<DocumentEvent, ApiError> {
    let caller = state.auth.authenticate(headers).await?;
    let namespace = namespace_for(q, &caller)?;
    state
        .auth
        .authorize(&caller, "get", "documentevents", &namespace)
        .await?;
    let not_found = || {
        ApiError::not_found(format!(
            "no DocumentEvent {name:?} in namespace {namespace}: it was deleted (see --event-retention), or its event was never stored as one (direct and JetStream ingest keep none)"
        ))
    };
    // An id that is no object name could reach another API path (`x%2Fstatus`).
    if !is_object_name(name) {
        return Err(not_found());
    }
    let events: Api<DocumentEvent> = Api::namespaced(state.client.clone(), &namespace);
    events
        .get_opt(name)
        .await
        .map_err(|e| ApiError::from_kube(e, "document event"))?
        .ok_or_else(not_found)
}

fn document_event_json(de: &DocumentEvent) -> Value {
    let status = de.status.clone().unwrap_or_default();
    let deliveries: Vec<Value> = status
        .deliveries
        .iter()
        .map(|t| {
            json!({
                "webhook": t.webhook,
                "delivery_id": t.id,
                "attempts": t.attempts,
                "outcome": t.state,
                "http_status": t.http_status,
                // Only the attempt records in the Webhook's history have a response time.
                "response_time_ms": null,
                "error": t.error,
                "at": t.last_attempt_time.as_ref().map(|t| t.0.to_string()),
                "next_attempt_at": t.next_attempt_time.as_ref().map(|t| t.0.to_string()),
                "held_since": t.held_since.as_ref().map(|t| t.0.to_string()),
                "final": matches!(t.state, TargetState::Succeeded | TargetState::Failed),
            })
        })
        .collect();
    let created = de
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.to_string());
    json!({
        "name": de.name_any(),
        "namespace": de.namespace(),
        "event": de.spec.type_.as_str(),
        // The event's own time, else (as delivered) the time it was stored.
        "timestamp": de.spec.timestamp.clone().or(created.clone()),
        "source": source_of(de),
        "idempotency_key": de.annotations().get(super::ingest::IDEMPOTENCY_KEY_ANNOTATION),
        "created_at": created,
        "phase": status.phase,
        "completed_at": status.completion_time.as_ref().map(|t| t.0.to_string()),
        "data": de.spec.data,
        "deliveries": deliveries,
    })
}

/// Who created the DocumentEvent: the field manager of its creation (`hookrelay-ingest` for
/// `POST /api/events`, `kubectl-create` for kubectl); null when the API server recorded none.
pub(super) fn source_of(de: &DocumentEvent) -> Option<String> {
    // Status writes are on the status subresource; of the others (the spec is immutable) the
    // earliest is the creation.
    de.metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|f| f.subresource.as_deref().unwrap_or_default().is_empty())
        .min_by_key(|f| f.time.as_ref().map(|t| t.0))
        .and_then(|f| f.manager.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_document_event_with_its_deliveries() {
        let de: DocumentEvent = serde_json::from_value(json!({
            "apiVersion": "hookrelay.dev/v1alpha1", "kind": "DocumentEvent",
            "metadata": {"name": "ev-1", "namespace": "docs",
                         "creationTimestamp": "2026-11-30T10:00:00Z",
                         "managedFields": [
                             {"manager": "hookrelay", "operation": "Apply", "subresource": "status",
                              "time": "2026-11-30T10:00:01Z"},
                             {"manager": "kubectl-label", "operation": "Update",
                              "time": "2026-11-30T10:00:02Z"},
                             {"manager": "kubectl-create", "operation": "Update",
                              "time": "2026-11-30T10:00:00Z"}]},
            "spec": {"type": "document.completed", "data": {"document_id": 7}},
            "status": {"phase": "Delivering", "deliveries": [
                {"webhook": "a", "id": "msg_1", "state": "Succeeded", "attempts": 1,
                 "httpStatus": 200, "lastAttemptTime": "2026-11-30T10:00:01Z"},
                {"webhook": "b", "id": "msg_2", "state": "Pending", "attempts": 0},
            ]},
        }))
        .unwrap();
        let json = document_event_json(&de);
        assert_eq!(json["name"], "ev-1");
        assert_eq!(json["namespace"], "docs");
        assert_eq!(json["event"], "document.completed");
        // No spec.timestamp: the creation time, as delivered.
        assert_eq!(json["timestamp"], "2026-11-30T10:00:00Z");
        assert_eq!(json["source"], "kubectl-create");
        assert_eq!(json["phase"], "Delivering");
        assert_eq!(json["data"], json!({"document_id": 7}));
        assert_eq!(
            json["deliveries"][0],
            json!({"webhook": "a", "delivery_id": "msg_1", "attempts": 1, "outcome": "Succeeded",
                   "http_status": 200, "response_time_ms": null, "error": null,
                   "at": "2026-11-30T10:00:01Z", "next_attempt_at": null, "held_since": null,
                   "final": true})
        );
        assert_eq!(json["deliveries"][1]["outcome"], "Pending");
        assert_eq!(json["deliveries"][1]["at"], Value::Null);
        assert_eq!(json["deliveries"][1]["final"], false);
    }
}
