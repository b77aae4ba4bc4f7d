//! The router: turns each event into one work item per target, on every replica.

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use async_nats::{
    HeaderMap,
    jetstream::{self, AckKind, Context},
};
use futures::StreamExt;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::delivery::delivery_id;
use crate::{
    crd::EventType,
    metrics::Metrics,
    routing::{EventFacts, FilterInput, Route, Routes},
    telemetry::TRACEPARENT,
};

use super::messages::{header, header_number};
use super::{
    Bus, BusError, DELIVERY_ID_HEADER, EVENT_ID_HEADER, EVENT_SEQUENCE_HEADER, EVENT_TYPE_HEADER,
    Lane, ROUTER, ROUTES_SEEN_HEADER, Subjects, WEBHOOK_UID_HEADER, WEBHOOK_VERSION_HEADER,
};

/// Events one replica routes at once.
const ROUTING_AT_ONCE: usize = 256;
/// Work items of one event published before their acks are awaited: an event to 10,000
/// Webhooks is stored in rounds, so that what one event waits for stays bounded.
pub const ACKS_PER_ROUND: usize = 256;
/// Work items one ingest request may store itself, all its events together (see the module's
/// documentation). An event that would take more (a large fan-out) goes to the router, which
/// stores its work items in rounds, so that a request's reply never waits on thousands of acks.
pub const ROUTED_AT_INGEST_PER_REQUEST: usize = ACKS_PER_ROUND;
/// On stop, how long events being routed may take to finish.
const ROUTING_DRAIN: Duration = Duration::from_secs(5);
/// How soon an event this replica's table is behind on is offered again (to any replica).
const NOT_SEEN_RETRY: Duration = Duration::from_secs(1);

/// Routes events to work items until `stop`, on every replica; starts once the routing table
/// is complete (`routes_synced`).
pub async fn route_events(
    bus: Bus,
    routes: Routes,
    metrics: Metrics,
    routes_synced: impl Future<Output = ()>,
    stop: CancellationToken,
) -> Result<(), BusError> {
    tokio::select! {
        _ = routes_synced => {}
        _ = stop.cancelled() => return Ok(()),
    }
    let failed = |why: String| BusError::Consumer {
        consumer: ROUTER,
        why,
    };
    let mut messages = bus
        .router
        .messages()
        .await
        .map_err(|e| failed(e.to_string()))?;
    // Events are routed concurrently: each waits for its work items' PubAcks, a round trip to
    // the stream, and one at a time that round trip would bound the whole bus's throughput.
    let mut routing = JoinSet::new();
    let ended = loop {
        let message = tokio::select! {
            _ = stop.cancelled() => break Ok(()),
            Some(_) = routing.join_next(), if !routing.is_empty() => continue,
            m = messages.next(), if routing.len() < ROUTING_AT_ONCE => m,
        };
        let message = match message {
            None => break Err(failed("the message stream ended".into())),
            Some(Err(e)) => {
                // Missed heartbeats and the like: the client reconnects and resumes.
                tracing::warn!(error = %e, "JetStream router: fetching events");
                continue;
            }
            Some(Ok(m)) => m,
        };
        let (context, routes, metrics) = (bus.context.clone(), routes.clone(), metrics.clone());
        let subjects = bus.subjects.clone();
        routing.spawn(async move {
            if !routes.view().is_fresh() {
                // Cut off from the API server: the other replicas route it.
                let _ = message.ack_with(AckKind::Nak(Some(NOT_SEEN_RETRY))).await;
                return;
            }
            if let Some(seen) = not_seen_yet(&subjects, &routes, &message) {
                // This replica lags behind the one that took the event in: another replica
                // routes it, or this one once its table has caught up.
                tracing::debug!(subject = %message.subject, seen, "JetStream router: the routing table is behind this event; not routed here yet");
                let _ = message.ack_with(AckKind::Nak(Some(NOT_SEEN_RETRY))).await;
                return;
            }
            if let Err(e) = route_one(&context, &subjects, &routes, &metrics, &message).await {
                // Not acked: the stream redelivers it, and the work items already stored are
                // deduplicated by their ids.
                tracing::warn!(subject = %message.subject, error = %e, "JetStream router: event not routed; it is redelivered");
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
            }
        });
    };
    drop(messages);
    // Events being routed finish (a PubAck away); one cut short is redelivered, and its work
    // items deduplicated.
    let drain = async { while routing.join_next().await.is_some() {} };
    if tokio::time::timeout(ROUTING_DRAIN, drain).await.is_err() {
        routing.abort_all();
    }
    ended
}

/// How far this replica's table has seen the event's namespace, when that is less than the
/// ingesting replica had seen (None: it may be routed here).
fn not_seen_yet(subjects: &Subjects, routes: &Routes, message: &jetstream::Message) -> Option<u64> {
    let needed: u64 = header_number(message.headers.as_ref(), ROUTES_SEEN_HEADER)?;
    let namespace = subjects.event_namespace(&message.subject)?;
    let seen = routes.snapshot().seen(namespace);
    (seen < needed).then_some(seen)
}

async fn route_one(
    context: &Context,
    subjects: &Subjects,
    routes: &Routes,
    metrics: &Metrics,
    message: &jetstream::Message,
) -> Result<(), String> {
    let headers = message.headers.as_ref();
    let namespace = subjects.event_namespace(&message.subject);
    let event_id = header(headers, EVENT_ID_HEADER);
    let event = header(headers, EVENT_TYPE_HEADER).and_then(|t| t.parse::<EventType>().ok());
    let (Some(namespace), Some(event_id), Some(event)) = (namespace, event_id, event) else {
        // Not something hookrelay published: it can never be routed.
        tracing::warn!(subject = %message.subject, "JetStream router: dropping a message without an event id or type");
        return message.ack().await.map_err(|e| e.to_string());
    };
    let event_sequence = message.info().map(|i| i.stream_sequence).ok();
    // The route span continues the ingest trace; each work item carries it to its attempts.
    let span = crate::telemetry::route_span(namespace, event, event_id);
    crate::telemetry::continue_trace(&span, header(headers, TRACEPARENT));
    let trace = crate::telemetry::traceparent(&span);
    // The payload is the body hookrelay published; it is parsed only when a filter needs it,
    // on the thread that evaluates the filters.
    let input = Arc::new(PublishedEvent {
        event,
        payload: message.payload.clone(),
        parsed: OnceLock::new(),
    });
    let targets = routes.targets(namespace, event, input, metrics).await;
    let mut acks = Vec::with_capacity(targets.len().min(ACKS_PER_ROUND));
    for route in &targets {
        let (subject, headers) = work_item(
            subjects,
            namespace,
            event_id,
            event,
            event_sequence,
            trace.as_deref(),
            route,
        );
        let ack = context
            .publish_with_headers(subject, headers, message.payload.clone())
            .await
            .map_err(|e| e.to_string())?;
        acks.push(ack);
        if acks.len() == ACKS_PER_ROUND {
            for ack in acks.drain(..) {
                ack.await.map_err(|e| e.to_string())?;
            }
        }
    }
    for ack in acks {
        ack.await.map_err(|e| e.to_string())?;
    }
    message.ack().await.map_err(|e| e.to_string())
}

/// The work item of event `event_id` for `route`: its subject and headers (its body is the
/// event's). The router stores one per target; JetStream ingest stores them itself for events
/// it routes at once (then without `event_sequence`, which only ordered Webhooks need).
pub fn work_item(
    subjects: &Subjects,
    namespace: &str,
    event_id: &str,
    event: EventType,
    event_sequence: Option<u64>,
    trace: Option<&str>,
    route: &Route,
) -> (String, HeaderMap) {
    let id = delivery_id(event_id, &route.uid);
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", id.as_str());
    if let Some(sequence) = event_sequence {
        headers.insert(EVENT_SEQUENCE_HEADER, sequence.to_string().as_str());
    }
    headers.insert(DELIVERY_ID_HEADER, id.as_str());
    headers.insert(WEBHOOK_UID_HEADER, route.uid.as_str());
    headers.insert(WEBHOOK_VERSION_HEADER, route.version.to_string().as_str());
    headers.insert(EVENT_TYPE_HEADER, event.as_str());
    if let Some(trace) = trace {
        headers.insert(TRACEPARENT, trace);
    }
    let subject = subjects.work(work_lane(route), namespace, &route.key.name);
    (subject, headers)
}

/// What a filter reads of an event's body.
#[derive(Default, serde::Deserialize)]
struct FilterWire {
    #[serde(default)]
    timestamp: String,
    #[serde(default)]
    data: serde_json::Map<String, serde_json::Value>,
}

/// An event as ingest published it, parsed for its filters at most once.
struct PublishedEvent {
    event: EventType,
    payload: bytes::Bytes,
    parsed: OnceLock<FilterWire>,
}

impl FilterInput for PublishedEvent {
    fn facts(&self) -> EventFacts<'_> {
        let wire = self
            .parsed
            .get_or_init(|| serde_json::from_slice(&self.payload).unwrap_or_default());
        EventFacts::new(self.event, &wire.timestamp, &wire.data)
    }
}

/// Where the work items of `route` go: deliveries that must all come from one process (a rate
/// limit, an ordering) go to the serial lane, the rest to the shared work queue.
pub fn work_lane(route: &Route) -> Lane {
    if route.delivery.rate_limit.is_some() || route.ordering.is_some() {
        Lane::Serial
    } else {
        Lane::Shared
    }
}
