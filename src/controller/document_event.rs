//! The DocumentEvent controller: routes each event to the Webhooks of its namespace, delivers it
//! to every target until it succeeds or runs out of attempts, keeps `status.deliveries` and the
//! `phase` true, and deletes finished events after their retention.
//!
//! At-least-once: the targets, attempt counts and the time of each next attempt live in the
//! event's status, so a restarted operator resumes every unfinished delivery where the status
//! says it stood (an attempt made but not yet written may be made again: receivers deduplicate
//! on the delivery id, which is derived from the event's and the webhook's uids).

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Preconditions},
    core::DeserializeGuard,
    runtime::watcher,
};
use tokio::{sync::mpsc, task::JoinSet};
use tokio_util::{sync::CancellationToken, task::TaskTracker, time::DelayQueue};

use super::Scope;
use crate::{
    crd::{
        ACCEPTED_AT_ANNOTATION, DocumentEvent, DocumentEventStatus, EventPhase, TargetDelivery,
        TargetState,
    },
    delivery::{self, Delivery, Dispatcher, Keeper, Parked, Wait, delivery_id, is_final},
    health::Readiness,
    keys::WebhookKey,
    leader::Leadership,
    metrics::Metrics,
    ports::{CreatedEvents, Recoveries, Recovery},
    routing::{EventFacts, FilterInput, Route, RouteState, Routes, Screen},
    status::{EventKey, StatusSender, Update},
    wire::{EventBody, timestamp_of},
};

/// How long finished DocumentEvents are kept; None keeps them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    pub delivered: Option<Duration>,
    pub failed: Option<Duration>,
}

/// Time allowed for deleting one finished DocumentEvent.
const DELETE_TIMEOUT: Duration = Duration::from_secs(5);

/// Deletes of finished DocumentEvents in flight at once; the rest wait their turn.
const DELETES_IN_FLIGHT: usize = 8;

/// A created event handed over by ingest older than this is left to the watch: by then the
/// watch has brought it, and an old one could even have been delivered and deleted already.
const CREATED_MAX_AGE: Duration = Duration::from_secs(1);

/// A target's progress, reported by its delivery task.
struct Progress {
    key: EventKey,
    uid: String,
    target: TargetDelivery,
}

/// What the controller knows of one DocumentEvent.
struct Tracked {
    uid: String,
    status: DocumentEventStatus,
    /// Cancels the event's delivery tasks (on delete, or when the operator stops).
    cancel: CancellationToken,
    cleanup: Option<tokio_util::time::delay_queue::Key>,
    /// When it was adopted: a relist forgets only what it should have listed.
    adopted: Instant,
}

/// A relist of one watch stream in progress.
struct Relist {
    started: Instant,
    /// Every event listed so far.
    seen: HashSet<EventKey>,
    /// Listed events not tracked yet, taken over once the list is complete.
    new: Vec<DocumentEvent>,
}

/// Everything a delivery task needs, shared.
struct TaskContext {
    dispatcher: Arc<Dispatcher>,
    progress: mpsc::Sender<Progress>,
    metrics: Metrics,
    max_hold: Duration,
}

pub struct DocumentEventController {
    client: Client,
    routes: Routes,
    status: StatusSender,
    readiness: Readiness,
    tasks: Arc<TaskContext>,
    progress: mpsc::Receiver<Progress>,
    tracked: HashMap<EventKey, Tracked>,
    unsent: Unsent,
    retiring: Retiring,
    inbox: Inbox,
    term: Term,
    streams: Streams,
    screening: Screening,
}

/// Events whose status is to be sent to the writer, oldest first, each once: the loop never
/// waits for the writer with an update in hand (watch events would queue behind it); what
/// waits here is sent as the writer takes it, coalesced, never dropped.
#[derive(Default)]
struct Unsent {
    queue: VecDeque<EventKey>,
    keys: HashSet<EventKey>,
}

/// Finished events on their way out: their retention, then their deletion.
struct Retiring {
    retention: Retention,
    cleanup: DelayQueue<(EventKey, String)>,
    /// Finished events whose retention ran out, waiting for a delete slot.
    to_delete: VecDeque<(EventKey, String)>,
    deletes: JoinSet<(EventKey, String, Result<(), kube::Error>)>,
}

/// Events waiting for their filters (see `routing::Screen`), per namespace in the order they
/// came: an event is adopted only after every earlier one of its namespace, so that the
/// deliveries of an ordering key are still queued in acceptance order, while an event whose
/// filters take long delays only its own namespace.
#[derive(Default)]
struct Screening {
    waiting: HashMap<Arc<str>, VecDeque<Waiting>>,
    /// The uid of each waiting event: the watch's echo of one is not taken twice, and one
    /// deleted meanwhile is skipped.
    keys: HashMap<EventKey, String>,
    /// Namespaces whose head is being screened, one at a time each.
    busy: HashSet<Arc<str>>,
    running: JoinSet<(Arc<str>, Vec<Arc<Route>>)>,
}

struct Waiting {
    key: EventKey,
    uid: String,
    event: Arc<ListedEvent>,
}

/// A DocumentEvent as its filters see it.
struct ListedEvent {
    de: DocumentEvent,
    timestamp: String,
}

impl FilterInput for ListedEvent {
    fn facts(&self) -> EventFacts<'_> {
        EventFacts::new(self.de.spec.type_, &self.timestamp, &self.de.spec.data)
    }
}

/// The targets of a new event: one per route that takes it.
fn targets(key: &EventKey, uid: &str, routes: &[Arc<Route>]) -> Vec<TargetDelivery> {
    let targets: Vec<TargetDelivery> = routes
        .iter()
        .map(|route| {
            let state = if route.state == RouteState::Active {
                TargetState::Pending
            } else {
                TargetState::Held
            };
            TargetDelivery::new(
                route.key.name.to_string(),
                delivery_id(uid, &route.uid),
                state,
            )
        })
        .collect();
    tracing::debug!(event = %key, targets = targets.len(), "routed");
    targets
}

/// Whether adopting `de` routes it: it is unfinished and has no targets yet.
fn needs_routing(de: &DocumentEvent) -> bool {
    de.status.as_ref().is_none_or(|s| {
        s.deliveries.is_empty()
            && !matches!(
                s.phase,
                Some(EventPhase::Delivered | EventPhase::Failed | EventPhase::NoSubscribers)
            )
    })
}

/// What the API hands over to this controller (see `crate::ports`).
struct Inbox {
    /// Events created by ingest on this replica (see [`CreatedEvents`]).
    created: mpsc::Receiver<(Instant, DocumentEvent)>,
    /// Keeps `created` open when nothing hands events over.
    _created: CreatedEvents,
    /// Failed deliveries to send again (`POST .../recover`, see [`Recovery`]).
    recoveries: mpsc::Receiver<Recovery>,
    _recoveries: Recoveries,
    /// How old a handed-over event may be (under the retentions: see [`CREATED_MAX_AGE`]).
    created_max_age: Duration,
}

/// The delivery tasks of a term of leadership, and how they end.
struct Term {
    /// Every delivery task, waited for on shutdown.
    deliveries: TaskTracker,
    /// Ends the delivery tasks still sending once `in_flight_grace` has passed on shutdown.
    abandon: CancellationToken,
    in_flight_grace: Duration,
    /// The same when a term of leadership ends (see [`DocumentEventController::with_leadership`]).
    step_down_grace: Duration,
    /// Fences attempts: none is sent by a replica whose term has ended.
    leadership: Leadership,
}

/// The watch streams, one per namespace watched (or one for all).
struct Streams {
    coverage: Vec<Option<Arc<str>>>,
    relists: Vec<Option<Relist>>,
    synced: Vec<bool>,
}

impl DocumentEventController {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        scope: &Scope,
        routes: Routes,
        dispatcher: Arc<Dispatcher>,
        status: StatusSender,
        readiness: Readiness,
        metrics: Metrics,
        retention: Retention,
        max_hold: Duration,
    ) -> Self {
        let (tx, rx) = mpsc::channel(4096);
        let coverage = scope.coverage();
        let n = coverage.len();
        let (created_tx, created) = CreatedEvents::channel();
        let (recoveries_tx, recoveries) = Recoveries::channel();
        let created_max_age = [retention.delivered, retention.failed]
            .into_iter()
            .flatten()
            .map(|r| r / 2)
            .fold(CREATED_MAX_AGE, Duration::min);
        Self {
            client,
            routes,
            status,
            readiness,
            tasks: Arc::new(TaskContext {
                dispatcher,
                progress: tx,
                metrics,
                max_hold,
            }),
            progress: rx,
            tracked: HashMap::new(),
            unsent: Unsent::default(),
            retiring: Retiring {
                retention,
                cleanup: DelayQueue::new(),
                to_delete: VecDeque::new(),
                deletes: JoinSet::new(),
            },
            inbox: Inbox {
                created,
                _created: created_tx,
                recoveries,
                _recoveries: recoveries_tx,
                created_max_age,
            },
            term: Term {
                deliveries: TaskTracker::new(),
                abandon: CancellationToken::new(),
                in_flight_grace: Duration::from_secs(10),
                step_down_grace: Duration::from_secs(2),
                leadership: Leadership::always(),
            },
            streams: Streams {
                relists: (0..n).map(|_| None).collect(),
                synced: vec![false; n],
                coverage,
            },
            screening: Screening::default(),
        }
    }

    /// Takes the events that ingest on this replica creates (see [`CreatedEvents`]).
    pub fn with_created_events(
        mut self,
        created: mpsc::Receiver<(Instant, DocumentEvent)>,
    ) -> Self {
        self.inbox.created = created;
        self
    }

    /// Takes the failed deliveries the API asks to send again (see [`Recovery`]).
    pub fn with_recoveries(mut self, recoveries: mpsc::Receiver<Recovery>) -> Self {
        self.inbox.recoveries = recoveries;
        self
    }

    /// How long attempts being sent may finish on shutdown (default 10 s).
    pub fn with_in_flight_grace(mut self, grace: Duration) -> Self {
        self.term.in_flight_grace = grace;
        self
    }

    /// How long attempts being sent may finish when a term of leadership ends (it must be well
    /// within `--lease-duration` minus `--lease-renew-deadline`, the time before another replica can
    /// lead), and the leadership that fences each attempt: none is sent once it has ended.
    pub fn with_leadership(mut self, leadership: Leadership, step_down_grace: Duration) -> Self {
        self.term.leadership = leadership;
        self.term.step_down_grace = step_down_grace;
        self
    }

    /// Delivers DocumentEvents until `stop` fires (shutdown, or the end of this replica's term
    /// as the leader), then stops every delivery task before returning; it may be run again
    /// (the next term), starting from a fresh list. Events are routed against a complete table
    /// only: call it once the routing table has synced.
    pub async fn run(&mut self, scope: &Scope, stop: CancellationToken) {
        self.start_term();
        let mut events = scope.watch::<DeserializeGuard<DocumentEvent>>(
            &self.client,
            watcher::Config::default(),
            |_| {},
        );
        let status = self.status.clone();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                Some((i, event)) = events.next() => self.on_event(i, event),
                Some((at, de)) = self.inbox.created.recv() => self.on_created(at, de),
                Some(recovery) = self.inbox.recoveries.recv() => self.on_recovery(recovery),
                Some(progress) = self.progress.recv() => self.on_progress(progress),
                Some(screened) = self.screening.running.join_next(), if !self.screening.running.is_empty() => {
                    match screened {
                        Ok((namespace, routes)) => self.on_screened(namespace, routes),
                        Err(e) => tracing::error!(error = %e, "screening an event through its filters failed"),
                    }
                }
                Some(permit) = status.reserve(), if !self.unsent.queue.is_empty() => {
                    if let Some(update) = self.next_unsent() {
                        permit.send(update);
                    }
                }
                Some(expired) = self.retiring.cleanup.next() => {
                    self.retiring.to_delete.push_back(expired.into_inner());
                    self.start_deletes();
                }
                Some(deleted) = self.retiring.deletes.join_next() => {
                    if let Ok((key, uid, result)) = deleted {
                        self.deleted(key, uid, result);
                    }
                    self.start_deletes();
                }
            }
        }
        // Stop: deliveries waiting (for their time, a slot, or a held Webhook) end now; attempts
        // being sent finish, and what every delivery reported goes to the status writer, so
        // that the next leader does not send them again.
        for tracked in self.tracked.values() {
            tracked.cancel.cancel();
        }
        self.term.deliveries.close();
        // An attempt to an endpoint that hangs may not use up the whole shutdown deadline: the
        // status still has to be written and the Lease released after it. A term that ended
        // (not a shutdown) has less: another replica may lead soon.
        let grace = if self.term.leadership.is_leader() {
            self.term.in_flight_grace
        } else {
            self.term.step_down_grace
        };
        let grace = tokio::time::sleep(grace);
        tokio::pin!(grace);
        loop {
            tokio::select! {
                Some(progress) = self.progress.recv() => self.on_progress(progress),
                Some(permit) = status.reserve(), if !self.unsent.queue.is_empty() => {
                    if let Some(update) = self.next_unsent() {
                        permit.send(update);
                    }
                }
                _ = self.term.deliveries.wait() => break,
                _ = &mut grace, if !self.term.abandon.is_cancelled() => {
                    tracing::warn!(in_flight = self.term.deliveries.len(), "attempts still being sent are abandoned; the next run makes them again");
                    self.term.abandon.cancel();
                }
            }
        }
        while let Ok(progress) = self.progress.try_recv() {
            self.on_progress(progress);
        }
        while let Some(update) = self.next_unsent() {
            status.send(update).await;
        }
    }

    /// Forgets what an earlier term knew: this term starts from the list, as a new leader would.
    fn start_term(&mut self) {
        self.tracked.clear();
        self.unsent.queue.clear();
        self.unsent.keys.clear();
        self.retiring.cleanup.clear();
        self.retiring.to_delete.clear();
        self.retiring.deletes.abort_all();
        self.term.deliveries = TaskTracker::new();
        self.term.abandon = CancellationToken::new();
        self.streams.relists = self.streams.coverage.iter().map(|_| None).collect();
        self.screening = Screening::default();
        while self.progress.try_recv().is_ok() {}
    }

    /// Whether this very event (`uid`) is tracked or waiting for its filters.
    fn knows(&self, key: &EventKey, uid: &str) -> bool {
        self.tracked.get(key).is_some_and(|t| t.uid == uid)
            || self.screening.keys.get(key).is_some_and(|u| u == uid)
    }

    /// An event ingest has just created: adopted now unless the watch brought it already.
    fn on_created(&mut self, at: Instant, de: DocumentEvent) {
        if at.elapsed() > self.inbox.created_max_age {
            return;
        }
        // While its namespace is being listed, the list (or the watch after it) brings it, and
        // taking it now would queue it before the listed events of its ordering key.
        let namespace = de.namespace().unwrap_or_default();
        let listing =
            self.streams
                .coverage
                .iter()
                .zip(&self.streams.relists)
                .any(|(covered, relist)| {
                    relist.is_some() && covered.as_deref().is_none_or(|ns| ns == namespace)
                });
        if listing {
            return;
        }
        let key = event_key(&de);
        let uid = de.uid().unwrap_or_default();
        if !self.knows(&key, &uid) {
            self.adopt(key, uid, de);
        }
    }

    fn on_event(&mut self, stream: usize, event: watcher::Event<DeserializeGuard<DocumentEvent>>) {
        match event {
            watcher::Event::Init => {
                self.streams.relists[stream] = Some(Relist {
                    started: Instant::now(),
                    seen: HashSet::new(),
                    new: Vec::new(),
                });
            }
            watcher::Event::InitApply(DeserializeGuard(Ok(de)))
            | watcher::Event::Apply(DeserializeGuard(Ok(de))) => {
                let key = event_key(&de);
                let uid = de.uid().unwrap_or_default();
                // Our own status writes echo back; the spec is immutable.
                let known = self.knows(&key, &uid);
                match &mut self.streams.relists[stream] {
                    // Listed: taken over at the end of the list, in the order accepted.
                    Some(relist) => {
                        relist.seen.insert(key.clone());
                        if !known {
                            relist.new.push(de);
                        }
                    }
                    None if known => {}
                    None => self.adopt(key, uid, de),
                }
            }
            watcher::Event::Delete(DeserializeGuard(Ok(de))) => {
                // Only that very object: a namesake created since may be tracked already.
                let key = event_key(&de);
                if self.tracked.get(&key).map(|t| t.uid.as_str()) == de.uid().as_deref() {
                    self.forget(&key);
                }
                if self.screening.keys.get(&key).map(String::as_str) == de.uid().as_deref() {
                    self.screening.keys.remove(&key);
                }
            }
            watcher::Event::InitDone => {
                if let Some(Relist { started, seen, new }) = self.streams.relists[stream].take() {
                    // A list comes in name order; deliveries of one ordering key must be
                    // queued in the order their events were accepted, a retrying head first.
                    for de in in_acceptance_order(new) {
                        let key = event_key(&de);
                        let uid = de.uid().unwrap_or_default();
                        self.adopt(key, uid, de);
                    }
                    let covered = self.streams.coverage[stream].clone();
                    // An event ingest handed over during the relist may be newer than the list.
                    let gone: Vec<EventKey> = self
                        .tracked
                        .iter()
                        .filter(|(k, t)| {
                            covered.as_ref().is_none_or(|ns| *ns == k.namespace)
                                && !seen.contains(*k)
                                && t.adopted < started
                        })
                        .map(|(k, _)| k.clone())
                        .collect();
                    for key in gone {
                        self.forget(&key);
                    }
                    // Waiting since before the list, and not in it: deleted meanwhile.
                    self.screening.keys.retain(|k, _| {
                        covered.as_ref().is_none_or(|ns| *ns != k.namespace) || seen.contains(k)
                    });
                }
                if !std::mem::replace(&mut self.streams.synced[stream], true)
                    && self.streams.synced.iter().all(|s| *s)
                {
                    self.readiness.mark_ready("documentevents");
                }
            }
            watcher::Event::InitApply(DeserializeGuard(Err(e)))
            | watcher::Event::Apply(DeserializeGuard(Err(e)))
            | watcher::Event::Delete(DeserializeGuard(Err(e))) => {
                tracing::warn!(event = ?e.metadata.name, error = %e.error, "skipping a DocumentEvent that cannot be read");
            }
        }
    }

    /// Takes over an event: new ones are routed (after their namespace's earlier events, once
    /// their filters are decided), unfinished ones resumed, finished ones only wait for their
    /// retention.
    fn adopt(&mut self, key: EventKey, uid: String, de: DocumentEvent) {
        let timestamp = timestamp_of(&de);
        self.screening.keys.insert(key.clone(), uid.clone());
        self.screening
            .waiting
            .entry(key.namespace.clone())
            .or_default()
            .push_back(Waiting {
                key: key.clone(),
                uid,
                event: Arc::new(ListedEvent { de, timestamp }),
            });
        self.adopt_waiting(&key.namespace);
    }

    /// Adopts the waiting events of `namespace` in order, until one needs its filters
    /// evaluated: that one is screened in a task of its own, and the rest wait for it.
    fn adopt_waiting(&mut self, namespace: &Arc<str>) {
        if self.screening.busy.contains(namespace) {
            return;
        }
        let table = self.routes.snapshot();
        loop {
            let Some(queue) = self.screening.waiting.get_mut(namespace) else {
                return;
            };
            let Some(head) = queue.front() else {
                self.screening.waiting.remove(namespace);
                return;
            };
            let routes = if needs_routing(&head.event.de) {
                match Screen::without_evaluation(&table, namespace, head.event.de.spec.type_) {
                    Some(routes) => routes,
                    None => {
                        let (routes, metrics) = (self.routes.clone(), self.tasks.metrics.clone());
                        let (namespace, event) = (namespace.clone(), head.event.clone());
                        self.screening.busy.insert(namespace.clone());
                        self.screening.running.spawn(async move {
                            let type_ = event.de.spec.type_;
                            let targets = routes.targets(&namespace, type_, event, &metrics).await;
                            (namespace, targets)
                        });
                        return;
                    }
                }
            } else {
                Vec::new()
            };
            let head = queue.pop_front().expect("the head was just seen");
            self.adopt_routed(head, routes);
        }
    }

    /// The head of `namespace` has been screened: adopted with the routes its filters let
    /// through, and the events behind it follow.
    fn on_screened(&mut self, namespace: Arc<str>, routes: Vec<Arc<Route>>) {
        self.screening.busy.remove(&namespace);
        if let Some(head) = self
            .screening
            .waiting
            .get_mut(&namespace)
            .and_then(VecDeque::pop_front)
        {
            self.adopt_routed(head, routes);
        }
        self.adopt_waiting(&namespace);
    }

    /// Adopts a waiting event, routed to `routes` if it has no targets yet; skipped if it was
    /// deleted (or taken over again) while it waited.
    fn adopt_routed(&mut self, waiting: Waiting, routes: Vec<Arc<Route>>) {
        let Waiting { key, uid, event } = waiting;
        if self.screening.keys.get(&key) != Some(&uid) {
            return;
        }
        self.screening.keys.remove(&key);
        let de = &event.de;
        self.forget(&key);
        let mut status = de.status.clone().unwrap_or_default();
        status.observed_generation = de.metadata.generation;
        let cancel = CancellationToken::new();
        let finished = matches!(
            status.phase,
            Some(EventPhase::Delivered | EventPhase::Failed | EventPhase::NoSubscribers)
        );
        if !finished {
            if status.deliveries.is_empty() {
                status.deliveries = targets(&key, &uid, &routes);
            }
            // The route span continues the ingest trace (the event's annotation), when traces
            // are exported; each attempt's span is its child.
            let span = tracing::info_span!(
                target: crate::telemetry::TARGET,
                "route",
                hookrelay.namespace = %key.namespace,
                hookrelay.document_event = %key.name,
                hookrelay.event = de.spec.type_.as_str(),
                hookrelay.targets = status.deliveries.len(),
            );
            crate::telemetry::continue_trace(&span, event_trace(de));
            let event = EventCopy {
                body: Arc::new(EventBody::from(de)),
                trace: crate::telemetry::traceparent(&span).map(Arc::from),
                created: acceptance_order(de),
            };
            for target in status.deliveries.iter().filter(|t| !is_final(t.state)) {
                self.spawn_delivery(&key, &uid, &event, target.clone(), &cancel);
            }
            let changed = set_phase(&mut status);
            if changed || de.status.is_none() {
                self.write(&key);
            }
        }
        let cleanup = self.schedule_cleanup(&key, &uid, &status);
        self.tracked.insert(
            key,
            Tracked {
                uid,
                status,
                cancel,
                cleanup,
                adopted: Instant::now(),
            },
        );
    }

    /// Starts the delivery task of one target of a tracked (or being adopted) event.
    fn spawn_delivery(
        &self,
        key: &EventKey,
        uid: &str,
        event: &EventCopy,
        target: TargetDelivery,
        cancel: &CancellationToken,
    ) {
        let webhook = WebhookKey {
            namespace: key.namespace.clone(),
            name: target.webhook.as_str().into(),
        };
        // The Webhook the target was routed to is the one whose uid gives its delivery id; a
        // namesake created since is not (the engine then fails the target).
        let webhook_uid: Arc<str> = self
            .routes
            .snapshot()
            .get(&webhook)
            .filter(|route| delivery_id(uid, &route.uid) == target.id)
            .map_or_else(|| Arc::from(""), |route| Arc::from(route.uid.as_str()));
        let delivery = Delivery {
            webhook,
            webhook_uid,
            routed_version: 0,
            id: target.id.clone(),
            event: event.body.clone(),
            source: delivery::Source::DocumentEvent(key.name.clone()),
            manual: false,
            timeout_cap: None,
            trace: event.trace.clone(),
        };
        let progress = EventProgress {
            tx: self.tasks.progress.clone(),
            key: key.clone(),
            uid: uid.to_owned(),
            leadership: self.term.leadership.clone(),
            stop: cancel.clone(),
        };
        self.tasks
            .metrics
            .pending_in(&delivery.webhook.namespace)
            .inc();
        // Live events are taken over in the order they were created; after a restart the
        // list's order (by name) within one second of creation.
        let order = self.tasks.dispatcher.ticket(&delivery, event.created);
        let (task, abandon) = (
            deliver(self.tasks.clone(), progress, delivery, target, order),
            self.term.abandon.clone(),
        );
        self.term.deliveries.spawn(async move {
            tokio::select! {
                _ = task => {}
                _ = abandon.cancelled() => {}
            }
        });
    }

    /// Sends failed deliveries again (`POST .../recover`): each target still `Failed` starts a
    /// new attempt sequence with the same delivery id, through the normal path (retries, holds),
    /// and its event is `Delivering` again, so that its retention starts over when it ends.
    fn on_recovery(&mut self, recovery: Recovery) {
        let mut queued = 0;
        for (de, id) in recovery.deliveries {
            let key = event_key(&de);
            let uid = de.uid().unwrap_or_default();
            let Some(tracked) = self.tracked.get_mut(&key).filter(|t| t.uid == uid) else {
                continue;
            };
            let Some(target) = tracked.status.deliveries.iter_mut().find(|t| {
                t.webhook == recovery.webhook && t.id == id && t.state == TargetState::Failed
            }) else {
                continue;
            };
            *target = TargetDelivery::new(target.webhook.clone(), id, TargetState::Pending);
            let target = target.clone();
            tracked.status.completion_time = None;
            set_phase(&mut tracked.status);
            let (cancel, cleanup) = (tracked.cancel.clone(), tracked.cleanup.take());
            if let Some(cleanup) = cleanup {
                self.retiring.cleanup.try_remove(&cleanup);
            }
            let event = EventCopy {
                body: Arc::new(EventBody::from(&de)),
                trace: event_trace(&de).map(Arc::from),
                created: acceptance_order(&de),
            };
            self.spawn_delivery(&key, &uid, &event, target, &cancel);
            self.write(&key);
            queued += 1;
        }
        let _ = recovery.queued.send(queued);
    }

    fn on_progress(&mut self, Progress { key, uid, target }: Progress) {
        let Some(tracked) = self.tracked.get_mut(&key).filter(|t| t.uid == uid) else {
            return;
        };
        if let Some(slot) = tracked
            .status
            .deliveries
            .iter_mut()
            .find(|t| t.webhook == target.webhook)
        {
            *slot = target;
        }
        set_phase(&mut tracked.status);
        let finished = tracked
            .status
            .completion_time
            .is_some()
            .then(|| tracked.status.clone());
        self.write(&key);
        if let Some(status) = finished {
            let cleanup = self.schedule_cleanup(&key, &uid, &status);
            if let Some(tracked) = self.tracked.get_mut(&key) {
                tracked.cleanup = cleanup;
            }
        }
    }

    /// Marks the event's status as to be sent to the writer (see `unsent`).
    fn write(&mut self, key: &EventKey) {
        if self.unsent.keys.insert(key.clone()) {
            self.unsent.queue.push_back(key.clone());
        }
    }

    /// The status to send next: the event's status as it is now (None when nothing is left).
    fn next_unsent(&mut self) -> Option<Update> {
        while let Some(key) = self.unsent.queue.pop_front() {
            self.unsent.keys.remove(&key);
            // Forgotten (deleted) since: nothing to write.
            if let Some(tracked) = self.tracked.get(&key) {
                return Some(Update::EventStatus {
                    key,
                    uid: tracked.uid.clone(),
                    status: tracked.status.clone(),
                });
            }
        }
        None
    }

    fn schedule_cleanup(
        &mut self,
        key: &EventKey,
        uid: &str,
        status: &DocumentEventStatus,
    ) -> Option<tokio_util::time::delay_queue::Key> {
        let completed = status.completion_time.as_ref()?;
        let retention = match status.phase {
            Some(EventPhase::Failed) => self.retiring.retention.failed,
            _ => self.retiring.retention.delivered,
        }?;
        if let Some(old) = self.tracked.get_mut(key).and_then(|t| t.cleanup.take()) {
            self.retiring.cleanup.try_remove(&old);
        }
        let age = Timestamp::now().duration_since(completed.0).unsigned_abs();
        let wait = retention.saturating_sub(age);
        Some(
            self.retiring
                .cleanup
                .insert((key.clone(), uid.to_owned()), wait),
        )
    }

    fn forget(&mut self, key: &EventKey) {
        if let Some(tracked) = self.tracked.remove(key) {
            tracked.cancel.cancel();
            if let Some(cleanup) = tracked.cleanup {
                self.retiring.cleanup.try_remove(&cleanup);
            }
        }
    }

    /// Starts deletes of events whose retention ran out, a bounded number at once, each of
    /// only the very object (uid precondition), in tasks: the loop never waits for them.
    fn start_deletes(&mut self) {
        while self.retiring.deletes.len() < DELETES_IN_FLIGHT {
            let Some((key, uid)) = self.retiring.to_delete.pop_front() else {
                return;
            };
            let api: Api<DocumentEvent> = Api::namespaced(self.client.clone(), &key.namespace);
            self.retiring.deletes.spawn(async move {
                let params = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: Some(uid.clone()),
                        resource_version: None,
                    }),
                    ..DeleteParams::default()
                };
                let deleted = tokio::time::timeout(DELETE_TIMEOUT, api.delete(&key.name, &params))
                    .await
                    .unwrap_or_else(|_| Err(kube::Error::Service("delete timed out".into())));
                (key, uid, deleted.map(|_| ()))
            });
        }
    }

    /// What became of a delete.
    fn deleted(&mut self, key: EventKey, uid: String, result: Result<(), kube::Error>) {
        match result {
            Ok(()) => tracing::debug!(event = %key, "retention over: deleted"),
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(error) => {
                tracing::warn!(event = %key, %error, "deleting a finished DocumentEvent failed; retrying in a minute");
                if self.tracked.get(&key).is_some_and(|t| t.uid == uid) {
                    let retry = self
                        .retiring
                        .cleanup
                        .insert((key.clone(), uid), Duration::from_secs(60));
                    if let Some(t) = self.tracked.get_mut(&key) {
                        t.cleanup = Some(retry);
                    }
                }
                return;
            }
        }
        if self.tracked.get(&key).is_some_and(|t| t.uid == uid)
            && let Some(t) = self.tracked.remove(&key)
        {
            t.cancel.cancel();
        }
    }
}

/// Derives `phase`, the `Delivered` condition and `completionTime` from the targets; returns
/// whether the phase changed.
fn set_phase(status: &mut DocumentEventStatus) -> bool {
    let phase = if status.deliveries.is_empty() {
        EventPhase::NoSubscribers
    } else if status
        .deliveries
        .iter()
        .all(|t| t.state == TargetState::Succeeded)
    {
        EventPhase::Delivered
    } else if status.deliveries.iter().all(|t| is_final(t.state)) {
        EventPhase::Failed
    } else {
        EventPhase::Delivering
    };
    let finished = phase != EventPhase::Delivering;
    let now = Timestamp::now();
    if finished && status.completion_time.is_none() {
        status.completion_time = Some(Time(now));
    }
    let condition = delivered_condition(phase, &status.deliveries);
    crate::crd::merge_condition(
        &mut status.conditions,
        &condition,
        status.observed_generation,
        now,
    );
    status.phase.replace(phase) != Some(phase)
}

/// The `Delivered` condition of an event in `phase`: its reason is the phase, its message the
/// counts and the first failure.
fn delivered_condition(
    phase: EventPhase,
    targets: &[TargetDelivery],
) -> crate::crd::ConditionState {
    let count = |state| targets.iter().filter(|t| t.state == state).count();
    let total = targets.len();
    let (succeeded, failed, held) = (
        count(TargetState::Succeeded),
        count(TargetState::Failed),
        count(TargetState::Held),
    );
    let first_failure = || {
        targets
            .iter()
            .find(|t| t.state == TargetState::Failed)
            .map(|t| match &t.error {
                Some(error) => format!("; webhook {}: {error}", t.webhook),
                None => format!("; webhook {}", t.webhook),
            })
            .unwrap_or_default()
    };
    let (status, reason, message) = match phase {
        EventPhase::Delivered => (
            true,
            "Delivered",
            format!("delivered to every matching Webhook ({total})"),
        ),
        EventPhase::NoSubscribers => (
            false,
            "NoSubscribers",
            "no Webhook of this namespace subscribes to the event (or its filters refused it)"
                .to_owned(),
        ),
        EventPhase::Failed => (
            false,
            "Failed",
            format!(
                "{failed} of {total} deliveries failed for good{}",
                first_failure()
            ),
        ),
        EventPhase::Delivering | EventPhase::Pending => (
            false,
            "Delivering",
            format!(
                "{succeeded} of {total} delivered, {held} held (Webhook paused or not Ready), {} waiting for an attempt{}",
                total - succeeded - failed - held,
                if failed > 0 {
                    first_failure()
                } else {
                    String::new()
                }
            ),
        ),
    };
    crate::crd::ConditionState::new("Delivered", status, reason, message)
}

/// Delivers one event to one Webhook until it succeeds or fails for good, reporting each step
/// to the controller.
async fn deliver(
    ctx: Arc<TaskContext>,
    progress: EventProgress,
    delivery: Delivery,
    mut target: TargetDelivery,
    mut order: Option<delivery::Ticket>,
) {
    delivery::drive(
        &ctx.dispatcher,
        &delivery,
        &mut target,
        ctx.max_hold,
        &progress,
        order.as_mut(),
    )
    .await;
    ctx.metrics.pending_in(&delivery.webhook.namespace).dec();
}

/// A delivery's progress goes to the controller, which owns the event's status; it waits in
/// its own task.
struct EventProgress {
    tx: mpsc::Sender<Progress>,
    key: EventKey,
    uid: String,
    leadership: Leadership,
    /// Fired when the controller stops (or its term ends).
    stop: CancellationToken,
}

impl Keeper for EventProgress {
    fn stopped(&self) -> &CancellationToken {
        &self.stop
    }

    async fn park(&self, _: &Wait, _: &TargetDelivery) -> Parked {
        Parked::Here
    }

    /// Only the leader delivers DocumentEvents: a replica whose term has ended (even one paused
    /// past it, whose election has not run yet) sends nothing more.
    fn may_send(&self) -> bool {
        self.leadership.is_leader()
    }

    async fn store(&self, target: &TargetDelivery) {
        let _ = self
            .tx
            .send(Progress {
                key: self.key.clone(),
                uid: self.uid.clone(),
                target: target.clone(),
            })
            .await;
    }
}

/// The `traceparent` ingest left on the event (see `crate::telemetry`).
fn event_trace(de: &DocumentEvent) -> Option<&str> {
    de.metadata
        .annotations
        .as_ref()?
        .get(crate::telemetry::TRACEPARENT_ANNOTATION)
        .map(String::as_str)
}

/// What every delivery of one event carries.
struct EventCopy {
    body: Arc<EventBody>,
    /// The `traceparent` its attempts continue.
    trace: Option<Arc<str>>,
    /// Its place among the events of its ordering key (`acceptance_order`).
    created: u64,
}

/// An event's place among the events of its ordering key: when ingest accepted it (to the
/// microsecond), else the second it was created.
fn acceptance_order(de: &DocumentEvent) -> u64 {
    let accepted = de
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ACCEPTED_AT_ANNOTATION))
        .and_then(|t| t.parse::<Timestamp>().ok());
    let at = accepted.or_else(|| de.metadata.creation_timestamp.as_ref().map(|t| t.0));
    at.map_or(0, |t| t.as_microsecond().max(0) as u64)
}

/// Whether any delivery of the event has been attempted and is not final: of two events of one
/// ordering key accepted in the same second, that one came first (only a key's head is
/// attempted before it is final).
fn started(de: &DocumentEvent) -> bool {
    de.status.as_ref().is_some_and(|s| {
        s.deliveries
            .iter()
            .any(|t| t.attempts > 0 && !is_final(t.state))
    })
}

/// Listed events in the order their deliveries are queued: accepted first, then a started one
/// before one not started, then by name.
fn in_acceptance_order(mut events: Vec<DocumentEvent>) -> Vec<DocumentEvent> {
    events.sort_by_cached_key(|de| (acceptance_order(de), !started(de), de.name_any()));
    events
}

fn event_key(de: &DocumentEvent) -> EventKey {
    EventKey {
        namespace: de.namespace().unwrap_or_default().as_str().into(),
        name: de.name_any().as_str().into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        crd::{DocumentEventSpec, EventType},
        delivery::{DispatcherConfig, EgressPolicy, HttpSender},
        routing::Route,
    };

    /// The mock API server: it answers only what a test makes it answer.
    type ApiServer = tower_test::mock::Handle<
        http::Request<kube::client::Body>,
        http::Response<kube::client::Body>,
    >;

    /// Answers the watch's first list with no DocumentEvent (what follows is never answered):
    /// the controller has listed its namespace.
    /// Answers the controller's list with no event and waits until it has taken the answer in
    /// (synced): an event handed over before that is left to the list.
    async fn listed_empty(api: &mut ApiServer, readiness: &Readiness) {
        let (request, send) = api.next_request().await.expect("the watch lists");
        assert!(
            request.uri().path().ends_with("/documentevents"),
            "{}",
            request.uri()
        );
        let list = serde_json::json!({
            "apiVersion": "hookrelay.dev/v1alpha1", "kind": "DocumentEventList",
            "metadata": {"resourceVersion": "1"}, "items": [],
        });
        send.send_response(
            http::Response::builder()
                .body(kube::client::Body::from(serde_json::to_vec(&list).unwrap()))
                .unwrap(),
        );
        readiness.synced("documentevents").await;
    }

    /// A controller for namespace `docs` with one active Webhook `w` (without a signing secret:
    /// each attempt ends at once, "not sent", and is retried later), whose API server answers
    /// only what the test makes it answer. Status goes to the returned receiver.
    fn controller(
        status_capacity: usize,
    ) -> (
        DocumentEventController,
        CreatedEvents,
        mpsc::Receiver<Update>,
        Metrics,
        ApiServer,
        Readiness,
    ) {
        // reqwest is built without a default TLS provider (the binary installs ring).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (service, handle) = tower_test::mock::pair();
        let client = Client::new(service, "default");
        let routes = Routes::default();
        routes.update(|t| {
            t.apply(Route {
                uid: "uid-w".into(),
                ..Route::for_tests("docs", "w", "http://127.0.0.1:9/h")
            })
        });
        let (status, updates) = crate::status::test_channel(status_capacity);
        let metrics = Metrics::default();
        let (gone, _) = mpsc::unbounded_channel();
        let dispatcher = Arc::new(Dispatcher::new(
            HttpSender::new(EgressPolicy::new(false, Vec::new())),
            routes.clone(),
            status.clone(),
            gone,
            metrics.clone(),
            DispatcherConfig::default(),
        ));
        let (created, rx) = CreatedEvents::channel();
        let readiness = Readiness::new(&["documentevents"]);
        let controller = DocumentEventController::new(
            client,
            &Scope::new(&["docs".to_owned()]),
            routes,
            dispatcher,
            status,
            readiness.clone(),
            metrics.clone(),
            Retention {
                delivered: None,
                failed: None,
            },
            Duration::from_secs(60),
        )
        .with_created_events(rx);
        (controller, created, updates, metrics, handle, readiness)
    }

    fn document_event(name: &str) -> DocumentEvent {
        let mut de = DocumentEvent::new(
            name,
            DocumentEventSpec {
                type_: EventType::Completed,
                timestamp: None,
                data: Default::default(),
            },
        );
        de.metadata.namespace = Some("docs".into());
        de.metadata.uid = Some(format!("uid-{name}"));
        de
    }

    fn created_at(mut de: DocumentEvent, second: i64) -> DocumentEvent {
        de.metadata.creation_timestamp = Some(Time(Timestamp::from_second(second).unwrap()));
        de
    }

    fn accepted_at(mut de: DocumentEvent, at: &str) -> DocumentEvent {
        de.metadata
            .annotations
            .get_or_insert_default()
            .insert(ACCEPTED_AT_ANNOTATION.into(), at.into());
        de
    }

    fn names(events: Vec<DocumentEvent>) -> Vec<String> {
        in_acceptance_order(events)
            .iter()
            .map(|de| de.name_any())
            .collect()
    }

    /// A list comes in name order; after a restart or a new leader, the deliveries of one
    /// ordering key must still be queued in the order their events were accepted (a later event
    /// taking the turn from a retrying head broke the order).
    #[test]
    fn listed_events_are_taken_over_in_the_order_accepted_a_started_head_first() {
        let second = 1_780_000_000;
        let later = accepted_at(
            created_at(document_event("a-later"), second),
            "2026-05-28T20:26:40.000002Z",
        );
        let earlier = accepted_at(
            created_at(document_event("z-earlier"), second),
            "2026-05-28T20:26:40.000001Z",
        );
        assert_eq!(names(vec![later, earlier]), ["z-earlier", "a-later"]);

        // Created with kubectl in one second: the one being retried is the head of its key.
        let mut head = created_at(document_event("z-head"), second);
        let mut target = TargetDelivery::new("w".into(), "id".into(), TargetState::Pending);
        target.attempts = 2;
        head.status = Some(DocumentEventStatus {
            deliveries: vec![target],
            ..Default::default()
        });
        let next = created_at(document_event("a-next"), second);
        let older = created_at(document_event("m-older"), second - 1);
        assert_eq!(
            names(vec![next, head, older]),
            ["m-older", "z-head", "a-next"]
        );
    }

    /// An event ingest created here is delivered without waiting for the watch to bring it.
    #[tokio::test]
    async fn an_event_ingest_created_is_delivered_before_the_watch_brings_it() {
        let (mut controller, created, mut updates, _metrics, mut api, ready) = controller(64);
        let stop = CancellationToken::new();
        let term = stop.clone();
        let run = tokio::spawn(async move {
            controller
                .run(&Scope::new(&["docs".to_owned()]), term)
                .await
        });
        // Events handed over while the namespace is listed are left to the list.
        listed_empty(&mut api, &ready).await;
        created.created(document_event("e1"));
        let attempted = loop {
            match updates.recv().await.expect("the controller runs") {
                Update::EventStatus { key, uid, status }
                    if status.deliveries.first().is_some_and(|t| t.attempts == 1) =>
                {
                    break (key.name.to_string(), uid);
                }
                _ => {}
            }
        };
        assert_eq!(attempted, ("e1".to_owned(), "uid-e1".to_owned()));
        // A writer that has stopped: nothing waits for it on shutdown.
        drop(updates);
        stop.cancel();
        run.await.unwrap();
    }

    /// A status writer that takes nothing does not stop the controller from taking up new
    /// events (it used to wait with the first event's status in hand, and watch events queued).
    #[tokio::test]
    async fn a_busy_status_writer_does_not_stall_the_controller() {
        let (mut controller, created, mut updates, metrics, mut api, ready) = controller(1);
        let stop = CancellationToken::new();
        let term = stop.clone();
        let run = tokio::spawn(async move {
            controller
                .run(&Scope::new(&["docs".to_owned()]), term)
                .await
        });
        // Events handed over while the namespace is listed are left to the list.
        listed_empty(&mut api, &ready).await;
        for i in 0..20 {
            created.created(document_event(&format!("e{i}")));
        }
        // Nothing reads `updates` meanwhile: the one place in the channel is soon taken.
        tokio::time::timeout(Duration::from_secs(10), async {
            while metrics.pending_in("docs").get() < 20 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("all 20 events taken up while the status writer is busy");
        // And every event's status reaches the writer once it takes them.
        let mut written = HashSet::new();
        while written.len() < 20 {
            if let Update::EventStatus { key, .. } = updates.recv().await.unwrap() {
                written.insert(key.name.to_string());
            }
        }
        drop(updates);
        stop.cancel();
        run.await.unwrap();
    }

    fn target(state: TargetState) -> TargetDelivery {
        TargetDelivery {
            webhook: "w".into(),
            id: "msg".into(),
            state,
            attempts: 1,
            http_status: None,
            last_attempt_time: None,
            next_attempt_time: None,
            held_since: None,
            error: None,
        }
    }

    #[test]
    fn phase_follows_the_targets() {
        let mut s = DocumentEventStatus::default();
        assert!(set_phase(&mut s));
        assert_eq!(s.phase, Some(EventPhase::NoSubscribers));
        assert!(s.completion_time.is_some());

        let mut s = DocumentEventStatus {
            deliveries: vec![target(TargetState::Succeeded), target(TargetState::Pending)],
            ..Default::default()
        };
        set_phase(&mut s);
        assert_eq!(
            (s.phase, s.completion_time.is_some()),
            (Some(EventPhase::Delivering), false)
        );
        s.deliveries[1].state = TargetState::Held;
        assert!(!set_phase(&mut s), "held is still delivering");
        s.deliveries[1].state = TargetState::Failed;
        assert!(set_phase(&mut s));
        assert_eq!(s.phase, Some(EventPhase::Failed));
        s.deliveries[1].state = TargetState::Succeeded;
        set_phase(&mut s);
        assert_eq!(s.phase, Some(EventPhase::Delivered));
    }

    #[test]
    fn the_delivered_condition_follows_the_targets_with_the_generation() {
        let delivered = |s: &DocumentEventStatus| {
            let c = s
                .conditions
                .iter()
                .find(|c| c.type_ == "Delivered")
                .unwrap();
            (
                c.status.clone(),
                c.reason.clone(),
                c.message.clone(),
                c.observed_generation,
            )
        };
        let mut failing = target(TargetState::Pending);
        failing.webhook = "b".into();
        let mut s = DocumentEventStatus {
            observed_generation: Some(1),
            deliveries: vec![
                target(TargetState::Succeeded),
                failing,
                target(TargetState::Held),
            ],
            ..Default::default()
        };
        set_phase(&mut s);
        let (status, reason, message, generation) = delivered(&s);
        assert_eq!(
            (status.as_str(), reason.as_str(), generation),
            ("False", "Delivering", Some(1))
        );
        assert!(message.starts_with("1 of 3 delivered, 1 held"), "{message}");
        let since = s.conditions[0].last_transition_time.clone();

        s.deliveries[1].state = TargetState::Failed;
        s.deliveries[1].error = Some("HTTP 500".into());
        s.deliveries[2].state = TargetState::Succeeded;
        set_phase(&mut s);
        let (status, reason, message, _) = delivered(&s);
        assert_eq!((status.as_str(), reason.as_str()), ("False", "Failed"));
        assert_eq!(
            message,
            "1 of 3 deliveries failed for good; webhook b: HTTP 500"
        );
        assert_eq!(
            s.conditions[0].last_transition_time, since,
            "still False: no transition"
        );

        s.deliveries[1].state = TargetState::Succeeded;
        set_phase(&mut s);
        assert_eq!(delivered(&s).0, "True");
        assert_eq!(s.conditions.len(), 1);

        let mut none = DocumentEventStatus::default();
        set_phase(&mut none);
        assert_eq!(delivered(&none).1, "NoSubscribers");
    }
}
