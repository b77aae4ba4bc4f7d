//! Filters evaluated off the async workers, within a time budget per event and per namespace.
//!
//! A filter's cost is bounded by its shape (see `filter`): linear in the event. For a 1 MiB
//! event that is still tens of milliseconds, too long for a runtime worker that also serves
//! every other namespace. So an event whose namespace has filtered routes is screened on a
//! blocking thread, and:
//! - **per event**, its filters have [`FilterBudget::per_event`] in all, waiting for the
//!   namespace's turn included; a filter not decided by then does not match (`timeout`);
//! - **per namespace**, evaluations go one at a time, and a namespace may use
//!   [`FilterBudget::per_namespace`] of evaluation time per second on average (a bucket of
//!   [`BUCKET_SECONDS`] seconds' worth); once spent, its filters do not match until it refills
//!   (`over_budget`).
//!
//! Either way the event is not delivered to that Webhook and the failure is reported on it (a
//! metric, a log line, a Kubernetes Event at most once a minute): a filter failure of that
//! Webhook, never a wait for another namespace. A thread that overruns its budget finishes on
//! its own (evaluation cannot be interrupted; its cost is linear), holding its namespace's turn.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::{OwnedMutexGuard, Semaphore};

use super::{EventFacts, Route, RouteState, RoutingTable};
use crate::{
    crd::{EventType, ready_reason::FILTER_INVALID},
    keys::WebhookKey,
    metrics::{FilterLabels, Metrics},
};

/// How many seconds of `per_namespace` a namespace may save up.
pub const BUCKET_SECONDS: u32 = 4;
/// How often a Webhook's filter failures are reported as a Kubernetes Event, at most.
const REPORT_EVERY: Duration = Duration::from_secs(60);
/// Namespaces remembered before idle ones (a full bucket, nobody evaluating) are forgotten.
const REMEMBERED: usize = 1024;

/// How much filter evaluation an event and a namespace may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilterBudget {
    /// The filters of one event, in all, waiting for the namespace's turn included.
    pub per_event: Duration,
    /// Evaluation time one namespace may use per second, on average.
    pub per_namespace: Duration,
}

impl Default for FilterBudget {
    fn default() -> Self {
        Self {
            per_event: Duration::from_millis(500),
            per_namespace: Duration::from_millis(250),
        }
    }
}

/// What an event offers its filters; produced on the evaluating thread, so that parsing and
/// converting the event's data happen there too.
pub trait FilterInput: Send + Sync + 'static {
    fn facts(&self) -> EventFacts<'_>;
}

/// Why a filter let an event through or not, beyond its own answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterFailure {
    /// The event's filters ran out of `per_event`.
    Timeout,
    /// The namespace spent its `per_namespace` budget.
    OverBudget,
}

impl FilterFailure {
    fn label(self) -> &'static str {
        match self {
            FilterFailure::Timeout => "timeout",
            FilterFailure::OverBudget => "over_budget",
        }
    }

    fn explain(self, budget: &FilterBudget) -> String {
        match self {
            FilterFailure::Timeout => format!(
                "its filter was not decided within {} ms (the filters of one event, waiting for the namespace's turn included): simplify the filter or send smaller events",
                budget.per_event.as_millis()
            ),
            FilterFailure::OverBudget => format!(
                "the namespace's filters used their {} ms of evaluation per second: simplify the filters or send smaller events",
                budget.per_namespace.as_millis()
            ),
        }
    }
}

/// A filter failure, as the operator reports it on the Webhook.
#[derive(Clone, Debug)]
pub struct FilterReport {
    pub webhook: WebhookKey,
    pub uid: String,
    pub event: EventType,
    /// Failures of this Webhook's filter since the last report.
    pub count: u64,
    pub message: String,
}

type Reporter = Arc<dyn Fn(FilterReport) + Send + Sync>;

/// Screens events through their routes' filters (see the module's comment).
pub struct Screen {
    budget: FilterBudget,
    namespaces: Mutex<HashMap<Arc<str>, Arc<NamespaceTurn>>>,
    /// Evaluating threads in all, so that many namespaces at once cannot take every core.
    threads: Arc<Semaphore>,
    reporter: Mutex<Option<Reporter>>,
    reported: Mutex<HashMap<WebhookKey, (Option<Instant>, u64)>>,
}

impl Default for Screen {
    fn default() -> Self {
        Self::new(FilterBudget::default())
    }
}

/// One namespace's turn and its bucket of evaluation time.
struct NamespaceTurn {
    turn: Arc<tokio::sync::Mutex<()>>,
    bucket: Mutex<Bucket>,
}

struct Bucket {
    /// Evaluation time left, in seconds; negative after an evaluation that overran it.
    credit: f64,
    at: Instant,
}

impl NamespaceTurn {
    fn new(capacity: f64) -> Self {
        Self {
            turn: Default::default(),
            bucket: Mutex::new(Bucket {
                credit: capacity,
                at: Instant::now(),
            }),
        }
    }

    /// Refills the bucket for the time passed; whether any evaluation time is left.
    fn has_credit(&self, budget: &FilterBudget) -> bool {
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let rate = budget.per_namespace.as_secs_f64();
        let now = Instant::now();
        bucket.credit = (bucket.credit + rate * now.duration_since(bucket.at).as_secs_f64())
            .min(rate * f64::from(BUCKET_SECONDS));
        bucket.at = now;
        bucket.credit > 0.0
    }

    fn charge(&self, used: Duration) {
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        bucket.credit -= used.as_secs_f64();
    }

    fn idle(&self, budget: &FilterBudget) -> bool {
        self.turn.try_lock().is_ok() && {
            let bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
            bucket.credit >= budget.per_namespace.as_secs_f64() * f64::from(BUCKET_SECONDS)
        }
    }
}

/// What one route's filter said.
enum Verdict {
    Deliver,
    Skip,
    Failed(FilterFailure),
}

impl Screen {
    pub fn new(budget: FilterBudget) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        Self {
            budget,
            namespaces: Default::default(),
            threads: Arc::new(Semaphore::new(cores.max(2))),
            reporter: Default::default(),
            reported: Default::default(),
        }
    }

    pub fn budget(&self) -> FilterBudget {
        self.budget
    }

    /// Where filter failures are reported on their Webhook (a Kubernetes Event), beside the
    /// metric and the log line.
    pub fn report_to(&self, reporter: impl Fn(FilterReport) + Send + Sync + 'static) {
        *self.reporter.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(reporter));
    }

    /// The routes of `namespace` that take an event of type `event`, when no filter has to be
    /// evaluated for it (a route whose filter does not compile takes nothing); None when one
    /// has, for [`Self::targets`] to decide.
    pub fn without_evaluation(
        table: &RoutingTable,
        namespace: &str,
        event: EventType,
    ) -> Option<Vec<Arc<Route>>> {
        let mut routes = Vec::new();
        for route in table.lookup(namespace, event) {
            if filter_invalid(route) {
                continue;
            }
            if route.filter.is_some() {
                return None;
            }
            routes.push(route.clone());
        }
        Some(routes)
    }

    /// The routes of `namespace` that take `input`, an event of type `event`, in name order:
    /// the ones without a filter at once, the filtered ones once their filters let it through.
    pub async fn targets<I: FilterInput>(
        &self,
        table: &RoutingTable,
        namespace: &str,
        event: EventType,
        input: Arc<I>,
        metrics: &Metrics,
    ) -> Vec<Arc<Route>> {
        if let Some(routes) = Self::without_evaluation(table, namespace, event) {
            return routes;
        }
        let routes: Vec<Arc<Route>> = table.lookup(namespace, event).cloned().collect();
        let filtered: Vec<usize> = routes
            .iter()
            .enumerate()
            .filter(|(_, r)| r.filter.is_some() && !filter_invalid(r))
            .map(|(i, _)| i)
            .collect();
        let mut verdicts: Vec<Verdict> = routes
            .iter()
            .map(|r| {
                if filter_invalid(r) {
                    // Fail closed: a filter that does not compile lets nothing through.
                    Verdict::Skip
                } else {
                    Verdict::Deliver
                }
            })
            .collect();
        if !filtered.is_empty() {
            let filters = filtered
                .iter()
                .filter_map(|i| routes[*i].filter.clone())
                .collect();
            let answers = self.evaluate(namespace, filters, input).await;
            for (n, i) in filtered.iter().enumerate() {
                verdicts[*i] = match answers.get(n) {
                    Some(Ok(answer)) => {
                        let (verdict, result) = match answer {
                            Ok(true) => (Verdict::Deliver, "matched"),
                            Ok(false) => (Verdict::Skip, "not_matched"),
                            Err(e) => {
                                tracing::debug!(webhook = %routes[*i].key, error = %e, "filter failed on an event: not delivered");
                                (Verdict::Skip, "error")
                            }
                        };
                        count(metrics, result);
                        verdict
                    }
                    Some(Err(failure)) => Verdict::Failed(*failure),
                    None => Verdict::Failed(FilterFailure::Timeout),
                };
            }
        }
        routes
            .into_iter()
            .zip(verdicts)
            .filter_map(|(route, verdict)| match verdict {
                Verdict::Deliver => Some(route),
                Verdict::Skip => None,
                Verdict::Failed(failure) => {
                    count(metrics, failure.label());
                    self.report(&route, event, failure);
                    None
                }
            })
            .collect()
    }

    /// Evaluates `filters` in order on a blocking thread, within the budgets: one answer per
    /// filter decided in time, or the failure that stopped them all.
    async fn evaluate<I: FilterInput>(
        &self,
        namespace: &str,
        filters: Vec<Arc<super::EventFilter>>,
        input: Arc<I>,
    ) -> Vec<Result<Result<bool, String>, FilterFailure>> {
        let all_failed = |failure| vec![Err(failure); filters.len()];
        let deadline = tokio::time::Instant::now() + self.budget.per_event;
        let turn = self.turn(namespace);
        let Ok(guard) = tokio::time::timeout_at(deadline, turn.turn.clone().lock_owned()).await
        else {
            return all_failed(FilterFailure::Timeout);
        };
        if !turn.has_credit(&self.budget) {
            return all_failed(FilterFailure::OverBudget);
        }
        let Ok(thread) =
            tokio::time::timeout_at(deadline, self.threads.clone().acquire_owned()).await
        else {
            return all_failed(FilterFailure::Timeout);
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let until = deadline.into_std();
        let wanted = filters.len();
        tokio::task::spawn_blocking(move || {
            let _held: (OwnedMutexGuard<()>, _) = (guard, thread);
            let started = Instant::now();
            let facts = input.facts();
            let mut answers = Vec::with_capacity(filters.len());
            for filter in &filters {
                if Instant::now() >= until {
                    break;
                }
                answers.push(filter.evaluate(&facts));
            }
            turn.charge(started.elapsed());
            let _ = tx.send(answers);
        });
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(answers)) => {
                let mut answers: Vec<_> = answers.into_iter().map(Ok).collect();
                answers.resize(wanted, Err(FilterFailure::Timeout));
                answers
            }
            _ => vec![Err(FilterFailure::Timeout); wanted],
        }
    }

    fn turn(&self, namespace: &str) -> Arc<NamespaceTurn> {
        let mut namespaces = self.namespaces.lock().unwrap_or_else(|e| e.into_inner());
        if namespaces.len() >= REMEMBERED && !namespaces.contains_key(namespace) {
            namespaces.retain(|_, turn| !turn.idle(&self.budget));
        }
        let capacity = self.budget.per_namespace.as_secs_f64() * f64::from(BUCKET_SECONDS);
        namespaces
            .entry(namespace.into())
            .or_insert_with(|| Arc::new(NamespaceTurn::new(capacity)))
            .clone()
    }

    /// A failure is logged each time and reported on the Webhook at most once a minute, with
    /// the count since the last report.
    fn report(&self, route: &Route, event: EventType, failure: FilterFailure) {
        let why = failure.explain(&self.budget);
        tracing::warn!(webhook = %route.key, event = event.as_str(), "event not delivered: {why}");
        let count = {
            let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
            if reported.len() >= REMEMBERED {
                reported.retain(|_, (at, _)| at.is_some_and(|at| at.elapsed() < REPORT_EVERY));
            }
            let (at, count) = reported.entry(route.key.clone()).or_default();
            *count += 1;
            if at.is_some_and(|at| at.elapsed() < REPORT_EVERY) {
                return;
            }
            *at = Some(Instant::now());
            std::mem::take(count)
        };
        let reporter = self
            .reporter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(reporter) = reporter {
            reporter(FilterReport {
                webhook: route.key.clone(),
                uid: route.uid.clone(),
                event,
                count,
                message: format!(
                    "{count} event(s) of type {} not delivered: {why}",
                    event.as_str()
                ),
            });
        }
    }
}

fn filter_invalid(route: &Route) -> bool {
    matches!(&route.state, RouteState::Blocked { reason, .. } if *reason == FILTER_INVALID)
}

fn count(metrics: &Metrics, result: &'static str) {
    metrics
        .filter_evaluations
        .get_or_create(&FilterLabels { result })
        .inc();
}
