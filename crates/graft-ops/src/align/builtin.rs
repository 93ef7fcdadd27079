//! Built-in permutation specs, inferred from a checkpoint's tensor names and shapes and its `config.json`.
//!
//! - `mlp`: a chain of Linear layers (with optional BatchNorm/LayerNorm after each); each hidden layer's units are a
//!   group, the input and the last layer's outputs are fixed.
//! - `cnn`: plain and residual convolutional nets with BatchNorm. Modules are put in definition order by naming
//!   conventions (`order_key`), since safetensors writers store tensors sorted by name; then channels are followed
//!   through the net. A channel-mixing layer (conv with more than one input channel per group, Linear) starts a new
//!   group; BatchNorm and depthwise convs (weight `(C, 1, kh, kw)`, group on axis 0, no input side) carry the
//!   current one. A block `X.<i>.*` with two or more mixing layers, or a `downsample`/`shortcut` branch, is residual:
//!   its input stream, its last mixing layer's output and the stream after it are one group (named
//!   `<stage>.residual`), shared by every block of the stage and by the stem/transition output that feeds it; a
//!   shortcut branch maps the stream to a new one. A Linear whose inputs are `k` times the channels reads a
//!   flattened `(C, h, w)` map: its input axis is the channel group in blocks of `k`.
//! - `bert`: per layer, attention heads (query/key/value rows, output columns, as whole heads) and the intermediate
//!   units; with `permute_residual`, the hidden size is one group over embeddings, every projection's input side and
//!   output, LayerNorms and the pooler's input.
//! - `llama`: per layer, key/value heads (grouped-query attention: kv head `j` carries query heads
//!   `j*rep..(j+1)*rep`, so q_proj rows and o_proj columns move in blocks of `rep * head_dim`, k/v rows in blocks of
//!   `head_dim`) and the MLP units (gate/up rows, down columns); with `permute_residual`, the hidden size is one group
//!   over the embeddings, every projection's input side, o_proj/down_proj outputs, RMSNorms and lm_head's input.
//!
//! Inference refuses what it does not understand (a tensor it cannot place, a channel count that does not chain) with
//! an error naming the tensor; `graft align --print-spec` shows what it inferred so a user can edit it into a file.

use std::collections::HashMap;

use super::spec::{AxisRef, GroupDecl, Spec, TensorAxes};
use crate::checkpoint::{Checkpoint, TensorInfo};
use crate::error::{Arg, Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Mlp,
    Cnn,
    Bert,
    Llama,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Mlp => "mlp",
            Arch::Cnn => "cnn",
            Arch::Bert => "bert",
            Arch::Llama => "llama",
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Permute the transformer residual stream (hidden size) as one shared group.
    pub permute_residual: bool,
}

/// Reads `config.json` next to the checkpoint, if there is one.
pub fn config(ck: &Checkpoint) -> Result<Option<serde_json::Value>> {
    let Some(dir) = ck.dir() else { return Ok(None) };
    Ok(crate::checkpoint::hf_config::read(&dir.join("config.json"))?.map(serde_json::Value::Object))
}

/// The built-in spec of each architecture graft trains, by its `graft_arch` name. The trainer's registry holds it
/// (each architecture names the family that aligns it: `train::models::alignment_families`), so an architecture
/// added there needs no line here; without it a checkpoint's family is told from `model_type` or tensor names.
pub type Families = [(&'static str, Arch)];

/// The architecture of a checkpoint: from `config.json` (`graft_arch` looked up in `families`, `model_type`), else
/// from tensor names.
pub fn detect(ck: &Checkpoint, families: &Families) -> Result<Arch> {
    if let Some(cfg) = config(ck)? {
        if let Some(a) = cfg.get("graft_arch").and_then(|v| v.as_str()) {
            if let Some(&(_, family)) = families.iter().find(|(name, _)| *name == a) {
                return Ok(family);
            }
        }
        match cfg.get("model_type").and_then(|v| v.as_str()) {
            Some("bert" | "roberta" | "xlm-roberta" | "camembert") => return Ok(Arch::Bert),
            Some("llama" | "mistral" | "qwen2" | "qwen3") => return Ok(Arch::Llama),
            _ => {}
        }
    }
    if ck.names().any(|n| n.contains(".self_attn.q_proj.")) {
        Ok(Arch::Llama)
    } else if ck.names().any(|n| n.contains(".attention.self.query.")) {
        Ok(Arch::Bert)
    } else if ck.infos().iter().any(|t| t.name.ends_with("weight") && t.shape.len() >= 3) {
        Ok(Arch::Cnn)
    } else if ck.infos().iter().any(|t| t.shape.len() == 2) {
        Ok(Arch::Mlp)
    } else {
        Err(Error::usage(format!(
            "{}: cannot tell the architecture from config.json or tensor names; pass {} or {}",
            ck.path().display(),
            Arg::Arch,
            Arg::Spec
        )))
    }
}

/// Infers the built-in spec of `arch` for `ck`.
pub fn infer(arch: Arch, ck: &Checkpoint, opts: Options) -> Result<Spec> {
    let mut b = Builder::default();
    match arch {
        Arch::Mlp => Chain::new(ck, false)?.walk(&mut b)?,
        Arch::Cnn => Chain::new(ck, true)?.walk(&mut b)?,
        Arch::Bert => bert(ck, opts, &mut b)?,
        Arch::Llama => llama(ck, opts, &mut b)?,
    }
    b.finish(ck, arch)
}

/// Collects groups and per-tensor axes; names are resolved at the end so groups can be renamed while inferring.
#[derive(Default)]
struct Builder {
    groups: Vec<(String, usize)>,
    axes: HashMap<String, Vec<Option<(usize, usize)>>>,
}

type G = Option<(usize, usize)>; // (group, block)

impl Builder {
    fn group(&mut self, name: impl Into<String>, size: usize) -> usize {
        self.groups.push((name.into(), size));
        self.groups.len() - 1
    }

    fn set(&mut self, name: &str, axes: Vec<G>) {
        self.axes.insert(name.to_string(), axes);
    }

    fn finish(self, ck: &Checkpoint, arch: Arch) -> Result<Spec> {
        let uncovered: Vec<&str> = ck.names().filter(|n| !self.axes.contains_key(*n)).collect();
        if let Some(first) = uncovered.first() {
            let more = if uncovered.len() > 1 { format!(" (and {} more)", uncovered.len() - 1) } else { String::new() };
            return Err(Error::usage(format!(
                "{}: the built-in '{}' spec does not know how to permute tensor '{first}'{more}; write a spec \
                 file (see docs/align.md) and pass it with {}",
                ck.path().display(),
                arch.name(),
                Arg::Spec
            )));
        }
        let mut used = vec![false; self.groups.len()];
        let tensors = ck
            .infos()
            .iter()
            .map(|t| {
                let axes = self.axes[&t.name]
                    .iter()
                    .map(|a| {
                        a.map(|(g, block)| {
                            used[g] = true;
                            AxisRef { group: self.groups[g].0.clone(), block }
                        })
                    })
                    .collect();
                TensorAxes { name: t.name.clone(), axes: Some(axes) }
            })
            .collect();
        let groups = self
            .groups
            .iter()
            .zip(&used)
            .filter(|(_, &u)| u)
            .map(|((name, size), _)| GroupDecl { name: name.clone(), size: *size })
            .collect();
        Ok(Spec { groups, tensors, source: format!("built-in '{}' spec", arch.name()) })
    }
}

// ---------------------------------------------------------------------------------------------------------------
// mlp and cnn: follow channels through the net.

/// What a module (a name prefix owning `weight`, `bias`, BatchNorm buffers) does to channels.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// Convolution weight (out, in_per_group, k...).
    Conv {
        out: usize,
        in_per_group: usize,
    },
    Linear {
        out: usize,
        inputs: usize,
    },
    /// A per-channel module: BatchNorm, LayerNorm over channels.
    Norm {
        channels: usize,
    },
    /// Only scalars.
    Stateless,
}

struct Module<'a> {
    name: String,
    parts: Vec<&'a str>,
    params: Vec<&'a TensorInfo>,
    kind: Kind,
}

impl Module<'_> {
    /// The parameter's name within the module (`weight`, `bias`, `running_mean`, ...).
    fn leaf<'n>(&self, p: &'n TensorInfo) -> &'n str {
        if self.name.is_empty() {
            &p.name
        } else {
            &p.name[self.name.len() + 1..]
        }
    }

    /// Mixing layers start a new channel space. A conv with one input channel per group is depthwise (or the first
    /// layer of a one-channel input, which `walk` tells apart by the channel count).
    fn mixes(&self) -> bool {
        match self.kind {
            Kind::Linear { .. } => true,
            Kind::Conv { in_per_group, .. } => in_per_group > 1,
            _ => false,
        }
    }
}

/// The channels flowing at one point: their group (None: fixed, as the input image) and count.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Chan {
    group: Option<usize>,
    channels: usize,
}

enum Item {
    Plain(usize),
    Block { stage: String, key: String, main: Vec<usize>, shortcut: Vec<usize> },
}

struct Chain<'a> {
    ck: &'a Checkpoint,
    modules: Vec<Module<'a>>,
    /// Whether convolutions and residual blocks are allowed (cnn) or only a chain of Linear layers (mlp).
    residual: bool,
    /// The input's channel count from config.json (`in_channels`), if given.
    in_channels: Option<usize>,
}

const SHORTCUT_NAMES: &[&str] = &["downsample", "shortcut", "skip"];

impl<'a> Chain<'a> {
    fn new(ck: &'a Checkpoint, residual: bool) -> Result<Self> {
        let mut by_module: Vec<(String, Vec<&TensorInfo>)> = Vec::new();
        let mut pos: HashMap<String, usize> = HashMap::new();
        for t in ck.infos() {
            let module = t.name.rsplit_once('.').map(|(m, _)| m).unwrap_or("").to_string();
            let i = *pos.entry(module.clone()).or_insert_with(|| {
                by_module.push((module, Vec::new()));
                by_module.len() - 1
            });
            by_module[i].1.push(t);
        }
        let mut modules = Vec::new();
        for (name, params) in by_module {
            let kind = module_kind(ck, &name, &params, residual)?;
            // `parts` borrows from the checkpoint's tensor names, which live as long as `ck`.
            let first = params[0];
            let parts: Vec<&'a str> =
                if name.is_empty() { Vec::new() } else { first.name[..name.len()].split('.').collect() };
            modules.push(Module { name, parts, params, kind });
        }
        let mut order: Vec<usize> = (0..modules.len()).collect();
        order.sort_by_cached_key(|&i| (order_key(&modules[i].parts), i));
        let mut sorted: Vec<Option<Module>> = modules.into_iter().map(Some).collect();
        let modules = order.into_iter().map(|i| sorted[i].take().unwrap()).collect();
        let in_channels =
            config(ck)?.and_then(|c| cfg_usize(&c, "in_channels").or_else(|| cfg_usize(&c, "num_channels")));
        Ok(Chain { ck, modules, residual, in_channels })
    }

    fn err(&self, tensor: &str, msg: String) -> Error {
        Error::usage(format!(
            "{}: tensor '{tensor}': {msg}; the built-in cannot infer this net, write a spec file (see docs/align.md)",
            self.ck.path().display()
        ))
    }

    /// Plain modules and blocks (`X.<i>.…`, consecutive in definition order).
    fn items(&self) -> Vec<Item> {
        let mut items: Vec<Item> = Vec::new();
        for (i, m) in self.modules.iter().enumerate() {
            let key_len = m.parts.iter().position(|p| is_index(p)).filter(|&j| j + 1 < m.parts.len());
            let Some(j) = key_len.filter(|_| self.residual) else {
                items.push(Item::Plain(i));
                continue;
            };
            let key = m.parts[..=j].join(".");
            let is_shortcut =
                m.parts[j + 1..].iter().any(|p| SHORTCUT_NAMES.contains(&p.to_ascii_lowercase().as_str()));
            if let Some(Item::Block { key: k, main, shortcut, .. }) = items.last_mut() {
                if *k == key {
                    if is_shortcut {
                        shortcut.push(i)
                    } else {
                        main.push(i)
                    }
                    continue;
                }
            }
            let stage = m.parts[..j].join(".");
            let (main, shortcut) = if is_shortcut { (vec![], vec![i]) } else { (vec![i], vec![]) };
            items.push(Item::Block { stage, key, main, shortcut });
        }
        items
    }

    fn walk(&self, b: &mut Builder) -> Result<()> {
        let last_mixing = self.modules.iter().rposition(|m| m.mixes());
        let mut cur: Option<Chan> = None;
        let mut renamed: Vec<bool> = Vec::new();
        for item in self.items() {
            match item {
                Item::Plain(i) => self.module(b, i, &mut cur, None, last_mixing)?,
                Item::Block { stage, key, main, shortcut } => {
                    let mixing = main.iter().filter(|&&i| self.modules[i].mixes()).count();
                    if mixing < 2 && shortcut.is_empty() {
                        for i in main {
                            self.module(b, i, &mut cur, None, last_mixing)?;
                        }
                        continue;
                    }
                    let first = &self.modules[*main.first().or(shortcut.first()).unwrap()];
                    let stream = cur.ok_or_else(|| {
                        self.err(&first.params[0].name, "a residual block cannot be the first layer".into())
                    })?;
                    let stream_name =
                        if stage.is_empty() { "residual".to_string() } else { format!("{stage}.residual") };
                    if let Some(g) = stream.group {
                        renamed.resize(b.groups.len(), false);
                        if !renamed[g] {
                            b.groups[g].0 = unique_name(b, &stream_name);
                            renamed[g] = true;
                        }
                    }
                    let sc_mix = shortcut.iter().find(|&&i| self.modules[i].mixes());
                    let out = match sc_mix {
                        None => stream,
                        Some(&i) => {
                            let channels = match self.modules[i].kind {
                                Kind::Conv { out, .. } | Kind::Linear { out, .. } => out,
                                _ => unreachable!(),
                            };
                            let g = b.group(unique_name(b, &stream_name), channels);
                            renamed.resize(b.groups.len(), false);
                            renamed[g] = true;
                            Chan { group: Some(g), channels }
                        }
                    };
                    let last_main = main.iter().rposition(|&i| self.modules[i].mixes()).map(|k| main[k]);
                    for &i in &main {
                        let forced = (Some(i) == last_main).then_some(out);
                        self.module(b, i, &mut cur, forced, None)?;
                    }
                    if cur != Some(out) {
                        let m = &self.modules[*main.last().unwrap()];
                        return Err(self.err(
                            &m.params[0].name,
                            format!(
                                "block '{key}' ends with {} channels but its residual stream has {}",
                                cur.map_or(0, |c| c.channels),
                                out.channels
                            ),
                        ));
                    }
                    let mut sc = Some(stream);
                    for &i in &shortcut {
                        let forced = self.modules[i].mixes().then_some(out);
                        self.module(b, i, &mut sc, forced, None)?;
                    }
                    cur = Some(out);
                }
            }
        }
        Ok(())
    }

    /// Assigns axes to the tensors of module `i`, reading channels from `cur` and leaving its output there.
    /// `forced` is the output a block imposes on its last mixing layer; otherwise a mixing layer gets a new group,
    /// or none when it is the net's last (`last_mixing`).
    fn module(
        &self,
        b: &mut Builder,
        i: usize,
        cur: &mut Option<Chan>,
        forced: Option<Chan>,
        last_mixing: Option<usize>,
    ) -> Result<()> {
        let m = &self.modules[i];
        let weight = m.params.iter().find(|p| m.leaf(p) == "weight");
        let weight_name = weight.map(|p| p.name.as_str());
        let any = weight_name.unwrap_or(&m.params[0].name);
        let output = |out: usize, b: &mut Builder| -> Result<Chan> {
            if let Some(f) = forced {
                if f.channels != out {
                    return Err(
                        self.err(any, format!("produces {out} channels where the residual stream has {}", f.channels))
                    );
                }
                return Ok(f);
            }
            if Some(i) == last_mixing {
                return Ok(Chan { group: None, channels: out });
            }
            let g = b.group(unique_name(b, &m.name), out);
            Ok(Chan { group: Some(g), channels: out })
        };
        let (out_g, in_axes): (Chan, Vec<G>);
        match m.kind {
            Kind::Stateless => {
                for p in &m.params {
                    b.set(&p.name, vec![None; p.shape.len()]);
                }
                return Ok(());
            }
            Kind::Conv { out, in_per_group } => {
                // A first conv with one input channel per group is depthwise over the (fixed) input channels,
                // unless config.json says the input has one channel; either reading leaves the input fixed.
                let first_depthwise = cur.is_none() && in_per_group == 1 && self.in_channels != Some(1);
                let c = cur.unwrap_or(Chan { group: None, channels: if first_depthwise { out } else { in_per_group } });
                let nd = weight.map_or(4, |w| w.shape.len());
                if in_per_group == c.channels && !first_depthwise && (in_per_group > 1 || out != c.channels) {
                    let o = output(out, b)?;
                    let mut w = vec![o.group.map(|g| (g, 1)), c.group.map(|g| (g, 1))];
                    w.resize(nd, None);
                    (out_g, in_axes) = (o, w);
                } else if in_per_group == 1 && out == c.channels {
                    let mut w = vec![c.group.map(|g| (g, 1)), None];
                    w.resize(nd, None);
                    (out_g, in_axes) = (c, w);
                } else {
                    return Err(self.err(
                        any,
                        format!(
                            "a convolution with {in_per_group} input channels per group and {out} outputs after a \
                             layer with {} channels (grouped convolutions are not supported)",
                            c.channels
                        ),
                    ));
                }
            }
            Kind::Linear { out, inputs } => {
                let c = cur.unwrap_or(Chan { group: None, channels: inputs });
                if inputs % c.channels != 0 {
                    return Err(self.err(
                        any,
                        format!("has {inputs} inputs, not a multiple of the {} channels before it", c.channels),
                    ));
                }
                let block = inputs / c.channels;
                let o = output(out, b)?;
                (out_g, in_axes) = (o, vec![o.group.map(|g| (g, 1)), c.group.map(|g| (g, block))]);
            }
            Kind::Norm { channels } => {
                let c = cur.ok_or_else(|| self.err(any, "a normalisation layer before any other layer".into()))?;
                if channels != c.channels {
                    return Err(self.err(
                        any,
                        format!("normalises {channels} channels but the layer before it has {}", c.channels),
                    ));
                }
                (out_g, in_axes) = (c, vec![c.group.map(|g| (g, 1))]);
            }
        }
        for p in &m.params {
            let axes = if p.shape.is_empty() {
                vec![]
            } else if m.leaf(p) == "weight" {
                in_axes.clone()
            } else {
                // bias, running_mean, running_var: one value per output channel.
                vec![out_g.group.map(|g| (g, 1))]
            };
            b.set(&p.name, axes);
        }
        *cur = Some(out_g);
        Ok(())
    }
}

fn module_kind(ck: &Checkpoint, module: &str, params: &[&TensorInfo], residual: bool) -> Result<Kind> {
    let err = |t: &str, msg: String| {
        Error::usage(format!(
            "{}: tensor '{t}': {msg}; the built-in cannot infer this net, write a spec file (see docs/align.md)",
            ck.path().display()
        ))
    };
    let leaf = |p: &TensorInfo| p.name[if module.is_empty() { 0 } else { module.len() + 1 }..].to_string();
    let mut weight = None;
    let mut channels = None;
    for p in params {
        match (leaf(p).as_str(), p.shape.len()) {
            ("weight", _) => weight = Some(*p),
            ("bias" | "running_mean" | "running_var", 1) => {
                channels.get_or_insert(p.shape[0]);
            }
            (_, 0) => {}
            _ => return Err(err(&p.name, format!("shape {:?} does not fit a conv, Linear or norm layer", p.shape))),
        }
    }
    let kind = match weight.map(|w| (w, w.shape.len())) {
        Some((w, n)) if n >= 3 => {
            if !residual {
                return Err(err(&w.name, format!("a convolution weight; use {} cnn", Arg::Arch)));
            }
            Kind::Conv { out: w.shape[0], in_per_group: w.shape[1] }
        }
        Some((w, 2)) => Kind::Linear { out: w.shape[0], inputs: w.shape[1] },
        Some((w, 1)) => Kind::Norm { channels: w.shape[0] },
        Some((w, _)) => return Err(err(&w.name, "a scalar weight".into())),
        None => match channels {
            Some(c) => Kind::Norm { channels: c },
            None => Kind::Stateless,
        },
    };
    if let (Some(w), Some(c)) = (weight, channels) {
        if w.shape[0] != c {
            return Err(err(&w.name, format!("has {} outputs but its bias/statistics have {c}", w.shape[0])));
        }
    }
    Ok(kind)
}

fn is_index(part: &str) -> bool {
    !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit())
}

fn unique_name(b: &Builder, want: &str) -> String {
    let taken = |n: &str| b.groups.iter().any(|(g, _)| g == n);
    if !taken(want) {
        return want.to_string();
    }
    (2..).map(|k| format!("{want}#{k}")).find(|n| !taken(n)).unwrap()
}

/// A sort key that puts modules in definition order under the usual naming conventions: numbers compare as numbers;
/// at the top level a stem comes first and the head (mlp, fc, classifier) last; `stageK` comes before
/// `transitionK` and `layerK` after `convK`/`bnK`; within a module a conv/linear comes before its norm, depthwise
/// before pointwise; shortcut branches come after the main path. Anything else keeps name order, and the channel
/// chaining in `walk` refuses an order that does not fit.
fn order_key(parts: &[&str]) -> Vec<(u8, u8, u64, u8, String)> {
    parts
        .iter()
        .enumerate()
        .map(|(depth, p)| {
            if is_index(p) {
                return (1, 0, p.parse().unwrap_or(u64::MAX), 0, String::new());
            }
            let lower = p.to_ascii_lowercase();
            let base = lower.trim_end_matches(|c: char| c.is_ascii_digit());
            let number = lower[base.len()..].parse::<u64>().unwrap_or(0);
            let late = SHORTCUT_NAMES.contains(&base) as u8;
            let section = match (depth, base) {
                (0, "stem" | "input" | "embed" | "embedding" | "patch_embed") => 0,
                (0, "mlp" | "fc" | "classifier" | "head" | "linear" | "output" | "out" | "logits" | "dense") => 2,
                _ => 1,
            };
            let role = match base {
                "depthwise" | "dw" | "conv" | "linear" | "mlp" | "pool" | "avgpool" => 0,
                "bn_depthwise" | "bn_dw" | "bn" | "norm" | "batchnorm" | "fc" | "dense" => 1,
                "pointwise" | "pw" | "classifier" | "head" | "output" | "out" | "logits" => 2,
                "bn_pointwise" | "bn_pw" => 3,
                "stage" | "layer" | "layers" | "block" | "blocks" | "features" | "res" => 4,
                "transition" | "trans" => 5,
                _ => 6,
            };
            (section, late, number, role, base.to_string())
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------------------
// Transformers.

fn cfg_usize(cfg: &serde_json::Value, key: &str) -> Option<usize> {
    cfg.get(key).and_then(|v| v.as_u64()).map(|v| v as usize)
}

fn need_config(ck: &Checkpoint, arch: &str) -> Result<serde_json::Value> {
    config(ck)?.ok_or_else(|| {
        Error::usage(format!(
            "{}: the built-in '{arch}' spec reads the head count from config.json, which is not next to the \
             checkpoint (give the checkpoint directory, or write a spec file)",
            ck.path().display()
        ))
    })
}

fn cfg_required(ck: &Checkpoint, cfg: &serde_json::Value, key: &str) -> Result<usize> {
    cfg_usize(cfg, key)
        .filter(|&v| v > 0)
        .ok_or_else(|| Error::usage(format!("{}: config.json has no positive integer '{key}'", ck.path().display())))
}

fn shape_of<'a>(ck: &'a Checkpoint, name: &str) -> Result<&'a [usize]> {
    Ok(&ck.info(name).ok_or_else(|| Error::tensor(ck.path(), name, "no such tensor in this checkpoint"))?.shape)
}

fn bert(ck: &Checkpoint, opts: Options, b: &mut Builder) -> Result<()> {
    let cfg = need_config(ck, "bert")?;
    let heads = cfg_required(ck, &cfg, "num_attention_heads")?;
    let anchor = "embeddings.word_embeddings.weight";
    let prefix = ck
        .names()
        .find_map(|n| n.strip_suffix(anchor))
        .ok_or_else(|| {
            Error::usage(format!("{}: no tensor named '*{anchor}': not a BERT checkpoint", ck.path().display()))
        })?
        .to_string();
    let hidden = shape_of(ck, &format!("{prefix}{anchor}"))?[1];
    if hidden % heads != 0 {
        return Err(Error::usage(format!(
            "{}: hidden size {hidden} is not a multiple of num_attention_heads {heads}",
            ck.path().display()
        )));
    }
    let head_dim = hidden / heads;
    let r: G = opts.permute_residual.then(|| (b.group("residual", hidden), 1));
    let has_pooler = ck.contains(&format!("{prefix}pooler.dense.weight"));
    let mut layers: HashMap<usize, (usize, usize)> = HashMap::new();
    let names: Vec<String> = ck.names().map(String::from).collect();
    for name in &names {
        let rank = shape_of(ck, name)?.len();
        let Some(rest) = name.strip_prefix(&prefix) else {
            // Task heads outside the encoder: a BERT classifier reads the pooler output, which stays fixed; a masked-LM
            // head's transform lives in the residual space and its decoder may be tied to the word embeddings.
            let axes = match name.as_str() {
                // RoBERTa-style classifiers have no pooler: their first layer reads the residual stream.
                "classifier.dense.weight" if !has_pooler => vec![None, r],
                "cls.predictions.transform.dense.weight" => vec![r, r],
                "cls.predictions.transform.dense.bias"
                | "cls.predictions.transform.LayerNorm.weight"
                | "cls.predictions.transform.LayerNorm.bias" => vec![r],
                "cls.predictions.decoder.weight" => vec![None, r],
                _ if name.starts_with("classifier.")
                    || name.starts_with("cls.seq_relationship.")
                    || name == "cls.predictions.bias"
                    || name == "cls.predictions.decoder.bias" =>
                {
                    vec![None; rank]
                }
                _ => continue,
            };
            b.set(name, axes);
            continue;
        };
        let axes: Vec<G> = match rest {
            "embeddings.word_embeddings.weight"
            | "embeddings.position_embeddings.weight"
            | "embeddings.token_type_embeddings.weight" => vec![None, r],
            "embeddings.LayerNorm.weight" | "embeddings.LayerNorm.bias" => vec![r],
            "embeddings.position_ids" | "embeddings.token_type_ids" => vec![None; rank],
            "pooler.dense.weight" => vec![None, r],
            "pooler.dense.bias" => vec![None],
            _ => {
                let Some((layer, part)) = rest.strip_prefix("encoder.layer.").and_then(|s| s.split_once('.')) else {
                    continue;
                };
                let Ok(l) = layer.parse::<usize>() else { continue };
                let lp = format!("{prefix}encoder.layer.{l}");
                let inter = shape_of(ck, &format!("{lp}.intermediate.dense.weight"))?[0];
                let (hg, ig) = *layers.entry(l).or_insert_with(|| {
                    let h = b.group(format!("{lp}.attention.heads"), heads);
                    (h, b.group(format!("{lp}.intermediate"), inter))
                });
                let h: G = Some((hg, head_dim));
                let i: G = Some((ig, 1));
                match part {
                    "attention.self.query.weight" | "attention.self.key.weight" | "attention.self.value.weight" => {
                        vec![h, r]
                    }
                    "attention.self.query.bias" | "attention.self.key.bias" | "attention.self.value.bias" => vec![h],
                    "attention.output.dense.weight" => vec![r, h],
                    "attention.output.dense.bias"
                    | "attention.output.LayerNorm.weight"
                    | "attention.output.LayerNorm.bias"
                    | "output.dense.bias"
                    | "output.LayerNorm.weight"
                    | "output.LayerNorm.bias" => vec![r],
                    "intermediate.dense.weight" => vec![i, r],
                    "intermediate.dense.bias" => vec![i],
                    "output.dense.weight" => vec![r, i],
                    _ => continue,
                }
            }
        };
        b.set(name, axes);
    }
    Ok(())
}

fn llama(ck: &Checkpoint, opts: Options, b: &mut Builder) -> Result<()> {
    let cfg = need_config(ck, "llama")?;
    let heads = cfg_required(ck, &cfg, "num_attention_heads")?;
    let kv = cfg_usize(&cfg, "num_key_value_heads").unwrap_or(heads);
    if kv == 0 || heads % kv != 0 {
        return Err(Error::usage(format!(
            "{}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}",
            ck.path().display()
        )));
    }
    let rep = heads / kv;
    let embed = "model.embed_tokens.weight";
    let hidden = shape_of(ck, embed)?[1];
    let head_dim = match cfg_usize(&cfg, "head_dim") {
        Some(d) => d,
        None if hidden % heads == 0 => hidden / heads,
        None => {
            return Err(Error::usage(format!(
                "{}: config.json has no head_dim and hidden size {hidden} is not a multiple of {heads} heads",
                ck.path().display()
            )))
        }
    };
    let r: G = opts.permute_residual.then(|| (b.group("residual", hidden), 1));
    let mut layers: HashMap<usize, (usize, usize)> = HashMap::new();
    let names: Vec<String> = ck.names().map(String::from).collect();
    for name in &names {
        let rank = shape_of(ck, name)?.len();
        let axes: Vec<G> = match name.as_str() {
            "model.embed_tokens.weight" | "lm_head.weight" => vec![None, r],
            "model.norm.weight" => vec![r],
            _ => {
                let Some((layer, part)) = name.strip_prefix("model.layers.").and_then(|s| s.split_once('.')) else {
                    continue;
                };
                let Ok(l) = layer.parse::<usize>() else { continue };
                let lp = format!("model.layers.{l}");
                let inter = shape_of(ck, &format!("{lp}.mlp.gate_proj.weight"))?[0];
                let (kg, mg) = *layers.entry(l).or_insert_with(|| {
                    (b.group(format!("{lp}.self_attn.kv_heads"), kv), b.group(format!("{lp}.mlp"), inter))
                });
                let q: G = Some((kg, rep * head_dim));
                let k: G = Some((kg, head_dim));
                let m: G = Some((mg, 1));
                match part {
                    "input_layernorm.weight" | "post_attention_layernorm.weight" | "self_attn.o_proj.bias" => vec![r],
                    "self_attn.q_proj.weight" => vec![q, r],
                    "self_attn.q_proj.bias" => vec![q],
                    "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => vec![k, r],
                    "self_attn.k_proj.bias" | "self_attn.v_proj.bias" => vec![k],
                    "self_attn.o_proj.weight" => vec![r, q],
                    // Per-head norms and rotary frequencies act within a head, whose dimensions stay in place.
                    "self_attn.q_norm.weight" | "self_attn.k_norm.weight" | "self_attn.rotary_emb.inv_freq" => {
                        vec![None; rank]
                    }
                    "mlp.gate_proj.weight" | "mlp.up_proj.weight" => vec![m, r],
                    "mlp.down_proj.weight" => vec![r, m],
                    _ => continue,
                }
            }
        };
        b.set(name, axes);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definition_order_from_sorted_names() {
        let mut names = vec![
            "classifier",
            "mlp.0.bn",
            "mlp.0.linear",
            "mlp.1.linear",
            "stage1.0.conv1.bn_depthwise",
            "stage1.0.conv1.bn_pointwise",
            "stage1.0.conv1.depthwise",
            "stage1.0.conv1.pointwise",
            "stage1.0.conv2.pointwise",
            "stage1.1.conv1.depthwise",
            "stage10.0.conv1.depthwise",
            "stage2.0.conv1.depthwise",
            "stem.depthwise",
            "stem.pointwise",
            "transition1.depthwise",
            "transition2.depthwise",
        ];
        names.sort_by_key(|n| order_key(&n.split('.').collect::<Vec<_>>()));
        assert_eq!(
            names,
            vec![
                "stem.depthwise",
                "stem.pointwise",
                "stage1.0.conv1.depthwise",
                "stage1.0.conv1.bn_depthwise",
                "stage1.0.conv1.pointwise",
                "stage1.0.conv1.bn_pointwise",
                "stage1.0.conv2.pointwise",
                "stage1.1.conv1.depthwise",
                "transition1.depthwise",
                "stage2.0.conv1.depthwise",
                "transition2.depthwise",
                "stage10.0.conv1.depthwise",
                "mlp.0.linear",
                "mlp.0.bn",
                "mlp.1.linear",
                "classifier",
            ]
        );
        let mut resnet = vec![
            "bn1",
            "conv1",
            "fc",
            "layer1.0.bn1",
            "layer1.0.bn2",
            "layer1.0.conv1",
            "layer1.0.conv2",
            "layer2.0.downsample.0",
            "layer2.0.downsample.1",
            "layer2.0.bn1",
            "layer2.0.conv1",
        ];
        resnet.sort_by_key(|n| order_key(&n.split('.').collect::<Vec<_>>()));
        assert_eq!(
            resnet,
            vec![
                "conv1",
                "bn1",
                "layer1.0.conv1",
                "layer1.0.bn1",
                "layer1.0.conv2",
                "layer1.0.bn2",
                "layer2.0.conv1",
                "layer2.0.bn1",
                "layer2.0.downsample.0",
                "layer2.0.downsample.1",
                "fc",
            ]
        );
    }
}
