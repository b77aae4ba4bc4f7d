//! In `--ingest-mode jetstream` every replica delivers, but only the leader writes status. So
//! that the Webhook's history holds every replica's attempts, the record of each attempt (the
//! leader's too: one path for all) is published to the stream on
//! `<prefix>.attempts.<namespace>.<webhook>` (the prefix: the stream's name lowercased), and the leader reads them back through the
//! shared durable consumer `recorder` and hands them to its status writer, which coalesces
//! them per Webhook as it does local records (patches stay bounded by its rate limit, not by
//! the number of replicas). A record is acked once the writer has taken it; what a leader had
//! not acked when it stopped is handed to the next one. A record whose publish fails (NATS
//! down) goes to the local writer instead, which writes it if this replica leads.

use std::time::Duration;

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

/// Publishes awaiting their acknowledgement at once, per replica.
const MAX_PUBLISHING: usize = 256;
/// A publish whose acknowledgement did not come is sent again this many times in all (the
/// message id makes a repeat harmless) before the record goes to the local writer.
const PUBLISH_TRIES: usize = 2;
/// At shutdown, the recorder keeps taking records while they come at least this often.
const DRAIN_IDLE: Duration = Duration::from_millis(500);

/// The body of an attempt record message.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct AttemptBody {
    /// The uid of the Webhook the attempt was made for (a namesake never gets its records).
    uid: String,
    record: DeliveryRecord,
}

/// An attempt record as published.
#[derive(Debug)]
pub struct AttemptMessage {
    pub subject: String,
    pub headers: HeaderMap,
    pub payload: Bytes,
}

impl AttemptMessage {
    pub fn new(subjects: &Subjects, key: &WebhookKey, uid: &str, record: &DeliveryRecord) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id(record).as_str());
        let body = AttemptBody {
            uid: uid.to_owned(),
            record: record.clone(),
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

/// The message id of a record: a publish sent again is deduplicated, while every attempt,
/// including a manual redelivery that reuses a delivery id and attempt number, is its own.
fn msg_id(record: &DeliveryRecord) -> String {
    format!(
        "{}/{}/{}",
        record.id,
        record.attempt,
        record.time.0.as_nanosecond()
    )
}

/// The Webhook, its uid and the record a message carries.
pub fn decode(
    subjects: &Subjects,
    subject: &str,
    payload: &[u8],
) -> Result<(WebhookKey, String, DeliveryRecord), String> {
    let key = subjects
        .attempts_of(subject)
        .ok_or_else(|| format!("{subject} is not an attempt record subject"))?;
    let body: AttemptBody =
        serde_json::from_slice(payload).map_err(|e| format!("not an attempt record: {e}"))?;
    Ok((key, body.uid, body.record))
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
        loop {
            tokio::select! {
                biased;
                Some(failed) = publishing.next(), if !publishing.is_empty() => {
                    self.settle(failed).await;
                }
                update = self.rx.recv(), if publishing.len() < MAX_PUBLISHING => match update {
                    Some(update) => publishing.push(publish(self.context.clone(), self.subjects.clone(), update)),
                    None => break,
                },
                _ = stop.cancelled() => break,
            }
        }
        // The producers have stopped: what they sent is still published.
        self.rx.close();
        while let Some(update) = self.rx.recv().await {
            publishing.push(publish(self.context.clone(), self.subjects.clone(), update));
        }
        while let Some(failed) = publishing.next().await {
            self.settle(failed).await;
        }
    }

    /// Counts a finished publish; a failed one goes to the local writer.
    async fn settle(&self, failed: Option<Update>) {
        let path = if failed.is_some() {
            "local_fallback"
        } else {
            "published"
        };
        self.metrics
            .attempt_records
            .get_or_create(&AttemptRecordLabels { path })
            .inc();
        if let Some(update) = failed {
            self.local.send(update).await;
        }
    }
}

/// Publishes one attempt record; hands it back if JetStream did not store it.
async fn publish(context: Context, subjects: Subjects, update: Update) -> Option<Update> {
    let Update::DeliveryAttempt { key, uid, record } = &update else {
        return Some(update);
    };
    let message = AttemptMessage::new(&subjects, key, uid, record);
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
                Ok(_) => return None,
                Err(e) => why = e.to_string(),
            },
            Err(e) => why = e.to_string(),
        }
    }
    tracing::warn!(webhook = %key.name, namespace = %key.namespace, delivery = %record.id, error = %why,
        "attempt record not published to JetStream; the local status writer takes it (written only if this replica leads)");
    Some(update)
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

/// Hands one record to the status writer, then acks it.
async fn take(
    subjects: &Subjects,
    local: &StatusSender,
    message: jetstream::Message,
    received: &prometheus_client::metrics::counter::Counter,
) {
    match decode(subjects, &message.subject, &message.payload) {
        Ok((key, uid, record)) => {
            local
                .send(Update::DeliveryAttempt {
                    key,
                    uid,
                    record: Box::new(record),
                })
                .await;
            received.inc();
            if let Err(e) = message.ack().await {
                // Redelivered after the ack wait: the record may be counted twice, never lost.
                tracing::warn!(error = %e, "JetStream recorder: could not ack an attempt record");
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
        let m = AttemptMessage::new(&subjects(), &key, "uid-1", &record(2, 1000));
        assert_eq!(m.subject, "hookrelay.attempts.docs.file.conversion");
        let (decoded_key, uid, decoded) = decode(&subjects(), &m.subject, &m.payload).unwrap();
        assert_eq!(decoded_key, key);
        assert_eq!(uid, "uid-1");
        assert_eq!(decoded, record(2, 1000));
        // Another installation's records are not this one's.
        let staging = Subjects::for_stream("STAGING").unwrap();
        let m = AttemptMessage::new(&staging, &key, "uid-1", &record(2, 1000));
        assert_eq!(m.subject, "staging.attempts.docs.file.conversion");
        assert!(decode(&subjects(), &m.subject, &m.payload).is_err());
        assert!(decode(&staging, &m.subject, &m.payload).is_ok());
    }

    #[test]
    fn the_message_id_names_one_attempt() {
        let key = WebhookKey::new("docs", "w");
        let id = |r: &DeliveryRecord| {
            header(
                &AttemptMessage::new(&subjects(), &key, "uid", r),
                "Nats-Msg-Id",
            )
            .map(str::to_owned)
        };
        // A republish of the same record is deduplicated by the stream.
        assert_eq!(id(&record(1, 1000)), id(&record(1, 1000)));
        assert_eq!(
            id(&record(1, 1000)).as_deref(),
            Some("msg_0123/1/1000000000000")
        );
        // Another attempt, or the same id and number at another time (a redelivery), is not.
        assert_ne!(id(&record(1, 1000)), id(&record(2, 1000)));
        assert_ne!(id(&record(1, 1000)), id(&record(1, 1001)));
    }

    #[test]
    fn what_is_not_an_attempt_record_is_refused() {
        let payload = AttemptMessage::new(
            &subjects(),
            &WebhookKey::new("docs", "w"),
            "u",
            &record(1, 5),
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
