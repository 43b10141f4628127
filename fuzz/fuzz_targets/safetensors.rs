//! Any bytes as a safetensors checkpoint: an error or a checkpoint, and when it records a
//! configuration, building the model from it gives an error or a model.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.safetensors");
    if let Ok(ckpt) = dsr_core::weights::safetensors_from_bytes(path, data) {
        if let Some(cfg) = ckpt.config {
            let _ = ckpt.build_model(&cfg, &candle_core::Device::Cpu);
        }
    }
});
