//! A plain safetensors encoder/decoder for integration tests (u64 header length, JSON header, little-endian data),
//! independent of graft's writer and reader so a bug in one cannot hide a bug in the other.

#![allow(dead_code)]

use std::path::Path;

/// One tensor of a test file: name, dtype name, shape, little-endian bytes.
pub struct T {
    pub name: &'static str,
    pub dtype: &'static str,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

pub fn f32t(name: &'static str, shape: &[usize], v: &[f32]) -> T {
    T { name, dtype: "F32", shape: shape.to_vec(), data: v.iter().flat_map(|x| x.to_le_bytes()).collect() }
}

pub fn i32t(name: &'static str, shape: &[usize], v: &[i32]) -> T {
    T { name, dtype: "I32", shape: shape.to_vec(), data: v.iter().flat_map(|x| x.to_le_bytes()).collect() }
}

/// A tensor with a 0 in its shape: no data bytes.
pub fn empty(name: &'static str, dtype: &'static str, shape: &[usize]) -> T {
    assert!(shape.contains(&0));
    T { name, dtype, shape: shape.to_vec(), data: Vec::new() }
}

/// The bytes of a safetensors file holding `tensors` in order (header padded to 8 bytes as the reference does).
pub fn st_bytes(tensors: &[T]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for t in tensors {
        header.insert(
            t.name.to_string(),
            serde_json::json!({ "dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + t.data.len()] }),
        );
        offset += t.data.len();
    }
    let mut h = serde_json::Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    for t in tensors {
        out.extend(&t.data);
    }
    out
}

pub fn write_st(path: &Path, tensors: &[T]) {
    std::fs::write(path, st_bytes(tensors)).unwrap();
}

/// The parsed header of a safetensors file.
pub fn header(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    serde_json::from_slice(&bytes[8..8 + n]).unwrap()
}

/// Tensor `name` of an F32 safetensors file, with a plain parser.
pub fn read_f32(path: &Path, name: &str) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let h: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let t = &h[name];
    assert_eq!(t["dtype"], "F32", "{name}");
    let [a, b] = [0, 1].map(|i| t["data_offsets"][i].as_u64().unwrap() as usize);
    bytes[8 + n + a..8 + n + b].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}
