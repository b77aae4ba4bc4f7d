//! The subjects of one installation. Every subject hookrelay publishes to or consumes from is
//! under one prefix, the name of its stream (`--nats-stream`) lowercased, so that two
//! installations with different streams on one NATS account neither collide (nats-server
//! refuses two streams taking the same subjects) nor read each other's events, and so that an
//! account's permissions can give each installation its own subjects and nothing else
//! (docs/ingest-modes.md, "A least-privilege NATS user").
//!
//! The default stream, `HOOKRELAY`, keeps the prefix `hookrelay.` that every subject had before
//! the prefix followed the stream: existing installations with the default stream keep their
//! stored events, work items, parked retries and consumers as they are.

use crate::keys::WebhookKey;

use super::deliverer::Lane;

/// The subjects of the installation whose stream is [`Subjects::stream`], built once at start
/// from `--nats-stream` and carried by the [`super::Bus`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subjects {
    stream: String,
    prefix: String,
    /// `<prefix>.events`: ingested events, `.<namespace>`.
    events: String,
    /// `<prefix>.deliveries`: work items of the shared lane, `.<namespace>.<webhook>`.
    deliveries: String,
    /// `<prefix>.serial`: work items the leader alone delivers, `.<namespace>.<webhook>`.
    serial: String,
    /// `<prefix>.attempts`: attempt records, `.<namespace>.<webhook>`.
    attempts: String,
    /// `<prefix>.schedules`: parked work items, `.<namespace>.<webhook>.<delivery id>`.
    schedules: String,
}

/// Why a stream name cannot be hookrelay's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "--nats-stream {name:?} cannot be used: {why} (the stream's name, lowercased, is the first token of every subject hookrelay uses, so it must be a NATS stream name: 1 to {MAX_STREAM_NAME} characters, none of '.', '*', '>', '/', '\\\\', spaces or control characters; e.g. HOOKRELAY or HOOKRELAY_STAGING)"
)]
pub struct InvalidStreamName {
    pub name: String,
    pub why: String,
}

/// The longest stream name hookrelay accepts (nats-server's limit on JetStream names).
pub const MAX_STREAM_NAME: usize = 255;

impl Subjects {
    /// The subjects of the installation whose stream is `stream`: under `stream` lowercased.
    pub fn for_stream(stream: &str) -> Result<Self, InvalidStreamName> {
        let invalid = |why: String| InvalidStreamName {
            name: stream.to_owned(),
            why,
        };
        if stream.is_empty() {
            return Err(invalid("it is empty".into()));
        }
        if stream.len() > MAX_STREAM_NAME {
            return Err(invalid(format!("it is {} bytes long", stream.len())));
        }
        if let Some(c) = stream
            .chars()
            .find(|c| matches!(c, '.' | '*' | '>' | '/' | '\\') || c.is_whitespace())
        {
            return Err(invalid(format!("it contains {c:?}")));
        }
        if stream.chars().any(char::is_control) {
            return Err(invalid("it contains a control character".into()));
        }
        let prefix = stream.to_lowercase();
        let under = |kind: &str| format!("{prefix}.{kind}");
        Ok(Self {
            stream: stream.to_owned(),
            events: under("events"),
            deliveries: under("deliveries"),
            serial: under("serial"),
            attempts: under("attempts"),
            schedules: under("schedules"),
            prefix,
        })
    }

    /// The stream's name, as given.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The first token of every subject: the stream's name lowercased.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Every subject of the installation: the stream's subjects.
    pub fn all(&self) -> String {
        format!("{}.>", self.prefix)
    }

    /// The prefix of the replies hookrelay's NATS connection receives (publish acks, JetStream
    /// API answers, the messages its pull consumers hand out), so that a least-privilege user
    /// subscribes to its own `_INBOX.<prefix>.>` rather than to every client's `_INBOX.>`.
    pub fn inbox_prefix(&self) -> String {
        format!("_INBOX.{}", self.prefix)
    }

    /// The filter of the `router` consumer: every namespace's events.
    pub fn events_filter(&self) -> String {
        format!("{}.>", self.events)
    }

    /// The filter of a lane's consumer (`deliverer` or `serial`).
    pub fn work_filter(&self, lane: Lane) -> String {
        format!("{}.>", self.work_root(lane))
    }

    /// The filter of the `recorder` consumer.
    pub fn attempts_filter(&self) -> String {
        format!("{}.>", self.attempts)
    }

    /// Where ingest publishes the events of `namespace`.
    pub fn event(&self, namespace: &str) -> String {
        format!("{}.{namespace}", self.events)
    }

    /// The namespace of an event's subject; None if it is not one of this installation's.
    pub fn event_namespace<'a>(&self, subject: &'a str) -> Option<&'a str> {
        subject
            .strip_prefix(self.events.as_str())?
            .strip_prefix('.')
            .filter(|namespace| !namespace.is_empty())
    }

    fn work_root(&self, lane: Lane) -> &str {
        match lane {
            Lane::Shared => &self.deliveries,
            Lane::Serial => &self.serial,
        }
    }

    /// Where the work items of the Webhook `webhook` of `namespace` go on `lane`.
    pub fn work(&self, lane: Lane, namespace: &str, webhook: &str) -> String {
        format!("{}.{namespace}.{webhook}", self.work_root(lane))
    }

    /// Both subjects the work items of `key` may be on (a Webhook may have had a rate limit or
    /// an ordering for a while), for reading them back.
    pub fn work_of(&self, key: &WebhookKey) -> Vec<String> {
        [Lane::Shared, Lane::Serial]
            .map(|lane| self.work(lane, &key.namespace, &key.name))
            .into()
    }

    /// The namespace and Webhook of a work item's subject (either lane); None if it is not one
    /// of this installation's.
    pub fn work_item<'a>(&self, subject: &'a str) -> Option<(&'a str, &'a str)> {
        [Lane::Shared, Lane::Serial]
            .into_iter()
            .find_map(|lane| subject.strip_prefix(self.work_root(lane)))?
            .strip_prefix('.')?
            // Namespaces have no dots; Webhook names may.
            .split_once('.')
            .filter(|(namespace, name)| !namespace.is_empty() && !name.is_empty())
    }

    /// Where the attempt records of `key` go.
    pub fn attempts(&self, key: &WebhookKey) -> String {
        format!("{}.{}.{}", self.attempts, key.namespace, key.name)
    }

    /// The Webhook of an attempt record's subject; None if it is not one of this
    /// installation's.
    pub fn attempts_of(&self, subject: &str) -> Option<WebhookKey> {
        let (namespace, name) = subject
            .strip_prefix(self.attempts.as_str())?
            .strip_prefix('.')?
            .split_once('.')
            .filter(|(namespace, name)| !namespace.is_empty() && !name.is_empty())?;
        Some(WebhookKey::new(namespace, name))
    }

    /// What a NATS user running this installation needs, and nothing more (docs/ingest-modes.md,
    /// "A least-privilege NATS user"): publishing to its subjects, the JetStream API of its stream
    /// and its consumers (the durable ones and the ephemeral ordered ones of recover and
    /// search), and acks of its stream's messages; subscribing to its own inboxes. The list is
    /// what the operator was seen to use against a real nats-server (every publish and
    /// subscription of its connection, traced) while ingesting, routing, delivering on both
    /// lanes, parking retries, recording attempts, recovering and searching (and the consumer
    /// delete the NATS client sends when an ordered consumer recreates itself); the e2e test
    /// `tenants::a_least_privilege_nats_user_runs_an_installation_and_reads_no_other` runs it
    /// with exactly these.
    pub fn permissions(&self) -> NatsPermissions {
        let stream = &self.stream;
        let api = |call: &str| format!("$JS.API.{call}");
        NatsPermissions {
            publish: vec![
                // Events, work items, parked copies, attempt records.
                self.all(),
                // How full the stream is (ingest), where routing has come (ordering).
                api(&format!("STREAM.INFO.{stream}")),
                // At start, when the stream is missing, or lacks hookrelay's subjects or
                // message schedules.
                api(&format!("STREAM.CREATE.{stream}")),
                api(&format!("STREAM.UPDATE.{stream}")),
                // A keyed repeat's stored content.
                api(&format!("STREAM.MSG.GET.{stream}")),
                // Superseded copies of parked work items.
                api(&format!("STREAM.MSG.DELETE.{stream}")),
                // The ephemeral ordered consumers of recover and search (no name), and the
                // durable ones (name and filter).
                api(&format!("CONSUMER.CREATE.{stream}")),
                api(&format!("CONSUMER.CREATE.{stream}.>")),
                // The router's and serial lane's progress (ordering).
                api(&format!("CONSUMER.INFO.{stream}.*")),
                // Pulling from each consumer.
                api(&format!("CONSUMER.MSG.NEXT.{stream}.*")),
                // An ordered consumer recreating itself after a gap deletes the old one.
                api(&format!("CONSUMER.DELETE.{stream}.*")),
                // Acks, naks and progress of the messages pulled.
                format!("$JS.ACK.{stream}.>"),
            ],
            subscribe: vec![format!("{}.>", self.inbox_prefix())],
        }
    }

    /// Where a parked work item of delivery `delivery_id` to `key` waits for its time.
    pub fn schedule(&self, key: &WebhookKey, delivery_id: &str) -> String {
        format!(
            "{}.{}.{}.{delivery_id}",
            self.schedules, key.namespace, key.name
        )
    }
}

/// The subjects a NATS user may publish and subscribe to (nats-server's `permissions`, allow
/// lists: everything else is denied).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatsPermissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

impl NatsPermissions {
    /// As a nats-server configuration block, `permissions: {...}`, its lines indented by
    /// `indent` spaces after the first.
    pub fn to_config(&self, indent: usize) -> String {
        let pad = " ".repeat(indent);
        let list = |subjects: &[String]| {
            subjects
                .iter()
                .map(|s| format!("{pad}    \"{s}\""))
                .collect::<Vec<_>>()
                .join("\n")
        };
        format!(
            "permissions: {{\n{pad}  publish: {{ allow: [\n{}\n{pad}  ] }}\n{pad}  subscribe: {{ allow: [\n{}\n{pad}  ] }}\n{pad}}}",
            list(&self.publish),
            list(&self.subscribe)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_stream_keeps_the_subjects_every_installation_had() {
        let s = Subjects::for_stream("HOOKRELAY").unwrap();
        assert_eq!(s.all(), "hookrelay.>");
        assert_eq!(s.event("docs"), "hookrelay.events.docs");
        assert_eq!(s.events_filter(), "hookrelay.events.>");
        assert_eq!(
            s.work(Lane::Shared, "docs", "w.x"),
            "hookrelay.deliveries.docs.w.x"
        );
        assert_eq!(s.work(Lane::Serial, "docs", "w"), "hookrelay.serial.docs.w");
        assert_eq!(s.work_filter(Lane::Shared), "hookrelay.deliveries.>");
        assert_eq!(s.work_filter(Lane::Serial), "hookrelay.serial.>");
        let key = WebhookKey::new("docs", "w");
        assert_eq!(s.attempts(&key), "hookrelay.attempts.docs.w");
        assert_eq!(s.attempts_filter(), "hookrelay.attempts.>");
        assert_eq!(
            s.schedule(&key, "msg_1"),
            "hookrelay.schedules.docs.w.msg_1"
        );
        assert_eq!(s.inbox_prefix(), "_INBOX.hookrelay");
    }

    #[test]
    fn another_stream_has_subjects_of_its_own() {
        let s = Subjects::for_stream("HookRelay_Staging-2").unwrap();
        assert_eq!(s.stream(), "HookRelay_Staging-2");
        assert_eq!(s.prefix(), "hookrelay_staging-2");
        assert_eq!(s.all(), "hookrelay_staging-2.>");
        assert_eq!(s.event("docs"), "hookrelay_staging-2.events.docs");
        assert_eq!(s.inbox_prefix(), "_INBOX.hookrelay_staging-2");
        // The default installation's subjects are not this one's.
        let default = Subjects::for_stream("HOOKRELAY").unwrap();
        assert_eq!(s.event_namespace(&default.event("docs")), None);
        assert_eq!(s.work_item(&default.work(Lane::Shared, "docs", "w")), None);
        assert_eq!(
            s.attempts_of(&default.attempts(&WebhookKey::new("d", "w"))),
            None
        );
    }

    #[test]
    fn subjects_are_read_back_as_they_were_made() {
        let s = Subjects::for_stream("ORDERS").unwrap();
        assert_eq!(s.event_namespace(&s.event("docs")), Some("docs"));
        assert_eq!(s.event_namespace("orders.events."), None);
        assert_eq!(s.event_namespace("orders.eventsx.docs"), None);
        for lane in [Lane::Shared, Lane::Serial] {
            assert_eq!(
                s.work_item(&s.work(lane, "docs", "file.conversion")),
                Some(("docs", "file.conversion"))
            );
        }
        assert_eq!(s.work_item("orders.deliveries.docs"), None);
        assert_eq!(s.work_item("orders.deliveries..w"), None);
        assert_eq!(s.work_item(&s.event("docs")), None);
        let key = WebhookKey::new("docs", "file.conversion");
        assert_eq!(s.attempts_of(&s.attempts(&key)), Some(key.clone()));
        assert_eq!(s.attempts_of("orders.attempts.docs"), None);
        assert_eq!(
            s.work_of(&key),
            [
                "orders.deliveries.docs.file.conversion",
                "orders.serial.docs.file.conversion"
            ]
        );
    }

    #[test]
    fn the_permissions_guide_lists_exactly_the_permissions_of_the_default_stream() {
        let guide = include_str!("../../../docs/ingest-modes.md");
        let snippet = guide
            .split("<!-- nats-permissions HOOKRELAY -->")
            .nth(1)
            .and_then(|rest| rest.split("```").nth(1))
            .expect("docs/ingest-modes.md has the least-privilege snippet");
        let permissions = Subjects::for_stream("HOOKRELAY").unwrap().permissions();
        let config = permissions.to_config(6);
        assert!(
            snippet.contains(&config),
            "docs/ingest-modes.md's snippet:\n{snippet}\nshould hold:\n{config}"
        );
        // Another stream: its own subjects, API and inboxes, none of the default's.
        let staging = Subjects::for_stream("HOOKRELAY_STAGING")
            .unwrap()
            .permissions();
        for allowed in staging.publish.iter().chain(&staging.subscribe) {
            assert!(
                allowed.contains("HOOKRELAY_STAGING") || allowed.contains("hookrelay_staging"),
                "{allowed}"
            );
        }
    }

    #[test]
    fn a_stream_name_that_is_no_subject_token_is_refused_saying_why() {
        for (name, why) in [
            ("", "it is empty"),
            ("HOOK.RELAY", "it contains '.'"),
            ("HOOK*", "it contains '*'"),
            ("HOOK>", "it contains '>'"),
            ("HOOK RELAY", "it contains ' '"),
            ("HOOK\tRELAY", "it contains '\\t'"),
            ("a/b", "it contains '/'"),
            ("a\\b", "it contains '\\\\'"),
            ("a\u{7}b", "it contains a control character"),
        ] {
            let e = Subjects::for_stream(name).unwrap_err();
            assert_eq!(e.why, why, "{name:?}");
            let message = e.to_string();
            assert!(
                message.starts_with(&format!("--nats-stream {name:?} cannot be used")),
                "{message}"
            );
        }
        assert!(Subjects::for_stream(&"A".repeat(MAX_STREAM_NAME)).is_ok());
        assert!(Subjects::for_stream(&"A".repeat(MAX_STREAM_NAME + 1)).is_err());
    }
}
