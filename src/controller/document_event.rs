//! The DocumentEvent controller: routes each event to the Webhooks of its namespace, delivers it
//! to every target until it succeeds or runs out of attempts, keeps `status.deliveries` and the
//! `phase` true, and deletes finished events after their retention.
//!
//! At-least-once: the targets, attempt counts and the time of each next attempt live in the
//! event's status, so a restarted operator resumes every unfinished delivery where the status
//! says it stood (an attempt made but not yet written may be made again: receivers deduplicate
//! on the delivery id, which is derived from the event's and the webhook's uids).

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Preconditions},
    core::DeserializeGuard,
    runtime::watcher,
};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker, time::DelayQueue};

use super::Scope;
use crate::{
    crd::{DocumentEvent, DocumentEventStatus, EventPhase, TargetDelivery, TargetState},
    delivery::{self, Delivery, Dispatcher, EventBody, Report, delivery_id, is_final},
    http::Readiness,
    metrics::Metrics,
    routing::{RouteState, Routes, WebhookKey},
    status::{EventKey, StatusSender, Update},
};

/// How long finished DocumentEvents are kept; None keeps them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    pub delivered: Option<Duration>,
    pub failed: Option<Duration>,
}

/// Time allowed for deleting one finished DocumentEvent.
const DELETE_TIMEOUT: Duration = Duration::from_secs(5);

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
    retention: Retention,
    tasks: Arc<TaskContext>,
    progress: mpsc::Receiver<Progress>,
    tracked: HashMap<EventKey, Tracked>,
    cleanup: DelayQueue<(EventKey, String)>,
    /// Every delivery task, waited for on shutdown.
    deliveries: TaskTracker,
    /// Ends the delivery tasks still sending once `in_flight_grace` has passed on shutdown.
    abandon: CancellationToken,
    in_flight_grace: Duration,
    coverage: Vec<Option<Arc<str>>>,
    relists: Vec<Option<HashSet<EventKey>>>,
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
        Self {
            client,
            routes,
            status,
            readiness,
            retention,
            tasks: Arc::new(TaskContext {
                dispatcher,
                progress: tx,
                metrics,
                max_hold,
            }),
            progress: rx,
            tracked: HashMap::new(),
            cleanup: DelayQueue::new(),
            deliveries: TaskTracker::new(),
            abandon: CancellationToken::new(),
            in_flight_grace: Duration::from_secs(10),
            coverage,
            relists: vec![None; n],
            synced: vec![false; n],
        }
    }

    /// How long attempts being sent may finish on shutdown (default 10 s).
    pub fn with_in_flight_grace(mut self, grace: Duration) -> Self {
        self.in_flight_grace = grace;
        self
    }

    pub async fn run(
        mut self,
        scope: Scope,
        routes_synced: impl Future<Output = ()>,
        shutdown: CancellationToken,
    ) {
        // Events are routed against a complete table only.
        tokio::select! {
            _ = routes_synced => {},
            _ = shutdown.cancelled() => return,
        }
        let mut events = scope.watch::<DeserializeGuard<DocumentEvent>>(
            &self.client,
            watcher::Config::default(),
            |_| {},
        );
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some((i, event)) = events.next() => self.on_event(i, event).await,
                Some(progress) = self.progress.recv() => self.on_progress(progress).await,
                Some(expired) = self.cleanup.next() => {
                    let (key, uid) = expired.into_inner();
                    self.delete(key, uid).await;
                }
            }
        }
        // Stop: deliveries waiting (for their time, a slot, or a held Webhook) end now; attempts
        // being sent finish, and what every delivery reported goes to the status writer, so
        // that the next leader does not send them again.
        for tracked in self.tracked.values() {
            tracked.cancel.cancel();
        }
        self.deliveries.close();
        // An attempt to an endpoint that hangs may not use up the whole shutdown deadline: the
        // status still has to be written and the Lease released after it.
        let grace = tokio::time::sleep(self.in_flight_grace);
        tokio::pin!(grace);
        loop {
            tokio::select! {
                Some(progress) = self.progress.recv() => self.on_progress(progress).await,
                _ = self.deliveries.wait() => break,
                _ = &mut grace, if !self.abandon.is_cancelled() => {
                    tracing::warn!(in_flight = self.deliveries.len(), "attempts still being sent are abandoned; the next run makes them again");
                    self.abandon.cancel();
                }
            }
        }
        while let Ok(progress) = self.progress.try_recv() {
            self.on_progress(progress).await;
        }
    }

    async fn on_event(
        &mut self,
        stream: usize,
        event: watcher::Event<DeserializeGuard<DocumentEvent>>,
    ) {
        match event {
            watcher::Event::Init => self.relists[stream] = Some(HashSet::new()),
            watcher::Event::InitApply(DeserializeGuard(Ok(de)))
            | watcher::Event::Apply(DeserializeGuard(Ok(de))) => {
                let key = event_key(&de);
                if let Some(seen) = &mut self.relists[stream] {
                    seen.insert(key.clone());
                }
                let uid = de.uid().unwrap_or_default();
                match self.tracked.get(&key) {
                    // Our own status writes echo back; the spec is immutable.
                    Some(t) if t.uid == uid => {}
                    _ => self.adopt(key, uid, de).await,
                }
            }
            watcher::Event::Delete(DeserializeGuard(Ok(de))) => self.forget(&event_key(&de)),
            watcher::Event::InitDone => {
                if let Some(seen) = self.relists[stream].take() {
                    let covered = self.coverage[stream].clone();
                    let gone: Vec<EventKey> = self
                        .tracked
                        .keys()
                        .filter(|k| {
                            covered.as_ref().is_none_or(|ns| *ns == k.namespace)
                                && !seen.contains(*k)
                        })
                        .cloned()
                        .collect();
                    for key in gone {
                        self.forget(&key);
                    }
                }
                if !std::mem::replace(&mut self.synced[stream], true)
                    && self.synced.iter().all(|s| *s)
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

    /// Takes over an event: new ones are routed, unfinished ones resumed, finished ones only
    /// wait for their retention.
    async fn adopt(&mut self, key: EventKey, uid: String, de: DocumentEvent) {
        self.forget(&key);
        let mut status = de.status.clone().unwrap_or_default();
        let cancel = CancellationToken::new();
        let finished = matches!(
            status.phase,
            Some(EventPhase::Delivered | EventPhase::Failed | EventPhase::NoSubscribers)
        );
        if !finished {
            if status.deliveries.is_empty() {
                status.deliveries = self.route(&key, &uid, &de);
            }
            let body = Arc::new(EventBody::from(&de));
            let table = self.routes.snapshot();
            for target in status.deliveries.iter().filter(|t| !is_final(t.state)) {
                let webhook = WebhookKey {
                    namespace: key.namespace.clone(),
                    name: target.webhook.as_str().into(),
                };
                // The Webhook the target was routed to is the one whose uid gives its delivery
                // id; a namesake created since is not (the engine then fails the target).
                let webhook_uid: Arc<str> = table
                    .get(&webhook)
                    .filter(|route| delivery_id(&uid, &route.uid) == target.id)
                    .map_or_else(|| Arc::from(""), |route| Arc::from(route.uid.as_str()));
                let delivery = Delivery {
                    webhook,
                    webhook_uid,
                    id: target.id.clone(),
                    event: body.clone(),
                    source: key.name.to_string(),
                    manual: false,
                    timeout_cap: None,
                };
                let progress = EventProgress {
                    tx: self.tasks.progress.clone(),
                    key: key.clone(),
                    uid: uid.clone(),
                };
                self.tasks.metrics.pending_deliveries.inc();
                let (task, abandon) = (
                    deliver(
                        self.tasks.clone(),
                        progress,
                        delivery,
                        target.clone(),
                        cancel.clone(),
                    ),
                    self.abandon.clone(),
                );
                self.deliveries.spawn(async move {
                    tokio::select! {
                        _ = task => {}
                        _ = abandon.cancelled() => {}
                    }
                });
            }
            let changed = set_phase(&mut status);
            if changed || de.status.is_none() {
                self.write(&key, &uid, &status).await;
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
            },
        );
    }

    /// Fixes the event's targets: every Webhook of its namespace that takes its type.
    fn route(&self, key: &EventKey, uid: &str, de: &DocumentEvent) -> Vec<TargetDelivery> {
        let table = self.routes.snapshot();
        let targets: Vec<TargetDelivery> = table
            .lookup(&key.namespace, de.spec.type_)
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

    async fn on_progress(&mut self, Progress { key, uid, target }: Progress) {
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
        let status = tracked.status.clone();
        self.write(&key, &uid, &status).await;
        if status.completion_time.is_some() {
            let cleanup = self.schedule_cleanup(&key, &uid, &status);
            if let Some(tracked) = self.tracked.get_mut(&key) {
                tracked.cleanup = cleanup;
            }
        }
    }

    async fn write(&self, key: &EventKey, uid: &str, status: &DocumentEventStatus) {
        let update = Update::EventStatus {
            key: key.clone(),
            uid: uid.to_owned(),
            status: status.clone(),
        };
        self.status.send(update).await;
    }

    fn schedule_cleanup(
        &mut self,
        key: &EventKey,
        uid: &str,
        status: &DocumentEventStatus,
    ) -> Option<tokio_util::time::delay_queue::Key> {
        let completed = status.completion_time.as_ref()?;
        let retention = match status.phase {
            Some(EventPhase::Failed) => self.retention.failed,
            _ => self.retention.delivered,
        }?;
        if let Some(old) = self.tracked.get_mut(key).and_then(|t| t.cleanup.take()) {
            self.cleanup.try_remove(&old);
        }
        let age = Timestamp::now().duration_since(completed.0).unsigned_abs();
        let wait = retention.saturating_sub(age);
        Some(self.cleanup.insert((key.clone(), uid.to_owned()), wait))
    }

    fn forget(&mut self, key: &EventKey) {
        if let Some(tracked) = self.tracked.remove(key) {
            tracked.cancel.cancel();
            if let Some(cleanup) = tracked.cleanup {
                self.cleanup.try_remove(&cleanup);
            }
        }
    }

    /// Deletes a finished event whose retention ran out (only the very object: uid precondition).
    async fn delete(&mut self, key: EventKey, uid: String) {
        let api: Api<DocumentEvent> = Api::namespaced(self.client.clone(), &key.namespace);
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        // Bounded, so that a slow API server cannot stall the controller loop for long.
        let deleted = tokio::time::timeout(DELETE_TIMEOUT, api.delete(&key.name, &params))
            .await
            .unwrap_or_else(|_| Err(kube::Error::Service("delete timed out".into())));
        match deleted {
            Ok(_) => tracing::debug!(event = %key, "retention over: deleted"),
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(error) => {
                tracing::warn!(event = %key, %error, "deleting a finished DocumentEvent failed; retrying in a minute");
                let uid = self.tracked.get(&key).map(|t| t.uid.clone());
                if let Some(uid) = uid {
                    let retry = self
                        .cleanup
                        .insert((key.clone(), uid), Duration::from_secs(60));
                    if let Some(t) = self.tracked.get_mut(&key) {
                        t.cleanup = Some(retry);
                    }
                }
                return;
            }
        }
        if let Some(t) = self.tracked.remove(&key) {
            t.cancel.cancel();
        }
    }
}

/// Derives `phase` and `completionTime` from the targets; returns whether the phase changed.
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
    if finished && status.completion_time.is_none() {
        status.completion_time = Some(Time(Timestamp::now()));
    }
    status.phase.replace(phase) != Some(phase)
}

/// Delivers one event to one Webhook until it succeeds or fails for good, reporting each step
/// to the controller.
async fn deliver(
    ctx: Arc<TaskContext>,
    progress: EventProgress,
    delivery: Delivery,
    mut target: TargetDelivery,
    cancel: CancellationToken,
) {
    delivery::deliver(
        &ctx.dispatcher,
        &delivery,
        &mut target,
        ctx.max_hold,
        &cancel,
        &progress,
    )
    .await;
    ctx.metrics.pending_deliveries.dec();
}

/// A delivery's progress goes to the controller, which owns the event's status.
struct EventProgress {
    tx: mpsc::Sender<Progress>,
    key: EventKey,
    uid: String,
}

impl Report for EventProgress {
    async fn report(&self, target: &TargetDelivery) {
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

fn event_key(de: &DocumentEvent) -> EventKey {
    EventKey {
        namespace: de.namespace().unwrap_or_default().as_str().into(),
        name: de.name_any().as_str().into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
