//! The receivers in examples/receivers/ (Python, Node.js, Go, Java, PHP; each with its
//! language's own crypto) verify real deliveries: both signature schemes of a `whsec_` secret,
//! the hex one alone for a plain secret, and a forged request is answered 401.

use std::{
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;

use crate::support::{
    InProcess, control_plane, create_event, create_webhook, eventually, free_port, http_post,
    repo_root,
};

const STANDARD_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const PLAIN_SECRET: &str = "a-plain-text-secret-of-32-bytes!";
const LANGUAGES: [&str; 5] = ["python", "node", "go", "java", "php"];

/// The Go receiver of `dir`, built once per test process (what `go run .` builds).
async fn go_receiver(dir: &std::path::Path) -> std::path::PathBuf {
    static BUILT: tokio::sync::OnceCell<std::path::PathBuf> = tokio::sync::OnceCell::const_new();
    BUILT
        .get_or_init(|| async {
            let binary =
                std::env::temp_dir().join(format!("hookrelay-receiver-go-{}", std::process::id()));
            let out = tokio::process::Command::new("go")
                .args(["build", "-o"])
                .arg(&binary)
                .arg(".")
                .current_dir(dir)
                .env("GOTOOLCHAIN", "local")
                .output()
                .await
                .expect("go runs");
            assert!(
                out.status.success(),
                "go build of the Go receiver: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            binary
        })
        .await
        .clone()
}

/// One example receiver process on a loopback port, and the JSON lines it printed.
struct ExampleReceiver {
    _child: tokio::process::Child,
    port: u16,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl ExampleReceiver {
    async fn start(language: &str, secret: &str) -> ExampleReceiver {
        let dir = repo_root().join("examples/receivers");
        let port = free_port();
        let port_arg = port.to_string();
        let listen = format!("127.0.0.1:{port}");
        let mut cmd = match language {
            "python" => tokio::process::Command::new("python3"),
            "node" => tokio::process::Command::new("node"),
            // Built, then run: `go run` would leave its child running when it is killed.
            "go" => tokio::process::Command::new(go_receiver(&dir.join("go")).await),
            "java" => tokio::process::Command::new("java"),
            _ => tokio::process::Command::new("php"),
        };
        match language {
            "python" => cmd.arg("receiver.py"),
            "node" => cmd.arg("receiver.js"),
            "go" => &mut cmd,
            "java" => cmd.arg("Receiver.java"),
            _ => cmd.args(["-S", &listen, "receiver.php"]),
        };
        if language != "php" {
            let (host, port) = if language == "go" {
                ("-host", "-port")
            } else {
                ("--host", "--port")
            };
            cmd.args([host, "127.0.0.1", port, &port_arg]);
        }
        if language != "go" {
            cmd.current_dir(&dir);
        }
        let mut child = cmd
            .env("WEBHOOK_SECRET", secret)
            .env("GOTOOLCHAIN", "local")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("the {language} receiver starts: {e}"));
        let lines: Arc<Mutex<Vec<Value>>> = Arc::default();
        let into = lines.clone();
        let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stdout.next_line().await {
                if let Ok(value) = serde_json::from_str(&line) {
                    into.lock().unwrap().push(value);
                }
            }
        });
        eventually(
            &format!("the {language} receiver listening on {listen}"),
            Duration::from_secs(90),
            || async {
                tokio::net::TcpStream::connect(&listen)
                    .await
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
        ExampleReceiver {
            _child: child,
            port,
            lines,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/webhooks/documents", self.port)
    }

    /// Waits for the line of the request with delivery id `delivery` (or any, if None).
    async fn line(&self, language: &str, what: &str, delivery: Option<&str>) -> Value {
        eventually(
            &format!("the {language} receiver's line for {what}"),
            Duration::from_secs(60),
            || async {
                let lines = self.lines.lock().unwrap();
                lines
                    .iter()
                    .find(|l| delivery.is_none_or(|d| l["delivery"] == d))
                    .cloned()
            },
        )
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_receiver_verifies_real_deliveries_and_refuses_a_forged_one() {
    let cp = control_plane();
    let ns = cp.namespace("example-receivers").await;
    let client = cp.client().await;
    let _op = InProcess::start(cp.config().await, &ns).await;

    for language in LANGUAGES {
        for (secret, standard) in [(STANDARD_SECRET, json!(true)), (PLAIN_SECRET, Value::Null)] {
            let receiver = ExampleReceiver::start(language, secret).await;
            let name = format!(
                "{language}-{}",
                if standard.is_null() { "plain" } else { "std" }
            );
            create_webhook(&client, &ns, &name, &receiver.url(), secret, json!({})).await;
            create_event(
                &client,
                &ns,
                &name,
                "document.completed",
                json!({"document_id": 123, "filename": "ünïcode \"quoted\".pdf"}),
            )
            .await;
            let line = receiver.line(language, "a delivery", None).await;
            assert_eq!(line["verified"], true, "{language}: {line}");
            assert_eq!(line["x_webhook_signature"], true, "{language}: {line}");
            assert_eq!(line["webhook_signature"], standard, "{language}: {line}");
            assert_eq!(line["event"], "document.completed", "{language}: {line}");
            let body: Value = serde_json::from_str(line["body"].as_str().unwrap()).unwrap();
            assert_eq!(body["data"]["filename"], "ünïcode \"quoted\".pdf");
            // The Webhook is removed so that the next event goes to the next receiver only.
            cp.kubectl_ok(&["delete", "webhook", &name, "-n", &ns], None)
                .await;

            // A request signed with another key: 401, and the receiver says why.
            let forged = "forged-delivery";
            let addr = format!("127.0.0.1:{}", receiver.port).parse().unwrap();
            let status = http_post(
                addr,
                "/webhooks/documents",
                &[
                    ("X-Webhook-Signature", &"0".repeat(64)),
                    ("X-Webhook-Delivery", forged),
                    ("Content-Type", "application/json"),
                ],
                r#"{"event":"document.completed","data":{}}"#,
            )
            .await
            .expect("the receiver answers");
            assert_eq!(status, 401, "{language}");
            let line = receiver
                .line(language, "the forged request", Some(forged))
                .await;
            assert_eq!(line["verified"], false, "{language}: {line}");
            assert_eq!(line["x_webhook_signature"], false, "{language}: {line}");
        }
    }
}
