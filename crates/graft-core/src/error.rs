//! The one error type of graft. Every variant carries the file (and, where there is one, the tensor) it is about, and
//! renders as a single line, so that `main` can print it as is and exit non-zero.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operating system refused a read, write, rename or mapping.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    /// A file is not a valid checkpoint (header, index, layout).
    #[error("{}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },

    /// One tensor of a file is wrong (dtype, shape, byte range, values).
    #[error("{}: tensor '{tensor}': {msg}", path.display())]
    Tensor { path: PathBuf, tensor: String, msg: String },

    /// Inputs that are each valid but do not fit together (missing tensors, shape mismatches, bad parameters).
    #[error("{0}")]
    Invalid(String),

    /// A command line or configuration file asks for something graft cannot do.
    #[error("{0}")]
    Usage(String),
}

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().to_path_buf(), source }
    }

    pub fn format(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Format { path: path.as_ref().to_path_buf(), msg: one_line(msg.into()) }
    }

    pub fn tensor(path: impl AsRef<Path>, tensor: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Tensor { path: path.as_ref().to_path_buf(), tensor: tensor.into(), msg: one_line(msg.into()) }
    }

    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(one_line(msg.into()))
    }

    pub fn usage(msg: impl Into<String>) -> Self {
        Error::Usage(one_line(msg.into()))
    }

    /// The process exit code: 2 for a command line or config the user must change, 1 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_) => 2,
            _ => 1,
        }
    }
}

macro_rules! args {
    ($($variant:ident => $name:literal,)*) => {
        /// An argument of a library entry point that error messages name. How a message shows it is the front end's
        /// choice, made once (`name_args_with`): the command line shows its flag (`--snr-select`, from the one
        /// table in `cli::flags`); without a front end a message shows the parameter's own name (`snr_select`).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Arg {
            $($variant,)*
        }

        impl Arg {
            /// Every parameter, for front ends that check their naming covers them.
            pub const ALL: &'static [Arg] = &[$(Arg::$variant,)*];

            /// The parameter's own name (the library's field or argument name).
            pub fn name(self) -> &'static str {
                match self {
                    $(Arg::$variant => $name,)*
                }
            }
        }
    };
}

args! {
    Alpha => "alpha",
    AllowMissing => "allow_missing",
    AllowNonfinite => "allow_nonfinite",
    Arch => "arch",
    Base => "base",
    Batch => "batch",
    ChatTemplate => "chat_template",
    Classes => "classes",
    Compat => "compat",
    Cycle => "cycle",
    Data => "data",
    Device => "device",
    Dpi => "dpi",
    Dtype => "dtype",
    EvalBatch => "eval_batch",
    Exclude => "exclude",
    Executor => "executor",
    Filter => "filter",
    Finetuned => "finetuned",
    Force => "force",
    Freeze => "freeze",
    Init => "init",
    IntermediateDir => "intermediate_dir",
    Lenient => "lenient",
    Lr => "lr",
    MaxIter => "max_iter",
    MaxLen => "max_len",
    Method => "method",
    NoCopyTokenizer => "no_copy_tokenizer",
    Normalize => "normalize",
    Only => "only",
    Output => "output",
    Resamples => "resamples",
    Resume => "resume",
    SelectionJson => "selection_json",
    Shard => "shard",
    ShardCount => "shard_count",
    SnrFrom => "snr_from",
    SnrSelect => "snr_select",
    SpectrumJson => "spectrum_json",
    Spec => "spec",
    Steps => "steps",
    TestFraction => "test_fraction",
    TiesVariant => "ties_variant",
    TopPercent => "top_percent",
    Tokenizer => "tokenizer",
    TrainLastLayers => "train_last_layers",
    TransferBody => "transfer_body",
    UnfrozenYaml => "unfrozen_yaml",
    ValFraction => "val_fraction",
    Vector => "vector",
}

/// Compiles a user-supplied regular expression given as `arg`, naming the argument in the error.
pub fn parse_regex(arg: Arg, pattern: &str) -> Result<regex::Regex> {
    regex::Regex::new(pattern)
        .map_err(|e| Error::usage(format!("{arg} '{pattern}' is not a valid regular expression: {e}")))
}

static ARG_NAMING: OnceLock<fn(Arg) -> &'static str> = OnceLock::new();

/// Makes messages show each argument as `naming` says (the first call wins; later ones are ignored). Call it
/// before anything can fail: a message shows a parameter as it is named when the message is made.
pub fn name_args_with(naming: fn(Arg) -> &'static str) {
    let _ = ARG_NAMING.set(naming);
}

impl fmt::Display for Arg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(ARG_NAMING.get().map_or(self.name(), |naming| naming(*self)))
    }
}

/// The longest message graft prints for one error or warning, in characters. Messages quote user data (JSON
/// fragments, tensor names, whole header fields) that a hostile file can make megabytes long.
pub const MAX_MESSAGE_CHARS: usize = 1000;

/// Messages may quote user data (JSON fragments, names); keep them on one line so scripts can grep stderr.
fn one_line(s: String) -> String {
    let s = if s.contains(['\n', '\r']) { s.replace(['\n', '\r'], " ") } else { s };
    bounded(&s)
}

/// `s` on one line and at most `MAX_MESSAGE_CHARS` characters, the cut marked with an ellipsis and the count of
/// characters left out. `main` and every warning print through this, so no error line is ever unbounded.
pub fn bounded(s: &str) -> String {
    let s = if s.contains(['\n', '\r']) { std::borrow::Cow::Owned(s.replace(['\n', '\r'], " ")) } else { s.into() };
    match s.char_indices().nth(MAX_MESSAGE_CHARS) {
        None => s.into_owned(),
        Some((cut, _)) => {
            let left = s[cut..].chars().count();
            format!("{}... ({left} more characters)", &s[..cut])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_have_distinct_snake_case_names() {
        let mut names: Vec<&str> = Arg::ALL.iter().map(|p| p.name()).collect();
        assert!(names.iter().all(|n| n.chars().all(|c| c.is_ascii_lowercase() || c == '_')), "{names:?}");
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Arg::ALL.len());
    }

    #[test]
    fn long_messages_are_cut_on_one_line() {
        let long = "é\n".repeat(MAX_MESSAGE_CHARS);
        let e = Error::format("/x", long).to_string();
        assert!(!e.contains('\n'));
        // "/x: " + MAX_MESSAGE_CHARS kept characters + the ellipsis note
        assert!(e.starts_with("/x: é é"), "{e}");
        assert!(e.ends_with(&format!("... ({MAX_MESSAGE_CHARS} more characters)")), "{e}");
        assert!(e.chars().count() < MAX_MESSAGE_CHARS + 40);
        assert_eq!(bounded("short"), "short");
        assert_eq!(bounded(&"a".repeat(MAX_MESSAGE_CHARS)), "a".repeat(MAX_MESSAGE_CHARS));
    }
}
