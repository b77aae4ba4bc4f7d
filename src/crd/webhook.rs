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
    pub const SERVICE_NOT_FOUND: &str = "ServiceNotFound";
    pub const SERVICE_PORT_NOT_FOUND: &str = "ServicePortNotFound";
    pub const SERVICE_NOT_ALLOWED: &str = "ServiceNotAllowed";
    pub const HEADERS_INVALID: &str = "HeadersInvalid";
    pub const FILTER_INVALID: &str = "FilterInvalid";
    pub const SECRET_NOT_BOUND: &str = "SecretNotBound";
    pub const FAILING_TOO_LONG: &str = "FailingTooLong";
}

/// The key a Secret may hold besides the current one, signing too during a rotation.
pub const PREVIOUS_KEY: &str = "previous";

/// On a Secret the API generated: when its `previous` key stops signing (RFC 3339), set by
/// `POST /api/webhooks/{id}/rotate-secret`.
pub const PREVIOUS_EXPIRES_ANNOTATION: &str = "hookrelay.dev/previous-expires-at";
/// Only Services with this label set to "true" receive deliveries through `spec.serviceRef`: a
/// Webhook's author must not be able to point hookrelay at any Service of the namespace (the
/// operator's own included) and read the first bytes of its answers back through `/test`.
pub const SERVICE_RECEIVER_LABEL: &str = "hookrelay.dev/webhook-receiver";

/// On a signing or `headersFrom` Secret: the names of the Webhooks of its namespace that may use
/// it, comma-separated. A Secret owned by a Webhook (as the REST API's generated ones are) is
/// bound to that Webhook too. A Secret bound to none may be used by any Webhook of its namespace,
/// as before bindings existed, and the operator warns when several do.
pub const WEBHOOKS_ANNOTATION: &str = "hookrelay.dev/webhooks";

/// On a Webhook (and a Secret the REST API generated): the user whose REST API call wrote it
/// last. The operator writes as itself; this, the field manager `hookrelay-api:<user>` and a log
/// line say for whom.
pub const CHANGED_BY_ANNOTATION: &str = "hookrelay.dev/changed-by";

/// Only Secrets with this label set to "true" sign deliveries: whoever may write a Webhook must
/// not be able to make hookrelay sign with (or probe for) any other Secret of the namespace.
pub const SIGNING_SECRET_LABEL: &str = "hookrelay.dev/signing-secret";

/// Only Secrets with this label set to "true" give `headersFrom` headers, for the same reason:
/// a Webhook's author must not be able to send any Secret of the namespace to an endpoint.
pub const HEADERS_SECRET_LABEL: &str = "hookrelay.dev/webhook-headers";

/// Headers `headers`/`headersFrom` cannot set (lowercase): hop-by-hop and framing headers, and
/// those hookrelay sends itself (identity, signatures, tracing), which a receiver must be able
/// to trust.
pub const RESERVED_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "host",
    "content-length",
    "content-type",
    "content-encoding",
    "user-agent",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "traceparent",
    "tracestate",
];
/// Prefixes of reserved header names (lowercase): `Proxy-*` and our `X-Webhook-*`.
pub const RESERVED_HEADER_PREFIXES: &[&str] = &["proxy-", "x-webhook-"];
/// At most this many custom headers, static and from the Secret together.
pub const MAX_HEADERS: usize = 32;
/// At most this many bytes per header value.
pub const MAX_HEADER_VALUE: usize = 1024;

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
    printcolumn(
        name = "Service",
        type_ = "string",
        json_path = ".spec.serviceRef.name"
    ),
    printcolumn(name = "Events", type_ = "string", json_path = ".spec.events"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
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
    ),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].message",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.url) != has(self.serviceRef)")
    .message("set exactly one of url (an address outside the cluster) and serviceRef (a Service of this namespace)"))]
pub struct WebhookSpec {
    /// Absolute http(s) URL that receives the POSTs (or `serviceRef`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("isURL(self) && url(self).getScheme() in ['http', 'https'] && url(self).getHostname() != ''")
        .message("must be an absolute http or https URL, such as https://example.com/webhooks"))]
    pub url: Option<String>,

    /// A Service of the Webhook's namespace that receives the POSTs, instead of `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_ref: Option<ServiceRef>,

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

    /// A CEL expression over the event (`event`, `timestamp`, `data`) that must be true for it to
    /// be delivered, e.g. `data.folder_id == 1 && data.status == "completed"`. An event the
    /// expression fails on (a missing field, say) is not delivered; `has(data.x)` tests first.
    ///
    /// The API server refuses the common shapes whose cost grows with the square of the event (a
    /// macro inside another's body, a macro body using `data` or `timestamp`, `matches` with a
    /// pattern that is not a literal); the operator checks the whole expression
    /// (`FilterInvalid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(validation = Rule::new("!self.matches('\\\\.(all|exists|exists_one|map|filter)\\\\([^)]*\\\\.(all|exists|exists_one|map|filter)\\\\(')")
        .message("a macro (all, exists, exists_one, map, filter) inside another is not allowed, as its cost grows with the square of the event: test the inner list separately"))]
    #[x_kube(validation = Rule::new("!self.matches('\\\\.(all|exists|exists_one|map|filter)\\\\(\\\\s*[A-Za-z_][A-Za-z0-9_]*\\\\s*,[^)]*\\\\b(data|timestamp)\\\\b')")
        .message("the body of a macro (all, exists, exists_one, map, filter) may use only its own variable, literals and event, so that the cost stays linear in the event: test data outside the macro, or compare with a literal list"))]
    #[x_kube(validation = Rule::new("!self.matches('\\\\.matches\\\\(\\\\s*[^\\\\s\\\\x27\\\\x22]')")
        .message("matches() takes a literal pattern, as in data.name.matches('^inv-[0-9]+$'): a pattern from the event would be compiled for every event"))]
    pub filter: Option<String>,
    /// Extra request headers, name to value (not secret: they are shown by kubectl).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    #[schemars(schema_with = "headers_schema")]
    pub headers: std::collections::BTreeMap<String, String>,

    /// Extra request headers from every key of a Secret (labelled
    /// `hookrelay.dev/webhook-headers: "true"`), for values that are secrets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers_from: Option<HeadersFrom>,
    /// Deliveries of events with the same key go one at a time, in the order accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordering: Option<Ordering>,
}

/// Where a Webhook delivers when it names a Service of its namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRef {
    /// Name of a Service (of type ClusterIP) in the Webhook's namespace.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')")
        .message("must be a Service name: lowercase letters, digits and '-', starting with a letter"))]
    pub name: String,
    /// The Service port, by name or by number.
    #[x_kube(validation = Rule::new("type(self) == int ? (self >= 1 && self <= 65535) : (size(self) <= 15 && self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'))")
        .message("must be a port number (1-65535) or the name of a port of the Service, such as http"))]
    pub port: k8s_openapi::apimachinery::pkg::util::intstr::IntOrString,
    /// Path (and query) of the request.
    #[serde(default = "default_service_path")]
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("must start with /, such as /webhooks"))]
    pub path: String,
    /// PEM CA certificates that sign the Service's certificate: deliveries then use https
    /// (trusting only these), otherwise plain http (which needs `--egress-allow-http`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 65536))]
    #[x_kube(validation = Rule::new("self.contains('-----BEGIN CERTIFICATE-----')")
        .message("must hold PEM certificates (-----BEGIN CERTIFICATE-----), such as the Service's CA"))]
    pub ca_bundle: Option<String>,
}

fn default_service_path() -> String {
    "/".into()
}

/// Headers from a Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeadersFrom {
    /// A Secret of the Webhook's namespace labelled `hookrelay.dev/webhook-headers: "true"`:
    /// each key is a header name, its value the header value.
    pub secret_ref: LocalSecretRef,
}

/// A Secret in the Webhook's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalSecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// The schema of `headers`: bounded, names that are HTTP tokens and not reserved, values on one
/// line. The same rules are checked in Rust for `headersFrom` (`delivery::custom_headers`).
fn headers_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let reserved = RESERVED_HEADERS
        .iter()
        .map(|h| format!("'{h}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let is_reserved = format!(
        "(k.lowerAscii() in [{reserved}] || {})",
        RESERVED_HEADER_PREFIXES
            .iter()
            .map(|p| format!("k.lowerAscii().startsWith('{p}')"))
            .collect::<Vec<_>>()
            .join(" || ")
    );
    let token = r#"k.matches("^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")"#;
    let value = r"self[k].matches('^[	 -~]*$')";
    schemars::json_schema!({
        "type": "object",
        "maxProperties": MAX_HEADERS,
        "additionalProperties": {"type": "string", "maxLength": MAX_HEADER_VALUE},
        "x-kubernetes-validations": [
            {
                "rule": format!("self.all(k, size(k) <= 128 && {token})"),
                "messageExpression": format!("'header names are HTTP tokens of at most 128 characters (letters, digits and !#$%&*+.^_|~-), not ' + self.filter(k, !(size(k) <= 128 && {token}))[0]"),
            },
            {
                "rule": format!("self.all(k, !{is_reserved})"),
                "messageExpression": format!("'header ' + self.filter(k, {is_reserved})[0] + ' cannot be set: hookrelay sends it itself or it is hop-by-hop; use a name of your own, such as X-Api-Key'"),
            },
            {
                "rule": format!("self.all(k, {value})"),
                "messageExpression": format!("'the value of header ' + self.filter(k, !{value})[0] + ' must be printable ASCII on one line'"),
            },
        ],
    })
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
    /// When every attempt has failed for this long (e.g. `72h`), deliveries are suspended (held)
    /// until the spec changes or `POST /api/webhooks/{id}/resume`; unset never suspends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+[hms])+$') && duration(self) >= duration('1s') && duration(self) <= duration('8760h')")
        .message("must be a duration of hours, minutes and seconds between 1s and 8760h, such as 72h, 30m or 1h30m"))]
    pub suspend_after_failing_for: Option<String>,
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
            suspend_after_failing_for: None,
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
    /// Set while deliveries are suspended because every attempt failed for longer than
    /// `spec.delivery.suspendAfterFailingFor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspended: Option<Suspension>,
    /// The last `POST /api/webhooks/{id}/resume`: failures before it do not count towards a
    /// suspension.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_at: Option<Time>,
    /// With `spec.ordering`: keys whose oldest delivery is retrying and holds back the later
    /// events of its key; the 20 blocked longest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocked_keys: Vec<BlockedKey>,
}

/// Why and since when deliveries to a Webhook are suspended.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Suspension {
    /// When deliveries were suspended.
    pub since: Time,
    /// Why, with the failing time that led to it.
    pub reason: String,
}

/// A key of `spec.ordering` held back by a retrying delivery.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BlockedKey {
    /// The ordering key.
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
    /// Deliveries that succeeded.
    pub succeeded: i64,
    /// Deliveries that failed for good (attempts or hold exhausted).
    pub failed: i64,
    /// Failed attempts since the last successful one.
    pub consecutive_failures: i64,
    /// When the last attempt succeeded.
    pub last_success_time: Option<Time>,
    /// When the last attempt failed.
    pub last_failure_time: Option<Time>,
    /// The first failed attempt after the last success: every attempt since has failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_since: Option<Time>,
}

/// One delivery attempt.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryRecord {
    /// Delivery id, the same on every retry (`X-Webhook-Delivery`, `webhook-id`).
    pub id: String,
    /// The event type.
    pub event: String,
    /// Where the event came from: a DocumentEvent name, `ingest`, `test` or `redeliver`.
    pub source: String,
    /// Which attempt of the delivery this was (1 the first; 0 a delivery that failed without
    /// one, such as a hold that ran out).
    pub attempt: i32,
    /// How the attempt ended.
    pub outcome: Outcome,
    /// The receiver's HTTP status, when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<i32>,
    /// How long the attempt took, in milliseconds.
    pub duration_ms: i64,
    /// When the attempt was made.
    pub time: Time,
    /// Why the attempt failed (never a secret).
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
