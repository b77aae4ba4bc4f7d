//! What a run costs the operator process: CPU time and resident memory (from `/proc/<pid>`),
//! status patches and API requests (from its `/metrics`), sampled before and after the run.

use std::{
    net::SocketAddr,
    sync::OnceLock,
    time::{Duration, Instant},
};

use crate::support::{Operator, http_get};

/// CPU time (user + system) of a process, from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis,
    // where field 3 (state) is the first; utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    Duration::from_secs_f64(ticks as f64 / clock_ticks())
}

/// The kernel's clock ticks per second, which `/proc/<pid>/stat` counts CPU time in.
fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok()?.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Resident and peak resident memory (`VmRSS`, `VmHWM`) of a process, in MiB.
pub fn memory(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |field: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0)
    };
    (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
}

/// The operator's pid (it runs until the bench drops it).
pub fn pid(op: &Operator) -> u32 {
    op.child.id().expect("the operator is running")
}

/// The sum of every sample of a metric family whose series start with `prefix`, such as
/// `hookrelay_kube_api_requests_total{`.
pub async fn metric_sum(addr: SocketAddr, prefix: &str) -> f64 {
    let (_, body) = http_get(addr, "/metrics").await.unwrap_or_default();
    body.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
        // Folded from +0.0: an empty f64 `sum()` is -0.0, which prints as "-0".
        .fold(0.0, |total, v| total + v)
}

const WEBHOOK_PATCHES: &str = "hookrelay_status_patches_total{kind=\"Webhook\",result=\"Ok\"}";
const EVENT_PATCHES: &str = "hookrelay_status_patches_total{kind=\"DocumentEvent\",result=\"Ok\"}";
const KUBE_REQUESTS: &str = "hookrelay_kube_api_requests_total{";
const PARKED: &str = "hookrelay_jetstream_parked_total{";

/// The operator's counters at one moment.
struct Counters {
    at: Instant,
    cpu: Duration,
    rss_mib: f64,
    webhook_patches: f64,
    event_patches: f64,
    kube_requests: f64,
    parked: f64,
}

impl Counters {
    async fn read(pid: u32, metrics: SocketAddr) -> Counters {
        Counters {
            at: Instant::now(),
            cpu: cpu_time(pid),
            rss_mib: memory(pid).0,
            webhook_patches: metric_sum(metrics, WEBHOOK_PATCHES).await,
            event_patches: metric_sum(metrics, EVENT_PATCHES).await,
            kube_requests: metric_sum(metrics, KUBE_REQUESTS).await,
            parked: metric_sum(metrics, PARKED).await,
        }
    }
}

/// What one run cost the operator.
#[derive(serde::Serialize)]
pub struct OperatorCost {
    pub scenario: String,
    /// From the first request to the end of the drain.
    pub seconds: f64,
    pub deliveries: usize,
    pub cpu_ms: f64,
    pub cpu_ms_per_1000_deliveries: Option<f64>,
    /// CPU time over wall time: the cores it kept busy (2 at most here).
    pub cores: f64,
    pub rss_before_mib: f64,
    pub rss_after_mib: f64,
    /// The largest `VmRSS` sampled every 100 ms during the run.
    pub peak_rss_mib: f64,
    pub webhooks: usize,
    pub webhook_status_patches: f64,
    pub webhook_patches_per_webhook_per_s: f64,
    pub event_status_patches: f64,
    /// API requests of every verb the operator made during the run (watches count once).
    pub kube_api_requests: f64,
    /// JetStream work items parked during the run (sent back through the stream to wait).
    pub parked: f64,
    /// nats-server's CPU over the same run, per 1,000 deliveries (JetStream runs only).
    pub nats_cpu_ms_per_1000_deliveries: Option<f64>,
}

/// Samples the operator before a run, and its peak memory during it.
pub struct Probe {
    pid: u32,
    /// nats-server's process and its CPU time at the start.
    nats: Option<(u32, Duration)>,
    metrics: SocketAddr,
    before: Counters,
    stop_sampling: tokio::sync::oneshot::Sender<()>,
    peak_rss: tokio::task::JoinHandle<f64>,
}

impl Probe {
    /// `nats` is nats-server's process id, for its CPU beside the operator's.
    pub async fn start(op: &Operator, nats: Option<u32>) -> Probe {
        let (pid, metrics) = (pid(op), op.metrics_addr);
        let nats = nats.map(|nats| (nats, cpu_time(nats)));
        let before = Counters::read(pid, metrics).await;
        let (stop_sampling, mut stopped) = tokio::sync::oneshot::channel();
        let peak_rss = tokio::spawn(async move {
            let mut peak = memory(pid).0;
            let mut every = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    _ = &mut stopped => return peak,
                    _ = every.tick() => peak = peak.max(memory(pid).0),
                }
            }
        });
        Probe {
            pid,
            nats,
            metrics,
            before,
            stop_sampling,
            peak_rss,
        }
    }

    /// The cost of the run since `start`, which delivered `deliveries` to `webhooks` Webhooks.
    pub async fn finish(self, scenario: &str, deliveries: usize, webhooks: usize) -> OperatorCost {
        let after = Counters::read(self.pid, self.metrics).await;
        let _ = self.stop_sampling.send(());
        let peak = self.peak_rss.await.unwrap_or(0.0).max(after.rss_mib);
        let seconds = (after.at - self.before.at).as_secs_f64();
        let cpu_ms = (after.cpu - self.before.cpu).as_secs_f64() * 1000.0;
        let webhook_patches = after.webhook_patches - self.before.webhook_patches;
        let per_1000 = |ms: f64| (deliveries > 0).then(|| ms / deliveries as f64 * 1000.0);
        let nats_cpu_ms = self
            .nats
            .map(|(nats, before)| (cpu_time(nats) - before).as_secs_f64() * 1000.0);
        OperatorCost {
            scenario: scenario.to_owned(),
            seconds,
            deliveries,
            cpu_ms,
            cpu_ms_per_1000_deliveries: per_1000(cpu_ms),
            cores: cpu_ms / 1000.0 / seconds,
            rss_before_mib: self.before.rss_mib,
            rss_after_mib: after.rss_mib,
            peak_rss_mib: peak,
            webhooks,
            webhook_status_patches: webhook_patches,
            webhook_patches_per_webhook_per_s: webhook_patches / webhooks.max(1) as f64 / seconds,
            event_status_patches: after.event_patches - self.before.event_patches,
            kube_api_requests: after.kube_requests - self.before.kube_requests,
            parked: after.parked - self.before.parked,
            nats_cpu_ms_per_1000_deliveries: nats_cpu_ms.and_then(per_1000),
        }
    }
}
