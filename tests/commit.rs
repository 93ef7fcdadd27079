//! The output commit protocol, driven through the real binary: an output is whole or absent at every instant (kills
//! at every rename, link, unlink, sync and write, injected by strace), one writer per output (races of writers and
//! readers), nothing left behind (full disk, SIGINT, SIGTERM), `--force` replaces only the old checkpoint's files,
//! and zero-element tensors round-trip. See `docs/outputs.md`.

use crate::support::{fixture, graft, s, stderr, BIN};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use graft::checkpoint::{Checkpoint, CheckpointWriter, Dtype, TensorDecl, WriterOptions};

/// A checkpoint's content, independent of its sharding: name -> (dtype, shape, bytes).
type Content = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

fn content(path: &Path) -> graft::error::Result<Content> {
    let ck = Checkpoint::open(path)?;
    Ok(ck.iter().map(|v| (v.name.to_string(), (v.dtype, v.shape.to_vec(), v.data.to_vec()))).collect())
}

/// Every file under `dir` (recursively, symlinks as their target text) with its bytes.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().to_string();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.file_type().is_symlink() {
                out.insert(rel, format!("-> {}", std::fs::read_link(&p).unwrap().display()).into_bytes());
            } else if m.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// graft's own entries (locks, temporaries) in `dir`.
fn leftovers(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(".graft-"))
        .collect();
    v.sort();
    v
}

/// Files a user keeps in a checkpoint directory that are not the checkpoint: other models' weights, notes, a
/// subdirectory and a symlink. `--force` must never touch them.
fn add_foreign_files(dir: &Path) {
    std::fs::copy(fixture("mlp/base/model.safetensors"), dir.join("adapter_model.safetensors")).unwrap();
    std::fs::copy(fixture("mlp/ft_a/model.safetensors"), dir.join("consolidated.safetensors")).unwrap();
    std::fs::write(dir.join("README.md"), "my notes\n").unwrap();
    std::fs::create_dir(dir.join("eval")).unwrap();
    std::fs::write(dir.join("eval/results.jsonl"), "{\"acc\": 0.5}\n").unwrap();
    std::os::unix::fs::symlink("README.md", dir.join("NOTES")).unwrap();
}

fn foreign(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let keep = ["adapter_model.safetensors", "consolidated.safetensors", "README.md", "eval/results.jsonl", "NOTES"];
    tree(dir).into_iter().filter(|(k, _)| keep.contains(&k.as_str())).collect()
}

/// Copies a directory tree (files only), for resetting a scenario cheaply.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let m = std::fs::symlink_metadata(e.path()).unwrap();
        let dst = to.join(e.file_name());
        if m.file_type().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(e.path()).unwrap(), dst).unwrap();
        } else if m.is_dir() {
            copy_tree(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

fn strace() -> Option<&'static str> {
    let found = ["/usr/bin/strace", "/bin/strace"].into_iter().find(|p| Path::new(p).exists());
    if found.is_none() {
        eprintln!("SKIPPED: strace is not installed (apt-get install strace), so kills cannot be injected");
    }
    found
}

/// One kill scenario: `setup` prepares the destination, `args` is the graft command, and after a kill anywhere the
/// destination `dest` must open as exactly one of `allowed` (None: absent), with the foreign files intact.
struct Scenario<'a> {
    name: &'a str,
    setup: &'a dyn Fn(),
    args: Vec<String>,
    dest: PathBuf,
    /// Where graft's locks and temporaries for the output live.
    parent: PathBuf,
    allowed: Vec<Option<Content>>,
    foreign_dir: Option<PathBuf>,
}

/// Kills graft at the n-th call of `syscalls`, for n = 1, 2, … until a run completes, checking the destination
/// after every kill and after a clean rerun. Returns how many kill points there were.
fn kill_at_every(strace: &str, sc: &Scenario, syscalls: &str) -> usize {
    for n in 1..=400 {
        (sc.setup)();
        let before = sc.foreign_dir.as_ref().map(|d| foreign(d));
        let o = Command::new(strace)
            .args(["-f", "-o", "/dev/null", "-e", &format!("trace={syscalls}")])
            .arg("-e")
            .arg(format!("inject={syscalls}:signal=SIGKILL:when={n}"))
            .arg(BIN)
            .args(&sc.args)
            .output()
            .unwrap();
        let seen = if sc.dest.exists() { Some(content(&sc.dest)) } else { None };
        let whole = match &seen {
            None => sc.allowed.contains(&None),
            Some(Ok(c)) => sc.allowed.iter().any(|a| a.as_ref() == Some(c)),
            Some(Err(_)) => false,
        };
        assert!(
            whole,
            "{}: killed at {syscalls} #{n}: the destination is {}",
            sc.name,
            match &seen {
                None => "absent".to_string(),
                Some(Err(e)) => format!("unreadable: {e}"),
                Some(Ok(c)) => format!("a mix of {} tensors", c.len()),
            }
        );
        if let (Some(d), Some(before)) = (&sc.foreign_dir, &before) {
            if d.exists() {
                assert_eq!(&foreign(d), before, "{}: killed at {syscalls} #{n}: foreign files changed", sc.name);
            }
        }
        if o.status.success() {
            assert_eq!(sc.allowed.last().unwrap().as_ref(), seen.as_ref().and_then(|r| r.as_ref().ok()));
            return n - 1;
        }
        // The next run sweeps what the killed one left, and succeeds.
        let o = crate::support::command(&[]).args(&sc.args).output().unwrap();
        assert!(o.status.success(), "{}: rerun after kill #{n}: {}", sc.name, stderr(&o));
        assert_eq!(leftovers(&sc.parent), Vec::<String>::new(), "{}: after the rerun following kill #{n}", sc.name);
        assert_eq!(&content(&sc.dest).unwrap(), sc.allowed.last().unwrap().as_ref().unwrap());
    }
    panic!("{}: graft never completed under {syscalls} injection", sc.name);
}

#[test]
fn a_kill_anywhere_leaves_the_old_or_the_new_checkpoint_and_every_foreign_file() {
    let Some(strace) = strace() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let old = content(&fixture("llama/ft_a")).unwrap();
    let new = content(&fixture("llama/ft_b")).unwrap();

    // The old checkpoint (3 shards) with foreign files, as a template for each try.
    let template = tmp.path().join("template");
    let o = graft(&["convert", &s(&fixture("llama/ft_a")), "-o", &s(&template), "--max-shard-size", "20KB"]);
    assert!(o.status.success(), "{}", stderr(&o));
    add_foreign_files(&template);

    let dest = tmp.path().join("out");
    let reset = || {
        if dest.exists() {
            std::fs::remove_dir_all(&dest).unwrap();
        }
        copy_tree(&template, &dest);
    };
    let absent = || {
        if dest.exists() {
            std::fs::remove_dir_all(&dest).unwrap();
        }
    };
    let sharded_new = |out: &Path| -> Vec<String> {
        ["convert", &s(&fixture("llama/ft_b")), "-o", &s(out), "--force", "--max-shard-size", "12KB"]
            .map(String::from)
            .to_vec()
    };
    let scenarios = [
        Scenario {
            name: "a new 6-shard checkpoint",
            setup: &absent,
            args: sharded_new(&dest),
            dest: dest.clone(),
            parent: tmp.path().to_path_buf(),
            allowed: vec![None, Some(new.clone())],
            foreign_dir: None,
        },
        Scenario {
            name: "--force 6 shards over 3 shards and foreign files",
            setup: &reset,
            args: sharded_new(&dest),
            dest: dest.clone(),
            parent: tmp.path().to_path_buf(),
            allowed: vec![Some(old.clone()), Some(new.clone())],
            foreign_dir: Some(dest.clone()),
        },
        Scenario {
            name: "--force single file over a sharded checkpoint",
            setup: &reset,
            args: ["convert", &s(&fixture("llama/ft_b")), "-o", &s(&dest.join("model.safetensors")), "--force"]
                .map(String::from)
                .to_vec(),
            dest: dest.clone(),
            parent: tmp.path().to_path_buf(),
            allowed: vec![Some(old.clone()), Some(new.clone())],
            foreign_dir: Some(dest.clone()),
        },
    ];
    for sc in &scenarios {
        let renames = kill_at_every(strace, sc, "rename,renameat,renameat2");
        // One step commits: the swap (or the first rename) is the only rename there is.
        assert_eq!(renames, 1, "{}: {renames} renames", sc.name);
        for syscalls in ["write", "fsync", "link,linkat", "unlink,unlinkat,rmdir", "mkdir,mkdirat", "flock"] {
            kill_at_every(strace, sc, syscalls);
        }
    }
    // The single file over the sharded checkpoint replaced it as a whole: no index is left to shadow it, config and
    // foreign files stay.
    let names: Vec<String> = tree(&dest).into_keys().collect();
    assert_eq!(
        names,
        [
            "NOTES",
            "README.md",
            "adapter_model.safetensors",
            "chat_template.jinja",
            "config.json",
            "consolidated.safetensors",
            "eval/results.jsonl",
            "generation_config.json",
            "model.safetensors",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
}

#[test]
fn force_replaces_only_the_old_checkpoint_even_through_a_symlink() {
    let tmp = tempfile::tempdir().unwrap();
    let real = tmp.path().join("real");
    let o = graft(&["convert", &s(&fixture("llama/ft_a")), "-o", &s(&real), "--max-shard-size", "20KB"]);
    assert!(o.status.success(), "{}", stderr(&o));
    add_foreign_files(&real);
    let before = foreign(&real);
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();

    // Without --force: refused, naming the checkpoint (not a foreign file).
    let o = graft(&["convert", &s(&fixture("llama/ft_b")), "-o", &s(&link)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("already holds a checkpoint (model.safetensors.index.json)"), "{}", stderr(&o));

    let o = graft(&["convert", &s(&fixture("llama/ft_b")), "-o", &s(&link), "--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the symlink was replaced");
    assert_eq!(foreign(&real), before);
    let names: Vec<String> = tree(&real).into_keys().collect();
    assert_eq!(
        names,
        [
            "NOTES",
            "README.md",
            "adapter_model.safetensors",
            "chat_template.jinja",
            "config.json",
            "consolidated.safetensors",
            "eval/results.jsonl",
            "generation_config.json",
            "model.safetensors",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    assert_eq!(content(&link).unwrap(), content(&fixture("llama/ft_b")).unwrap());
    assert_eq!(leftovers(tmp.path()), Vec::<String>::new());

    // A directory of only foreign weights holds no checkpoint: written without --force, nothing lost.
    let plain = tmp.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    add_foreign_files(&plain);
    let before = foreign(&plain);
    let o = graft(&["convert", &s(&fixture("llama/ft_b")), "-o", &s(&plain)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(foreign(&plain), before);

    // A foreign file in the way of a new checkpoint's file is never overwritten, even with --force.
    let blocked = tmp.path().join("blocked");
    std::fs::create_dir(&blocked).unwrap();
    std::fs::write(blocked.join("model-00001-of-00003.safetensors"), "mine").unwrap();
    let o = graft(&["convert", &s(&fixture("llama/ft_b")), "-o", &s(&blocked), "--max-shard-size", "20KB", "--force"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("model-00001-of-00003.safetensors: is not part of the checkpoint"), "{}", stderr(&o));
    assert_eq!(std::fs::read(blocked.join("model-00001-of-00003.safetensors")).unwrap(), b"mine");
}

#[test]
fn a_single_file_beside_a_sharded_checkpoint_is_refused_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    let o = graft(&["convert", &s(&fixture("llama/ft_a")), "-o", &s(&dir), "--max-shard-size", "20KB"]);
    assert!(o.status.success());
    let before = tree(&dir);
    let o = graft(&["convert", &s(&fixture("llama/ft_b")), "-o", &s(&dir.join("model.safetensors"))]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.contains("s/model.safetensors") && e.contains("holds a sharded checkpoint"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    // Writing over one of its shards is refused even with --force.
    let o = graft(&[
        "convert",
        &s(&fixture("mlp/base")),
        "-o",
        &s(&dir.join("model-00002-of-00003.safetensors")),
        "--force",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("is a shard of the sharded checkpoint"), "{}", stderr(&o));
    assert_eq!(tree(&dir), before);
}

#[test]
fn a_directory_with_one_oddly_named_shard_is_not_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(fixture("mlp/base/model.safetensors"), dir.join("model-00001-of-00002.safetensors")).unwrap();
    let e = Checkpoint::open(&dir).unwrap_err().to_string();
    assert!(
        e.contains(
            "holds model-00001-of-00002.safetensors but neither model.safetensors nor model.safetensors.index.json"
        ),
        "{e}"
    );
    let o = graft(&["inspect", &s(&dir)]);
    assert_eq!(o.status.code(), Some(1));
    // The file itself still opens.
    assert!(Checkpoint::open(dir.join("model-00001-of-00002.safetensors")).is_ok());
}

#[test]
fn a_second_writer_is_refused_naming_the_holder_and_its_temporaries_are_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    // This test process plays the live writer: it holds the lock, and its temporary carries a PID that exists in no
    // namespace here (a container's writer): liveness is the lock, not the PID.
    let lock = graft::checkpoint::commit::OutputLock::acquire(tmp.path(), &"out".into(), Path::new("out")).unwrap();
    let live_temp = tmp.path().join(".out.graft-tmp-99999999-1-0");
    std::fs::create_dir(&live_temp).unwrap();
    let o = graft(&["convert", &s(&fixture("mlp/base")), "-o", &s(&out)]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("another graft run is writing this output") && e.contains(&format!("pid {}", std::process::id())),
        "{e}"
    );
    assert!(live_temp.exists(), "a live writer's temporary was swept");
    assert!(!out.exists());
    drop(lock);
    // Once the holder is gone its temporary is dead, and the next writer sweeps it.
    let o = graft(&["convert", &s(&fixture("mlp/base")), "-o", &s(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(leftovers(tmp.path()), Vec::<String>::new());
}

#[test]
fn racing_writers_one_wins_the_others_are_refused_and_readers_see_whole_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("out");
    let old = content(&fixture("llama/ft_a")).unwrap();
    let new = content(&fixture("llama/ft_b")).unwrap();
    for round in 0..6 {
        if dest.exists() {
            std::fs::remove_dir_all(&dest).unwrap();
        }
        let o = graft(&["convert", &s(&fixture("llama/ft_a")), "-o", &s(&dest), "--max-shard-size", "20KB"]);
        assert!(o.status.success());
        add_foreign_files(&dest);
        let before = foreign(&dest);
        let done = std::sync::atomic::AtomicBool::new(false);
        let (outcomes, seen) = std::thread::scope(|scope| {
            let reader = scope.spawn(|| {
                let mut seen = (0usize, 0usize);
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let c = content(&dest).unwrap_or_else(|e| panic!("round {round}: a reader failed: {e}"));
                    if c == old {
                        seen.0 += 1;
                    } else {
                        assert!(c == new, "round {round}: a reader saw a mix of two checkpoints");
                        seen.1 += 1;
                    }
                }
                seen
            });
            let writers: Vec<_> = (0..3)
                .map(|k| {
                    let dest = &dest;
                    scope.spawn(move || {
                        // Sharded and single-file writers into the same directory contend for the same lock.
                        if k == 1 {
                            let target = dest.join("model.safetensors");
                            graft(&["convert", &s(&fixture("llama/ft_b")), "-o", &s(&target), "--force"])
                        } else {
                            let args = ["--force", "--max-shard-size", "12KB"];
                            graft(&[&["convert", &s(&fixture("llama/ft_b")), "-o", &s(dest)][..], &args].concat())
                        }
                    })
                })
                .collect();
            let outcomes: Vec<Output> = writers.into_iter().map(|w| w.join().unwrap()).collect();
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            (outcomes, reader.join().unwrap())
        });
        let won = outcomes.iter().filter(|o| o.status.success()).count();
        assert!(won >= 1, "round {round}: no writer succeeded");
        for o in outcomes.iter().filter(|o| !o.status.success()) {
            assert_eq!(o.status.code(), Some(1), "round {round}: {}", stderr(o));
            assert!(stderr(o).contains("another graft run is writing this output"), "round {round}: {}", stderr(o));
        }
        assert_eq!(content(&dest).unwrap(), new);
        let has_index = dest.join("model.safetensors.index.json").exists();
        let has_single = dest.join("model.safetensors").exists();
        assert!(has_index != has_single, "round {round}: two checkpoints in one directory");
        assert_eq!(foreign(&dest), before, "round {round}");
        assert_eq!(leftovers(tmp.path()), Vec::<String>::new(), "round {round}");
        eprintln!("round {round}: {won} of 3 writers won; reader saw old {} times, new {} times", seen.0, seen.1);
    }
}

/// Writes a checkpoint of `mib` MiB of f32 (two tensors), for runs that must take a moment.
fn big_checkpoint(dir: &Path, mib: usize) {
    let n = mib * (1 << 20) / 8;
    let decls = vec![TensorDecl::new("a", Dtype::F32, vec![n]), TensorDecl::new("b", Dtype::F32, vec![n])];
    let mut w = CheckpointWriter::create(dir, decls, WriterOptions::default()).unwrap();
    let values: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 0.001).collect();
    w.write_f32("a", &values).unwrap();
    w.write_f32("b", &values).unwrap();
    w.finish().unwrap();
}

#[test]
fn sigint_and_sigterm_remove_every_temporary_and_exit_130_and_143() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("big");
    big_checkpoint(&src, 256);
    let out_parent = tmp.path().join("o");
    std::fs::create_dir(&out_parent).unwrap();
    for (sig, code) in [(libc_sig::SIGINT, 130), (libc_sig::SIGTERM, 143)] {
        let out = out_parent.join("out");
        let mut tries = 0;
        loop {
            tries += 1;
            let mut child = crate::support::command(&[])
                .args(["convert", &s(&src), "-o", &s(&out), "--dtype", "bf16", "--max-shard-size", "100MB"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            // Mid-write: once the first shard is being written inside the hidden staging directory.
            let started = std::time::Instant::now();
            let mut signalled = false;
            while started.elapsed() < std::time::Duration::from_secs(60) {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                let staging = std::fs::read_dir(&out_parent)
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(".out.graft-tmp-"));
                if staging.is_some_and(|d| std::fs::read_dir(d).is_ok_and(|mut r| r.next().is_some())) {
                    std::process::Command::new("kill")
                        .arg(format!("-{sig}"))
                        .arg(child.id().to_string())
                        .status()
                        .unwrap();
                    signalled = true;
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let status = child.wait().unwrap();
            if !signalled {
                assert!(tries < 3, "graft finished before it could be signalled, {tries} times");
                std::fs::remove_dir_all(&out).unwrap();
                continue;
            }
            assert_eq!(status.code(), Some(code), "signal {sig}");
            assert!(!out.exists(), "signal {sig}: a partial output appeared");
            assert_eq!(leftovers(&out_parent), Vec::<String>::new(), "signal {sig}");
            break;
        }
    }
}

mod libc_sig {
    pub const SIGINT: i32 = 2;
    pub const SIGTERM: i32 = 15;
}

/// A small tmpfs mounted for the test, unmounted on drop; None (with a printed reason) where mounting is refused.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, kib: usize) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs", &s(at)])
            .output()
            .ok()?;
        if !o.status.success() {
            eprintln!("SKIPPED: cannot mount a tmpfs here ({})", stderr(&o).trim());
            return None;
        }
        Some(Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_is_one_line_naming_the_output_and_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    // The output needs about 70 KB (6 shards, an index, config.json) plus what was there before (8 KB): every size
    // from too small for anything to enough runs out of space at another step.
    let mut failed_files = std::collections::BTreeSet::new();
    for (failures, kib) in (8..=120).step_by(4).enumerate() {
        let Some(fs) = Tmpfs::mount(&mnt, kib) else { return };
        std::fs::write(mnt.join("keep.txt"), vec![b'k'; 4000]).unwrap();
        let before = tree(&mnt);
        let out = mnt.join("out");
        let o = graft(&["convert", &s(&fixture("llama/ft_a")), "-o", &s(&out), "--max-shard-size", "12KB"]);
        if o.status.success() {
            assert_eq!(content(&out).unwrap(), content(&fixture("llama/ft_a")).unwrap());
            drop(fs);
            assert!(failures > 3, "only {failures} sizes ran out of space");
            // tmpfs counts whole pages, so each file of the output was the one to run out at some size.
            for f in ["model-00001-of-00006.safetensors", "model.safetensors.index.json", "config.json"] {
                assert!(failed_files.contains(f), "no size ran out while writing {f}: {failed_files:?}");
            }
            return;
        }
        let e = stderr(&o);
        eprintln!("{kib} KiB: {}", e.trim());
        assert_eq!(o.status.code(), Some(1), "{kib} KiB: {e}");
        assert_eq!(e.lines().count(), 1, "{kib} KiB: {e}");
        assert!(e.starts_with(&format!("graft: error: {}", s(&out))), "{kib} KiB: does not name the output: {e}");
        assert!(e.contains("No space left on device"), "{kib} KiB: {e}");
        let file = e.strip_prefix(&format!("graft: error: {}/", s(&out))).and_then(|r| r.split(':').next());
        failed_files.extend(file.map(str::to_string));
        assert_eq!(tree(&mnt), before, "{kib} KiB: the failed run left files behind");
        assert_eq!(leftovers(&mnt), Vec::<String>::new(), "{kib} KiB");
        drop(fs);
    }
    panic!("the output never fit");
}

/// A safetensors file holding zero-element tensors, laid out as the reference library writes it.
fn zero_element_file(path: &Path) {
    let header = r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"e":{"dtype":"F32","shape":[0,4],"data_offsets":[16,16]},"b":{"dtype":"BF16","shape":[3],"data_offsets":[16,22]},"z":{"dtype":"F16","shape":[4,0],"data_offsets":[22,22]}}"#;
    let mut h = header.as_bytes().to_vec();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend(h);
    for v in [1.0f32, 2.0, 3.0, 4.0] {
        bytes.extend(v.to_le_bytes());
    }
    bytes.extend([0x80, 0x3f, 0x00, 0x40, 0x40, 0x40]); // bf16 1.0, 2.0, 3.0
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn zero_element_tensors_round_trip_through_convert_and_inspect() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("z.safetensors");
    zero_element_file(&src);
    let original = content(&src).unwrap();
    assert_eq!(original["e"].1, vec![0, 4]);
    for (name, extra) in [("single.safetensors", &[][..]), ("sharded", &["--max-shard-size", "8"][..])] {
        let out = tmp.path().join(name);
        let (src_arg, out_arg) = (s(&src), s(&out));
        let mut args = vec!["convert", src_arg.as_str(), "-o", out_arg.as_str()];
        args.extend(extra);
        let o = graft(&args);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        assert_eq!(content(&out).unwrap(), original, "{name}");
        let o = graft(&["inspect", &s(&out), "--json"]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let text = v.to_string();
        assert!(text.contains("\"e\"") && text.contains("\"z\""), "{name}: {text}");
    }
    // Widened to f32: the empty tensors stay empty, the bf16 values widen exactly.
    let out = tmp.path().join("f32");
    let o = graft(&["convert", &s(&src), "-o", &s(&out), "--dtype", "f32"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let c = content(&out).unwrap();
    assert_eq!(c["e"], (Dtype::F32, vec![0, 4], vec![]));
    assert_eq!(c["z"], (Dtype::F32, vec![4, 0], vec![]));
    let b: Vec<f32> = c["b"].2.chunks(4).map(|x| f32::from_le_bytes(x.try_into().unwrap())).collect();
    assert_eq!(b, vec![1.0, 2.0, 3.0]);
}

#[test]
fn an_added_file_is_committed_with_the_checkpoint_replacing_the_carried_one() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let base = Checkpoint::open(fixture("llama/base")).unwrap();
    let decls: Vec<TensorDecl> = base.iter().map(|v| TensorDecl::new(v.name, v.dtype, v.shape.to_vec())).collect();
    let opts = WriterOptions { carry_from: Some(fixture("llama/base")), ..Default::default() };
    let mut w = CheckpointWriter::create(&out, decls, opts).unwrap();
    w.add_file("config.json", b"{\"num_hidden_layers\": 1}\n".to_vec()).unwrap();
    assert!(w.add_file("../escape", vec![]).is_err());
    for v in base.iter() {
        w.write_tensor(v.name, v.data).unwrap();
    }
    // Nothing is visible before the commit.
    assert!(!out.exists());
    w.finish().unwrap();
    assert_eq!(std::fs::read(out.join("config.json")).unwrap(), b"{\"num_hidden_layers\": 1}\n");
    assert_eq!(content(&out).unwrap(), content(&fixture("llama/base")).unwrap());
    assert_eq!(leftovers(tmp.path()), Vec::<String>::new());
}
