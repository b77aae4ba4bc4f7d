//! Prometheus metrics. Labels are bounded: kinds, outcomes, result classes; never object names.

use std::sync::Arc;

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

use crate::crd::Outcome;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    /// `Succeeded`, `Retrying` or `Failed`.
    pub outcome: &'static str,
    /// `2xx`, `3xx`, `4xx`, `5xx`, or `none` when no answer came.
    pub status_class: &'static str,
}

impl DeliveryLabels {
    pub fn new(outcome: Outcome, http_status: Option<i32>) -> Self {
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
            outcome,
            status_class,
        }
    }
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

/// Every metric the operator exports, cheap to clone into each task.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub status_patches: Family<StatusPatchLabels, Counter>,
    pub webhooks: Family<WebhookStateLabels, Gauge>,
    pub kube_requests: Family<KubeRequestLabels, Counter>,
    pub deliveries: Family<DeliveryLabels, Counter>,
    pub delivery_duration: Histogram,
    /// Deliveries (event x webhook) not finished yet.
    pub pending_deliveries: Gauge,
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
    /// `spec.filter` evaluations in the routing step, by result.
    pub filter_evaluations: Family<FilterLabels, Counter>,
    /// Deliveries that had to wait for their turn under a Webhook's `rateLimit`.
    pub rate_limited: Counter,
    /// Deliveries waiting for their turn under a Webhook's `rateLimit` now.
    pub rate_limit_waiting: Gauge,
    /// Direct ingest: deliveries accepted but not finished when the operator stopped (direct
    /// mode keeps them in memory only).
    pub direct_deliveries_lost: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
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
            "Delivery attempts by outcome and HTTP status class",
            deliveries.clone(),
        );
        let delivery_duration = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "delivery_duration_seconds",
            "Time of one delivery attempt, request to response",
            delivery_duration.clone(),
        );
        let pending_deliveries = Gauge::default();
        registry.register(
            "pending_deliveries",
            "Deliveries (event x webhook) not finished yet",
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
            filter_evaluations,
            rate_limited,
            rate_limit_waiting,
            direct_deliveries_lost,
        }
    }
}

impl Metrics {
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
        self.deliveries.get_or_create(&labels).inc();
        self.delivery_duration.observe(duration.as_secs_f64());
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
}
