//! Small PyTorch zip archives written from scratch (the pickle of a state_dict by hand, the
//! storages as archive entries), for the bad-file and fuzz tests.
#![allow(dead_code)]

use std::io::{Cursor, Write};

/// A tensor of the state_dict: name, shape, values (stored as f32, contiguous).
pub struct TensorSpec {
    /// The state_dict key.
    pub name: String,
    /// The shape written in the pickle.
    pub shape: Vec<usize>,
    /// The storage's values.
    pub data: Vec<f32>,
}

impl TensorSpec {
    /// A tensor whose storage holds exactly its values.
    pub fn new(name: &str, shape: &[usize], data: Vec<f32>) -> Self {
        Self {
            name: name.to_string(),
            shape: shape.to_vec(),
            data,
        }
    }
}

fn unicode(out: &mut Vec<u8>, s: &str) {
    out.push(b'X');
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn int(out: &mut Vec<u8>, v: i32) {
    out.push(b'J');
    out.extend_from_slice(&v.to_le_bytes());
}

/// The pickle (protocol 2) of `{name: torch._utils._rebuild_tensor_v2(storage_i, 0, shape,
/// stride, False, OrderedDict())}` as `torch.save` writes a state_dict, storages keyed "0", "1"….
pub fn state_dict_pickle(tensors: &[TensorSpec]) -> Vec<u8> {
    let mut p = b"\x80\x02}(".to_vec();
    for (i, t) in tensors.iter().enumerate() {
        unicode(&mut p, &t.name);
        p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n((");
        unicode(&mut p, "storage");
        p.extend_from_slice(b"ctorch\nFloatStorage\n");
        unicode(&mut p, &i.to_string());
        unicode(&mut p, "cpu");
        int(&mut p, t.data.len() as i32);
        p.extend_from_slice(b"tQ");
        int(&mut p, 0);
        p.push(b'(');
        for &d in &t.shape {
            int(&mut p, d as i32);
        }
        p.push(b't');
        p.push(b'(');
        let mut stride = vec![1usize; t.shape.len()];
        for k in (0..t.shape.len().saturating_sub(1)).rev() {
            stride[k] = stride[k + 1] * t.shape[k + 1];
        }
        for s in stride {
            int(&mut p, s as i32);
        }
        p.push(b't');
        p.extend_from_slice(b"\x89ccollections\nOrderedDict\n)RtR");
    }
    p.extend_from_slice(b"u.");
    p
}

/// A PyTorch zip archive with `pickle` as `archive/data.pkl` and the storages of `tensors` as
/// `archive/data/<i>`, every entry compressed with `method`.
pub fn archive_with_pickle(
    pickle: &[u8],
    tensors: &[TensorSpec],
    method: zip::CompressionMethod,
) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(method);
    w.start_file("archive/data.pkl", opts).unwrap();
    w.write_all(pickle).unwrap();
    for (i, t) in tensors.iter().enumerate() {
        w.start_file(format!("archive/data/{i}"), opts).unwrap();
        for v in &t.data {
            w.write_all(&v.to_le_bytes()).unwrap();
        }
    }
    w.start_file("archive/version", opts).unwrap();
    w.write_all(b"3\n").unwrap();
    w.finish().unwrap().into_inner()
}

/// A PyTorch zip archive (stored entries, as `torch.save` writes them) of `tensors`.
pub fn archive(tensors: &[TensorSpec]) -> Vec<u8> {
    archive_with_pickle(
        &state_dict_pickle(tensors),
        tensors,
        zip::CompressionMethod::Stored,
    )
}

/// Overwrites the declared uncompressed size of entry `name` in both its local header and its
/// central-directory record.
pub fn set_declared_size(zip: &mut [u8], name: &str, size: u32) {
    patch_headers(zip, name, |zip, local, at| {
        let offset = if local { 22 } else { 24 };
        zip[at + offset..at + offset + 4].copy_from_slice(&size.to_le_bytes());
    });
}

/// Overwrites the compression method of entry `name` in both of its headers.
pub fn set_method(zip: &mut [u8], name: &str, method: u16) {
    patch_headers(zip, name, |zip, local, at| {
        let offset = if local { 8 } else { 10 };
        zip[at + offset..at + offset + 2].copy_from_slice(&method.to_le_bytes());
    });
}

fn patch_headers(zip: &mut [u8], name: &str, mut patch: impl FnMut(&mut [u8], bool, usize)) {
    let mut found = 0;
    let mut i = 0;
    while i + 46 <= zip.len() {
        let sig = &zip[i..i + 4];
        let (local, name_len_at, name_at) = if sig == b"PK\x03\x04" {
            (true, 26, 30)
        } else if sig == b"PK\x01\x02" {
            (false, 28, 46)
        } else {
            i += 1;
            continue;
        };
        let len = u16::from_le_bytes([zip[i + name_len_at], zip[i + name_len_at + 1]]) as usize;
        if zip.get(i + name_at..i + name_at + len) == Some(name.as_bytes()) {
            patch(zip, local, i);
            found += 1;
        }
        i += 4;
    }
    assert_eq!(found, 2, "entry {name} not found in both headers");
}

/// Appends `copies` central-directory records that point at the data of entry `name` under new
/// names (`<name>.copy<k>`), so that several entries overlap in the file (the "overlapping
/// files" zip bomb). The archive must have no comment.
pub fn add_overlapping_copies(zip: &[u8], name: &str, copies: usize) -> Vec<u8> {
    let eocd = zip.len() - 22;
    assert_eq!(&zip[eocd..eocd + 4], b"PK\x05\x06");
    let u16_at = |at: usize| u16::from_le_bytes([zip[at], zip[at + 1]]) as usize;
    let u32_at = |at: usize| u32::from_le_bytes(zip[at..at + 4].try_into().unwrap()) as usize;
    let (count, cd_size, cd_offset) = (u16_at(eocd + 10), u32_at(eocd + 12), u32_at(eocd + 16));
    let cd = &zip[cd_offset..cd_offset + cd_size];
    // Find the record of `name`.
    let mut at = 0;
    let record = loop {
        assert_eq!(&cd[at..at + 4], b"PK\x01\x02");
        let n = u16::from_le_bytes([cd[at + 28], cd[at + 29]]) as usize;
        let e = u16::from_le_bytes([cd[at + 30], cd[at + 31]]) as usize;
        let c = u16::from_le_bytes([cd[at + 32], cd[at + 33]]) as usize;
        let len = 46 + n + e + c;
        if &cd[at + 46..at + 46 + n] == name.as_bytes() {
            break cd[at..at + len].to_vec();
        }
        at += len;
    };
    let mut out = zip[..cd_offset + cd_size].to_vec();
    let mut added = 0;
    for k in 0..copies {
        let new_name = format!("{name}.copy{k}");
        let mut r = record[..28].to_vec();
        r.extend_from_slice(&(new_name.len() as u16).to_le_bytes());
        r.extend_from_slice(&[0, 0, 0, 0]); // no extra field, no comment
        r.extend_from_slice(&record[34..46]);
        r.extend_from_slice(new_name.as_bytes());
        added += r.len();
        out.extend_from_slice(&r);
    }
    let mut end = zip[eocd..].to_vec();
    end[8..10].copy_from_slice(&((count + copies) as u16).to_le_bytes());
    end[10..12].copy_from_slice(&((count + copies) as u16).to_le_bytes());
    end[12..16].copy_from_slice(&((cd_size + added) as u32).to_le_bytes());
    out.extend_from_slice(&end);
    out
}
