//! `POST /api/events`: document events from services that do not speak the Kubernetes API.
//!
//! Durable (default): each event is stored as a DocumentEvent before the 202, so accepted means
//! delivered (at least once). Direct: dispatched from memory for the lowest latency, bounded by a
//! queue that answers 429 when full; at-most-once across an operator restart.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Json,
    body::Bytes,
    extract::{Query, State},
    http::{HeaderMap, StatusCode},
};
use futures::StreamExt;
use kube::{Api, api::PostParams};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{ApiState, NamespaceQuery, Readiness, error::ApiError, namespace_for};
use crate::{
    crd::{DocumentEvent, DocumentEventSpec, EventType},
    delivery::{Delivery, EventBody},
    routing::RoutingTable,
};

/// Events accepted in one request.
pub const MAX_EVENTS_PER_REQUEST: usize = 1000;

/// Longest idempotency key, in characters.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 200;

/// The header naming the one event of a request.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// The annotation holding the idempotency key on a DocumentEvent created with one.
pub const IDEMPOTENCY_KEY_ANNOTATION: &str = "hookrelay.dev/idempotency-key";

/// Direct mode remembers at most this many idempotency keys ...
pub const DIRECT_KEYS_REMEMBERED: u64 = 100_000;
/// ... for this long.
pub const DIRECT_KEY_WINDOW: Duration = Duration::from_secs(600);

const DURABLE_KEY_LIFETIME: &str = "an idempotency key lasts as long as its DocumentEvent is retained (--event-retention after delivery, --failed-event-retention after a failure)";
const DIRECT_KEY_LIFETIME: &str = "direct mode remembers an idempotency key in memory for 10 minutes (at most 100000 keys, not across a restart); a repeat after that is delivered again, with the same delivery ids";

/// One event of a request, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct IngestEvent {
    pub event: EventType,
    pub timestamp: Option<String>,
    pub data: Map<String, Value>,
    /// The client's name for the event (`id`, or the `Idempotency-Key` header of a single
    /// event): a repeat of the same key creates nothing twice.
    pub key: Option<String>,
}

/// How accepted events are handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum IngestMode {
    /// Stored as DocumentEvents before the reply: at-least-once.
    Durable,
    /// Dispatched from memory: lowest latency, at-most-once across a restart.
    Direct,
}

/// An idempotency key must be 1 to 200 printable ASCII characters, so that it fits an
/// annotation and a log line unchanged.
pub fn check_idempotency_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(format!(
            "must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} characters, got {}",
            key.len()
        ));
    }
    if let Some(c) = key.chars().find(|c| !(' '..='~').contains(c)) {
        return Err(format!(
            "must be printable ASCII, got {c:?}; use a UUID or a similar token"
        ));
    }
    Ok(())
}

/// The DocumentEvent name of a keyed event: deterministic, so that a retried request finds
/// what the first one stored instead of storing it again.
pub fn keyed_event_name(key: &str) -> String {
    format!("ev-{}", &hex::encode(Sha256::digest(key.as_bytes()))[..40])
}

/// The event id of a keyed direct event (delivery ids derive from it): deterministic, so that a
/// repeat outside the in-memory window still carries the same delivery ids.
fn keyed_direct_event_id(namespace: &str, key: &str) -> String {
    let digest = Sha256::new()
        .chain_update(b"direct\0")
        .chain_update(namespace)
        .chain_update(b"\0")
        .chain_update(key)
        .finalize();
    hex::encode(&digest[..16])
}

/// Parses a request body: one seed-shaped event or an array of them, with the request's
/// `Idempotency-Key` header if any. Pure, so every refusal is a unit test; nothing is created
/// unless every event is valid.
pub fn parse_events(
    body: &[u8],
    idempotency_key: Option<&[u8]>,
) -> Result<Vec<IngestEvent>, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    let (items, array) = match value {
        Value::Array(items) => (items, true),
        Value::Object(_) => (vec![value], false),
        _ => {
            return Err(ApiError::invalid(
                "expected an event object or an array of event objects",
            ));
        }
    };
    let header_key = match idempotency_key {
        None => None,
        Some(_) if array => {
            return Err(ApiError::invalid(
                "the Idempotency-Key header names a single event; in an array give each event an \"id\" field instead",
            ));
        }
        Some(bytes) => {
            let key = std::str::from_utf8(bytes).map_err(|_| {
                ApiError::invalid("the Idempotency-Key header must be printable ASCII")
            })?;
            check_idempotency_key(key)
                .map_err(|e| ApiError::invalid(format!("the Idempotency-Key header {e}")))?;
            Some(key.to_owned())
        }
    };
    if items.is_empty() {
        return Err(ApiError::invalid("the array holds no events"));
    }
    if items.len() > MAX_EVENTS_PER_REQUEST {
        return Err(ApiError::invalid(format!(
            "at most {MAX_EVENTS_PER_REQUEST} events per request, got {}",
            items.len()
        )));
    }
    let mut events = items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let at = if array { format!("events[{i}].") } else { String::new() };
            let Value::Object(mut obj) = item else {
                return Err(ApiError::invalid(format!("events[{i}] must be an object")));
            };
            let event = match obj.remove("event") {
                Some(Value::String(s)) => s.parse::<EventType>().map_err(|e| ApiError::invalid(format!("{at}event: {e}")))?,
                Some(_) => return Err(ApiError::invalid(format!("{at}event must be a string"))),
                None => return Err(ApiError::invalid(format!("{at}event is required"))),
            };
            let timestamp = match obj.remove("timestamp") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) if is_rfc3339(&s) => Some(s),
                Some(other) => {
                    return Err(ApiError::invalid(format!("{at}timestamp must be an RFC 3339 time such as 2023-06-15T10:35:00Z, got {other}")));
                }
            };
            let data = match obj.remove("data") {
                Some(Value::Object(data)) => data,
                Some(_) => return Err(ApiError::invalid(format!("{at}data must be a JSON object"))),
                None => return Err(ApiError::invalid(format!("{at}data is required"))),
            };
            let key = match obj.remove("id") {
                None | Some(Value::Null) => None,
                Some(Value::String(key)) => {
                    check_idempotency_key(&key).map_err(|e| ApiError::invalid(format!("{at}id {e}")))?;
                    Some(key)
                }
                Some(_) => return Err(ApiError::invalid(format!("{at}id must be a string"))),
            };
            Ok(IngestEvent { event, timestamp, data, key })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(header_key) = header_key {
        let event = &mut events[0];
        match &event.key {
            Some(id) if *id != header_key => {
                return Err(ApiError::invalid(
                    "the Idempotency-Key header and the event's \"id\" differ; send one of them",
                ));
            }
            _ => event.key = Some(header_key),
        }
    }
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, e) in events.iter().enumerate() {
        if let Some(key) = &e.key
            && let Some(first) = seen.insert(key, i)
        {
            return Err(ApiError::invalid(format!(
                "events[{i}].id repeats events[{first}].id; each event needs its own id"
            )));
        }
    }
    Ok(events)
}

/// RFC 3339 as the CRD's `date-time` takes it: at most 64 characters, a `T`, an offset, no
/// RFC 9557 annotations.
fn is_rfc3339(s: &str) -> bool {
    s.len() <= 64
        && !s.contains('[')
        && s.as_bytes()
            .get(10)
            .is_some_and(|b| b.eq_ignore_ascii_case(&b'T'))
        && s.parse::<k8s_openapi::jiff::Timestamp>().is_ok()
}

pub async fn ingest(
    State(state): State<Arc<ApiState>>,
    Query(query): Query<NamespaceQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let caller = state.auth.authenticate(&headers).await?;
    let namespace = namespace_for(&query, &caller)?;
    state
        .auth
        .authorize(&caller, "create", "documentevents", &namespace)
        .await?;
    let key = headers.get(IDEMPOTENCY_KEY_HEADER).map(|v| v.as_bytes());
    let events = parse_events(&body, key)?;
    match state.ingest_mode {
        IngestMode::Durable => durable(&state, &namespace, events).await,
        IngestMode::Direct => {
            super::require_leader(&state, "direct ingest")?;
            direct(&state, &namespace, events)
        }
    }
}

/// What became of one event of a durable request.
struct Stored {
    name: String,
    /// The key's DocumentEvent existed already, with the same content.
    duplicate: bool,
}

async fn durable(
    state: &ApiState,
    namespace: &str,
    events: Vec<IngestEvent>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let api: Api<DocumentEvent> = Api::namespaced(state.client.clone(), namespace);
    let keyed = events.iter().any(|e| e.key.is_some());
    let total = events.len();
    let results: Vec<Result<Stored, ApiError>> = futures::stream::iter(events)
        .map(|e| store(api.clone(), e))
        .buffered(16)
        .collect()
        .await;
    let mut stored = Vec::new();
    let mut not_stored = Vec::new();
    let mut first_error = None;
    let mut duplicates = Vec::new();
    let mut names = Vec::new();
    for (index, result) in results.into_iter().enumerate() {
        match result {
            Ok(s) => {
                stored.push(json!({"index": index, "name": s.name}));
                if s.duplicate {
                    duplicates.push(index);
                }
                names.push(s.name);
            }
            Err(e) => {
                not_stored.push(index);
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(mut error) = first_error {
        // Nothing is taken back: what was stored may be delivered already. The client learns
        // exactly which events to send again.
        error.message = format!(
            "{}; {} of {total} events were stored (\"stored\"), retry only those in \"not_stored\"{}",
            error.message,
            stored.len(),
            if keyed {
                ""
            } else {
                " (or give each event an \"id\", so that a whole request can be retried safely)"
            }
        );
        return Err(error.with_details(json!({"stored": stored, "not_stored": not_stored})));
    }
    let mut reply = json!({
        "mode": "durable",
        "namespace": namespace,
        "accepted": names.len(),
        "document_events": names,
        "duplicates": duplicates,
    });
    if keyed {
        reply["idempotency"] = DURABLE_KEY_LIFETIME.into();
    }
    Ok((StatusCode::ACCEPTED, Json(reply)))
}

/// Stores one event: with a key under the name derived from it, so that a repeat finds the
/// first one (same uid, so the same delivery ids); without one under a generated name.
async fn store(api: Api<DocumentEvent>, e: IngestEvent) -> Result<Stored, ApiError> {
    let spec = DocumentEventSpec {
        type_: e.event,
        timestamp: e.timestamp,
        data: e.data,
    };
    let mut de = DocumentEvent::new("", spec.clone());
    let Some(key) = e.key else {
        de.metadata.name = None;
        de.metadata.generate_name = Some(format!("{}-", e.event.as_str().replace('.', "-")));
        return match api.create(&PostParams::default(), &de).await {
            Ok(de) => Ok(Stored {
                name: de.metadata.name.unwrap_or_default(),
                duplicate: false,
            }),
            Err(error) => Err(ApiError::from_kube(error, "namespace")),
        };
    };
    let name = keyed_event_name(&key);
    de.metadata.name = Some(name.clone());
    de.metadata.annotations = Some([(IDEMPOTENCY_KEY_ANNOTATION.to_owned(), key.clone())].into());
    // Twice at most: the existing one may be deleted (retention) between create and get.
    for _ in 0..2 {
        match api.create(&PostParams::default(), &de).await {
            Ok(_) => {
                return Ok(Stored {
                    name,
                    duplicate: false,
                });
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(error) => return Err(ApiError::from_kube(error, "namespace")),
        }
        match api.get_opt(&name).await {
            Ok(Some(existing)) if existing.spec == spec => {
                return Ok(Stored {
                    name,
                    duplicate: true,
                });
            }
            Ok(Some(_)) => return Err(idempotency_conflict(&key)),
            Ok(None) => continue,
            Err(error) => return Err(ApiError::from_kube(error, "namespace")),
        }
    }
    Err(ApiError::unavailable(format!(
        "the DocumentEvent {name} of idempotency key {key:?} was being deleted; retry"
    )))
}

fn idempotency_conflict(key: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "idempotency_conflict",
        format!(
            "idempotency key {key:?} was already used for a different event (type, timestamp or data differ); use a new key for a new event"
        ),
    )
}

/// Direct-mode admission: the queue (global and per namespace) and the window of recent
/// idempotency keys.
pub struct DirectIngest {
    /// Direct deliveries not finished yet, all namespaces; full means 429.
    queue: Arc<Semaphore>,
    capacity: usize,
    /// The most one namespace may hold, so that one tenant (say with a paused Webhook) cannot
    /// take the whole queue.
    per_namespace: usize,
    /// Deliveries held per namespace; a namespace holding none has no entry.
    in_use: Arc<Mutex<HashMap<Arc<str>, usize>>>,
    /// (namespace, key) -> what was accepted under it.
    recent: moka::sync::Cache<(Arc<str>, Arc<str>), RecentEvent>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct RecentEvent {
    fingerprint: [u8; 32],
}

/// What a direct request may dispatch: its deliveries and the queue space they hold until the
/// last of them ends.
pub struct Admission {
    pub deliveries: Vec<Delivery>,
    pub permit: DirectPermit,
    pub accepted: usize,
    /// Indices of events whose key was seen with the same content: not dispatched again.
    pub duplicates: Vec<usize>,
    pub keyed: bool,
}

/// Queue space held by one direct request: given back when dropped.
pub struct DirectPermit {
    _global: OwnedSemaphorePermit,
    _share: NamespaceShare,
}

struct NamespaceShare {
    in_use: Arc<Mutex<HashMap<Arc<str>, usize>>>,
    namespace: Arc<str>,
    count: usize,
}

impl Drop for NamespaceShare {
    fn drop(&mut self) {
        if self.count == 0 {
            return;
        }
        let mut in_use = self.in_use.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = in_use.get_mut(&self.namespace) {
            *held = held.saturating_sub(self.count);
            if *held == 0 {
                // Idle namespaces leave the map, so that it stays as small as the active ones.
                in_use.remove(&self.namespace);
            }
        }
    }
}

impl DirectIngest {
    pub fn new(capacity: usize, per_namespace: usize) -> Self {
        Self {
            queue: Arc::new(Semaphore::new(capacity)),
            capacity,
            per_namespace,
            in_use: Arc::default(),
            recent: moka::sync::Cache::builder()
                .max_capacity(DIRECT_KEYS_REMEMBERED)
                .time_to_live(DIRECT_KEY_WINDOW)
                .build(),
        }
    }

    /// Deliveries held by `namespace` now.
    pub fn held_by(&self, namespace: &str) -> usize {
        let in_use = self.in_use.lock().unwrap_or_else(|e| e.into_inner());
        in_use.get(namespace).copied().unwrap_or(0)
    }

    /// Namespaces holding deliveries now.
    pub fn namespaces_holding(&self) -> usize {
        self.in_use.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn take_share(&self, namespace: &str, count: usize) -> Option<NamespaceShare> {
        let namespace: Arc<str> = namespace.into();
        if count > 0 {
            let mut in_use = self.in_use.lock().unwrap_or_else(|e| e.into_inner());
            let held = in_use.entry(namespace.clone()).or_insert(0);
            if *held + count > self.per_namespace {
                if *held == 0 {
                    in_use.remove(&namespace);
                }
                return None;
            }
            *held += count;
        }
        Some(NamespaceShare {
            in_use: self.in_use.clone(),
            namespace,
            count,
        })
    }

    /// Checks readiness, idempotency keys and capacity (before building anything), then
    /// builds the deliveries of `events` against `table`.
    pub fn admit(
        &self,
        readiness: &Readiness,
        table: &RoutingTable,
        namespace: &str,
        events: Vec<IngestEvent>,
    ) -> Result<Admission, ApiError> {
        if !readiness.is_ready() {
            // Before the first full list the routing table is incomplete: routing now would
            // silently drop events for Webhooks not listed yet.
            let mut error = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                format!(
                    "hookrelay is still loading its Webhooks (waiting for: {}); retry in a second",
                    readiness.pending().join(", ")
                ),
            );
            error.retry_after = Some(1);
            return Err(error);
        }
        let accepted = events.len();
        let keyed = events.iter().any(|e| e.key.is_some());
        let ns: Arc<str> = namespace.into();
        let mut duplicates = Vec::new();
        let mut new_events = Vec::new();
        for (index, e) in events.into_iter().enumerate() {
            let fingerprint = fingerprint(&e);
            if let Some(key) = &e.key {
                match self.recent.get(&(ns.clone(), Arc::from(key.as_str()))) {
                    Some(r) if r.fingerprint == fingerprint => {
                        duplicates.push(index);
                        continue;
                    }
                    Some(_) => return Err(idempotency_conflict(key)),
                    None => {}
                }
            }
            new_events.push((index, e, fingerprint));
        }

        // Capacity first: count the deliveries, build them only once there is room.
        let needed: usize = new_events
            .iter()
            .map(|(_, e, _)| table.lookup(namespace, e.event).count())
            .sum();
        for (limit, what) in [
            (self.capacity, "the direct queue holds"),
            (
                self.per_namespace,
                "one namespace may hold in the direct queue (--direct-queue-per-namespace)",
            ),
        ] {
            if needed > limit {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_many_deliveries",
                    format!(
                        "this request makes {needed} deliveries, more than {what} ({limit}); send fewer events per request"
                    ),
                ));
            }
        }
        let permits = u32::try_from(needed).unwrap_or(u32::MAX);
        let Ok(global) = self.queue.clone().try_acquire_many_owned(permits) else {
            return Err(queue_full(
                "queue_full",
                format!(
                    "the direct delivery queue is full ({} deliveries in flight, all namespaces); retry later or use durable ingest",
                    self.capacity
                ),
            ));
        };
        let Some(share) = self.take_share(namespace, needed) else {
            return Err(queue_full(
                "namespace_queue_full",
                format!(
                    "namespace {namespace} holds its whole share of the direct queue ({} deliveries, --direct-queue-per-namespace), for example for a paused Webhook; retry later or use durable ingest",
                    self.per_namespace
                ),
            ));
        };

        // Record the keys now that the events will be dispatched. A concurrent request with
        // the same key may have come first.
        let mut recorded = Vec::new();
        let mut to_send = Vec::new();
        for (index, e, fingerprint) in new_events {
            if let Some(key) = &e.key {
                let entry = self
                    .recent
                    .entry((ns.clone(), Arc::from(key.as_str())))
                    .or_insert_with(|| RecentEvent { fingerprint });
                if !entry.is_fresh() {
                    if entry.value().fingerprint == fingerprint {
                        duplicates.push(index);
                        continue;
                    }
                    for k in recorded {
                        self.recent.invalidate(&k);
                    }
                    return Err(idempotency_conflict(key));
                }
                recorded.push(entry.key().clone());
            }
            to_send.push(e);
        }
        duplicates.sort_unstable();

        let mut deliveries = Vec::with_capacity(needed);
        for e in to_send {
            let timestamp = e
                .timestamp
                .clone()
                .unwrap_or_else(|| k8s_openapi::jiff::Timestamp::now().to_string());
            let body = Arc::new(EventBody::new(e.event, &timestamp, &e.data));
            let event_id = match &e.key {
                Some(key) => keyed_direct_event_id(namespace, key),
                None => hex::encode(rand::random::<[u8; 16]>()),
            };
            deliveries.extend(table.lookup(namespace, e.event).map(|route| Delivery {
                webhook: route.key.clone(),
                webhook_uid: route.uid.as_str().into(),
                id: crate::delivery::delivery_id(&event_id, &route.uid),
                event: body.clone(),
                source: "ingest".into(),
                manual: false,
            }));
        }
        Ok(Admission {
            deliveries,
            permit: DirectPermit {
                _global: global,
                _share: share,
            },
            accepted,
            duplicates,
            keyed,
        })
    }
}

fn queue_full(code: &'static str, message: String) -> ApiError {
    let mut error = ApiError::new(StatusCode::TOO_MANY_REQUESTS, code, message);
    error.retry_after = Some(1);
    error
}

/// What makes two events with the same key the same event: type, timestamp and data, with
/// object keys in any order (as the durable path compares them).
fn fingerprint(e: &IngestEvent) -> [u8; 32] {
    fn feed(hasher: &mut Sha256, value: &Value) {
        match value {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort_unstable();
                hasher.update(b"{");
                for k in keys {
                    feed(hasher, &Value::String(k.clone()));
                    hasher.update(b":");
                    feed(hasher, &map[k]);
                }
                hasher.update(b"}");
            }
            Value::Array(items) => {
                hasher.update(b"[");
                for item in items {
                    feed(hasher, item);
                    hasher.update(b",");
                }
                hasher.update(b"]");
            }
            scalar => hasher.update(scalar.to_string().as_bytes()),
        }
    }
    let mut hasher = Sha256::new();
    hasher.update(e.event.as_str());
    hasher.update(b"\0");
    hasher.update(e.timestamp.as_deref().unwrap_or("-"));
    hasher.update(b"\0");
    feed(&mut hasher, &Value::Object(e.data.clone()));
    hasher.finalize().into()
}

fn direct(
    state: &ApiState,
    namespace: &str,
    events: Vec<IngestEvent>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let table = state.routes.snapshot();
    let admission = state
        .direct
        .admit(&state.readiness, &table, namespace, events)?;
    let count = admission.deliveries.len();
    let permit = Arc::new(admission.permit);
    for delivery in admission.deliveries {
        let (dispatcher, permit, max_hold) = (
            state.dispatcher.clone(),
            permit.clone(),
            state.direct_max_hold,
        );
        tokio::spawn(async move {
            crate::delivery::deliver_unrecorded(&dispatcher, delivery, max_hold).await;
            drop(permit);
        });
    }
    let mut reply = json!({
        "mode": "direct",
        "namespace": namespace,
        "accepted": admission.accepted,
        "deliveries": count,
        "duplicates": admission.duplicates,
        "guarantee": "at-most-once across an operator restart: events are not stored",
    });
    if admission.keyed {
        reply["idempotency"] = DIRECT_KEY_LIFETIME.into();
    }
    Ok((StatusCode::ACCEPTED, Json(reply)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(body: &str) -> u16 {
        parse_events(body.as_bytes(), None)
            .err()
            .map(|e| e.status.as_u16())
            .unwrap_or(202)
    }

    #[test]
    fn the_seed_payload_is_accepted_alone_or_in_an_array() {
        let one = r#"{"event":"document.completed","timestamp":"2023-06-15T10:35:00Z","data":{"document_id":123}}"#;
        let parsed = parse_events(one.as_bytes(), None).unwrap();
        assert_eq!(parsed[0].event, EventType::Completed);
        assert_eq!(parsed[0].timestamp.as_deref(), Some("2023-06-15T10:35:00Z"));
        assert_eq!(
            parse_events(format!("[{one},{one}]").as_bytes(), None)
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            code(r#"{"event":"document.error","data":{}}"#),
            202,
            "timestamp is optional"
        );
    }

    #[test]
    fn bad_bodies_get_400_or_422_with_the_field_named() {
        assert_eq!(code("{"), 400);
        assert_eq!(code(""), 400);
        assert_eq!(code("42"), 422);
        assert_eq!(code("[]"), 422);
        assert_eq!(code("[1]"), 422);
        assert_eq!(code(r#"{"data":{}}"#), 422);
        assert_eq!(code(r#"{"event":"document.archived","data":{}}"#), 422);
        assert_eq!(code(r#"{"event":7,"data":{}}"#), 422);
        assert_eq!(code(r#"{"event":"document.error"}"#), 422);
        assert_eq!(code(r#"{"event":"document.error","data":[1]}"#), 422);
        assert_eq!(
            code(r#"{"event":"document.error","timestamp":"yesterday","data":{}}"#),
            422
        );
        let e = parse_events(
            br#"[{"event":"document.error","data":{}},{"event":"nope","data":{}}]"#,
            None,
        )
        .unwrap_err();
        assert!(
            e.message
                .starts_with("events[1].event: unknown event type \"nope\""),
            "{}",
            e.message
        );
        let many = format!(
            "[{}]",
            vec![r#"{"event":"document.error","data":{}}"#; MAX_EVENTS_PER_REQUEST + 1].join(",")
        );
        assert_eq!(code(&many), 422);
    }
}

#[cfg(test)]
mod idempotency_and_direct_tests {
    use super::*;
    use crate::{
        crd::{DeliveryPolicy, WebhookEvent},
        routing::{Route, RouteState, WebhookKey},
    };

    fn event(body: &str) -> IngestEvent {
        parse_events(body.as_bytes(), None).unwrap().pop().unwrap()
    }

    fn table(routes: &[(&str, &str)]) -> RoutingTable {
        let mut t = RoutingTable::default();
        for (ns, name) in routes {
            t.apply(Route {
                key: WebhookKey::new(ns, name),
                uid: format!("uid-{ns}-{name}"),
                generation: 1,
                url: format!("https://example.com/{name}"),
                events: vec![WebhookEvent::All],
                signer: None,
                delivery: DeliveryPolicy::default(),
                state: RouteState::Active,
                superseded: Default::default(),
            });
        }
        t
    }

    fn ready() -> Readiness {
        let r = Readiness::new(&["webhooks"]);
        r.mark_ready("webhooks");
        r
    }

    #[test]
    fn idempotency_keys_are_1_to_200_printable_ascii_characters() {
        assert!(check_idempotency_key("a").is_ok());
        assert!(check_idempotency_key("order-123/attempt 1:~").is_ok());
        assert!(check_idempotency_key(&"k".repeat(200)).is_ok());
        assert!(check_idempotency_key("").is_err());
        assert!(check_idempotency_key(&"k".repeat(201)).is_err());
        assert!(check_idempotency_key("tab\there").is_err());
        assert!(check_idempotency_key("caf\u{e9}").is_err());
    }

    #[test]
    fn a_key_names_one_document_event_deterministically() {
        let name = keyed_event_name("order-123");
        assert_eq!(name, keyed_event_name("order-123"));
        assert_ne!(name, keyed_event_name("order-124"));
        assert!(name.starts_with("ev-") && name.len() == 43, "{name}");
        assert!(
            name[3..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        // The longest key still makes a valid object name.
        assert_eq!(keyed_event_name(&"~".repeat(200)).len(), 43);
    }

    #[test]
    fn keys_come_from_the_header_for_one_event_or_an_id_per_event() {
        let one = r#"{"event":"document.error","data":{}}"#;
        let parsed = parse_events(one.as_bytes(), Some(b"k1")).unwrap();
        assert_eq!(parsed[0].key.as_deref(), Some("k1"));
        let with_id = r#"{"event":"document.error","id":"k1","data":{}}"#;
        assert_eq!(
            parse_events(with_id.as_bytes(), Some(b"k1")).unwrap()[0]
                .key
                .as_deref(),
            Some("k1")
        );
        let batch = r#"[{"event":"document.error","id":"a","data":{}},{"event":"document.error","data":{}}]"#;
        let parsed = parse_events(batch.as_bytes(), None).unwrap();
        assert_eq!(
            (parsed[0].key.as_deref(), parsed[1].key.as_deref()),
            (Some("a"), None)
        );

        let refused = |body: &str, header: Option<&[u8]>| {
            let e = parse_events(body.as_bytes(), header).unwrap_err();
            assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
            e.message
        };
        assert!(refused(&format!("[{one}]"), Some(b"k1")).contains("\"id\" field"));
        assert!(refused(with_id, Some(b"k2")).contains("differ"));
        assert!(refused(one, Some(b"")).contains("Idempotency-Key"));
        assert!(refused(one, Some(&[0xff])).contains("Idempotency-Key"));
        assert!(refused(r#"{"event":"document.error","id":7,"data":{}}"#, None).contains("id"));
        assert!(
            refused(
                &format!(
                    r#"{{"event":"document.error","id":"{}","data":{{}}}}"#,
                    "x".repeat(201)
                ),
                None
            )
            .contains("id must be 1 to 200")
        );
        assert!(
            refused(
                r#"[{"event":"document.error","id":"a","data":{}},{"event":"document.error","id":"a","data":{}}]"#,
                None
            )
            .contains("events[1].id repeats events[0].id")
        );
    }

    #[test]
    fn direct_ingest_answers_503_until_the_routes_are_synced() {
        let direct = DirectIngest::new(10, 10);
        let readiness = Readiness::new(&["secrets", "webhooks"]);
        let t = table(&[("a", "w")]);
        let e = direct
            .admit(
                &readiness,
                &t,
                "a",
                vec![event(r#"{"event":"document.error","data":{}}"#)],
            )
            .err()
            .expect("refused before the sync");
        assert_eq!(
            (e.status, e.code, e.retry_after),
            (StatusCode::SERVICE_UNAVAILABLE, "not_ready", Some(1))
        );
        assert!(e.message.contains("secrets, webhooks"), "{}", e.message);
        readiness.mark_ready("secrets");
        readiness.mark_ready("webhooks");
        let admitted = direct
            .admit(
                &readiness,
                &t,
                "a",
                vec![event(r#"{"event":"document.error","data":{}}"#)],
            )
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(admitted.deliveries.len(), 1);
    }

    #[test]
    fn each_namespace_gets_its_share_of_the_direct_queue() {
        let direct = DirectIngest::new(10, 4);
        let t = table(&[("a", "w1"), ("a", "w2"), ("b", "w1")]);
        let two = || vec![event(r#"{"event":"document.error","data":{}}"#)];
        let first = direct
            .admit(&ready(), &t, "a", two())
            .unwrap_or_else(|e| panic!("{e:?}"));
        let second = direct
            .admit(&ready(), &t, "a", two())
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(direct.held_by("a"), 4);
        let e = direct
            .admit(&ready(), &t, "a", two())
            .err()
            .expect("a's share is full");
        assert_eq!(
            (e.status, e.code, e.retry_after),
            (
                StatusCode::TOO_MANY_REQUESTS,
                "namespace_queue_full",
                Some(1)
            )
        );
        assert!(
            e.message.contains("--direct-queue-per-namespace"),
            "{}",
            e.message
        );
        // Another namespace is not affected.
        let b = direct
            .admit(&ready(), &t, "b", two())
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(b.deliveries.len(), 1);
        // A request that can never fit a namespace's share is 413, not 429 forever.
        let five: Vec<IngestEvent> = (0..3)
            .map(|_| event(r#"{"event":"document.error","data":{}}"#))
            .collect();
        let e = direct
            .admit(&ready(), &t, "a", five)
            .err()
            .expect("too large");
        assert_eq!(
            (e.status, e.code),
            (StatusCode::PAYLOAD_TOO_LARGE, "too_many_deliveries")
        );
        // Space comes back when deliveries end, and idle namespaces leave the map.
        drop(first);
        assert_eq!(direct.held_by("a"), 2);
        drop((second, b));
        assert_eq!(direct.namespaces_holding(), 0);
        assert!(direct.admit(&ready(), &t, "a", two()).is_ok());
    }

    #[test]
    fn the_global_queue_still_bounds_every_namespace_together() {
        let direct = DirectIngest::new(3, 2);
        let t = table(&[("a", "w"), ("b", "w"), ("c", "w")]);
        let one = || vec![event(r#"{"event":"document.error","data":{}}"#)];
        let _held: Vec<Admission> = ["a", "b", "c"]
            .into_iter()
            .map(|ns| {
                direct
                    .admit(&ready(), &t, ns, one())
                    .unwrap_or_else(|e| panic!("{e:?}"))
            })
            .collect();
        let e = direct
            .admit(&ready(), &t, "a", one())
            .err()
            .expect("global queue full");
        assert_eq!(
            (e.status, e.code),
            (StatusCode::TOO_MANY_REQUESTS, "queue_full")
        );
    }

    #[test]
    fn a_repeated_key_in_direct_mode_is_a_duplicate_or_a_conflict() {
        let direct = DirectIngest::new(100, 100);
        let t = table(&[("a", "w1"), ("a", "w2"), ("b", "w1")]);
        let keyed = r#"{"event":"document.completed","id":"k","data":{"x":1,"y":2}}"#;
        let first = direct
            .admit(&ready(), &t, "a", vec![event(keyed)])
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!((first.deliveries.len(), first.duplicates.len()), (2, 0));

        // Same content (keys of data in another order): nothing new is dispatched.
        let same = r#"{"event":"document.completed","id":"k","data":{"y":2,"x":1}}"#;
        let again = direct
            .admit(&ready(), &t, "a", vec![event(same)])
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(
            (again.deliveries.len(), again.duplicates.clone()),
            (0, vec![0])
        );

        // Other content under the same key: 409.
        let other = r#"{"event":"document.completed","id":"k","data":{"x":2,"y":2}}"#;
        let e = direct
            .admit(&ready(), &t, "a", vec![event(other)])
            .err()
            .expect("conflict");
        assert_eq!(
            (e.status, e.code),
            (StatusCode::CONFLICT, "idempotency_conflict")
        );

        // Keys are scoped to the namespace.
        let b = direct
            .admit(&ready(), &t, "b", vec![event(other)])
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(b.deliveries.len(), 1);

        // After the window, the same key brings the same delivery ids, so receivers still
        // deduplicate.
        let ids: Vec<String> = first.deliveries.iter().map(|d| d.id.clone()).collect();
        let fresh = DirectIngest::new(100, 100);
        let later = fresh
            .admit(&ready(), &t, "a", vec![event(keyed)])
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(
            later
                .deliveries
                .iter()
                .map(|d| d.id.clone())
                .collect::<Vec<_>>(),
            ids
        );
    }

    #[test]
    fn a_refused_direct_request_does_not_remember_its_keys() {
        let direct = DirectIngest::new(100, 1);
        let t = table(&[("a", "w")]);
        let _full = direct
            .admit(
                &ready(),
                &t,
                "a",
                vec![event(r#"{"event":"document.error","data":{}}"#)],
            )
            .unwrap_or_else(|e| panic!("{e:?}"));
        let keyed = r#"{"event":"document.error","id":"k","data":{}}"#;
        let e = direct
            .admit(&ready(), &t, "a", vec![event(keyed)])
            .err()
            .expect("full");
        assert_eq!(e.code, "namespace_queue_full");
        drop(_full);
        // The retry is dispatched, not taken for a duplicate of the refused request.
        let retry = direct
            .admit(&ready(), &t, "a", vec![event(keyed)])
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!((retry.deliveries.len(), retry.duplicates.len()), (1, 0));
    }
}
