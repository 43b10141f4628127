//! The exported graph of the reference fixture model, read back from its bytes: inputs and
//! outputs, operators, initializers (the state_dict tensors the evaluation forward reads, under
//! their keys and with their values), a well-ordered graph, the metadata, each branch (output
//! map, post-processor, opset), and the file guards. The numerical check against `dsr predict`
//! runs in ONNX Runtime (`cargo xtask onnx-check`, in CI).

mod support {
    include!("support/fixture_model.rs");
}

use std::collections::{BTreeMap, BTreeSet, HashSet};

use dsr_core::weights::{load_checkpoint, META_CONFIG, META_IMAGE_SIZE, META_OUTPUT_MAP};
use dsr_core::DsrConfig;
use dsr_export::onnx_protobuf::tensor_shape_proto::dimension;
use dsr_export::onnx_protobuf::{type_proto, ModelProto, ValueInfoProto};
use dsr_export::{
    export_file, from_bytes, to_bytes, write_model, ExportError, ExportOptions, ANOMALY_MAP, INPUT,
    NORMALIZED_MAP, NORMALIZED_SCORE, PRED_LABEL, PRED_MASK, PRED_SCORE,
};

/// Every operator the exporter may write.
const OPERATORS: [&str; 28] = [
    "Add",
    "ArgMin",
    "AveragePool",
    "Clip",
    "Concat",
    "Conv",
    "ConvTranspose",
    "Div",
    "Flatten",
    "Gather",
    "Greater",
    "InstanceNormalization",
    "Less",
    "MatMul",
    "MaxPool",
    "Mul",
    "ReduceMax",
    "ReduceSum",
    "Relu",
    "Reshape",
    "Resize",
    "Shape",
    "Slice",
    "Softmax",
    "Squeeze",
    "Sub",
    "Transpose",
    "Where",
];

fn dims(info: &ValueInfoProto) -> Vec<String> {
    let Some(type_proto::Value::TensorType(t)) = &info.type_.value else {
        panic!("{} is not a tensor", info.name);
    };
    t.shape
        .dim
        .iter()
        .map(|d| match &d.value {
            Some(dimension::Value::DimValue(v)) => v.to_string(),
            Some(dimension::Value::DimParam(p)) => p.clone(),
            _ => "?".to_string(),
        })
        .collect()
}

fn export(model: &std::path::Path, opts: &ExportOptions) -> ModelProto {
    let m = export_file(model, opts).unwrap();
    // Everything below reads the model back from its bytes.
    from_bytes(&to_bytes(&m).unwrap()).unwrap()
}

fn metadata(m: &ModelProto) -> BTreeMap<String, String> {
    m.metadata_props
        .iter()
        .map(|p| (p.key.clone(), p.value.clone()))
        .collect()
}

fn fixture_config() -> DsrConfig {
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(support::fixture_dir().join("config.json")).unwrap(),
    )
    .unwrap();
    serde_json::from_value(meta["config"].clone()).unwrap()
}

#[test]
fn the_fixture_graph_reads_every_weight_under_its_key_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path =
        support::fixture_model_with(Some(dir.path().join("m.safetensors")), &BTreeMap::new())
            .unwrap();
    let m = export(
        &path,
        &ExportOptions {
            dynamic_batch: true,
            ..Default::default()
        },
    );
    assert_eq!(m.producer_name, dsr_export::PRODUCER);
    assert_eq!(m.opset_import[0].version, dsr_export::DEFAULT_OPSET);
    assert_eq!(m.ir_version, 8);
    let g = m.graph.as_ref().unwrap();

    // Input and outputs, with the free batch dimension.
    assert_eq!(g.input.len(), 1);
    assert_eq!(g.input[0].name, INPUT);
    assert_eq!(dims(&g.input[0]), ["batch", "3", "64", "64"]);
    let outputs: Vec<(&str, Vec<String>)> = g
        .output
        .iter()
        .map(|o| (o.name.as_str(), dims(o)))
        .collect();
    assert_eq!(
        outputs,
        [
            (ANOMALY_MAP, vec!["batch".into(), "64".into(), "64".into()]),
            (PRED_SCORE, vec!["batch".to_string()]),
        ]
    );

    // Initializers: exactly the state_dict tensors the evaluation forward reads (every key but
    // the codebooks' EMA statistics), same shapes, same values; the rest are constants.
    let cfg = fixture_config();
    let ckpt = load_checkpoint(&path).unwrap();
    let expected: BTreeSet<String> = cfg
        .state_dict_shapes()
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| !k.ends_with("._ema_w") && !k.ends_with("._ema_cluster_size"))
        .collect();
    let mut weights = BTreeSet::new();
    for t in &g.initializer {
        if let Some(tensor) = ckpt.tensors.get(&t.name) {
            let shape: Vec<i64> = tensor.dims().iter().map(|&d| d as i64).collect();
            assert_eq!(t.dims, shape, "{}", t.name);
            let values: Vec<f32> = tensor.flatten_all().unwrap().to_vec1().unwrap();
            let stored: Vec<f32> = t
                .raw_data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            assert_eq!(stored, values, "{}", t.name);
            assert!(weights.insert(t.name.clone()), "{} twice", t.name);
        } else {
            assert!(
                t.name.starts_with("dsr.const.") || t.name.contains(".threshold"),
                "unexpected initializer {}",
                t.name
            );
        }
    }
    assert_eq!(weights, expected);

    // Standard operators only; every node input is defined before it is read.
    let ops: HashSet<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
    for op in &ops {
        assert!(OPERATORS.contains(op), "unexpected operator {op}");
    }
    for op in [
        "ArgMin",
        "Gather",
        "InstanceNormalization",
        "Resize",
        "AveragePool",
        "ReduceMax",
        "ConvTranspose",
        "Softmax",
    ] {
        assert!(ops.contains(op), "{op} missing");
    }
    let mut defined: HashSet<String> = g.initializer.iter().map(|t| t.name.clone()).collect();
    defined.insert(INPUT.to_string());
    defined.insert(String::new());
    for n in &g.node {
        for i in &n.input {
            assert!(defined.contains(i), "{} reads {i} before it exists", n.name);
        }
        for o in &n.output {
            assert!(defined.insert(o.clone()), "{o} written twice");
        }
    }
    for o in &g.output {
        assert!(defined.contains(&o.name), "output {} never written", o.name);
    }
    // Four vector quantizations (two codebooks, each twice): four ArgMin nodes.
    assert_eq!(g.node.iter().filter(|n| n.op_type == "ArgMin").count(), 4);
    let norm = g
        .node
        .iter()
        .filter(|n| n.op_type == "InstanceNormalization")
        .count();
    // 2 per double conv + 1 per up-conv: U-Nets 7·2+3, subspace nets 5·2+2, IRN 2·2.
    assert_eq!(norm, 2 * (7 * 2 + 3) + 2 * (5 * 2 + 2) + 2 * 2);

    // Metadata: the checkpoint's, with the resolved configuration, size and output map.
    let meta = metadata(&m);
    assert_eq!(
        serde_json::from_str::<DsrConfig>(&meta[META_CONFIG]).unwrap(),
        cfg
    );
    assert_eq!(meta[META_IMAGE_SIZE], "[64, 64]");
    assert_eq!(meta[META_OUTPUT_MAP], "refined");
    assert!(!meta.contains_key("dsr.postprocess"));
}

/// The node that writes `name`.
fn producer<'a>(
    g: &'a dsr_export::onnx_protobuf::GraphProto,
    name: &str,
) -> &'a dsr_export::onnx_protobuf::NodeProto {
    g.node
        .iter()
        .find(|n| n.output.iter().any(|o| o == name))
        .unwrap_or_else(|| panic!("nothing writes {name}"))
}

#[test]
fn the_output_map_and_the_post_processor_shape_the_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let post = r#"{"image_threshold":0.4,"pixel_threshold":0.3,"image_min":0.1,"image_max":0.9,"pixel_min":0.0,"pixel_max":1.0}"#;
    let extra: BTreeMap<String, String> = [
        (META_OUTPUT_MAP.to_string(), "detection".to_string()),
        ("dsr.postprocess".to_string(), post.to_string()),
    ]
    .into();
    let path = support::fixture_model_with(Some(dir.path().join("m.safetensors")), &extra).unwrap();
    let m = export(
        &path,
        &ExportOptions {
            opset: 18,
            dynamic_batch: false,
        },
    );
    let g = m.graph.as_ref().unwrap();
    let names: Vec<&str> = g.output.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(
        names,
        [
            ANOMALY_MAP,
            PRED_SCORE,
            NORMALIZED_MAP,
            NORMALIZED_SCORE,
            PRED_MASK,
            PRED_LABEL
        ]
    );
    assert_eq!(dims(&g.input[0]), ["1", "3", "64", "64"]);
    assert_eq!(dims(&g.output[1]), ["1"]);
    // The map is channel 1 of the detection module's softmax, as the score is.
    let squeeze = producer(g, ANOMALY_MAP);
    let slice = producer(g, &squeeze.input[0]);
    let softmax = producer(g, &slice.input[0]);
    assert_eq!(softmax.op_type, "Softmax");
    assert!(
        softmax.output[0].starts_with("anomaly_detection_module/"),
        "{}",
        softmax.output[0]
    );
    // Opset 18: ReduceMax takes its axes as an input.
    let max = producer(g, PRED_SCORE);
    assert_eq!((max.op_type.as_str(), max.input.len()), ("ReduceMax", 2));
    // The thresholds and the normalisation constants come from the stored post-processor.
    let scalar = |name: &str| {
        let t = g.initializer.iter().find(|t| t.name == name).unwrap();
        f32::from_le_bytes(t.raw_data[..4].try_into().unwrap())
    };
    assert_eq!(scalar(&format!("{PRED_LABEL}.threshold")), 0.4);
    assert_eq!(scalar(&format!("{PRED_MASK}.threshold")), 0.3);
    // max − min of the f32 values, taken in f64 as the post-processor does, rounded once.
    let range = (f64::from(0.9f32) - f64::from(0.1f32)) as f32;
    assert_eq!(scalar(&format!("{NORMALIZED_SCORE}.range")), range);
    assert_eq!(producer(g, NORMALIZED_MAP).op_type, "Clip");
    assert_eq!(producer(g, PRED_LABEL).op_type, "Greater");
    let meta = metadata(&m);
    assert_eq!(meta[META_OUTPUT_MAP], "detection");
    assert_eq!(meta["dsr.postprocess"], post);

    // The refined map, by default, comes from the upsampling module.
    let plain =
        support::fixture_model_with(Some(dir.path().join("p.safetensors")), &BTreeMap::new())
            .unwrap();
    let m = export(&plain, &ExportOptions::default());
    let g = m.graph.as_ref().unwrap();
    let slice = producer(g, &producer(g, ANOMALY_MAP).input[0]);
    assert!(producer(g, &slice.input[0]).output[0].starts_with("upsampling_module/"));
    // Opset 17: ReduceMax takes its axes as an attribute.
    assert_eq!(producer(g, PRED_SCORE).input.len(), 1);
}

#[test]
fn a_degenerate_range_gives_the_step_function() {
    let dir = tempfile::tempdir().unwrap();
    let post = r#"{"image_threshold":0.4,"pixel_threshold":0.3,"image_min":0.4,"image_max":0.4,"pixel_min":0.3,"pixel_max":0.3}"#;
    let extra: BTreeMap<String, String> =
        [("dsr.postprocess".to_string(), post.to_string())].into();
    let path = support::fixture_model_with(Some(dir.path().join("m.safetensors")), &extra).unwrap();
    let m = export(&path, &ExportOptions::default());
    let g = m.graph.as_ref().unwrap();
    assert_eq!(producer(g, NORMALIZED_SCORE).op_type, "Where");
    assert_eq!(producer(g, NORMALIZED_MAP).op_type, "Where");
}

#[test]
fn bad_requests_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path =
        support::fixture_model_with(Some(dir.path().join("m.safetensors")), &BTreeMap::new())
            .unwrap();
    for opset in [12, 22] {
        let err = export_file(
            &path,
            &ExportOptions {
                opset,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(matches!(err, ExportError::Opset(n) if n == opset), "{err}");
    }
    let missing = dir.path().join("none.safetensors");
    let err = export_file(&missing, &ExportOptions::default()).unwrap_err();
    assert!(err.to_string().contains("none.safetensors"), "{err}");

    // The fixture's weights alone record no configuration.
    let bare = support::fixture_dir().join("weights.safetensors");
    let err = export_file(&bare, &ExportOptions::default()).unwrap_err();
    assert!(err.to_string().contains("configuration"), "{err}");
    assert!(err.to_string().contains("weights.safetensors"), "{err}");

    let bad = r#"{"image_threshold":"high"}"#;
    let extra: BTreeMap<String, String> = [("dsr.postprocess".to_string(), bad.to_string())].into();
    let path_bad =
        support::fixture_model_with(Some(dir.path().join("bad.safetensors")), &extra).unwrap();
    let err = export_file(&path_bad, &ExportOptions::default()).unwrap_err();
    assert!(err.to_string().contains("bad.safetensors"), "{err}");
}

#[test]
fn the_writer_replaces_only_its_own_models() {
    let dir = tempfile::tempdir().unwrap();
    let path =
        support::fixture_model_with(Some(dir.path().join("m.safetensors")), &BTreeMap::new())
            .unwrap();
    let m = export_file(&path, &ExportOptions::default()).unwrap();
    let out = dir.path().join("model.onnx");
    write_model(&m, &out).unwrap();
    let first = std::fs::read(&out).unwrap();
    assert_eq!(from_bytes(&first).unwrap(), m);
    // Its own file is replaced.
    write_model(&m, &out).unwrap();
    // Anything else stays as it is: another file, and the checkpoint itself.
    let other = dir.path().join("notes.onnx");
    std::fs::write(&other, b"not a model").unwrap();
    let err = write_model(&m, &other).unwrap_err();
    assert!(matches!(err, ExportError::WouldOverwrite(_)), "{err}");
    assert_eq!(std::fs::read(&other).unwrap(), b"not a model");
    let before = std::fs::read(&path).unwrap();
    assert!(write_model(&m, &path).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), before);
    // No temporary file is left behind.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
}
