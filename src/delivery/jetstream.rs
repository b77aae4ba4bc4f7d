//! `--ingest-mode jetstream`: events and deliveries kept in a NATS JetStream stream, consumed by
//! every replica through two durable pull consumers they share.
//!
//! - `hookrelay.events.<namespace>`: what ingest publishes (the seed-shaped body; the event id
//!   and type in headers). The `router` consumer turns each event into one work item per target
//!   and acks the event once every work item is stored.
//! - `hookrelay.deliveries.<namespace>.<webhook>`: one work item per target (the body, the
//!   delivery id, the Webhook's name and uid in headers). The `deliverer` consumer makes one
//!   attempt per hand-out of the message.
//!
//! - `hookrelay.serial.<namespace>.<webhook>`: the work items of Webhooks with a
//!   `spec.delivery.rateLimit` or `spec.ordering`, which must all be delivered by one process
//!   for the limit or the order to hold (ordered ones are released in event order: see
//!   [`Release`]). The `serial` consumer is bound by the leader only; a work item that reaches the
//!   shared `deliverer` for such a Webhook (routed before the limit was added, or by a replica
//!   that had not seen it yet) is moved there. See "Key affinity" below.
//!
//! - `hookrelay.attempts.<namespace>.<webhook>`: the record of every attempt, from every
//!   replica (`crate::delivery::records`). The `recorder` consumer is read by the leader only, which
//!   hands each record to its status writer, so that the Webhook's history has every replica's
//!   attempts.
//!
//! Both publishes carry `Nats-Msg-Id` (the idempotency key, or the delivery id), so a retried
//! publish, or the router redoing an event after a crash, is deduplicated by the stream.
//!
//! ## Fairness: nothing waits in the consumer
//!
//! A consumer hands out at most `max_ack_pending` messages not yet acked, all replicas together.
//! What counts (nats-server's `o.pending`, checked against a real server): every message handed
//! out and not acked, including those nak'd with a delay, which stay pending until redelivered
//! and acked. So a delivery that waits (a retry's backoff, a hold of a paused or blocked
//! Webhook) would keep its place whether it is kept in hand or nak'd, and a few hundred of them
//! in one namespace would stop the consumer for everybody. Hence:
//!
//! - **Waiting is parked**: the message is acked and the same work item is published again to
//!   `hookrelay.schedules.<namespace>.<webhook>.<delivery id>` with `Nats-Schedule: @at <time>`
//!   and `Nats-Schedule-Target: <its work item subject>`; the stream itself publishes it back when
//!   due (message schedules, stream setting `allow_msg_schedules`), so the retry schedule still
//!   lives in the stream and survives a kill -9. Its `Nats-Msg-Id` is the delivery id and the
//!   parked message's sequence, so parking again after a crash is a duplicate. A retry is
//!   parked for the retry policy's delay; a hold for 1 s, doubling up to 30 s while it stays
//!   held. The headers carry what the message count no longer tells: the attempts spent
//!   (`Hookrelay-Attempts`; the attempt number is that plus the hand-outs of this message, so
//!   holds spend none), since when it is held (`Hookrelay-Held-Since`, for `--max-hold`) and how
//!   often it was parked in a row (`Hookrelay-Parked`, for the backoff).
//! - **A bound per namespace on what one replica keeps in hand** ([`InHandLimits`]): half of
//!   `max_ack_pending` while the namespace's deliveries get their slots (a fan-out to healthy
//!   endpoints waits for them in hand, without a round trip through the stream); once an item
//!   has waited [`SLOT_WAIT_IN_HAND`] for its slots (endpoints that never answer, a storm) it is
//!   parked and the namespace is congested for [`CONGESTION_MEMORY`]: on the shared lane it then
//!   keeps at most twice `--max-in-flight-per-namespace` in hand (a round being sent, a round
//!   waiting), and the excess is parked the same way. Bounded by the slots rather than as a
//!   share of `max_ack_pending` because every replica counts its own: with half of it each,
//!   two replicas stuck on one namespace held the whole consumer. So the bound holds across
//!   replicas while replicas × twice the slots stays below `max_ack_pending` (39 replicas at the
//!   defaults); the replicas do not share their counts. The serial lane has one reader, the
//!   leader, so there half of `max_ack_pending` is a share.
//!   Of those places a quarter may hold deliveries in hand, which wake the moment their Webhook
//!   changes (a resumed Webhook's first deliveries go at once, the parked ones within their
//!   recheck, at most 30 s).
//!
//! ## Key affinity: rate limits with several replicas
//!
//! Every replica consumes `deliverer`, so a bucket per process would let N replicas send N
//! times a Webhook's limit. Instead the deliveries of a rate-limited Webhook all go through
//! the leader: the router publishes them to the serial subject, the shared deliverer moves
//! any it meets there (acked once the copy is stored; the copy's id is the delivery id and the
//! original's sequence, so a move redone after a crash is a duplicate), and retries and holds
//! are parked back to the serial subject. A work item whose turn is further off than
//! [`TURN_WAIT_IN_HAND`] is parked rather than kept in hand, so that a backlog at a low limit
//! does not fill the consumer: until shortly before its place in the backlog (the turns given
//! out plus the items parked before it, at the limit's rate), so that it comes back about once,
//! not every few seconds of its wait. When leadership moves, the new leader
//! binds the consumer and gets what the old one had in hand after the ack wait.
//!
//! Pending therefore holds only messages being attempted or about to be, at most a bounded
//! share per namespace, so one namespace (a paused Webhook with any number of events, dead
//! endpoints, a retry storm) cannot take the consumer. The price is a publish per retry and per
//! recheck of a long hold (each at most every 30 s), kept in the stream until `--nats-max-age`.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering as AtomicOrdering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use async_nats::{
    HeaderMap,
    jetstream::{
        self, AckKind, Context,
        consumer::{AckPolicy, pull},
        stream::{Config as StreamConfig, DiscardPolicy, RetentionPolicy, StorageType},
    },
};
use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::{
    sync::{Notify, oneshot},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

use super::{
    Attempted, Delivery, Dispatcher, KeyedLimits, RouteCheck, Ticket, Verdict, delivery_id,
};
use crate::{
    crd::EventType,
    keys::WebhookKey,
    metrics::Metrics,
    routing::{EventFacts, Route, Routes},
    telemetry::TRACEPARENT,
    wire::EventBody,
};

/// Subjects of ingested events: `hookrelay.events.<namespace>`.
pub const EVENTS_SUBJECT: &str = "hookrelay.events";
/// Subjects of work items: `hookrelay.deliveries.<namespace>.<webhook>`.
pub const DELIVERIES_SUBJECT: &str = "hookrelay.deliveries";
/// Subjects of work items delivered by the leader alone (rate-limited Webhooks):
/// `hookrelay.serial.<namespace>.<webhook>`.
pub const SERIAL_SUBJECT: &str = "hookrelay.serial";
/// Subjects of attempt records: `hookrelay.attempts.<namespace>.<webhook>`.
pub const ATTEMPTS_SUBJECT: &str = "hookrelay.attempts";
/// The consumer that turns events into work items.
pub const ROUTER: &str = "router";
/// The consumer that delivers work items.
pub const DELIVERER: &str = "deliverer";
/// The consumer of the serial subjects, bound by the leader only.
pub const SERIAL: &str = "serial";
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
/// Header of a work item: the version of that Webhook in the router's table (a deliverer whose
/// table has not seen it waits; see `RoutingTable::find`).
pub const WEBHOOK_VERSION_HEADER: &str = "Hookrelay-Webhook-Version";
/// Header of an event: how far the ingesting replica's table had seen the namespace's Webhooks
/// (a router whose table has seen less does not route it).
pub const ROUTES_SEEN_HEADER: &str = "Hookrelay-Routes-Seen";
/// Header of a work item: the stream sequence of its event (the order of `spec.ordering`).
pub const EVENT_SEQUENCE_HEADER: &str = "Hookrelay-Event-Sequence";
/// Header of a parked work item: attempts made before it was published (absent: none).
pub const ATTEMPTS_HEADER: &str = "Hookrelay-Attempts";
/// Header of a parked work item: times it was parked in a row without an attempt.
pub const PARKED_HEADER: &str = "Hookrelay-Parked";
/// Header of a parked work item: since when it is held (unix milliseconds).
pub const HELD_SINCE_HEADER: &str = "Hookrelay-Held-Since";
/// Subjects of parked work items waiting for their time:
/// `hookrelay.schedules.<namespace>.<webhook>.<delivery id>`. No consumer reads them: the
/// stream publishes each to its work item subject when it is due, and purges it.
pub const SCHEDULES_SUBJECT: &str = "hookrelay.schedules";

/// How long the stream remembers message ids: a retried publish within it is a duplicate.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(600);

/// A held delivery kept in hand checks its Webhook again at least this often (it wakes at once
/// when the Webhook changes).
const HOLD_RECHECK: Duration = Duration::from_secs(30);
/// A work item parked without an attempt (held, or its namespace busy) comes back after
/// PARK_MIN, doubling each time it is parked again, up to PARK_MAX; each delay is spread over
/// its second half so that items parked together do not come back together.
const PARK_MIN: Duration = Duration::from_secs(1);
const PARK_MAX: Duration = Duration::from_secs(30);
/// Times a parked work item is published before it is nak'd instead.
const PARK_PUBLISH_TRIES: usize = 3;
/// Events one replica routes at once.
const ROUTING_AT_ONCE: usize = 256;
/// On stop, how long events being routed may take to finish.
const ROUTING_DRAIN: Duration = Duration::from_secs(5);
/// How soon an event this replica's table is behind on is offered again (to any replica).
const NOT_SEEN_RETRY: Duration = Duration::from_secs(1);
/// Ack wait of both consumers; a message in hand is kept alive well within it.
pub const ACK_WAIT: Duration = Duration::from_secs(30);
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// A rate-limited work item whose turn is further off than this is parked, not kept in hand.
pub const TURN_WAIT_IN_HAND: Duration = Duration::from_secs(5);
/// A work item parked for its turn comes back this long before its place in the backlog.
const TURN_BACK_BEFORE: Duration = Duration::from_millis(2_500);

/// How to reach JetStream and what to create there.
#[derive(Clone, Debug)]
pub struct BusConfig {
    pub url: String,
    pub creds: Option<PathBuf>,
    pub tls: NatsTls,
    pub stream: String,
    pub max_age: Duration,
    /// Bytes and messages the stream may hold when hookrelay creates it.
    pub max_bytes: i64,
    pub max_messages: i64,
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
    /// Work items of rate-limited Webhooks, for the leader alone.
    serial: jetstream::consumer::Consumer<pull::Config>,
    /// Attempt records of every replica, for the leader's status writer.
    pub recorder: jetstream::consumer::Consumer<pull::Config>,
    /// How full the stream is, as ingest last looked.
    pub room: Arc<StreamRoom>,
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
    let setup = |what: &str, e: &dyn std::fmt::Display| BusError::Setup {
        what: what.to_owned(),
        why: e.to_string(),
    };
    set_up_stream(&context, config)
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
    let serial = stream
        .create_consumer(consumer(SERIAL, format!("{SERIAL_SUBJECT}.>")))
        .await
        .map_err(|e| setup(&format!("consumer {SERIAL}"), &e))?;
    let recorder = stream
        .create_consumer(consumer(RECORDER, format!("{ATTEMPTS_SUBJECT}.>")))
        .await
        .map_err(|e| setup(&format!("consumer {RECORDER}"), &e))?;
    Ok(Bus {
        context,
        stream,
        router,
        deliverer,
        serial,
        recorder,
        room: Arc::default(),
    })
}

/// Whether JetStream refused a publish because the stream or the server has no room left.
/// A stream with `DiscardPolicy::New` at its limit (not hookrelay's: see [`wanted_stream`])
/// answers error code 10077 (stream store
/// failed) with "maximum messages exceeded", "maximum bytes exceeded" or "maximum messages per
/// subject exceeded" (nats-server 2.15, checked against a real server in the e2e tests); a
/// server or account out of storage answers 10023, 10047 or 10028.
pub fn is_full(error: &async_nats::jetstream::context::PublishError) -> bool {
    use async_nats::jetstream::ErrorCode;
    let Some(error) = std::error::Error::source(error)
        .and_then(|e| e.downcast_ref::<async_nats::jetstream::Error>())
    else {
        return false;
    };
    match error.error_code() {
        ErrorCode::STREAM_STORE_FAILED => {
            let what = error.to_string();
            what.starts_with("maximum messages") || what.starts_with("maximum bytes")
        }
        ErrorCode::INSUFFICIENT_RESOURCES
        | ErrorCode::STORAGE_RESOURCES_EXCEEDED
        | ErrorCode::MEMORY_RESOURCES_EXCEEDED => true,
        _ => false,
    }
}

/// How often ingest looks again at how full the stream is.
const ROOM_FRESH: Duration = Duration::from_millis(200);

/// Ingest stops taking events once the stream holds this share of its byte or message limit:
/// the rest is for what the events already taken still need (their work items, attempt
/// records and parked retries), without which they could not be delivered.
const INGEST_SHARE: (i64, i64) = (3, 4);

/// How full the stream is (its limits and what it holds), looked up at most every
/// [`ROOM_FRESH`] by whichever ingest request needs it.
#[derive(Debug, Default)]
pub struct StreamRoom {
    /// When it was looked up, and what it held then (None: it could not be asked).
    last: tokio::sync::Mutex<Option<(tokio::time::Instant, Option<Held>)>>,
}

/// The stream's configuration, and the messages and bytes it held.
type Held = (StreamConfig, u64, u64);

impl StreamRoom {
    /// None while ingest may publish `messages` more events of `bytes`; else why not (the
    /// stream would be past ingest's share of its limits). A stream that cannot be asked is
    /// not judged full: its publishes tell.
    pub async fn ingest_refusal(
        &self,
        stream: &jetstream::stream::Stream,
        messages: u64,
        bytes: u64,
    ) -> Option<String> {
        let mut last = self.last.lock().await;
        let fresh = last
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < ROOM_FRESH);
        if !fresh {
            let held = match stream.get_info().await {
                Ok(info) => Some((info.config, info.state.messages, info.state.bytes)),
                Err(e) => {
                    tracing::debug!(error = %e, "JetStream ingest: cannot tell how full the stream is");
                    None
                }
            };
            *last = Some((tokio::time::Instant::now(), held));
        }
        let (config, held_messages, held_bytes) = last.as_ref()?.1.as_ref()?;
        ingest_refusal(
            config,
            held_messages.saturating_add(messages),
            held_bytes.saturating_add(bytes),
        )
    }
}

/// Why ingest may not leave a stream with `config` holding `messages` and `bytes`: past
/// [`INGEST_SHARE`] of one of its limits.
pub fn ingest_refusal(config: &StreamConfig, messages: u64, bytes: u64) -> Option<String> {
    let (part, whole) = INGEST_SHARE;
    let past = |held: u64, limit: i64| {
        limit > 0 && i128::from(held) * i128::from(whole) >= i128::from(limit) * i128::from(part)
    };
    let what = if past(messages, config.max_messages) {
        format!(
            "{messages} messages with this request, of its limit of {}",
            config.max_messages
        )
    } else if past(bytes, config.max_bytes) {
        format!(
            "{bytes} bytes with this request, of its limit of {}",
            config.max_bytes
        )
    } else {
        return None;
    };
    Some(format!(
        "the JetStream stream {} is full ({what}; the last quarter is kept for delivering the events already taken)",
        config.name
    ))
}

/// The stream hookrelay creates, with the flags' limits. Its discard policy is old, the only
/// one nats-server allows with message schedules; ingest stops at [`INGEST_SHARE`] of the
/// limits (503) so that the stream never reaches them and discards nothing.
fn wanted_stream(config: &BusConfig) -> StreamConfig {
    StreamConfig {
        name: config.stream.clone(),
        subjects: vec!["hookrelay.>".into()],
        // Limits, not work-queue: history stays for --nats-max-age, whatever was acked.
        retention: RetentionPolicy::Limits,
        max_age: config.max_age,
        max_bytes: config.max_bytes,
        max_messages: config.max_messages,
        discard: DiscardPolicy::Old,
        storage: StorageType::File,
        duplicate_window: DUPLICATE_WINDOW.min(config.max_age),
        // Parked work items (retries, holds) are scheduled by the stream itself.
        allow_message_schedules: true,
        ..Default::default()
    }
}

/// What to write over an existing stream so that hookrelay works with it: its configuration as
/// it is, plus hookrelay's subjects, message schedules, and a duplicate window if it has none.
/// Its limits (bytes, messages, age, discard policy, storage, replicas) stay as whoever runs
/// NATS set them. None when nothing is missing; an error when the stream cannot have what
/// hookrelay needs without changing one of its limits.
pub fn stream_update(
    existing: &StreamConfig,
    wanted: &StreamConfig,
) -> Result<Option<StreamConfig>, String> {
    if wanted.allow_message_schedules
        && !existing.allow_message_schedules
        && existing.discard == DiscardPolicy::New
    {
        return Err(format!(
            "the stream {name} discards new messages when full, and nats-server schedules no messages (hookrelay's parked retries and holds) on such a stream: set its discard policy to old (nats stream edit {name} --discard old); hookrelay stops ingest at three quarters of the stream's limits, so that it discards nothing",
            name = existing.name
        ));
    }
    let mut update = existing.clone();
    for subject in &wanted.subjects {
        if !update.subjects.contains(subject) {
            update.subjects.push(subject.clone());
        }
    }
    update.allow_message_schedules |= wanted.allow_message_schedules;
    if update.duplicate_window.is_zero() {
        update.duplicate_window = match update.max_age {
            age if age.is_zero() => wanted.duplicate_window,
            age => wanted.duplicate_window.min(age),
        };
    }
    Ok((update != *existing).then_some(update))
}

/// Creates the stream with the flags' limits if it does not exist; otherwise adds only what
/// hookrelay needs to it (see [`stream_update`]), keeping its limits.
async fn set_up_stream(context: &Context, config: &BusConfig) -> Result<(), async_nats::Error> {
    use async_nats::jetstream::{ErrorCode, context::GetStreamErrorKind};
    let wanted = wanted_stream(config);
    // Twice: a replica starting at the same moment may create it between our look and our
    // create, and then it is an existing stream.
    let mut not_created = None;
    for _ in 0..2 {
        let existing = match context.get_stream(&config.stream).await {
            Ok(stream) => stream.cached_info().config.clone(),
            Err(e) => match e.kind() {
                GetStreamErrorKind::JetStream(j)
                    if j.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                {
                    match context.create_stream(wanted.clone()).await {
                        Ok(_) => {
                            tracing::info!(stream = %config.stream, max_bytes = config.max_bytes, max_messages = config.max_messages, max_age = %humantime::format_duration(config.max_age), "JetStream stream created with the limits of the flags; ingest answers 503 once it holds three quarters of one");
                            return Ok(());
                        }
                        Err(e) => {
                            tracing::debug!(stream = %config.stream, error = %e, "JetStream stream not created; looking again");
                            not_created = Some(e);
                            continue;
                        }
                    }
                }
                _ => return Err(e.into()),
            },
        };
        let limit = |n: i64| if n > 0 { n.to_string() } else { "none".into() };
        tracing::info!(
            stream = %config.stream,
            max_bytes = %limit(existing.max_bytes),
            max_messages = %limit(existing.max_messages),
            max_age = %humantime::format_duration(existing.max_age),
            discard = ?existing.discard,
            "JetStream stream exists: its limits are kept as they are (--nats-max-bytes, --nats-max-messages and --nats-max-age apply when hookrelay creates it)"
        );
        if existing.max_bytes <= 0 && existing.max_messages <= 0 {
            tracing::warn!(stream = %config.stream, "JetStream stream has no byte or message limit: one tenant's flood can fill the NATS disk; set limits (nats stream edit --max-bytes --max-msgs)");
        }
        if let Some(update) = stream_update(&existing, &wanted)? {
            context.update_stream(update).await?;
            tracing::info!(stream = %config.stream, "JetStream stream updated with what hookrelay needs (its subjects, message schedules, a duplicate window)");
        }
        return Ok(());
    }
    Err(match not_created {
        Some(e) => e.into(),
        None => format!(
            "stream {} neither exists nor could be created",
            config.stream
        )
        .into(),
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
        // Ingest's span, when traces are exported: the router's span continues it.
        if let Some(trace) = crate::telemetry::traceparent(&tracing::Span::current()) {
            headers.insert(TRACEPARENT, trace.as_str());
        }
        Self {
            subject: format!("{EVENTS_SUBJECT}.{namespace}"),
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

fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    headers?.get(name).map(|v| v.as_str())
}

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
        routing.spawn(async move {
            if !routes.view().is_fresh() {
                // Cut off from the API server: the other replicas route it.
                let _ = message.ack_with(AckKind::Nak(Some(NOT_SEEN_RETRY))).await;
                return;
            }
            if let Some(seen) = not_seen_yet(&routes, &message) {
                // This replica lags behind the one that took the event in: another replica
                // routes it, or this one once its table has caught up.
                tracing::debug!(subject = %message.subject, seen, "JetStream router: the routing table is behind this event; not routed here yet");
                let _ = message.ack_with(AckKind::Nak(Some(NOT_SEEN_RETRY))).await;
                return;
            }
            if let Err(e) = route_one(&context, &routes, &metrics, &message).await {
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
fn not_seen_yet(routes: &Routes, message: &jetstream::Message) -> Option<u64> {
    let needed: u64 = header_number(message.headers.as_ref(), ROUTES_SEEN_HEADER)?;
    let namespace = message
        .subject
        .strip_prefix(EVENTS_SUBJECT)?
        .strip_prefix('.')?;
    let seen = routes.snapshot().seen(namespace);
    (seen < needed).then_some(seen)
}

async fn route_one(
    context: &Context,
    routes: &Routes,
    metrics: &Metrics,
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
    let event_sequence = message.info().map(|i| i.stream_sequence).ok();
    let table = routes.snapshot();
    // The route span continues the ingest trace; each work item carries it to its attempts.
    let span = tracing::info_span!(
        target: crate::telemetry::TARGET,
        "route",
        hookrelay.namespace = namespace,
        hookrelay.event = event.as_str(),
        hookrelay.event_id = event_id,
    );
    crate::telemetry::continue_trace(&span, header(headers, TRACEPARENT));
    let trace = crate::telemetry::traceparent(&span);
    // The payload is the body hookrelay published; it is parsed only when a filter needs it.
    let filtered = table.lookup(namespace, event).any(|r| r.filter.is_some());
    let wire = filtered
        .then(|| serde_json::from_slice::<FilterWire>(&message.payload).ok())
        .flatten()
        .unwrap_or_default();
    let facts = EventFacts::new(event, &wire.timestamp, &wire.data);
    let mut acks = Vec::new();
    for route in table.lookup_event(namespace, &facts, metrics) {
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
        if let Some(trace) = &trace {
            headers.insert(TRACEPARENT, trace.as_str());
        }
        let subject = format!("{}.{namespace}.{}", work_subject(route), route.key.name);
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

/// What a filter reads of an event's body.
#[derive(Default, serde::Deserialize)]
struct FilterWire {
    #[serde(default)]
    timestamp: String,
    #[serde(default)]
    data: serde_json::Map<String, serde_json::Value>,
}

/// Where the work items of `route` go: deliveries that must all come from one process (a rate
/// limit, an ordering) go to the serial subjects, the rest to the shared work queue.
pub fn work_subject(route: &Route) -> &'static str {
    if route.delivery.rate_limit.is_some() || route.ordering.is_some() {
        SERIAL_SUBJECT
    } else {
        DELIVERIES_SUBJECT
    }
}

/// Which work items a deliverer takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// The shared work queue, on every replica.
    Shared,
    /// The serial subjects, on the leader only.
    Serial,
}

/// The work items of one lane and where to publish parked ones.
pub struct WorkQueue {
    context: Context,
    consumer: jetstream::consumer::Consumer<pull::Config>,
    lane: Lane,
    /// The router's consumer and the stream: how far routing has come (`spec.ordering`).
    router: jetstream::consumer::Consumer<pull::Config>,
    stream: jetstream::stream::Stream,
}

impl Bus {
    /// The consumer of `lane`'s work items.
    pub fn work_queue(&self, lane: Lane) -> WorkQueue {
        let consumer = match lane {
            Lane::Shared => &self.deliverer,
            Lane::Serial => &self.serial,
        };
        WorkQueue {
            context: self.context.clone(),
            consumer: consumer.clone(),
            lane,
            router: self.router.clone(),
            stream: self.stream.clone(),
        }
    }
}

/// How many work items one replica keeps in hand, so that no namespace (nor held deliveries)
/// can take the consumer's `max_ack_pending` places from the others.
///
/// A namespace whose deliveries flow (a fan-out to 1,000 healthy Webhooks) keeps up to half of
/// `max_ack_pending` in hand while they wait for their slots: parking them would cost a round
/// trip through the stream and at least a second. A namespace whose deliveries do not get slots
/// (endpoints that never answer) is *congested*: an item that waited [`SLOT_WAIT_IN_HAND`] for
/// slots is parked, and for [`CONGESTION_MEMORY`] the namespace keeps no more than twice its
/// slots in hand on this replica. Every replica counts its own, so a share of the consumer is
/// taken once per replica: bounded by the slots, it holds across replicas while replicas ×
/// twice the slots stays below `max_ack_pending` (39 replicas at the defaults).
#[derive(Clone, Copy, Debug)]
pub struct InHandLimits {
    /// Messages of one namespace in hand (sending, waiting for its turn or slots, holding); the
    /// excess is parked.
    pub per_namespace: usize,
    /// The same while the namespace is congested.
    pub congested_per_namespace: usize,
    /// Held messages of one namespace kept in hand, waking the moment their Webhook changes;
    /// the others are parked and rechecked.
    pub held_per_namespace: usize,
}

/// An item that waits this long for its delivery slots is parked, and its namespace is
/// congested (see [`InHandLimits`]).
pub const SLOT_WAIT_IN_HAND: Duration = Duration::from_secs(1);
/// How long a namespace stays congested after an item last waited too long for slots.
pub const CONGESTION_MEMORY: Duration = Duration::from_secs(10);

impl InHandLimits {
    /// The shared lane, consumed by every replica: half of `max_ack_pending` per namespace, and
    /// twice its delivery slots (`--max-in-flight-per-namespace`: a round being sent, a round
    /// waiting) while it is congested.
    pub fn shared(max_ack_pending: i64, max_in_flight_per_namespace: usize) -> Self {
        let half = Self::half(max_ack_pending);
        let congested = max_in_flight_per_namespace.saturating_mul(2).min(half);
        Self {
            per_namespace: half,
            congested_per_namespace: congested.max(1),
            held_per_namespace: (congested / 4).max(1),
        }
    }

    /// The serial lane, consumed by the leader alone, so that what it counts is what the
    /// consumer has out: half of `max_ack_pending` (a rate-limited backlog waits in hand for
    /// its turns up to [`TURN_WAIT_IN_HAND`] ahead).
    pub fn serial(max_ack_pending: i64) -> Self {
        let half = Self::half(max_ack_pending);
        Self {
            per_namespace: half,
            congested_per_namespace: half,
            held_per_namespace: (half / 4).max(1),
        }
    }

    fn half(max_ack_pending: i64) -> usize {
        usize::try_from(max_ack_pending / 2)
            .unwrap_or(usize::MAX)
            .max(1)
    }
}

/// Whether a namespace last marked congested at `marked` still is at `now`.
fn still_congested(marked: Option<Instant>, now: Instant) -> bool {
    marked.is_some_and(|at| now.saturating_duration_since(at) < CONGESTION_MEMORY)
}

/// Delivers work items until `stop`, on every replica; starts once the routing table is
/// complete. Attempts being sent when `stop` fires get `grace`, then are abandoned (their
/// messages are redelivered after the ack wait).
pub async fn deliver_work(
    queue: WorkQueue,
    dispatcher: Arc<Dispatcher>,
    limits: InHandLimits,
    max_hold: Duration,
    routes_synced: impl Future<Output = ()>,
    stop: CancellationToken,
    grace: Duration,
) -> Result<(), BusError> {
    tokio::select! {
        _ = routes_synced => {}
        _ = stop.cancelled() => return Ok(()),
    }
    let WorkQueue {
        context,
        consumer,
        lane,
        router,
        stream,
    } = queue;
    let name = match lane {
        Lane::Shared => DELIVERER,
        Lane::Serial => SERIAL,
    };
    let failed = |why: String| BusError::Consumer {
        consumer: name,
        why,
    };
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| failed(e.to_string()))?;
    // Ordered deliveries are all the leader's, on the serial lane.
    let release = (lane == Lane::Serial).then(|| {
        Arc::new(Release {
            router,
            serial: consumer.clone(),
            stream,
            dispatcher: dispatcher.clone(),
            state: Mutex::default(),
            wake: Notify::new(),
            pulled: AtomicU64::new(0),
        })
    });
    if let Some(release) = &release {
        tokio::spawn(release.clone().run(stop.clone()));
    }
    let deliverer = Arc::new(Deliverer {
        context,
        release,
        lane,
        dispatcher,
        max_hold,
        in_hand: KeyedLimits::new(limits.per_namespace),
        congested_in_hand: KeyedLimits::new(limits.congested_per_namespace),
        congested: Mutex::default(),
        held: KeyedLimits::new(limits.held_per_namespace),
        stop: stop.clone(),
    });
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
            // The consumer's max_ack_pending bounds how many are in hand at once, the
            // per-namespace limits how many of them one namespace has.
            Some(Ok(message)) => {
                // Registered here, in the order received, before the next is pulled.
                let turn = deliverer.register(&message);
                let deliverer = deliverer.clone();
                in_flight.spawn(async move { deliverer.deliver_one(message, turn).await });
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

/// A work item's delivery and what it carries from earlier hand-outs.
struct WorkItem {
    delivery: Delivery,
    /// Attempts made before this message was published (by the messages it replaced).
    attempts_before: u32,
    /// Times it was parked in a row without an attempt, for the recheck backoff.
    parked: u32,
    /// Since when it is held (unix milliseconds), when it is.
    held_since: Option<u64>,
    /// The stream sequence of its event, when the router gave it.
    event_sequence: Option<u64>,
}

fn header_number<T: std::str::FromStr>(headers: Option<&HeaderMap>, name: &str) -> Option<T> {
    header(headers, name)?.parse().ok()
}

/// The delivery a work item describes, or None if it is not one.
fn delivery_of(message: &jetstream::Message) -> Option<WorkItem> {
    let headers = message.headers.as_ref();
    let rest = [DELIVERIES_SUBJECT, SERIAL_SUBJECT]
        .iter()
        .find_map(|prefix| message.subject.strip_prefix(prefix))?
        .strip_prefix('.')?;
    let (namespace, name) = rest.split_once('.')?;
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
        source: super::Source::JetStream,
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

/// What to do with a work item's message once its delivery step is done.
#[derive(Debug, PartialEq)]
enum Settle {
    Ack,
    /// Attempt `attempt` asks for another after `after`.
    Retry {
        attempt: u32,
        after: Duration,
    },
    /// Held (Webhook paused or blocked) since then (unix milliseconds): recheck later.
    Held {
        since: u64,
    },
    /// Its Webhook got a rate limit or an ordering while it was in hand: to the serial lane.
    MoveToSerial,
    /// Its turn under its Webhook's rate limit is `after` away: parked until about then,
    /// rather than kept in hand.
    Turn {
        after: Duration,
    },
    /// This replica's table has not seen its Webhook as the router did: parked for another
    /// replica (or this one, caught up) to take, spending no attempt.
    NotSeenYet,
    /// It waited [`SLOT_WAIT_IN_HAND`] for its slots: parked, its namespace congested.
    Congested,
    /// Stopping: leave it to be redelivered.
    Abandon,
}

/// Why a work item leaves the consumer for a while: the message is acked and the same work item
/// is published again, scheduled by the stream, so that it does not count against
/// `max_ack_pending` meanwhile.
#[derive(Debug, PartialEq)]
enum Park {
    /// A retry of the delivery after `after`, `attempts` spent so far.
    Retry { attempts: u32, after: Duration },
    /// Held since then: rechecked later, spending no attempt.
    Held { since: u64 },
    /// Its namespace has all its places in hand: tried again later.
    Busy,
    /// This replica cannot judge it (its routing table has not seen the Webhook as the router
    /// did, or it is cut off from the API server): back in about a second for any replica,
    /// without backing off, as the others can most likely take it at once.
    Elsewhere,
    /// Its turn under its Webhook's rate limit is `after` away.
    Turn { after: Duration },
}

/// The delay before a parked work item comes back, and the headers it comes back with.
/// `jitter` in [0, 1) picks the point in the second half of a recheck's backoff.
fn park_plan(item: &WorkItem, park: &Park, jitter: f64) -> (Duration, u32, u32, Option<u64>) {
    // Parked without an attempt: back off, so that a long hold or a namespace stuck on dead
    // endpoints republishes each of its messages at most every PARK_MAX.
    let backoff = |parked: u32| {
        PARK_MIN
            .saturating_mul(1 << parked.min(16))
            .min(PARK_MAX)
            .mul_f64(0.5 + jitter.clamp(0.0, 1.0) / 2.0)
    };
    match *park {
        Park::Retry { attempts, after } => (after, attempts, 0, None),
        Park::Held { since } => (
            backoff(item.parked),
            item.attempts_before,
            item.parked + 1,
            Some(since),
        ),
        Park::Busy => (
            backoff(item.parked),
            item.attempts_before,
            item.parked + 1,
            item.held_since,
        ),
        Park::Elsewhere => (
            PARK_MIN.mul_f64(0.5 + jitter.clamp(0.0, 1.0) / 2.0),
            item.attempts_before,
            item.parked,
            item.held_since,
        ),
        // `after` is its place in the Webhook's backlog (see `RateLimits::reserve`): back
        // half of TURN_WAIT_IN_HAND before it, so that its turn is then near enough to wait
        // for in hand, late schedules and new arrivals taking turns first included. Places are
        // one interval apart already: no jitter.
        Park::Turn { after } => (
            after.saturating_sub(TURN_BACK_BEFORE).max(PARK_MIN),
            item.attempts_before,
            item.parked,
            item.held_since,
        ),
    }
}

fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

struct Deliverer {
    context: Context,
    lane: Lane,
    /// The serial lane's gate of ordered deliveries.
    release: Option<Arc<Release>>,
    dispatcher: Arc<Dispatcher>,
    max_hold: Duration,
    /// Messages in hand per namespace on this replica.
    in_hand: KeyedLimits<Arc<str>>,
    /// The same, for a namespace while it is congested (see [`InHandLimits`]).
    congested_in_hand: KeyedLimits<Arc<str>>,
    /// When each namespace last had an item wait too long for its slots.
    congested: Mutex<HashMap<Arc<str>, Instant>>,
    /// Held messages in hand per namespace on this replica.
    held: KeyedLimits<Arc<str>>,
    stop: CancellationToken,
}

impl Deliverer {
    fn is_congested(&self, namespace: &Arc<str>) -> bool {
        let congested = self.congested.lock().unwrap_or_else(|e| e.into_inner());
        still_congested(congested.get(namespace).copied(), Instant::now())
    }

    fn mark_congested(&self, namespace: &Arc<str>) {
        let mut congested = self.congested.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        congested.retain(|_, at| still_congested(Some(*at), now));
        congested.insert(namespace.clone(), now);
    }

    /// On the serial lane: an ordered work item waits for its event's release from here (see
    /// [`Release`]); every message received counts as pulled once registered.
    fn register(&self, message: &jetstream::Message) -> Option<oneshot::Receiver<Option<Ticket>>> {
        let release = self.release.as_ref()?;
        let sequence = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        let turn = delivery_of(message).and_then(|item| {
            let route = self.dispatcher.route_of(&item.delivery)?;
            route.ordering.as_ref()?;
            Some(release.wait_for(item.event_sequence?, item.delivery))
        });
        // After the registration: the gate trusts that what was pulled is registered.
        release.pulled.fetch_max(sequence, AtomicOrdering::SeqCst);
        turn
    }

    async fn deliver_one(
        &self,
        message: jetstream::Message,
        turn: Option<oneshot::Receiver<Option<Ticket>>>,
    ) {
        let Some(mut item) = delivery_of(&message) else {
            tracing::warn!(subject = %message.subject, "JetStream deliverer: dropping a message that is not a work item");
            let _ = message.ack_with(AckKind::Term).await;
            return;
        };
        let (delivered, sequence) = match message.info() {
            Ok(info) => (info.delivered.max(1) as u32, info.stream_sequence),
            Err(_) => (1, 0),
        };
        if !self.dispatcher.view_is_fresh() {
            // Cut off from the API server: parked (no attempt spent) for the other replicas.
            return self.park(&message, sequence, &item, Park::Elsewhere).await;
        }
        if self.lane == Lane::Serial {
            let ordered = self
                .dispatcher
                .route_of(&item.delivery)
                .is_some_and(|r| r.ordering.is_some());
            if turn.is_some() || ordered {
                return self.deliver_ordered(message, item, delivered, turn).await;
            }
        }
        // A held item whose Webhook can take it again starts its recheck backoff over: if its
        // namespace is busy now, it comes back in about a second, not after the hold's backoff.
        if item.held_since.is_some()
            && matches!(
                self.dispatcher.check(&item.delivery),
                RouteCheck::Deliver(_)
            )
        {
            item.held_since = None;
            item.parked = 0;
        }
        if let RouteCheck::Deliver(route) = self.dispatcher.check(&item.delivery)
            && self.lane == Lane::Shared
            && work_subject(&route) == SERIAL_SUBJECT
        {
            return self
                .move_to_serial(&message, sequence, delivered, &item)
                .await;
        }
        let namespace = item.delivery.webhook.namespace.clone();
        let places = self.in_hand.get(&namespace, 0, |_| false);
        let Ok(_place) = places.try_acquire_owned() else {
            return self.park(&message, sequence, &item, Park::Busy).await;
        };
        let _congested_place = if self.is_congested(&namespace) {
            let places = self.congested_in_hand.get(&namespace, 0, |_| false);
            match places.try_acquire_owned() {
                Ok(place) => Some(place),
                Err(_) => return self.park(&message, sequence, &item, Park::Busy).await,
            }
        } else {
            None
        };
        // Hand-outs of this message beyond the first that made no attempt (a replica stopped
        // or crashed in between) count as attempts: at most one too many, never one too few.
        let attempt = item.attempts_before + delivered;
        // Kept in hand while waiting for slots, holding or sending, so that it is not
        // redelivered to another replica meanwhile.
        let settle = {
            let work = self.attempt_once(&item, attempt);
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
            Settle::Retry { attempt, after } => {
                let park = Park::Retry {
                    attempts: attempt,
                    after,
                };
                return self.park(&message, sequence, &item, park).await;
            }
            Settle::Held { since } => {
                return self
                    .park(&message, sequence, &item, Park::Held { since })
                    .await;
            }
            Settle::Turn { after } => {
                let park = Park::Turn { after };
                return self.park(&message, sequence, &item, park).await;
            }
            Settle::Congested => {
                return self.park(&message, sequence, &item, Park::Busy).await;
            }
            Settle::MoveToSerial => {
                return self
                    .move_to_serial(&message, sequence, delivered, &item)
                    .await;
            }
            Settle::NotSeenYet => {
                return self.park(&message, sequence, &item, Park::Elsewhere).await;
            }
            Settle::Abandon => Ok(()),
        };
        if let Err(e) = result {
            tracing::warn!(delivery = %item.delivery.id, error = %e, "JetStream deliverer: could not settle a work item; it is redelivered");
        }
    }

    /// One attempt (number `attempt`) of the item's delivery, after checking its route. A held
    /// delivery waits in hand for its route to change while its namespace has a held place,
    /// and is parked otherwise.
    async fn attempt_once(&self, item: &WorkItem, attempt: u32) -> Settle {
        let delivery = &item.delivery;
        let mut held_since = item.held_since;
        let mut held_place = None;
        loop {
            match self.dispatcher.check(delivery) {
                RouteCheck::Gone(why) => {
                    tracing::info!(delivery = %delivery.id, webhook = %delivery.webhook.name, %why, "JetStream delivery failed");
                    return Settle::Ack;
                }
                RouteCheck::NotSeenYet(why) => {
                    tracing::debug!(delivery = %delivery.id, webhook = %delivery.webhook.name, %why, "JetStream deliverer: not deliverable here yet");
                    return Settle::NotSeenYet;
                }
                RouteCheck::Hold { route, why } => {
                    let now = unix_millis(SystemTime::now());
                    let since = *held_since.get_or_insert(now);
                    let held_for = Duration::from_millis(now.saturating_sub(since));
                    if held_for >= self.max_hold {
                        let why = super::held_too_long(held_for, self.max_hold, &why);
                        tracing::warn!(delivery = %delivery.id, webhook = %delivery.webhook.name, %why, "JetStream delivery failed");
                        self.dispatcher
                            .record_failure(delivery, attempt.saturating_sub(1), &why)
                            .await;
                        return Settle::Ack;
                    }
                    if held_place.is_none() {
                        let places = self.held.get(&delivery.webhook.namespace, 0, |_| false);
                        match places.try_acquire_owned() {
                            Ok(place) => held_place = Some(place),
                            Err(_) => return Settle::Held { since },
                        }
                    }
                    tokio::select! {
                        _ = route.superseded.cancelled() => {}
                        _ = tokio::time::sleep(HOLD_RECHECK.min(self.max_hold - held_for)) => {}
                        _ = self.stop.cancelled() => return Settle::Abandon,
                    }
                    continue;
                }
                // Held on the shared lane until its Webhook changed: if that change added a
                // rate limit or an ordering, the leader delivers it.
                RouteCheck::Deliver(route)
                    if self.lane == Lane::Shared && work_subject(&route) == SERIAL_SUBJECT =>
                {
                    return Settle::MoveToSerial;
                }
                RouteCheck::Deliver(_) => {}
            }
            held_place = None;
            // On the serial lane a turn far off is not waited for in hand (the check and the
            // turn are one step: items taken at once cannot all see the bucket empty).
            let max_turn_wait = (self.lane == Lane::Serial).then_some(TURN_WAIT_IN_HAND);
            let slots = tokio::select! {
                biased;
                _ = self.stop.cancelled() => return Settle::Abandon,
                slots = self.dispatcher.reserve_within_turn(delivery, max_turn_wait) => slots,
                // The shared lane: a place in hand is not kept waiting on stuck endpoints.
                _ = tokio::time::sleep(SLOT_WAIT_IN_HAND), if self.lane == Lane::Shared => {
                    self.mark_congested(&delivery.webhook.namespace);
                    return Settle::Congested;
                }
            };
            let slots = match slots {
                Ok(slots) => slots,
                Err(after) => return Settle::Turn { after },
            };
            match self.dispatcher.send(delivery, attempt, slots).await {
                Attempted::Sent(report) => {
                    return match report.verdict {
                        Verdict::Retry(after) => Settle::Retry { attempt, after },
                        Verdict::Succeeded | Verdict::Failed | Verdict::Gone => Settle::Ack,
                    };
                }
                Attempted::NotSent | Attempted::Busy => continue,
            }
        }
    }

    /// Delivers an ordered work item in hand, start to end (retries, holds): parking it would
    /// put it back behind later events of its key. It waits for its event's release, then for
    /// its key's turn; it is acked once final, and left to be redelivered if stopped.
    async fn deliver_ordered(
        &self,
        message: jetstream::Message,
        item: WorkItem,
        delivered: u32,
        turn: Option<oneshot::Receiver<Option<Ticket>>>,
    ) {
        let work = async {
            let mut ticket = match turn {
                Some(rx) => tokio::select! {
                    ticket = rx => ticket.ok().flatten(),
                    _ = self.stop.cancelled() => return false,
                },
                // Routed before the Webhook was ordered (moved here): in the order received.
                None => self.dispatcher.ticket(&item.delivery, 0),
            };
            let mut target = super::new_target(&item.delivery);
            // As in deliver_one: hand-outs beyond the first may have made an attempt.
            target.attempts = (item.attempts_before + delivered - 1) as i32;
            target.held_since = item.held_since.and_then(|ms| {
                k8s_openapi::jiff::Timestamp::from_millisecond(ms as i64)
                    .ok()
                    .map(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time)
            });
            super::deliver(
                &self.dispatcher,
                &item.delivery,
                &mut target,
                self.max_hold,
                &self.stop,
                &super::Unrecorded,
                ticket.as_mut(),
            )
            .await;
            super::is_final(target.state)
        };
        tokio::pin!(work);
        let mut progress = tokio::time::interval(PROGRESS_EVERY);
        progress.tick().await;
        let finished = loop {
            tokio::select! {
                finished = &mut work => break finished,
                _ = progress.tick() => {
                    let _ = message.ack_with(AckKind::Progress).await;
                }
            }
        };
        if finished && let Err(e) = message.ack().await {
            tracing::warn!(delivery = %item.delivery.id, error = %e, "JetStream deliverer: could not settle a work item; it is redelivered");
        }
    }

    /// Publishes the work item to its Webhook's serial subject (a rate limit was added since it
    /// was routed), then acks this message; nak'd for another try if the stream does not take
    /// it.
    async fn move_to_serial(
        &self,
        message: &jetstream::Message,
        sequence: u64,
        delivered: u32,
        item: &WorkItem,
    ) {
        let delivery = &item.delivery;
        // As in deliver_one: hand-outs beyond the first may have made an attempt.
        let attempts = item.attempts_before + delivered.saturating_sub(1);
        let headers = work_item_headers(
            item,
            &format!("{}/serial/{sequence}", delivery.id),
            attempts,
            item.parked,
            item.held_since,
        );
        let subject = format!(
            "{SERIAL_SUBJECT}.{}.{}",
            delivery.webhook.namespace, delivery.webhook.name
        );
        let stored = async {
            let ack = self
                .context
                .publish_with_headers(subject, headers, message.payload.clone())
                .await
                .map_err(|e| e.to_string())?;
            ack.await.map_err(|e| e.to_string())
        }
        .await;
        let result = match stored {
            Ok(_) => message.ack().await,
            Err(e) => {
                tracing::warn!(delivery = %delivery.id, error = %e, "JetStream deliverer: could not move a work item to its serial subject; it is redelivered");
                message.ack_with(AckKind::Nak(Some(PARK_MIN))).await
            }
        };
        if let Err(e) = result {
            tracing::warn!(delivery = %delivery.id, error = %e, "JetStream deliverer: could not settle a work item; it is redelivered");
        }
    }

    /// Publishes the work item again, scheduled by the stream after the park's delay, then acks
    /// this message. If the stream does not take it, the message is nak'd with the delay
    /// instead (kept in the consumer's pending meanwhile: correct, only less fair).
    async fn park(&self, message: &jetstream::Message, sequence: u64, item: &WorkItem, park: Park) {
        let (after, attempts, parked, held_since) = park_plan(item, &park, rand::random());
        let at = k8s_openapi::jiff::Timestamp::now()
            .checked_add(after)
            .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now());
        let delivery = &item.delivery;
        // One scheduled copy per message parked: parking it again after a crash is a duplicate.
        let mut headers = work_item_headers(
            item,
            &format!("{}/{sequence}", delivery.id),
            attempts,
            parked,
            held_since,
        );
        headers.insert("Nats-Schedule", format!("@at {at}").as_str());
        headers.insert("Nats-Schedule-Target", message.subject.as_str());
        let subject = format!(
            "{SCHEDULES_SUBJECT}.{}.{}.{}",
            delivery.webhook.namespace, delivery.webhook.name, delivery.id
        );
        // Published again if the stream's answer does not come (its message id makes a second
        // copy a duplicate): a nak would count as a hand-out, so as an attempt.
        let mut stored = Err(String::new());
        for _ in 0..PARK_PUBLISH_TRIES {
            stored = async {
                let ack = self
                    .context
                    .publish_with_headers(subject.clone(), headers.clone(), message.payload.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                ack.await.map_err(|e| e.to_string())
            }
            .await;
            if stored.is_ok() || self.stop.is_cancelled() {
                break;
            }
        }
        let result = match stored {
            Ok(_) => message.ack().await,
            Err(e) => {
                tracing::warn!(delivery = %delivery.id, error = %e, "JetStream deliverer: could not park a work item; it waits in the consumer instead");
                message.ack_with(AckKind::Nak(Some(after))).await
            }
        };
        if let Err(e) = result {
            tracing::warn!(delivery = %delivery.id, error = %e, "JetStream deliverer: could not settle a work item; it is redelivered");
        }
    }
}

/// How often the gate of ordered deliveries asks how far routing has come, while any wait.
const RELEASE_CHECK: Duration = Duration::from_millis(50);

/// The gate of ordered deliveries on the leader's serial lane.
///
/// Routers on several replicas route events concurrently, so the work items of events 1 and 2
/// may reach the serial subject in the other order. A work item carries its event's stream
/// sequence `s`, and waits here until every event up to `s` is routed (the router consumer's
/// ack floor is at least `s`: routers ack an event once its work items are stored) and every
/// work item stored by then has been received and registered (the serial consumer has handed
/// out everything up to the stream's last sequence, and this replica has pulled it). Then the
/// waiting items up to the floor take their tickets in event order.
struct Release {
    router: jetstream::consumer::Consumer<pull::Config>,
    serial: jetstream::consumer::Consumer<pull::Config>,
    stream: jetstream::stream::Stream,
    dispatcher: Arc<Dispatcher>,
    state: Mutex<ReleaseState>,
    wake: Notify,
    /// The highest stream sequence pulled from the serial consumer and registered.
    pulled: AtomicU64,
}

/// An ordered delivery waiting for its event's release, and where its ticket goes.
type WaitingDelivery = (Delivery, oneshot::Sender<Option<Ticket>>);

#[derive(Default)]
struct ReleaseState {
    /// Events up to this sequence are released.
    floor: u64,
    /// (event sequence, arrival) -> the delivery and where its ticket goes.
    waiting: BTreeMap<(u64, u64), WaitingDelivery>,
    arrivals: u64,
}

impl Release {
    fn lock(&self) -> std::sync::MutexGuard<'_, ReleaseState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where the ticket of `delivery` (event sequence `sequence`) comes once released.
    fn wait_for(&self, sequence: u64, delivery: Delivery) -> oneshot::Receiver<Option<Ticket>> {
        let (tx, rx) = oneshot::channel();
        let mut state = self.lock();
        if sequence <= state.floor {
            // Redelivered after the floor passed it (a hand-over): in the order received.
            let _ = tx.send(self.dispatcher.ticket(&delivery, sequence));
        } else {
            let arrival = state.arrivals;
            state.arrivals += 1;
            state.waiting.insert((sequence, arrival), (delivery, tx));
            self.wake.notify_one();
        }
        rx
    }

    async fn run(self: Arc<Self>, stop: CancellationToken) {
        loop {
            if self.lock().waiting.is_empty() {
                tokio::select! {
                    _ = self.wake.notified() => continue,
                    _ = stop.cancelled() => return,
                }
            }
            match self.routed_floor().await {
                Ok(Some(floor)) => self.release(floor),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "JetStream serial deliverer: cannot read how far routing has come; ordered deliveries wait")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(RELEASE_CHECK) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// The router's ack floor, once every work item stored before it was read is registered.
    async fn routed_floor(&self) -> Result<Option<u64>, String> {
        let floor = self
            .router
            .get_info()
            .await
            .map_err(|e| e.to_string())?
            .ack_floor
            .stream_sequence;
        let last = self
            .stream
            .get_info()
            .await
            .map_err(|e| e.to_string())?
            .state
            .last_sequence;
        let serial = self.serial.get_info().await.map_err(|e| e.to_string())?;
        Ok(released_floor(
            floor,
            last,
            serial.num_pending,
            serial.delivered.stream_sequence,
            self.pulled.load(AtomicOrdering::SeqCst),
        ))
    }

    /// Gives the waiting deliveries of events up to `floor` their tickets, in event order.
    fn release(&self, floor: u64) {
        let mut state = self.lock();
        let floor = state.floor.max(floor);
        state.floor = floor;
        while let Some(entry) = state.waiting.first_entry() {
            let sequence = entry.key().0;
            if sequence > floor {
                break;
            }
            let (delivery, tx) = entry.remove();
            let _ = tx.send(self.dispatcher.ticket(&delivery, sequence));
        }
    }
}

/// How far ordered deliveries may be released, read in this order: `routed` (the router's ack
/// floor: every event up to it has its work items stored), `last` (the stream's last sequence
/// just after: every such work item is at or below it), then the serial consumer's messages not
/// yet handed out and the last one handed out, and what this replica has pulled and registered.
/// None while a work item stored before `last` may not have reached this replica.
fn released_floor(
    routed: u64,
    last: u64,
    serial_not_handed_out: u64,
    serial_handed_out: u64,
    pulled: u64,
) -> Option<u64> {
    let handed_out = serial_not_handed_out == 0 || serial_handed_out >= last;
    (handed_out && pulled >= serial_handed_out).then_some(routed)
}

/// The headers of a work item published by a deliverer (parked or moved), with `msg_id` as
/// its `Nats-Msg-Id`.
fn work_item_headers(
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

    fn bus_config() -> BusConfig {
        BusConfig {
            url: "nats://127.0.0.1:4222".into(),
            creds: None,
            tls: NatsTls::default(),
            stream: "HOOKRELAY".into(),
            max_age: Duration::from_secs(86400),
            max_bytes: 1 << 30,
            max_messages: 1_000_000,
            max_ack_pending: 10_000,
        }
    }

    #[test]
    fn a_new_stream_gets_the_flags_limits() {
        let wanted = wanted_stream(&bus_config());
        assert_eq!(wanted.max_bytes, 1 << 30);
        assert_eq!(wanted.max_messages, 1_000_000);
        // nats-server refuses message schedules with discard new.
        assert_eq!(wanted.discard, DiscardPolicy::Old);
        assert!(wanted.allow_message_schedules);
        assert_eq!(wanted.duplicate_window, DUPLICATE_WINDOW);
    }

    #[test]
    fn an_existing_stream_keeps_its_limits_and_gets_only_what_hookrelay_needs() {
        let wanted = wanted_stream(&bus_config());
        // As whoever runs NATS set it up: other limits, discarding old, an extra subject, no
        // message schedules.
        let existing = StreamConfig {
            name: "HOOKRELAY".into(),
            subjects: vec!["audit.>".into()],
            max_bytes: 5 << 30,
            max_messages: -1,
            max_age: Duration::from_secs(3600),
            discard: DiscardPolicy::Old,
            num_replicas: 3,
            duplicate_window: Duration::ZERO,
            ..Default::default()
        };
        let update = stream_update(&existing, &wanted)
            .unwrap()
            .expect("schedules and subjects missing");
        assert_eq!(update.subjects, ["audit.>", "hookrelay.>"]);
        assert!(update.allow_message_schedules);
        // Not longer than its max age.
        assert_eq!(update.duplicate_window, Duration::from_secs(600));
        assert_eq!(
            (update.max_bytes, update.max_messages, update.max_age),
            (5 << 30, -1, Duration::from_secs(3600))
        );
        assert_eq!(update.discard, DiscardPolicy::Old);
        assert_eq!(update.num_replicas, 3);
        // Its own duplicate window stays; once everything is there, nothing is written.
        let shorter = StreamConfig {
            duplicate_window: Duration::from_secs(120),
            ..update.clone()
        };
        assert_eq!(stream_update(&shorter, &wanted), Ok(None));
        assert_eq!(stream_update(&update, &wanted), Ok(None));
        let short_lived = StreamConfig {
            max_age: Duration::from_secs(60),
            ..existing
        };
        assert_eq!(
            stream_update(&short_lived, &wanted)
                .unwrap()
                .unwrap()
                .duplicate_window,
            Duration::from_secs(60)
        );
    }

    #[test]
    fn a_stream_discarding_new_messages_is_not_changed_but_refused_saying_what_to_do() {
        let wanted = wanted_stream(&bus_config());
        let existing = StreamConfig {
            name: "HOOKRELAY".into(),
            subjects: vec!["hookrelay.>".into()],
            max_messages: 1000,
            discard: DiscardPolicy::New,
            ..Default::default()
        };
        let why = stream_update(&existing, &wanted).unwrap_err();
        assert!(
            why.contains("nats stream edit HOOKRELAY --discard old"),
            "{why}"
        );
    }

    #[test]
    fn a_stream_hookrelay_created_is_left_as_it_is() {
        let wanted = wanted_stream(&bus_config());
        // The server fills in what was not given.
        let created = StreamConfig {
            max_consumers: -1,
            max_messages_per_subject: -1,
            max_message_size: -1,
            ..wanted.clone()
        };
        assert_eq!(stream_update(&created, &wanted), Ok(None));
        // Other flags at this start do not change it either.
        let other_flags = wanted_stream(&BusConfig {
            max_bytes: 1 << 20,
            max_messages: 10,
            ..bus_config()
        });
        assert_eq!(stream_update(&created, &other_flags), Ok(None));
    }

    #[test]
    fn ingest_stops_at_three_quarters_of_a_limit() {
        let config = StreamConfig {
            name: "HOOKRELAY".into(),
            max_messages: 100,
            max_bytes: 4000,
            discard: DiscardPolicy::New,
            ..Default::default()
        };
        assert_eq!(ingest_refusal(&config, 74, 2999), None);
        let why = ingest_refusal(&config, 75, 0).unwrap();
        assert!(
            why.contains("HOOKRELAY is full")
                && why.contains("75 messages with this request, of its limit of 100"),
            "{why}"
        );
        let why = ingest_refusal(&config, 0, 3000).unwrap();
        assert!(
            why.contains("3000 bytes with this request, of its limit of 4000"),
            "{why}"
        );
        // No limit: never refused here.
        let unlimited = StreamConfig {
            max_messages: -1,
            max_bytes: -1,
            ..config.clone()
        };
        assert_eq!(ingest_refusal(&unlimited, u64::MAX, u64::MAX), None);
    }

    fn item(attempts_before: u32, parked: u32, held_since: Option<u64>) -> WorkItem {
        let body = EventBody::new(
            EventType::Completed,
            "2023-06-15T10:35:00Z",
            &Default::default(),
        );
        WorkItem {
            delivery: Delivery {
                webhook: WebhookKey::new("docs", "w"),
                webhook_uid: "uid".into(),
                routed_version: 0,
                id: "msg_1".into(),
                event: Arc::new(body),
                source: crate::delivery::Source::JetStream,
                manual: false,
                timeout_cap: None,
                trace: None,
            },
            attempts_before,
            parked,
            held_since,
            event_sequence: None,
        }
    }

    #[test]
    fn parking_keeps_the_attempts_and_backs_off_rechecks_without_spending_any() {
        // A retry: the policy's delay, the attempts spent, the park count and hold cleared.
        let plan = park_plan(
            &item(1, 3, Some(5)),
            &Park::Retry {
                attempts: 2,
                after: Duration::from_secs(7),
            },
            0.9,
        );
        assert_eq!(plan, (Duration::from_secs(7), 2, 0, None));
        // A hold: no attempt spent, 1 s doubling per park up to 30 s, spread over the second
        // half of each step, since when kept.
        let held =
            |parked, jitter| park_plan(&item(2, parked, None), &Park::Held { since: 42 }, jitter);
        assert_eq!(held(0, 1.0), (PARK_MIN, 2, 1, Some(42)));
        assert_eq!(held(0, 0.0).0, PARK_MIN / 2);
        assert_eq!(held(3, 0.5).0, Duration::from_secs(6));
        assert_eq!(held(40, 1.0).0, PARK_MAX);
        assert_eq!(held(40, 0.0).0, PARK_MAX / 2);
        // Busy: the same backoff, the hold (if any) carried on.
        let busy = park_plan(&item(0, 1, Some(9)), &Park::Busy, 1.0);
        assert_eq!(busy, (Duration::from_secs(2), 0, 2, Some(9)));
        // Left to another replica: about a second whatever the park count, nothing spent.
        let elsewhere = park_plan(&item(3, 20, Some(9)), &Park::Elsewhere, 1.0);
        assert_eq!(elsewhere, (PARK_MIN, 3, 20, Some(9)));
        // A far turn under a rate limit: back 2.5 s before its place in the backlog, whatever
        // the jitter, no backoff.
        let turn = |after, jitter| park_plan(&item(1, 2, None), &Park::Turn { after }, jitter);
        assert_eq!(
            turn(Duration::from_secs(60), 1.0),
            (Duration::from_millis(57_500), 1, 2, None)
        );
        assert_eq!(
            turn(Duration::from_secs(60), 0.0).0,
            Duration::from_millis(57_500)
        );
        assert_eq!(turn(Duration::from_millis(100), 0.0).0, PARK_MIN);
    }

    #[test]
    fn ordered_deliveries_are_released_only_once_every_earlier_work_item_is_here() {
        // Routed up to event 40; the stream ends at 50; the serial consumer handed out up to
        // 45 and has nothing else: once this replica pulled 45, events up to 40 go.
        assert_eq!(released_floor(40, 50, 0, 45, 45), Some(40));
        // A work item handed out but not yet pulled here (it may be an earlier event's).
        assert_eq!(released_floor(40, 50, 0, 45, 44), None);
        // Work items stored but not handed out yet, some possibly at or below 50.
        assert_eq!(released_floor(40, 50, 3, 45, 45), None);
        // ... unless everything up to the stream's last sequence was handed out already.
        assert_eq!(released_floor(40, 50, 3, 52, 52), Some(40));
    }

    #[test]
    fn a_congested_namespace_keeps_twice_its_slots_in_hand_at_most_half_of_max_ack_pending() {
        // Defaults: 128 slots per namespace, 10,000 places: a flowing namespace keeps up to
        // 5,000 in hand (a fan-out waits for its slots there), a congested one 256, 64 of them
        // held. Two replicas congested on one namespace's dead endpoints leave 9,488 places.
        let defaults = InHandLimits::shared(10_000, 128);
        assert_eq!(
            (
                defaults.per_namespace,
                defaults.congested_per_namespace,
                defaults.held_per_namespace
            ),
            (5_000, 256, 64)
        );
        // Many slots, few places: half of max_ack_pending.
        let low = InHandLimits::shared(20, 128);
        assert_eq!(
            (
                low.per_namespace,
                low.congested_per_namespace,
                low.held_per_namespace
            ),
            (10, 10, 2)
        );
        assert_eq!(InHandLimits::shared(200, 8).congested_per_namespace, 16);
        let tiny = InHandLimits::shared(1, 1);
        assert_eq!((tiny.per_namespace, tiny.congested_per_namespace), (1, 1));
        // The serial lane has one consumer: half of max_ack_pending, congested or not.
        let serial = InHandLimits::serial(10_000);
        assert_eq!(
            (serial.per_namespace, serial.congested_per_namespace),
            (5_000, 5_000)
        );
        assert_eq!(InHandLimits::serial(1).per_namespace, 1);
    }

    #[test]
    fn a_namespace_stays_congested_for_a_while_after_an_item_waited_too_long() {
        let marked = Instant::now();
        assert!(!still_congested(None, marked));
        assert!(still_congested(Some(marked), marked));
        assert!(still_congested(
            Some(marked),
            marked + CONGESTION_MEMORY - Duration::from_millis(1)
        ));
        assert!(!still_congested(Some(marked), marked + CONGESTION_MEMORY));
    }

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
