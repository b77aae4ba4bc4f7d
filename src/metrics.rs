//! Prometheus metrics. Labels are bounded: kinds, outcomes, result classes; never object names.

use std::sync::Arc;

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, text::encode},
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

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

/// Every metric the operator exports, cheap to clone into each task.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub status_patches: Family<StatusPatchLabels, Counter>,
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
        Self {
            registry: Arc::new(registry),
            status_patches,
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

    /// Status patches so far of `kind` with `result`.
    pub fn status_patch_count(&self, kind: ObjectKind, result: PatchResult) -> u64 {
        self.status_patches
            .get_or_create(&StatusPatchLabels { kind, result })
            .get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
