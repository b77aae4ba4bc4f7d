//! JetStream ingest: each event published to the stream, answered 202 only once JetStream has
//! stored every event of the request (its publish ack). How many events may be being stored at
//! once is bounded ([`PublishBudget`]): past it a request is refused before anything of it is
//! published, instead of waiting behind the others until `--request-timeout` cuts it off with
//! part of its events stored and the client not told which.

use crate::http::error::Problem;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use async_nats::jetstream::context::{PublishAckFuture, PublishError};
use axum::{Json, http::StatusCode};
use serde_json::{Value, json};

use super::{
    IngestEvent, OUTCOME_UNKNOWN, fingerprint, idempotency_conflict, out_of_time, partly_stored,
    store_deadline,
};
use crate::{
    delivery::jetstream::{
        Bus, CONTENT_HEADER, DUPLICATE_WINDOW, EventMessage, Lane, ROUTED_AT_INGEST_PER_REQUEST,
        is_full, keyed_event_id, keyed_msg_id, work_item, work_lane,
    },
    http::{ApiError, ApiState},
    wire::EventBody,
};

/// What became of one event of a request.
enum Published {
    Stored { id: String },
    Duplicate { id: String },
}

/// One event of a request on its way to the stream.
struct Outgoing {
    id: String,
    key: Option<String>,
    content: String,
    /// The event as the router would read it.
    message: EventMessage,
    /// The event, when this replica routes it itself.
    routed_here: Option<Arc<IngestEvent>>,
}

/// How one event of a request was sent to the stream.
enum Sent {
    /// Not sent: the request ran out of time first.
    Late,
    /// As an event, for the router.
    Event(Result<PublishAckFuture, PublishError>),
    /// As its work items, routed here.
    WorkItems(Vec<Result<PublishAckFuture, PublishError>>),
}

/// What a work item and its parked copies carry beyond the event's own headers (delivery id,
/// uid, version, sequence, attempts, the schedule and its target subject), with room to spare.
const WORK_ITEM_HEADROOM: usize = 1024;

pub(super) async fn jetstream(
    state: &ApiState,
    namespace: &str,
    events: Vec<IngestEvent>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Some(bus) = &state.bus else {
        return Err(ApiError::unavailable(
            "JetStream is not connected; retry in a second",
        ));
    };
    let _publishing = state.jetstream_publishing.take(namespace, events.len())?;
    let keyed = events.iter().any(|e| e.key.is_some());
    let total = events.len();
    // Every publish first, then every ack: one round trip's latency for the whole request.
    let deadline = store_deadline(state);
    // Whichever replica routes these events must have seen at least the Webhooks this one has:
    // a Webhook its caller saw Ready here is never missed by a replica that lags.
    let table = state.routes.snapshot();
    let seen = table.seen(namespace);
    // Unkeyed events this replica can route itself are stored only as their work items: one
    // store and one hand-out per delivery instead of two. It routes with its own table, which
    // has seen at least what it has (what the router's check asks of any replica). Keyed
    // events go to the router: a repeat of a key is checked against the stored event.
    let route_here = !keyed && state.routes.view().is_fresh();
    let mut items_left = ROUTED_AT_INGEST_PER_REQUEST;
    let mut messages = Vec::with_capacity(total);
    // Each event is stored once (unless routed here), and once more as a work item per Webhook
    // that takes its type, at most.
    let mut copies = Vec::with_capacity(total);
    for mut e in events {
        // Ordered and rate-limited Webhooks' work items carry their event's stream sequence:
        // those events go to the router.
        let (count, all_shared) = table
            .lookup(namespace, e.event)
            .fold((0, true), |(count, shared), route| {
                (count + 1, shared && work_lane(route) == Lane::Shared)
            });
        let here = route_here && all_shared && count <= items_left;
        if here {
            items_left -= count;
        }
        copies.push(1 + count as u64);
        let timestamp = e
            .timestamp
            .clone()
            .unwrap_or_else(|| k8s_openapi::jiff::Timestamp::now().to_string());
        let body = EventBody::new(e.event, &timestamp, &e.data);
        let content = hex::encode(fingerprint(&e));
        let (id, msg_id) = match &e.key {
            Some(key) => (keyed_event_id(namespace, key), keyed_msg_id(namespace, key)),
            // Unkeyed: the client's retry is a new event, but the client library's own retry of
            // this publish is deduplicated.
            None => {
                let id = hex::encode(rand::random::<[u8; 16]>());
                (id.clone(), id)
            }
        };
        let message = EventMessage::new(
            &bus.subjects,
            namespace,
            &id,
            &msg_id,
            &body,
            Some(&content),
        )
        .routed_after(seen);
        let key = e.key.take();
        // Filters read the timestamp the event is stored with.
        e.timestamp = Some(timestamp);
        let routed_here = here.then(|| Arc::new(e));
        messages.push(Outgoing {
            id,
            key,
            content,
            message,
            routed_here,
        });
    }
    // Each event becomes work items (and parked copies) with more headers: one that would not
    // fit the server's max_payload then could never be routed, and would hold the router's ack
    // floor back for good. Refused now, whole, saying why.
    let max_payload = bus.context.client().max_payload();
    if let Some((index, size)) =
        messages
            .iter()
            .enumerate()
            .find_map(|(i, Outgoing { message: m, .. })| {
                let size = m.body.len() + header_bytes(&m.headers) + WORK_ITEM_HEADROOM;
                (size > max_payload).then_some((i, size))
            })
    {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Problem::EventTooLarge,
            format!(
                "event {index} would take {size} bytes as a work item, more than the NATS server's max_payload ({max_payload} bytes); send a smaller event (or raise the server's max_payload); nothing of this request was stored"
            ),
        ));
    }
    // A stream at its share of its limits takes nothing more: what it holds must still be
    // routed and delivered within the rest.
    // What this request adds to the stream: each event, or each of its work items.
    let (stored_messages, bytes) = messages
        .iter()
        .zip(&copies)
        .map(
            |(
                Outgoing {
                    message: m,
                    routed_here,
                    ..
                },
                copies,
            )| {
                let stored = if routed_here.is_some() { copies - 1 } else { 1 };
                let size = (m.subject.len() + m.body.len() + header_bytes(&m.headers)) as u64;
                (stored, stored * size)
            },
        )
        .fold((0, 0), |(n, b), (stored, size)| (n + stored, b + size));
    if let Some(why) = bus
        .room
        .ingest_refusal(&bus.stream, stored_messages, bytes)
        .await
    {
        return Err(full(&format!("{why}; nothing of this request was stored")));
    }
    // And one namespace takes at most its share of it.
    let share = messages
        .iter()
        .zip(&copies)
        .map(|(Outgoing { message: m, .. }, copies)| {
            (m.subject.len() + m.body.len() + header_bytes(&m.headers)) as u64 * copies
        })
        .sum();
    if let Err(over) = bus.shares.take(namespace, share) {
        let mut error = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            Problem::NamespaceQuota,
            format!("{}; nothing of this request was stored", over.message),
        );
        error.retry_after = Some(over.retry_after.as_secs().clamp(1, 3600));
        return Err(error);
    }
    let mut pending = Vec::with_capacity(total);
    for outgoing in messages {
        let sent = if tokio::time::Instant::now() >= deadline {
            // Not published: the client is told to send it again.
            Sent::Late
        } else if let Some(event) = &outgoing.routed_here {
            let targets = state
                .routes
                .targets(namespace, event.event, event.clone(), &state.metrics)
                .await;
            // A child of the ingest span, as the router's is of the ingest trace.
            let span = crate::telemetry::route_span(namespace, event.event, &outgoing.id);
            let trace = crate::telemetry::traceparent(&span);
            let mut acks = Vec::with_capacity(targets.len());
            for route in &targets {
                let (subject, headers) = work_item(
                    &bus.subjects,
                    namespace,
                    &outgoing.id,
                    event.event,
                    None,
                    trace.as_deref(),
                    route,
                );
                let body = outgoing.message.body.clone();
                acks.push(
                    bus.context
                        .publish_with_headers(subject, headers, body)
                        .await,
                );
            }
            Sent::WorkItems(acks)
        } else {
            let message = &outgoing.message;
            Sent::Event(
                bus.context
                    .publish_with_headers(
                        message.subject.clone(),
                        message.headers.clone(),
                        message.body.clone(),
                    )
                    .await,
            )
        };
        pending.push((outgoing, sent));
    }
    let mut results = Vec::with_capacity(total);
    for (
        Outgoing {
            id, key, content, ..
        },
        sent,
    ) in pending
    {
        let result = match sent {
            Sent::Late => Err(out_of_time()),
            Sent::Event(Err(e)) => Err(not_stored(&e)),
            Sent::Event(Ok(ack)) => match ack.await {
                // Sent, but not confirmed: it may be in the stream.
                Err(e) if !is_full(&e) => Err(unconfirmed(&e)),
                Err(e) => Err(not_stored(&e)),
                Ok(ack) if ack.duplicate => match same_content(bus, ack.sequence, &content).await {
                    Ok(true) => Ok(Published::Duplicate { id }),
                    Ok(false) => Err(idempotency_conflict(key.as_deref().unwrap_or(&id))),
                    Err(e) => Err(e),
                },
                Ok(_) => Ok(Published::Stored { id }),
            },
            Sent::WorkItems(acks) => work_items_stored(acks)
                .await
                .map(|()| Published::Stored { id }),
        };
        results.push(result);
    }
    let mut stored = Vec::new();
    let mut not_stored = Vec::new();
    let mut unknown = Vec::new();
    let mut duplicates = Vec::new();
    let mut ids = Vec::new();
    let mut first_error = None;
    for (index, result) in results.into_iter().enumerate() {
        match result {
            Ok(Published::Stored { id }) => {
                stored.push(json!({"index": index, "id": id}));
                ids.push(id);
            }
            Ok(Published::Duplicate { id }) => {
                stored.push(json!({"index": index, "id": id}));
                duplicates.push(index);
                ids.push(id);
            }
            Err(e) => {
                if e.code == OUTCOME_UNKNOWN {
                    unknown.push(index);
                } else {
                    not_stored.push(index);
                }
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(error) = first_error {
        let error = partly_stored(error, stored, not_stored, unknown, total, keyed);
        return Err(error);
    }
    let mut reply = json!({
        "mode": "jetstream",
        "namespace": namespace,
        "accepted": ids.len(),
        "events": ids,
        "duplicates": duplicates,
    });
    if keyed {
        reply["idempotency"] = format!(
            "JetStream remembers an idempotency key for {} (its duplicate window); a repeat after that is delivered again, with the same delivery ids",
            humantime::format_duration(DUPLICATE_WINDOW)
        )
        .into();
    }
    Ok((StatusCode::ACCEPTED, Json(reply)))
}

/// Whether every work item of an event routed here was stored. (A duplicate is the client
/// library's own retry of a publish: the event is unkeyed, so its delivery ids are new.) When
/// only some were, the event reaches some of its Webhooks: the client is told the outcome is
/// unknown, as for an event whose publish was not confirmed.
async fn work_items_stored(
    acks: Vec<Result<PublishAckFuture, PublishError>>,
) -> Result<(), ApiError> {
    let mut stored = 0;
    let mut failed = None;
    for ack in acks {
        let error = match ack {
            Err(e) => not_stored(&e),
            Ok(ack) => match ack.await {
                Ok(_) => {
                    stored += 1;
                    continue;
                }
                Err(e) if !is_full(&e) => unconfirmed(&e),
                Err(e) => not_stored(&e),
            },
        };
        failed.get_or_insert(error);
    }
    match failed {
        None => Ok(()),
        Some(error) if stored == 0 || error.code == OUTCOME_UNKNOWN => Err(error),
        Some(error) => {
            let mut unknown = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                OUTCOME_UNKNOWN,
                format!(
                    "JetStream stored {stored} of the event's deliveries but not the others ({}), so it reaches some of its Webhooks; sending it again delivers it to those twice, with new delivery ids",
                    error.message
                ),
            );
            unknown.retry_after = Some(1);
            Err(unknown)
        }
    }
}

/// Whether the stored event at `sequence` (the one a duplicate publish matched) has `content`.
async fn same_content(bus: &Bus, sequence: u64, content: &str) -> Result<bool, ApiError> {
    let stored = bus
        .stream
        .get_raw_message(sequence)
        .await
        .map_err(|e| unavailable(&e))?;
    Ok(stored
        .headers
        .get(CONTENT_HEADER)
        .is_none_or(|v| v.as_str() == content))
}

/// About what the headers of a message take in the stream.
fn header_bytes(headers: &async_nats::HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, values)| {
            values
                .iter()
                .map(|v| name.to_string().len() + v.as_str().len() + 4)
                .sum::<usize>()
        })
        .sum()
}

/// A publish JetStream did not confirm (its answer did not come, the connection broke): the
/// event may be in the stream.
fn unconfirmed(e: &async_nats::jetstream::context::PublishError) -> ApiError {
    let mut error = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        OUTCOME_UNKNOWN,
        format!(
            "JetStream did not confirm the event ({e}), so it may have been stored all the same"
        ),
    );
    error.retry_after = Some(1);
    error
}

/// Why a publish was not stored: the stream is full (503 `jetstream_full`), or JetStream did
/// not answer.
fn not_stored(e: &async_nats::jetstream::context::PublishError) -> ApiError {
    if is_full(e) {
        full(&format!("the JetStream stream refused the event ({e})"))
    } else {
        unavailable(e)
    }
}

/// 503 with Retry-After: the stream is at its limits; it takes events again as stored ones
/// age out (`--nats-max-age`), sooner if whoever runs NATS raises its limits.
fn full(why: &str) -> ApiError {
    let mut error = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        Problem::JetstreamFull,
        format!(
            "{why}: the stream is full and takes events again as stored ones age out; retry later. Whoever runs NATS raises the stream's limits (nats stream edit --max-bytes/--max-msgs; --nats-max-bytes and --nats-max-messages apply when hookrelay creates the stream)"
        ),
    );
    error.retry_after = Some(FULL_RETRY_AFTER);
    error
}

/// Seconds a client waits before retrying into a full stream: room comes back as messages age
/// out or the limits are raised, not within a second.
const FULL_RETRY_AFTER: u64 = 30;

fn unavailable(e: &dyn std::fmt::Display) -> ApiError {
    let mut error = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        Problem::JetstreamUnavailable,
        format!("JetStream did not store the event ({e}); retry in a second"),
    );
    error.retry_after = Some(1);
    error
}

/// Events being stored in JetStream by ingest right now, in all and per namespace
/// (`--nats-max-publishing`, a quarter of it per namespace), so that one tenant's flood cannot
/// take every place.
#[derive(Debug)]
pub struct PublishBudget {
    capacity: usize,
    per_namespace: usize,
    /// (all namespaces, per namespace); a namespace publishing nothing has no entry.
    in_use: Mutex<(usize, HashMap<String, usize>)>,
}

/// Places taken by one request, given back when it ends (answered, refused or cut off).
pub struct Publishing {
    budget: Arc<PublishBudget>,
    namespace: String,
    count: usize,
}

impl PublishBudget {
    pub fn new(capacity: usize) -> Arc<Self> {
        let capacity = capacity.max(1);
        Arc::new(Self {
            capacity,
            // One request of the largest size always fits a namespace's share.
            per_namespace: (capacity / 4).max(super::MAX_EVENTS_PER_REQUEST.min(capacity)),
            in_use: Mutex::default(),
        })
    }

    /// Places for `count` events of `namespace`, or 429 with Retry-After before anything is
    /// published.
    pub fn take(self: &Arc<Self>, namespace: &str, count: usize) -> Result<Publishing, ApiError> {
        let mut in_use = self.in_use.lock().unwrap_or_else(|e| e.into_inner());
        let held = in_use.1.get(namespace).copied().unwrap_or(0);
        let refusal = if in_use.0 + count > self.capacity {
            Some(format!(
                "JetStream is storing {} events already, all namespaces (--nats-max-publishing {})",
                in_use.0, self.capacity
            ))
        } else if held + count > self.per_namespace {
            Some(format!(
                "JetStream is storing {held} events of namespace {namespace} already, its share of --nats-max-publishing ({})",
                self.per_namespace
            ))
        } else {
            None
        };
        if let Some(why) = refusal {
            let mut error = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                Problem::JetstreamBusy,
                format!("{why}; nothing of this request was stored, retry it in a second"),
            );
            error.retry_after = Some(1);
            return Err(error);
        }
        in_use.0 += count;
        *in_use.1.entry(namespace.to_owned()).or_insert(0) += count;
        Ok(Publishing {
            budget: self.clone(),
            namespace: namespace.to_owned(),
            count,
        })
    }

    /// Events being stored now (all namespaces).
    pub fn in_use(&self) -> usize {
        self.in_use.lock().unwrap_or_else(|e| e.into_inner()).0
    }
}

impl Drop for Publishing {
    fn drop(&mut self) {
        let mut in_use = self.budget.in_use.lock().unwrap_or_else(|e| e.into_inner());
        in_use.0 = in_use.0.saturating_sub(self.count);
        if let Some(held) = in_use.1.get_mut(&self.namespace) {
            *held = held.saturating_sub(self.count);
            if *held == 0 {
                in_use.1.remove(&self.namespace);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_refused_before_publishing_and_leaves_room_for_other_namespaces() {
        let budget = PublishBudget::new(8000);
        let first = budget.take("flood", 1000).unwrap();
        let second = budget.take("flood", 1000).unwrap();
        // The namespace's share (a quarter: 2000) is taken.
        let refused = budget.take("flood", 1000).err().unwrap();
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(refused.code, "jetstream_busy");
        assert_eq!(refused.retry_after, Some(1));
        assert!(
            refused
                .message
                .contains("nothing of this request was stored"),
            "{}",
            refused.message
        );
        // Other tenants still get in, up to the total.
        let others: Vec<_> = (0..3)
            .map(|i| budget.take(&format!("t{i}"), 2000).unwrap())
            .collect();
        assert_eq!(budget.in_use(), 8000);
        assert!(budget.take("t9", 1).is_err(), "past the total");
        drop(others);
        drop(first);
        assert_eq!(budget.in_use(), 1000);
        let again = budget.take("flood", 1000).unwrap();
        drop((second, again));
        assert_eq!(budget.in_use(), 0);
        assert!(
            budget.in_use.lock().unwrap().1.is_empty(),
            "idle namespaces stay"
        );
    }

    #[test]
    fn a_whole_request_always_fits_a_small_budget() {
        let budget = PublishBudget::new(1000);
        assert!(budget.take("a", 1000).is_ok());
        assert!(PublishBudget::new(10).take("a", 10).is_ok());
    }
}
