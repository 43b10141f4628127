//! Any bytes as a PyTorch archive (`.pckl`, `.pth`, anomalib `.ckpt`), through every loader.
//! The loaders read files, so each input is written to a file of this process first (start
//! from a corpus holding crates/dsr-core/tests/fixtures/small/discrete_small.pckl).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("dsr-fuzz-torch-{}.pth", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let _ = dsr_core::weights::load_checkpoint(&path);
    let _ = dsr_core::weights::load_torch(&path, None);
    let _ = dsr_core::weights::load_discrete_pckl(&path);
    let _ = dsr_core::weights::load_lightning_ckpt(&path);
});
