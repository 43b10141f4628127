//! Statistical agreement with the reference fixture at 96×128, sized for CI.
//!
//! The full comparison (2000 samples at every size) is the `augment_stats` example. Here 500 samples per
//! generator are used; the tolerance formula is the same (4 · sqrt(se_ref² + se_ours²)), and it widens by
//! itself because our standard errors are computed from our own, smaller sample.

mod common;

use common::{compare, reference, run, Generator};
use dsr_augment::stats::Summary;

#[test]
fn statistics_agree_with_the_reference_at_96x128() {
    let (h, w) = (96, 128);
    let mut failures = Vec::new();
    let mut compared = 0;
    for (g, generator) in Generator::ALL.into_iter().enumerate() {
        let reference = reference(h, w, generator).expect("the fixture has 96x128 results");
        let samples = run(generator, h, w, 500, 77 + g as u64);
        let summary = Summary::from_samples(&samples, 200);
        for row in compare(&summary, &reference) {
            compared += 1;
            if !row.pass {
                failures.push(format!(
                    "{} {}: ours {:.5} ref {:.5} tol {:.5}",
                    generator.label(),
                    row.statistic,
                    row.ours,
                    row.reference,
                    row.tolerance
                ));
            }
        }
    }
    assert_eq!(compared, 2 * 7 + 4 * 11);
    assert!(
        failures.is_empty(),
        "statistics out of tolerance:\n{}",
        failures.join("\n")
    );
}
