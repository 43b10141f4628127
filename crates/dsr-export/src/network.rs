//! The evaluation forward of [`dsr_core::DsrModel`] written as ONNX operators, module by module
//! in the order of `DsrModel::forward_eval`, reading every weight under its state_dict key.
//!
//! Each function mirrors one network of dsr-core (same operations, same order): a convolution is
//! `Conv`, the up×2 transposed convolution `ConvTranspose` (kernel 4, stride 2, padding 1), the
//! non-affine instance normalisation `InstanceNormalization` with unit scale and zero bias
//! (ε = 1e-5), bilinear ×2 upsampling `Resize` (linear, align_corners), 2×2 max-pooling
//! `MaxPool`, the vector quantizer the expanded squared distances, `ArgMin` (first index on
//! ties, as dsr-core) and `Gather`, the image score `AveragePool` 21×21 (zero padding counted)
//! and `ReduceMax`.

use dsr_core::feature_memory::{Blend, MEMORY_ROWS_KEY};
use dsr_core::layers::INSTANCE_NORM_EPS;
use dsr_core::model::SCORE_SMOOTHING_KERNEL;
use dsr_core::{DsrConfig, OutputMap};

use crate::error::Result;
use crate::graph::{Attr, GraphBuilder};

/// The outputs of the forward: the anomaly map `N×H×W` and the image score `N`.
pub(crate) struct Outputs {
    pub(crate) anomaly_map: String,
    pub(crate) pred_score: String,
}

impl GraphBuilder<'_> {
    /// `Conv` with the weight `{prefix}.weight` (and `{prefix}.bias` when `bias`).
    fn conv(
        &mut self,
        x: &str,
        prefix: &str,
        stride: i64,
        padding: i64,
        bias: bool,
    ) -> Result<String> {
        let key = format!("{prefix}.weight");
        let dims = self.weight_dims(&key)?;
        let w = self.weight(&key)?;
        let mut inputs = vec![x.to_string(), w];
        if bias {
            inputs.push(self.weight(&format!("{prefix}.bias"))?);
        }
        let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        Ok(self.node(
            "Conv",
            &inputs,
            vec![
                (
                    "kernel_shape",
                    Attr::Ints(vec![dims[2] as i64, dims[3] as i64]),
                ),
                ("strides", Attr::Ints(vec![stride, stride])),
                ("pads", Attr::Ints(vec![padding; 4])),
            ],
            prefix,
        ))
    }

    /// A 3×3 convolution with padding 1 and a bias.
    fn conv3(&mut self, x: &str, prefix: &str) -> Result<String> {
        self.conv(x, prefix, 1, 1, true)
    }

    /// The up×2 transposed convolution (kernel 4, stride 2, padding 1, bias).
    fn conv_transpose(&mut self, x: &str, prefix: &str) -> Result<String> {
        let w = self.weight(&format!("{prefix}.weight"))?;
        let b = self.weight(&format!("{prefix}.bias"))?;
        Ok(self.node(
            "ConvTranspose",
            &[x, &w, &b],
            vec![
                ("kernel_shape", Attr::Ints(vec![4, 4])),
                ("strides", Attr::Ints(vec![2, 2])),
                ("pads", Attr::Ints(vec![1; 4])),
            ],
            prefix,
        ))
    }

    fn relu(&mut self, x: &str, hint: &str) -> String {
        self.node("Relu", &[x], vec![], hint)
    }

    fn add(&mut self, a: &str, b: &str, hint: &str) -> String {
        self.node("Add", &[a, b], vec![], hint)
    }

    fn concat(&mut self, parts: &[&str], hint: &str) -> String {
        self.node("Concat", parts, vec![("axis", Attr::Int(1))], hint)
    }

    fn max_pool2x2(&mut self, x: &str, hint: &str) -> String {
        self.node(
            "MaxPool",
            &[x],
            vec![
                ("kernel_shape", Attr::Ints(vec![2, 2])),
                ("strides", Attr::Ints(vec![2, 2])),
            ],
            hint,
        )
    }

    /// Bilinear ×2 with align_corners = true.
    fn upsample2x(&mut self, x: &str, hint: &str) -> String {
        let scales = self.const_f32("dsr.const.scales_x2", &[4], &[1.0, 1.0, 2.0, 2.0]);
        self.node(
            "Resize",
            &[x, "", &scales],
            vec![
                ("mode", Attr::Str("linear")),
                ("coordinate_transformation_mode", Attr::Str("align_corners")),
            ],
            hint,
        )
    }

    /// Conv3×3 → non-affine instance norm → ReLU.
    fn conv_norm_relu(&mut self, x: &str, prefix: &str) -> Result<String> {
        let channels = self.weight_dims(&format!("{prefix}.weight"))?[0];
        let y = self.conv3(x, prefix)?;
        let ones = self.const_f32(
            &format!("dsr.const.ones_{channels}"),
            &[channels as i64],
            &vec![1.0; channels],
        );
        let zeros = self.const_f32(
            &format!("dsr.const.zeros_{channels}"),
            &[channels as i64],
            &vec![0.0; channels],
        );
        let y = self.node(
            "InstanceNormalization",
            &[&y, &ones, &zeros],
            vec![("epsilon", Attr::Float(INSTANCE_NORM_EPS as f32))],
            prefix,
        );
        Ok(self.relu(&y, prefix))
    }

    /// Two CBR blocks (`{prefix}.0`, `{prefix}.3`).
    fn double_conv(&mut self, x: &str, prefix: &str) -> Result<String> {
        let y = self.conv_norm_relu(x, &format!("{prefix}.0"))?;
        self.conv_norm_relu(&y, &format!("{prefix}.3"))
    }

    /// Bilinear ×2 then a CBR block (`{prefix}.1`).
    fn up_conv(&mut self, x: &str, prefix: &str) -> Result<String> {
        let y = self.upsample2x(x, prefix);
        self.conv_norm_relu(&y, &format!("{prefix}.1"))
    }

    /// `num_layers` residual layers (`relu(x) + conv1(relu(conv3(relu(x))))`), then a ReLU.
    fn residual_stack(&mut self, x: &str, prefix: &str, num_layers: usize) -> Result<String> {
        let mut x = x.to_string();
        for i in 0..num_layers {
            let p = format!("{prefix}._layers.{i}._block");
            let r = self.relu(&x, &p);
            let y = self.conv(&r, &format!("{p}.1"), 1, 1, false)?;
            let y = self.relu(&y, &p);
            let y = self.conv(&y, &format!("{p}.3"), 1, 0, false)?;
            x = self.add(&r, &y, &p);
        }
        Ok(self.relu(&x, prefix))
    }

    /// The U-Net of the detection and upsampling modules (`{prefix}.encoder.*`, `.decoder.*`).
    fn unet(&mut self, x: &str, prefix: &str) -> Result<String> {
        let (enc, dec) = (format!("{prefix}.encoder"), format!("{prefix}.decoder"));
        let b1 = self.double_conv(x, &format!("{enc}.block1"))?;
        let p = self.max_pool2x2(&b1, &enc);
        let b2 = self.double_conv(&p, &format!("{enc}.block2"))?;
        let p = self.max_pool2x2(&b2, &enc);
        let b3 = self.double_conv(&p, &format!("{enc}.block3"))?;
        let p = self.max_pool2x2(&b3, &enc);
        let b4 = self.double_conv(&p, &format!("{enc}.block4"))?;
        let up1 = self.up_conv(&b4, &format!("{dec}.up1"))?;
        let cat = self.concat(&[&up1, &b3], &dec);
        let db1 = self.double_conv(&cat, &format!("{dec}.db1"))?;
        let up2 = self.up_conv(&db1, &format!("{dec}.up2"))?;
        let cat = self.concat(&[&up2, &b2], &dec);
        let db2 = self.double_conv(&cat, &format!("{dec}.db2"))?;
        let up3 = self.up_conv(&db2, &format!("{dec}.up3"))?;
        let cat = self.concat(&[&up3, &b1], &dec);
        let db3 = self.double_conv(&cat, &format!("{dec}.db3"))?;
        self.conv3(&db3, &format!("{dec}.fin_out.0"))
    }

    /// The network of a subspace restriction module (`{prefix}.unet.*`, no skips).
    fn subspace_network(&mut self, x: &str, prefix: &str) -> Result<String> {
        let (enc, dec) = (format!("{prefix}.encoder"), format!("{prefix}.decoder"));
        let b1 = self.double_conv(x, &format!("{enc}.block1"))?;
        let p = self.max_pool2x2(&b1, &enc);
        let b2 = self.double_conv(&p, &format!("{enc}.block2"))?;
        let p = self.max_pool2x2(&b2, &enc);
        let b3 = self.double_conv(&p, &format!("{enc}.block3"))?;
        let x = self.up_conv(&b3, &format!("{dec}.up2"))?;
        let x = self.double_conv(&x, &format!("{dec}.db2"))?;
        let x = self.up_conv(&x, &format!("{dec}.up3"))?;
        let x = self.double_conv(&x, &format!("{dec}.db3"))?;
        self.conv3(&x, &format!("{dec}.fin_out.0"))
    }

    /// `ReduceSum` over axis 1 (axes as an input, opset ≥ 13).
    fn reduce_sum_axis1(&mut self, x: &str, keepdims: bool, hint: &str) -> String {
        let axes = self.const_i64("dsr.const.axis_1", &[1]);
        self.node(
            "ReduceSum",
            &[x, &axes],
            vec![("keepdims", Attr::Int(keepdims as i64))],
            hint,
        )
    }

    /// The vector quantizer with the codebook `{prefix}._embedding.weight` (`K×D`) on `x`
    /// (`N×D×h×w`): the nearest code per position by the expanded squared distances
    /// `(‖f‖² + ‖e‖²) − 2 f·eᵀ` (dsr-core's form), `ArgMin` (first index on ties), `Gather`,
    /// returned as `x + (q − x)` as dsr-core does.
    fn quantize(&mut self, x: &str, prefix: &str) -> Result<String> {
        let key = format!("{prefix}._embedding.weight");
        let d = self.weight_dims(&key)?[1] as i64;
        let codebook = self.weight(&key)?;
        let nhwc = self.node(
            "Transpose",
            &[x],
            vec![("perm", Attr::Ints(vec![0, 2, 3, 1]))],
            prefix,
        );
        let rows_shape = self.const_i64(&format!("dsr.const.rows_{d}"), &[-1, d]);
        let flat = self.node("Reshape", &[&nhwc, &rows_shape], vec![], prefix);
        let sq = self.node("Mul", &[&flat, &flat], vec![], prefix);
        let row_norms = self.reduce_sum_axis1(&sq, true, prefix);
        let code_sq = self.node("Mul", &[&codebook, &codebook], vec![], prefix);
        let code_norms = self.reduce_sum_axis1(&code_sq, false, prefix);
        let codes_t = self.node(
            "Transpose",
            &[&codebook],
            vec![("perm", Attr::Ints(vec![1, 0]))],
            prefix,
        );
        let dots = self.node("MatMul", &[&flat, &codes_t], vec![], prefix);
        let two = self.const_f32("dsr.const.two", &[], &[2.0]);
        let dots2 = self.node("Mul", &[&dots, &two], vec![], prefix);
        let norms = self.node("Add", &[&row_norms, &code_norms], vec![], prefix);
        let distances = self.node("Sub", &[&norms, &dots2], vec![], prefix);
        let indices = self.node(
            "ArgMin",
            &[&distances],
            vec![
                ("axis", Attr::Int(1)),
                ("keepdims", Attr::Int(0)),
                ("select_last_index", Attr::Int(0)),
            ],
            prefix,
        );
        let rows = self.node(
            "Gather",
            &[&codebook, &indices],
            vec![("axis", Attr::Int(0))],
            prefix,
        );
        let shape = self.node("Shape", &[&nhwc], vec![], prefix);
        let q = self.node("Reshape", &[&rows, &shape], vec![], prefix);
        let q = self.node(
            "Transpose",
            &[&q],
            vec![("perm", Attr::Ints(vec![0, 3, 1, 2]))],
            prefix,
        );
        let diff = self.node("Sub", &[&q, x], vec![], prefix);
        Ok(self.add(x, &diff, prefix))
    }

    /// `x · mul + add` with f32 constants (candle's `affine`).
    fn affine(&mut self, x: &str, mul: f64, add: f64, hint: &str) -> String {
        let m = self.const_f32(&format!("dsr.const.{hint}_mul"), &[], &[mul as f32]);
        let a = self.const_f32(&format!("dsr.const.{hint}_add"), &[], &[add as f32]);
        let y = self.node("Mul", &[x, &m], vec![], hint);
        self.node("Add", &[&y, &a], vec![], hint)
    }

    /// The feature memory's distance map `N×1×H×W` (dsr-core's `FeatureMemory::distance_map`):
    /// features `cat(enc_b, nearest_up(enc_t))` averaged over 3×3 with replicated edges, the
    /// expanded squared distance to every remembered row (`MatMul` broadcast over `N×h×w`),
    /// `ReduceMin`, clamped at 0, `Sqrt`, nearest ×4.
    fn memory_distance(&mut self, enc_b: &str, enc_t: &str) -> Result<String> {
        let hint = "feature_memory";
        let rows = self.weight(MEMORY_ROWS_KEY)?;
        let nearest = |g: &mut Self, x: &str, factor: f32, name: &str| {
            let scales = g.const_f32(name, &[4], &[1.0, 1.0, factor, factor]);
            g.node(
                "Resize",
                &[x, "", &scales],
                vec![
                    ("mode", Attr::Str("nearest")),
                    ("coordinate_transformation_mode", Attr::Str("asymmetric")),
                    ("nearest_mode", Attr::Str("floor")),
                ],
                hint,
            )
        };
        let up_t = nearest(self, enc_t, 2.0, "dsr.const.scales_nearest_x2");
        let f = self.concat(&[enc_b, &up_t], hint);
        let pads = self.const_i64("dsr.const.pads_hw_1", &[0, 0, 1, 1, 0, 0, 1, 1]);
        let f = self.node("Pad", &[&f, &pads], vec![("mode", Attr::Str("edge"))], hint);
        let f = self.node(
            "AveragePool",
            &[&f],
            vec![
                ("kernel_shape", Attr::Ints(vec![3, 3])),
                ("strides", Attr::Ints(vec![1, 1])),
            ],
            hint,
        );
        let nhwc = self.node(
            "Transpose",
            &[&f],
            vec![("perm", Attr::Ints(vec![0, 2, 3, 1]))],
            hint,
        );
        let rows_t = self.node(
            "Transpose",
            &[&rows],
            vec![("perm", Attr::Ints(vec![1, 0]))],
            hint,
        );
        let rsq = self.node("Mul", &[&rows, &rows], vec![], hint);
        let row_norms = self.reduce_sum_axis1(&rsq, false, hint);
        let dots = self.node("MatMul", &[&nhwc, &rows_t], vec![], hint);
        let minus_two = self.const_f32("dsr.const.minus_two", &[], &[-2.0]);
        let dots = self.node("Mul", &[&dots, &minus_two], vec![], hint);
        let qsq = self.node("Mul", &[&nhwc, &nhwc], vec![], hint);
        let axis3 = self.const_i64("dsr.const.axis_3", &[3]);
        let qn = self.node(
            "ReduceSum",
            &[&qsq, &axis3],
            vec![("keepdims", Attr::Int(1))],
            hint,
        );
        let d2 = self.add(&dots, &qn, hint);
        let d2 = self.add(&d2, &row_norms, hint);
        let min = if self.opset >= 18 {
            self.node(
                "ReduceMin",
                &[&d2, &axis3],
                vec![("keepdims", Attr::Int(1))],
                hint,
            )
        } else {
            self.node(
                "ReduceMin",
                &[&d2],
                vec![("axes", Attr::Ints(vec![3])), ("keepdims", Attr::Int(1))],
                hint,
            )
        };
        let min = self.relu(&min, hint);
        let dist = self.node("Sqrt", &[&min], vec![], hint);
        let nchw = self.node(
            "Transpose",
            &[&dist],
            vec![("perm", Attr::Ints(vec![0, 3, 1, 2]))],
            hint,
        );
        Ok(nearest(self, &nchw, 4.0, "dsr.const.scales_nearest_x4"))
    }

    /// Channel 1 of a `N×2×H×W` tensor, kept as `N×1×H×W`.
    fn channel1(&mut self, x: &str, hint: &str) -> String {
        let one = self.const_i64("dsr.const.axis_1", &[1]);
        let two = self.const_i64("dsr.const.two_i64", &[2]);
        self.node("Slice", &[x, &one, &two, &one], vec![], hint)
    }

    fn softmax_channels(&mut self, x: &str, hint: &str) -> String {
        self.node("Softmax", &[x], vec![("axis", Attr::Int(1))], hint)
    }

    /// The whole evaluation forward on the input `image` (`N×3×H×W`), writing the anomaly map
    /// of `output` to `map_name` and the image score to `score_name`.
    pub(crate) fn dsr_forward(
        &mut self,
        cfg: &DsrConfig,
        image: &str,
        output: OutputMap,
        blend: Option<Blend>,
        map_name: &str,
        score_name: &str,
    ) -> Result<Outputs> {
        let nl = cfg.num_residual_layers;
        let dm = "discrete_latent_model";
        // Encoders and the codebooks (DiscreteLatentModel::encode).
        let eb = format!("{dm}._encoder_b");
        let x = self.conv(image, &format!("{eb}._conv_1"), 2, 1, true)?;
        let x = self.relu(&x, &eb);
        let x = self.conv(&x, &format!("{eb}._conv_2"), 2, 1, true)?;
        let x = self.relu(&x, &eb);
        let x = self.conv3(&x, &format!("{eb}._conv_3"))?;
        let enc_b = self.residual_stack(&x, &format!("{eb}._residual_stack"), nl)?;
        let et = format!("{dm}._encoder_t");
        let x = self.conv(&enc_b, &format!("{et}._conv_1"), 2, 1, true)?;
        let x = self.relu(&x, &et);
        let x = self.conv3(&x, &format!("{et}._conv_2"))?;
        let x = self.relu(&x, &et);
        let enc_t = self.residual_stack(&x, &format!("{et}._residual_stack"), nl)?;
        let z_t = self.conv(&enc_t, &format!("{dm}._pre_vq_conv_top"), 1, 0, true)?;
        let q_t = self.quantize(&z_t, &format!("{dm}._vq_vae_top"))?;
        let up_t = self.conv_transpose(&q_t, &format!("{dm}.upsample_t"))?;
        let cat = self.concat(&[&enc_b, &up_t], dm);
        let z_b = self.conv(&cat, &format!("{dm}._pre_vq_conv_bot"), 1, 0, true)?;
        let q_b = self.quantize(&z_b, &format!("{dm}._vq_vae_bot"))?;
        // The general appearance decoder.
        let db = format!("{dm}._decoder_b");
        let joined = self.concat(&[&up_t, &q_b], dm);
        let x = self.conv3(&joined, &format!("{db}._conv_1"))?;
        let x = self.residual_stack(&x, &format!("{db}._residual_stack"), nl)?;
        let x = self.conv_transpose(&x, &format!("{db}._conv_trans_1"))?;
        let x = self.relu(&x, &db);
        let general = self.conv_transpose(&x, &format!("{db}._conv_trans_2"))?;
        // The subspace restriction modules and the object-specific decoder.
        let hi = "subspace_restriction_module_hi";
        let f_hi = self.subspace_network(&q_b, &format!("{hi}.unet"))?;
        let q_hi = self.quantize(&f_hi, &format!("{dm}._vq_vae_bot"))?;
        let lo = "subspace_restriction_module_lo";
        let f_lo = self.subspace_network(&q_t, &format!("{lo}.unet"))?;
        let q_lo = self.quantize(&f_lo, &format!("{dm}._vq_vae_top"))?;
        let up_lo = self.conv_transpose(&q_lo, &format!("{dm}.upsample_t"))?;
        let irn = "image_reconstruction_network";
        let x = self.concat(&[&up_lo, &q_hi], irn);
        let x = self.double_conv(&x, &format!("{irn}.block1"))?;
        let x = self.max_pool2x2(&x, irn);
        let x = self.double_conv(&x, &format!("{irn}.block2"))?;
        let x = self.max_pool2x2(&x, irn);
        let x = self.conv(&x, &format!("{irn}.pre_vq_conv"), 1, 0, true)?;
        let x = self.conv_transpose(&x, &format!("{irn}.upblock1"))?;
        let x = self.relu(&x, irn);
        let x = self.conv_transpose(&x, &format!("{irn}.upblock2"))?;
        let x = self.relu(&x, irn);
        let x = self.conv3(&x, &format!("{irn}._conv_1"))?;
        let x = self.residual_stack(&x, &format!("{irn}._residual_stack"), nl)?;
        let x = self.conv_transpose(&x, &format!("{irn}._conv_trans_1"))?;
        let x = self.relu(&x, irn);
        let specific = self.conv_transpose(&x, &format!("{irn}._conv_trans_2"))?;
        // The detection module, the upsampling module.
        let adm = "anomaly_detection_module";
        let x = self.concat(&[&specific, &general], adm);
        let logits = self.unet(&x, &format!("{adm}.unet"))?;
        let mask = self.softmax_channels(&logits, adm);
        let ups = "upsampling_module";
        let x = self.concat(&[&specific, &general, &mask], ups);
        let logits = self.unet(&x, &format!("{ups}.unet"))?;
        let refined = self.softmax_channels(&logits, ups);
        // The image score: 21×21 average of M[:, 1:2] (zero padding counted), global max.
        let k = SCORE_SMOOTHING_KERNEL as i64;
        let m1 = self.channel1(&mask, "score");
        let smoothed = self.node(
            "AveragePool",
            &[&m1],
            vec![
                ("kernel_shape", Attr::Ints(vec![k, k])),
                ("strides", Attr::Ints(vec![1, 1])),
                ("pads", Attr::Ints(vec![k / 2; 4])),
                ("count_include_pad", Attr::Int(1)),
            ],
            "score",
        );
        let flat = self.node(
            "Flatten",
            &[&smoothed],
            vec![("axis", Attr::Int(1))],
            "score",
        );
        if self.opset >= 18 {
            let axes = self.const_i64("dsr.const.axis_1", &[1]);
            self.node_to(
                "ReduceMax",
                &[&flat, &axes],
                vec![("keepdims", Attr::Int(0))],
                score_name,
            );
        } else {
            self.node_to(
                "ReduceMax",
                &[&flat],
                vec![("axes", Attr::Ints(vec![1])), ("keepdims", Attr::Int(0))],
                score_name,
            );
        }
        // The anomaly map: channel 1 of the mask the checkpoint names, or the feature memory's.
        let m = match output {
            OutputMap::Refined => self.channel1(&refined, "map"),
            OutputMap::Detection => self.channel1(&mask, "map"),
            OutputMap::Memory => self.memory_distance(&enc_b, &enc_t)?,
            OutputMap::Combined => {
                let b = blend.ok_or_else(|| {
                    crate::ExportError::Graph(
                        "the combined map needs the feature memory's blend".into(),
                    )
                })?;
                let det = self.channel1(&mask, "map");
                let dist = self.memory_distance(&enc_b, &enc_t)?;
                // dsr-core's FeatureMemory::combine: two affine maps, then their sum.
                let ds = 1.0 / f64::from(b.detection_std);
                let det = self.affine(&det, ds, -f64::from(b.detection_mean) * ds, "combined_det");
                let w = f64::from(b.weight) / f64::from(b.memory_std);
                let dist = self.affine(&dist, w, -f64::from(b.memory_mean) * w, "combined_mem");
                self.add(&det, &dist, "combined")
            }
        };
        let axes = self.const_i64("dsr.const.axis_1", &[1]);
        self.node_to("Squeeze", &[&m, &axes], vec![], map_name);
        Ok(Outputs {
            anomaly_map: map_name.to_string(),
            pred_score: score_name.to_string(),
        })
    }
}
