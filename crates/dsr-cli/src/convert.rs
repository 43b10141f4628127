//! `dsr convert`: any weight file we read into our safetensors checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use dsr_core::weights::{
    check_tensors, load_checkpoint, save_checkpoint, DISCRETE_PREFIX, META_CONFIG,
    META_CONVERTED_FROM, META_IMAGE_SIZE, META_PARTIAL,
};
use dsr_core::DsrConfig;
use dsr_eval::postprocess::{PostProcessor, METADATA_KEY};

/// Reads a configuration from a JSON file holding either the configuration object itself or an
/// object with a `config` field (as the parity fixtures do).
fn read_config(path: &Path) -> Result<DsrConfig> {
    let text = dsr_core::files::read_regular_to_string(path)
        .with_context(|| format!("cannot read the configuration {}", path.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let inner = match value.get("config") {
        Some(c) if c.is_object() => c.clone(),
        _ => value,
    };
    let cfg: DsrConfig = serde_json::from_value(inner)
        .with_context(|| format!("{} is not a DSR configuration", path.display()))?;
    cfg.validate()
        .with_context(|| format!("the configuration in {}", path.display()))?;
    Ok(cfg)
}

/// anomalib's post-processor state, when a Lightning checkpoint carries all of it.
fn anomalib_post(metadata: &BTreeMap<String, String>) -> Option<PostProcessor> {
    let get =
        |name: &str| -> Option<f32> { metadata.get(&format!("anomalib.{name}"))?.parse().ok() };
    Some(PostProcessor {
        image_threshold: get("_image_threshold").or_else(|| get("image_threshold"))?,
        pixel_threshold: get("_pixel_threshold").or_else(|| get("pixel_threshold"))?,
        image_min: get("image_min")?,
        image_max: get("image_max")?,
        pixel_min: get("pixel_min")?,
        pixel_max: get("pixel_max")?,
    })
}

/// The expected keys and shapes of a checkpoint holding only the discrete latent model.
fn discrete_shapes(cfg: &DsrConfig) -> Result<Vec<(String, Vec<usize>)>> {
    Ok(cfg
        .discrete_state_dict_shapes()?
        .into_iter()
        .map(|(k, s)| (format!("{DISCRETE_PREFIX}{k}"), s))
        .collect())
}

/// Checks the tensors against `cfg`; returns whether they hold only the discrete model.
/// A feature memory ([`dsr_core::feature_memory`]) is not a network weight: it is kept as it is.
fn verify(path: &Path, tensors: &HashMap<String, Tensor>, cfg: &DsrConfig) -> Result<bool> {
    let mut tensors = tensors.clone();
    tensors.remove(dsr_core::feature_memory::MEMORY_ROWS_KEY);
    let tensors = &tensors;
    if tensors.keys().all(|k| k.starts_with(DISCRETE_PREFIX)) {
        check_tensors(path, tensors, &discrete_shapes(cfg)?)?;
        Ok(true)
    } else {
        check_tensors(path, tensors, &cfg.state_dict_shapes()?)?;
        Ok(false)
    }
}

/// Runs `dsr convert`.
pub fn run(
    input: &Path,
    output: &Path,
    config: Option<&Path>,
    image_size: Option<[usize; 2]>,
) -> Result<()> {
    if !input.exists() {
        bail!("the input file {} does not exist", input.display());
    }
    let mut reads = vec![input.to_path_buf()];
    reads.extend(config.map(Path::to_path_buf));
    crate::guard::check_output_file(output, &reads)?;
    let ckpt = load_checkpoint(input).with_context(|| format!("reading {}", input.display()))?;
    let given = config.map(read_config).transpose()?;
    let cfg = match (ckpt.config, given) {
        (Some(own), Some(given)) if own != given => bail!(
            "{} records a configuration that differs from the one in --config: {} vs {}",
            input.display(),
            serde_json::to_string(&own)?,
            serde_json::to_string(&given)?
        ),
        (Some(own), _) => own,
        (None, Some(given)) => given,
        (None, None) => {
            let reference = DsrConfig::default();
            if verify(input, &ckpt.tensors, &reference).is_err() {
                bail!(
                    "{} does not record its configuration and its tensors do not fit the reference one; pass --config JSON_FILE",
                    input.display()
                );
            }
            reference
        }
    };
    let partial = verify(input, &ckpt.tensors, &cfg).with_context(|| {
        format!(
            "the tensors of {} do not fit the configuration",
            input.display()
        )
    })?;
    let size = match (ckpt.image_size, image_size) {
        (Some(own), Some(given)) if own != given => bail!(
            "{} records the image size {}×{}, --image-size says {}×{}",
            input.display(),
            own[0],
            own[1],
            given[0],
            given[1]
        ),
        (own, given) => own.or(given),
    };
    if let Some([h, w]) = size {
        cfg.validate_image_size(h, w)?;
    }
    let mut extra: BTreeMap<String, String> = ckpt
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != META_CONFIG && k.as_str() != META_IMAGE_SIZE)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !extra.contains_key(METADATA_KEY) {
        if let Some(post) = anomalib_post(&ckpt.metadata) {
            extra.insert(METADATA_KEY.to_string(), post.to_json()?);
        }
    }
    let source = input
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| input.display().to_string());
    extra
        .entry(META_CONVERTED_FROM.to_string())
        .or_insert(source);
    if partial {
        extra.insert(
            META_PARTIAL.to_string(),
            "discrete_latent_model".to_string(),
        );
    }
    save_checkpoint(output, &ckpt.tensors, &cfg, size, &extra)
        .with_context(|| format!("cannot write {}", output.display()))?;
    println!(
        "wrote {} ({} tensors{}, image size {})",
        output.display(),
        ckpt.tensors.len(),
        if partial { ", discrete model only" } else { "" },
        size.map(|[h, w]| format!("{h}×{w}"))
            .unwrap_or_else(|| "not recorded".to_string())
    );
    Ok(())
}
