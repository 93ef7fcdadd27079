//! Model references as mergekit writes them (`org/name`, `org/name@revision`, or a local path), resolved offline:
//! an existing local path wins, else the snapshot in the local Hugging Face cache. graft never downloads; a
//! reference found in neither place is a usage error that names the id, where it looked and how to fetch it.
//!
//! Cache layout (huggingface_hub's): `<cache>/models--org--name/refs/<revision>` holds a commit hash, and
//! `<cache>/models--org--name/snapshots/<hash>/` the files. A 40-hex revision names a snapshot directly. The cache
//! is `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Where the Hugging Face cache is, read from the environment.
#[derive(Clone, Debug, Default)]
pub struct CacheEnv {
    pub hf_hub_cache: Option<PathBuf>,
    pub hf_home: Option<PathBuf>,
    pub home: Option<PathBuf>,
}

impl CacheEnv {
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        CacheEnv { hf_hub_cache: var("HF_HUB_CACHE"), hf_home: var("HF_HOME"), home: var("HOME") }
    }

    /// The hub cache directory, by huggingface_hub's precedence.
    pub fn cache_dir(&self) -> Option<PathBuf> {
        if let Some(c) = &self.hf_hub_cache {
            return Some(c.clone());
        }
        if let Some(h) = &self.hf_home {
            return Some(h.join("hub"));
        }
        self.home.as_ref().map(|h| h.join(".cache").join("huggingface").join("hub"))
    }
}

/// A Hugging Face model id with its revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubId {
    pub repo: String,
    pub revision: String,
}

/// Parses `org/name` or `org/name@revision` (revision defaults to `main`); None when `s` does not have that shape
/// (it is then only a local path).
pub fn parse_id(s: &str) -> Option<HubId> {
    let (repo, revision) = match s.split_once('@') {
        Some((r, rev)) if !rev.is_empty() => (r, rev),
        Some(_) => return None,
        None => (s, "main"),
    };
    let (org, name) = repo.split_once('/')?;
    let part_ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with(['.', '-'])
            && !p.ends_with('.')
            && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    (part_ok(org) && part_ok(name) && !name.contains('/'))
        .then(|| HubId { repo: repo.to_string(), revision: revision.to_string() })
}

fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// Looks `id` up in the cache at `cache`: the snapshot directory, or a sentence saying what is missing.
pub fn lookup(cache: &Path, id: &HubId) -> std::result::Result<PathBuf, String> {
    let repo_dir = cache.join(format!("models--{}", id.repo.replace('/', "--")));
    if !repo_dir.is_dir() {
        return Err(format!("{} is not there", repo_dir.display()));
    }
    let hash = if is_commit_hash(&id.revision) {
        id.revision.clone()
    } else {
        let r = repo_dir.join("refs").join(&id.revision);
        match std::fs::read_to_string(&r) {
            Ok(h) => h.trim().to_string(),
            Err(_) => {
                return Err(format!("{} has no ref '{}' ({} is missing)", repo_dir.display(), id.revision, r.display()))
            }
        }
    };
    let snap = repo_dir.join("snapshots").join(&hash);
    if snap.is_dir() {
        Ok(snap)
    } else {
        Err(format!("snapshot {} is missing", snap.display()))
    }
}

/// Resolves a model reference: an existing path (as given, then relative to `rel_dir`), else a cached Hugging Face
/// snapshot. `what` names the reference in errors (e.g. `config.yml: models[0].model`).
pub fn resolve(reference: &str, rel_dir: Option<&Path>, env: &CacheEnv, what: &str) -> Result<PathBuf> {
    let p = PathBuf::from(reference);
    if p.exists() {
        return Ok(p);
    }
    if let Some(d) = rel_dir.filter(|_| p.is_relative()) {
        let rel = d.join(&p);
        if rel.exists() {
            return Ok(rel);
        }
    }
    if reference.contains('+') {
        return Err(Error::usage(format!(
            "{what}: '{reference}' is a model+LoRA reference, which only merge inputs accept (\
             `crate::merge::lora::resolve`)"
        )));
    }
    let looks_local = p.is_absolute() || reference.starts_with("./") || reference.starts_with("../");
    let Some(id) = parse_id(reference).filter(|_| !looks_local) else {
        return Err(Error::usage(format!("{what}: '{reference}' does not exist (not a file or directory)")));
    };
    let Some(cache) = env.cache_dir() else {
        return Err(Error::usage(format!(
            "{what}: '{reference}' is not a local path, and no Hugging Face cache is set (HF_HUB_CACHE, HF_HOME, HOME \
             are all unset); fetch it with `huggingface-cli download {}`",
            id.repo
        )));
    };
    lookup(&cache, &id).map_err(|why| {
        let rev = if id.revision == "main" { String::new() } else { format!(" --revision {}", id.revision) };
        Error::usage(format!(
            "{what}: '{reference}' is not a local path and not in the Hugging Face cache ({why}); graft does not \
             download: fetch it with `huggingface-cli download {}{rev}` (or set HF_HUB_CACHE/HF_HOME)",
            id.repo
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH_MAIN: &str = "0123456789abcdef0123456789abcdef01234567";
    const HASH_OLD: &str = "89abcdef0123456789abcdef0123456789abcdef";

    /// A cache with `org/model` at two snapshots, `main` pointing at the newer one.
    fn cache(root: &Path) -> PathBuf {
        let repo = root.join("models--org--model");
        for h in [HASH_MAIN, HASH_OLD] {
            std::fs::create_dir_all(repo.join("snapshots").join(h)).unwrap();
        }
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), HASH_MAIN).unwrap();
        std::fs::write(repo.join("refs").join("v1"), format!("{HASH_OLD}\n")).unwrap();
        root.to_path_buf()
    }

    fn env_with_cache(c: &Path) -> CacheEnv {
        CacheEnv { hf_hub_cache: Some(c.to_path_buf()), ..Default::default() }
    }

    #[test]
    fn ids_parse() {
        assert_eq!(parse_id("org/model"), Some(HubId { repo: "org/model".into(), revision: "main".into() }));
        assert_eq!(parse_id("org/model@v1").unwrap().revision, "v1");
        assert_eq!(parse_id("model"), None);
        assert_eq!(parse_id("a/b/c"), None);
        assert_eq!(parse_id("org/model@"), None);
        assert_eq!(parse_id("../x"), None);
    }

    #[test]
    fn refs_resolve_to_snapshots() {
        let d = tempfile::tempdir().unwrap();
        let c = cache(d.path());
        let env = env_with_cache(&c);
        let snap = |h: &str| c.join("models--org--model").join("snapshots").join(h);
        assert_eq!(resolve("org/model", None, &env, "m").unwrap(), snap(HASH_MAIN));
        assert_eq!(resolve("org/model@v1", None, &env, "m").unwrap(), snap(HASH_OLD));
        // A commit hash names the snapshot without a ref.
        assert_eq!(resolve(&format!("org/model@{HASH_OLD}"), None, &env, "m").unwrap(), snap(HASH_OLD));
    }

    #[test]
    fn missing_ref_and_missing_repo_are_usage_errors_naming_the_id() {
        let d = tempfile::tempdir().unwrap();
        let env = env_with_cache(&cache(d.path()));
        let e = resolve("org/model@nope", None, &env, "c.yml: base_model").unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let msg = e.to_string();
        assert!(msg.contains("org/model@nope") && msg.contains("no ref 'nope'"), "{msg}");
        assert!(msg.contains("huggingface-cli download org/model --revision nope"), "{msg}");
        let e = resolve("org/absent", None, &env, "m").unwrap_err().to_string();
        assert!(e.contains("models--org--absent") && e.contains("huggingface-cli download org/absent"), "{e}");
        // A snapshot the ref names but that was deleted.
        std::fs::remove_dir_all(d.path().join("models--org--model/snapshots").join(HASH_MAIN)).unwrap();
        assert!(resolve("org/model", None, &env, "m").unwrap_err().to_string().contains("snapshot"));
    }

    #[test]
    fn hub_cache_wins_over_hf_home_which_wins_over_home() {
        let env = CacheEnv { hf_hub_cache: Some("/a".into()), hf_home: Some("/b".into()), home: Some("/c".into()) };
        assert_eq!(env.cache_dir().unwrap(), PathBuf::from("/a"));
        let env = CacheEnv { hf_hub_cache: None, ..env };
        assert_eq!(env.cache_dir().unwrap(), PathBuf::from("/b/hub"));
        let env = CacheEnv { hf_home: None, ..env };
        assert_eq!(env.cache_dir().unwrap(), PathBuf::from("/c/.cache/huggingface/hub"));
        // And resolution follows it: the model is only under HF_HOME/hub.
        let d = tempfile::tempdir().unwrap();
        cache(&d.path().join("home").join("hub"));
        let env = CacheEnv { hf_hub_cache: None, hf_home: Some(d.path().join("home")), home: None };
        assert!(resolve("org/model", None, &env, "m").unwrap().ends_with(HASH_MAIN));
        let env = CacheEnv { hf_hub_cache: Some(d.path().join("empty")), ..env };
        assert!(resolve("org/model", None, &env, "m").is_err());
    }

    #[test]
    fn local_paths_win_and_missing_paths_are_named() {
        let d = tempfile::tempdir().unwrap();
        let c = cache(d.path());
        // A local directory spelled like an id shadows the cache.
        let local = d.path().join("org").join("model");
        std::fs::create_dir_all(&local).unwrap();
        let env = env_with_cache(&c);
        assert_eq!(resolve("org/model", Some(d.path()), &env, "m").unwrap(), local);
        let e = resolve("./no/such", None, &env, "c.yml: models[1].model").unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("c.yml: models[1].model: './no/such' does not exist"), "{e}");
        assert!(resolve("a+lora/x", None, &env, "m").unwrap_err().to_string().contains("LoRA"));
    }
}
