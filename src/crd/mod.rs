//! The custom resources: the single source of the CRDs that `hookrelay crds` prints.
//!
//! Validation lives in the schema (OpenAPI + CEL) so that the API server itself refuses a bad
//! spec with a message naming the field; the operator re-checks only what the schema cannot know
//! (the egress policy, the Secret).

mod condition;
mod document_event;
mod event_type;
mod webhook;

pub use condition::{ConditionState, is_true, merge_condition};
pub use document_event::{
    ACCEPTED_AT_ANNOTATION, DocumentEvent, DocumentEventSpec, DocumentEventStatus, EventPhase,
    TargetDelivery, TargetState,
};
pub use event_type::{EventType, UnknownEventType, WebhookEvent};
pub use webhook::{
    BlockedKey, CHANGED_BY_ANNOTATION, DeliveryPolicy, DeliveryRecord, DeliveryStats,
    HEADERS_SECRET_LABEL, HeadersFrom, LocalSecretRef, MAX_HEADER_VALUE, MAX_HEADERS, Ordering,
    Outcome, PREVIOUS_EXPIRES_ANNOTATION, PREVIOUS_KEY, RESERVED_HEADER_PREFIXES, RESERVED_HEADERS,
    RateLimit, SERVICE_RECEIVER_LABEL, SIGNING_SECRET_LABEL, SecretKeyRef, ServiceRef, Suspension,
    WEBHOOKS_ANNOTATION, Webhook, WebhookSpec, WebhookStatus, ready_reason,
};

use kube::CustomResourceExt;

/// API group of every hookrelay resource.
pub const GROUP: &str = "hookrelay.dev";

/// Each CRD as `(file name, YAML)`, in a stable order: what `crds/` holds.
pub fn crd_files() -> Vec<(String, String)> {
    [Webhook::crd(), DocumentEvent::crd()]
        .iter()
        .map(|crd| {
            let name = format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or_default());
            let yaml = serde_saphyr::to_string(crd).expect("a CRD always serializes to YAML");
            (name, yaml)
        })
        .collect()
}

/// Both CRDs as one multi-document YAML stream.
pub fn crds_yaml() -> String {
    crd_files()
        .into_iter()
        .map(|(_, yaml)| yaml)
        .collect::<Vec<_>>()
        .join("---\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// crds/ and the Helm chart's copy (files/crds/, which templates/crds.yaml renders) are
    /// generated from these types; regenerate with `cargo run -- crds --dir crds` and
    /// `cargo run -- crds --dir charts/hookrelay/files/crds`.
    #[test]
    fn crds_directory_matches_the_rust_types() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        for copy in ["crds", "charts/hookrelay/files/crds"] {
            let dir = root.join(copy);
            for (name, yaml) in crd_files() {
                let on_disk = std::fs::read_to_string(dir.join(&name)).unwrap_or_default();
                assert!(
                    on_disk == yaml,
                    "{copy}/{name} is out of date with src/crd: run `cargo run -- crds --dir {copy}`"
                );
            }
            // Nothing else either: a file there that no type generates would be applied (or, in the
            // chart, rendered) too.
            let mut files: Vec<String> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{copy}: {e}"))
                .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            files.sort();
            let mut expected: Vec<String> = crd_files().into_iter().map(|(name, _)| name).collect();
            expected.sort();
            assert_eq!(files, expected, "{copy} holds exactly the generated CRDs");
        }
        // Helm installs a chart's crds/ on every first install, whatever the values say, and
        // never upgrades it: the chart's CRDs are a template (crds.enabled, crds.keep) instead.
        assert!(
            !root.join("charts/hookrelay/crds").exists(),
            "charts/hookrelay/crds must not exist: the chart renders files/crds/ in templates/crds.yaml"
        );
    }

    /// Every property `kubectl explain` shows says what it is in hookrelay's words: none is
    /// undocumented, and none repeats the Go documentation of a Kubernetes type
    /// ("Time is a wrapper around time.Time...").
    #[test]
    fn every_property_of_the_crds_is_described_in_its_own_words() {
        fn walk(path: &str, schema: &serde_json::Value, missing: &mut Vec<String>) {
            let Some(properties) = schema.get("properties").and_then(|p| p.as_object()) else {
                if let Some(items) = schema.get("items") {
                    walk(&format!("{path}[]"), items, missing);
                }
                return;
            };
            for (name, property) in properties {
                let at = format!("{path}.{name}");
                match property.get("description").and_then(|d| d.as_str()) {
                    None => missing.push(format!("{at}: no description")),
                    Some(d) if d.contains("time.Time") || d.contains("Wrappers are provided") => {
                        missing.push(format!("{at}: Go's description of a Kubernetes type"))
                    }
                    Some(_) => {}
                }
                walk(&at, property, missing);
            }
        }
        let mut missing = Vec::new();
        for crd in [Webhook::crd(), DocumentEvent::crd()] {
            let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
            let root = &schema["openAPIV3Schema"];
            for part in ["spec", "status"] {
                walk(
                    &format!("{}.{part}", crd.spec.names.kind),
                    &root["properties"][part],
                    &mut missing,
                );
            }
        }
        assert!(missing.is_empty(), "{}", missing.join("\n"));
    }

    #[test]
    fn crds_carry_names_columns_and_status_subresource() {
        let wh = Webhook::crd();
        assert_eq!(wh.spec.names.short_names, Some(vec!["wh".to_string()]));
        assert_eq!(
            wh.spec.names.categories,
            Some(vec!["hookrelay".to_string()])
        );
        let version = &wh.spec.versions[0];
        assert!(version.subresources.as_ref().unwrap().status.is_some());
        let columns: Vec<_> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            columns,
            [
                "URL",
                "Service",
                "Events",
                "Ready",
                "Reason",
                "Last Delivery",
                "Age",
                "Message"
            ]
        );
        // The Ready message is long: `kubectl get -o wide` shows it, the default view does not.
        let wide: Vec<_> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .filter(|c| c.priority.unwrap_or(0) > 0)
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(wide, ["Message"]);
        let de = DocumentEvent::crd();
        assert_eq!(
            de.spec.names.short_names,
            Some(vec!["docevent".to_string(), "de".to_string()])
        );
    }
}
