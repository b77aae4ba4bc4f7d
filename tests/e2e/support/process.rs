//! Plumbing for the programs the harness runs: a helper script that must succeed, and the
//! memory a running process holds (for the tests that bound the operator's RSS).

use std::process::Command;

/// Runs `cmd` to completion, panicking with its output unless it succeeds; returns its stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// VmRSS of a process in MiB (Linux /proc), e.g. of an [`Operator`](super::Operator) child.
pub fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc readable");
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status");
    kib / 1024.0
}

/// The release binary, as `hack/test.sh` builds it (`cargo build --release --bin hookrelay`)
/// before the tests: `release/hookrelay` of the target directory this test binary is in
/// (`<target>/debug/deps/<test>-<hash>`).
pub fn release_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let target = exe
        .ancestors()
        .nth(3)
        .expect("a test binary under <target>/debug/deps");
    let binary = target.join("release/hookrelay");
    assert!(
        binary.is_file(),
        "{} is missing: build it first with cargo build --release --bin hookrelay (hack/test.sh does)",
        binary.display()
    );
    binary
}
