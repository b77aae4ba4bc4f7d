//! HTTP surfaces. On the listen port: the contract's REST API, event ingest, the OpenAPI
//! document and the delivery log page (`/ui/`). On the metrics port: `/metrics`, `/healthz`, `/readyz`.

mod auth;
mod caller;
mod error;
mod events;
mod health;
mod ingest;
mod recover;
mod serve;
pub mod v1;
pub mod web;
mod webhooks;

pub use auth::{AuthSettings, Authorizer, Caller};
pub use error::{ApiError, Problem};
pub use health::metrics_router;
pub use ingest::{
    DirectIngest, IngestEvent, IngestMode, MAX_EVENTS_PER_REQUEST, PublishBudget,
    check_idempotency_key, keyed_event_name, parse_events,
};
pub use serve::{ServeLimits, Tls, serve};

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{DefaultBodyLimit, MatchedPath, Request, State},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use kube::Client;
use serde::Deserialize;

use crate::{delivery::Dispatcher, health::Readiness, metrics::Metrics, routing::Routes};

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The OpenAPI document of this API, kept in the repository and served at `/openapi.json`.
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

/// Every route of the listen port, as the OpenAPI document must list it.
pub const ROUTES: &[(&str, &str)] = &[
    ("post", "/api/events"),
    ("get", "/api/webhooks"),
    ("post", "/api/webhooks"),
    ("get", "/api/webhooks/{id}"),
    ("put", "/api/webhooks/{id}"),
    ("delete", "/api/webhooks/{id}"),
    ("get", "/api/webhooks/{id}/deliveries"),
    ("post", "/api/webhooks/{id}/test"),
    ("post", "/api/webhooks/{id}/recover"),
    ("post", "/api/webhooks/{id}/resume"),
    ("post", "/api/webhooks/{id}/rotate-secret"),
    (
        "post",
        "/api/webhooks/{id}/deliveries/{delivery_id}/redeliver",
    ),
    ("get", "/api/namespaces"),
    ("get", "/api/documentevents/{name}"),
    ("get", "/openapi.json"),
];

/// What every handler of the API shares.
pub struct ApiState {
    pub client: Client,
    pub auth: Authorizer,
    pub routes: Routes,
    pub dispatcher: Arc<Dispatcher>,
    pub ingest_mode: IngestMode,
    /// Durable mode: events created here go straight to this replica's DocumentEvent controller.
    pub created_events: crate::ports::CreatedEvents,
    /// Failed deliveries of DocumentEvents to send again go to this replica's DocumentEvent
    /// controller (`POST .../recover`; it runs on the leader).
    pub recoveries: crate::ports::Recoveries,
    /// JetStream mode: where ingest publishes.
    pub bus: Option<crate::delivery::jetstream::Bus>,
    /// JetStream mode: events being published now, bounded (`--nats-max-publishing`).
    pub jetstream_publishing: Arc<PublishBudget>,
    /// Direct mode: its queue (global and per namespace) and recent idempotency keys.
    pub direct: DirectIngest,
    /// How long a direct delivery may be held for a paused or blocked Webhook.
    pub direct_max_hold: std::time::Duration,
    /// Direct ingest waits for the routing table's first full sync.
    pub readiness: Readiness,
    /// Direct ingest, `/test` and `/redeliver` deliver from this replica, which only the leader
    /// may (it alone records attempts); a standby answers 503 `not_leader`.
    pub leadership: crate::leader::Leadership,
    /// Fired on SIGTERM: no new direct or manual delivery starts (its record could not be
    /// written any more).
    pub shutdown: tokio_util::sync::CancellationToken,
    pub metrics: Metrics,
    /// Longest a request may take, body included; then 408.
    pub request_timeout: Duration,
    /// `POST /api/webhooks/{id}/test` per Webhook (`namespace/name`), so it is no port scanner.
    pub test_limiter: WebhookLimiter,
    /// `POST /api/webhooks/{id}/recover` per Webhook: each call may publish 1,000 deliveries
    /// again.
    pub recover_limiter: WebhookLimiter,
    /// Recover and search calls reading the retained history at once, on this replica.
    pub history_reads: Arc<recover::HistoryReads>,
    /// `--trust-client-traces`: an ingest request's `traceparent` is the parent of its spans
    /// (otherwise only linked).
    pub trust_client_traces: bool,
}

/// A rate limit per Webhook (`namespace/name`), one token bucket each.
pub type WebhookLimiter = Arc<governor::DefaultKeyedRateLimiter<String>>;

/// One test delivery a second per Webhook, in bursts of up to three.
pub fn test_limiter() -> WebhookLimiter {
    let quota = governor::Quota::per_second(std::num::NonZeroU32::new(1).expect("1 > 0"))
        .allow_burst(std::num::NonZeroU32::new(3).expect("3 > 0"));
    Arc::new(governor::RateLimiter::keyed(quota))
}

/// One recover call per [`recover::RECOVER_EVERY`] per Webhook, in bursts of up to
/// [`recover::RECOVER_BURST`].
pub fn recover_limiter() -> WebhookLimiter {
    recover::limiter()
}

/// Recover and search calls reading history at once, at most [`recover::HISTORY_READS`].
pub fn history_reads() -> Arc<recover::HistoryReads> {
    Arc::new(recover::HistoryReads::new(
        recover::HISTORY_READS,
        recover::HISTORY_READ_WAIT,
    ))
}

/// Takes one token from the bucket of the Webhook `id` in `namespace`; otherwise 429
/// `rate_limited` with Retry-After, the message saying what is limited (`limit`, e.g. "test
/// deliveries to webhook w are limited to 1 a second (bursts of 3)") and when to retry.
pub fn take_webhook_token(
    limiter: &WebhookLimiter,
    namespace: &str,
    id: &str,
    limit: &str,
) -> Result<(), ApiError> {
    // Keyed by Webhooks that exist; the buckets of deleted ones are dropped now and then.
    if limiter.len() > 1024 {
        limiter.retain_recent();
    }
    let Err(not_until) = limiter.check_key(&format!("{namespace}/{id}")) else {
        return Ok(());
    };
    let wait = not_until.wait_time_from(governor::clock::Clock::now(
        &governor::clock::DefaultClock::default(),
    ));
    let retry_after = wait.as_secs_f64().ceil().max(1.0) as u64;
    let mut error = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        Problem::RateLimited,
        format!("{limit}; retry in {retry_after} s"),
    );
    error.retry_after = Some(retry_after);
    Err(error)
}

/// The body of a request, read only now (after authentication); 413 when over
/// [`MAX_BODY_BYTES`].
pub async fn read_body(body: Body) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|e| {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if too_large {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    Problem::PayloadTooLarge,
                    format!(
                        "the body is larger than {MAX_BODY_BYTES} bytes; send less per request"
                    ),
                )
            } else {
                ApiError::bad_request(format!("the body could not be read: {e}"))
            }
        })
}

/// How deep serde_json lets arrays and objects nest (its recursion limit, 128, stops at the
/// 128th level), which is what keeps a hostile body from overflowing the stack.
pub const MAX_JSON_DEPTH: usize = 127;

/// Parses a request body as JSON: 400 with what is wrong, and for a body nested past
/// [`MAX_JSON_DEPTH`] a message that says so (serde_json calls it a "recursion limit").
pub fn json_body(body: &[u8]) -> Result<serde_json::Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        if e.to_string().starts_with("recursion limit exceeded") {
            ApiError::bad_request(format!(
                "the body has arrays or objects nested more than {MAX_JSON_DEPTH} levels deep (at line {} column {}); send flatter JSON",
                e.line(),
                e.column()
            ))
        } else {
            ApiError::bad_request(format!("the body is not valid JSON: {e}"))
        }
    })
}

/// 422 unless `namespace` is one of `watched` (empty: every namespace is watched): an event
/// accepted there would never be delivered.
pub fn refuse_unwatched(namespace: &str, watched: &[String]) -> Result<(), ApiError> {
    if watched.is_empty() || watched.iter().any(|w| w == namespace) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        Problem::NamespaceNotWatched,
        // Which namespaces it watches is not said: they are other tenants' (GET /api/namespaces
        // lists those the caller may use).
        format!(
            "namespace {namespace:?} is not watched by this hookrelay: nothing there would be delivered; use a namespace it watches (GET /api/namespaces lists those you may use) or add it to hookrelay's --watch-namespace flag"
        ),
    ))
}

/// A Kubernetes object name (DNS-1123 subdomain): at most 253 characters of lowercase letters,
/// digits, '-' and '.', starting and ending with a letter or digit.
pub fn is_object_name(name: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 253
        && bytes.iter().all(|&b| alnum(b) || b == b'-' || b == b'.')
        && alnum(bytes[0])
        && alnum(bytes[bytes.len() - 1])
}

/// A delivery id as hookrelay makes them: `msg_` and lowercase hex or `_`.
pub fn is_delivery_id(id: &str) -> bool {
    id.len() <= 64
        && id.strip_prefix("msg_").is_some_and(|rest| {
            !rest.is_empty()
                && rest
                    .bytes()
                    .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || b == b'_')
        })
}

#[derive(Debug, Default, Deserialize)]
pub struct NamespaceQuery {
    pub namespace: Option<String>,
}

/// `?namespace=`, else the caller's ServiceAccount namespace, else `default`.
pub fn namespace_for(query: &NamespaceQuery, caller: &Caller) -> Result<String, ApiError> {
    let namespace = query
        .namespace
        .as_deref()
        .or(caller.service_account_namespace())
        .unwrap_or("default");
    let valid = !namespace.is_empty()
        && namespace.len() <= 63
        && namespace
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !namespace.starts_with('-')
        && !namespace.ends_with('-');
    if valid {
        Ok(namespace.to_owned())
    } else {
        Err(ApiError::invalid(format!(
            "{namespace:?} is not a valid namespace name"
        )))
    }
}

/// 503 `not_leader` on a standby, for what only the leader may do.
pub fn require_leader(state: &ApiState, what: &str) -> Result<(), ApiError> {
    refuse_if_stopping(state, what)?;
    if state.leadership.is_leader() {
        return Ok(());
    }
    Err(not_leader(what))
}

/// 503 `not_leader` on a replica that knows another one leads, for what the leader should do
/// when there is one (its attempt records reach only the leader's status writer): while no
/// replica is known to lead (the API server is away), any replica does it, and keeps the
/// records until it leads again.
pub fn require_no_other_leader(state: &ApiState, what: &str) -> Result<(), ApiError> {
    refuse_if_stopping(state, what)?;
    if state.leadership.another_leads() {
        return Err(not_leader(what));
    }
    Ok(())
}

fn refuse_if_stopping(state: &ApiState, what: &str) -> Result<(), ApiError> {
    if state.shutdown.is_cancelled() {
        let mut error = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Problem::ShuttingDown,
            format!("this replica is stopping: {what} is not started; retry"),
        );
        error.retry_after = Some(1);
        return Err(error);
    }
    Ok(())
}

fn not_leader(what: &str) -> ApiError {
    let mut error = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        Problem::NotLeader,
        format!(
            "this replica is a standby: {what} runs on the leader only (the holder of the Lease hookrelay); retry, or send it to the leader"
        ),
    );
    error.retry_after = Some(1);
    error
}

/// The listen port's router.
pub fn api_router(state: Arc<ApiState>) -> Router {
    let metrics = state.metrics.clone();
    let request_timeout = state.request_timeout;
    Router::new()
        .route("/api/events", post(ingest::ingest))
        .route("/api/namespaces", get(events::namespaces))
        .route("/api/documentevents/{name}", get(events::document_event))
        .route("/api/webhooks", get(webhooks::list).post(webhooks::create))
        .route(
            "/api/webhooks/{id}",
            get(webhooks::get)
                .put(webhooks::update)
                .delete(webhooks::delete),
        )
        .route("/api/webhooks/{id}/deliveries", get(webhooks::deliveries))
        .route("/api/webhooks/{id}/test", post(webhooks::test))
        .route("/api/webhooks/{id}/recover", post(recover::recover))
        .route("/api/webhooks/{id}/resume", post(webhooks::resume))
        .route(
            "/api/webhooks/{id}/rotate-secret",
            post(webhooks::rotate_secret),
        )
        .route(
            "/api/webhooks/{id}/deliveries/{delivery_id}/redeliver",
            post(webhooks::redeliver),
        )
        .merge(v1::routes())
        // Every /api route authenticates before any extractor reads the body.
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            authenticate_first,
        ))
        .route(
            "/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        )
        .route(
            "/api/v1/openapi.json",
            get(|| async { axum::Json(v1::openapi()) }),
        )
        // The page's files hold no data: served without auth (its API calls carry the token).
        .merge(web::router())
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                Problem::MethodNotAllowed,
                "this endpoint does not take that method",
            )
        })
        .layer(middleware::from_fn(json_body_errors))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(move |req, next| {
            limit_request_time(request_timeout, req, next)
        }))
        .layer(middleware::from_fn(move |req, next| {
            count_requests(metrics.clone(), req, next)
        }))
        .layer(middleware::from_fn(v1::problem_details))
        .with_state(state)
}

/// 401 before the body is read: an unauthenticated client cannot make the operator read (or
/// wait for) a megabyte. The handlers' own `authenticate` is then a cache hit.
async fn authenticate_first(
    State(state): State<Arc<ApiState>>,
    req: Request,
    next: Next,
) -> Response {
    match state.auth.authenticate(req.headers()).await {
        Ok(_) => next.run(req).await,
        Err(error) => error.into_response(),
    }
}

/// 408 when the whole request (reading the body included) takes longer than `limit`.
async fn limit_request_time(limit: Duration, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            Problem::RequestTimeout,
            format!(
                "the request took longer than {}s (hookrelay's --request-timeout); send the body at once and retry",
                limit.as_secs_f64()
            ),
        )
        .into_response(),
    }
}

/// Turns axum's plain-text refusals (body too large, ...) into the API's JSON errors.
async fn json_body_errors(req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    match response.status() {
        StatusCode::PAYLOAD_TOO_LARGE if !is_json => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Problem::PayloadTooLarge,
            format!(
                "the body is larger than {MAX_BODY_BYTES} bytes; send less per request (at most {MAX_EVENTS_PER_REQUEST} events)"
            ),
        )
        .into_response(),
        status if status.is_client_error() && !is_json && status != StatusCode::NOT_FOUND => {
            ApiError::new(
                status,
                Problem::BadRequest,
                status.canonical_reason().unwrap_or("bad request"),
            )
            .into_response()
        }
        _ => response,
    }
}

async fn count_requests(metrics: Metrics, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let method = req.method().clone();
    let response = next.run(req).await;
    metrics.observe_request(
        &method,
        route.as_deref().unwrap_or("unmatched"),
        response.status().as_u16(),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_lists_exactly_the_routes() {
        let doc: serde_json::Value =
            serde_json::from_str(OPENAPI).expect("docs/openapi.json is JSON");
        let mut documented: Vec<(String, String)> = doc["paths"]
            .as_object()
            .expect("paths")
            .iter()
            .flat_map(|(path, ops)| {
                ops.as_object()
                    .unwrap()
                    .keys()
                    .filter(|k| *k != "parameters")
                    .map(move |m| (m.clone(), path.clone()))
            })
            .collect();
        documented.sort();
        let mut routes: Vec<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        routes.sort();
        assert_eq!(
            documented, routes,
            "docs/openapi.json and the router disagree"
        );
    }

    #[test]
    fn namespace_comes_from_the_query_then_the_service_account_then_default() {
        let sa = Caller {
            username: "system:serviceaccount:docs:x".into(),
            uid: None,
            groups: vec![],
            extra: None,
        };
        let user = Caller {
            username: "jane".into(),
            uid: None,
            groups: vec![],
            extra: None,
        };
        let q = |ns: Option<&str>| NamespaceQuery {
            namespace: ns.map(str::to_owned),
        };
        assert_eq!(namespace_for(&q(Some("other")), &sa).unwrap(), "other");
        assert_eq!(namespace_for(&q(None), &sa).unwrap(), "docs");
        assert_eq!(namespace_for(&q(None), &user).unwrap(), "default");
        assert_eq!(
            namespace_for(&q(Some("Bad_NS")), &user).unwrap_err().status,
            StatusCode::UNPROCESSABLE_ENTITY
        );
    }

    #[tokio::test]
    async fn bodies_are_read_up_to_the_limit_then_413() {
        let fits = vec![b'x'; MAX_BODY_BYTES];
        assert_eq!(
            read_body(Body::from(fits.clone())).await.unwrap().len(),
            MAX_BODY_BYTES
        );
        let over = vec![b'x'; MAX_BODY_BYTES + 1];
        let refused = read_body(Body::from(over)).await.unwrap_err();
        assert_eq!(refused.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(refused.code, "payload_too_large");
    }

    #[test]
    fn json_nested_past_the_limit_is_a_clear_400_not_a_stack_overflow() {
        for body in [
            format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)),
            format!("{}1{}", "{\"a\":".repeat(100_000), "}".repeat(100_000)),
            "[".repeat(500_000),
        ] {
            let refused = json_body(body.as_bytes()).unwrap_err();
            assert_eq!(refused.status, StatusCode::BAD_REQUEST);
            assert!(
                refused.message.contains("nested more than 127 levels deep"),
                "{}",
                refused.message
            );
        }
        let at_the_limit = format!(
            "{}{}",
            "[".repeat(MAX_JSON_DEPTH),
            "]".repeat(MAX_JSON_DEPTH)
        );
        assert!(json_body(at_the_limit.as_bytes()).is_ok());
        let past_it = format!("[{at_the_limit}]");
        assert!(json_body(past_it.as_bytes()).is_err());
        let broken = json_body(b"{").unwrap_err();
        assert!(
            broken.message.starts_with("the body is not valid JSON"),
            "{}",
            broken.message
        );
    }

    #[test]
    fn only_watched_namespaces_are_served() {
        let watched = ["a".to_owned(), "b".to_owned()];
        assert!(refuse_unwatched("a", &watched).is_ok());
        assert!(refuse_unwatched("default", &[]).is_ok());
        let refused = refuse_unwatched("default", &watched).unwrap_err();
        assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(refused.code, "namespace_not_watched");
        assert!(
            !refused.message.contains("a, b") && refused.message.contains("--watch-namespace"),
            "{}",
            refused.message
        );
    }

    #[test]
    fn ids_in_paths_must_be_object_names() {
        for good in ["x", "wh-2bcdfghjkl", "a.b-c", &"a".repeat(253)] {
            assert!(is_object_name(good), "{good}");
        }
        for bad in [
            "",
            "x/status",
            "..",
            ".x",
            "x-",
            "X",
            "a b",
            "a%2Fb",
            "é",
            &"a".repeat(254),
        ] {
            assert!(!is_object_name(bad), "{bad}");
        }
        assert!(is_delivery_id("msg_0123456789abcdef0123456789abcdef"));
        assert!(is_delivery_id("msg_test_0123456789abcdef01234567"));
        for bad in [
            "msg_",
            "x",
            "msg_../status",
            "msg_A",
            &format!("msg_{}", "a".repeat(61)),
        ] {
            assert!(!is_delivery_id(bad), "{bad}");
        }
    }
}
