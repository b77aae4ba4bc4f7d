//! The CRDs as the API server sees them: established, examples accepted, bad specs refused.

use crate::support::{Example, control_plane, examples, repo_root};

fn example(name: &str) -> String {
    repo_root()
        .join("examples")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

#[tokio::test]
async fn both_crds_are_established() {
    let cp = control_plane();
    for crd in ["webhooks.hookrelay.dev", "documentevents.hookrelay.dev"] {
        let status = cp
            .kubectl_ok(
                &[
                    "get",
                    "crd",
                    crd,
                    "-o",
                    r#"jsonpath={.status.conditions[?(@.type=="Established")].status}"#,
                ],
                None,
            )
            .await;
        assert_eq!(status, "True", "{crd} not established");
    }
    // Short names and the category resolve through discovery.
    let resources = cp
        .kubectl_ok(
            &["api-resources", "--api-group=hookrelay.dev", "-o", "wide"],
            None,
        )
        .await;
    assert!(
        resources.contains("wh") && resources.contains("docevent,de"),
        "{resources}"
    );
    assert!(
        resources.contains("hookrelay"),
        "category missing: {resources}"
    );
}

#[tokio::test]
async fn examples_apply_cleanly_and_get_their_defaults() {
    let cp = control_plane();
    let ns = cp.namespace("examples").await;
    // Every manifest of examples/, as written: DocumentEvents (generateName) created, the rest
    // applied. The cluster tests run them for real on the quick start's cluster.
    let examples = examples();
    assert!(
        examples.len() >= 7,
        "{:?}",
        examples.iter().map(Example::relative).collect::<Vec<_>>()
    );
    let mut applied = String::new();
    // In the order the cluster test uses them: what makes events after the Webhooks.
    let (emitting, setup): (Vec<_>, Vec<_>) = examples.iter().partition(|e| e.emits);
    for example in setup.iter().chain(&emitting) {
        applied += &cp
            .kubectl_ok(&[example.verb, "-n", &ns, "-f", &example.path()], None)
            .await;
    }
    for made in [
        "webhook.hookrelay.dev/file-conversion created",
        "webhook.hookrelay.dev/audit-log created",
        "webhook.hookrelay.dev/document-sync created",
        "webhook.hookrelay.dev/billing created",
        "job.batch/emit-uploaded created",
        "documentevent.hookrelay.dev/doc-123-",
        "documentevent.hookrelay.dev/doc-124-",
    ] {
        assert!(applied.contains(made), "{made} in {applied}");
    }
    // The API server fills in the schema defaults.
    let delivery = cp
        .kubectl_ok(
            &[
                "get",
                "wh",
                "file-conversion",
                "-n",
                &ns,
                "-o",
                "jsonpath={.spec.delivery.maxAttempts} {.spec.secretRef.key} {.spec.paused}",
            ],
            None,
        )
        .await;
    assert_eq!(delivery, "8 secret false");
    // `data` is kept exactly as written.
    let data = cp
        .kubectl_ok(
            &[
                "get",
                "de",
                "-n",
                &ns,
                "-o",
                "jsonpath={.items[*].spec.data.document_id}",
            ],
            None,
        )
        .await;
    let mut ids: Vec<_> = data.split_whitespace().collect();
    ids.sort();
    assert_eq!(ids, ["123", "124"]);
}

#[tokio::test]
async fn kubectl_get_webhooks_shows_the_printer_columns() {
    let cp = control_plane();
    let ns = cp.namespace("columns").await;
    cp.kubectl_ok(&["apply", "-n", &ns, "-f", &example("webhook.yaml")], None)
        .await;
    let table = cp.kubectl_ok(&["get", "webhooks", "-n", &ns], None).await;
    let header: Vec<_> = table
        .lines()
        .next()
        .unwrap()
        .split("  ")
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    assert_eq!(
        header,
        [
            "NAME",
            "URL",
            "SERVICE",
            "EVENTS",
            "READY",
            "REASON",
            "LAST DELIVERY",
            "AGE"
        ],
        "{table}"
    );
    // The Ready condition's message only with -o wide: it is long.
    let wide = cp
        .kubectl_ok(&["get", "webhooks", "-n", &ns, "-o", "wide"], None)
        .await;
    let wide_header = wide.lines().next().unwrap_or_default();
    assert!(wide_header.trim_end().ends_with("MESSAGE"), "{wide}");
    assert!(!table.contains("MESSAGE"), "{table}");
    let row = table.lines().nth(1).unwrap();
    assert!(row.contains("receiver"), "the SERVICE column: {row}");
    assert!(
        row.contains(r#"["document.completed","document.error"]"#),
        "{row}"
    );
    // The category lists both kinds.
    let all = cp
        .kubectl_ok(&["get", "hookrelay", "-n", &ns, "-o", "name"], None)
        .await;
    assert_eq!(all.trim(), "webhook.hookrelay.dev/file-conversion");
}

const WEBHOOK: &str = r#"apiVersion: hookrelay.dev/v1alpha1
kind: Webhook
metadata: {name: bad}
spec:
  url: https://example.com/hooks
  events: [document.completed]
  secretRef: {name: s}
"#;

/// The valid Webhook above with one line replaced.
fn webhook_with(from: &str, to: &str) -> String {
    assert!(WEBHOOK.contains(from), "fixture has no {from:?}");
    WEBHOOK.replacen(from, to, 1)
}

fn document_event(spec: &str) -> String {
    format!(
        "apiVersion: hookrelay.dev/v1alpha1\nkind: DocumentEvent\nmetadata: {{name: bad}}\nspec:\n{spec}"
    )
}

#[tokio::test]
async fn bad_manifests_are_refused_with_a_message_naming_the_field() {
    let cp = control_plane();
    let ns = cp.namespace("refused").await;
    // Sanity: the unmodified fixture is valid, so each refusal below is due to its one change.
    cp.kubectl_ok(
        &["apply", "--dry-run=server", "-n", &ns, "-f", "-"],
        Some(WEBHOOK),
    )
    .await;
    // Linear filters pass the API server's filter patterns.
    for filter in [
        r#"data.items.exists(i, i.status == "failed")"#,
        r#""urgent" in data.tags && data.name.matches('^inv-[0-9]+$')"#,
        "data.a.all(x, x >= 0) && data.b.exists(y, y == event)",
    ] {
        let manifest = webhook_with(
            "  secretRef: {name: s}\n",
            &format!(
                "  secretRef: {{name: s}}\n  filter: {}\n",
                serde_json::json!(filter)
            ),
        );
        cp.kubectl_ok(
            &["apply", "--dry-run=server", "-n", &ns, "-f", "-"],
            Some(&manifest),
        )
        .await;
    }

    let cases: Vec<(&str, String, &[&str])> = vec![
        (
            "missing url",
            webhook_with("  url: https://example.com/hooks\n", ""),
            &["spec", "set exactly one of url"],
        ),
        (
            "relative url",
            webhook_with("https://example.com/hooks", "/hooks"),
            &["spec.url", "absolute http or https URL"],
        ),
        (
            "ftp url",
            webhook_with("https://example.com/hooks", "ftp://example.com/hooks"),
            &["spec.url", "absolute http or https URL"],
        ),
        (
            "url without host",
            webhook_with("https://example.com/hooks", "https:///hooks"),
            &["spec.url", "absolute http or https URL"],
        ),
        (
            "unknown event",
            webhook_with("[document.completed]", "[document.archived]"),
            &["spec.events[0]", "Unsupported value", "document.archived"],
        ),
        (
            "empty events",
            webhook_with("[document.completed]", "[]"),
            &["spec.events", "at least 1 item"],
        ),
        (
            "duplicate events",
            webhook_with("[document.completed]", "[document.error, document.error]"),
            &["spec.events[1]", "Duplicate value"],
        ),
        (
            "missing events",
            webhook_with("  events: [document.completed]\n", ""),
            &["spec.events", "Required value"],
        ),
        (
            "secretRef without name",
            webhook_with("{name: s}", "{key: secret}"),
            &["spec.secretRef.name", "Required value"],
        ),
        (
            "a filter comparing two lists of the event",
            webhook_with(
                "  secretRef: {name: s}\n",
                "  secretRef: {name: s}\n  filter: 'data.a.all(x, !(x in data.b))'\n",
            ),
            &["spec.filter", "may use only its own variable"],
        ),
        (
            "a filter with a macro inside another",
            webhook_with(
                "  secretRef: {name: s}\n",
                "  secretRef: {name: s}\n  filter: 'data.a.exists(x, x.b.all(y, y > 0))'\n",
            ),
            &["spec.filter", "inside another"],
        ),
        (
            "a filter matching a pattern from the event",
            webhook_with(
                "  secretRef: {name: s}\n",
                "  secretRef: {name: s}\n  filter: 'data.name.matches(data.pattern)'\n",
            ),
            &["spec.filter", "literal pattern"],
        ),
        (
            "missing secretRef",
            webhook_with("  secretRef: {name: s}\n", ""),
            &["spec.secretRef", "Required value"],
        ),
        (
            "negative timeout",
            webhook_with(
                "  secretRef: {name: s}\n",
                "  secretRef: {name: s}\n  delivery: {timeoutSeconds: -1}\n",
            ),
            &["spec.delivery.timeoutSeconds", "greater than or equal to 1"],
        ),
        (
            "zero attempts",
            webhook_with(
                "  secretRef: {name: s}\n",
                "  secretRef: {name: s}\n  delivery: {maxAttempts: 0}\n",
            ),
            &["spec.delivery.maxAttempts", "greater than or equal to 1"],
        ),
        (
            "backoff bounds inverted",
            webhook_with(
                "  secretRef: {name: s}\n",
                "  secretRef: {name: s}\n  delivery: {initialBackoffSeconds: 60, maxBackoffSeconds: 10}\n",
            ),
            &[
                "spec.delivery",
                "maxBackoffSeconds must not be less than initialBackoffSeconds",
            ],
        ),
        (
            "url too long",
            webhook_with(
                "https://example.com/hooks",
                &format!("https://example.com/{}", "a".repeat(2100)),
            ),
            &["spec.url", "Too long"],
        ),
        (
            "event with unknown type",
            document_event("  type: document.archived\n  data: {document_id: 1}\n"),
            &["spec.type", "Unsupported value"],
        ),
        (
            "event without data",
            document_event("  type: document.completed\n"),
            &["spec.data", "Required value"],
        ),
        (
            "event with array data",
            document_event("  type: document.completed\n  data: [1, 2]\n"),
            &["spec.data", "must be of type object"],
        ),
        (
            "event with bad timestamp",
            document_event(
                "  type: document.completed\n  timestamp: yesterday\n  data: {document_id: 1}\n",
            ),
            &["spec.timestamp", "date-time"],
        ),
    ];
    let mut failures = Vec::new();
    for (name, manifest, expected) in &cases {
        let out = cp
            .kubectl(&["apply", "-n", &ns, "-f", "-"], Some(manifest))
            .await;
        if out.success {
            failures.push(format!("{name}: accepted\n{manifest}"));
            continue;
        }
        for needle in *expected {
            if !out.stderr.contains(needle) {
                failures.push(format!(
                    "{name}: message lacks {needle:?}: {}",
                    out.stderr.trim()
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases wrong:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    // Nothing was stored.
    let left = cp
        .kubectl_ok(
            &["get", "webhooks,documentevents", "-n", &ns, "-o", "name"],
            None,
        )
        .await;
    assert_eq!(left.trim(), "", "refused manifests left objects behind");
}

#[tokio::test]
async fn a_document_event_spec_is_immutable() {
    let cp = control_plane();
    let ns = cp.namespace("immutable").await;
    cp.kubectl_ok(
        &["apply", "-n", &ns, "-f", "-"],
        Some(&document_event(
            "  type: document.completed\n  data: {document_id: 1}\n",
        )),
    )
    .await;
    let out = cp
        .kubectl(
            &[
                "patch",
                "de",
                "bad",
                "-n",
                &ns,
                "--type=merge",
                "-p",
                r#"{"spec":{"type":"document.error"}}"#,
            ],
            None,
        )
        .await;
    assert!(!out.success, "spec change accepted");
    assert!(out.stderr.contains("spec is immutable"), "{}", out.stderr);
}
