// `printcolumn(...)` repeats `type_ = ...` by design; clippy reads it as a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::WebhookEvent;

/// `Ready` condition reasons.
pub mod ready_reason {
    pub const ROUTED: &str = "Routed";
    pub const PAUSED: &str = "Paused";
    pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
    pub const SECRET_KEY_NOT_FOUND: &str = "SecretKeyNotFound";
    pub const SECRET_INVALID: &str = "SecretInvalid";
    pub const EGRESS_NOT_ALLOWED: &str = "EgressNotAllowed";
    pub const ENDPOINT_GONE: &str = "EndpointGone";
}

/// The key a Secret may hold besides the current one, signing too during a rotation.
pub const PREVIOUS_KEY: &str = "previous";

/// Only Secrets with this label set to "true" sign deliveries: whoever may write a Webhook must
/// not be able to make hookrelay sign with (or probe for) any other Secret of the namespace.
pub const SIGNING_SECRET_LABEL: &str = "hookrelay.dev/signing-secret";

/// A webhook endpoint and the document events it receives.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "hookrelay.dev",
    version = "v1alpha1",
    kind = "Webhook",
    namespaced,
    status = "WebhookStatus",
    shortname = "wh",
    category = "hookrelay",
    doc = "A webhook endpoint that receives signed document events",
    printcolumn(name = "URL", type_ = "string", json_path = ".spec.url"),
    printcolumn(name = "Events", type_ = "string", json_path = ".spec.events"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Last Delivery",
        type_ = "date",
        json_path = ".status.recentDeliveries[0].time"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct WebhookSpec {
    /// Absolute http(s) URL that receives the POSTs.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("isURL(self) && url(self).getScheme() in ['http', 'https'] && url(self).getHostname() != ''")
        .message("must be an absolute http or https URL, such as https://example.com/webhooks"))]
    pub url: String,

    /// Event types delivered to this endpoint; "*" means all of them.
    #[schemars(length(min = 1, max = 6))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub events: Vec<WebhookEvent>,

    /// Free text for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,

    /// The Secret key whose value signs every delivery.
    pub secret_ref: SecretKeyRef,

    /// While true, deliveries are held (not dropped) and sent once unpaused.
    #[serde(default)]
    pub paused: bool,

    /// Timeouts and retry schedule.
    #[serde(default)]
    pub delivery: DeliveryPolicy,

    /// Deliveries of events with the same key go one at a time, in the order accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordering: Option<Ordering>,
}

/// Per-key FIFO delivery to this Webhook.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Ordering {
    /// Field path into the event whose value keys the order, such as `data.document_id`. An
    /// event without it (or with an object, array or null there) is delivered unordered.
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = Rule::new("self.matches('^(event|data(\\\\.[A-Za-z0-9_-]+){1,8})$')")
        .message("key must be a field path into the event such as data.document_id: 'data' followed by up to 8 '.name' parts (letters, digits, '_' or '-'), or 'event'"))]
    pub key: String,
}

/// A key of a Secret in the Webhook's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret holding the signing secret; a `previous` key, if present, also signs
    /// during a rotation.
    #[serde(default = "default_secret_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_secret_key() -> String {
    "secret".into()
}

/// How deliveries are timed and retried.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.maxBackoffSeconds >= self.initialBackoffSeconds")
    .message("maxBackoffSeconds must not be less than initialBackoffSeconds"))]
pub struct DeliveryPolicy {
    /// Time allowed for one attempt, connect to response.
    #[serde(default = "default_timeout")]
    #[schemars(range(min = 1, max = 300))]
    pub timeout_seconds: i32,
    /// Attempts before a delivery is marked Failed.
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = 50))]
    pub max_attempts: i32,
    /// Wait before the first retry; doubles each attempt, with jitter.
    #[serde(default = "default_initial_backoff")]
    #[schemars(range(min = 1, max = 86400))]
    pub initial_backoff_seconds: i32,
    /// Upper bound of the wait between attempts.
    #[serde(default = "default_max_backoff")]
    #[schemars(range(min = 1, max = 86400))]
    pub max_backoff_seconds: i32,
    /// At most this many deliveries to this Webhook; the excess waits (spending no attempt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

/// A token bucket: `burst` deliveries at once, refilled at `perSecond`. Whole numbers: a
/// limit below one a second is no use for webhooks, and the Kubernetes API avoids floats.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// Deliveries a second, sustained.
    #[x_kube(validation = Rule::new("self >= 1 && self <= 10000")
        .message("perSecond must be a whole number of deliveries a second from 1 to 10000, such as 20"))]
    pub per_second: i32,
    /// Deliveries that may go at once after a quiet spell (default 1: evenly spaced).
    #[serde(default = "default_burst")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 10000")
        .message("burst must be a whole number from 1 to 10000, such as 1 (evenly spaced) or perSecond"))]
    pub burst: i32,
}

fn default_burst() -> i32 {
    1
}

fn default_timeout() -> i32 {
    10
}
fn default_max_attempts() -> i32 {
    8
}
fn default_initial_backoff() -> i32 {
    5
}
fn default_max_backoff() -> i32 {
    3600
}

impl Default for DeliveryPolicy {
    fn default() -> Self {
        Self {
            timeout_seconds: default_timeout(),
            max_attempts: default_max_attempts(),
            initial_backoff_seconds: default_initial_backoff(),
            max_backoff_seconds: default_max_backoff(),
            rate_limit: None,
        }
    }
}

/// What the operator observed about a Webhook.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookStatus {
    /// The generation the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` and `Degraded`.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Counters over the Webhook's lifetime.
    #[serde(default)]
    pub delivery_stats: DeliveryStats,
    /// The latest delivery attempts, newest first, bounded.
    #[serde(default)]
    pub recent_deliveries: Vec<DeliveryRecord>,
    /// With `spec.ordering`: keys whose oldest delivery is retrying and holds back the later
    /// events of its key; the 20 blocked longest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocked_keys: Vec<BlockedKey>,
}

/// A key of `spec.ordering` held back by a retrying delivery.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BlockedKey {
    pub key: String,
    /// The retrying delivery.
    pub delivery_id: String,
    /// Attempts it has made.
    pub attempts: i32,
    /// Later deliveries of the key waiting behind it (in this replica).
    pub waiting: i32,
    /// Since when the key is blocked.
    pub since: Time,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryStats {
    pub succeeded: i64,
    pub failed: i64,
    pub consecutive_failures: i64,
    pub last_success_time: Option<Time>,
    pub last_failure_time: Option<Time>,
}

/// One delivery attempt.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryRecord {
    /// Delivery id, the same on every retry (`X-Webhook-Delivery`, `webhook-id`).
    pub id: String,
    pub event: String,
    /// Where the event came from: a DocumentEvent name, `ingest`, `test` or `redeliver`.
    pub source: String,
    pub attempt: i32,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<i32>,
    pub duration_ms: i64,
    pub time: Time,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Outcome {
    /// A 2xx answer.
    Succeeded,
    /// Failed, another attempt is scheduled.
    Retrying,
    /// Failed for good: attempts exhausted, or the endpoint is gone.
    Failed,
}
