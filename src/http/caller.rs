//! The caller of a Webhook endpoint of the REST API: authenticated, authorized for a verb on
//! the Webhooks of one namespace, with the API to reach them.

use axum::http::HeaderMap;
use kube::Api;

use super::{ApiState, NamespaceQuery, error::ApiError, is_object_name, namespace_for};
use crate::crd::Webhook;

pub(super) struct Caller {
    pub(super) namespace: String,
    pub(super) api: Api<Webhook>,
}

impl Caller {
    /// The Webhook `id` of the caller's namespace; 404 when there is none. An id that is no
    /// object name is 404 before it can reach an API path (`x%2Fstatus` is decoded to a
    /// subresource).
    pub(super) async fn webhook(&self, id: &str) -> Result<Webhook, ApiError> {
        if !is_object_name(id) {
            return Err(no_such_webhook(id));
        }
        self.api
            .get(id)
            .await
            .map_err(|e| ApiError::from_kube(e, &format!("webhook {id}")))
    }
}

pub(super) async fn caller(
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
