//! In `--ingest-mode jetstream` every replica delivers, but only the leader writes status. So
//! that the Webhook's history holds every replica's attempts, the record of each attempt (the
//! leader's too: one path for all) is published to the stream on
//! `<prefix>.attempts.<namespace>.<webhook>` (the prefix: the stream's name lowercased), and the leader reads them back through the
//! shared durable consumer `recorder` and hands them to its status writer, which coalesces
//! them per Webhook as it does local records (patches stay bounded by its rate limit, not by
//! the number of replicas). A record is acked once the writer has taken it; what a leader had
//! not acked when it stopped is handed to the next one. A record whose publish fails (NATS
//! down) goes to the local writer instead, which writes it if this replica leads.
//!
//! Records of one Webhook that are waiting together travel as one message (at most
//! [`MAX_BATCH`]): with a few publishes in flight at once, records gather while the stream
//! answers, so that under load a message carries many attempts and each costs the stream a
//! fraction of a store, a hand-out and an ack; when idle, each record goes alone at once.

use std::{
    collections::{HashMap, hash_map::Entry},
    time::Duration,
};

use async_nats::{
    HeaderMap,
    jetstream::{self, AckKind, Context, consumer::pull},
};
use bytes::Bytes;
use futures::{StreamExt, stream::FuturesUnordered};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::jetstream::{BusError, RECORDER, Subjects};
use crate::{
    crd::DeliveryRecord,
    keys::WebhookKey,
    leader::Leadership,
    metrics::{AttemptRecordLabels, Metrics},
    status::{StatusSender, Update},
};

/// Publishes awaiting their acknowledgement at once, per replica. Few, so that records gather
/// into batches while they wait rather than each taking a publish of its own.
const MAX_PUBLISHING: usize = 16;
/// Records in one message at most.
pub const MAX_BATCH: usize = 256;
/// The most one record takes in a message (an error of 256 four-byte characters, ids, times),
/// rounded up: a batch stays within the server's `max_payload`.
const MAX_RECORD_BYTES: usize = 2048;
/// A publish whose acknowledgement did not come is sent again this many times in all (the
/// message id makes a repeat harmless) before the record goes to the local writer.
const PUBLISH_TRIES: usize = 2;
/// At shutdown, the recorder keeps taking records while they come at least this often.
const DRAIN_IDLE: Duration = Duration::from_millis(500);

/// The body of an attempt record message: the records of one Webhook, oldest first.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct AttemptBody {
    /// The uid of the Webhook the attempts were made for (a namesake never gets its records).
    uid: String,
    records: Vec<DeliveryRecord>,
}

/// What an attempt record message may hold: a batch, or one record as releases before
/// batching published it (still in the stream after an upgrade, for `--nats-max-age`).
#[derive(Deserialize)]
#[serde(untagged)]
enum StoredBody {
    Batch(AttemptBody),
    One { uid: String, record: DeliveryRecord },
}

/// Attempt records as published: one message for records of one Webhook.
#[derive(Debug)]
pub struct AttemptMessage {
    pub subject: String,
    pub headers: HeaderMap,
    pub payload: Bytes,
}

impl AttemptMessage {
    /// `records` (at least one) of the Webhook `key` whose uid is `uid`.
    pub fn new(
        subjects: &Subjects,
        key: &WebhookKey,
        uid: &str,
        records: &[&DeliveryRecord],
    ) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id(records).as_str());
        let body = AttemptBody {
            uid: uid.to_owned(),
            records: records.iter().map(|r| (*r).clone()).collect(),
        };
        Self {
            subject: subjects.attempts(key),
            headers,
            payload: serde_json::to_vec(&body)
                .expect("a delivery record serializes")
                .into(),
        }
    }
}

/// The message id of a batch: its first record's attempt and how many follow it. A publish
/// sent again is deduplicated, while every attempt, including a manual redelivery that reuses
/// a delivery id and attempt number, starts a batch of its own or is in one.
fn msg_id(records: &[&DeliveryRecord]) -> String {
    let first = records.first().expect("a batch holds a record");
    let id = format!(
        "{}/{}/{}",
        first.id,
        first.attempt,
        first.time.0.as_nanosecond()
    );
    match records.len() {
        1 => id,
        n => format!("{id}+{}", n - 1),
    }
}

/// The Webhook, its uid and the records a message carries, oldest first.
pub fn decode(
    subjects: &Subjects,
    subject: &str,
    payload: &[u8],
) -> Result<(WebhookKey, String, Vec<DeliveryRecord>), String> {
    let key = subjects
        .attempts_of(subject)
        .ok_or_else(|| format!("{subject} is not an attempt record subject"))?;
    let body: StoredBody =
        serde_json::from_slice(payload).map_err(|e| format!("not an attempt record: {e}"))?;
    Ok(match body {
        StoredBody::Batch(AttemptBody { uid, records }) if !records.is_empty() => {
            (key, uid, records)
        }
        StoredBody::Batch(_) => return Err("an attempt record message without records".into()),
        StoredBody::One { uid, record } => (key, uid, vec![record]),
    })
}

/// Publishes the attempt records it is sent; see the module documentation.
pub struct AttemptRelay {
    context: Context,
    subjects: Subjects,
    rx: mpsc::Receiver<Update>,
    local: StatusSender,
    metrics: Metrics,
}

/// A sender that relays attempt records through the stream (everything else goes to `local`
/// as before), and the relay that publishes them; `capacity` bounds what waits to be
/// published.
pub fn relay(
    context: Context,
    subjects: Subjects,
    local: StatusSender,
    metrics: Metrics,
    capacity: usize,
) -> (StatusSender, AttemptRelay) {
    let (tx, rx) = mpsc::channel(capacity);
    let sender = local.relaying_attempts(tx);
    let relay = AttemptRelay {
        context,
        subjects,
        rx,
        local,
        metrics,
    };
    (sender, relay)
}

impl AttemptRelay {
    /// Publishes until `stop`, then publishes what was already sent to it and returns.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut publishing = FuturesUnordered::new();
        let per_message = records_per_message(self.context.client().max_payload());
        let mut taken = Vec::with_capacity(per_message);
        loop {
            tokio::select! {
                biased;
                Some(failed) = publishing.next(), if !publishing.is_empty() => {
                    self.settle(failed).await;
                }
                n = self.rx.recv_many(&mut taken, per_message), if publishing.len() < MAX_PUBLISHING => {
                    if n == 0 {
                        break;
                    }
                    for batch in batches(taken.drain(..)) {
                        publishing.push(publish(self.context.clone(), self.subjects.clone(), batch));
                    }
                }
                _ = stop.cancelled() => break,
            }
        }
        // The producers have stopped: what they sent is still published.
        self.rx.close();
        while self.rx.recv_many(&mut taken, per_message).await > 0 {
            for batch in batches(taken.drain(..)) {
                publishing.push(publish(self.context.clone(), self.subjects.clone(), batch));
            }
        }
        while let Some(failed) = publishing.next().await {
            self.settle(failed).await;
        }
    }

    /// Counts a finished publish's records; those not stored go to the local writer.
    async fn settle(&self, published: Published) {
        let (path, count) = match &published {
            Published::Stored(n) => ("published", *n),
            Published::NotStored(batch) => ("local_fallback", batch.records.len()),
        };
        self.metrics
            .attempt_records
            .get_or_create(&AttemptRecordLabels { path })
            .inc_by(count as u64);
        if let Published::NotStored(batch) = published {
            for update in batch.into_updates() {
                self.local.send(update).await;
            }
        }
    }
}

/// Records one message may carry under a server's `max_payload`.
fn records_per_message(max_payload: usize) -> usize {
    (max_payload / MAX_RECORD_BYTES).clamp(1, MAX_BATCH)
}

/// The records of one Webhook (one uid) taken together, in the order they came.
#[derive(Debug)]
struct Batch {
    key: WebhookKey,
    uid: String,
    records: Vec<DeliveryRecord>,
}

impl Batch {
    fn into_updates(self) -> impl Iterator<Item = Update> {
        let Batch { key, uid, records } = self;
        records
            .into_iter()
            .map(move |record| Update::DeliveryAttempt {
                key: key.clone(),
                uid: uid.clone(),
                record: Box::new(record),
            })
    }
}

/// Groups the attempt records among `updates` by Webhook and uid, keeping their order within
/// each group (only attempt records are relayed: anything else is ignored).
fn batches(updates: impl Iterator<Item = Update>) -> Vec<Batch> {
    let mut batches: Vec<Batch> = Vec::new();
    let mut index: HashMap<(WebhookKey, String), usize> = HashMap::new();
    for update in updates {
        let Update::DeliveryAttempt { key, uid, record } = update else {
            continue;
        };
        let at = match index.entry((key, uid)) {
            Entry::Occupied(at) => *at.get(),
            Entry::Vacant(vacant) => {
                let (key, uid) = vacant.key().clone();
                batches.push(Batch {
                    key,
                    uid,
                    records: Vec::new(),
                });
                *vacant.insert(batches.len() - 1)
            }
        };
        batches[at].records.push(*record);
    }
    batches
}

/// How a publish of a batch ended.
enum Published {
    /// Stored in the stream: that many records.
    Stored(usize),
    /// Not stored: for the local writer.
    NotStored(Batch),
}

/// Publishes one batch; hands it back if JetStream did not store it.
async fn publish(context: Context, subjects: Subjects, batch: Batch) -> Published {
    let records: Vec<&DeliveryRecord> = batch.records.iter().collect();
    let message = AttemptMessage::new(&subjects, &batch.key, &batch.uid, &records);
    let mut why = String::new();
    for _ in 0..PUBLISH_TRIES {
        let published = context
            .publish_with_headers(
                message.subject.clone(),
                message.headers.clone(),
                message.payload.clone(),
            )
            .await;
        match published {
            Ok(ack) => match ack.await {
                Ok(_) => return Published::Stored(records.len()),
                Err(e) => why = e.to_string(),
            },
            Err(e) => why = e.to_string(),
        }
    }
    let (key, first) = (&batch.key, records[0]);
    tracing::warn!(webhook = %key.name, namespace = %key.namespace, delivery = %first.id, records = records.len(), error = %why,
        "attempt records not published to JetStream; the local status writer takes them (written only if this replica leads)");
    drop(records);
    Published::NotStored(batch)
}

/// While this replica leads, takes every replica's attempt records from the `recorder`
/// consumer and hands them to the status writer (`local`), acking each once taken. Runs until
/// `stop`, then takes what keeps coming for a moment (the relay's last records) and returns.
pub async fn record_attempts(
    consumer: jetstream::consumer::Consumer<pull::Config>,
    subjects: Subjects,
    local: StatusSender,
    mut leadership: Leadership,
    metrics: Metrics,
    stop: CancellationToken,
) -> Result<(), BusError> {
    let failed = |why: String| BusError::Consumer {
        consumer: RECORDER,
        why,
    };
    let received = metrics
        .attempt_records
        .get_or_create(&AttemptRecordLabels { path: "received" })
        .clone();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            leads = leadership.acquired() => if !leads {
                // The election ended without this replica leading.
                stop.cancelled().await;
                return Ok(());
            },
        }
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| failed(e.to_string()))?;
        let mut watching = true;
        loop {
            let message = tokio::select! {
                biased;
                _ = stop.cancelled() => {
                    // Take what the relay published last, while it keeps coming; the rest is
                    // the next leader's (or the next run's).
                    while let Ok(Some(Ok(message))) = tokio::time::timeout(DRAIN_IDLE, messages.next()).await {
                        if !leadership.is_leader() {
                            break;
                        }
                        take(&subjects, &local, message, &received).await;
                    }
                    return Ok(());
                }
                changed = leadership.changed(), if watching => {
                    watching = changed;
                    if leadership.is_leader() {
                        continue;
                    }
                    // No longer leading: stop taking records; those in hand are redelivered
                    // to the new leader after the ack wait.
                    break;
                }
                m = messages.next() => m,
            };
            match message {
                None => return Err(failed("the message stream ended".into())),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "JetStream recorder: fetching attempt records");
                }
                Some(Ok(message)) => take(&subjects, &local, message, &received).await,
            }
        }
    }
}

/// Hands a message's records to the status writer, then acks it.
async fn take(
    subjects: &Subjects,
    local: &StatusSender,
    message: jetstream::Message,
    received: &prometheus_client::metrics::counter::Counter,
) {
    match decode(subjects, &message.subject, &message.payload) {
        Ok((key, uid, records)) => {
            let count = records.len() as u64;
            for record in records {
                local
                    .send(Update::DeliveryAttempt {
                        key: key.clone(),
                        uid: uid.clone(),
                        record: Box::new(record),
                    })
                    .await;
            }
            received.inc_by(count);
            if let Err(e) = message.ack().await {
                // Redelivered after the ack wait: the records may be counted twice, never lost.
                tracing::warn!(error = %e, "JetStream recorder: could not ack attempt records");
            }
        }
        Err(why) => {
            tracing::warn!(subject = %message.subject, %why, "JetStream recorder: dropping a message that is not an attempt record");
            let _ = message.ack_with(AckKind::Term).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::Outcome;
    use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};

    fn record(attempt: i32, second: i64) -> DeliveryRecord {
        DeliveryRecord {
            id: "msg_0123".into(),
            event: "document.completed".into(),
            source: "jetstream".into(),
            attempt,
            outcome: Outcome::Retrying,
            http_status: Some(503),
            duration_ms: 12,
            time: Time(Timestamp::from_second(second).unwrap()),
            error: Some("HTTP 503".into()),
        }
    }

    fn subjects() -> Subjects {
        Subjects::for_stream("HOOKRELAY").unwrap()
    }

    fn header<'a>(m: &'a AttemptMessage, name: &str) -> Option<&'a str> {
        m.headers.get(name).map(|v| v.as_str())
    }

    #[test]
    fn a_record_round_trips_with_its_webhook_and_uid() {
        let key = WebhookKey::new("docs", "file.conversion");
        let m = AttemptMessage::new(&subjects(), &key, "uid-1", &[&record(2, 1000)]);
        assert_eq!(m.subject, "hookrelay.attempts.docs.file.conversion");
        let (decoded_key, uid, decoded) = decode(&subjects(), &m.subject, &m.payload).unwrap();
        assert_eq!(decoded_key, key);
        assert_eq!(uid, "uid-1");
        assert_eq!(decoded, vec![record(2, 1000)]);
        // Another installation's records are not this one's.
        let staging = Subjects::for_stream("STAGING").unwrap();
        let m = AttemptMessage::new(&staging, &key, "uid-1", &[&record(2, 1000)]);
        assert_eq!(m.subject, "staging.attempts.docs.file.conversion");
        assert!(decode(&subjects(), &m.subject, &m.payload).is_err());
        assert!(decode(&staging, &m.subject, &m.payload).is_ok());
    }

    #[test]
    fn a_batch_round_trips_in_order_and_a_single_record_of_earlier_releases_still_reads() {
        let key = WebhookKey::new("docs", "w");
        let batch = [record(1, 1000), record(2, 1003), record(3, 1010)];
        let m = AttemptMessage::new(&subjects(), &key, "uid-1", &batch.each_ref());
        let (_, uid, decoded) = decode(&subjects(), &m.subject, &m.payload).unwrap();
        assert_eq!((uid.as_str(), decoded.as_slice()), ("uid-1", &batch[..]));
        // The body releases before batching published: one record, not a list.
        let earlier = serde_json::json!({"uid": "uid-0", "record": record(4, 2000)});
        let payload = serde_json::to_vec(&earlier).unwrap();
        let (_, uid, decoded) = decode(&subjects(), &m.subject, &payload).unwrap();
        assert_eq!((uid.as_str(), decoded), ("uid-0", vec![record(4, 2000)]));
        // A batch of nothing is no record at all.
        let empty = serde_json::json!({"uid": "uid-0", "records": []});
        let payload = serde_json::to_vec(&empty).unwrap();
        assert!(decode(&subjects(), &m.subject, &payload).is_err());
    }

    #[test]
    fn the_message_id_names_one_attempt_or_the_first_of_a_batch_and_its_length() {
        let key = WebhookKey::new("docs", "w");
        let id = |records: &[&DeliveryRecord]| {
            header(
                &AttemptMessage::new(&subjects(), &key, "uid", records),
                "Nats-Msg-Id",
            )
            .map(str::to_owned)
        };
        // A republish of the same record is deduplicated by the stream.
        assert_eq!(id(&[&record(1, 1000)]), id(&[&record(1, 1000)]));
        assert_eq!(
            id(&[&record(1, 1000)]).as_deref(),
            Some("msg_0123/1/1000000000000")
        );
        // Another attempt, or the same id and number at another time (a redelivery), is not.
        assert_ne!(id(&[&record(1, 1000)]), id(&[&record(2, 1000)]));
        assert_ne!(id(&[&record(1, 1000)]), id(&[&record(1, 1001)]));
        // A batch is named by its first attempt and how many follow it.
        assert_eq!(
            id(&[&record(1, 1000), &record(2, 1001)]).as_deref(),
            Some("msg_0123/1/1000000000000+1")
        );
        assert_ne!(
            id(&[&record(1, 1000), &record(2, 1001)]),
            id(&[&record(1, 1000)])
        );
    }

    fn attempt(namespace: &str, name: &str, uid: &str, second: i64) -> Update {
        Update::DeliveryAttempt {
            key: WebhookKey::new(namespace, name),
            uid: uid.into(),
            record: Box::new(record(1, second)),
        }
    }

    #[test]
    fn records_taken_together_are_grouped_per_webhook_and_uid_in_their_order() {
        let updates = vec![
            attempt("docs", "a", "u1", 1),
            attempt("docs", "b", "u2", 2),
            attempt("docs", "a", "u1", 3),
            // A namesake in another namespace, and a Webhook recreated under the same name.
            attempt("other", "a", "u3", 4),
            attempt("docs", "a", "u4", 5),
            attempt("docs", "a", "u1", 6),
        ];
        let seconds = |b: &Batch| {
            b.records
                .iter()
                .map(|r| r.time.0.as_second())
                .collect::<Vec<_>>()
        };
        let grouped = batches(updates.into_iter());
        let shape: Vec<_> = grouped
            .iter()
            .map(|b| {
                (
                    b.key.namespace.as_ref(),
                    b.key.name.as_ref(),
                    b.uid.as_str(),
                    seconds(b),
                )
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                ("docs", "a", "u1", vec![1, 3, 6]),
                ("docs", "b", "u2", vec![2]),
                ("other", "a", "u3", vec![4]),
                ("docs", "a", "u4", vec![5]),
            ]
        );
        // What could not be stored goes back to the local writer as the updates it came as.
        let back: Vec<_> = grouped.into_iter().next().unwrap().into_updates().collect();
        assert_eq!(back.len(), 3);
        assert!(
            matches!(&back[2], Update::DeliveryAttempt { key, uid, record } if key.name.as_ref() == "a" && uid == "u1" && record.time.0.as_second() == 6)
        );
    }

    #[test]
    fn a_full_batch_fits_the_servers_max_payload() {
        // The default max_payload (1 MiB) takes a full batch; a small one fewer, never none.
        assert_eq!(records_per_message(1024 * 1024), MAX_BATCH);
        assert_eq!(records_per_message(64 * 1024), 32);
        assert_eq!(records_per_message(100), 1);
        // A record with the longest error there is, in the characters JSON writes longest
        // (control characters, six bytes each), stays within the bound the batch size is
        // computed from.
        let mut longest = record(1, 1);
        longest.id = "x".repeat(80);
        longest.error = Some("\u{1}".repeat(crate::status::MAX_ERROR_CHARS));
        let one = serde_json::to_vec(&longest).unwrap().len();
        assert!(one < MAX_RECORD_BYTES, "{one} bytes");
    }

    #[test]
    fn what_is_not_an_attempt_record_is_refused() {
        let payload = AttemptMessage::new(
            &subjects(),
            &WebhookKey::new("docs", "w"),
            "u",
            &[&record(1, 5)],
        )
        .payload;
        for subject in [
            "hookrelay.attempts.docs",
            "hookrelay.attempts..w",
            "hookrelay.deliveries.docs.w",
        ] {
            assert!(decode(&subjects(), subject, &payload).is_err(), "{subject}");
        }
        assert!(decode(&subjects(), "hookrelay.attempts.docs.w", b"{}").is_err());
    }
}
