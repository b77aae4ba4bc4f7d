use clap::{Parser, Subcommand};
use hookrelay::operator::{self, RunArgs};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::{EnvFilter, Layer, fmt, layer::SubscriberExt, util::SubscriberInitExt};

/// A Kubernetes operator that delivers signed webhooks for document events.
#[derive(Parser, Debug)]
#[command(name = "hookrelay", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the operator against the cluster kubectl would use (KUBECONFIG, then in-cluster).
    Run {
        #[command(flatten)]
        args: Box<RunArgs>,
        /// Log format.
        #[arg(long, env = "HOOKRELAY_LOG_FORMAT", value_enum, default_value = "text")]
        log_format: LogFormat,
        /// Log level: error, warn, info, debug or trace, or per-module directives such as
        /// `info,hookrelay::delivery=debug`. Default: `RUST_LOG` when set, else info.
        #[arg(long, env = "HOOKRELAY_LOG_LEVEL", value_parser = parse_log_level)]
        log_level: Option<String>,
    },
    /// Print the CustomResourceDefinitions as YAML, or write one file per CRD into a directory.
    Crds {
        /// Write `<crd name>.yaml` files into this directory instead of printing.
        #[arg(long, value_name = "DIR")]
        dir: Option<std::path::PathBuf>,
    },
    /// Print the OpenAPI document of the versioned REST API (`/api/v1`), as served at
    /// `/api/v1/openapi.json`.
    Openapi,
    /// Print the version.
    Version,
    /// Receive webhooks, check their signatures and print each as a JSON line.
    ///
    /// Checks both signature schemes of every delivery with the Webhook's secret, prints one JSON
    /// line per request and answers 200 when valid, 401 when not. For a first Webhook and for
    /// looking at what a Webhook sends.
    Receive {
        /// Address to listen on (POST anywhere; GET /healthz for probes).
        #[arg(long, default_value = "0.0.0.0:8080")]
        listen_addr: std::net::SocketAddr,
        /// The Webhook's signing secret, as its Secret holds it (`whsec_...` or text).
        #[arg(long, env = "HOOKRELAY_WEBHOOK_SECRET", hide_env_values = true)]
        secret: String,
    },
    /// Send events to hookrelay's ingest API (POST /api/v1/events) with a token from a file.
    ///
    /// For a Job, a CronJob or a sidecar of a producer in the cluster, with the Pod's projected
    /// ServiceAccount token (audience hookrelay), read for each request. Prints the API's answer.
    /// Refusals for lack of room (429, 503) and lost connections are retried after Retry-After;
    /// any other refusal fails at once with the API's problem details.
    Emit {
        /// hookrelay's API, such as http://hookrelay.hookrelay.svc:8080.
        #[arg(long, env = "HOOKRELAY_API_URL")]
        api_url: String,
        /// The namespace whose Webhooks receive the events. Default: the token's ServiceAccount's.
        #[arg(long, env = "HOOKRELAY_NAMESPACE")]
        namespace: Option<String>,
        /// The file holding the bearer token.
        #[arg(
            long,
            env = "HOOKRELAY_TOKEN_FILE",
            default_value = "/var/run/secrets/hookrelay/token"
        )]
        token_file: std::path::PathBuf,
        /// Sent as Idempotency-Key (a single event): a repeat creates nothing twice.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Attempts after the first, for refusals worth retrying.
        #[arg(long, default_value_t = 5)]
        retries: u32,
        /// How long each request may take, in seconds.
        #[arg(long, default_value_t = 10)]
        timeout_seconds: u64,
        /// PEM CA certificates of an https API (the chart's tls.* certificate).
        #[arg(long, value_name = "FILE")]
        ca_file: Option<std::path::PathBuf>,
        /// One event, {"event":"document.completed","data":{...}}, or an array; - reads stdin.
        #[arg(value_name = "JSON")]
        events: String,
    },
    /// GET URLs and fail unless every answer is 2xx (a health check).
    ///
    /// Over plain http only. The chart's `helm test` runs it, and it is a health check for the
    /// image, which has no shell or curl.
    Check {
        /// Such as http://hookrelay.hookrelay.svc:9090/readyz.
        #[arg(required = true, value_name = "URL")]
        urls: Vec<String>,
        /// How long each request may take, in seconds.
        #[arg(long, default_value_t = 5)]
        timeout_seconds: u64,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> anyhow::Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    // SAFETY: nothing else runs yet; the runtimes start below.
    let renamed = unsafe { operator::adopt_renamed_flags(&argv) };
    match Cli::parse().command {
        Command::Run {
            args,
            log_format,
            log_level,
        } => {
            let runtime = tokio::runtime::Runtime::new()?;
            // OpenTelemetry's batch exporter is a task of the runtime.
            let traces = {
                let _runtime = runtime.enter();
                hookrelay::telemetry::provider().map_err(anyhow::Error::msg)?
            };
            init_tracing(log_format, log_level, traces.as_ref());
            for warning in renamed {
                tracing::warn!("{warning}");
            }
            let result = runtime.block_on(run(*args));
            if let Some(traces) = traces {
                // The last spans are sent before the process exits (bounded: a dead collector
                // does not hold the exit up).
                runtime.block_on(async {
                    let flush = tokio::task::spawn_blocking(move || traces.shutdown());
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), flush).await;
                });
            }
            // Tasks still running (a blocking DNS lookup, a patch past the deadline) must not
            // keep the process alive: the shutdown deadline was the wait.
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            result
        }
        Command::Crds { dir: None } => {
            print!("{}", hookrelay::crd::crds_yaml());
            Ok(())
        }
        Command::Crds { dir: Some(dir) } => {
            std::fs::create_dir_all(&dir)?;
            for (name, yaml) in hookrelay::crd::crd_files() {
                std::fs::write(dir.join(name), yaml)?;
            }
            Ok(())
        }
        Command::Openapi => {
            println!("{}", hookrelay::http::v1::openapi_json());
            Ok(())
        }
        Command::Version => {
            println!(
                "hookrelay {} (commit {}, built {})",
                env!("CARGO_PKG_VERSION"),
                hookrelay::metrics::BUILD_COMMIT.unwrap_or("unknown"),
                hookrelay::metrics::BUILD_DATE.unwrap_or("unknown")
            );
            Ok(())
        }
        Command::Receive {
            listen_addr,
            secret,
        } => {
            let signer = hookrelay::wire::Signer::new(secret.as_bytes(), None)
                .map_err(|e| anyhow::anyhow!("--secret: {e}"))?;
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async {
                let listener = tokio::net::TcpListener::bind(listen_addr).await?;
                eprintln!("receiving on {listen_addr}: one JSON line per request");
                let shutdown = CancellationToken::new();
                tokio::spawn(shutdown_on_signal(shutdown.clone()));
                hookrelay::receiver::serve(listener, signer, shutdown).await?;
                Ok(())
            })
        }
        Command::Emit {
            api_url,
            namespace,
            token_file,
            idempotency_key,
            retries,
            timeout_seconds,
            ca_file,
            events,
        } => {
            let body = if events == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                events
            };
            let emit = hookrelay::emit::Emit {
                api_url,
                namespace,
                token_file,
                idempotency_key,
                body,
                retries,
                timeout: std::time::Duration::from_secs(timeout_seconds),
                ca_file,
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let accepted = runtime.block_on(hookrelay::emit::emit(&emit))?;
            println!("{accepted}");
            Ok(())
        }
        Command::Check {
            urls,
            timeout_seconds,
        } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(check(urls, std::time::Duration::from_secs(timeout_seconds)))
        }
    }
}

/// `hookrelay check`: one line per URL, and an error naming the ones that failed.
async fn check(urls: Vec<String>, timeout: std::time::Duration) -> anyhow::Result<()> {
    // The TLS stack wants a provider even for http.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let mut failed = Vec::new();
    for url in urls {
        match client.get(&url).send().await {
            Ok(reply) if reply.status().is_success() => println!("{url}: {}", reply.status()),
            Ok(reply) => {
                println!("{url}: {}", reply.status());
                failed.push(url);
            }
            Err(e) => {
                println!("{url}: {e}");
                failed.push(url);
            }
        }
    }
    anyhow::ensure!(
        failed.is_empty(),
        "not answered with 2xx: {}",
        failed.join(", ")
    );
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = kube::Config::infer().await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(shutdown_on_signal(shutdown.clone()));
    operator::run(config, args, shutdown).await?;
    tracing::info!("stopped");
    Ok(())
}

/// One shutdown signal shared by every task: the first SIGTERM or Ctrl-C.
async fn shutdown_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}

/// `--log-level`: tracing's filter directives, refused with the parser's reason.
fn parse_log_level(directives: &str) -> Result<String, String> {
    EnvFilter::try_new(directives)
        .map(|_| directives.to_owned())
        .map_err(|e| format!("not a log level or filter: {e}"))
}

fn init_tracing(
    format: LogFormat,
    level: Option<String>,
    traces: Option<&opentelemetry_sdk::trace::SdkTracerProvider>,
) {
    let filter = hookrelay::telemetry::log_filter(match level {
        Some(directives) => EnvFilter::new(directives),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    });
    // Colours only for a person at a terminal, never in files or pipes that are grepped.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let logs = match format {
        LogFormat::Text => fmt::layer().with_ansi(ansi).boxed(),
        LogFormat::Json => fmt::layer().json().with_ansi(ansi).boxed(),
    };
    tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(traces.map(hookrelay::telemetry::layer))
        .init();
}
