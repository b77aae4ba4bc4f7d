//! The Kubernetes side of the harness: the kube-apiserver + etcd every test shares (started on
//! first use, or named by `HOOKRELAY_TEST_KUBECONFIG`), kubectl against it, a fresh namespace
//! per test, ServiceAccount tokens for hookrelay's API, and control planes of a test's own for
//! the tests that stop, restart or freeze the API server or etcd.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client, Config,
    api::PostParams,
    config::{KubeConfigOptions, Kubeconfig},
};

use super::{process::run_ok, repo_root, resources::grant_hookrelay};

/// A running kube-apiserver + etcd: its admin kubeconfig, and the directory of the binaries
/// built with it (kubectl, helm).
pub struct ControlPlane {
    pub kubeconfig: PathBuf,
    pub bin: PathBuf,
}

fn script() -> PathBuf {
    repo_root().join("hack/control-plane.sh")
}

/// The control plane of this test run, started on first use.
pub fn control_plane() -> &'static ControlPlane {
    static CP: OnceLock<ControlPlane> = OnceLock::new();
    CP.get_or_init(|| {
        let bin = PathBuf::from(run_ok(Command::new(script()).arg("bindir")).trim());
        let kubeconfig = match std::env::var_os("HOOKRELAY_TEST_KUBECONFIG") {
            Some(path) => PathBuf::from(path),
            None => {
                run_ok(Command::new(script()).arg("build"));
                let dir = std::env::temp_dir().join(format!("hookrelay-cp-{}", std::process::id()));
                run_ok(
                    Command::new(script())
                        .arg("start")
                        .arg(&dir)
                        .arg(std::process::id().to_string()),
                );
                dir.join("kubeconfig")
            }
        };
        let cp = ControlPlane { kubeconfig, bin };
        cp.install_crds();
        cp
    })
}

/// A kubectl invocation's result.
pub struct Kubectl {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Kubectl {
    fn from(out: Output) -> Self {
        Self {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

async fn run_kubectl(
    kubectl: PathBuf,
    kubeconfig: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> Kubectl {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(kubectl)
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("kubectl starts");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input.as_bytes()).await.unwrap();
        // Closed, so that kubectl sees the end of its input.
        drop(pipe);
    }
    child.wait_with_output().await.expect("kubectl runs").into()
}

impl ControlPlane {
    /// Runs the real kubectl (built with the control plane) against this API server, without
    /// blocking a worker of the runtime that may also run an in-process operator.
    pub async fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Kubectl {
        run_kubectl(self.bin.join("kubectl"), &self.kubeconfig, args, stdin).await
    }

    /// Like `kubectl` but the command must succeed.
    pub async fn kubectl_ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.kubectl(args, stdin).await;
        assert!(
            out.success,
            "kubectl {args:?} failed: {}{}",
            out.stdout, out.stderr
        );
        out.stdout
    }

    /// Runs the real helm (built with the control plane) against this API server.
    pub async fn helm(&self, args: &[&str]) -> Kubectl {
        tokio::process::Command::new(self.bin.join("helm"))
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .kill_on_drop(true)
            .output()
            .await
            .expect("helm runs")
            .into()
    }

    /// Like `helm` but the command must succeed.
    pub async fn helm_ok(&self, args: &[&str]) -> String {
        let out = self.helm(args).await;
        assert!(
            out.success,
            "helm {args:?} failed: {}{}",
            out.stdout, out.stderr
        );
        out.stdout
    }

    /// kubectl with another kubeconfig (a token's, say).
    pub async fn kubectl_as(&self, kubeconfig: &Path, args: &[&str]) -> Kubectl {
        run_kubectl(self.bin.join("kubectl"), kubeconfig, args, None).await
    }

    /// `kubectl_ok` for the one-time set-up outside any runtime (`control_plane()`).
    fn kubectl_ok_blocking(&self, args: &[&str]) -> String {
        run_ok(
            Command::new(self.bin.join("kubectl"))
                .args(args)
                .env("KUBECONFIG", &self.kubeconfig),
        )
    }

    fn install_crds(&self) {
        let crds = repo_root().join("crds");
        self.kubectl_ok_blocking(&["apply", "--server-side", "-f", crds.to_str().unwrap()]);
        self.kubectl_ok_blocking(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/webhooks.hookrelay.dev",
            "crd/documentevents.hookrelay.dev",
        ]);
    }

    /// A kube client with admin rights.
    pub async fn client(&self) -> Client {
        Client::try_from(self.config().await).expect("client builds")
    }

    /// The admin client configuration.
    pub async fn config(&self) -> Config {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig).expect("kubeconfig readable");
        Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .expect("kubeconfig valid")
    }

    /// Creates a fresh namespace for one test. Namespaces are never reused: without a
    /// kube-controller-manager their deletion would not finish.
    pub async fn namespace(&self, prefix: &str) -> String {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!(
            "{prefix}-{:x}{}",
            nanos,
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name}
        }))
        .unwrap();
        Api::<Namespace>::all(self.client().await)
            .create(&PostParams::default(), &ns)
            .await
            .expect("namespace created");
        name
    }

    /// A token for hookrelay's audience of a new ServiceAccount `namespace`/`service_account`
    /// that may do everything with hookrelay's resources in `namespace` ([`grant_hookrelay`]).
    pub async fn hookrelay_token(&self, namespace: &str, service_account: &str) -> String {
        let token = self.service_account_token(namespace, service_account).await;
        grant_hookrelay(&self.client().await, namespace, namespace, service_account).await;
        token
    }

    /// A ServiceAccount token for hookrelay's API (`kubectl create token SA --audience
    /// hookrelay`); the API server itself does not accept it.
    pub async fn service_account_token(&self, namespace: &str, service_account: &str) -> String {
        self.service_account_token_for(namespace, service_account, Some("hookrelay"))
            .await
    }

    /// A ServiceAccount token for the API server's own audience (plain `kubectl create
    /// token`): what kubectl uses, and what hookrelay refuses unless `--token-audience ""`.
    pub async fn service_account_token_without_audience(
        &self,
        namespace: &str,
        service_account: &str,
    ) -> String {
        self.service_account_token_for(namespace, service_account, None)
            .await
    }

    async fn service_account_token_for(
        &self,
        namespace: &str,
        service_account: &str,
        audience: Option<&str>,
    ) -> String {
        let exists = self
            .kubectl(
                &["get", "serviceaccount", service_account, "-n", namespace],
                None,
            )
            .await;
        if !exists.success {
            self.kubectl_ok(
                &["create", "serviceaccount", service_account, "-n", namespace],
                None,
            )
            .await;
        }
        let mut args = vec!["create", "token", service_account, "-n", namespace];
        if let Some(audience) = audience {
            args.extend(["--audience", audience]);
        }
        self.kubectl_ok(&args, None).await.trim().to_owned()
    }

    /// A kubeconfig that authenticates with `token` only (no client certificate).
    pub fn token_kubeconfig(&self, token: &str) -> PathBuf {
        let admin = Kubeconfig::read_from(&self.kubeconfig).expect("kubeconfig readable");
        let cluster = admin.clusters[0].cluster.clone().expect("a cluster");
        let yaml = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority-data: {}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\n",
            cluster.server.expect("a server"),
            cluster.certificate_authority_data.expect("CA data"),
        );
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "hookrelay-token-{}-{}.kubeconfig",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, yaml).expect("kubeconfig written");
        path
    }
}

/// Held by every test that starts a control plane of its own and faults it: two of them
/// restarting API servers at once on two cores would measure the machine, not the operator.
pub static OWN_CONTROL_PLANES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A kube-apiserver + etcd of one test's own (not the shared one), for tests that stop, restart
/// or pause them; stopped on drop (and by the script's watchdog if the test process dies).
pub struct OwnControlPlane {
    cp: ControlPlane,
    dir: PathBuf,
}

impl std::ops::Deref for OwnControlPlane {
    type Target = ControlPlane;
    fn deref(&self) -> &ControlPlane {
        &self.cp
    }
}

impl OwnControlPlane {
    /// Starts one in a fresh temporary directory and installs the CRDs.
    pub async fn start(name: &str) -> OwnControlPlane {
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || {
            let bin = PathBuf::from(run_ok(Command::new(script()).arg("build")).trim());
            static SEQ: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "hookrelay-own-cp-{name}-{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            run_ok(
                Command::new(script())
                    .arg("start")
                    .arg(&dir)
                    .arg(std::process::id().to_string()),
            );
            let cp = ControlPlane {
                kubeconfig: dir.join("kubeconfig"),
                bin,
            };
            let own = OwnControlPlane { cp, dir };
            own.cp.install_crds();
            own
        })
        .await
        .expect("the control plane starts")
    }

    async fn script(&self, action: &str) {
        let out = tokio::process::Command::new(script())
            .arg(action)
            .arg(&self.dir)
            .output()
            .await
            .expect("hack/control-plane.sh runs");
        assert!(
            out.status.success(),
            "control-plane.sh {action} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the kube-apiserver (SIGTERM); etcd and its data stay.
    pub async fn stop_apiserver(&self) {
        self.script("stop-apiserver").await
    }

    /// Starts it again on the same port with the same flags; returns once it is ready.
    pub async fn start_apiserver(&self) {
        self.script("start-apiserver").await
    }

    /// Stops etcd; its data directory stays.
    pub async fn stop_etcd(&self) {
        self.script("stop-etcd").await
    }

    /// Starts etcd again on the same ports and data; returns once it is healthy.
    pub async fn start_etcd(&self) {
        self.script("start-etcd").await
    }

    /// SIGSTOP: the kube-apiserver's port still accepts connections, nothing answers.
    pub async fn pause_apiserver(&self) {
        self.script("pause-apiserver").await
    }

    /// SIGCONT.
    pub async fn resume_apiserver(&self) {
        self.script("resume-apiserver").await
    }
}

impl Drop for OwnControlPlane {
    fn drop(&mut self) {
        let _ = Command::new(script()).arg("stop").arg(&self.dir).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
