//! The one status writer. The Webhook controller and the delivery engine send what changed; the
//! writer coalesces it per object and part, patches each at most once per `min_interval`, with
//! a timeout on every patch and a bounded number in flight, and records a Kubernetes Event when
//! a condition flips. Status is written with server-side apply, one field manager per owner of
//! a part of the status (the controller owns `Ready`, the delivery engine the delivery history
//! and `Degraded`), so the parts never overwrite each other.

mod delivery_log;
mod patch;

pub use delivery_log::{
    DEGRADED_AFTER, DeliveryLog, MAX_ERROR_CHARS, RECENT_DELIVERIES, now_time, truncate_error,
};

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{StreamExt, stream::FuturesUnordered};
use k8s_openapi::{
    api::core::v1::ObjectReference, apimachinery::pkg::apis::meta::v1::Condition, jiff::Timestamp,
};
use kube::{
    Client,
    runtime::events::{Recorder, Reporter},
};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::{
    crd::{DeliveryRecord, DocumentEventStatus},
    keys::WebhookKey,
    leader::Leadership,
    metrics::{Metrics, ObjectKind, PatchResult, StatusPatchLabels},
};

/// Field manager of the conditions the Webhook controller decides.
pub const CONTROLLER_MANAGER: &str = "hookrelay-controller";
/// Field manager of what the delivery engine records.
pub const DELIVERY_MANAGER: &str = "hookrelay-delivery";
/// Field manager of `status.blockedKeys` (`spec.ordering`).
pub const ORDERING_MANAGER: &str = "hookrelay-ordering";

/// A Kubernetes Event to record once the patch that carries it has landed.
#[derive(Clone, Debug, PartialEq)]
pub struct TransitionEvent {
    pub warning: bool,
    pub reason: String,
    pub note: String,
    pub object: ObjectReference,
}

/// The `Ready` condition of a Webhook as the controller decided it.
#[derive(Clone, Debug, PartialEq)]
pub struct ReadyUpdate {
    pub generation: i64,
    pub condition: Condition,
    pub event: Option<TransitionEvent>,
    /// `status.suspended`, written with the condition (absent: removed).
    pub suspended: Option<crate::crd::Suspension>,
}

/// A DocumentEvent, identified down to its uid so a recreated one is never written by mistake.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EventKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl std::fmt::Display for EventKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What a status writer is told.
#[derive(Debug)]
pub enum Update {
    /// The controller decided a Webhook's `Ready` condition.
    WebhookReady {
        key: WebhookKey,
        update: Box<ReadyUpdate>,
    },
    /// An attempt to deliver to a Webhook ended.
    DeliveryAttempt {
        key: WebhookKey,
        /// The uid of the Webhook the attempt was made for.
        uid: String,
        record: Box<DeliveryRecord>,
    },
    /// The full delivery status of a DocumentEvent.
    EventStatus {
        key: EventKey,
        uid: String,
        status: DocumentEventStatus,
    },
    /// The keys of a Webhook held back by a retrying delivery (`spec.ordering`), all of them.
    BlockedKeys {
        key: WebhookKey,
        uid: String,
        keys: Vec<crate::crd::BlockedKey>,
    },
    /// The Webhook was deleted: forget what is kept for it.
    WebhookDeleted { key: WebhookKey },
    /// A Kubernetes Event to record on an object now (by any replica: it reports what this
    /// replica saw), such as a Webhook's filter failing on events.
    Note(TransitionEvent),
}

/// The sending side, cloned by every producer. A full channel makes producers wait, which is the
/// back-pressure we want: status is never dropped.
#[derive(Clone, Debug)]
pub struct StatusSender {
    tx: mpsc::Sender<Update>,
    /// In jetstream mode: where attempt records go instead (see [`crate::delivery::records`]).
    attempts: Option<mpsc::Sender<Update>>,
}

impl StatusSender {
    pub async fn send(&self, update: Update) {
        let update = match (&self.attempts, update) {
            (Some(relay), update @ Update::DeliveryAttempt { .. }) => {
                match relay.send(update).await {
                    Ok(()) => return,
                    // The relay has stopped (shutdown): the local writer takes it.
                    Err(mpsc::error::SendError(update)) => update,
                }
            }
            (_, update) => update,
        };
        if self.tx.send(update).await.is_err() {
            tracing::debug!("status writer stopped; update dropped at shutdown");
        }
    }

    /// Sends `update` if the channel has room now; for what may be dropped under load (a
    /// [`Update::Note`]), from code that cannot wait.
    pub fn try_send(&self, update: Update) -> bool {
        self.tx.try_send(update).is_ok()
    }

    /// A place in the channel, for producers that must not wait with an update in hand (the
    /// DocumentEvent controller keeps what it has to write and sends it once it has a place).
    /// None when the writer has stopped.
    pub async fn reserve(&self) -> Option<mpsc::Permit<'_, Update>> {
        self.tx.reserve().await.ok()
    }

    /// This sender, with attempt records sent to `relay` instead.
    pub(crate) fn relaying_attempts(&self, relay: mpsc::Sender<Update>) -> Self {
        Self {
            tx: self.tx.clone(),
            attempts: Some(relay),
        }
    }
}

#[derive(Clone, Debug)]
pub struct WriterConfig {
    /// At most one patch per object (and status part) per this interval.
    pub min_interval: Duration,
    /// A new DocumentEvent's first status waits this long, so that a fast delivery is written
    /// once, with its result.
    pub event_first_delay: Duration,
    /// Time allowed for one patch.
    pub patch_timeout: Duration,
    /// Patches in flight at once.
    pub max_in_flight: usize,
    /// Of those, DocumentEvent status patches: they cost the API server about twice a create,
    /// and ingest's creates (which a client waits for) must not queue behind them. What waits
    /// is coalesced per event meanwhile, never dropped.
    pub max_event_patches_in_flight: usize,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            min_interval: Duration::from_secs(1),
            event_first_delay: Duration::from_millis(300),
            patch_timeout: Duration::from_secs(10),
            max_in_flight: 32,
            max_event_patches_in_flight: 8,
        }
    }
}

/// One part of one object's status, patched on its own.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum SlotKey {
    Ready(WebhookKey),
    Deliveries(WebhookKey),
    BlockedKeys(WebhookKey),
    Event(EventKey),
}

/// What is waiting to be written to a slot.
#[derive(Debug)]
enum Content {
    Ready(Box<ReadyUpdate>),
    /// Attempt records not written yet, as a log of their own (bounded: counters and the
    /// recent ones), added onto the stored status when it is written.
    Deliveries {
        uid: String,
        pending: Box<DeliveryLog>,
    },
    Event {
        uid: String,
        status: DocumentEventStatus,
    },
    BlockedKeys {
        uid: String,
        keys: Vec<crate::crd::BlockedKey>,
    },
}

#[derive(Default)]
struct Slot {
    content: Option<Content>,
    last_patch: Option<Instant>,
    not_before: Option<Instant>,
    in_flight: bool,
    failures: u32,
    /// In `StatusWriter::waiting`.
    queued: bool,
}

impl Slot {
    fn is_due(&self, now: Instant, min_interval: Duration) -> bool {
        !self.in_flight
            && self.content.is_some()
            && self.not_before.is_none_or(|t| now >= t)
            && self.last_patch.is_none_or(|t| now >= t + min_interval)
    }
}

/// What a finished patch hands back.
struct Finished {
    key: SlotKey,
    /// Content to write again if the patch failed.
    retry: Option<Content>,
    /// The delivery log, returned after a Deliveries patch.
    log: Option<(WebhookKey, String, DeliveryLog)>,
    result: Result<(), kube::Error>,
}

pub struct StatusWriter {
    client: Client,
    metrics: Metrics,
    recorder: Recorder,
    /// Bounds the Kubernetes Events being recorded at once.
    events: Arc<Semaphore>,
    rx: mpsc::Receiver<Update>,
    config: WriterConfig,
    slots: HashMap<SlotKey, Slot>,
    /// DocumentEvent status patches in flight (see `max_event_patches_in_flight`).
    event_patches_in_flight: usize,
    /// Webhook status parts that were due when no patch could start, oldest first: each
    /// finished patch hands its place to the next of them, so that many Webhooks changing at
    /// once (all becoming Ready at a start) are written at the API server's pace rather than
    /// the tick's. DocumentEvent patches wait for the tick instead, which paces them against
    /// ingest's creates.
    waiting: VecDeque<SlotKey>,
    /// Delivery logs of Webhooks (by uid), seeded from their status on first use.
    logs: HashMap<WebhookKey, (String, DeliveryLog)>,
    /// Only the leader writes: a standby drops what it is told (the Webhook controller decides
    /// again against the live status when this replica becomes the leader).
    leadership: Leadership,
}

/// A sender whose updates a test reads itself.
#[cfg(test)]
pub(crate) fn test_channel(capacity: usize) -> (StatusSender, mpsc::Receiver<Update>) {
    let (tx, rx) = mpsc::channel(capacity);
    (StatusSender { tx, attempts: None }, rx)
}

/// A writer and the sender that feeds it; `capacity` bounds the channel.
pub fn channel(
    client: Client,
    metrics: Metrics,
    config: WriterConfig,
    capacity: usize,
    leadership: Leadership,
) -> (StatusSender, StatusWriter) {
    let (tx, rx) = mpsc::channel(capacity);
    let reporter = Reporter {
        controller: "hookrelay".into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let recorder = Recorder::new(client.clone(), reporter);
    let writer = StatusWriter {
        client,
        metrics,
        recorder,
        events: Arc::new(Semaphore::new(8)),
        rx,
        config,
        slots: HashMap::new(),
        event_patches_in_flight: 0,
        waiting: VecDeque::new(),
        logs: HashMap::new(),
        leadership,
    };
    (StatusSender { tx, attempts: None }, writer)
}

impl StatusWriter {
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut in_flight = FuturesUnordered::new();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stopping = false;
        loop {
            let touched = tokio::select! {
                _ = shutdown.cancelled(), if !stopping => {
                    // Take what the producers already sent, then write everything pending once
                    // more without waiting out rate limits.
                    while let Ok(update) = self.rx.try_recv() {
                        self.merge(update);
                    }
                    stopping = true;
                    self.flush_now();
                    None
                }
                update = self.rx.recv(), if !stopping => match update {
                    Some(update) => self.merge(update),
                    // Every producer has stopped (they may, before `shutdown`): what they sent
                    // is still written before the writer ends.
                    None => {
                        stopping = true;
                        self.flush_now();
                        None
                    }
                },
                Some(done) = in_flight.next() => {
                    self.finish(done);
                    None
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    let leads = self.leadership.is_leader();
                    if !leads {
                        // Leadership was lost: what is pending is the old leader's view, and the
                        // new leader writes its own. Writing it now would overwrite newer status.
                        // Attempt records add up rather than overwrite: while no other replica
                        // is known to lead, they are kept (bounded) until this one leads again.
                        let keep_records = !self.leadership.another_leads();
                        for (key, slot) in self.slots.iter_mut() {
                            if !(keep_records && matches!(key, SlotKey::Deliveries(_))) {
                                slot.content = None;
                            }
                        }
                        // Read again when leading again: another leader may have written since.
                        self.logs.clear();
                    }
                    self.forget_idle(now);
                    if leads {
                        let due = self.due(now, in_flight.len());
                        in_flight.extend(due.into_iter().map(|key| self.start(key, now)));
                    }
                    let pending = self.slots.values().any(|s| s.content.is_some() && s.failures == 0);
                    if stopping && in_flight.is_empty() && (!pending || !leads) {
                        if pending {
                            tracing::warn!("stopping while not leading: attempt records kept since leadership was lost are not written");
                        }
                        break;
                    }
                    None
                }
            };
            let now = Instant::now();
            if !self.leadership.is_leader() {
                continue;
            }
            // A new update for an object not written lately goes out at once, or waits for a
            // place if it is a Webhook's.
            if let Some(key) = touched
                && self
                    .slots
                    .get(&key)
                    .is_some_and(|s| s.is_due(now, self.config.min_interval))
            {
                if !matches!(key, SlotKey::Event(_)) {
                    self.wait_for_room(key);
                } else if in_flight.len() < self.config.max_in_flight
                    && self.event_patches_in_flight() < self.config.max_event_patches_in_flight
                {
                    in_flight.push(self.start(key, now));
                }
            }
            while in_flight.len() < self.config.max_in_flight
                && let Some(key) = self.next_waiting(now)
            {
                in_flight.push(self.start(key, now));
            }
        }
        while let Some(done) = in_flight.next().await {
            self.finish(done);
        }
    }

    /// The slots to patch now, within the bounds on patches in flight (`in_flight` of them).
    fn due(&self, now: Instant, in_flight: usize) -> Vec<SlotKey> {
        let mut room = self.config.max_in_flight.saturating_sub(in_flight);
        let mut event_room = self
            .config
            .max_event_patches_in_flight
            .saturating_sub(self.event_patches_in_flight());
        let mut due = Vec::new();
        for (key, slot) in &self.slots {
            if room == 0 {
                break;
            }
            if !slot.is_due(now, self.config.min_interval) {
                continue;
            }
            if matches!(key, SlotKey::Event(_)) {
                if event_room == 0 {
                    continue;
                }
                event_room -= 1;
            }
            room -= 1;
            due.push(key.clone());
        }
        due
    }

    /// Queues a due Webhook status part for the next place among the patches in flight.
    fn wait_for_room(&mut self, key: SlotKey) {
        if let Some(slot) = self.slots.get_mut(&key)
            && !slot.queued
        {
            slot.queued = true;
            self.waiting.push_back(key);
        }
    }

    /// The oldest waiting Webhook status part that is still due (the tick may have written
    /// the others meanwhile).
    fn next_waiting(&mut self, now: Instant) -> Option<SlotKey> {
        while let Some(key) = self.waiting.pop_front() {
            let Some(slot) = self.slots.get_mut(&key) else {
                continue;
            };
            slot.queued = false;
            if slot.is_due(now, self.config.min_interval) {
                return Some(key);
            }
        }
        None
    }

    fn event_patches_in_flight(&self) -> usize {
        self.event_patches_in_flight
    }

    /// Merges `update` into its slot, returning the slot's key (None: nothing to write).
    fn merge(&mut self, update: Update) -> Option<SlotKey> {
        if let Update::Note(event) = update {
            patch::record_event(self.recorder.clone(), self.events.clone(), event);
            return None;
        }
        if !self.leadership.is_leader() {
            // See the tick: only attempt records are kept, while no other replica leads.
            let record = matches!(update, Update::DeliveryAttempt { .. });
            if !record || self.leadership.another_leads() {
                return None;
            }
        }
        let (key, content) = match update {
            Update::WebhookDeleted { key } => {
                self.logs.remove(&key);
                for slot in [
                    SlotKey::Ready(key.clone()),
                    SlotKey::Deliveries(key.clone()),
                    SlotKey::BlockedKeys(key),
                ] {
                    if self.slots.get(&slot).is_some_and(|s| !s.in_flight) {
                        self.slots.remove(&slot);
                    }
                }
                return None;
            }
            Update::WebhookReady { key, update } => (SlotKey::Ready(key), Content::Ready(update)),
            Update::DeliveryAttempt { key, uid, record } => {
                let mut pending = Box::<DeliveryLog>::default();
                pending.record([*record], Timestamp::now());
                (
                    SlotKey::Deliveries(key),
                    Content::Deliveries { uid, pending },
                )
            }
            Update::EventStatus { key, uid, status } => {
                (SlotKey::Event(key), Content::Event { uid, status })
            }
            Update::BlockedKeys { key, uid, keys } => (
                SlotKey::BlockedKeys(key),
                Content::BlockedKeys { uid, keys },
            ),
            Update::Note(_) => return None,
        };
        let first_delay = self.config.event_first_delay;
        let slot = self.slots.entry(key.clone()).or_insert_with(|| Slot {
            not_before: matches!(key, SlotKey::Event(_)).then(|| Instant::now() + first_delay),
            ..Slot::default()
        });
        slot.content = Some(match (slot.content.take(), content) {
            // The latest decision wins, but an Event not yet recorded is kept.
            (Some(Content::Ready(old)), Content::Ready(new)) => {
                let event = new.event.clone().or(old.event);
                Content::Ready(Box::new(ReadyUpdate { event, ..*new }))
            }
            // Records accumulate; those of a Webhook since deleted and recreated are dropped.
            (
                Some(Content::Deliveries { uid, mut pending }),
                Content::Deliveries {
                    uid: new_uid,
                    pending: new,
                },
            ) if uid == new_uid => {
                pending.absorb(*new, Timestamp::now());
                Content::Deliveries { uid, pending }
            }
            (_, new) => new,
        });
        Some(key)
    }

    /// Takes the pending content of `key` into a patch.
    fn start(&mut self, key: SlotKey, now: Instant) -> impl Future<Output = Finished> + use<> {
        let slot = self.slots.get_mut(&key).expect("started keys exist");
        let content = slot.content.take().expect("started slots have content");
        slot.in_flight = true;
        slot.last_patch = Some(now);
        if matches!(key, SlotKey::Event(_)) {
            self.event_patches_in_flight += 1;
        }
        // The cached log, if it is of the same Webhook object.
        let log = match (&key, &content) {
            (SlotKey::Deliveries(webhook), Content::Deliveries { uid, .. }) => self
                .logs
                .remove(webhook)
                .filter(|(cached, _)| cached == uid)
                .map(|(_, log)| log),
            _ => None,
        };
        let (client, recorder, events, timeout) = (
            self.client.clone(),
            self.recorder.clone(),
            self.events.clone(),
            self.config.patch_timeout,
        );
        async move {
            match (key, content) {
                (SlotKey::Ready(webhook), Content::Ready(update)) => {
                    let result = patch::ready(&client, &webhook, &update, timeout).await;
                    if let (Ok(()), Some(event)) = (&result, &update.event) {
                        patch::record_event(recorder, events, event.clone());
                    }
                    let retry = result.is_err().then_some(Content::Ready(update));
                    Finished {
                        key: SlotKey::Ready(webhook),
                        retry,
                        log: None,
                        result,
                    }
                }
                (SlotKey::Deliveries(webhook), Content::Deliveries { uid, pending }) => {
                    let outcome =
                        patch::deliveries(&client, &webhook, &uid, log, *pending, timeout).await;
                    // Records in the log are written again from it; records that never made it
                    // into a log (seeding failed) are carried over, as a bounded log.
                    let retry = outcome.result.is_err().then(|| Content::Deliveries {
                        uid: uid.clone(),
                        pending: Box::new(outcome.unrecorded),
                    });
                    Finished {
                        key: SlotKey::Deliveries(webhook.clone()),
                        retry,
                        log: outcome.log.map(|l| (webhook, uid, l)),
                        result: outcome.result,
                    }
                }
                (SlotKey::BlockedKeys(webhook), Content::BlockedKeys { uid, keys }) => {
                    let result = patch::blocked_keys(&client, &webhook, &uid, &keys, timeout).await;
                    let retry = result
                        .is_err()
                        .then_some(Content::BlockedKeys { uid, keys });
                    Finished {
                        key: SlotKey::BlockedKeys(webhook),
                        retry,
                        log: None,
                        result,
                    }
                }
                (SlotKey::Event(event), Content::Event { uid, status }) => {
                    let result = patch::event(&client, &event, &uid, &status, timeout).await;
                    let retry = result.is_err().then_some(Content::Event { uid, status });
                    Finished {
                        key: SlotKey::Event(event),
                        retry,
                        log: None,
                        result,
                    }
                }
                (key, _) => Finished {
                    key,
                    retry: None,
                    log: None,
                    result: Ok(()),
                },
            }
        }
    }

    fn finish(&mut self, done: Finished) {
        let kind = match done.key {
            SlotKey::Event(_) => ObjectKind::DocumentEvent,
            _ => ObjectKind::Webhook,
        };
        let result = if done.result.is_ok() {
            PatchResult::Ok
        } else {
            PatchResult::Error
        };
        self.metrics
            .status_patches
            .get_or_create(&StatusPatchLabels { kind, result })
            .inc();
        if let Some((webhook, uid, log)) = done.log {
            self.logs.insert(webhook, (uid, log));
        }
        if matches!(done.key, SlotKey::Event(_)) {
            self.event_patches_in_flight -= 1;
        }
        let Some(slot) = self.slots.get_mut(&done.key) else {
            return;
        };
        slot.in_flight = false;
        match done.result {
            Ok(()) => {
                slot.failures = 0;
                slot.not_before = None;
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {
                // Deleted, or recreated under the same name (the uid precondition failed and the
                // object has another uid): nothing to write. Any other error, a 409 conflict
                // included, is written again below.
                tracing::debug!(object = ?done.key, code = e.code, "status not written: object gone");
                if let SlotKey::Deliveries(webhook) | SlotKey::Ready(webhook) = &done.key {
                    self.logs.remove(webhook);
                }
            }
            Err(error) => {
                slot.failures += 1;
                let backoff = Duration::from_millis(200 * 2u64.pow(slot.failures.min(7)));
                tracing::warn!(object = ?done.key, %error, ?backoff, "status patch failed; retrying");
                slot.not_before = Some(Instant::now() + backoff);
                if let Some(retry) = done.retry {
                    slot.content = Some(match (slot.content.take(), retry) {
                        // Delivery records accumulate, older first; other content is superseded.
                        (
                            Some(Content::Deliveries {
                                uid,
                                pending: newer,
                            }),
                            Content::Deliveries {
                                uid: old_uid,
                                pending: mut older,
                            },
                        ) if uid == old_uid => {
                            older.absorb(*newer, Timestamp::now());
                            Content::Deliveries {
                                uid,
                                pending: older,
                            }
                        }
                        (Some(newer), _) => newer,
                        (None, retry) => retry,
                    });
                }
            }
        }
    }

    /// Lifts the rate limits: everything pending goes out at the next tick.
    fn flush_now(&mut self) {
        for slot in self.slots.values_mut() {
            slot.last_patch = None;
            slot.not_before = None;
        }
    }

    /// Forgets slots with nothing pending once their rate limit has passed.
    fn forget_idle(&mut self, now: Instant) {
        let min_interval = self.config.min_interval;
        self.slots.retain(|_, s| {
            s.in_flight
                || s.content.is_some()
                || s.last_patch.is_some_and(|t| now < t + min_interval)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{EventPhase, Outcome, TargetDelivery, TargetState};
    use http::{Request, Response};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use kube::client::Body;

    type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    /// A writer without rate limits, talking to a mock API server.
    fn writer() -> (StatusSender, StatusWriter, Handle) {
        let config = WriterConfig {
            min_interval: Duration::ZERO,
            event_first_delay: Duration::ZERO,
            patch_timeout: Duration::from_secs(5),
            max_in_flight: 4,
            max_event_patches_in_flight: 4,
        };
        writer_with(config, Leadership::always())
    }

    fn writer_with(
        config: WriterConfig,
        leadership: Leadership,
    ) -> (StatusSender, StatusWriter, Handle) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let (tx, writer) = channel(client, Metrics::default(), config, 16, leadership);
        (tx, writer, handle)
    }

    /// Tells the writer that event e1 (of object `uid`) was delivered.
    async fn send_delivered(tx: &StatusSender, uid: &str) {
        tx.send(Update::EventStatus {
            key: key(),
            uid: uid.into(),
            status: delivered(),
        })
        .await;
    }

    fn respond(
        send: tower_test::mock::SendResponse<Response<Body>>,
        code: u16,
        body: serde_json::Value,
    ) {
        send.send_response(
            Response::builder()
                .status(code)
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap(),
        );
    }

    /// The next request the writer sends; None when it sends none within 5 s.
    async fn next(
        handle: &mut Handle,
    ) -> Option<(
        Request<Body>,
        tower_test::mock::SendResponse<Response<Body>>,
    )> {
        tokio::time::timeout(Duration::from_secs(5), handle.next_request())
            .await
            .ok()
            .flatten()
    }

    fn event_object(uid: &str) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "hookrelay.dev/v1alpha1", "kind": "DocumentEvent",
            "metadata": {"name": "e1", "namespace": "docs", "uid": uid},
            "spec": {"type": "document.completed", "data": {}},
        })
    }

    fn conflict() -> serde_json::Value {
        serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 409,
            "reason": "Conflict",
            "message": "Operation cannot be fulfilled on documentevents.hookrelay.dev \"e1\": the object has been modified; please apply your changes to the latest version and try again",
        })
    }

    fn delivered() -> DocumentEventStatus {
        DocumentEventStatus {
            phase: Some(EventPhase::Delivered),
            deliveries: vec![TargetDelivery {
                webhook: "w".into(),
                id: "msg_1".into(),
                state: TargetState::Succeeded,
                attempts: 1,
                http_status: Some(200),
                last_attempt_time: None,
                next_attempt_time: None,
                held_since: None,
                error: None,
            }],
            completion_time: None,
            ..Default::default()
        }
    }

    fn key() -> EventKey {
        EventKey {
            namespace: "docs".into(),
            name: "e1".into(),
        }
    }

    /// A 409 that is a conflict with another writer (same uid) is written again, so the final
    /// status of a DocumentEvent is not lost.
    #[tokio::test]
    async fn a_conflict_is_retried_until_the_final_status_lands() {
        let (tx, writer, mut handle) = writer();
        let stop = CancellationToken::new();
        let run = tokio::spawn(writer.run(stop.clone()));
        send_delivered(&tx, "uid-1").await;

        let (request, send) = next(&mut handle).await.expect("the first patch");
        assert_eq!(request.method(), "PATCH");
        respond(send, 409, conflict());
        let (request, send) = next(&mut handle).await.expect("a look at the object");
        assert_eq!(request.method(), "GET");
        respond(send, 200, event_object("uid-1"));
        let (request, send) = next(&mut handle).await.expect("the patch again");
        assert_eq!(request.method(), "PATCH");
        assert!(request.uri().path().ends_with("/documentevents/e1/status"));
        let body = http_body_util::BodyExt::collect(request.into_body())
            .await
            .unwrap()
            .to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["status"]["phase"], "Delivered");
        assert_eq!(body["metadata"]["uid"], "uid-1");
        respond(send, 200, event_object("uid-1"));
        stop.cancel();
        run.await.unwrap();
    }

    /// A 409 because the object was recreated (another uid) drops what was pending for the old one.
    #[tokio::test]
    async fn a_recreated_object_is_not_written() {
        let (tx, writer, mut handle) = writer();
        let stop = CancellationToken::new();
        let run = tokio::spawn(writer.run(stop.clone()));
        send_delivered(&tx, "uid-old").await;
        let (_, send) = next(&mut handle).await.expect("the patch");
        respond(send, 409, conflict());
        let (_, send) = next(&mut handle).await.expect("a look at the object");
        respond(send, 200, event_object("uid-new"));
        stop.cancel();
        // The writer stops without writing the old object's status to the new one.
        run.await.unwrap();
        assert!(
            handle.next_request().await.is_none(),
            "nothing more was sent"
        );
    }

    /// Attempt records waiting for a Webhook whose status cannot be read (the API server is
    /// away) stay bounded: counters and the recent ones, not every record.
    #[tokio::test]
    async fn records_waiting_to_be_written_stay_bounded() {
        let (_tx, mut writer, _handle) = writer();
        let webhook = WebhookKey::new("docs", "w");
        for attempt in 1..=10_000 {
            let record = DeliveryRecord {
                id: format!("msg_{attempt}"),
                event: "document.completed".into(),
                source: "ingest".into(),
                attempt: 1,
                outcome: Outcome::Failed,
                http_status: Some(500),
                duration_ms: 1,
                time: Time(Timestamp::now()),
                error: None,
            };
            writer.merge(Update::DeliveryAttempt {
                key: webhook.clone(),
                uid: "uid-w".into(),
                record: Box::new(record),
            });
        }
        let slot = &writer.slots[&SlotKey::Deliveries(webhook)];
        let Some(Content::Deliveries { pending, .. }) = &slot.content else {
            panic!("nothing pending");
        };
        assert_eq!(pending.stats.failed, 10_000);
        assert_eq!(pending.recent.len(), delivery_log::RECENT_DELIVERIES);
    }

    fn attempt(id: &str) -> Update {
        Update::DeliveryAttempt {
            key: WebhookKey::new("docs", "w"),
            uid: "uid-w".into(),
            record: Box::new(DeliveryRecord {
                id: id.into(),
                event: "document.completed".into(),
                source: "ingest".into(),
                attempt: 1,
                outcome: Outcome::Succeeded,
                http_status: Some(200),
                duration_ms: 1,
                time: Time(Timestamp::now()),
                error: None,
            }),
        }
    }

    /// A replica that stepped down because the API server was away (no other leader known)
    /// keeps delivering direct ingest; its attempt records add up rather than overwrite, so they
    /// are kept until it leads again. A standby of a known leader keeps nothing.
    #[tokio::test]
    async fn attempt_records_are_kept_while_no_replica_is_known_to_lead() {
        let (_leading, rx) = tokio::sync::watch::channel(false);
        let (_tx, mut writer, _handle) = writer_with(WriterConfig::default(), Leadership::from(rx));
        assert!(writer.merge(attempt("msg_1")).is_some(), "kept");
        assert!(
            writer
                .merge(Update::EventStatus {
                    key: key(),
                    uid: "uid-e1".into(),
                    status: delivered(),
                })
                .is_none(),
            "a DocumentEvent's status is the leader's to write"
        );
        assert!(
            writer.due(Instant::now(), 0).len() == 1,
            "kept for when it leads"
        );

        let (_tx, mut standby, _handle) =
            writer_with(WriterConfig::default(), Leadership::standby_of_another());
        assert!(
            standby.merge(attempt("msg_2")).is_none(),
            "the leader records its own"
        );
    }

    #[tokio::test]
    async fn a_standby_writes_nothing() {
        let (leading, rx) = tokio::sync::watch::channel(false);
        let (tx, writer, mut handle) = writer_with(WriterConfig::default(), Leadership::from(rx));
        let stop = CancellationToken::new();
        let run = tokio::spawn(writer.run(stop.clone()));
        send_delivered(&tx, "uid-1").await;
        stop.cancel();
        run.await.unwrap();
        assert!(next(&mut handle).await.is_none(), "a standby sent a patch");
        drop(leading);
    }

    /// When every producer has stopped before the writer is told to stop, what they sent is
    /// still written (it used to be dropped, and the next run delivered those events again).
    #[tokio::test]
    async fn what_producers_sent_is_written_when_they_all_stop_first() {
        let config = WriterConfig {
            event_first_delay: Duration::from_secs(30),
            ..WriterConfig::default()
        };
        let (tx, writer, mut handle) = writer_with(config, Leadership::always());
        let run = tokio::spawn(writer.run(CancellationToken::new()));
        send_delivered(&tx, "uid-1").await;
        drop(tx);
        let (request, send) = next(&mut handle)
            .await
            .expect("the pending status is written");
        assert_eq!(request.method(), "PATCH");
        respond(send, 200, event_object("uid-1"));
        run.await.unwrap();
    }

    /// What a leader had pending when it lost the Lease is not written: it would overwrite what
    /// the new leader writes.
    #[tokio::test]
    async fn pending_status_is_dropped_when_leadership_is_lost() {
        let (leading, rx) = tokio::sync::watch::channel(true);
        let config = WriterConfig {
            event_first_delay: Duration::from_millis(500),
            ..WriterConfig::default()
        };
        let (tx, writer, mut handle) = writer_with(config, Leadership::from(rx));
        let stop = CancellationToken::new();
        let run = tokio::spawn(writer.run(stop.clone()));
        send_delivered(&tx, "uid-1").await;
        leading.send_replace(false);
        assert!(
            next(&mut handle).await.is_none(),
            "the old leader wrote after losing the Lease"
        );
        stop.cancel();
        run.await.unwrap();
    }

    /// DocumentEvent patches stay within their own bound, so that ingest's creates do not queue
    /// behind them; Webhook status still goes out beside them.
    #[tokio::test]
    async fn event_patches_in_flight_are_bounded_apart() {
        let config = WriterConfig {
            min_interval: Duration::ZERO,
            event_first_delay: Duration::ZERO,
            max_in_flight: 32,
            max_event_patches_in_flight: 2,
            ..WriterConfig::default()
        };
        let (_tx, mut writer, _handle) = writer_with(config, Leadership::always());
        for i in 0..5 {
            writer.merge(Update::EventStatus {
                key: EventKey {
                    namespace: "docs".into(),
                    name: format!("e{i}").into(),
                },
                uid: format!("uid-{i}"),
                status: delivered(),
            });
        }
        writer.merge(Update::DeliveryAttempt {
            key: WebhookKey::new("docs", "w"),
            uid: "uid-w".into(),
            record: Box::new(DeliveryRecord {
                id: "msg_1".into(),
                event: "document.completed".into(),
                source: "e0".into(),
                attempt: 1,
                outcome: crate::crd::Outcome::Succeeded,
                http_status: Some(200),
                duration_ms: 1,
                time: crate::status::now_time(),
                error: None,
            }),
        });
        let now = Instant::now();
        let due = writer.due(now, 0);
        let events = due
            .iter()
            .filter(|k| matches!(k, SlotKey::Event(_)))
            .count();
        assert_eq!((events, due.len()), (2, 3), "{due:?}");
        // Two event patches in flight: only the Webhook's goes out.
        let _started: Vec<_> = due
            .iter()
            .filter(|k| matches!(k, SlotKey::Event(_)))
            .map(|k| writer.start(k.clone(), now))
            .collect();
        assert_eq!(
            writer.due(now, 2),
            vec![SlotKey::Deliveries(WebhookKey::new("docs", "w"))]
        );
    }

    /// The Webhook `key` is Ready.
    fn ready(key: &WebhookKey) -> Update {
        Update::WebhookReady {
            key: key.clone(),
            update: Box::new(ReadyUpdate {
                generation: 1,
                condition: Condition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    reason: "Routed".into(),
                    message: String::new(),
                    last_transition_time: crate::status::now_time(),
                    observed_generation: Some(1),
                },
                event: None,
                suspended: None,
            }),
        }
    }

    /// Many Webhooks becoming Ready at once (as at a start) are written as fast as the API
    /// server answers: each answered patch makes room for the next, without waiting for the
    /// writer's tick. (Time is paused: it only moves when every task waits on a timer.)
    #[tokio::test(start_paused = true)]
    async fn webhook_status_waiting_for_room_goes_out_as_patches_finish() {
        let (tx, writer, mut handle) = writer();
        let stop = CancellationToken::new();
        let run = tokio::spawn(writer.run(stop.clone()));
        let started = tokio::time::Instant::now();
        let webhooks: Vec<_> = (0..12)
            .map(|i| WebhookKey::new("docs", &format!("w{i}")))
            .collect();
        for webhook in &webhooks {
            tx.send(ready(webhook)).await;
        }
        let mut patched = Vec::new();
        for _ in &webhooks {
            let (request, send) = next(&mut handle).await.expect("a Ready patch");
            assert_eq!(request.method(), "PATCH");
            let path = request.uri().path().to_string();
            let name = path.rsplit('/').nth(1).unwrap_or_default().to_string();
            patched.push(path);
            let webhook = serde_json::json!({
                "apiVersion": "hookrelay.dev/v1alpha1", "kind": "Webhook",
                "metadata": {"name": name, "namespace": "docs"},
                "spec": {"url": "http://127.0.0.1:9/", "events": ["*"], "secretRef": {"name": "s"}},
            });
            respond(send, 200, webhook);
        }
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "12 patches through 4 places took {:?}: they waited for the tick",
            started.elapsed()
        );
        // Oldest first.
        let expected: Vec<_> = (0..12)
            .map(|i| format!("/apis/hookrelay.dev/v1alpha1/namespaces/docs/webhooks/w{i}/status"))
            .collect();
        assert_eq!(patched, expected);
        stop.cancel();
        run.await.unwrap();
    }

    #[tokio::test]
    async fn a_deleted_webhook_is_forgotten() {
        let (_tx, mut writer, _handle) = writer();
        let webhook = WebhookKey::new("docs", "w");
        writer
            .logs
            .insert(webhook.clone(), ("uid".into(), DeliveryLog::default()));
        writer.merge(ready(&webhook));
        assert_eq!((writer.logs.len(), writer.slots.len()), (1, 1));
        assert_eq!(
            writer.merge(Update::WebhookDeleted {
                key: webhook.clone()
            }),
            None
        );
        assert_eq!((writer.logs.len(), writer.slots.len()), (0, 0));
    }
}
