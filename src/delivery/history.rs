//! What is retained of past deliveries, to recover the failed ones (`POST .../recover`) and to
//! find one beyond the Webhook's 20 recent deliveries (`GET .../deliveries?document_id=`):
//!
//! - DocumentEvents (durable ingest, and events created as resources in every mode) until
//!   their retention: `status.deliveries` has each target's outcome, the spec the event.
//! - In JetStream mode, the stream until `--nats-max-age`: work items
//!   (`<prefix>.deliveries.<namespace>.<webhook>`, or `.serial.`) carry the event, attempt
//!   records (`<prefix>.attempts.<namespace>.<webhook>`) every attempt's outcome (the prefix:
//!   the stream's name lowercased).
//!
//! Direct ingest keeps nothing but the Webhook's recent deliveries: its events cannot be
//! recovered or found.
//!
//! Every search is bounded: at most [`MAX_SCANNED`] objects or messages read per call, at most
//! [`MAX_RECOVERED`] deliveries queued and [`MAX_FOUND`] returned; the reply says when a bound
//! cut it short.

use std::{collections::HashMap, time::Duration};

use async_nats::{
    HeaderMap,
    jetstream::{
        self,
        consumer::{DeliverPolicy, pull::OrderedConfig},
    },
};
use bytes::Bytes;
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Map, Value};

use super::{
    delivery_id,
    jetstream::{Bus, DELIVERY_ID_HEADER, EVENT_TYPE_HEADER, Lane, Subjects, WEBHOOK_UID_HEADER},
    records,
};
use crate::{
    crd::{
        DeliveryRecord, DocumentEvent, DocumentEventStatus, Outcome, TargetDelivery, TargetState,
    },
    keys::WebhookKey,
};

/// DocumentEvents or stream messages read by one call, at most.
pub const MAX_SCANNED: usize = 100_000;
/// Deliveries one recover call queues, at most; call again for the rest.
pub const MAX_RECOVERED: usize = 1_000;
/// Deliveries one search returns, at most.
pub const MAX_FOUND: usize = 100;
/// A stream read that brings nothing for this long has failed.
const SCAN_IDLE: Duration = Duration::from_secs(5);

/// When a failed target failed: its last attempt, else (it failed without one: held too long,
/// its Webhook gone) when its event finished.
fn failed_at(target: &TargetDelivery, status: &DocumentEventStatus) -> Option<Timestamp> {
    target
        .last_attempt_time
        .as_ref()
        .or(status.completion_time.as_ref())
        .map(|t| t.0)
}

/// The delivery of `de` to the Webhook `webhook` (uid `webhook_uid`) when it failed for good at
/// or after `since`. A namesake of the Webhook (another uid) does not get it.
pub fn failed_delivery<'a>(
    de: &'a DocumentEvent,
    webhook: &str,
    webhook_uid: &str,
    since: Timestamp,
) -> Option<&'a TargetDelivery> {
    let status = de.status.as_ref()?;
    let id = delivery_id(de.metadata.uid.as_deref()?, webhook_uid);
    status.deliveries.iter().find(|t| {
        t.webhook == webhook
            && t.id == id
            && t.state == TargetState::Failed
            && failed_at(t, status).is_some_and(|at| at >= since)
    })
}

/// What a search looks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    DocumentId(String),
    DeliveryId(String),
}

/// Whether an event's `data.document_id` is `wanted` (a number or a string: both are written
/// as the query has them).
pub fn document_id_is(data: &Map<String, Value>, wanted: &str) -> bool {
    match data.get("document_id") {
        Some(Value::String(s)) => s == wanted,
        Some(Value::Number(n)) => n.to_string() == wanted,
        _ => false,
    }
}

/// The delivery of `de` to the Webhook `webhook` (uid `webhook_uid`) when it matches `lookup`.
pub fn matching_delivery<'a>(
    de: &'a DocumentEvent,
    webhook: &str,
    webhook_uid: &str,
    lookup: &Lookup,
) -> Option<&'a TargetDelivery> {
    let id = delivery_id(de.metadata.uid.as_deref()?, webhook_uid);
    let matches = match lookup {
        Lookup::DocumentId(wanted) => document_id_is(&de.spec.data, wanted),
        Lookup::DeliveryId(wanted) => *wanted == id,
    };
    if !matches {
        return None;
    }
    de.status
        .as_ref()?
        .deliveries
        .iter()
        .find(|t| t.webhook == webhook && t.id == id)
}

/// The outcome of each delivery so far, from attempt records read in stream order: the ids
/// whose latest record is a final failure at or after `since`, oldest first. Records of a
/// namesake Webhook (another uid) are not its.
#[derive(Debug, Default)]
pub struct LatestOutcomes {
    latest: HashMap<String, (usize, Outcome, Timestamp)>,
}

impl LatestOutcomes {
    pub fn record(&mut self, webhook_uid: &str, uid: &str, record: &DeliveryRecord) {
        if uid != webhook_uid {
            return;
        }
        let order = self.latest.len();
        self.latest
            .entry(record.id.clone())
            .and_modify(|(_, outcome, at)| (*outcome, *at) = (record.outcome, record.time.0))
            .or_insert((order, record.outcome, record.time.0));
    }

    pub fn failed_since(&self, since: Timestamp) -> Vec<String> {
        let mut failed: Vec<(usize, &String)> = self
            .latest
            .iter()
            .filter(|(_, (_, outcome, at))| *outcome == Outcome::Failed && *at >= since)
            .map(|(id, (order, _, _))| (*order, id))
            .collect();
        failed.sort();
        failed.into_iter().map(|(_, id)| id.clone()).collect()
    }
}

/// How far a stream read got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scanned {
    /// Every stored message of the subject was read (not cut short by [`MAX_SCANNED`] or the
    /// caller).
    pub complete: bool,
}

/// Reads the stored messages of `subject` oldest first (from `start` when given), handing each
/// to `visit` until it returns false, at most `max`. An ephemeral ordered consumer: nothing is
/// acked, nothing shared is touched.
pub async fn scan(
    stream: &jetstream::stream::Stream,
    subjects: Vec<String>,
    start: Option<Timestamp>,
    max: usize,
    mut visit: impl FnMut(&jetstream::Message) -> bool,
) -> Result<Scanned, String> {
    let deliver_policy = match start {
        Some(t) => DeliverPolicy::ByStartTime {
            start_time: async_nats::datetime::from_nanos(t.as_nanosecond())
                .map_err(|e| e.to_string())?,
        },
        None => DeliverPolicy::All,
    };
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subjects: subjects,
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    if consumer.cached_info().num_pending == 0 {
        return Ok(Scanned { complete: true });
    }
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    for _ in 0..max {
        let message = match tokio::time::timeout(SCAN_IDLE, messages.next()).await {
            Err(_) => return Err("JetStream did not hand out the stored messages".into()),
            Ok(None) => return Ok(Scanned { complete: true }),
            Ok(Some(Err(e))) => return Err(e.to_string()),
            Ok(Some(Ok(message))) => message,
        };
        let last = message.info().is_ok_and(|info| info.pending == 0);
        if !visit(&message) {
            return Ok(Scanned { complete: false });
        }
        if last {
            return Ok(Scanned { complete: true });
        }
    }
    Ok(Scanned { complete: false })
}

fn header<'a>(message: &'a jetstream::Message, name: &str) -> Option<&'a str> {
    message.headers.as_ref()?.get(name).map(|v| v.as_str())
}

/// A stored work item of the Webhook: its delivery id, event type and body.
struct StoredWorkItem {
    event_type: String,
    body: Bytes,
}

/// The work items of `key` (uid `webhook_uid`) stored in the stream for `ids` (the first of
/// each: every copy carries the same event).
async fn work_items(
    stream: &jetstream::stream::Stream,
    subjects: &Subjects,
    key: &WebhookKey,
    webhook_uid: &str,
    ids: &[String],
) -> Result<(HashMap<String, StoredWorkItem>, Scanned), String> {
    let mut found: HashMap<String, StoredWorkItem> = HashMap::new();
    let wanted: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
    // The shared subject, and the serial one of rate-limited and ordered Webhooks (a Webhook
    // may have had both over time).
    let scanned = scan(stream, subjects.work_of(key), None, MAX_SCANNED, |m| {
        if let (Some(id), Some(event_type)) =
            (header(m, DELIVERY_ID_HEADER), header(m, EVENT_TYPE_HEADER))
            && header(m, WEBHOOK_UID_HEADER) == Some(webhook_uid)
            && wanted.contains(id)
            && !found.contains_key(id)
        {
            found.insert(
                id.to_owned(),
                StoredWorkItem {
                    event_type: event_type.to_owned(),
                    body: m.payload.clone(),
                },
            );
        }
        found.len() < wanted.len()
    })
    .await?;
    Ok((found, scanned))
}

/// What a recover from the stream did.
#[derive(Debug, Default)]
pub struct StreamRecovery {
    pub queued: usize,
    /// More failed deliveries may be stored than were read or queued.
    pub truncated: bool,
}

/// JetStream mode: publishes again the work item of every delivery to `key` whose latest
/// attempt record is a final failure at or after `since` (at most `limit`), with the same
/// delivery id and no attempts spent, so that the deliverer starts a new attempt sequence.
pub async fn recover_from_stream(
    bus: &Bus,
    key: &WebhookKey,
    webhook_uid: &str,
    since: Timestamp,
    limit: usize,
) -> Result<StreamRecovery, String> {
    let (context, stream, subjects) = (&bus.context, &bus.stream, &bus.subjects);
    let mut outcomes = LatestOutcomes::default();
    // Records of attempts at or after `since` are published after it.
    let records = subjects.attempts(key);
    let scanned = scan(stream, vec![records], Some(since), MAX_SCANNED, |m| {
        if let Ok((_, uid, records)) = records::decode(subjects, &m.subject, &m.payload) {
            for record in &records {
                outcomes.record(webhook_uid, &uid, record);
            }
        }
        true
    })
    .await?;
    let mut failed = outcomes.failed_since(since);
    let mut truncated = !scanned.complete || failed.len() > limit;
    failed.truncate(limit);
    if failed.is_empty() {
        return Ok(StreamRecovery {
            queued: 0,
            truncated,
        });
    }
    let (items, scanned) = work_items(stream, subjects, key, webhook_uid, &failed).await?;
    truncated |= !scanned.complete && items.len() < failed.len();
    let now = Timestamp::now().as_nanosecond();
    let mut acks = Vec::new();
    for id in &failed {
        // Failed deliveries of DocumentEvents have no work item: the DocumentEvent path
        // recovers them.
        let Some(item) = items.get(id) else { continue };
        let mut headers = HeaderMap::new();
        // Not the delivery id alone: the first work item's id is still in the duplicate window.
        headers.insert("Nats-Msg-Id", format!("{id}/recover/{now}").as_str());
        headers.insert(DELIVERY_ID_HEADER, id.as_str());
        headers.insert(WEBHOOK_UID_HEADER, webhook_uid);
        headers.insert(EVENT_TYPE_HEADER, item.event_type.as_str());
        let subject = subjects.work(Lane::Shared, &key.namespace, &key.name);
        let ack = context
            .publish_with_headers(subject, headers, item.body.clone())
            .await
            .map_err(|e| e.to_string())?;
        acks.push(ack);
    }
    let queued = acks.len();
    for ack in acks {
        ack.await.map_err(|e| e.to_string())?;
    }
    Ok(StreamRecovery { queued, truncated })
}

/// JetStream mode: the attempt records of deliveries to `key` that match `lookup`, oldest
/// first, at most [`MAX_FOUND`]; whether the search read everything it had to.
pub async fn search_stream(
    bus: &Bus,
    key: &WebhookKey,
    webhook_uid: &str,
    lookup: &Lookup,
) -> Result<(Vec<DeliveryRecord>, bool), String> {
    let (stream, subjects) = (&bus.stream, &bus.subjects);
    let mut complete = true;
    let ids: Vec<String> = match lookup {
        Lookup::DeliveryId(id) => vec![id.clone()],
        Lookup::DocumentId(wanted) => {
            let mut ids = Vec::new();
            let scanned = scan(stream, subjects.work_of(key), None, MAX_SCANNED, |m| {
                if header(m, WEBHOOK_UID_HEADER) == Some(webhook_uid)
                    && let Some(id) = header(m, DELIVERY_ID_HEADER)
                    && !ids.iter().any(|known| known == id)
                    && serde_json::from_slice::<Value>(&m.payload).is_ok_and(|body| {
                        body.get("data")
                            .and_then(Value::as_object)
                            .is_some_and(|data| document_id_is(data, wanted))
                    })
                {
                    ids.push(id.to_owned());
                }
                ids.len() < MAX_FOUND
            })
            .await?;
            complete &= scanned.complete;
            ids
        }
    };
    if ids.is_empty() {
        return Ok((Vec::new(), complete));
    }
    let mut found = Vec::new();
    let scanned = scan(
        stream,
        vec![subjects.attempts(key)],
        None,
        MAX_SCANNED,
        |m| {
            if let Ok((_, uid, records)) = records::decode(subjects, &m.subject, &m.payload)
                && uid == webhook_uid
            {
                let wanted = records.into_iter().filter(|r| ids.contains(&r.id));
                found.extend(wanted.take(MAX_FOUND.saturating_sub(found.len())));
            }
            found.len() < MAX_FOUND
        },
    )
    .await?;
    Ok((found, complete && scanned.complete))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{DocumentEventSpec, EventType};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).unwrap()
    }

    fn event(uid: &str, document_id: Value, targets: Vec<TargetDelivery>) -> DocumentEvent {
        let mut data = Map::new();
        data.insert("document_id".into(), document_id);
        let mut de = DocumentEvent::new(
            "e",
            DocumentEventSpec {
                type_: EventType::Completed,
                timestamp: None,
                data,
            },
        );
        de.metadata.uid = Some(uid.into());
        de.status = Some(DocumentEventStatus {
            deliveries: targets,
            completion_time: Some(Time(at(500))),
            ..Default::default()
        });
        de
    }

    fn target(webhook: &str, id: String, state: TargetState, last: Option<i64>) -> TargetDelivery {
        let mut t = TargetDelivery::new(webhook.into(), id, state);
        t.last_attempt_time = last.map(|s| Time(at(s)));
        t
    }

    #[test]
    fn a_failed_delivery_is_recovered_when_it_failed_since_then_to_that_very_webhook() {
        let id = delivery_id("e1", "w-uid");
        let de = event(
            "e1",
            Value::from(7),
            vec![
                target("w", id.clone(), TargetState::Failed, Some(100)),
                target(
                    "other",
                    delivery_id("e1", "o"),
                    TargetState::Failed,
                    Some(100),
                ),
            ],
        );
        assert_eq!(
            failed_delivery(&de, "w", "w-uid", at(100)).map(|t| &t.id),
            Some(&id)
        );
        assert!(
            failed_delivery(&de, "w", "w-uid", at(101)).is_none(),
            "failed before since"
        );
        // A namesake Webhook (another uid) never gets its predecessor's deliveries.
        assert!(failed_delivery(&de, "w", "new-uid", at(0)).is_none());
        // Only failed ones: succeeded, pending and held are not recovered.
        for state in [
            TargetState::Succeeded,
            TargetState::Pending,
            TargetState::Held,
        ] {
            let de = event(
                "e1",
                Value::from(7),
                vec![target("w", id.clone(), state, Some(100))],
            );
            assert!(
                failed_delivery(&de, "w", "w-uid", at(0)).is_none(),
                "{state:?}"
            );
        }
        // Failed without an attempt (held too long): when its event finished.
        let de = event(
            "e1",
            Value::from(7),
            vec![target("w", id, TargetState::Failed, None)],
        );
        assert!(failed_delivery(&de, "w", "w-uid", at(500)).is_some());
        assert!(failed_delivery(&de, "w", "w-uid", at(501)).is_none());
    }

    #[test]
    fn a_delivery_is_found_by_document_id_or_delivery_id() {
        let id = delivery_id("e1", "w-uid");
        let de = event(
            "e1",
            Value::from(123),
            vec![target("w", id.clone(), TargetState::Succeeded, Some(1))],
        );
        let found = |lookup: Lookup| matching_delivery(&de, "w", "w-uid", &lookup).is_some();
        assert!(found(Lookup::DocumentId("123".into())));
        assert!(!found(Lookup::DocumentId("12".into())));
        assert!(found(Lookup::DeliveryId(id.clone())));
        assert!(!found(Lookup::DeliveryId("msg_00".into())));
        let de = event(
            "e1",
            Value::from("doc-9"),
            vec![target("w", id, TargetState::Failed, None)],
        );
        assert!(
            matching_delivery(&de, "w", "w-uid", &Lookup::DocumentId("doc-9".into())).is_some()
        );
        assert!(
            matching_delivery(&de, "x", "w-uid", &Lookup::DocumentId("doc-9".into())).is_none()
        );
    }

    fn record(id: &str, outcome: Outcome, second: i64) -> DeliveryRecord {
        DeliveryRecord {
            id: id.into(),
            event: "document.completed".into(),
            source: "jetstream".into(),
            attempt: 1,
            outcome,
            http_status: Some(500),
            duration_ms: 1,
            time: Time(at(second)),
            error: None,
        }
    }

    #[test]
    fn only_deliveries_whose_latest_record_failed_since_then_are_recovered() {
        let mut outcomes = LatestOutcomes::default();
        outcomes.record("u", "u", &record("msg_a", Outcome::Retrying, 10));
        outcomes.record("u", "u", &record("msg_a", Outcome::Failed, 20));
        outcomes.record("u", "u", &record("msg_b", Outcome::Failed, 15));
        outcomes.record("u", "u", &record("msg_c", Outcome::Failed, 30));
        // Recovered since, and succeeded: not failed any more.
        outcomes.record("u", "u", &record("msg_c", Outcome::Succeeded, 40));
        outcomes.record("u", "u", &record("msg_d", Outcome::Failed, 5));
        // A namesake's record.
        outcomes.record("u", "other", &record("msg_e", Outcome::Failed, 50));
        assert_eq!(outcomes.failed_since(at(10)), ["msg_a", "msg_b"]);
        assert_eq!(outcomes.failed_since(at(16)), ["msg_a"]);
        assert!(outcomes.failed_since(at(21)).is_empty());
    }
}
