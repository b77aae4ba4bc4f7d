//! Parking: a work item that must wait leaves the consumer and comes back, scheduled by the
//! stream, with what it carries (attempts, hold, backoff) in its headers.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, AckKind, Context};
use tokio_util::sync::CancellationToken;

use super::messages::{WorkItem, work_item_headers};
use super::{ATTEMPTS_HEADER, Subjects};

/// A work item parked without an attempt (held, or its namespace busy) comes back after
/// PARK_MIN, doubling each time it is parked again, up to PARK_MAX; each delay is spread over
/// its second half so that items parked together do not come back together.
pub(super) const PARK_MIN: Duration = Duration::from_secs(1);
const PARK_MAX: Duration = Duration::from_secs(30);
/// Times a parked work item is published before it is nak'd instead.
const PARK_PUBLISH_TRIES: usize = 3;
/// A work item parked for its turn comes back this long before its place in the backlog.
const TURN_BACK_BEFORE: Duration = Duration::from_millis(2_500);

/// Why a work item leaves the consumer for a while: the message is acked and the same work item
/// is published again, scheduled by the stream, so that it does not count against
/// `max_ack_pending` meanwhile.
#[derive(Debug, PartialEq)]
pub(super) enum Park {
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

impl Park {
    /// The `reason` label of `hookrelay_jetstream_parked_total`.
    pub(super) fn reason(&self) -> &'static str {
        match self {
            Park::Retry { .. } => "retry",
            Park::Held { .. } => "held",
            Park::Busy => "busy",
            Park::Elsewhere => "elsewhere",
            Park::Turn { .. } => "turn",
        }
    }
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

pub(super) fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// Publishes the work item again, scheduled by the stream after the park's delay, then acks
/// this message. If the stream does not take it, the message is nak'd with the delay
/// instead (kept in the consumer's pending meanwhile: correct, only less fair).
#[allow(clippy::too_many_arguments)]
pub(super) async fn park(
    context: &Context,
    stream: &jetstream::stream::Stream,
    subjects: &Subjects,
    stop: &CancellationToken,
    message: &jetstream::Message,
    sequence: u64,
    item: &WorkItem,
    park: Park,
) {
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
    let subject = subjects.schedule(&delivery.webhook, &delivery.id);
    // Published again if the stream's answer does not come (its message id makes a second
    // copy a duplicate): a nak would count as a hand-out, so as an attempt.
    let mut stored = Err(String::new());
    for _ in 0..PARK_PUBLISH_TRIES {
        stored = store_copy(context, &subject, headers.clone(), message).await;
        if stored.is_ok() || stop.is_cancelled() {
            break;
        }
    }
    let why = "could not park a work item; it waits in the consumer instead";
    settle_original(stream, message, &delivery.id, stored, why, after).await;
}

/// Publishes `message`'s payload to `subject` with `headers` and waits for the stream to
/// store it.
pub(super) async fn store_copy(
    context: &Context,
    subject: &str,
    headers: async_nats::HeaderMap,
    message: &jetstream::Message,
) -> Result<(), String> {
    let ack = context
        .publish_with_headers(subject.to_owned(), headers, message.payload.clone())
        .await
        .map_err(|e| e.to_string())?;
    ack.await.map(drop).map_err(|e| e.to_string())
}

/// Deletes `message` from the stream once settled, if it is a deliverer's copy of a work item
/// (parked, or moved to the serial lane: it carries the attempts header) whose own copy or
/// final outcome supersedes it. The stream keeps everything for `--nats-max-age` (limits
/// retention), so without this every park of a held or retried item, every few seconds, would
/// leave one more copy of the whole event for a day: a held Webhook could fill the stream. The
/// router's original work item stays (recover reads the event from it). Only acked messages
/// are deleted; a copy a failed delete leaves behind ages out with the stream's limits.
pub(super) async fn forget_copy(stream: &jetstream::stream::Stream, message: &jetstream::Message) {
    let is_copy = message
        .headers
        .as_ref()
        .and_then(|h| h.get(ATTEMPTS_HEADER))
        .is_some();
    let Ok(info) = message.info() else {
        return;
    };
    if !is_copy {
        return;
    }
    if let Err(e) = stream.delete_message(info.stream_sequence).await {
        tracing::debug!(sequence = info.stream_sequence, error = %e, "JetStream: a superseded copy of a work item could not be deleted; it ages out");
    }
}

/// Once its copy is `stored`, acks the original message (and deletes it if it was itself a
/// copy); otherwise naks it for another try after `retry` (`why` says what failed).
pub(super) async fn settle_original(
    stream: &jetstream::stream::Stream,
    message: &jetstream::Message,
    delivery_id: &str,
    stored: Result<(), String>,
    why: &str,
    retry: Duration,
) {
    let result = match stored {
        Ok(()) => message.ack().await.map(|()| true),
        Err(e) => {
            tracing::warn!(delivery = %delivery_id, error = %e, "JetStream deliverer: {why}");
            message
                .ack_with(AckKind::Nak(Some(retry)))
                .await
                .map(|()| false)
        }
    };
    match result {
        Ok(true) => forget_copy(stream, message).await,
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(delivery = %delivery_id, error = %e, "JetStream deliverer: could not settle a work item; it is redelivered");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{crd::EventType, delivery::Delivery, keys::WebhookKey, wire::EventBody};
    use std::sync::Arc;

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
}
