//! Attempts being sent right now, per Webhook: what the API shows as `in_flight`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use crate::keys::WebhookKey;

/// Counts of attempts in flight per Webhook, on this replica. Only Webhooks with an attempt in
/// flight have an entry, so the map is bounded by what is being sent.
#[derive(Clone, Debug, Default)]
pub struct InFlight(Arc<Mutex<HashMap<WebhookKey, usize>>>);

impl InFlight {
    /// Counts one attempt to `webhook` until the guard is dropped: when the attempt ends,
    /// times out, or the future sending it is cancelled.
    pub fn start(&self, webhook: &WebhookKey) -> InFlightGuard {
        *self.lock().entry(webhook.clone()).or_default() += 1;
        InFlightGuard {
            counts: self.clone(),
            webhook: webhook.clone(),
        }
    }

    /// Attempts to `webhook` being sent now.
    pub fn get(&self, webhook: &WebhookKey) -> usize {
        self.lock().get(webhook).copied().unwrap_or(0)
    }

    /// Webhooks with an attempt in flight.
    pub fn webhooks(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<WebhookKey, usize>> {
        // A panic while the lock is held cannot leave a count half-changed.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One attempt in flight; dropping it ends it.
#[derive(Debug)]
pub struct InFlightGuard {
    counts: InFlight,
    webhook: WebhookKey,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut counts = self.counts.lock();
        if let Some(n) = counts.get_mut(&self.webhook) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.webhook);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_webhook_and_back_to_zero() {
        let in_flight = InFlight::default();
        let (a, b) = (WebhookKey::new("ns", "a"), WebhookKey::new("ns", "b"));
        let first = in_flight.start(&a);
        let second = in_flight.start(&a);
        let other = in_flight.start(&b);
        assert_eq!((in_flight.get(&a), in_flight.get(&b)), (2, 1));
        drop(first);
        assert_eq!(in_flight.get(&a), 1);
        drop((second, other));
        assert_eq!((in_flight.get(&a), in_flight.get(&b)), (0, 0));
        // No entry is left behind for Webhooks with nothing in flight.
        assert_eq!(in_flight.webhooks(), 0);
    }

    #[tokio::test]
    async fn a_cancelled_or_timed_out_attempt_is_no_longer_in_flight() {
        let in_flight = InFlight::default();
        let key = WebhookKey::new("ns", "slow");
        let (started, started_rx) = tokio::sync::oneshot::channel();
        let sending = {
            let (in_flight, key) = (in_flight.clone(), key.clone());
            async move {
                let _attempt = in_flight.start(&key);
                let _ = started.send(());
                std::future::pending::<()>().await;
            }
        };
        let task = tokio::spawn(sending);
        started_rx.await.unwrap();
        assert_eq!(in_flight.get(&key), 1);
        task.abort();
        let _ = task.await;
        assert_eq!(in_flight.get(&key), 0);

        // A timeout drops the attempt's future the same way.
        let timed_out = tokio::time::timeout(std::time::Duration::from_millis(10), async {
            let _attempt = in_flight.start(&key);
            std::future::pending::<()>().await;
        })
        .await;
        assert!(timed_out.is_err());
        assert_eq!(in_flight.get(&key), 0);
    }
}
