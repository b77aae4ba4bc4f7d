//! Monitoring as a platform team runs it: the chart's alerts and Grafana dashboard checked
//! against a real Prometheus (built by `hack/prometheus.sh build`).
//!
//! - The PrometheusRule `helm template` renders passes `promtool check rules`, and the unit
//!   tests of tests/monitoring/alerts_test.yaml (each alert firing on the series that should
//!   fire it, and one tenant's dead endpoint firing only severity info); every alert has a
//!   severity, and a `runbook_url` whose anchor is a section of docs/monitoring.md.
//! - A real Prometheus scrapes a real operator (the binary, with leader election) while it
//!   delivers to a working and a failing loopback receiver, and evaluates every dashboard panel
//!   query and every alert expression through its HTTP API: each must parse, and the key ones
//!   must return what the operator's state says (build info with the commit; delivery rates
//!   labelled with the Webhook's namespace; no leader while another holds the Lease, none once
//!   the operator leads; the operator down once it is stopped).

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

use crate::{
    chart::{objects, render},
    support::{
        CountingReceiver, OperatorArgs, Prometheus, ScrapeTarget, control_plane, create_webhook,
        eventually, post_events, prometheus::Sample, promtool, repo_root,
    },
};

const WAIT: Duration = Duration::from_secs(90);

/// The release the rules are rendered for: its metrics job is `hookrelay-metrics`.
const RELEASE: &str = "hookrelay";
const JOB: &str = "hookrelay-metrics";

/// The chart's PrometheusRule and dashboard ConfigMap, rendered with both enabled.
async fn rendered(cp: &crate::support::ControlPlane, ns: &str) -> (Value, Value) {
    let yaml = render(
        cp,
        RELEASE,
        ns,
        &[
            "--set",
            "metrics.prometheusRule.enabled=true",
            "--set",
            "metrics.grafanaDashboard.enabled=true",
        ],
    )
    .await;
    let objects = objects(&yaml);
    let find = |kind: &str| {
        objects
            .iter()
            .find(|o| o["kind"] == kind)
            .cloned()
            .unwrap_or_else(|| panic!("a {kind} in {yaml}"))
    };
    (find("PrometheusRule"), find("ConfigMap"))
}

/// A Prometheus rule file (`groups:`) of a PrometheusRule; JSON, which is YAML.
fn rule_file(rule: &Value) -> String {
    json!({"groups": rule["spec"]["groups"]}).to_string()
}

/// (group, alert name, expression, labels, annotations) of every alert of a PrometheusRule.
fn alerts(rule: &Value) -> Vec<(String, String, String, Value, Value)> {
    let mut out = Vec::new();
    for group in rule["spec"]["groups"].as_array().expect("groups") {
        for r in group["rules"].as_array().expect("rules") {
            out.push((
                group["name"].as_str().unwrap().to_owned(),
                r["alert"].as_str().expect("only alerting rules").to_owned(),
                r["expr"].as_str().expect("an expression").to_owned(),
                r["labels"].clone(),
                r["annotations"].clone(),
            ));
        }
    }
    out
}

/// The dashboard as the chart ships it.
fn dashboard() -> Value {
    let path = repo_root().join("charts/hookrelay/dashboards/hookrelay.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// (panel title, query) of every panel target, rows' panels included.
fn panel_queries(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for panel in panels.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                out.push((
                    panel["title"].as_str().unwrap_or_default().to_owned(),
                    target["expr"].as_str().expect("a PromQL target").to_owned(),
                ));
            }
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// A dashboard query as Grafana sends it with these variables chosen: `$job`, `$namespace`,
/// and `$__rate_interval`, which Grafana computes from the time range and the scrape interval
/// (2m: the second round of deliveries stays in the window while the panels are checked).
fn as_grafana_sends(query: &str, namespace: &str) -> String {
    query
        .replace("$__rate_interval", "2m")
        .replace("$job", JOB)
        .replace("$namespace", namespace)
}

#[tokio::test]
async fn alert_rules_pass_promtool_check_and_unit_tests_and_each_has_a_runbook() {
    let cp = control_plane();
    let ns = cp.namespace("monitoring-rules").await;
    let (rule, configmap) = rendered(cp, &ns).await;
    let dir = std::env::temp_dir().join(format!("hookrelay-alert-tests-{ns}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("rules.yaml"), rule_file(&rule)).unwrap();
    std::fs::copy(
        repo_root().join("tests/monitoring/alerts_test.yaml"),
        dir.join("alerts_test.yaml"),
    )
    .unwrap();
    let checked = promtool(&dir, &["check", "rules", "rules.yaml"]);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&dir, &["test", "rules", "alerts_test.yaml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
    let _ = std::fs::remove_dir_all(&dir);

    // Each alert: a severity, tenant-level ones info; a runbook section in docs/monitoring.md.
    let docs = std::fs::read_to_string(repo_root().join("docs/monitoring.md")).unwrap();
    let base = "https://github.com/hookrelay/hookrelay/blob/main/docs/monitoring.md";
    let alerts = alerts(&rule);
    assert!(alerts.len() >= 10, "{alerts:?}");
    for (group, name, _, labels, annotations) in &alerts {
        let severity = labels["severity"].as_str().unwrap_or_default();
        match group.as_str() {
            "hookrelay" => assert!(
                ["critical", "warning"].contains(&severity),
                "{name}: {severity}"
            ),
            "hookrelay-tenants" => assert_eq!(severity, "info", "{name} must not page"),
            other => panic!("{name} in an unknown group {other}"),
        }
        let anchor = name.to_lowercase();
        assert_eq!(
            annotations["runbook_url"],
            format!("{base}#{anchor}"),
            "{name}"
        );
        assert!(
            docs.lines().any(|l| l == format!("### {name}")),
            "docs/monitoring.md has a section ### {name} (anchor #{anchor})"
        );
        assert!(annotations["summary"].is_string() && annotations["description"].is_string());
    }
    // The dashboard ConfigMap carries the chart's JSON as it is, labelled for the sidecar.
    assert_eq!(configmap["metadata"]["labels"]["grafana_dashboard"], "1");
    let shipped: Value =
        serde_json::from_str(configmap["data"]["hookrelay.json"].as_str().unwrap()).unwrap();
    assert_eq!(shipped, dashboard());
}

/// Keeps the Lease `hookrelay` of `ns` held by another identity, renewed every second, until
/// dropped: the operator under test stays a standby meanwhile.
struct OtherHolder {
    task: tokio::task::JoinHandle<()>,
}

impl OtherHolder {
    async fn start(client: kube::Client, ns: &str) -> OtherHolder {
        let leases: Api<Lease> = Api::namespaced(client, ns);
        let lease: Lease = serde_json::from_value(json!({
            "metadata": {"name": hookrelay::leader::LEASE_NAME},
            "spec": {"holderIdentity": "a-replica-prometheus-does-not-scrape",
                     "leaseDurationSeconds": 6, "renewTime": now()},
        }))
        .unwrap();
        leases.create(&PostParams::default(), &lease).await.unwrap();
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let renew = json!({"spec": {"renewTime": now()}});
                let _ = leases
                    .patch(
                        hookrelay::leader::LEASE_NAME,
                        &PatchParams::default(),
                        &Patch::Merge(&renew),
                    )
                    .await;
            }
        });
        OtherHolder { task }
    }
}

impl Drop for OtherHolder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Now as a Lease's MicroTime.
fn now() -> String {
    format!("{:.6}", k8s_openapi::jiff::Timestamp::now())
}

/// What an alert expression must return now.
type Expectation = Box<dyn Fn(&[Sample]) -> bool>;

/// Polls `expr` until `check` accepts its samples; panics with the last answer otherwise.
async fn query_until(
    prometheus: &Prometheus,
    what: &str,
    expr: &str,
    check: impl Fn(&[Sample]) -> bool,
) -> Vec<Sample> {
    let check = &check;
    eventually(&format!("{what}: {expr}"), WAIT, || async move {
        let samples = prometheus
            .query(expr)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        check(&samples).then_some(samples)
    })
    .await
}

#[tokio::test]
async fn a_real_prometheus_scrapes_the_operator_and_evaluates_every_alert_and_panel() {
    let cp = control_plane();
    let client = cp.client().await;
    let ns = cp.namespace("monitoring").await;
    let (rule, _) = rendered(cp, &ns).await;
    let alerts = alerts(&rule);

    // Another replica holds the Lease: the operator starts as a standby.
    let other = OtherHolder::start(client.clone(), &ns).await;
    let mut op = OperatorArgs::new(&ns).leader_elect().fast_lease().start(cp);
    op.wait_ready().await;
    op.wait_leader(false).await;

    // Scraped as the chart's ServiceMonitor has it: the job of the metrics Service, the
    // namespace hookrelay runs in as a target label (not the tenant's), the metrics' own
    // labels honoured: the delivery metrics keep the Webhook's namespace.
    let prometheus = Prometheus::start(
        ScrapeTarget {
            job: JOB,
            addr: op.metrics_addr,
            labels: &[("namespace", "hookrelay-system"), ("pod", "hookrelay-0")],
        },
        &rule_file(&rule),
    )
    .await;
    let alert = |name: &str| {
        alerts
            .iter()
            .find(|a| a.1 == name)
            .map(|a| a.2.clone())
            .unwrap_or_else(|| panic!("the alert {name}"))
    };
    query_until(
        &prometheus,
        "the operator scraped",
        &format!("up{{job=\"{JOB}\"}} == 1"),
        |s| s.len() == 1,
    )
    .await;
    query_until(
        &prometheus,
        "HookrelayNoLeader while the Lease is another's",
        &alert("HookrelayNoLeader"),
        |s| s.len() == 1,
    )
    .await;

    // The other holder goes away: the operator takes the Lease over.
    drop(other);
    op.wait_leader(true).await;
    query_until(
        &prometheus,
        "HookrelayNoLeader once the operator leads",
        &alert("HookrelayNoLeader"),
        <[Sample]>::is_empty,
    )
    .await;

    // A tenant with a working endpoint and a dead one (500, one attempt: Failed at once).
    let (ok, ok_addr) = CountingReceiver::start().await;
    let (dead, dead_addr) = CountingReceiver::start_answering(
        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        Duration::ZERO,
    )
    .await;
    create_webhook(
        &client,
        &ns,
        "ok",
        &format!("http://{ok_addr}/h"),
        "monitoring-ok-secret-0123456789",
        json!({}),
    )
    .await;
    create_webhook(
        &client,
        &ns,
        "dead",
        &format!("http://{dead_addr}/h"),
        "monitoring-dead-secret-0123456789",
        json!({"maxAttempts": 1}),
    )
    .await;
    // Two rounds: rate() counts what a series gained after Prometheus first saw it, and the
    // delivery series appear with the first attempt of their namespace.
    const EVENTS: usize = 3;
    let attempts =
        format!("sum by (namespace, outcome) (hookrelay_delivery_attempts_total{{job=\"{JOB}\"}})");
    for round in 1..=2 {
        let events: Vec<Value> = (0..EVENTS)
            .map(|i| json!({"event": "document.completed", "timestamp": "2023-06-15T10:35:00Z", "data": {"round": round, "document_id": i}}))
            .collect();
        let (status, reply) =
            post_events(op.listen_addr, &ns, None, &Value::Array(events).to_string()).await;
        assert_eq!(status, 202, "{reply}");
        let sent = round * EVENTS;
        eventually("both receivers got every event", WAIT, || async {
            (ok.counts().0 == sent && dead.counts().0 == sent).then_some(())
        })
        .await;
        // What the operator counted, as Prometheus has it: by the Webhook's namespace (kept
        // over the target's namespace label by honor_labels).
        query_until(&prometheus, "every attempt scraped", &attempts, |s| {
            let n = |outcome: &str| {
                s.iter()
                    .find(|x| x.label("namespace") == ns && x.label("outcome") == outcome)
                    .map_or(0.0, |x| x.value)
            };
            n("Succeeded") == sent as f64 && n("Failed") == sent as f64
        })
        .await;
    }

    // Every dashboard panel query parses and answers; the key ones with what happened.
    let dashboard = dashboard();
    let queries = panel_queries(&dashboard);
    assert!(queries.len() >= 10, "{queries:?}");
    for (title, query) in &queries {
        if let Err(e) = prometheus.query(&as_grafana_sends(query, &ns)).await {
            panic!("panel {title}: {e}");
        }
    }
    let panel = |title: &str, nth: usize| {
        let query = queries
            .iter()
            .filter(|(t, _)| t == title)
            .nth(nth)
            .unwrap_or_else(|| panic!("a panel {title} with a query #{nth}"));
        as_grafana_sends(&query.1, &ns)
    };
    let build = query_until(&prometheus, "build info", &panel("Build", 0), |s| {
        s.len() == 1
    })
    .await;
    assert_eq!(build[0].label("version"), env!("CARGO_PKG_VERSION"));
    assert_eq!(
        build[0].label("commit"),
        hookrelay::metrics::BUILD_COMMIT.unwrap_or("unknown")
    );
    query_until(&prometheus, "leader", &panel("Leader", 0), |s| {
        s.len() == 1 && s[0].value == 1.0
    })
    .await;
    query_until(&prometheus, "replicas up", &panel("Replicas up", 0), |s| {
        s.len() == 1 && s[0].value == 1.0
    })
    .await;
    query_until(
        &prometheus,
        "deliveries by outcome",
        &panel("Delivery attempts by outcome", 0),
        |s| {
            ["Succeeded", "Failed"]
                .iter()
                .all(|o| s.iter().any(|x| x.label("outcome") == *o && x.value > 0.0))
        },
    )
    .await;
    for nth in [0, 1] {
        query_until(
            &prometheus,
            "attempt latency",
            &panel("Attempt latency", nth),
            |s| s.len() == 1 && s[0].value.is_finite() && s[0].value > 0.0,
        )
        .await;
    }
    let failing = query_until(
        &prometheus,
        "failing namespaces",
        &panel("Failing namespaces", 0),
        |s| !s.is_empty(),
    )
    .await;
    assert_eq!(
        failing
            .iter()
            .map(|s| s.label("namespace"))
            .collect::<Vec<_>>(),
        [ns.as_str()]
    );
    query_until(
        &prometheus,
        "pending",
        &panel("Pending deliveries", 0),
        |s| s.iter().any(|x| x.label("namespace") == ns),
    )
    .await;
    query_until(
        &prometheus,
        "delivery slots",
        &panel("Saturation", 0),
        |s| s.len() == 1 && (0.0..=1.0).contains(&s[0].value),
    )
    .await;
    query_until(
        &prometheus,
        "capacity",
        &format!("hookrelay_delivery_slots{{job=\"{JOB}\"}}"),
        |s| s.len() == 1 && s[0].value == 512.0,
    )
    .await;
    query_until(
        &prometheus,
        "requests by code",
        &panel("HTTP requests by code", 0),
        |s| s.iter().any(|x| x.label("code") == "202" && x.value > 0.0),
    )
    .await;
    // The namespace variable (Grafana's label_values(METRIC, LABEL)) offers the tenant.
    let variable = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "namespace")
        .expect("a namespace variable");
    let definition = as_grafana_sends(variable["definition"].as_str().unwrap(), &ns);
    let (metric, label) = definition
        .strip_prefix("label_values(")
        .and_then(|d| d.strip_suffix(')'))
        .and_then(|d| d.rsplit_once(", "))
        .unwrap_or_else(|| panic!("label_values(METRIC, LABEL): {definition}"));
    let offered = query_until(&prometheus, "namespace variable", metric, |s| !s.is_empty()).await;
    assert!(offered.iter().any(|s| s.label(label) == ns), "{offered:?}");

    // Every alert expression parses; what the operator's state says of each. One tenant's dead
    // endpoint fires only the tenant-level alert, labelled with its namespace.
    let mut expected: BTreeMap<&str, Expectation> = BTreeMap::new();
    for quiet in [
        "HookrelayDown",
        "HookrelayReplicaDown",
        "HookrelayNoLeader",
        "HookrelayTwoLeaders",
        "HookrelayStatusWritesFailing",
        "HookrelayDeliverySlotsSaturated",
        "HookrelayDirectQueueSaturated",
        "HookrelayIngestRefusedForCapacity",
        "HookrelayEgressFailing",
        "HookrelayWebhooksNotReady",
    ] {
        expected.insert(quiet, Box::new(<[Sample]>::is_empty));
    }
    let tenant = ns.clone();
    expected.insert(
        "HookrelayWebhookDeliveriesFailing",
        Box::new(move |s: &[Sample]| s.len() == 1 && s[0].label("namespace") == tenant),
    );
    // Three failures are not five in a row: whatever the gauge says, the expression answers.
    expected.insert("HookrelayWebhooksDegraded", Box::new(|_: &[Sample]| true));
    expected.insert(
        "HookrelayPendingDeliveriesGrowing",
        Box::new(|_: &[Sample]| true),
    );
    for (_, name, expr, _, _) in &alerts {
        let check = expected
            .get(name.as_str())
            .unwrap_or_else(|| panic!("this test says nothing of the alert {name}: add it"));
        query_until(&prometheus, name, expr, |s| check(s)).await;
    }
    // Prometheus loaded the rules and evaluates each without error.
    let rules = eventually("every rule evaluated", WAIT, || async {
        let rules = prometheus.rules().await.expect("/api/v1/rules");
        (rules.len() == alerts.len() && rules.iter().all(|r| r.1 != "unknown")).then_some(rules)
    })
    .await;
    for (name, health, error) in &rules {
        assert_eq!(health, "ok", "{name}: {error}\n{}", prometheus.log_text());
    }

    // The operator stops: Prometheus sees it down.
    op.child.kill().await.unwrap();
    for name in ["HookrelayDown", "HookrelayReplicaDown"] {
        query_until(
            &prometheus,
            &format!("{name} once stopped"),
            &alert(name),
            |s| s.len() == 1,
        )
        .await;
    }
}
