//! Direct deliveries: events nothing stores, delivered from memory by workers of this process.
//! Each Webhook has a line (a FIFO) drained by at most its per-Webhook limit of workers; a
//! worker sends a delivery's first attempt itself, and a delivery that must wait goes on in a
//! task of its own. Admission (how much may be in line) is the ingest API's.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    sync::{Notify, futures::Notified},
    task::AbortHandle,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    Delivery, Dispatcher, Ticket,
    engine::{Ending, InHand, Keeper, Parked, Wait, drive, new_target},
};
use crate::{crd::TargetDelivery, keys::WebhookKey};

/// Direct deliveries in line, one FIFO per Webhook, each drained by at most the dispatcher's
/// per-Webhook limit of workers. A worker sends the next delivery as soon as the last one is
/// answered: no task per delivery parked on semaphores, no wake-up hop between them.
///
/// The workers, and the tasks they start for retries and holds, are owned here: on shutdown
/// [`DirectLines::drain`] stops them, so that no attempt starts after the status writer has flushed.
#[derive(Default)]
pub struct DirectLines {
    lines: Mutex<Lines>,
    /// Fired on shutdown: no attempt starts any more, and waits (for a slot, a retry, a held
    /// Webhook) end. Workers check it before each delivery and right before each send: an
    /// atomic load, nothing more on the hot path.
    stop: CancellationToken,
    /// Fired when the grace for attempts being sent has passed: the retry tasks end at once
    /// (the workers still sending are aborted).
    abandon: CancellationToken,
    /// The workers and the retry tasks, so that the drain knows when they have all ended.
    tasks: TaskTracker,
    /// Deliveries that workers and retry tasks gave up because of the stop.
    given_up: AtomicUsize,
    /// Told each time a delivery leaves a line or a request's queue space comes back, so that
    /// a request waiting for room tries again (one waiter per move).
    moved: Notify,
}

#[derive(Default)]
struct Lines {
    by_webhook: HashMap<WebhookKey, Line>,
    /// The running workers, so that those still sending when the grace has passed can be
    /// aborted. Kept under the lock that starting and ending a worker takes anyway.
    workers: HashMap<tokio::task::Id, AbortHandle>,
}

#[derive(Default)]
struct Line {
    waiting: VecDeque<Queued>,
    workers: usize,
}

pub struct Queued {
    pub delivery: Delivery,
    /// Its place among its key's deliveries (`spec.ordering`).
    pub order: Option<Ticket>,
    /// What the delivery holds until it ends (its request's queue space): dropped then.
    pub hold: Arc<dyn Send + Sync>,
    /// When it was put in line.
    pub since: Instant,
}

/// Direct deliveries lost when the lines were drained.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Lost {
    /// Still in line: never attempted.
    pub in_line: usize,
    /// Retrying, held, or waiting for a slot: given up when the stop came.
    pub given_up: usize,
    /// Being sent when the grace ended: the attempt's outcome is not known (nor recorded).
    pub abandoned: usize,
}

impl Lost {
    pub fn total(&self) -> usize {
        self.in_line + self.given_up + self.abandoned
    }
}

impl DirectLines {
    /// Completes at the next move of a delivery (see [`DirectLines::moved_on`]).
    pub fn moved(&self) -> Notified<'_> {
        self.moved.notified()
    }

    /// Wakes one request waiting for room: a delivery left its line, or queue space came back.
    pub fn moved_on(&self) {
        self.moved.notify_one();
    }

    /// How long the oldest delivery in `webhook`'s line has waited (zero for an empty line).
    pub fn oldest_wait(&self, webhook: &WebhookKey, now: Instant) -> Duration {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines
            .by_webhook
            .get(webhook)
            .and_then(|line| line.waiting.front())
            .map_or(Duration::ZERO, |q| now.saturating_duration_since(q.since))
    }

    /// Puts `queued` in line and starts a worker if the line has fewer than the limit. False
    /// once stopping: nothing would send it, and it is dropped.
    pub fn push(
        self: &Arc<Self>,
        queued: Queued,
        dispatcher: &Arc<Dispatcher>,
        max_hold: Duration,
    ) -> bool {
        let key = queued.delivery.webhook.clone();
        let mut guard = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        // Under the lock: the drain counts the lines after the stop, so every delivery put in
        // line is either counted there or refused here.
        if self.stop.is_cancelled() {
            return false;
        }
        let lines = &mut *guard;
        let line = lines.by_webhook.entry(key.clone()).or_default();
        line.waiting.push_back(queued);
        if line.workers < dispatcher.per_webhook() {
            line.workers += 1;
            // Started under the lock, so that it is registered before it can end.
            let worker = self
                .tasks
                .spawn(self.clone().work(key, dispatcher.clone(), max_hold));
            lines.workers.insert(worker.id(), worker.abort_handle());
        }
        true
    }

    /// The next delivery of `webhook`'s line; None (and one worker fewer) when it is empty.
    /// Called by the worker itself.
    fn next(&self, webhook: &WebhookKey) -> Option<Queued> {
        let mut guard = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        let lines = &mut *guard;
        if let Some(line) = lines.by_webhook.get_mut(webhook) {
            if let Some(queued) = line.waiting.pop_front() {
                drop(guard);
                self.moved_on();
                return Some(queued);
            }
            line.workers -= 1;
            if line.workers == 0 {
                // Idle lines leave the map, so that it stays as small as the busy Webhooks.
                lines.by_webhook.remove(webhook);
            }
        }
        lines.workers.remove(&tokio::task::id());
        None
    }

    /// One worker: first attempts, in order. A delivery that must wait (a retry, a hold, its
    /// key's turn) goes on in a task of its own, so it never blocks the line.
    async fn work(
        self: Arc<Self>,
        webhook: WebhookKey,
        dispatcher: Arc<Dispatcher>,
        max_hold: Duration,
    ) {
        // Once stopping, what is still in line stays there: the drain counts it.
        while !self.stop.is_cancelled() {
            let Some(Queued {
                delivery,
                hold,
                mut order,
                ..
            }) = self.next(&webhook)
            else {
                return;
            };
            let mut target = new_target(&delivery);
            let first = FirstInLine { stop: &self.stop };
            let ending = drive(
                &dispatcher,
                &delivery,
                &mut target,
                max_hold,
                &first,
                order.as_mut(),
            )
            .await;
            match ending {
                Ending::Finished { .. } => {}
                Ending::Left(_) if !self.stop.is_cancelled() => {
                    let lines = self.clone();
                    let dispatcher = dispatcher.clone();
                    self.tasks.spawn(async move {
                        let in_hand = InHand { stop: &lines.stop };
                        let finished = tokio::select! {
                            ending = drive(
                                &dispatcher,
                                &delivery,
                                &mut target,
                                max_hold,
                                &in_hand,
                                order.as_mut(),
                            ) => matches!(ending, Ending::Finished { .. }),
                            _ = lines.abandon.cancelled() => false,
                        };
                        if !finished {
                            lines.given_up.fetch_add(1, Ordering::Relaxed);
                        }
                        drop(hold);
                    });
                }
                Ending::Left(_) | Ending::Stopped => {
                    self.given_up.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Puts `queued` in its line without starting a worker (tests of admission).
    #[cfg(test)]
    pub(crate) fn put_in_line(&self, queued: Queued) {
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        let line = lines.by_webhook.entry(queued.delivery.webhook.clone());
        line.or_default().waiting.push_back(queued);
    }

    /// Makes the oldest delivery in `webhook`'s line `by` older (tests of admission).
    #[cfg(test)]
    pub(crate) fn age_oldest(&self, webhook: &WebhookKey, by: Duration) {
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(oldest) = lines
            .by_webhook
            .get_mut(webhook)
            .and_then(|line| line.waiting.front_mut())
        {
            oldest.since -= by;
        }
    }

    /// Takes `webhook`'s whole line, as workers would (tests of admission).
    #[cfg(test)]
    pub(crate) fn take_line(&self, webhook: &WebhookKey) -> Vec<Queued> {
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines
            .by_webhook
            .remove(webhook)
            .map(|line| line.waiting.into())
            .unwrap_or_default()
    }

    /// Stops the lines: no attempt starts from now on, and waits end; attempts being sent get
    /// `grace` to finish (and be recorded), then are abandoned. Returns once every worker and
    /// retry task has ended, with the deliveries that did not finish.
    pub async fn drain(&self, grace: Duration) -> Lost {
        self.stop.cancel();
        self.tasks.close();
        let mut lost = Lost::default();
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                in_flight = self.tasks.len(),
                ?grace,
                "direct deliveries still being sent are abandoned"
            );
            {
                let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
                for worker in lines.workers.values().filter(|w| !w.is_finished()) {
                    worker.abort();
                    lost.abandoned += 1;
                }
            }
            self.abandon.cancel();
            self.tasks.wait().await;
        }
        let lines = {
            let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::take(&mut lines.by_webhook)
        };
        // Dropped outside the lock: their queue space goes back to the namespaces' counts.
        lost.in_line = lines.values().map(|line| line.waiting.len()).sum();
        drop(lines);
        lost.given_up = self.given_up.load(Ordering::Relaxed);
        lost
    }
}

/// The keeper of a first attempt made by a line's worker: whatever would wait goes to a task
/// of its own, so that the worker takes the next delivery.
struct FirstInLine<'a> {
    stop: &'a CancellationToken,
}

impl Keeper for FirstInLine<'_> {
    fn stopped(&self) -> &CancellationToken {
        self.stop
    }

    async fn park(&self, _: &Wait, _: &TargetDelivery) -> Parked {
        Parked::Elsewhere
    }
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;

    use super::*;
    use crate::{
        crd::{DeliveryPolicy, EventType},
        delivery::Source,
        metrics::Metrics,
        routing::Route,
        wire::EventBody,
    };

    /// `n` deliveries of one event each to the Webhook `ns`/`path` of `table`, holding `held`.
    fn in_line(
        table: &crate::routing::RoutingTable,
        held: &Arc<dyn Send + Sync>,
        ns: &str,
        path: &str,
        n: usize,
    ) -> Vec<Queued> {
        let route = table.get(&WebhookKey::new(ns, path)).unwrap().clone();
        let body = Arc::new(EventBody::new(
            EventType::Error,
            "2023-06-15T10:35:00Z",
            &Default::default(),
        ));
        (0..n)
            .map(|i| Queued {
                delivery: Delivery {
                    webhook: route.key.clone(),
                    webhook_uid: route.uid.as_str().into(),
                    routed_version: 0,
                    id: format!("msg_{ns}_{i}"),
                    event: body.clone(),
                    source: Source::Ingest,
                    manual: false,
                    timeout_cap: None,
                    trace: None,
                },
                order: None,
                hold: held.clone(),
                since: Instant::now(),
            })
            .collect()
    }

    /// A loopback endpoint: `/failing` answers 500 after `delay`, `/hanging` never answers.
    /// Returns its address and when each request arrived, by path.
    async fn endpoint(
        delay: Duration,
    ) -> (
        std::net::SocketAddr,
        Arc<Mutex<Vec<(&'static str, Instant)>>>,
    ) {
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let (failing, hanging) = (arrivals.clone(), arrivals.clone());
        let app = axum::Router::new()
            .route(
                "/failing",
                axum::routing::post(move || async move {
                    failing.lock().unwrap().push(("failing", Instant::now()));
                    tokio::time::sleep(delay).await;
                    StatusCode::INTERNAL_SERVER_ERROR
                }),
            )
            .route(
                "/hanging",
                axum::routing::post(move || async move {
                    hanging.lock().unwrap().push(("hanging", Instant::now()));
                    std::future::pending::<StatusCode>().await
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (addr, arrivals)
    }

    /// Stopping the lines: no attempt starts after the drain began, an attempt being sent
    /// finishes and is recorded within the grace, one that hangs is abandoned when the grace
    /// ends, and every delivery not finished is counted as lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn draining_the_lines_starts_no_attempt_and_counts_what_is_lost() {
        // reqwest is built without a default TLS provider (the binary installs ring).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (addr, arrivals) = endpoint(Duration::from_millis(200)).await;
        let routes = crate::routing::Routes::default();
        let signer =
            Arc::new(crate::wire::Signer::new(b"a-test-signing-secret-0123456789", None).unwrap());
        routes.update(|t| {
            for (ns, path) in [("a", "failing"), ("b", "hanging")] {
                t.apply(Route {
                    uid: format!("uid-{path}"),
                    signer: Some(signer.clone()),
                    delivery: DeliveryPolicy {
                        timeout_seconds: 300,
                        max_attempts: 50,
                        initial_backoff_seconds: 1,
                        max_backoff_seconds: 1,
                        ..DeliveryPolicy::default()
                    },
                    ..Route::for_tests(ns, path, &format!("http://{addr}/{path}"))
                });
            }
        });
        let (status, mut updates) = crate::status::test_channel(10_000);
        let (gone, _gone) = tokio::sync::mpsc::unbounded_channel();
        let dispatcher = Arc::new(Dispatcher::new(
            crate::delivery::HttpSender::new(crate::delivery::EgressPolicy::new(
                true,
                vec!["127.0.0.0/8".parse().unwrap()],
            )),
            routes.clone(),
            status,
            gone,
            Metrics::default(),
            crate::delivery::DispatcherConfig::default(),
        ));
        let lines = Arc::new(DirectLines::default());
        // What each delivery holds until it ends: all of them given back at the end.
        let held: Arc<dyn Send + Sync> = Arc::new(());
        let table = routes.snapshot();
        for queued in in_line(&table, &held, "a", "failing", 30)
            .into_iter()
            .chain(in_line(&table, &held, "b", "hanging", 1))
        {
            assert!(lines.push(queued, &dispatcher, Duration::from_secs(60)));
        }
        // First attempts and the first retries are under way.
        tokio::time::sleep(Duration::from_secs(2)).await;

        let grace = Duration::from_secs(1);
        let started = Instant::now();
        let lost = lines.drain(grace).await;
        let took = started.elapsed();
        // The hanging attempt holds the drain for the grace, and no longer.
        assert!(
            took >= grace && took < grace + Duration::from_millis(500),
            "the drain took {took:?}"
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        let arrivals = arrivals.lock().unwrap().clone();
        // An attempt sent just before the stop arrives within milliseconds; later arrivals are
        // attempts started after it.
        let late = arrivals
            .iter()
            .filter(|(_, at)| *at >= started + Duration::from_millis(100))
            .count();
        assert_eq!(
            late,
            0,
            "attempts started after the drain began ({} in all)",
            arrivals.len()
        );
        // Every attempt to the failing endpoint was answered within the grace and recorded;
        // the hanging one was abandoned, and nothing records it.
        let mut recorded = 0;
        while let Ok(update) = updates.try_recv() {
            if let crate::status::Update::DeliveryAttempt { key, .. } = update {
                assert_eq!(key, WebhookKey::new("a", "failing"));
                recorded += 1;
            }
        }
        let failing = arrivals.iter().filter(|(p, _)| *p == "failing").count();
        assert!(failing > 30, "retries were under way: {failing} attempts");
        assert_eq!(recorded, failing);
        // None of the 31 deliveries finished (the endpoint answers 500 to each of 50 attempts).
        assert_eq!(lost.total(), 31, "{lost:?}");
        assert_eq!(lost.abandoned, 1, "{lost:?}");
        // A delivery pushed after the stop is refused, not left in a line nobody drains.
        let after_stop = in_line(&table, &held, "a", "failing", 1).remove(0);
        assert!(!lines.push(after_stop, &dispatcher, Duration::from_secs(60)));
        // Every delivery gave back what it held.
        assert_eq!(Arc::strong_count(&held), 1);
    }
}
