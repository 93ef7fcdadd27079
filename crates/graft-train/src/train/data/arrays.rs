//! graft's raw array format for image-shaped data (CIFAR-10 and anything like it), which any tool can write
//! without numpy:
//!
//! ```text
//! DIR/meta.json       {"shape": [3, 32, 32], "dtype": "u8" | "f32", "classes": ["airplane", ...]}   (classes optional)
//! DIR/train.bin       N samples, sample-major, each `shape` in C-order (channels, rows, columns), little-endian
//! DIR/train.labels    N labels, one byte each (class index)
//! DIR/test.bin, DIR/test.labels   optional, same layout
//! ```
//! u8 pixels are scaled to [0, 1] before normalisation; f32 values are used as they are.

use std::path::Path;

use serde::Deserialize;

use super::{Dataset, Features, Samples};
use crate::error::{Error, Result};

pub const META: &str = "meta.json";

#[derive(Deserialize)]
struct Meta {
    shape: Vec<usize>,
    dtype: String,
    #[serde(default)]
    classes: Vec<String>,
}

pub fn read_dir(dir: &Path) -> Result<(Dataset, Option<Dataset>)> {
    let mpath = dir.join(META);
    let meta: Meta = crate::files::read_json(&mpath)?;
    if meta.shape.is_empty() || meta.shape.contains(&0) {
        return Err(Error::format(&mpath, format!("shape {:?} must be non-empty and positive", meta.shape)));
    }
    if meta.dtype != "u8" && meta.dtype != "f32" {
        return Err(Error::format(&mpath, format!("dtype '{}' is not supported (u8 or f32)", meta.dtype)));
    }
    let train = read_split(dir, "train", &meta)?
        .ok_or_else(|| Error::format(dir, "arrays directory has no train.bin/train.labels"))?;
    let test = read_split(dir, "test", &meta)?;
    Ok((train, test))
}

fn read_split(dir: &Path, split: &str, meta: &Meta) -> Result<Option<Dataset>> {
    let bin = dir.join(format!("{split}.bin"));
    let lab = dir.join(format!("{split}.labels"));
    if !bin.is_file() && !lab.is_file() {
        return Ok(None);
    }
    let data = std::fs::read(&bin).map_err(|e| Error::io(&bin, e))?;
    let labels = std::fs::read(&lab).map_err(|e| Error::io(&lab, e))?;
    let per: usize = meta.shape.iter().product();
    let elem = if meta.dtype == "u8" { 1 } else { 4 };
    let n = labels.len();
    if data.len() != n * per * elem {
        return Err(Error::format(
            &bin,
            format!(
                "{} bytes: {n} labels of shape {:?} {} need {}",
                data.len(),
                meta.shape,
                meta.dtype,
                n * per * elem
            ),
        ));
    }
    let features = if elem == 1 {
        Features::U8(data)
    } else {
        Features::F32(data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect())
    };
    let max = labels.iter().copied().max().map(|m| m as usize + 1).unwrap_or(0);
    let class_names = if meta.classes.is_empty() {
        (0..max).map(|c| c.to_string()).collect()
    } else if max > meta.classes.len() {
        return Err(Error::format(
            &lab,
            format!("label {} but meta.json names {} classes", max - 1, meta.classes.len()),
        ));
    } else {
        meta.classes.clone()
    };
    Ok(Some(Dataset {
        samples: Samples::Dense { features, shape: meta.shape.clone() },
        labels: labels.into_iter().map(u32::from).collect(),
        class_names,
    }))
}
