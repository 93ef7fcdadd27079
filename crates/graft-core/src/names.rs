//! The one rule for what layer a tensor belongs to and what type of layer it is (Spectrum's rule), used by inspect,
//! snr, merge gradients and selection alike.
//!
//! A tensor's layer index is its first all-digit path component; its type is everything after that component
//! (`model.layers.3.mlp.down_proj.weight` is layer 3 of type `mlp.down_proj.weight`). A name with no all-digit
//! component is its own type and has no layer index.

/// The layer index of a tensor name, if any.
pub fn layer_of(name: &str) -> Option<usize> {
    name.split('.').find(|p| is_index(p)).and_then(|p| p.parse().ok())
}

/// The layer type of a tensor (or module) name.
pub fn type_of(name: &str) -> &str {
    let mut offset = 0;
    for part in name.split('.') {
        let next = offset + part.len() + 1;
        if is_index(part) {
            return if next <= name.len() { &name[next..] } else { name };
        }
        offset = next;
    }
    name
}

/// The module a parameter belongs to: the name without a trailing `.weight` or `.bias`.
pub fn module_of(name: &str) -> &str {
    name.strip_suffix(".weight").or_else(|| name.strip_suffix(".bias")).unwrap_or(name)
}

fn is_index(part: &str) -> bool {
    !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spectrum_rule() {
        assert_eq!(type_of("model.layers.3.mlp.down_proj.weight"), "mlp.down_proj.weight");
        assert_eq!(layer_of("model.layers.3.mlp.down_proj.weight"), Some(3));
        assert_eq!(type_of("encoder.layer.11.attention.self.query.bias"), "attention.self.query.bias");
        assert_eq!(type_of("lm_head.weight"), "lm_head.weight");
        assert_eq!(layer_of("lm_head.weight"), None);
        // The first all-digit component wins, later ones stay in the type.
        assert_eq!(type_of("stage1.0.conv1.0.weight"), "conv1.0.weight");
        assert_eq!(layer_of("layers.12"), Some(12));
        assert_eq!(type_of("layers.12"), "layers.12");
        assert_eq!(module_of("a.b.weight"), "a.b");
        assert_eq!(module_of("a.b.running_mean"), "a.b.running_mean");
    }
}
