// `printcolumn(...)` repeats `type_ = ...` by design; clippy reads it as a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::EventType;

/// When ingest accepted a DocumentEvent (RFC 3339 with nanoseconds): its place among the
/// events of its ordering key, finer than `creationTimestamp`'s second.
pub const ACCEPTED_AT_ANNOTATION: &str = "hookrelay.dev/accepted-at";

/// A document event to deliver to the matching Webhooks of its namespace.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "hookrelay.dev",
    version = "v1alpha1",
    kind = "DocumentEvent",
    namespaced,
    status = "DocumentEventStatus",
    shortname = "docevent",
    shortname = "de",
    category = "hookrelay",
    doc = "A document event delivered to the matching Webhooks of its namespace",
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Delivered\")].message",
        priority = 1
    )
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("spec is immutable: create a new DocumentEvent"))]
pub struct DocumentEventSpec {
    /// The event type.
    #[serde(rename = "type")]
    pub type_: EventType,
    /// RFC 3339 time of the event, sent as is; defaults to the resource's creation time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), extend("format" = "date-time"))]
    pub timestamp: Option<String>,
    /// The event's `data` object, delivered unchanged.
    #[schemars(schema_with = "any_object")]
    pub data: serde_json::Map<String, serde_json::Value>,
}

fn any_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
        "description": "The event's data object, delivered unchanged."
    })
}

/// Where the delivery of an event stands.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DocumentEventStatus {
    /// The generation the status describes (the spec is immutable: always the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Delivered`: True once every delivery succeeded; False while delivering (reason
    /// `Delivering`), when a delivery failed for good (`Failed`) or when no Webhook matched
    /// (`NoSubscribers`), with the counts and the first failure in its message. For `kubectl
    /// wait --for=condition=Delivered`.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Pending (not routed yet), Delivering, Delivered (every target succeeded), Failed (a
    /// target exhausted its attempts or its hold) or NoSubscribers (no Webhook matched).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<EventPhase>,
    /// One entry per target Webhook, fixed when the event is first routed.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["webhook".into()]))]
    pub deliveries: Vec<TargetDelivery>,
    /// When every delivery reached its end (Delivered, Failed or NoSubscribers); retention counts
    /// from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum EventPhase {
    Pending,
    Delivering,
    Delivered,
    Failed,
    NoSubscribers,
}

/// The delivery of one event to one Webhook.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetDelivery {
    /// Name of the target Webhook.
    pub webhook: String,
    /// Delivery id, stable across retries.
    pub id: String,
    /// Where this delivery stands.
    pub state: TargetState,
    /// Attempts made so far.
    pub attempts: i32,
    /// The HTTP status of the last attempt, when the receiver answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<i32>,
    /// When the last attempt was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempt_time: Option<Time>,
    /// When the next retry is due, while retrying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_time: Option<Time>,
    /// Since when the delivery has been held (its Webhook paused or not Ready); it fails once
    /// held longer than the operator's `--max-hold`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_since: Option<Time>,
    /// Why the last attempt failed (never a secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl TargetDelivery {
    /// A delivery to `webhook` not attempted yet.
    pub fn new(webhook: String, id: String, state: TargetState) -> Self {
        Self {
            webhook,
            id,
            state,
            attempts: 0,
            http_status: None,
            last_attempt_time: None,
            next_attempt_time: None,
            held_since: None,
            error: None,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum TargetState {
    /// Waiting for its next attempt.
    Pending,
    /// Held while the Webhook is paused or not Ready for a reason a person fixes.
    Held,
    Succeeded,
    Failed,
}
