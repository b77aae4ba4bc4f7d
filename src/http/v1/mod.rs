//! `/api/v1`: the versioned REST API. The same operations as the unversioned API of the
//! document-processing contract (which stays as it is), with one name per value, cursor
//! pagination, RFC 9457 problem details, `PUT` that replaces and refuses unknown fields, and
//! `PATCH` with JSON merge patch semantics. Its OpenAPI document is generated from the types
//! and handlers here ([`openapi`]), and `docs/openapi-v1.json` is checked against it.

pub mod model;

use std::sync::Arc;

use axum::{
    Json, Router,
    body::Body,
    extract::{Path, Query, Request, State},
    http::{HeaderMap, StatusCode},
    middleware::Next,
    response::Response,
    routing::{get, post},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use kube::api::ListParams;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::{Map, Value};
use utoipa::{IntoParams, OpenApi, ToSchema};

use super::{
    ApiState, NamespaceQuery,
    caller::caller,
    error::{ApiError, Problem},
    events, read_body, recover, webhooks,
};
use model::{
    Accepted, Attempt, AttemptPage, AttemptResult, DocumentEvent, Namespaces, ProblemDetails,
    Recovered, ResumedWebhook, RotateSecret, Webhook, WebhookPage, WebhookPatch, WebhookWithSecret,
    WebhookWrite,
};

/// Where the versioned API lives.
pub const PREFIX: &str = "/api/v1";

/// Webhooks a list page holds unless `?limit=` says otherwise, and the most it may ask for.
const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 500;

/// The `/api/v1` routes (authenticated by the API router's layer, like every `/api` route).
pub fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/api/v1/namespaces", get(list_namespaces))
        .route("/api/v1/events", post(ingest))
        .route("/api/v1/documentevents/{name}", get(get_document_event))
        .route("/api/v1/webhooks", get(list_webhooks).post(create_webhook))
        .route(
            "/api/v1/webhooks/{id}",
            get(get_webhook)
                .put(replace_webhook)
                .patch(patch_webhook)
                .delete(delete_webhook),
        )
        .route("/api/v1/webhooks/{id}/deliveries", get(list_deliveries))
        .route("/api/v1/webhooks/{id}/test", post(test_webhook))
        .route("/api/v1/webhooks/{id}/resume", post(resume_webhook))
        .route("/api/v1/webhooks/{id}/recover", post(recover_webhook))
        .route("/api/v1/webhooks/{id}/rotate-secret", post(rotate_secret))
        .route(
            "/api/v1/webhooks/{id}/deliveries/{delivery_id}/redeliver",
            post(redeliver),
        )
}

/// Answers every error under `/api/v1` (the handlers', authentication's, the router's
/// fallbacks', the body and time limits') as RFC 9457 problem details.
pub async fn problem_details(req: Request, next: Next) -> Response {
    // Only a versioned path is kept: every other request (ingest among them) allocates nothing.
    let instance = req
        .uri()
        .path()
        .starts_with(PREFIX)
        .then(|| req.uri().path().to_owned());
    let mut response = next.run(req).await;
    if let Some(instance) = instance
        && let Some(error) = response.extensions_mut().remove::<ApiError>()
    {
        return error.problem_response(&instance);
    }
    response
}

/// The OpenAPI document of `/api/v1`, generated from the handlers and their types.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// [`openapi`] as pretty JSON: what `hookrelay openapi` prints and `docs/openapi-v1.json` holds.
pub fn openapi_json() -> String {
    openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes")
}

/// The body as `T`: 400 `malformed_json` when it is no JSON, 422 `invalid` naming the field
/// when it does not fit (unknown fields included).
fn typed_body<T: DeserializeOwned>(body: &[u8]) -> Result<(T, Map<String, Value>), ApiError> {
    let value = super::json_body(body)?;
    let Value::Object(object) = value else {
        return Err(ApiError::invalid("expected a JSON object"));
    };
    let typed = serde_json::from_value(Value::Object(object.clone()))
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    Ok((typed, object))
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// At most this many items (1 to 500; default 100 Webhooks, 20 attempts).
    limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
}

impl PageQuery {
    fn limit(&self, default: u32) -> Result<u32, ApiError> {
        match self.limit {
            None => Ok(default),
            Some(n @ 1..=MAX_LIMIT) => Ok(n),
            Some(n) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                Problem::InvalidQuery,
                format!("limit must be from 1 to {MAX_LIMIT}, not {n}"),
            )),
        }
    }
}

/// `?namespace=`, documented once.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct NamespaceParam {
    /// The namespace; default: the caller's ServiceAccount namespace, else `default`.
    #[allow(dead_code)]
    namespace: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/namespaces", tag = "namespaces", operation_id = "listNamespaces",
    responses((status = 200, body = Namespaces), Problems))]
async fn list_namespaces(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> Result<Json<Namespaces>, ApiError> {
    let (all_namespaces, items) = events::visible_namespaces(&state, &headers).await?;
    Ok(Json(Namespaces {
        all_namespaces,
        items,
    }))
}

/// One event as the document-processing contract shapes it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EventIn {
    #[schema(example = "document.completed")]
    pub event: String,
    /// RFC 3339; default: when it is accepted.
    pub timestamp: Option<String>,
    #[schema(value_type = Object, example = json!({"document_id": 12345, "filename": "report.pdf"}))]
    pub data: Value,
    /// The client's name for the event: a repeat with the same id creates nothing twice.
    pub id: Option<String>,
}

/// One event, or an array of at most 500.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Events {
    One(EventIn),
    Many(Vec<EventIn>),
}

#[utoipa::path(post, path = "/api/v1/events", tag = "events", operation_id = "ingestEvents",
    params(NamespaceParam, ("Idempotency-Key" = Option<String>, Header, description = "A single event's name: a repeat creates nothing twice")),
    request_body = Events,
    responses((status = 202, description = "Accepted: stored (durable, jetstream) or queued (direct)", body = Accepted), Problems))]
async fn ingest(
    state: State<Arc<ApiState>>,
    query: Query<NamespaceQuery>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    super::ingest::ingest(state, query, headers, body).await
}

#[utoipa::path(get, path = "/api/v1/documentevents/{name}", tag = "events", operation_id = "getDocumentEvent",
    params(("name" = String, Path), NamespaceParam),
    responses((status = 200, body = DocumentEvent), Problems))]
async fn get_document_event(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
    Query(q): Query<NamespaceQuery>,
    headers: HeaderMap,
) -> Result<Json<DocumentEvent>, ApiError> {
    let de = events::read_document_event(&state, &name, &q, &headers).await?;
    Ok(Json(DocumentEvent::new(&de)))
}

#[utoipa::path(get, path = "/api/v1/webhooks", tag = "webhooks", operation_id = "listWebhooks",
    params(NamespaceParam, PageQuery),
    responses((status = 200, body = WebhookPage), Problems))]
async fn list_webhooks(
    State(state): State<Arc<ApiState>>,
    Query(q): Query<NamespaceQuery>,
    Query(page): Query<PageQuery>,
    headers: HeaderMap,
) -> Result<Json<WebhookPage>, ApiError> {
    let limit = page.limit(DEFAULT_LIMIT)?;
    let c = caller(&state, &q, &headers, "list").await?;
    let mut params = ListParams::default().limit(limit);
    if let Some(cursor) = page.cursor.as_deref().filter(|c| !c.is_empty()) {
        params = params.continue_token(cursor);
    }
    let list = c.api.list(&params).await.map_err(|e| match e {
        // The API server's continue token outlived its revision (compacted).
        kube::Error::Api(s) if s.code == 410 => ApiError::new(
            StatusCode::GONE,
            Problem::CursorExpired,
            "the cursor expired (it lasts a few minutes); list again from the first page",
        ),
        kube::Error::Api(s) if s.code == 400 && page.cursor.is_some() => ApiError::new(
            StatusCode::BAD_REQUEST,
            Problem::InvalidQuery,
            "cursor is not one this API gave (pass next_cursor as it came)",
        ),
        e => ApiError::from_kube(e, "namespace"),
    })?;
    let items = list
        .items
        .iter()
        .map(|w| Webhook::read(w, webhooks::in_flight(&state, &c.namespace, w)))
        .collect();
    Ok(Json(WebhookPage {
        items,
        next_cursor: list.metadata.continue_.filter(|c| !c.is_empty()),
    }))
}

#[utoipa::path(post, path = "/api/v1/webhooks", tag = "webhooks", operation_id = "createWebhook",
    params(NamespaceParam), request_body = WebhookWrite,
    responses((status = 201, description = "Created, with its signing secret (shown once)", body = WebhookWithSecret), Problems))]
async fn create_webhook(
    State(state): State<Arc<ApiState>>,
    Query(q): Query<NamespaceQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<WebhookWithSecret>), ApiError> {
    let c = caller(&state, &q, &headers, "create").await?;
    let (write, _) = typed_body::<WebhookWrite>(&read_body(body).await?)?;
    let spec = webhooks::spec_of(writable_fields(&write, false), true)?;
    let (created, secret) = webhooks::create_webhook(&state, &c, spec).await?;
    Ok((
        StatusCode::CREATED,
        Json(WebhookWithSecret {
            webhook: Webhook::written(&created),
            secret,
            previous_expires_at: None,
        }),
    ))
}

/// A create or replace body as the unversioned API's fields; with `replace`, every field left
/// out is set to its default (null removes it).
fn writable_fields(write: &WebhookWrite, replace: bool) -> Map<String, Value> {
    let mut fields = Map::new();
    let mut put = |name: &str, value: Option<Value>| match value {
        Some(value) => {
            fields.insert(name.into(), value);
        }
        None if replace => {
            fields.insert(name.into(), Value::Null);
        }
        None => {}
    };
    put("url", write.url.clone().map(Value::from));
    put(
        "service_ref",
        write.service_ref.as_ref().map(|s| {
            let mut service = Map::new();
            service.insert("name".into(), s.name.clone().into());
            service.insert("port".into(), s.port.clone());
            if let Some(path) = &s.path {
                service.insert("path".into(), path.clone().into());
            }
            service.insert("ca_bundle".into(), s.ca_bundle.clone().into());
            Value::Object(service)
        }),
    );
    put(
        "events",
        Some(serde_json::to_value(&write.events).unwrap_or_default()),
    );
    put("description", write.description.clone().map(Value::from));
    put(
        "paused",
        write.paused.or(replace.then_some(false)).map(Value::from),
    );
    put("filter", write.filter.clone().map(Value::from));
    put(
        "headers",
        write
            .headers
            .as_ref()
            .map(|h| serde_json::to_value(h).unwrap_or_default()),
    );
    put(
        "rate_limit",
        write
            .rate_limit
            .map(|r| serde_json::to_value(r).unwrap_or_default()),
    );
    put(
        "ordering",
        write
            .ordering
            .as_ref()
            .map(|o| serde_json::to_value(o).unwrap_or_default()),
    );
    fields
}

#[utoipa::path(get, path = "/api/v1/webhooks/{id}", tag = "webhooks", operation_id = "getWebhook",
    params(("id" = String, Path), NamespaceParam),
    responses((status = 200, body = Webhook), Problems))]
async fn get_webhook(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(q): Query<NamespaceQuery>,
    headers: HeaderMap,
) -> Result<Json<Webhook>, ApiError> {
    let c = caller(&state, &q, &headers, "get").await?;
    let w = c.webhook(&id).await?;
    let in_flight = webhooks::in_flight(&state, &c.namespace, &w);
    Ok(Json(Webhook::read(&w, in_flight)))
}

#[utoipa::path(put, path = "/api/v1/webhooks/{id}", tag = "webhooks", operation_id = "replaceWebhook",
    params(("id" = String, Path), NamespaceParam), request_body = WebhookWrite,
    responses((status = 200, description = "Replaced: every writable field is the body's (left out: its default)", body = Webhook), Problems))]
async fn replace_webhook(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(q): Query<NamespaceQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Webhook>, ApiError> {
    let (write, _) = typed_body::<WebhookWrite>(&read_body(body).await?)?;
    let spec = webhooks::spec_of(writable_fields(&write, true), true)?;
    let c = caller(&state, &q, &headers, "update").await?;
    let updated = webhooks::patch_webhook(&c, &id, spec).await?;
    Ok(Json(Webhook::written(&updated)))
}

#[utoipa::path(patch, path = "/api/v1/webhooks/{id}", tag = "webhooks", operation_id = "patchWebhook",
    params(("id" = String, Path), NamespaceParam),
    request_body(content = WebhookPatch, content_type = "application/merge-patch+json"),
    responses((status = 200, body = Webhook), Problems))]
async fn patch_webhook(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(q): Query<NamespaceQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Webhook>, ApiError> {
    let (_, fields) = typed_body::<WebhookPatch>(&read_body(body).await?)?;
    let spec = webhooks::spec_of(fields, false)?;
    let c = webhooks::caller_for_change(&state, &q, &headers, &spec).await?;
    let updated = webhooks::patch_webhook(&c, &id, spec).await?;
    Ok(Json(Webhook::written(&updated)))
}

#[utoipa::path(delete, path = "/api/v1/webhooks/{id}", tag = "webhooks", operation_id = "deleteWebhook",
    params(("id" = String, Path), NamespaceParam),
    responses((status = 204, description = "Deleted, with the Secret the API generated for it"), Problems))]
async fn delete_webhook(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(q): Query<NamespaceQuery>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let c = caller(&state, &q, &headers, "delete").await?;
    webhooks::delete_webhook(&state, &c, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `?document_id=` or `?delivery_id=`: a search beyond the recent attempts.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SearchParams {
    /// Deliveries of the events whose `data.document_id` is this.
    #[allow(dead_code)]
    document_id: Option<String>,
    /// The delivery with this id (`X-Webhook-Delivery`).
    #[allow(dead_code)]
    delivery_id: Option<String>,
}

/// Where a page of attempts ends: the last attempt's time, delivery id and number, so that a
/// page is stable while newer attempts arrive.
fn attempt_cursor(a: &Attempt) -> String {
    let at = a.attempted_at.as_deref().unwrap_or_default();
    URL_SAFE_NO_PAD.encode(format!("{at}|{}|{}", a.delivery_id, a.attempt))
}

fn attempt_position(a: &Attempt) -> (String, String, i32) {
    (
        a.attempted_at.clone().unwrap_or_default(),
        a.delivery_id.clone(),
        a.attempt,
    )
}

fn parse_attempt_cursor(cursor: &str) -> Result<(String, String, i32), ApiError> {
    let invalid = || {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            Problem::InvalidQuery,
            "cursor is not one this API gave (pass next_cursor as it came)",
        )
    };
    let text = URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(invalid)?;
    let mut parts = text.splitn(3, '|');
    let (Some(at), Some(id), Some(attempt)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(invalid());
    };
    let attempt = attempt.parse().map_err(|_| invalid())?;
    Ok((at.to_owned(), id.to_owned(), attempt))
}

/// One page of `attempts`, newest first, after `cursor`.
fn attempt_page(
    mut attempts: Vec<Attempt>,
    limit: u32,
    cursor: Option<&str>,
) -> Result<(Vec<Attempt>, Option<String>), ApiError> {
    attempts.sort_by_key(|a| std::cmp::Reverse(attempt_position(a)));
    if let Some(cursor) = cursor.filter(|c| !c.is_empty()) {
        let after = parse_attempt_cursor(cursor)?;
        attempts.retain(|a| attempt_position(a) < after);
    }
    let more = attempts.len() > limit as usize;
    attempts.truncate(limit as usize);
    let next = more.then(|| attempts.last().map(attempt_cursor)).flatten();
    Ok((attempts, next))
}

#[utoipa::path(get, path = "/api/v1/webhooks/{id}/deliveries", tag = "deliveries", operation_id = "listDeliveries",
    params(("id" = String, Path), NamespaceParam, PageQuery, SearchParams),
    responses((status = 200, description = "The recent attempts (the Webhook's status keeps the last 20), or with document_id or delivery_id what is retained of those deliveries", body = AttemptPage), Problems))]
async fn list_deliveries(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(q): Query<NamespaceQuery>,
    Query(page): Query<PageQuery>,
    Query(search): Query<recover::SearchQuery>,
    headers: HeaderMap,
) -> Result<Json<AttemptPage>, ApiError> {
    let limit = page.limit(20)?;
    let c = caller(&state, &q, &headers, "get").await?;
    let lookup = search.lookup()?;
    let w = c.webhook(&id).await?;
    if let Some(lookup) = lookup {
        let (found, truncated) = recover::find_deliveries(&state, &c, &w, lookup).await?;
        let found = found
            .iter()
            .map(|found| match found {
                recover::Found::Recorded(r) => Attempt::recorded(r),
                recover::Found::Stored(de, t) => Attempt::stored(de, t),
            })
            .collect();
        let (items, next_cursor) = attempt_page(found, limit, page.cursor.as_deref())?;
        return Ok(Json(AttemptPage {
            items,
            next_cursor,
            truncated,
            stats: None,
        }));
    }
    let status = w.status.unwrap_or_default();
    let recent = status
        .recent_deliveries
        .iter()
        .map(Attempt::recorded)
        .collect();
    let (items, next_cursor) = attempt_page(recent, limit, page.cursor.as_deref())?;
    Ok(Json(AttemptPage {
        items,
        next_cursor,
        truncated: false,
        stats: Some((&status.delivery_stats).into()),
    }))
}

#[utoipa::path(post, path = "/api/v1/webhooks/{id}/test", tag = "deliveries", operation_id = "testWebhook",
    params(("id" = String, Path), NamespaceParam),
    responses((status = 200, description = "One signed test event was sent; its outcome", body = AttemptResult), Problems))]
async fn test_webhook(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(q): Query<NamespaceQuery>,
    headers: HeaderMap,
) -> Result<Json<AttemptResult>, ApiError> {
    let c = super::caller::caller_for_action(&state, &q, &headers, "test").await?;
    let (delivery_id, report) = webhooks::test_delivery(&state, &c, &id).await?;
    Ok(Json(AttemptResult::new(delivery_id, &report)))
}

#[utoipa::path(post, path = "/api/v1/webhooks/{id}/deliveries/{delivery_id}/redeliver", tag = "deliveries", operation_id = "redeliver",
    params(("id" = String, Path), ("delivery_id" = String, Path), NamespaceParam),
    responses((status = 200, description = "The stored event was sent again under the same delivery id; its outcome", body = AttemptResult), Problems))]
async fn redeliver(
    State(state): State<Arc<ApiState>>,
    Path((id, delivery_id)): Path<(String, String)>,
    Query(q): Query<NamespaceQuery>,
    headers: HeaderMap,
) -> Result<Json<AttemptResult>, ApiError> {
    let c = super::caller::caller_for_action(&state, &q, &headers, "redeliver").await?;
    let report = webhooks::redeliver_delivery(&state, &c, &id, &delivery_id).await?;
    Ok(Json(AttemptResult::new(delivery_id, &report)))
}

#[utoipa::path(post, path = "/api/v1/webhooks/{id}/resume", tag = "webhooks", operation_id = "resumeWebhook",
    params(("id" = String, Path), NamespaceParam),
    responses((status = 200, description = "Resumed: a suspension after failing too long is lifted", body = ResumedWebhook), Problems))]
async fn resume_webhook(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(q): Query<NamespaceQuery>,
    headers: HeaderMap,
) -> Result<Json<ResumedWebhook>, ApiError> {
    let c = super::caller::caller_for_action(&state, &q, &headers, "resume").await?;
    let (updated, at) = webhooks::resume_webhook(&c, &id).await?;
    Ok(Json(ResumedWebhook {
        webhook: Webhook::written(&updated),
        resumed_at: at.to_string(),
    }))
}

/// `?since=`: deliveries that failed since this time.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SinceParam {
    /// An RFC 3339 time, such as 2026-01-31T12:00:00Z.
    #[allow(dead_code)]
    since: String,
}

#[utoipa::path(post, path = "/api/v1/webhooks/{id}/recover", tag = "deliveries", operation_id = "recoverDeliveries",
    params(("id" = String, Path), NamespaceParam, SinceParam),
    responses((status = 200, description = "The deliveries that failed since then are queued again", body = Recovered), Problems))]
async fn recover_webhook(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(q): Query<NamespaceQuery>,
    Query(r): Query<recover::RecoverQuery>,
    headers: HeaderMap,
) -> Result<Json<Recovered>, ApiError> {
    let c = super::caller::caller_for_action(&state, &q, &headers, "recover").await?;
    let since = recover::parse_since(r.since.as_deref())?;
    let (queued, truncated) = recover::recover_failed(&state, &c, &id, since).await?;
    Ok(Json(Recovered { queued, truncated }))
}

#[utoipa::path(post, path = "/api/v1/webhooks/{id}/rotate-secret", tag = "webhooks", operation_id = "rotateSecret",
    params(("id" = String, Path), NamespaceParam),
    request_body(content = Option<RotateSecret>, description = "Optional"),
    responses((status = 200, description = "The new secret (shown once); the previous one signs too until previous_expires_at", body = WebhookWithSecret), Problems))]
async fn rotate_secret(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(q): Query<NamespaceQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<WebhookWithSecret>, ApiError> {
    let c = super::caller::caller_for_action(&state, &q, &headers, "rotate").await?;
    let body = read_body(body).await?;
    let request = if body.iter().all(u8::is_ascii_whitespace) {
        RotateSecret::default()
    } else {
        typed_body::<RotateSecret>(&body)?.0
    };
    let grace = webhooks::check_grace(
        request
            .grace_seconds
            .unwrap_or(webhooks::DEFAULT_GRACE_SECONDS),
    )?;
    let rotation = webhooks::rotate_webhook_secret(&state, &c, &id, grace).await?;
    Ok(Json(WebhookWithSecret {
        webhook: Webhook::written(&rotation.webhook),
        secret: rotation.secret,
        previous_expires_at: rotation.previous_expires_at.map(|t| t.to_string()),
    }))
}

/// The error responses every operation may give, as problem details.
struct Problems;

impl utoipa::IntoResponses for Problems {
    fn responses() -> std::collections::BTreeMap<
        String,
        utoipa::openapi::RefOr<utoipa::openapi::response::Response>,
    > {
        use utoipa::openapi::{Ref, RefOr, content::ContentBuilder, response::ResponseBuilder};
        let problem = || {
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ProblemDetails")))
                .build()
        };
        [
            (
                "4XX",
                "The request was refused: see the problem's type and detail",
            ),
            (
                "5XX",
                "The operator could not do it now; retry after Retry-After when given",
            ),
        ]
        .into_iter()
        .map(|(status, description)| {
            (
                status.to_owned(),
                RefOr::T(
                    ResponseBuilder::new()
                        .description(description)
                        .content("application/problem+json", problem())
                        .build(),
                ),
            )
        })
        .collect()
    }
}

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A Kubernetes token (a ServiceAccount's, projected with the operator's --token-audience), checked with a TokenReview; what it may do is what RBAC lets it do on Webhooks and DocumentEvents in the namespace",
                    ))
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "hookrelay API",
        version = "1",
        description = "Webhooks, their deliveries and event ingest. Errors are RFC 9457 problem details (application/problem+json); their types are the values of ProblemDetails.code under https://hookrelay.dev/problems/. The unversioned /api/webhooks calls of the document-processing contract keep working as they are.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        list_namespaces, ingest, get_document_event, list_webhooks, create_webhook, get_webhook,
        replace_webhook, patch_webhook, delete_webhook, list_deliveries, test_webhook, redeliver,
        resume_webhook, recover_webhook, rotate_secret,
    ),
    components(schemas(ProblemDetails, Problem)),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "webhooks", description = "Webhook resources: where and what to deliver"),
        (name = "deliveries", description = "Attempts, searches, test deliveries, redelivery and recovery"),
        (name = "events", description = "Event ingest and stored DocumentEvents"),
        (name = "namespaces", description = "The namespaces the caller may use"),
    ),
)]
struct ApiDoc;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checked_in_openapi_document_is_the_generated_one() {
        let checked_in = include_str!("../../../docs/openapi-v1.json");
        assert!(
            checked_in.trim_end() == openapi_json(),
            "docs/openapi-v1.json is not what the handlers generate: run `cargo run -q -- openapi > docs/openapi-v1.json`"
        );
    }

    #[test]
    fn the_api_guide_lists_every_problem_type() {
        let guide = include_str!("../../../docs/api.md");
        for problem in Problem::ALL {
            let row = format!("| `{}` | {} |", problem.code(), problem.title());
            assert!(guide.contains(&row), "docs/api.md lacks the row {row}");
        }
    }

    #[test]
    fn every_operation_has_an_id_a_tag_and_problem_responses() {
        let doc: Value = serde_json::from_str(&openapi_json()).unwrap();
        let mut ids = std::collections::BTreeSet::new();
        for (path, operations) in doc["paths"].as_object().unwrap() {
            assert!(path.starts_with(PREFIX), "{path}");
            for (method, op) in operations.as_object().unwrap() {
                let id = op["operationId"].as_str().unwrap_or_default();
                assert!(!id.is_empty(), "{method} {path} has no operationId");
                assert!(ids.insert(id.to_owned()), "operationId {id} twice");
                assert!(
                    op["tags"].as_array().is_some_and(|t| !t.is_empty()),
                    "{method} {path} has no tag"
                );
                for status in ["4XX", "5XX"] {
                    assert_eq!(
                        op["responses"][status]["content"]["application/problem+json"]["schema"]["$ref"],
                        "#/components/schemas/ProblemDetails",
                        "{method} {path} {status}"
                    );
                }
            }
        }
        assert!(ids.len() >= 15, "{ids:?}");
    }

    #[test]
    fn the_problem_types_listed_are_every_code() {
        let doc: Value = serde_json::from_str(&openapi_json()).unwrap();
        let listed: Vec<&str> = doc["components"]["schemas"]["Problem"]["enum"]
            .as_array()
            .expect("Problem lists its codes")
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let codes: Vec<&str> = Problem::ALL.iter().map(|p| p.code()).collect();
        assert_eq!(listed, codes);
    }

    #[tokio::test]
    async fn an_error_under_v1_is_problem_details_and_elsewhere_the_envelope() {
        use axum::body::to_bytes;
        use tower::ServiceExt;
        let app = Router::new()
            .route(
                "/api/v1/x",
                get(|| async {
                    let mut e = ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        Problem::QueueFull,
                        "full; retry",
                    )
                    .with_details(serde_json::json!({"stored": [0], "status": 1}));
                    e.retry_after = Some(2);
                    Err::<(), _>(e)
                }),
            )
            .route(
                "/api/x",
                get(|| async { Err::<(), _>(ApiError::not_found("no x")) }),
            )
            .layer(axum::middleware::from_fn(problem_details));
        let response = app
            .clone()
            .oneshot(Request::get("/api/v1/x").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        assert_eq!(response.headers()["retry-after"], "2");
        let body: ProblemDetails =
            serde_json::from_slice(&to_bytes(response.into_body(), 1 << 16).await.unwrap())
                .unwrap();
        assert_eq!(body.type_, "https://hookrelay.dev/problems/queue_full");
        assert_eq!((body.status, body.code), (429, Problem::QueueFull));
        assert_eq!(body.title, Problem::QueueFull.title());
        assert_eq!(
            (body.detail.as_str(), body.instance.as_str()),
            ("full; retry", "/api/v1/x")
        );
        // An extension member never hides a standard one.
        assert_eq!(
            serde_json::Value::Object(body.extensions),
            serde_json::json!({"stored": [0]})
        );

        let response = app
            .oneshot(Request::get("/api/x").body(Body::empty()).unwrap())
            .await
            .unwrap();
        let body: Value =
            serde_json::from_slice(&to_bytes(response.into_body(), 1 << 16).await.unwrap())
                .unwrap();
        assert_eq!(
            body,
            serde_json::json!({"error": {"code": "not_found", "message": "no x"}})
        );
    }

    #[test]
    fn attempts_page_newest_first_and_a_cursor_continues_after_the_last() {
        let attempt = |at: &str, id: &str, n: i32| Attempt {
            delivery_id: id.into(),
            event: "document.completed".into(),
            source: "direct".into(),
            attempt: n,
            outcome: None,
            http_status: None,
            duration_ms: None,
            attempted_at: Some(at.into()),
            error: None,
            document_event: None,
            state: None,
            document_id: None,
        };
        let all = vec![
            attempt("2026-01-01T00:00:01Z", "msg_a", 1),
            attempt("2026-01-01T00:00:03Z", "msg_b", 1),
            attempt("2026-01-01T00:00:02Z", "msg_a", 2),
        ];
        let (first, next) = attempt_page(all.clone(), 2, None).unwrap();
        assert_eq!(
            first
                .iter()
                .map(|a| (a.delivery_id.as_str(), a.attempt))
                .collect::<Vec<_>>(),
            [("msg_b", 1), ("msg_a", 2)]
        );
        let next = next.expect("a third item is left");
        // A newer attempt arriving between pages does not shift the next one.
        let mut more = all.clone();
        more.push(attempt("2026-01-01T00:00:09Z", "msg_c", 1));
        let (second, last) = attempt_page(more, 2, Some(&next)).unwrap();
        assert_eq!(second, vec![all[0].clone()]);
        assert_eq!(last, None);
        let bad = attempt_page(all, 2, Some("not a cursor")).unwrap_err();
        assert_eq!(bad.code, Problem::InvalidQuery);
    }

    #[test]
    fn replace_sets_every_field_left_out_to_its_default_and_create_leaves_it_out() {
        let write: WebhookWrite =
            serde_json::from_str(r#"{"url":"https://example.com/h","events":["*"]}"#).unwrap();
        let replace = writable_fields(&write, true);
        for field in [
            "service_ref",
            "description",
            "filter",
            "headers",
            "rate_limit",
            "ordering",
        ] {
            assert_eq!(replace[field], Value::Null, "{field}");
        }
        assert_eq!(replace["paused"], Value::Bool(false));
        let spec = webhooks::spec_of(replace, true).unwrap();
        assert_eq!(spec["serviceRef"], Value::Null);
        assert_eq!(spec["delivery"], serde_json::json!({"rateLimit": null}));
        let create = writable_fields(&write, false);
        assert_eq!(create.keys().collect::<Vec<_>>(), ["url", "events"]);
    }

    #[test]
    fn unknown_and_read_only_fields_are_refused_by_name() {
        let refused =
            typed_body::<WebhookWrite>(br#"{"url":"https://e.com","events":["*"],"id":"wh-1"}"#)
                .unwrap_err();
        assert_eq!(
            (refused.status, refused.code),
            (StatusCode::UNPROCESSABLE_ENTITY, Problem::Invalid)
        );
        assert!(
            refused.message.contains("unknown field `id`"),
            "{}",
            refused.message
        );
        let refused = typed_body::<WebhookPatch>(br#"{"graceSeconds":1}"#).unwrap_err();
        assert!(
            refused.message.contains("unknown field `graceSeconds`"),
            "{}",
            refused.message
        );
        let refused =
            typed_body::<WebhookWrite>(br#"{"url":"https://e.com","events":["document.done"]}"#)
                .unwrap_err();
        assert!(
            refused.message.contains("document.done"),
            "{}",
            refused.message
        );
        let malformed = typed_body::<WebhookPatch>(b"{").unwrap_err();
        assert_eq!(malformed.code, Problem::MalformedJson);
    }
}
