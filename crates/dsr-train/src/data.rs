//! Data sets: listing, decoding, resizing, validation splits and prefetched batches.
//!
//! Two layouts are understood:
//!
//! * [`MvtecDataset`]: the MVTec AD layout `<root>/<category>/train/good/*`,
//!   `<root>/<category>/test/<defect>/*` and `<root>/<category>/ground_truth/<defect>/<stem>_mask.*`
//!   (a mask with the same stem as its image, without `_mask`, is accepted too). The category folder
//!   may also be the root itself, i.e. a root that directly contains `train/` and `test/`.
//! * [`FolderDataset`]: a generic layout with a normal folder, an optional abnormal folder, an
//!   optional folder of normal test images and an optional mask folder matched by file stem.
//!
//! Listing is deterministic: files are sorted by path. Image files are recognised by their extension
//! (`png`, `jpg`, `jpeg`, `tif`, `tiff`, `bmp`, case-insensitive); hidden files and other files are
//! ignored.
//!
//! Pre-processing follows the reference (anomalib): every image is decoded whatever its bit depth or
//! channel count, converted to RGB `f32` in `[0, 1]` (alpha is dropped, grayscale is replicated,
//! palettes are expanded, 16-bit values are divided by 65535), laid out CHW, and resized to the
//! configured size with antialiased bilinear interpolation. Masks are binarised (see
//! [`mask_to_binary`]: a pixel is anomalous when its brightest colour channel reaches half the full
//! scale, or, in a 0/1 label image, when it is 1) and resized with nearest-neighbour sampling.
//!
//! Masks and pixel metrics: when a data set has no masks at all (no `ground_truth` folder, or no mask
//! folder), test samples carry no mask and pixel metrics are to be skipped. When it has masks, every
//! abnormal test image must have one, otherwise listing fails with [`DataError::MissingMask`]; normal
//! images get an all-zero mask.
//!
//! # Example
//!
//! ```no_run
//! use dsr_train::data::{BatchLoader, LoadConfig, MvtecDataset};
//!
//! let data = MvtecDataset::open("datasets/MVTec".as_ref(), Some("bottle"))?;
//! let loader = BatchLoader::new(data.listing.train.clone(), LoadConfig::default(), 8)?.shuffle(42);
//! for batch in loader.prefetch(0) {
//!     let batch = batch?;
//!     let (images, _masks) = batch.into_tensors(&candle_core::Device::Cpu).expect("tensor");
//!     assert_eq!(images.dims()[1], 3);
//! }
//! # Ok::<(), dsr_train::data::DataError>(())
//! ```

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use dsr_eval::image::{decode_checked, image_to_chw, load_mask, ImageError};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

pub use dsr_eval::image::{OnError, DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS};

/// The defect type given to normal (defect-free) images.
pub const GOOD: &str = "good";

/// The expected MVTec AD layout, quoted in error messages.
const MVTEC_LAYOUT: &str =
    "<root>/<category>/train/good/*.png, <root>/<category>/test/<defect>/*.png \
     and optionally <root>/<category>/ground_truth/<defect>/<stem>_mask.png \
     (or a root that directly contains train/ and test/)";

/// Everything that can go wrong while listing or loading a data set. Every message names the file
/// or folder concerned.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or an image could not be read or decoded.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A file or folder could not be read.
    #[error("cannot read {}: {source}", .path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// No training image was found.
    #[error("no training images found in {}; expected layout: {expected}", .searched.display())]
    EmptyTrain {
        /// The folder that was searched.
        searched: PathBuf,
        /// A description of the expected layout.
        expected: String,
    },
    /// A folder the layout requires does not exist.
    #[error("folder {} does not exist; expected layout: {expected}", .path.display())]
    MissingFolder {
        /// The folder.
        path: PathBuf,
        /// A description of the expected layout.
        expected: String,
    },
    /// An abnormal image has no mask although the data set has masks.
    #[error(
        "abnormal image {} has no mask; looked for {} (any image extension)",
        .image.display(),
        paths_text(.searched)
    )]
    MissingMask {
        /// The image without mask.
        image: PathBuf,
        /// The mask paths that were tried (without extension).
        searched: Vec<PathBuf>,
    },
    /// Two files of one folder share a stem, so masks cannot be paired unambiguously.
    #[error("duplicate file stem {stem:?} in {}: {} and {}", .dir.display(), .first.display(), .second.display())]
    DuplicateStem {
        /// The folder.
        dir: PathBuf,
        /// The shared stem.
        stem: String,
        /// The first file.
        first: PathBuf,
        /// The second file.
        second: PathBuf,
    },
    /// Every file of a set failed to load under [`OnError::Skip`].
    #[error("none of the {count} images could be loaded; the first problem: {first}")]
    NothingLoaded {
        /// How many files were tried.
        count: usize,
        /// The first file's error.
        first: Box<DataError>,
    },
    /// An invalid setting (for example a zero image size, a zero batch size or a fraction outside
    /// `[0, 1]`).
    #[error("invalid data configuration: {0}")]
    Config(String),
}

/// Joins paths for an error message.
fn paths_text(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return "no mask path (the entry has none)".to_string();
    }
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" and ")
}

impl DataError {
    /// Wraps an I/O error with the path it concerns.
    fn io(path: &Path, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// How images are loaded: target size, pixel limit and error policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadConfig {
    /// Target height in pixels.
    pub height: u32,
    /// Target width in pixels.
    pub width: u32,
    /// Images with more pixels than this (width × height, read from the header) are refused.
    pub max_pixels: u64,
    /// The policy for files that cannot be loaded.
    pub on_error: OnError,
}

impl Default for LoadConfig {
    /// 256×256 (the DSR model size), 100 megapixels, [`OnError::Fail`].
    fn default() -> Self {
        LoadConfig::new(256, 256)
    }
}

impl LoadConfig {
    /// A configuration for `height`×`width` with the default pixel limit and [`OnError::Fail`].
    pub fn new(height: u32, width: u32) -> Self {
        LoadConfig {
            height,
            width,
            max_pixels: DEFAULT_MAX_PIXELS,
            on_error: OnError::Fail,
        }
    }

    /// Checks that the target size is not zero.
    fn validate(&self) -> Result<(), DataError> {
        if self.height == 0 || self.width == 0 {
            return Err(DataError::Config(format!(
                "target size {}x{} has a zero side",
                self.width, self.height
            )));
        }
        Ok(())
    }

    /// The number of pixels of one resized image (H·W).
    pub fn pixels(&self) -> usize {
        self.height as usize * self.width as usize
    }
}

/// One listed file: an image, its optional mask, its label and its defect type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The image file.
    pub path: PathBuf,
    /// The mask file, if the image is abnormal and the data set has masks.
    pub mask_path: Option<PathBuf>,
    /// `true` for an abnormal (defective) image.
    pub label: bool,
    /// The defect type (`"good"` for normal images).
    pub defect_type: String,
}

/// The listed files of a data set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// Training images (normal only), sorted by path.
    pub train: Vec<Entry>,
    /// Test images (normal and abnormal), sorted by path.
    pub test: Vec<Entry>,
    /// Whether the data set has masks; when `false`, pixel metrics are to be skipped.
    pub has_masks: bool,
}

/// A data set in the MVTec AD layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MvtecDataset {
    /// The category folder (the one that contains `train/` and `test/`).
    pub root: PathBuf,
    /// The listed files.
    pub listing: Listing,
}

impl MvtecDataset {
    /// Lists a data set in the MVTec AD layout.
    ///
    /// With `category = Some(c)`, `root/c` is used when it contains `train/`; otherwise `root` itself
    /// is used when it contains `train/` (so both `--data ROOT --category C` and a data-set folder
    /// that directly holds `train/` and `test/` work). Test folders other than `good` are defect
    /// types. Masks are looked up in `ground_truth/<defect>/` as `<stem>_mask.*`, then `<stem>.*`.
    pub fn open(root: &Path, category: Option<&str>) -> Result<Self, DataError> {
        let dir = match category {
            Some(c) if root.join(c).join("train").is_dir() => root.join(c),
            _ if root.join("train").is_dir() => root.to_path_buf(),
            Some(c) => {
                return Err(DataError::MissingFolder {
                    path: root.join(c).join("train"),
                    expected: MVTEC_LAYOUT.to_string(),
                })
            }
            None => {
                return Err(DataError::MissingFolder {
                    path: root.join("train"),
                    expected: MVTEC_LAYOUT.to_string(),
                })
            }
        };
        let train_dir = dir.join("train").join(GOOD);
        let train_files = if train_dir.is_dir() {
            list_images(&train_dir)?
        } else {
            Vec::new()
        };
        if train_files.is_empty() {
            return Err(DataError::EmptyTrain {
                searched: train_dir,
                expected: MVTEC_LAYOUT.to_string(),
            });
        }
        let train = train_files
            .into_iter()
            .map(|path| Entry {
                path,
                mask_path: None,
                label: false,
                defect_type: GOOD.to_string(),
            })
            .collect();

        let test_dir = dir.join("test");
        if !test_dir.is_dir() {
            return Err(DataError::MissingFolder {
                path: test_dir,
                expected: MVTEC_LAYOUT.to_string(),
            });
        }
        let gt_dir = dir.join("ground_truth");
        let has_masks = gt_dir.is_dir() && {
            let mut any = false;
            for sub in list_subdirs(&gt_dir)? {
                if !list_images(&sub)?.is_empty() {
                    any = true;
                    break;
                }
            }
            any
        };
        let mut test = Vec::new();
        for defect_dir in list_subdirs(&test_dir)? {
            let defect = file_name(&defect_dir);
            let files = list_images(&defect_dir)?;
            if defect == GOOD {
                test.extend(files.into_iter().map(|path| Entry {
                    path,
                    mask_path: None,
                    label: false,
                    defect_type: GOOD.to_string(),
                }));
                continue;
            }
            let masks = if has_masks {
                Some(MaskIndex::new(&gt_dir.join(&defect))?)
            } else {
                None
            };
            check_unique_stems(&defect_dir, &files)?;
            for path in files {
                let mask_path = match &masks {
                    Some(index) => Some(index.find(&path)?),
                    None => None,
                };
                test.push(Entry {
                    path,
                    mask_path,
                    label: true,
                    defect_type: defect.clone(),
                });
            }
        }
        test.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(MvtecDataset {
            root: dir,
            listing: Listing {
                train,
                test,
                has_masks,
            },
        })
    }
}

/// The folders of a generic data set.
#[derive(Debug, Clone, PartialEq)]
pub struct FolderLayout {
    /// Normal (defect-free) images.
    pub normal_dir: PathBuf,
    /// Abnormal images (test only); their defect type is the folder name.
    pub abnormal_dir: Option<PathBuf>,
    /// Normal test images. When absent, a seeded fraction of `normal_dir` goes to the test set.
    pub normal_test_dir: Option<PathBuf>,
    /// Masks of the abnormal images, matched by stem (`<stem>_mask.*` or `<stem>.*`).
    pub mask_dir: Option<PathBuf>,
    /// The fraction of `normal_dir` moved to the test set when `normal_test_dir` is absent
    /// (default 0.2, as anomalib's `normal_split_ratio`).
    pub normal_split_ratio: f64,
    /// The seed of that split.
    pub seed: u64,
}

impl FolderLayout {
    /// A layout with a normal and an abnormal folder, no masks, and a 0.2 normal split with seed 0.
    pub fn new(normal_dir: impl Into<PathBuf>, abnormal_dir: Option<PathBuf>) -> Self {
        FolderLayout {
            normal_dir: normal_dir.into(),
            abnormal_dir,
            normal_test_dir: None,
            mask_dir: None,
            normal_split_ratio: 0.2,
            seed: 0,
        }
    }
}

/// A data set in the generic folder layout.
#[derive(Debug, Clone, PartialEq)]
pub struct FolderDataset {
    /// The folders it was listed from.
    pub layout: FolderLayout,
    /// The listed files.
    pub listing: Listing,
}

impl FolderDataset {
    /// Lists a data set in the generic folder layout.
    pub fn open(layout: &FolderLayout) -> Result<Self, DataError> {
        let expected =
            "a normal folder of images, an optional abnormal folder, an optional normal \
                        test folder and an optional mask folder whose files match the abnormal \
                        images by stem"
                .to_string();
        check_fraction("normal_split_ratio", layout.normal_split_ratio)?;
        for dir in [Some(&layout.normal_dir), layout.abnormal_dir.as_ref()]
            .into_iter()
            .chain([layout.normal_test_dir.as_ref(), layout.mask_dir.as_ref()])
            .flatten()
        {
            if !dir.is_dir() {
                return Err(DataError::MissingFolder {
                    path: dir.clone(),
                    expected: expected.clone(),
                });
            }
        }
        let normal = |path: PathBuf| Entry {
            path,
            mask_path: None,
            label: false,
            defect_type: GOOD.to_string(),
        };
        let mut train: Vec<Entry> = list_images(&layout.normal_dir)?
            .into_iter()
            .map(normal)
            .collect();
        let mut test: Vec<Entry> = match &layout.normal_test_dir {
            Some(dir) => list_images(dir)?.into_iter().map(normal).collect(),
            None => {
                let mut order: Vec<usize> = (0..train.len()).collect();
                order.shuffle(&mut ChaCha8Rng::seed_from_u64(layout.seed));
                let n_test = (train.len() as f64 * layout.normal_split_ratio).round() as usize;
                let mut to_test = vec![false; train.len()];
                for &i in &order[..n_test.min(train.len())] {
                    to_test[i] = true;
                }
                let mut moved = Vec::new();
                let mut kept = Vec::new();
                for (entry, t) in train.into_iter().zip(to_test) {
                    if t {
                        moved.push(entry);
                    } else {
                        kept.push(entry);
                    }
                }
                train = kept;
                moved
            }
        };
        if train.is_empty() {
            return Err(DataError::EmptyTrain {
                searched: layout.normal_dir.clone(),
                expected,
            });
        }
        let has_masks = layout.mask_dir.is_some();
        if let Some(dir) = &layout.abnormal_dir {
            let files = list_images(dir)?;
            check_unique_stems(dir, &files)?;
            let masks = match &layout.mask_dir {
                Some(m) => Some(MaskIndex::new(m)?),
                None => None,
            };
            let defect = file_name(dir);
            for path in files {
                let mask_path = match &masks {
                    Some(index) => Some(index.find(&path)?),
                    None => None,
                };
                test.push(Entry {
                    path,
                    mask_path,
                    label: true,
                    defect_type: defect.clone(),
                });
            }
        }
        test.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(FolderDataset {
            layout: layout.clone(),
            listing: Listing {
                train,
                test,
                has_masks,
            },
        })
    }
}

/// Where the validation set comes from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValSplit {
    /// No validation set.
    None,
    /// A seeded fraction of the test set, stratified by label (anomalib's default, with 0.5).
    FromTest {
        /// The fraction of each label group moved to validation.
        fraction: f64,
        /// The shuffle seed.
        seed: u64,
    },
    /// A seeded fraction of the (normal-only) training set.
    FromTrain {
        /// The fraction of the training set held out.
        fraction: f64,
        /// The shuffle seed.
        seed: u64,
    },
    /// The validation set is a copy of the test set.
    SameAsTest,
}

/// Training, validation and test entries after a [`ValSplit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Splits {
    /// Training entries, sorted by path.
    pub train: Vec<Entry>,
    /// Validation entries, sorted by path.
    pub val: Vec<Entry>,
    /// Test entries, sorted by path.
    pub test: Vec<Entry>,
}

/// Splits a listing into training, validation and test entries.
///
/// Each split takes `round(n · fraction)` entries of each group (one group per label for
/// [`ValSplit::FromTest`], the whole training set for [`ValSplit::FromTrain`]) after a ChaCha8 shuffle
/// seeded with `seed`; the results are sorted by path again.
pub fn split_validation(listing: &Listing, split: ValSplit) -> Result<Splits, DataError> {
    let mut train = listing.train.clone();
    let mut test = listing.test.clone();
    let val = match split {
        ValSplit::None => Vec::new(),
        ValSplit::SameAsTest => test.clone(),
        ValSplit::FromTest { fraction, seed } => {
            check_fraction("validation fraction", fraction)?;
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut val = Vec::new();
            let mut rest = Vec::new();
            for label in [false, true] {
                let group: Vec<Entry> = test.iter().filter(|e| e.label == label).cloned().collect();
                let (v, r) = take_fraction(group, fraction, &mut rng);
                val.extend(v);
                rest.extend(r);
            }
            test = rest;
            val
        }
        ValSplit::FromTrain { fraction, seed } => {
            check_fraction("validation fraction", fraction)?;
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let (v, r) = take_fraction(train, fraction, &mut rng);
            train = r;
            v
        }
    };
    let mut val = val;
    for set in [&mut train, &mut val, &mut test] {
        set.sort_by(|a, b| a.path.cmp(&b.path));
    }
    Ok(Splits { train, val, test })
}

/// Moves `round(n · fraction)` seeded-random entries of `group` into the first returned vector.
fn take_fraction(
    group: Vec<Entry>,
    fraction: f64,
    rng: &mut ChaCha8Rng,
) -> (Vec<Entry>, Vec<Entry>) {
    let n_take = ((group.len() as f64 * fraction).round() as usize).min(group.len());
    let mut order: Vec<usize> = (0..group.len()).collect();
    order.shuffle(rng);
    let mut take = vec![false; group.len()];
    for &i in &order[..n_take] {
        take[i] = true;
    }
    let mut taken = Vec::new();
    let mut rest = Vec::new();
    for (entry, t) in group.into_iter().zip(take) {
        if t {
            taken.push(entry);
        } else {
            rest.push(entry);
        }
    }
    (taken, rest)
}

/// Checks that a fraction lies in `[0, 1]`.
fn check_fraction(name: &str, value: f64) -> Result<(), DataError> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(DataError::Config(format!(
            "{name} {value} is outside [0, 1]"
        )))
    }
}

/// The last component of a path as a string.
fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The stem of a path as a string.
fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Whether a path has one of the [`IMAGE_EXTENSIONS`].
fn is_image_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

/// Lists the image files (by extension, hidden files excluded) of a folder, sorted by path.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut files = Vec::new();
    for item in fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let item = item.map_err(|e| DataError::io(dir, e))?;
        let path = item.path();
        if file_name(&path).starts_with('.') || !is_image_file(&path) || !path.is_file() {
            continue;
        }
        files.push(path);
    }
    files.sort();
    Ok(files)
}

/// Lists the sub-folders (hidden ones excluded) of a folder, sorted by path.
fn list_subdirs(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut dirs = Vec::new();
    for item in fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let item = item.map_err(|e| DataError::io(dir, e))?;
        let path = item.path();
        if path.is_dir() && !file_name(&path).starts_with('.') {
            dirs.push(path);
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// Fails when two files of `files` (all in `dir`) share a stem.
fn check_unique_stems(dir: &Path, files: &[PathBuf]) -> Result<(), DataError> {
    let mut seen: BTreeMap<String, &PathBuf> = BTreeMap::new();
    for f in files {
        if let Some(first) = seen.insert(stem(f), f) {
            return Err(DataError::DuplicateStem {
                dir: dir.to_path_buf(),
                stem: stem(f),
                first: first.clone(),
                second: f.clone(),
            });
        }
    }
    Ok(())
}

/// The masks of one folder, indexed by stem.
struct MaskIndex {
    /// The mask folder.
    dir: PathBuf,
    /// Stem → mask file.
    by_stem: BTreeMap<String, PathBuf>,
}

impl MaskIndex {
    /// Indexes a mask folder; a missing folder gives an empty index.
    fn new(dir: &Path) -> Result<Self, DataError> {
        let files = if dir.is_dir() {
            list_images(dir)?
        } else {
            Vec::new()
        };
        check_unique_stems(dir, &files)?;
        let by_stem = files.into_iter().map(|f| (stem(&f), f)).collect();
        Ok(MaskIndex {
            dir: dir.to_path_buf(),
            by_stem,
        })
    }

    /// Finds the mask of an image: `<stem>_mask.*` first, then `<stem>.*`.
    fn find(&self, image: &Path) -> Result<PathBuf, DataError> {
        let s = stem(image);
        let with_suffix = format!("{s}_mask");
        self.by_stem
            .get(&with_suffix)
            .or_else(|| self.by_stem.get(&s))
            .cloned()
            .ok_or_else(|| DataError::MissingMask {
                image: image.to_path_buf(),
                searched: vec![self.dir.join(with_suffix), self.dir.join(s)],
            })
    }
}

/// Loads one image as RGB `f32` CHW (3·H·W) at the configured size.
pub fn load_image(path: &Path, config: &LoadConfig) -> Result<Vec<f32>, DataError> {
    config.validate()?;
    let image = decode_checked(path, config.max_pixels)?;
    Ok(image_to_chw(&image, config.height, config.width))
}

/// One loaded sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The image file.
    pub path: PathBuf,
    /// RGB image, CHW, 3·H·W values in `[0, 1]`.
    pub image: Vec<f32>,
    /// Binary mask, H·W values in `{0, 1}`; `None` when masks are not loaded.
    pub mask: Option<Vec<f32>>,
    /// `true` for an abnormal image.
    pub label: bool,
    /// The defect type (`"good"` for normal images).
    pub defect_type: String,
}

/// Loads one entry.
///
/// With `with_masks`, the sample gets a mask: its mask file (which must have the image's size), or
/// all zeros for a normal image without mask; an abnormal image without mask is an error. Without
/// `with_masks`, the mask is `None`.
pub fn load_sample(
    entry: &Entry,
    config: &LoadConfig,
    with_masks: bool,
) -> Result<Sample, DataError> {
    config.validate()?;
    let decoded = decode_checked(&entry.path, config.max_pixels)?;
    let image_size = [decoded.height() as usize, decoded.width() as usize];
    let image = image_to_chw(&decoded, config.height, config.width);
    drop(decoded);
    let mask = if !with_masks {
        None
    } else {
        match &entry.mask_path {
            Some(mask_path) => Some(load_mask(
                mask_path,
                [config.height as usize, config.width as usize],
                config.max_pixels,
                &entry.path,
                image_size,
            )?),
            None if !entry.label => Some(vec![0.0; config.pixels()]),
            None => {
                return Err(DataError::MissingMask {
                    image: entry.path.clone(),
                    searched: Vec::new(),
                })
            }
        }
    };
    Ok(Sample {
        path: entry.path.clone(),
        image,
        mask,
        label: entry.label,
        defect_type: entry.defect_type.clone(),
    })
}

/// A batch in contiguous buffers, ready for `candle_core::Tensor::from_vec`.
#[derive(Debug)]
pub struct Batch {
    /// Images, B×3×H×W, row-major.
    pub images: Vec<f32>,
    /// Masks, B×1×H×W, row-major; `None` when masks are not loaded.
    pub masks: Option<Vec<f32>>,
    /// Labels (`true` = abnormal), one per sample.
    pub labels: Vec<bool>,
    /// Image files, one per sample.
    pub paths: Vec<PathBuf>,
    /// Defect types, one per sample.
    pub defect_types: Vec<String>,
    /// Image height H.
    pub height: u32,
    /// Image width W.
    pub width: u32,
    /// Files skipped under [`OnError::Skip`], with the reason; always empty under [`OnError::Fail`].
    pub skipped: Vec<DataError>,
}

impl Batch {
    /// The number of samples B (skipped files excluded; may be zero under [`OnError::Skip`]).
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the batch has no sample.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Moves the buffers into tensors: images B×3×H×W and masks B×1×H×W.
    pub fn into_tensors(
        self,
        device: &candle_core::Device,
    ) -> candle_core::Result<(candle_core::Tensor, Option<candle_core::Tensor>)> {
        let (b, h, w) = (self.len(), self.height as usize, self.width as usize);
        let images = candle_core::Tensor::from_vec(self.images, (b, 3, h, w), device)?;
        let masks = match self.masks {
            Some(m) => Some(candle_core::Tensor::from_vec(m, (b, 1, h, w), device)?),
            None => None,
        };
        Ok((images, masks))
    }
}

/// Loads entries in parallel (rayon) into one batch, in the order given.
///
/// Under [`OnError::Fail`] the error of the first failing entry (in the order given) is returned;
/// under [`OnError::Skip`] failing entries are left out and listed in [`Batch::skipped`].
pub fn load_batch(
    entries: &[Entry],
    config: &LoadConfig,
    with_masks: bool,
) -> Result<Batch, DataError> {
    config.validate()?;
    let results: Vec<Result<Sample, DataError>> = entries
        .par_iter()
        .map(|e| load_sample(e, config, with_masks))
        .collect();
    let plane = config.pixels();
    let mut batch = Batch {
        images: Vec::with_capacity(entries.len() * 3 * plane),
        masks: with_masks.then(|| Vec::with_capacity(entries.len() * plane)),
        labels: Vec::with_capacity(entries.len()),
        paths: Vec::with_capacity(entries.len()),
        defect_types: Vec::with_capacity(entries.len()),
        height: config.height,
        width: config.width,
        skipped: Vec::new(),
    };
    for result in results {
        match result {
            Ok(sample) => {
                batch.images.extend_from_slice(&sample.image);
                if let (Some(masks), Some(mask)) = (batch.masks.as_mut(), sample.mask.as_ref()) {
                    masks.extend_from_slice(mask);
                }
                batch.labels.push(sample.label);
                batch.paths.push(sample.path);
                batch.defect_types.push(sample.defect_type);
            }
            Err(e) => match config.on_error {
                OnError::Fail => return Err(e),
                OnError::Skip => batch.skipped.push(e),
            },
        }
    }
    Ok(batch)
}

/// Loads a whole set of images (for example the training set, which DSR keeps in memory) under the
/// error policy of `config`: under [`OnError::Fail`] the first unreadable file stops the loading
/// with its error; under [`OnError::Skip`] unreadable files are left out and listed in
/// [`Batch::skipped`] (the caller reports them), and only a set in which no file loads is an error
/// ([`DataError::NothingLoaded`]).
pub fn load_images(
    entries: &[Entry],
    config: &LoadConfig,
    with_masks: bool,
) -> Result<Batch, DataError> {
    let mut batch = load_batch(entries, config, with_masks)?;
    if batch.is_empty() && !batch.skipped.is_empty() {
        let count = batch.skipped.len();
        return Err(DataError::NothingLoaded {
            count,
            first: Box::new(batch.skipped.swap_remove(0)),
        });
    }
    Ok(batch)
}

/// Splits a set of entries into batches, optionally in a seeded shuffled order, and loads them
/// sequentially or with prefetching.
#[derive(Debug, Clone)]
pub struct BatchLoader {
    /// The entries.
    entries: Arc<[Entry]>,
    /// The load configuration.
    config: LoadConfig,
    /// Samples per batch.
    batch_size: usize,
    /// The shuffle seed; `None` keeps the listing order.
    seed: Option<u64>,
    /// Whether a last incomplete batch is dropped.
    drop_last: bool,
    /// Whether masks are loaded.
    with_masks: bool,
}

impl BatchLoader {
    /// A loader over `entries` with `batch_size` samples per batch, in listing order, keeping the
    /// last incomplete batch and loading no masks.
    pub fn new(
        entries: Vec<Entry>,
        config: LoadConfig,
        batch_size: usize,
    ) -> Result<Self, DataError> {
        config.validate()?;
        if batch_size == 0 {
            return Err(DataError::Config("batch size is zero".to_string()));
        }
        Ok(BatchLoader {
            entries: entries.into(),
            config,
            batch_size,
            seed: None,
            drop_last: false,
            with_masks: false,
        })
    }

    /// Shuffles the entries every epoch with a ChaCha8 generator seeded with `seed` on stream
    /// `epoch`, so every epoch has its own reproducible order.
    pub fn shuffle(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Drops (or keeps) a last batch smaller than the batch size.
    pub fn drop_last(mut self, drop_last: bool) -> Self {
        self.drop_last = drop_last;
        self
    }

    /// Loads masks (see [`load_sample`]).
    pub fn with_masks(mut self, with_masks: bool) -> Self {
        self.with_masks = with_masks;
        self
    }

    /// The entries of this loader.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The number of batches per epoch.
    pub fn num_batches(&self) -> usize {
        let n = self.entries.len();
        if self.drop_last {
            n / self.batch_size
        } else {
            n.div_ceil(self.batch_size)
        }
    }

    /// The entry indices of every batch of epoch `epoch`.
    pub fn epoch_order(&self, epoch: u64) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..self.entries.len()).collect();
        if let Some(seed) = self.seed {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(epoch);
            order.shuffle(&mut rng);
        }
        order
            .chunks(self.batch_size)
            .take(self.num_batches())
            .map(|c| c.to_vec())
            .collect()
    }

    /// Loads the entries at `indices` as one batch.
    pub fn load(&self, indices: &[usize]) -> Result<Batch, DataError> {
        let entries: Vec<Entry> = indices
            .iter()
            .filter_map(|&i| self.entries.get(i).cloned())
            .collect();
        load_batch(&entries, &self.config, self.with_masks)
    }

    /// Loads the batches of epoch `epoch` one after the other on the calling thread; iteration ends
    /// after the first error.
    pub fn sequential(&self, epoch: u64) -> impl Iterator<Item = Result<Batch, DataError>> + '_ {
        let mut batches = self.epoch_order(epoch).into_iter();
        let mut failed = false;
        std::iter::from_fn(move || {
            if failed {
                return None;
            }
            let result = self.load(&batches.next()?);
            failed = result.is_err();
            Some(result)
        })
    }

    /// Loads the batches of epoch `epoch` on a background thread, one batch ahead of the caller;
    /// the batches are the same as [`BatchLoader::sequential`]'s and iteration ends after the
    /// first error.
    pub fn prefetch(&self, epoch: u64) -> Prefetch {
        let loader = self.clone();
        let order = self.epoch_order(epoch);
        let (tx, rx) = sync_channel(1);
        let worker = std::thread::spawn(move || {
            for indices in order {
                let result = loader.load(&indices);
                let failed = result.is_err();
                if tx.send(result).is_err() || failed {
                    break;
                }
            }
        });
        Prefetch {
            rx: Some(rx),
            worker: Some(worker),
        }
    }
}

/// A prefetching batch iterator (see [`BatchLoader::prefetch`]). Dropping it stops the background
/// thread after the batch it is loading.
#[derive(Debug)]
pub struct Prefetch {
    /// Receives loaded batches; `None` once dropped.
    rx: Option<Receiver<Result<Batch, DataError>>>,
    /// The loading thread.
    worker: Option<JoinHandle<()>>,
}

impl Iterator for Prefetch {
    type Item = Result<Batch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.rx.as_ref()?.recv().ok()
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        // Closing the channel first makes a blocked send fail, so the worker ends and can be joined.
        self.rx.take();
        if let Some(worker) = self.worker.take() {
            // The worker only loads files and reports errors as values, so a join error cannot carry
            // anything useful and is ignored.
            let _ = worker.join();
        }
    }
}
