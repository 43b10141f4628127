//! Any bytes as an image file: `decode_checked` (header check against a 4-megapixel limit, then
//! decoding), and for a decoded image the conversion to RGB and to a binary mask.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("dsr-fuzz-image-{}.png", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(img) = dsr_eval::image::decode_checked(&path, 4 << 20) {
        let rgb = dsr_eval::image::image_to_chw(&img, 8, 8);
        assert!(rgb.iter().all(|v| (0.0..=1.0).contains(v)));
        let mask = dsr_eval::image::mask_to_binary(&img, 8, 8);
        assert!(mask.iter().all(|&v| v == 0.0 || v == 1.0));
    }
});
