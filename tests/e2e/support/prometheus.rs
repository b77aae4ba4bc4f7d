//! A real Prometheus for the monitoring tests: one per test, on a free loopback port with a
//! store of its own, scraping one operator every second and evaluating the chart's rules; and
//! promtool. Both are built by `hack/prometheus.sh build` (hack/test.sh does it first), cached
//! by version.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::Value;

use super::{eventually, free_port, http::http_get, repo_root};

/// The directory of `prometheus` and `promtool`; panics, saying how to build them, when they
/// are missing: the monitoring tests never pass without them.
pub fn prometheus_bin_dir() -> PathBuf {
    let out = std::process::Command::new(repo_root().join("hack/prometheus.sh"))
        .arg("bindir")
        .output()
        .expect("hack/prometheus.sh runs");
    assert!(out.status.success(), "hack/prometheus.sh bindir: {out:?}");
    let dir = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    for tool in ["prometheus", "promtool"] {
        assert!(
            dir.join(tool).is_file(),
            "{} is missing: build Prometheus with hack/prometheus.sh build (hack/test.sh does)",
            dir.join(tool).display()
        );
    }
    dir
}

/// A Prometheus server on loopback, stopped (and its store removed) on drop.
pub struct Prometheus {
    child: std::process::Child,
    pub addr: SocketAddr,
    dir: PathBuf,
}

/// What Prometheus scrapes: one target under a job name, with target labels, as a
/// ServiceMonitor with `honorLabels: true` makes it (the target's own labels, such as the
/// delivery metrics' `namespace`, win over the target labels).
pub struct ScrapeTarget<'a> {
    pub job: &'a str,
    pub addr: SocketAddr,
    pub labels: &'a [(&'a str, &'a str)],
}

impl Prometheus {
    /// Starts Prometheus scraping `target` every second, evaluating the rule file `rules` (a
    /// Prometheus rule file: `groups:`) every second; waits until it is ready.
    pub async fn start(target: ScrapeTarget<'_>, rules: &str) -> Prometheus {
        let bin = prometheus_bin_dir().join("prometheus");
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("hookrelay-prometheus-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("rules.yaml"), rules).unwrap();
        let labels: serde_json::Map<String, Value> = target
            .labels
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(*v)))
            .collect();
        // JSON is YAML: Prometheus reads it as its configuration file.
        let config = serde_json::json!({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": ["rules.yaml"],
            "scrape_configs": [{
                "job_name": target.job,
                "honor_labels": true,
                "static_configs": [{"targets": [target.addr.to_string()], "labels": labels}],
            }],
        });
        std::fs::write(dir.join("prometheus.yml"), config.to_string()).unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = std::process::Command::new(bin)
            .current_dir(&dir)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus starts");
        let prometheus = Prometheus { child, addr, dir };
        let what = format!(
            "Prometheus /-/ready to answer 200 (log: {})",
            prometheus.log_path().display()
        );
        eventually(&what, Duration::from_secs(60), || async move {
            matches!(http_get(addr, "/-/ready").await, Some((200, _))).then_some(())
        })
        .await;
        prometheus
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("prometheus.log")
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// `GET /api/v1/query` of `expr` now: the result vector's samples, or Prometheus' error
    /// (say, the expression does not parse).
    pub async fn query(&self, expr: &str) -> Result<Vec<Sample>, String> {
        let data = self.get("/api/v1/query", &[("query", expr)]).await?;
        let result = match data["resultType"].as_str() {
            Some("vector") => data["result"].as_array().cloned().unwrap_or_default(),
            Some("scalar") => vec![serde_json::json!({"metric": {}, "value": data["result"]})],
            other => return Err(format!("{expr}: a {other:?} result: {data}")),
        };
        Ok(result
            .iter()
            .map(|s| Sample {
                labels: s["metric"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                            .collect()
                    })
                    .unwrap_or_default(),
                value: s["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(f64::NAN),
            })
            .collect())
    }

    /// `GET /api/v1/rules`: each rule's name and health (`ok`, `err`, `unknown`) with its last
    /// error.
    pub async fn rules(&self) -> Result<Vec<(String, String, String)>, String> {
        let data = self.get("/api/v1/rules", &[]).await?;
        Ok(data["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .map(|r| {
                let text = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
                (text("name"), text("health"), text("lastError"))
            })
            .collect())
    }

    /// A GET of the HTTP API: its `data`, or its error.
    async fn get(&self, path: &str, query: &[(&str, &str)]) -> Result<Value, String> {
        let url = reqwest::Url::parse_with_params(&format!("http://{}{path}", self.addr), query)
            .map_err(|e| format!("{path}: {e}"))?;
        let response = reqwest::Client::new()
            .get(url)
            .send()
            .await
            .map_err(|e| format!("{path}: {e}"))?;
        let text = response.text().await.map_err(|e| format!("{path}: {e}"))?;
        let body: Value =
            serde_json::from_str(&text).map_err(|e| format!("{path}: {e}: {text}"))?;
        match body["status"].as_str() {
            Some("success") => Ok(body["data"].clone()),
            _ => Err(format!("{path} {query:?}: {body}")),
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One sample of an instant query's result.
#[derive(Clone, Debug)]
pub struct Sample {
    pub labels: std::collections::BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, empty if it has none.
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// `promtool ARGS` in `dir`, which must succeed: its output.
pub fn promtool(dir: &Path, args: &[&str]) -> String {
    super::process::run_ok(
        std::process::Command::new(prometheus_bin_dir().join("promtool"))
            .current_dir(dir)
            .args(args),
    )
}
