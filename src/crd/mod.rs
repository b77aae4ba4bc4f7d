//! The custom resources: the single source of the CRDs that `hookrelay crds` prints.
//!
//! Validation lives in the schema (OpenAPI + CEL) so that the API server itself refuses a bad
//! spec with a message naming the field; the operator re-checks only what the schema cannot know
//! (the egress policy, the Secret).

mod condition;
mod document_event;
mod event_type;
mod webhook;

pub use condition::{ConditionState, is_true, merge_condition};
pub use document_event::{
    DocumentEvent, DocumentEventSpec, DocumentEventStatus, EventPhase, TargetDelivery, TargetState,
};
pub use event_type::{EventType, UnknownEventType, WebhookEvent};
pub use webhook::{
    DeliveryPolicy, DeliveryRecord, DeliveryStats, Outcome, SecretKeyRef, Webhook, WebhookSpec,
    WebhookStatus,
};

use kube::CustomResourceExt;

/// API group of every hookrelay resource.
pub const GROUP: &str = "hookrelay.dev";

/// Both CRDs as one multi-document YAML stream, in a stable order.
pub fn crds_yaml() -> String {
    [Webhook::crd(), DocumentEvent::crd()]
        .iter()
        .map(|crd| serde_saphyr::to_string(crd).expect("a CRD always serializes to YAML"))
        .collect::<Vec<_>>()
        .join("---\n")
}
