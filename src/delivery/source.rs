//! Where a delivery's event came from: the `source` of its attempt records.

use std::sync::Arc;

/// Where a delivery's event came from. Attempt records keep it as text ([`Source::as_str`]):
/// a DocumentEvent's name, or the word of another origin; [`Source::parse`] reads it back (a
/// DocumentEvent named like one of those words reads as that origin, so it gets no link).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A stored DocumentEvent, by name.
    DocumentEvent(Arc<str>),
    /// Direct ingest: nothing is stored.
    Ingest,
    /// JetStream ingest: the event is in the stream.
    JetStream,
    /// `POST /api/webhooks/{id}/test`.
    Test,
    /// `POST /api/webhooks/{id}/redeliver`.
    Redeliver,
}

impl Source {
    const INGEST: &'static str = "ingest";
    const JETSTREAM: &'static str = "jetstream";
    const TEST: &'static str = "test";
    const REDELIVER: &'static str = "redeliver";

    pub fn as_str(&self) -> &str {
        match self {
            Source::DocumentEvent(name) => name,
            Source::Ingest => Self::INGEST,
            Source::JetStream => Self::JETSTREAM,
            Source::Test => Self::TEST,
            Source::Redeliver => Self::REDELIVER,
        }
    }

    /// The source a record names.
    pub fn parse(recorded: &str) -> Source {
        match recorded {
            Self::INGEST => Source::Ingest,
            Self::JETSTREAM => Source::JetStream,
            Self::TEST => Source::Test,
            Self::REDELIVER => Source::Redeliver,
            name => Source::DocumentEvent(name.into()),
        }
    }

    /// The stored DocumentEvent it delivered, if any.
    pub fn document_event(&self) -> Option<&str> {
        match self {
            Source::DocumentEvent(name) => Some(name),
            _ => None,
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_source_reads_back_as_it_was_written() {
        for source in [
            Source::DocumentEvent("document-completed-x7k2p".into()),
            Source::Ingest,
            Source::JetStream,
            Source::Test,
            Source::Redeliver,
        ] {
            assert_eq!(Source::parse(source.as_str()), source);
        }
        assert_eq!(
            Source::parse("e1").document_event(),
            Some("e1"),
            "any other text names a DocumentEvent"
        );
        assert_eq!(Source::parse("ingest").document_event(), None);
    }
}
