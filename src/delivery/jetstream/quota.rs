//! Each namespace's share of the stream: the bytes its events take there (the event and one
//! work item per Webhook that takes its type), counted by this replica over the stream's age
//! limit, so that one tenant cannot take the disk every other tenant's events need. Parked
//! copies do not add up (a superseded copy is deleted: see `park::forget_copy`), and held or
//! retried work keeps the bytes its event was counted for until the stream ages it out.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// The age limit is counted in this many steps: bytes leave the count a step at a time.
const STEPS: u32 = 64;

/// Bytes each namespace published over the last `window`, in [`STEPS`] steps.
#[derive(Debug)]
pub struct NamespaceShares {
    /// Bytes one namespace may have in the window; 0: no limit.
    limit: u64,
    step: Duration,
    start: Instant,
    namespaces: Mutex<HashMap<Arc<str>, Steps>>,
}

#[derive(Debug, Default)]
struct Steps {
    /// (step number, bytes published in it), oldest first.
    bytes: VecDeque<(u64, u64)>,
    total: u64,
}

impl Steps {
    fn forget_before(&mut self, oldest: u64) {
        while let Some(&(step, bytes)) = self.bytes.front() {
            if step >= oldest {
                break;
            }
            self.total -= bytes;
            self.bytes.pop_front();
        }
    }
}

/// Why a namespace may not publish more now, and when some of its share frees.
#[derive(Debug, PartialEq, Eq)]
pub struct OverShare {
    pub message: String,
    pub retry_after: Duration,
}

impl NamespaceShares {
    /// `limit` bytes per namespace (0: none) over `window`, the stream's age limit.
    pub fn new(limit: u64, window: Duration) -> Self {
        Self {
            limit,
            step: (window / STEPS).max(Duration::from_secs(1)),
            start: Instant::now(),
            namespaces: Mutex::default(),
        }
    }

    fn step_at(&self, now: Instant) -> u64 {
        (now.duration_since(self.start).as_millis() / self.step.as_millis().max(1)) as u64
    }

    /// Counts `bytes` for `namespace` if they fit in its share; otherwise says why not and
    /// counts nothing.
    pub fn take(&self, namespace: &str, bytes: u64) -> Result<(), OverShare> {
        self.take_at(namespace, bytes, Instant::now())
    }

    fn take_at(&self, namespace: &str, bytes: u64, now: Instant) -> Result<(), OverShare> {
        if self.limit == 0 {
            return Ok(());
        }
        let step = self.step_at(now);
        let oldest = (step + 1).saturating_sub(u64::from(STEPS));
        let mut namespaces = self.namespaces.lock().unwrap_or_else(|e| e.into_inner());
        namespaces.retain(|_, steps| {
            steps.forget_before(oldest);
            steps.total > 0
        });
        let steps = namespaces.entry(namespace.into()).or_default();
        if steps.total.saturating_add(bytes) > self.limit {
            let frees_at = steps
                .bytes
                .front()
                .map_or(step + 1, |(first, _)| first + u64::from(STEPS));
            let retry_after = self
                .step
                .saturating_mul(u32::try_from(frees_at.saturating_sub(step)).unwrap_or(STEPS));
            return Err(OverShare {
                message: format!(
                    "namespace {namespace} has {} bytes of events in the JetStream stream from the last {}, and this request would add {bytes}: its share is {} bytes (--nats-max-bytes-per-namespace), so that one namespace cannot fill the stream for the others; the oldest leave the count in {}",
                    steps.total,
                    humantime::format_duration(self.step * STEPS),
                    self.limit,
                    humantime::format_duration(retry_after),
                ),
                retry_after,
            });
        }
        match steps.bytes.back_mut() {
            Some((last, sum)) if *last == step => *sum += bytes,
            _ => steps.bytes.push_back((step, bytes)),
        }
        steps.total += bytes;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_over_its_share_is_refused_and_the_others_are_not() {
        let shares = NamespaceShares::new(1_000, Duration::from_secs(64));
        let now = Instant::now();
        assert!(shares.take_at("a", 600, now).is_ok());
        assert!(shares.take_at("a", 400, now).is_ok());
        let refused = shares.take_at("a", 1, now).unwrap_err();
        assert!(
            refused.message.contains("1000 bytes")
                && refused.message.contains("--nats-max-bytes-per-namespace"),
            "{}",
            refused.message
        );
        // Whatever a does, b has its own share.
        assert!(shares.take_at("b", 1_000, now).is_ok());
        // A refused request counts nothing.
        assert!(shares.take_at("a", 2_000, now).is_err());
    }

    #[test]
    fn bytes_leave_the_count_as_the_stream_ages_them_out() {
        let shares = NamespaceShares::new(1_000, Duration::from_secs(64));
        let start = shares.start;
        assert!(shares.take_at("a", 1_000, start).is_ok());
        let refused = shares
            .take_at("a", 1, start + Duration::from_secs(10))
            .unwrap_err();
        // Counted in the first second: it leaves the count 64 s after it.
        assert_eq!(refused.retry_after, Duration::from_secs(54));
        assert!(
            shares
                .take_at("a", 1, start + Duration::from_secs(64))
                .is_ok()
        );
    }

    #[test]
    fn no_limit_takes_everything() {
        let shares = NamespaceShares::new(0, Duration::from_secs(64));
        assert!(shares.take("a", u64::MAX).is_ok());
    }
}
