//! Supervision: the essential tasks, in the order they stop, and what ends the operator.

use std::{net::SocketAddr, time::Duration};

use tokio_util::sync::CancellationToken;

use super::Error;
use crate::{delivery::jetstream, health};

/// A task the operator cannot work without.
pub struct Essential {
    name: &'static str,
    handle: tokio::task::JoinHandle<Result<(), Error>>,
    /// Stops the task when its turn comes at shutdown; None: it stops on the shutdown signal.
    stop: Option<CancellationToken>,
}

impl Essential {
    /// `addr`: the address a server task serves, named in its error.
    pub fn new<T: IntoTaskResult + Send + 'static>(
        name: &'static str,
        handle: tokio::task::JoinHandle<T>,
        addr: Option<SocketAddr>,
    ) -> Self {
        let handle = tokio::spawn(async move {
            match handle.await {
                Ok(output) => output.into_task_result(addr),
                Err(e) if e.is_panic() => Err(Error::TaskEnded {
                    task: name,
                    why: "it panicked".into(),
                }),
                Err(_) => Err(Error::TaskEnded {
                    task: name,
                    why: "it was cancelled".into(),
                }),
            }
        });
        Self {
            name,
            handle,
            stop: None,
        }
    }

    pub fn stopped_by(mut self, stop: CancellationToken) -> Self {
        self.stop = Some(stop);
        self
    }
}

/// What a task's output means for the operator.
pub trait IntoTaskResult {
    fn into_task_result(self, addr: Option<SocketAddr>) -> Result<(), Error>;
}

impl IntoTaskResult for () {
    fn into_task_result(self, _: Option<SocketAddr>) -> Result<(), Error> {
        Ok(())
    }
}

impl IntoTaskResult for Result<(), jetstream::BusError> {
    fn into_task_result(self, _: Option<SocketAddr>) -> Result<(), Error> {
        self.map_err(Error::Bus)
    }
}

impl IntoTaskResult for std::io::Result<()> {
    fn into_task_result(self, addr: Option<SocketAddr>) -> Result<(), Error> {
        self.map_err(|source| Error::Listen {
            addr: addr.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
            source,
        })
    }
}

/// Runs until `shutdown` fires or an essential task ends. A task that ends first (returns,
/// fails or panics) marks the operator not alive (`/healthz` fails), starts the shutdown, and is
/// the error returned, so the process exits non-zero and is restarted. Stopping is bounded by
/// `deadline`: producers stop, then the writer flushes what they sent; whatever is left when the
/// deadline passes is redone by the next run.
pub async fn supervise(
    mut tasks: Vec<Essential>,
    shutdown: CancellationToken,
    liveness: health::Liveness,
    deadline: Duration,
) -> Result<(), Error> {
    let ended_first = tokio::select! {
        // On SIGTERM the servers end at once too: shutdown first, or a clean stop would be
        // reported as a task that ended (exit code 1) whenever select! happened to poll it first.
        biased;
        _ = shutdown.cancelled() => None,
        (result, index, _) = futures::future::select_all(tasks.iter_mut().map(|t| &mut t.handle)) => {
            Some((index, result))
        }
    };
    let mut failure = None;
    if let Some((index, result)) = ended_first {
        let task = tasks.remove(index);
        let error = match result {
            Ok(Err(error)) => error,
            Ok(Ok(())) | Err(_) => Error::TaskEnded {
                task: task.name,
                why: "it returned before shutdown".into(),
            },
        };
        tracing::error!(task = task.name, %error, "an essential task ended; stopping");
        liveness.fail(format!("{}: {error}", task.name));
        shutdown.cancel();
        failure = Some(error);
    }
    let drain = async {
        let mut first_error = None;
        for task in tasks {
            if let Some(stop) = &task.stop {
                stop.cancel();
            }
            if let Ok(Err(error)) = task.handle.await {
                first_error.get_or_insert(error);
            }
        }
        first_error
    };
    let drained = tokio::time::timeout(deadline, drain).await;
    match (failure, drained) {
        (Some(error), _) => Err(error),
        (None, Ok(Some(error))) => Err(error),
        (None, Ok(None)) => Ok(()),
        (None, Err(_)) => {
            tracing::warn!(
                ?deadline,
                "shutdown deadline passed with status still being written; exiting (the next run redoes it)"
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spawn<F: Future<Output = ()> + Send + 'static>(name: &'static str, f: F) -> Essential {
        Essential::new(name, tokio::spawn(f), None)
    }

    #[tokio::test]
    async fn a_panicking_task_fails_liveness_stops_the_rest_and_is_the_error() {
        let shutdown = CancellationToken::new();
        let liveness = health::Liveness::default();
        let stop = shutdown.clone();
        let tasks = vec![
            spawn("controller", async { panic!("boom") }),
            spawn("server", async move { stop.cancelled().await }),
        ];
        let result = supervise(
            tasks,
            shutdown.clone(),
            liveness.clone(),
            Duration::from_secs(5),
        )
        .await;
        assert!(
            matches!(&result, Err(Error::TaskEnded { task: "controller", why }) if why.contains("panicked")),
            "{result:?}"
        );
        assert!(shutdown.is_cancelled(), "the others are told to stop");
        assert!(liveness.failure().unwrap().contains("controller"));
    }

    #[tokio::test]
    async fn a_task_that_returns_early_is_an_error_too() {
        let shutdown = CancellationToken::new();
        let liveness = health::Liveness::default();
        let tasks = vec![spawn("watch", async {})];
        let result = supervise(tasks, shutdown, liveness.clone(), Duration::from_secs(5)).await;
        assert!(matches!(
            result,
            Err(Error::TaskEnded { task: "watch", .. })
        ));
        assert!(liveness.failure().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_is_bounded_by_the_deadline() {
        let shutdown = CancellationToken::new();
        let liveness = health::Liveness::default();
        let writer_stop = CancellationToken::new();
        let stop = writer_stop.clone();
        // A writer that never finishes flushing once told to stop.
        let tasks = vec![
            spawn("writer", async move {
                stop.cancelled().await;
                std::future::pending::<()>().await
            })
            .stopped_by(writer_stop.clone()),
        ];
        shutdown.cancel();
        let started = tokio::time::Instant::now();
        let result = supervise(tasks, shutdown, liveness.clone(), Duration::from_secs(20)).await;
        assert!(result.is_ok(), "{result:?}");
        assert!(writer_stop.is_cancelled());
        assert_eq!(started.elapsed(), Duration::from_secs(20));
        assert!(
            liveness.failure().is_none(),
            "a requested stop is not a failure"
        );
    }
}
