//! Property tests of metric invariants and unit tests of edge cases.

use dsr_eval::metrics::{
    aupro, auroc, average_precision, f1_adaptive_threshold, f1_max, f1_score_at,
    metrics_per_defect_type, BinaryCurve, EvalSet, Metrics, MetricsError, DEFAULT_FPR_LIMIT,
};
use dsr_eval::postprocess::PostProcessor;
use proptest::prelude::*;

/// Scores drawn from a small grid so that ties are frequent, with labels holding both classes.
fn scored_labels() -> impl Strategy<Value = (Vec<f32>, Vec<bool>)> {
    (2usize..60)
        .prop_flat_map(|n| {
            (
                proptest::collection::vec((0u32..16).prop_map(|v| v as f32 / 16.0), n),
                proptest::collection::vec(any::<bool>(), n),
            )
        })
        .prop_filter("both classes", |(_, labels)| {
            labels.iter().any(|&l| l) && labels.iter().any(|&l| !l)
        })
}

/// Random maps and masks of a few small images, with at least one anomalous and one normal pixel.
fn maps_and_masks() -> impl Strategy<Value = (Vec<f32>, Vec<bool>, usize, usize)> {
    (1usize..4, 1usize..7, 1usize..7)
        .prop_flat_map(|(n, h, w)| {
            (
                proptest::collection::vec((0u32..32).prop_map(|v| v as f32 / 32.0), n * h * w),
                proptest::collection::vec(proptest::bool::weighted(0.3), n * h * w),
                Just(h),
                Just(w),
            )
        })
        .prop_filter("both classes", |(_, masks, _, _)| {
            masks.iter().any(|&m| m) && masks.iter().any(|&m| !m)
        })
}

proptest! {
    #[test]
    fn perfect_ranking_gives_one(labels in proptest::collection::vec(any::<bool>(), 2..80)) {
        prop_assume!(labels.iter().any(|&l| l) && labels.iter().any(|&l| !l));
        // Every positive scores above every negative; distinct values inside each class.
        let scores: Vec<f32> = labels
            .iter()
            .enumerate()
            .map(|(i, &l)| if l { 10.0 + i as f32 } else { i as f32 / 100.0 })
            .collect();
        prop_assert_eq!(auroc(&scores, &labels).unwrap(), 1.0);
        prop_assert!((average_precision(&scores, &labels).unwrap() - 1.0).abs() < 1e-12);
        prop_assert!((f1_max(&scores, &labels).unwrap().value - 1.0).abs() < 1e-9);
        // Reversing the ranking gives AUROC 0.
        let reversed: Vec<f32> = scores.iter().map(|s| -s).collect();
        prop_assert_eq!(auroc(&reversed, &labels).unwrap(), 0.0);
    }

    #[test]
    fn label_flip_gives_complement((scores, labels) in scored_labels()) {
        let flipped: Vec<bool> = labels.iter().map(|l| !l).collect();
        let a = auroc(&scores, &labels).unwrap();
        let b = auroc(&scores, &flipped).unwrap();
        prop_assert!((a + b - 1.0).abs() < 1e-12, "{} + {} != 1", a, b);
    }

    #[test]
    fn auroc_matches_pair_counting((scores, labels) in scored_labels()) {
        // AUROC is the probability that a positive outranks a negative, ties counting one half.
        let mut wins = 0.0;
        let mut pairs = 0.0;
        for (i, &li) in labels.iter().enumerate() {
            for (j, &lj) in labels.iter().enumerate() {
                if li && !lj {
                    pairs += 1.0;
                    if scores[i] > scores[j] {
                        wins += 1.0;
                    } else if scores[i] == scores[j] {
                        wins += 0.5;
                    }
                }
            }
        }
        prop_assert!((auroc(&scores, &labels).unwrap() - wins / pairs).abs() < 1e-12);
    }

    #[test]
    fn metrics_invariant_under_monotone_transform((scores, labels) in scored_labels()) {
        // x -> exp(3x) - 7 is strictly increasing and keeps the grid values distinct in f32.
        let transformed: Vec<f32> = scores.iter().map(|&s| (3.0 * s).exp() - 7.0).collect();
        prop_assert_eq!(auroc(&scores, &labels).unwrap(), auroc(&transformed, &labels).unwrap());
        prop_assert_eq!(
            average_precision(&scores, &labels).unwrap(),
            average_precision(&transformed, &labels).unwrap()
        );
        prop_assert_eq!(
            f1_max(&scores, &labels).unwrap().value,
            f1_max(&transformed, &labels).unwrap().value
        );
    }

    #[test]
    fn f1_max_bounds_f1_at_any_threshold((scores, labels) in scored_labels(), t in 0u32..17) {
        let best = f1_max(&scores, &labels).unwrap();
        let at = f1_score_at(&scores, &labels, t as f32 / 16.0).unwrap();
        prop_assert!(at <= best.value + 1e-9);
        // F1Max counts the threshold itself as positive; just below it (the grid spacing is 1/16),
        // the strict rule agrees.
        let below = best.threshold - 1e-3;
        let at_best = f1_score_at(&scores, &labels, below).unwrap();
        prop_assert!((at_best - best.value).abs() < 1e-9);
    }

    #[test]
    fn aupro_and_normalisation_stay_in_unit_interval(
        (maps, masks, h, w) in maps_and_masks(),
        limit in 0.01f64..=1.0,
    ) {
        let result = aupro(&maps, &masks, h, w, limit).unwrap();
        prop_assert!((0.0..=1.0 + 1e-12).contains(&result.value), "{}", result.value);
        prop_assert!(result.fpr.windows(2).all(|f| f[0] <= f[1]));
        prop_assert!((result.fpr[result.fpr.len() - 1] - limit).abs() < 1e-12);

        let n = maps.len() / (h * w);
        let scores: Vec<f32> = maps.chunks(h * w).map(|m| m.iter().copied().fold(0.0, f32::max)).collect();
        let labels: Vec<bool> = masks.chunks(h * w).map(|m| m.iter().any(|&b| b)).collect();
        prop_assert_eq!(scores.len(), n);
        let post = PostProcessor::fit(&scores, &labels, &maps, &masks).unwrap();
        for v in post.normalize_map(&maps) {
            prop_assert!((0.0..=1.0).contains(&v));
        }
        for &s in &scores {
            let v = post.normalize_score(s);
            prop_assert!((0.0..=1.0).contains(&v));
            prop_assert_eq!(v > 0.5, post.image_label(s));
        }
        // Values far outside the validation range still clamp into [0, 1].
        prop_assert_eq!(post.normalize_map(&[-1e30, 1e30]), vec![0.0, 1.0]);
    }
}

#[test]
fn all_equal_scores_give_chance_level() {
    let scores = [0.5_f32; 6];
    let labels = [true, false, true, false, false, true];
    assert_eq!(auroc(&scores, &labels).unwrap(), 0.5);
    assert!((average_precision(&scores, &labels).unwrap() - 0.5).abs() < 1e-12);
    let best = f1_max(&scores, &labels).unwrap();
    assert_eq!(best.threshold, 0.5);
    assert!((best.value - 2.0 / 3.0).abs() < 1e-9);
    // The strict rule labels nothing positive at the only threshold.
    assert_eq!(f1_score_at(&scores, &labels, 0.5).unwrap(), 0.0);
}

#[test]
fn single_class_is_an_error_not_nan() {
    let scores = [0.1_f32, 0.7, 0.3];
    let negatives = [false; 3];
    let positives = [true; 3];
    assert_eq!(
        auroc(&scores, &negatives),
        Err(MetricsError::MissingClass {
            metric: "AUROC",
            class: "positive"
        })
    );
    assert_eq!(
        auroc(&scores, &positives),
        Err(MetricsError::MissingClass {
            metric: "AUROC",
            class: "negative"
        })
    );
    assert!(matches!(
        average_precision(&scores, &negatives),
        Err(MetricsError::MissingClass {
            class: "positive",
            ..
        })
    ));
    assert!(matches!(
        f1_max(&scores, &negatives),
        Err(MetricsError::MissingClass {
            class: "positive",
            ..
        })
    ));
    // Without negatives every precision is 1.
    assert_eq!(average_precision(&scores, &positives).unwrap(), 1.0);
    let curve = BinaryCurve::new(&scores, &negatives).unwrap();
    assert!(curve.roc().is_err());
    assert!(curve.pr().is_err());
}

#[test]
fn adaptive_threshold_fallbacks() {
    let scores = [0.1_f32, 0.7, 0.3];
    // No positive: the largest value; no negative: the smallest.
    assert_eq!(f1_adaptive_threshold(&scores, &[false; 3]).unwrap(), 0.7);
    assert_eq!(f1_adaptive_threshold(&scores, &[true; 3]).unwrap(), 0.1);
    assert_eq!(
        f1_adaptive_threshold(&scores, &[false, true, false]).unwrap(),
        0.7
    );
}

#[test]
fn f1_max_picks_lowest_threshold_among_equal_scores() {
    // At 0.8: tp 1, fp 0 -> F1 = 2/3. At 0.4: tp 2, fp 2 -> F1 = 2/3 as well; the lower one wins.
    let scores = [0.8_f32, 0.4, 0.4, 0.4, 0.1];
    let labels = [true, true, false, false, false];
    let best = f1_max(&scores, &labels).unwrap();
    assert_eq!(best.threshold, 0.4);
    assert!((best.value - 2.0 / 3.0).abs() < 1e-9);
}

#[test]
fn malformed_input_is_an_error() {
    assert_eq!(
        auroc(&[], &[]),
        Err(MetricsError::Empty {
            what: "predictions"
        })
    );
    assert_eq!(
        auroc(&[0.1, 0.2], &[true]),
        Err(MetricsError::LengthMismatch {
            what: "targets",
            expected: 2,
            got: 1
        })
    );
    assert_eq!(
        auroc(&[0.1, f32::NAN], &[true, false]),
        Err(MetricsError::NotANumber {
            what: "predictions",
            index: 1
        })
    );
    let maps = [0.1_f32, 0.9, 0.2, 0.3];
    let masks = [false, true, false, false];
    assert_eq!(
        aupro(&maps, &masks, 2, 2, 0.0),
        Err(MetricsError::InvalidFprLimit(0.0))
    );
    assert!(matches!(
        aupro(&maps, &masks, 3, 1, DEFAULT_FPR_LIMIT),
        Err(MetricsError::InvalidShape { .. })
    ));
    assert!(matches!(
        aupro(&maps, &[false; 4], 2, 2, DEFAULT_FPR_LIMIT),
        Err(MetricsError::MissingClass {
            metric: "AUPRO",
            class: "positive"
        })
    ));
    assert!(matches!(
        aupro(&maps, &[true; 4], 2, 2, DEFAULT_FPR_LIMIT),
        Err(MetricsError::MissingClass {
            metric: "AUPRO",
            class: "negative"
        })
    ));
    assert!(matches!(
        EvalSet::new(&[0.5], &[true], &maps, &masks, 2, 1),
        Err(MetricsError::LengthMismatch { what: "maps", .. })
    ));
}

#[test]
fn aupro_interpolates_at_the_limit() {
    // One image, one region of two pixels and four background pixels.
    let maps = [0.9_f32, 0.5, 0.8, 0.3, 0.2, 0.1];
    let masks = [true, true, false, false, false, false];
    let r = aupro(&maps, &masks, 2, 3, 0.3).unwrap();
    // Points: (0,0), (0, 0.5) at 0.9, (0.25, 0.5) at 0.8, then (0.25, 1) at 0.5, then (0.5, 1)
    // beyond the limit, so the curve ends at (0.3, 1).
    assert_eq!(r.fpr, vec![0.0, 0.0, 0.25, 0.25, 0.3]);
    assert_eq!(r.pro, vec![0.0, 0.5, 0.5, 1.0, 1.0]);
    let area = 0.25 * 0.5 + 0.05 * 1.0;
    assert!((r.value - area / 0.3).abs() < 1e-12);
}

#[test]
fn per_defect_type_shares_good_images() {
    let scores = [0.1_f32, 0.2, 0.9, 0.15, 0.8];
    let labels = [false, false, true, true, true];
    let maps = [
        0.1, 0.0, // good
        0.2, 0.1, // good
        0.9, 0.1, // scratch
        0.05, 0.3, // scratch
        0.1, 0.8, // hole
    ];
    let masks = [
        false, false, false, false, true, false, false, true, false, true,
    ];
    let types = ["good", "good", "scratch", "scratch", "hole"];
    let set = EvalSet::new(&scores, &labels, &maps, &masks, 1, 2).unwrap();
    let post = PostProcessor::fit(&scores, &labels, &maps, &masks).unwrap();
    let per_type = metrics_per_defect_type(&set, &types, &post).unwrap();
    assert_eq!(per_type.keys().collect::<Vec<_>>(), ["hole", "scratch"]);
    assert_eq!(per_type["hole"].image_auroc, 1.0);
    // Scratch: the score 0.15 falls between the two good scores.
    assert_eq!(per_type["scratch"].image_auroc, 0.75);
    let whole = Metrics::compute(&set, &post).unwrap();
    assert_eq!(whole.pixel_auroc, 1.0);
    assert!(metrics_per_defect_type(&set, &types[..4], &post).is_err());
}
