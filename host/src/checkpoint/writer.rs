//! Streaming safetensors writer.
//!
//! The header is written first from shapes known in advance, then tensor data in
//! header order, one tensor at a time, so memory does not grow with model size.
//! The header's bytes depend only on the plan and the metadata (metadata keys
//! sorted, tensors in plan order), so the same job always writes the same file.
//!
//! Nothing is visible at the destination until [`StreamingWriter::finish`]:
//! - on Linux the data goes to an unnamed `O_TMPFILE` in the output's directory,
//!   linked into place at the end (`linkat` through `/proc/self/fd`), so a run
//!   killed by SIGKILL or a power cut leaves no file at all;
//! - elsewhere (or where the file system lacks `O_TMPFILE`) a named
//!   `.quantsmith-*.partial` file, locked while in use, removed on drop, by
//!   [`remove_temporaries`] (the CLI calls it on SIGINT/SIGTERM/SIGHUP and on a
//!   panic), and, when a run died without either, by the next run writing into
//!   that folder ([`remove_stale`]).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use safetensors::Dtype;
use safetensors::tensor::{Metadata, TensorInfo};

/// Name prefix and suffix of this tool's temporary files.
pub const TEMP_PREFIX: &str = ".quantsmith-";
pub const TEMP_SUFFIX: &str = ".partial";

/// Test hook: when set to a path, the writer creates that file after its first
/// tensor and then waits (up to a minute), so tests can interrupt a run mid-write.
pub const PAUSE_ENV: &str = "QUANTSMITH_TEST_PAUSE_WRITER";
/// Test hook: when set, never use `O_TMPFILE` (exercises the named fallback).
pub const NO_TMPFILE_ENV: &str = "QUANTSMITH_NO_TMPFILE";

/// Named temporaries of this process, removed by [`remove_temporaries`].
static TEMPORARIES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn registry() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    TEMPORARIES.lock().unwrap_or_else(|e| e.into_inner())
}

fn register(path: &Path) {
    registry().push(path.to_path_buf());
}

fn unregister(path: &Path) {
    registry().retain(|p| p != path);
}

/// Removes every named temporary file this process is writing. For signal and
/// panic handlers: the process is about to end.
pub fn remove_temporaries() {
    for p in registry().drain(..) {
        let _ = std::fs::remove_file(&p);
    }
}

fn is_temp_name(name: &str) -> bool {
    name.starts_with(TEMP_PREFIX) && name.ends_with(TEMP_SUFFIX)
}

/// Removes this tool's temporaries in `dir` left by runs that died (SIGKILL, power
/// cut). A live run holds an exclusive `flock` on its temporary, so only orphans
/// can be locked here. Returns how many were removed.
pub fn remove_stale(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if !is_temp_name(name) || !e.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let path = e.path();
        let Ok(f) = File::open(&path) else { continue };
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            continue;
        }
        if std::fs::remove_file(&path).is_ok() {
            tracing::info!("removed {} left by an interrupted run", path.display());
            removed += 1;
        }
    }
    removed
}

/// Shape and dtype of a tensor to be written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl PlannedTensor {
    pub fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// The temporary file: unnamed (Linux `O_TMPFILE`) or named and registered.
enum Temp {
    Unnamed,
    Named(PathBuf),
}

pub struct StreamingWriter {
    dest: PathBuf,
    dir: PathBuf,
    file: Option<BufWriter<File>>,
    temp: Temp,
    planned: Vec<PlannedTensor>,
    next: usize,
    written: u64,
    pause: Option<PathBuf>,
}

/// The header bytes (length prefix excluded): `__metadata__` with sorted keys, then
/// the tensors in plan order, padded with spaces to 8 bytes as the reference writer does.
/// The largest header safetensors readers load.
pub const MAX_HEADER_BYTES: usize = 100_000_000;

pub fn header_bytes(planned: &[PlannedTensor], metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let mut offset = 0usize;
    let mut infos = Vec::with_capacity(planned.len());
    for t in planned {
        let len = t.byte_len();
        infos.push((t.name.clone(), TensorInfo { dtype: t.dtype, shape: t.shape.clone(), data_offsets: (offset, offset + len) }));
        offset += len;
    }
    // safetensors' own checks (offsets, duplicate names), on its unordered form.
    let unordered: HashMap<String, String> = metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    Metadata::new(if unordered.is_empty() { None } else { Some(unordered) }, infos.clone())
        .map_err(|e| anyhow::anyhow!("invalid output header: {e}"))?;
    let mut names = std::collections::HashSet::with_capacity(infos.len());
    if let Some((dup, _)) = infos.iter().find(|(n, _)| !names.insert(n.as_str())) {
        bail!("invalid output header: tensor {dup} is planned twice");
    }
    let mut root = serde_json::Map::new();
    if !metadata.is_empty() {
        root.insert("__metadata__".into(), serde_json::to_value(metadata)?);
    }
    for (name, info) in infos {
        root.insert(name, serde_json::to_value(&info)?);
    }
    let mut header = serde_json::to_vec(&root)?;
    let pad = (8 - header.len() % 8) % 8;
    header.extend(std::iter::repeat_n(b' ', pad));
    // safetensors readers (ComfyUI's included) refuse larger headers.
    if header.len() > MAX_HEADER_BYTES {
        return Err(crate::error::Refused(format!(
            "the output's header would be {} bytes, over the {MAX_HEADER_BYTES} safetensors readers accept (too many tensors or too long names or metadata)",
            header.len()
        ))
        .into());
    }
    Ok(header)
}

/// An unnamed file in `dir`, when the kernel, the file system and `/proc` allow linking it later.
fn unnamed_in(dir: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    if std::env::var_os(NO_TMPFILE_ENV).is_some() || !Path::new("/proc/self/fd").is_dir() {
        return None;
    }
    #[cfg(target_os = "linux")]
    {
        std::fs::OpenOptions::new().read(true).write(true).mode(0o666).custom_flags(libc::O_TMPFILE).open(dir).ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = dir;
        None
    }
}

/// A fresh unused name for a temporary in `dir`.
fn temp_name(dir: &Path) -> PathBuf {
    dir.join(format!("{TEMP_PREFIX}{:016x}{TEMP_SUFFIX}", rand::random::<u64>()))
}

impl StreamingWriter {
    /// Creates the temporary file in `dest`'s directory and writes the header.
    pub fn create(dest: &Path, planned: Vec<PlannedTensor>, metadata: HashMap<String, String>) -> Result<StreamingWriter> {
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let metadata: BTreeMap<String, String> = metadata.into_iter().collect();
        let header = header_bytes(&planned, &metadata)?;
        remove_stale(&dir);
        let (file, temp) = match unnamed_in(&dir) {
            Some(f) => (f, Temp::Unnamed),
            None => {
                let tmp = tempfile::Builder::new()
                    .prefix(TEMP_PREFIX)
                    .suffix(TEMP_SUFFIX)
                    .tempfile_in(&dir)
                    .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
                let (file, path) =
                    tmp.keep().map_err(|e| anyhow::anyhow!("cannot create a temporary file in {}: {}", dir.display(), e.error))?;
                register(&path);
                // SAFETY: flock on a descriptor we own; marks the file as in use for remove_stale.
                unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
                (file, Temp::Named(path))
            }
        };
        let mut w = StreamingWriter {
            dest: dest.to_path_buf(),
            dir,
            file: Some(BufWriter::with_capacity(8 << 20, file)),
            temp,
            planned,
            next: 0,
            written: 0,
            pause: std::env::var_os(PAUSE_ENV).map(PathBuf::from),
        };
        let write_err = || format!("cannot write {}", dest.display());
        let f = w.file.as_mut().expect("open");
        f.write_all(&(header.len() as u64).to_le_bytes()).with_context(write_err)?;
        f.write_all(&header).with_context(write_err)?;
        Ok(w)
    }

    /// The next tensor to be written, if any.
    pub fn next_tensor(&self) -> Option<&PlannedTensor> {
        self.planned.get(self.next)
    }

    /// Writes the next tensor's bytes; names and lengths must follow the plan.
    pub fn write(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let Some(t) = self.planned.get(self.next) else { bail!("internal: tensor {name} written past the end of the plan") };
        if t.name != name || t.byte_len() != data.len() {
            bail!("internal: expected tensor {} ({} bytes), got {name} ({} bytes)", t.name, t.byte_len(), data.len());
        }
        let f = self.file.as_mut().expect("open until finish");
        f.write_all(data).with_context(|| format!("cannot write {} (disk full?)", self.dest.display()))?;
        self.next += 1;
        self.written += data.len() as u64;
        if let Some(marker) = self.pause.take() {
            let _ = f.flush();
            let _ = std::fs::write(&marker, b"paused");
            std::thread::sleep(std::time::Duration::from_secs(60));
        }
        Ok(())
    }

    /// Bytes of tensor data written so far.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Flushes, syncs and moves the file into place at the destination.
    pub fn finish(mut self) -> Result<()> {
        if self.next != self.planned.len() {
            bail!("internal: {} of {} tensors written", self.next, self.planned.len());
        }
        let dest = self.dest.clone();
        let file = self
            .file
            .take()
            .expect("open until finish")
            .into_inner()
            .map_err(|e| anyhow::anyhow!("cannot write {}: {}", dest.display(), e.error()))?;
        file.sync_all().with_context(|| format!("cannot sync {}", dest.display()))?;
        match &self.temp {
            Temp::Unnamed => {
                let fd_path = format!("/proc/self/fd/{}", file.as_raw_fd());
                match link(Path::new(&fd_path), &dest) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        // Replacing a file: link under a temporary name, then rename over it (atomic).
                        let mut attempt = 0;
                        let named = loop {
                            let candidate = temp_name(&self.dir);
                            register(&candidate);
                            match link(Path::new(&fd_path), &candidate) {
                                Ok(()) => break candidate,
                                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 8 => {
                                    unregister(&candidate);
                                    attempt += 1;
                                }
                                Err(e) => {
                                    unregister(&candidate);
                                    return Err(e).with_context(|| format!("cannot move the output into place at {}", dest.display()));
                                }
                            }
                        };
                        let renamed = std::fs::rename(&named, &dest);
                        if renamed.is_err() {
                            let _ = std::fs::remove_file(&named);
                        }
                        unregister(&named);
                        renamed.with_context(|| format!("cannot move the output into place at {}", dest.display()))?;
                    }
                    Err(e) => return Err(e).with_context(|| format!("cannot move the output into place at {}", dest.display())),
                }
            }
            Temp::Named(path) => {
                let path = path.clone();
                {
                    // Temporary files are private (0600); the result is an ordinary file.
                    use std::os::unix::fs::PermissionsExt;
                    let _ = file.set_permissions(std::fs::Permissions::from_mode(0o644));
                }
                std::fs::rename(&path, &dest).with_context(|| format!("cannot move the output into place at {}", dest.display()))?;
                unregister(&path);
                self.temp = Temp::Unnamed;
            }
        }
        // The new directory entry survives a power cut too.
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

impl Drop for StreamingWriter {
    fn drop(&mut self) {
        if let Temp::Named(path) = &self.temp {
            let _ = std::fs::remove_file(path);
            unregister(path);
        }
    }
}

/// `linkat(2)` following the `/proc/self/fd` magic link to the open file.
fn link(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let from = std::ffi::CString::new(from.as_os_str().as_bytes())?;
    let to = std::ffi::CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: two NUL-terminated paths that live across the call.
    let r = unsafe { libc::linkat(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::AT_SYMLINK_FOLLOW) };
    if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, shape: &[usize]) -> PlannedTensor {
        PlannedTensor { name: name.into(), dtype: Dtype::F32, shape: shape.to_vec() }
    }

    /// The header is a function of its inputs: metadata sorted by key, tensors in plan order.
    #[test]
    fn a_header_over_the_safetensors_limit_is_refused() {
        let meta: BTreeMap<String, String> = [("huge".to_string(), "x".repeat(MAX_HEADER_BYTES))].into_iter().collect();
        let err = header_bytes(&[t("a", &[2])], &meta).unwrap_err();
        assert!(err.is::<crate::error::Refused>(), "{err:#}");
        assert!(format!("{err:#}").contains("safetensors readers accept"), "{err:#}");
        let small: BTreeMap<String, String> = [("k".to_string(), "v".repeat(1000))].into_iter().collect();
        assert!(header_bytes(&[t("a", &[2])], &small).is_ok());
    }

    #[test]
    fn header_bytes_are_ordered() {
        let meta: BTreeMap<String, String> =
            [("b", "2"), ("a", "1"), ("c", "3")].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let h = header_bytes(&[t("z", &[0]), t("y", &[0]), t("x", &[2])], &meta).unwrap();
        let text = String::from_utf8(h).unwrap();
        assert!(
            text.starts_with(r#"{"__metadata__":{"a":"1","b":"2","c":"3"},"z":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"y":"#),
            "{text}"
        );
        assert_eq!(text.len() % 8, 0);
        assert!(header_bytes(&[t("x", &[1]), t("x", &[1])], &meta).unwrap_err().to_string().contains("twice"));
    }

    fn partials(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).filter(|n| is_temp_name(n)).collect()
    }

    /// Replacing an existing file, with no temporary visible before or after.
    #[test]
    fn unnamed_temporary_replaces_the_destination() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.safetensors");
        std::fs::write(&dest, b"old").unwrap();
        let mut w = StreamingWriter::create(&dest, vec![t("x", &[2])], HashMap::new()).unwrap();
        w.write("x", &[0u8; 8]).unwrap();
        assert!(partials(dir.path()).is_empty() || !matches!(w.temp, Temp::Unnamed), "an O_TMPFILE has no name");
        w.finish().unwrap();
        let st = safetensors::SafeTensors::deserialize(&std::fs::read(&dest).unwrap()).unwrap().names().len();
        assert_eq!(st, 1);
        assert!(partials(dir.path()).is_empty());
    }

    /// An orphaned temporary is removed by the next writer; a live (locked) one is kept.
    #[test]
    fn stale_temporaries_are_removed_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let orphan = dir.path().join(".quantsmith-dead.partial");
        std::fs::write(&orphan, b"junk").unwrap();
        let live = dir.path().join(".quantsmith-live.partial");
        let f = File::create(&live).unwrap();
        assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
        let other = dir.path().join("keep.partial");
        std::fs::write(&other, b"not ours").unwrap();
        let dest = dir.path().join("out.safetensors");
        let mut w = StreamingWriter::create(&dest, vec![t("x", &[1])], HashMap::new()).unwrap();
        w.write("x", &[0u8; 4]).unwrap();
        w.finish().unwrap();
        assert!(!orphan.exists() && live.exists() && other.exists());
    }
}
