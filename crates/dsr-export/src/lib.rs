//! # dsr-export
//!
//! A DSR checkpoint as an ONNX model, to serve it where the `dsr` binary does not run (ONNX
//! Runtime, NVIDIA Triton Inference Server, KServe, OpenVINO): the evaluation forward of
//! [`dsr_core::DsrModel`] in standard ONNX operators, with the checkpoint's weights as
//! initializers under their PyTorch state_dict names and its metadata (configuration, image
//! size, output map, post-processor) in the model's `metadata_props`.
//!
//! The graph takes [`INPUT`], `N×3×H×W` float RGB in `[0, 1]` at the checkpoint's image size
//! (images decoded and resized as [`dsr_eval::image::load_image`] does, with no further
//! normalisation, as `dsr predict` feeds the model), and gives [`ANOMALY_MAP`] (`N×H×W`) and
//! [`PRED_SCORE`] (`N`), the raw outputs of `dsr predict --raw`. When the checkpoint stores a
//! post-processor it also gives [`NORMALIZED_MAP`], [`NORMALIZED_SCORE`], [`PRED_MASK`] and
//! [`PRED_LABEL`], as [`dsr_eval::PostProcessor`] computes them.
//!
//! Architecture invariant: this crate knows checkpoints and post-processing through dsr-eval and
//! dsr-core; it knows nothing about training or the command line.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let model_path = dsr_export_doc::fixture_model()?;
//! use dsr_export::{export_file, ExportOptions};
//!
//! let model = export_file(&model_path, &ExportOptions { dynamic_batch: true, ..Default::default() })?;
//! let graph = model.graph.as_ref().expect("a graph");
//! assert_eq!(graph.input[0].name, dsr_export::INPUT);
//! assert!(graph.initializer.iter().any(|t| t.name == "discrete_latent_model._vq_vae_top._embedding.weight"));
//! let bytes = dsr_export::to_bytes(&model)?;
//! assert!(!bytes.is_empty());
//! # Ok(())
//! # }
//! # mod dsr_export_doc { include!(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/fixture_model.rs")); }
//! ```

#![deny(missing_docs)]

mod error;
mod graph;
mod network;

use std::collections::BTreeMap;
use std::path::Path;

use dsr_core::weights::{
    load_checkpoint, write_atomic, Checkpoint, META_CONFIG, META_IMAGE_SIZE, META_OUTPUT_MAP,
};
use dsr_eval::postprocess::{PostProcessor, METADATA_KEY};
use dsr_eval::{EvalError, DEFAULT_IMAGE_SIZE};
use onnx_protobuf::tensor_proto::DataType;
use onnx_protobuf::tensor_shape_proto::{dimension, Dimension};
use onnx_protobuf::type_proto;
use onnx_protobuf::{
    ModelProto, OperatorSetIdProto, StringStringEntryProto, TensorShapeProto, TypeProto,
    ValueInfoProto,
};
use protobuf::Message;

pub use error::{ExportError, Result};
pub use onnx_protobuf;

use graph::GraphBuilder;

/// The name of the input: `N×3×H×W` float RGB in `[0, 1]`.
pub const INPUT: &str = "image";
/// The raw anomaly map, `N×H×W` (as `dsr predict --raw` writes it).
pub const ANOMALY_MAP: &str = "anomaly_map";
/// The raw image score, `N`.
pub const PRED_SCORE: &str = "pred_score";
/// The normalised anomaly map in `[0, 1]` (pixel threshold at 0.5), with a post-processor.
pub const NORMALIZED_MAP: &str = "normalized_anomaly_map";
/// The normalised image score in `[0, 1]` (image threshold at 0.5), with a post-processor.
pub const NORMALIZED_SCORE: &str = "normalized_score";
/// The predicted mask (bool, `N×H×W`: raw map above the pixel threshold), with a post-processor.
pub const PRED_MASK: &str = "pred_mask";
/// The predicted label (bool, `N`: raw score above the image threshold), with a post-processor.
pub const PRED_LABEL: &str = "pred_label";
/// The `producer_name` of the models written here.
pub const PRODUCER: &str = "dsr-rs";
/// The name of the batch dimension of a model exported with a dynamic batch.
pub const BATCH_DIM: &str = "batch";
/// The lowest opset written (per-axis `Softmax`, optional `Resize` inputs, `ReduceSum` axes as
/// an input).
pub const MIN_OPSET: i64 = 13;
/// The highest opset written.
pub const MAX_OPSET: i64 = 21;
/// The default opset.
pub const DEFAULT_OPSET: i64 = 17;

/// How to export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportOptions {
    /// The ONNX opset of the default domain ([`MIN_OPSET`] to [`MAX_OPSET`]).
    pub opset: i64,
    /// A free batch dimension ([`BATCH_DIM`]) instead of a batch of one.
    pub dynamic_batch: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            opset: DEFAULT_OPSET,
            dynamic_batch: false,
        }
    }
}

/// The IR version that goes with an opset (the lowest that declares it).
fn ir_version(opset: i64) -> i64 {
    match opset {
        ..=14 => 7,
        15..=18 => 8,
        19..=20 => 9,
        _ => 10,
    }
}

/// A graph input or output of float (or bool) elements and the given dimensions; `None` is the
/// batch dimension when it is free.
fn value_info(name: &str, elem: DataType, dims: &[Option<usize>]) -> ValueInfoProto {
    let mut shape = TensorShapeProto::new();
    shape.dim = dims
        .iter()
        .map(|d| {
            let mut dim = Dimension::new();
            dim.value = Some(match d {
                Some(n) => dimension::Value::DimValue(*n as i64),
                None => dimension::Value::DimParam(BATCH_DIM.to_string()),
            });
            dim
        })
        .collect();
    let mut tensor = type_proto::Tensor::new();
    tensor.elem_type = elem as i32;
    tensor.shape = Some(shape).into();
    let mut ty = TypeProto::new();
    ty.value = Some(type_proto::Value::TensorType(tensor));
    let mut info = ValueInfoProto::new();
    info.name = name.to_string();
    info.type_ = Some(ty).into();
    info
}

/// Reads the checkpoint `path` as `dsr predict` does (configuration required, every tensor
/// checked against it, image size and post-processor from the metadata) and exports it.
pub fn export_file(path: &Path, opts: &ExportOptions) -> Result<ModelProto> {
    if !path.exists() {
        return Err(EvalError::MissingModel(path.to_path_buf()).into());
    }
    let ckpt = load_checkpoint(path).map_err(|source| EvalError::ReadModel {
        path: path.to_path_buf(),
        source,
    })?;
    export_checkpoint(&ckpt, opts)
}

/// Exports a checkpoint already read (see [`export_file`]).
pub fn export_checkpoint(ckpt: &Checkpoint, opts: &ExportOptions) -> Result<ModelProto> {
    if !(MIN_OPSET..=MAX_OPSET).contains(&opts.opset) {
        return Err(ExportError::Opset(opts.opset));
    }
    let path = &ckpt.path;
    let cfg = ckpt
        .config
        .ok_or_else(|| EvalError::NoConfig(path.clone()))?;
    let [h, w] = ckpt.image_size.unwrap_or(DEFAULT_IMAGE_SIZE);
    cfg.validate_image_size(h, w)
        .map_err(|source| EvalError::ImageSize {
            path: path.clone(),
            source,
        })?;
    let build = |source| EvalError::BuildModel {
        path: path.clone(),
        source,
    };
    let output = ckpt.output_map().map_err(build)?;
    // Building the model checks every network tensor against the configuration and the
    // feature memory against the map it serves; the memory enters the graph as a constant.
    let blend = ckpt
        .build_model(&cfg, &candle_core::Device::Cpu)
        .map_err(build)?
        .feature_memory()
        .and_then(|m| m.blend());
    let post = match ckpt.metadata.get(METADATA_KEY) {
        Some(json) => {
            Some(
                PostProcessor::from_json(json).map_err(|source| EvalError::PostProcessor {
                    path: path.clone(),
                    key: METADATA_KEY,
                    source,
                })?,
            )
        }
        None => None,
    };

    let mut g = GraphBuilder::new(&ckpt.tensors, opts.opset);
    let out = g.dsr_forward(&cfg, INPUT, output, blend, ANOMALY_MAP, PRED_SCORE)?;
    let n = (!opts.dynamic_batch).then_some(1);
    let mut outputs = vec![
        value_info(ANOMALY_MAP, DataType::FLOAT, &[n, Some(h), Some(w)]),
        value_info(PRED_SCORE, DataType::FLOAT, &[n]),
    ];
    if let Some(post) = &post {
        g.normalize(
            &out.anomaly_map,
            post.pixel_threshold,
            post.pixel_min,
            post.pixel_max,
            NORMALIZED_MAP,
        );
        g.normalize(
            &out.pred_score,
            post.image_threshold,
            post.image_min,
            post.image_max,
            NORMALIZED_SCORE,
        );
        g.above(&out.anomaly_map, post.pixel_threshold, PRED_MASK);
        g.above(&out.pred_score, post.image_threshold, PRED_LABEL);
        outputs.extend([
            value_info(NORMALIZED_MAP, DataType::FLOAT, &[n, Some(h), Some(w)]),
            value_info(NORMALIZED_SCORE, DataType::FLOAT, &[n]),
            value_info(PRED_MASK, DataType::BOOL, &[n, Some(h), Some(w)]),
            value_info(PRED_LABEL, DataType::BOOL, &[n]),
        ]);
    }

    let mut graph = onnx_protobuf::GraphProto::new();
    graph.name = "dsr".to_string();
    graph.doc_string = "DSR surface anomaly detection, evaluation forward".to_string();
    graph.input = vec![value_info(
        INPUT,
        DataType::FLOAT,
        &[n, Some(3), Some(h), Some(w)],
    )];
    graph.output = outputs;
    graph.node = std::mem::take(&mut g.nodes);
    graph.initializer = std::mem::take(&mut g.initializers);

    let mut metadata: BTreeMap<String, String> = ckpt.metadata.clone();
    metadata.insert(
        META_CONFIG.to_string(),
        serde_json::to_string(&cfg).map_err(|e| ExportError::Encode(e.to_string()))?,
    );
    metadata.insert(META_IMAGE_SIZE.to_string(), format!("[{h}, {w}]"));
    metadata.insert(META_OUTPUT_MAP.to_string(), output.name().to_string());
    metadata.insert(
        "dsr.input".to_string(),
        format!("{INPUT}: float32 N×3×{h}×{w}, RGB in [0, 1] (decoded and resized with antialiased bilinear interpolation, no mean/std normalisation)"),
    );
    let mut names = vec![ANOMALY_MAP, PRED_SCORE];
    if post.is_some() {
        names.extend([NORMALIZED_MAP, NORMALIZED_SCORE, PRED_MASK, PRED_LABEL]);
    }
    metadata.insert("dsr.outputs".to_string(), names.join(","));

    let mut opset = OperatorSetIdProto::new();
    opset.domain = String::new();
    opset.version = opts.opset;
    let mut model = ModelProto::new();
    model.ir_version = ir_version(opts.opset);
    model.opset_import = vec![opset];
    model.producer_name = PRODUCER.to_string();
    model.producer_version = env!("CARGO_PKG_VERSION").to_string();
    model.doc_string = format!("exported from {}", path.display());
    model.graph = Some(graph).into();
    model.metadata_props = metadata
        .into_iter()
        .map(|(key, value)| {
            let mut e = StringStringEntryProto::new();
            e.key = key;
            e.value = value;
            e
        })
        .collect();
    Ok(model)
}

/// The serialised model (the bytes of a `.onnx` file).
pub fn to_bytes(model: &ModelProto) -> Result<Vec<u8>> {
    model
        .write_to_bytes()
        .map_err(|e| ExportError::Encode(e.to_string()))
}

/// Parses the bytes of a `.onnx` file.
pub fn from_bytes(bytes: &[u8]) -> Result<ModelProto> {
    ModelProto::parse_from_bytes(bytes).map_err(|e| ExportError::Encode(e.to_string()))
}

/// Whether `path` is a model this exporter wrote (an ONNX model whose producer is
/// [`PRODUCER`]).
pub fn is_exported_model(path: &Path) -> bool {
    std::fs::read(path)
        .ok()
        .and_then(|bytes| from_bytes(&bytes).ok())
        .is_some_and(|m| m.producer_name == PRODUCER && m.graph.is_some())
}

/// Writes `model` to `out` atomically (temporary file, then rename). A file already at `out` is
/// replaced only when it is a model this exporter wrote ([`is_exported_model`]); anything else
/// is an error and stays untouched.
pub fn write_model(model: &ModelProto, out: &Path) -> Result<()> {
    if out.exists() && !is_exported_model(out) {
        return Err(ExportError::WouldOverwrite(out.to_path_buf()));
    }
    let bytes = to_bytes(model)?;
    write_atomic(out, &bytes).map_err(|source| ExportError::Write {
        path: out.to_path_buf(),
        source,
    })
}

impl GraphBuilder<'_> {
    /// `output = clamp((v − threshold) / (max − min) + 0.5, 0, 1)`, the post-processor's
    /// normalisation; when `max − min` is not a positive finite number, its limit (1 above the
    /// threshold, 0 below, 0.5 at it), as [`PostProcessor`] does.
    fn normalize(&mut self, v: &str, threshold: f32, min: f32, max: f32, output: &str) {
        let range = f64::from(max) - f64::from(min);
        let t = self.const_f32(&format!("{output}.threshold"), &[], &[threshold]);
        if range > 0.0 && range.is_finite() {
            let r = self.const_f32(&format!("{output}.range"), &[], &[range as f32]);
            let half = self.const_f32("dsr.const.half", &[], &[0.5]);
            let zero = self.const_f32("dsr.const.zero", &[], &[0.0]);
            let one = self.const_f32("dsr.const.one", &[], &[1.0]);
            let x = self.node("Sub", &[v, &t], vec![], output);
            let x = self.node("Div", &[&x, &r], vec![], output);
            let x = self.node("Add", &[&x, &half], vec![], output);
            self.node_to("Clip", &[&x, &zero, &one], vec![], output);
        } else {
            let half = self.const_f32("dsr.const.half", &[], &[0.5]);
            let zero = self.const_f32("dsr.const.zero", &[], &[0.0]);
            let one = self.const_f32("dsr.const.one", &[], &[1.0]);
            let above = self.node("Greater", &[v, &t], vec![], output);
            let below = self.node("Less", &[v, &t], vec![], output);
            let low = self.node("Where", &[&below, &zero, &half], vec![], output);
            self.node_to("Where", &[&above, &one, &low], vec![], output);
        }
    }

    /// `output = v > threshold` (bool).
    fn above(&mut self, v: &str, threshold: f32, output: &str) {
        let t = self.const_f32(&format!("{output}.threshold"), &[], &[threshold]);
        self.node_to("Greater", &[v, &t], vec![], output);
    }
}
