//! Text classification data: SpamAssassin corpus folders and `label<TAB>text` files.
//!
//! SpamAssassin: a directory of folders whose names contain `spam` (class 1) or `ham` (class 0, e.g. `easy_ham`,
//! `hard-ham-1`), one message per file. A message's text is its `Subject:` line followed by its body (the part after
//! the first blank line); the other headers are dropped, since routing headers are not the message's content.
//!
//! Tab-separated: each non-empty line is `label<TAB>text`. Labels that are all integers are class indices;
//! otherwise the distinct labels, sorted, are the classes. A directory may hold `train.tsv`, and optionally
//! `test.tsv` (`.txt` also accepted).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::{Dataset, Samples};
use crate::error::{Error, Result};

/// Characters of a message kept (the encoder reads at most a few hundred tokens anyway).
const MAX_CHARS: usize = 4000;

pub fn read_spam_folders(dir: &Path) -> Result<Dataset> {
    let mut folders: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    folders.sort();
    let mut texts = Vec::new();
    let mut labels = Vec::new();
    for f in &folders {
        let name = f.file_name().unwrap_or_default().to_string_lossy().to_lowercase();
        let label = if name.contains("spam") {
            1
        } else if name.contains("ham") {
            0
        } else {
            continue;
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(f)
            .map_err(|e| Error::io(f, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
            .filter(|p| p.extension().is_none_or(|x| x != "json"))
            .collect();
        files.sort();
        for p in files {
            let bytes = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
            texts.push(message_text(&String::from_utf8_lossy(&bytes)));
            labels.push(label);
        }
    }
    if texts.is_empty() {
        return Err(Error::format(dir, "no messages found in ham/spam folders"));
    }
    Ok(Dataset { samples: Samples::Text(texts), labels, class_names: vec!["ham".into(), "spam".into()] })
}

/// Subject line plus body of an RFC 822 message.
pub fn message_text(raw: &str) -> String {
    let raw = raw.replace("\r\n", "\n");
    let (headers, body) = raw.split_once("\n\n").unwrap_or(("", raw.as_str()));
    let subject = headers
        .lines()
        .find_map(|l| l.strip_prefix("Subject:").or_else(|| l.strip_prefix("subject:")))
        .unwrap_or("")
        .trim();
    let mut text = format!("{subject}\n{body}");
    if text.len() > MAX_CHARS {
        let mut cut = MAX_CHARS;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

/// A `label<TAB>text` file, or a directory with `train.tsv` and optional `test.tsv`.
pub fn read_tsv(path: &Path) -> Result<(Dataset, Option<Dataset>)> {
    if path.is_file() {
        let rows = read_rows(path)?;
        let (train, _) = label(vec![(path.to_path_buf(), rows)])?;
        return Ok((train, None));
    }
    let pick = |stem: &str| ["tsv", "txt"].iter().map(|e| path.join(format!("{stem}.{e}"))).find(|p| p.is_file());
    let train = pick("train").ok_or_else(|| Error::format(path, "no train.tsv (or train.txt) in this directory"))?;
    let mut files = vec![(train.clone(), read_rows(&train)?)];
    if let Some(t) = pick("test") {
        files.push((t.clone(), read_rows(&t)?));
    }
    let (train, test) = label(files)?;
    Ok((train, test))
}

fn read_rows(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            l.split_once('\t')
                .map(|(a, b)| (a.trim().to_string(), b.to_string()))
                .ok_or_else(|| Error::format(path, format!("line {}: expected label<TAB>text", i + 1)))
        })
        .collect()
}

/// Assigns class indices over all files together so train and test agree.
fn label(files: Vec<(PathBuf, Vec<(String, String)>)>) -> Result<(Dataset, Option<Dataset>)> {
    let all: BTreeSet<&str> = files.iter().flat_map(|(_, r)| r.iter().map(|(l, _)| l.as_str())).collect();
    let numeric = all.iter().all(|l| l.parse::<u32>().is_ok());
    let class_names: Vec<String> = if numeric {
        let max = all.iter().map(|l| l.parse::<u32>().unwrap()).max().unwrap_or(0);
        (0..=max).map(|c| c.to_string()).collect()
    } else {
        all.iter().map(|s| s.to_string()).collect()
    };
    let index = |l: &str| -> u32 {
        if numeric {
            l.parse().unwrap()
        } else {
            class_names.iter().position(|c| c == l).unwrap() as u32
        }
    };
    let mut sets = files.into_iter().map(|(_, rows)| Dataset {
        labels: rows.iter().map(|(l, _)| index(l)).collect(),
        samples: Samples::Text(rows.into_iter().map(|(_, t)| t).collect()),
        class_names: class_names.clone(),
    });
    let train = sets.next().unwrap();
    Ok((train, sets.next()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_keeps_subject_and_body() {
        let m = "From: a@b\r\nSubject: Win money\r\nX-Spam: yes\r\n\r\nClick here\r\nnow";
        assert_eq!(message_text(m), "Win money\nClick here\nnow");
    }
}
