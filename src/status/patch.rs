//! The patches themselves: server-side apply on the status subresource, each under a timeout.

use std::{sync::Arc, time::Duration};

use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    runtime::events::{Event, EventType, Recorder},
};
use serde_json::json;
use tokio::sync::Semaphore;

use super::{
    CONTROLLER_MANAGER, DELIVERY_MANAGER, DeliveryLog, EventKey, ORDERING_MANAGER, ReadyUpdate,
    TransitionEvent,
};
use crate::{
    crd::{DocumentEvent, DocumentEventStatus, Webhook},
    keys::WebhookKey,
};

async fn with_timeout<T>(
    timeout: Duration,
    call: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, kube::Error> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result,
        Err(_) => Err(kube::Error::Service(
            format!("status patch timed out after {timeout:?}").into(),
        )),
    }
}

async fn apply_status<K>(
    api: &Api<K>,
    name: &str,
    manager: &str,
    body: serde_json::Value,
    timeout: Duration,
) -> Result<(), kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let params = PatchParams::apply(manager).force();
    let result = with_timeout(
        timeout,
        api.patch_status(name, &params, &Patch::Apply(&body)),
    )
    .await
    .map(|_| ());
    // A 409 is the uid precondition failing (the object was deleted and recreated: what we
    // hold belongs to the old one) or a plain conflict (write again). Only the object says.
    match (result, body["metadata"]["uid"].as_str()) {
        (Err(kube::Error::Api(e)), Some(uid)) if e.code == 409 => {
            match with_timeout(timeout, api.get_metadata_opt(name)).await {
                Ok(Some(current)) if current.metadata.uid.as_deref() == Some(uid) => {
                    Err(kube::Error::Api(e))
                }
                Ok(_) => Err(object_gone(name)),
                Err(error) => Err(error),
            }
        }
        (result, _) => result,
    }
}

/// What a write to an object that no longer exists (as the object written for) answers.
fn object_gone(name: &str) -> kube::Error {
    kube::Error::Api(
        kube::core::Status::failure(&format!("{name} was deleted or recreated"), "NotFound")
            .with_code(404)
            .boxed(),
    )
}

pub(super) async fn ready(
    client: &Client,
    key: &WebhookKey,
    update: &ReadyUpdate,
    timeout: Duration,
) -> Result<(), kube::Error> {
    let api: Api<Webhook> = Api::namespaced(client.clone(), &key.namespace);
    let mut body = json!({
        "apiVersion": "hookrelay.dev/v1alpha1",
        "kind": "Webhook",
        "status": {"observedGeneration": update.generation, "conditions": [update.condition]},
    });
    // Left out when not suspended: server-side apply then removes what this manager set before.
    if let Some(suspended) = &update.suspended {
        body["status"]["suspended"] = json!(suspended);
    }
    apply_status(&api, &key.name, CONTROLLER_MANAGER, body, timeout).await
}

/// Writes the Webhook's `status.blockedKeys` (to that very object), under its own field
/// manager: an empty list removes the field.
pub(super) async fn blocked_keys(
    client: &Client,
    key: &WebhookKey,
    uid: &str,
    keys: &[crate::crd::BlockedKey],
    timeout: Duration,
) -> Result<(), kube::Error> {
    let api: Api<Webhook> = Api::namespaced(client.clone(), &key.namespace);
    let status = if keys.is_empty() {
        json!({})
    } else {
        json!({"blockedKeys": keys})
    };
    let body = json!({
        "apiVersion": "hookrelay.dev/v1alpha1",
        "kind": "Webhook",
        "metadata": {"uid": uid},
        "status": status,
    });
    apply_status(&api, &key.name, ORDERING_MANAGER, body, timeout).await
}

/// How a Deliveries patch ended.
pub(super) struct DeliveriesOutcome {
    /// The log with the records in it; None when it could not be seeded.
    pub log: Option<DeliveryLog>,
    /// Records not yet in any log (seeding failed): to be written again.
    pub unrecorded: DeliveryLog,
    pub result: Result<(), kube::Error>,
}

/// Seeds the log from the status of the Webhook with `uid` when needed, adds `records`, and
/// writes it (to that very object: a recreated namesake answers 409).
pub(super) async fn deliveries(
    client: &Client,
    key: &WebhookKey,
    uid: &str,
    log: Option<DeliveryLog>,
    pending: DeliveryLog,
    timeout: Duration,
) -> DeliveriesOutcome {
    let api: Api<Webhook> = Api::namespaced(client.clone(), &key.namespace);
    let mut log = match log {
        Some(log) => log,
        None => match with_timeout(timeout, api.get_status(&key.name)).await {
            Ok(webhook) if webhook.metadata.uid.as_deref() == Some(uid) => {
                DeliveryLog::from_status(webhook.status.as_ref())
            }
            // Deleted and recreated since: the records belong to an object that is gone.
            Ok(_) => {
                return DeliveriesOutcome {
                    log: None,
                    unrecorded: DeliveryLog::default(),
                    result: Ok(()),
                };
            }
            Err(e) => {
                return DeliveriesOutcome {
                    log: None,
                    unrecorded: pending,
                    result: Err(e),
                };
            }
        },
    };
    log.absorb(pending, k8s_openapi::jiff::Timestamp::now());
    let body = json!({
        "apiVersion": "hookrelay.dev/v1alpha1",
        "kind": "Webhook",
        "metadata": {"uid": uid},
        "status": log.to_status(),
    });
    let result = apply_status(&api, &key.name, DELIVERY_MANAGER, body, timeout).await;
    DeliveriesOutcome {
        log: Some(log),
        unrecorded: DeliveryLog::default(),
        result,
    }
}

pub(super) async fn event(
    client: &Client,
    key: &EventKey,
    uid: &str,
    status: &DocumentEventStatus,
    timeout: Duration,
) -> Result<(), kube::Error> {
    let api: Api<DocumentEvent> = Api::namespaced(client.clone(), &key.namespace);
    // The uid makes the apply fail (409) rather than write a recreated namesake.
    let body = json!({
        "apiVersion": "hookrelay.dev/v1alpha1",
        "kind": "DocumentEvent",
        "metadata": {"uid": uid},
        "status": status,
    });
    apply_status(&api, &key.name, DELIVERY_MANAGER, body, timeout).await
}

/// Records a Kubernetes Event beside the status patches, bounded, never waited on.
pub(super) fn record_event(recorder: Recorder, limit: Arc<Semaphore>, event: TransitionEvent) {
    tokio::spawn(async move {
        let Ok(_permit) = limit.acquire_owned().await else {
            return;
        };
        let ev = Event {
            type_: if event.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: event.reason,
            note: Some(event.note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(error) = recorder.publish(&ev, &event.object).await {
            tracing::warn!(object = ?event.object.name, %error, "recording the Kubernetes Event failed");
        }
    });
}
