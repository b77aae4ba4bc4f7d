//! The stream: what hookrelay creates, what it adds to a stream someone else set up, and how
//! full it may get before ingest stops taking events.

use std::time::Duration;

use super::{BusConfig, DUPLICATE_WINDOW, Subjects};
use async_nats::jetstream::{
    self, Context,
    stream::{Config as StreamConfig, DiscardPolicy, RetentionPolicy, StorageType},
};

/// Whether JetStream refused a publish because the stream or the server has no room left.
/// A stream with `DiscardPolicy::New` at its limit (not hookrelay's: see [`wanted_stream`])
/// answers error code 10077 (stream store
/// failed) with "maximum messages exceeded", "maximum bytes exceeded" or "maximum messages per
/// subject exceeded" (nats-server 2.15, checked against a real server in the e2e tests); a
/// server or account out of storage answers 10023, 10047 or 10028.
pub fn is_full(error: &async_nats::jetstream::context::PublishError) -> bool {
    use async_nats::jetstream::ErrorCode;
    let Some(error) = std::error::Error::source(error)
        .and_then(|e| e.downcast_ref::<async_nats::jetstream::Error>())
    else {
        return false;
    };
    match error.error_code() {
        ErrorCode::STREAM_STORE_FAILED => {
            let what = error.to_string();
            what.starts_with("maximum messages") || what.starts_with("maximum bytes")
        }
        ErrorCode::INSUFFICIENT_RESOURCES
        | ErrorCode::STORAGE_RESOURCES_EXCEEDED
        | ErrorCode::MEMORY_RESOURCES_EXCEEDED => true,
        _ => false,
    }
}

/// How often ingest looks again at how full the stream is.
const ROOM_FRESH: Duration = Duration::from_millis(200);

/// Ingest stops taking events once the stream holds this share of its byte or message limit:
/// the rest is for what the events already taken still need (their work items, attempt
/// records and parked retries), without which they could not be delivered.
const INGEST_SHARE: (i64, i64) = (3, 4);

/// How full the stream is (its limits and what it holds), looked up at most every
/// [`ROOM_FRESH`] by whichever ingest request needs it.
#[derive(Debug, Default)]
pub struct StreamRoom {
    /// When it was looked up, and what it held then (None: it could not be asked).
    last: tokio::sync::Mutex<Option<(tokio::time::Instant, Option<Held>)>>,
}

/// The stream's configuration, and the messages and bytes it held.
type Held = (StreamConfig, u64, u64);

impl StreamRoom {
    /// None while ingest may publish `messages` more events of `bytes`; else why not (the
    /// stream would be past ingest's share of its limits). A stream that cannot be asked is
    /// not judged full: its publishes tell.
    pub async fn ingest_refusal(
        &self,
        stream: &jetstream::stream::Stream,
        messages: u64,
        bytes: u64,
    ) -> Option<String> {
        let mut last = self.last.lock().await;
        let fresh = last
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < ROOM_FRESH);
        if !fresh {
            let held = match stream.get_info().await {
                Ok(info) => Some((info.config, info.state.messages, info.state.bytes)),
                Err(e) => {
                    tracing::debug!(error = %e, "JetStream ingest: cannot tell how full the stream is");
                    None
                }
            };
            *last = Some((tokio::time::Instant::now(), held));
        }
        let (config, held_messages, held_bytes) = last.as_ref()?.1.as_ref()?;
        ingest_refusal(
            config,
            held_messages.saturating_add(messages),
            held_bytes.saturating_add(bytes),
        )
    }
}

/// Why ingest may not leave a stream with `config` holding `messages` and `bytes`: past
/// [`INGEST_SHARE`] of one of its limits.
pub fn ingest_refusal(config: &StreamConfig, messages: u64, bytes: u64) -> Option<String> {
    let (part, whole) = INGEST_SHARE;
    let past = |held: u64, limit: i64| {
        limit > 0 && i128::from(held) * i128::from(whole) >= i128::from(limit) * i128::from(part)
    };
    let what = if past(messages, config.max_messages) {
        format!(
            "{messages} messages with this request, of its limit of {}",
            config.max_messages
        )
    } else if past(bytes, config.max_bytes) {
        format!(
            "{bytes} bytes with this request, of its limit of {}",
            config.max_bytes
        )
    } else {
        return None;
    };
    Some(format!(
        "the JetStream stream {} is full ({what}; the last quarter is kept for delivering the events already taken)",
        config.name
    ))
}

/// The stream hookrelay creates, with the flags' limits and every subject of `subjects`. Its
/// discard policy is old, the only one nats-server allows with message schedules; ingest stops
/// at [`INGEST_SHARE`] of the limits (503) so that the stream never reaches them and discards
/// nothing.
fn wanted_stream(config: &BusConfig, subjects: &Subjects) -> StreamConfig {
    StreamConfig {
        name: config.stream.clone(),
        subjects: vec![subjects.all()],
        // Limits, not work-queue: history stays for --nats-max-age, whatever was acked.
        retention: RetentionPolicy::Limits,
        max_age: config.max_age,
        max_bytes: config.max_bytes,
        max_messages: config.max_messages,
        discard: DiscardPolicy::Old,
        storage: StorageType::File,
        duplicate_window: DUPLICATE_WINDOW.min(config.max_age),
        // Parked work items (retries, holds) are scheduled by the stream itself.
        allow_message_schedules: true,
        ..Default::default()
    }
}

/// What to write over an existing stream so that hookrelay works with it: its configuration as
/// it is, plus hookrelay's subjects, message schedules, and a duplicate window if it has none.
/// Its limits (bytes, messages, age, discard policy, storage, replicas) stay as whoever runs
/// NATS set them. None when nothing is missing; an error when the stream cannot have what
/// hookrelay needs without changing one of its limits.
pub fn stream_update(
    existing: &StreamConfig,
    wanted: &StreamConfig,
) -> Result<Option<StreamConfig>, String> {
    if wanted.allow_message_schedules
        && !existing.allow_message_schedules
        && existing.discard == DiscardPolicy::New
    {
        return Err(format!(
            "the stream {name} discards new messages when full, and nats-server schedules no messages (hookrelay's parked retries and holds) on such a stream: set its discard policy to old (nats stream edit {name} --discard old); hookrelay stops ingest at three quarters of the stream's limits, so that it discards nothing",
            name = existing.name
        ));
    }
    let mut update = existing.clone();
    for subject in &wanted.subjects {
        if !update.subjects.contains(subject) {
            update.subjects.push(subject.clone());
        }
    }
    update.allow_message_schedules |= wanted.allow_message_schedules;
    if update.duplicate_window.is_zero() {
        update.duplicate_window = match update.max_age {
            age if age.is_zero() => wanted.duplicate_window,
            age => wanted.duplicate_window.min(age),
        };
    }
    Ok((update != *existing).then_some(update))
}

/// Creates the stream with the flags' limits if it does not exist; otherwise adds only what
/// hookrelay needs to it (see [`stream_update`]), keeping its limits.
pub(super) async fn set_up_stream(
    context: &Context,
    config: &BusConfig,
    subjects: &Subjects,
) -> Result<(), async_nats::Error> {
    use async_nats::jetstream::{ErrorCode, context::GetStreamErrorKind};
    let wanted = wanted_stream(config, subjects);
    // Twice: a replica starting at the same moment may create it between our look and our
    // create, and then it is an existing stream.
    let mut not_created = None;
    for _ in 0..2 {
        let existing = match context.get_stream(&config.stream).await {
            Ok(stream) => stream.cached_info().config.clone(),
            Err(e) => match e.kind() {
                GetStreamErrorKind::JetStream(j)
                    if j.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                {
                    match context.create_stream(wanted.clone()).await {
                        Ok(_) => {
                            tracing::info!(stream = %config.stream, max_bytes = config.max_bytes, max_messages = config.max_messages, max_age = %humantime::format_duration(config.max_age), "JetStream stream created with the limits of the flags; ingest answers 503 once it holds three quarters of one");
                            return Ok(());
                        }
                        Err(e) if overlaps(&e) => return Err(taken(subjects, &e).into()),
                        Err(e) => {
                            tracing::debug!(stream = %config.stream, error = %e, "JetStream stream not created; looking again");
                            not_created = Some(e);
                            continue;
                        }
                    }
                }
                _ => return Err(e.into()),
            },
        };
        let limit = |n: i64| if n > 0 { n.to_string() } else { "none".into() };
        tracing::info!(
            stream = %config.stream,
            max_bytes = %limit(existing.max_bytes),
            max_messages = %limit(existing.max_messages),
            max_age = %humantime::format_duration(existing.max_age),
            discard = ?existing.discard,
            "JetStream stream exists: its limits are kept as they are (--nats-max-bytes, --nats-max-messages and --nats-max-age apply when hookrelay creates it)"
        );
        if existing.max_bytes <= 0 && existing.max_messages <= 0 {
            tracing::warn!(stream = %config.stream, "JetStream stream has no byte or message limit: one tenant's flood can fill the NATS disk; set limits (nats stream edit --max-bytes --max-msgs)");
        }
        if let Some(update) = stream_update(&existing, &wanted)? {
            context.update_stream(update).await.map_err(|e| {
                if overlaps(&e) {
                    taken(subjects, &e).into()
                } else {
                    async_nats::Error::from(e)
                }
            })?;
            tracing::info!(stream = %config.stream, "JetStream stream updated with what hookrelay needs (its subjects, message schedules, a duplicate window)");
        }
        return Ok(());
    }
    Err(match not_created {
        Some(e) => e.into(),
        None => format!(
            "stream {} neither exists nor could be created",
            config.stream
        )
        .into(),
    })
}

/// Whether JetStream refused a stream because another stream of the account has its subjects.
fn overlaps(error: &async_nats::jetstream::context::CreateStreamError) -> bool {
    use async_nats::jetstream::{ErrorCode, context::CreateStreamErrorKind};
    matches!(error.kind(), CreateStreamErrorKind::JetStream(e) if e.error_code() == ErrorCode::STREAM_SUBJECT_OVERLAP)
}

/// What to say when another stream of the account already takes this installation's subjects
/// (another installation with a stream of the same name but for case, or a stream set up by
/// hand).
fn taken(subjects: &Subjects, error: &dyn std::fmt::Display) -> String {
    format!(
        "another stream on this NATS account already takes the subjects {all} ({error}): each installation sharing an account needs a --nats-stream whose name, lowercased, is its own (it is the prefix of every subject hookrelay uses)",
        all = subjects.all()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::jetstream::NatsTls;

    fn bus_config() -> BusConfig {
        BusConfig {
            url: "nats://127.0.0.1:4222".into(),
            creds: None,
            tls: NatsTls::default(),
            stream: "HOOKRELAY".into(),
            max_age: Duration::from_secs(86400),
            max_bytes: 1 << 30,
            max_messages: 1_000_000,
            max_ack_pending: 10_000,
            max_bytes_per_namespace: 1 << 28,
        }
    }

    fn default_subjects() -> Subjects {
        Subjects::for_stream("HOOKRELAY").unwrap()
    }

    #[test]
    fn a_stream_takes_the_subjects_under_its_lowercased_name() {
        let wanted = wanted_stream(&bus_config(), &default_subjects());
        // The default stream keeps the subjects every installation had.
        assert_eq!(wanted.subjects, ["hookrelay.>"]);
        let config = BusConfig {
            stream: "HOOKRELAY_STAGING".into(),
            ..bus_config()
        };
        let staging = Subjects::for_stream(&config.stream).unwrap();
        let wanted = wanted_stream(&config, &staging);
        assert_eq!(wanted.name, "HOOKRELAY_STAGING");
        assert_eq!(wanted.subjects, ["hookrelay_staging.>"]);
    }

    #[test]
    fn a_new_stream_gets_the_flags_limits() {
        let wanted = wanted_stream(&bus_config(), &default_subjects());
        assert_eq!(wanted.max_bytes, 1 << 30);
        assert_eq!(wanted.max_messages, 1_000_000);
        // nats-server refuses message schedules with discard new.
        assert_eq!(wanted.discard, DiscardPolicy::Old);
        assert!(wanted.allow_message_schedules);
        assert_eq!(wanted.duplicate_window, DUPLICATE_WINDOW);
    }

    #[test]
    fn an_existing_stream_keeps_its_limits_and_gets_only_what_hookrelay_needs() {
        let wanted = wanted_stream(&bus_config(), &default_subjects());
        // As whoever runs NATS set it up: other limits, discarding old, an extra subject, no
        // message schedules.
        let existing = StreamConfig {
            name: "HOOKRELAY".into(),
            subjects: vec!["audit.>".into()],
            max_bytes: 5 << 30,
            max_messages: -1,
            max_age: Duration::from_secs(3600),
            discard: DiscardPolicy::Old,
            num_replicas: 3,
            duplicate_window: Duration::ZERO,
            ..Default::default()
        };
        let update = stream_update(&existing, &wanted)
            .unwrap()
            .expect("schedules and subjects missing");
        assert_eq!(update.subjects, ["audit.>", "hookrelay.>"]);
        assert!(update.allow_message_schedules);
        // Not longer than its max age.
        assert_eq!(update.duplicate_window, Duration::from_secs(600));
        assert_eq!(
            (update.max_bytes, update.max_messages, update.max_age),
            (5 << 30, -1, Duration::from_secs(3600))
        );
        assert_eq!(update.discard, DiscardPolicy::Old);
        assert_eq!(update.num_replicas, 3);
        // Its own duplicate window stays; once everything is there, nothing is written.
        let shorter = StreamConfig {
            duplicate_window: Duration::from_secs(120),
            ..update.clone()
        };
        assert_eq!(stream_update(&shorter, &wanted), Ok(None));
        assert_eq!(stream_update(&update, &wanted), Ok(None));
        let short_lived = StreamConfig {
            max_age: Duration::from_secs(60),
            ..existing
        };
        assert_eq!(
            stream_update(&short_lived, &wanted)
                .unwrap()
                .unwrap()
                .duplicate_window,
            Duration::from_secs(60)
        );
    }

    #[test]
    fn a_stream_discarding_new_messages_is_not_changed_but_refused_saying_what_to_do() {
        let wanted = wanted_stream(&bus_config(), &default_subjects());
        let existing = StreamConfig {
            name: "HOOKRELAY".into(),
            subjects: vec!["hookrelay.>".into()],
            max_messages: 1000,
            discard: DiscardPolicy::New,
            ..Default::default()
        };
        let why = stream_update(&existing, &wanted).unwrap_err();
        assert!(
            why.contains("nats stream edit HOOKRELAY --discard old"),
            "{why}"
        );
    }

    #[test]
    fn a_stream_hookrelay_created_is_left_as_it_is() {
        let wanted = wanted_stream(&bus_config(), &default_subjects());
        // The server fills in what was not given.
        let created = StreamConfig {
            max_consumers: -1,
            max_messages_per_subject: -1,
            max_message_size: -1,
            ..wanted.clone()
        };
        assert_eq!(stream_update(&created, &wanted), Ok(None));
        // Other flags at this start do not change it either.
        let other_flags = wanted_stream(
            &BusConfig {
                max_bytes: 1 << 20,
                max_messages: 10,
                ..bus_config()
            },
            &default_subjects(),
        );
        assert_eq!(stream_update(&created, &other_flags), Ok(None));
    }

    #[test]
    fn ingest_stops_at_three_quarters_of_a_limit() {
        let config = StreamConfig {
            name: "HOOKRELAY".into(),
            max_messages: 100,
            max_bytes: 4000,
            discard: DiscardPolicy::New,
            ..Default::default()
        };
        assert_eq!(ingest_refusal(&config, 74, 2999), None);
        let why = ingest_refusal(&config, 75, 0).unwrap();
        assert!(
            why.contains("HOOKRELAY is full")
                && why.contains("75 messages with this request, of its limit of 100"),
            "{why}"
        );
        let why = ingest_refusal(&config, 0, 3000).unwrap();
        assert!(
            why.contains("3000 bytes with this request, of its limit of 4000"),
            "{why}"
        );
        // No limit: never refused here.
        let unlimited = StreamConfig {
            max_messages: -1,
            max_bytes: -1,
            ..config.clone()
        };
        assert_eq!(ingest_refusal(&unlimited, u64::MAX, u64::MAX), None);
    }
}
