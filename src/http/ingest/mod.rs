//! `POST /api/events`: document events from services that do not speak the Kubernetes API.
//!
//! Durable (default): each event is stored as a DocumentEvent before the 202, so accepted means
//! delivered (at least once). Direct: dispatched from memory for the lowest latency, bounded by a
//! queue that answers 429 when full; at-most-once across an operator restart. JetStream: each
//! event stored in a NATS JetStream stream before the 202, delivered by every replica.

use crate::http::error::Problem;
use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{
    Json,
    body::Bytes,
    extract::{Query, State},
    http::{HeaderMap, StatusCode},
};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

mod direct;
mod durable;
mod jetstream;

pub use direct::DirectIngest;
pub use jetstream::PublishBudget;

use super::{ApiState, NamespaceQuery, error::ApiError, namespace_for};
use crate::crd::EventType;
use direct::direct;
use durable::durable;
use jetstream::jetstream;

/// Events accepted in one request.
pub const MAX_EVENTS_PER_REQUEST: usize = 1000;

/// Longest idempotency key, in characters.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 200;

/// The header naming the one event of a request.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// The annotation holding the idempotency key on a DocumentEvent created with one.
pub const IDEMPOTENCY_KEY_ANNOTATION: &str = "hookrelay.dev/idempotency-key";

/// The annotation with the fingerprint of a keyed event's content, as it was sent.
pub const CONTENT_ANNOTATION: &str = "hookrelay.dev/content-sha256";

/// Direct mode remembers at most this many idempotency keys of one namespace ...
pub const DIRECT_KEYS_PER_NAMESPACE: u64 = 20_000;
/// ... of this many namespaces, those that sent keys last (each namespace its own window, so
/// that a tenant sending ever-new keys pushes out only its own) ...
pub const DIRECT_KEY_NAMESPACES: u64 = 50;
/// ... for this long.
pub const DIRECT_KEY_WINDOW: Duration = Duration::from_secs(600);

const DURABLE_KEY_LIFETIME: &str = "an idempotency key lasts as long as its DocumentEvent is retained (--event-retention after delivery, --failed-event-retention after a failure)";
const DIRECT_KEY_LIFETIME: &str = "direct mode remembers an idempotency key in memory for 10 minutes (at most 20000 keys per namespace, not across a restart); a repeat after that is delivered again, with the same delivery ids";

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
    /// Published to a NATS JetStream stream before the reply: at-least-once, and every replica
    /// delivers.
    #[value(name = "jetstream")]
    JetStream,
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

/// Parses a request body: one contract-shaped event or an array of them, with the request's
/// `Idempotency-Key` header if any. Pure, so every refusal is a unit test; nothing is created
/// unless every event is valid.
pub fn parse_events(
    body: &[u8],
    idempotency_key: Option<&[u8]>,
) -> Result<Vec<IngestEvent>, ApiError> {
    let value = super::json_body(body)?;
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
    // Disabled (and free) unless traces are exported. A client's `traceparent` is linked, or,
    // with --trust-client-traces, its parent.
    let span = tracing::info_span!(
        target: crate::telemetry::TARGET,
        "ingest",
        otel.kind = "server",
        hookrelay.namespace = namespace.as_str(),
        hookrelay.ingest_mode = ?state.ingest_mode,
        hookrelay.events = events.len(),
    );
    let client_trace = headers
        .get(crate::telemetry::TRACEPARENT)
        .and_then(|v| v.to_str().ok());
    if state.trust_client_traces {
        crate::telemetry::continue_trace(&span, client_trace);
    } else {
        crate::telemetry::link_trace(&span, client_trace);
    }
    let accepted = async {
        match state.ingest_mode {
            IngestMode::Durable => durable(&state, &namespace, events).await,
            IngestMode::Direct => {
                super::require_no_other_leader(&state, "direct ingest")?;
                direct(&state, &namespace, events).await
            }
            IngestMode::JetStream => jetstream(&state, &namespace, events).await,
        }
    };
    let reply = tracing::Instrument::instrument(accepted, span).await;
    if let Err(refused) = &reply {
        state.metrics.observe_ingest_refusal(refused.code);
    }
    reply
}

/// When a request stops starting new stores: half-way to `--request-timeout` (which counts from
/// the request's first byte), so that the stores already started can finish and the client
/// hears exactly which events were stored, instead of a 408 after some of them were.
pub(super) fn store_deadline(state: &ApiState) -> tokio::time::Instant {
    tokio::time::Instant::now() + state.request_timeout / 2
}

/// An event not stored because the request ran out of time (see [`store_deadline`]).
pub(super) fn out_of_time() -> ApiError {
    let mut error = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        Problem::IngestSlow,
        "storing the events took more than half of hookrelay's --request-timeout, so the rest were not stored; retry them in a second, or send fewer per request",
    );
    error.retry_after = Some(1);
    error
}

pub(super) fn idempotency_conflict(key: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        Problem::IdempotencyConflict,
        format!(
            "idempotency key {key:?} was already used for a different event (type, timestamp or data differ); use a new key for a new event"
        ),
    )
}

/// What makes two events with the same key the same event: type, timestamp and data as the
/// client sent them, with object keys in any order. Kept with a durable event (an annotation)
/// because the API server gives numbers back normalised (`10.0` as `10`).
pub(super) fn fingerprint(e: &IngestEvent) -> [u8; 32] {
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

/// The answer to a request refused midway: nothing is taken back (what was stored may be
/// delivered already), and the client learns exactly which events to send again.
pub(super) fn partly_stored(
    mut error: ApiError,
    stored: Vec<Value>,
    not_stored: Vec<usize>,
    unknown: Vec<usize>,
    total: usize,
    keyed: bool,
) -> ApiError {
    let mut message = format!(
        "{}; {} of {total} events were stored (\"stored\")",
        error.message,
        stored.len()
    );
    if !not_stored.is_empty() {
        message.push_str(", retry only those in \"not_stored\"");
        if !keyed {
            message.push_str(
                " (or give each event an \"id\", so that a whole request can be retried safely)",
            );
        }
    }
    if !unknown.is_empty() {
        message.push_str(&format!(
            "; whether the {} in \"unknown\" were stored is not known (no answer came in time): they may be delivered, so retry them only with an \"id\"",
            unknown.len()
        ));
    }
    error.message = message;
    error.with_details(
        serde_json::json!({"stored": stored, "not_stored": not_stored, "unknown": unknown}),
    )
}

/// The code of a store whose answer did not come in time: the event may have been stored.
pub(super) const OUTCOME_UNKNOWN: Problem = Problem::OutcomeUnknown;

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
    fn a_request_refused_midway_says_what_to_send_again_and_what_is_unknown() {
        let refused = |not_stored: Vec<usize>, unknown: Vec<usize>, keyed| {
            let error = ApiError::unavailable("the API server is slow");
            let stored = vec![serde_json::json!({"index": 0, "name": "e0"})];
            partly_stored(error, stored, not_stored, unknown, 3, keyed)
        };
        let e = refused(vec![1, 2], vec![], false);
        assert!(
            e.message.contains("1 of 3 events were stored"),
            "{}",
            e.message
        );
        assert!(
            e.message
                .contains("retry only those in \"not_stored\" (or give each event an \"id\""),
            "{}",
            e.message
        );
        assert!(!e.message.contains("unknown"), "{}", e.message);
        let e = refused(vec![], vec![1, 2], true);
        assert!(!e.message.contains("not_stored"), "{}", e.message);
        assert!(
            e.message
                .contains("whether the 2 in \"unknown\" were stored is not known"),
            "{}",
            e.message
        );
        let e = refused(vec![2], vec![1], true);
        assert!(
            e.message.contains("retry only those in \"not_stored\";"),
            "{}",
            e.message
        );
        assert!(
            !e.message.contains("(or give each event"),
            "keyed: {}",
            e.message
        );
    }

    #[test]
    fn the_contract_payload_is_accepted_alone_or_in_an_array() {
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
}

#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;

    /// Bodies near the accepted shape, so that most cases pass JSON parsing and exercise the
    /// field checks: contract-like objects with fields of wrong types, missing or extra.
    fn near_valid_event() -> impl Strategy<Value = Value> {
        let field = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<String>().prop_map(Value::String),
            prop::sample::select(vec![
                "document.completed",
                "document.error",
                "document.uploaded",
                "document.nope",
                "2023-06-15T10:35:00Z",
                "2023-06-15 10:35:00Z",
                "2023-06-15T10:35:00+02:00[Europe/Paris]",
                "9999-99-99T99:99:99Z",
                "ü",
                "",
            ])
            .prop_map(Value::from),
            Just(serde_json::json!({"document_id": 1})),
            Just(serde_json::json!([])),
        ];
        prop::collection::vec(
            (
                prop::sample::select(vec!["event", "timestamp", "data", "id", "extra"]),
                field,
            ),
            0..6,
        )
        .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))
    }

    fn check(body: &[u8], header: Option<&[u8]>) -> Result<(), TestCaseError> {
        match parse_events(body, header) {
            Ok(events) => {
                prop_assert!(!events.is_empty() && events.len() <= MAX_EVENTS_PER_REQUEST);
                let mut keys = HashSet::new();
                for e in &events {
                    if let Some(ts) = &e.timestamp {
                        prop_assert!(is_rfc3339(ts));
                    }
                    if let Some(key) = &e.key {
                        prop_assert!(check_idempotency_key(key).is_ok());
                        prop_assert!(keys.insert(key.clone()), "a repeated key was accepted");
                    }
                }
            }
            Err(e) => {
                prop_assert!(
                    matches!(e.status.as_u16(), 400 | 422),
                    "status {}",
                    e.status
                );
                prop_assert!(!e.message.is_empty());
            }
        }
        Ok(())
    }

    use std::collections::HashSet;

    proptest! {
        #![proptest_config(crate::proptest_support::config(512))]

        #[test]
        fn any_bytes_give_a_clear_error_or_valid_events(
            body in prop::collection::vec(any::<u8>(), 0..256),
            header in proptest::option::of(prop::collection::vec(any::<u8>(), 0..16)),
        ) {
            check(&body, header.as_deref())?;
        }

        #[test]
        fn near_valid_bodies_give_a_clear_error_or_valid_events(
            events in prop::collection::vec(near_valid_event(), 1..4),
            array in any::<bool>(),
            header in proptest::option::of("[ -~]{0,8}|ü"),
        ) {
            let body = if array { Value::Array(events) } else { events[0].clone() };
            check(&serde_json::to_vec(&body).unwrap(), header.as_deref().map(str::as_bytes))?;
        }

        /// Numbers reach receivers as the client wrote them: serde_json's default float parser
        /// may be off by one unit in the last place, so the crate enables `float_roundtrip`.
        #[test]
        fn numbers_in_data_are_read_exactly(
            f in any::<f64>().prop_filter("JSON numbers are finite", |f| f.is_finite()),
        ) {
            let body = serde_json::json!({"event": "document.completed", "data": {"score": f}});
            let events = parse_events(body.to_string().as_bytes(), None).unwrap();
            prop_assert_eq!(events[0].data["score"].as_f64(), Some(f));
        }

        #[test]
        fn contract_events_are_accepted_with_their_fields_unchanged(
            event in prop::sample::select(EventType::ALL.to_vec()),
            data in prop::collection::vec(("[a-z_]{1,12}", any::<i64>()), 0..6),
            id in proptest::option::of("[ -~]{1,40}"),
        ) {
            let data: Map<String, Value> = data.into_iter().map(|(k, v)| (k, v.into())).collect();
            let mut obj = serde_json::json!({
                "event": event.as_str(), "timestamp": "2023-06-15T10:35:00Z", "data": data,
            });
            if let Some(id) = &id {
                obj["id"] = id.clone().into();
            }
            let events = parse_events(&serde_json::to_vec(&obj).unwrap(), None).unwrap();
            prop_assert_eq!(events, vec![IngestEvent {
                event,
                timestamp: Some("2023-06-15T10:35:00Z".into()),
                data,
                key: id,
            }]);
        }
    }
}
