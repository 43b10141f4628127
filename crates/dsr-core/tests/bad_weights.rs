//! Bad weight files: every loader (safetensors, PyTorch zip archives, the official `.pckl`,
//! anomalib `.ckpt`) answers a truncated, lying, hostile or mismatched file with an error that
//! names the file, never with a panic or a large allocation (checked by a counting allocator).

mod peak_alloc;
mod torch_zip;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use dsr_core::weights::{
    load_checkpoint, load_discrete_pckl, load_lightning_ckpt, load_safetensors, load_torch,
    safetensors_from_bytes, save_checkpoint, META_CONFIG, META_IMAGE_SIZE,
};
use dsr_core::{DsrConfig, DsrModel, Error};
use peak_alloc::*;
use torch_zip::*;

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

/// No allocation in these tests may exceed this (the largest legitimate one is a few MB).
const ALLOCATION_LIMIT: usize = 256 << 20;

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("dsr-bad-weights-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The seeded tensors of the tiny model.
fn tiny_tensors() -> HashMap<String, Tensor> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    DsrModel::new(&DsrConfig::tiny(), vb).unwrap();
    dsr_core::init::init_seeded(&varmap, 3, dsr_core::init::InitScheme::Pytorch, &[]).unwrap();
    let data = varmap.data().lock().unwrap();
    data.iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap()))
        .collect()
}

/// Asserts a weights error about `path` whose message contains `needle`, and prints the line a
/// user would see.
fn expect_error<T>(result: dsr_core::Result<T>, path: &Path, needle: &str) {
    match result {
        Err(e) => {
            let line = e.to_string();
            println!("{}: {line}", path.file_name().unwrap().to_string_lossy());
            assert!(
                line.contains(&path.display().to_string()),
                "the message does not name {}: {line}",
                path.display()
            );
            assert!(line.contains(needle), "'{line}' lacks '{needle}'");
            assert!(!line.contains('\n'), "not one line: {line}");
        }
        Ok(_) => panic!("expected an error containing '{needle}', got a result"),
    }
    assert_no_allocation_above(ALLOCATION_LIMIT);
}

/// A safetensors file by hand: `header` (JSON) and `data`.
fn safetensors_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

#[test]
fn truncated_safetensors_fail_at_every_cut() {
    let dir = Scratch::new("truncated");
    let good = dir.0.join("good.safetensors");
    save_checkpoint(
        &good,
        &tiny_tensors(),
        &DsrConfig::tiny(),
        Some([64, 64]),
        &BTreeMap::new(),
    )
    .unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    for cut in [
        0,
        3,
        8,
        9,
        8 + header_len / 2,
        8 + header_len,
        8 + header_len + 5,
        bytes.len() / 2,
        bytes.len() - 1,
    ] {
        let path = dir.write(&format!("cut-{cut}.safetensors"), &bytes[..cut]);
        let needle = match cut {
            0 => "empty",
            1..=8 => "not a weight file",
            _ => "not a valid safetensors file",
        };
        expect_error(load_checkpoint(&path), &path, needle);
        if cut >= 8 {
            expect_error(
                load_safetensors(&path),
                &path,
                "not a valid safetensors file",
            );
        }
    }
}

#[test]
fn safetensors_headers_that_lie_are_refused() {
    let dir = Scratch::new("lies");
    let cases: [(&str, Vec<u8>, &str); 7] = [
        (
            "offsets-past-the-data",
            safetensors_bytes(
                r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
                &[0u8; 8],
            ),
            "not a valid safetensors file",
        ),
        (
            "shape-does-not-fit-offsets",
            safetensors_bytes(
                r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                &[0u8; 8],
            ),
            "not a valid safetensors file",
        ),
        (
            "overlapping-offsets",
            safetensors_bytes(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                &[0u8; 12],
            ),
            "not a valid safetensors file",
        ),
        (
            "shape-overflow",
            safetensors_bytes(
                r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,8]}}"#,
                &[0u8; 8],
            ),
            "not a valid safetensors file",
        ),
        (
            "unknown-dtype",
            safetensors_bytes(
                r#"{"w":{"dtype":"F99","shape":[2],"data_offsets":[0,8]}}"#,
                &[0u8; 8],
            ),
            "not a valid safetensors file",
        ),
        (
            "integer-weights",
            safetensors_bytes(
                r#"{"w":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#,
                &[0u8; 8],
            ),
            "unsupported tensor dtype",
        ),
        (
            "header-not-json",
            safetensors_bytes("{this is not json}", &[]),
            "not a valid safetensors file",
        ),
    ];
    for (name, bytes, needle) in cases {
        let path = dir.write(&format!("{name}.safetensors"), &bytes);
        expect_error(load_checkpoint(&path), &path, needle);
        expect_error(safetensors_from_bytes(&path, &bytes), &path, needle);
    }
}

#[test]
fn a_huge_header_length_is_refused_before_any_allocation() {
    let dir = Scratch::new("huge-header");
    // The length field says 2^60 bytes in a file of 100 bytes.
    let mut bytes = (1u64 << 60).to_le_bytes().to_vec();
    bytes.push(b'{');
    bytes.resize(100, b' ');
    let path = dir.write("huge.safetensors", &bytes);
    expect_error(
        load_safetensors(&path),
        &path,
        "header length field says 1152921504606846976 bytes but only 92 follow",
    );
    // Every loader gives the same documented message (format detection no longer stops at a
    // 100 MB header, which made this "not a weight file").
    expect_error(
        load_checkpoint(&path),
        &path,
        "header length field says 1152921504606846976 bytes but only 92 follow",
    );
    expect_error(
        safetensors_from_bytes(&path, &bytes),
        &path,
        "header length field says",
    );
    // u64::MAX: no overflow in the check.
    let mut bytes = u64::MAX.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    let path = dir.write("max.safetensors", &bytes);
    expect_error(load_safetensors(&path), &path, "header length field says");

    // A header length within the file but above the 100 MB accepted: a sparse file of 200 MB
    // (nothing is written to disk), refused after reading 8 bytes.
    let path = dir.0.join("sparse.safetensors");
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(200_000_000).unwrap();
    drop(file);
    let mut head = (150_000_000u64).to_le_bytes().to_vec();
    head.push(b'{');
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all(&head).unwrap();
    }
    expect_error(load_safetensors(&path), &path, "larger than the 100000000");
}

#[test]
fn metadata_that_does_not_fit_is_named() {
    let dir = Scratch::new("metadata");
    let tensors = tiny_tensors();
    let tiny = DsrConfig::tiny();
    // The metadata is written by hand: save_checkpoint would write its own configuration.
    let write = |name: &str, key: &str, value: &str| {
        let mut metadata = HashMap::new();
        metadata.insert(key.to_string(), value.to_string());
        let w = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
        let bytes = safetensors::serialize([("w", &w)], Some(metadata)).unwrap();
        dir.write(name, &bytes)
    };
    for (name, key, value, needle) in [
        (
            "config-not-json",
            META_CONFIG,
            "{",
            "is not a valid configuration",
        ),
        (
            "config-unknown-field",
            META_CONFIG,
            r#"{"embedding_dim":4,"num_embeddings":32,"num_hiddens":8,"num_residual_layers":1,"num_residual_hiddens":4,"colour":"red"}"#,
            "unknown field `colour`",
        ),
        (
            "config-huge",
            META_CONFIG,
            r#"{"embedding_dim":4,"num_embeddings":1000000000000,"num_hiddens":8,"num_residual_layers":1,"num_residual_hiddens":4}"#,
            "num_embeddings must be at most",
        ),
        (
            "config-odd",
            META_CONFIG,
            r#"{"embedding_dim":4,"num_embeddings":32,"num_hiddens":7,"num_residual_layers":1,"num_residual_hiddens":4}"#,
            "num_hiddens must be even",
        ),
        ("size-one-number", META_IMAGE_SIZE, "[64]", "must be [H, W]"),
        ("size-zero", META_IMAGE_SIZE, "[0, 0]", "is not usable"),
        (
            "size-huge",
            META_IMAGE_SIZE,
            "[1048576, 1048576]",
            "sides of at most 8192",
        ),
        (
            "size-negative",
            META_IMAGE_SIZE,
            "[-64, 64]",
            "must be [H, W]",
        ),
    ] {
        let path = write(&format!("{name}.safetensors"), key, value);
        expect_error(load_checkpoint(&path), &path, needle);
    }

    // A configuration that parses but does not match the tensors.
    let other = DsrConfig {
        num_embeddings: 64,
        num_hiddens: 16,
        ..tiny
    };
    let path = dir.0.join("mismatch.safetensors");
    save_checkpoint(&path, &tensors, &other, Some([64, 64]), &BTreeMap::new()).unwrap();
    let ckpt = load_checkpoint(&path).unwrap();
    assert_eq!(ckpt.config, Some(other));
    expect_error(
        ckpt.build_model(&ckpt.config.unwrap(), &Device::Cpu),
        &path,
        "does not match the model",
    );
}

#[test]
fn missing_extra_misshapen_and_non_finite_tensors_are_named() {
    let dir = Scratch::new("tensors");
    let tiny = DsrConfig::tiny();
    let good = tiny_tensors();
    let key = "anomaly_detection_module.unet.encoder.block1.0.weight";
    assert!(good.contains_key(key));
    let mut cases: Vec<(&str, HashMap<String, Tensor>, String)> = Vec::new();
    let mut missing = good.clone();
    missing.remove(key);
    cases.push(("missing", missing, format!("missing tensor '{key}'")));
    let mut extra = good.clone();
    extra.insert(
        "extra.weight".into(),
        Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
    );
    cases.push(("extra", extra, "unexpected tensor 'extra.weight'".into()));
    let mut shape = good.clone();
    shape.insert(
        key.into(),
        Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap(),
    );
    cases.push(("shape", shape, format!("tensor '{key}' has shape [7]")));
    for (name, value) in [
        ("nan", f32::NAN),
        ("inf", f32::INFINITY),
        ("-inf", f32::NEG_INFINITY),
    ] {
        let mut bad = good.clone();
        let t = &good[key];
        let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v[3] = value;
        bad.insert(
            key.into(),
            Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap(),
        );
        cases.push((
            name,
            bad,
            format!("tensor '{key}' holds NaN or infinite values"),
        ));
    }
    for (name, tensors, needle) in cases {
        let path = dir.0.join(format!("{name}.safetensors"));
        save_checkpoint(&path, &tensors, &tiny, Some([64, 64]), &BTreeMap::new()).unwrap();
        let ckpt = load_checkpoint(&path).unwrap();
        expect_error(ckpt.build_model(&tiny, &Device::Cpu), &path, &needle);
    }
}

fn small_tensors() -> Vec<TensorSpec> {
    vec![
        TensorSpec::new("a.weight", &[2, 3], (0..6).map(|i| i as f32).collect()),
        TensorSpec::new("a.bias", &[2], vec![0.5, -0.5]),
    ]
}

#[test]
fn a_hand_written_torch_archive_loads() {
    let dir = Scratch::new("torch-ok");
    let path = dir.write("ok.pth", &archive(&small_tensors()));
    let t = load_torch(&path, None).unwrap();
    assert_eq!(
        t["a.weight"].to_vec2::<f32>().unwrap(),
        vec![vec![0.0, 1.0, 2.0], vec![3.0, 4.0, 5.0]]
    );
    assert_eq!(t["a.bias"].to_vec1::<f32>().unwrap(), vec![0.5, -0.5]);
    // Deflated entries (an archive re-packed by a zip tool): candle reads stored entries only,
    // so the file is refused with the reason.
    let path = dir.write(
        "deflated.pth",
        &archive_with_pickle(
            &state_dict_pickle(&small_tensors()),
            &small_tensors(),
            zip::CompressionMethod::Deflated,
        ),
    );
    expect_error(
        load_torch(&path, None),
        &path,
        "PyTorch archives store their entries uncompressed",
    );
    let path = dir.write("ok-again.pth", &archive(&small_tensors()));
    // Not a DSR discrete model: the official-format loader says so.
    expect_error(
        load_discrete_pckl(&path),
        &path,
        "this is not a DSR discrete model",
    );
    expect_error(
        load_checkpoint(&path),
        &path,
        "this is not a DSR discrete model",
    );
    expect_error(
        load_lightning_ckpt(&path),
        &path,
        "key state_dict not found",
    );
}

#[test]
fn torch_archives_that_lie_are_refused_without_large_allocations() {
    let dir = Scratch::new("torch-lies");

    // The pickle says 100000×100000 floats (40 GB) for a storage of 6.
    let mut lying = small_tensors();
    lying[0].shape = vec![100_000, 100_000];
    let bytes = archive_with_pickle(
        &state_dict_pickle(&lying),
        &small_tensors(),
        zip::CompressionMethod::Stored,
    );
    let path = dir.write("shape-lie.pth", &bytes);
    expect_error(
        load_torch(&path, None),
        &path,
        "tensor 'a.weight' of shape [100000, 100000] needs more bytes than the 24 of its archive entry",
    );

    // A tensor whose storage entry is missing.
    let pickle = state_dict_pickle(&small_tensors());
    let bytes = archive_with_pickle(
        &pickle,
        &small_tensors()[..1],
        zip::CompressionMethod::Stored,
    );
    let path = dir.write("missing-storage.pth", &bytes);
    expect_error(
        load_torch(&path, None),
        &path,
        "refers to 'archive/data/1', which the archive does not hold",
    );

    // A pickle bomb: memoised tuples copied again and again (2^40 objects from 200 bytes).
    let mut bomb = b"\x80\x02)".to_vec();
    for _ in 0..40 {
        bomb.extend_from_slice(b"q\x00h\x00\x86");
    }
    bomb.push(b'.');
    let path = dir.write(
        "pickle-bomb.pth",
        &archive_with_pickle(&bomb, &[], zip::CompressionMethod::Stored),
    );
    expect_error(load_torch(&path, None), &path, "pickle bomb");

    // A string whose length field says 4 GiB.
    let path = dir.write(
        "long-string.pth",
        &archive_with_pickle(
            b"\x80\x02X\xff\xff\xff\xffabc.",
            &[],
            zip::CompressionMethod::Stored,
        ),
    );
    expect_error(load_torch(&path, None), &path, "more than the pickle holds");

    // A malformed call that makes candle's reader index past a tuple: an error, no panic.
    let path = dir.write(
        "empty-args.pth",
        &archive_with_pickle(
            b"\x80\x02}(X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n)Ru.",
            &[],
            zip::CompressionMethod::Stored,
        ),
    );
    expect_error(load_torch(&path, None), &path, "malformed");

    // An unknown compression method (bzip2's number).
    let mut bytes = archive(&small_tensors());
    set_method(&mut bytes, "archive/data/0", 12);
    let path = dir.write("bzip2.pth", &bytes);
    expect_error(
        load_torch(&path, None),
        &path,
        "is compressed (Unsupported(12))",
    );

    // A stored entry whose declared size disagrees with what it stores.
    let mut bytes = archive(&small_tensors());
    set_declared_size(&mut bytes, "archive/data/0", 4_000_000_000);
    let path = dir.write("stored-lie.pth", &bytes);
    expect_error(
        load_torch(&path, None),
        &path,
        "declares 4000000000 bytes for 24 stored",
    );
}

#[test]
fn zip_bombs_are_refused_without_inflating_them() {
    let dir = Scratch::new("zip-bomb");
    // 64 MiB of zeros deflate to about 64 KiB: a storage entry 1000 times its packed size.
    let big = TensorSpec::new("w", &[16 << 20], vec![0.0; 16 << 20]);
    let bytes = archive_with_pickle(
        &state_dict_pickle(std::slice::from_ref(&big)),
        std::slice::from_ref(&big),
        zip::CompressionMethod::Deflated,
    );
    drop(big);
    assert!(bytes.len() < 1 << 20, "{}", bytes.len());
    let path = dir.write("bomb.pth", &bytes);
    let before = largest_allocation();
    expect_error(
        load_torch(&path, None),
        &path,
        "refused as a possible zip bomb",
    );
    expect_error(
        load_checkpoint(&path),
        &path,
        "refused as a possible zip bomb",
    );
    // The 64 MiB array of the test itself is the largest allocation; loading added none.
    assert_eq!(largest_allocation(), before);

    // Stored entries that overlap: ten more directory records point at one 1 MiB storage, so
    // the entries add up to eleven times the file.
    let big = TensorSpec::new("w", &[1 << 18], vec![1.0; 1 << 18]);
    let bytes = archive(std::slice::from_ref(&big));
    let bytes = add_overlapping_copies(&bytes, "archive/data/0", 10);
    let path = dir.write("overlapping.pth", &bytes);
    expect_error(
        load_torch(&path, None),
        &path,
        "entries add up to more than its",
    );

    // A pickle entry that declares 100 bytes but stores more.
    let mut bytes = archive_with_pickle(b"\x80\x02N.", &[], zip::CompressionMethod::Stored);
    set_declared_size(&mut bytes, "archive/data.pkl", 100);
    let path = dir.write("lying-pickle.pth", &bytes);
    expect_error(
        load_torch(&path, None),
        &path,
        "declares 100 bytes for 4 stored",
    );

    // A pickle that declares more than the 64 MiB accepted.
    let mut bytes = archive_with_pickle(b"\x80\x02N.", &[], zip::CompressionMethod::Deflated);
    set_declared_size(&mut bytes, "archive/data.pkl", 3_000_000_000);
    let path = dir.write("huge-pickle.pth", &bytes);
    expect_error(load_torch(&path, None), &path, "zip bomb");
}

#[test]
fn legacy_and_unknown_formats_are_named() {
    let dir = Scratch::new("formats");
    // The first bytes of a legacy (pre-1.6) torch.save file: protocol 2, a magic number.
    let path = dir.write(
        "legacy.pckl",
        &[
            0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8,
        ],
    );
    for result in [
        load_checkpoint(&path).map(|_| ()),
        load_discrete_pckl(&path).map(|_| ()),
        load_lightning_ckpt(&path).map(|_| ()),
        load_torch(&path, None).map(|_| ()),
    ] {
        expect_error(result, &path, "legacy (non-zip) PyTorch format");
    }
    let path = dir.write("notes.ckpt", b"just some text, not weights");
    expect_error(load_checkpoint(&path), &path, "not a weight file");
    let path = dir.write("empty.pckl", b"");
    expect_error(load_checkpoint(&path), &path, "the file is empty");
    // A zip archive that is not a PyTorch file.
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    w.start_file("readme.txt", zip::write::SimpleFileOptions::default())
        .unwrap();
    std::io::Write::write_all(&mut w, b"hello").unwrap();
    let path = dir.write("other.zip", &w.finish().unwrap().into_inner());
    expect_error(load_checkpoint(&path), &path, "is compressed (Deflated)");
    // A truncated zip: the central directory is gone.
    let bytes = archive(&small_tensors());
    let path = dir.write("truncated.pth", &bytes[..bytes.len() - 30]);
    expect_error(
        load_checkpoint(&path),
        &path,
        "cannot read the PyTorch archive",
    );
    // Reading a folder as a weight file.
    let folder = dir.0.join("folder.safetensors");
    std::fs::create_dir_all(&folder).unwrap();
    match load_checkpoint(&folder) {
        Err(Error::Io { path, .. }) => assert_eq!(path, folder),
        other => panic!("expected an I/O error, got {other:?}"),
    }
}
