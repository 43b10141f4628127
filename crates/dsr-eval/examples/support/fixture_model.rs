// The model of the reference fixture (dsr-core's `tests/fixtures/small`, or `DSR_FIXTURE_DIR`)
// written as a checkpoint that records its configuration and input size, and a shipped demo
// image: what the example and the crate's documentation score. Included by both.

/// Writes the fixture's model to a temporary folder; returns the checkpoint and an image.
pub fn fixture_model(
) -> Result<(std::path::PathBuf, std::path::PathBuf), Box<dyn std::error::Error>> {
    let crate_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let fixture = std::env::var_os("DSR_FIXTURE_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| crate_dir.join("../dsr-core/tests/fixtures/small"));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("config.json"))?)?;
    let cfg: dsr_core::DsrConfig = serde_json::from_value(meta["config"].clone())?;
    let side = meta["image_size"]
        .as_u64()
        .ok_or("config.json has no image_size")? as usize;
    let weights = dsr_core::weights::load_checkpoint(&fixture.join("weights.safetensors"))?;
    let dir = std::env::temp_dir().join(format!("dsr-eval-fixture-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let model = dir.join("model.safetensors");
    dsr_core::weights::save_checkpoint(
        &model,
        &weights.tensors,
        &cfg,
        Some([side, side]),
        &Default::default(),
    )?;
    let image = crate_dir.join("../../assets/demo/battery_weld/test/good/3-r1_row0_0.png");
    Ok((model, image))
}
