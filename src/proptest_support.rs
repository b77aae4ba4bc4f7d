//! Settings shared by the property tests: a fixed seed and a small case count, so that CI runs
//! the same cases every time and quickly. A longer run:
//! `PROPTEST_CASES=20000 cargo test --lib proptests` (add `PROPTEST_RNG_SEED=<u64>` for other
//! cases than the fixed seed's).

use proptest::test_runner::{Config, RngSeed};

/// The seed CI uses unless `PROPTEST_RNG_SEED` says otherwise.
const CI_SEED: u64 = 0x686f_6f6b_7265_6c61;

/// `cases` unless `PROPTEST_CASES` is set; the fixed seed unless `PROPTEST_RNG_SEED` is set.
pub fn config(cases: u32) -> Config {
    // Config::default() reads the PROPTEST_* variables.
    let mut config = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
        config.rng_seed = RngSeed::Fixed(CI_SEED);
    }
    // The seed reproduces a failure; no regression files in the tree.
    config.failure_persistence = None;
    config
}
