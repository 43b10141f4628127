//! The self-contained HTML report of `dsr test`: metric tables, ROC and PR curves drawn as inline
//! SVG, and the best and worst examples as embedded PNG overlays.

use std::collections::BTreeMap;
use std::fmt::Write;

use anyhow::Result;
use dsr_eval::image::{load_image, DEFAULT_MAX_PIXELS};
use dsr_eval::metrics::{EvalCurves, Metrics};
use dsr_eval::postprocess::PostProcessor;
use dsr_eval::{Detector, Evaluation};

use crate::evaluate::metric_columns;
use crate::io::{base64, png_bytes};
use crate::render::{draw_contours, draw_text, heat_overlay};

/// How many of the best and of the worst examples the report shows.
const EXAMPLES: usize = 4;

/// What the report is made of.
pub struct ReportInput<'a> {
    /// The data folder, as the title.
    pub title: &'a str,
    /// The model that was evaluated.
    pub model: &'a Detector,
    /// The thresholds used for labels and F1.
    pub post: &'a PostProcessor,
    /// Where the thresholds come from, in words.
    pub threshold_source: &'a str,
    /// The metrics of the whole set.
    pub overall: &'a Metrics,
    /// The metrics per defect type.
    pub per_type: &'a BTreeMap<String, Metrics>,
    /// The sorted curves.
    pub curves: &'a EvalCurves,
    /// The predictions and ground truth.
    pub evaluated: &'a Evaluation,
}

/// The checkpoint a detector was read from, for the page.
fn model_name(model: &Detector) -> String {
    model
        .path()
        .map_or_else(|| "a model in memory".into(), |p| p.display().to_string())
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Drops points closer than 1/500 of the plot to the last kept one, so that pixel-level curves
/// with millions of points stay small; the first and last points are always kept.
fn thin(xs: &[f64], ys: &[f64]) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = Vec::new();
    let n = xs.len().min(ys.len());
    for (i, p) in xs.iter().copied().zip(ys.iter().copied()).enumerate() {
        let keep = match out.last() {
            None => true,
            Some(&(x, y)) => i + 1 == n || (p.0 - x).abs() > 0.002 || (p.1 - y).abs() > 0.002,
        };
        if keep {
            out.push(p);
        }
    }
    out
}

/// A named, coloured curve: its legend, its SVG colour and its points in `[0, 1]²`.
type Series = (&'static str, &'static str, Vec<(f64, f64)>);

/// One square plot with axes from 0 to 1 and one polyline per series.
fn svg_plot(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    const SIZE: f64 = 300.0;
    const PAD: f64 = 40.0;
    let total = SIZE + 2.0 * PAD;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{total}" height="{total}" viewBox="0 0 {total} {total}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(
        s,
        r#"<rect x="{PAD}" y="{PAD}" width="{SIZE}" height="{SIZE}" fill="white" stroke="black"/>"#
    );
    for k in 0..=4 {
        let t = f64::from(k) / 4.0;
        let x = PAD + t * SIZE;
        let y = PAD + (1.0 - t) * SIZE;
        let _ = write!(
            s,
            r##"<line x1="{x}" y1="{PAD}" x2="{x}" y2="{}" stroke="#ddd"/><line x1="{PAD}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/>"##,
            PAD + SIZE,
            PAD + SIZE
        );
        let _ = write!(
            s,
            r#"<text x="{x}" y="{}" text-anchor="middle">{t}</text><text x="{}" y="{}" text-anchor="end">{t}</text>"#,
            PAD + SIZE + 14.0,
            PAD - 4.0,
            y + 4.0
        );
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle" font-size="13">{}</text>"#,
        total / 2.0,
        PAD - 14.0,
        escape(title)
    );
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        total / 2.0,
        total - 6.0,
        escape(x_label)
    );
    let _ = write!(
        s,
        r#"<text x="12" y="{}" text-anchor="middle" transform="rotate(-90 12 {})">{}</text>"#,
        total / 2.0,
        total / 2.0,
        escape(y_label)
    );
    for (i, (name, colour, points)) in series.iter().enumerate() {
        let coords: Vec<String> = points
            .iter()
            .map(|(x, y)| format!("{:.2},{:.2}", PAD + x * SIZE, PAD + (1.0 - y) * SIZE))
            .collect();
        let _ = write!(
            s,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            coords.join(" ")
        );
        let ly = PAD + SIZE - 12.0 - 14.0 * i as f64;
        let _ = write!(
            s,
            r#"<text x="{}" y="{ly}" text-anchor="end" fill="{colour}">{}</text>"#,
            PAD + SIZE - 6.0,
            escape(name)
        );
    }
    s.push_str("</svg>");
    s
}

fn roc_series(curves: &EvalCurves) -> Vec<Series> {
    let mut out = Vec::new();
    if let Ok(roc) = curves.image.roc() {
        out.push(("image", "#1f77b4", thin(&roc.fpr, &roc.tpr)));
    }
    if let Ok(roc) = curves.pixel.roc() {
        out.push(("pixel", "#d62728", thin(&roc.fpr, &roc.tpr)));
    }
    out
}

fn pr_series(curves: &EvalCurves) -> Vec<Series> {
    let mut out = Vec::new();
    if let Ok(pr) = curves.image.pr() {
        out.push(("image", "#1f77b4", thin(&pr.recall, &pr.precision)));
    }
    if let Ok(pr) = curves.pixel.pr() {
        out.push(("pixel", "#d62728", thin(&pr.recall, &pr.precision)));
    }
    out
}

fn metrics_table(overall: &Metrics, per_type: &BTreeMap<String, Metrics>) -> String {
    let mut s = String::from("<table><tr><th></th>");
    for (name, _) in metric_columns(overall) {
        let _ = write!(s, "<th>{name}</th>");
    }
    s.push_str("</tr>");
    let rows =
        std::iter::once(("overall", overall)).chain(per_type.iter().map(|(k, v)| (k.as_str(), v)));
    for (name, m) in rows {
        let _ = write!(s, "<tr><th>{}</th>", escape(name));
        for (_, v) in metric_columns(m) {
            let _ = write!(s, "<td>{v:.4}</td>");
        }
        s.push_str("</tr>");
    }
    s.push_str("</table>");
    s
}

/// An example overlay as a base64 PNG: heat map, predicted contours in red, ground-truth
/// contours in white, normalised score and label as text.
fn example_png(input: &ReportInput<'_>, index: usize) -> Result<String> {
    let ev = input.evaluated;
    let [h, w] = input.model.size();
    let pixels = h * w;
    let raw = &ev.maps[index * pixels..(index + 1) * pixels];
    let img = load_image(&ev.samples[index].path, [h, w], DEFAULT_MAX_PIXELS)?;
    let mut overlay = heat_overlay(&img.to_rgb8([h, w]), &input.post.normalize_map(raw));
    draw_contours(&mut overlay, &input.post.pixel_mask(raw), [255, 0, 0]);
    draw_contours(
        &mut overlay,
        &ev.masks[index * pixels..(index + 1) * pixels],
        [255, 255, 255],
    );
    let score = ev.scores[index];
    let anomalous = input.post.image_label(score);
    let text = format!(
        "{:.3} {}",
        input.post.normalize_score(score),
        if anomalous { "anomalous" } else { "normal" }
    );
    let colour = if anomalous {
        [255, 64, 64]
    } else {
        [64, 255, 64]
    };
    draw_text(&mut overlay, &text, colour);
    Ok(base64(&png_bytes(&overlay)?))
}

fn examples_html(input: &ReportInput<'_>, indices: &[usize]) -> Result<String> {
    let ev = input.evaluated;
    let mut s = String::from(r#"<div class="examples">"#);
    for &i in indices {
        let sample = &ev.samples[i];
        let _ = write!(
            s,
            r#"<figure><img alt="overlay" src="data:image/png;base64,{}"><figcaption>{}<br>{} · score {:.4}</figcaption></figure>"#,
            example_png(input, i)?,
            escape(&sample.path.display().to_string()),
            escape(&sample.defect_type),
            ev.scores[i]
        );
    }
    s.push_str("</div>");
    Ok(s)
}

/// Builds the report page.
pub fn html(input: &ReportInput<'_>) -> Result<String> {
    let ev = input.evaluated;
    // An image's margin is how far its normalised score lies on the right side of 0.5: positive
    // for a correct label, negative for a wrong one.
    let mut order: Vec<(f32, usize)> = (0..ev.scores.len())
        .map(|i| {
            let v = input.post.normalize_score(ev.scores[i]) - 0.5;
            (if ev.labels[i] { v } else { -v }, i)
        })
        .collect();
    order.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let n = EXAMPLES.min(order.len());
    let best: Vec<usize> = order[..n].iter().map(|&(_, i)| i).collect();
    let worst: Vec<usize> = order[order.len() - n..]
        .iter()
        .rev()
        .map(|&(_, i)| i)
        .collect();
    let post_json = serde_json::to_string(input.post)?;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<!DOCTYPE html><html><head><meta charset="utf-8"><title>DSR test report: {title}</title><style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
.plots svg {{ margin-right: 1em; }}
.examples {{ display: flex; flex-wrap: wrap; }}
figure {{ margin: 0.5em; max-width: 300px; font-size: 12px; word-break: break-all; }}
figure img {{ width: 256px; image-rendering: pixelated; }}
</style></head><body><h1>DSR test report</h1>
<p>Data: {title}<br>Model: {model}<br>Input size: {h}×{w}<br>Images: {count} ({defective} defective)<br>Thresholds: {source} ({post})</p>"#,
        title = escape(input.title),
        model = escape(&model_name(input.model)),
        h = input.model.size()[0],
        w = input.model.size()[1],
        count = ev.scores.len(),
        defective = ev.labels.iter().filter(|&&l| l).count(),
        source = escape(input.threshold_source),
        post = escape(&post_json),
    );
    s.push_str("<h2>Metrics</h2>");
    s.push_str(&metrics_table(input.overall, input.per_type));
    s.push_str(r#"<h2>Curves</h2><div class="plots">"#);
    s.push_str(&svg_plot(
        "ROC",
        "false-positive rate",
        "true-positive rate",
        &roc_series(input.curves),
    ));
    s.push_str(&svg_plot(
        "Precision-recall",
        "recall",
        "precision",
        &pr_series(input.curves),
    ));
    s.push_str("</div>");
    s.push_str("<h2>Best examples</h2><p>Predicted masks in red, ground truth in white.</p>");
    s.push_str(&examples_html(input, &best)?);
    s.push_str("<h2>Worst examples</h2>");
    s.push_str(&examples_html(input, &worst)?);
    s.push_str("</body></html>\n");
    Ok(s)
}
