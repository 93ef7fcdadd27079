//! Rotary scaling of a GGUF checkpoint as Hugging Face's `rope_scaling`: the `{arch}.rope.scaling.*` metadata, and
//! Llama 3.1/3.2's `rope_freqs.weight` tensor turned back into the `rope_type: llama3` parameters it was computed
//! from.
//!
//! llama.cpp's converter stores Llama 3's scaling not as metadata but as a tensor of per-frequency divisors, computed
//! in torch float32 from the Hugging Face `rope_scaling` {factor, low_freq_factor, high_freq_factor,
//! original_max_position_embeddings}, `rope_theta` and the head size. The tensor depends on the three length
//! parameters only through the two wavelengths `original / low` and `original / high` (scaling all three by one
//! number leaves it unchanged), so a recovery is a choice among equivalent parameter sets: graft prefers Llama 3's own
//! (low 1, high 4, original 8192) and otherwise the simplest numbers that fit, and accepts a set only when
//! recomputing the tensor from it reproduces every value bit for bit. Metadata `{arch}.rope.scaling.factor` and
//! `.original_context_length`, where present, are taken as given. A tensor no parameters reproduce is an error: a
//! model converted without its scaling would silently compute other rotary angles.

use serde_json::{json, Value};

use super::{Family, GgufFile};
use crate::error::{Error, Result};

/// The parameters of Hugging Face's `rope_type: llama3` (numbers as its config.json holds them).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3Rope {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: u64,
}

impl Llama3Rope {
    pub fn to_json(self) -> Value {
        json!({
            "rope_type": "llama3",
            "factor": self.factor,
            "low_freq_factor": self.low_freq_factor,
            "high_freq_factor": self.high_freq_factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
        })
    }
}

/// `scalar / x` as torch computes a Python number divided by a float32 tensor on the CPU: the scalar times the
/// float32 reciprocal of `x`.
fn scalar_over(scalar: f64, x: f32) -> f32 {
    scalar as f32 * (1.0 / x)
}

/// The inverse rotary frequencies `1 / theta^(2i/d)` as llama.cpp's converter computes them (float32 exponents, the
/// power rounded to float32).
fn inverse_frequencies(theta: f64, head_dim: usize) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| {
            let exponent = (2 * i) as f32 / head_dim as f32;
            1.0 / (theta.powf(exponent as f64) as f32)
        })
        .collect()
}

/// `rope_freqs.weight` as llama.cpp's `convert_hf_to_gguf.py` writes it for `rope_type: llama3`, in its float32
/// arithmetic: 1 where the wavelength is below `original / high`, `factor` above `original / low`, and
/// `1 / ((1 - smooth) / factor + smooth)` between.
pub fn llama3_rope_freqs(theta: f64, head_dim: usize, p: &Llama3Rope) -> Vec<f32> {
    let original = p.original_max_position_embeddings as f64;
    let (low_wavelen, high_wavelen) = ((original / p.low_freq_factor) as f32, (original / p.high_freq_factor) as f32);
    let (factor, low, span) =
        (p.factor as f32, p.low_freq_factor as f32, (p.high_freq_factor - p.low_freq_factor) as f32);
    inverse_frequencies(theta, head_dim)
        .into_iter()
        .map(|freq| {
            let wavelen = scalar_over(2.0 * std::f64::consts::PI, freq);
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (scalar_over(original, wavelen) - low) / span;
                scalar_over(1.0, (1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

fn reproduces(values: &[f32], theta: f64, head_dim: usize, p: &Llama3Rope) -> bool {
    p.factor > 0.0
        && p.low_freq_factor > 0.0
        && p.high_freq_factor > p.low_freq_factor
        && p.original_max_position_embeddings > 0
        && llama3_rope_freqs(theta, head_dim, p).iter().zip(values).all(|(a, b)| a.to_bits() == b.to_bits())
}

/// `x` rounded to `digits` decimals.
fn round_to(x: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (x * scale).round() / scale
}

/// The llama3 parameters that reproduce `values` (a `rope_freqs.weight`) bit for bit, given the model's theta and
/// head size and the factor / original context length where the metadata states them; or why there are none.
pub fn recover_llama3(
    values: &[f32],
    theta: f64,
    head_dim: usize,
    factor_hint: Option<f64>,
    original_hint: Option<u64>,
) -> std::result::Result<Llama3Rope, String> {
    if values.len() != head_dim / 2 {
        return Err(format!(
            "has {} values but the head size {head_dim} has {} frequencies",
            values.len(),
            head_dim / 2
        ));
    }
    if let Some(bad) = values.iter().find(|v| !v.is_finite() || **v < 1.0) {
        return Err(format!("holds {bad}, but llama3 divisors are finite and at least 1"));
    }
    // Above the low-frequency wavelength every divisor is the factor itself: the last (lowest) frequency's.
    let factor = factor_hint.unwrap_or(*values.last().unwrap_or(&1.0) as f64);
    let mut candidates = vec![Llama3Rope {
        factor,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: original_hint.unwrap_or(8192),
    }];
    // Between the two wavelengths, smooth = 1/r's position between 1/factor and 1, and it is linear in 1/wavelength:
    // smooth = a / wavelength + b with a = original / (high - low) and b = -low / (high - low).
    let inverse_wavelengths: Vec<f64> = inverse_frequencies(theta, head_dim)
        .into_iter()
        .map(|f| 1.0 / scalar_over(2.0 * std::f64::consts::PI, f) as f64)
        .collect();
    let between: Vec<(f64, f64)> = values
        .iter()
        .zip(&inverse_wavelengths)
        .filter(|(v, _)| **v > 1.0 && (**v as f64) < factor)
        .map(|(v, x)| (*x, (1.0 / *v as f64 - 1.0 / factor) / (1.0 - 1.0 / factor)))
        .collect();
    let lows = [1.0, 2.0, 0.5, 4.0, 0.25];
    if between.len() >= 2 {
        let n = between.len() as f64;
        let (mx, my) = (between.iter().map(|p| p.0).sum::<f64>() / n, between.iter().map(|p| p.1).sum::<f64>() / n);
        let sxy: f64 = between.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
        let sxx: f64 = between.iter().map(|p| (p.0 - mx) * (p.0 - mx)).sum();
        let a = sxy / sxx;
        let b = my - a * mx;
        if a > 0.0 && b < 0.0 {
            // low / original = -b / a, and high = low * (1 - 1/b).
            let ratio = -b / a;
            let mut push = |low: f64, original: f64| {
                for digits in 0..=6 {
                    candidates.push(Llama3Rope {
                        factor,
                        low_freq_factor: round_to(low, digits),
                        high_freq_factor: round_to(low * (1.0 - 1.0 / b), digits),
                        original_max_position_embeddings: original.round().max(1.0) as u64,
                    });
                }
            };
            match original_hint {
                Some(original) => push(ratio * original as f64, original as f64),
                None => lows.iter().for_each(|&low| push(low, low / ratio)),
            }
        }
    } else if let [(x, smooth)] = between[..] {
        // One value between: with low fixed, each high gives the original length that puts it there.
        for high in [4.0, 2.0, 3.0, 5.0, 6.0, 8.0] {
            let original = original_hint.map(|o| o as f64).unwrap_or((smooth * (high - 1.0) + 1.0) / x);
            candidates.push(Llama3Rope {
                factor,
                low_freq_factor: 1.0,
                high_freq_factor: high,
                original_max_position_embeddings: original.round().max(1.0) as u64,
            });
        }
    }
    candidates.into_iter().find(|p| reproduces(values, theta, head_dim, p)).ok_or_else(|| {
        "no llama3 rope scaling (factor, low/high frequency factors, original context) reproduces its values".into()
    })
}

/// The `rope_scaling` of the Hugging Face config of `g`, if any: linear scaling from the metadata, or llama3 scaling
/// recovered from `rope_freqs.weight`. An error for scaling graft cannot express or recover.
pub fn rope_scaling(g: &GgufFile, family: Family) -> Result<Option<Value>> {
    let p = family.prefix();
    let kind = g.metadata().get(&format!("{p}.rope.scaling.type")).and_then(|v| v.to_string().ok()).cloned();
    let factor = g.meta_f64(&format!("{p}.rope.scaling.factor"));
    let original = g.meta_u64(&format!("{p}.rope.scaling.original_context_length"));
    let Some(tensor) = g.tensor_info("rope_freqs.weight") else {
        return match (kind.as_deref(), factor) {
            (None | Some("none"), _) => Ok(None),
            (Some("linear"), Some(f)) => Ok(Some(json!({"rope_type": "linear", "factor": f}))),
            (Some(other), _) => Err(Error::format(
                g.path(),
                format!("rope scaling '{other}' ({p}.rope.scaling.*) is not supported (graft maps linear and llama3)"),
            )),
        };
    };
    if kind.as_deref().is_some_and(|k| k != "none" && k != "llama3") {
        return Err(Error::tensor(
            g.path(),
            &tensor.name,
            format!("rope_freqs with rope scaling '{}' is not supported (graft maps llama3)", kind.unwrap_or_default()),
        ));
    }
    let head_count = g
        .meta_u64(&format!("{p}.attention.head_count"))
        .ok_or_else(|| Error::format(g.path(), format!("metadata has no {p}.attention.head_count")))?;
    let hidden = g
        .meta_u64(&format!("{p}.embedding_length"))
        .ok_or_else(|| Error::format(g.path(), format!("metadata has no {p}.embedding_length")))?;
    let head_dim = g
        .meta_u64(&format!("{p}.rope.dimension_count"))
        .or_else(|| g.meta_u64(&format!("{p}.attention.key_length")))
        .unwrap_or(hidden / head_count.max(1)) as usize;
    let theta = g.meta_f64(&format!("{p}.rope.freq_base")).unwrap_or(10000.0);
    let values = g.dequantize(&tensor.name)?;
    let recovered = recover_llama3(&values, theta, head_dim, factor, original)
        .map_err(|why| Error::tensor(g.path(), &tensor.name, why))?;
    Ok(Some(recovered.to_json()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_3_1_divisors_follow_the_three_regions() {
        let p = Llama3Rope {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let r = llama3_rope_freqs(500000.0, 128, &p);
        // Wavelength 2*pi*500000^(2i/128) passes 2048 between i = 28 and 29 and 8192 between 34 and 35 (by hand:
        // log(2048 / 2pi) / log(500000) * 64 = 28.3, log(8192 / 2pi) / log(500000) * 64 = 35.3).
        assert!(r[..29].iter().all(|&x| x == 1.0));
        assert!(r[29..35].iter().all(|&x| x > 1.0 && x < 8.0));
        assert!(r[36..].iter().all(|&x| x == 8.0));
        assert_eq!(recover_llama3(&r, 500000.0, 128, None, None), Ok(p));
    }

    #[test]
    fn values_no_parameters_give_are_refused() {
        let p = Llama3Rope {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let mut r = llama3_rope_freqs(500000.0, 128, &p);
        r[31] = f32::from_bits(r[31].to_bits() + 1);
        assert!(recover_llama3(&r, 500000.0, 128, None, None).is_err());
        assert!(recover_llama3(&r[..10], 500000.0, 128, None, None).unwrap_err().contains("head size 128"));
    }
}
