//! The dispatcher: one attempt at a time per call, with per-webhook concurrency limits (so one
//! slow or dead endpoint only ever occupies its own slots), a global limit, signing at send
//! time, and every attempt recorded in the Webhook's status.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use sha2::{Digest, Sha256};
use tokio::sync::{Semaphore, mpsc};

use super::{Attempt, AttemptResult, EventBody, HttpSender, RetryPolicy, Verdict};
use crate::{
    crd::{DeliveryRecord, Outcome},
    metrics::{DeliveryLabels, Metrics},
    routing::{Route, RouteState, WebhookKey},
    status::{StatusSender, Update, truncate_error},
};

/// Tells the Webhook controller that an endpoint answered 410 Gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoneNotice {
    pub webhook: WebhookKey,
    pub generation: i64,
    pub message: String,
}

/// What to deliver to which Webhook.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub webhook: WebhookKey,
    /// Stable across retries: receivers deduplicate on it.
    pub id: String,
    pub event: Arc<EventBody>,
    /// Where the event came from (a DocumentEvent's name, `ingest`, `test`), for the history.
    pub source: String,
}

/// The delivery id of an event for a webhook: the same on every retry and after restarts,
/// different for other events or webhooks.
pub fn delivery_id(event_uid: &str, webhook_uid: &str) -> String {
    let digest = Sha256::new()
        .chain_update(event_uid)
        .chain_update(b"/")
        .chain_update(webhook_uid)
        .finalize();
    format!("msg_{}", &hex::encode(digest)[..32])
}

/// How an attempt ended.
#[derive(Clone, Debug, PartialEq)]
pub struct AttemptReport {
    pub verdict: Verdict,
    pub http_status: Option<i32>,
    pub error: Option<String>,
    pub time: Time,
    pub duration: Duration,
}

#[derive(Clone, Debug)]
pub struct DispatcherConfig {
    /// Attempts in flight to one webhook at once.
    pub per_webhook: usize,
    /// Attempts in flight in all.
    pub global: usize,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        Self {
            per_webhook: 8,
            global: 512,
        }
    }
}

pub struct Dispatcher {
    sender: HttpSender,
    status: StatusSender,
    gone: mpsc::UnboundedSender<GoneNotice>,
    metrics: Metrics,
    config: DispatcherConfig,
    global: Arc<Semaphore>,
    lanes: Mutex<HashMap<WebhookKey, Arc<Semaphore>>>,
}

impl Dispatcher {
    pub fn new(
        sender: HttpSender,
        status: StatusSender,
        gone: mpsc::UnboundedSender<GoneNotice>,
        metrics: Metrics,
        config: DispatcherConfig,
    ) -> Self {
        let global = Arc::new(Semaphore::new(config.global));
        Self {
            sender,
            status,
            gone,
            metrics,
            config,
            global,
            lanes: Mutex::new(HashMap::new()),
        }
    }

    fn lane(&self, webhook: &WebhookKey) -> Arc<Semaphore> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        lanes
            .entry(webhook.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(self.config.per_webhook)))
            .clone()
    }

    /// Makes attempt number `attempt` (1-based) of `delivery` to `route`, and records it.
    pub async fn attempt(&self, route: &Route, delivery: &Delivery, attempt: u32) -> AttemptReport {
        let lane = self.lane(&route.key);
        let lane_permit = lane.acquire_owned().await.expect("lanes are never closed");
        let global_permit = self
            .global
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        let now = Timestamp::now();
        let (result, duration) = match (&route.state, &route.signer) {
            (RouteState::Blocked { reason, message }, _) => {
                let message = format!("not sent: webhook not ready ({reason}): {message}");
                (
                    AttemptResult::Error {
                        message,
                        permanent: false,
                    },
                    Duration::ZERO,
                )
            }
            (_, None) => {
                let message = "not sent: no signing secret".to_owned();
                (
                    AttemptResult::Error {
                        message,
                        permanent: false,
                    },
                    Duration::ZERO,
                )
            }
            (_, Some(signer)) => {
                let signatures = signer.sign(&delivery.id, now.as_second(), &delivery.event.body);
                let attempt = Attempt {
                    url: &route.url,
                    event: delivery.event.event.as_str(),
                    delivery_id: &delivery.id,
                    timestamp: now.as_second(),
                    signatures,
                    body: delivery.event.body.clone(), // a reference count, not a copy
                    timeout: Duration::from_secs(route.delivery.timeout_seconds.max(1) as u64),
                };
                self.sender.send(attempt).await
            }
        };
        // The slots are for talking to the endpoint, not for recording what it said.
        drop((lane_permit, global_permit));
        let policy = RetryPolicy::from(&route.delivery);
        let verdict = policy.verdict(attempt, &result, rand::random());
        let (http_status, error) = match &result {
            AttemptResult::Status { code, .. } if (200..300).contains(code) => {
                (Some(*code as i32), None)
            }
            AttemptResult::Status { code, .. } => {
                (Some(*code as i32), Some(format!("HTTP {code}")))
            }
            AttemptResult::Error { message, .. } => {
                let mut message = message.clone();
                truncate_error(&mut message);
                (None, Some(message))
            }
        };
        let outcome = match verdict {
            Verdict::Succeeded => Outcome::Succeeded,
            Verdict::Retry(_) => Outcome::Retrying,
            Verdict::Failed | Verdict::Gone => Outcome::Failed,
        };
        self.metrics
            .observe_delivery(DeliveryLabels::new(outcome, http_status), duration);
        let record = DeliveryRecord {
            id: delivery.id.clone(),
            event: delivery.event.event.to_string(),
            source: delivery.source.clone(),
            attempt: attempt as i32,
            outcome,
            http_status,
            duration_ms: duration.as_millis() as i64,
            time: Time(now),
            error: error.clone(),
        };
        self.status
            .send(Update::DeliveryAttempt {
                key: route.key.clone(),
                uid: route.uid.clone(),
                record: Box::new(record),
            })
            .await;
        if verdict == Verdict::Gone {
            let _ = self.gone.send(GoneNotice {
                webhook: route.key.clone(),
                generation: route.generation,
                message: format!(
                    "{} answered 410 Gone: deliveries stopped until the spec changes",
                    route.url
                ),
            });
        }
        AttemptReport {
            verdict,
            http_status,
            error,
            time: Time(now),
            duration,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_ids_are_stable_per_event_and_webhook() {
        let a = delivery_id("event-1", "webhook-1");
        assert_eq!(a, delivery_id("event-1", "webhook-1"));
        assert_ne!(a, delivery_id("event-2", "webhook-1"));
        assert_ne!(a, delivery_id("event-1", "webhook-2"));
        assert!(a.starts_with("msg_") && a.len() == 36, "{a}");
    }
}
