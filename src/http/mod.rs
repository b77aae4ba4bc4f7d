//! HTTP surfaces: health and metrics on the metrics port (the REST API and ingest come later on
//! the listen port).

mod health;

pub use health::{Readiness, metrics_router};

use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;

/// Serves `router` on `addr` until `shutdown` fires.
pub async fn serve(
    addr: SocketAddr,
    router: axum::Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "listening");
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
