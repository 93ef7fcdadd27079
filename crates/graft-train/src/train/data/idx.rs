//! IDX files (LeCun's MNIST format, also Fashion-MNIST's): big-endian header `0 0 TYPE NDIM` then NDIM u32 sizes,
//! then the data. Unsigned-byte images and labels are supported, plain or gzip-compressed (`.gz`).
//!
//! A directory holds `train-images-idx3-ubyte`, `train-labels-idx1-ubyte` and optionally the `t10k-` test pair
//! (any file names containing `train`/`t10k` or `test`, `images`/`labels` and `idx` are recognised).

use std::io::Read;
use std::path::{Path, PathBuf};

use super::{Dataset, Features, Samples};
use crate::error::{Error, Result};

/// Reads a whole IDX file (decompressing `.gz`), returning its dimensions and u8 data.
pub fn read(path: &Path) -> Result<(Vec<usize>, Vec<u8>)> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| Error::format(path, format!("gzip data is corrupt: {e}")))?;
        out
    } else {
        raw
    };
    parse(path, bytes)
}

/// Parses IDX bytes.
pub fn parse(path: &Path, bytes: Vec<u8>) -> Result<(Vec<usize>, Vec<u8>)> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(Error::format(path, "not an IDX file (the first two bytes must be zero)"));
    }
    if bytes[2] != 0x08 {
        return Err(Error::format(
            path,
            format!("IDX element type 0x{:02x} is not supported (unsigned byte only)", bytes[2]),
        ));
    }
    let ndim = bytes[3] as usize;
    let header = 4 + 4 * ndim;
    if ndim == 0 || bytes.len() < header {
        return Err(Error::format(path, format!("IDX header declares {ndim} dimensions but the file is too short")));
    }
    let dims: Vec<usize> =
        (0..ndim).map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize).collect();
    let n: usize = dims.iter().product();
    if bytes.len() - header != n {
        return Err(Error::format(
            path,
            format!("IDX dimensions {dims:?} need {n} data bytes but the file has {}", bytes.len() - header),
        ));
    }
    Ok((dims, bytes[header..].to_vec()))
}

fn find(dir: &Path, names: &[String], split: &[&str], kind: &str) -> Option<PathBuf> {
    names
        .iter()
        .find(|n| n.contains(kind) && n.contains("idx") && split.iter().any(|s| n.starts_with(s)))
        .map(|n| dir.join(n))
}

/// Reads the train pair and, if present, the test pair of an IDX directory. Images become (1, H, W) samples.
pub fn read_dir(dir: &Path) -> Result<(Dataset, Option<Dataset>)> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().to_string()))
        .collect();
    names.sort();
    let pair = |split: &[&str]| -> Result<Option<Dataset>> {
        match (find(dir, &names, split, "images"), find(dir, &names, split, "labels")) {
            (Some(i), Some(l)) => Ok(Some(read_pair(&i, &l)?)),
            (None, None) => Ok(None),
            (Some(i), None) => Err(Error::format(&i, "images without a matching labels file")),
            (None, Some(l)) => Err(Error::format(&l, "labels without a matching images file")),
        }
    };
    let train = pair(&["train"])?
        .ok_or_else(|| Error::format(dir, "no train-images/train-labels IDX files in this directory"))?;
    let test = pair(&["t10k", "test"])?;
    Ok((train, test))
}

/// One images file and its labels file as a dataset (classes = 0..=max label).
pub fn read_pair(images: &Path, labels: &Path) -> Result<Dataset> {
    let (idims, pixels) = read(images)?;
    let (ldims, labs) = read(labels)?;
    if idims.len() < 2 {
        return Err(Error::format(images, format!("images must have at least 2 dimensions, found {idims:?}")));
    }
    if ldims.len() != 1 || ldims[0] != idims[0] {
        return Err(Error::format(
            labels,
            format!("labels have dimensions {ldims:?} but {} holds {} images", images.display(), idims[0]),
        ));
    }
    let mut shape = idims[1..].to_vec();
    if shape.len() == 2 {
        shape.insert(0, 1);
    }
    let classes = labs.iter().copied().max().map(|m| m as usize + 1).unwrap_or(0);
    Ok(Dataset {
        samples: Samples::Dense { features: Features::U8(pixels), shape },
        labels: labs.into_iter().map(u32::from).collect(),
        class_names: (0..classes).map(|c| c.to_string()).collect(),
    })
}

/// Encodes u8 data as IDX bytes (for tests and tools that produce IDX files).
pub fn encode(dims: &[usize], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for &d in dims {
        out.extend((d as u32).to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let bytes = encode(&[2, 2, 3], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        let (d, v) = parse(Path::new("x"), bytes.clone()).unwrap();
        assert_eq!(d, vec![2, 2, 3]);
        assert_eq!(v[11], 12);
        let mut short = bytes.clone();
        short.pop();
        let e = parse(Path::new("x"), short).unwrap_err().to_string();
        assert!(e.contains("need 12 data bytes"), "{e}");
        let mut bad = bytes;
        bad[2] = 0x0d;
        assert!(parse(Path::new("x"), bad).unwrap_err().to_string().contains("not supported"));
    }
}
