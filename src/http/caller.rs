//! The caller of a Webhook endpoint of the REST API: authenticated, authorized for a verb on
//! the Webhooks of one namespace, with the API to reach them and what its writes say of them.

use axum::http::{HeaderMap, StatusCode};
use kube::{
    Api,
    api::{PatchParams, PostParams},
};

use super::{ApiState, NamespaceQuery, error::ApiError, is_object_name, namespace_for};
use crate::crd::Webhook;

pub(super) struct Caller {
    pub(super) namespace: String,
    pub(super) api: Api<Webhook>,
    /// Who asked, as the API server authenticated them.
    pub(super) user: String,
}

impl Caller {
    fn new(state: &ApiState, namespace: String, user: String) -> Self {
        Self {
            api: Api::namespaced(state.client.clone(), &namespace),
            namespace,
            user,
        }
    }

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

    /// The field manager of the writes made for this caller: `hookrelay-api:<user>`, so that a
    /// Webhook's `managedFields` (and audit logs) say whose call changed what, although the
    /// operator writes as itself (it has no right to impersonate).
    pub(super) fn manager(&self) -> String {
        field_manager(&self.user)
    }

    pub(super) fn patch_params(&self) -> PatchParams {
        PatchParams {
            field_manager: Some(self.manager()),
            ..PatchParams::default()
        }
    }

    pub(super) fn post_params(&self) -> PostParams {
        PostParams {
            field_manager: Some(self.manager()),
            ..PostParams::default()
        }
    }

    /// Logs an action taken for this caller: who, what, on which object.
    pub(super) fn acted(&self, action: &str, object: &str) {
        tracing::info!(user = %self.user, namespace = %self.namespace, action, object, "REST API action");
    }
}

/// A field manager may be 128 bytes long at most.
const MAX_FIELD_MANAGER: usize = 128;

fn field_manager(user: &str) -> String {
    let mut manager = format!("hookrelay-api:{user}");
    if manager.len() > MAX_FIELD_MANAGER {
        let mut end = MAX_FIELD_MANAGER;
        while !manager.is_char_boundary(end) {
            end -= 1;
        }
        manager.truncate(end);
    }
    manager
}

/// The caller, authorized for `verb` on the Webhooks of its namespace.
pub(super) async fn caller(
    state: &ApiState,
    query: &NamespaceQuery,
    headers: &HeaderMap,
    verb: &'static str,
) -> Result<Caller, ApiError> {
    authorized(state, query, headers, verb, None).await
}

/// The caller, authorized for an action's own verb on Webhooks (`test`, `redeliver`, `recover`,
/// `pause`, `resume`, `rotate`), so that a role may allow the action without allowing `update`
/// (re-pointing a Webhook). `update` still allows every action, as it did before these verbs.
pub(super) async fn caller_for_action(
    state: &ApiState,
    query: &NamespaceQuery,
    headers: &HeaderMap,
    verb: &'static str,
) -> Result<Caller, ApiError> {
    authorized(state, query, headers, verb, Some("update")).await
}

/// The caller, authorized for `verb`, or else for `or_verb`.
async fn authorized(
    state: &ApiState,
    query: &NamespaceQuery,
    headers: &HeaderMap,
    verb: &'static str,
    or_verb: Option<&'static str>,
) -> Result<Caller, ApiError> {
    let caller = state.auth.authenticate(headers).await?;
    let namespace = namespace_for(query, &caller)?;
    let forbidden = |e: &ApiError| e.status == StatusCode::FORBIDDEN;
    let mut answer = state
        .auth
        .authorize(&caller, verb, "webhooks", &namespace)
        .await;
    if let (Err(refused), Some(or_verb)) = (&answer, or_verb)
        && forbidden(refused)
    {
        answer = state
            .auth
            .authorize(&caller, or_verb, "webhooks", &namespace)
            .await
            .map_err(|e| {
                if forbidden(&e) {
                    ApiError::forbidden(format!(
                        "{} may not {verb} webhooks.hookrelay.dev in namespace {namespace} (nor {or_verb} them, which allows it too)",
                        caller.username
                    ))
                } else {
                    e
                }
            });
    }
    answer?;
    Ok(Caller::new(state, namespace, caller.username))
}

fn no_such_webhook(id: &str) -> ApiError {
    ApiError::not_found(format!(
        "no webhook {id:?}: ids are Kubernetes object names (lowercase letters, digits, '-' and '.')"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_field_manager_names_the_user_within_128_bytes() {
        assert_eq!(
            field_manager("system:serviceaccount:team-a:support"),
            "hookrelay-api:system:serviceaccount:team-a:support"
        );
        let long = field_manager(&"é".repeat(100));
        assert!(long.len() <= MAX_FIELD_MANAGER && long.starts_with("hookrelay-api:é"));
    }
}
