//! Any text as the metadata this program reads from a checkpoint: the first byte picks the
//! entry (`dsr.config`, `dsr.image_size`, `dsr.postprocess`), the rest is its value. A value
//! that parses must be usable.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let value = String::from_utf8_lossy(rest).into_owned();
    match which % 3 {
        0 | 1 => {
            let key = if which % 3 == 0 {
                dsr_core::weights::META_CONFIG
            } else {
                dsr_core::weights::META_IMAGE_SIZE
            };
            let meta: BTreeMap<String, String> = [(key.to_string(), value)].into();
            if let Ok((cfg, _)) =
                dsr_core::weights::parse_metadata(std::path::Path::new("m"), &meta)
            {
                if let Some(cfg) = cfg {
                    assert!(cfg.state_dict_shapes().is_ok());
                }
            }
        }
        _ => {
            if let Ok(p) = dsr_eval::postprocess::PostProcessor::from_json(&value) {
                assert!((0.0..=1.0).contains(&p.normalize_score(0.5)));
            }
        }
    }
});
