//! Scores images with a checkpoint: `cargo run --release -p dsr-eval --example score_image --
//! MODEL IMAGE...` prints each image's score, label and the share of anomalous pixels. Without
//! arguments it scores a shipped demo image with the reference fixture's model (what CI runs).

#[path = "support/fixture_model.rs"]
mod fixture_model;

use std::path::PathBuf;

use dsr_eval::{Detector, Execution};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let (model, images) = match args.split_first() {
        Some((model, images)) if !images.is_empty() => (model.clone(), images.to_vec()),
        _ => {
            let (model, image) = fixture_model::fixture_model()?;
            (model, vec![image])
        }
    };
    let detector = Detector::load(&model, Execution::default())?;
    for image in &images {
        let p = detector.predict_file(image)?;
        let mask = detector.pixel_mask(&p.map);
        let share = mask.iter().filter(|&&m| m).count() as f64 / mask.len() as f64;
        println!(
            "{}: score {:.4}, anomalous: {}, anomalous pixels: {:.1} %",
            image.display(),
            p.score,
            detector.image_label(p.score),
            100.0 * share
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_example_scores_the_fixture_model() {
        super::main().expect("the example runs");
    }
}
