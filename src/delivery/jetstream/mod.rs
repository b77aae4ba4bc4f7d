//! `--ingest-mode jetstream`: events and deliveries kept in a NATS JetStream stream, consumed by
//! every replica through two durable pull consumers they share.
//!
//! Every subject is under the stream's name lowercased ([`Subjects`]): `hookrelay.` for the
//! default stream `HOOKRELAY`, as before the prefix followed `--nats-stream`. Below, `<prefix>`.
//!
//! - `<prefix>.events.<namespace>`: what ingest publishes (the contract-shaped body; the event id
//!   and type in headers). The `router` consumer turns each event into one work item per target
//!   and acks the event once every work item is stored. An unkeyed event whose targets are all
//!   on the shared lane, at most [`ROUTED_AT_INGEST_PER_REQUEST`] work items a request, is
//!   routed by the replica that takes it in instead, while its view of the Webhooks is fresh:
//!   ingest stores its work items before the 202 and the event itself is never stored, so each
//!   delivery costs one store and one hand-out rather than two. Keyed events (a repeat is
//!   checked against the stored event), ordered and rate-limited Webhooks' events (their work
//!   items carry the event's stream sequence) and large fan-outs (stored in rounds) still go
//!   through the router.
//! - `<prefix>.deliveries.<namespace>.<webhook>`: one work item per target (the body, the
//!   delivery id, the Webhook's name and uid in headers). The `deliverer` consumer makes one
//!   attempt per hand-out of the message.
//!
//! - `<prefix>.serial.<namespace>.<webhook>`: the work items of Webhooks with a
//!   `spec.delivery.rateLimit` or `spec.ordering`, which must all be delivered by one process
//!   for the limit or the order to hold (ordered ones are released in event order: see
//!   [`Release`]). The `serial` consumer is bound by the leader only; a work item that reaches the
//!   shared `deliverer` for such a Webhook (routed before the limit was added, or by a replica
//!   that had not seen it yet) is moved there. See "Key affinity" below.
//!
//! - `<prefix>.attempts.<namespace>.<webhook>`: the record of every attempt, from every
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
//!   `<prefix>.schedules.<namespace>.<webhook>.<delivery id>` with `Nats-Schedule: @at <time>`
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

mod deliverer;
mod messages;
mod park;
mod quota;
mod release;
mod router;
mod stream;
mod subjects;

pub use deliverer::{
    CONGESTION_MEMORY, InHandLimits, Lane, SLOT_WAIT_IN_HAND, WorkQueue, deliver_work,
};
pub use messages::{EventMessage, keyed_event_id, keyed_msg_id};
pub use quota::{NamespaceShares, OverShare};
pub use router::{ROUTED_AT_INGEST_PER_REQUEST, route_events, work_item, work_lane};
use stream::set_up_stream;
pub use stream::{StreamRoom, ingest_refusal, is_full, stream_update};
pub use subjects::{InvalidStreamName, MAX_STREAM_NAME, NatsPermissions, Subjects};

use std::{path::PathBuf, sync::Arc, time::Duration};

use async_nats::jetstream::{
    self, Context,
    consumer::{AckPolicy, pull},
};

use crate::delivery::redact_url;

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

/// How long the stream remembers message ids: a retried publish within it is a duplicate.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(600);

/// Publish acks the client keeps waiting for at once, every task of this process together.
///
/// Past the client's own default (5,000) a publish waits until an earlier publish's ack has
/// been awaited, so a task that publishes several messages before awaiting their acks (an
/// ingest request, an event's work items) can wait on itself: an event routed to more than
/// 5,000 Webhooks stopped every publish of the process for good. Every publisher bounds itself
/// instead (ingest by `--nats-max-publishing`, the router by `ACKS_PER_ROUND` per event being
/// routed, the relay by its publishes in flight, a park or a move by one per message in hand),
/// so this is only a backstop.
pub const ACKS_IN_FLIGHT: usize = 1 << 20;

/// Ack wait of both consumers; a message in hand is kept alive well within it.
pub const ACK_WAIT: Duration = Duration::from_secs(30);

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
    /// Bytes one namespace's events may take in the stream over `max_age` (0: no limit).
    pub max_bytes_per_namespace: u64,
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
        "the servers of --nats-url carry different credentials ({first} and {other}): give one user:password@ or token@ (on any of them), or --nats-creds"
    )]
    UrlCredentials { first: String, other: String },
    #[error(transparent)]
    StreamName(#[from] InvalidStreamName),
    #[error(
        "cannot create or update the JetStream {what}: {why} (is JetStream enabled on the server, and may this NATS user use the stream's API? docs/ingest-modes.md, \"A least-privilege NATS user\", lists what it needs)"
    )]
    Setup { what: String, why: String },
    #[error("the JetStream {consumer} consumer stopped: {why}")]
    Consumer { consumer: &'static str, why: String },
}

/// A connected bus: the publish context and the two consumers, created or updated.
#[derive(Clone)]
pub struct Bus {
    pub context: Context,
    /// Every subject hookrelay uses, under the stream's name lowercased.
    pub subjects: Subjects,
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
    /// What each namespace's events take of the stream, as this replica published them.
    pub shares: Arc<NamespaceShares>,
}

/// `--nats-url` (servers separated by commas) as it may be shown: without credentials.
fn redacted_servers(url: &str) -> String {
    url.split(',')
        .map(|server| redact_url(server.trim()))
        .collect::<Vec<_>>()
        .join(",")
}

/// The user and password (`nats://user:password@host`) or token (`nats://token@host`) that
/// `--nats-url` carries: the NATS client takes none from the URL itself. Servers separated by
/// commas may each carry them, or only one; different ones are refused.
#[derive(Debug, Clone, PartialEq, Eq)]
enum UrlAuth {
    UserPassword { user: String, password: String },
    Token(String),
}

fn url_auth(url: &str) -> Result<Option<UrlAuth>, BusError> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let mut found: Option<(UrlAuth, String)> = None;
    for server in url.split(',').map(str::trim) {
        let Ok(parsed) = url::Url::parse(server) else {
            continue;
        };
        let auth = match (parsed.username(), parsed.password()) {
            ("", None) => continue,
            (user, Some(password)) => UrlAuth::UserPassword {
                user: decode(user),
                password: decode(password),
            },
            (token, None) => UrlAuth::Token(decode(token)),
        };
        match &found {
            None => found = Some((auth, redact_url(server))),
            Some((first, _)) if *first == auth => {}
            Some((_, first)) => {
                return Err(BusError::UrlCredentials {
                    first: first.clone(),
                    other: redact_url(server),
                });
            }
        }
    }
    Ok(found.map(|(auth, _)| auth))
}

/// Connects and creates (or updates) the stream and both durable consumers.
pub async fn connect(config: &BusConfig) -> Result<Bus, BusError> {
    let subjects = Subjects::for_stream(&config.stream)?;
    // Replies (publish acks, API answers, pulled messages) come to inboxes of this
    // installation's own, which a least-privilege user may subscribe to without seeing
    // another client's.
    let mut options = async_nats::ConnectOptions::new()
        .name("hookrelay")
        .custom_inbox_prefix(subjects.inbox_prefix());
    match url_auth(&config.url)? {
        Some(UrlAuth::UserPassword { user, password }) => {
            options = options.user_and_password(user, password);
        }
        Some(UrlAuth::Token(token)) => options = options.token(token),
        None => {}
    }
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
    let client = options.connect(config.url.as_str()).await.map_err(|e| {
        let mut why = e.to_string();
        // Credentials in the URL (nats://user:password@host) stay out of the error.
        for server in config.url.split(',') {
            why = why.replace(server.trim(), &redact_url(server.trim()));
        }
        BusError::Connect {
            url: redacted_servers(&config.url),
            why,
        }
    })?;
    let context = jetstream::context::ContextBuilder::new()
        .max_ack_inflight(ACKS_IN_FLIGHT)
        .build(client);
    let setup = |what: &str, e: &dyn std::fmt::Display| BusError::Setup {
        what: what.to_owned(),
        why: e.to_string(),
    };
    set_up_stream(&context, config, &subjects)
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
        .create_consumer(consumer(ROUTER, subjects.events_filter()))
        .await
        .map_err(|e| setup(&format!("consumer {ROUTER}"), &e))?;
    let deliverer = stream
        .create_consumer(consumer(DELIVERER, subjects.work_filter(Lane::Shared)))
        .await
        .map_err(|e| setup(&format!("consumer {DELIVERER}"), &e))?;
    let serial = stream
        .create_consumer(consumer(SERIAL, subjects.work_filter(Lane::Serial)))
        .await
        .map_err(|e| setup(&format!("consumer {SERIAL}"), &e))?;
    let recorder = stream
        .create_consumer(consumer(RECORDER, subjects.attempts_filter()))
        .await
        .map_err(|e| setup(&format!("consumer {RECORDER}"), &e))?;
    Ok(Bus {
        context,
        subjects,
        stream,
        router,
        deliverer,
        serial,
        recorder,
        room: Arc::default(),
        shares: Arc::new(NamespaceShares::new(
            config.max_bytes_per_namespace,
            config.max_age,
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_urls_are_shown_without_their_credentials() {
        assert_eq!(
            redacted_servers("nats://hookrelay:s3cret@nats-0:4222, nats://nats-1:4222"),
            "nats://***@nats-0:4222,nats://nats-1:4222"
        );
        assert_eq!(redacted_servers("nats://nats:4222"), "nats://nats:4222");
    }

    #[test]
    fn credentials_in_the_nats_url_are_used() {
        let user = |user: &str, password: &str| {
            Some(UrlAuth::UserPassword {
                user: user.into(),
                password: password.into(),
            })
        };
        assert_eq!(url_auth("nats://nats:4222").unwrap(), None);
        assert_eq!(url_auth("127.0.0.1:4222").unwrap(), None);
        assert_eq!(
            url_auth("nats://hookrelay:s3cret@nats:4222").unwrap(),
            user("hookrelay", "s3cret")
        );
        // Percent-encoded as a URL must be; given on one server of several.
        assert_eq!(
            url_auth("nats://nats-0:4222, tls://hook%40relay:p%3Ass%2Fw@nats-1:4222").unwrap(),
            user("hook@relay", "p:ss/w")
        );
        assert_eq!(
            url_auth("nats://a:b@n0:4222,nats://a:b@n1:4222").unwrap(),
            user("a", "b")
        );
        assert_eq!(
            url_auth("nats://t0ken@nats:4222").unwrap(),
            Some(UrlAuth::Token("t0ken".into()))
        );
        let e = url_auth("nats://a:b@n0:4222,nats://a:c@n1:4222")
            .unwrap_err()
            .to_string();
        assert!(e.contains("different credentials"), "{e}");
        assert!(
            !e.contains(":b@") && !e.contains(":c@"),
            "no password shown: {e}"
        );
    }
}
