//! The output commit protocol's building blocks: unique temporaries that are removed on SIGINT/SIGTERM, the
//! per-output advisory lock, the sweep of temporaries left by dead writers, the atomic directory swap, hard-link
//! carrying of foreign files, and `write_atomic` for single files (config, manifests). The checkpoint writer puts
//! them together; `docs/outputs.md` states what a reader sees at each instant.
//!
//! Naming: everything graft creates beside an output `NAME` in its parent directory starts with `.NAME.graft-`:
//! `.NAME.graft-lock` (the lock file), `.NAME.graft-tmp-…` (a checkpoint or file being written, or an old
//! checkpoint being deleted) and `.NAME.graft-old-…` (an old checkpoint moved aside where the directory swap is
//! refused). Only the holder of `NAME`'s lock creates the last two, so whoever holds the lock may remove any it
//! did not create: their writer is dead. Liveness is decided by the lock, never by a PID (PIDs differ across PID
//! namespaces: a container writing to the same volume).

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::error::{Error, Result};

// ---- live temporaries, removed when the process is interrupted ---------------------------------------------------

/// What to undo for one live temporary if the process is interrupted.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Undo {
    /// A temporary file or directory: remove it (recursively).
    Remove(PathBuf),
    /// An old checkpoint moved aside (the rename fallback): move it back to its place if that is empty.
    Restore { from: PathBuf, to: PathBuf },
    /// A lock file held through descriptor `fd`: remove it if no one else holds it.
    Unlock { path: PathBuf, fd: i32 },
}

static LIVE: Mutex<Vec<(u64, Undo)>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A registration in the interrupt-cleanup list; dropping it unregisters (the owner has committed or cleaned up).
#[derive(Debug)]
pub struct Registration(u64);

impl Drop for Registration {
    fn drop(&mut self) {
        let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|(id, _)| *id != self.0);
    }
}

/// Runs `create` while holding the cleanup list, with `path` registered for removal: an interrupt cannot fall
/// between creating a temporary and registering it (the signal thread waits for the list).
fn create_registered<T>(
    path: &Path,
    create: impl FnOnce() -> std::io::Result<T>,
) -> std::io::Result<(T, Registration)> {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    let made = create()?;
    live.push((id, Undo::Remove(path.to_path_buf())));
    Ok((made, Registration(id)))
}

fn undo_all() {
    let live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    for (_, undo) in live.iter().rev() {
        match undo {
            Undo::Remove(p) => remove_any(p),
            Undo::Restore { from, to } => {
                if std::fs::symlink_metadata(to).is_err() {
                    let _ = std::fs::rename(from, to);
                }
            }
            #[cfg(unix)]
            Undo::Unlock { path, fd } => {
                // SAFETY: the descriptor belongs to a live OutputLock (it unregisters before closing it).
                if unsafe { libc::flock(*fd, libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                    let _ = std::fs::remove_file(path);
                }
            }
            #[cfg(not(unix))]
            Undo::Unlock { .. } => {}
        }
    }
    // The list stays locked: no new temporary can appear between the cleanup and the exit.
    std::mem::forget(live);
}

fn remove_any(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            // A writer thread may still be creating files inside: retry a few times until the directory is gone.
            for _ in 0..5 {
                if std::fs::remove_dir_all(p).is_ok() || !p.exists() {
                    break;
                }
            }
        }
        Ok(_) => {
            let _ = std::fs::remove_file(p);
        }
        Err(_) => {}
    }
}

#[cfg(unix)]
static SIGNAL_PIPE_WRITE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

#[cfg(unix)]
extern "C" fn on_signal(sig: libc::c_int) {
    // Only async-signal-safe work here: hand the signal number to the cleanup thread.
    let fd = SIGNAL_PIPE_WRITE.load(Ordering::Relaxed);
    let byte = sig as u8;
    // SAFETY: write(2) on a pipe is async-signal-safe; the buffer is a live local.
    unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
}

/// Makes SIGINT and SIGTERM remove every live temporary (restoring an old checkpoint moved aside) and exit with
/// 130 or 143, as a shell reports an interrupted command. Call once, first thing in `main`.
pub fn install_signal_cleanup() {
    #[cfg(unix)]
    {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 fills the two-element array it is given.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return;
        }
        SIGNAL_PIPE_WRITE.store(fds[1], Ordering::Relaxed);
        let read_fd = fds[0];
        let spawned = std::thread::Builder::new().name("graft-signals".into()).spawn(move || {
            let mut byte = 0u8;
            loop {
                // SAFETY: reads one byte into a live local from the pipe this thread owns.
                let n = unsafe { libc::read(read_fd, (&mut byte as *mut u8).cast(), 1) };
                if n == 1 {
                    break;
                }
                if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            undo_all();
            // _exit: no destructors or stdio flushing that could wait on a lock another thread holds.
            // SAFETY: ends the process; nothing runs after it.
            unsafe { libc::_exit(128 + byte as i32) };
        });
        if spawned.is_err() {
            return;
        }
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: installs a handler that only calls write(2); the sigaction struct is fully initialised.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
                action.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut action.sa_mask);
                libc::sigaction(sig, &action, std::ptr::null_mut());
            }
        }
    }
}

// ---- names -----------------------------------------------------------------------------------------------------

/// `path`'s parent directory (`.` for a bare name) and file name.
pub fn split(path: &Path) -> Result<(PathBuf, OsString)> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::usage(format!("{}: not a usable output name", path.display())))?
        .to_os_string();
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name))
}

fn prefixed(name: &OsString, kind: &str) -> String {
    format!(".{}.graft-{kind}", name.to_string_lossy())
}

/// A fresh name for a temporary beside `NAME` in `dir`: unique across processes (PID, time) and within one.
pub fn temp_path(dir: &Path, name: &OsString, kind: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!("{}-{}-{:x}-{n}", prefixed(name, kind), std::process::id(), nanos as u64))
}

/// Whether `file_name` is something graft creates beside an output (lock, temporary, moved-aside old checkpoint):
/// never part of a checkpoint, never carried into a new one.
pub fn is_graft_temporary(file_name: &str) -> bool {
    file_name.starts_with('.')
        && (file_name.contains(".graft-tmp-")
            || file_name.contains(".graft-old-")
            || file_name.ends_with(".graft-lock"))
}

// ---- the per-output lock -----------------------------------------------------------------------------------------

/// An advisory lock (`flock`) on `.NAME.graft-lock` beside the output `NAME`. Writers of `NAME` hold it
/// exclusively; the file then holds the holder's PID and command line, for the refusal message of a second writer.
/// Single-file writers hold their directory's lock shared, which keeps a writer of the whole directory out while
/// they run, but not each other. Dropping it removes the file when no one else holds it, and unlocks.
#[derive(Debug)]
pub struct OutputLock {
    // Unregistered before the descriptor closes (fields drop in order).
    _registration: Registration,
    path: PathBuf,
    file: File,
}

impl OutputLock {
    /// Takes the lock of output `dir/name` exclusively or refuses at once, naming the holder. `shown` is the
    /// output as the user wrote it, for messages.
    pub fn acquire(dir: &Path, name: &OsString, shown: &Path) -> Result<OutputLock> {
        Self::take(dir, name, shown, true)
    }

    /// Takes the lock of directory `dir/name` shared, for writing one file inside it: refused while a writer of
    /// the whole directory runs. Whoever takes it when no one else holds it sweeps the directory writers' dead
    /// temporaries first. None where the lock file cannot be created (a read-only parent: then no directory
    /// writer can work there either).
    pub fn acquire_shared(dir: &Path, name: &OsString, shown: &Path) -> Result<Option<OutputLock>> {
        match Self::take(dir, name, shown, false) {
            Err(Error::Io { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
                ) =>
            {
                Ok(None)
            }
            r => r.map(Some),
        }
    }

    fn take(dir: &Path, name: &OsString, shown: &Path, exclusive: bool) -> Result<OutputLock> {
        let path = dir.join(prefixed(name, "lock"));
        for _ in 0..20 {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| Error::io(shown, e))?;
            let alone = try_flock(&file, true).map_err(|e| Error::io(&path, e))?;
            let got = alone || (!exclusive && try_flock(&file, false).map_err(|e| Error::io(&path, e))?);
            if !got {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let who = if holder.is_empty() { "another process".to_string() } else { holder.to_string() };
                return Err(Error::invalid(format!(
                    "{}: another graft run is writing this output ({who}); wait for it to finish (lock {})",
                    shown.display(),
                    path.display()
                )));
            }
            // The previous holder may have removed the file between our open and our lock: then we locked an
            // orphan, and must lock the file that is at the path now.
            if !same_file(&file, &path) {
                continue;
            }
            let registration = register_unlock(&path, &file);
            let lock = OutputLock { _registration: registration, path, file };
            if exclusive {
                let command: Vec<String> = std::env::args().collect();
                let mut f = &lock.file;
                let _ = f.set_len(0);
                let _ = f.rewind();
                let _ = f.write_all(format!("pid {}: {}", std::process::id(), command.join(" ")).as_bytes());
            } else if alone {
                sweep_dead(dir, name, &lock);
                if !try_flock(&lock.file, false).map_err(|e| Error::io(&lock.path, e))? {
                    return Err(Error::invalid(format!(
                        "{}: another graft run is writing this output; wait for it to finish (lock {})",
                        shown.display(),
                        lock.path.display()
                    )));
                }
            }
            return Ok(lock);
        }
        Err(Error::invalid(format!("{}: could not take the output lock {}", shown.display(), path.display())))
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still held (and only when no one else holds it), so that a process that opened the old
        // file re-checks the path after locking and takes the new one.
        if try_flock(&self.file, true).unwrap_or(false) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(unix)]
fn register_unlock(path: &Path, file: &File) -> Registration {
    use std::os::fd::AsRawFd;
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let undo = Undo::Unlock { path: path.to_path_buf(), fd: file.as_raw_fd() };
    LIVE.lock().unwrap_or_else(|e| e.into_inner()).push((id, undo));
    Registration(id)
}

#[cfg(not(unix))]
fn register_unlock(_: &Path, _: &File) -> Registration {
    Registration(NEXT_ID.fetch_add(1, Ordering::Relaxed))
}

#[cfg(unix)]
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_: &File, path: &Path) -> bool {
    path.exists()
}

/// `flock` without blocking: Ok(false) when someone else holds a conflicting lock. Filesystems without flock
/// (some network mounts) count as unlocked: the lock is advisory.
#[cfg(unix)]
pub fn try_flock(file: &File, exclusive: bool) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    let op = if exclusive { libc::LOCK_EX } else { libc::LOCK_SH } | libc::LOCK_NB;
    // SAFETY: flock on a descriptor this File owns.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(false),
        Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => Ok(true),
        _ => Err(e),
    }
}

#[cfg(not(unix))]
pub fn try_flock(_: &File, _: bool) -> std::io::Result<bool> {
    Ok(true)
}

/// Blocking `flock`, errors ignored (the lock is advisory: a filesystem without it just loses the guarantee).
#[cfg(unix)]
pub fn flock_wait(file: &File, exclusive: bool) {
    use std::os::fd::AsRawFd;
    let op = if exclusive { libc::LOCK_EX } else { libc::LOCK_SH };
    loop {
        // SAFETY: flock on a descriptor this File owns.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0
            || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
        {
            return;
        }
    }
}

#[cfg(not(unix))]
pub fn flock_wait(_: &File, _: bool) {}

/// A reader's shared lock on a checkpoint directory (held while it opens the files): see `flock_wait`.
pub fn flock_wait_shared(file: &File) {
    flock_wait(file, false)
}

// ---- sweeping what dead writers left -------------------------------------------------------------------------------

/// Removes the temporaries of output `dir/name` that the caller, who holds its lock, did not create: their writer
/// died (SIGKILL, power loss). An old checkpoint moved aside by a writer that died before moving the new one in is
/// put back in place instead.
pub fn sweep_dead(dir: &Path, name: &OsString, _lock: &OutputLock) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    let tmp = prefixed(name, "tmp-");
    let old = prefixed(name, "old-");
    let target = dir.join(name);
    for entry in rd.flatten() {
        let n = entry.file_name().to_string_lossy().to_string();
        if n.starts_with(&old) {
            if std::fs::symlink_metadata(&target).is_err() {
                let _ = std::fs::rename(entry.path(), &target);
            } else {
                remove_any(&entry.path());
            }
        } else if n.starts_with(&tmp) {
            remove_any(&entry.path());
        }
    }
}

// ---- building and committing -------------------------------------------------------------------------------------

/// A temporary directory beside an output, registered for removal on interrupt; removed on drop unless kept.
#[derive(Debug)]
pub struct TempDir {
    pub path: PathBuf,
    registration: Option<Registration>,
}

impl TempDir {
    pub fn create(dir: &Path, name: &OsString) -> std::io::Result<TempDir> {
        let path = temp_path(dir, name, "tmp");
        let ((), reg) = create_registered(&path, || std::fs::create_dir(&path))?;
        Ok(TempDir { path, registration: Some(reg) })
    }

    /// The directory was moved into place: nothing to remove any more.
    pub fn committed(mut self) {
        self.registration.take();
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.registration.take().is_some() {
            remove_any(&self.path);
        }
    }
}

/// A temporary file, registered for removal on interrupt; removed on drop unless renamed into place by `commit`.
#[derive(Debug)]
pub struct TempFile {
    pub path: PathBuf,
    registration: Option<Registration>,
}

impl TempFile {
    pub fn create(dir: &Path, name: &OsString) -> std::io::Result<(TempFile, File)> {
        let path = temp_path(dir, name, "tmp");
        let (file, reg) =
            create_registered(&path, || std::fs::OpenOptions::new().write(true).create_new(true).open(&path))?;
        Ok((TempFile { path, registration: Some(reg) }, file))
    }

    /// Renames the (already synced) temporary over `to` and syncs the directory.
    pub fn commit(mut self, to: &Path) -> std::io::Result<()> {
        std::fs::rename(&self.path, to)?;
        self.registration.take();
        sync_parent(to);
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.registration.take().is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Writes `bytes` to `path` so that `path` holds either its old content or all of `bytes`, whatever happens:
/// a unique temporary beside it, written and synced, renamed over it, the directory synced. Any failure (ENOSPC
/// included) is one error naming `path`, and leaves no temporary behind.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let (dir, name) = split(path)?;
    let (tmp, mut file) = TempFile::create(&dir, &name).map_err(|e| Error::io(path, e))?;
    file.write_all(bytes).and_then(|_| file.sync_all()).map_err(|e| Error::io(path, e))?;
    drop(file);
    tmp.commit(path).map_err(|e| Error::io(path, e))
}

/// Copies `from` into the new file `to` and syncs it. Errors are the caller's to attribute (they name the output).
pub fn copy_synced(from: &Path, to: &Path) -> std::io::Result<()> {
    let mut src = File::open(from)?;
    let mut dst = std::fs::OpenOptions::new().write(true).create_new(true).open(to)?;
    std::io::copy(&mut src, &mut dst)?;
    dst.sync_all()
}

/// Syncs the directory holding `path`, so that a rename into it survives a power loss. Best effort.
pub fn sync_parent(path: &Path) {
    if let Ok((dir, _)) = split(path) {
        sync_dir(&dir);
    }
}

pub fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// How `exchange` swapped the two directories.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Swap {
    /// One atomic `renameat2(RENAME_EXCHANGE)`: the path named the old directory, then the new one.
    Atomic,
    /// The filesystem refused the exchange: the old directory was renamed aside, then the new one into place. In
    /// between the path did not exist (never half of each); a crash there leaves the old checkpoint beside it as
    /// `.NAME.graft-old-…`, which the next writer puts back.
    RenamedAside,
}

/// Swaps the new directory `new` into `target`'s place; afterwards `new` names the old directory. Both are
/// siblings, so on one filesystem.
pub fn exchange(new: &Path, target: &Path) -> std::io::Result<Swap> {
    match renameat2_exchange(new, target) {
        Ok(()) => Ok(Swap::Atomic),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)) => {
            swap_by_renames(new, target)
        }
        Err(e) => Err(e),
    }
}

/// The fallback of `exchange`: the old directory aside, the new one in, the old one to `new`'s name.
fn swap_by_renames(new: &Path, target: &Path) -> std::io::Result<Swap> {
    let (dir, name) = split(target).map_err(|e| std::io::Error::other(e.to_string()))?;
    let aside = temp_path(&dir, &name, "old");
    let _restore = {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
        std::fs::rename(target, &aside)?;
        live.push((id, Undo::Restore { from: aside.clone(), to: target.to_path_buf() }));
        Registration(id)
    };
    if let Err(e) = std::fs::rename(new, target) {
        let _ = std::fs::rename(&aside, target);
        return Err(e);
    }
    std::fs::rename(&aside, new)?;
    Ok(Swap::RenamedAside)
}

#[cfg(target_os = "linux")]
fn renameat2_exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let ca = std::ffi::CString::new(a.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let cb = std::ffi::CString::new(b.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: two NUL-terminated paths relative to the working directory.
    let r = unsafe { libc::renameat2(libc::AT_FDCWD, ca.as_ptr(), libc::AT_FDCWD, cb.as_ptr(), libc::RENAME_EXCHANGE) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn renameat2_exchange(_: &Path, _: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from_raw_os_error(libc::EINVAL))
}

/// Recreates `src`'s entry `name` inside `dst` without copying data where possible: files are hard-linked (copied
/// where the filesystem refuses links), directories recreated and filled the same way, symlinks recreated. The
/// original stays untouched, so a crash at any point loses nothing.
pub fn link_into(src: &Path, dst: &Path) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(src)?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        #[cfg(unix)]
        return std::os::unix::fs::symlink(std::fs::read_link(src)?, dst);
        #[cfg(not(unix))]
        return std::fs::copy(src, dst).map(drop);
    }
    if ft.is_dir() {
        std::fs::create_dir(dst)?;
        std::fs::set_permissions(dst, meta.permissions())?;
        for entry in std::fs::read_dir(src)? {
            let entry = entry?;
            link_into(&entry.path(), &dst.join(entry.file_name()))?;
        }
        return Ok(());
    }
    if !ft.is_file() {
        return Err(std::io::Error::other(format!("{}: not a regular file, directory or symlink", src.display())));
    }
    match std::fs::hard_link(src, dst) {
        Ok(()) => Ok(()),
        Err(_) => std::fs::copy(src, dst).map(drop),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_and_leaves_no_temporary() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("config.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![OsString::from("config.json")]);
    }

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_and_freed_on_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let name = OsString::from("out");
        let first = OutputLock::acquire(tmp.path(), &name, Path::new("out")).unwrap();
        let e = OutputLock::acquire(tmp.path(), &name, Path::new("out")).unwrap_err().to_string();
        assert!(e.contains("another graft run is writing this output (pid "), "{e}");
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        drop(first);
        assert!(!tmp.path().join(".out.graft-lock").exists());
        OutputLock::acquire(tmp.path(), &name, Path::new("out")).unwrap();
    }

    #[test]
    fn exchange_swaps_two_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        std::fs::write(a.join("new"), "").unwrap();
        std::fs::write(b.join("old"), "").unwrap();
        assert_eq!(exchange(&a, &b).unwrap(), Swap::Atomic);
        assert!(b.join("new").exists() && a.join("old").exists());
    }

    #[test]
    fn the_rename_fallback_swaps_too_and_leaves_nothing_aside() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        std::fs::write(a.join("new"), "").unwrap();
        std::fs::write(b.join("old"), "").unwrap();
        assert_eq!(swap_by_renames(&a, &b).unwrap(), Swap::RenamedAside);
        assert!(b.join("new").exists() && a.join("old").exists());
        let mut names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, vec![OsString::from("a"), OsString::from("b")]);
    }

    #[test]
    fn graft_temporaries_are_recognised() {
        assert!(is_graft_temporary(".out.graft-tmp-12-ab-0"));
        assert!(is_graft_temporary(".out.graft-lock"));
        assert!(is_graft_temporary(".out.graft-old-1-2-3"));
        assert!(!is_graft_temporary("out.graft-tmp-1"));
        assert!(!is_graft_temporary("model.safetensors"));
    }
}
