//! The one status writer. Reconcilers and (later) the delivery engine send what changed; the
//! writer coalesces it per object, patches each object at most once per `min_interval`, with a
//! timeout on every patch and a bounded number in flight, and records a Kubernetes Event when a
//! condition flips. Status is written with server-side apply, one field manager per owner of a
//! part of the status, so the parts never overwrite each other.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{StreamExt, stream::FuturesUnordered};
use k8s_openapi::{api::core::v1::ObjectReference, apimachinery::pkg::apis::meta::v1::Condition};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use serde_json::json;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::{
    metrics::{Metrics, ObjectKind, PatchResult, StatusPatchLabels},
    routing::WebhookKey,
};

/// Field manager of the conditions the Webhook controller decides.
pub const CONTROLLER_MANAGER: &str = "hookrelay-controller";

/// A Kubernetes Event to record once the patch that carries it has landed.
#[derive(Clone, Debug, PartialEq)]
pub struct TransitionEvent {
    pub warning: bool,
    pub reason: String,
    pub note: String,
    pub object: ObjectReference,
}

/// The `Ready` condition of a Webhook as the controller decided it.
#[derive(Clone, Debug, PartialEq)]
pub struct ReadyUpdate {
    pub generation: i64,
    pub condition: Condition,
    pub event: Option<TransitionEvent>,
}

/// What a status writer is told.
#[derive(Debug)]
pub enum Update {
    WebhookReady {
        key: WebhookKey,
        update: ReadyUpdate,
    },
}

/// The sending side, cloned by every producer. A full channel makes producers wait, which is the
/// back-pressure we want: status is never dropped.
#[derive(Clone, Debug)]
pub struct StatusSender {
    tx: mpsc::Sender<Update>,
}

impl StatusSender {
    pub async fn send(&self, update: Update) {
        if self.tx.send(update).await.is_err() {
            tracing::debug!("status writer stopped; update dropped at shutdown");
        }
    }
}

#[derive(Clone, Debug)]
pub struct WriterConfig {
    /// At most one patch per object per this interval.
    pub min_interval: Duration,
    /// Time allowed for one patch.
    pub patch_timeout: Duration,
    /// Patches in flight at once.
    pub max_in_flight: usize,
}

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            min_interval: Duration::from_secs(1),
            patch_timeout: Duration::from_secs(10),
            max_in_flight: 32,
        }
    }
}

/// Pending status of one Webhook.
#[derive(Default)]
struct Slot {
    ready: Option<ReadyUpdate>,
    last_patch: Option<Instant>,
    not_before: Option<Instant>,
    in_flight: bool,
    failures: u32,
}

impl Slot {
    fn is_due(&self, now: Instant, min_interval: Duration) -> bool {
        !self.in_flight
            && self.ready.is_some()
            && self.not_before.is_none_or(|t| now >= t)
            && self.last_patch.is_none_or(|t| now >= t + min_interval)
    }
}

pub struct StatusWriter {
    client: Client,
    metrics: Metrics,
    recorder: Recorder,
    /// Bounds the Kubernetes Events being recorded at once.
    events: Arc<Semaphore>,
    rx: mpsc::Receiver<Update>,
    config: WriterConfig,
    slots: HashMap<WebhookKey, Slot>,
}

type PatchOutcome = (WebhookKey, ReadyUpdate, Result<(), kube::Error>);

/// A writer and the sender that feeds it; `capacity` bounds the channel.
pub fn channel(
    client: Client,
    metrics: Metrics,
    config: WriterConfig,
    capacity: usize,
) -> (StatusSender, StatusWriter) {
    let (tx, rx) = mpsc::channel(capacity);
    let reporter = Reporter {
        controller: "hookrelay".into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let recorder = Recorder::new(client.clone(), reporter);
    (
        StatusSender { tx },
        StatusWriter {
            client,
            metrics,
            recorder,
            events: Arc::new(Semaphore::new(8)),
            rx,
            config,
            slots: HashMap::new(),
        },
    )
}

impl StatusWriter {
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut in_flight = FuturesUnordered::new();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let touched = tokio::select! {
                _ = shutdown.cancelled() => break,
                update = self.rx.recv() => match update {
                    Some(update) => Some(self.merge(update)),
                    None => break,
                },
                Some(done) = in_flight.next() => {
                    self.finish(done);
                    None
                }
                _ = tick.tick() => {
                    // Everything rate-limited or retried earlier starts from here.
                    let now = Instant::now();
                    self.forget_idle(now);
                    let room = self.config.max_in_flight.saturating_sub(in_flight.len());
                    let due: Vec<WebhookKey> = self
                        .slots
                        .iter()
                        .filter(|(_, s)| s.is_due(now, self.config.min_interval))
                        .map(|(k, _)| k.clone())
                        .take(room)
                        .collect();
                    in_flight.extend(due.into_iter().map(|key| self.start(key, now)));
                    None
                }
            };
            // A new update for an object not written lately goes out at once.
            let now = Instant::now();
            if let Some(key) = touched
                && in_flight.len() < self.config.max_in_flight
                && self
                    .slots
                    .get(&key)
                    .is_some_and(|s| s.is_due(now, self.config.min_interval))
            {
                in_flight.push(self.start(key, now));
            }
        }
        // Let patches already sent finish, within their timeout.
        while let Some(done) = in_flight.next().await {
            self.finish(done);
        }
    }

    /// Takes the pending content of `key` into a patch.
    fn start(
        &mut self,
        key: WebhookKey,
        now: Instant,
    ) -> impl Future<Output = PatchOutcome> + use<> {
        let slot = self.slots.get_mut(&key).expect("started keys exist");
        let update = slot.ready.take().expect("started slots have content");
        slot.in_flight = true;
        slot.last_patch = Some(now);
        patch_ready(
            self.client.clone(),
            self.recorder.clone(),
            self.events.clone(),
            self.config.patch_timeout,
            key,
            update,
        )
    }

    /// Merges `update` into the pending content of its object, returning the object's key.
    fn merge(&mut self, update: Update) -> WebhookKey {
        match update {
            Update::WebhookReady { key, update } => {
                let slot = self.slots.entry(key.clone()).or_default();
                // The latest decision wins, but an event not yet recorded is kept.
                let event = update
                    .event
                    .clone()
                    .or_else(|| slot.ready.take().and_then(|u| u.event));
                slot.ready = Some(ReadyUpdate { event, ..update });
                key
            }
        }
    }

    fn finish(&mut self, (key, update, result): PatchOutcome) {
        let result_label = if result.is_ok() {
            PatchResult::Ok
        } else {
            PatchResult::Error
        };
        self.metrics
            .status_patches
            .get_or_create(&StatusPatchLabels {
                kind: ObjectKind::Webhook,
                result: result_label,
            })
            .inc();
        let Some(slot) = self.slots.get_mut(&key) else {
            return;
        };
        slot.in_flight = false;
        match result {
            Ok(()) => {
                slot.failures = 0;
                slot.not_before = None;
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {
                tracing::debug!(webhook = %key, "gone before its status was written");
            }
            Err(error) => {
                slot.failures += 1;
                let backoff = Duration::from_millis(200 * 2u64.pow(slot.failures.min(7)));
                tracing::warn!(webhook = %key, %error, ?backoff, "status patch failed; retrying");
                slot.not_before = Some(Instant::now() + backoff);
                if slot.ready.is_none() {
                    slot.ready = Some(update);
                }
            }
        }
    }

    /// Forgets objects with nothing pending once their rate limit has passed, keeping the map
    /// as small as the set of recently written objects.
    fn forget_idle(&mut self, now: Instant) {
        let min_interval = self.config.min_interval;
        self.slots.retain(|_, s| {
            s.in_flight || s.ready.is_some() || s.last_patch.is_some_and(|t| now < t + min_interval)
        });
    }
}

async fn patch_ready(
    client: Client,
    recorder: Recorder,
    events: Arc<Semaphore>,
    timeout: Duration,
    key: WebhookKey,
    update: ReadyUpdate,
) -> PatchOutcome {
    let api: Api<crate::crd::Webhook> = Api::namespaced(client, &key.namespace);
    let body = json!({
        "apiVersion": "hookrelay.dev/v1alpha1",
        "kind": "Webhook",
        "status": {
            "observedGeneration": update.generation,
            "conditions": [update.condition],
        }
    });
    tracing::debug!(webhook = %key, reason = %update.condition.reason, "patching status");
    let params = PatchParams::apply(CONTROLLER_MANAGER).force();
    let result = match tokio::time::timeout(
        timeout,
        api.patch_status(&key.name, &params, &Patch::Apply(&body)),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(kube::Error::Service(
            format!("status patch timed out after {timeout:?}").into(),
        )),
    };
    if let (Ok(()), Some(event)) = (&result, &update.event) {
        let ev = Event {
            type_: if event.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: event.reason.clone(),
            note: Some(event.note.clone()),
            action: "Reconcile".into(),
            secondary: None,
        };
        // Events are informational: recorded beside the status patches, bounded, never waited on.
        let (object, name) = (event.object.clone(), key.to_string());
        tokio::spawn(async move {
            let Ok(_permit) = events.acquire_owned().await else {
                return;
            };
            if let Err(error) = recorder.publish(&ev, &object).await {
                tracing::warn!(webhook = %name, %error, "recording the Kubernetes Event failed");
            }
        });
    }
    (key, update, result)
}
