//! Manual deliveries (`POST /api/webhooks/{id}/test` and `.../redeliver`): one attempt, now,
//! for a person waiting on the answer. Nothing waits: a delivery that would (held, busy, not
//! seen here) is refused with the reason instead.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{
    AttemptReport, Delivery, Dispatcher, Slots,
    engine::{self, Ending, Keeper, Parked, Wait},
};
use crate::crd::TargetDelivery;

/// How long a manual delivery waits for a delivery slot before it is refused as busy.
pub const MANUAL_SLOT_WAIT: Duration = Duration::from_secs(5);

/// Why a manual delivery sent nothing.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The Webhook cannot take it now (deleted, blocked, not seen by this replica): why.
    NotReady(String),
    /// Every slot of the Webhook (or of its namespace) stayed taken for [`MANUAL_SLOT_WAIT`].
    Busy,
}

/// Sends `delivery` once (`delivery.manual`: also to a paused Webhook, never retried) and
/// answers how the attempt went, or why nothing was sent.
pub async fn deliver_now(
    dispatcher: &Dispatcher,
    delivery: &Delivery,
) -> Result<AttemptReport, Refusal> {
    debug_assert!(delivery.manual, "a manual delivery is marked so");
    let keeper = Manual {
        never: CancellationToken::new(),
    };
    let mut target = engine::new_target(delivery);
    match engine::drive(
        dispatcher,
        delivery,
        &mut target,
        Duration::MAX,
        &keeper,
        None,
    )
    .await
    {
        Ending::Finished { last: Some(report) } => Ok(report),
        // Failed without an attempt: the Webhook is gone.
        Ending::Finished { last: None } | Ending::Stopped => Err(Refusal::NotReady(
            target
                .error
                .unwrap_or_else(|| "it cannot be delivered".into()),
        )),
        Ending::Left(Wait::Busy) => Err(Refusal::Busy),
        Ending::Left(Wait::Held { why, .. } | Wait::NotHere { why }) => Err(Refusal::NotReady(why)),
        // Nothing else leaves a manual delivery: it is one attempt, in no ordering, to the
        // Webhook's own route.
        Ending::Left(_) => Err(Refusal::NotReady("it cannot be sent now".into())),
    }
}

/// A person is waiting: nothing waits, and slots are waited for a short while only.
struct Manual {
    /// A manual delivery is not stopped part-way: it answers its request.
    never: CancellationToken,
}

impl Keeper for Manual {
    fn stopped(&self) -> &CancellationToken {
        &self.never
    }

    async fn park(&self, _: &Wait, _: &TargetDelivery) -> Parked {
        Parked::Elsewhere
    }

    async fn reserve(&self, dispatcher: &Dispatcher, delivery: &Delivery) -> Result<Slots, Wait> {
        tokio::time::timeout(MANUAL_SLOT_WAIT, dispatcher.reserve(delivery))
            .await
            .map_err(|_| Wait::Busy)
    }
}
