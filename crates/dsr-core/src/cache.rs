//! Where downloaded weights live: the DSR cache folder and the files expected in it.
//!
//! The folder is `$DSR_HOME` when that variable is set (and not empty), else the platform's
//! cache folder followed by `dsr` (`~/.cache/dsr` on Linux, `~/Library/Caches/dsr` on macOS,
//! `%LOCALAPPDATA%\dsr` on Windows). `cargo xtask fetch-weights` downloads anomalib's archive of
//! the pretrained discrete model there, unpacks [`VQ_PCKL_FILE`] and converts it to
//! [`VQ_WEIGHTS_FILE`]; nothing in this crate ever downloads anything.

use std::path::PathBuf;

/// The environment variable that overrides the cache folder.
const DSR_HOME_ENV: &str = "DSR_HOME";

/// File name of the pretrained discrete model (codebooks of 4096 vectors of width 128) converted
/// to our safetensors format, inside [`dsr_home`].
pub const VQ_WEIGHTS_FILE: &str = "vq_model_pretrained_128_4096.safetensors";

/// File name of the official pretrained discrete model (a PyTorch state_dict) inside anomalib's
/// archive `dsr_vq_model_pretrained.zip`, and once unpacked inside [`dsr_home`].
pub const VQ_PCKL_FILE: &str = "vq_model_pretrained_128_4096.pckl";

/// The DSR cache folder: `$DSR_HOME` if set and not empty, else the platform cache folder
/// joined with `dsr`. `None` when neither is known (no `$DSR_HOME` and no home folder). The
/// folder may not exist yet.
pub fn dsr_home() -> Option<PathBuf> {
    match std::env::var_os(DSR_HOME_ENV) {
        Some(dir) if !dir.is_empty() => Some(PathBuf::from(dir)),
        _ => dirs::cache_dir().map(|dir| dir.join("dsr")),
    }
}

/// The converted pretrained discrete model ([`VQ_WEIGHTS_FILE`] in [`dsr_home`]) if that file
/// exists, else `None` (run `cargo xtask fetch-weights` to create it).
pub fn cached_vq_weights() -> Option<PathBuf> {
    let path = dsr_home()?.join(VQ_WEIGHTS_FILE);
    path.is_file().then_some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test only: it changes the process environment, which other tests must not race with.
    #[test]
    fn dsr_home_follows_the_environment_and_cached_weights_need_the_file() {
        let previous = std::env::var_os(DSR_HOME_ENV);
        let dir = std::env::temp_dir().join(format!("dsr-cache-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);

        std::env::set_var(DSR_HOME_ENV, &dir);
        assert_eq!(dsr_home(), Some(dir.clone()));
        assert_eq!(cached_vq_weights(), None, "the folder does not exist yet");
        std::fs::create_dir_all(dir.join(VQ_WEIGHTS_FILE)).unwrap();
        assert_eq!(
            cached_vq_weights(),
            None,
            "a folder is not the weights file"
        );
        std::fs::remove_dir(dir.join(VQ_WEIGHTS_FILE)).unwrap();
        std::fs::write(dir.join(VQ_WEIGHTS_FILE), b"x").unwrap();
        assert_eq!(cached_vq_weights(), Some(dir.join(VQ_WEIGHTS_FILE)));

        std::env::set_var(DSR_HOME_ENV, "");
        assert_eq!(dsr_home(), dirs::cache_dir().map(|d| d.join("dsr")));
        std::env::remove_var(DSR_HOME_ENV);
        assert_eq!(dsr_home(), dirs::cache_dir().map(|d| d.join("dsr")));
        if let Some(home) = dsr_home() {
            assert!(home.ends_with("dsr"));
        }

        match previous {
            Some(v) => std::env::set_var(DSR_HOME_ENV, v),
            None => std::env::remove_var(DSR_HOME_ENV),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
