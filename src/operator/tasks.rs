//! The long-running tasks `start` spawns that are the operator's own: leader election, the
//! leadership gauge, and the leader's runs (DocumentEvent delivery, the JetStream serial lane),
//! one per term of leadership.

use std::{sync::Arc, time::Duration};

use kube::Client;
use tokio_util::sync::CancellationToken;

use super::RunArgs;
use crate::{
    controller::{DocumentEventController, Scope},
    delivery::{Dispatcher, jetstream},
    health,
    leader::{self, ElectionConfig, LeaderTerms, Leadership},
};

/// The election task and the token that stops it (releasing the Lease).
pub(super) fn start_election(
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
pub(super) async fn publish_leadership(
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
pub(super) async fn deliver_document_events(
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
pub(super) async fn serial_lane(
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
