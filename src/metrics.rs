//! Prometheus metrics. Labels are bounded: kinds, outcomes, result classes, refusal reasons;
//! never object names. The one label that is not a fixed set is `namespace` on the delivery
//! metrics: the namespace of the Webhook delivered to, bounded by the namespaces the operator
//! watches (only they have Webhooks it routes to), as kube-state-metrics' `namespace` label is.

use std::sync::Arc;

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// The commit and the date of the build, when the build says them (the Dockerfile's `COMMIT`
/// and `BUILD_DATE` arguments, `hack/test.sh`); a plain `cargo build` leaves them unknown.
/// `hookrelay version` prints them; `hookrelay_build_info` exports the commit.
pub const BUILD_COMMIT: Option<&str> = option_env!("HOOKRELAY_BUILD_COMMIT");
pub const BUILD_DATE: Option<&str> = option_env!("HOOKRELAY_BUILD_DATE");

use crate::crd::Outcome;
use crate::http::Problem;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    /// The Webhook's namespace: bounded by the watched namespaces (see the module's doc).
    pub namespace: String,
    /// `Succeeded`, `Retrying` or `Failed`.
    pub outcome: &'static str,
    /// `2xx`, `3xx`, `4xx`, `5xx`, or `none` when no answer came.
    pub status_class: &'static str,
}

impl DeliveryLabels {
    pub fn new(namespace: &str, outcome: Outcome, http_status: Option<i32>) -> Self {
        let outcome = match outcome {
            Outcome::Succeeded => "Succeeded",
            Outcome::Retrying => "Retrying",
            Outcome::Failed => "Failed",
        };
        let status_class = match http_status {
            Some(200..=299) => "2xx",
            Some(300..=399) => "3xx",
            Some(400..=499) => "4xx",
            Some(_) => "5xx",
            None => "none",
        };
        Self {
            namespace: namespace.to_owned(),
            outcome,
            status_class,
        }
    }
}

/// A Webhook's namespace, on the delivery metrics that have no other label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NamespaceLabels {
    /// Bounded by the watched namespaces (see the module's doc).
    pub namespace: String,
}

impl NamespaceLabels {
    pub fn new(namespace: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildInfoLabels {
    /// The crate's version.
    pub version: &'static str,
    /// The commit it was built from, or `unknown` (see [`BUILD_COMMIT`]).
    pub commit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IngestRefusalLabels {
    /// The problem code the client got, one of those for lack of room
    /// ([`Problem::is_lack_of_room`]): a fixed set, so that the label is bounded.
    pub reason: &'static str,
}

/// The buckets of `hookrelay_delivery_duration_seconds`: 5 ms to about 41 s.
fn delivery_duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum ObjectKind {
    Webhook,
    DocumentEvent,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum PatchResult {
    Ok,
    Error,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusPatchLabels {
    pub kind: ObjectKind,
    pub result: PatchResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptRecordLabels {
    /// `published` to JetStream, `local_fallback` (the publish failed), or `received` from
    /// JetStream by the leader.
    pub path: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ParkLabels {
    /// Why a work item left the consumer to come back later: `retry`, `held`, `busy` (its
    /// namespace's places in hand were taken, or its slots did not turn over), `elsewhere`
    /// (this replica could not judge it) or `turn` (its rate-limit turn is far off).
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FilterLabels {
    /// `matched`, `not_matched`, `error` (the expression failed on the event, say a missing
    /// field: not delivered, like `not_matched`), `timeout` or `over_budget` (the event's or
    /// the namespace's filter budget ran out: not delivered, reported on the Webhook).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookStateLabels {
    /// `Active`, `Paused` or `Blocked` (see the Ready condition for why).
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KubeRequestLabels {
    /// The HTTP method, or `WATCH` for watch requests.
    pub verb: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// One of the standard methods, else `other`: a client cannot mint series.
    pub method: &'static str,
    /// The route template, such as `/api/webhooks/{id}`: bounded.
    pub route: String,
    pub code: u16,
}

/// Every metric the operator exports, shared by every task: a clone (one per request and per
/// delivery) is one reference count, not one per metric.
#[derive(Clone, Default)]
pub struct Metrics(Arc<MetricFamilies>);

impl std::ops::Deref for Metrics {
    type Target = MetricFamilies;

    fn deref(&self) -> &MetricFamilies {
        &self.0
    }
}

/// The metrics themselves, reached through [`Metrics`].
pub struct MetricFamilies {
    registry: Arc<Registry>,
    pub status_patches: Family<StatusPatchLabels, Counter>,
    pub webhooks: Family<WebhookStateLabels, Gauge>,
    pub kube_requests: Family<KubeRequestLabels, Counter>,
    pub deliveries: Family<DeliveryLabels, Counter>,
    pub delivery_duration: Family<NamespaceLabels, Histogram, fn() -> Histogram>,
    /// DocumentEvent deliveries (event x webhook) not finished yet, by the Webhook's namespace.
    pub pending_deliveries: Family<NamespaceLabels, Gauge>,
    pub http_requests: Family<HttpLabels, Counter>,
    /// 1 while this replica leads (always, without leader election).
    pub leader: Gauge,
    /// 1 while this replica's view of the Webhooks may be stale (the API server has not
    /// answered for `--view-stale-after`): it takes no shared work meanwhile.
    pub routing_view_stale: Gauge,
    /// Webhooks whose `Degraded` condition is True, as the watch shows them.
    pub webhooks_degraded: Gauge,
    /// Attempt records relayed through JetStream (`--ingest-mode jetstream`).
    pub attempt_records: Family<AttemptRecordLabels, Counter>,
    pub jetstream_parked: Family<ParkLabels, Counter>,
    /// `spec.filter` evaluations in the routing step, by result.
    pub filter_evaluations: Family<FilterLabels, Counter>,
    /// Deliveries that had to wait for their turn under a Webhook's `rateLimit`.
    pub rate_limited: Counter,
    /// Deliveries waiting for their turn under a Webhook's `rateLimit` now.
    pub rate_limit_waiting: Gauge,
    /// Direct ingest: deliveries accepted but not finished when the operator stopped (direct
    /// mode keeps them in memory only).
    pub direct_deliveries_lost: Counter,
    /// 1, labelled with the version and the commit.
    pub build_info: Family<BuildInfoLabels, Gauge>,
    /// Delivery slots (`--max-in-flight`) held by attempts talking to their endpoints now.
    pub delivery_slots_in_use: Gauge,
    /// `--max-in-flight`: attempts in flight at once, all Webhooks.
    pub delivery_slots: Gauge,
    /// Direct ingest: places of the direct queue held by deliveries not finished yet.
    pub direct_queue_used: Gauge,
    /// Direct ingest: the direct queue's size (`--direct-queue`); 0 in other modes.
    pub direct_queue_capacity: Gauge,
    /// `POST /api/events` requests refused for lack of room, by reason.
    pub ingest_refused: Family<IngestRefusalLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for MetricFamilies {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("hookrelay");
        let status_patches = Family::<StatusPatchLabels, Counter>::default();
        registry.register(
            "status_patches",
            "Status patches sent to the API server",
            status_patches.clone(),
        );
        let webhooks = Family::<WebhookStateLabels, Gauge>::default();
        registry.register(
            "webhooks",
            "Webhooks in the routing table by state",
            webhooks.clone(),
        );
        let kube_requests = Family::<KubeRequestLabels, Counter>::default();
        registry.register(
            "kube_api_requests",
            "Requests sent to the Kubernetes API server",
            kube_requests.clone(),
        );
        let deliveries = Family::<DeliveryLabels, Counter>::default();
        registry.register(
            "delivery_attempts",
            "Delivery attempts by the Webhook's namespace (bounded by the watched namespaces), outcome and HTTP status class",
            deliveries.clone(),
        );
        let delivery_duration =
            Family::<NamespaceLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                delivery_duration_histogram,
            );
        registry.register(
            "delivery_duration_seconds",
            "Time of one delivery attempt, request to response, by the Webhook's namespace (bounded by the watched namespaces)",
            delivery_duration.clone(),
        );
        let pending_deliveries = Family::<NamespaceLabels, Gauge>::default();
        registry.register(
            "pending_deliveries",
            "DocumentEvent deliveries (event x webhook) not finished yet, by the Webhook's namespace (bounded by the watched namespaces)",
            pending_deliveries.clone(),
        );
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "Requests to the REST API and ingest by route and status code",
            http_requests.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the Lease (delivers and writes status), else 0",
            leader.clone(),
        );
        let routing_view_stale = Gauge::default();
        registry.register(
            "routing_view_stale",
            "1 while this replica's view of the Webhooks may be stale (the API server has not answered for --view-stale-after): it is not ready and takes no shared JetStream work, else 0",
            routing_view_stale.clone(),
        );
        let webhooks_degraded = Gauge::default();
        registry.register(
            "webhooks_degraded",
            "Webhooks whose Degraded condition is True (consecutive failed attempts)",
            webhooks_degraded.clone(),
        );
        let attempt_records = Family::<AttemptRecordLabels, Counter>::default();
        registry.register(
            "attempt_records",
            "JetStream mode: attempt records published to the stream, given to the local status writer because the publish failed (local_fallback), or received by the leader",
            attempt_records.clone(),
        );
        let jetstream_parked = Family::<ParkLabels, Counter>::default();
        registry.register(
            "jetstream_parked",
            "JetStream mode: work items parked in the stream to come back later, by reason",
            jetstream_parked.clone(),
        );
        let filter_evaluations = Family::<FilterLabels, Counter>::default();
        registry.register(
            "filter_evaluations",
            "spec.filter evaluations in the routing step: matched, not_matched, or error (the event is not delivered)",
            filter_evaluations.clone(),
        );
        let rate_limited = Counter::default();
        registry.register(
            "rate_limited",
            "Deliveries that waited for their turn under their Webhook's spec.delivery.rateLimit (no attempt spent)",
            rate_limited.clone(),
        );
        let rate_limit_waiting = Gauge::default();
        registry.register(
            "rate_limit_waiting",
            "Deliveries waiting for their turn under their Webhook's spec.delivery.rateLimit now",
            rate_limit_waiting.clone(),
        );
        let direct_deliveries_lost = Counter::default();
        registry.register(
            "direct_deliveries_lost",
            "Direct ingest: deliveries accepted but not finished when the operator stopped (still in line, waiting to retry or held, or abandoned while being sent); direct mode is at-most-once across a restart",
            direct_deliveries_lost.clone(),
        );
        let build_info = Family::<BuildInfoLabels, Gauge>::default();
        registry.register(
            "build_info",
            "1, labelled with the version and the commit this operator was built from",
            build_info.clone(),
        );
        build_info
            .get_or_create(&BuildInfoLabels {
                version: env!("CARGO_PKG_VERSION"),
                commit: BUILD_COMMIT.unwrap_or("unknown"),
            })
            .set(1);
        let delivery_slots_in_use = Gauge::default();
        registry.register(
            "delivery_slots_in_use",
            "Delivery slots held by attempts talking to their endpoints now, every ingest mode (of hookrelay_delivery_slots)",
            delivery_slots_in_use.clone(),
        );
        let delivery_slots = Gauge::default();
        registry.register(
            "delivery_slots",
            "Delivery attempts in flight at once, all Webhooks (--max-in-flight)",
            delivery_slots.clone(),
        );
        let direct_queue_used = Gauge::default();
        registry.register(
            "direct_queue_used",
            "Direct ingest: places of the direct queue held by deliveries not finished yet (of hookrelay_direct_queue_capacity)",
            direct_queue_used.clone(),
        );
        let direct_queue_capacity = Gauge::default();
        registry.register(
            "direct_queue_capacity",
            "Direct ingest: the direct queue's size (--direct-queue); 0 in other ingest modes",
            direct_queue_capacity.clone(),
        );
        let ingest_refused = Family::<IngestRefusalLabels, Counter>::default();
        registry.register(
            "ingest_refused",
            "POST /api/events requests refused for lack of room, by reason (the error code the client got: queue_full, queue_slow, namespace_queue_full, too_many_deliveries, jetstream_full, jetstream_busy, namespace_quota, ingest_slow)",
            ingest_refused.clone(),
        );
        Self {
            registry: Arc::new(registry),
            status_patches,
            webhooks,
            kube_requests,
            deliveries,
            delivery_duration,
            pending_deliveries,
            http_requests,
            leader,
            routing_view_stale,
            webhooks_degraded,
            attempt_records,
            jetstream_parked,
            filter_evaluations,
            rate_limited,
            rate_limit_waiting,
            direct_deliveries_lost,
            build_info,
            delivery_slots_in_use,
            delivery_slots,
            direct_queue_used,
            direct_queue_capacity,
            ingest_refused,
        }
    }
}

impl MetricFamilies {
    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    /// Sets `hookrelay_webhooks{state}` from the routing table's counts by state label.
    pub fn set_route_counts(&self, counts: impl IntoIterator<Item = (&'static str, usize)>) {
        for (state, n) in counts {
            self.webhooks
                .get_or_create(&WebhookStateLabels { state })
                .set(n as i64);
        }
    }

    /// A kube client whose every request is counted in `hookrelay_kube_api_requests_total`.
    pub fn instrumented_client(&self, config: kube::Config) -> Result<kube::Client, kube::Error> {
        let counter = self.kube_requests.clone();
        let count =
            tower::util::MapRequestLayer::new(move |req: http::Request<kube::client::Body>| {
                let watch = req
                    .uri()
                    .query()
                    .is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"));
                let verb = match *req.method() {
                    _ if watch => "WATCH",
                    http::Method::GET => "GET",
                    http::Method::POST => "POST",
                    http::Method::PUT => "PUT",
                    http::Method::PATCH => "PATCH",
                    http::Method::DELETE => "DELETE",
                    _ => "OTHER",
                };
                counter.get_or_create(&KubeRequestLabels { verb }).inc();
                req
            });
        Ok(kube::client::ClientBuilder::try_from(config)?
            .with_layer(&count)
            .build())
    }

    /// Counts one request; `route` must be a route template or `unmatched`, never a raw path.
    pub fn observe_request(&self, method: &http::Method, route: &str, code: u16) {
        let labels = HttpLabels {
            method: method_label(method),
            route: route.to_owned(),
            code,
        };
        self.http_requests.get_or_create(&labels).inc();
    }

    pub fn observe_delivery(&self, labels: DeliveryLabels, duration: std::time::Duration) {
        self.delivery_duration
            .get_or_create(&NamespaceLabels {
                namespace: labels.namespace.clone(),
            })
            .observe(duration.as_secs_f64());
        self.deliveries.get_or_create(&labels).inc();
    }

    /// Counts a `POST /api/events` refusal if its problem is one for lack of room.
    pub fn observe_ingest_refusal(&self, problem: Problem) {
        if problem.is_lack_of_room() {
            self.ingest_refused
                .get_or_create(&IngestRefusalLabels {
                    reason: problem.code(),
                })
                .inc();
        }
    }

    /// The pending-deliveries gauge of `namespace`.
    pub fn pending_in(&self, namespace: &str) -> Gauge {
        self.pending_deliveries
            .get_or_create(&NamespaceLabels::new(namespace))
            .clone()
    }

    /// Status patches so far of `kind` with `result`.
    pub fn status_patch_count(&self, kind: ObjectKind, result: PatchResult) -> u64 {
        self.status_patches
            .get_or_create(&StatusPatchLabels { kind, result })
            .get()
    }
}

/// The `method` label: the methods the API knows, everything else `other`.
pub fn method_label(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::HEAD => "HEAD",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::PATCH => "PATCH",
        http::Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_method_labels_are_bounded() {
        assert_eq!(method_label(&http::Method::POST), "POST");
        assert_eq!(method_label(&http::Method::OPTIONS), "OPTIONS");
        for raw in ["AAAAA1", "AAAAA2", "TRACE", "CONNECT", "get"] {
            let method = http::Method::from_bytes(raw.as_bytes()).unwrap();
            assert_eq!(method_label(&method), "other", "{raw}");
        }
        let m = Metrics::default();
        for raw in ["AAAAA1", "AAAAA2", "AAAAA3"] {
            let method = http::Method::from_bytes(raw.as_bytes()).unwrap();
            m.observe_request(&method, "unmatched", 405);
        }
        let text = m.encode();
        let series = text
            .lines()
            .filter(|l| l.starts_with("hookrelay_http_requests_total{"))
            .collect::<Vec<_>>();
        assert_eq!(
            series,
            [r#"hookrelay_http_requests_total{method="other",route="unmatched",code="405"} 3"#],
            "{text}"
        );
    }

    #[test]
    fn counts_are_exported_in_text_format() {
        let m = Metrics::default();
        m.status_patches
            .get_or_create(&StatusPatchLabels {
                kind: ObjectKind::Webhook,
                result: PatchResult::Ok,
            })
            .inc();
        assert_eq!(
            m.status_patch_count(ObjectKind::Webhook, PatchResult::Ok),
            1
        );
        let text = m.encode();
        assert!(
            text.contains(r#"hookrelay_status_patches_total{kind="Webhook",result="Ok"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn delivery_metrics_are_labelled_with_the_webhooks_namespace() {
        let m = Metrics::default();
        let ms = std::time::Duration::from_millis(20);
        m.observe_delivery(
            DeliveryLabels::new("team-a", Outcome::Succeeded, Some(204)),
            ms,
        );
        m.observe_delivery(
            DeliveryLabels::new("team-b", Outcome::Failed, Some(500)),
            ms,
        );
        m.observe_delivery(DeliveryLabels::new("team-b", Outcome::Retrying, None), ms);
        let text = m.encode();
        for line in [
            r#"hookrelay_delivery_attempts_total{namespace="team-a",outcome="Succeeded",status_class="2xx"} 1"#,
            r#"hookrelay_delivery_attempts_total{namespace="team-b",outcome="Failed",status_class="5xx"} 1"#,
            r#"hookrelay_delivery_attempts_total{namespace="team-b",outcome="Retrying",status_class="none"} 1"#,
            r#"hookrelay_delivery_duration_seconds_count{namespace="team-a"} 1"#,
            r#"hookrelay_delivery_duration_seconds_count{namespace="team-b"} 2"#,
            r#"hookrelay_delivery_duration_seconds_bucket{le="0.04",namespace="team-b"} 2"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in {text}");
        }
        m.pending_in("team-a").inc();
        m.pending_in("team-a").inc();
        m.pending_in("team-a").dec();
        assert_eq!(m.pending_in("team-a").get(), 1);
        assert!(
            m.encode()
                .contains(r#"hookrelay_pending_deliveries{namespace="team-a"} 1"#)
        );
    }

    #[test]
    fn build_info_names_the_version_and_the_commit() {
        let text = Metrics::default().encode();
        let line = format!(
            r#"hookrelay_build_info{{version="{}",commit="{}"}} 1"#,
            env!("CARGO_PKG_VERSION"),
            BUILD_COMMIT.unwrap_or("unknown")
        );
        assert!(text.lines().any(|l| l == line), "{line} in {text}");
    }

    #[test]
    fn ingest_refusals_are_counted_by_reason_and_other_errors_are_not() {
        let m = Metrics::default();
        for problem in [
            Problem::QueueFull,
            Problem::QueueFull,
            Problem::JetstreamFull,
            Problem::IngestSlow,
        ] {
            m.observe_ingest_refusal(problem);
        }
        // Errors that are not for lack of room mint no series.
        for problem in [
            Problem::Invalid,
            Problem::NotReady,
            Problem::IdempotencyConflict,
            Problem::Forbidden,
        ] {
            m.observe_ingest_refusal(problem);
        }
        let text = m.encode();
        let mut series = text
            .lines()
            .filter(|l| l.starts_with("hookrelay_ingest_refused_total{"))
            .collect::<Vec<_>>();
        let mut expected = [
            r#"hookrelay_ingest_refused_total{reason="queue_full"} 2"#,
            r#"hookrelay_ingest_refused_total{reason="jetstream_full"} 1"#,
            r#"hookrelay_ingest_refused_total{reason="ingest_slow"} 1"#,
        ];
        series.sort_unstable();
        expected.sort_unstable();
        assert_eq!(series, expected, "{text}");
        // The alerts and the dashboard name these eight.
        let lack_of_room: Vec<&str> = Problem::ALL
            .iter()
            .filter(|p| p.is_lack_of_room())
            .map(|p| p.code())
            .collect();
        assert_eq!(
            lack_of_room,
            [
                "too_many_deliveries",
                "namespace_quota",
                "queue_full",
                "namespace_queue_full",
                "queue_slow",
                "ingest_slow",
                "jetstream_full",
                "jetstream_busy",
            ]
        );
    }
}
