//! The cluster the tests share, hookrelay's image in it, the chart's releases, and the Pods the
//! tests are made of: receivers that verify signatures, and one-shot clients.
//!
//! Everything a Pod sees or answers is read from its log through the API server: the test
//! process never connects to a Pod or a Service itself.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    process::Command,
    sync::OnceLock,
    time::{Duration, Instant},
};

use k8s_openapi::api::{coordination::v1::Lease, core::v1::Pod};
use kube::{Api, api::ListParams};
use serde_json::{Value, json};

use crate::support::{
    ControlPlane, create_webhook_to, eventually,
    nats::nats_server_bin,
    process::{release_binary, run_ok},
    repo_root,
};

/// hookrelay's image as the tests import it: the release binary in the Dockerfile's layout.
pub const IMAGE: &str = "hookrelay.local/hookrelay";
/// The tag every release installs.
pub const TAG: &str = "test";
/// The same image under another tag, for `helm upgrade` to a new image.
pub const UPGRADE_TAG: &str = "upgrade";
/// The chart's default `image.repository`.
const PUBLISHED_IMAGE: &str = "ghcr.io/hookrelay/hookrelay";
/// `hack/cluster.sh`'s probe: a webhook receiver and an HTTP client in one static binary.
const PROBE_IMAGE: &str = "hookrelay.local/probe:1";
const NATS_IMAGE: &str = "hookrelay.local/nats:1";

/// The running cluster: kubectl and helm against its API server.
pub struct Cluster {
    pub cp: ControlPlane,
}

impl std::ops::Deref for Cluster {
    type Target = ControlPlane;
    fn deref(&self) -> &ControlPlane {
        &self.cp
    }
}

fn script(name: &str) -> PathBuf {
    repo_root().join("hack").join(name)
}

/// The cluster of this test run, started on first use (with hookrelay's, nats-server's images
/// imported), or the one `HOOKRELAY_TEST_CLUSTER_DIR` names.
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let uid = run_ok(Command::new("id").arg("-u"));
        assert_eq!(
            uid.trim(),
            "0",
            "the cluster tests run a node (containerd, a bridge, iptables, cgroups): they need root"
        );
        let started = Instant::now();
        let bin = PathBuf::from(
            run_ok(Command::new(script("control-plane.sh")).arg("build-node")).trim(),
        );
        let dir = match std::env::var_os("HOOKRELAY_TEST_CLUSTER_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => {
                let dir =
                    std::env::temp_dir().join(format!("hookrelay-cluster-{}", std::process::id()));
                run_ok(
                    Command::new(script("cluster.sh"))
                        .arg("start")
                        .arg(&dir)
                        .arg(std::process::id().to_string()),
                );
                dir
            }
        };
        let up = started.elapsed();
        load_images(&dir);
        let cp = ControlPlane {
            kubeconfig: dir.join("kubeconfig"),
            bin,
        };
        apply_crds(&cp);
        eprintln!(
            "cluster: up in {:.1} s, images imported in {:.1} s more",
            up.as_secs_f64(),
            (started.elapsed() - up).as_secs_f64()
        );
        Cluster { cp }
    })
}

/// The chart's CRDs, applied once for the run as a platform team that manages them apart from
/// Helm would. Every release of the tests renders none (`crds.enabled=false`), so that releases
/// of different names can follow one another: a CRD belongs to one release, and one kept on
/// uninstall stays that release's. (The quick start, run as written with the chart's defaults,
/// adopts them first.) Forced: a reused cluster's CRDs may carry an earlier run's Helm fields.
fn apply_crds(cp: &ControlPlane) {
    let crds = repo_root().join("charts/hookrelay/files/crds");
    let kubectl = |args: &[&str]| {
        run_ok(
            Command::new(cp.bin.join("kubectl"))
                .args(args)
                .env("KUBECONFIG", &cp.kubeconfig),
        )
    };
    kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        crds.to_str().unwrap(),
    ]);
    kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/webhooks.hookrelay.dev",
        "crd/documentevents.hookrelay.dev",
    ]);
}

/// The chart's appVersion: its default image tag.
fn chart_app_version() -> String {
    let chart = std::fs::read_to_string(repo_root().join("charts/hookrelay/Chart.yaml")).unwrap();
    chart
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .expect("an appVersion")
        .trim()
        .trim_matches('"')
        .to_owned()
}

fn load_images(dir: &std::path::Path) {
    let images = dir.join("test-images");
    std::fs::create_dir_all(&images).unwrap();
    let binary = release_binary();
    let mut tars = Vec::new();
    // Also under the name the chart's defaults pull, for what runs as a user would write it.
    let published = format!("{PUBLISHED_IMAGE}:{}", chart_app_version());
    for (i, name) in [
        format!("{IMAGE}:{TAG}"),
        format!("{IMAGE}:{UPGRADE_TAG}"),
        published,
    ]
    .iter()
    .enumerate()
    {
        let tar = images.join(format!("hookrelay-{i}.tar"));
        run_ok(
            Command::new(script("image.sh"))
                .arg("hookrelay")
                .arg(name)
                .arg(&binary)
                .arg(&tar),
        );
        tars.push(tar);
    }
    let nats = images.join("nats.tar");
    run_ok(
        Command::new(script("image.sh"))
            .arg("static")
            .arg(NATS_IMAGE)
            .arg(nats_server_bin())
            .arg(&nats),
    );
    tars.push(nats);
    run_ok(
        Command::new(script("cluster.sh"))
            .arg("load")
            .arg(dir)
            .args(&tars),
    );
    std::fs::remove_dir_all(&images).unwrap();
}

/// One test at a time on the cluster: the chart's defaults watch every namespace, so two releases
/// at once would both deliver each other's events; and two cores run one release beside the node.
pub async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static ONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    ONE.lock().await
}

/// The restricted Pod Security profile, for every container the tests run.
fn restricted_container() -> Value {
    json!({
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": {"drop": ["ALL"]},
    })
}

fn restricted_pod() -> Value {
    json!({
        "runAsNonRoot": true,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    })
}

/// Namespaces of one test, enforcing the restricted Pod Security profile (so a Pod of the chart
/// that asked for more would be refused at admission); deleted when dropped.
pub struct Namespaces {
    names: Vec<String>,
}

impl Namespaces {
    pub async fn create(prefixes: &[&str]) -> Namespaces {
        let mut names = Vec::new();
        for prefix in prefixes {
            let name = cluster().namespace(prefix).await;
            cluster()
                .kubectl_ok(
                    &[
                        "label",
                        "namespace",
                        &name,
                        "pod-security.kubernetes.io/enforce=restricted",
                    ],
                    None,
                )
                .await;
            // The ServiceAccount admission refuses Pods until the namespace's `default` one is
            // made (by the controller manager).
            eventually(
                &format!("{name}'s default ServiceAccount"),
                Duration::from_secs(60),
                || async {
                    let out = cluster()
                        .kubectl(&["get", "serviceaccount", "default", "-n", &name], None)
                        .await;
                    out.success.then_some(())
                },
            )
            .await;
            names.push(name);
        }
        Namespaces { names }
    }

    /// Namespaces something else made (a command under test), to be deleted the same way.
    pub fn adopt(names: &[&str]) -> Namespaces {
        Namespaces {
            names: names.iter().map(|n| n.to_string()).collect(),
        }
    }

    pub fn get(&self, i: usize) -> &str {
        &self.names[i]
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let _ = Command::new(cluster().bin.join("kubectl"))
            .env("KUBECONFIG", &cluster().kubeconfig)
            .args(["delete", "namespace", "--wait=false"])
            .args(&self.names)
            .output();
    }
}

/// A release of the chart with the image built here; uninstalled when dropped.
pub struct Release {
    pub name: String,
    pub namespace: String,
}

impl Release {
    /// `helm install --wait` of charts/hookrelay with the chart's defaults, the local image and
    /// `values` (`--set` expressions); no CRDs (`crds.enabled=false`: see `apply_crds`). `name` contains "hookrelay", so it is the chart's full name
    /// too: the Services are `<name>` and `<name>-metrics`.
    pub async fn install(namespace: &str, name: &str, values: &[&str]) -> Release {
        assert!(name.contains("hookrelay"));
        let chart = repo_root().join("charts/hookrelay").display().to_string();
        let mut args = vec![
            "install",
            name,
            chart.as_str(),
            "-n",
            namespace,
            "--wait",
            "--timeout",
            "180s",
        ];
        let fixed = [
            format!("image.repository={IMAGE}"),
            format!("image.tag={TAG}"),
            "image.pullPolicy=Never".to_owned(),
            "crds.enabled=false".to_owned(),
        ];
        for value in fixed
            .iter()
            .map(String::as_str)
            .chain(values.iter().copied())
        {
            args.extend(["--set", value]);
        }
        let started = Instant::now();
        cluster().helm_ok(&args).await;
        eprintln!(
            "helm install {name} ({}): {:.1} s",
            values.join(" "),
            started.elapsed().as_secs_f64()
        );
        Release {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
        }
    }

    /// `helm upgrade --wait --reuse-values` with more `values`.
    pub async fn upgrade(&self, values: &[&str]) {
        let chart = repo_root().join("charts/hookrelay").display().to_string();
        let mut args = vec![
            "upgrade",
            self.name.as_str(),
            chart.as_str(),
            "-n",
            self.namespace.as_str(),
            "--reuse-values",
            "--wait",
            "--timeout",
            "180s",
        ];
        for value in values {
            args.extend(["--set", value]);
        }
        cluster().helm_ok(&args).await;
    }

    /// `helm test` of the release (the chart's test Pod); whether it passed, and its output.
    pub async fn helm_test(&self) -> crate::support::Kubectl {
        let args = [
            "test",
            &self.name,
            "-n",
            &self.namespace,
            "--timeout",
            "90s",
        ];
        cluster().helm(&args).await
    }

    /// The names of [`Release::pods`].
    pub async fn pod_names(&self) -> Vec<String> {
        let pods = self.pods().await;
        pods.into_iter().filter_map(|p| p.metadata.name).collect()
    }

    /// `http://<service>.<namespace>.svc:<port>`: the API and ingest, or `-metrics`.
    pub fn url(&self, service_suffix: &str, port: u16) -> String {
        format!(
            "http://{}{service_suffix}.{}.svc:{port}",
            self.name, self.namespace
        )
    }

    /// The release's operator Pods (not `helm test`'s), not being deleted.
    pub async fn pods(&self) -> Vec<Pod> {
        let pods: Api<Pod> = Api::namespaced(cluster().client().await, &self.namespace);
        let selector = format!(
            "app.kubernetes.io/instance={},app.kubernetes.io/component!=test",
            self.name
        );
        pods.list(&ListParams::default().labels(&selector))
            .await
            .expect("pods listed")
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect()
    }

    /// The Pod that holds the release's Lease, if any.
    pub async fn leader(&self) -> Option<String> {
        lease_holder(&self.namespace).await
    }
}

/// The Pod that holds the Lease in `namespace` (its identity is `<pod name>_<suffix>`), if any.
async fn lease_holder(namespace: &str) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(cluster().client().await, namespace);
    let holder = leases
        .get_opt("hookrelay")
        .await
        .ok()??
        .spec?
        .holder_identity?;
    let pod = holder
        .rsplit_once('_')
        .map_or(holder.as_str(), |(pod, _)| pod);
    (!pod.is_empty()).then(|| pod.to_owned())
}

impl Drop for Release {
    fn drop(&mut self) {
        let _ = Command::new(cluster().bin.join("helm"))
            .env("KUBECONFIG", &cluster().kubeconfig)
            .args([
                "uninstall",
                &self.name,
                "-n",
                &self.namespace,
                "--wait",
                "--timeout",
                "60s",
            ])
            .output();
    }
}

/// Applies a manifest (JSON is YAML) in `namespace`.
pub async fn apply(namespace: &str, manifest: &Value) {
    cluster()
        .kubectl_ok(
            &["apply", "-n", namespace, "-f", "-"],
            Some(&manifest.to_string()),
        )
        .await;
}

/// A probe Pod running `args`, restricted; `spec` fields are merged into the Pod's spec and
/// `container` fields into its container.
fn probe_pod(name: &str, args: &[&str], spec: Value, container: Value) -> Value {
    let mut c = json!({
        "name": "probe", "image": PROBE_IMAGE, "imagePullPolicy": "Never", "args": args,
        "securityContext": restricted_container(),
    });
    merge(&mut c, container);
    let mut s = json!({
        "securityContext": restricted_pod(),
        "terminationGracePeriodSeconds": 1,
        "containers": [c],
    });
    merge(&mut s, spec);
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}}, "spec": s})
}

fn merge(into: &mut Value, from: Value) {
    if let (Some(into), Value::Object(from)) = (into.as_object_mut(), from) {
        into.extend(from);
    }
}

/// Runs a probe Pod to its end (`restartPolicy: Never`) and returns its log; `spec` and
/// `container` as for [`probe_pod`].
async fn run_once(
    namespace: &str,
    name: &str,
    args: &[&str],
    spec: Value,
    container: Value,
) -> String {
    let mut spec_with = json!({"restartPolicy": "Never"});
    merge(&mut spec_with, spec);
    apply(namespace, &probe_pod(name, args, spec_with, container)).await;
    let pods: Api<Pod> = Api::namespaced(cluster().client().await, namespace);
    let phase = eventually(
        &format!("pod {namespace}/{name} to finish"),
        Duration::from_secs(90),
        || async {
            let phase = pods.get(name).await.ok()?.status?.phase?;
            matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase)
        },
    )
    .await;
    let log = logs(namespace, name).await;
    assert_eq!(phase, "Succeeded", "pod {name} failed: {log}");
    log
}

/// Waits (up to 90 s) until Pod `name` is Ready.
async fn wait_pod_ready(namespace: &str, name: &str) {
    let pod = format!("pod/{name}");
    let args = [
        "wait",
        "-n",
        namespace,
        "--for=condition=Ready",
        &pod,
        "--timeout=90s",
    ];
    cluster().kubectl_ok(&args, None).await;
}

/// A receiver Pod `<webhook>-hooks` over https (its CA in the `caBundle`, as the chart's defaults
/// allow no plain http) and a Ready Webhook `webhook` for every event type delivering to it.
pub async fn receiving_webhook(namespace: &str, webhook: &str, secret: &str) -> PodReceiver {
    let receiver = PodReceiver::start(namespace, &format!("{webhook}-hooks"), secret, true).await;
    let target = json!({"serviceRef": receiver.service_ref()});
    let client = cluster().client().await;
    create_webhook_to(&client, namespace, webhook, target, secret, json!({})).await;
    receiver
}

/// A Pod's log.
pub async fn logs(namespace: &str, pod: &str) -> String {
    cluster()
        .kubectl_ok(&["logs", "-n", namespace, pod], None)
        .await
}

/// GET `url` from a Pod in `namespace`; the body.
pub async fn get_from_pod(namespace: &str, name: &str, url: &str) -> String {
    run_once(namespace, name, &["get", url], json!({}), json!({})).await
}

/// A receiver Pod behind a Service labelled as a webhook receiver, verifying every delivery's
/// `X-Webhook-Signature` with `secret`; over https when made `with_tls` (a CA of its own).
pub struct PodReceiver {
    pub namespace: String,
    pub name: String,
    pub ca_bundle: Option<String>,
}

/// What a receiver Pod logged: verified deliveries (id and body) and refused requests.
pub struct Received {
    pub deliveries: Vec<(String, Value)>,
    pub refused: Vec<String>,
}

impl Received {
    /// Distinct delivery ids.
    pub fn ids(&self) -> BTreeSet<&str> {
        self.deliveries.iter().map(|(id, _)| id.as_str()).collect()
    }

    /// How many times each `data.seq` arrived.
    pub fn seqs(&self) -> BTreeMap<u64, usize> {
        let mut seqs = BTreeMap::new();
        for (_, body) in &self.deliveries {
            if let Some(seq) = body["data"]["seq"].as_u64() {
                *seqs.entry(seq).or_default() += 1;
            }
        }
        seqs
    }
}

impl PodReceiver {
    pub async fn start(namespace: &str, name: &str, secret: &str, with_tls: bool) -> PodReceiver {
        let mut args = vec!["receive", ":8080", secret];
        let (mut spec, mut container) = (json!({}), json!({}));
        let mut ca_bundle = None;
        if with_tls {
            let (ca, cert, key) = serving_certificate(&format!("{name}.{namespace}.svc"));
            apply(
                namespace,
                &json!({
                    "apiVersion": "v1", "kind": "Secret", "metadata": {"name": format!("{name}-tls")},
                    "type": "kubernetes.io/tls", "stringData": {"tls.crt": cert, "tls.key": key},
                }),
            )
            .await;
            spec = json!({"volumes": [{"name": "tls", "secret": {"secretName": format!("{name}-tls")}}]});
            container =
                json!({"volumeMounts": [{"name": "tls", "mountPath": "/tls", "readOnly": true}]});
            args.extend(["/tls/tls.crt", "/tls/tls.key"]);
            ca_bundle = Some(ca);
        }
        merge(
            &mut container,
            json!({
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
            }),
        );
        apply(namespace, &probe_pod(name, &args, spec, container)).await;
        apply(
            namespace,
            &json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "labels": {"hookrelay.dev/webhook-receiver": "true"}},
                "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 8080, "targetPort": "http"}]},
            }),
        )
        .await;
        wait_pod_ready(namespace, name).await;
        PodReceiver {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            ca_bundle,
        }
    }

    /// A CA that signed nothing any receiver serves.
    pub fn unrelated_ca() -> String {
        serving_certificate("unrelated.invalid").0
    }

    /// The `serviceRef` of a Webhook delivering here.
    pub fn service_ref(&self) -> Value {
        let mut r = json!({"name": self.name, "port": "http", "path": "/hooks"});
        if let Some(ca) = &self.ca_bundle {
            r["caBundle"] = json!(ca);
        }
        r
    }

    pub async fn received(&self) -> Received {
        let log = logs(&self.namespace, &self.name).await;
        let mut received = Received {
            deliveries: Vec::new(),
            refused: Vec::new(),
        };
        for line in log.lines() {
            if let Some(rest) = line.strip_prefix("delivery ") {
                let (id, body) = rest.split_once(' ').unwrap_or((rest, "null"));
                let body = serde_json::from_str(body)
                    .unwrap_or_else(|e| panic!("a delivery's body is JSON ({e}): {body}"));
                received.deliveries.push((id.to_owned(), body));
            } else if let Some(why) = line.strip_prefix("refused ") {
                received.refused.push(why.to_owned());
            }
        }
        received
    }

    /// Waits until `n` distinct deliveries arrived; all of them.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Received {
        let got = crate::support::within(timeout, || async {
            let received = self.received().await;
            if received.ids().len() < n {
                // A kubectl process per look: not every 50 ms.
                tokio::time::sleep(Duration::from_millis(450)).await;
                return None;
            }
            Some(received)
        })
        .await;
        match got {
            Some(received) => received,
            None => panic!(
                "{}/{}: {} of {n} deliveries after {timeout:?}\n{}",
                self.namespace,
                self.name,
                self.received().await.ids().len(),
                what_the_operator_saw().await
            ),
        }
    }
}

/// A CA of its own and a serving certificate for `dns_name` it signed: (CA, cert, key) as PEM.
fn serving_certificate(dns_name: &str) -> (String, String, String) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let issuer =
        rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![dns_name.to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (issuer.pem(), cert.pem(), key.serialize_pem())
}

/// nats-server with JetStream as a Pod and its Service `nats` in `namespace`; its URL.
pub async fn start_nats(namespace: &str) -> String {
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "nats", "labels": {"app": "nats"}},
        "spec": {
            "securityContext": restricted_pod(),
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "nats", "image": NATS_IMAGE, "imagePullPolicy": "Never",
                "args": ["-js", "-sd", "/data", "-p", "4222"],
                "ports": [{"name": "client", "containerPort": 4222}],
                "readinessProbe": {"tcpSocket": {"port": 4222}, "periodSeconds": 1},
                "securityContext": restricted_container(),
                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
            }],
            "volumes": [{"name": "data", "emptyDir": {}}],
        },
    });
    apply(namespace, &pod).await;
    apply(
        namespace,
        &json!({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "nats"},
            "spec": {"selector": {"app": "nats"}, "ports": [{"name": "client", "port": 4222, "targetPort": "client"}]},
        }),
    )
    .await;
    wait_pod_ready(namespace, "nats").await;
    format!("nats://nats.{namespace}.svc:4222")
}

/// Posts `body` to `url` from a Pod of ServiceAccount `service_account` in `namespace`, with a
/// projected token of audience `hookrelay`; the status code and the reply.
pub async fn post_from_pod(
    namespace: &str,
    name: &str,
    service_account: &str,
    url: &str,
    body: &Value,
) -> (u16, String) {
    let spec = json!({
        "serviceAccountName": service_account,
        "automountServiceAccountToken": false,
        "volumes": [{"name": "token", "projected": {"sources": [{"serviceAccountToken": {
            "audience": "hookrelay", "expirationSeconds": 600, "path": "token"}}]}}],
    });
    let container = json!({
        "volumeMounts": [{"name": "token", "mountPath": "/var/run/secrets/hookrelay", "readOnly": true}],
    });
    let body = body.to_string();
    let args = ["post", url, "/var/run/secrets/hookrelay/token", &body];
    let log = run_once(namespace, name, &args, spec, container).await;
    let line = log
        .lines()
        .find_map(|l| l.strip_prefix("status "))
        .unwrap_or_else(|| panic!("pod {name} printed no status: {log}"));
    let (code, reply) = line.split_once(' ').unwrap_or((line, ""));
    (code.parse().expect("a status code"), reply.to_owned())
}

/// `kubectl get webhooks` in `namespace`, as a person would read it: the READY column of `name`.
pub async fn ready_column(namespace: &str, name: &str) -> String {
    let out = cluster()
        .kubectl_ok(&["get", "webhooks", "-n", namespace, name], None)
        .await;
    // Columns are aligned, and some cells are empty: read the row where the header has READY.
    let mut lines = out.lines();
    let header = lines.next().unwrap_or("");
    let row = lines.next().unwrap_or("");
    let at = header
        .find("READY")
        .unwrap_or_else(|| panic!("no READY column: {out}"));
    row.get(at..)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no READY cell: {out}"))
        .to_owned()
}

/// DocumentEvents `load-<seq>` of type document.completed with `data.seq` 0..`count`, created at
/// `per_second` in `namespace` by a task of its own; it returns how many it created.
pub fn steady_load(namespace: &str, count: u64, per_second: u64) -> tokio::task::JoinHandle<u64> {
    let namespace = namespace.to_owned();
    tokio::spawn(async move {
        let client = cluster().client().await;
        let mut tick = tokio::time::interval(Duration::from_millis(1000 / per_second));
        for seq in 0..count {
            tick.tick().await;
            crate::support::create_event(
                &client,
                &namespace,
                &format!("load-{seq}"),
                "document.completed",
                json!({"seq": seq}),
            )
            .await;
        }
        count
    })
}

/// The Lease's holder, sampled every 200 ms until dropped: who led when.
pub struct LeaseWatch {
    samples: std::sync::Arc<std::sync::Mutex<Vec<Option<String>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseWatch {
    pub fn start(release: &Release) -> LeaseWatch {
        let samples = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let namespace = release.namespace.clone();
        let into = samples.clone();
        let task = tokio::spawn(async move {
            loop {
                let holder = lease_holder(&namespace).await;
                into.lock().unwrap().push(holder);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        LeaseWatch { samples, task }
    }

    /// The holders in the order they held the Lease (None: no holder at that sample).
    pub fn holders(&self) -> Vec<Option<String>> {
        let mut holders: Vec<Option<String>> = Vec::new();
        for sample in self.samples.lock().unwrap().iter() {
            if holders.last() != Some(sample) {
                holders.push(sample.clone());
            }
        }
        holders
    }

    /// How many samples found no holder.
    pub fn without_holder(&self) -> usize {
        self.samples
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.is_none())
            .count()
    }
}

impl Drop for LeaseWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sent, delivered, duplicated and lost events of a load run, as the closing figures print them.
#[derive(Debug, PartialEq)]
pub struct Tally {
    pub sent: u64,
    pub delivered: u64,
    pub duplicates: u64,
    pub lost: u64,
}

impl std::fmt::Display for Tally {
    /// The common part of a `FIGURES` line (as RELIABILITY.md quotes them).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sent={} delivered={} duplicates={} lost={}",
            self.sent, self.delivered, self.duplicates, self.lost
        )
    }
}

impl Tally {
    pub fn of(sent: u64, received: &Received) -> Tally {
        let seqs = received.seqs();
        let delivered = (0..sent).filter(|s| seqs.contains_key(s)).count() as u64;
        Tally {
            sent,
            delivered,
            duplicates: seqs.values().map(|n| (n - 1) as u64).sum(),
            lost: sent - delivered,
        }
    }
}

/// For a failure's message: every Webhook's Ready condition and last delivery, and the end of
/// each operator Pod's log.
pub async fn what_the_operator_saw() -> String {
    let columns = "custom-columns=NAMESPACE:.metadata.namespace,NAME:.metadata.name,\
        REASON:.status.conditions[0].reason,LAST:.status.recentDeliveries[0]";
    let webhooks = cluster()
        .kubectl(&["get", "webhooks", "-A", "-o", columns], None)
        .await;
    let pods = cluster()
        .kubectl(
            &[
                "get",
                "pods",
                "-A",
                "-l",
                "app.kubernetes.io/name=hookrelay,app.kubernetes.io/component!=test",
                "-o",
                "jsonpath={range .items[*]}{.metadata.namespace} {.metadata.name}{\"\\n\"}{end}",
            ],
            None,
        )
        .await;
    let mut logs = String::new();
    for (namespace, pod) in pods.stdout.lines().filter_map(|l| l.split_once(' ')) {
        let log = cluster()
            .kubectl(&["logs", "-n", namespace, pod, "--tail=30"], None)
            .await;
        logs += &format!("--- {namespace}/{pod}\n{}{}", log.stdout, log.stderr);
    }
    format!(
        "Webhooks:\n{}{}\noperator logs:\n{logs}",
        webhooks.stdout, webhooks.stderr
    )
}
