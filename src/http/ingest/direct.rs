//! Direct ingest: admission to a bounded queue (global, and a share per namespace), the window
//! of recent idempotency keys, and the dispatch of admitted deliveries.

use crate::http::error::Problem;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Json, http::StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::{
    DIRECT_KEY_LIFETIME, DIRECT_KEY_NAMESPACES, DIRECT_KEY_WINDOW, DIRECT_KEYS_PER_NAMESPACE,
    IngestEvent, fingerprint, idempotency_conflict,
};
use crate::{
    delivery::{
        Delivery,
        direct::{DirectLines, Queued},
    },
    health::Readiness,
    http::{ApiError, ApiState},
    metrics::Metrics,
    routing::{EventFacts, FilterInput, Route},
    wire::EventBody,
};

/// The longest a direct delivery may wait in its Webhook's line before new events for that
/// Webhook wait for room, and the longest they wait before 429: past it the line does not
/// drain in time, and accepting more would only turn the excess into latency before refusing
/// anyway.
pub const DEFAULT_MAX_QUEUE_DELAY: Duration = Duration::from_millis(5);

/// The event id of a keyed direct event (delivery ids derive from it): deterministic, so that a
/// repeat outside the in-memory window still carries the same delivery ids.
fn keyed_direct_event_id(namespace: &str, key: &str) -> String {
    let digest = Sha256::new()
        .chain_update(b"direct\0")
        .chain_update(namespace)
        .chain_update(b"\0")
        .chain_update(key)
        .finalize();
    hex::encode(&digest[..16])
}

/// Direct-mode admission: the queue (global and per namespace) and the window of recent
/// idempotency keys.
pub struct DirectIngest {
    /// Direct deliveries not finished yet, all namespaces; full means 429.
    queue: Arc<Semaphore>,
    capacity: usize,
    /// The most one namespace may hold, so that one tenant (say with a paused Webhook) cannot
    /// take the whole queue.
    per_namespace: usize,
    /// Deliveries held per namespace; a namespace holding none has no entry.
    in_use: Arc<Mutex<HashMap<Arc<str>, usize>>>,
    /// (namespace, key) -> what was accepted under it.
    recent: RecentKeys,
    /// Admitted deliveries waiting for a worker, per Webhook.
    lines: Arc<DirectLines>,
    /// Refuse events for a Webhook whose oldest waiting delivery has waited longer than this.
    max_queue_delay: Duration,
    /// Where `spec.filter` evaluations are counted.
    metrics: Metrics,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct RecentEvent {
    fingerprint: [u8; 32],
}

/// What a direct request may dispatch: its deliveries and the queue space they hold until the
/// last of them ends.
pub struct Admission {
    pub deliveries: Vec<Delivery>,
    pub permit: DirectPermit,
    pub accepted: usize,
    /// Indices of events whose key was seen with the same content: not dispatched again.
    pub duplicates: Vec<usize>,
    pub keyed: bool,
}

/// Queue space held by one direct request: given back when dropped.
pub struct DirectPermit {
    _global: OwnedSemaphorePermit,
    _share: NamespaceShare,
    _used: QueuePlaces,
}

/// Counts the places of one request in `hookrelay_direct_queue_used` while they are held, and
/// wakes a request waiting for room when they come back (dropped after the permits).
struct QueuePlaces {
    gauge: prometheus_client::metrics::gauge::Gauge,
    count: i64,
    lines: Arc<DirectLines>,
}

impl QueuePlaces {
    fn take(metrics: &Metrics, count: usize, lines: &Arc<DirectLines>) -> Self {
        let count = count as i64;
        metrics.direct_queue_used.inc_by(count);
        Self {
            gauge: metrics.direct_queue_used.clone(),
            count,
            lines: lines.clone(),
        }
    }
}

impl Drop for QueuePlaces {
    fn drop(&mut self) {
        self.gauge.dec_by(self.count);
        self.lines.moved_on();
    }
}

struct NamespaceShare {
    in_use: Arc<Mutex<HashMap<Arc<str>, usize>>>,
    namespace: Arc<str>,
    count: usize,
}

impl Drop for NamespaceShare {
    fn drop(&mut self) {
        if self.count == 0 {
            return;
        }
        let mut in_use = self.in_use.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = in_use.get_mut(&self.namespace) {
            *held = held.saturating_sub(self.count);
            if *held == 0 {
                // Idle namespaces leave the map, so that it stays as small as the active ones.
                in_use.remove(&self.namespace);
            }
        }
    }
}

impl DirectIngest {
    pub fn new(capacity: usize, per_namespace: usize) -> Self {
        Self {
            queue: Arc::new(Semaphore::new(capacity)),
            capacity,
            per_namespace,
            in_use: Arc::default(),
            recent: RecentKeys::default(),
            lines: Arc::default(),
            max_queue_delay: DEFAULT_MAX_QUEUE_DELAY,
            metrics: Metrics::default(),
        }
    }

    /// Count lost direct deliveries, and the queue's size and use, in the operator's metrics.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        metrics.direct_queue_capacity.set(self.capacity as i64);
        self.metrics = metrics;
        self
    }

    /// Refuse events for a Webhook whose oldest waiting delivery has waited longer than
    /// `delay` (`--direct-max-queue-delay`).
    pub fn with_max_queue_delay(mut self, delay: Duration) -> Self {
        self.max_queue_delay = delay;
        self
    }

    /// Direct delivery's part in stopping the operator: once `shutdown` fires, no attempt starts
    /// any more and waits end; attempts being sent get `grace` to finish, then are abandoned.
    /// Completes when every worker and retry task has ended, so that the status writer,
    /// stopped after it, writes what their attempts recorded. Deliveries not finished by then
    /// are lost (direct mode keeps them in memory only): counted in the log and in
    /// `hookrelay_direct_deliveries_lost_total`.
    pub fn stop_on(
        &self,
        shutdown: CancellationToken,
        grace: Duration,
    ) -> impl Future<Output = ()> + Send + 'static {
        let lines = self.lines.clone();
        let counter = self.metrics.direct_deliveries_lost.clone();
        async move {
            shutdown.cancelled().await;
            let lost = lines.drain(grace).await;
            counter.inc_by(lost.total() as u64);
            if lost.total() > 0 {
                tracing::warn!(
                    lost = lost.total(),
                    in_line = lost.in_line,
                    given_up = lost.given_up,
                    abandoned = lost.abandoned,
                    "direct deliveries not finished at shutdown are lost: direct mode keeps them in memory only (at-most-once across a restart)"
                );
            } else {
                tracing::info!("direct deliveries stopped; none was lost");
            }
        }
    }

    /// Deliveries held by `namespace` now.
    pub fn held_by(&self, namespace: &str) -> usize {
        let in_use = self.in_use.lock().unwrap_or_else(|e| e.into_inner());
        in_use.get(namespace).copied().unwrap_or(0)
    }

    /// Namespaces holding deliveries now.
    pub fn namespaces_holding(&self) -> usize {
        self.in_use.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn take_share(&self, namespace: &str, count: usize) -> Option<NamespaceShare> {
        let namespace: Arc<str> = namespace.into();
        if count > 0 {
            let mut in_use = self.in_use.lock().unwrap_or_else(|e| e.into_inner());
            let held = in_use.entry(namespace.clone()).or_insert(0);
            if *held + count > self.per_namespace {
                if *held == 0 {
                    in_use.remove(&namespace);
                }
                return None;
            }
            *held += count;
        }
        Some(NamespaceShare {
            in_use: self.in_use.clone(),
            namespace,
            count,
        })
    }

    /// The places in the queue a request of `events` new events making `needed` deliveries
    /// holds. One event is never too large: an event fanning out to more Webhooks than the
    /// namespace's share (or the queue) holds that whole share, so it is admitted once the
    /// namespace holds nothing else, and other namespaces keep the rest of the queue. Its
    /// deliveries share one body, so what it costs is bounded by the namespace's Webhooks.
    /// A request of several events that can never fit is 413: it must be split.
    fn places_for(&self, needed: usize, events: usize) -> Result<usize, ApiError> {
        let most = self.per_namespace.min(self.capacity);
        if needed <= most {
            return Ok(needed);
        }
        if events <= 1 {
            return Ok(most);
        }
        let (limit, what) = if needed > self.capacity {
            (self.capacity, "the direct queue holds (--direct-queue)")
        } else {
            (
                self.per_namespace,
                "one namespace may hold in the direct queue (--direct-queue-per-namespace)",
            )
        };
        Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Problem::TooManyDeliveries,
            format!(
                "this request of {events} events makes {needed} deliveries, more than {what} ({limit}); send fewer events per request: a request of one event is admitted whatever its fan-out"
            ),
        ))
    }

    /// Checks readiness, idempotency keys and capacity (before building anything), then
    /// builds the deliveries of `events`, each with the routes that take it. Lack of room is
    /// answered at once; see [`DirectIngest::admit_within`] for waiting for it.
    pub fn admit(
        &self,
        readiness: &Readiness,
        namespace: &str,
        mut events: Vec<RoutedEvent>,
    ) -> Result<Admission, ApiError> {
        self.try_admit(readiness, namespace, &mut events)
    }

    /// [`DirectIngest::admit`], but a request refused for lack of room (the queue or the
    /// namespace's share full, a line not draining in time) waits up to `wait` for deliveries
    /// to move on and tries again, before it is answered 429. With keep-alive clients this is
    /// backpressure: a client sending faster than the Webhooks take is slowed to their pace
    /// instead of refused, and a refusal (which costs as much to answer as an acceptance) is
    /// left for load that stays too high for `wait`.
    pub async fn admit_within(
        &self,
        readiness: &Readiness,
        namespace: &str,
        mut events: Vec<RoutedEvent>,
        wait: Duration,
    ) -> Result<Admission, ApiError> {
        let waits = |reply: &Result<Admission, ApiError>| {
            matches!(reply, Err(refused) if matches!(
                refused.code,
                Problem::QueueSlow | Problem::QueueFull | Problem::NamespaceQueueFull
            ))
        };
        // Most requests find room: they register no waiter.
        let first = self.try_admit(readiness, namespace, &mut events);
        if !waits(&first) {
            return first;
        }
        let deadline = tokio::time::Instant::now() + wait;
        while tokio::time::Instant::now() < deadline {
            // Registered before the try, so that a delivery moving on in between wakes it.
            let moved = self.lines.moved();
            let mut moved = std::pin::pin!(moved);
            moved.as_mut().enable();
            let reply = self.try_admit(readiness, namespace, &mut events);
            if !waits(&reply) {
                return reply;
            }
            let _ = tokio::time::timeout_at(deadline, moved).await;
        }
        // Past the deadline, one last try.
        self.try_admit(readiness, namespace, &mut events)
    }

    /// One try at admission. `events` is taken only when admitted.
    fn try_admit(
        &self,
        readiness: &Readiness,
        namespace: &str,
        events: &mut Vec<RoutedEvent>,
    ) -> Result<Admission, ApiError> {
        if !readiness.is_ready() {
            // Before the first full list the routing table is incomplete: routing now would
            // silently drop events for Webhooks not listed yet.
            let mut error = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Problem::NotReady,
                format!(
                    "hookrelay is still loading its Webhooks (waiting for: {}); retry in a second",
                    readiness.pending().join(", ")
                ),
            );
            error.retry_after = Some(1);
            return Err(error);
        }
        let accepted = events.len();
        let keyed = events.iter().any(|r| r.event.key.is_some());
        let ns: Arc<str> = namespace.into();
        // Events whose key was accepted with the same content: not dispatched again.
        let mut repeats = Vec::new();
        for (index, routed) in events.iter().enumerate() {
            if let Some(key) = &routed.event.key {
                match self.recent.of(&ns).get(key.as_str()) {
                    Some(r) if r.fingerprint == routed.fingerprint => repeats.push(index),
                    Some(_) => return Err(idempotency_conflict(key)),
                    None => {}
                }
            }
        }
        let is_new = |index: &usize| repeats.binary_search(index).is_err();

        // Capacity first: count the deliveries, build them only once there is room. The same
        // pass finds a line that does not drain in time.
        let now = Instant::now();
        let mut needed = 0;
        let mut slow = None;
        for (_, routed) in events.iter().enumerate().filter(|(i, _)| is_new(i)) {
            for route in &routed.targets {
                needed += 1;
                // A rate-limited line is meant to wait: it is bounded by the queue, not by
                // --direct-max-queue-delay.
                if slow.is_none() && route.delivery.rate_limit.is_none() {
                    let waited = self.lines.oldest_wait(&route.key, now);
                    if waited > self.max_queue_delay {
                        slow = Some((route.key.name.clone(), waited));
                    }
                }
            }
        }
        let places = self.places_for(needed, accepted - repeats.len())?;
        // A line that does not drain in time: refuse now, while latency is still low, rather
        // than fill the queue and refuse seconds later.
        if let Some((webhook, waited)) = slow {
            return Err(queue_full(
                Problem::QueueSlow,
                format!(
                    "deliveries to webhook {webhook} wait {} ms in line, more than {} ms (--direct-max-queue-delay): it cannot take events this fast; retry later or use durable ingest",
                    waited.as_millis(),
                    self.max_queue_delay.as_millis()
                ),
            ));
        }
        let permits = u32::try_from(places).unwrap_or(u32::MAX);
        let Ok(global) = self.queue.clone().try_acquire_many_owned(permits) else {
            return Err(queue_full(
                Problem::QueueFull,
                format!(
                    "the direct delivery queue is full ({} deliveries in flight, all namespaces); retry later or use durable ingest",
                    self.capacity
                ),
            ));
        };
        let Some(share) = self.take_share(namespace, places) else {
            let message = if places < needed {
                format!(
                    "this event fans out to {needed} Webhooks, more than namespace {namespace}'s share of the direct queue ({} deliveries, --direct-queue-per-namespace): it is admitted once the namespace's other deliveries have ended; retry later, or use jetstream or durable ingest for large fan-outs",
                    self.per_namespace
                )
            } else {
                format!(
                    "namespace {namespace} holds its whole share of the direct queue ({} deliveries, --direct-queue-per-namespace), for example for a paused Webhook; retry later or use durable ingest",
                    self.per_namespace
                )
            };
            return Err(queue_full(Problem::NamespaceQueueFull, message));
        };

        // Record the keys now that the events will be dispatched. A concurrent request with
        // the same key may have come first.
        // Looked up only for keyed requests: most carry no key, and the window's lookup is
        // not free.
        let recent = keyed.then(|| self.recent.of(&ns));
        let mut recorded = Vec::new();
        let mut to_send = Vec::new();
        let mut duplicates = Vec::new();
        let new_events = std::mem::take(events)
            .into_iter()
            .enumerate()
            .filter(|(i, _)| is_new(i));
        for (index, routed) in new_events {
            let RoutedEvent {
                event: e,
                fingerprint,
                targets,
            } = routed;
            if let (Some(key), Some(recent)) = (&e.key, &recent) {
                let entry = recent
                    .entry(Arc::from(key.as_str()))
                    .or_insert_with(|| RecentEvent { fingerprint });
                if !entry.is_fresh() {
                    if entry.value().fingerprint == fingerprint {
                        duplicates.push(index);
                        continue;
                    }
                    for k in recorded {
                        recent.invalidate(&k);
                    }
                    return Err(idempotency_conflict(key));
                }
                recorded.push(entry.key().clone());
            }
            to_send.push((e, targets));
        }
        duplicates.extend_from_slice(&repeats);
        duplicates.sort_unstable();

        let mut deliveries = Vec::with_capacity(needed);
        for (e, targets) in to_send {
            let timestamp = e.timestamp.as_deref().unwrap_or_default();
            let body = Arc::new(EventBody::new(e.event, timestamp, &e.data));
            let event_id = match &e.key {
                Some(key) => keyed_direct_event_id(namespace, key),
                None => hex::encode(rand::random::<[u8; 16]>()),
            };
            let span = crate::telemetry::route_span(namespace, e.event, &event_id);
            let trace: Option<Arc<str>> = crate::telemetry::traceparent(&span).map(Arc::from);
            deliveries.extend(targets.iter().map(|route| Delivery {
                webhook: route.key.clone(),
                webhook_uid: route.uid.as_str().into(),
                routed_version: 0,
                id: crate::delivery::delivery_id(&event_id, &route.uid),
                event: body.clone(),
                source: crate::delivery::Source::Ingest,
                manual: false,
                timeout_cap: None,
                trace: trace.clone(),
            }));
        }
        Ok(Admission {
            deliveries,
            permit: DirectPermit {
                _global: global,
                _share: share,
                _used: QueuePlaces::take(&self.metrics, places, &self.lines),
            },
            accepted,
            duplicates,
            keyed,
        })
    }
}

fn queue_full(code: Problem, message: String) -> ApiError {
    let mut error = ApiError::new(StatusCode::TOO_MANY_REQUESTS, code, message);
    error.retry_after = Some(1);
    error
}

/// The window of recent idempotency keys: a bounded cache per namespace (and a bounded number
/// of namespaces, the least recently used forgotten first), so that one tenant sending ever-new
/// keys pushes out only its own.
struct RecentKeys {
    namespaces: moka::sync::Cache<Arc<str>, moka::sync::Cache<Arc<str>, RecentEvent>>,
}

impl Default for RecentKeys {
    fn default() -> Self {
        Self {
            namespaces: moka::sync::Cache::builder()
                .max_capacity(DIRECT_KEY_NAMESPACES)
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .time_to_idle(DIRECT_KEY_WINDOW)
                .build(),
        }
    }
}

impl RecentKeys {
    /// The keys of `namespace`.
    fn of(&self, namespace: &Arc<str>) -> moka::sync::Cache<Arc<str>, RecentEvent> {
        self.namespaces.get_with_by_ref(namespace, || {
            moka::sync::Cache::builder()
                .max_capacity(DIRECT_KEYS_PER_NAMESPACE)
                .time_to_live(DIRECT_KEY_WINDOW)
                .build()
        })
    }
}

/// An event of a direct request on its way to admission: its fingerprint (of the event as sent,
/// for its idempotency key), its timestamp fixed (filters may read it), and its targets.
pub struct RoutedEvent {
    pub event: IngestEvent,
    fingerprint: [u8; 32],
    pub targets: Vec<Arc<Route>>,
}

impl RoutedEvent {
    /// Fingerprints `event` (only a keyed one: hashing every event's data costs as much as
    /// parsing it) and fixes its timestamp; it has no targets yet.
    pub fn new(mut event: IngestEvent) -> Self {
        let fingerprint = event
            .key
            .as_ref()
            .map(|_| fingerprint(&event))
            .unwrap_or_default();
        event
            .timestamp
            .get_or_insert_with(|| k8s_openapi::jiff::Timestamp::now().to_string());
        Self {
            event,
            fingerprint,
            targets: Vec::new(),
        }
    }
}

/// What an event of a direct request offers its filters (its timestamp fixed first).
impl FilterInput for IngestEvent {
    fn facts(&self) -> EventFacts<'_> {
        EventFacts::new(
            self.event,
            self.timestamp.as_deref().unwrap_or_default(),
            &self.data,
        )
    }
}

pub(super) async fn direct(
    state: &ApiState,
    namespace: &str,
    events: Vec<IngestEvent>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    // Each event's targets, its filters evaluated off this worker (see `routing::Screen`).
    let mut routed = Vec::with_capacity(events.len());
    for e in events {
        let RoutedEvent {
            event, fingerprint, ..
        } = RoutedEvent::new(e);
        let event = Arc::new(event);
        let targets = state
            .routes
            .targets(namespace, event.event, event.clone(), &state.metrics)
            .await;
        // Shared still only with a filter thread that overran its budget.
        let event = Arc::try_unwrap(event).unwrap_or_else(|shared| IngestEvent::clone(&shared));
        routed.push(RoutedEvent {
            event,
            fingerprint,
            targets,
        });
    }
    let direct = &state.direct;
    let admission = direct
        .admit_within(&state.readiness, namespace, routed, direct.max_queue_delay)
        .await?;
    let count = admission.deliveries.len();
    let permit = Arc::new(admission.permit);
    let since = Instant::now();
    let mut refused = 0;
    for delivery in admission.deliveries {
        let queued = Queued {
            order: state.dispatcher.ticket(&delivery, 0),
            delivery,
            hold: permit.clone(),
            since,
        };
        if !state
            .direct
            .lines
            .push(queued, &state.dispatcher, state.direct_max_hold)
        {
            refused += 1;
        }
    }
    if refused > 0 {
        // Admitted just as the operator began stopping: the drain does not count these.
        state.metrics.direct_deliveries_lost.inc_by(refused);
        tracing::warn!(
            lost = refused,
            "direct deliveries accepted as the operator stopped are lost"
        );
    }
    let mut reply = json!({
        "mode": "direct",
        "namespace": namespace,
        "accepted": admission.accepted,
        "deliveries": count,
        "duplicates": admission.duplicates,
        "guarantee": "at-most-once across an operator restart: events are not stored",
    });
    if admission.keyed {
        reply["idempotency"] = DIRECT_KEY_LIFETIME.into();
    }
    Ok((StatusCode::ACCEPTED, Json(reply)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::ingest::parse_events;
    use crate::{
        keys::WebhookKey,
        routing::{Route, RoutingTable},
    };

    fn event(body: &str) -> IngestEvent {
        parse_events(body.as_bytes(), None).unwrap().pop().unwrap()
    }

    fn table(routes: &[(&str, &str)]) -> RoutingTable {
        let mut t = RoutingTable::default();
        for (ns, name) in routes {
            t.apply(Route::for_tests(
                ns,
                name,
                &format!("https://example.com/{name}"),
            ));
        }
        t
    }

    /// Each event with its routes; the test routes have no filter.
    fn routed(table: &RoutingTable, namespace: &str, events: Vec<IngestEvent>) -> Vec<RoutedEvent> {
        events
            .into_iter()
            .map(|e| {
                let mut routed = RoutedEvent::new(e);
                routed.targets = table
                    .lookup(namespace, routed.event.event)
                    .cloned()
                    .collect();
                routed
            })
            .collect()
    }

    /// A 429 for a namespace holding its share, with Retry-After, its message saying `why`.
    fn assert_share_full(admitted: Result<Admission, ApiError>, why: &str) {
        let e = admitted.err().expect("the namespace holds its share");
        assert_eq!(
            (e.status, e.code, e.retry_after),
            (
                StatusCode::TOO_MANY_REQUESTS,
                Problem::NamespaceQueueFull,
                Some(1)
            )
        );
        assert!(e.message.contains(why), "{}", e.message);
    }

    fn ready() -> Readiness {
        let r = Readiness::new(&["webhooks"]);
        r.mark_ready("webhooks");
        r
    }

    #[test]
    fn direct_ingest_answers_503_until_the_routes_are_synced() {
        let direct = DirectIngest::new(10, 10);
        let readiness = Readiness::new(&["secrets", "webhooks"]);
        let t = table(&[("a", "w")]);
        let e = direct
            .admit(
                &readiness,
                "a",
                routed(
                    &t,
                    "a",
                    vec![event(r#"{"event":"document.error","data":{}}"#)],
                ),
            )
            .err()
            .expect("refused before the sync");
        assert_eq!(
            (e.status, e.code, e.retry_after),
            (StatusCode::SERVICE_UNAVAILABLE, Problem::NotReady, Some(1))
        );
        assert!(e.message.contains("secrets, webhooks"), "{}", e.message);
        readiness.mark_ready("secrets");
        readiness.mark_ready("webhooks");
        let admitted = direct
            .admit(
                &readiness,
                "a",
                routed(
                    &t,
                    "a",
                    vec![event(r#"{"event":"document.error","data":{}}"#)],
                ),
            )
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(admitted.deliveries.len(), 1);
    }

    #[test]
    fn each_namespace_gets_its_share_of_the_direct_queue() {
        let direct = DirectIngest::new(10, 4);
        let t = table(&[("a", "w1"), ("a", "w2"), ("b", "w1")]);
        let two = || vec![event(r#"{"event":"document.error","data":{}}"#)];
        let first = direct
            .admit(&ready(), "a", routed(&t, "a", two()))
            .unwrap_or_else(|e| panic!("{e:?}"));
        let second = direct
            .admit(&ready(), "a", routed(&t, "a", two()))
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(direct.held_by("a"), 4);
        assert_share_full(
            direct.admit(&ready(), "a", routed(&t, "a", two())),
            "--direct-queue-per-namespace",
        );
        // Another namespace is not affected.
        let b = direct
            .admit(&ready(), "b", routed(&t, "b", two()))
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(b.deliveries.len(), 1);
        // A request that can never fit a namespace's share is 413, not 429 forever.
        let five: Vec<IngestEvent> = (0..3)
            .map(|_| event(r#"{"event":"document.error","data":{}}"#))
            .collect();
        let e = direct
            .admit(&ready(), "a", routed(&t, "a", five))
            .err()
            .expect("too large");
        assert_eq!(
            (e.status, e.code),
            (StatusCode::PAYLOAD_TOO_LARGE, Problem::TooManyDeliveries)
        );
        // Space comes back when deliveries end, and idle namespaces leave the map.
        drop(first);
        assert_eq!(direct.held_by("a"), 2);
        drop((second, b));
        assert_eq!(direct.namespaces_holding(), 0);
        assert!(direct.admit(&ready(), "a", routed(&t, "a", two())).is_ok());
    }

    #[test]
    fn one_event_fanning_out_past_the_share_is_admitted_once_its_namespace_is_idle() {
        let metrics = Metrics::default();
        let direct = DirectIngest::new(8, 2).with_metrics(metrics.clone());
        let names: Vec<String> = (0..5).map(|i| format!("w{i}")).collect();
        let mut routes: Vec<(&str, &str)> = names.iter().map(|n| ("a", n.as_str())).collect();
        routes.push(("b", "w"));
        let t = table(&routes);
        let one = || vec![event(r#"{"event":"document.error","data":{}}"#)];

        // Five deliveries, past a share of two: admitted whole, holding the whole share.
        let wide = direct
            .admit(&ready(), "a", routed(&t, "a", one()))
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(wide.deliveries.len(), 5);
        assert_eq!(direct.held_by("a"), 2);
        assert_eq!(metrics.direct_queue_used.get(), 2);
        // Other namespaces keep the rest of the queue.
        assert!(direct.admit(&ready(), "b", routed(&t, "b", one())).is_ok());

        // While it is delivered, the next one waits its turn with 429, told why.
        assert_share_full(
            direct.admit(&ready(), "a", routed(&t, "a", one())),
            "fans out to 5 Webhooks",
        );
        drop(wide);
        assert!(direct.admit(&ready(), "a", routed(&t, "a", one())).is_ok());

        // Several events past the share can be split, so they are 413.
        let e = direct
            .admit(&ready(), "a", routed(&t, "a", [one(), one()].concat()))
            .err()
            .expect("two events of five deliveries each");
        assert_eq!(
            (e.status, e.code),
            (StatusCode::PAYLOAD_TOO_LARGE, Problem::TooManyDeliveries)
        );
        assert!(
            e.message.contains("a request of one event is admitted"),
            "{}",
            e.message
        );
    }

    // Paused time: the waits are the code's, not the machine's.
    #[tokio::test(start_paused = true)]
    async fn a_request_finding_no_room_waits_for_deliveries_to_move_on_before_429() {
        let direct = DirectIngest::new(1, 1);
        let t = table(&[("a", "w")]);
        let one = || {
            routed(
                &t,
                "a",
                vec![event(r#"{"event":"document.error","data":{}}"#)],
            )
        };
        let held = direct
            .admit(&ready(), "a", one())
            .unwrap_or_else(|e| panic!("{e:?}"));

        // Nothing moves on: refused once the wait is over, not before.
        let started = tokio::time::Instant::now();
        let e = direct
            .admit_within(&ready(), "a", one(), Duration::from_millis(50))
            .await
            .err()
            .expect("no room");
        assert_eq!(
            (e.status, e.code, started.elapsed()),
            (
                StatusCode::TOO_MANY_REQUESTS,
                Problem::QueueFull,
                Duration::from_millis(50)
            )
        );

        // Room comes back: admitted then, long before the wait is over.
        let started = tokio::time::Instant::now();
        let release = async {
            tokio::task::yield_now().await;
            drop(held);
        };
        let readiness = ready();
        let (admitted, ()) = tokio::join!(
            direct.admit_within(&readiness, "a", one(), Duration::from_secs(3600)),
            release
        );
        let admitted = admitted.unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(
            (admitted.deliveries.len(), started.elapsed()),
            (1, Duration::ZERO)
        );

        // What cannot come with waiting is answered at once.
        let e = direct
            .admit_within(
                &ready(),
                "a",
                routed(
                    &t,
                    "a",
                    vec![event(r#"{"event":"document.error","data":{}}"#); 2],
                ),
                Duration::from_secs(3600),
            )
            .await
            .err()
            .expect("two deliveries never fit a share of one");
        assert_eq!(
            (e.code, started.elapsed()),
            (Problem::TooManyDeliveries, Duration::ZERO)
        );
    }

    #[test]
    fn the_global_queue_still_bounds_every_namespace_together() {
        let metrics = Metrics::default();
        let direct = DirectIngest::new(3, 2).with_metrics(metrics.clone());
        let t = table(&[("a", "w"), ("b", "w"), ("c", "w")]);
        let one = || vec![event(r#"{"event":"document.error","data":{}}"#)];
        let held: Vec<Admission> = ["a", "b", "c"]
            .into_iter()
            .map(|ns| {
                direct
                    .admit(&ready(), ns, routed(&t, ns, one()))
                    .unwrap_or_else(|e| panic!("{e:?}"))
            })
            .collect();
        let e = direct
            .admit(&ready(), "a", routed(&t, "a", one()))
            .err()
            .expect("global queue full");
        assert_eq!(
            (e.status, e.code),
            (StatusCode::TOO_MANY_REQUESTS, Problem::QueueFull)
        );
        // The saturation the metrics show: the whole queue used, given back with the permits.
        assert_eq!(
            (
                metrics.direct_queue_used.get(),
                metrics.direct_queue_capacity.get()
            ),
            (3, 3)
        );
        drop(held);
        assert_eq!(metrics.direct_queue_used.get(), 0);
    }

    #[test]
    fn one_namespace_sending_ever_new_keys_pushes_out_only_its_own() {
        let recent = RecentKeys::default();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let event = RecentEvent {
            fingerprint: [1; 32],
        };
        recent.of(&a).insert("k".into(), event.clone());
        let flood = recent.of(&b);
        for i in 0..(DIRECT_KEYS_PER_NAMESPACE + 5_000) {
            flood.insert(format!("k{i}").into(), event.clone());
        }
        flood.run_pending_tasks();
        assert!(flood.entry_count() <= DIRECT_KEYS_PER_NAMESPACE);
        assert_eq!(recent.of(&a).get("k"), Some(event));
    }

    #[test]
    fn a_repeated_key_in_direct_mode_is_a_duplicate_or_a_conflict() {
        let direct = DirectIngest::new(100, 100);
        let t = table(&[("a", "w1"), ("a", "w2"), ("b", "w1")]);
        let keyed = r#"{"event":"document.completed","id":"k","data":{"x":1,"y":2}}"#;
        let first = direct
            .admit(&ready(), "a", routed(&t, "a", vec![event(keyed)]))
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!((first.deliveries.len(), first.duplicates.len()), (2, 0));

        // Same content (keys of data in another order): nothing new is dispatched.
        let same = r#"{"event":"document.completed","id":"k","data":{"y":2,"x":1}}"#;
        let again = direct
            .admit(&ready(), "a", routed(&t, "a", vec![event(same)]))
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(
            (again.deliveries.len(), again.duplicates.clone()),
            (0, vec![0])
        );

        // Other content under the same key: 409.
        let other = r#"{"event":"document.completed","id":"k","data":{"x":2,"y":2}}"#;
        let e = direct
            .admit(&ready(), "a", routed(&t, "a", vec![event(other)]))
            .err()
            .expect("conflict");
        assert_eq!(
            (e.status, e.code),
            (StatusCode::CONFLICT, Problem::IdempotencyConflict)
        );

        // Keys are scoped to the namespace.
        let b = direct
            .admit(&ready(), "b", routed(&t, "b", vec![event(other)]))
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(b.deliveries.len(), 1);

        // After the window, the same key brings the same delivery ids, so receivers still
        // deduplicate.
        let ids: Vec<String> = first.deliveries.iter().map(|d| d.id.clone()).collect();
        let fresh = DirectIngest::new(100, 100);
        let later = fresh
            .admit(&ready(), "a", routed(&t, "a", vec![event(keyed)]))
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(
            later
                .deliveries
                .iter()
                .map(|d| d.id.clone())
                .collect::<Vec<_>>(),
            ids
        );
    }

    /// Puts the deliveries of `admission` in their lines as if they had waited `waited`,
    /// without a worker to drain them.
    fn waiting(direct: &DirectIngest, admission: Admission, waited: Duration) {
        let permit = Arc::new(admission.permit);
        for delivery in admission.deliveries {
            direct.lines.put_in_line(Queued {
                order: None,
                delivery,
                hold: permit.clone(),
                since: Instant::now() - waited,
            });
        }
    }

    #[test]
    fn events_for_a_webhook_whose_line_does_not_drain_in_time_get_429_early() {
        let direct = DirectIngest::new(100, 100).with_max_queue_delay(Duration::from_millis(100));
        let t = table(&[("a", "slow"), ("b", "fast")]);
        let one = || vec![event(r#"{"event":"document.error","data":{}}"#)];
        let admit = |ns| {
            direct
                .admit(&ready(), ns, routed(&t, ns, one()))
                .unwrap_or_else(|e| panic!("{e:?}"))
        };
        // A line whose oldest delivery has waited less than the target still takes events.
        waiting(&direct, admit("a"), Duration::from_millis(10));
        waiting(&direct, admit("b"), Duration::from_millis(10));
        let queued = admit("a");
        waiting(&direct, queued, Duration::ZERO);
        // The oldest has now waited longer: 429 while the queue itself has room (3 of 100).
        direct
            .lines
            .age_oldest(&WebhookKey::new("a", "slow"), Duration::from_millis(200));
        let e = direct
            .admit(&ready(), "a", routed(&t, "a", one()))
            .err()
            .expect("the line of a/slow does not drain in time");
        assert_eq!(
            (e.status, e.code, e.retry_after),
            (StatusCode::TOO_MANY_REQUESTS, Problem::QueueSlow, Some(1))
        );
        assert!(
            e.message.contains("slow") && e.message.contains("--direct-max-queue-delay"),
            "{}",
            e.message
        );
        // Another Webhook's line is not affected, and a refused request holds no space.
        assert_eq!(admit("b").deliveries.len(), 1);
        assert_eq!(direct.held_by("a"), 2);
        // Once the old deliveries are taken by a worker, the line takes events again.
        drop(direct.lines.take_line(&WebhookKey::new("a", "slow")));
        assert_eq!(admit("a").deliveries.len(), 1);
    }

    #[test]
    fn a_rate_limited_webhook_takes_events_while_its_line_waits_for_its_turns() {
        let direct = DirectIngest::new(100, 100).with_max_queue_delay(Duration::from_millis(100));
        let mut t = table(&[]);
        let mut route = (**table(&[("a", "limited")])
            .get(&WebhookKey::new("a", "limited"))
            .unwrap())
        .clone();
        route.delivery.rate_limit = Some(crate::crd::RateLimit {
            per_second: 1,
            burst: 1,
        });
        t.apply(route);
        let one = || vec![event(r#"{"event":"document.error","data":{}}"#)];
        let first = direct
            .admit(&ready(), "a", routed(&t, "a", one()))
            .unwrap_or_else(|e| panic!("{e:?}"));
        // Its line waits for the limit's turns, far longer than --direct-max-queue-delay:
        // that is the limit at work, not a line that cannot keep up.
        waiting(&direct, first, Duration::from_secs(10));
        let next = direct
            .admit(&ready(), "a", routed(&t, "a", one()))
            .unwrap_or_else(|e| panic!("a rate-limited line must take events: {e:?}"));
        assert_eq!(next.deliveries.len(), 1);
    }

    #[test]
    fn a_refused_direct_request_does_not_remember_its_keys() {
        let direct = DirectIngest::new(100, 1);
        let t = table(&[("a", "w")]);
        let _full = direct
            .admit(
                &ready(),
                "a",
                routed(
                    &t,
                    "a",
                    vec![event(r#"{"event":"document.error","data":{}}"#)],
                ),
            )
            .unwrap_or_else(|e| panic!("{e:?}"));
        let keyed = r#"{"event":"document.error","id":"k","data":{}}"#;
        let e = direct
            .admit(&ready(), "a", routed(&t, "a", vec![event(keyed)]))
            .err()
            .expect("full");
        assert_eq!(e.code, "namespace_queue_full");
        drop(_full);
        // The retry is dispatched, not taken for a duplicate of the refused request.
        let retry = direct
            .admit(&ready(), "a", routed(&t, "a", vec![event(keyed)]))
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!((retry.deliveries.len(), retry.duplicates.len()), (1, 0));
    }
}
