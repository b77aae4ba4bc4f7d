//! HTTP surfaces. On the listen port: the seed's REST API, event ingest and the OpenAPI
//! document. On the metrics port: `/metrics`, `/healthz`, `/readyz`.

mod auth;
mod error;
mod health;
mod ingest;
mod webhooks;

pub use auth::{Authorizer, Caller};
pub use error::ApiError;
pub use health::{Liveness, Readiness, metrics_router};
pub use ingest::{
    DirectIngest, IngestEvent, IngestMode, MAX_EVENTS_PER_REQUEST, check_idempotency_key,
    keyed_event_name, parse_events,
};

use std::sync::Arc;

use axum::{
    Router,
    extract::{DefaultBodyLimit, MatchedPath, Request},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use kube::Client;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{delivery::Dispatcher, metrics::Metrics, routing::Routes};

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
    (
        "post",
        "/api/webhooks/{id}/deliveries/{delivery_id}/redeliver",
    ),
    ("get", "/openapi.json"),
];

/// What every handler of the API shares.
pub struct ApiState {
    pub client: Client,
    pub auth: Authorizer,
    pub routes: Routes,
    pub dispatcher: Arc<Dispatcher>,
    pub ingest_mode: IngestMode,
    /// Direct mode: its queue (global and per namespace) and recent idempotency keys.
    pub direct: DirectIngest,
    /// How long a direct delivery may be held for a paused or blocked Webhook.
    pub direct_max_hold: std::time::Duration,
    /// Direct ingest waits for the routing table's first full sync.
    pub readiness: Readiness,
    pub metrics: Metrics,
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

/// The listen port's router.
pub fn api_router(state: Arc<ApiState>) -> Router {
    let metrics = state.metrics.clone();
    Router::new()
        .route("/api/events", post(ingest::ingest))
        .route("/api/webhooks", get(webhooks::list).post(webhooks::create))
        .route(
            "/api/webhooks/{id}",
            get(webhooks::get)
                .put(webhooks::update)
                .delete(webhooks::delete),
        )
        .route("/api/webhooks/{id}/deliveries", get(webhooks::deliveries))
        .route("/api/webhooks/{id}/test", post(webhooks::test))
        .route(
            "/api/webhooks/{id}/deliveries/{delivery_id}/redeliver",
            post(webhooks::redeliver),
        )
        .route(
            "/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        )
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not take that method",
            )
        })
        .layer(middleware::from_fn(json_body_errors))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(move |req, next| {
            count_requests(metrics.clone(), req, next)
        }))
        .with_state(state)
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
            "payload_too_large",
            format!("the body is larger than {MAX_BODY_BYTES} bytes"),
        )
        .into_response(),
        status if status.is_client_error() && !is_json && status != StatusCode::NOT_FOUND => {
            ApiError::new(
                status,
                "bad_request",
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
        method.as_str(),
        route.as_deref().unwrap_or("unmatched"),
        response.status().as_u16(),
    );
    response
}

/// Serves `router` on `listener` until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "listening");
    }
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
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
}
