//! `cargo xtask fetch-weights`: the pretrained discrete model of DSR, from anomalib's release
//! archive to our safetensors checkpoint in the cache folder ([`dsr_core::cache::dsr_home`]).
//!
//! Steps, each usable on its own (and tested without the network):
//!
//! 1. [`fetch`]: download to `<cache>/<name>.part`, resuming with an HTTP `Range` request when a
//!    partial file exists; the file is renamed to `<cache>/<name>` only once its SHA-256 matches.
//! 2. [`unpack_pckl`]: take `vq_model_pretrained_128_4096.pckl` out of the archive, wherever it
//!    sits inside.
//! 3. [`convert`]: check its tensors against the configuration and write our checkpoint.
//!
//! [`fetch_weights`] chains them, or starts from a file given with `--from` for machines without
//! network access.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use dsr_core::cache::{VQ_PCKL_FILE, VQ_WEIGHTS_FILE};
use dsr_core::weights::{
    check_tensors, load_discrete_pckl, save_checkpoint, DISCRETE_PREFIX, META_CONVERTED_FROM,
    META_PARTIAL,
};
use dsr_core::DsrConfig;
use sha2::{Digest, Sha256};

/// anomalib's release asset holding the pretrained discrete model.
pub const ARCHIVE_URL: &str = "https://github.com/open-edge-platform/anomalib/releases/download/dsr_pretrained_weights/dsr_vq_model_pretrained.zip";
/// SHA-256 of the archive at [`ARCHIVE_URL`] (the value anomalib checks).
pub const ARCHIVE_SHA256: &str = "52fe7504ec8e9df70b4382f287ab26269dcfe000cd7a7e146a52c6f146f34afb";
/// Value of [`META_PARTIAL`] for a checkpoint holding only the discrete latent model.
pub const PARTIAL_DISCRETE: &str = "discrete_latent_model";

/// Network settings of [`fetch`].
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Limit for resolving the host name and, separately, for connecting (TLS included).
    pub connect_timeout: Duration,
    /// Limit for the response headers and for every read of the body: a stalled transfer fails
    /// after this long, keeping what it received for the next run.
    pub read_timeout: Duration,
    /// Show the progress of the transfer on stderr.
    pub progress: bool,
}

impl Default for FetchOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
            progress: io::stderr().is_terminal(),
        }
    }
}

/// What to do; [`Request::new`] fills in the official archive and the reference configuration.
#[derive(Debug, Clone)]
pub struct Request {
    /// Where to download the archive from.
    pub url: String,
    /// The archive's SHA-256 (hexadecimal).
    pub sha256: String,
    /// The cache folder (created when missing).
    pub cache_dir: PathBuf,
    /// A local archive or `.pckl` to use instead of downloading.
    pub from: Option<PathBuf>,
    /// Convert again even when the converted file exists.
    pub force: bool,
    /// The configuration the discrete model must have (checked against its tensors and stored
    /// in the checkpoint).
    pub config: DsrConfig,
    /// Network settings.
    pub fetch: FetchOptions,
}

impl Request {
    /// The official archive, the reference configuration (D = 128, K = 4096), `cache_dir`.
    pub fn new(cache_dir: PathBuf) -> Self {
        Self {
            url: ARCHIVE_URL.to_string(),
            sha256: ARCHIVE_SHA256.to_string(),
            cache_dir,
            from: None,
            force: false,
            config: DsrConfig::default(),
            fetch: FetchOptions::default(),
        }
    }
}

/// What [`fetch_weights`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The converted file was already there; nothing was done.
    AlreadyPresent,
    /// The weights were converted; `archive_checked` says whether they came from an archive
    /// whose SHA-256 matched (false for a bare `.pckl` given with `--from`).
    Converted {
        /// Whether the SHA-256 of the source archive was verified.
        archive_checked: bool,
    },
}

/// The result of [`fetch_weights`].
#[derive(Debug, Clone)]
pub struct Report {
    /// The converted checkpoint.
    pub weights: PathBuf,
    /// What was done.
    pub action: Action,
}

/// The hint given whenever the download fails on the network.
fn offline_hint(url: &str) -> String {
    format!(
        "If this machine is offline (or cannot reach the server), download\n  {url}\n\
         elsewhere, copy it here and run\n  cargo xtask fetch-weights --from FILE\n\
         where FILE is that archive (its SHA-256 is checked) or the {VQ_PCKL_FILE} inside it."
    )
}

/// The cached weights, or downloads, unpacks and converts them (see the module documentation).
pub fn fetch_weights(req: &Request) -> Result<Report> {
    let out = req.cache_dir.join(VQ_WEIGHTS_FILE);
    if out.is_file() && !req.force {
        return Ok(Report {
            weights: out,
            action: Action::AlreadyPresent,
        });
    }
    fs::create_dir_all(&req.cache_dir)
        .with_context(|| format!("cannot create the cache folder {}", req.cache_dir.display()))?;
    let unpacked = req.cache_dir.join(VQ_PCKL_FILE);
    let (pckl, archive_checked) = match &req.from {
        Some(from) => match classify(from)? {
            Given::Archive => {
                verify_sha(from, &req.sha256).with_context(|| {
                    format!(
                        "{} is not the expected archive (damaged, or another file)",
                        from.display()
                    )
                })?;
                eprintln!("{}: SHA-256 verified", from.display());
                let member = unpack_pckl(from, &unpacked)?;
                eprintln!("unpacked {member} to {}", unpacked.display());
                (unpacked, true)
            }
            Given::Pckl => {
                eprintln!(
                    "note: {} is a bare .pckl; the published SHA-256 is that of the zip archive, \
                     so this file was NOT checked against it",
                    from.display()
                );
                (from.clone(), false)
            }
        },
        None => {
            let archive = fetch(&req.url, &req.sha256, &req.cache_dir, &req.fetch)?;
            let member = unpack_pckl(&archive, &unpacked)?;
            eprintln!("unpacked {member} to {}", unpacked.display());
            (unpacked, true)
        }
    };
    convert(&pckl, &out, Some(&req.config))?;
    Ok(Report {
        weights: out,
        action: Action::Converted { archive_checked },
    })
}

/// What a file given with `--from` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Given {
    /// A zip archive holding [`VQ_PCKL_FILE`] somewhere inside.
    Archive,
    /// A PyTorch file (assumed to be the `.pckl` itself; [`convert`] checks it).
    Pckl,
}

/// Tells an archive holding [`VQ_PCKL_FILE`] from a PyTorch file (also a zip, or a legacy
/// pickle).
fn classify(path: &Path) -> Result<Given> {
    let file =
        File::open(path).with_context(|| format!("cannot open {} (--from)", path.display()))?;
    let mut head = [0u8; 2];
    let n = (&file)
        .take(2)
        .read(&mut head)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if n == 2 && head[0] == 0x80 {
        // A legacy (pre-zip) PyTorch pickle: let the loader explain what it can and cannot do.
        return Ok(Given::Pckl);
    }
    let file =
        File::open(path).with_context(|| format!("cannot open {} (--from)", path.display()))?;
    let archive = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| {
        anyhow!(
            "{} is neither a zip archive nor a PyTorch .pckl ({e})",
            path.display()
        )
    })?;
    let names: Vec<&str> = archive.file_names().collect();
    if names.iter().any(|n| is_pckl_member(n)) {
        Ok(Given::Archive)
    } else if names
        .iter()
        .any(|n| n == &"data.pkl" || n.ends_with("/data.pkl"))
    {
        Ok(Given::Pckl)
    } else {
        bail!(
            "{} is a zip archive without {VQ_PCKL_FILE} and not a PyTorch file either",
            path.display()
        )
    }
}

/// Whether the archive member `name` is the pretrained model (in any folder; macOS resource
/// forks excluded).
fn is_pckl_member(name: &str) -> bool {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    base == VQ_PCKL_FILE && !name.starts_with("__MACOSX/")
}

/// The lowercase hexadecimal SHA-256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Checks that the SHA-256 of `path` is `expected` (hexadecimal, either case).
pub fn verify_sha(path: &Path, expected: &str) -> Result<()> {
    let expected = expected.trim().to_ascii_lowercase();
    if expected.len() != 64 || !expected.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("'{expected}' is not a SHA-256 (64 hexadecimal digits)");
    }
    let actual = sha256_file(path)?;
    if actual != expected {
        bail!(
            "the SHA-256 of {} is {actual}, expected {expected}",
            path.display()
        );
    }
    Ok(())
}

/// The file name the download of `url` is stored under: the last segment of its path.
fn download_name(url: &str) -> Result<String> {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let name = path.rsplit('/').next().unwrap_or("");
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !ok || !path.contains("://") {
        bail!("{url}: not a URL ending in a file name");
    }
    Ok(name.to_string())
}

/// Downloads `url` into `cache_dir` and returns the verified file `<cache_dir>/<name>` (`name`
/// = the last segment of the URL).
///
/// The transfer goes to `<name>.part`; when that file exists, the download resumes after its
/// last byte with a `Range` request (a server answering `200` instead of `206` is downloaded
/// again from the start). The part file is renamed into place only once its SHA-256 equals
/// `expected_sha`; on a mismatch it is deleted. An interrupted transfer keeps the part file for
/// the next run. A file already at `<cache_dir>/<name>` is reused when its SHA-256 matches.
pub fn fetch(
    url: &str,
    expected_sha: &str,
    cache_dir: &Path,
    opts: &FetchOptions,
) -> Result<PathBuf> {
    let name = download_name(url)?;
    fs::create_dir_all(cache_dir)
        .with_context(|| format!("cannot create the cache folder {}", cache_dir.display()))?;
    let dest = cache_dir.join(&name);
    let part = cache_dir.join(format!("{name}.part"));
    if dest.is_file() {
        match verify_sha(&dest, expected_sha) {
            Ok(()) => {
                eprintln!(
                    "{} is already downloaded (SHA-256 verified)",
                    dest.display()
                );
                return Ok(dest);
            }
            Err(e) => {
                eprintln!("{e:#}: downloading it again");
                fs::remove_file(&dest)
                    .with_context(|| format!("cannot delete {}", dest.display()))?;
            }
        }
    }
    let agent = agent(opts);
    let mut restarted = false;
    loop {
        let offset = match fs::metadata(&part) {
            Ok(m) if m.is_file() => m.len(),
            _ => 0,
        };
        match download(&agent, url, &part, offset, opts)? {
            Transfer::Complete => break,
            Transfer::Restart(why) if !restarted => {
                eprintln!("{why}: downloading again from the start");
                remove_if_present(&part)?;
                restarted = true;
            }
            Transfer::Restart(why) => bail!("{url}: {why}"),
        }
    }
    if let Err(e) = verify_sha(&part, expected_sha) {
        remove_if_present(&part)?;
        bail!(
            "downloaded {url}, but {e:#}; the partial file {} was deleted, run the command again \
             to download from scratch",
            part.display()
        );
    }
    fs::rename(&part, &dest)
        .with_context(|| format!("cannot rename {} to {}", part.display(), dest.display()))?;
    eprintln!("{}: SHA-256 verified", dest.display());
    Ok(dest)
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow!("cannot delete {}: {e}", path.display())),
    }
}

fn agent(opts: &FetchOptions) -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .timeout_resolve(Some(opts.connect_timeout))
        .timeout_connect(Some(opts.connect_timeout))
        .timeout_recv_response(Some(opts.read_timeout))
        .timeout_per_read(Some(opts.read_timeout))
        .http_status_as_error(false)
        .user_agent(concat!("dsr-rs-xtask/", env!("CARGO_PKG_VERSION")))
        .build();
    ureq::Agent::new_with_config(config)
}

/// How one request ended.
enum Transfer {
    /// The part file holds everything the server has.
    Complete,
    /// The part file cannot be continued (the reason is given); start again from byte 0.
    Restart(String),
}

/// `bytes START-END/TOTAL` → START; `bytes */TOTAL` → None.
fn content_range_start(value: &str) -> Option<u64> {
    let spec = value.trim().strip_prefix("bytes")?.trim_start();
    spec.split('-').next()?.trim().parse().ok()
}

/// `bytes …/TOTAL` → TOTAL.
fn content_range_total(value: &str) -> Option<u64> {
    value.rsplit('/').next()?.trim().parse().ok()
}

/// One GET of `url`, appending to `part` from `offset` (0: a fresh download).
fn download(
    agent: &ureq::Agent,
    url: &str,
    part: &Path,
    offset: u64,
    opts: &FetchOptions,
) -> Result<Transfer> {
    let mut request = agent.get(url);
    if offset > 0 {
        eprintln!(
            "resuming the download of {url} after the {offset} bytes in {}",
            part.display()
        );
        request = request.header("Range", format!("bytes={offset}-"));
    } else {
        eprintln!("downloading {url}");
    }
    let response = request
        .call()
        .map_err(|e| anyhow!("cannot download {url}: {e}\n{}", offline_hint(url)))?;
    let status = response.status();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let content_range = header("content-range");
    let length: Option<u64> = header("content-length").and_then(|v| v.trim().parse().ok());
    let open_err = |e: io::Error| anyhow!("cannot write {}: {e}", part.display());
    let (file, start) = match status.as_u16() {
        206 => match content_range.as_deref().and_then(content_range_start) {
            Some(start) if start == offset => {
                let file = OpenOptions::new()
                    .append(true)
                    .open(part)
                    .map_err(open_err)?;
                (file, offset)
            }
            _ => {
                return Ok(Transfer::Restart(format!(
                    "{url} answered a request for the bytes from {offset} with the range {}",
                    content_range.as_deref().unwrap_or("(none)")
                )))
            }
        },
        200 => {
            if offset > 0 {
                eprintln!(
                    "{url} does not resume downloads (it answered 200, not 206): downloading \
                     again from the start"
                );
            }
            (File::create(part).map_err(open_err)?, 0)
        }
        416 if offset > 0 => {
            // Range Not Satisfiable: the part file already holds at least as many bytes as the
            // server has. Keep it if it is exactly the whole file (its SHA-256 decides next).
            let total = content_range.as_deref().and_then(content_range_total);
            return Ok(match total {
                Some(total) if total == offset => Transfer::Complete,
                _ => Transfer::Restart(format!(
                    "{} ({offset} bytes) is longer than the file at {url} ({})",
                    part.display(),
                    total.map_or("size unknown".to_string(), |t| format!("{t} bytes"))
                )),
            });
        }
        _ => bail!(
            "cannot download {url}: the server answered HTTP {} {}",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        ),
    };
    let total = length.map(|n| n + start);
    let mut body = response.into_body().into_reader();
    let mut writer = io::BufWriter::with_capacity(1 << 16, file);
    let mut progress = Progress::new(opts.progress, total);
    let mut buf = vec![0u8; 1 << 16];
    let mut received = start;
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                progress.finish();
                let kept = writer.flush().is_ok();
                bail!(
                    "the download of {url} was interrupted after {received} bytes: {e}\n{}",
                    if kept {
                        format!(
                            "What arrived is kept in {}: run the command again to resume.",
                            part.display()
                        )
                    } else {
                        format!("Could not save what arrived in {}.", part.display())
                    }
                );
            }
        };
        writer.write_all(&buf[..n]).map_err(open_err)?;
        received += n as u64;
        progress.update(received);
    }
    progress.finish();
    let file = writer
        .into_inner()
        .map_err(|e| anyhow!("cannot write {}: {}", part.display(), e.error()))?;
    file.sync_all().map_err(open_err)?;
    if let Some(total) = total {
        if received != total {
            bail!(
                "the download of {url} ended after {received} of {total} bytes; what arrived is \
                 kept in {}: run the command again to resume",
                part.display()
            );
        }
    }
    Ok(Transfer::Complete)
}

/// A one-line progress display on stderr.
struct Progress {
    enabled: bool,
    total: Option<u64>,
    last: Instant,
    shown: bool,
}

impl Progress {
    fn new(enabled: bool, total: Option<u64>) -> Self {
        Self {
            enabled,
            total,
            last: Instant::now(),
            shown: false,
        }
    }

    fn update(&mut self, received: u64) {
        if !self.enabled || self.last.elapsed() < Duration::from_millis(200) {
            return;
        }
        self.last = Instant::now();
        self.shown = true;
        let mib = |n: u64| n as f64 / (1024.0 * 1024.0);
        match self.total {
            Some(t) if t > 0 => eprint!(
                "\r  {:.1} / {:.1} MiB ({:.0}%)   ",
                mib(received),
                mib(t),
                100.0 * received as f64 / t as f64
            ),
            _ => eprint!("\r  {:.1} MiB   ", mib(received)),
        }
    }

    fn finish(&mut self) {
        if self.shown {
            eprintln!();
            self.shown = false;
        }
    }
}

/// The largest `.pckl` unpacked (the official one is about 130 MB).
pub const MAX_PCKL_BYTES: u64 = 4 << 30;
/// The largest expansion accepted for the compressed `.pckl` (uncompressed / compressed size);
/// float weights deflate by a few percent, so more means a corrupt archive or a zip bomb.
pub const MAX_PCKL_RATIO: u64 = 20;

/// Writes the archive member named [`VQ_PCKL_FILE`] (in whichever folder of the archive) to
/// `dest` (through a temporary file in the same folder, then a rename). Returns the member's
/// path inside the archive.
///
/// Zip bombs are refused without inflating them: the member's declared size must be at most
/// [`MAX_PCKL_BYTES`] and at most [`MAX_PCKL_RATIO`] times its compressed size (above 1 MiB), and
/// it is inflated through a reader that stops one byte past the declared size, so a member
/// that lies about its size is found after that byte.
pub fn unpack_pckl(zip_path: &Path, dest: &Path) -> Result<String> {
    let file =
        File::open(zip_path).with_context(|| format!("cannot open {}", zip_path.display()))?;
    let mut archive = zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| anyhow!("{} is not a readable zip archive: {e}", zip_path.display()))?;
    let names: Vec<String> = archive.file_names().map(str::to_string).collect();
    let Some(member) = names.iter().find(|n| is_pckl_member(n)).cloned() else {
        let mut listed: Vec<&str> = names.iter().map(String::as_str).take(10).collect();
        if names.len() > 10 {
            listed.push("…");
        }
        bail!(
            "{} holds no file named {VQ_PCKL_FILE} (it holds: {})",
            zip_path.display(),
            if listed.is_empty() {
                "nothing".to_string()
            } else {
                listed.join(", ")
            }
        );
    };
    let entry = archive
        .by_name(&member)
        .map_err(|e| anyhow!("{}: cannot read {member}: {e}", zip_path.display()))?;
    let (size, packed) = (entry.size(), entry.compressed_size());
    if size > MAX_PCKL_BYTES || (size > (1 << 20) && size / packed.max(1) > MAX_PCKL_RATIO) {
        bail!(
            "{}: {member} would inflate from {packed} to {size} bytes: refused as a possible zip bomb (the official model is about 130 MB and barely compresses)",
            zip_path.display()
        );
    }
    let mut entry = entry.take(size + 1);
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let file_name = dest
        .file_name()
        .ok_or_else(|| anyhow!("{}: not a file path", dest.display()))?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let result = (|| -> Result<()> {
        let mut out =
            File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let copied = io::copy(&mut entry, &mut out).with_context(|| {
            format!(
                "cannot unpack {member} from {} to {}",
                zip_path.display(),
                tmp.display()
            )
        })?;
        if copied != size {
            bail!(
                "{}: {member} inflates to {} bytes but declares {size}: the archive is corrupt (or a zip bomb)",
                zip_path.display(),
                if copied > size {
                    format!("more than {size}")
                } else {
                    copied.to_string()
                }
            );
        }
        out.sync_all()
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        fs::rename(&tmp, dest)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), dest.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|()| member)
}

/// The widths of a discrete latent model, for messages.
fn describe(cfg: &DsrConfig) -> String {
    format!(
        "embedding_dim {}, num_embeddings {}, num_hiddens {}, num_residual_hiddens {}, \
         num_residual_layers {}",
        cfg.embedding_dim,
        cfg.num_embeddings,
        cfg.num_hiddens,
        cfg.num_residual_hiddens,
        cfg.num_residual_layers
    )
}

/// Converts the official discrete-model `.pckl` to our safetensors checkpoint at `out`
/// (written atomically), like `dsr convert` does: keys under `discrete_latent_model.`,
/// metadata `dsr.partial = discrete_latent_model` and `dsr.converted_from = <file name>`.
///
/// The model's widths are read from its tensor shapes; with `expected`, they must equal its
/// widths (the error lists both) and `expected` is the configuration stored; without, the
/// widths found are stored with the other fields at their defaults. Returns the configuration
/// stored.
pub fn convert(pckl: &Path, out: &Path, expected: Option<&DsrConfig>) -> Result<DsrConfig> {
    if !pckl.is_file() {
        bail!("{}: no such file", pckl.display());
    }
    let ckpt = load_discrete_pckl(pckl)
        .with_context(|| format!("cannot read {} as a DSR discrete model", pckl.display()))?;
    let found = ckpt.config.unwrap_or_default();
    let cfg = match expected {
        Some(want) => {
            if describe(want) != describe(&found) {
                bail!(
                    "{}: its tensors are those of a discrete model with {}; expected {}",
                    pckl.display(),
                    describe(&found),
                    describe(want)
                );
            }
            *want
        }
        None => found,
    };
    let shapes: Vec<(String, Vec<usize>)> = cfg
        .discrete_state_dict_shapes()
        .with_context(|| format!("the configuration for {}", pckl.display()))?
        .into_iter()
        .map(|(k, s)| (format!("{DISCRETE_PREFIX}{k}"), s))
        .collect();
    check_tensors(pckl, &ckpt.tensors, &shapes)?;
    let source = pckl
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| pckl.display().to_string());
    let metadata = [
        (META_PARTIAL.to_string(), PARTIAL_DISCRETE.to_string()),
        (META_CONVERTED_FROM.to_string(), source),
    ]
    .into_iter()
    .collect();
    if let Some(dir) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    save_checkpoint(out, &ckpt.tensors, &cfg, None, &metadata)
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(cfg)
}

#[cfg(test)]
#[path = "fetch_tests.rs"]
mod tests;
