//! The end of a rotation's grace period: `POST /api/webhooks/{id}/rotate-secret` keeps the old
//! secret as `previous` in the generated Secret and records when it expires in an annotation;
//! at that time the leader removes both, and the Webhook controller (on every replica) sees the
//! Secret change and signs with the new secret only.
//!
//! Every replica schedules the removal from the Secrets it watches, so a new leader takes over
//! the ones pending; the removal reads the annotation, and patches with the Secret's
//! resourceVersion as a precondition, so it never removes a newer rotation's `previous`, and
//! doing it twice is harmless.

use std::{collections::HashMap, time::Duration};

use k8s_openapi::{api::core::v1::Secret, jiff::Timestamp};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use tokio::task::AbortHandle;

use crate::{
    crd::{PREVIOUS_EXPIRES_ANNOTATION, PREVIOUS_KEY},
    leader::Leadership,
};

/// The pending removals, one per Secret.
pub struct PreviousKeyExpiry {
    client: Option<Client>,
    leadership: Leadership,
    /// (namespace, name) -> (annotation value, the task waiting for it).
    scheduled: HashMap<(String, String), (String, AbortHandle)>,
}

impl Drop for PreviousKeyExpiry {
    fn drop(&mut self) {
        for (_, task) in self.scheduled.values() {
            task.abort();
        }
    }
}

impl PreviousKeyExpiry {
    pub fn new(client: Option<Client>, leadership: Leadership) -> Self {
        Self {
            client,
            leadership,
            scheduled: HashMap::new(),
        }
    }

    /// The Secret `namespace/name` now carries `expires` (None: no rotation pending, or the
    /// Secret was deleted).
    pub fn observe(&mut self, namespace: &str, name: &str, expires: Option<&str>) {
        let key = (namespace.to_owned(), name.to_owned());
        if self.scheduled.get(&key).map(|(at, _)| Some(at.as_str())) == Some(expires) {
            return;
        }
        let pending = self.scheduled.remove(&key);
        let Some(expires) = expires else {
            // Not aborted: the annotation disappears when our own removal lands, while its task
            // is still finishing (and logging); for a deleted Secret the task wakes once at the
            // expiry and finds nothing to do.
            return;
        };
        if let Some((_, task)) = pending {
            task.abort();
        }
        let Some(client) = self.client.clone() else {
            return;
        };
        let Ok(at) = expires.parse::<Timestamp>() else {
            tracing::warn!(secret = %format!("{namespace}/{name}"), expires, "ignoring an unreadable {PREVIOUS_EXPIRES_ANNOTATION} annotation");
            return;
        };
        let task = tokio::spawn(remove_at(
            client,
            self.leadership.clone(),
            key.clone(),
            expires.to_owned(),
            at,
        ));
        self.scheduled
            .insert(key, (expires.to_owned(), task.abort_handle()));
    }
}

async fn remove_at(
    client: Client,
    mut leadership: Leadership,
    (namespace, name): (String, String),
    expires: String,
    at: Timestamp,
) {
    let wait = at.duration_since(Timestamp::now());
    if wait.is_positive() {
        tokio::time::sleep(wait.unsigned_abs()).await;
    }
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    loop {
        while !leadership.is_leader() {
            if !leadership.changed().await {
                return;
            }
        }
        match remove_previous(&api, &name, &expires).await {
            Ok(false) => return,
            Ok(true) => {
                tracing::info!(secret = %format!("{namespace}/{name}"), "rotation grace period over: the previous secret no longer signs");
                return;
            }
            Err(kube::Error::Api(e)) if e.code == 404 => return,
            // Changed since it was read: rotated again, or anything else (a label, another
            // client's edit). Read it again: a new rotation is seen as such there, and any
            // other change must not leave the old key signing.
            Err(kube::Error::Api(e)) if e.code == 409 => {
                tracing::debug!(secret = %format!("{namespace}/{name}"), "the Secret changed while the previous secret was being removed; reading it again");
            }
            Err(error) => {
                tracing::warn!(secret = %format!("{namespace}/{name}"), %error, "removing the previous secret after its grace period failed; retrying");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
}

/// Removes `previous` and the annotation if the annotation still says `expires`, with the
/// Secret's resourceVersion as a precondition (409 when it changed since it was read). False:
/// nothing to remove (the Secret is gone, or carries no or another rotation).
async fn remove_previous(
    api: &Api<Secret>,
    name: &str,
    expires: &str,
) -> Result<bool, kube::Error> {
    let Some(secret) = api.get_opt(name).await? else {
        return Ok(false);
    };
    let current = secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(PREVIOUS_EXPIRES_ANNOTATION));
    if current.map(String::as_str) != Some(expires) {
        return Ok(false);
    }
    let patch = serde_json::json!({
        "metadata": {
            "resourceVersion": secret.metadata.resource_version,
            "annotations": {PREVIOUS_EXPIRES_ANNOTATION: null},
        },
        "data": {PREVIOUS_KEY: null},
    });
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| true)
}

#[cfg(test)]
mod tests {
    use http::{Request, Response};
    use kube::client::Body;

    use super::*;

    fn secret(version: &str, expires: Option<&str>) -> Vec<u8> {
        let mut annotations = serde_json::Map::new();
        if let Some(expires) = expires {
            annotations.insert(PREVIOUS_EXPIRES_ANNOTATION.into(), expires.into());
        }
        serde_json::to_vec(&serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "s", "namespace": "docs", "resourceVersion": version,
                "annotations": annotations},
            "data": {"secret": "bmV3", PREVIOUS_KEY: "b2xk"},
        }))
        .unwrap()
    }

    fn answer(code: u16, body: Vec<u8>) -> Response<Body> {
        Response::builder()
            .status(code)
            .body(Body::from(body))
            .unwrap()
    }

    /// A 409 means only that the Secret changed since it was read (a label, say), not that it
    /// was rotated again: the removal reads it again, and removes the old key when it is still
    /// this rotation's.
    #[tokio::test]
    async fn a_conflict_reads_the_secret_again_instead_of_leaving_the_old_key_signing() {
        let (service, mut api) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "docs");
        let expires = "2026-01-01T00:00:00Z";
        let removal = tokio::spawn(remove_at(
            client,
            Leadership::always(),
            ("docs".into(), "s".into()),
            expires.into(),
            Timestamp::UNIX_EPOCH,
        ));
        let mut patches = 0;
        for version in ["1", "2"] {
            let (request, send) = api.next_request().await.expect("a read");
            assert_eq!(request.method(), "GET");
            send.send_response(answer(200, secret(version, Some(expires))));
            let (request, send) = api.next_request().await.expect("a patch");
            assert_eq!(request.method(), "PATCH");
            patches += 1;
            if version == "1" {
                let status = serde_json::json!({"kind": "Status", "apiVersion": "v1",
                    "status": "Failure", "reason": "Conflict", "code": 409,
                    "message": "the object has been modified"});
                send.send_response(answer(409, serde_json::to_vec(&status).unwrap()));
            } else {
                send.send_response(answer(200, secret("3", None)));
            }
        }
        tokio::time::timeout(Duration::from_secs(5), removal)
            .await
            .expect("the removal ends once done")
            .unwrap();
        assert_eq!(
            patches, 2,
            "the previous secret was removed on the second try"
        );
    }

    /// Rotated again meanwhile: the annotation names another rotation, so nothing is removed.
    #[tokio::test]
    async fn a_newer_rotation_is_left_alone() {
        let (service, mut api) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "docs");
        let removal = tokio::spawn(remove_at(
            client,
            Leadership::always(),
            ("docs".into(), "s".into()),
            "2026-01-01T00:00:00Z".into(),
            Timestamp::UNIX_EPOCH,
        ));
        let (request, send) = api.next_request().await.expect("a read");
        assert_eq!(request.method(), "GET");
        send.send_response(answer(200, secret("5", Some("2026-02-01T00:00:00Z"))));
        tokio::time::timeout(Duration::from_secs(5), removal)
            .await
            .expect("the removal ends without a patch")
            .unwrap();
    }
}
