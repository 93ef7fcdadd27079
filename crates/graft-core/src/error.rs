//! The one error type of graft. Every variant carries the file (and, where there is one, the tensor) it is about, and
//! renders as a single line, so that `main` can print it as is and exit non-zero.

use std::path::{Path, PathBuf};

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
