//! What happens to one delivery, whatever its source: wait for the scheduled time, check the
//! route (deliver, hold or give up), attempt, and schedule the next attempt, until the target
//! is final. Sources (the DocumentEvent controller, direct ingest) only say where progress goes.

use std::time::Duration;

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use tokio_util::sync::CancellationToken;

use super::{AttemptReport, Attempted, Delivery, Dispatcher, RouteCheck, Ticket, Verdict};
use crate::crd::{TargetDelivery, TargetState};

/// How soon a delivery whose Webhook this replica has not seen yet asks again.
const NOT_SEEN_RECHECK: Duration = Duration::from_secs(1);

/// Where a delivery's progress goes.
pub trait Report: Send + Sync {
    fn report(&self, target: &TargetDelivery) -> impl Future<Output = ()> + Send;

    /// Checked right before each attempt is sent, once its slots are had: false stops the
    /// delivery there (a fence, such as the end of a term of leadership).
    fn may_send(&self) -> bool {
        true
    }
}

/// Progress that nothing records (direct ingest): the Webhook's history has the attempts.
pub struct Unrecorded;

impl Report for Unrecorded {
    async fn report(&self, _: &TargetDelivery) {}
}

pub fn is_final(state: TargetState) -> bool {
    matches!(state, TargetState::Succeeded | TargetState::Failed)
}

/// A target that has not been attempted yet.
pub fn new_target(delivery: &Delivery) -> TargetDelivery {
    TargetDelivery::new(
        delivery.webhook.name.to_string(),
        delivery.id.clone(),
        TargetState::Pending,
    )
}

/// Delivers `delivery` until `target` is final or `cancel` fires, reporting every change.
///
/// A delivery whose Webhook is paused or blocked by something a person fixes is `Held` without
/// spending attempts; it wakes when that Webhook's route changes (not by polling), and fails
/// once it has been held for `max_hold`, so that it finishes and retention applies. `held_since`
/// is kept in the target, so a resumed delivery keeps its deadline.
///
/// With an `order` ticket (`spec.ordering`), nothing is attempted before the earlier
/// deliveries of its key are final, and a retry marks the key blocked; the caller drops the
/// ticket once this returns, giving the key's turn to the next delivery.
pub async fn deliver(
    dispatcher: &Dispatcher,
    delivery: &Delivery,
    target: &mut TargetDelivery,
    max_hold: Duration,
    cancel: &CancellationToken,
    reporter: &impl Report,
    mut order: Option<&mut Ticket>,
) {
    if let Some(ticket) = order.as_deref_mut() {
        tokio::select! {
            _ = ticket.turn() => {}
            _ = cancel.cancelled() => return,
        }
        // Resumed after a restart with attempts spent: its key is blocked again.
        if target.attempts > 0 && !is_final(target.state) {
            ticket.retrying(&delivery.id, target.attempts);
        }
    }
    let now = Timestamp::now();
    let mut wait = target
        .next_attempt_time
        .as_ref()
        .filter(|t| t.0 > now)
        .map(|t| t.0.duration_since(now).unsigned_abs());
    loop {
        if let Some(wait) = wait.take() {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = cancel.cancelled() => return,
            }
        }
        match dispatcher.check(delivery) {
            RouteCheck::Gone(why) => {
                fail(target, why);
                reporter.report(target).await;
                return;
            }
            RouteCheck::Hold { route, why } => {
                let now = Timestamp::now();
                let since = target.held_since.get_or_insert(Time(now)).0;
                let held_for = now.duration_since(since).unsigned_abs();
                if held_for >= max_hold {
                    let why = held_too_long(held_for, max_hold, &why);
                    dispatcher
                        .record_failure(delivery, target.attempts.max(0) as u32, &why)
                        .await;
                    fail(target, why);
                    reporter.report(target).await;
                    return;
                }
                if target.state != TargetState::Held || target.error.as_ref() != Some(&why) {
                    target.state = TargetState::Held;
                    target.error = Some(why);
                    target.next_attempt_time = None;
                    reporter.report(target).await;
                }
                tokio::select! {
                    _ = route.superseded.cancelled() => {}
                    _ = tokio::time::sleep(max_hold - held_for) => {}
                    _ = cancel.cancelled() => return,
                }
                continue;
            }
            RouteCheck::NotSeenYet(_) => {
                // Only work routed by another replica names a version: ask again shortly.
                tokio::select! {
                    _ = tokio::time::sleep(NOT_SEEN_RECHECK) => {}
                    _ = cancel.cancelled() => return,
                }
                continue;
            }
            RouteCheck::Deliver(_) => {}
        }
        if target.state == TargetState::Held {
            target.state = TargetState::Pending;
            target.error = None;
            target.held_since = None;
            reporter.report(target).await;
        }
        let attempt = target.attempts.max(0) as u32 + 1;
        // Waiting for a slot stops when cancelled; an attempt being sent is finished and
        // recorded (its outcome is what the next run would otherwise redo).
        let slots = tokio::select! {
            // A cancelled delivery never starts an attempt, even when a slot is free at once.
            biased;
            _ = cancel.cancelled() => return,
            slots = dispatcher.reserve(delivery) => slots,
        };
        if !reporter.may_send() {
            return;
        }
        let result = dispatcher.send(delivery, attempt, slots).await;
        let Attempted::Sent(result) = result else {
            continue;
        };
        wait = apply(target, attempt, &result);
        if let Some(ticket) = order.as_deref()
            && wait.is_some()
        {
            ticket.retrying(&delivery.id, target.attempts);
        }
        reporter.report(target).await;
        if is_final(target.state) {
            return;
        }
    }
}

/// Delivers an event nothing stores (direct ingest): the same attempts and retries, recorded
/// only in the Webhook's history; held for at most `max_hold`. `target` is where it stands
/// (after [`attempt_first`], say). Ends early when `cancel` fires (the operator is stopping);
/// true when the delivery finished (succeeded or failed for good).
pub async fn deliver_unrecorded(
    dispatcher: &Dispatcher,
    delivery: &Delivery,
    mut target: TargetDelivery,
    max_hold: Duration,
    mut order: Option<Ticket>,
    cancel: &CancellationToken,
) -> bool {
    deliver(
        dispatcher,
        delivery,
        &mut target,
        max_hold,
        cancel,
        &Unrecorded,
        order.as_mut(),
    )
    .await;
    is_final(target.state)
}

/// What a source that runs its own workers (direct ingest) learns from [`attempt_first`].
#[derive(Debug, PartialEq, Eq)]
pub enum FirstAttempt {
    /// The target is final: nothing more to do.
    Done,
    /// Held, retrying or not sent: continue with [`deliver`] (it waits for
    /// `next_attempt_time`), in a task of its own, so that the worker takes the next delivery.
    Continue,
    /// `cancel` fired before the attempt was sent: nothing was sent.
    Cancelled,
}

/// The first attempt of a new delivery, sent at once by the caller's own task: no task, no
/// wait in line behind a semaphore. Unrecorded progress, as [`deliver_unrecorded`]. Nothing is
/// sent once `cancel` has fired; an attempt already being sent is not interrupted.
pub async fn attempt_first(
    dispatcher: &Dispatcher,
    delivery: &Delivery,
    target: &mut TargetDelivery,
    cancel: &CancellationToken,
) -> FirstAttempt {
    match dispatcher.check(delivery) {
        RouteCheck::Gone(why) => {
            fail(target, why);
            return FirstAttempt::Done;
        }
        RouteCheck::Hold { .. } | RouteCheck::NotSeenYet(_) => return FirstAttempt::Continue,
        RouteCheck::Deliver(_) => {}
    }
    let reserve = dispatcher.reserve(delivery);
    tokio::pin!(reserve);
    // Slots are usually free at once: only a delivery that has to wait for them also waits for
    // the token (polling it registers a waiter under a lock, which the hot path does without).
    let slots = match futures::poll!(reserve.as_mut()) {
        std::task::Poll::Ready(slots) => slots,
        std::task::Poll::Pending => tokio::select! {
            biased;
            _ = cancel.cancelled() => return FirstAttempt::Cancelled,
            slots = reserve => slots,
        },
    };
    // Right before the send: once stopping, no attempt starts (its record might not be
    // written any more).
    if cancel.is_cancelled() {
        return FirstAttempt::Cancelled;
    }
    let Attempted::Sent(result) = dispatcher.send(delivery, 1, slots).await else {
        return FirstAttempt::Continue;
    };
    apply(target, 1, &result);
    if is_final(target.state) {
        FirstAttempt::Done
    } else {
        FirstAttempt::Continue
    }
}

/// Records how attempt number `attempt` ended in `target`; the wait before the next one.
fn apply(target: &mut TargetDelivery, attempt: u32, result: &AttemptReport) -> Option<Duration> {
    target.attempts = attempt as i32;
    target.http_status = result.http_status;
    target.last_attempt_time = Some(result.time.clone());
    target.error = result.error.clone();
    match result.verdict {
        Verdict::Succeeded => {
            target.state = TargetState::Succeeded;
            target.next_attempt_time = None;
            None
        }
        Verdict::Retry(after) => {
            target.state = TargetState::Pending;
            let next = Timestamp::now()
                .checked_add(after)
                .unwrap_or_else(|_| Timestamp::now());
            target.next_attempt_time = Some(Time(next));
            Some(after)
        }
        Verdict::Failed | Verdict::Gone => {
            target.state = TargetState::Failed;
            target.next_attempt_time = None;
            None
        }
    }
}

fn fail(target: &mut TargetDelivery, why: String) {
    target.state = TargetState::Failed;
    target.next_attempt_time = None;
    target.error = Some(why);
}

/// Why a delivery held for `held_for` failed (`--max-hold` is `max_hold`).
pub(crate) fn held_too_long(held_for: Duration, max_hold: Duration, why: &str) -> String {
    format!(
        "held for {} (the limit, --max-hold, is {}): {why}",
        humantime::format_duration(round_secs(held_for)),
        humantime::format_duration(max_hold)
    )
}

fn round_secs(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}
