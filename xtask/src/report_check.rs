//! `cargo xtask report-check REPORT.html [--screenshot OUT.png]`: opens a `dsr test` report in
//! headless Chromium (Debian's `chromium` package), checks that it renders without console
//! errors and that the DOM holds the curves and the example images, and saves a screenshot.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// What the browser showed.
#[derive(Debug)]
pub struct ReportCheck {
    /// `<svg` elements in the rendered DOM (the ROC and PR curves).
    pub svgs: usize,
    /// `<img` elements with inline PNG data (the example overlays).
    pub images: usize,
    /// Console messages of the page (errors make the check fail).
    pub console: Vec<String>,
    /// The screenshot written.
    pub screenshot: PathBuf,
    /// Its size in bytes.
    pub screenshot_bytes: u64,
}

/// The Chromium binary: `$CHROMIUM`, else `chromium` or `chromium-browser` on the PATH.
fn browser() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return Ok(PathBuf::from(p));
    }
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        let found = std::env::var_os("PATH")
            .map(|paths| std::env::split_paths(&paths).any(|d| d.join(name).is_file()))
            .unwrap_or(false);
        if found {
            return Ok(PathBuf::from(name));
        }
    }
    bail!("no Chromium found: install Debian's `chromium` package (apt-get install chromium) or set $CHROMIUM")
}

fn headless(browser: &Path, extra: &[String], url: &str) -> Result<(String, String)> {
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=5000",
        ])
        .args(extra)
        .arg(url)
        .output()
        .with_context(|| format!("cannot run {}", browser.display()))?;
    if !out.status.success() {
        bail!(
            "{} exited with {}: {}",
            browser.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Renders `report` and checks it.
pub fn check(report: &Path, screenshot: &Path) -> Result<ReportCheck> {
    let abs = std::fs::canonicalize(report)
        .with_context(|| format!("the report {} does not exist", report.display()))?;
    let url = format!("file://{}", abs.display());
    let browser = browser()?;
    let (dom, log) = headless(&browser, &["--dump-dom".to_string()], &url)?;
    let console: Vec<String> = log
        .lines()
        .filter(|l| l.contains("CONSOLE") || l.contains("Uncaught"))
        .map(str::to_string)
        .collect();
    let svgs = dom.matches("<svg").count();
    let images = dom.matches("<img").count();
    let inline = dom.matches("src=\"data:image/png;base64,").count();
    let shot = std::fs::canonicalize(screenshot.parent().unwrap_or(Path::new(".")))
        .unwrap_or_else(|_| PathBuf::from("."))
        .join(screenshot.file_name().unwrap_or("report.png".as_ref()));
    headless(
        &browser,
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1280,2000".to_string(),
        ],
        &url,
    )?;
    let screenshot_bytes = std::fs::metadata(&shot)
        .with_context(|| format!("Chromium wrote no screenshot at {}", shot.display()))?
        .len();
    let result = ReportCheck {
        svgs,
        images,
        console,
        screenshot: shot,
        screenshot_bytes,
    };
    if !result.console.is_empty() {
        bail!("the page logged console messages: {:?}", result.console);
    }
    if svgs < 2 {
        bail!("the rendered page has {svgs} <svg> elements; the ROC and PR curves need 2");
    }
    if images == 0 || inline < images {
        bail!("the rendered page has {images} <img> elements, {inline} with inline PNG data");
    }
    Ok(result)
}
