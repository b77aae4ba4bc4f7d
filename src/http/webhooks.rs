//! The seed's REST API, backed by Webhook resources: same paths, same snake_case fields.
//! A Webhook's `id` is its name; `POST` generates a `whsec_` secret into a Secret owned by the
//! Webhook and returns it once.

use std::sync::Arc;

use axum::{
    Json,
    body::Body,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
};
use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::{Map, Value, json};

use super::{
    ApiState, NamespaceQuery, error::ApiError, is_delivery_id, is_object_name, namespace_for,
    read_body,
};
use crate::{
    crd::{DocumentEvent, EventType, Webhook},
    delivery::{AttemptReport, Attempted, Delivery, EventBody, RouteCheck, Verdict},
};

/// The seed's representation of a Webhook.
fn to_json(w: &Webhook) -> Value {
    let ready = w
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    json!({
        "id": w.name_any(),
        "url": w.spec.url,
        "events": w.spec.events,
        "description": w.spec.description,
        "created_at": w.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()),
        "namespace": w.namespace(),
        "paused": w.spec.paused,
        "ready": ready.map(|c| c.status == "True"),
        "ready_reason": ready.map(|c| c.reason.clone()),
        "rate_limit": w.spec.delivery.rate_limit.map(|r| json!({"per_second": r.per_second, "burst": r.burst})),
        "ordering": w.spec.ordering.as_ref().map(|o| json!({"key": o.key})),
        "blocked_keys": w.status.iter().flat_map(|s| &s.blocked_keys).map(|k| json!({
            "key": k.key, "delivery_id": k.delivery_id, "attempts": k.attempts,
            "waiting": k.waiting, "since": k.since.0.to_string(),
        })).collect::<Vec<_>>(),
    })
}

/// `rate_limit` of a request as `spec.delivery.rateLimit` (null removes it); the API server
/// checks the numbers.
fn rate_limit_spec(value: &Value) -> Option<Value> {
    match value {
        Value::Null => Some(json!({"rateLimit": null})),
        Value::Object(o) if o.keys().all(|k| k == "per_second" || k == "burst") => {
            let mut limit = Map::new();
            for (from, to) in [("per_second", "perSecond"), ("burst", "burst")] {
                if let Some(v) = o.get(from) {
                    limit.insert(to.into(), v.clone());
                }
            }
            Some(json!({"rateLimit": limit}))
        }
        _ => None,
    }
}

struct Caller {
    namespace: String,
    api: Api<Webhook>,
}

impl Caller {
    /// The Webhook `id` of the caller's namespace; 404 when there is none. An id that is no
    /// object name is 404 before it can reach an API path (`x%2Fstatus` is decoded to a
    /// subresource).
    async fn webhook(&self, id: &str) -> Result<Webhook, ApiError> {
        if !is_object_name(id) {
            return Err(no_such_webhook(id));
        }
        self.api
            .get(id)
            .await
            .map_err(|e| ApiError::from_kube(e, &format!("webhook {id}")))
    }
}

async fn caller(
    state: &ApiState,
    query: &NamespaceQuery,
    headers: &HeaderMap,
    verb: &'static str,
) -> Result<Caller, ApiError> {
    let caller = state.auth.authenticate(headers).await?;
    let namespace = namespace_for(query, &caller)?;
    state
        .auth
        .authorize(&caller, verb, "webhooks", &namespace)
        .await?;
    Ok(Caller {
        api: Api::namespaced(state.client.clone(), &namespace),
        namespace,
    })
}

fn no_such_webhook(id: &str) -> ApiError {
    ApiError::not_found(format!(
        "no webhook {id:?}: ids are Kubernetes object names (lowercase letters, digits, '-' and '.')"
    ))
}

/// The writable fields of a request body: `url`, `events`, `description` (and `paused`).
fn spec_fields(body: &[u8], require: bool) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(ApiError::invalid(
            "expected a JSON object with url, events and description",
        ));
    };
    let mut spec = Map::new();
    for (field, value) in obj {
        let ok = match (field.as_str(), &value) {
            ("url", Value::String(_)) => true,
            ("events", Value::Array(items)) => items.iter().all(Value::is_string),
            ("description", Value::String(_) | Value::Null) => true,
            ("paused", Value::Bool(_)) => true,
            ("rate_limit", _) => match rate_limit_spec(&value) {
                Some(delivery) => {
                    spec.insert("delivery".into(), delivery);
                    continue;
                }
                None => {
                    return Err(ApiError::invalid(
                        "rate_limit is an object {\"per_second\": 20, \"burst\": 1}, or null to remove it",
                    ));
                }
            },
            ("ordering", Value::Null) => true,
            ("ordering", Value::Object(o)) => o.keys().all(|k| k == "key"),
            ("url" | "events" | "description" | "paused" | "ordering", _) => false,
            // Read-only fields of the seed's representation are ignored, as are unknown ones.
            _ => continue,
        };
        if !ok {
            return Err(ApiError::invalid(format!("{field} has the wrong type")));
        }
        spec.insert(field, value);
    }
    if require {
        for field in ["url", "events"] {
            if !spec.contains_key(field) {
                return Err(ApiError::invalid(format!("{field} is required")));
            }
        }
    }
    Ok(spec)
}

pub async fn list(
    State(state): State<Arc<ApiState>>,
    Query(q): Query<NamespaceQuery>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let c = caller(&state, &q, &headers, "list").await?;
    let list = c
        .api
        .list(&Default::default())
        .await
        .map_err(|e| ApiError::from_kube(e, "namespace"))?;
    Ok(Json(
        json!({"webhooks": list.items.iter().map(to_json).collect::<Vec<_>>()}),
    ))
}

pub async fn get(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(q): Query<NamespaceQuery>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let c = caller(&state, &q, &headers, "get").await?;
    let w = c.webhook(&id).await?;
    Ok(Json(to_json(&w)))
}

pub async fn create(
    State(state): State<Arc<ApiState>>,
    Query(q): Query<NamespaceQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let c = caller(&state, &q, &headers, "create").await?;
    let mut spec = spec_fields(&read_body(body).await?, true)?;
    let id = format!("wh-{}", random_name(10));
    let secret_name = format!("{id}-secret");
    spec.insert(
        "secretRef".into(),
        json!({"name": secret_name, "key": "secret"}),
    );
    let webhook: Webhook = serde_json::from_value(json!({
        "apiVersion": "hookrelay.dev/v1alpha1", "kind": "Webhook",
        "metadata": {"name": id, "labels": {"app.kubernetes.io/managed-by": "hookrelay-api"}},
        "spec": spec,
    }))
    .map_err(|e| ApiError::invalid(e.to_string()))?;
    // The API server validates the spec (schema and CEL) and its message is the answer.
    let created = c
        .api
        .create(&PostParams::default(), &webhook)
        .await
        .map_err(|e| ApiError::from_kube(e, "webhook"))?;
    let secret_value = format!("whsec_{}", BASE64.encode(rand::random::<[u8; 32]>()));
    let owner = created.controller_owner_ref(&()).map(|mut o| {
        o.controller = Some(false);
        o
    });
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": secret_name, "ownerReferences": owner.into_iter().collect::<Vec<_>>(),
                     "labels": {"app.kubernetes.io/managed-by": "hookrelay-api",
                                (crate::crd::SIGNING_SECRET_LABEL): "true"}},
        "type": "Opaque",
        "stringData": {"secret": secret_value},
    }))
    .expect("a valid Secret");
    let secrets: Api<Secret> = Api::namespaced(state.client.clone(), &c.namespace);
    if let Err(e) = secrets.create(&PostParams::default(), &secret).await {
        // Leave nothing half made.
        let _ = c.api.delete(&id, &DeleteParams::default()).await;
        return Err(ApiError::from_kube(e, "secret"));
    }
    let mut reply = to_json(&created);
    reply["secret"] = Value::String(secret_value);
    Ok((StatusCode::CREATED, Json(reply)))
}

pub async fn update(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(q): Query<NamespaceQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let c = caller(&state, &q, &headers, "update").await?;
    let spec = spec_fields(&read_body(body).await?, false)?;
    c.webhook(&id).await?;
    let patch = json!({"spec": spec});
    let updated = c
        .api
        .patch(&id, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| ApiError::from_kube(e, &format!("webhook {id}")))?;
    Ok(Json(to_json(&updated)))
}

pub async fn delete(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(q): Query<NamespaceQuery>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let c = caller(&state, &q, &headers, "delete").await?;
    let w = c.webhook(&id).await?;
    c.api
        .delete(&id, &DeleteParams::default())
        .await
        .map_err(|e| ApiError::from_kube(e, &format!("webhook {id}")))?;
    // The Secret the API generated goes with it (garbage collection would too, where it runs).
    let secrets: Api<Secret> = Api::namespaced(state.client.clone(), &c.namespace);
    if let Ok(Some(secret)) = secrets.get_opt(&w.spec.secret_ref.name).await
        && secret
            .owner_references()
            .iter()
            .any(|o| Some(&o.uid) == w.metadata.uid.as_ref())
    {
        let _ = secrets
            .delete(&w.spec.secret_ref.name, &DeleteParams::default())
            .await;
    }
    Ok(StatusCode::NO_CONTENT)
}

pub async fn deliveries(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(q): Query<NamespaceQuery>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let c = caller(&state, &q, &headers, "get").await?;
    let w = c.webhook(&id).await?;
    let status = w.status.unwrap_or_default();
    let deliveries: Vec<Value> = status
        .recent_deliveries
        .iter()
        .map(|r| {
            json!({
                "id": r.id,
                "event": r.event,
                "source": r.source,
                "attempt": r.attempt,
                "outcome": r.outcome,
                "success": r.outcome == crate::crd::Outcome::Succeeded,
                "status_code": r.http_status,
                "response_time_ms": r.duration_ms,
                "created_at": r.time.0.to_string(),
                "error": r.error,
            })
        })
        .collect();
    Ok(Json(
        json!({"deliveries": deliveries, "stats": status.delivery_stats}),
    ))
}

/// `POST /api/webhooks/{id}/test`: one signed test delivery now; the result is the reply.
pub async fn test(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(q): Query<NamespaceQuery>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let c = caller(&state, &q, &headers, "update").await?;
    let w = c.webhook(&id).await?;
    // Keyed by Webhooks that exist; the buckets of deleted ones are dropped now and then.
    if state.test_limiter.len() > 1024 {
        state.test_limiter.retain_recent();
    }
    if let Err(not_until) = state
        .test_limiter
        .check_key(&format!("{}/{id}", c.namespace))
    {
        let wait = not_until.wait_time_from(governor::clock::Clock::now(
            &governor::clock::DefaultClock::default(),
        ));
        let mut error = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "test deliveries to webhook {id} are limited to 1 a second (bursts of 3); retry later"
            ),
        );
        error.retry_after = Some(wait.as_secs_f64().ceil().max(1.0) as u64);
        return Err(error);
    }
    let event = w
        .spec
        .events
        .iter()
        .find_map(|e| e.types().first().copied())
        .unwrap_or(EventType::Completed);
    let mut data = Map::new();
    data.insert("test".into(), Value::Bool(true));
    data.insert(
        "message".into(),
        Value::String("a test delivery from hookrelay".into()),
    );
    let body = EventBody::new(
        event,
        &k8s_openapi::jiff::Timestamp::now().to_string(),
        &data,
    );
    let delivery_id = format!("msg_test_{}", hex::encode(rand::random::<[u8; 12]>()));
    let report = attempt_once(&state, &c.namespace, &id, delivery_id.clone(), body, "test").await?;
    Ok(Json(attempt_json(&delivery_id, &report)))
}

/// `POST /api/webhooks/{id}/deliveries/{delivery_id}/redeliver`: the same event, same delivery
/// id, sent again now.
pub async fn redeliver(
    State(state): State<Arc<ApiState>>,
    Path((id, delivery_id)): Path<(String, String)>,
    Query(q): Query<NamespaceQuery>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let c = caller(&state, &q, &headers, "update").await?;
    let w = c.webhook(&id).await?;
    if !is_delivery_id(&delivery_id) {
        return Err(ApiError::not_found(format!(
            "no delivery {delivery_id:?}: delivery ids look like msg_0123abcd..."
        )));
    }
    let record = w
        .status
        .unwrap_or_default()
        .recent_deliveries
        .into_iter()
        .find(|r| r.id == delivery_id)
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "delivery {delivery_id} is not in the recent deliveries of webhook {id}"
            ))
        })?;
    let events: Api<DocumentEvent> = Api::namespaced(state.client.clone(), &c.namespace);
    let de = events.get_opt(&record.source).await.map_err(|e| ApiError::from_kube(e, "document event"))?.ok_or_else(|| {
        ApiError::not_found(format!(
            "the event of delivery {delivery_id} ({}) is no longer stored (see --event-retention)",
            record.source
        ))
    })?;
    // The stored event must be the very one of this delivery (a direct-ingest or test delivery
    // has no stored event; a namesake must not be sent under its id).
    let expected = crate::delivery::delivery_id(
        de.metadata.uid.as_deref().unwrap_or_default(),
        w.metadata.uid.as_deref().unwrap_or_default(),
    );
    if expected != delivery_id {
        return Err(ApiError::not_found(format!(
            "the event of delivery {delivery_id} is not stored, so it cannot be sent again"
        )));
    }
    let body = EventBody::from(&de);
    let report = attempt_once(
        &state,
        &c.namespace,
        &id,
        delivery_id.clone(),
        body,
        "redeliver",
    )
    .await?;
    Ok(Json(attempt_json(&delivery_id, &report)))
}

async fn attempt_once(
    state: &ApiState,
    namespace: &str,
    id: &str,
    delivery_id: String,
    body: EventBody,
    source: &str,
) -> Result<AttemptReport, ApiError> {
    super::require_leader(state, "a manual delivery")?;
    let route = state
        .routes
        .snapshot()
        .get(&crate::routing::WebhookKey::new(namespace, id))
        .cloned()
        .ok_or_else(|| {
            ApiError::unavailable(format!(
                "webhook {id} is not routed yet; try again in a moment"
            ))
        })?;
    let delivery = Delivery {
        webhook: route.key.clone(),
        webhook_uid: route.uid.as_str().into(),
        id: delivery_id,
        event: Arc::new(body),
        source: source.into(),
        manual: true,
        // Room for the slot wait and the reply within the request timeout: the caller gets the
        // outcome (a timeout included), never a 408 for an attempt that went out.
        timeout_cap: Some(
            state
                .request_timeout
                .saturating_sub(MANUAL_SLOT_WAIT + std::time::Duration::from_secs(2))
                .max(std::time::Duration::from_secs(1)),
        ),
    };
    // A person is waiting: say at once why nothing can be sent rather than "try again".
    if let RouteCheck::Hold { why, .. } | RouteCheck::Gone(why) = state.dispatcher.check(&delivery)
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "webhook_not_ready",
            format!("nothing was sent to webhook {id}: {why}"),
        ));
    }
    // One attempt: a manual delivery is not retried.
    match state
        .dispatcher
        .attempt_within(&delivery, 1, MANUAL_SLOT_WAIT)
        .await
    {
        Attempted::Sent(report) => Ok(report),
        Attempted::NotSent => Err(ApiError::new(
            StatusCode::CONFLICT,
            "webhook_changed",
            format!("webhook {id} changed while the delivery waited; nothing was sent, try again"),
        )),
        Attempted::Busy => {
            let mut error = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                format!(
                    "every delivery slot of webhook {id} (or of its namespace) is taken; nothing was sent, retry later"
                ),
            );
            error.retry_after = Some(5);
            Err(error)
        }
    }
}

/// How long a manual delivery waits for a delivery slot before answering 503.
const MANUAL_SLOT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn attempt_json(delivery_id: &str, report: &AttemptReport) -> Value {
    json!({
        "delivery_id": delivery_id,
        "success": report.verdict == Verdict::Succeeded,
        "status_code": report.http_status,
        "response_time_ms": report.duration.as_millis() as u64,
        "error": report.error,
    })
}

fn random_name(len: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..len)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_bodies_are_checked_for_shape() {
        let seed = br#"{"url":"https://your-application.com/webhooks/file-conversion","events":["document.completed","document.error"],"description":"Notification endpoint for document processing events"}"#;
        let spec = spec_fields(seed, true).unwrap();
        assert_eq!(spec.len(), 3);
        assert_eq!(
            spec_fields(b"{", true).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            spec_fields(br#"{"events":["document.error"]}"#, true)
                .unwrap_err()
                .message,
            "url is required"
        );
        assert_eq!(
            spec_fields(br#"{"url":1,"events":[]}"#, true)
                .unwrap_err()
                .status,
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            spec_fields(br#"{"url":"x","events":"document.error"}"#, true)
                .unwrap_err()
                .message,
            "events has the wrong type"
        );
        // rate_limit and ordering map to the spec's names; null removes them.
        let spec = spec_fields(
            br#"{"rate_limit":{"per_second":20,"burst":2},"ordering":{"key":"data.document_id"}}"#,
            false,
        )
        .unwrap();
        assert_eq!(
            Value::Object(spec),
            json!({"delivery": {"rateLimit": {"perSecond": 20, "burst": 2}}, "ordering": {"key": "data.document_id"}})
        );
        let spec = spec_fields(br#"{"rate_limit":null,"ordering":null}"#, false).unwrap();
        assert_eq!(
            Value::Object(spec),
            json!({"delivery": {"rateLimit": null}, "ordering": null})
        );
        assert!(
            spec_fields(br#"{"rate_limit":{"perSecond":20}}"#, false)
                .unwrap_err()
                .message
                .contains("per_second")
        );
        // Read-only and unknown fields are ignored; PUT needs no field.
        let spec = spec_fields(
            br#"{"id":"wh_1","created_at":"x","description":"d"}"#,
            false,
        )
        .unwrap();
        assert_eq!(spec.keys().collect::<Vec<_>>(), ["description"]);
    }

    #[test]
    fn generated_names_are_valid_kubernetes_names() {
        let name = format!("wh-{}", random_name(10));
        assert!(
            name.len() == 13
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        );
    }
}
