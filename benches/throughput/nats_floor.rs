//! The JetStream floor: what one event stored in a stream, handed out by a durable pull
//! consumer and acked costs nats-server and its client on this machine, with nothing else
//! around it (no HTTP, no operator, no routing). Publishers as many as the load generator's
//! connections each publish a contract-sized event with a `Nats-Msg-Id` and wait for its
//! PubAck, as JetStream ingest does; one consumer acks each message as it arrives. Every event
//! of `--ingest-mode jetstream` costs at least this, plus the two HTTP hops of direct mode.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;

use crate::{cost, event_body, support::NatsServer};

/// The most the consumer may take after the publishers stop to catch up.
const CATCH_UP: Duration = Duration::from_secs(30);

/// What the floor measured.
#[derive(Debug, serde::Serialize)]
pub struct NatsFloor {
    /// Events stored and acked by the consumer, per second of publishing.
    pub events_per_s: f64,
    pub events: u64,
    pub nats_cpu_ms_per_1000: f64,
    /// The publishers' and the consumer's client side (this process).
    pub client_cpu_ms_per_1000: f64,
}

/// Publishes for `seconds` from `publishers` tasks over one connection, as the operator does,
/// and consumes everything published.
pub async fn measure(seconds: Duration, publishers: usize) -> NatsFloor {
    let nats = NatsServer::start().await;
    let client = async_nats::connect(nats.url.as_str()).await.unwrap();
    let js = jetstream::new(client);
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: "FLOOR".into(),
            subjects: vec!["floor.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("floor".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await
        .unwrap();
    let published = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let publishing = Arc::new(AtomicBool::new(true));
    let consuming = {
        let (acked, published, publishing) = (acked.clone(), published.clone(), publishing.clone());
        tokio::spawn(async move {
            let mut messages = consumer.messages().await.unwrap();
            let mut deadline = None;
            loop {
                if !publishing.load(Ordering::Relaxed) {
                    let until = *deadline.get_or_insert_with(|| Instant::now() + CATCH_UP);
                    if acked.load(Ordering::Relaxed) >= published.load(Ordering::Relaxed)
                        || Instant::now() > until
                    {
                        return;
                    }
                }
                let next = tokio::time::timeout(Duration::from_millis(200), messages.next());
                if let Ok(Some(Ok(message))) = next.await
                    && message.ack().await.is_ok()
                {
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let (nats_before, me_before) = (
        cost::cpu_time(nats.pid()),
        cost::cpu_time(std::process::id()),
    );
    let started = Instant::now();
    let end = started + seconds;
    let next_seq = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..publishers)
        .map(|_| {
            let (js, published, next_seq) = (js.clone(), published.clone(), next_seq.clone());
            tokio::spawn(async move {
                while Instant::now() < end {
                    let seq = next_seq.fetch_add(1, Ordering::Relaxed);
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert("Nats-Msg-Id", format!("floor-{seq}").as_str());
                    let body = event_body(seq).into_bytes().into();
                    let stored = match js.publish_with_headers("floor.events", headers, body).await
                    {
                        Ok(ack) => ack.await.is_ok(),
                        Err(_) => false,
                    };
                    if stored {
                        published.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    let publishing_s = started.elapsed().as_secs_f64();
    publishing.store(false, Ordering::Relaxed);
    consuming.await.unwrap();
    let nats_ms = (cost::cpu_time(nats.pid()) - nats_before).as_secs_f64() * 1000.0;
    let me_ms = (cost::cpu_time(std::process::id()) - me_before).as_secs_f64() * 1000.0;
    let events = acked.load(Ordering::Relaxed);
    let per_1000 = |ms: f64| ms / events.max(1) as f64 * 1000.0;
    NatsFloor {
        events_per_s: events as f64 / publishing_s,
        events,
        nats_cpu_ms_per_1000: per_1000(nats_ms),
        client_cpu_ms_per_1000: per_1000(me_ms),
    }
}
