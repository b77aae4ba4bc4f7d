//! The Helm chart (charts/hookrelay) with the real helm and kubectl against the real API server:
//! lint, render, schema, restricted Pod Security, install/upgrade/uninstall, the CRD upgrade
//! step, and its RBAC proven by running the operator binary as the chart's ServiceAccount.
//!
//! There is no kubelet here: `helm install` (never `--wait`) creates objects but no pod runs, so
//! the binary runs locally with the ServiceAccount's token.

use std::{sync::OnceLock, time::Duration};

use hookrelay::{
    crd::{DocumentEvent, TargetState},
    metrics::{ObjectKind, PatchResult},
};
use kube::Api;
use serde_json::{Value, json};

use crate::support::{
    ControlPlane, CountingReceiver, Kubectl, OperatorArgs, api_call, control_plane, create_event,
    create_webhook, eventually, repo_root, wait_phase,
};

const WAIT: Duration = Duration::from_secs(60);
const SECRET: &str = "chart-test-signing-secret-0123456789";

fn chart() -> String {
    repo_root().join("charts/hookrelay").display().to_string()
}

fn all_on_values() -> String {
    repo_root()
        .join("charts/hookrelay/ci/all-on-values.yaml")
        .display()
        .to_string()
}

/// A control plane of these tests alone, for what changes the whole cluster: CRDs applied in an
/// older form, and an operator watching every namespace (it would deliver other tests' events).
/// Tests using it hold `PRIVATE` so that they do not overlap.
fn private_control_plane() -> &'static ControlPlane {
    static CP: OnceLock<ControlPlane> = OnceLock::new();
    CP.get_or_init(|| {
        let bin = control_plane().bin.clone();
        let dir = std::env::temp_dir().join(format!("hookrelay-chart-cp-{}", std::process::id()));
        let out = std::process::Command::new(repo_root().join("hack/control-plane.sh"))
            .arg("start")
            .arg(&dir)
            .arg(std::process::id().to_string())
            .output()
            .expect("control-plane.sh runs");
        assert!(
            out.status.success(),
            "a private control plane starts: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ControlPlane {
            kubeconfig: dir.join("kubeconfig"),
            bin,
        }
    })
}

static PRIVATE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn helm(cp: &ControlPlane, args: &[&str]) -> Kubectl {
    tokio::process::Command::new(cp.bin.join("helm"))
        .args(args)
        .env("KUBECONFIG", &cp.kubeconfig)
        .kill_on_drop(true)
        .output()
        .await
        .expect("helm runs")
        .into()
}

async fn helm_ok(cp: &ControlPlane, args: &[&str]) -> String {
    let out = helm(cp, args).await;
    assert!(
        out.success,
        "helm {args:?} failed: {}{}",
        out.stdout, out.stderr
    );
    out.stdout
}

/// `helm template` of the chart as release `release` in `namespace`.
async fn render(cp: &ControlPlane, release: &str, namespace: &str, extra: &[&str]) -> String {
    let chart = chart();
    let mut args = vec!["template", release, chart.as_str(), "-n", namespace];
    args.extend(extra);
    helm_ok(cp, &args).await
}

/// The objects of a multi-document YAML stream (comment-only documents dropped).
fn objects(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .expect("helm renders YAML")
        .into_iter()
        .filter(|v| v.is_object())
        .collect()
}

fn kinds(objects: &[Value]) -> Vec<String> {
    objects
        .iter()
        .map(|o| o["kind"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn deployment(objects: &[Value]) -> &Value {
    objects
        .iter()
        .find(|o| o["kind"] == "Deployment")
        .expect("a Deployment")
}

fn container_args(deployment: &Value) -> Vec<String> {
    serde_json::from_value(deployment["spec"]["template"]["spec"]["containers"][0]["args"].clone())
        .expect("container args")
}

async fn apply_stub_crds(cp: &ControlPlane) {
    let stubs = repo_root().join("tests/chart").display().to_string();
    cp.kubectl_ok(&["apply", "--server-side", "-f", &stubs], None)
        .await;
    cp.kubectl_ok(
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/servicemonitors.monitoring.coreos.com",
            "crd/prometheusrules.monitoring.coreos.com",
            "crd/certificates.cert-manager.io",
        ],
        None,
    )
    .await;
}

/// The chart's CRDs, as the chart README's upgrade step applies them.
async fn apply_chart_crds(cp: &ControlPlane) {
    let crds = repo_root()
        .join("charts/hookrelay/crds")
        .display()
        .to_string();
    cp.kubectl_ok(
        &["apply", "--server-side", "--force-conflicts", "-f", &crds],
        None,
    )
    .await;
    cp.kubectl_ok(
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/webhooks.hookrelay.dev",
            "crd/documentevents.hookrelay.dev",
        ],
        None,
    )
    .await;
}

#[tokio::test]
async fn the_chart_lints_and_renders_valid_manifests_with_defaults_and_every_option() {
    let cp = control_plane();
    let chart = chart();
    let all_on = all_on_values();
    for extra in [vec![], vec!["-f", all_on.as_str()]] {
        let mut args = vec!["lint", chart.as_str(), "--strict"];
        args.extend(&extra);
        let out = helm(cp, &args).await;
        assert!(
            out.success,
            "helm lint {extra:?}: {}{}",
            out.stdout, out.stderr
        );
        assert!(
            !out.stdout.contains("[WARNING]") && !out.stdout.contains("[ERROR]"),
            "helm lint {extra:?}: {}",
            out.stdout
        );
    }

    // Optional kinds (ServiceMonitor, PrometheusRule, Certificate) are validated against stubs.
    apply_stub_crds(cp).await;
    let ns = cp.namespace("chart-render").await;
    let team_a = cp.namespace("chart-team-a").await;
    let team_b = cp.namespace("chart-team-b").await;

    let defaults = render(cp, "hookrelay-render", &ns, &[]).await;
    let default_objects = objects(&defaults);
    assert_eq!(
        kinds(&default_objects),
        [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRole",
            "ClusterRoleBinding",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Service",
            "Service",
            "Deployment"
        ],
        "{defaults}"
    );
    let out = cp
        .kubectl(&["apply", "--dry-run=server", "-f", "-"], Some(&defaults))
        .await;
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout
            .contains("deployment.apps/hookrelay-render created (server dry run)"),
        "{}",
        out.stdout
    );

    let namespaces = format!("watchNamespaces={{{team_a},{team_b}}}");
    let every = render(
        cp,
        "hookrelay-every",
        &ns,
        &["-f", &all_on, "--set", &namespaces],
    )
    .await;
    let every_objects = objects(&every);
    let every_kinds = kinds(&every_objects);
    for kind in [
        "ServiceMonitor",
        "PrometheusRule",
        "Certificate",
        "PodDisruptionBudget",
        "NetworkPolicy",
    ] {
        assert!(every_kinds.iter().any(|k| k == kind), "{kind} in {every}");
    }
    // watchNamespaces: a Role and RoleBinding per listed namespace, and no cluster-wide grant
    // of the namespaced resources.
    for namespace in [&team_a, &team_b] {
        assert!(
            every_objects
                .iter()
                .any(|o| o["kind"] == "Role" && o["metadata"]["namespace"] == **namespace),
            "a Role in {namespace}"
        );
    }
    assert!(
        !every_objects
            .iter()
            .any(|o| o["kind"] == "ClusterRole" && o["metadata"]["name"] == "hookrelay-every"),
        "no cluster-wide grant in watchNamespaces mode"
    );
    // web.viewerRole.create: a read-only ClusterRole for the web page, bound by no one.
    let viewer = every_objects
        .iter()
        .find(|o| o["kind"] == "ClusterRole" && o["metadata"]["name"] == "hookrelay-every-viewer")
        .unwrap_or_else(|| panic!("the viewer ClusterRole in {every}"));
    assert_eq!(
        viewer["rules"],
        json!([{"apiGroups": ["hookrelay.dev"], "resources": ["webhooks", "documentevents"], "verbs": ["get", "list"]}])
    );
    assert!(
        !every_objects
            .iter()
            .any(|o| o["roleRef"]["name"] == "hookrelay-every-viewer"),
        "nothing is bound to the viewer role"
    );
    let args = container_args(deployment(&every_objects));
    for expected in [
        format!("--namespace={team_a}"),
        format!("--namespace={team_b}"),
        "--tls-cert-file=/etc/hookrelay/tls/tls.crt".to_owned(),
        "--leader-elect".to_owned(),
        format!("--lease-namespace={ns}"),
        "--ingest-mode=jetstream".to_owned(),
        "--nats-url=nats://nats.nats:4222".to_owned(),
        "--nats-stream=DOCS".to_owned(),
        "--nats-max-age=12h".to_owned(),
        "--nats-max-bytes=512MiB".to_owned(),
        "--nats-max-messages=200000".to_owned(),
        "--nats-max-ack-pending=500".to_owned(),
        "--nats-max-publishing=2000".to_owned(),
        "--nats-creds=/etc/hookrelay/nats/creds/hookrelay.creds".to_owned(),
        "--nats-tls-ca-file=/etc/hookrelay/nats/tls/ca.crt".to_owned(),
        "--nats-tls-cert-file=/etc/hookrelay/nats/tls/tls.crt".to_owned(),
        "--nats-tls-key-file=/etc/hookrelay/nats/tls/tls.key".to_owned(),
    ] {
        assert!(args.contains(&expected), "{expected} in {args:?}");
    }
    // The NATS files the flags name are the Secrets' keys, mounted.
    let pod = &deployment(&every_objects)["spec"]["template"]["spec"];
    let mounts = &pod["containers"][0]["volumeMounts"];
    for (volume, path, secret) in [
        (
            "nats-creds",
            "/etc/hookrelay/nats/creds",
            "hookrelay-nats-creds",
        ),
        ("nats-tls", "/etc/hookrelay/nats/tls", "hookrelay-nats-tls"),
    ] {
        assert!(
            mounts
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["name"] == volume && m["mountPath"] == path),
            "{volume} at {path}: {mounts}"
        );
        let volumes = pod["volumes"].as_array().unwrap();
        assert!(
            volumes
                .iter()
                .any(|v| v["name"] == volume && v["secret"]["secretName"] == secret),
            "{volume} from {secret}: {volumes:?}"
        );
    }
    // Outside jetstream mode the NATS values are not used.
    assert!(
        !container_args(deployment(&default_objects))
            .iter()
            .any(|a| a.starts_with("--nats")),
        "{defaults}"
    );
    let out = cp
        .kubectl(&["apply", "--dry-run=server", "-f", "-"], Some(&every))
        .await;
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    for created in [
        "servicemonitor.monitoring.coreos.com/hookrelay-every created (server dry run)",
        "prometheusrule.monitoring.coreos.com/hookrelay-every created (server dry run)",
        "certificate.cert-manager.io/hookrelay-every created (server dry run)",
        "networkpolicy.networking.k8s.io/hookrelay-every created (server dry run)",
        "poddisruptionbudget.policy/hookrelay-every created (server dry run)",
        "clusterrole.rbac.authorization.k8s.io/hookrelay-every-viewer created (server dry run)",
    ] {
        assert!(out.stdout.contains(created), "{created}: {}", out.stdout);
    }
}

#[tokio::test]
async fn the_values_schema_refuses_a_wrong_type_and_an_unknown_key() {
    let cp = control_plane();
    let wrong_type = helm(
        cp,
        &["template", "x", &chart(), "--set", "replicaCount=two"],
    )
    .await;
    assert!(!wrong_type.success);
    assert!(
        wrong_type
            .stderr
            .contains("at '/replicaCount': got string, want integer"),
        "{}",
        wrong_type.stderr
    );
    let unknown = helm(
        cp,
        &["template", "x", &chart(), "--set", "config.maxInflight=5"],
    )
    .await;
    assert!(!unknown.success);
    assert!(
        unknown
            .stderr
            .contains("at '/config': additional properties 'maxInflight' not allowed"),
        "{}",
        unknown.stderr
    );
    let not_an_enum = helm(
        cp,
        &["template", "x", &chart(), "--set", "config.ingestMode=fast"],
    )
    .await;
    assert!(!not_an_enum.success);
    assert!(
        not_an_enum.stderr.contains("at '/config/ingestMode'"),
        "{}",
        not_an_enum.stderr
    );
    let no_nats_url = helm(
        cp,
        &[
            "template",
            "x",
            &chart(),
            "--set",
            "config.ingestMode=jetstream",
        ],
    )
    .await;
    assert!(!no_nats_url.success);
    assert!(
        no_nats_url
            .stderr
            .contains("config.ingestMode=jetstream needs nats.url"),
        "{}",
        no_nats_url.stderr
    );
}

#[tokio::test]
async fn the_pod_passes_restricted_pod_security_admission() {
    let cp = control_plane();
    let ns = cp.namespace("chart-psa").await;
    cp.kubectl_ok(
        &[
            "label",
            "namespace",
            &ns,
            "pod-security.kubernetes.io/enforce=restricted",
            "pod-security.kubernetes.io/warn=restricted",
        ],
        None,
    )
    .await;
    // TLS on: the pod then also mounts a Secret volume.
    let rendered = render(
        cp,
        "hookrelay-psa",
        &ns,
        &[
            "--set",
            "tls.enabled=true",
            "--set",
            "tls.secretName=api-tls",
        ],
    )
    .await;
    let all = objects(&rendered);
    let deploy = deployment(&all);

    // Enforcement applies to pods (a Deployment only warns): the pod its template makes.
    cp.kubectl_ok(
        &["create", "serviceaccount", "hookrelay-psa", "-n", &ns],
        None,
    )
    .await;
    let pod = |spec: &Value| {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "hookrelay-psa", "namespace": ns,
                         "labels": deploy["spec"]["template"]["metadata"]["labels"]},
            "spec": spec,
        })
        .to_string()
    };
    let spec = deploy["spec"]["template"]["spec"].clone();
    let admitted = cp
        .kubectl(
            &["create", "--dry-run=server", "-f", "-"],
            Some(&pod(&spec)),
        )
        .await;
    assert!(admitted.success, "{}{}", admitted.stdout, admitted.stderr);
    assert!(
        !admitted.stderr.contains("PodSecurity"),
        "{}",
        admitted.stderr
    );

    // The same check refuses a pod without the container's security context: it is real.
    let mut weakened = spec.clone();
    weakened["containers"][0]
        .as_object_mut()
        .unwrap()
        .remove("securityContext");
    let refused = cp
        .kubectl(
            &["create", "--dry-run=server", "-f", "-"],
            Some(&pod(&weakened)),
        )
        .await;
    assert!(!refused.success);
    assert!(
        refused.stderr.contains("violates PodSecurity \"restricted"),
        "{}",
        refused.stderr
    );

    // The Deployment itself draws no restricted warning.
    let deploy_json = deploy.to_string();
    let out = cp
        .kubectl(
            &["apply", "--dry-run=server", "-f", "-"],
            Some(&deploy_json),
        )
        .await;
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    assert!(!out.stderr.contains("PodSecurity"), "{}", out.stderr);

    // The grace period outlasts the shutdown timeout (stop, flush, then release the Lease).
    let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap();
    let args = container_args(deploy);
    assert!(
        args.contains(&"--shutdown-timeout=20s".to_owned()),
        "{args:?}"
    );
    assert!(grace > 20, "terminationGracePeriodSeconds {grace}");
}

/// Names of the objects labelled as the release's, cluster-wide and in `ns`.
async fn release_objects(cp: &ControlPlane, release: &str, ns: &str) -> Vec<String> {
    let selector = format!("app.kubernetes.io/instance={release}");
    let mut names = Vec::new();
    for (scope, kinds) in [
        (
            Some(ns),
            "deployments,services,serviceaccounts,roles,rolebindings,configmaps,secrets,networkpolicies,poddisruptionbudgets",
        ),
        (None, "clusterroles,clusterrolebindings"),
    ] {
        let mut args = vec!["get", kinds, "-l", &selector, "-o", "name"];
        if let Some(ns) = scope {
            args.extend(["-n", ns]);
        }
        let out = cp.kubectl_ok(&args, None).await;
        names.extend(out.lines().map(str::to_owned));
    }
    names
}

#[tokio::test]
async fn install_upgrade_and_uninstall_leave_only_the_crds() {
    let cp = control_plane();
    let ns = cp.namespace("chart-life").await;
    let release = "hookrelay-life";
    helm_ok(cp, &["install", release, &chart(), "-n", &ns]).await;
    let args_of = |out: String| -> Vec<String> { serde_json::from_str(&out).unwrap() };
    let live_args = args_of(
        cp.kubectl_ok(
            &[
                "get",
                "deployment",
                release,
                "-n",
                &ns,
                "-o",
                "jsonpath={.spec.template.spec.containers[0].args}",
            ],
            None,
        )
        .await,
    );
    assert!(live_args.contains(&"--max-in-flight=512".to_owned()));
    let installed = release_objects(cp, release, &ns).await;
    assert!(
        installed.contains(&"clusterrole.rbac.authorization.k8s.io/hookrelay-life".to_owned())
            && installed.contains(&"deployment.apps/hookrelay-life".to_owned()),
        "{installed:?}"
    );

    helm_ok(
        cp,
        &[
            "upgrade",
            release,
            &chart(),
            "-n",
            &ns,
            "--set",
            "config.maxInFlight=64",
            "--set",
            "replicaCount=2",
        ],
    )
    .await;
    let live = cp
        .kubectl_ok(
            &[
                "get",
                "deployment",
                release,
                "-n",
                &ns,
                "-o",
                "jsonpath={.spec.replicas} {.spec.template.spec.containers[0].args}",
            ],
            None,
        )
        .await;
    let (replicas, args) = live.split_once(' ').unwrap();
    assert_eq!(replicas, "2");
    let args = args_of(args.to_owned());
    assert!(args.contains(&"--max-in-flight=64".to_owned()), "{args:?}");
    assert!(
        !args.contains(&"--max-in-flight=512".to_owned()),
        "{args:?}"
    );

    helm_ok(cp, &["uninstall", release, "-n", &ns]).await;
    assert_eq!(
        release_objects(cp, release, &ns).await,
        Vec::<String>::new()
    );
    // Helm's own release records are gone too.
    let secrets = cp
        .kubectl_ok(&["get", "secrets", "-n", &ns, "-o", "name"], None)
        .await;
    assert_eq!(secrets.trim(), "", "left in {ns}");
    // Helm keeps the CRDs (and with them every Webhook and DocumentEvent).
    cp.kubectl_ok(
        &[
            "get",
            "crd",
            "webhooks.hookrelay.dev",
            "documentevents.hookrelay.dev",
        ],
        None,
    )
    .await;
}

#[tokio::test]
async fn watch_namespaces_mode_grants_only_the_listed_namespaces() {
    let cp = control_plane();
    let ns = cp.namespace("chart-scoped").await;
    let listed = cp.namespace("chart-listed").await;
    let other = cp.namespace("chart-unlisted").await;
    let release = "hookrelay-scoped";
    helm_ok(
        cp,
        &[
            "install",
            release,
            &chart(),
            "-n",
            &ns,
            "--set",
            &format!("watchNamespaces={{{listed}}}"),
        ],
    )
    .await;
    let token = cp
        .service_account_token_without_audience(&ns, release)
        .await;
    let kubeconfig = cp.token_kubeconfig(&token);
    let can_i = |args: Vec<String>| {
        let kubeconfig = kubeconfig.clone();
        async move {
            let mut full = vec!["auth".to_owned(), "can-i".to_owned()];
            full.extend(args);
            let refs: Vec<&str> = full.iter().map(String::as_str).collect();
            cp.kubectl_as(&kubeconfig, &refs)
                .await
                .stdout
                .trim()
                .to_owned()
        }
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert_eq!(
        can_i(s(&["list", "webhooks.hookrelay.dev", "-n", &listed])).await,
        "yes"
    );
    assert_eq!(can_i(s(&["create", "secrets", "-n", &listed])).await, "yes");
    assert_eq!(can_i(s(&["watch", "services", "-n", &listed])).await, "yes");
    assert_eq!(can_i(s(&["update", "services", "-n", &listed])).await, "no");
    assert_eq!(
        can_i(s(&["list", "webhooks.hookrelay.dev", "-n", &other])).await,
        "no"
    );
    assert_eq!(can_i(s(&["get", "secrets", "-n", &other])).await, "no");
    assert_eq!(
        can_i(s(&["list", "webhooks.hookrelay.dev", "--all-namespaces"])).await,
        "no"
    );
    assert_eq!(
        can_i(s(&["create", "tokenreviews.authentication.k8s.io"])).await,
        "yes"
    );
    assert_eq!(
        can_i(s(&["get", "crd/webhooks.hookrelay.dev"])).await,
        "yes"
    );
    assert_eq!(can_i(s(&["list", "crd"])).await, "no");
    assert_eq!(
        can_i(s(&[
            "update",
            "leases.coordination.k8s.io/hookrelay",
            "-n",
            &ns
        ]))
        .await,
        "yes"
    );
    assert_eq!(
        can_i(s(&[
            "update",
            "leases.coordination.k8s.io/other",
            "-n",
            &ns
        ]))
        .await,
        "no"
    );
    helm_ok(cp, &["uninstall", release, "-n", &ns]).await;
}

/// The Deployment's arguments that a local run can use: its own loopback addresses replace the
/// pod's.
fn local_args(chart_args: &[String]) -> Vec<String> {
    chart_args
        .iter()
        .filter(|a| *a != "run")
        .filter(|a| !a.starts_with("--listen-addr") && !a.starts_with("--metrics-addr"))
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_does_its_whole_job_with_the_charts_rbac_and_nothing_more() {
    let _private = PRIVATE.lock().await;
    let cp = private_control_plane();
    apply_chart_crds(cp).await;
    let ns = cp.namespace("hookrelay").await;
    helm_ok(cp, &["install", "hookrelay", &chart(), "-n", &ns]).await;
    let chart_args: Vec<String> = serde_json::from_str(
        &cp.kubectl_ok(
            &[
                "get",
                "deployment",
                "hookrelay",
                "-n",
                &ns,
                "-o",
                "jsonpath={.spec.template.spec.containers[0].args}",
            ],
            None,
        )
        .await,
    )
    .unwrap();
    assert!(
        !chart_args.iter().any(|a| a.starts_with("--namespace")),
        "cluster-wide: {chart_args:?}"
    );
    let args = local_args(&chart_args);
    assert!(
        args.iter().any(|a| a == "--leader-elect"),
        "the chart turns leader election on: {args:?}"
    );

    // The chart's ServiceAccount, with a TokenRequest token for the API server's audience.
    let token = cp
        .service_account_token_without_audience(&ns, "hookrelay")
        .await;
    let kubeconfig = cp.token_kubeconfig(&token);
    // The chart's arguments (cluster-wide, leader election on), authentication on.
    let mut operator = OperatorArgs::cluster_wide()
        .with_auth()
        .args(&args)
        .env("KUBECONFIG", kubeconfig.to_str().unwrap())
        .env("POD_NAME", "hookrelay-rbac-test")
        .env("POD_NAMESPACE", &ns)
        .start(cp);
    operator.wait_ready().await;
    let (listen_addr, log) = (operator.listen_addr, operator.log.clone());

    // Reconcile to Ready (a status write), deliver (the other status), in a namespace of users.
    let app = cp.namespace("rbac-app").await;
    let admin = cp.client().await;
    let (receiver, addr) = CountingReceiver::start().await;
    create_webhook(
        &admin,
        &app,
        "rbac",
        &format!("http://{addr}/h"),
        SECRET,
        json!({}),
    )
    .await;
    create_event(
        &admin,
        &app,
        "rbac-1",
        "document.completed",
        json!({"document_id": 1}),
    )
    .await;
    wait_phase(&admin, &app, "rbac-1", "Delivered").await;

    // The API: a durable ingest by another ServiceAccount, token minted for hookrelay.
    for cmd in [
        vec![
            "create",
            "role",
            "ingest",
            "-n",
            &app,
            "--verb=create",
            "--resource=documentevents.hookrelay.dev",
        ],
        vec![
            "create",
            "rolebinding",
            "ingest",
            "-n",
            &app,
            "--role=ingest",
            "--serviceaccount",
        ],
    ] {
        let mut cmd: Vec<String> = cmd.into_iter().map(str::to_owned).collect();
        if cmd[1] == "rolebinding" {
            let last = cmd.pop().unwrap();
            cmd.push(format!("{last}={app}:ingest"));
        }
        let refs: Vec<&str> = cmd.iter().map(String::as_str).collect();
        cp.kubectl_ok(&refs, None).await;
    }
    let ingest_token = cp.service_account_token(&app, "ingest").await;
    let (status, body) = api_call(
        listen_addr,
        "POST",
        &format!("/api/events?namespace={app}"),
        Some(&ingest_token),
        Some(r#"{"event":"document.completed","data":{"document_id":2}}"#),
    )
    .await;
    assert_eq!(status, 202, "{body} (log: {})", log.display());
    let name = body["document_events"][0].as_str().unwrap().to_owned();
    wait_phase(&admin, &app, &name, "Delivered").await;
    assert_eq!(receiver.counts().0, 2, "two events delivered");

    // Events (events.k8s.io) on a Webhook whose Secret is missing: the Recorder needs no core
    // `events`. (A Webhook Ready at once records none.)
    let unready: hookrelay::crd::Webhook = serde_json::from_value(json!({
        "apiVersion": "hookrelay.dev/v1alpha1",
        "kind": "Webhook",
        "metadata": {"name": "rbac-unready", "namespace": app},
        "spec": {"url": format!("http://{addr}/h"), "events": ["*"], "secretRef": {"name": "missing"}}
    }))
    .unwrap();
    Api::<hookrelay::crd::Webhook>::namespaced(admin.clone(), &app)
        .create(&Default::default(), &unready)
        .await
        .unwrap();
    let events = eventually("an Event on the Webhook", WAIT, || async {
        let out = cp
            .kubectl(
                &["get", "events.events.k8s.io", "-n", &app, "-o", "json"],
                None,
            )
            .await;
        let list: Value = serde_json::from_str(&out.stdout).ok()?;
        let items = list["items"].as_array()?.clone();
        items
            .iter()
            .any(|e| {
                e["regarding"]["name"] == "rbac-unready"
                    && e["reason"] == "SecretNotFound"
                    && e["reportingInstance"] == "hookrelay-rbac-test"
            })
            .then_some(items)
    })
    .await;
    assert!(!events.is_empty());

    let holder = eventually("the Lease held", WAIT, || async {
        let out = cp
            .kubectl(
                &[
                    "get",
                    "lease",
                    "hookrelay",
                    "-n",
                    &ns,
                    "-o",
                    "jsonpath={.spec.holderIdentity}",
                ],
                None,
            )
            .await;
        (out.success && !out.stdout.is_empty()).then_some(out.stdout)
    })
    .await;
    assert!(
        holder.starts_with("hookrelay-rbac-test_"),
        "the Lease is held by this process (POD_NAME and a suffix): {holder}"
    );

    // Nothing it did was refused.
    let text = operator.log_text();
    assert!(
        !text.to_lowercase().contains("forbidden"),
        "a request was refused (log: {}):\n{text}",
        log.display()
    );

    // Verbs it does not need are refused to it.
    for (verb, resource) in [
        ("list", "pods"),
        ("create", "clusterroles"),
        ("list", "configmaps"),
        ("delete", "customresourcedefinitions"),
    ] {
        let answer = cp
            .kubectl_as(
                &kubeconfig,
                &["auth", "can-i", verb, resource, "--all-namespaces"],
            )
            .await;
        assert_eq!(answer.stdout.trim(), "no", "{verb} {resource}");
    }
    let answer = cp
        .kubectl_as(
            &kubeconfig,
            &[
                "auth",
                "can-i",
                "list",
                "webhooks.hookrelay.dev",
                "--all-namespaces",
            ],
        )
        .await;
    assert_eq!(answer.stdout.trim(), "yes");
    // POST .../rotate-secret patches the signing Secret the API generated, and the leader
    // patches it again when the grace period ends.
    let answer = cp
        .kubectl_as(
            &kubeconfig,
            &["auth", "can-i", "patch", "secrets", "-n", &app],
        )
        .await;
    assert_eq!(answer.stdout.trim(), "yes", "patch secrets");

    operator.child.start_kill().unwrap();
    operator.child.wait().await.unwrap();
    helm_ok(cp, &["uninstall", "hookrelay", "-n", &ns]).await;
}

/// The CRDs as they were before DocumentEvent targets gained `heldSince`.
fn crds_without_held_since() -> String {
    fn drop_held_since(v: &mut Value) -> bool {
        let mut dropped = false;
        if let Some(map) = v.as_object_mut() {
            if let Some(Value::Object(props)) = map.get_mut("properties") {
                dropped |= props.remove("heldSince").is_some();
            }
            for child in map.values_mut() {
                dropped |= drop_held_since(child);
            }
        } else if let Some(list) = v.as_array_mut() {
            for child in list {
                dropped |= drop_held_since(child);
            }
        }
        dropped
    }
    let mut dropped = false;
    let docs: Vec<String> = hookrelay::crd::crd_files()
        .into_iter()
        .map(|(_, yaml)| {
            let mut crd: Value = serde_saphyr::from_str(&yaml).unwrap();
            dropped |= drop_held_since(&mut crd);
            crd.to_string()
        })
        .collect();
    assert!(dropped, "the current CRDs have heldSince");
    docs.join("\n---\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crd_upgrade_with_held_events_in_flight_delivers_them_all() {
    let _private = PRIVATE.lock().await;
    let cp = private_control_plane();
    cp.kubectl_ok(
        &["apply", "--server-side", "--force-conflicts", "-f", "-"],
        Some(&crds_without_held_since()),
    )
    .await;
    cp.kubectl_ok(
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/webhooks.hookrelay.dev",
            "crd/documentevents.hookrelay.dev",
        ],
        None,
    )
    .await;
    let schema = cp
        .kubectl_ok(
            &["get", "crd", "documentevents.hookrelay.dev", "-o", "json"],
            None,
        )
        .await;
    assert!(!schema.contains("heldSince"), "the old CRD is in place");

    let ns = cp.namespace("crd-upgrade").await;
    let client = cp.client().await;
    let (receiver, addr) = CountingReceiver::start().await;
    let manifest = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "held-secret", "labels": {"hookrelay.dev/signing-secret": "true"}},
        "stringData": {"secret": SECRET}
    })
    .to_string();
    cp.kubectl_ok(&["apply", "-n", &ns, "-f", "-"], Some(&manifest))
        .await;
    let manifest = json!({
        "apiVersion": "hookrelay.dev/v1alpha1", "kind": "Webhook", "metadata": {"name": "held"},
        "spec": {"url": format!("http://{addr}/h"), "events": ["*"], "secretRef": {"name": "held-secret"}, "paused": true}
    })
    .to_string();
    cp.kubectl_ok(&["apply", "-n", &ns, "-f", "-"], Some(&manifest))
        .await;

    let operator = crate::support::InProcess::start(cp.config().await, &ns).await;
    const EVENTS: usize = 5;
    for i in 0..EVENTS {
        create_event(
            &client,
            &ns,
            &format!("held-{i}"),
            "document.completed",
            json!({"document_id": i}),
        )
        .await;
    }
    // The operator holds them for the paused Webhook, but the old schema refuses the status it
    // writes (`heldSince`: "field not declared in schema"), as it would for a new operator
    // started before its CRDs were applied.
    let metrics = operator.op.metrics.clone();
    eventually("status writes refused by the old schema", WAIT, || {
        let refused = metrics.status_patch_count(ObjectKind::DocumentEvent, PatchResult::Error);
        async move { (refused >= EVENTS as u64).then_some(()) }
    })
    .await;
    assert_eq!(receiver.counts().0, 0, "nothing sent while paused");

    // The documented upgrade step, while they are held: the writer's retries then succeed.
    apply_chart_crds(cp).await;
    let schema = cp
        .kubectl_ok(
            &["get", "crd", "documentevents.hookrelay.dev", "-o", "json"],
            None,
        )
        .await;
    assert!(schema.contains("heldSince"), "the new CRD is in place");
    let events: Api<DocumentEvent> = Api::namespaced(client.clone(), &ns);
    eventually(
        "every event Held with heldSince in its status",
        WAIT,
        || async {
            let list = events.list(&Default::default()).await.ok()?;
            (list.items.len() == EVENTS
                && list.items.iter().all(|e| {
                    e.status.as_ref().is_some_and(|s| {
                        s.deliveries
                            .iter()
                            .any(|d| d.state == TargetState::Held && d.held_since.is_some())
                    })
                }))
            .then_some(())
        },
    )
    .await;
    assert_eq!(receiver.counts().0, 0, "nothing sent while paused");

    cp.kubectl_ok(
        &[
            "patch",
            "webhook",
            "held",
            "-n",
            &ns,
            "--type=merge",
            "-p",
            r#"{"spec":{"paused":false}}"#,
        ],
        None,
    )
    .await;
    for i in 0..EVENTS {
        wait_phase(&client, &ns, &format!("held-{i}"), "Delivered").await;
    }
    // Delivered means the receiver answered, and it counts on arrival: each once.
    assert_eq!(
        receiver.counts(),
        (EVENTS, EVENTS),
        "each held event delivered once"
    );
    operator.stop().await;
}
