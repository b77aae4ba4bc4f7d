//! Concurrency limits keyed by Webhook or namespace, pruned so that the map never outgrows
//! what exists: an entry nobody holds and whose key is no longer live is dropped.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Arc, Mutex},
};

use tokio::sync::Semaphore;

/// One semaphore of `permits` per key, created on first use.
pub struct KeyedLimits<K> {
    permits: usize,
    map: Mutex<HashMap<K, Arc<Semaphore>>>,
}

impl<K: Eq + Hash + Clone> KeyedLimits<K> {
    pub fn new(permits: usize) -> Self {
        Self {
            permits: permits.max(1),
            map: Mutex::new(HashMap::new()),
        }
    }

    /// The semaphore of `key`. When a new key would make the map larger than twice the number
    /// of `live_count` keys (plus slack), entries that are not in use and not `is_live` go:
    /// amortised O(1) per call, and the map stays proportional to what exists.
    pub fn get(&self, key: &K, live_count: usize, is_live: impl Fn(&K) -> bool) -> Arc<Semaphore> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(semaphore) = map.get(key) {
            return semaphore.clone();
        }
        if map.len() >= 2 * live_count + 64 {
            // In use: someone besides the map holds it (a waiter or a permit holder's lane).
            map.retain(|k, s| Arc::strong_count(s) > 1 || is_live(k));
        }
        map.entry(key.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(self.permits)))
            .clone()
    }

    /// The permits of every key's semaphore.
    pub fn permits(&self) -> usize {
        self.permits
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_of_keys_that_are_gone_are_pruned() {
        let limits = KeyedLimits::new(8);
        // 10,000 Webhooks come and go; only "live" stays.
        for i in 0..10_000 {
            limits.get(&format!("gone-{i}"), 1, |k: &String| k == "live");
        }
        let live = limits.get(&"live".to_owned(), 1, |k: &String| k == "live");
        assert!(limits.len() <= 2 + 64, "{} entries kept", limits.len());
        // A live key keeps its semaphore (and so its permits in use) across pruning.
        let _permit = live.clone().try_acquire_owned().unwrap();
        for i in 0..1_000 {
            limits.get(&format!("again-{i}"), 1, |k: &String| k == "live");
        }
        let same = limits.get(&"live".to_owned(), 1, |k: &String| k == "live");
        assert!(Arc::ptr_eq(&live, &same));
        assert_eq!(same.available_permits(), 7);
    }

    #[test]
    fn an_entry_in_use_survives_even_when_its_key_is_gone() {
        let limits = KeyedLimits::new(1);
        let held = limits.get(&0u32, 0, |_| false);
        for i in 1..200u32 {
            limits.get(&i, 0, |_| false);
        }
        let again = limits.get(&0u32, 0, |_| false);
        assert!(
            Arc::ptr_eq(&held, &again),
            "a lane someone holds is never replaced"
        );
    }
}
