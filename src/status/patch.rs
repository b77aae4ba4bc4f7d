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
    CONTROLLER_MANAGER, DELIVERY_MANAGER, DeliveryLog, EventKey, ReadyUpdate, TransitionEvent,
};
use crate::{
    crd::{DeliveryRecord, DocumentEvent, DocumentEventStatus, Webhook},
    routing::WebhookKey,
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
    with_timeout(
        timeout,
        api.patch_status(name, &params, &Patch::Apply(&body)),
    )
    .await
    .map(|_| ())
}

pub(super) async fn ready(
    client: &Client,
    key: &WebhookKey,
    update: &ReadyUpdate,
    timeout: Duration,
) -> Result<(), kube::Error> {
    let api: Api<Webhook> = Api::namespaced(client.clone(), &key.namespace);
    let body = json!({
        "apiVersion": "hookrelay.dev/v1alpha1",
        "kind": "Webhook",
        "status": {"observedGeneration": update.generation, "conditions": [update.condition]},
    });
    apply_status(&api, &key.name, CONTROLLER_MANAGER, body, timeout).await
}

/// Seeds the log from the Webhook's status when needed, adds `records`, and writes it. Returns
/// the log (None when it could not be seeded) with the result.
pub(super) async fn deliveries(
    client: &Client,
    key: &WebhookKey,
    log: Option<DeliveryLog>,
    records: Vec<DeliveryRecord>,
    timeout: Duration,
) -> (Option<DeliveryLog>, Result<(), kube::Error>) {
    let api: Api<Webhook> = Api::namespaced(client.clone(), &key.namespace);
    let mut log = match log {
        Some(log) => log,
        None => match with_timeout(timeout, api.get_status(&key.name)).await {
            Ok(webhook) => DeliveryLog::from_status(webhook.status.as_ref()),
            Err(e) => return (None, Err(e)),
        },
    };
    log.record(records, k8s_openapi::jiff::Timestamp::now());
    let body = json!({"apiVersion": "hookrelay.dev/v1alpha1", "kind": "Webhook", "status": log.to_status()});
    let result = apply_status(&api, &key.name, DELIVERY_MANAGER, body, timeout).await;
    (Some(log), result)
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
