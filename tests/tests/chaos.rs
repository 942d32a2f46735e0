//! The bounded chaos set of `make test` (docs/benchmarks.md, "Chaos"): every fault kind of
//! the chaos suite once, in a fixed order with fixed-seed targets and holds,
//! on a chaos lab under the benchmark's writer. No invariant may break
//! (one writer, recovery after every fault, no acknowledged write lost where
//! none may be). `make chaos` runs the randomized, longer version.

use anyhow::Result;
use jai_lab::chaos::{run_chaos, ChaosOptions, FaultKind};
use jai_lab::{Lab, LabSpec};
use std::time::Duration;

mod common;

/// The schedule's seed (targets and hold times); `JAI_CHAOS_SEED` replays another.
const SEED: u64 = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_kind_once_breaks_no_invariant() -> Result<()> {
    // A prefix of its own: nothing else on the machine mistakes it for a
    // stale test lab.
    let dir = tempfile::Builder::new()
        .prefix("jai-chaos-test-")
        .disable_cleanup(std::env::var_os("JAI_KEEP_LAB").is_some())
        .tempdir_in("/tmp")?;
    let mut lab = Lab::up(LabSpec {
        chaos: true,
        ..common::spec(&dir, 3, 3)
    })
    .await?;
    let options = ChaosOptions {
        sequence: Some(FaultKind::ALL.to_vec()),
        // Long enough for a dead leader's lease (ttl 4 s) to expire, so that
        // the kills fail over rather than restart in place.
        hold_min: Duration::from_millis(4500),
        hold_max: Duration::from_secs(6),
        recovery_timeout: Duration::from_secs(90),
        ..ChaosOptions::new(
            Duration::from_secs(600),
            jai_lab::chaos::seed_from_env(Some(SEED))?,
        )
    };
    let report = run_chaos(&mut lab, &options).await?;
    println!("{}", report.render());
    assert_eq!(
        report.faults.len(),
        FaultKind::ALL.len(),
        "every kind once:\n{}",
        report.render()
    );
    // Known agent bug (docs/benchmarks.md, "Chaos"): with the primary's agent
    // frozen nothing fences its PostgreSQL, and HAProxy keeps its open
    // sessions until the new leader pushes it down, which it does only after
    // promoting; writes acknowledged in between are on the old timeline.
    // Reported here, fatal with JAI_CHAOS_STRICT=1 (and in `make chaos`).
    let strict = std::env::var_os("JAI_CHAOS_STRICT").is_some();
    let (known, violations): (Vec<&String>, Vec<&String>) = report
        .violations
        .iter()
        .partition(|violation| !strict && violation.contains("was seen writable on timeline"));
    for violation in &known {
        eprintln!("KNOWN AGENT BUG (not failing; JAI_CHAOS_STRICT=1 makes it fail): {violation}");
    }
    assert!(
        violations.is_empty(),
        "invariant violations (seed {}, logs in {}/nodes/*/agent.log):\n{}",
        report.seed,
        dir.path().display(),
        violations
            .iter()
            .map(|violation| violation.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(report.acked > 0, "the writer never got through");
    Ok(())
}
