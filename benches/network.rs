//! Inference time of each network of the default model and of the whole forward, on plain
//! (untracked) tensors as a loaded checkpoint gives them, at batch 1.
//!
//! `cargo bench -p dsr-rs --bench network` (128×128 input by default; `DSR_BENCH_SIZE=256`
//! for the reference resolution, where one whole forward takes seconds on 2 cores).

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use criterion::{criterion_group, criterion_main, Criterion};
use dsr_core::anomaly_detection::AnomalyDetectionModule;
use dsr_core::reconstruction::ImageReconstructionNetwork;
use dsr_core::subspace::SubspaceRestrictionModule;
use dsr_core::upsampling::UpsamplingModule;
use dsr_core::{DiscreteLatentModel, DsrConfig, DsrModel};

// The `dsr` binary's allocator settings (process-wide, so they belong to programs, not to the
// libraries): measured as the binary runs.
#[allow(dead_code)]
#[path = "../crates/dsr-cli/src/heap.rs"]
mod heap;

fn uniform(shape: &[usize]) -> Tensor {
    Tensor::rand(0f32, 1f32, shape, &Device::Cpu).unwrap()
}

fn bench_networks(c: &mut Criterion) {
    heap::tune_allocator(heap::HeapUse::Reuse);
    let size: usize = std::env::var("DSR_BENCH_SIZE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(128);
    let cfg = DsrConfig::default();
    let vb = VarBuilder::from_tensors(
        DsrModel::seeded_weights(&cfg, 0).unwrap(),
        DType::F32,
        &Device::Cpu,
    );
    let discrete = DiscreteLatentModel::new(&cfg, vb.pp("discrete_latent_model")).unwrap();
    let d = cfg.embedding_dim;
    let srm_hi =
        SubspaceRestrictionModule::new(d, vb.pp("subspace_restriction_module_hi")).unwrap();
    let irn = ImageReconstructionNetwork::new(&cfg, vb.pp("image_reconstruction_network")).unwrap();
    let adm = AnomalyDetectionModule::new(
        cfg.anomaly_detection_module_base_width,
        vb.pp("anomaly_detection_module"),
    )
    .unwrap();
    let ups = UpsamplingModule::new(cfg.upsampling_module_base_width, vb.pp("upsampling_module"))
        .unwrap();
    let model = DsrModel::new(&cfg, vb).unwrap();

    let image = uniform(&[1, 3, size, size]);
    let encoded = discrete.encode(&image).unwrap();
    let joined = Tensor::cat(&[&encoded.up_t, &encoded.q_b.quantized], 1).unwrap();
    let general = uniform(&[1, 3, size, size]);
    let specific = uniform(&[1, 3, size, size]);
    let mask = uniform(&[1, 2, size, size]);

    let mut group = c.benchmark_group(format!("network {size}x{size}"));
    group.sample_size(10);
    group.bench_function("discrete encoders + VQ", |b| {
        b.iter(|| discrete.encode(&image).unwrap())
    });
    group.bench_function("general decoder", |b| {
        b.iter(|| discrete.decoder_bot().forward(&joined).unwrap())
    });
    group.bench_function("subspace restriction hi", |b| {
        b.iter(|| {
            srm_hi
                .forward(&encoded.q_b.quantized, discrete.vq_bot())
                .unwrap()
        })
    });
    group.bench_function("image reconstruction network", |b| {
        b.iter(|| irn.forward(&joined).unwrap())
    });
    group.bench_function("anomaly detection module", |b| {
        b.iter(|| adm.forward(&specific, &general).unwrap())
    });
    group.bench_function("upsampling module", |b| {
        b.iter(|| ups.forward(&specific, &general, &mask).unwrap())
    });
    group.bench_function("whole forward", |b| b.iter(|| model.infer(&image).unwrap()));
    group.finish();
}

criterion_group!(benches, bench_networks);
criterion_main!(benches);
