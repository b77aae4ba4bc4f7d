//! The body of a delivery: exactly the seed's shape, compact, keys in the seed's order.

use bytes::Bytes;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::crd::{DocumentEvent, EventType};

/// One document event, ready to be delivered to any number of webhooks.
#[derive(Clone, Debug, PartialEq)]
pub struct EventBody {
    pub event: EventType,
    /// The bytes POSTed, signed as they are; shared by every attempt to every webhook.
    pub body: Bytes,
}

#[derive(Serialize)]
struct Wire<'a> {
    event: &'a str,
    timestamp: &'a str,
    data: &'a Map<String, Value>,
}

impl EventBody {
    /// `{"event":...,"timestamp":...,"data":{...}}`; `data` keeps its keys' order.
    pub fn new(event: EventType, timestamp: &str, data: &Map<String, Value>) -> Self {
        let wire = Wire {
            event: event.as_str(),
            timestamp,
            data,
        };
        let body = serde_json::to_vec(&wire).expect("a JSON object always serializes");
        Self {
            event,
            body: body.into(),
        }
    }
}

impl From<&DocumentEvent> for EventBody {
    /// A DocumentEvent's body: its `spec.timestamp`, or else the time it was created.
    fn from(de: &DocumentEvent) -> Self {
        Self::new(de.spec.type_, &timestamp_of(de), &de.spec.data)
    }
}

/// A DocumentEvent's `timestamp`: its `spec.timestamp`, or else the time it was created.
pub fn timestamp_of(de: &DocumentEvent) -> String {
    let created = de.metadata.creation_timestamp.as_ref().map(|t| t.0);
    match &de.spec.timestamp {
        Some(t) => t.clone(),
        None => created
            .unwrap_or_else(k8s_openapi::jiff::Timestamp::now)
            .to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_the_seeds_payload_compact_and_in_order() {
        let data: Map<String, Value> = serde_json::from_str(
            r#"{"document_id": 123, "filename": "important_document.pdf", "status": "completed",
                "processing_time_ms": 5200, "content_type": "pdf", "folder_id": 1}"#,
        )
        .unwrap();
        let body = EventBody::new(EventType::Completed, "2023-06-15T10:35:00Z", &data);
        assert_eq!(
            String::from_utf8(body.body.to_vec()).unwrap(),
            r#"{"event":"document.completed","timestamp":"2023-06-15T10:35:00Z","data":{"document_id":123,"filename":"important_document.pdf","status":"completed","processing_time_ms":5200,"content_type":"pdf","folder_id":1}}"#
        );
    }
}
