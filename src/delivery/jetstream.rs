//! `--ingest-mode jetstream`: events and deliveries kept in a NATS JetStream stream, consumed by
//! every replica through two durable pull consumers they share.
//!
//! - `hookrelay.events.<namespace>`: what ingest publishes (the seed-shaped body; the event id
//!   and type in headers). The `router` consumer turns each event into one work item per target
//!   and acks the event once every work item is stored.
//! - `hookrelay.deliveries.<namespace>.<webhook>`: one work item per target (the body, the
//!   delivery id, the Webhook's name and uid in headers). The `deliverer` consumer makes one
//!   attempt per delivery of the message: success or a final failure acks it, a retry naks it
//!   with the retry policy's delay, so that the retry schedule lives in the stream and survives
//!   a kill -9 of any replica.
//!
//! - `hookrelay.attempts.<namespace>.<webhook>`: the record of every attempt, from every
//!   replica (`crate::status::relay`). The `recorder` consumer is read by the leader only, which
//!   hands each record to its status writer, so that the Webhook's history has every replica's
//!   attempts.
//!
//! Both publishes carry `Nats-Msg-Id` (the idempotency key, or the delivery id), so a retried
//! publish, or the router redoing an event after a crash, is deduplicated by the stream.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use async_nats::{
    HeaderMap,
    jetstream::{
        self, AckKind, Context,
        consumer::{AckPolicy, pull},
        stream::{Config as StreamConfig, RetentionPolicy, StorageType},
    },
};
use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{Attempted, Delivery, Dispatcher, EventBody, RouteCheck, Verdict, delivery_id};
use crate::{crd::EventType, routing::Routes, routing::WebhookKey};

/// Subjects of ingested events: `hookrelay.events.<namespace>`.
pub const EVENTS_SUBJECT: &str = "hookrelay.events";
/// Subjects of work items: `hookrelay.deliveries.<namespace>.<webhook>`.
pub const DELIVERIES_SUBJECT: &str = "hookrelay.deliveries";
/// Subjects of attempt records: `hookrelay.attempts.<namespace>.<webhook>`.
pub const ATTEMPTS_SUBJECT: &str = "hookrelay.attempts";
/// The consumer that turns events into work items.
pub const ROUTER: &str = "router";
/// The consumer that delivers work items.
pub const DELIVERER: &str = "deliverer";
/// The consumer of attempt records, read by the leader's status writer.
pub const RECORDER: &str = "recorder";

/// Header: the event id (delivery ids derive from it).
pub const EVENT_ID_HEADER: &str = "Hookrelay-Event-Id";
/// Header: the event type.
pub const EVENT_TYPE_HEADER: &str = "Hookrelay-Event";
/// Header: the fingerprint of a keyed event's content, to tell a repeat from a conflict.
pub const CONTENT_HEADER: &str = "Hookrelay-Content-Sha256";
/// Header of a work item: its delivery id.
pub const DELIVERY_ID_HEADER: &str = "Hookrelay-Delivery-Id";
/// Header of a work item: the uid of the Webhook it was routed to.
pub const WEBHOOK_UID_HEADER: &str = "Hookrelay-Webhook-Uid";

/// How long the stream remembers message ids: a retried publish within it is a duplicate.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(600);

/// A held delivery checks its Webhook again at least this often, and keeps its message
/// meanwhile (progress acks), so that holding spends no attempt.
const HOLD_RECHECK: Duration = Duration::from_secs(30);
/// Ack wait of both consumers; a message in hand is kept alive well within it.
pub const ACK_WAIT: Duration = Duration::from_secs(30);
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// How to reach JetStream and what to create there.
#[derive(Clone, Debug)]
pub struct BusConfig {
    pub url: String,
    pub creds: Option<PathBuf>,
    pub tls: NatsTls,
    pub stream: String,
    pub max_age: Duration,
    pub max_ack_pending: i64,
}

/// TLS towards NATS: any file given makes TLS required.
#[derive(Clone, Debug, Default)]
pub struct NatsTls {
    /// PEM CA certificate(s) the server's certificate must chain to (else the system's roots).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and its key, for servers that verify clients.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl NatsTls {
    fn required(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }

    /// Reads every file given, so that a missing or wrong file is reported as such at start
    /// rather than as a failed handshake.
    fn check(&self) -> Result<(), BusError> {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        let unreadable = |flag: &'static str, path: &PathBuf, why: String| BusError::Tls {
            flag,
            path: path.display().to_string(),
            why,
        };
        for (flag, path) in [
            ("--nats-tls-ca-file", &self.ca_file),
            ("--nats-tls-cert-file", &self.cert_file),
        ] {
            let Some(path) = path else { continue };
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| unreadable(flag, path, e.to_string()))?;
            if certs.is_empty() {
                return Err(unreadable(flag, path, "no PEM certificate in it".into()));
            }
        }
        match (&self.cert_file, &self.key_file) {
            (Some(_), Some(path)) => {
                PrivateKeyDer::from_pem_file(path)
                    .map_err(|e| unreadable("--nats-tls-key-file", path, e.to_string()))?;
            }
            (None, None) => {}
            _ => return Err(BusError::TlsPair),
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error(
        "cannot connect to NATS at {url}: {why} (check --nats-url and --nats-creds; a server with a private CA needs --nats-tls-ca-file)"
    )]
    Connect { url: String, why: String },
    #[error("cannot read the NATS credentials file {path}: {why}")]
    Creds { path: String, why: String },
    #[error("cannot use {flag} {path}: {why} (a readable PEM file is needed)")]
    Tls {
        flag: &'static str,
        path: String,
        why: String,
    },
    #[error("give both --nats-tls-cert-file and --nats-tls-key-file, or neither")]
    TlsPair,
    #[error(
        "cannot create or update the JetStream {what}: {why} (is JetStream enabled on the server?)"
    )]
    Setup { what: String, why: String },
    #[error("the JetStream {consumer} consumer stopped: {why}")]
    Consumer { consumer: &'static str, why: String },
}

/// A connected bus: the publish context and the two consumers, created or updated.
#[derive(Clone)]
pub struct Bus {
    pub context: Context,
    /// The stream, to read a stored event back (a keyed repeat's content).
    pub stream: jetstream::stream::Stream,
    router: jetstream::consumer::Consumer<pull::Config>,
    deliverer: jetstream::consumer::Consumer<pull::Config>,
    /// Attempt records of every replica, for the leader's status writer.
    pub recorder: jetstream::consumer::Consumer<pull::Config>,
}

/// Connects and creates (or updates) the stream and both durable consumers.
pub async fn connect(config: &BusConfig) -> Result<Bus, BusError> {
    let mut options = async_nats::ConnectOptions::new().name("hookrelay");
    if let Some(path) = &config.creds {
        options = options
            .credentials_file(path)
            .await
            .map_err(|e| BusError::Creds {
                path: path.display().to_string(),
                why: e.to_string(),
            })?;
    }
    if config.tls.required() {
        config.tls.check()?;
        options = options.require_tls(true);
        if let Some(ca) = &config.tls.ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&config.tls.cert_file, &config.tls.key_file) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
    }
    let client = options
        .connect(config.url.as_str())
        .await
        .map_err(|e| BusError::Connect {
            url: config.url.clone(),
            why: e.to_string(),
        })?;
    let context = jetstream::new(client);
    let stream = StreamConfig {
        name: config.stream.clone(),
        subjects: vec!["hookrelay.>".into()],
        // Limits, not work-queue: history stays for --nats-max-age, whatever was acked.
        retention: RetentionPolicy::Limits,
        max_age: config.max_age,
        storage: StorageType::File,
        duplicate_window: DUPLICATE_WINDOW.min(config.max_age),
        ..Default::default()
    };
    let setup = |what: &str, e: &dyn std::fmt::Display| BusError::Setup {
        what: what.to_owned(),
        why: e.to_string(),
    };
    context
        .create_or_update_stream(stream)
        .await
        .map_err(|e| setup(&format!("stream {}", config.stream), &e))?;
    let stream = context
        .get_stream(&config.stream)
        .await
        .map_err(|e| setup(&format!("stream {}", config.stream), &e))?;
    let consumer = |name: &str, filter: String| pull::Config {
        durable_name: Some(name.into()),
        filter_subject: filter,
        ack_policy: AckPolicy::Explicit,
        ack_wait: ACK_WAIT,
        max_ack_pending: config.max_ack_pending,
        ..Default::default()
    };
    let router = stream
        .create_consumer(consumer(ROUTER, format!("{EVENTS_SUBJECT}.>")))
        .await
        .map_err(|e| setup(&format!("consumer {ROUTER}"), &e))?;
    let deliverer = stream
        .create_consumer(consumer(DELIVERER, format!("{DELIVERIES_SUBJECT}.>")))
        .await
        .map_err(|e| setup(&format!("consumer {DELIVERER}"), &e))?;
    let recorder = stream
        .create_consumer(consumer(RECORDER, format!("{ATTEMPTS_SUBJECT}.>")))
        .await
        .map_err(|e| setup(&format!("consumer {RECORDER}"), &e))?;
    Ok(Bus {
        context,
        stream,
        router,
        deliverer,
        recorder,
    })
}

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
        Self {
            subject: format!("{EVENTS_SUBJECT}.{namespace}"),
            headers,
            body: body.body.clone(),
        }
    }
}

fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    headers?.get(name).map(|v| v.as_str())
}

/// Routes events to work items until `stop`, on every replica; starts once the routing table
/// is complete (`routes_synced`).
pub async fn route_events(
    bus: Bus,
    routes: Routes,
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
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            m = messages.next() => m,
        };
        let message = match message {
            None => return Err(failed("the message stream ended".into())),
            Some(Err(e)) => {
                // Missed heartbeats and the like: the client reconnects and resumes.
                tracing::warn!(error = %e, "JetStream router: fetching events");
                continue;
            }
            Some(Ok(m)) => m,
        };
        if let Err(e) = route_one(&bus.context, &routes, &message).await {
            // Not acked: the stream redelivers it after the ack wait, and the work items
            // already stored are deduplicated by their ids.
            tracing::warn!(subject = %message.subject, error = %e, "JetStream router: event not routed; it is redelivered");
            let _ = message
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
        }
    }
}

async fn route_one(
    context: &Context,
    routes: &Routes,
    message: &jetstream::Message,
) -> Result<(), String> {
    let headers = message.headers.as_ref();
    let namespace = message
        .subject
        .strip_prefix(EVENTS_SUBJECT)
        .and_then(|s| s.strip_prefix('.'));
    let event_id = header(headers, EVENT_ID_HEADER);
    let event = header(headers, EVENT_TYPE_HEADER).and_then(|t| t.parse::<EventType>().ok());
    let (Some(namespace), Some(event_id), Some(event)) = (namespace, event_id, event) else {
        // Not something hookrelay published: it can never be routed.
        tracing::warn!(subject = %message.subject, "JetStream router: dropping a message without an event id or type");
        return message.ack().await.map_err(|e| e.to_string());
    };
    let table = routes.snapshot();
    let mut acks = Vec::new();
    for route in table.lookup(namespace, event) {
        let id = delivery_id(event_id, &route.uid);
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", id.as_str());
        headers.insert(DELIVERY_ID_HEADER, id.as_str());
        headers.insert(WEBHOOK_UID_HEADER, route.uid.as_str());
        headers.insert(EVENT_TYPE_HEADER, event.as_str());
        let subject = format!("{DELIVERIES_SUBJECT}.{namespace}.{}", route.key.name);
        let ack = context
            .publish_with_headers(subject, headers, message.payload.clone())
            .await
            .map_err(|e| e.to_string())?;
        acks.push(ack);
    }
    drop(table);
    for ack in acks {
        ack.await.map_err(|e| e.to_string())?;
    }
    message.ack().await.map_err(|e| e.to_string())
}

/// Delivers work items until `stop`, on every replica; starts once the routing table is
/// complete. Attempts being sent when `stop` fires get `grace`, then are abandoned (their
/// messages are redelivered after the ack wait).
pub async fn deliver_work(
    bus: Bus,
    dispatcher: Arc<Dispatcher>,
    max_hold: Duration,
    routes_synced: impl Future<Output = ()>,
    stop: CancellationToken,
    grace: Duration,
) -> Result<(), BusError> {
    tokio::select! {
        _ = routes_synced => {}
        _ = stop.cancelled() => return Ok(()),
    }
    let failed = |why: String| BusError::Consumer {
        consumer: DELIVERER,
        why,
    };
    let mut messages = bus
        .deliverer
        .messages()
        .await
        .map_err(|e| failed(e.to_string()))?;
    let mut in_flight = JoinSet::new();
    let ended = loop {
        let message = tokio::select! {
            _ = stop.cancelled() => break Ok(()),
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => continue,
            m = messages.next() => m,
        };
        match message {
            None => break Err(failed("the message stream ended".into())),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "JetStream deliverer: fetching work items");
            }
            // The consumer's max_ack_pending bounds how many are in hand at once.
            Some(Ok(message)) => {
                let dispatcher = dispatcher.clone();
                let stop = stop.clone();
                in_flight.spawn(async move {
                    deliver_one(&dispatcher, message, max_hold, &stop).await;
                });
            }
        }
    };
    drop(messages);
    let drain = async { while in_flight.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, drain).await.is_err() {
        in_flight.abort_all();
    }
    ended
}

/// The delivery a work item describes, or None if it is not one.
fn delivery_of(message: &jetstream::Message) -> Option<Delivery> {
    let headers = message.headers.as_ref();
    let rest = message
        .subject
        .strip_prefix(DELIVERIES_SUBJECT)?
        .strip_prefix('.')?;
    let (namespace, name) = rest.split_once('.')?;
    let event = header(headers, EVENT_TYPE_HEADER)?
        .parse::<EventType>()
        .ok()?;
    Some(Delivery {
        webhook: WebhookKey {
            namespace: namespace.into(),
            name: name.into(),
        },
        webhook_uid: header(headers, WEBHOOK_UID_HEADER)?.into(),
        id: header(headers, DELIVERY_ID_HEADER)?.to_owned(),
        event: Arc::new(EventBody {
            event,
            body: message.payload.clone(),
        }),
        source: "jetstream".into(),
        manual: false,
        timeout_cap: None,
    })
}

/// What to do with a work item's message once its delivery step is done.
#[derive(Debug, PartialEq)]
enum Settle {
    Ack,
    Retry(Duration),
    /// Stopping: leave it to be redelivered.
    Abandon,
}

async fn deliver_one(
    dispatcher: &Dispatcher,
    message: jetstream::Message,
    max_hold: Duration,
    stop: &CancellationToken,
) {
    let Some(delivery) = delivery_of(&message) else {
        tracing::warn!(subject = %message.subject, "JetStream deliverer: dropping a message that is not a work item");
        let _ = message.ack_with(AckKind::Term).await;
        return;
    };
    let (attempt, published) = match message.info() {
        Ok(info) => (
            info.delivered.max(1) as u32,
            UNIX_EPOCH + Duration::from_nanos(info.published.unix_timestamp_nanos().max(0) as u64),
        ),
        Err(_) => (1, SystemTime::now()),
    };
    // Keep the message in hand while waiting for slots, holding or sending, so that it is not
    // redelivered to another replica meanwhile.
    let settle = {
        let work = attempt_once(dispatcher, &delivery, attempt, published, max_hold, stop);
        tokio::pin!(work);
        let mut progress = tokio::time::interval(PROGRESS_EVERY);
        progress.tick().await;
        loop {
            tokio::select! {
                settle = &mut work => break settle,
                _ = progress.tick() => {
                    let _ = message.ack_with(AckKind::Progress).await;
                }
            }
        }
    };
    let result = match settle {
        Settle::Ack => message.ack().await,
        Settle::Retry(after) => message.ack_with(AckKind::Nak(Some(after))).await,
        Settle::Abandon => Ok(()),
    };
    if let Err(e) = result {
        tracing::warn!(delivery = %delivery.id, error = %e, "JetStream deliverer: could not settle a work item; it is redelivered");
    }
}

/// One attempt of `delivery` (number `attempt`: the message's delivery count), after checking
/// its route. Holding waits for the route to change without spending an attempt.
async fn attempt_once(
    dispatcher: &Dispatcher,
    delivery: &Delivery,
    attempt: u32,
    published: SystemTime,
    max_hold: Duration,
    stop: &CancellationToken,
) -> Settle {
    loop {
        match dispatcher.check(delivery) {
            RouteCheck::Gone(why) => {
                tracing::info!(delivery = %delivery.id, webhook = %delivery.webhook.name, %why, "JetStream delivery failed");
                return Settle::Ack;
            }
            RouteCheck::Hold { route, why } => {
                let held_for = published.elapsed().unwrap_or_default();
                if held_for >= max_hold {
                    tracing::warn!(delivery = %delivery.id, webhook = %delivery.webhook.name, %why, "JetStream delivery failed: held longer than --max-hold");
                    return Settle::Ack;
                }
                tokio::select! {
                    _ = route.superseded.cancelled() => {}
                    _ = tokio::time::sleep(HOLD_RECHECK.min(max_hold - held_for)) => {}
                    _ = stop.cancelled() => return Settle::Abandon,
                }
                continue;
            }
            RouteCheck::Deliver(_) => {}
        }
        let slots = tokio::select! {
            biased;
            _ = stop.cancelled() => return Settle::Abandon,
            slots = dispatcher.reserve(delivery) => slots,
        };
        match dispatcher.send(delivery, attempt, slots).await {
            Attempted::Sent(report) => {
                return match report.verdict {
                    Verdict::Retry(after) => Settle::Retry(after),
                    Verdict::Succeeded | Verdict::Failed | Verdict::Gone => Settle::Ack,
                };
            }
            Attempted::NotSent | Attempted::Busy => continue,
        }
    }
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
        let m = EventMessage::new("docs", "e1", "docs/k", &body, Some("abc"));
        assert_eq!(m.subject, "hookrelay.events.docs");
        assert_eq!(header(Some(&m.headers), "Nats-Msg-Id"), Some("docs/k"));
        assert_eq!(header(Some(&m.headers), EVENT_ID_HEADER), Some("e1"));
        assert_eq!(
            header(Some(&m.headers), EVENT_TYPE_HEADER),
            Some("document.completed")
        );
        assert_eq!(m.body, body.body);
    }
}
