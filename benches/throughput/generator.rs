//! The load generator in a process of its own (`HOOKRELAY_BENCH_GENERATOR=process`): the bench
//! runs itself again as the generator, so that sending does not share a process, a runtime or
//! an allocator with the receiver, as with an independent load tool. The same `Load` sends the
//! same requests; times cross the process boundary as wall-clock nanoseconds and are mapped
//! back onto this process's `Instant`s, which the receiver's arrivals are measured in.

use std::{
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::{Load, Reply, Sent, Settings, cost};

/// The environment variable that makes the bench a generator: the job, as JSON.
pub const JOB: &str = "HOOKRELAY_BENCH_GENERATOR_JOB";

/// CPU time the generator processes spent, for the ceiling's CPU per 1,000 requests.
pub static CHILD_CPU_NS: AtomicU64 = AtomicU64::new(0);

/// One run of the generator.
#[derive(serde::Serialize, serde::Deserialize)]
struct Job {
    url: String,
    sign: bool,
    first_seq: u64,
    connections: usize,
    seconds: f64,
    /// None: a closed loop of `connections`; Some: an open loop at this rate.
    rate: Option<u32>,
    max_in_flight: usize,
}

/// An `Instant` and the wall clock read together: both processes read the same system clock,
/// while `Instant`s mean nothing outside the process that took them.
struct Clock {
    instant: Instant,
    wall_ns: u128,
}

impl Clock {
    fn now() -> Clock {
        Clock {
            instant: Instant::now(),
            wall_ns: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("the clock is after 1970")
                .as_nanos(),
        }
    }

    fn to_wall(&self, at: Instant) -> u128 {
        match at.checked_duration_since(self.instant) {
            Some(after) => self.wall_ns + after.as_nanos(),
            None => self.wall_ns - self.instant.duration_since(at).as_nanos(),
        }
    }

    fn to_instant(&self, wall_ns: u128) -> Instant {
        let nanos = |n: u128| Duration::from_nanos(u64::try_from(n).expect("within 584 years"));
        if wall_ns >= self.wall_ns {
            self.instant + nanos(wall_ns - self.wall_ns)
        } else {
            self.instant - nanos(self.wall_ns - wall_ns)
        }
    }
}

fn reply_code(reply: Reply) -> u8 {
    match reply {
        Reply::Accepted => 0,
        Reply::TooManyRequests => 1,
        Reply::Failed => 2,
        Reply::Unsent => 3,
    }
}

fn reply_of(code: &str) -> Reply {
    match code {
        "0" => Reply::Accepted,
        "1" => Reply::TooManyRequests,
        "2" => Reply::Failed,
        "3" => Reply::Unsent,
        other => panic!("the generator answered {other:?} for a reply"),
    }
}

/// Runs one load of `load`'s URL in a child process and returns what it sent; `load`'s
/// sequence numbers continue after the child's.
pub async fn in_child(load: &Load, rate: Option<u32>, settings: &Settings) -> Vec<Sent> {
    let job = Job {
        url: load.url.clone(),
        sign: load.sign,
        first_seq: load.next_seq.load(Ordering::Relaxed),
        connections: settings.connections,
        seconds: match rate {
            None => settings.seconds,
            Some(_) => settings.rate_seconds,
        }
        .as_secs_f64(),
        rate,
        max_in_flight: settings.max_in_flight,
    };
    let out = tokio::process::Command::new(std::env::current_exe().expect("the bench's path"))
        .env(JOB, serde_json::to_string(&job).expect("a job serializes"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .await
        .expect("the generator process starts");
    assert!(
        out.status.success(),
        "the generator process failed: {}",
        out.status
    );
    let clock = Clock::now();
    let mut sent = Vec::new();
    for line in String::from_utf8(out.stdout)
        .expect("the generator prints text")
        .lines()
    {
        let fields: Vec<&str> = line.split(' ').collect();
        match fields[..] {
            ["cpu", nanos] => {
                CHILD_CPU_NS.fetch_add(nanos.parse().expect("CPU nanoseconds"), Ordering::Relaxed);
            }
            [seq, reply, wall_ns] => sent.push(Sent {
                seq: seq.parse().expect("a sequence number"),
                reply: reply_of(reply),
                at: clock.to_instant(wall_ns.parse().expect("wall-clock nanoseconds")),
            }),
            _ => panic!("the generator printed {line:?}"),
        }
    }
    let next = sent
        .iter()
        .filter(|s| s.reply != Reply::Unsent)
        .map(|s| s.seq + 1)
        .max()
        .unwrap_or(job.first_seq);
    load.next_seq.fetch_max(next, Ordering::Relaxed);
    sent
}

/// The generator's side: runs the job `json` and prints one line per request (sequence
/// number, reply, wall-clock nanoseconds when sent), then its own CPU time.
pub async fn serve(json: &str) {
    let job: Job = serde_json::from_str(json).expect("a job from the bench");
    let load = Arc::new(Load::new(
        job.url,
        job.sign,
        Arc::new(AtomicU64::new(job.first_seq)),
        job.connections,
    ));
    let duration = Duration::from_secs_f64(job.seconds);
    let sent = match job.rate {
        None => load.closed_loop(job.connections, duration).await,
        Some(rate) => load.open_loop(rate, duration, job.max_in_flight).await,
    };
    if let Some(why) = load.first_failure.lock().unwrap().take() {
        eprintln!("  generator: first failure: {why}");
    }
    let clock = Clock::now();
    let mut out = String::with_capacity(sent.len() * 40);
    for s in &sent {
        let _ = writeln!(
            out,
            "{} {} {}",
            s.seq,
            reply_code(s.reply),
            clock.to_wall(s.at)
        );
    }
    let cpu = cost::cpu_time(std::process::id());
    let _ = writeln!(out, "cpu {}", cpu.as_nanos());
    use std::io::Write as _;
    std::io::stdout()
        .write_all(out.as_bytes())
        .expect("stdout takes the results");
}
