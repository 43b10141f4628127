// The model of the reference fixture (dsr-core's `tests/fixtures/small`, or `DSR_FIXTURE_DIR`)
// written as a checkpoint that records its configuration and input size. Included by the crate
// documentation and the tests.

/// The fixture folder.
#[allow(dead_code)]
pub fn fixture_dir() -> std::path::PathBuf {
    let crate_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    std::env::var_os("DSR_FIXTURE_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| crate_dir.join("../dsr-core/tests/fixtures/small"))
}

/// Writes the fixture's model, with the metadata `extra`, to `model` (a temporary folder's
/// `model.safetensors` when `None`); returns the checkpoint path.
#[allow(dead_code)]
pub fn fixture_model_with(
    model: Option<std::path::PathBuf>,
    extra: &std::collections::BTreeMap<String, String>,
) -> Result<std::path::PathBuf, Box<dyn std::error::Error>> {
    let fixture = fixture_dir();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("config.json"))?)?;
    let cfg: dsr_core::DsrConfig = serde_json::from_value(meta["config"].clone())?;
    let side = meta["image_size"]
        .as_u64()
        .ok_or("config.json has no image_size")? as usize;
    let weights = dsr_core::weights::load_checkpoint(&fixture.join("weights.safetensors"))?;
    let model = match model {
        Some(path) => path,
        None => {
            let dir = std::env::temp_dir().join(format!("dsr-export-fixture-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            dir.join("model.safetensors")
        }
    };
    dsr_core::weights::save_checkpoint(&model, &weights.tensors, &cfg, Some([side, side]), extra)?;
    Ok(model)
}

/// [`fixture_model_with`] without extra metadata, in a temporary folder.
#[allow(dead_code)]
pub fn fixture_model() -> Result<std::path::PathBuf, Box<dyn std::error::Error>> {
    fixture_model_with(None, &Default::default())
}
