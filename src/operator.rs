//! `hookrelay run`: the operator's flags and the wiring of its tasks.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use clap::Args;
use ipnet::IpNet;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{Client, api::Api, core::crd::CustomResourceExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    controller::{DocumentEventController, Retention, Scope, WebhookController},
    crd::{DocumentEvent, Webhook},
    delivery::{self, Dispatcher, DispatcherConfig, EgressPolicy, HttpSender, jetstream},
    health, http,
    leader::{self, ElectionConfig, LeaderTerms, Leadership},
    metrics::Metrics,
    ports::{CreatedEvents, Recoveries},
    routing::Routes,
    status::{self, WriterConfig},
};

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
    /// that mode).
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
    /// schedules).
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

    /// Direct ingest answers 429 for a Webhook whose oldest delivery in line has waited longer
    /// than this: back-pressure while latency is still low, not seconds later when the queue
    /// is full.
    #[arg(long, env = "HOOKRELAY_DIRECT_MAX_QUEUE_DELAY", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub direct_max_queue_delay: Duration,

    /// DEVELOPMENT ONLY: serve the REST API and ingest without authentication or authorization.
    #[arg(long, env = "HOOKRELAY_DISABLE_AUTH")]
    pub disable_auth: bool,

    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "HOOKRELAY_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,

    /// Watch only this namespace (repeatable); all namespaces when absent.
    #[arg(long = "namespace", env = "HOOKRELAY_NAMESPACE", value_delimiter = ',')]
    pub namespaces: Vec<String>,

    /// Allow plain-http webhook URLs (otherwise only https).
    #[arg(long, env = "HOOKRELAY_ALLOW_HTTP")]
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
    #[arg(long, env = "HOOKRELAY_RENEW_DEADLINE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub renew_deadline: Duration,

    /// How often the Lease is renewed, or tried by a standby.
    #[arg(long, env = "HOOKRELAY_RETRY_PERIOD", default_value = "2s", value_parser = humantime::parse_duration)]
    pub retry_period: Duration,

    /// A private or special range deliveries may reach, e.g. 10.0.0.0/8 (repeatable).
    #[arg(
        long = "allow-cidr",
        env = "HOOKRELAY_ALLOW_CIDR",
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

    /// TEST SEAM, never for production (hidden from --help): FROM=TO pairs, FROM an IP address
    /// or CIDR range, TO an IP address; a delivery the egress policy allowed to an address FROM
    /// covers connects to TO instead (tests map a
    /// Service's ClusterIP onto a loopback receiver, as there is no kube-proxy there). The
    /// operator logs a warning at start while it is set.
    #[arg(
        long = "test-address-map",
        env = "HOOKRELAY_TEST_ADDRESS_MAP",
        value_delimiter = ',',
        value_name = "FROM=TO",
        value_parser = delivery::AddressMap::parse_pair,
        hide = true
    )]
    pub test_address_map: Vec<(IpNet, std::net::IpAddr)>,

    /// TEST SEAM, never for production (hidden from --help): NAME=IP pairs (repeatable, a name
    /// several times for several addresses); deliveries resolve NAME to IP instead of asking
    /// the system resolver, and the egress policy judges IP as any resolved address (tests
    /// make a name resolve to a blocked address at connect time, without DNS). The operator
    /// logs a warning at start while it is set.
    #[arg(
        long = "test-resolve",
        env = "HOOKRELAY_TEST_RESOLVE",
        value_delimiter = ',',
        value_name = "NAME=IP",
        value_parser = delivery::TestNames::parse_pair,
        hide = true
    )]
    pub test_resolve: Vec<(String, std::net::IpAddr)>,
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
            nats_max_messages: 1_000_000,
            nats_max_ack_pending: 10_000,
            nats_max_publishing: 10_000,
            direct_queue: 10_000,
            direct_queue_per_namespace: None,
            direct_max_hold: Duration::from_secs(60),
            direct_max_queue_delay: Duration::from_millis(100),
            disable_auth: false,
            metrics_addr: "127.0.0.1:0".parse().expect("a valid address"),
            namespaces: Vec::new(),
            allow_http: false,
            allow_cidrs: Vec::new(),
            event_retention: Duration::from_secs(600),
            failed_event_retention: Duration::from_secs(86400),
            max_hold: Duration::from_secs(168 * 3600),
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

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the {crd} CRD is not installed: install crds/ (kubectl apply --server-side -f crds/) or the Helm chart first"
    )]
    CrdMissing { crd: String },
    #[error("cannot reach the Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(
        "TLS: {0} (--tls-cert-file and --tls-key-file take PEM files, a certificate and its key)"
    )]
    Tls(String),
    #[error("cannot serve on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "leader election needs --retry-period < --renew-deadline < --lease-duration (got {retry:?}, {renew:?}, {lease:?})"
    )]
    LeaseTimings {
        retry: Duration,
        renew: Duration,
        lease: Duration,
    },
    #[error(
        "--ingest-mode jetstream needs --nats-url (HOOKRELAY_NATS_URL), for example nats://nats.nats:4222"
    )]
    NatsUrlMissing,
    #[error("JetStream: {0}")]
    Bus(#[from] jetstream::BusError),
    #[error("the {task} task ended unexpectedly ({why}); stopping so that a restart recovers")]
    TaskEnded { task: &'static str, why: String },
}

/// What a running operator shares with its callers (the binary, in-process tests).
#[derive(Clone)]
pub struct Operator {
    pub routes: Routes,
    pub leadership: Leadership,
    pub readiness: health::Readiness,
    pub liveness: health::Liveness,
    pub metrics: Metrics,
    pub metrics_addr: SocketAddr,
    pub listen_addr: SocketAddr,
    /// The API's authenticator (its review counts, for tests).
    pub auth: http::Authorizer,
}

/// Runs the operator until `shutdown` fires.
pub async fn run(
    config: kube::Config,
    args: RunArgs,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let (_, task) = start(config, args, shutdown).await?;
    task.await
}

/// Checks the cluster, binds the servers and starts every task; the returned future completes
/// when they have all stopped after `shutdown`.
pub async fn start(
    config: kube::Config,
    args: RunArgs,
    shutdown: CancellationToken,
) -> Result<(Operator, impl Future<Output = Result<(), Error>>), Error> {
    // Before touching the cluster: a flag mistake is reported as such.
    check_flags(&args)?;
    let metrics = Metrics::default();
    let client = metrics.instrumented_client(config)?;
    check_crds(&client).await?;
    let bus = match (args.ingest_mode, &args.nats_url) {
        (http::IngestMode::JetStream, Some(url)) => Some(
            jetstream::connect(&jetstream::BusConfig {
                url: url.clone(),
                creds: args.nats_creds.clone(),
                tls: jetstream::NatsTls {
                    ca_file: args.nats_tls_ca_file.clone(),
                    cert_file: args.nats_tls_cert_file.clone(),
                    key_file: args.nats_tls_key_file.clone(),
                },
                stream: args.nats_stream.clone(),
                max_age: args.nats_max_age,
                max_bytes: args.nats_max_bytes,
                max_messages: args.nats_max_messages,
                max_ack_pending: args.nats_max_ack_pending,
            })
            .await?,
        ),
        _ => None,
    };
    // With leader election, a standby never syncs DocumentEvents: it is ready once it can
    // route (and so serve the API).
    let routes = Routes::default();
    let readiness = if args.leader_elect {
        health::Readiness::new(&["secrets", "webhooks"])
    } else {
        health::Readiness::new(&["secrets", "webhooks", "documentevents"])
    }
    .with_view(routes.view().clone());
    let (terms, leadership) = if args.leader_elect {
        let (terms, leadership) = Leadership::elected();
        (Some(terms), leadership)
    } else {
        (None, Leadership::always())
    };
    // Attempts being sent when a term ends get this long; then another replica may lead.
    let step_down_grace = if args.leader_elect {
        (args.lease_duration.saturating_sub(args.renew_deadline) / 2).min(args.shutdown_timeout / 2)
    } else {
        args.shutdown_timeout / 2
    };
    let liveness = health::Liveness::default();
    let scope = Scope::new(&args.namespaces);
    let egress = EgressPolicy::new(args.allow_http, args.allow_cidrs.clone());

    let tls = load_tls(&args, &shutdown)?;
    let (metrics_listener, metrics_addr) = bind(args.metrics_addr).await?;
    let (api_listener, listen_addr) = bind(args.listen_addr).await?;

    let (local_status, writer) = status::channel(
        client.clone(),
        metrics.clone(),
        WriterConfig::default(),
        4096,
        leadership.clone(),
    );
    // In jetstream mode every replica delivers: attempt records go through the stream to the
    // leader's writer (delivery::records). Everything else goes to the local writer.
    let (status, relay) = match &bus {
        Some(bus) => {
            let (status, relay) = delivery::records::relay(
                bus.context.clone(),
                local_status.clone(),
                metrics.clone(),
                4096,
            );
            (status, Some(relay))
        }
        None => (local_status.clone(), None),
    };
    let (gone_tx, gone_rx) = mpsc::unbounded_channel();
    let address_map = delivery::AddressMap::new(args.test_address_map.iter().copied());
    if !address_map.is_empty() {
        tracing::warn!(
            map = ?args.test_address_map,
            "TEST SEAM --test-address-map IS SET: deliveries connect to other addresses than the egress policy approved; never use this outside tests"
        );
    }
    let test_names = delivery::TestNames::new(args.test_resolve.iter().cloned());
    if !test_names.is_empty() {
        tracing::warn!(
            names = ?args.test_resolve,
            "TEST SEAM --test-resolve IS SET: deliveries resolve these names to the given addresses instead of asking DNS; never use this outside tests"
        );
    }
    let dispatcher = Arc::new(Dispatcher::new(
        HttpSender::with_test_seams(egress.clone(), address_map, test_names),
        routes.clone(),
        status.clone(),
        gone_tx,
        metrics.clone(),
        DispatcherConfig {
            global: args.max_in_flight as usize,
            per_namespace: args.max_in_flight_per_namespace as usize,
            ..DispatcherConfig::default()
        },
    ));
    // `status.blockedKeys` of Webhooks with spec.ordering, from this process's queues (only the
    // leader's writer writes; the leader delivers every ordered delivery).
    tokio::spawn(
        dispatcher
            .sequencer()
            .report_blocked(status.clone(), shutdown.clone()),
    );
    let auth = authorizer(&args, &client, listen_addr);
    if tls.is_none() {
        tracing::info!(
            "the API on {listen_addr} is plain HTTP (development, or behind a TLS-terminating proxy); give --tls-cert-file and --tls-key-file to serve HTTPS"
        );
    }
    let (created_events, created) = CreatedEvents::channel();
    let (recoveries, recoveries_rx) = Recoveries::channel();
    let direct = http::DirectIngest::new(
        args.direct_queue,
        args.direct_queue_per_namespace
            .unwrap_or(args.direct_queue / 4)
            .max(1),
    )
    .with_max_queue_delay(args.direct_max_queue_delay)
    .with_metrics(metrics.clone());
    // Direct deliveries stop on the shutdown signal, like the controllers, with the same grace
    // for attempts being sent, before the writer flushes what they recorded.
    let direct_deliveries = (args.ingest_mode == http::IngestMode::Direct)
        .then(|| tokio::spawn(direct.stop_on(shutdown.clone(), args.shutdown_timeout / 2)));
    let api_state = Arc::new(http::ApiState {
        client: client.clone(),
        created_events,
        recoveries,
        auth: auth.clone(),
        routes: routes.clone(),
        dispatcher: dispatcher.clone(),
        ingest_mode: args.ingest_mode,
        bus: bus.clone(),
        jetstream_publishing: http::PublishBudget::new(
            usize::try_from(args.nats_max_publishing).unwrap_or(usize::MAX),
        ),
        direct,
        direct_max_hold: args.direct_max_hold,
        readiness: readiness.clone(),
        leadership: leadership.clone(),
        shutdown: shutdown.clone(),
        metrics: metrics.clone(),
        request_timeout: args.request_timeout,
        test_limiter: http::test_limiter(),
    });
    let limits = http::ServeLimits {
        header_read_timeout: args.header_read_timeout,
        max_connections: args.max_connections,
    };
    let webhooks = WebhookController::new(
        &scope,
        routes.clone(),
        egress,
        status.clone(),
        readiness.clone(),
        metrics.clone(),
    )
    .with_sequencer(dispatcher.sequencer());
    // JetStream consumers run on every replica, independent of leadership: the stream shares
    // the work. Attempt records reach the leader's writer through the stream (`recorder`).
    let recorder = bus.as_ref().map(|bus| {
        let stop = CancellationToken::new();
        let task = tokio::spawn(delivery::records::record_attempts(
            bus.recorder.clone(),
            local_status.clone(),
            leadership.clone(),
            metrics.clone(),
            stop.clone(),
        ));
        (task, stop)
    });
    let relay = relay.map(|relay| {
        let stop = CancellationToken::new();
        (tokio::spawn(relay.run(stop.clone())), stop)
    });
    let bus_tasks = bus.map(|bus| {
        // They stop on the shutdown signal, like the controllers, before the writer flushes.
        let stop = shutdown.clone();
        let synced =
            |readiness: health::Readiness| async move { readiness.synced("webhooks").await };
        let router = tokio::spawn(jetstream::route_events(
            bus.clone(),
            routes.clone(),
            metrics.clone(),
            synced(readiness.clone()),
            stop.clone(),
        ));
        let deliverer = tokio::spawn(jetstream::deliver_work(
            bus.work_queue(jetstream::Lane::Shared),
            dispatcher.clone(),
            jetstream::InHandLimits::shared(
                args.nats_max_ack_pending,
                args.max_in_flight_per_namespace as usize,
            ),
            // Nothing held outlives the stream's retention.
            args.max_hold.min(args.nats_max_age),
            synced(readiness.clone()),
            stop.clone(),
            args.shutdown_timeout / 2,
        ));
        // Rate-limited and ordered Webhooks: delivered by the leader alone, so that one bucket
        // counts every delivery and one process keeps the order; a term that ends stops it.
        let serial = tokio::spawn(serial_lane(
            bus.clone(),
            dispatcher.clone(),
            jetstream::InHandLimits::serial(args.nats_max_ack_pending),
            args.max_hold.min(args.nats_max_age),
            synced(readiness.clone()),
            LeaderTerms::new(leadership.clone(), stop.clone()),
            step_down_grace,
        ));
        (router, deliverer, serial)
    });
    let events = DocumentEventController::new(
        client.clone(),
        &scope,
        routes.clone(),
        dispatcher,
        status,
        readiness.clone(),
        metrics.clone(),
        Retention {
            delivered: nonzero(args.event_retention),
            failed: nonzero(args.failed_event_retention),
        },
        args.max_hold,
    )
    .with_created_events(created)
    .with_recoveries(recoveries_rx)
    // Half the shutdown deadline for attempts being sent; the rest for status and the Lease.
    .with_in_flight_grace(args.shutdown_timeout / 2)
    .with_leadership(leadership.clone(), step_down_grace);

    // The writer stops last, after the producers, so that what they sent is written.
    let writer_stop = CancellationToken::new();
    let writer = tokio::spawn(writer.run(writer_stop.clone()));
    tokio::spawn(publish_leadership(
        leadership.clone(),
        metrics.leader.clone(),
    ));
    let elector = terms.map(|terms| start_election(&args, &client, terms));
    tokio::spawn(crate::controller::watch_view(
        client.clone(),
        scope.clone(),
        routes.view().clone(),
        metrics.clone(),
        args.view_stale_after,
        shutdown.clone(),
    ));
    let webhooks = tokio::spawn(webhooks.run(
        client,
        scope.clone(),
        gone_rx,
        leadership.clone(),
        shutdown.clone(),
    ));
    let events = tokio::spawn(deliver_document_events(
        events,
        scope,
        readiness.clone(),
        LeaderTerms::new(leadership.clone(), shutdown.clone()),
    ));
    let metrics_server = tokio::spawn(http::serve(
        metrics_listener,
        http::metrics_router(readiness.clone(), liveness.clone(), metrics.clone()),
        limits,
        None,
        shutdown.clone(),
    ));
    let api_server = tokio::spawn(http::serve(
        api_listener,
        http::api_router(api_state),
        limits,
        tls,
        shutdown.clone(),
    ));

    let operator = Operator {
        routes,
        leadership,
        readiness,
        liveness: liveness.clone(),
        metrics,
        metrics_addr,
        listen_addr,
        auth,
    };
    // In the order they stop: the controllers and direct deliveries on `shutdown`, then the
    // writer, then (once status is written) the Lease is released, so a standby takes over at
    // once.
    // The servers drain last, so that an API request in flight does not hold up the flush and
    // the Lease release.
    let mut tasks = vec![Essential::new("DocumentEvent controller", events, None)];
    if let Some((router, deliverer, serial)) = bus_tasks {
        tasks.push(Essential::new("JetStream router", router, None));
        tasks.push(Essential::new("JetStream deliverer", deliverer, None));
        tasks.push(Essential::new("JetStream serial deliverer", serial, None));
    }
    tasks.push(Essential::new("Webhook controller", webhooks, None));
    if let Some(task) = direct_deliveries {
        tasks.push(Essential::new("direct deliveries", task, None));
    }
    // Once the deliverers have stopped: the relay publishes their last records, the recorder
    // takes what comes, then the writer writes.
    if let Some((task, stop)) = relay {
        tasks.push(Essential::new("JetStream attempt relay", task, None).stopped_by(stop));
    }
    if let Some((task, stop)) = recorder {
        tasks.push(Essential::new("JetStream recorder", task, None).stopped_by(stop));
    }
    tasks.push(Essential::new("status writer", writer, None).stopped_by(writer_stop));
    if let Some((task, stop)) = elector {
        tasks.push(Essential::new("leader election", task, None).stopped_by(stop));
    }
    tasks.push(Essential::new("API server", api_server, Some(listen_addr)));
    tasks.push(Essential::new(
        "metrics server",
        metrics_server,
        Some(metrics_addr),
    ));
    let task = supervise(tasks, shutdown, liveness, args.shutdown_timeout);
    Ok((operator, task))
}

/// Flag combinations clap cannot check; refused before the cluster is contacted.
fn check_flags(args: &RunArgs) -> Result<(), Error> {
    if args.ingest_mode == http::IngestMode::JetStream && args.nats_url.is_none() {
        return Err(Error::NatsUrlMissing);
    }
    if args.leader_elect
        && !(args.retry_period < args.renew_deadline && args.renew_deadline < args.lease_duration)
    {
        return Err(Error::LeaseTimings {
            retry: args.retry_period,
            renew: args.renew_deadline,
            lease: args.lease_duration,
        });
    }
    Ok(())
}

/// The API's TLS, reloaded as its files change, when both files are given.
fn load_tls(args: &RunArgs, shutdown: &CancellationToken) -> Result<Option<http::Tls>, Error> {
    match (&args.tls_cert_file, &args.tls_key_file) {
        (Some(cert), Some(key)) => http::Tls::load(cert, key, shutdown.clone())
            .map(Some)
            .map_err(Error::Tls),
        (None, None) => Ok(None),
        _ => Err(Error::Tls(
            "give both --tls-cert-file and --tls-key-file, or neither".into(),
        )),
    }
}

/// Who may call the API: the API server decides (TokenReview, SubjectAccessReview), unless
/// `--disable-auth`; both weaker settings say so in the log.
fn authorizer(args: &RunArgs, client: &Client, listen_addr: SocketAddr) -> http::Authorizer {
    if args.disable_auth {
        tracing::warn!(
            "AUTHENTICATION IS DISABLED (--disable-auth): anyone who reaches {listen_addr} can manage webhooks and send events. Development only."
        );
    } else if args.token_audience.is_empty() {
        tracing::warn!(
            "--token-audience is empty: tokens for the Kubernetes API itself are accepted, so a token sent to hookrelay can also be used against the API server"
        );
    }
    let auth = if args.disable_auth {
        http::Authorizer::disabled()
    } else {
        http::Authorizer::kubernetes(
            client.clone(),
            http::AuthSettings {
                audience: Some(args.token_audience.clone()),
                max_concurrent_reviews: args.max_concurrent_reviews,
            },
        )
    };
    auth.watching(&args.namespaces)
}

/// The election task and the token that stops it (releasing the Lease).
fn start_election(
    args: &RunArgs,
    client: &Client,
    terms: leader::Terms,
) -> (tokio::task::JoinHandle<()>, CancellationToken) {
    let config = ElectionConfig {
        namespace: args
            .lease_namespace
            .clone()
            .unwrap_or_else(leader::default_lease_namespace),
        identity: leader::identity(),
        lease_duration: args.lease_duration,
        renew_deadline: args.renew_deadline,
        retry_period: args.retry_period,
    };
    tracing::info!(identity = %config.identity, lease = %format!("{}/{}", config.namespace, leader::LEASE_NAME), "leader election on");
    let stop = CancellationToken::new();
    let task = tokio::spawn(leader::run(client.clone(), config, terms, stop.clone()));
    (task, stop)
}

/// Keeps `hookrelay_leader` equal to this replica's leadership.
async fn publish_leadership(
    mut leadership: Leadership,
    gauge: prometheus_client::metrics::gauge::Gauge,
) {
    loop {
        gauge.set(i64::from(leadership.is_leader()));
        if !leadership.changed().await {
            break;
        }
    }
}

/// The DocumentEvent controller, run by the leader only: once the routing table is complete
/// (events are routed against a complete table only), a run per term of leadership.
async fn deliver_document_events(
    mut controller: DocumentEventController,
    scope: Scope,
    readiness: health::Readiness,
    mut terms: LeaderTerms,
) {
    if terms
        .during_term(|_| readiness.synced("webhooks"))
        .await
        .is_none()
    {
        return;
    }
    while terms
        .during_term(|term| controller.run(&scope, term))
        .await
        .is_some()
    {}
}

/// The JetStream serial lane (rate limits, ordering), bound by the leader only: a run per term
/// of leadership, once the routing table is complete.
async fn serial_lane(
    bus: jetstream::Bus,
    dispatcher: Arc<Dispatcher>,
    limits: jetstream::InHandLimits,
    max_hold: Duration,
    routes_synced: impl Future<Output = ()>,
    mut terms: LeaderTerms,
    grace: Duration,
) -> Result<(), jetstream::BusError> {
    if terms.during_term(|_| routes_synced).await.is_none() {
        return Ok(());
    }
    while let Some(ended) = terms
        .during_term(|term| {
            jetstream::deliver_work(
                bus.work_queue(jetstream::Lane::Serial),
                dispatcher.clone(),
                limits,
                max_hold,
                async {},
                term,
                grace,
            )
        })
        .await
    {
        ended?;
    }
    Ok(())
}

/// A task the operator cannot work without.
pub struct Essential {
    name: &'static str,
    handle: tokio::task::JoinHandle<Result<(), Error>>,
    /// Stops the task when its turn comes at shutdown; None: it stops on the shutdown signal.
    stop: Option<CancellationToken>,
}

impl Essential {
    /// `addr`: the address a server task serves, named in its error.
    pub fn new<T: IntoTaskResult + Send + 'static>(
        name: &'static str,
        handle: tokio::task::JoinHandle<T>,
        addr: Option<SocketAddr>,
    ) -> Self {
        let handle = tokio::spawn(async move {
            match handle.await {
                Ok(output) => output.into_task_result(addr),
                Err(e) if e.is_panic() => Err(Error::TaskEnded {
                    task: name,
                    why: "it panicked".into(),
                }),
                Err(_) => Err(Error::TaskEnded {
                    task: name,
                    why: "it was cancelled".into(),
                }),
            }
        });
        Self {
            name,
            handle,
            stop: None,
        }
    }

    pub fn stopped_by(mut self, stop: CancellationToken) -> Self {
        self.stop = Some(stop);
        self
    }
}

/// What a task's output means for the operator.
pub trait IntoTaskResult {
    fn into_task_result(self, addr: Option<SocketAddr>) -> Result<(), Error>;
}

impl IntoTaskResult for () {
    fn into_task_result(self, _: Option<SocketAddr>) -> Result<(), Error> {
        Ok(())
    }
}

impl IntoTaskResult for Result<(), jetstream::BusError> {
    fn into_task_result(self, _: Option<SocketAddr>) -> Result<(), Error> {
        self.map_err(Error::Bus)
    }
}

impl IntoTaskResult for std::io::Result<()> {
    fn into_task_result(self, addr: Option<SocketAddr>) -> Result<(), Error> {
        self.map_err(|source| Error::Listen {
            addr: addr.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
            source,
        })
    }
}

/// Runs until `shutdown` fires or an essential task ends. A task that ends first (returns,
/// fails or panics) marks the operator not alive (`/healthz` fails), starts the shutdown, and is
/// the error returned, so the process exits non-zero and is restarted. Stopping is bounded by
/// `deadline`: producers stop, then the writer flushes what they sent; whatever is left when the
/// deadline passes is redone by the next run.
pub async fn supervise(
    mut tasks: Vec<Essential>,
    shutdown: CancellationToken,
    liveness: health::Liveness,
    deadline: Duration,
) -> Result<(), Error> {
    let ended_first = tokio::select! {
        // On SIGTERM the servers end at once too: shutdown first, or a clean stop would be
        // reported as a task that ended (exit code 1) whenever select! happened to poll it first.
        biased;
        _ = shutdown.cancelled() => None,
        (result, index, _) = futures::future::select_all(tasks.iter_mut().map(|t| &mut t.handle)) => {
            Some((index, result))
        }
    };
    let mut failure = None;
    if let Some((index, result)) = ended_first {
        let task = tasks.remove(index);
        let error = match result {
            Ok(Err(error)) => error,
            Ok(Ok(())) | Err(_) => Error::TaskEnded {
                task: task.name,
                why: "it returned before shutdown".into(),
            },
        };
        tracing::error!(task = task.name, %error, "an essential task ended; stopping");
        liveness.fail(format!("{}: {error}", task.name));
        shutdown.cancel();
        failure = Some(error);
    }
    let drain = async {
        let mut first_error = None;
        for task in tasks {
            if let Some(stop) = &task.stop {
                stop.cancel();
            }
            if let Ok(Err(error)) = task.handle.await {
                first_error.get_or_insert(error);
            }
        }
        first_error
    };
    let drained = tokio::time::timeout(deadline, drain).await;
    match (failure, drained) {
        (Some(error), _) => Err(error),
        (None, Ok(Some(error))) => Err(error),
        (None, Ok(None)) => Ok(()),
        (None, Err(_)) => {
            tracing::warn!(
                ?deadline,
                "shutdown deadline passed with status still being written; exiting (the next run redoes it)"
            );
            Ok(())
        }
    }
}

async fn bind(addr: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), Error> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| Error::Listen { addr, source })?;
    Ok((listener, bound))
}

fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

/// Fails early, with a message saying what to do, when the CRDs are not installed.
async fn check_crds(client: &Client) -> Result<(), Error> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in [Webhook::crd_name(), DocumentEvent::crd_name()] {
        if crds.get_opt(name).await?.is_none() {
            return Err(Error::CrdMissing {
                crd: name.to_owned(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn spawn<F: Future<Output = ()> + Send + 'static>(name: &'static str, f: F) -> Essential {
        Essential::new(name, tokio::spawn(f), None)
    }

    #[tokio::test]
    async fn a_panicking_task_fails_liveness_stops_the_rest_and_is_the_error() {
        let shutdown = CancellationToken::new();
        let liveness = health::Liveness::default();
        let stop = shutdown.clone();
        let tasks = vec![
            spawn("controller", async { panic!("boom") }),
            spawn("server", async move { stop.cancelled().await }),
        ];
        let result = supervise(
            tasks,
            shutdown.clone(),
            liveness.clone(),
            Duration::from_secs(5),
        )
        .await;
        assert!(
            matches!(&result, Err(Error::TaskEnded { task: "controller", why }) if why.contains("panicked")),
            "{result:?}"
        );
        assert!(shutdown.is_cancelled(), "the others are told to stop");
        assert!(liveness.failure().unwrap().contains("controller"));
    }

    #[tokio::test]
    async fn a_task_that_returns_early_is_an_error_too() {
        let shutdown = CancellationToken::new();
        let liveness = health::Liveness::default();
        let tasks = vec![spawn("watch", async {})];
        let result = supervise(tasks, shutdown, liveness.clone(), Duration::from_secs(5)).await;
        assert!(matches!(
            result,
            Err(Error::TaskEnded { task: "watch", .. })
        ));
        assert!(liveness.failure().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_is_bounded_by_the_deadline() {
        let shutdown = CancellationToken::new();
        let liveness = health::Liveness::default();
        let writer_stop = CancellationToken::new();
        let stop = writer_stop.clone();
        // A writer that never finishes flushing once told to stop.
        let tasks = vec![
            spawn("writer", async move {
                stop.cancelled().await;
                std::future::pending::<()>().await
            })
            .stopped_by(writer_stop.clone()),
        ];
        shutdown.cancel();
        let started = tokio::time::Instant::now();
        let result = supervise(tasks, shutdown, liveness.clone(), Duration::from_secs(20)).await;
        assert!(result.is_ok(), "{result:?}");
        assert!(writer_stop.is_cancelled());
        assert_eq!(started.elapsed(), Duration::from_secs(20));
        assert!(
            liveness.failure().is_none(),
            "a requested stop is not a failure"
        );
    }

    #[tokio::test]
    async fn jetstream_mode_without_a_nats_url_is_refused_at_start_saying_what_to_set() {
        let mut args = RunArgs::for_tests();
        args.ingest_mode = http::IngestMode::JetStream;
        // Nothing listens there: the flag is checked before any connection.
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        let Err(error) = start(config, args, CancellationToken::new()).await else {
            panic!("the operator started without --nats-url");
        };
        assert!(matches!(error, Error::NatsUrlMissing), "{error}");
        assert!(error.to_string().contains("--nats-url"), "{error}");
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
