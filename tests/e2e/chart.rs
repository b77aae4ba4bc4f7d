//! The Helm chart (charts/hookrelay) with the real helm and kubectl against the real API server:
//! lint, render, schema, restricted Pod Security, install/upgrade/uninstall, the CRD upgrade
//! step, and its RBAC proven by running the operator binary as the chart's ServiceAccount.
//!
//! There is no kubelet here: `helm install` (never `--wait`) creates objects but no pod runs, so
//! the binary runs locally with the ServiceAccount's token.

use std::{
    path::{Path, PathBuf},
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use hookrelay::{
    crd::{DocumentEvent, TargetState},
    metrics::{ObjectKind, PatchResult},
};
use kube::Api;
use serde_json::{Value, json};

use crate::support::{
    ControlPlane, CountingReceiver, OperatorArgs, api_call, control_plane, create_event,
    create_webhook, eventually, repo_root, wait_phase,
};

const WAIT: Duration = Duration::from_secs(60);
const SECRET: &str = "chart-test-signing-secret-0123456789";

pub(crate) fn chart() -> String {
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

/// `--set crds.enabled=false`, for releases in a cluster whose CRDs were applied apart from
/// Helm: the shared control plane's (the harness applies crds/ with kubectl, as a platform team
/// that manages CRDs itself would), and the private one's where a test applies them. A release
/// rendering them there would be refused: they belong to no release (see
/// `an_earlier_charts_crds_fail_the_upgrade_clearly_until_adopted`).
const CRDS_APPLIED_APART: [&str; 2] = ["--set", "crds.enabled=false"];

/// `helm template` of the chart as release `release` in `namespace`.
pub(crate) async fn render(
    cp: &ControlPlane,
    release: &str,
    namespace: &str,
    extra: &[&str],
) -> String {
    let chart = chart();
    let mut args = vec!["template", release, chart.as_str(), "-n", namespace];
    args.extend(extra);
    cp.helm_ok(&args).await
}

/// The objects of a multi-document YAML stream (comment-only documents dropped).
pub(crate) fn objects(yaml: &str) -> Vec<Value> {
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

/// The rendered object of `kind` named `name`.
fn object<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("a {kind} {name}"))
}

/// `kubectl auth can-i ARGS` as the identity of `kubeconfig`: "yes" or "no".
async fn can_i(cp: &ControlPlane, kubeconfig: &Path, args: &[&str]) -> String {
    let mut full = vec!["auth", "can-i"];
    full.extend(args);
    cp.kubectl_as(kubeconfig, &full)
        .await
        .stdout
        .trim()
        .to_owned()
}

/// A kubeconfig of a new ServiceAccount `name` in `namespace`, bound there by a RoleBinding to
/// the ClusterRole `cluster_role` (as the chart README tells a cluster admin to), once the
/// binding grants `verb` on webhooks.
async fn bound_in(
    cp: &ControlPlane,
    namespace: &str,
    name: &str,
    cluster_role: &str,
    verb: &str,
) -> PathBuf {
    let token = cp
        .service_account_token_without_audience(namespace, name)
        .await;
    cp.kubectl_ok(
        &[
            "create",
            "rolebinding",
            name,
            "-n",
            namespace,
            &format!("--clusterrole={cluster_role}"),
            &format!("--serviceaccount={namespace}:{name}"),
        ],
        None,
    )
    .await;
    let kubeconfig = cp.token_kubeconfig(&token);
    // RBAC decides from its informers' cache: wait until the binding is seen.
    eventually("the RoleBinding in effect", WAIT, || async {
        (can_i(
            cp,
            &kubeconfig,
            &[verb, "webhooks.hookrelay.dev", "-n", namespace],
        )
        .await
            == "yes")
            .then_some(())
    })
    .await;
    kubeconfig
}

/// `manifest` in a file of its own, for kubectl as another identity (`kubectl_as` passes no
/// stdin).
fn manifest_file(manifest: &Value) -> PathBuf {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "hookrelay-chart-{}-{}.json",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, manifest.to_string()).expect("manifest written");
    path
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

/// The chart's CRDs, as the chart README tells to apply them with `crds.enabled=false`.
async fn apply_chart_crds(cp: &ControlPlane) {
    let crds = repo_root()
        .join("charts/hookrelay/files/crds")
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
        let out = cp.helm(&args).await;
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
            // crds.enabled (the default): the release's own, in Helm's install order.
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "ClusterRole",
            "ClusterRole",
            "ClusterRole",
            "ClusterRole",
            "ClusterRole",
            "ClusterRoleBinding",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Service",
            "Service",
            "Deployment",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
            // `helm test`'s
            "Pod"
        ],
        "{defaults}"
    );
    // The roles for people: two folded into the built-in view and edit roles by their labels
    // (no kube-controller-manager runs here to do it: the labels are what can be checked), and
    // the support role folded into none, so that it grants only where it is bound.
    let aggregate = |name: &str| {
        let labels = &object(&default_objects, "ClusterRole", name)["metadata"]["labels"];
        [
            "rbac.authorization.k8s.io/aggregate-to-view",
            "rbac.authorization.k8s.io/aggregate-to-edit",
            "rbac.authorization.k8s.io/aggregate-to-admin",
        ]
        .map(|label| labels[label].as_str().unwrap_or_default().to_owned())
    };
    assert_eq!(
        aggregate("hookrelay-render-aggregate-to-view"),
        ["true", "", ""]
    );
    assert_eq!(
        aggregate("hookrelay-render-aggregate-to-edit"),
        ["", "true", ""]
    );
    assert_eq!(aggregate("hookrelay-render-support"), ["", "", ""]);
    assert!(
        !default_objects
            .iter()
            .any(|o| o["roleRef"]["name"] == "hookrelay-render-support"),
        "nothing is bound to the support role"
    );
    // The admission policy looks only at the operator's own ServiceAccount, and denies.
    let policy = object(
        &default_objects,
        "ValidatingAdmissionPolicy",
        "hookrelay-render-secret-writes",
    );
    assert_eq!(
        policy["spec"]["matchConditions"][0]["expression"],
        format!("request.userInfo.username == \"system:serviceaccount:{ns}:hookrelay-render\"")
    );
    let binding = object(
        &default_objects,
        "ValidatingAdmissionPolicyBinding",
        "hookrelay-render-secret-writes",
    );
    assert_eq!(
        (
            &binding["spec"]["policyName"],
            &binding["spec"]["validationActions"]
        ),
        (&json!("hookrelay-render-secret-writes"), &json!(["Deny"]))
    );
    // Each switch takes its object away.
    let none = render(
        cp,
        "hookrelay-render",
        &ns,
        &[
            "--set",
            "rbac.supportRole.create=false",
            "--set",
            "rbac.aggregateToView=false",
            "--set",
            "rbac.aggregateToEdit=false",
            "--set",
            "rbac.secretWritePolicy.enabled=false",
        ],
    )
    .await;
    let none_kinds = kinds(&objects(&none));
    assert_eq!(
        none_kinds.iter().filter(|k| *k == "ClusterRole").count(),
        2,
        "{none}"
    );
    assert!(
        !none_kinds
            .iter()
            .any(|k| k.starts_with("ValidatingAdmission")),
        "{none}"
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
        // In each listed namespace the operator's Role grants Secret writes too.
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
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
        format!("--watch-namespace={team_a}"),
        format!("--watch-namespace={team_b}"),
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
        "configmap/hookrelay-every-dashboard created (server dry run)",
        "certificate.cert-manager.io/hookrelay-every created (server dry run)",
        "networkpolicy.networking.k8s.io/hookrelay-every created (server dry run)",
        "poddisruptionbudget.policy/hookrelay-every created (server dry run)",
        "clusterrole.rbac.authorization.k8s.io/hookrelay-every-viewer created (server dry run)",
        "clusterrole.rbac.authorization.k8s.io/hookrelay-every-support created (server dry run)",
        "validatingadmissionpolicy.admissionregistration.k8s.io/hookrelay-every-secret-writes created (server dry run)",
        "validatingadmissionpolicybinding.admissionregistration.k8s.io/hookrelay-every-secret-writes created (server dry run)",
    ] {
        assert!(out.stdout.contains(created), "{created}: {}", out.stdout);
    }
}

#[tokio::test]
async fn the_values_schema_refuses_a_wrong_type_and_an_unknown_key() {
    let cp = control_plane();
    let wrong_type = cp
        .helm(&["template", "x", &chart(), "--set", "replicaCount=two"])
        .await;
    assert!(!wrong_type.success);
    assert!(
        wrong_type
            .stderr
            .contains("at '/replicaCount': got string, want integer"),
        "{}",
        wrong_type.stderr
    );
    let unknown = cp
        .helm(&["template", "x", &chart(), "--set", "config.maxInflight=5"])
        .await;
    assert!(!unknown.success);
    assert!(
        unknown
            .stderr
            .contains("at '/config': additional properties 'maxInflight' not allowed"),
        "{}",
        unknown.stderr
    );
    let not_an_enum = cp
        .helm(&["template", "x", &chart(), "--set", "config.ingestMode=fast"])
        .await;
    assert!(!not_an_enum.success);
    assert!(
        not_an_enum.stderr.contains("at '/config/ingestMode'"),
        "{}",
        not_an_enum.stderr
    );
    let no_nats_url = cp
        .helm(&[
            "template",
            "x",
            &chart(),
            "--set",
            "config.ingestMode=jetstream",
        ])
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
        (
            None,
            "clusterroles,clusterrolebindings,validatingadmissionpolicies,validatingadmissionpolicybindings",
        ),
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
    cp.helm_ok(&[
        "install",
        release,
        &chart(),
        "-n",
        &ns,
        CRDS_APPLIED_APART[0],
        CRDS_APPLIED_APART[1],
    ])
    .await;
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
    for expected in [
        "clusterrole.rbac.authorization.k8s.io/hookrelay-life",
        "clusterrole.rbac.authorization.k8s.io/hookrelay-life-support",
        "clusterrole.rbac.authorization.k8s.io/hookrelay-life-aggregate-to-view",
        "clusterrole.rbac.authorization.k8s.io/hookrelay-life-aggregate-to-edit",
        "validatingadmissionpolicy.admissionregistration.k8s.io/hookrelay-life-secret-writes",
        "validatingadmissionpolicybinding.admissionregistration.k8s.io/hookrelay-life-secret-writes",
        "deployment.apps/hookrelay-life",
    ] {
        assert!(
            installed.contains(&expected.to_owned()),
            "{expected} in {installed:?}"
        );
    }

    cp.helm_ok(&[
        "upgrade",
        release,
        &chart(),
        "-n",
        &ns,
        CRDS_APPLIED_APART[0],
        CRDS_APPLIED_APART[1],
        "--set",
        "config.maxInFlight=64",
        "--set",
        "replicaCount=2",
    ])
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

    cp.helm_ok(&["uninstall", release, "-n", &ns]).await;
    assert_eq!(
        release_objects(cp, release, &ns).await,
        Vec::<String>::new()
    );
    // Helm's own release records are gone too.
    let secrets = cp
        .kubectl_ok(&["get", "secrets", "-n", &ns, "-o", "name"], None)
        .await;
    assert_eq!(secrets.trim(), "", "left in {ns}");
    // The CRDs were not the release's: they stay (what a release's own do on uninstall is
    // `uninstalling_keeps_the_releases_crds_and_webhooks_unless_crds_keep_is_off`).
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
    cp.helm_ok(&[
        "install",
        release,
        &chart(),
        "-n",
        &ns,
        CRDS_APPLIED_APART[0],
        CRDS_APPLIED_APART[1],
        "--set",
        &format!("watchNamespaces={{{listed}}}"),
    ])
    .await;
    let token = cp
        .service_account_token_without_audience(&ns, release)
        .await;
    let kubeconfig = cp.token_kubeconfig(&token);
    assert_eq!(
        can_i(
            cp,
            &kubeconfig,
            &["list", "webhooks.hookrelay.dev", "-n", &listed]
        )
        .await,
        "yes"
    );
    assert_eq!(
        can_i(cp, &kubeconfig, &["create", "secrets", "-n", &listed]).await,
        "yes"
    );
    assert_eq!(
        can_i(cp, &kubeconfig, &["watch", "services", "-n", &listed]).await,
        "yes"
    );
    assert_eq!(
        can_i(cp, &kubeconfig, &["update", "services", "-n", &listed]).await,
        "no"
    );
    assert_eq!(
        can_i(
            cp,
            &kubeconfig,
            &["list", "webhooks.hookrelay.dev", "-n", &other]
        )
        .await,
        "no"
    );
    assert_eq!(
        can_i(cp, &kubeconfig, &["get", "secrets", "-n", &other]).await,
        "no"
    );
    assert_eq!(
        can_i(
            cp,
            &kubeconfig,
            &["list", "webhooks.hookrelay.dev", "--all-namespaces"]
        )
        .await,
        "no"
    );
    assert_eq!(
        can_i(
            cp,
            &kubeconfig,
            &["create", "tokenreviews.authentication.k8s.io"]
        )
        .await,
        "yes"
    );
    assert_eq!(
        can_i(cp, &kubeconfig, &["get", "crd/webhooks.hookrelay.dev"]).await,
        "yes"
    );
    assert_eq!(can_i(cp, &kubeconfig, &["list", "crd"]).await, "no");
    assert_eq!(
        can_i(
            cp,
            &kubeconfig,
            &["update", "leases.coordination.k8s.io/hookrelay", "-n", &ns]
        )
        .await,
        "yes"
    );
    assert_eq!(
        can_i(
            cp,
            &kubeconfig,
            &["update", "leases.coordination.k8s.io/other", "-n", &ns]
        )
        .await,
        "no"
    );
    cp.helm_ok(&["uninstall", release, "-n", &ns]).await;
}

#[tokio::test]
async fn the_support_role_acts_on_deliveries_but_neither_changes_webhooks_nor_rotates_secrets() {
    let cp = control_plane();
    let ns = cp.namespace("chart-roles").await;
    let team = cp.namespace("chart-roles-team").await;
    let other = cp.namespace("chart-roles-other").await;
    let release = "hookrelay-roles";
    cp.helm_ok(&[
        "install",
        release,
        &chart(),
        "-n",
        &ns,
        CRDS_APPLIED_APART[0],
        CRDS_APPLIED_APART[1],
    ])
    .await;
    let webhooks = "webhooks.hookrelay.dev";

    // Support, bound in `team` only.
    let support = bound_in(cp, &team, "support", "hookrelay-roles-support", "list").await;
    for verb in [
        "get",
        "list",
        "watch",
        "test",
        "redeliver",
        "recover",
        "pause",
        "resume",
    ] {
        assert_eq!(
            can_i(cp, &support, &[verb, webhooks, "-n", &team]).await,
            "yes",
            "{verb} webhooks"
        );
    }
    assert_eq!(
        can_i(
            cp,
            &support,
            &["get", "documentevents.hookrelay.dev", "-n", &team]
        )
        .await,
        "yes"
    );
    // Changing a Webhook, and rotating its secret (the reply is the new secret), are not
    // support's.
    for verb in ["update", "patch", "create", "delete", "rotate"] {
        assert_eq!(
            can_i(cp, &support, &[verb, webhooks, "-n", &team]).await,
            "no",
            "{verb} webhooks"
        );
    }
    assert_eq!(
        can_i(
            cp,
            &support,
            &["create", "documentevents.hookrelay.dev", "-n", &team]
        )
        .await,
        "no"
    );
    for verb in ["get", "test", "redeliver"] {
        assert_eq!(
            can_i(cp, &support, &[verb, webhooks, "-n", &other]).await,
            "no",
            "{verb} webhooks in a namespace it is not bound in"
        );
    }

    // The share of the built-in edit role, bound the same way (the aggregation into `edit`
    // needs a kube-controller-manager, which does not run here).
    let editor = bound_in(
        cp,
        &team,
        "editor",
        "hookrelay-roles-aggregate-to-edit",
        "update",
    )
    .await;
    for verb in [
        "create",
        "update",
        "patch",
        "delete",
        "test",
        "redeliver",
        "recover",
        "pause",
        "resume",
        "rotate",
    ] {
        assert_eq!(
            can_i(cp, &editor, &[verb, webhooks, "-n", &team]).await,
            "yes",
            "{verb} webhooks"
        );
    }
    for (verb, answer) in [("create", "yes"), ("delete", "yes"), ("update", "no")] {
        assert_eq!(
            can_i(
                cp,
                &editor,
                &[verb, "documentevents.hookrelay.dev", "-n", &team]
            )
            .await,
            answer,
            "{verb} documentevents"
        );
    }
    assert_eq!(
        can_i(cp, &editor, &["redeliver", webhooks, "-n", &other]).await,
        "no"
    );

    // The share of the built-in view role: reading only.
    let viewer = bound_in(
        cp,
        &team,
        "viewer",
        "hookrelay-roles-aggregate-to-view",
        "list",
    )
    .await;
    for (verb, answer) in [
        ("get", "yes"),
        ("watch", "yes"),
        ("test", "no"),
        ("update", "no"),
    ] {
        assert_eq!(
            can_i(cp, &viewer, &[verb, webhooks, "-n", &team]).await,
            answer,
            "{verb} webhooks"
        );
    }
    cp.helm_ok(&["uninstall", release, "-n", &ns]).await;
}

#[tokio::test]
async fn the_admission_policy_lets_the_operator_write_only_the_secrets_its_api_generates() {
    let cp = control_plane();
    let ns = cp.namespace("chart-policy").await;
    let team = cp.namespace("chart-policy-team").await;
    let release = "hookrelay-policy";
    cp.helm_ok(&[
        "install",
        release,
        &chart(),
        "-n",
        &ns,
        CRDS_APPLIED_APART[0],
        CRDS_APPLIED_APART[1],
    ])
    .await;
    let token = cp
        .service_account_token_without_audience(&ns, release)
        .await;
    let operator = cp.token_kubeconfig(&token);
    let refusal = "may create only the Secrets its REST API generates, labelled \
                   app.kubernetes.io/managed-by=hookrelay-api";
    let create_plain = |name: &'static str, dry_run: bool| {
        let operator = operator.clone();
        let team = team.clone();
        async move {
            let mut args = vec![
                "create",
                "secret",
                "generic",
                name,
                "--from-literal=a=b",
                "-n",
                &team,
            ];
            if dry_run {
                args.push("--dry-run=server");
            }
            cp.kubectl_as(&operator, &args).await
        }
    };

    // RBAC lets the operator create any Secret; the policy, once the API server has loaded
    // it, refuses one without the label, saying why.
    assert_eq!(
        can_i(cp, &operator, &["create", "secrets", "-n", &team]).await,
        "yes"
    );
    eventually("the policy in effect", WAIT, || async {
        let out = create_plain("probe", true).await;
        (!out.success).then_some(())
    })
    .await;
    let refused = create_plain("x", false).await;
    assert!(!refused.success, "{}", refused.stdout);
    assert!(refused.stderr.contains(refusal), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("hookrelay-policy-secret-writes"),
        "the message names the policy: {}",
        refused.stderr
    );

    // A Secret as the API generates it: created, changed and deleted.
    let secret = |name: &str, labels: Value, type_: &str, annotations: Value| {
        manifest_file(&json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": team, "labels": labels,
                         "annotations": annotations},
            "type": type_,
            "stringData": {"secret": "whsec_0123456789abcdef"},
        }))
    };
    let generated = json!({
        "app.kubernetes.io/managed-by": "hookrelay-api",
        "hookrelay.dev/signing-secret": "true",
    });
    let file = secret("generated", generated.clone(), "Opaque", json!({}));
    let created = cp
        .kubectl_as(&operator, &["create", "-f", file.to_str().unwrap()])
        .await;
    assert!(created.success, "{}", created.stderr);
    let changed = cp
        .kubectl_as(
            &operator,
            &[
                "annotate",
                "secret",
                "generated",
                "-n",
                &team,
                "rotated=yes",
            ],
        )
        .await;
    assert!(changed.success, "{}", changed.stderr);
    // Its label cannot be taken off...
    let unlabel = cp
        .kubectl_as(
            &operator,
            &[
                "label",
                "secret",
                "generated",
                "-n",
                &team,
                "app.kubernetes.io/managed-by-",
            ],
        )
        .await;
    assert!(!unlabel.success);
    assert!(
        unlabel
            .stderr
            .contains("may change only the Secrets its REST API generates")
            && unlabel.stderr.contains("before and after the change"),
        "{}",
        unlabel.stderr
    );
    let deleted = cp
        .kubectl_as(&operator, &["delete", "secret", "generated", "-n", &team])
        .await;
    assert!(deleted.success, "{}", deleted.stderr);

    // ...nor put on a Secret of the namespace's own, which it may neither change nor delete.
    cp.kubectl_ok(
        &[
            "create",
            "secret",
            "generic",
            "database",
            "--from-literal=password=p",
            "-n",
            &team,
        ],
        None,
    )
    .await;
    let label = cp
        .kubectl_as(
            &operator,
            &[
                "label",
                "secret",
                "database",
                "-n",
                &team,
                "app.kubernetes.io/managed-by=hookrelay-api",
            ],
        )
        .await;
    assert!(!label.success);
    assert!(
        label.stderr.contains("may change only the Secrets"),
        "{}",
        label.stderr
    );
    let delete = cp
        .kubectl_as(&operator, &["delete", "secret", "database", "-n", &team])
        .await;
    assert!(!delete.success);
    assert!(
        delete
            .stderr
            .contains("may delete only the Secrets its REST API generates"),
        "{}",
        delete.stderr
    );
    cp.kubectl_ok(&["get", "secret", "database", "-n", &team], None)
        .await;

    // Labelled but not Opaque: a service-account-token Secret would be filled with another
    // account's token by the cluster.
    let file = secret(
        "token",
        generated,
        "kubernetes.io/service-account-token",
        json!({"kubernetes.io/service-account.name": "default"}),
    );
    let token_secret = cp
        .kubectl_as(&operator, &["create", "-f", file.to_str().unwrap()])
        .await;
    assert!(!token_secret.success);
    assert!(
        token_secret
            .stderr
            .contains("may write only Opaque Secrets"),
        "{}",
        token_secret.stderr
    );

    // Anyone else with the same RBAC is not looked at.
    let bystander = bound_in(cp, &team, "bystander", release, "update").await;
    let out = cp
        .kubectl_as(
            &bystander,
            &[
                "create",
                "secret",
                "generic",
                "x",
                "--from-literal=a=b",
                "-n",
                &team,
            ],
        )
        .await;
    assert!(out.success, "{}", out.stderr);
    let out = cp
        .kubectl_as(&bystander, &["delete", "secret", "database", "-n", &team])
        .await;
    assert!(out.success, "{}", out.stderr);
    cp.helm_ok(&["uninstall", release, "-n", &ns]).await;
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
    cp.helm_ok(&[
        "install",
        "hookrelay",
        &chart(),
        "-n",
        &ns,
        CRDS_APPLIED_APART[0],
        CRDS_APPLIED_APART[1],
    ])
    .await;
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
        !chart_args
            .iter()
            .any(|a| a.starts_with("--watch-namespace")),
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

    // The Secrets it writes: one generated by POST /api/webhooks, rotated, its previous key
    // removed by the leader when the grace period ends, and deleted with its Webhook, all
    // through the chart's admission policy, which is in effect (it refuses the operator a
    // Secret the API did not generate).
    eventually("the admission policy in effect", WAIT, || async {
        let out = cp
            .kubectl_as(
                &kubeconfig,
                &[
                    "create",
                    "secret",
                    "generic",
                    "not-generated",
                    "--from-literal=a=b",
                    "-n",
                    &app,
                    "--dry-run=server",
                ],
            )
            .await;
        (!out.success && out.stderr.contains("hookrelay-secret-writes")).then_some(())
    })
    .await;
    // A caller with the built-in edit role's share (bound directly: no aggregation runs here).
    let owner_token = cp.service_account_token(&app, "owner").await;
    cp.kubectl_ok(
        &[
            "create",
            "rolebinding",
            "owner",
            "-n",
            &app,
            "--clusterrole=hookrelay-aggregate-to-edit",
            &format!("--serviceaccount={app}:owner"),
        ],
        None,
    )
    .await;
    // Asked before RBAC's cache has the binding, the API would refuse (and cache that answer).
    let owner = format!("--as=system:serviceaccount:{app}:owner");
    eventually("the owner's RoleBinding in effect", WAIT, || async {
        let out = cp
            .kubectl(
                &[
                    "auth",
                    "can-i",
                    "rotate",
                    "webhooks.hookrelay.dev",
                    "-n",
                    &app,
                    &owner,
                ],
                None,
            )
            .await;
        (out.stdout.trim() == "yes").then_some(())
    })
    .await;
    let (status, created) = api_call(
        listen_addr,
        "POST",
        &format!("/api/webhooks?namespace={app}"),
        Some(&owner_token),
        Some(&json!({"url": format!("http://{addr}/h"), "events": ["*"]}).to_string()),
    )
    .await;
    assert_eq!(status, 201, "{created} (log: {})", log.display());
    let id = created["id"].as_str().unwrap().to_owned();
    let secret_name = format!("{id}-secret");
    let (status, rotated) = api_call(
        listen_addr,
        "POST",
        &format!("/api/webhooks/{id}/rotate-secret?namespace={app}&graceSeconds=1"),
        Some(&owner_token),
        None,
    )
    .await;
    assert_eq!(status, 200, "{rotated} (log: {})", log.display());
    eventually("the previous key removed by the leader", WAIT, || async {
        let out = cp
            .kubectl(
                &["get", "secret", &secret_name, "-n", &app, "-o", "json"],
                None,
            )
            .await;
        let secret: Value = serde_json::from_str(&out.stdout).ok()?;
        (secret["data"].get("secret").is_some() && secret["data"].get("previous").is_none())
            .then_some(())
    })
    .await;
    let (status, reply) = api_call(
        listen_addr,
        "DELETE",
        &format!("/api/webhooks/{id}?namespace={app}"),
        Some(&owner_token),
        None,
    )
    .await;
    assert_eq!(status, 204, "{reply}");
    // No garbage collector runs here: the Secret is gone because the API deleted it.
    let gone = cp
        .kubectl(&["get", "secret", &secret_name, "-n", &app], None)
        .await;
    assert!(
        gone.stderr.contains("NotFound"),
        "{}{}",
        gone.stdout,
        gone.stderr
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
        assert_eq!(
            can_i(cp, &kubeconfig, &[verb, resource, "--all-namespaces"]).await,
            "no",
            "{verb} {resource}"
        );
    }
    assert_eq!(
        can_i(
            cp,
            &kubeconfig,
            &["list", "webhooks.hookrelay.dev", "--all-namespaces"]
        )
        .await,
        "yes"
    );
    // POST .../rotate-secret patches the signing Secret the API generated, and the leader
    // patches it again when the grace period ends.
    assert_eq!(
        can_i(cp, &kubeconfig, &["patch", "secrets", "-n", &app]).await,
        "yes",
        "patch secrets"
    );

    operator.child.start_kill().unwrap();
    operator.child.wait().await.unwrap();
    cp.helm_ok(&["uninstall", "hookrelay", "-n", &ns]).await;
}

/// The CRDs as they were before DocumentEvent targets gained `heldSince`.
fn crds_without_held_since() -> String {
    crd_files_without_held_since()
        .into_iter()
        .map(|(_, json)| json)
        .collect::<Vec<_>>()
        .join("\n---\n")
}

/// Each CRD as `(file name, JSON)` as it was before DocumentEvent targets gained `heldSince`.
fn crd_files_without_held_since() -> Vec<(String, String)> {
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
    let files: Vec<(String, String)> = hookrelay::crd::crd_files()
        .into_iter()
        .map(|(name, yaml)| {
            let mut crd: Value = serde_saphyr::from_str(&yaml).unwrap();
            dropped |= drop_held_since(&mut crd);
            (name, crd.to_string())
        })
        .collect();
    assert!(dropped, "the current CRDs have heldSince");
    files
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

    // The upgrade step the chart README gives for CRDs applied apart from Helm
    // (crds.enabled=false), while they are held: the writer's retries then succeed.
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

#[tokio::test]
async fn security_contexts_and_extra_volumes_are_values_and_older_clusters_are_refused() {
    let cp = control_plane();
    let deployment = |yaml: &str| {
        objects(yaml)
            .into_iter()
            .find(|o| o["kind"] == "Deployment")
            .expect("a Deployment")
    };
    // The defaults meet the restricted profile, as UID 65532.
    let defaults = deployment(&render(cp, "hookrelay-sc", "sc", &[]).await);
    let pod = &defaults["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let container = &pod["containers"][0];
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert!(container.get("volumeMounts").is_none(), "{container}");
    // OpenShift's restricted SCC assigns the UID: null removes it, the rest stays.
    let openshift = deployment(
        &render(
            cp,
            "hookrelay-sc",
            "sc",
            &[
                "--set",
                "podSecurityContext.runAsUser=null",
                "--set",
                "podSecurityContext.runAsGroup=null",
                "--set",
                "extraVolumes[0].name=corp-ca",
                "--set",
                "extraVolumes[0].configMap.name=corp-ca",
                "--set",
                "extraVolumeMounts[0].name=corp-ca",
                "--set",
                "extraVolumeMounts[0].mountPath=/etc/corp-ca",
            ],
        )
        .await,
    );
    let pod = &openshift["spec"]["template"]["spec"];
    assert!(pod["securityContext"].get("runAsUser").is_none(), "{pod}");
    assert!(pod["securityContext"].get("runAsGroup").is_none(), "{pod}");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["volumes"][0]["configMap"]["name"], "corp-ca");
    assert_eq!(
        pod["containers"][0]["volumeMounts"][0]["mountPath"],
        "/etc/corp-ca"
    );
    // CEL rules in CRDs and ValidatingAdmissionPolicy v1 need 1.30: an older cluster is refused
    // by helm itself, naming the constraint.
    let old = cp
        .helm(&["template", "x", &chart(), "--kube-version", "1.29.0"])
        .await;
    assert!(!old.success);
    assert!(old.stderr.contains(">=1.30.0-0"), "{}", old.stderr);
}

/// The CRDs the chart renders from files/crds/ (crds.enabled).
const CRDS: [&str; 2] = ["documentevents.hookrelay.dev", "webhooks.hookrelay.dev"];

/// A CRD's metadata, or None when the API server has no such CRD.
async fn crd_metadata(cp: &ControlPlane, name: &str) -> Option<Value> {
    let out = cp.kubectl(&["get", "crd", name, "-o", "json"], None).await;
    if !out.success {
        assert!(out.stderr.contains("NotFound"), "{}", out.stderr);
        return None;
    }
    let crd: Value = serde_json::from_str(&out.stdout).expect("a CRD as JSON");
    Some(crd["metadata"].clone())
}

/// Whether the live DocumentEvent CRD has the `heldSince` field the current types have.
async fn crd_has_held_since(cp: &ControlPlane) -> bool {
    cp.kubectl_ok(
        &["get", "crd", "documentevents.hookrelay.dev", "-o", "json"],
        None,
    )
    .await
    .contains("heldSince")
}

async fn wait_crds_established(cp: &ControlPlane) {
    let mut args = vec!["wait", "--for=condition=Established", "--timeout=60s"];
    let names: Vec<String> = CRDS.iter().map(|n| format!("crd/{n}")).collect();
    args.extend(names.iter().map(String::as_str));
    cp.kubectl_ok(&args, None).await;
}

/// Deletes both CRDs (and so every Webhook and DocumentEvent) and waits until they are gone:
/// the private control plane's tests each start from the CRDs they need.
async fn delete_crds(cp: &ControlPlane) {
    let mut args = vec!["delete", "crd", "--ignore-not-found", "--timeout=60s"];
    args.extend(CRDS);
    cp.kubectl_ok(&args, None).await;
    for name in CRDS {
        eventually(&format!("{name} deleted"), WAIT, || async {
            crd_metadata(cp, name).await.is_none().then_some(())
        })
        .await;
    }
}

/// A Webhook `name` in `ns` (no operator runs: only the API server's validation matters).
async fn apply_webhook(cp: &ControlPlane, ns: &str, name: &str) {
    let manifest = json!({
        "apiVersion": "hookrelay.dev/v1alpha1", "kind": "Webhook", "metadata": {"name": name},
        "spec": {"url": "https://receiver.example/h", "events": ["*"], "secretRef": {"name": "signing"}}
    })
    .to_string();
    cp.kubectl_ok(&["apply", "-n", ns, "-f", "-"], Some(&manifest))
        .await;
}

/// Runs `command` with bash, the control plane's kubectl and helm first on the PATH.
async fn shell(cp: &ControlPlane, command: &str) -> crate::support::Kubectl {
    let path = format!(
        "{}:{}",
        cp.bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    tokio::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", command])
        .env("KUBECONFIG", &cp.kubeconfig)
        .env("PATH", path)
        .kill_on_drop(true)
        .output()
        .await
        .expect("bash runs")
        .into()
}

/// Every number as a float: helm's fromYaml/toYaml writes `86400.0` as `86400`, the same number.
fn numbers_as_floats(v: &Value) -> Value {
    match v {
        Value::Number(n) => json!(n.as_f64().unwrap()),
        Value::Array(items) => Value::Array(items.iter().map(numbers_as_floats).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), numbers_as_floats(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

#[tokio::test]
async fn the_chart_renders_the_generated_crds_labelled_and_kept_and_none_with_crds_disabled() {
    let cp = control_plane();
    let crds_of = |yaml: &str| -> Vec<Value> {
        objects(yaml)
            .into_iter()
            .filter(|o| o["kind"] == "CustomResourceDefinition")
            .collect()
    };
    let defaults = render(cp, "hookrelay-crds", "crds-ns", &[]).await;
    let rendered = crds_of(&defaults);
    let generated: Vec<Value> = hookrelay::crd::crd_files()
        .into_iter()
        .map(|(_, yaml)| serde_saphyr::from_str(&yaml).unwrap())
        .collect();
    assert_eq!(rendered.len(), generated.len(), "{defaults}");
    for crd in &generated {
        let name = crd["metadata"]["name"].as_str().unwrap();
        let ours = object(&rendered, "CustomResourceDefinition", name);
        // What `hookrelay crds` writes, unchanged by the round trip through the template.
        assert_eq!(
            numbers_as_floats(&ours["spec"]),
            numbers_as_floats(&crd["spec"]),
            "{name}"
        );
        let meta = &ours["metadata"];
        assert_eq!(meta["annotations"]["helm.sh/resource-policy"], "keep");
        assert_eq!(meta["labels"]["app.kubernetes.io/managed-by"], "Helm");
        assert_eq!(
            meta["labels"]["app.kubernetes.io/instance"],
            "hookrelay-crds"
        );
        assert_eq!(meta["labels"]["app.kubernetes.io/name"], "hookrelay");
        assert!(meta.get("namespace").is_none(), "{meta}");
    }
    let names: Vec<&str> = rendered
        .iter()
        .map(|c| c["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, CRDS);

    // crds.keep=false: the same CRDs without the annotation, so that uninstall deletes them.
    let unkept = render(
        cp,
        "hookrelay-crds",
        "crds-ns",
        &["--set", "crds.keep=false"],
    )
    .await;
    let unkept = crds_of(&unkept);
    assert_eq!(unkept.len(), 2);
    for crd in &unkept {
        assert!(
            crd["metadata"]["annotations"]
                .get("helm.sh/resource-policy")
                .is_none(),
            "{crd}"
        );
    }

    // crds.enabled=false: no CRD, and nothing else missing.
    let disabled = render(cp, "hookrelay-crds", "crds-ns", &CRDS_APPLIED_APART).await;
    assert!(crds_of(&disabled).is_empty(), "{disabled}");
    let without_crds: Vec<String> = kinds(&objects(&defaults))
        .into_iter()
        .filter(|k| k != "CustomResourceDefinition")
        .collect();
    assert_eq!(kinds(&objects(&disabled)), without_crds);

    // A wrong type is refused by the schema.
    let wrong = cp
        .helm(&["template", "x", &chart(), "--set", "crds.keep=maybe"])
        .await;
    assert!(!wrong.success);
    assert!(
        wrong
            .stderr
            .contains("at '/crds/keep': got string, want boolean"),
        "{}",
        wrong.stderr
    );
}

#[tokio::test]
async fn uninstalling_keeps_the_releases_crds_and_webhooks_unless_crds_keep_is_off() {
    let _private = PRIVATE.lock().await;
    let cp = private_control_plane();
    delete_crds(cp).await;
    let ns = cp.namespace("chart-crds").await;
    let app = cp.namespace("chart-crds-app").await;
    let release = "hookrelay-crds";
    cp.helm_ok(&["install", release, &chart(), "-n", &ns]).await;
    wait_crds_established(cp).await;
    for name in CRDS {
        let meta = crd_metadata(cp, name).await.expect("installed");
        assert_eq!(meta["labels"]["app.kubernetes.io/managed-by"], "Helm");
        assert_eq!(meta["labels"]["app.kubernetes.io/instance"], release);
        assert_eq!(meta["annotations"]["meta.helm.sh/release-name"], release);
        assert_eq!(meta["annotations"]["meta.helm.sh/release-namespace"], *ns);
        assert_eq!(meta["annotations"]["helm.sh/resource-policy"], "keep");
    }
    assert!(crd_has_held_since(cp).await, "the current CRDs");
    apply_webhook(cp, &app, "kept").await;
    create_event(
        &cp.client().await,
        &app,
        "kept-event",
        "document.completed",
        json!({"document_id": 1}),
    )
    .await;

    // An upgrade finds the CRDs its own and goes through.
    cp.helm_ok(&[
        "upgrade",
        release,
        &chart(),
        "-n",
        &ns,
        "--set",
        "config.maxInFlight=64",
    ])
    .await;

    let out = cp.helm(&["uninstall", release, "-n", &ns]).await;
    assert!(out.success, "{}{}", out.stdout, out.stderr);
    let said = format!("{}{}", out.stdout, out.stderr);
    assert!(
        said.contains("kept due to the resource policy")
            && said.contains("[CustomResourceDefinition] webhooks.hookrelay.dev"),
        "{said}"
    );
    for name in CRDS {
        assert!(crd_metadata(cp, name).await.is_some(), "{name} kept");
    }
    cp.kubectl_ok(&["get", "webhook", "kept", "-n", &app], None)
        .await;
    cp.kubectl_ok(&["get", "documentevent", "kept-event", "-n", &app], None)
        .await;

    // Installed again under the same name and namespace, the release takes its CRDs back.
    cp.helm_ok(&["install", release, &chart(), "-n", &ns]).await;
    cp.kubectl_ok(&["get", "webhook", "kept", "-n", &app], None)
        .await;

    // crds.keep=false: the annotation goes, and uninstall deletes the CRDs and every Webhook.
    cp.helm_ok(&[
        "upgrade",
        release,
        &chart(),
        "-n",
        &ns,
        "--set",
        "crds.keep=false",
    ])
    .await;
    for name in CRDS {
        let meta = crd_metadata(cp, name).await.expect("still installed");
        assert!(
            meta["annotations"].get("helm.sh/resource-policy").is_none(),
            "{meta}"
        );
    }
    cp.helm_ok(&["uninstall", release, "-n", &ns]).await;
    for name in CRDS {
        eventually(&format!("{name} deleted by uninstall"), WAIT, || async {
            crd_metadata(cp, name).await.is_none().then_some(())
        })
        .await;
    }
    // The resource type is gone with its objects (kubectl says so as its discovery cache has
    // it or not).
    let gone = cp.kubectl(&["get", "webhooks", "-n", &app], None).await;
    assert!(!gone.success, "{}", gone.stdout);
    assert!(
        gone.stderr
            .contains("the server doesn't have a resource type \"webhooks\"")
            || gone
                .stderr
                .contains("the server could not find the requested resource"),
        "{}",
        gone.stderr
    );
}

/// Copies the directory `from` into `to`, recursively.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// The chart as earlier versions had it: the CRDs in crds/ (which Helm installs on the first
/// install without its ownership labels, and never upgrades), in the form they had before
/// `heldSince`, and no templates/crds.yaml.
fn earlier_chart() -> PathBuf {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "hookrelay-earlier-chart-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let chart = dir.join("hookrelay");
    copy_dir(&repo_root().join("charts/hookrelay"), &chart);
    std::fs::remove_file(chart.join("templates/crds.yaml")).unwrap();
    std::fs::remove_dir_all(chart.join("files/crds")).unwrap();
    std::fs::create_dir_all(chart.join("crds")).unwrap();
    for (name, json) in crd_files_without_held_since() {
        std::fs::write(chart.join("crds").join(name), json).unwrap();
    }
    chart
}

/// The adoption command of the chart README's upgrade notes, for `release` in `namespace`.
fn documented_adoption(release: &str, namespace: &str) -> String {
    let readme = std::fs::read_to_string(repo_root().join("charts/hookrelay/README.md"))
        .expect("the chart README");
    let line = readme
        .lines()
        .find(|l| l.starts_with("kubectl label crd "))
        .expect("the chart README gives the adoption command");
    assert!(
        line.contains("$RELEASE") && line.contains("$NAMESPACE"),
        "{line}"
    );
    line.replace("$RELEASE", release)
        .replace("$NAMESPACE", namespace)
}

#[tokio::test]
async fn an_earlier_charts_crds_fail_the_upgrade_clearly_until_adopted() {
    let _private = PRIVATE.lock().await;
    let cp = private_control_plane();
    delete_crds(cp).await;
    let earlier = earlier_chart();
    let earlier = earlier.to_str().unwrap();
    let ns = cp.namespace("chart-adopt").await;
    let app = cp.namespace("chart-adopt-app").await;
    let release = "hookrelay-adopt";
    cp.helm_ok(&["install", release, earlier, "-n", &ns]).await;
    wait_crds_established(cp).await;
    for name in CRDS {
        let meta = crd_metadata(cp, name).await.expect("installed from crds/");
        assert!(
            meta["labels"].get("app.kubernetes.io/managed-by").is_none(),
            "{meta}"
        );
        assert!(
            meta["annotations"]
                .get("meta.helm.sh/release-name")
                .is_none(),
            "{meta}"
        );
    }
    assert!(!crd_has_held_since(cp).await, "the earlier CRDs");
    apply_webhook(cp, &app, "from-before").await;

    // A new release, and the upgrade of the existing one, are refused before anything changes,
    // with the command that adopts the CRDs for that release.
    let other_ns = cp.namespace("chart-adopt-other").await;
    let other = cp
        .helm(&["install", "hookrelay-other", &chart(), "-n", &other_ns])
        .await;
    assert!(!other.success, "{}", other.stdout);
    assert!(
        other.stderr.contains("exists but no Helm release owns it")
            && other
                .stderr
                .contains(&documented_adoption("hookrelay-other", &other_ns)),
        "{}",
        other.stderr
    );
    let refused = cp.helm(&["upgrade", release, &chart(), "-n", &ns]).await;
    assert!(!refused.success, "{}", refused.stdout);
    let adoption = documented_adoption(release, &ns);
    assert!(
        refused
            .stderr
            .contains("exists but no Helm release owns it")
            && refused.stderr.contains(&adoption),
        "{}",
        refused.stderr
    );
    assert!(!crd_has_held_since(cp).await, "nothing changed");
    // The documented adoption, then the upgrade: the release owns the CRDs and upgrades them.
    let adopted = shell(cp, &adoption).await;
    assert!(
        adopted.success,
        "{adoption}: {}{}",
        adopted.stdout, adopted.stderr
    );
    cp.helm_ok(&["upgrade", release, &chart(), "-n", &ns]).await;
    for name in CRDS {
        let meta = crd_metadata(cp, name).await.expect("still there");
        assert_eq!(meta["labels"]["app.kubernetes.io/managed-by"], "Helm");
        assert_eq!(meta["labels"]["app.kubernetes.io/instance"], release);
        assert_eq!(meta["annotations"]["meta.helm.sh/release-name"], release);
        assert_eq!(meta["annotations"]["helm.sh/resource-policy"], "keep");
    }
    assert!(
        crd_has_held_since(cp).await,
        "the release upgraded the CRDs"
    );
    cp.kubectl_ok(&["get", "webhook", "from-before", "-n", &app], None)
        .await;

    // A second release in the cluster: refused the first one's CRDs, and fine without them.
    let second = cp
        .helm(&["install", "hookrelay-other", &chart(), "-n", &other_ns])
        .await;
    assert!(!second.success, "{}", second.stdout);
    assert!(
        second.stderr.contains(&format!(
            "belongs to the Helm release {release} in namespace {ns}"
        )) && second.stderr.contains("--set crds.enabled=false"),
        "{}",
        second.stderr
    );
    cp.helm_ok(&[
        "install",
        "hookrelay-other",
        &chart(),
        "-n",
        &other_ns,
        CRDS_APPLIED_APART[0],
        CRDS_APPLIED_APART[1],
    ])
    .await;
    cp.helm_ok(&["uninstall", "hookrelay-other", "-n", &other_ns])
        .await;
    cp.helm_ok(&["uninstall", release, "-n", &ns]).await;
    for name in CRDS {
        assert!(crd_metadata(cp, name).await.is_some(), "{name} kept");
    }
    let _ = std::fs::remove_dir_all(Path::new(earlier).parent().unwrap());
}

/// One rule of a role: (kind, name with `<fullname>`, API group, resources, names, verbs).
type RoleRule = (
    String,
    String,
    String,
    Vec<String>,
    Vec<String>,
    Vec<String>,
);

/// The rules of the chart README's RBAC table.
fn readme_rbac_rules() -> Vec<RoleRule> {
    let readme = std::fs::read_to_string(repo_root().join("charts/hookrelay/README.md"))
        .expect("the chart README");
    let section = readme
        .split_once("\n## RBAC\n")
        .expect("an RBAC section")
        .1
        .split_once("\n### ")
        .expect("a subsection after the table")
        .0;
    let list = |cell: &str| -> Vec<String> {
        let mut items: Vec<String> = cell
            .split(',')
            .map(|i| i.trim().trim_matches('`').to_owned())
            .filter(|i| !i.is_empty())
            .collect();
        items.sort();
        items
    };
    section
        .lines()
        .filter(|l| l.starts_with("| ClusterRole `") || l.starts_with("| Role `"))
        .map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let (kind, name) = cells[1].split_once(' ').expect("kind and name");
            let group = cells[3].trim_matches('`');
            (
                kind.to_owned(),
                name.trim_matches('`').to_owned(),
                if group == "\"\"" { "" } else { group }.to_owned(),
                list(cells[4]),
                list(cells[5]),
                list(cells[6]),
            )
        })
        .collect()
}

#[tokio::test]
async fn the_chart_readme_lists_every_rule_the_chart_grants_and_no_other() {
    let cp = control_plane();
    let release = "hookrelay-doc";
    // Every role on: the viewer role is off by default.
    let rendered = render(
        cp,
        release,
        "doc-ns",
        &["--set", "web.viewerRole.create=true"],
    )
    .await;
    let sorted = |v: &Value| -> Vec<String> {
        let mut items: Vec<String> = v
            .as_array()
            .map(|a| a.iter().map(|i| i.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default();
        items.sort();
        items
    };
    let mut granted: Vec<RoleRule> = Vec::new();
    for role in objects(&rendered)
        .iter()
        .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
    {
        let name = role["metadata"]["name"].as_str().unwrap();
        let name = name.replacen(release, "<fullname>", 1);
        for rule in role["rules"].as_array().unwrap() {
            let groups = sorted(&rule["apiGroups"]);
            assert_eq!(groups.len(), 1, "{rule}");
            granted.push((
                role["kind"].as_str().unwrap().to_owned(),
                name.clone(),
                groups[0].clone(),
                sorted(&rule["resources"]),
                sorted(&rule["resourceNames"]),
                sorted(&rule["verbs"]),
            ));
        }
    }
    let mut documented = readme_rbac_rules();
    granted.sort();
    documented.sort();
    assert!(granted.len() >= 15, "{rendered}");
    assert_eq!(
        documented, granted,
        "charts/hookrelay/README.md.gotmpl's RBAC table and the rendered roles"
    );
}
