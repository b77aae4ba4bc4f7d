//! The gate of ordered deliveries on the leader's serial lane.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering as AtomicOrdering},
    },
    time::Duration,
};

use async_nats::jetstream::{self, consumer::pull};
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use crate::delivery::{Delivery, Dispatcher, Ticket};

/// How often the gate of ordered deliveries asks how far routing has come, while any wait.
const RELEASE_CHECK: Duration = Duration::from_millis(50);

/// The gate of ordered deliveries on the leader's serial lane.
///
/// Routers on several replicas route events concurrently, so the work items of events 1 and 2
/// may reach the serial subject in the other order. A work item carries its event's stream
/// sequence `s`, and waits here until every event up to `s` is routed (the router consumer's
/// ack floor is at least `s`: routers ack an event once its work items are stored) and every
/// work item stored by then has been received and registered (the serial consumer has handed
/// out everything up to the stream's last sequence, and this replica has pulled it). Then the
/// waiting items up to the floor take their tickets in event order.
pub(super) struct Release {
    router: jetstream::consumer::Consumer<pull::Config>,
    serial: jetstream::consumer::Consumer<pull::Config>,
    stream: jetstream::stream::Stream,
    dispatcher: Arc<Dispatcher>,
    state: Mutex<ReleaseState>,
    wake: Notify,
    /// The highest stream sequence pulled from the serial consumer and registered.
    pulled: AtomicU64,
}

/// An ordered delivery waiting for its event's release, and where its ticket goes.
type WaitingDelivery = (Delivery, oneshot::Sender<Option<Ticket>>);

#[derive(Default)]
struct ReleaseState {
    /// Events up to this sequence are released.
    floor: u64,
    /// (event sequence, arrival) -> the delivery and where its ticket goes.
    waiting: BTreeMap<(u64, u64), WaitingDelivery>,
    arrivals: u64,
}

impl Release {
    /// The gate of the serial lane `serial`, whose events the `router` consumer routes from
    /// `stream`; started with [`Release::run`].
    pub(super) fn new(
        router: jetstream::consumer::Consumer<pull::Config>,
        serial: jetstream::consumer::Consumer<pull::Config>,
        stream: jetstream::stream::Stream,
        dispatcher: Arc<Dispatcher>,
    ) -> Self {
        Self {
            router,
            serial,
            stream,
            dispatcher,
            state: Mutex::default(),
            wake: Notify::new(),
            pulled: AtomicU64::new(0),
        }
    }

    /// Every message up to stream sequence `sequence` was pulled and registered.
    pub(super) fn pulled(&self, sequence: u64) {
        self.pulled.fetch_max(sequence, AtomicOrdering::SeqCst);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ReleaseState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where the ticket of `delivery` (event sequence `sequence`) comes once released.
    pub(super) fn wait_for(
        &self,
        sequence: u64,
        delivery: Delivery,
    ) -> oneshot::Receiver<Option<Ticket>> {
        let (tx, rx) = oneshot::channel();
        let mut state = self.lock();
        if sequence <= state.floor {
            // Redelivered after the floor passed it (a hand-over): in the order received.
            let _ = tx.send(self.dispatcher.ticket(&delivery, sequence));
        } else {
            let arrival = state.arrivals;
            state.arrivals += 1;
            state.waiting.insert((sequence, arrival), (delivery, tx));
            self.wake.notify_one();
        }
        rx
    }

    pub(super) async fn run(self: Arc<Self>, stop: CancellationToken) {
        loop {
            if self.lock().waiting.is_empty() {
                tokio::select! {
                    _ = self.wake.notified() => continue,
                    _ = stop.cancelled() => return,
                }
            }
            match self.routed_floor().await {
                Ok(Some(floor)) => self.release(floor),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "JetStream serial deliverer: cannot read how far routing has come; ordered deliveries wait")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(RELEASE_CHECK) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// The router's ack floor, once every work item stored before it was read is registered.
    async fn routed_floor(&self) -> Result<Option<u64>, String> {
        let floor = self
            .router
            .get_info()
            .await
            .map_err(|e| e.to_string())?
            .ack_floor
            .stream_sequence;
        let last = self
            .stream
            .get_info()
            .await
            .map_err(|e| e.to_string())?
            .state
            .last_sequence;
        let serial = self.serial.get_info().await.map_err(|e| e.to_string())?;
        Ok(released_floor(
            floor,
            last,
            serial.num_pending,
            serial.delivered.stream_sequence,
            self.pulled.load(AtomicOrdering::SeqCst),
        ))
    }

    /// Gives the waiting deliveries of events up to `floor` their tickets, in event order.
    fn release(&self, floor: u64) {
        let mut state = self.lock();
        let floor = state.floor.max(floor);
        state.floor = floor;
        while let Some(entry) = state.waiting.first_entry() {
            let sequence = entry.key().0;
            if sequence > floor {
                break;
            }
            let (delivery, tx) = entry.remove();
            let _ = tx.send(self.dispatcher.ticket(&delivery, sequence));
        }
    }
}

/// How far ordered deliveries may be released, read in this order: `routed` (the router's ack
/// floor: every event up to it has its work items stored), `last` (the stream's last sequence
/// just after: every such work item is at or below it), then the serial consumer's messages not
/// yet handed out and the last one handed out, and what this replica has pulled and registered.
/// None while a work item stored before `last` may not have reached this replica.
fn released_floor(
    routed: u64,
    last: u64,
    serial_not_handed_out: u64,
    serial_handed_out: u64,
    pulled: u64,
) -> Option<u64> {
    let handed_out = serial_not_handed_out == 0 || serial_handed_out >= last;
    (handed_out && pulled >= serial_handed_out).then_some(routed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordered_deliveries_are_released_only_once_every_earlier_work_item_is_here() {
        // Routed up to event 40; the stream ends at 50; the serial consumer handed out up to
        // 45 and has nothing else: once this replica pulled 45, events up to 40 go.
        assert_eq!(released_floor(40, 50, 0, 45, 45), Some(40));
        // A work item handed out but not yet pulled here (it may be an earlier event's).
        assert_eq!(released_floor(40, 50, 0, 45, 44), None);
        // Work items stored but not handed out yet, some possibly at or below 50.
        assert_eq!(released_floor(40, 50, 3, 45, 45), None);
        // ... unless everything up to the stream's last sequence was handed out already.
        assert_eq!(released_floor(40, 50, 3, 52, 52), Some(40));
    }
}
