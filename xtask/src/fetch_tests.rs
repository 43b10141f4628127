//! Tests of `fetch-weights` without the network: a minimal HTTP/1.1 server on 127.0.0.1 serves
//! an archive built here around the small fixture `.pckl`.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dsr_core::cache::{VQ_PCKL_FILE, VQ_WEIGHTS_FILE};
use dsr_core::weights::{load_checkpoint, load_discrete_pckl};
use dsr_core::DsrConfig;
use sha2::{Digest, Sha256};
use zip::write::SimpleFileOptions;

use super::*;

const ARCHIVE: &str = "dsr_vq_model_pretrained.zip";

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/dsr-core/tests/fixtures/small")
}

fn fixture_pckl() -> PathBuf {
    fixture_dir().join("discrete_small.pckl")
}

fn fixture_config() -> DsrConfig {
    let text = std::fs::read_to_string(fixture_dir().join("config.json")).unwrap();
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    serde_json::from_value(value["config"].clone()).unwrap()
}

/// A fresh, empty folder for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir()
        .join(format!("xtask-fetch-tests-{}", std::process::id()))
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A zip archive like anomalib's: the model inside a folder, next to another file.
fn archive_bytes() -> Vec<u8> {
    let pckl = std::fs::read(fixture_pckl()).unwrap();
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    writer.add_directory("checkpoints/", opts).unwrap();
    writer.start_file("checkpoints/README.txt", opts).unwrap();
    writer.write_all(b"pretrained discrete model").unwrap();
    writer
        .start_file(format!("checkpoints/{VQ_PCKL_FILE}"), opts)
        .unwrap();
    writer.write_all(&pckl).unwrap();
    writer.finish().unwrap().into_inner()
}

fn sha_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn quiet() -> FetchOptions {
    FetchOptions {
        connect_timeout: Duration::from_secs(10),
        read_timeout: Duration::from_secs(10),
        progress: false,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Answers a `Range` request with 206 and the requested bytes.
    Honour,
    /// Ignores `Range` and always answers 200 with the whole file.
    Ignore,
    /// The first response announces the whole file but the connection drops after this many
    /// bytes; later requests are served as in `Honour`.
    CutFirstAt(usize),
}

/// A minimal HTTP/1.1 server for one file at `/<ARCHIVE>`; records the `Range` header of every
/// request (`None` when absent).
struct Server {
    url: String,
    ranges: Arc<Mutex<Vec<Option<String>>>>,
}

impl Server {
    fn start(body: Vec<u8>, mode: Mode) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/files/{ARCHIVE}", listener.local_addr().unwrap());
        let ranges = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&ranges);
        std::thread::spawn(move || {
            for (n, stream) in listener.incoming().enumerate() {
                let Ok(stream) = stream else { continue };
                let _ = handle(stream, &body, mode, n, &log);
            }
        });
        Self { url, ranges }
    }

    fn ranges(&self) -> Vec<Option<String>> {
        self.ranges.lock().unwrap().clone()
    }
}

fn handle(
    mut stream: TcpStream,
    body: &[u8],
    mode: Mode,
    index: usize,
    log: &Mutex<Vec<Option<String>>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("range") {
                range = Some(value.trim().to_string());
            }
        }
    }
    log.lock().unwrap().push(range.clone());
    let path = request_line.split_whitespace().nth(1).unwrap_or("");
    if path != format!("/files/{ARCHIVE}") {
        let text = b"not found";
        write!(
            stream,
            "HTTP/1.1 404 Not Found\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            text.len()
        )?;
        stream.write_all(text)?;
        return Ok(());
    }
    let len = body.len();
    let start = match (mode, &range) {
        (Mode::Ignore, _) | (_, None) => None,
        (Mode::CutFirstAt(_), Some(_)) if index == 0 => None,
        (_, Some(r)) => r
            .strip_prefix("bytes=")
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|s| s.parse::<usize>().ok()),
    };
    match start {
        Some(s) if s >= len => write!(
            stream,
            "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        )?,
        Some(s) => {
            write!(
                stream,
                "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {s}-{}/{len}\r\n\
                 Content-Length: {}\r\nContent-Type: application/zip\r\nConnection: close\r\n\r\n",
                len - 1,
                len - s
            )?;
            stream.write_all(&body[s..])?;
        }
        None => {
            write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nContent-Type: application/zip\r\n\
                 Connection: close\r\n\r\n"
            )?;
            match mode {
                Mode::CutFirstAt(cut) if index == 0 => {
                    stream.write_all(&body[..cut])?;
                    stream.flush()?;
                    // Drop the connection mid-body.
                    stream.shutdown(std::net::Shutdown::Both)?;
                    return Ok(());
                }
                _ => stream.write_all(body)?,
            }
        }
    }
    stream.flush()
}

#[test]
fn full_download_is_verified_and_renamed_into_place() {
    let bytes = archive_bytes();
    let server = Server::start(bytes.clone(), Mode::Honour);
    let dir = scratch("full");
    let got = fetch(&server.url, &sha_hex(&bytes), &dir, &quiet()).unwrap();
    assert_eq!(got, dir.join(ARCHIVE));
    assert_eq!(std::fs::read(&got).unwrap(), bytes);
    assert!(!dir.join(format!("{ARCHIVE}.part")).exists());
    assert_eq!(server.ranges(), vec![None]);

    // A second call reuses the verified file without a request.
    fetch(&server.url, &sha_hex(&bytes), &dir, &quiet()).unwrap();
    assert_eq!(server.ranges().len(), 1);
}

#[test]
fn a_half_written_part_file_is_resumed_with_a_range_request() {
    let bytes = archive_bytes();
    let half = bytes.len() / 2;
    let server = Server::start(bytes.clone(), Mode::Honour);
    let dir = scratch("resume");
    std::fs::write(dir.join(format!("{ARCHIVE}.part")), &bytes[..half]).unwrap();
    let got = fetch(&server.url, &sha_hex(&bytes), &dir, &quiet()).unwrap();
    assert_eq!(std::fs::read(got).unwrap(), bytes);
    assert_eq!(server.ranges(), vec![Some(format!("bytes={half}-"))]);
    assert!(!dir.join(format!("{ARCHIVE}.part")).exists());
}

#[test]
fn an_interrupted_download_keeps_its_part_file_and_the_next_run_resumes() {
    let bytes = archive_bytes();
    let cut = bytes.len() / 3;
    let server = Server::start(bytes.clone(), Mode::CutFirstAt(cut));
    let dir = scratch("interrupted");
    let part = dir.join(format!("{ARCHIVE}.part"));
    let err = fetch(&server.url, &sha_hex(&bytes), &dir, &quiet()).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains(&server.url), "{msg}");
    assert!(msg.contains("resume"), "{msg}");
    let kept = std::fs::read(&part).unwrap();
    assert!(
        !kept.is_empty() && kept.len() <= cut,
        "{} bytes kept",
        kept.len()
    );
    assert_eq!(kept, bytes[..kept.len()]);

    let got = fetch(&server.url, &sha_hex(&bytes), &dir, &quiet()).unwrap();
    assert_eq!(std::fs::read(got).unwrap(), bytes);
    assert_eq!(
        server.ranges(),
        vec![None, Some(format!("bytes={}-", kept.len()))]
    );
}

#[test]
fn a_sha_mismatch_is_an_error_and_deletes_the_part_file() {
    let bytes = archive_bytes();
    let server = Server::start(bytes.clone(), Mode::Honour);
    let dir = scratch("mismatch");
    let wrong = "0".repeat(64);
    let err = fetch(&server.url, &wrong, &dir, &quiet()).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("SHA-256"), "{msg}");
    assert!(msg.contains(&sha_hex(&bytes)), "{msg}");
    assert!(msg.contains("deleted"), "{msg}");
    assert!(!dir.join(format!("{ARCHIVE}.part")).exists());
    assert!(!dir.join(ARCHIVE).exists());

    // A corrupt partial file is resumed, caught by the checksum, and deleted.
    let part = dir.join(format!("{ARCHIVE}.part"));
    std::fs::write(&part, vec![0xAB; bytes.len() / 2]).unwrap();
    let err = fetch(&server.url, &sha_hex(&bytes), &dir, &quiet()).unwrap_err();
    assert!(format!("{err:#}").contains("SHA-256"));
    assert!(!part.exists());
    assert!(!dir.join(ARCHIVE).exists());
    // ... and the next run starts from scratch and succeeds.
    fetch(&server.url, &sha_hex(&bytes), &dir, &quiet()).unwrap();
    assert_eq!(server.ranges().last(), Some(&None));
}

#[test]
fn a_server_answering_200_to_a_range_request_restarts_the_download() {
    let bytes = archive_bytes();
    let server = Server::start(bytes.clone(), Mode::Ignore);
    let dir = scratch("ignore-range");
    // Garbage in the part file: with a 200 it must be overwritten, not appended to.
    std::fs::write(dir.join(format!("{ARCHIVE}.part")), vec![0xCD; 100]).unwrap();
    let got = fetch(&server.url, &sha_hex(&bytes), &dir, &quiet()).unwrap();
    assert_eq!(std::fs::read(got).unwrap(), bytes);
    assert_eq!(server.ranges(), vec![Some("bytes=100-".to_string())]);
}

#[test]
fn a_complete_part_file_answered_with_416_is_verified_and_kept() {
    let bytes = archive_bytes();
    let server = Server::start(bytes.clone(), Mode::Honour);
    let dir = scratch("complete-part");
    std::fs::write(dir.join(format!("{ARCHIVE}.part")), &bytes).unwrap();
    let got = fetch(&server.url, &sha_hex(&bytes), &dir, &quiet()).unwrap();
    assert_eq!(std::fs::read(got).unwrap(), bytes);
    assert_eq!(
        server.ranges(),
        vec![Some(format!("bytes={}-", bytes.len()))]
    );

    // A part file longer than the file is discarded and the download starts again.
    std::fs::remove_file(dir.join(ARCHIVE)).unwrap();
    std::fs::write(
        dir.join(format!("{ARCHIVE}.part")),
        vec![1u8; bytes.len() + 10],
    )
    .unwrap();
    let got = fetch(&server.url, &sha_hex(&bytes), &dir, &quiet()).unwrap();
    assert_eq!(std::fs::read(got).unwrap(), bytes);
    assert_eq!(server.ranges().last(), Some(&None));
}

#[test]
fn an_http_error_names_the_url_and_the_status() {
    let server = Server::start(archive_bytes(), Mode::Honour);
    let dir = scratch("404");
    let url = server.url.replace(ARCHIVE, "other.zip");
    let err = fetch(&url, &"0".repeat(64), &dir, &quiet()).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains(&url) && msg.contains("404"), "{msg}");
    assert!(!dir.join("other.zip.part").exists());
}

#[test]
fn an_unreachable_server_fails_fast_with_the_from_hint() {
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}/x/{ARCHIVE}");
    let dir = scratch("unreachable");
    let started = Instant::now();
    let err = fetch(&url, ARCHIVE_SHA256, &dir, &quiet()).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let msg = format!("{err:#}");
    assert!(msg.contains(&url), "{msg}");
    assert!(
        msg.contains("cargo xtask fetch-weights --from FILE"),
        "{msg}"
    );

    // The same through the whole task.
    let req = fixture_request(&dir.join("cache"), &url, ARCHIVE_SHA256);
    let err = fetch_weights(&req).unwrap_err();
    assert!(format!("{err:#}").contains("--from FILE"));
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn unpack_finds_the_model_in_any_folder_and_names_what_is_missing() {
    let dir = scratch("unpack");
    let zip_path = dir.join(ARCHIVE);
    std::fs::write(&zip_path, archive_bytes()).unwrap();
    let dest = dir.join("out").join(VQ_PCKL_FILE);
    let member = unpack_pckl(&zip_path, &dest).unwrap();
    assert_eq!(member, format!("checkpoints/{VQ_PCKL_FILE}"));
    assert_eq!(
        std::fs::read(&dest).unwrap(),
        std::fs::read(fixture_pckl()).unwrap()
    );

    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    writer
        .start_file("weights/other.pckl", SimpleFileOptions::default())
        .unwrap();
    writer.write_all(b"x").unwrap();
    let other = dir.join("other.zip");
    std::fs::write(&other, writer.finish().unwrap().into_inner()).unwrap();
    let msg = format!("{:#}", unpack_pckl(&other, &dest).unwrap_err());
    assert!(
        msg.contains(VQ_PCKL_FILE) && msg.contains("weights/other.pckl"),
        "{msg}"
    );

    let not_zip = dir.join("not.zip");
    std::fs::write(&not_zip, b"hello").unwrap();
    let msg = format!("{:#}", unpack_pckl(&not_zip, &dest).unwrap_err());
    assert!(msg.contains("not.zip"), "{msg}");
}

/// Overwrites the declared uncompressed size of entry `name` in its local header and its
/// central-directory record.
fn set_declared_size(zip: &mut [u8], name: &str, size: u32) {
    let mut found = 0;
    for i in 0..zip.len().saturating_sub(46) {
        let (size_at, name_len_at, name_at) = match &zip[i..i + 4] {
            b"PK\x03\x04" => (22, 26, 30),
            b"PK\x01\x02" => (24, 28, 46),
            _ => continue,
        };
        let len = u16::from_le_bytes([zip[i + name_len_at], zip[i + name_len_at + 1]]) as usize;
        if zip.get(i + name_at..i + name_at + len) == Some(name.as_bytes()) {
            zip[i + size_at..i + size_at + 4].copy_from_slice(&size.to_le_bytes());
            found += 1;
        }
    }
    assert_eq!(found, 2);
}

#[test]
fn zip_bombs_are_refused_without_inflating_them() {
    let dir = scratch("bomb");
    let dest = dir.join("out").join(VQ_PCKL_FILE);
    let member = format!("checkpoints/{VQ_PCKL_FILE}");
    let opts = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    // 256 MiB of zeros deflate to about 256 KiB.
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    writer.start_file(&member, opts).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..256 {
        writer.write_all(&zeros).unwrap();
    }
    let bomb = dir.join("bomb.zip");
    std::fs::write(&bomb, writer.finish().unwrap().into_inner()).unwrap();
    let msg = format!("{:#}", unpack_pckl(&bomb, &dest).unwrap_err());
    assert!(msg.contains("refused as a possible zip bomb"), "{msg}");
    assert!(!dest.exists());

    // A member that declares fewer bytes than it inflates to: stopped one byte past.
    let mut bytes = archive_bytes();
    set_declared_size(&mut bytes, &member, 1000);
    let liar = dir.join("liar.zip");
    std::fs::write(&liar, bytes).unwrap();
    let msg = format!("{:#}", unpack_pckl(&liar, &dest).unwrap_err());
    assert!(
        msg.contains("inflates to more than 1000 bytes but declares 1000"),
        "{msg}"
    );
    assert!(!dest.exists());
    let leftovers: Vec<_> = std::fs::read_dir(dest.parent().unwrap())
        .unwrap()
        .flatten()
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Checks that `weights` loads with `load_checkpoint` and holds the fixture's tensors.
fn assert_converted(weights: &Path) {
    let ckpt = load_checkpoint(weights).unwrap();
    let reference = load_discrete_pckl(&fixture_pckl()).unwrap();
    assert_eq!(ckpt.config, Some(fixture_config()));
    assert_eq!(
        ckpt.metadata.get(META_PARTIAL).map(String::as_str),
        Some(PARTIAL_DISCRETE)
    );
    assert!(ckpt.metadata.contains_key(META_CONVERTED_FROM));
    assert_eq!(ckpt.tensors.len(), reference.tensors.len());
    for (key, want) in &reference.tensors {
        assert!(key.starts_with(DISCRETE_PREFIX), "{key}");
        let got = &ckpt.tensors[key];
        assert_eq!(got.dims(), want.dims(), "{key}");
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got, want, "{key}");
    }
}

fn fixture_request(cache: &Path, url: &str, sha: &str) -> Request {
    let mut req = Request::new(cache.to_path_buf());
    req.url = url.to_string();
    req.sha256 = sha.to_string();
    req.config = fixture_config();
    req.fetch = quiet();
    req
}

#[test]
fn fetch_weights_downloads_unpacks_and_converts_then_reuses() {
    let bytes = archive_bytes();
    let server = Server::start(bytes.clone(), Mode::Honour);
    let cache = scratch("end-to-end").join("cache");
    let req = fixture_request(&cache, &server.url, &sha_hex(&bytes));
    let report = fetch_weights(&req).unwrap();
    assert_eq!(report.weights, cache.join(VQ_WEIGHTS_FILE));
    assert_eq!(
        report.action,
        Action::Converted {
            archive_checked: true
        }
    );
    assert!(cache.join(ARCHIVE).is_file());
    assert!(cache.join(VQ_PCKL_FILE).is_file());
    assert_converted(&report.weights);
    let ckpt = load_checkpoint(&report.weights).unwrap();
    assert_eq!(
        ckpt.metadata.get(META_CONVERTED_FROM).map(String::as_str),
        Some(VQ_PCKL_FILE)
    );

    // Already there: nothing is done.
    let report = fetch_weights(&req).unwrap();
    assert_eq!(report.action, Action::AlreadyPresent);
    assert_eq!(server.ranges().len(), 1);

    // --force converts again from the cached (re-verified) archive, without a request.
    let mut forced = req.clone();
    forced.force = true;
    std::fs::write(cache.join(VQ_WEIGHTS_FILE), b"broken").unwrap();
    let report = fetch_weights(&forced).unwrap();
    assert!(matches!(report.action, Action::Converted { .. }));
    assert_converted(&report.weights);
    assert_eq!(server.ranges().len(), 1);
}

#[test]
fn from_a_zip_checks_its_sha_and_converts() {
    let dir = scratch("from-zip");
    let zip_path = dir.join("download").join("some name.zip");
    std::fs::create_dir_all(zip_path.parent().unwrap()).unwrap();
    let bytes = archive_bytes();
    std::fs::write(&zip_path, &bytes).unwrap();
    let cache = dir.join("cache");
    // The URL must never be used.
    let mut req = fixture_request(&cache, "http://127.0.0.1:1/never.zip", &sha_hex(&bytes));
    req.from = Some(zip_path.clone());
    let report = fetch_weights(&req).unwrap();
    assert_eq!(
        report.action,
        Action::Converted {
            archive_checked: true
        }
    );
    assert_converted(&report.weights);

    // A zip with another checksum is refused and nothing is written.
    let cache2 = dir.join("cache2");
    let mut req = fixture_request(&cache2, "http://127.0.0.1:1/never.zip", &"1".repeat(64));
    req.from = Some(zip_path.clone());
    let msg = format!("{:#}", fetch_weights(&req).unwrap_err());
    assert!(
        msg.contains("some name.zip") && msg.contains("SHA-256"),
        "{msg}"
    );
    assert!(!cache2.join(VQ_WEIGHTS_FILE).exists());
}

#[test]
fn from_a_bare_pckl_converts_without_a_checksum() {
    let dir = scratch("from-pckl");
    let cache = dir.join("cache");
    let mut req = fixture_request(&cache, "http://127.0.0.1:1/never.zip", ARCHIVE_SHA256);
    req.from = Some(fixture_pckl());
    let report = fetch_weights(&req).unwrap();
    assert_eq!(
        report.action,
        Action::Converted {
            archive_checked: false
        }
    );
    let ckpt = load_checkpoint(&report.weights).unwrap();
    assert_eq!(
        ckpt.metadata.get(META_CONVERTED_FROM).map(String::as_str),
        Some("discrete_small.pckl")
    );
    assert_converted(&report.weights);

    // A file that is neither is refused with its name (--force: the converted file exists).
    req.force = true;
    let junk = dir.join("junk.bin");
    std::fs::write(&junk, b"not a zip at all").unwrap();
    req.from = Some(junk);
    let msg = format!("{:#}", fetch_weights(&req.clone()).unwrap_err());
    assert!(msg.contains("junk.bin"), "{msg}");
    req.from = Some(dir.join("missing.zip"));
    let msg = format!("{:#}", fetch_weights(&req).unwrap_err());
    assert!(msg.contains("missing.zip"), "{msg}");
}

#[test]
fn convert_infers_the_widths_and_refuses_another_configuration() {
    let dir = scratch("convert");
    let out = dir.join("nested").join("small.safetensors");
    let cfg = convert(&fixture_pckl(), &out, None).unwrap();
    let want = fixture_config();
    assert_eq!(
        (
            cfg.embedding_dim,
            cfg.num_embeddings,
            cfg.num_hiddens,
            cfg.num_residual_layers,
            cfg.num_residual_hiddens
        ),
        (
            want.embedding_dim,
            want.num_embeddings,
            want.num_hiddens,
            want.num_residual_layers,
            want.num_residual_hiddens
        )
    );
    assert_eq!(load_checkpoint(&out).unwrap().config, Some(cfg));

    // The official configuration (D = 128, K = 4096) does not fit the small fixture.
    let official = dir.join("official.safetensors");
    let msg = format!(
        "{:#}",
        convert(&fixture_pckl(), &official, Some(&DsrConfig::default())).unwrap_err()
    );
    assert!(msg.contains("discrete_small.pckl"), "{msg}");
    assert!(
        msg.contains("embedding_dim 8") && msg.contains("embedding_dim 128"),
        "{msg}"
    );
    assert!(!official.exists());

    let msg = format!(
        "{:#}",
        convert(&dir.join("absent.pckl"), &official, None).unwrap_err()
    );
    assert!(msg.contains("absent.pckl"), "{msg}");
}

#[test]
fn content_range_parsing_and_download_names() {
    assert_eq!(content_range_start("bytes 100-199/200"), Some(100));
    assert_eq!(content_range_start("bytes */200"), None);
    assert_eq!(content_range_total("bytes */200"), Some(200));
    assert_eq!(content_range_total("bytes 0-1/*"), None);
    assert_eq!(download_name(ARCHIVE_URL).unwrap(), ARCHIVE);
    assert_eq!(download_name("http://h/a/b.zip?x=1").unwrap(), "b.zip");
    assert!(download_name("http://h/").is_err());
    assert!(download_name("b.zip").is_err());
}
