#!/usr/bin/env bash
# The longer runs of the reliability proof (RELIABILITY.md), beyond what hack/test.sh runs once:
# the property tests with many more cases, then the fault and abuse tests ROUNDS times. Every
# round's FIGURES lines are appended to target/soak-figures.log.
#
#   hack/soak.sh [ROUNDS]    ROUNDS defaults to 5; PROPTEST_CASES (20000) and
#                            PROPTEST_RNG_SEED choose the property-test cases
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-5}

BIN=$(hack/control-plane.sh build)
NATS_BIN=$(hack/nats.sh build)
export PATH="$BIN:$NATS_BIN:$PATH"
LOG=target/soak-figures.log
mkdir -p target

PROPTEST_CASES=${PROPTEST_CASES:-20000} cargo test --locked --lib proptests

# Module and test-name prefixes: cargo runs the tests matching any of them.
FAULTS=(faults_control_plane:: faults_receivers:: abuse:: crash:: leader::killing
  jetstream::a_killed ssrf:: secrets_never_leak:: replicas:: rate_limit_and_ordering::ordering_holds_across
  rate_limit_and_ordering::jetstream_ordering_holds_across)
for round in $(seq "$ROUNDS"); do
  printf '\n==> round %s of %s\n' "$round" "$ROUNDS"
  cargo test --locked --features test-seams --test e2e -- --nocapture "${FAULTS[@]}" 2>&1 |
    tee target/soak-round.log | grep -E '^FIGURES|^test result|FAILED|panicked' || true
  grep -oE 'FIGURES.*' target/soak-round.log | sed "s/^/round=$round /" >>"$LOG"
  grep -q '^test result: ok' target/soak-round.log || { echo "round $round failed: target/soak-round.log" >&2; exit 1; }
done
echo "figures of every round: $LOG"
