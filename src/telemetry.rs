//! OpenTelemetry traces over ingest -> route -> each attempt, exported with OTLP over HTTP
//! (protobuf) when the standard variables ask for it (`OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; `OTEL_SERVICE_NAME`, `OTEL_EXPORTER_OTLP_HEADERS`,
//! `OTEL_BSP_*`, `OTEL_SDK_DISABLED` as the SDK reads them).
//!
//! The spans are `tracing` spans of the target [`TARGET`], seen only by the OpenTelemetry
//! layer (the log output never shows them). Without an endpoint no layer wants that target, so
//! the spans are disabled at their call sites: nothing is built, nothing is sent.
//!
//! The W3C trace context travels with the event: a `traceparent` received at ingest is the
//! parent of the `ingest` span; a DocumentEvent carries its ingest span's in the annotation
//! [`TRACEPARENT_ANNOTATION`], a JetStream event and work item in the header `traceparent`, a
//! direct delivery in memory ([`crate::delivery::Delivery::trace`]); every attempt sends its own
//! span's `traceparent` to the receiver.

use std::collections::HashMap;

use opentelemetry::{
    Context,
    propagation::TextMapPropagator,
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_sdk::{propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The `tracing` target of the spans exported to OpenTelemetry.
pub const TARGET: &str = "hookrelay::otel";
/// The W3C header (HTTP and NATS) and its key in the propagator's carrier.
pub const TRACEPARENT: &str = "traceparent";
/// Annotation of a DocumentEvent: the `traceparent` of the ingest span that created it.
pub const TRACEPARENT_ANNOTATION: &str = "hookrelay.dev/traceparent";

/// Whether the standard variables ask for traces to be exported.
pub fn configured() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// The tracer provider exporting over OTLP/HTTP, when [`configured`]; must be called within a
/// Tokio runtime (the batch exporter runs as one of its tasks). Shut it down on exit, so that
/// the last spans are sent.
pub fn provider() -> Result<Option<SdkTracerProvider>, String> {
    if !configured() {
        return Ok(None);
    }
    // reqwest is built without a default TLS provider: the exporter's client (https
    // collectors) uses ring, as the rest of the operator does.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| format!("the OTLP exporter cannot be built: {e}"))?;
    let processor =
        opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(
            std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "hookrelay".into()),
        )
        .build();
    Ok(Some(
        SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource)
            .build(),
    ))
}

/// The `tracing` layer that exports the spans of [`TARGET`] through `provider`, and only those.
pub fn layer<S>(provider: &SdkTracerProvider) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer;
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("hookrelay"))
        .with_filter(
            tracing_subscriber::filter::Targets::new().with_target(TARGET, tracing::Level::TRACE),
        )
}

/// The log filter, without the spans exported to OpenTelemetry: they are not log lines, and
/// with no exporter nothing then wants them.
pub fn log_filter(filter: tracing_subscriber::EnvFilter) -> tracing_subscriber::EnvFilter {
    filter.add_directive(format!("{TARGET}=off").parse().expect("a valid directive"))
}

/// The trace context a `traceparent` value names (an empty context when it names none).
pub fn context_of(traceparent: Option<&str>) -> Context {
    let Some(traceparent) = traceparent else {
        return Context::new();
    };
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    TraceContextPropagator::new().extract(&carrier)
}

/// Makes the span a child of the trace `traceparent` names, if any (a span that is disabled, or
/// a value that names no trace, is left alone).
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    if span.is_disabled() {
        return;
    }
    let cx = context_of(traceparent);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Links the span to the trace `traceparent` names (a client's), without joining it: the span
/// stays the root of a trace of its own, so that a client cannot place hookrelay's spans in a
/// trace it chose, in a collector other tenants share. Tracing UIs show the link.
pub fn link_trace(span: &tracing::Span, traceparent: Option<&str>) {
    if span.is_disabled() {
        return;
    }
    let cx = context_of(traceparent);
    let linked = cx.span().span_context().clone();
    if linked.is_valid() {
        span.add_link(linked);
    }
}

/// The span of routing the event `event_id` (of type `event`, in `namespace`) to its Webhooks:
/// a child of the current span (ingest's) unless given another parent; each attempt's span is
/// its child.
pub fn route_span(namespace: &str, event: crate::crd::EventType, event_id: &str) -> tracing::Span {
    tracing::info_span!(
        target: TARGET,
        "route",
        hookrelay.namespace = namespace,
        hookrelay.event = event.as_str(),
        hookrelay.event_id = event_id,
    )
}

/// The `traceparent` of `span`, to send on; None when the span is not exported.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove(TRACEPARENT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TraceId;

    #[test]
    fn a_traceparent_names_its_trace_and_garbage_names_none() {
        let cx = context_of(Some(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ));
        let span = cx.span();
        assert_eq!(
            span.span_context().trace_id(),
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
        );
        assert!(span.span_context().is_remote());
        for bad in [None, Some(""), Some("00-zz-00-01")] {
            assert!(!context_of(bad).span().span_context().is_valid(), "{bad:?}");
        }
    }

    #[test]
    fn without_an_exporter_spans_cost_nothing_and_send_no_traceparent() {
        // Logs only, as `hookrelay run` without an endpoint: the span is disabled at its call
        // site.
        use tracing_subscriber::{Layer, layer::SubscriberExt};
        let logs = tracing_subscriber::fmt::layer()
            .with_writer(std::io::sink)
            .with_filter(log_filter(tracing_subscriber::EnvFilter::new("trace")));
        let _guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(logs));
        let span = tracing::info_span!(target: TARGET, "attempt");
        assert!(span.is_disabled());
        continue_trace(
            &span,
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        assert_eq!(traceparent(&span), None);
    }

    #[test]
    fn a_linked_span_starts_a_trace_of_its_own() {
        let provider = SdkTracerProvider::builder().build();
        use tracing_subscriber::layer::SubscriberExt;
        let subscriber = tracing_subscriber::registry().with(layer(&provider));
        let _guard = tracing::subscriber::set_default(subscriber);
        let span = tracing::info_span!(target: TARGET, "ingest");
        link_trace(
            &span,
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let sent = traceparent(&span).expect("an exported span has a traceparent");
        assert!(
            !sent.contains("4bf92f3577b34da6a3ce929d0e0e4736"),
            "not the client's trace: {sent}"
        );
    }

    #[test]
    fn with_an_exporter_a_span_continues_the_trace_it_is_given() {
        let provider = SdkTracerProvider::builder().build();
        use tracing_subscriber::layer::SubscriberExt;
        let subscriber = tracing_subscriber::registry().with(layer(&provider));
        let _guard = tracing::subscriber::set_default(subscriber);
        let span = tracing::info_span!(target: TARGET, "attempt");
        continue_trace(
            &span,
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let sent = traceparent(&span).expect("an exported span has a traceparent");
        assert!(
            sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{sent}"
        );
        assert!(
            !sent.contains("00f067aa0ba902b7"),
            "its own span id: {sent}"
        );
        // Another span of the log target is not exported.
        let log_span = tracing::info_span!("not-exported");
        assert_eq!(traceparent(&log_span), None);
    }
}
