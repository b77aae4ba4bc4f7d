//! What travels through the stream: events as ingest publishes them, and work items with the
//! headers that carry a delivery's progress between hand-outs.

use std::sync::Arc;

use async_nats::{
    HeaderMap,
    jetstream::{self},
};
use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::{
    ATTEMPTS_HEADER, CONTENT_HEADER, DELIVERY_ID_HEADER, EVENT_ID_HEADER, EVENT_SEQUENCE_HEADER,
    EVENT_TYPE_HEADER, HELD_SINCE_HEADER, PARKED_HEADER, ROUTES_SEEN_HEADER, Subjects,
    WEBHOOK_UID_HEADER, WEBHOOK_VERSION_HEADER,
};
use crate::delivery::Delivery;
use crate::{crd::EventType, keys::WebhookKey, telemetry::TRACEPARENT, wire::EventBody};

/// The event id of a keyed event: derived from the namespace and key, so that a retried
/// request carries the same delivery ids even after the duplicate window.
pub fn keyed_event_id(namespace: &str, key: &str) -> String {
    let digest = Sha256::new()
        .chain_update(b"jetstream\0")
        .chain_update(namespace)
        .chain_update(b"\0")
        .chain_update(key)
        .finalize();
    hex::encode(&digest[..16])
}

/// The `Nats-Msg-Id` of a keyed event: the key, scoped to its namespace.
pub fn keyed_msg_id(namespace: &str, key: &str) -> String {
    format!("{namespace}/{key}")
}

/// An event as published by ingest.
pub struct EventMessage {
    pub subject: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl EventMessage {
    pub fn new(
        subjects: &Subjects,
        namespace: &str,
        id: &str,
        msg_id: &str,
        body: &EventBody,
        fingerprint: Option<&str>,
    ) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id);
        headers.insert(EVENT_ID_HEADER, id);
        headers.insert(EVENT_TYPE_HEADER, body.event.as_str());
        if let Some(fingerprint) = fingerprint {
            headers.insert(CONTENT_HEADER, fingerprint);
        }
        // Ingest's span, when traces are exported: the router's span continues it.
        if let Some(trace) = crate::telemetry::traceparent(&tracing::Span::current()) {
            headers.insert(TRACEPARENT, trace.as_str());
        }
        Self {
            subject: subjects.event(namespace),
            headers,
            body: body.body.clone(),
        }
    }
}

impl EventMessage {
    /// To be routed by a table that has seen the namespace's Webhooks up to `version` at least.
    pub fn routed_after(mut self, version: u64) -> Self {
        if version > 0 {
            self.headers
                .insert(ROUTES_SEEN_HEADER, version.to_string().as_str());
        }
        self
    }
}

pub(super) fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    headers?.get(name).map(|v| v.as_str())
}

/// A work item's delivery and what it carries from earlier hand-outs.
pub(super) struct WorkItem {
    pub(super) delivery: Delivery,
    /// Attempts made before this message was published (by the messages it replaced).
    pub(super) attempts_before: u32,
    /// Times it was parked in a row without an attempt, for the recheck backoff.
    pub(super) parked: u32,
    /// Since when it is held (unix milliseconds), when it is.
    pub(super) held_since: Option<u64>,
    /// The stream sequence of its event, when the router gave it.
    pub(super) event_sequence: Option<u64>,
}

pub(super) fn header_number<T: std::str::FromStr>(
    headers: Option<&HeaderMap>,
    name: &str,
) -> Option<T> {
    header(headers, name)?.parse().ok()
}

/// The delivery a work item describes, or None if it is not one.
pub(super) fn delivery_of(subjects: &Subjects, message: &jetstream::Message) -> Option<WorkItem> {
    let headers = message.headers.as_ref();
    let (namespace, name) = subjects.work_item(&message.subject)?;
    let event = header(headers, EVENT_TYPE_HEADER)?
        .parse::<EventType>()
        .ok()?;
    let delivery = Delivery {
        webhook: WebhookKey {
            namespace: namespace.into(),
            name: name.into(),
        },
        webhook_uid: header(headers, WEBHOOK_UID_HEADER)?.into(),
        routed_version: header_number(headers, WEBHOOK_VERSION_HEADER).unwrap_or(0),
        id: header(headers, DELIVERY_ID_HEADER)?.to_owned(),
        event: Arc::new(EventBody {
            event,
            body: message.payload.clone(),
        }),
        source: crate::delivery::Source::JetStream,
        manual: false,
        timeout_cap: None,
        trace: header(headers, TRACEPARENT).map(Arc::from),
    };
    Some(WorkItem {
        delivery,
        attempts_before: header_number(headers, ATTEMPTS_HEADER).unwrap_or(0),
        parked: header_number(headers, PARKED_HEADER).unwrap_or(0),
        held_since: header_number(headers, HELD_SINCE_HEADER),
        event_sequence: header_number(headers, EVENT_SEQUENCE_HEADER),
    })
}

/// The headers of a work item published by a deliverer (parked or moved), with `msg_id` as
/// its `Nats-Msg-Id`.
pub(super) fn work_item_headers(
    item: &WorkItem,
    msg_id: &str,
    attempts: u32,
    parked: u32,
    held_since: Option<u64>,
) -> HeaderMap {
    let delivery = &item.delivery;
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", msg_id);
    if let Some(sequence) = item.event_sequence {
        headers.insert(EVENT_SEQUENCE_HEADER, sequence.to_string().as_str());
    }
    headers.insert(DELIVERY_ID_HEADER, delivery.id.as_str());
    headers.insert(WEBHOOK_UID_HEADER, &*delivery.webhook_uid);
    if delivery.routed_version > 0 {
        headers.insert(
            WEBHOOK_VERSION_HEADER,
            delivery.routed_version.to_string().as_str(),
        );
    }
    headers.insert(EVENT_TYPE_HEADER, delivery.event.event.as_str());
    headers.insert(ATTEMPTS_HEADER, attempts.to_string().as_str());
    headers.insert(PARKED_HEADER, parked.to_string().as_str());
    if let Some(trace) = &delivery.trace {
        headers.insert(TRACEPARENT, &**trace);
    }
    if let Some(since) = held_since {
        headers.insert(HELD_SINCE_HEADER, since.to_string().as_str());
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_event_ids_are_stable_and_scoped_to_the_namespace() {
        let id = keyed_event_id("docs", "order-1");
        assert_eq!(id, keyed_event_id("docs", "order-1"));
        assert_ne!(id, keyed_event_id("other", "order-1"));
        assert_ne!(id, keyed_event_id("docs", "order-2"));
        assert_eq!(id.len(), 32);
        assert_eq!(keyed_msg_id("docs", "order-1"), "docs/order-1");
    }

    #[test]
    fn an_event_message_carries_its_id_type_and_msg_id() {
        let body = EventBody::new(
            EventType::Completed,
            "2023-06-15T10:35:00Z",
            &Default::default(),
        );
        let subjects = Subjects::for_stream("HOOKRELAY").unwrap();
        let m = EventMessage::new(&subjects, "docs", "e1", "docs/k", &body, Some("abc"));
        assert_eq!(m.subject, "hookrelay.events.docs");
        let staging = Subjects::for_stream("STAGING").unwrap();
        let m = EventMessage::new(&staging, "docs", "e1", "docs/k", &body, Some("abc"));
        assert_eq!(m.subject, "staging.events.docs");
        assert_eq!(header(Some(&m.headers), "Nats-Msg-Id"), Some("docs/k"));
        assert_eq!(header(Some(&m.headers), EVENT_ID_HEADER), Some("e1"));
        assert_eq!(
            header(Some(&m.headers), EVENT_TYPE_HEADER),
            Some("document.completed")
        );
        assert_eq!(m.body, body.body);
    }
}
