//! `spec.ordering`: deliveries of events with the same key go to the Webhook one at a time, in
//! the order the events were accepted.
//!
//! The [`Sequencer`] keeps one queue per (Webhook, key) in the delivering process. A delivery
//! takes a [`Ticket`] when its event is accepted (direct ingest: in the request's order;
//! DocumentEvents: as the controller takes them over; JetStream: as the leader's serial
//! deliverer receives them, sorted by the event's stream sequence), waits for its turn before
//! its first attempt, and gives the turn to the next one when it is final (delivered, or failed
//! after `maxAttempts`): a retrying delivery holds back the later events of its own key only.
//! The queue of a key exists only while it has deliveries; [`Sequencer::blocked_keys`] lists
//! the keys whose head is retrying, for `status.blockedKeys`.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
};

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use crate::{
    crd::BlockedKey,
    keys::WebhookKey,
    status::{StatusSender, Update},
};

/// Keys listed in `status.blockedKeys`, the oldest blocked first.
pub const BLOCKED_KEYS_LISTED: usize = 20;
/// Characters of a key kept in `status.blockedKeys`.
const KEY_CHARS_LISTED: usize = 128;

/// The ordering key of an event: the value at `path` (dot-separated field names) in the event
/// body, a string or number or boolean; None (delivered unordered) when it is absent or
/// something else.
pub fn ordering_key(path: &str, body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let mut at = &value;
    for field in path.split('.') {
        at = at.get(field)?;
    }
    match at {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct OrderKey {
    webhook: WebhookKey,
    key: Arc<str>,
}

/// A delivery in a key's queue, sorted by `order`.
struct Entry {
    /// (the event's position where the source knows it, arrival here)
    order: (u64, u64),
    id: u64,
    /// Tells a waiting ticket that its turn has come.
    wake: Option<oneshot::Sender<()>>,
}

#[derive(Default)]
struct Queue {
    /// The head (index 0) has its turn; it is never displaced by a later arrival.
    entries: Vec<Entry>,
    uid: Arc<str>,
    blocked: Option<Blocked>,
}

struct Blocked {
    by: u64,
    delivery_id: String,
    attempts: i32,
    since: Timestamp,
}

#[derive(Default)]
struct State {
    queues: HashMap<OrderKey, Queue>,
    next_id: u64,
    /// Webhooks whose blocked keys changed since the last report, with their uid.
    changed: HashMap<WebhookKey, Arc<str>>,
    /// Webhooks that have a blocked key (and so an entry in their status).
    with_blocked: HashSet<WebhookKey>,
}

/// Per-(Webhook, key) FIFO queues of deliveries.
#[derive(Default)]
pub struct Sequencer {
    state: Mutex<State>,
    changed: Notify,
}

/// A delivery's place in its key's queue; dropping it gives the turn to the next delivery.
pub struct Ticket {
    sequencer: Arc<Sequencer>,
    key: OrderKey,
    id: u64,
    /// None once the turn has come.
    turn: Option<oneshot::Receiver<()>>,
}

impl Sequencer {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a delivery to `webhook` (uid `uid`) of an event with `key`. `position` orders
    /// deliveries the source knows the order of (a stream sequence; 0 otherwise): a delivery
    /// arriving after one of a later position goes before it, unless that one has its turn.
    pub fn enqueue(
        self: &Arc<Self>,
        webhook: &WebhookKey,
        uid: &str,
        key: &str,
        position: u64,
    ) -> Ticket {
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        let key = OrderKey {
            webhook: webhook.clone(),
            key: key.into(),
        };
        let queue = state.queues.entry(key.clone()).or_default();
        queue.uid = uid.into();
        let order = (position, id);
        let turn = if queue.entries.is_empty() {
            queue.entries.push(Entry {
                order,
                id,
                wake: None,
            });
            None
        } else {
            let (tx, rx) = oneshot::channel();
            let at = queue.entries[1..]
                .iter()
                .position(|e| e.order > order)
                .map_or(queue.entries.len(), |i| i + 1);
            queue.entries.insert(
                at,
                Entry {
                    order,
                    id,
                    wake: Some(tx),
                },
            );
            Some(rx)
        };
        drop(state);
        Ticket {
            sequencer: self.clone(),
            key,
            id,
            turn,
        }
    }

    /// The keys of `webhook` whose head delivery is retrying, the oldest first, at most
    /// [`BLOCKED_KEYS_LISTED`].
    pub fn blocked_keys(&self, webhook: &WebhookKey) -> Vec<BlockedKey> {
        let state = self.lock();
        let mut keys: Vec<BlockedKey> = state
            .queues
            .iter()
            .filter(|(k, _)| k.webhook == *webhook)
            .filter_map(|(k, q)| {
                let b = q.blocked.as_ref()?;
                Some(BlockedKey {
                    key: k.key.chars().take(KEY_CHARS_LISTED).collect(),
                    delivery_id: b.delivery_id.clone(),
                    attempts: b.attempts,
                    waiting: (q.entries.len() - 1) as i32,
                    since: Time(b.since),
                })
            })
            .collect();
        keys.sort_by(|a, b| (a.since.0, &a.key).cmp(&(b.since.0, &b.key)));
        keys.truncate(BLOCKED_KEYS_LISTED);
        keys
    }

    /// Whether `listed` (a Webhook's `status.blockedKeys`) names keys while this process has
    /// none of that Webhook blocked: written by a previous leader, to be cleared.
    pub fn is_stale(&self, webhook: &WebhookKey, listed: &[BlockedKey]) -> bool {
        !listed.is_empty() && self.blocked_keys(webhook).is_empty()
    }

    /// Sends each Webhook's blocked keys to the status writer when they change (the writer
    /// coalesces them), until `stop`.
    pub async fn report_blocked(self: Arc<Self>, status: StatusSender, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = self.changed.notified() => {}
                _ = stop.cancelled() => return,
            }
            let changed = std::mem::take(&mut self.lock().changed);
            for (webhook, uid) in changed {
                let keys = self.blocked_keys(&webhook);
                {
                    let mut state = self.lock();
                    if keys.is_empty() {
                        // Nothing blocked and nothing written before: nothing to clear.
                        if !state.with_blocked.remove(&webhook) {
                            continue;
                        }
                    } else {
                        state.with_blocked.insert(webhook.clone());
                    }
                }
                status
                    .send(Update::BlockedKeys {
                        key: webhook,
                        uid: uid.to_string(),
                        keys,
                    })
                    .await;
            }
        }
    }

    fn mark_changed(&self, state: &mut State, key: &OrderKey, uid: Arc<str>) {
        state.changed.insert(key.webhook.clone(), uid);
        self.changed.notify_one();
    }
}

impl Ticket {
    /// Resolves once every earlier delivery of the key is final.
    pub async fn turn(&mut self) {
        if let Some(rx) = self.turn.take() {
            // A dropped sender means the entry is gone: nothing is ahead any more.
            let _ = rx.await;
        }
    }

    /// Whether the turn has come (without waiting).
    pub fn has_turn(&mut self) -> bool {
        match &mut self.turn {
            None => true,
            Some(rx) => match rx.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => false,
                _ => {
                    self.turn = None;
                    true
                }
            },
        }
    }

    /// The head delivery failed an attempt and will retry: its key is blocked.
    pub fn retrying(&self, delivery_id: &str, attempts: i32) {
        let sequencer = &self.sequencer;
        let mut state = sequencer.lock();
        let Some(queue) = state.queues.get_mut(&self.key) else {
            return;
        };
        let since = match &queue.blocked {
            Some(b) if b.by == self.id => b.since,
            _ => Timestamp::now(),
        };
        queue.blocked = Some(Blocked {
            by: self.id,
            delivery_id: delivery_id.to_owned(),
            attempts,
            since,
        });
        let uid = queue.uid.clone();
        sequencer.mark_changed(&mut state, &self.key, uid);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let sequencer = self.sequencer.clone();
        let mut state = sequencer.lock();
        let Some(queue) = state.queues.get_mut(&self.key) else {
            return;
        };
        let Some(at) = queue.entries.iter().position(|e| e.id == self.id) else {
            return;
        };
        queue.entries.remove(at);
        let unblocked = queue.blocked.as_ref().is_some_and(|b| b.by == self.id);
        if unblocked {
            queue.blocked = None;
        }
        if at == 0
            && let Some(next) = queue.entries.first_mut()
            && let Some(wake) = next.wake.take()
        {
            let _ = wake.send(());
        }
        let uid = queue.uid.clone();
        if queue.entries.is_empty() {
            state.queues.remove(&self.key);
        }
        if unblocked {
            sequencer.mark_changed(&mut state, &self.key, uid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn webhook() -> WebhookKey {
        WebhookKey::new("docs", "w")
    }

    #[test]
    fn keys_are_read_from_the_event_body() {
        let body = br#"{"event":"document.completed","data":{"document_id":123,"doc":{"name":"a"},"flag":true,"none":null}}"#;
        assert_eq!(
            ordering_key("data.document_id", body).as_deref(),
            Some("123")
        );
        assert_eq!(ordering_key("data.doc.name", body).as_deref(), Some("a"));
        assert_eq!(ordering_key("data.flag", body).as_deref(), Some("true"));
        assert_eq!(
            ordering_key("event", body).as_deref(),
            Some("document.completed")
        );
        // Absent, null or an object: delivered unordered.
        assert_eq!(ordering_key("data.missing", body), None);
        assert_eq!(ordering_key("data.none", body), None);
        assert_eq!(ordering_key("data.doc", body), None);
    }

    #[tokio::test]
    async fn a_key_goes_one_at_a_time_in_order_and_other_keys_are_not_held() {
        let seq = Arc::new(Sequencer::default());
        let mut a1 = seq.enqueue(&webhook(), "u", "A", 0);
        let mut a2 = seq.enqueue(&webhook(), "u", "A", 0);
        let mut a3 = seq.enqueue(&webhook(), "u", "A", 0);
        let mut b1 = seq.enqueue(&webhook(), "u", "B", 0);
        assert!(a1.has_turn() && b1.has_turn());
        assert!(!a2.has_turn() && !a3.has_turn());
        // The head retries: A is blocked, B is not.
        a1.retrying("msg_1", 1);
        a1.retrying("msg_1", 2);
        let blocked = seq.blocked_keys(&webhook());
        assert_eq!(blocked.len(), 1);
        assert_eq!(
            (
                blocked[0].key.as_str(),
                blocked[0].attempts,
                blocked[0].waiting
            ),
            ("A", 2, 2)
        );
        drop(b1);
        assert!(!a2.has_turn());
        // Final (delivered or failed for good): the next of A goes, and A is no longer blocked.
        drop(a1);
        a2.turn().await;
        assert!(!a3.has_turn());
        assert!(seq.blocked_keys(&webhook()).is_empty());
        // A delivery given up before its turn leaves the line without holding it up.
        drop(a3);
        drop(a2);
        assert!(seq.lock().queues.is_empty(), "empty queues are removed");
    }

    #[test]
    fn blocked_keys_this_process_does_not_hold_are_stale() {
        let seq = Arc::new(Sequencer::default());
        let listed = vec![BlockedKey {
            key: "A".into(),
            delivery_id: "msg_1".into(),
            attempts: 3,
            waiting: 1,
            since: Time(Timestamp::now()),
        }];
        // A previous leader's list, nothing blocked here: stale.
        assert!(seq.is_stale(&webhook(), &listed));
        // Nothing listed: nothing to clear.
        assert!(!seq.is_stale(&webhook(), &[]));
        // Blocked here too: the list is this process's (the reporter keeps it current).
        let a = seq.enqueue(&webhook(), "u", "A", 0);
        a.retrying("msg_1", 1);
        assert!(!seq.is_stale(&webhook(), &listed));
    }

    #[test]
    fn positions_sort_the_queue_but_never_displace_the_head() {
        let seq = Arc::new(Sequencer::default());
        let mut five = seq.enqueue(&webhook(), "u", "A", 5);
        let mut seven = seq.enqueue(&webhook(), "u", "A", 7);
        let mut three = seq.enqueue(&webhook(), "u", "A", 3);
        let mut six = seq.enqueue(&webhook(), "u", "A", 6);
        assert!(five.has_turn(), "the head keeps its turn");
        drop(five);
        assert!(three.has_turn() && !six.has_turn() && !seven.has_turn());
        drop(three);
        assert!(six.has_turn() && !seven.has_turn());
        drop(six);
        assert!(seven.has_turn());
    }

    #[test]
    fn at_most_twenty_blocked_keys_are_listed_oldest_first() {
        let seq = Arc::new(Sequencer::default());
        let tickets: Vec<Ticket> = (0..30)
            .map(|i| seq.enqueue(&webhook(), "u", &format!("k{i:02}"), 0))
            .collect();
        for t in &tickets {
            t.retrying("msg", 1);
        }
        let listed = seq.blocked_keys(&webhook());
        assert_eq!(listed.len(), BLOCKED_KEYS_LISTED);
        assert_eq!(listed[0].key, "k00");
        assert!(listed.windows(2).all(|w| w[0].since.0 <= w[1].since.0));
    }
}
