//! A small builder of ONNX graphs: nodes with fresh output names, initializers taken from the
//! checkpoint under their state_dict keys, and the constants the operators need. It writes the
//! protocol buffer messages of `onnx-protobuf`; which operators are used and how is decided in
//! [`crate::network`].

use std::collections::{BTreeSet, HashMap};

use candle_core::{DType, Tensor};
use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::tensor_proto::DataType;
use onnx_protobuf::{AttributeProto, NodeProto, TensorProto};

use crate::error::{ExportError, Result};

/// An attribute value of a node.
#[derive(Debug, Clone)]
pub(crate) enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
    Str(&'static str),
}

/// `(name, value)` of an attribute.
pub(crate) type NamedAttr = (&'static str, Attr);

/// The graph under construction.
pub(crate) struct GraphBuilder<'a> {
    /// The checkpoint's tensors by state_dict key.
    weights: &'a HashMap<String, Tensor>,
    /// The opset the operators are written for.
    pub(crate) opset: i64,
    pub(crate) nodes: Vec<NodeProto>,
    pub(crate) initializers: Vec<TensorProto>,
    /// Names of the initializers already added.
    names: BTreeSet<String>,
    counter: usize,
}

impl<'a> GraphBuilder<'a> {
    pub(crate) fn new(weights: &'a HashMap<String, Tensor>, opset: i64) -> Self {
        Self {
            weights,
            opset,
            nodes: Vec::new(),
            initializers: Vec::new(),
            names: BTreeSet::new(),
            counter: 0,
        }
    }

    /// The dimensions of the checkpoint tensor `key`.
    pub(crate) fn weight_dims(&self, key: &str) -> Result<Vec<usize>> {
        self.weights
            .get(key)
            .map(|t| t.dims().to_vec())
            .ok_or_else(|| ExportError::Graph(format!("the checkpoint has no tensor '{key}'")))
    }

    /// The checkpoint tensor `key` as an initializer of the same name (added once); returns the
    /// name.
    pub(crate) fn weight(&mut self, key: &str) -> Result<String> {
        if !self.names.contains(key) {
            let tensor = self.weights.get(key).ok_or_else(|| {
                ExportError::Graph(format!("the checkpoint has no tensor '{key}'"))
            })?;
            let dims: Vec<i64> = tensor.dims().iter().map(|&d| d as i64).collect();
            let values = tensor
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            self.push_f32(key, dims, &values);
        }
        Ok(key.to_string())
    }

    fn push_f32(&mut self, name: &str, dims: Vec<i64>, values: &[f32]) {
        let mut t = TensorProto::new();
        t.name = name.to_string();
        t.dims = dims;
        t.data_type = DataType::FLOAT as i32;
        t.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializers.push(t);
        self.names.insert(name.to_string());
    }

    /// A float constant of shape `dims` under `name` (added once); returns the name.
    pub(crate) fn const_f32(&mut self, name: &str, dims: &[i64], values: &[f32]) -> String {
        if !self.names.contains(name) {
            self.push_f32(name, dims.to_vec(), values);
        }
        name.to_string()
    }

    /// A 1-D int64 constant under `name` (added once); returns the name.
    pub(crate) fn const_i64(&mut self, name: &str, values: &[i64]) -> String {
        if !self.names.contains(name) {
            let mut t = TensorProto::new();
            t.name = name.to_string();
            t.dims = vec![values.len() as i64];
            t.data_type = DataType::INT64 as i32;
            t.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.initializers.push(t);
            self.names.insert(name.to_string());
        }
        name.to_string()
    }

    /// Adds a node `op(inputs)` with one output, named after `hint`; returns the output name.
    pub(crate) fn node(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<NamedAttr>,
        hint: &str,
    ) -> String {
        self.counter += 1;
        let output = format!("{hint}/{op}_{}", self.counter);
        self.node_to(op, inputs, attrs, &output);
        output
    }

    /// Adds a node `op(inputs)` whose one output is `output` (a graph output, say).
    pub(crate) fn node_to(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<NamedAttr>,
        output: &str,
    ) {
        let mut node = NodeProto::new();
        node.name = format!("{output}:{op}");
        node.op_type = op.to_string();
        node.input = inputs.iter().map(|s| s.to_string()).collect();
        node.output = vec![output.to_string()];
        node.attribute = attrs.into_iter().map(attribute).collect();
        self.nodes.push(node);
    }
}

/// The protocol buffer message of one attribute.
fn attribute((name, value): NamedAttr) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.to_string();
    let kind = match value {
        Attr::Int(i) => {
            a.i = i;
            AttributeType::INT
        }
        Attr::Ints(v) => {
            a.ints = v;
            AttributeType::INTS
        }
        Attr::Float(f) => {
            a.f = f;
            AttributeType::FLOAT
        }
        Attr::Str(s) => {
            a.s = s.as_bytes().to_vec();
            AttributeType::STRING
        }
    };
    a.type_ = protobuf::EnumOrUnknown::new(kind);
    a
}
