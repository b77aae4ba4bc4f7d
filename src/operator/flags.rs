//! The flags of `hookrelay run`, each with its environment variable, and the parsers of
//! their periods and sizes.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Args;
use ipnet::IpNet;

use crate::http;

/// Flags of `hookrelay run`; each also reads an environment variable.
#[derive(Args, Clone, Debug)]
pub struct RunArgs {
    /// Address of the REST API and event ingest.
    #[arg(long, env = "HOOKRELAY_LISTEN_ADDR", default_value = "0.0.0.0:8080")]
    pub listen_addr: SocketAddr,

    /// `durable`: store ingested events as DocumentEvents before replying (at-least-once);
    /// `direct`: dispatch them from memory (lowest latency, at-most-once across a restart);
    /// `jetstream`: publish them to NATS JetStream (--nats-url) before replying, every replica
    /// delivering (at-least-once).
    #[arg(
        long,
        env = "HOOKRELAY_INGEST_MODE",
        value_enum,
        default_value = "durable"
    )]
    pub ingest_mode: http::IngestMode,

    /// NATS server(s) of `--ingest-mode jetstream`, e.g. nats://nats.nats:4222 (required in
    /// that mode); nats://user:password@host:4222 or nats://token@host:4222 to authenticate.
    #[arg(long, env = "HOOKRELAY_NATS_URL")]
    pub nats_url: Option<String>,

    /// NATS credentials file (a user JWT and its NKey seed), if the server requires one.
    #[arg(long, env = "HOOKRELAY_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,

    /// PEM CA certificate(s) the NATS server's certificate must chain to; any --nats-tls-*
    /// flag makes TLS required (without this one, the system's roots are trusted).
    #[arg(long, env = "HOOKRELAY_NATS_TLS_CA_FILE")]
    pub nats_tls_ca_file: Option<PathBuf>,

    /// PEM client certificate for a NATS server that verifies clients; with
    /// --nats-tls-key-file.
    #[arg(
        long,
        env = "HOOKRELAY_NATS_TLS_CERT_FILE",
        requires = "nats_tls_key_file"
    )]
    pub nats_tls_cert_file: Option<PathBuf>,

    /// PEM private key of --nats-tls-cert-file.
    #[arg(
        long,
        env = "HOOKRELAY_NATS_TLS_KEY_FILE",
        requires = "nats_tls_cert_file"
    )]
    pub nats_tls_key_file: Option<PathBuf>,

    /// The JetStream stream holding events and deliveries: created at start if missing; an
    /// existing one keeps its limits and gets only what hookrelay needs (its subjects, message
    /// schedules). Its name lowercased prefixes every subject (`hookrelay.>` for the default),
    /// so installations sharing a NATS account each need their own; no '.', '*', '>', '/',
    /// '\', spaces or control characters.
    #[arg(long, env = "HOOKRELAY_NATS_STREAM", default_value = "HOOKRELAY")]
    pub nats_stream: String,

    /// How long the stream keeps events and deliveries, delivered or not (limits retention);
    /// a delivery still held or retrying after this is lost. Applies when hookrelay creates
    /// the stream.
    #[arg(long, env = "HOOKRELAY_NATS_MAX_AGE", default_value = "24h", value_parser = parse_period)]
    pub nats_max_age: Duration,

    /// Bytes the stream may hold, all tenants together (e.g. 1GiB, 512MiB, 10GB or a byte
    /// count). Ingest answers 503 (`jetstream_full`) once the stream holds three quarters of
    /// it, the rest kept for delivering what it holds. Applies when hookrelay creates the
    /// stream: an existing stream keeps its limits.
    #[arg(long, env = "HOOKRELAY_NATS_MAX_BYTES", default_value = "1GiB", value_parser = parse_size)]
    pub nats_max_bytes: i64,

    /// Bytes one namespace's events may take in the stream over --nats-max-age (each event
    /// and one work item per Webhook that takes it), counted by each replica: past it, that
    /// namespace's ingest answers 429 (`namespace_quota`) while the others' goes on. Default: a
    /// quarter of --nats-max-bytes; 0: no limit.
    #[arg(long, env = "HOOKRELAY_NATS_MAX_BYTES_PER_NAMESPACE", value_parser = parse_size)]
    pub nats_max_bytes_per_namespace: Option<i64>,

    /// Messages the stream may hold (events, work items, parked retries and attempt records:
    /// about three per event and target); as --nats-max-bytes, ingest stops at three quarters
    /// of it, and it applies when hookrelay creates the stream.
    #[arg(long, env = "HOOKRELAY_NATS_MAX_MESSAGES", default_value_t = 1_000_000, value_parser = clap::value_parser!(i64).range(1..))]
    pub nats_max_messages: i64,

    /// Events and deliveries one consumer may have handed out and not yet acknowledged, across
    /// all replicas; one replica keeps at most half of it in hand for one namespace.
    #[arg(long, env = "HOOKRELAY_NATS_MAX_ACK_PENDING", default_value_t = 10_000, value_parser = clap::value_parser!(i64).range(1..=1_000_000))]
    pub nats_max_ack_pending: i64,

    /// Events JetStream ingest may be storing at once (published, not acknowledged yet), a
    /// quarter of it per namespace; a request past it gets 429 with Retry-After before anything
    /// of it is published.
    #[arg(long, env = "HOOKRELAY_NATS_MAX_PUBLISHING", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub nats_max_publishing: u64,

    /// Deliveries direct ingest may hold before it answers 429.
    #[arg(long, env = "HOOKRELAY_DIRECT_QUEUE", default_value_t = 10_000)]
    pub direct_queue: usize,

    /// Deliveries one namespace may hold in the direct queue, so that one tenant (a paused
    /// Webhook, a dead endpoint) cannot take it all; default: a quarter of --direct-queue.
    #[arg(long, env = "HOOKRELAY_DIRECT_QUEUE_PER_NAMESPACE")]
    pub direct_queue_per_namespace: Option<usize>,

    /// How long a direct delivery is held for a paused or blocked Webhook before it gives up
    /// (and frees its place in the queue).
    #[arg(long, env = "HOOKRELAY_DIRECT_MAX_HOLD", default_value = "60s", value_parser = humantime::parse_duration)]
    pub direct_max_hold: Duration,

    /// How long a direct delivery may wait in its Webhook's line, and how long a request may
    /// wait for room: an event for a Webhook whose oldest delivery in line has waited longer
    /// (or finding the queue full) is held up to this long for deliveries to move on, then
    /// answered 429. Back-pressure while latency is still low, not seconds later when the
    /// queue is full (BENCHMARKS.md); raise it for bursts to slow receivers.
    #[arg(long, env = "HOOKRELAY_DIRECT_MAX_QUEUE_DELAY", default_value = "5ms", value_parser = humantime::parse_duration)]
    pub direct_max_queue_delay: Duration,

    /// DEVELOPMENT ONLY: serve the REST API and ingest without authentication or authorization.
    #[arg(long, env = "HOOKRELAY_DISABLE_AUTH")]
    pub disable_auth: bool,

    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "HOOKRELAY_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,

    /// Watch only this namespace (repeatable or comma-separated); all namespaces when absent.
    /// (Formerly --namespace, still accepted.)
    #[arg(
        long = "watch-namespace",
        alias = "namespace",
        env = "HOOKRELAY_WATCH_NAMESPACE",
        value_delimiter = ','
    )]
    pub namespaces: Vec<String>,

    /// Egress: allow deliveries over plain http (otherwise only https). (Formerly --allow-http,
    /// still accepted.)
    #[arg(
        long = "egress-allow-http",
        alias = "allow-http",
        env = "HOOKRELAY_EGRESS_ALLOW_HTTP"
    )]
    pub allow_http: bool,

    /// Delete delivered DocumentEvents this long after completion; 0 keeps them (at most 365d).
    #[arg(long, env = "HOOKRELAY_EVENT_RETENTION", default_value = "10m", value_parser = parse_period)]
    pub event_retention: Duration,

    /// Delete DocumentEvents whose delivery failed this long after completion; 0 keeps them
    /// (at most 365d).
    #[arg(long, env = "HOOKRELAY_FAILED_EVENT_RETENTION", default_value = "24h", value_parser = parse_period)]
    pub failed_event_retention: Duration,

    /// A delivery held this long (its Webhook paused, or not Ready for a reason a person fixes)
    /// fails, so that its DocumentEvent finishes and retention applies (at most 365d).
    #[arg(long, env = "HOOKRELAY_MAX_HOLD", default_value = "168h", value_parser = parse_period)]
    pub max_hold: Duration,

    /// How long the filters of one event may take in all (waiting for their namespace's turn
    /// included); a filter not decided by then does not match, and its Webhook gets a
    /// FilterFailed warning Event. Filters run off the request and delivery workers.
    #[arg(long, env = "HOOKRELAY_FILTER_TIMEOUT", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub filter_timeout: Duration,

    /// Filter evaluation time one namespace may use per second, on average over a few seconds;
    /// once spent, its filters do not match (FilterFailed) until it refills, so that one
    /// namespace's events cannot take the time of everyone's.
    #[arg(long, env = "HOOKRELAY_FILTER_TIME_PER_NAMESPACE", default_value = "250ms", value_parser = humantime::parse_duration)]
    pub filter_time_per_namespace: Duration,

    /// Continue the trace of a `traceparent` sent to POST /api/events as given (the client's
    /// trace holds hookrelay's spans). Off: ingest starts a trace of its own, linked to the
    /// client's, so that no client places spans in a trace it chose, in a collector that other
    /// tenants share.
    #[arg(long, env = "HOOKRELAY_TRUST_CLIENT_TRACES")]
    pub trust_client_traces: bool,

    /// Delivery attempts in flight at once, in all.
    #[arg(long, env = "HOOKRELAY_MAX_IN_FLIGHT", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_in_flight: u32,

    /// Delivery attempts in flight at once to the Webhooks of one namespace, so that one
    /// namespace's slow or dead endpoints cannot stall the others.
    #[arg(long, env = "HOOKRELAY_MAX_IN_FLIGHT_PER_NAMESPACE", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_in_flight_per_namespace: u32,

    /// On SIGTERM, time allowed to stop delivering and write pending status before exiting;
    /// what is not written by then is redone by the next run (at-least-once).
    #[arg(long, env = "HOOKRELAY_SHUTDOWN_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,

    /// Run several replicas: only the holder of the Lease `hookrelay` delivers DocumentEvents,
    /// runs the JetStream serial lane and writes status and Events; every replica serves the
    /// API, ingest and the shared JetStream work, and keeps its routing table warm.
    #[arg(long, env = "HOOKRELAY_LEADER_ELECT")]
    pub leader_elect: bool,

    /// A replica whose API server has not answered for this long (a partition, an outage)
    /// reports not ready and hands shared JetStream work to the other replicas until it
    /// answers again: its view of the Webhooks may be stale.
    #[arg(long, env = "HOOKRELAY_VIEW_STALE_AFTER", default_value = "10s", value_parser = humantime::parse_duration)]
    pub view_stale_after: Duration,

    /// Namespace of the Lease; default: the pod's own namespace, else `default`.
    #[arg(long, env = "HOOKRELAY_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// How long a Lease not renewed stays with its holder before a standby takes it.
    #[arg(long, env = "HOOKRELAY_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,

    /// The leader steps down (its leader-only work stops; the process keeps serving and
    /// campaigns again) when it could not renew for this long; shorter than --lease-duration.
    /// (Formerly --renew-deadline, still accepted.)
    #[arg(long = "lease-renew-deadline", alias = "renew-deadline", env = "HOOKRELAY_LEASE_RENEW_DEADLINE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub renew_deadline: Duration,

    /// How often the Lease is renewed, or tried by a standby (not a delivery retry: those are
    /// each Webhook's spec.delivery). (Formerly --retry-period, still accepted.)
    #[arg(long = "lease-retry-period", alias = "retry-period", env = "HOOKRELAY_LEASE_RETRY_PERIOD", default_value = "2s", value_parser = humantime::parse_duration)]
    pub retry_period: Duration,

    /// Egress: a private or special range deliveries may reach, e.g. 10.0.0.0/8 (repeatable or
    /// comma-separated). (Formerly --allow-cidr, still accepted.)
    #[arg(
        long = "egress-allow-cidr",
        alias = "allow-cidr",
        env = "HOOKRELAY_EGRESS_ALLOW_CIDR",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    pub allow_cidrs: Vec<IpNet>,

    /// Close a connection whose request headers (or TLS handshake) take longer than this.
    #[arg(long, env = "HOOKRELAY_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,

    /// Answer 408 to a request not handled within this, reading its body included.
    #[arg(long, env = "HOOKRELAY_REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// Connections served at once per port; beyond, new ones wait until one closes.
    #[arg(long, env = "HOOKRELAY_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,

    /// Reviews in flight at once, twice over: TokenReviews of tokens never seen valid, and
    /// SubjectAccessReviews plus re-reviews of tokens seen valid (so a flood of bogus tokens
    /// cannot starve known callers); a caller that finds no slot within half a second gets 503
    /// with Retry-After.
    #[arg(long, env = "HOOKRELAY_MAX_CONCURRENT_REVIEWS", default_value_t = 16)]
    pub max_concurrent_reviews: usize,

    /// The audience API tokens must be minted for (`kubectl create token SA --audience
    /// hookrelay`). Empty accepts tokens for the API server itself: weaker, as a token that
    /// works against hookrelay then also works against the Kubernetes API.
    #[arg(long, env = "HOOKRELAY_TOKEN_AUDIENCE", default_value = "hookrelay")]
    pub token_audience: String,

    /// PEM certificate (chain) to serve the API over TLS; with --tls-key-file. Reloaded when
    /// the file changes. Without both, the API is plain HTTP.
    #[arg(long, env = "HOOKRELAY_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,

    /// PEM private key of --tls-cert-file.
    #[arg(long, env = "HOOKRELAY_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,

    /// TEST SEAM, never for production (hidden from --help; only in builds with the cargo feature
    /// `test-seams`, which the tests use and releases do not):
    /// FROM=TO pairs, FROM an IP address or CIDR range, TO an IP address; a delivery the egress
    /// policy allowed to an address FROM covers connects to TO instead (tests map a Service's
    /// ClusterIP onto a loopback receiver, as there is no kube-proxy there). The operator logs
    /// a warning at start while it is set.
    #[cfg_attr(not(feature = "test-seams"), arg(skip))]
    #[cfg_attr(feature = "test-seams", arg(
        long = "test-address-map",
        env = "HOOKRELAY_TEST_ADDRESS_MAP",
        value_delimiter = ',',
        value_name = "FROM=TO",
        value_parser = crate::delivery::AddressMap::parse_pair,
        hide = true
    ))]
    pub test_address_map: Vec<(IpNet, std::net::IpAddr)>,

    /// TEST SEAM, never for production (hidden from --help; only in builds with the cargo feature
    /// `test-seams`, which the tests use and releases do not):
    /// NAME=IP pairs (repeatable, a name several times for several addresses); deliveries
    /// resolve NAME to IP instead of asking the system resolver, and the egress policy judges
    /// IP as any resolved address (tests make a name resolve to a blocked address at connect
    /// time, without DNS). The operator logs a warning at start while it is set.
    #[cfg_attr(not(feature = "test-seams"), arg(skip))]
    #[cfg_attr(feature = "test-seams", arg(
        long = "test-resolve",
        env = "HOOKRELAY_TEST_RESOLVE",
        value_delimiter = ',',
        value_name = "NAME=IP",
        value_parser = crate::delivery::TestNames::parse_pair,
        hide = true
    ))]
    pub test_resolve: Vec<(String, std::net::IpAddr)>,
}

/// Flags renamed because their old names misled (`--namespace` is what to watch, `--allow-*`
/// govern egress, `--retry-period` is the Lease's): (old, new). The old names, and their
/// environment variables, still work for a release, with a warning at start.
pub const RENAMED_FLAGS: [(&str, &str); 5] = [
    ("namespace", "watch-namespace"),
    ("allow-http", "egress-allow-http"),
    ("allow-cidr", "egress-allow-cidr"),
    ("renew-deadline", "lease-renew-deadline"),
    ("retry-period", "lease-retry-period"),
];

/// A flag's environment variable: `HOOKRELAY_` and the name in upper snake case.
fn env_name(flag: &str) -> String {
    format!("HOOKRELAY_{}", flag.to_uppercase().replace('-', "_"))
}

/// Which renamed flags `args` or the environment use under their old names, as warnings. An old
/// environment variable is copied to the new one (unless that is set), since a flag reads one.
///
/// # Safety
/// Sets environment variables: call it before any other thread exists.
pub unsafe fn adopt_renamed_flags(args: &[String]) -> Vec<String> {
    let mut warnings = Vec::new();
    for (old, new) in RENAMED_FLAGS {
        let flag = format!("--{old}");
        if args
            .iter()
            .any(|a| *a == flag || a.starts_with(&format!("{flag}=")))
        {
            warnings.push(format!(
                "--{old} is now --{new}; the old name goes in a later release"
            ));
        }
        let (old_env, new_env) = (env_name(old), env_name(new));
        if let Some(value) = std::env::var_os(&old_env) {
            if std::env::var_os(&new_env).is_none() {
                // SAFETY: the caller guarantees no other thread reads or writes the environment.
                unsafe { std::env::set_var(&new_env, value) };
            }
            warnings.push(format!(
                "{old_env} is now {new_env}; the old name goes in a later release"
            ));
        }
    }
    warnings
}

impl RunArgs {
    /// The defaults, with the metrics server on an ephemeral loopback port (for tests).
    pub fn for_tests() -> Self {
        Self {
            listen_addr: "127.0.0.1:0".parse().expect("a valid address"),
            ingest_mode: http::IngestMode::Durable,
            nats_url: None,
            nats_creds: None,
            nats_tls_ca_file: None,
            nats_tls_cert_file: None,
            nats_tls_key_file: None,
            nats_stream: "HOOKRELAY".into(),
            nats_max_age: Duration::from_secs(86400),
            nats_max_bytes: 1 << 30,
            nats_max_bytes_per_namespace: None,
            nats_max_messages: 1_000_000,
            nats_max_ack_pending: 10_000,
            nats_max_publishing: 10_000,
            direct_queue: 10_000,
            direct_queue_per_namespace: None,
            direct_max_hold: Duration::from_secs(60),
            direct_max_queue_delay: Duration::from_millis(5),
            disable_auth: false,
            metrics_addr: "127.0.0.1:0".parse().expect("a valid address"),
            namespaces: Vec::new(),
            allow_http: false,
            allow_cidrs: Vec::new(),
            event_retention: Duration::from_secs(600),
            failed_event_retention: Duration::from_secs(86400),
            max_hold: Duration::from_secs(168 * 3600),
            filter_timeout: Duration::from_millis(500),
            filter_time_per_namespace: Duration::from_millis(250),
            trust_client_traces: false,
            max_in_flight: 512,
            max_in_flight_per_namespace: 128,
            shutdown_timeout: Duration::from_secs(20),
            leader_elect: false,
            view_stale_after: Duration::from_secs(10),
            lease_namespace: None,
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_connections: 1024,
            max_concurrent_reviews: 16,
            token_audience: "hookrelay".into(),
            tls_cert_file: None,
            tls_key_file: None,
            test_address_map: Vec::new(),
            test_resolve: Vec::new(),
        }
    }
}

/// The environment variables of the test seams: a release build, which has no test seams,
/// refuses to start while one is set rather than ignore it.
pub const TEST_SEAM_VARIABLES: [&str; 2] = ["HOOKRELAY_TEST_ADDRESS_MAP", "HOOKRELAY_TEST_RESOLVE"];

/// The longest retention or hold accepted: timers (tokio's wheel, `DelayQueue`) hold about two
/// years, and a longer value is a typo more often than a plan.
pub const MAX_PERIOD: Duration = Duration::from_secs(365 * 24 * 3600);

/// A duration such as `10m`, `24h` or `0`, at most [`MAX_PERIOD`].
pub fn parse_period(value: &str) -> Result<Duration, String> {
    let period = humantime::parse_duration(value).map_err(|e| e.to_string())?;
    if period > MAX_PERIOD {
        return Err(format!(
            // In days: humantime would say "11months 30days 3h 50m 24s" (its year is 365.25d).
            "{value} is longer than the longest period accepted ({}d)",
            MAX_PERIOD.as_secs() / 86_400
        ));
    }
    Ok(period)
}

/// A size in bytes: a byte count, or a whole number with a unit, decimal (kB, MB, GB, TB; K,
/// M, G, T) or binary (KiB, MiB, GiB, TiB; Ki, Mi, Gi, Ti, as Kubernetes writes them).
pub fn parse_size(value: &str) -> Result<i64, String> {
    let value = value.trim();
    let digits = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(digits);
    let number: i64 = number
        .parse()
        .map_err(|_| format!("{value:?} is not a size: a whole number of bytes, or with a unit such as 512MiB or 1GiB"))?;
    let unit = unit.trim();
    let multiplier: i64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "ki" | "kib" => 1 << 10,
        "mi" | "mib" => 1 << 20,
        "gi" | "gib" => 1 << 30,
        "ti" | "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "{value:?}: unknown unit {unit:?} (use B, kB, MB, GB, TB, KiB, MiB, GiB or TiB)"
            ));
        }
    };
    match number.checked_mul(multiplier) {
        Some(0) => Err(format!("{value:?}: the size must be at least one byte")),
        Some(bytes) => Ok(bytes),
        None => Err(format!("{value:?} is too large")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Run {
        #[command(flatten)]
        args: RunArgs,
    }

    #[test]
    fn renamed_flags_are_read_under_both_names_and_the_old_ones_are_warned_about() {
        let new = [
            "run",
            "--watch-namespace=docs,billing",
            "--egress-allow-http",
            "--egress-allow-cidr=10.0.0.0/8",
            "--lease-renew-deadline=7s",
            "--lease-retry-period=1s",
        ];
        let old = [
            "run",
            "--namespace=docs,billing",
            "--allow-http",
            "--allow-cidr=10.0.0.0/8",
            "--renew-deadline=7s",
            "--retry-period=1s",
        ];
        for argv in [new, old] {
            let args = Run::try_parse_from(argv).expect("parses").args;
            assert_eq!(args.namespaces, ["docs", "billing"], "{argv:?}");
            assert!(args.allow_http);
            assert_eq!(args.allow_cidrs, ["10.0.0.0/8".parse::<IpNet>().unwrap()]);
            assert_eq!(args.renew_deadline, Duration::from_secs(7));
            assert_eq!(args.retry_period, Duration::from_secs(1));
        }
        let argv = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // SAFETY: none of these tests set the HOOKRELAY_ variables this reads.
        let warned = unsafe { adopt_renamed_flags(&argv(&old)) };
        assert_eq!(warned.len(), 5, "{warned:?}");
        assert!(
            warned[0].contains("--namespace is now --watch-namespace"),
            "{warned:?}"
        );
        assert!(unsafe { adopt_renamed_flags(&argv(&new)) }.is_empty());
        // The old names are not advertised.
        let help = format!(
            "{}",
            <Run as clap::CommandFactory>::command().render_long_help()
        );
        assert!(
            help.contains("--egress-allow-cidr") && !help.contains("--allow-cidr "),
            "{help}"
        );
    }

    #[test]
    fn sizes_are_read_with_decimal_and_binary_units() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("512Mi"), Ok(512 << 20));
        assert_eq!(parse_size("10GB"), Ok(10_000_000_000));
        assert_eq!(parse_size("2 kb"), Ok(2_000));
        assert_eq!(parse_size("64B"), Ok(64));
        assert_eq!(parse_size("1TiB"), Ok(1 << 40));
    }

    #[test]
    fn sizes_that_are_not_sizes_are_refused_saying_why() {
        for wrong in ["", "GiB", "1.5GiB", "-1", "1 parsec", "0", "0GiB"] {
            assert!(parse_size(wrong).is_err(), "{wrong:?} was accepted");
        }
        let error = parse_size("1XB").unwrap_err();
        assert!(
            error.contains("unknown unit") && error.contains("GiB"),
            "{error}"
        );
        assert!(
            parse_size("9999999999TiB")
                .unwrap_err()
                .contains("too large")
        );
    }

    #[test]
    fn periods_beyond_what_timers_hold_are_refused() {
        assert_eq!(parse_period("0"), Ok(Duration::ZERO));
        assert_eq!(parse_period("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_period("365d"), Ok(MAX_PERIOD));
        let error = parse_period("100y").unwrap_err();
        assert!(error.contains("longest period accepted (365d)"), "{error}");
        assert!(parse_period("soon").is_err());
    }
}
