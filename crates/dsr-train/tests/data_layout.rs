//! Listing (MVTec and folder layouts), validation splits and the prefetching batch loader of the
//! data module, on images generated into a temporary folder.

use std::fs;
use std::path::{Path, PathBuf};

use dsr_train::data::{
    split_validation, BatchLoader, DataError, Entry, FolderDataset, FolderLayout, LoadConfig,
    MvtecDataset, ValSplit,
};
use image::{ImageBuffer, Luma};

mod tempdir;
use tempdir::TempDir;

/// Writes a small gray PNG with a constant value, creating its folder.
fn gray(path: &Path, value: u8) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    ImageBuffer::from_pixel(6, 4, Luma([value]))
        .save(path)
        .unwrap();
}

/// Builds a small MVTec-style category folder at `dir`.
fn mvtec_category(dir: &Path, with_masks: bool) {
    for i in 0..3 {
        gray(&dir.join(format!("train/good/{i:03}.png")), 10 + i);
    }
    gray(&dir.join("test/good/000.png"), 50);
    gray(&dir.join("test/good/001.png"), 51);
    gray(&dir.join("test/crack/000.png"), 60);
    gray(&dir.join("test/crack/001.png"), 61);
    gray(&dir.join("test/scratch/000.png"), 70);
    fs::write(dir.join("test/crack/README.txt"), "ignored").unwrap();
    if with_masks {
        gray(&dir.join("ground_truth/crack/000_mask.png"), 255);
        // A mask with the same stem as its image is accepted too.
        gray(&dir.join("ground_truth/crack/001.png"), 255);
        gray(&dir.join("ground_truth/scratch/000_mask.png"), 0);
    }
}

fn names(entries: &[Entry], root: &Path) -> Vec<String> {
    entries
        .iter()
        .map(|e| e.path.strip_prefix(root).unwrap().display().to_string())
        .collect()
}

#[test]
fn mvtec_layout_lists_sorted_files_and_pairs_masks() {
    let tmp = TempDir::new("data-layout", "mvtec");
    let root = tmp.path("data");
    mvtec_category(&root.join("bottle"), true);
    let ds = MvtecDataset::open(&root, Some("bottle")).unwrap();
    let cat = root.join("bottle");
    assert_eq!(ds.root, cat);
    assert!(ds.listing.has_masks);
    assert_eq!(
        names(&ds.listing.train, &cat),
        vec![
            "train/good/000.png",
            "train/good/001.png",
            "train/good/002.png"
        ]
    );
    assert!(ds
        .listing
        .train
        .iter()
        .all(|e| !e.label && e.mask_path.is_none()));
    assert_eq!(
        names(&ds.listing.test, &cat),
        vec![
            "test/crack/000.png",
            "test/crack/001.png",
            "test/good/000.png",
            "test/good/001.png",
            "test/scratch/000.png"
        ]
    );
    let masks: Vec<Option<PathBuf>> = ds
        .listing
        .test
        .iter()
        .map(|e| e.mask_path.clone())
        .collect();
    assert_eq!(
        masks,
        vec![
            Some(cat.join("ground_truth/crack/000_mask.png")),
            Some(cat.join("ground_truth/crack/001.png")),
            None,
            None,
            Some(cat.join("ground_truth/scratch/000_mask.png")),
        ]
    );
    let labels: Vec<bool> = ds.listing.test.iter().map(|e| e.label).collect();
    assert_eq!(labels, vec![true, true, false, false, true]);
    let types: Vec<&str> = ds
        .listing
        .test
        .iter()
        .map(|e| e.defect_type.as_str())
        .collect();
    assert_eq!(types, vec!["crack", "crack", "good", "good", "scratch"]);

    // A root that directly contains train/ and test/ works with or without a category.
    let direct = MvtecDataset::open(&cat, None).unwrap();
    assert_eq!(direct.listing, ds.listing);
    let named = MvtecDataset::open(&cat, Some("bottle")).unwrap();
    assert_eq!(named.listing, ds.listing);
}

#[test]
fn mvtec_without_ground_truth_has_no_masks() {
    let tmp = TempDir::new("data-layout", "no-gt");
    let cat = tmp.path("cat");
    mvtec_category(&cat, false);
    let ds = MvtecDataset::open(&cat, None).unwrap();
    assert!(!ds.listing.has_masks);
    assert_eq!(ds.listing.test.len(), 5);
    assert!(ds.listing.test.iter().all(|e| e.mask_path.is_none()));
}

#[test]
fn mvtec_layout_errors_name_the_folder_or_file() {
    let tmp = TempDir::new("data-layout", "mvtec-errors");

    // Missing category.
    let err = MvtecDataset::open(&tmp.path("nothing"), Some("bottle")).unwrap_err();
    assert!(matches!(err, DataError::MissingFolder { .. }), "{err:?}");
    assert!(err.to_string().contains("bottle"), "{err}");

    // Empty train folder.
    let empty = tmp.path("empty");
    fs::create_dir_all(empty.join("train/good")).unwrap();
    fs::create_dir_all(empty.join("test/good")).unwrap();
    let err = MvtecDataset::open(&empty, None).unwrap_err();
    assert!(matches!(err, DataError::EmptyTrain { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&empty.join("train/good").display().to_string()),
        "{msg}"
    );
    assert!(msg.contains("ground_truth"), "{msg}");

    // A defect image without mask while the data set has masks.
    let missing = tmp.path("missing");
    mvtec_category(&missing, true);
    gray(&missing.join("test/crack/002.png"), 62);
    let err = MvtecDataset::open(&missing, None).unwrap_err();
    assert!(matches!(err, DataError::MissingMask { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&missing.join("test/crack/002.png").display().to_string()),
        "{msg}"
    );
    assert!(msg.contains("002_mask"), "{msg}");

    // Two files with one stem in a defect folder.
    let dup = tmp.path("dup");
    mvtec_category(&dup, true);
    ImageBuffer::from_pixel(6, 4, Luma([1u8]))
        .save(dup.join("test/crack/000.bmp"))
        .unwrap();
    let err = MvtecDataset::open(&dup, None).unwrap_err();
    assert!(matches!(err, DataError::DuplicateStem { .. }), "{err:?}");
    assert!(err.to_string().contains("000.bmp"), "{err}");
}

#[test]
fn folder_layout_lists_splits_and_pairs_masks() {
    let tmp = TempDir::new("data-layout", "folder");
    for i in 0..10 {
        gray(&tmp.path(&format!("ok/{i:02}.png")), i);
    }
    gray(&tmp.path("bad/x.png"), 100);
    gray(&tmp.path("bad/y.png"), 101);
    gray(&tmp.path("masks/x_mask.png"), 255);
    gray(&tmp.path("masks/y.png"), 255);

    let mut layout = FolderLayout::new(tmp.path("ok"), Some(tmp.path("bad")));
    layout.mask_dir = Some(tmp.path("masks"));
    layout.seed = 3;
    let ds = FolderDataset::open(&layout).unwrap();
    assert!(ds.listing.has_masks);
    assert_eq!(ds.listing.train.len(), 8);
    let normal_test: Vec<&Entry> = ds.listing.test.iter().filter(|e| !e.label).collect();
    assert_eq!(normal_test.len(), 2);
    // Train and test normals are disjoint and together are every normal image.
    let mut all: Vec<PathBuf> = ds
        .listing
        .train
        .iter()
        .chain(normal_test.iter().copied())
        .map(|e| e.path.clone())
        .collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 10);
    let abnormal: Vec<(PathBuf, Option<PathBuf>, String)> = ds
        .listing
        .test
        .iter()
        .filter(|e| e.label)
        .map(|e| (e.path.clone(), e.mask_path.clone(), e.defect_type.clone()))
        .collect();
    assert_eq!(
        abnormal,
        vec![
            (
                tmp.path("bad/x.png"),
                Some(tmp.path("masks/x_mask.png")),
                "bad".to_string()
            ),
            (
                tmp.path("bad/y.png"),
                Some(tmp.path("masks/y.png")),
                "bad".to_string()
            ),
        ]
    );
    // Same seed, same split.
    assert_eq!(FolderDataset::open(&layout).unwrap().listing, ds.listing);

    // A separate normal test folder, and no masks.
    gray(&tmp.path("ok_test/t.png"), 5);
    let mut layout = FolderLayout::new(tmp.path("ok"), Some(tmp.path("bad")));
    layout.normal_test_dir = Some(tmp.path("ok_test"));
    let ds = FolderDataset::open(&layout).unwrap();
    assert!(!ds.listing.has_masks);
    assert_eq!(ds.listing.train.len(), 10);
    assert_eq!(
        names(&ds.listing.test, &tmp.0),
        vec!["bad/x.png", "bad/y.png", "ok_test/t.png"]
    );

    // A mask folder that lacks a mask.
    fs::remove_file(tmp.path("masks/y.png")).unwrap();
    let mut layout = FolderLayout::new(tmp.path("ok"), Some(tmp.path("bad")));
    layout.mask_dir = Some(tmp.path("masks"));
    let err = FolderDataset::open(&layout).unwrap_err();
    assert!(matches!(err, DataError::MissingMask { .. }), "{err:?}");
    assert!(err.to_string().contains("y.png"), "{err}");

    // An empty normal folder.
    fs::create_dir_all(tmp.path("none")).unwrap();
    let err = FolderDataset::open(&FolderLayout::new(tmp.path("none"), None)).unwrap_err();
    assert!(matches!(err, DataError::EmptyTrain { .. }), "{err:?}");
    assert!(err
        .to_string()
        .contains(&tmp.path("none").display().to_string()));
}

#[test]
fn validation_split_is_seeded_and_stratified() {
    let tmp = TempDir::new("data-layout", "val");
    let cat = tmp.path("cat");
    for i in 0..4 {
        gray(&cat.join(format!("train/good/{i}.png")), 1);
    }
    for i in 0..10 {
        gray(&cat.join(format!("test/good/{i}.png")), 1);
    }
    for i in 0..6 {
        gray(&cat.join(format!("test/dent/{i}.png")), 1);
    }
    let listing = MvtecDataset::open(&cat, None).unwrap().listing;

    let split = ValSplit::FromTest {
        fraction: 0.5,
        seed: 7,
    };
    let s = split_validation(&listing, split).unwrap();
    assert_eq!(s.train, listing.train);
    assert_eq!(s.val.iter().filter(|e| !e.label).count(), 5);
    assert_eq!(s.val.iter().filter(|e| e.label).count(), 3);
    assert_eq!(s.test.len(), 8);
    assert!(s.val.iter().all(|v| !s.test.contains(v)));
    assert!(s.val.windows(2).all(|w| w[0].path < w[1].path));
    assert_eq!(split_validation(&listing, split).unwrap(), s);
    let other = split_validation(
        &listing,
        ValSplit::FromTest {
            fraction: 0.5,
            seed: 8,
        },
    )
    .unwrap();
    assert_eq!(other.val.len(), 8);

    let s = split_validation(
        &listing,
        ValSplit::FromTrain {
            fraction: 0.25,
            seed: 1,
        },
    )
    .unwrap();
    assert_eq!((s.train.len(), s.val.len(), s.test.len()), (3, 1, 16));

    let s = split_validation(&listing, ValSplit::SameAsTest).unwrap();
    assert_eq!(s.val, listing.test);
    let s = split_validation(&listing, ValSplit::None).unwrap();
    assert!(s.val.is_empty());

    let err = split_validation(
        &listing,
        ValSplit::FromTest {
            fraction: 1.5,
            seed: 0,
        },
    )
    .unwrap_err();
    assert!(matches!(err, DataError::Config(_)), "{err:?}");
}

#[test]
fn prefetching_yields_the_same_batches_as_sequential_loading() {
    let tmp = TempDir::new("data-layout", "prefetch");
    let entries: Vec<Entry> = (0..11u8)
        .map(|i| {
            let p = tmp.path(&format!("img/{i:02}.png"));
            gray(&p, i * 20);
            Entry {
                path: p,
                mask_path: None,
                label: false,
                defect_type: "good".to_string(),
            }
        })
        .collect();
    let loader = BatchLoader::new(entries.clone(), LoadConfig::new(4, 4), 4)
        .unwrap()
        .shuffle(123);
    assert_eq!(loader.num_batches(), 3);
    for epoch in 0..2 {
        let seq: Vec<_> = loader.sequential(epoch).map(|b| b.unwrap()).collect();
        let pre: Vec<_> = loader.prefetch(epoch).map(|b| b.unwrap()).collect();
        assert_eq!(seq.len(), 3);
        assert_eq!(pre.len(), 3);
        for (a, b) in seq.iter().zip(&pre) {
            assert_eq!(a.paths, b.paths);
            assert_eq!(a.images, b.images);
            assert_eq!(a.labels, b.labels);
        }
        // Every image appears exactly once per epoch.
        let mut seen: Vec<PathBuf> = seq.iter().flat_map(|b| b.paths.clone()).collect();
        seen.sort();
        assert_eq!(
            seen,
            entries.iter().map(|e| e.path.clone()).collect::<Vec<_>>()
        );
    }
    // The order is shuffled, reproducible, and different between epochs.
    assert_eq!(loader.epoch_order(0), loader.epoch_order(0));
    assert_ne!(loader.epoch_order(0), loader.epoch_order(1));
    let identity: Vec<usize> = (0..11).collect();
    assert_ne!(loader.epoch_order(0).concat(), identity);

    let unshuffled = BatchLoader::new(entries.clone(), LoadConfig::new(4, 4), 4)
        .unwrap()
        .drop_last(true);
    assert_eq!(unshuffled.num_batches(), 2);
    assert_eq!(
        unshuffled.epoch_order(5).concat(),
        (0..8).collect::<Vec<_>>()
    );

    // A failing batch ends both iterators after the error; an early drop stops the worker.
    fs::write(&entries[5].path, b"").unwrap();
    let plain = BatchLoader::new(entries, LoadConfig::new(4, 4), 4).unwrap();
    let seq: Vec<bool> = plain.sequential(0).map(|b| b.is_ok()).collect();
    let pre: Vec<bool> = plain.prefetch(0).map(|b| b.is_ok()).collect();
    assert_eq!(seq, vec![true, false]);
    assert_eq!(pre, seq);
    let mut it = plain.prefetch(0);
    assert!(it.next().unwrap().is_ok());
    drop(it);

    let err = BatchLoader::new(Vec::new(), LoadConfig::new(4, 4), 0).unwrap_err();
    assert!(matches!(err, DataError::Config(_)), "{err:?}");
}

#[test]
fn battery_weld_lists_when_present() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/battery_weld");
    if !root.is_dir() {
        eprintln!("skipping: {} is absent", root.display());
        return;
    }
    let ds = MvtecDataset::open(&root, Some("battery_weld")).unwrap();
    assert!(ds.listing.has_masks);
    assert_eq!(ds.listing.train.len(), 37);
    assert_eq!(ds.listing.test.len(), 35 + 93);
    let abnormal: Vec<&Entry> = ds.listing.test.iter().filter(|e| e.label).collect();
    assert_eq!(abnormal.len(), 93);
    assert!(abnormal
        .iter()
        .all(|e| e.mask_path.is_some() && e.defect_type == "defective"));
    // Load a few defective samples with their masks.
    let batch = dsr_train::data::load_batch(
        &abnormal[..4]
            .iter()
            .map(|e| (*e).clone())
            .collect::<Vec<_>>(),
        &LoadConfig::default(),
        true,
    )
    .unwrap();
    assert_eq!(batch.images.len(), 4 * 3 * 256 * 256);
    let masks = batch.masks.unwrap();
    assert!(masks.iter().all(|&v| v == 0.0 || v == 1.0));
}
