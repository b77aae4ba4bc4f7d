//! Whether this replica's view of the Webhooks can be trusted.
//!
//! A watch that has stopped bringing changes looks exactly like one with nothing to bring, so
//! the API server is asked directly: a consistent read of one Webhook per watched scope, every
//! quarter of `--view-stale-after`. When none has been answered for that long (this replica is
//! cut off from the API server, or it is down), the view is marked stale ([`ViewHealth`]):
//! `/readyz` says so, `hookrelay_routing_view_stale` is 1, and the JetStream consumers hand
//! shared work back for other replicas, until an answer comes again. Correctness does not rest
//! on this (work carries the version that routed it, see `RoutingTable::find`); it keeps a
//! replica that cannot know from holding work that others can do.

use std::time::{Duration, Instant};

use kube::{Api, Client, api::ListParams};

/// One object's metadata, read from etcd (not the watch cache): what a probe needs.
static PROBE: std::sync::LazyLock<ListParams> =
    std::sync::LazyLock::new(|| ListParams::default().limit(1));
use tokio_util::sync::CancellationToken;

use super::Scope;
use crate::{crd::Webhook, health::ViewHealth, metrics::Metrics};

/// Asks the API server until `shutdown`, keeping `view` (and its gauge) up to date.
pub async fn watch_view(
    client: Client,
    scope: Scope,
    view: ViewHealth,
    metrics: Metrics,
    stale_after: Duration,
    shutdown: CancellationToken,
) {
    let every = (stale_after / 4).max(Duration::from_millis(250));
    let apis: Vec<Api<Webhook>> = scope
        .coverage()
        .into_iter()
        .map(|namespace| match namespace {
            Some(namespace) => Api::namespaced(client.clone(), &namespace),
            None => Api::all(client.clone()),
        })
        .collect();
    let mut last_answer = Instant::now();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let probes = apis.iter().map(|api| async move {
            let list = api.list_metadata(&PROBE);
            matches!(tokio::time::timeout(every, list).await, Ok(Ok(_)))
        });
        let answered = futures::future::join_all(probes)
            .await
            .into_iter()
            .all(|ok| ok);
        let now = Instant::now();
        if answered {
            last_answer = now;
        }
        let silent = now.duration_since(last_answer);
        match decide(view.stale().is_some(), silent, stale_after) {
            Change::None => {}
            Change::Fresh => {
                tracing::info!("the API server answers again: taking shared work again");
                view.set_stale(None);
                metrics.routing_view_stale.set(0);
            }
            Change::Stale => {
                let why = format!(
                    "the API server has not answered for {}s: this replica's view of the Webhooks may be stale",
                    silent.as_secs()
                );
                tracing::warn!(%why, "not ready; shared work is left to other replicas");
                view.set_stale(Some(why));
                metrics.routing_view_stale.set(1);
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Change {
    None,
    Fresh,
    Stale,
}

/// The pure core: given whether the view is stale now and how long the API server has been
/// silent, what changes.
fn decide(stale: bool, silent: Duration, stale_after: Duration) -> Change {
    match (stale, silent >= stale_after) {
        (true, false) => Change::Fresh,
        (false, true) => Change::Stale,
        _ => Change::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_view_goes_stale_only_after_the_whole_silence_and_fresh_at_the_first_answer() {
        let limit = Duration::from_secs(10);
        let cases = [
            (false, Duration::ZERO, Change::None),
            (false, Duration::from_millis(9_999), Change::None),
            (false, limit, Change::Stale),
            (true, Duration::from_secs(60), Change::None),
            (true, Duration::ZERO, Change::Fresh),
        ];
        for (stale, silent, expected) in cases {
            assert_eq!(decide(stale, silent, limit), expected, "{stale} {silent:?}");
        }
    }
}
