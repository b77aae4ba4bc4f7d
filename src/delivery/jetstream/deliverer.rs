//! The deliverer: takes work items from a lane and delivers them, keeping in hand only what
//! is about to be attempted (see "Fairness" in the module documentation).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI32, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use async_nats::jetstream::{self, AckKind, Context, consumer::pull};
use futures::StreamExt;
use tokio::{sync::oneshot, task::JoinSet};
use tokio_util::sync::CancellationToken;

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};

use crate::{
    crd::{TargetDelivery, TargetState},
    delivery::{
        Delivery, Dispatcher, Keeper, KeyedLimits, Parked, RouteCheck, Slots, Ticket, Wait, drive,
        reserve_until,
    },
    metrics::ParkLabels,
    routing::Route,
};

use super::{Bus, BusError, DELIVERER, SERIAL, Subjects};
use super::{
    messages::{WorkItem, delivery_of, work_item_headers},
    park::{self, PARK_MIN, Park, unix_millis},
    release::Release,
    router::work_lane,
};

/// A held delivery kept in hand checks its Webhook again at least this often (it wakes at once
/// when the Webhook changes).
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// A rate-limited work item whose turn is further off than this is parked, not kept in hand.
pub const TURN_WAIT_IN_HAND: Duration = Duration::from_secs(5);

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
    subjects: Subjects,
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
            subjects: self.subjects.clone(),
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
/// A namespace whose deliveries flow (a fan-out to 10,000 healthy Webhooks) keeps up to half
/// of `max_ack_pending` in hand while they wait for their slots: parking them would cost a
/// round trip through the stream and at least a second. A namespace whose items in hand do
/// not move (endpoints that never answer, or take long) is *congested*: an item that waited
/// [`SLOT_WAIT_IN_HAND`] for slots while fewer attempts of its namespace finished than it has
/// items in hand is parked, and for [`CONGESTION_MEMORY`] the namespace keeps no more than
/// twice its slots in hand on this replica. So an item waits in hand only while everything its
/// namespace has in hand turns over within each such wait. Every replica counts its own, so a
/// share of the consumer is taken once per replica: bounded by the slots, it holds across
/// replicas while replicas × twice the slots stays below `max_ack_pending` (39 replicas at the
/// defaults).
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

/// An item that waits this long for its delivery slots while they do not turn over is parked,
/// and its namespace is congested (see [`InHandLimits`]).
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

/// Namespaces whose finished attempts are counted before those nobody holds are forgotten.
const FINISHED_COUNTERS_KEPT: usize = 1024;

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
        subjects,
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
        Arc::new(Release::new(
            router,
            consumer.clone(),
            stream.clone(),
            dispatcher.clone(),
        ))
    });
    if let Some(release) = &release {
        tokio::spawn(release.clone().run(stop.clone()));
    }
    let deliverer = Arc::new(Deliverer {
        context,
        stream,
        subjects,
        release,
        lane,
        dispatcher,
        max_hold,
        in_hand: KeyedLimits::new(limits.per_namespace),
        congested_in_hand: KeyedLimits::new(limits.congested_per_namespace),
        congested: Mutex::default(),
        finished: Mutex::default(),
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

struct Deliverer {
    context: Context,
    /// Where superseded copies of work items are deleted from (see [`park::forget_copy`]).
    stream: jetstream::stream::Stream,
    subjects: Subjects,
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
    /// Attempts finished per namespace by this replica's work items, counted by those in hand.
    finished: Mutex<HashMap<Arc<str>, Arc<AtomicU64>>>,
    /// Held messages in hand per namespace on this replica.
    held: KeyedLimits<Arc<str>>,
    stop: CancellationToken,
}

impl Deliverer {
    /// Parks the work item (see [`park::park`]).
    async fn park(&self, message: &jetstream::Message, sequence: u64, item: &WorkItem, park: Park) {
        let reason = park.reason();
        self.dispatcher
            .metrics()
            .jetstream_parked
            .get_or_create(&ParkLabels { reason })
            .inc();
        park::park(
            &self.context,
            &self.stream,
            &self.subjects,
            &self.stop,
            message,
            sequence,
            item,
            park,
        )
        .await;
    }

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

    /// Work items of `namespace` this replica has in hand.
    fn in_hand_of(&self, namespace: &Arc<str>) -> u64 {
        let places = self.in_hand.get(namespace, 0, |_| false);
        (self.in_hand.permits() - places.available_permits()) as u64
    }

    /// The counter of attempts finished in `namespace`, shared by its items in hand. Counters
    /// nobody holds go once there are many (a namespace counts only while it has items in hand).
    fn finished_in(&self, namespace: &Arc<str>) -> Arc<AtomicU64> {
        let mut finished = self.finished.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(counter) = finished.get(namespace) {
            return counter.clone();
        }
        if finished.len() >= FINISHED_COUNTERS_KEPT {
            finished.retain(|_, counter| Arc::strong_count(counter) > 1);
        }
        finished.entry(namespace.clone()).or_default().clone()
    }

    /// On the serial lane: an ordered work item waits for its event's release from here (see
    /// [`Release`]); every message received counts as pulled once registered.
    fn register(&self, message: &jetstream::Message) -> Option<oneshot::Receiver<Option<Ticket>>> {
        let release = self.release.as_ref()?;
        let sequence = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        let turn = delivery_of(&self.subjects, message).and_then(|item| {
            let route = self.dispatcher.route_of(&item.delivery)?;
            route.ordering.as_ref()?;
            Some(release.wait_for(item.event_sequence?, item.delivery))
        });
        // After the registration: the gate trusts that what was pulled is registered.
        release.pulled(sequence);
        turn
    }

    /// Delivers one work item: parked at once when this replica cannot take it (its view is
    /// stale, its namespace has no place in hand), moved when its Webhook is the serial lane's,
    /// and otherwise driven by the engine with a [`WorkItemKeeper`] until it is acked, parked
    /// again, or left to be redelivered (stopping).
    async fn deliver_one(
        &self,
        message: jetstream::Message,
        turn: Option<oneshot::Receiver<Option<Ticket>>>,
    ) {
        let Some(mut item) = delivery_of(&self.subjects, &message) else {
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
        // Ordered deliveries are delivered in hand, start to end (retries, holds): parking one
        // would put it back behind later events of its key.
        let ordered = self.lane == Lane::Serial
            && (turn.is_some()
                || self
                    .dispatcher
                    .route_of(&item.delivery)
                    .is_some_and(|r| r.ordering.is_some()));
        let check = self.dispatcher.check(&item.delivery);
        // A held item whose Webhook can take it again starts its recheck backoff over: if its
        // namespace is busy now, it comes back in about a second, not after the hold's backoff.
        if item.held_since.is_some() && matches!(check, RouteCheck::Deliver(_)) {
            item.held_since = None;
            item.parked = 0;
        }
        if let RouteCheck::Deliver(route) = &check
            && self.lane == Lane::Shared
            && work_lane(route) == Lane::Serial
        {
            let attempts = item.attempts_before + delivered - 1;
            return self
                .move_to_serial(&message, sequence, attempts, &item)
                .await;
        }
        let mut places = Vec::new();
        if !ordered {
            let namespace = &item.delivery.webhook.namespace;
            let Ok(place) = self
                .in_hand
                .get(namespace, 0, |_| false)
                .try_acquire_owned()
            else {
                return self.park(&message, sequence, &item, Park::Busy).await;
            };
            places.push(place);
            if self.is_congested(namespace) {
                let congested = self.congested_in_hand.get(namespace, 0, |_| false);
                let Ok(place) = congested.try_acquire_owned() else {
                    return self.park(&message, sequence, &item, Park::Busy).await;
                };
                places.push(place);
            }
        }
        let mut target = crate::delivery::new_target(&item.delivery);
        // Hand-outs of this message beyond the first that made no attempt (a replica stopped
        // or crashed in between) count as attempts: at most one too many, never one too few.
        target.attempts = (item.attempts_before + delivered - 1) as i32;
        target.held_since = item
            .held_since
            .and_then(|ms| Timestamp::from_millisecond(ms as i64).ok().map(Time));
        let keeper = WorkItemKeeper {
            deliverer: self,
            message: &message,
            sequence,
            item: &item,
            ordered,
            held_place: Mutex::default(),
            attempts: AtomicI32::new(target.attempts),
            finished: self.finished_in(&item.delivery.webhook.namespace),
        };
        // Kept in hand while waiting, holding or sending, so that it is not redelivered to
        // another replica meanwhile.
        keep_alive(&message, async {
            let mut ticket = match turn {
                Some(rx) => tokio::select! {
                    ticket = rx => ticket.ok().flatten(),
                    _ = self.stop.cancelled() => return,
                },
                // Routed before the Webhook was ordered (moved here): in the order received.
                None if ordered => self.dispatcher.ticket(&item.delivery, 0),
                None => None,
            };
            let delivery = &item.delivery;
            let max_hold = self.max_hold;
            drive(
                &self.dispatcher,
                delivery,
                &mut target,
                max_hold,
                &keeper,
                ticket.as_mut(),
            )
            .await;
        })
        .await;
        drop(places);
    }

    /// Publishes the work item to its Webhook's serial subject (a rate limit was added since it
    /// was routed), then acks this message; nak'd for another try if the stream does not take
    /// it.
    async fn move_to_serial(
        &self,
        message: &jetstream::Message,
        sequence: u64,
        attempts: u32,
        item: &WorkItem,
    ) {
        let delivery = &item.delivery;
        let headers = work_item_headers(
            item,
            &format!("{}/serial/{sequence}", delivery.id),
            attempts,
            item.parked,
            item.held_since,
        );
        let subject = self.subjects.work(
            Lane::Serial,
            &delivery.webhook.namespace,
            &delivery.webhook.name,
        );
        let stored = park::store_copy(&self.context, &subject, headers, message).await;
        let why = "could not move a work item to its serial subject; it is redelivered";
        park::settle_original(&self.stream, message, &delivery.id, stored, why, PARK_MIN).await;
    }
}

/// Runs `work` while telling the server every [`PROGRESS_EVERY`] that `message` is still
/// being worked on, so that it is not handed to another replica meanwhile.
async fn keep_alive<T>(message: &jetstream::Message, work: impl Future<Output = T>) -> T {
    tokio::pin!(work);
    let mut progress = tokio::time::interval(PROGRESS_EVERY);
    progress.tick().await;
    loop {
        tokio::select! {
            done = &mut work => return done,
            _ = progress.tick() => {
                let _ = message.ack_with(AckKind::Progress).await;
            }
        }
    }
}

/// How a work item in hand is kept: its progress travels in the headers of the message that
/// replaces it when parked; it waits in hand only for what is about to happen (slots, a hold
/// while its namespace has a held place, an ordered delivery's whole course), and is acked
/// once final.
struct WorkItemKeeper<'a> {
    deliverer: &'a Deliverer,
    message: &'a jetstream::Message,
    sequence: u64,
    item: &'a WorkItem,
    /// Delivered in hand start to end (the serial lane's ordered items).
    ordered: bool,
    /// A held place of its namespace, while it is held in hand.
    held_place: Mutex<Option<tokio::sync::OwnedSemaphorePermit>>,
    /// Attempts spent as last stored: one more is an attempt finished.
    attempts: AtomicI32,
    /// Attempts finished in its namespace on this replica (see [`InHandLimits`]).
    finished: Arc<AtomicU64>,
}

impl WorkItemKeeper<'_> {
    async fn park(&self, park: Park) -> Parked {
        let (message, item) = (self.message, self.item);
        self.deliverer
            .park(message, self.sequence, item, park)
            .await;
        Parked::Elsewhere
    }
}

impl Keeper for WorkItemKeeper<'_> {
    fn stopped(&self) -> &CancellationToken {
        &self.deliverer.stop
    }

    async fn park(&self, wait: &Wait, target: &TargetDelivery) -> Parked {
        if self.ordered {
            return Parked::Here;
        }
        let attempts = target.attempts.max(0) as u32;
        match wait {
            Wait::Retry { after } => {
                let after = *after;
                self.park(Park::Retry { attempts, after }).await
            }
            Wait::Held { .. } => {
                let namespace = &self.item.delivery.webhook.namespace;
                let in_hand = {
                    let mut place = self.held_place.lock().unwrap_or_else(|e| e.into_inner());
                    if place.is_none() {
                        let places = self.deliverer.held.get(namespace, 0, |_| false);
                        *place = places.try_acquire_owned().ok();
                    }
                    place.is_some()
                };
                if in_hand {
                    return Parked::Here;
                }
                let since = target.held_since.as_ref().map_or_else(
                    || unix_millis(SystemTime::now()),
                    |t| t.0.as_millisecond() as u64,
                );
                self.park(Park::Held { since }).await
            }
            Wait::NotHere { why } => {
                let delivery = &self.item.delivery;
                tracing::debug!(delivery = %delivery.id, webhook = %delivery.webhook.name, %why, "JetStream deliverer: not deliverable here yet");
                self.park(Park::Elsewhere).await
            }
            Wait::Busy => self.park(Park::Busy).await,
            Wait::RateTurn { after } => self.park(Park::Turn { after: *after }).await,
            Wait::OtherQueue => {
                let (message, item) = (self.message, self.item);
                self.deliverer
                    .move_to_serial(message, self.sequence, attempts, item)
                    .await;
                Parked::Elsewhere
            }
            Wait::KeyTurn => Parked::Here,
        }
    }

    async fn store(&self, target: &TargetDelivery) {
        if self.attempts.fetch_max(target.attempts, Ordering::Relaxed) < target.attempts {
            self.finished.fetch_add(1, Ordering::Relaxed);
        }
        if target.state != TargetState::Held {
            // No longer held: its held place goes back to the namespace.
            self.held_place
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
        }
    }

    async fn ack(&self, target: &TargetDelivery) {
        if target.state == TargetState::Failed {
            let delivery = &self.item.delivery;
            let why = target.error.as_deref().unwrap_or_default();
            tracing::info!(delivery = %delivery.id, webhook = %delivery.webhook.name, %why, "JetStream delivery failed");
        }
        if let Err(e) = self.message.ack().await {
            tracing::warn!(delivery = %self.item.delivery.id, error = %e, "JetStream deliverer: could not settle a work item; it is redelivered");
            return;
        }
        park::forget_copy(&self.deliverer.stream, self.message).await;
    }

    async fn reserve(&self, dispatcher: &Dispatcher, delivery: &Delivery) -> Result<Slots, Wait> {
        let stop = &self.deliverer.stop;
        if self.ordered {
            return reserve_until(dispatcher, delivery, stop).await;
        }
        match self.deliverer.lane {
            // A turn far off is not waited for in hand (the check and the turn are one step:
            // items taken at once cannot all see the bucket empty).
            Lane::Serial => tokio::select! {
                biased;
                _ = stop.cancelled() => Err(Wait::Busy),
                slots = dispatcher.reserve_within_turn(delivery, Some(TURN_WAIT_IN_HAND)) => {
                    slots.map_err(|after| Wait::RateTurn { after })
                }
            },
            // A place in hand waits while what its namespace has in hand turns over (a large
            // fan-out flowing), not on stuck or slow endpoints.
            Lane::Shared => {
                let slots = dispatcher.reserve_within_turn(delivery, None);
                tokio::pin!(slots);
                loop {
                    let before = self.finished.load(Ordering::Relaxed);
                    tokio::select! {
                        biased;
                        _ = stop.cancelled() => return Err(Wait::Busy),
                        slots = &mut slots => {
                            return slots.map_err(|after| Wait::RateTurn { after });
                        }
                        _ = tokio::time::sleep(SLOT_WAIT_IN_HAND) => {
                            let finished = self.finished.load(Ordering::Relaxed) - before;
                            if finished < self.deliverer.in_hand_of(&delivery.webhook.namespace) {
                                self.deliverer.mark_congested(&delivery.webhook.namespace);
                                return Err(Wait::Busy);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Deliveries of a Webhook with a rate limit or an ordering are the leader's, on the
    /// serial lane: the shared lane moves them there.
    fn accepts(&self, route: &Route) -> bool {
        self.deliverer.lane == Lane::Serial || work_lane(route) != Lane::Serial
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
