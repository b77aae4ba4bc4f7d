//! The shapes of `/api/v1`: one name per value across every endpoint (`http_status`,
//! `duration_ms`, times as `*_at` in RFC 3339), snake_case throughout, lists as pages with a
//! cursor. The OpenAPI document is generated from these types, and a response that strays from
//! them fails the end-to-end tests, which read every answer with unknown fields refused.

use std::collections::BTreeMap;

use kube::ResourceExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::crd::{self, DeliveryRecord, Outcome, TargetDelivery, TargetState, WebhookEvent};
use crate::delivery::AttemptReport;

fn time(t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> String {
    t.0.to_string()
}

/// A Webhook: where and what to deliver (writable), and how it is doing (read-only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    /// The Webhook's name: the `{id}` of its paths.
    #[schema(example = "wh-x7k2p4bqzt")]
    pub id: String,
    pub namespace: String,
    /// The receiver's URL (https unless the operator allows http); null when it delivers to a
    /// Service. Credentials and query values are masked when read.
    #[schema(example = "https://your-application.com/webhooks/file-conversion")]
    pub url: Option<String>,
    pub service_ref: Option<ServiceRef>,
    /// Event types, such as `document.completed`, `document.error`, or `*` for every type.
    #[schema(example = json!(["document.completed", "document.error"]))]
    pub events: Vec<WebhookEvent>,
    pub description: Option<String>,
    /// A paused Webhook holds its deliveries until it is unpaused.
    pub paused: bool,
    /// A CEL expression over `event` and `data`; only events it is true for are delivered.
    #[schema(example = "data.folder_id == 12")]
    pub filter: Option<String>,
    /// Extra request headers sent with each delivery.
    pub headers: BTreeMap<String, String>,
    pub rate_limit: Option<RateLimit>,
    pub ordering: Option<Ordering>,
    pub created_at: Option<String>,
    /// The Ready condition: null until the operator has looked at the Webhook.
    pub ready: Option<bool>,
    /// Why it is (not) Ready, such as `SecretNotFound` or `EgressBlocked`.
    pub ready_reason: Option<String>,
    /// What to do about it, in words.
    pub ready_message: Option<String>,
    /// True after consecutive failed attempts (the Degraded condition).
    pub degraded: bool,
    pub degraded_reason: Option<String>,
    pub degraded_message: Option<String>,
    /// Set while deliveries are suspended after failing for too long.
    pub suspended: Option<Suspension>,
    /// Ordering keys whose line is blocked by a failing delivery.
    pub blocked_keys: Vec<BlockedKey>,
    /// Attempts this replica is sending to it now.
    pub in_flight: u64,
    pub last_delivery_at: Option<String>,
    /// The share of the recent attempts that succeeded; null without any.
    pub success_rate: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceRef {
    /// A Service in the Webhook's namespace.
    pub name: String,
    /// Its port: a number or a port name.
    #[schema(value_type = Object, example = 8080)]
    pub port: Value,
    #[serde(default)]
    pub path: Option<String>,
    /// PEM CA certificates to trust for an https port; null: plain http inside the cluster.
    #[serde(default)]
    pub ca_bundle: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub per_second: i32,
    #[serde(default)]
    pub burst: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Ordering {
    /// A CEL expression whose value is the ordering key, such as `data.document_id`.
    pub key: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Suspension {
    pub reason: String,
    pub suspended_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BlockedKey {
    pub key: String,
    pub delivery_id: String,
    pub attempts: i32,
    /// Deliveries waiting behind it.
    pub waiting: i32,
    pub blocked_at: String,
}

impl Webhook {
    /// The Webhook as a writer sees it (create, update: the URL whole).
    pub fn written(w: &crd::Webhook) -> Self {
        let status = w.status.clone().unwrap_or_default();
        let condition = |type_: &str| status.conditions.iter().find(|c| c.type_ == type_);
        let ready = condition("Ready");
        let degraded = condition("Degraded").filter(|c| c.status == "True");
        let service_ref = w.spec.service_ref.as_ref().map(|s| ServiceRef {
            name: s.name.clone(),
            port: serde_json::to_value(&s.port).unwrap_or(Value::Null),
            path: Some(s.path.clone()),
            ca_bundle: s.ca_bundle.clone(),
        });
        Self {
            id: w.name_any(),
            namespace: w.namespace().unwrap_or_default(),
            url: w.spec.url.clone(),
            service_ref,
            events: w.spec.events.clone(),
            description: w.spec.description.clone(),
            paused: w.spec.paused,
            filter: w.spec.filter.clone(),
            headers: w.spec.headers.clone(),
            rate_limit: w.spec.delivery.rate_limit.map(|r| RateLimit {
                per_second: r.per_second,
                burst: Some(r.burst),
            }),
            ordering: w
                .spec
                .ordering
                .as_ref()
                .map(|o| Ordering { key: o.key.clone() }),
            created_at: w.metadata.creation_timestamp.as_ref().map(time),
            ready: ready.map(|c| c.status == "True"),
            ready_reason: ready.map(|c| c.reason.clone()),
            ready_message: ready.map(|c| c.message.clone()),
            degraded: degraded.is_some(),
            degraded_reason: degraded.map(|c| c.reason.clone()),
            degraded_message: degraded.map(|c| c.message.clone()),
            suspended: status.suspended.as_ref().map(|s| Suspension {
                reason: s.reason.clone(),
                suspended_at: time(&s.since),
            }),
            blocked_keys: status
                .blocked_keys
                .iter()
                .map(|k| BlockedKey {
                    key: k.key.clone(),
                    delivery_id: k.delivery_id.clone(),
                    attempts: k.attempts,
                    waiting: k.waiting,
                    blocked_at: time(&k.since),
                })
                .collect(),
            in_flight: 0,
            last_delivery_at: crate::http::webhooks::last_delivery_at(&status)
                .map(|t| t.to_string()),
            success_rate: crate::http::webhooks::success_rate(&status.recent_deliveries),
        }
    }

    /// The Webhook as a reader sees it (list, get): credentials and query values in its URL
    /// masked, and what this replica is sending to it now.
    pub fn read(w: &crd::Webhook, in_flight: usize) -> Self {
        let mut json = Self::written(w);
        json.url = json.url.as_deref().map(crate::http::webhooks::masked_url);
        json.in_flight = in_flight as u64;
        json
    }
}

/// The writable fields of a Webhook, for create (`POST`) and replace (`PUT`): a field left out
/// takes its default. Unknown and read-only fields are refused.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookWrite {
    /// Required unless `service_ref` is given.
    #[serde(default)]
    #[schema(example = "https://your-application.com/webhooks/file-conversion")]
    pub url: Option<String>,
    #[serde(default)]
    pub service_ref: Option<ServiceRef>,
    #[schema(example = json!(["document.completed", "document.error"]))]
    pub events: Vec<WebhookEvent>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub paused: Option<bool>,
    #[serde(default)]
    pub filter: Option<String>,
    #[serde(default)]
    pub headers: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    #[serde(default)]
    pub ordering: Option<Ordering>,
}

/// A JSON merge patch (RFC 7396) of a Webhook's writable fields: a field left out stays as it
/// is, null removes it. Unknown and read-only fields are refused.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookPatch {
    #[schema(value_type = Option<String>)]
    pub url: Option<Value>,
    #[schema(value_type = Option<ServiceRef>)]
    pub service_ref: Option<Value>,
    #[schema(value_type = Option<Vec<String>>)]
    pub events: Option<Value>,
    #[schema(value_type = Option<String>)]
    pub description: Option<Value>,
    #[schema(value_type = Option<bool>)]
    pub paused: Option<Value>,
    #[schema(value_type = Option<String>)]
    pub filter: Option<Value>,
    #[schema(value_type = Option<BTreeMap<String, String>>)]
    pub headers: Option<Value>,
    #[schema(value_type = Option<RateLimit>)]
    pub rate_limit: Option<Value>,
    #[schema(value_type = Option<Ordering>)]
    pub ordering: Option<Value>,
}

/// A Webhook just created, or whose secret was just rotated, with its signing secret: shown
/// this once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookWithSecret {
    #[serde(flatten)]
    pub webhook: Webhook,
    /// `whsec_` and 32 random bytes in base64.
    pub secret: String,
    /// Rotation: until when the previous secret signs too (null: it stopped at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_expires_at: Option<String>,
}

/// A resumed Webhook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResumedWebhook {
    #[serde(flatten)]
    pub webhook: Webhook,
    /// From this time on, failures count again towards a suspension.
    pub resumed_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookPage {
    pub items: Vec<Webhook>,
    /// Pass as `?cursor=` for the next page; null on the last page. A cursor expires after a
    /// few minutes (`cursor_expired`): list again from the start.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateSecret {
    /// How long the previous secret keeps signing beside the new one, 0 to 604800 (7 days);
    /// default 86400.
    #[serde(default)]
    pub grace_seconds: Option<u64>,
}

/// The outcome of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum AttemptOutcome {
    /// A 2xx answer.
    Succeeded,
    /// Failed; another attempt is scheduled.
    Retrying,
    /// Failed for good: attempts exhausted, or the endpoint is gone.
    Failed,
}

impl From<Outcome> for AttemptOutcome {
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::Succeeded => Self::Succeeded,
            Outcome::Retrying => Self::Retrying,
            Outcome::Failed => Self::Failed,
        }
    }
}

/// Where one delivery (an event to a Webhook) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum DeliveryState {
    /// Waiting for its next attempt.
    Pending,
    /// Held while the Webhook is paused or not Ready for a reason a person fixes.
    Held,
    Succeeded,
    Failed,
}

impl From<TargetState> for DeliveryState {
    fn from(s: TargetState) -> Self {
        match s {
            TargetState::Pending => Self::Pending,
            TargetState::Held => Self::Held,
            TargetState::Succeeded => Self::Succeeded,
            TargetState::Failed => Self::Failed,
        }
    }
}

/// An attempt to deliver an event to a Webhook, or (found by `document_id`/`delivery_id`) where
/// a stored event's delivery stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Attempt {
    /// The delivery's id, as sent in `X-Webhook-Delivery` (the same for every attempt).
    pub delivery_id: String,
    #[schema(example = "document.completed")]
    pub event: String,
    /// What the event came from: a DocumentEvent's name, `direct`, `jetstream`, `test`, ...
    pub source: String,
    /// The attempt's number, from 1 (a stored delivery: attempts made so far).
    pub attempt: i32,
    /// Null for a stored delivery not attempted yet.
    pub outcome: Option<AttemptOutcome>,
    /// Null when no answer came (refused, timed out).
    pub http_status: Option<i32>,
    /// Request to response; null for a stored delivery.
    pub duration_ms: Option<i64>,
    pub attempted_at: Option<String>,
    pub error: Option<String>,
    /// The DocumentEvent of the event, when it was stored as one.
    pub document_event: Option<String>,
    /// Found deliveries of stored events: where they stand now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<DeliveryState>,
    /// Found deliveries of stored events: the event's `data.document_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub document_id: Option<Value>,
}

impl Attempt {
    pub fn recorded(r: &DeliveryRecord) -> Self {
        Self {
            delivery_id: r.id.clone(),
            event: r.event.clone(),
            source: r.source.clone(),
            attempt: r.attempt,
            outcome: Some(r.outcome.into()),
            http_status: r.http_status,
            duration_ms: Some(r.duration_ms),
            attempted_at: Some(time(&r.time)),
            error: r.error.clone(),
            document_event: crate::http::recover::document_event_of(r).map(str::to_owned),
            state: None,
            document_id: None,
        }
    }

    pub fn stored(de: &crd::DocumentEvent, t: &TargetDelivery) -> Self {
        let outcome = match t.state {
            TargetState::Succeeded => Some(AttemptOutcome::Succeeded),
            TargetState::Failed => Some(AttemptOutcome::Failed),
            TargetState::Pending if t.attempts > 0 => Some(AttemptOutcome::Retrying),
            TargetState::Pending | TargetState::Held => None,
        };
        Self {
            delivery_id: t.id.clone(),
            event: de.spec.type_.as_str().to_owned(),
            source: de.name_any(),
            attempt: t.attempts,
            outcome,
            http_status: t.http_status,
            duration_ms: None,
            attempted_at: t.last_attempt_time.as_ref().map(time),
            error: t.error.clone(),
            document_event: Some(de.name_any()),
            state: Some(t.state.into()),
            document_id: Some(
                de.spec
                    .data
                    .get("document_id")
                    .cloned()
                    .unwrap_or(Value::Null),
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttemptPage {
    /// Newest first.
    pub items: Vec<Attempt>,
    /// Pass as `?cursor=` for the next page; null on the last page.
    pub next_cursor: Option<String>,
    /// A search only: it stopped before the end of what is retained (at most 100 found).
    pub truncated: bool,
    /// Counters that outlive the recent attempts (absent from a search's answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<DeliveryStats>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeliveryStats {
    pub succeeded: i64,
    pub failed: i64,
    pub consecutive_failures: i64,
    pub last_success_at: Option<String>,
    pub last_failure_at: Option<String>,
    /// When the current run of failures began.
    pub failing_since_at: Option<String>,
}

impl From<&crd::DeliveryStats> for DeliveryStats {
    fn from(s: &crd::DeliveryStats) -> Self {
        Self {
            succeeded: s.succeeded,
            failed: s.failed,
            consecutive_failures: s.consecutive_failures,
            last_success_at: s.last_success_time.as_ref().map(time),
            last_failure_at: s.last_failure_time.as_ref().map(time),
            failing_since_at: s.failing_since.as_ref().map(time),
        }
    }
}

/// The answer to a test delivery or a redelivery: the attempt's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttemptResult {
    pub delivery_id: String,
    pub outcome: AttemptOutcome,
    pub http_status: Option<i32>,
    pub duration_ms: i64,
    pub error: Option<String>,
}

impl AttemptResult {
    pub fn new(delivery_id: String, report: &AttemptReport) -> Self {
        use crate::delivery::Verdict;
        Self {
            delivery_id,
            outcome: match report.verdict {
                Verdict::Succeeded => AttemptOutcome::Succeeded,
                Verdict::Retry(_) => AttemptOutcome::Retrying,
                Verdict::Failed | Verdict::Gone => AttemptOutcome::Failed,
            },
            http_status: report.http_status,
            duration_ms: report.duration.as_millis() as i64,
            error: report.error.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Recovered {
    /// Failed deliveries queued again.
    pub queued: usize,
    /// More failed than one call queues (1,000): call again.
    pub truncated: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Namespaces {
    /// True when the operator watches every namespace.
    pub all_namespaces: bool,
    /// The watched namespaces the caller may list Webhooks in.
    pub items: Vec<String>,
}

/// A stored event and where each of its deliveries stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DocumentEvent {
    pub name: String,
    pub namespace: String,
    #[schema(example = "document.completed")]
    pub event: String,
    /// The event's own time, else the time it was stored.
    pub timestamp: Option<String>,
    /// Who created it: `hookrelay-ingest` for the ingest API, `kubectl-create`, ...
    pub source: Option<String>,
    pub idempotency_key: Option<String>,
    pub created_at: Option<String>,
    /// `Pending`, `Delivered`, `Failed` or `PartiallyFailed`; null before the operator saw it.
    pub phase: Option<String>,
    pub completed_at: Option<String>,
    #[schema(value_type = Object)]
    pub data: Value,
    pub deliveries: Vec<EventDelivery>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventDelivery {
    pub webhook: String,
    pub delivery_id: String,
    pub state: DeliveryState,
    pub attempts: i32,
    pub http_status: Option<i32>,
    pub error: Option<String>,
    pub last_attempt_at: Option<String>,
    pub next_attempt_at: Option<String>,
    pub held_since_at: Option<String>,
}

impl DocumentEvent {
    pub fn new(de: &crd::DocumentEvent) -> Self {
        let status = de.status.clone().unwrap_or_default();
        let created_at = de.metadata.creation_timestamp.as_ref().map(time);
        Self {
            name: de.name_any(),
            namespace: de.namespace().unwrap_or_default(),
            event: de.spec.type_.as_str().to_owned(),
            timestamp: de.spec.timestamp.clone().or(created_at.clone()),
            source: crate::http::events::source_of(de),
            idempotency_key: de
                .annotations()
                .get(crate::http::ingest::IDEMPOTENCY_KEY_ANNOTATION)
                .cloned(),
            created_at,
            phase: status
                .phase
                .as_ref()
                .and_then(|p| serde_json::to_value(p).ok())
                .and_then(|v| v.as_str().map(str::to_owned)),
            completed_at: status.completion_time.as_ref().map(time),
            data: Value::Object(de.spec.data.clone()),
            deliveries: status
                .deliveries
                .iter()
                .map(|t| EventDelivery {
                    webhook: t.webhook.clone(),
                    delivery_id: t.id.clone(),
                    state: t.state.into(),
                    attempts: t.attempts,
                    http_status: t.http_status,
                    error: t.error.clone(),
                    last_attempt_at: t.last_attempt_time.as_ref().map(time),
                    next_attempt_at: t.next_attempt_time.as_ref().map(time),
                    held_since_at: t.held_since.as_ref().map(time),
                })
                .collect(),
        }
    }
}

/// Events accepted by `POST /api/v1/events`. Which fields are present depends on the ingest
/// mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Accepted {
    /// `direct`, `durable` or `jetstream`.
    pub mode: String,
    pub namespace: String,
    /// Events accepted (repeats of an idempotency key included).
    pub accepted: usize,
    /// Positions in the request of the events that repeated an earlier idempotency key.
    pub duplicates: Vec<usize>,
    /// Durable mode: the DocumentEvents the events are stored as, in request order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document_events: Option<Vec<String>>,
    /// JetStream mode: the events' ids in the stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<String>>,
    /// Direct mode: deliveries queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deliveries: Option<usize>,
    /// Direct mode: what it guarantees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guarantee: Option<String>,
    /// With an `Idempotency-Key`: how long a repeat is recognised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency: Option<String>,
}

/// An error, as RFC 9457 problem details (`application/problem+json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProblemDetails {
    /// `https://hookrelay.dev/problems/` and the code.
    #[schema(example = "https://hookrelay.dev/problems/queue_full")]
    #[serde(rename = "type")]
    pub type_: String,
    /// The same for every occurrence of the type.
    pub title: String,
    pub status: u16,
    /// What happened this time and what to do about it.
    pub detail: String,
    /// The request's path.
    pub instance: String,
    /// The type's last part, also the unversioned API's `error.code`.
    pub code: crate::http::error::Problem,
    /// Some problems add members saying exactly what happened, for example which events of a
    /// request were stored (`stored`, `not_stored`, `unknown`).
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extensions: serde_json::Map<String, Value>,
}
