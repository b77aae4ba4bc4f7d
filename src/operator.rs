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
    delivery::{Dispatcher, DispatcherConfig, EgressPolicy, HttpSender},
    http,
    metrics::Metrics,
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
    /// `direct`: dispatch them from memory (lowest latency, at-most-once across a restart).
    #[arg(
        long,
        env = "HOOKRELAY_INGEST_MODE",
        value_enum,
        default_value = "durable"
    )]
    pub ingest_mode: http::IngestMode,

    /// Deliveries direct ingest may hold before it answers 429.
    #[arg(long, env = "HOOKRELAY_DIRECT_QUEUE", default_value_t = 10_000)]
    pub direct_queue: usize,

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

    /// Delete delivered DocumentEvents this long after completion; 0 keeps them.
    #[arg(long, env = "HOOKRELAY_EVENT_RETENTION", default_value = "10m", value_parser = humantime::parse_duration)]
    pub event_retention: Duration,

    /// Delete DocumentEvents whose delivery failed this long after completion; 0 keeps them.
    #[arg(long, env = "HOOKRELAY_FAILED_EVENT_RETENTION", default_value = "24h", value_parser = humantime::parse_duration)]
    pub failed_event_retention: Duration,

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

    /// TokenReviews and SubjectAccessReviews in flight at once; a caller that finds no slot
    /// within half a second gets 503 with Retry-After.
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
}

impl RunArgs {
    /// The defaults, with the metrics server on an ephemeral loopback port (for tests).
    pub fn for_tests() -> Self {
        Self {
            listen_addr: "127.0.0.1:0".parse().expect("a valid address"),
            ingest_mode: http::IngestMode::Durable,
            direct_queue: 10_000,
            disable_auth: false,
            metrics_addr: "127.0.0.1:0".parse().expect("a valid address"),
            namespaces: Vec::new(),
            allow_http: false,
            allow_cidrs: Vec::new(),
            event_retention: Duration::from_secs(600),
            failed_event_retention: Duration::from_secs(86400),
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_connections: 1024,
            max_concurrent_reviews: 16,
            token_audience: "hookrelay".into(),
            tls_cert_file: None,
            tls_key_file: None,
        }
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
}

/// What a running operator shares with its callers (the binary, in-process tests).
#[derive(Clone)]
pub struct Operator {
    pub routes: Routes,
    pub readiness: http::Readiness,
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
    let metrics = Metrics::default();
    let client = metrics.instrumented_client(config)?;
    check_crds(&client).await?;
    let readiness = http::Readiness::new(&["secrets", "webhooks", "documentevents"]);
    let routes = Routes::default();
    let scope = Scope::new(&args.namespaces);
    let egress = EgressPolicy::new(args.allow_http, args.allow_cidrs.clone());

    let tls = match (&args.tls_cert_file, &args.tls_key_file) {
        (Some(cert), Some(key)) => {
            Some(http::Tls::load(cert, key, shutdown.clone()).map_err(Error::Tls)?)
        }
        (None, None) => None,
        _ => {
            return Err(Error::Tls(
                "give both --tls-cert-file and --tls-key-file, or neither".into(),
            ));
        }
    };
    let (metrics_listener, metrics_addr) = bind(args.metrics_addr).await?;
    let (api_listener, listen_addr) = bind(args.listen_addr).await?;

    let (status, writer) = status::channel(
        client.clone(),
        metrics.clone(),
        WriterConfig::default(),
        4096,
    );
    let (gone_tx, gone_rx) = mpsc::unbounded_channel();
    let dispatcher = Arc::new(Dispatcher::new(
        HttpSender::new(egress.clone()),
        status.clone(),
        gone_tx,
        metrics.clone(),
        DispatcherConfig::default(),
    ));
    let auth = if args.disable_auth {
        tracing::warn!(
            "AUTHENTICATION IS DISABLED (--disable-auth): anyone who reaches {listen_addr} can manage webhooks and send events. Development only."
        );
        http::Authorizer::disabled()
    } else {
        http::Authorizer::kubernetes(
            client.clone(),
            http::AuthSettings {
                audience: Some(args.token_audience.clone()),
                max_concurrent_reviews: args.max_concurrent_reviews,
            },
        )
    }
    .watching(&args.namespaces);
    if tls.is_none() {
        tracing::info!(
            "the API on {listen_addr} is plain HTTP (development, or behind a TLS-terminating proxy); give --tls-cert-file and --tls-key-file to serve HTTPS"
        );
    }
    if args.token_audience.is_empty() && !args.disable_auth {
        tracing::warn!(
            "--token-audience is empty: tokens for the Kubernetes API itself are accepted, so a token sent to hookrelay can also be used against the API server"
        );
    }
    let api_state = Arc::new(http::ApiState {
        client: client.clone(),
        auth: auth.clone(),
        routes: routes.clone(),
        dispatcher: dispatcher.clone(),
        ingest_mode: args.ingest_mode,
        direct_queue: Arc::new(tokio::sync::Semaphore::new(args.direct_queue)),
        direct_capacity: args.direct_queue,
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
    );
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
    );

    // The writer stops last, after the producers, so that what they sent is written.
    let writer_stop = CancellationToken::new();
    let writer = tokio::spawn(writer.run(writer_stop.clone()));
    let routes_synced = {
        let readiness = readiness.clone();
        async move { readiness.synced("webhooks").await }
    };
    let webhooks = tokio::spawn(webhooks.run(client, scope.clone(), gone_rx, shutdown.clone()));
    let events = tokio::spawn(events.run(scope, routes_synced, shutdown.clone()));
    let metrics_server = tokio::spawn(http::serve(
        metrics_listener,
        http::metrics_router(readiness.clone(), metrics.clone()),
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
        readiness,
        metrics,
        metrics_addr,
        listen_addr,
        auth,
    };
    let task = async move {
        let served = [metrics_server.await, api_server.await];
        let _ = events.await;
        let _ = webhooks.await;
        writer_stop.cancel();
        let _ = writer.await;
        for (result, addr) in served.into_iter().zip([metrics_addr, listen_addr]) {
            if let Ok(Err(source)) = result {
                return Err(Error::Listen { addr, source });
            }
        }
        Ok(())
    };
    Ok((operator, task))
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
