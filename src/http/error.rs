//! Errors of the HTTP API: `{"error": {"code": ..., "message": ...}}` with the right status.

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<u64>,
    /// Extra fields merged into the error object (for example which events of a batch were
    /// stored), so that a client knows exactly what to retry. Boxed: errors stay small.
    pub details: Option<Box<Value>>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
            details: None,
        }
    }

    /// Adds the fields of `details` (a JSON object) to the error object.
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(Box::new(details));
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "malformed_json", message)
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// A Kubernetes API error, mapped to what it means for the caller.
    pub fn from_kube(error: kube::Error, what: &str) -> Self {
        match error {
            kube::Error::Api(e) => match e.code {
                404 => Self::not_found(format!("{what} not found")),
                409 => Self::new(StatusCode::CONFLICT, "conflict", e.message),
                // The API server's own validation (OpenAPI schema, CEL): the caller's mistake.
                400 | 422 => Self::invalid(e.message),
                403 => Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "operator_forbidden",
                    format!("the operator may not do this: {}", e.message),
                ),
                _ => Self::unavailable(format!(
                    "the Kubernetes API answered {}: {}",
                    e.code, e.message
                )),
            },
            other => Self::unavailable(format!("the Kubernetes API is unavailable: {other}")),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({"code": self.code, "message": self.message});
        if let (Some(Value::Object(details)), Some(fields)) =
            (self.details.map(|d| *d), error.as_object_mut())
        {
            for (k, v) in details {
                // `code` and `message` stay what they are.
                fields.entry(k).or_insert(v);
            }
        }
        let body = Json(json!({ "error": error }));
        let mut response = (self.status, body).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn details_are_merged_into_the_error_object() {
        let response = ApiError::new(StatusCode::CONFLICT, "conflict", "no")
            .with_details(
                json!({"stored": [{"index": 0, "name": "a"}], "not_stored": [1], "code": "x"}),
            )
            .into_response();
        assert_eq!(response.status(), StatusCode::CONFLICT);
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            body,
            json!({"error": {"code": "conflict", "message": "no",
                "stored": [{"index": 0, "name": "a"}], "not_stored": [1]}})
        );
    }
}
