use std::{fmt, str::FromStr};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The document event types of the contract's "Supported Events" table.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub enum EventType {
    #[serde(rename = "document.uploaded")]
    Uploaded,
    #[serde(rename = "document.processing")]
    Processing,
    #[serde(rename = "document.completed")]
    Completed,
    #[serde(rename = "document.error")]
    Error,
    #[serde(rename = "document.deleted")]
    Deleted,
}

impl EventType {
    pub const ALL: [EventType; 5] = [
        EventType::Uploaded,
        EventType::Processing,
        EventType::Completed,
        EventType::Error,
        EventType::Deleted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Uploaded => "document.uploaded",
            EventType::Processing => "document.processing",
            EventType::Completed => "document.completed",
            EventType::Error => "document.error",
            EventType::Deleted => "document.deleted",
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "unknown event type {0:?}: expected one of document.uploaded, document.processing, document.completed, document.error, document.deleted"
)]
pub struct UnknownEventType(pub String);

impl FromStr for EventType {
    type Err = UnknownEventType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| UnknownEventType(s.to_owned()))
    }
}

/// What a Webhook subscribes to: one event type, or `*` for all of them.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    JsonSchema,
    utoipa::ToSchema,
)]
pub enum WebhookEvent {
    #[serde(rename = "*")]
    All,
    #[serde(rename = "document.uploaded")]
    Uploaded,
    #[serde(rename = "document.processing")]
    Processing,
    #[serde(rename = "document.completed")]
    Completed,
    #[serde(rename = "document.error")]
    Error,
    #[serde(rename = "document.deleted")]
    Deleted,
}

impl WebhookEvent {
    /// The event types this subscription covers.
    pub fn types(self) -> &'static [EventType] {
        match self {
            WebhookEvent::All => &EventType::ALL,
            WebhookEvent::Uploaded => &[EventType::Uploaded],
            WebhookEvent::Processing => &[EventType::Processing],
            WebhookEvent::Completed => &[EventType::Completed],
            WebhookEvent::Error => &[EventType::Error],
            WebhookEvent::Deleted => &[EventType::Deleted],
        }
    }
}

impl From<EventType> for WebhookEvent {
    fn from(t: EventType) -> Self {
        match t {
            EventType::Uploaded => WebhookEvent::Uploaded,
            EventType::Processing => WebhookEvent::Processing,
            EventType::Completed => WebhookEvent::Completed,
            EventType::Error => WebhookEvent::Error,
            EventType::Deleted => WebhookEvent::Deleted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_types_round_trip_through_their_wire_names() {
        for t in EventType::ALL {
            assert_eq!(t.as_str().parse::<EventType>(), Ok(t));
            assert_eq!(serde_json::to_value(t).unwrap(), t.as_str());
        }
        assert!("document.archived".parse::<EventType>().is_err());
    }

    #[test]
    fn a_subscription_reads_star_or_one_type() {
        let all: WebhookEvent = serde_json::from_str(r#""*""#).unwrap();
        assert_eq!(all, WebhookEvent::All);
        assert_eq!(all.types().len(), 5);
        let one: WebhookEvent = serde_json::from_str(r#""document.error""#).unwrap();
        assert_eq!(one.types(), &[EventType::Error]);
        assert!(serde_json::from_str::<WebhookEvent>(r#""document.nope""#).is_err());
    }
}
