//! The body of a delivery: exactly the contract's shape, compact, keys in the contract's order.

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
    fn body_is_the_contract_payload_compact_and_in_order() {
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

#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;
    use hmac::{Hmac, Mac};
    use sha2::Sha256;

    /// JSON values of any shape, a few levels deep, with any Unicode in strings and keys.
    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("JSON numbers are finite", |f| f.is_finite())
                .prop_map(Value::from),
            any::<String>().prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((any::<String>(), inner), 0..6)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(crate::proptest_support::config(256))]

        #[test]
        fn the_body_parses_back_to_what_was_given_and_verifies_as_the_contract_verifies(
            event in prop::sample::select(EventType::ALL.to_vec()),
            timestamp in any::<String>(),
            data in prop::collection::vec((any::<String>(), json()), 0..8),
            secret in prop::collection::vec(any::<u8>(), 16..48),
        ) {
            let data: Map<String, Value> = data.into_iter().collect();
            let body = EventBody::new(event, &timestamp, &data);
            prop_assert_eq!(body.event, event);

            let parsed: Value = serde_json::from_slice(&body.body).unwrap();
            let obj = parsed.as_object().unwrap();
            prop_assert_eq!(obj.keys().collect::<Vec<_>>(), ["event", "timestamp", "data"]);
            prop_assert_eq!(&obj["event"], event.as_str());
            prop_assert_eq!(&obj["timestamp"], timestamp.as_str());
            prop_assert_eq!(&obj["data"], &Value::Object(data.clone()));
            // Compact: no whitespace outside strings, so a receiver that re-serializes compactly
            // signs the same bytes; the contract's verifier signs the raw bytes as received.
            prop_assert_eq!(serde_json::to_vec(&parsed).unwrap(), body.body.to_vec());

            // The document-processing contract's verification: HMAC-SHA256 hex over the exact body bytes.
            let header = crate::wire::Signer::new(&secret, None)
                .map(|s| s.sign("id", 0, &body.body).hex);
            if let Ok(header) = header {
                let mut mac = Hmac::<Sha256>::new_from_slice(&secret).unwrap();
                mac.update(&body.body);
                prop_assert!(mac.verify_slice(&hex::decode(header).unwrap()).is_ok());
            }
        }
    }
}
