//! The delivery engine: one loop that carries out [`attempt::decide`] for a delivery until it
//! is final, stopped, or taken away by its source. Every source of deliveries (the
//! DocumentEvent controller, direct ingest, JetStream work items, manual test and redeliver)
//! runs its deliveries through [`drive`] and supplies only a [`Keeper`]: how it stores
//! progress, where a delivery waits, how it gets slots, and what finishing means to it.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use tokio_util::sync::CancellationToken;

use super::{
    AttemptReport, Attempted, Delivery, Dispatcher, RouteCheck, Slots, Ticket,
    attempt::{self, Step},
};
use crate::{
    crd::{TargetDelivery, TargetState},
    routing::Route,
};

/// How soon a delivery waiting here for a Webhook this replica has not seen yet asks again.
const NOT_SEEN_RECHECK: Duration = Duration::from_secs(1);

/// Why a delivery waits instead of being sent now.
#[derive(Debug)]
pub enum Wait {
    /// Its retry is due in `after`.
    Retry { after: Duration },
    /// Held for `why` until `route` changes, at most `at_most`.
    Held {
        why: String,
        route: std::sync::Arc<Route>,
        at_most: Duration,
    },
    /// This replica's routing table has not seen the Webhook as the router did.
    NotHere { why: String },
    /// The earlier deliveries of its ordering key are not final.
    KeyTurn,
    /// No slot came within what the source is willing to wait ([`Keeper::reserve`]).
    Busy,
    /// Its turn under its Webhook's rate limit is `after` away.
    RateTurn { after: Duration },
    /// Its Webhook is now delivered from another of the source's queues (a JetStream work item
    /// whose Webhook got a rate limit or an ordering).
    OtherQueue,
}

/// Where a delivery that must wait does so.
#[derive(Debug, PartialEq, Eq)]
pub enum Parked {
    /// Here: the engine waits (for the retry's time, the route's change, the key's turn), then
    /// checks again. Ends early when [`Keeper::stopped`] fires.
    Here,
    /// Elsewhere: the keeper has put it where it waits (parked in the stream, handed to a task
    /// of its own, refused to a person waiting); the engine lets go of it.
    Elsewhere,
}

/// How [`drive`] ended.
#[derive(Debug)]
pub enum Ending {
    /// Final: succeeded, or failed for good. `last` is the last attempt this call sent.
    Finished { last: Option<AttemptReport> },
    /// The keeper took it elsewhere while it waited for this.
    Left(Wait),
    /// [`Keeper::stopped`] fired or [`Keeper::may_send`] said no: not final, nothing more is
    /// sent by this call.
    Stopped,
}

/// What a source of deliveries supplies to the engine.
pub trait Keeper: Send + Sync {
    /// Fired when its deliveries must stop where they are (the operator is stopping): waits
    /// end, and no attempt starts; an attempt being sent is finished and recorded.
    fn stopped(&self) -> &CancellationToken;

    /// Where the delivery waits for `wait`, given where it stands (`target`).
    fn park(&self, wait: &Wait, target: &TargetDelivery) -> impl Future<Output = Parked> + Send;

    /// Keeps the delivery's progress (held, resumed, attempted, final) where the source keeps
    /// it. Nothing by default: the Webhook's history has every attempt anyway.
    fn store(&self, target: &TargetDelivery) -> impl Future<Output = ()> + Send {
        let _ = target;
        async {}
    }

    /// The delivery is final: settle it with the source (ack a message). Nothing by default.
    fn ack(&self, target: &TargetDelivery) -> impl Future<Output = ()> + Send {
        let _ = target;
        async {}
    }

    /// Slots for the delivery's next attempt, or why it must wait instead. By default it waits
    /// for them (and for its rate-limit turn) as long as it takes, or until stopped.
    fn reserve(
        &self,
        dispatcher: &Dispatcher,
        delivery: &Delivery,
    ) -> impl Future<Output = Result<Slots, Wait>> + Send {
        reserve_until(dispatcher, delivery, self.stopped())
    }

    /// Whether this source sends to `route` itself (false: [`Wait::OtherQueue`]).
    fn accepts(&self, route: &Route) -> bool {
        let _ = route;
        true
    }

    /// Checked right before each attempt is sent, once its slots are had: false stops the
    /// delivery there (a fence, such as the end of a term of leadership).
    fn may_send(&self) -> bool {
        true
    }
}

/// Waits for the delivery's slots (its rate-limit turn first) until `stop` fires (then
/// [`Wait::Busy`]). Slots are usually free at once: only a delivery that has to wait for them
/// also waits for the token (polling it registers a waiter under a lock, which the hot path
/// does without).
pub async fn reserve_until(
    dispatcher: &Dispatcher,
    delivery: &Delivery,
    stop: &CancellationToken,
) -> Result<Slots, Wait> {
    let reserve = dispatcher.reserve(delivery);
    tokio::pin!(reserve);
    match futures::poll!(reserve.as_mut()) {
        std::task::Poll::Ready(slots) => Ok(slots),
        std::task::Poll::Pending => tokio::select! {
            // A stopped delivery never starts an attempt, even when a slot is free at once.
            biased;
            _ = stop.cancelled() => Err(Wait::Busy),
            slots = reserve => Ok(slots),
        },
    }
}

/// A target that has not been attempted yet.
pub fn new_target(delivery: &Delivery) -> TargetDelivery {
    TargetDelivery::new(
        delivery.webhook.name.to_string(),
        delivery.id.clone(),
        TargetState::Pending,
    )
}

/// Delivers `delivery`, standing at `target`, until it is final, stopped, or parked elsewhere
/// by `keeper`, keeping `target` up to date and handing every change to [`Keeper::store`].
///
/// A delivery whose Webhook is paused or blocked by something a person fixes is held without
/// spending attempts; it wakes when that Webhook's route changes (not by polling), and fails
/// once it has been held for `max_hold`, recorded, so that it finishes and retention applies.
/// `held_since` is kept in the target, so a resumed delivery keeps its deadline.
///
/// With an `order` ticket (`spec.ordering`), nothing happens before the earlier deliveries of
/// its key are final, and a retry marks the key blocked; the caller drops the ticket once this
/// returns, giving the key's turn to the next delivery.
pub async fn drive(
    dispatcher: &Dispatcher,
    delivery: &Delivery,
    target: &mut TargetDelivery,
    max_hold: Duration,
    keeper: &impl Keeper,
    mut order: Option<&mut Ticket>,
) -> Ending {
    let mut last = None;
    let mut had_turn = false;
    loop {
        let in_turn = order.as_deref_mut().is_none_or(Ticket::has_turn);
        if in_turn && !had_turn {
            had_turn = true;
            // Resumed (after a restart, a hand-over) with attempts spent: its key is blocked
            // again.
            if let Some(ticket) = order.as_deref()
                && target.attempts > 0
                && !attempt::is_final(target.state)
            {
                ticket.retrying(&delivery.id, target.attempts);
            }
        }
        let check = dispatcher.check(delivery);
        let now = Timestamp::now();
        let wait = match attempt::decide(&check, target, in_turn, now, max_hold) {
            Step::Done => {
                keeper.ack(target).await;
                return Ending::Finished { last };
            }
            Step::Fail { why, record } => {
                if record {
                    let spent = target.attempts.max(0) as u32;
                    dispatcher.record_failure(delivery, spent, &why).await;
                }
                attempt::fail(target, why);
                keeper.store(target).await;
                continue;
            }
            Step::AwaitTurn => Wait::KeyTurn,
            Step::RetryIn(after) => Wait::Retry { after },
            Step::NotHere { why } => Wait::NotHere { why },
            Step::Hold { why, at_most } => {
                if attempt::hold(target, &why, now) {
                    keeper.store(target).await;
                }
                let RouteCheck::Hold { route, .. } = check else {
                    unreachable!("a hold comes from a held route")
                };
                Wait::Held {
                    why,
                    route,
                    at_most,
                }
            }
            Step::Send { attempt } => {
                let RouteCheck::Deliver(route) = &check else {
                    unreachable!("a send comes from a deliverable route")
                };
                if !keeper.accepts(route) {
                    Wait::OtherQueue
                } else {
                    if attempt::unhold(target) {
                        keeper.store(target).await;
                    }
                    match keeper.reserve(dispatcher, delivery).await {
                        Err(wait) => wait,
                        Ok(slots) => {
                            // Right before the send: once stopping (or fenced), no attempt
                            // starts (its record might not be written any more).
                            if keeper.stopped().is_cancelled() || !keeper.may_send() {
                                return Ending::Stopped;
                            }
                            if let Attempted::Sent(report) =
                                dispatcher.send(delivery, attempt, slots).await
                            {
                                attempt::record(target, attempt, &report, Timestamp::now());
                                if let Some(ticket) = order.as_deref()
                                    && target.next_attempt_time.is_some()
                                {
                                    ticket.retrying(&delivery.id, target.attempts);
                                }
                                keeper.store(target).await;
                                last = Some(report);
                            }
                            // Not sent: the route changed while it waited; check it again.
                            continue;
                        }
                    }
                }
            }
        };
        if keeper.stopped().is_cancelled() {
            return Ending::Stopped;
        }
        match keeper.park(&wait, target).await {
            Parked::Elsewhere => return Ending::Left(wait),
            Parked::Here => {
                if !wait_here(&wait, order.as_deref_mut(), keeper.stopped()).await {
                    return Ending::Stopped;
                }
            }
        }
    }
}

/// Waits in this task for what `wait` is waiting for; false when `stop` fired first.
async fn wait_here(wait: &Wait, order: Option<&mut Ticket>, stop: &CancellationToken) -> bool {
    let pause = async {
        match wait {
            Wait::Retry { after } | Wait::RateTurn { after } => tokio::time::sleep(*after).await,
            Wait::Held { route, at_most, .. } => tokio::select! {
                _ = route.superseded.cancelled() => {}
                _ = tokio::time::sleep(*at_most) => {}
            },
            Wait::KeyTurn => match order {
                Some(ticket) => ticket.turn().await,
                None => unreachable!("only an ordered delivery waits for its key's turn"),
            },
            // Only work routed by another replica names a version: ask again shortly.
            Wait::NotHere { .. } | Wait::Busy | Wait::OtherQueue => {
                tokio::time::sleep(NOT_SEEN_RECHECK).await
            }
        }
    };
    tokio::select! {
        _ = pause => true,
        _ = stop.cancelled() => false,
    }
}

/// A keeper that waits for everything in the caller's task and stores nothing: a direct
/// delivery after its first attempt, an ordered JetStream work item.
pub struct InHand<'a> {
    pub stop: &'a CancellationToken,
}

impl Keeper for InHand<'_> {
    fn stopped(&self) -> &CancellationToken {
        self.stop
    }

    async fn park(&self, _: &Wait, _: &TargetDelivery) -> Parked {
        Parked::Here
    }
}
