//! The document-processing contract's REST API, backed by Webhook resources: same paths, same snake_case fields.
//! A Webhook's `id` is its name; `POST` generates a `whsec_` secret into a Secret owned by the
//! Webhook and returns it once.

use crate::http::error::Problem;
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
    api::{DeleteParams, Patch, PatchParams},
};
use serde_json::{Map, Value, json};

use super::{
    ApiState, NamespaceQuery,
    caller::{Caller, caller, caller_for_action},
    error::ApiError,
    is_delivery_id, read_body,
};
use crate::{
    crd::{
        CHANGED_BY_ANNOTATION, DeliveryRecord, DocumentEvent, EventType, Outcome,
        WEBHOOKS_ANNOTATION, Webhook, WebhookStatus,
    },
    delivery::{AttemptReport, Delivery, Refusal, Source, Verdict},
    wire::EventBody,
};

/// The document-processing contract's representation of a Webhook.
fn to_json(w: &Webhook) -> Value {
    let ready = w
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    let mut json = json!({
        "id": w.name_any(),
        // null for a Webhook that delivers to a Service: see `service_ref`.
        "url": w.spec.url,
        "events": w.spec.events,
        "description": w.spec.description,
        "created_at": w.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()),
        "namespace": w.namespace(),
        "paused": w.spec.paused,
        "filter": w.spec.filter,
        "suspended": w.status.as_ref().and_then(|s| s.suspended.as_ref()),
        "ready": ready.map(|c| c.status == "True"),
        "ready_reason": ready.map(|c| c.reason.clone()),
        // What a person acts on: "127.0.0.1 is a loopback address", "Secret x not found", ...
        "ready_message": ready.map(|c| c.message.clone()),
        "rate_limit": w.spec.delivery.rate_limit.map(|r| json!({"per_second": r.per_second, "burst": r.burst})),
        "ordering": w.spec.ordering.as_ref().map(|o| json!({"key": o.key})),
        "blocked_keys": w.status.iter().flat_map(|s| &s.blocked_keys).map(|k| json!({
            "key": k.key, "delivery_id": k.delivery_id, "attempts": k.attempts,
            "waiting": k.waiting, "since": k.since.0.to_string(),
        })).collect::<Vec<_>>(),
    });
    // Extra fields, present only when set, so that the contract's Webhooks look as they did.
    if let Some(service) = &w.spec.service_ref {
        json["service_ref"] = json!({
            "name": service.name,
            "port": service.port,
            "path": service.path,
            "ca_bundle": service.ca_bundle,
        });
    }
    if !w.spec.headers.is_empty() {
        json["headers"] = json!(w.spec.headers);
    }
    json
}

/// What the web page shows of a Webhook beside its spec (list and get): attempts being sent
/// now by this replica, the latest attempt, the recent success rate and `Degraded`.
/// A Webhook as read (list, get): its activity, and its URL with any credentials and query
/// values masked, as whoever may read a Webhook through the API is not always who may use its
/// endpoint (the replies to create and update, to the writer, show it whole).
fn with_activity(mut json: Value, w: &Webhook, in_flight: usize) -> Value {
    if let Some(url) = w.spec.url.as_deref() {
        json["url"] = json!(masked_url(url));
    }
    let status = w.status.clone().unwrap_or_default();
    let degraded = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded" && c.status == "True");
    json["in_flight"] = json!(in_flight);
    json["last_delivery_at"] = json!(last_delivery_at(&status).map(|t| t.to_string()));
    json["success_rate"] = json!(success_rate(&status.recent_deliveries));
    json["degraded"] = json!(degraded.is_some());
    json["degraded_reason"] = json!(degraded.map(|c| &c.reason));
    json["degraded_message"] = json!(degraded.map(|c| &c.message));
    json
}

/// `url` with credentials and query values masked; a URL with neither is shown as written.
pub(super) fn masked_url(url: &str) -> String {
    let secret_bearing = match url::Url::parse(url) {
        Ok(u) => !u.username().is_empty() || u.password().is_some() || u.query().is_some(),
        Err(_) => url.contains('@') || url.contains('?'),
    };
    if secret_bearing {
        crate::delivery::redact_url(url)
    } else {
        url.to_owned()
    }
}

/// The share of the retained recent attempts (`status.recentDeliveries`) that succeeded; None
/// without any. Each attempt counts, a failed one that is retried included: it is what the
/// receiver answered.
pub(super) fn success_rate(recent: &[DeliveryRecord]) -> Option<f64> {
    if recent.is_empty() {
        return None;
    }
    let succeeded = recent
        .iter()
        .filter(|r| r.outcome == Outcome::Succeeded)
        .count();
    Some(succeeded as f64 / recent.len() as f64)
}

/// The latest attempt: from the counters, which outlive the recent history, or the history.
pub(super) fn last_delivery_at(status: &WebhookStatus) -> Option<k8s_openapi::jiff::Timestamp> {
    let stats = &status.delivery_stats;
    [&stats.last_success_time, &stats.last_failure_time]
        .into_iter()
        .flatten()
        .chain(status.recent_deliveries.iter().map(|r| &r.time))
        .map(|t| t.0)
        .max()
}

/// `service_ref` of a request body, in the Webhook's field names (`ca_bundle` -> `caBundle`);
/// None when it has the wrong shape.
fn service_ref_spec(value: &Value) -> Option<Value> {
    let Value::Object(fields) = value else {
        return (value.is_null()).then_some(Value::Null);
    };
    let mut spec = Map::new();
    for (field, value) in fields {
        let (name, ok) = match field.as_str() {
            "name" | "path" => (field.as_str(), value.is_string()),
            "port" => ("port", value.is_string() || value.is_u64()),
            "ca_bundle" => ("caBundle", value.is_string() || value.is_null()),
            _ => continue,
        };
        if !ok {
            return None;
        }
        spec.insert(name.into(), value.clone());
    }
    Some(Value::Object(spec))
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

/// The writable fields of a request body: `url`, `events`, `description` (and `paused`,
/// `service_ref` instead of `url`, `headers`, `filter`).
fn spec_fields(body: &[u8], require: bool) -> Result<Map<String, Value>, ApiError> {
    let value = super::json_body(body)?;
    let Value::Object(obj) = value else {
        return Err(ApiError::invalid(
            "expected a JSON object with url, events and description",
        ));
    };
    spec_of(obj, require)
}

/// The Webhook spec fields of a request's JSON object (see [`spec_fields`]); with `require`,
/// an endpoint and `events` must be there.
pub(super) fn spec_of(
    obj: Map<String, Value>,
    require: bool,
) -> Result<Map<String, Value>, ApiError> {
    let mut spec = Map::new();
    for (field, value) in obj {
        let ok = match (field.as_str(), &value) {
            // null: none (a Webhook that delivers to a Service).
            ("url", Value::String(_) | Value::Null) => true,
            ("service_ref", v) => match service_ref_spec(v) {
                Some(service_ref) => {
                    spec.insert("serviceRef".into(), service_ref);
                    continue;
                }
                None => false,
            },
            ("headers", Value::Object(items)) => items.values().all(Value::is_string),
            ("headers", Value::Null) => true,
            ("headers", _) => false,
            ("events", Value::Array(items)) => items.iter().all(Value::is_string),
            ("description", Value::String(_) | Value::Null) => true,
            ("paused", Value::Bool(_)) => true,
            ("filter", Value::String(_) | Value::Null) => true,
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
            ("url" | "events" | "description" | "paused" | "filter" | "ordering", _) => false,
            // Read-only fields of the contract's representation are ignored, as are unknown ones.
            _ => continue,
        };
        if !ok {
            return Err(ApiError::invalid(format!("{field} has the wrong type")));
        }
        spec.insert(field, value);
    }
    let set = |v: Option<&Value>| v.is_some_and(|v| !v.is_null());
    if require {
        if !set(spec.get("url")) && !set(spec.get("serviceRef")) {
            return Err(ApiError::invalid("url is required"));
        }
        if !spec.contains_key("events") {
            return Err(ApiError::invalid("events is required"));
        }
    } else {
        // An update to one endpoint removes the other (a merge patch removes what is null).
        if set(spec.get("serviceRef")) && !spec.contains_key("url") {
            spec.insert("url".into(), Value::Null);
        }
        if set(spec.get("url")) && !spec.contains_key("serviceRef") {
            spec.insert("serviceRef".into(), Value::Null);
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
    let webhooks: Vec<Value> = list
        .items
        .iter()
        .map(|w| with_activity(to_json(w), w, in_flight(&state, &c.namespace, w)))
        .collect();
    Ok(Json(json!({"webhooks": webhooks})))
}

pub async fn get(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(q): Query<NamespaceQuery>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let c = caller(&state, &q, &headers, "get").await?;
    let w = c.webhook(&id).await?;
    let in_flight = in_flight(&state, &c.namespace, &w);
    Ok(Json(with_activity(to_json(&w), &w, in_flight)))
}

/// Attempts this replica's engine is sending to `w` now.
pub(super) fn in_flight(state: &ApiState, namespace: &str, w: &Webhook) -> usize {
    state
        .dispatcher
        .in_flight(&crate::keys::WebhookKey::new(namespace, &w.name_any()))
}

pub async fn create(
    State(state): State<Arc<ApiState>>,
    Query(q): Query<NamespaceQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let c = caller(&state, &q, &headers, "create").await?;
    let spec = spec_fields(&read_body(body).await?, true)?;
    let (created, secret_value) = create_webhook(&state, &c, spec).await?;
    let mut reply = to_json(&created);
    reply["secret"] = Value::String(secret_value);
    Ok((StatusCode::CREATED, Json(reply)))
}

/// Creates a Webhook with `spec` and a generated `whsec_` secret in a Secret it owns; returns
/// both. A Secret that cannot be made leaves no Webhook behind.
pub(super) async fn create_webhook(
    state: &ApiState,
    c: &Caller,
    mut spec: Map<String, Value>,
) -> Result<(Webhook, String), ApiError> {
    let id = format!("wh-{}", random_name(10));
    let secret_name = format!("{id}-secret");
    spec.insert(
        "secretRef".into(),
        json!({"name": secret_name, "key": "secret"}),
    );
    let webhook: Webhook = serde_json::from_value(json!({
        "apiVersion": "hookrelay.dev/v1alpha1", "kind": "Webhook",
        "metadata": {"name": id, "labels": {"app.kubernetes.io/managed-by": "hookrelay-api"},
                     "annotations": {(CHANGED_BY_ANNOTATION): c.user}},
        "spec": spec,
    }))
    .map_err(|e| ApiError::invalid(e.to_string()))?;
    // The API server validates the spec (schema and CEL) and its message is the answer.
    let created = c
        .api
        .create(&c.post_params(), &webhook)
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
                                (crate::crd::SIGNING_SECRET_LABEL): "true"},
                     "annotations": {(CHANGED_BY_ANNOTATION): c.user, (WEBHOOKS_ANNOTATION): id}},
        "type": "Opaque",
        "stringData": {"secret": secret_value},
    }))
    .expect("a valid Secret");
    let secrets: Api<Secret> = Api::namespaced(state.client.clone(), &c.namespace);
    if let Err(e) = secrets.create(&c.post_params(), &secret).await {
        // Leave nothing half made.
        let _ = c.api.delete(&id, &DeleteParams::default()).await;
        return Err(ApiError::from_kube(e, "secret"));
    }
    c.acted("create", &format!("webhook {id}"));
    Ok((created, secret_value))
}

pub async fn update(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(q): Query<NamespaceQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let spec = spec_fields(&read_body(body).await?, false)?;
    let c = caller_for_change(&state, &q, &headers, &spec).await?;
    let updated = patch_webhook(&c, &id, spec).await?;
    Ok(Json(to_json(&updated)))
}

/// The caller of a change to a Webhook's spec. Pausing or unpausing alone is an action of its
/// own, which a role may allow without allowing every other change.
pub(super) async fn caller_for_change(
    state: &ApiState,
    q: &NamespaceQuery,
    headers: &HeaderMap,
    spec: &Map<String, Value>,
) -> Result<Caller, ApiError> {
    match (spec.len(), spec.get("paused")) {
        (1, Some(Value::Bool(paused))) => {
            let verb = if *paused { "pause" } else { "resume" };
            caller_for_action(state, q, headers, verb).await
        }
        _ => caller(state, q, headers, "update").await,
    }
}

/// Merges `spec` into Webhook `id` (null removes a field).
pub(super) async fn patch_webhook(
    c: &Caller,
    id: &str,
    spec: Map<String, Value>,
) -> Result<Webhook, ApiError> {
    c.webhook(id).await?;
    let patch = json!({
        "metadata": {"annotations": {(CHANGED_BY_ANNOTATION): c.user}},
        "spec": spec,
    });
    let updated = c
        .api
        .patch(id, &c.patch_params(), &Patch::Merge(&patch))
        .await
        .map_err(|e| ApiError::from_kube(e, &format!("webhook {id}")))?;
    c.acted("update", &format!("webhook {id}"));
    Ok(updated)
}

/// `POST /api/webhooks/{id}/resume`: records the resume in `status.resumedAt`, from which the
/// Webhook controller of every replica lifts a `FailingTooLong` suspension (failures before it
/// no longer count). Any replica may write it: no other writer owns that field.
pub async fn resume(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(q): Query<NamespaceQuery>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let c = caller_for_action(&state, &q, &headers, "resume").await?;
    let (updated, now) = resume_webhook(&c, &id).await?;
    let mut reply = to_json(&updated);
    reply["resumed_at"] = Value::String(now.to_string());
    Ok(Json(reply))
}

/// Records a resume in the Webhook's `status.resumedAt`; returns the Webhook and that time.
pub(super) async fn resume_webhook(
    c: &Caller,
    id: &str,
) -> Result<(Webhook, k8s_openapi::jiff::Timestamp), ApiError> {
    c.webhook(id).await?;
    let now = k8s_openapi::jiff::Timestamp::now();
    let patch = json!({
        "apiVersion": "hookrelay.dev/v1alpha1",
        "kind": "Webhook",
        "status": {"resumedAt": now.to_string()},
    });
    let updated = c
        .api
        .patch_status(
            id,
            &PatchParams::apply(&c.manager()).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|e| ApiError::from_kube(e, &format!("webhook {id}")))?;
    c.acted("resume", &format!("webhook {id}"));
    Ok((updated, now))
}

/// How long a rotated-out secret keeps signing unless the request says otherwise.
pub(super) const DEFAULT_GRACE_SECONDS: u64 = 24 * 3600;
/// The longest grace period a rotation may ask for.
const MAX_GRACE_SECONDS: u64 = 7 * 24 * 3600;

#[derive(Debug, Default, serde::Deserialize)]
pub struct GraceQuery {
    #[serde(rename = "graceSeconds")]
    grace_seconds: Option<String>,
}

/// The grace period of a rotation: `?graceSeconds=` or `{"graceSeconds": N}`, default 24h.
fn grace_seconds(query: Option<&str>, body: &[u8]) -> Result<u64, ApiError> {
    let from_body = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let value = super::json_body(body)?;
        match value.get("graceSeconds") {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.to_string()),
        }
    };
    let Some(text) = query.map(str::to_owned).or(from_body) else {
        return Ok(DEFAULT_GRACE_SECONDS);
    };
    text.parse::<u64>()
        .ok()
        .filter(|s| *s <= MAX_GRACE_SECONDS)
        .ok_or_else(|| {
            ApiError::invalid(format!(
                "graceSeconds must be a whole number of seconds from 0 to {MAX_GRACE_SECONDS} (7 days), not {text}"
            ))
        })
}

/// `POST /api/webhooks/{id}/rotate-secret`: a new `whsec_` secret for a Webhook whose Secret
/// the API generated. The old one stays as `previous` (both sign) until the grace period ends,
/// recorded in the Secret's annotation for the leader to act on. Returns the new secret, once.
pub async fn rotate_secret(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(q): Query<NamespaceQuery>,
    Query(grace): Query<GraceQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let c = caller_for_action(&state, &q, &headers, "rotate").await?;
    let grace = grace_seconds(grace.grace_seconds.as_deref(), &read_body(body).await?)?;
    let rotation = rotate_webhook_secret(&state, &c, &id, grace).await?;
    let mut reply = to_json(&rotation.webhook);
    reply["secret"] = Value::String(rotation.secret);
    reply["previous_expires_at"] = json!(rotation.previous_expires_at.map(|t| t.to_string()));
    Ok(Json(reply))
}

/// A rotated secret: the new one (shown once) and when the old one stops signing (None: at
/// once).
pub(super) struct Rotation {
    pub(super) webhook: Webhook,
    pub(super) secret: String,
    pub(super) previous_expires_at: Option<k8s_openapi::jiff::Timestamp>,
}

/// Checks a rotation's grace period: at most [`MAX_GRACE_SECONDS`].
pub(super) fn check_grace(grace: u64) -> Result<u64, ApiError> {
    if grace > MAX_GRACE_SECONDS {
        return Err(ApiError::invalid(format!(
            "grace_seconds must be a whole number of seconds from 0 to {MAX_GRACE_SECONDS} (7 days), not {grace}"
        )));
    }
    Ok(grace)
}

/// Replaces the API-generated secret of Webhook `id`; the old one keeps signing for `grace`
/// seconds.
pub(super) async fn rotate_webhook_secret(
    state: &ApiState,
    c: &Caller,
    id: &str,
    grace: u64,
) -> Result<Rotation, ApiError> {
    let w = c.webhook(id).await?;
    let secret_name = &w.spec.secret_ref.name;
    let secrets: Api<Secret> = Api::namespaced(state.client.clone(), &c.namespace);
    let not_generated = || {
        ApiError::new(
            StatusCode::CONFLICT,
            Problem::SecretNotGenerated,
            format!(
                "webhook {id} signs with Secret {secret_name}, which the API did not generate: rotate that Secret itself (the new value under key {:?}, the old one under \"previous\" while receivers move)",
                w.spec.secret_ref.key
            ),
        )
    };
    let secret = secrets
        .get_opt(secret_name)
        .await
        .map_err(|e| ApiError::from_kube(e, "secret"))?
        .ok_or_else(not_generated)?;
    // Generated by the API for this very Webhook: owned by it, under the key POST wrote.
    let generated = secret
        .owner_references()
        .iter()
        .any(|o| Some(&o.uid) == w.metadata.uid.as_ref())
        && secret
            .labels()
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str)
            == Some("hookrelay-api")
        && w.spec.secret_ref.key == "secret";
    let old = secret.data.as_ref().and_then(|d| d.get("secret")).cloned();
    let (true, Some(old)) = (generated, old) else {
        return Err(not_generated());
    };
    let new = format!("whsec_{}", BASE64.encode(rand::random::<[u8; 32]>()));
    let expires = k8s_openapi::jiff::Timestamp::now()
        + k8s_openapi::jiff::SignedDuration::from_secs(grace as i64);
    let expires_text = expires.to_string();
    let (previous, annotation) = if grace == 0 {
        (Value::Null, Value::Null)
    } else {
        (
            Value::String(BASE64.encode(&old.0)),
            Value::String(expires_text.clone()),
        )
    };
    // The resourceVersion makes a concurrent rotation fail (409) rather than lose a key.
    let patch = json!({
        "metadata": {
            "resourceVersion": secret.metadata.resource_version,
            "annotations": {
                (crate::crd::PREVIOUS_EXPIRES_ANNOTATION): annotation,
                (CHANGED_BY_ANNOTATION): c.user,
            },
        },
        "data": {"secret": BASE64.encode(new.as_bytes()), (crate::crd::PREVIOUS_KEY): previous},
    });
    secrets
        .patch(secret_name, &c.patch_params(), &Patch::Merge(&patch))
        .await
        .map_err(|e| ApiError::from_kube(e, &format!("secret {secret_name}")))?;
    c.acted("rotate", &format!("webhook {id}"));
    Ok(Rotation {
        webhook: w,
        secret: new,
        previous_expires_at: (grace != 0).then_some(expires),
    })
}

pub async fn delete(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(q): Query<NamespaceQuery>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let c = caller(&state, &q, &headers, "delete").await?;
    delete_webhook(&state, &c, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Deletes Webhook `id` and the Secret the API generated for it.
pub(super) async fn delete_webhook(state: &ApiState, c: &Caller, id: &str) -> Result<(), ApiError> {
    let w = c.webhook(id).await?;
    c.api
        .delete(id, &DeleteParams::default())
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
    c.acted("delete", &format!("webhook {id}"));
    Ok(())
}

pub async fn deliveries(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(q): Query<NamespaceQuery>,
    Query(search): Query<super::recover::SearchQuery>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let c = caller(&state, &q, &headers, "get").await?;
    let lookup = search.lookup()?;
    let w = c.webhook(&id).await?;
    // `?document_id=` or `?delivery_id=`: beyond the recent deliveries, in what is retained.
    if let Some(lookup) = lookup {
        return super::recover::search(&state, &c, &w, lookup).await;
    }
    let status = w.status.unwrap_or_default();
    let deliveries: Vec<Value> = status
        .recent_deliveries
        .iter()
        .map(super::recover::record_json)
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
    let c = caller_for_action(&state, &q, &headers, "test").await?;
    let (delivery_id, report) = test_delivery(&state, &c, &id).await?;
    Ok(Json(attempt_json(&delivery_id, &report)))
}

/// Sends one signed test event to Webhook `id` now; returns its delivery id and outcome.
pub(super) async fn test_delivery(
    state: &ApiState,
    c: &Caller,
    id: &str,
) -> Result<(String, AttemptReport), ApiError> {
    let w = c.webhook(id).await?;
    super::take_webhook_token(
        &state.test_limiter,
        &c.namespace,
        id,
        &format!("test deliveries to webhook {id} are limited to 1 a second (bursts of 3)"),
    )?;
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
    let report = attempt_once(
        state,
        &c.namespace,
        id,
        delivery_id.clone(),
        body,
        Source::Test,
    )
    .await?;
    Ok((delivery_id, report))
}

/// `POST /api/webhooks/{id}/deliveries/{delivery_id}/redeliver`: the same event, same delivery
/// id, sent again now.
pub async fn redeliver(
    State(state): State<Arc<ApiState>>,
    Path((id, delivery_id)): Path<(String, String)>,
    Query(q): Query<NamespaceQuery>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let c = caller_for_action(&state, &q, &headers, "redeliver").await?;
    let report = redeliver_delivery(&state, &c, &id, &delivery_id).await?;
    Ok(Json(attempt_json(&delivery_id, &report)))
}

/// Sends the event of a recent delivery to Webhook `id` again, under the same delivery id.
pub(super) async fn redeliver_delivery(
    state: &ApiState,
    c: &Caller,
    id: &str,
    delivery_id: &str,
) -> Result<AttemptReport, ApiError> {
    let w = c.webhook(id).await?;
    if !is_delivery_id(delivery_id) {
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
    // A direct-ingest, JetStream or test delivery has no stored event to send again.
    let source = Source::parse(&record.source);
    let name = source.document_event().ok_or_else(|| {
        ApiError::not_found(format!(
            "the event of delivery {delivery_id} ({source}) is not stored, so it cannot be sent again"
        ))
    })?;
    let events: Api<DocumentEvent> = Api::namespaced(state.client.clone(), &c.namespace);
    let de = events.get_opt(name).await.map_err(|e| ApiError::from_kube(e, "document event"))?.ok_or_else(|| {
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
    attempt_once(
        state,
        &c.namespace,
        id,
        delivery_id.to_owned(),
        body,
        Source::Redeliver,
    )
    .await
}

async fn attempt_once(
    state: &ApiState,
    namespace: &str,
    id: &str,
    delivery_id: String,
    body: EventBody,
    source: Source,
) -> Result<AttemptReport, ApiError> {
    super::require_no_other_leader(state, "a manual delivery")?;
    let route = state
        .routes
        .snapshot()
        .get(&crate::keys::WebhookKey::new(namespace, id))
        .cloned()
        .ok_or_else(|| {
            ApiError::unavailable(format!(
                "webhook {id} is not routed yet; try again in a moment"
            ))
        })?;
    let delivery = Delivery {
        webhook: route.key.clone(),
        webhook_uid: route.uid.as_str().into(),
        routed_version: 0,
        id: delivery_id,
        event: Arc::new(body),
        source,
        manual: true,
        // Room for the slot wait and the reply within the request timeout: the caller gets the
        // outcome (a timeout included), never a 408 for an attempt that went out.
        timeout_cap: Some(
            state
                .request_timeout
                .saturating_sub(
                    crate::delivery::MANUAL_SLOT_WAIT + std::time::Duration::from_secs(2),
                )
                .max(std::time::Duration::from_secs(1)),
        ),
        trace: None,
    };
    crate::delivery::deliver_now(&state.dispatcher, &delivery)
        .await
        .map_err(|refusal| match refusal {
            // A person is waiting: say at once why nothing can be sent rather than "try again".
            Refusal::NotReady(why) => ApiError::new(
                StatusCode::CONFLICT,
                Problem::WebhookNotReady,
                format!("nothing was sent to webhook {id}: {why}"),
            ),
            Refusal::Busy => {
                let mut error = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Problem::Busy,
                    format!(
                        "every delivery slot of webhook {id} (or of its namespace) is taken; nothing was sent, retry later"
                    ),
                );
                error.retry_after = Some(5);
                error
            }
        })
}

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
        let example = br#"{"url":"https://your-application.com/webhooks/file-conversion","events":["document.completed","document.error"],"description":"Notification endpoint for document processing events"}"#;
        let spec = spec_fields(example, true).unwrap();
        assert_eq!(spec.len(), 3);
        let filtered =
            br#"{"url":"https://example.com/h","events":["*"],"filter":"data.folder_id == 1"}"#;
        assert_eq!(
            spec_fields(filtered, true).unwrap()["filter"],
            "data.folder_id == 1"
        );
        assert_eq!(
            spec_fields(br#"{"filter":1}"#, false).unwrap_err().message,
            "filter has the wrong type"
        );
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
    fn service_ref_replaces_url_and_back() {
        let spec = spec_fields(
            br#"{"service_ref":{"name":"receiver","port":8080,"path":"/h","ca_bundle":null,"x":1},"events":["*"]}"#,
            true,
        )
        .unwrap();
        assert_eq!(
            Value::Object(spec),
            json!({"serviceRef": {"name": "receiver", "port": 8080, "path": "/h", "caBundle": null}, "events": ["*"]})
        );
        // An update to one endpoint clears the other.
        let spec = spec_fields(br#"{"service_ref":{"name":"r","port":"http"}}"#, false).unwrap();
        assert_eq!(spec["url"], Value::Null);
        let spec = spec_fields(br#"{"url":"https://example.com/h"}"#, false).unwrap();
        assert_eq!(spec["serviceRef"], Value::Null);
        assert_eq!(
            spec_fields(br#"{"service_ref":{"port":[1]},"events":["*"]}"#, true)
                .unwrap_err()
                .message,
            "service_ref has the wrong type"
        );
        let spec = spec_fields(br#"{"headers":{"X-Env":"prod"}}"#, false).unwrap();
        assert_eq!(spec["headers"], json!({"X-Env": "prod"}));
    }

    #[test]
    fn the_grace_period_comes_from_the_query_or_the_body_and_is_bounded() {
        assert_eq!(grace_seconds(None, b"").unwrap(), DEFAULT_GRACE_SECONDS);
        assert_eq!(grace_seconds(Some("60"), b"").unwrap(), 60);
        assert_eq!(grace_seconds(None, br#"{"graceSeconds": 0}"#).unwrap(), 0);
        assert_eq!(grace_seconds(None, b"{}").unwrap(), DEFAULT_GRACE_SECONDS);
        for bad in ["-1", "1.5", "604801", "soon"] {
            let e = grace_seconds(Some(bad), b"").unwrap_err();
            assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
            assert!(e.message.contains("from 0 to 604800"), "{}", e.message);
        }
        assert_eq!(
            grace_seconds(None, b"{").unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }

    fn record(outcome: Outcome, at: i64) -> DeliveryRecord {
        DeliveryRecord {
            id: "msg_1".into(),
            event: "document.completed".into(),
            source: "ev-1".into(),
            attempt: 1,
            outcome,
            http_status: None,
            duration_ms: 3,
            time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::from_second(at).unwrap(),
            ),
            error: None,
        }
    }

    #[test]
    fn the_success_rate_is_over_the_recent_attempts() {
        assert_eq!(success_rate(&[]), None);
        let recent = [
            record(Outcome::Succeeded, 4),
            record(Outcome::Retrying, 3),
            record(Outcome::Failed, 2),
            record(Outcome::Succeeded, 1),
        ];
        assert_eq!(success_rate(&recent), Some(0.5));
        assert_eq!(success_rate(&recent[..1]), Some(1.0));
        assert_eq!(success_rate(&recent[1..3]), Some(0.0));
    }

    #[test]
    fn a_read_webhook_shows_no_url_credentials_nor_query_values() {
        let mut w: Webhook = serde_json::from_value(json!({
            "apiVersion": "hookrelay.dev/v1alpha1", "kind": "Webhook",
            "metadata": {"name": "wh-1", "namespace": "docs"},
            "spec": {"url": "https://user:pw@example.com/h?token=abc&x=1", "events": ["*"],
                     "secretRef": {"name": "s"}},
        }))
        .unwrap();
        let shown = with_activity(to_json(&w), &w, 0)["url"].to_string();
        assert!(
            !shown.contains("pw") && !shown.contains("abc") && shown.contains("token=***"),
            "{shown}"
        );
        // The writer's reply shows what was written.
        assert!(to_json(&w)["url"].to_string().contains("token=abc"));
        w.spec.url = Some("https://example.com".into());
        assert_eq!(
            with_activity(to_json(&w), &w, 0)["url"],
            "https://example.com"
        );
    }

    #[test]
    fn activity_fields_come_from_the_status_and_the_engine() {
        let mut w: Webhook = serde_json::from_value(json!({
            "apiVersion": "hookrelay.dev/v1alpha1", "kind": "Webhook",
            "metadata": {"name": "wh-1", "namespace": "docs"},
            "spec": {"url": "https://example.com/h", "events": ["*"], "secretRef": {"name": "s"}},
        }))
        .unwrap();
        // Never delivered: nulls, not zeros.
        let json = with_activity(to_json(&w), &w, 0);
        assert_eq!(json["in_flight"], 0);
        assert_eq!(json["last_delivery_at"], Value::Null);
        assert_eq!(json["success_rate"], Value::Null);
        assert_eq!(json["degraded"], false);
        assert_eq!(json["degraded_reason"], Value::Null);
        // The contract's fields are unchanged.
        assert_eq!(json["id"], "wh-1");
        assert_eq!(json["url"], "https://example.com/h");
        w.status = Some(
            serde_json::from_value(json!({
                "conditions": [{"type": "Degraded", "status": "True", "reason": "ConsecutiveFailures",
                                "message": "5 consecutive failed attempts; last: HTTP 500",
                                "lastTransitionTime": "2026-11-30T10:00:00Z"},
                               {"type": "Ready", "status": "False", "reason": "SecretNotFound",
                                "message": "Secret s not found",
                                "lastTransitionTime": "2026-11-30T10:00:00Z"}],
                "deliveryStats": {"succeeded": 1, "failed": 5, "consecutiveFailures": 5,
                                  "lastSuccessTime": "2026-11-30T09:00:00Z",
                                  "lastFailureTime": "2026-11-30T10:00:00Z"},
                "recentDeliveries": [serde_json::to_value(record(Outcome::Failed, 1)).unwrap(),
                                     serde_json::to_value(record(Outcome::Succeeded, 0)).unwrap()],
            }))
            .unwrap(),
        );
        let json = with_activity(to_json(&w), &w, 2);
        assert_eq!(json["ready"], false);
        assert_eq!(json["ready_reason"], "SecretNotFound");
        assert_eq!(json["ready_message"], "Secret s not found");
        assert_eq!(json["in_flight"], 2);
        assert_eq!(json["last_delivery_at"], "2026-11-30T10:00:00Z");
        assert_eq!(json["success_rate"], 0.5);
        assert_eq!(json["degraded"], true);
        assert_eq!(json["degraded_reason"], "ConsecutiveFailures");
        assert_eq!(
            json["degraded_message"],
            "5 consecutive failed attempts; last: HTTP 500"
        );
        // A Degraded condition that is False is no reason.
        w.status.as_mut().unwrap().conditions[0].status = "False".into();
        let json = with_activity(to_json(&w), &w, 0);
        assert_eq!(json["degraded"], false);
        assert_eq!(json["degraded_reason"], Value::Null);
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
