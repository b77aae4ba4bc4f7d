//! The dispatcher: one attempt at a time per call, with per-webhook concurrency limits (so one
//! slow or dead endpoint only ever occupies its own slots), a global limit, signing at send
//! time, and every attempt recorded in the Webhook's status.

use std::{sync::Arc, time::Duration};

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use sha2::{Digest, Sha256};
use tokio::sync::{Semaphore, mpsc};
use tracing::Instrument;

use super::{
    Attempt, AttemptResult, HttpSender, RetryPolicy, Verdict,
    limits::KeyedLimits,
    ordering::{Sequencer, Ticket, ordering_key},
    rate_limit::{LimitStamp, RateLimits},
    redact_url,
};
use crate::{
    crd::{DeliveryRecord, Outcome, ready_reason},
    keys::WebhookKey,
    metrics::{DeliveryLabels, Metrics},
    routing::{Found, Route, RouteState, Routes},
    status::{StatusSender, Update, truncate_error},
    wire::EventBody,
};

/// Tells the Webhook controller that an endpoint answered 410 Gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoneNotice {
    pub webhook: WebhookKey,
    pub generation: i64,
    pub message: String,
}

/// What to deliver to which Webhook.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub webhook: WebhookKey,
    /// The uid of the Webhook the event was routed to: a namesake created since is another
    /// Webhook, and never gets this delivery (nor its id).
    pub webhook_uid: Arc<str>,
    /// The version of the Webhook in the routing table that routed it, when that table was
    /// another replica's (JetStream work items); 0 when routed from this replica's own table.
    /// A replica that has not seen that version waits rather than judge the Webhook gone.
    pub routed_version: u64,
    /// Stable across retries: receivers deduplicate on it.
    pub id: String,
    pub event: Arc<EventBody>,
    /// Where the event came from, for the history.
    pub source: super::Source,
    /// A manual delivery (`/test`, `/redeliver`): one attempt, also to a paused Webhook.
    pub manual: bool,
    /// At most this long for the attempt, whatever the Webhook's `timeoutSeconds` (a manual
    /// delivery must answer within the API's request timeout, with its outcome).
    pub timeout_cap: Option<Duration>,
    /// The W3C `traceparent` of the span this delivery continues (its route span), whose
    /// child each attempt's span is; None when traces are not exported.
    pub trace: Option<Arc<str>>,
}

/// What the routing table says about a delivery now.
#[derive(Debug)]
pub enum RouteCheck {
    /// Send it, to this route.
    Deliver(Arc<Route>),
    /// Wait without spending attempts until `route` changes (paused, or blocked by something a
    /// person fixes: the Secret, the egress policy).
    Hold { route: Arc<Route>, why: String },
    /// Never deliverable: the Webhook was deleted (or recreated), or its endpoint is gone.
    Gone(String),
    /// This replica's routing table has not seen the Webhook as the router did (it lags, or
    /// is cut off from the API server): ask again later, or leave it to another replica.
    NotSeenYet(String),
}

/// The slots an attempt holds while it talks to the endpoint.
#[derive(Debug)]
pub struct Slots {
    _permits: [tokio::sync::OwnedSemaphorePermit; 3],
    _in_use: SlotInUse,
}

/// Counts one global slot in `hookrelay_delivery_slots_in_use` while it is held.
#[derive(Debug)]
struct SlotInUse(prometheus_client::metrics::gauge::Gauge);

impl SlotInUse {
    fn new(metrics: &Metrics) -> Self {
        metrics.delivery_slots_in_use.inc();
        Self(metrics.delivery_slots_in_use.clone())
    }
}

impl Drop for SlotInUse {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// How a call to [`Dispatcher::send`] ended.
#[derive(Debug)]
pub enum Attempted {
    Sent(AttemptReport),
    /// The route changed while the attempt waited for its slots: nothing was sent and no
    /// attempt spent; check the route again.
    NotSent,
}

/// The delivery id of an event for a webhook: the same on every retry and after restarts,
/// different for other events or webhooks.
pub fn delivery_id(event_uid: &str, webhook_uid: &str) -> String {
    let digest = Sha256::new()
        .chain_update(event_uid)
        .chain_update(b"/")
        .chain_update(webhook_uid)
        .finalize();
    format!("msg_{}", &hex::encode(digest)[..32])
}

/// How an attempt ended.
#[derive(Clone, Debug, PartialEq)]
pub struct AttemptReport {
    pub verdict: Verdict,
    pub http_status: Option<i32>,
    pub error: Option<String>,
    pub time: Time,
    pub duration: Duration,
}

#[derive(Clone, Debug)]
pub struct DispatcherConfig {
    /// Attempts in flight to one webhook at once.
    pub per_webhook: usize,
    /// Attempts in flight to the Webhooks of one namespace at once, so that one tenant's dead
    /// endpoints cannot take every global slot.
    pub per_namespace: usize,
    /// Attempts in flight in all.
    pub global: usize,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        Self {
            per_webhook: 8,
            per_namespace: 128,
            global: 512,
        }
    }
}

/// Sends attempts: waits for a slot of the Webhook, of its namespace and a global one, checks
/// the route again (it may have changed while waiting), signs, POSTs and records the attempt.
pub struct Dispatcher {
    sender: HttpSender,
    routes: Routes,
    status: StatusSender,
    gone: mpsc::UnboundedSender<GoneNotice>,
    metrics: Metrics,
    global: Arc<Semaphore>,
    webhooks: KeyedLimits<WebhookKey>,
    namespaces: KeyedLimits<Arc<str>>,
    /// `spec.delivery.rateLimit` of the Webhooks that have one.
    rate_limits: RateLimits,
    /// `spec.ordering`: the per-key queues of this process.
    sequencer: Arc<Sequencer>,
    /// Attempts being sent now, per Webhook (the API's `in_flight`).
    in_flight: super::InFlight,
}

impl Dispatcher {
    pub fn new(
        sender: HttpSender,
        routes: Routes,
        status: StatusSender,
        gone: mpsc::UnboundedSender<GoneNotice>,
        metrics: Metrics,
        config: DispatcherConfig,
    ) -> Self {
        metrics.delivery_slots.set(config.global.max(1) as i64);
        Self {
            sender,
            routes,
            status,
            gone,
            metrics,
            global: Arc::new(Semaphore::new(config.global.max(1))),
            webhooks: KeyedLimits::new(config.per_webhook),
            namespaces: KeyedLimits::new(config.per_namespace),
            rate_limits: RateLimits::default(),
            sequencer: Arc::default(),
            in_flight: super::InFlight::default(),
        }
    }

    /// Records in the Webhook's history that `delivery` failed for good without another attempt
    /// (held longer than `--max-hold`), after `attempts` attempts, so that its history says why,
    /// and `recover` and the delivery search find it.
    pub async fn record_failure(&self, delivery: &Delivery, attempts: u32, why: &str) {
        let mut error = why.to_owned();
        truncate_error(&mut error);
        let record = DeliveryRecord {
            id: delivery.id.clone(),
            event: delivery.event.event.to_string(),
            source: delivery.source.to_string(),
            attempt: attempts as i32,
            outcome: Outcome::Failed,
            http_status: None,
            duration_ms: 0,
            time: Time(Timestamp::now()),
            error: Some(error),
        };
        self.status
            .send(Update::DeliveryAttempt {
                key: delivery.webhook.clone(),
                uid: delivery.webhook_uid.to_string(),
                record: Box::new(record),
            })
            .await;
    }

    /// The metrics the dispatcher counts in, for the sources that drive its deliveries.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Whether this replica's view of the Webhooks can be trusted now (see `ViewHealth`).
    pub fn view_is_fresh(&self) -> bool {
        self.routes.view().is_fresh()
    }

    /// What the current routing table says about `delivery`.
    pub fn check(&self, delivery: &Delivery) -> RouteCheck {
        let table = self.routes.snapshot();
        let name = &delivery.webhook.name;
        let found = table.find(
            &delivery.webhook,
            &delivery.webhook_uid,
            delivery.routed_version,
        );
        let route = match found {
            Found::Route(route) => route.clone(),
            Found::NotSeenYet { seen } => {
                return RouteCheck::NotSeenYet(format!(
                    "webhook {name} was routed at version {}; this replica has seen its namespace up to {seen}",
                    delivery.routed_version
                ));
            }
            Found::Deleted => return RouteCheck::Gone(format!("webhook {name} was deleted")),
            Found::Replaced => {
                return RouteCheck::Gone(format!(
                    "webhook {name} was deleted and created again: the new one does not get the old one's deliveries"
                ));
            }
        };
        match &route.state {
            RouteState::Active => RouteCheck::Deliver(route),
            RouteState::Paused if delivery.manual => RouteCheck::Deliver(route),
            RouteState::Paused => RouteCheck::Hold {
                route,
                why: "held: the webhook is paused".into(),
            },
            RouteState::Blocked { reason, .. } if *reason == ready_reason::ENDPOINT_GONE => {
                RouteCheck::Gone("the endpoint answered 410 Gone".into())
            }
            RouteState::Blocked { reason, message } => {
                let why = format!("held: webhook not ready ({reason}): {message}");
                RouteCheck::Hold { route, why }
            }
        }
    }

    /// Waits for the delivery's turn under its Webhook's rate limit, then for a slot of the
    /// Webhook, of its namespace and a global one. Waiting can be abandoned (dropped) at any
    /// time; sending cannot, once started.
    pub async fn reserve(&self, delivery: &Delivery) -> Slots {
        match self.reserve_within_turn(delivery, None).await {
            Ok(slots) => slots,
            Err(_) => unreachable!("no turn is refused without a limit on the wait"),
        }
    }

    /// [`Self::reserve`], unless the delivery's turn under its Webhook's rate limit is further
    /// off than `max_wait`: then nothing is taken, and the error is how far off it is.
    pub async fn reserve_within_turn(
        &self,
        delivery: &Delivery,
        max_wait: Option<Duration>,
    ) -> Result<Slots, Duration> {
        // The turn comes first: a delivery waiting for it holds no slot.
        self.await_turn(delivery, max_wait).await?;
        let table = self.routes.snapshot();
        let webhook = self
            .webhooks
            .get(&delivery.webhook, table.len(), |k| table.get(k).is_some());
        let namespace = self
            .namespaces
            .get(&delivery.webhook.namespace, table.len(), |ns| {
                table.has_namespace(ns)
            });
        drop(table);
        let (Ok(webhook), Ok(namespace), Ok(global)) = (
            webhook.acquire_owned().await,
            namespace.acquire_owned().await,
            self.global.clone().acquire_owned().await,
        ) else {
            unreachable!("delivery semaphores are never closed")
        };
        Ok(Slots {
            _permits: [webhook, namespace, global],
            _in_use: SlotInUse::new(&self.metrics),
        })
    }

    /// The delivery's place among the deliveries of its key, when its Webhook has
    /// `spec.ordering` and its event has the key; `position` orders what the source knows the
    /// order of (0: the order of the calls).
    pub fn ticket(&self, delivery: &Delivery, position: u64) -> Option<Ticket> {
        let route = self.route_of(delivery)?;
        let key = ordering_key(&route.ordering.as_ref()?.key, &delivery.event.body)?;
        Some(
            self.sequencer
                .enqueue(&delivery.webhook, &route.uid, &key, position),
        )
    }

    /// The route `delivery` was routed to, if it is still in the table (not a namesake).
    pub fn route_of(&self, delivery: &Delivery) -> Option<Arc<Route>> {
        let route = self.routes.snapshot().get(&delivery.webhook).cloned()?;
        (*route.uid == *delivery.webhook_uid).then_some(route)
    }

    /// The per-key queues, for the task that reports blocked keys.
    pub fn sequencer(&self) -> Arc<Sequencer> {
        self.sequencer.clone()
    }

    /// Waits until `delivery` may go under its Webhook's `rateLimit` (at once without one).
    /// The turn is kept while the route is replaced by an equal one (a status change); a new
    /// limit, or none, decides again.
    async fn await_turn(
        &self,
        delivery: &Delivery,
        max_wait: Option<Duration>,
    ) -> Result<(), Duration> {
        let mut turn: Option<(LimitStamp, tokio::time::Instant)> = None;
        let mut waiting = None;
        loop {
            let table = self.routes.snapshot();
            let Some(route) = table.get(&delivery.webhook).cloned() else {
                return Ok(());
            };
            // Not this Webhook's (a namesake's): `send` refuses it without a turn.
            if *route.uid != *delivery.webhook_uid {
                return Ok(());
            }
            let Some(stamp) = LimitStamp::of(&route) else {
                return Ok(());
            };
            let at = match turn.take() {
                Some((s, at)) if s == stamp => at,
                _ => {
                    let now = std::time::Instant::now();
                    let at = self.rate_limits.reserve(
                        &delivery.webhook,
                        &stamp,
                        now,
                        max_wait,
                        table.len(),
                        |k| table.get(k).is_some(),
                    )?;
                    tokio::time::Instant::now() + at.duration_since(now)
                }
            };
            drop(table);
            if at <= tokio::time::Instant::now() {
                return Ok(());
            }
            if waiting.is_none() {
                self.metrics.rate_limited.inc();
                waiting = Some(WaitingForTurn::new(&self.metrics));
            }
            turn = Some((stamp, at));
            tokio::select! {
                _ = tokio::time::sleep_until(at) => return Ok(()),
                _ = route.superseded.cancelled() => {}
            }
        }
    }

    /// Sends attempt number `attempt` with the `slots` reserved for it, and records it.
    pub async fn send(&self, delivery: &Delivery, attempt: u32, slots: Slots) -> Attempted {
        // Waiting for slots can take minutes: the Webhook may have been paused, changed its URL
        // or secret, or been replaced by a namesake since the delivery was routed.
        let RouteCheck::Deliver(route) = self.check(delivery) else {
            return Attempted::NotSent;
        };
        // The send itself counts under the rate limit: what a delay since the turn took from
        // the spacing is waited here (at most about one interval).
        if let Some(stamp) = LimitStamp::of(&route) {
            let now = std::time::Instant::now();
            let at = self.rate_limits.send(&route.key, &stamp, now);
            tokio::time::sleep(at.duration_since(now)).await;
        }
        let now = Timestamp::now();
        // Disabled (and free) unless traces are exported: see crate::telemetry.
        let span = tracing::info_span!(
            target: crate::telemetry::TARGET,
            "attempt",
            otel.kind = "client",
            hookrelay.delivery_id = %delivery.id,
            hookrelay.webhook = %delivery.webhook,
            hookrelay.event = delivery.event.event.as_str(),
            hookrelay.attempt = attempt,
            http.response.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            error.message = tracing::field::Empty,
        );
        crate::telemetry::continue_trace(&span, delivery.trace.as_deref());
        let (result, duration) = match &route.signer {
            None => (
                AttemptResult::Error {
                    message: "not sent: no signing secret".into(),
                    permanent: false,
                },
                Duration::ZERO,
            ),
            Some(signer) => {
                let signatures = signer.sign(&delivery.id, now.as_second(), &delivery.event.body);
                let attempt = Attempt {
                    url: &route.url,
                    event: delivery.event.event.as_str(),
                    delivery_id: &delivery.id,
                    timestamp: now.as_second(),
                    signatures,
                    body: delivery.event.body.clone(), // a reference count, not a copy
                    timeout: Duration::from_secs(route.delivery.timeout_seconds.max(1) as u64)
                        .min(delivery.timeout_cap.unwrap_or(Duration::MAX)),
                    traceparent: crate::telemetry::traceparent(&span),
                    headers: &route.headers,
                    service: route.service.as_deref(),
                };
                // Counted until the send ends, times out or is cancelled (a drop guard).
                let _in_flight = self.in_flight.start(&route.key);
                self.sender.send(attempt).instrument(span.clone()).await
            }
        };
        // The slots are for talking to the endpoint, not for recording what it said.
        drop(slots);
        let mut policy = RetryPolicy::from(&route.delivery);
        if delivery.manual {
            policy.max_attempts = 1;
        }
        let verdict = policy.verdict(attempt, &result, rand::random());
        let (http_status, error) = match &result {
            AttemptResult::Status { code, .. } if (200..300).contains(code) => {
                (Some(*code as i32), None)
            }
            AttemptResult::Status { code, excerpt, .. } => {
                let mut message = match excerpt {
                    Some(text) => format!("HTTP {code}: {text}"),
                    None => format!("HTTP {code}"),
                };
                truncate_error(&mut message);
                (Some(*code as i32), Some(message))
            }
            AttemptResult::Error { message, .. } => {
                let mut message = message.clone();
                truncate_error(&mut message);
                (None, Some(message))
            }
        };
        let outcome = match verdict {
            Verdict::Succeeded => Outcome::Succeeded,
            Verdict::Retry(_) => Outcome::Retrying,
            Verdict::Failed | Verdict::Gone => Outcome::Failed,
        };
        if let Some(code) = http_status {
            span.record("http.response.status_code", code);
        }
        if let Some(error) = &error {
            span.record("otel.status_code", "ERROR");
            span.record("error.message", error.as_str());
        }
        drop(span);
        self.metrics.observe_delivery(
            DeliveryLabels::new(&route.key.namespace, outcome, http_status),
            duration,
        );
        let record = DeliveryRecord {
            id: delivery.id.clone(),
            event: delivery.event.event.to_string(),
            source: delivery.source.to_string(),
            attempt: attempt as i32,
            outcome,
            http_status,
            duration_ms: duration.as_millis() as i64,
            time: Time(now),
            error: error.clone(),
        };
        self.status
            .send(Update::DeliveryAttempt {
                key: route.key.clone(),
                uid: route.uid.clone(),
                record: Box::new(record),
            })
            .await;
        if verdict == Verdict::Gone {
            let _ = self.gone.send(GoneNotice {
                webhook: route.key.clone(),
                generation: route.generation,
                message: format!(
                    "{} answered 410 Gone: deliveries stopped until the spec changes",
                    redact_url(&route.url)
                ),
            });
        }
        Attempted::Sent(AttemptReport {
            verdict,
            http_status,
            error,
            time: Time(now),
            duration,
        })
    }

    /// Attempts being sent to `webhook` by this replica right now.
    pub fn in_flight(&self, webhook: &WebhookKey) -> usize {
        self.in_flight.get(webhook)
    }

    /// Attempts in flight to one Webhook at once.
    pub fn per_webhook(&self) -> usize {
        self.webhooks.permits()
    }

    /// Entries of the per-Webhook and per-namespace limit maps (bounded by what exists).
    pub fn limit_entries(&self) -> (usize, usize) {
        (self.webhooks.len(), self.namespaces.len())
    }
}

/// Counts a delivery in `hookrelay_rate_limit_waiting` while it waits for its turn.
struct WaitingForTurn(prometheus_client::metrics::gauge::Gauge);

impl WaitingForTurn {
    fn new(metrics: &Metrics) -> Self {
        metrics.rate_limit_waiting.inc();
        Self(metrics.rate_limit_waiting.clone())
    }
}

impl Drop for WaitingForTurn {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_ids_are_stable_per_event_and_webhook() {
        let a = delivery_id("event-1", "webhook-1");
        assert_eq!(a, delivery_id("event-1", "webhook-1"));
        assert_ne!(a, delivery_id("event-2", "webhook-1"));
        assert_ne!(a, delivery_id("event-1", "webhook-2"));
        assert!(a.starts_with("msg_") && a.len() == 36, "{a}");
    }
}
