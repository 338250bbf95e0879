//! Streaming safetensors writer.
//!
//! The header is written first from shapes known in advance, then tensor data in
//! header order, one tensor at a time, so memory does not grow with model size.
//! Everything goes to a temporary file in the output's directory, renamed over the
//! destination only by [`StreamingWriter::finish`]: an error, a panic or a full
//! disk leaves no partial output behind (the temporary file is removed on drop).

use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use safetensors::Dtype;
use safetensors::tensor::{Metadata, TensorInfo};
use tempfile::NamedTempFile;

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

pub struct StreamingWriter {
    dest: PathBuf,
    file: BufWriter<NamedTempFile>,
    planned: Vec<PlannedTensor>,
    next: usize,
    written: u64,
}

impl StreamingWriter {
    /// Creates the temporary file next to `dest` and writes the header.
    pub fn create(dest: &Path, planned: Vec<PlannedTensor>, metadata: HashMap<String, String>) -> Result<StreamingWriter> {
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let tmp = tempfile::Builder::new()
            .prefix(".quantsmith-")
            .suffix(".partial")
            .tempfile_in(&dir)
            .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
        let mut offset = 0usize;
        let infos = planned
            .iter()
            .map(|t| {
                let len = t.byte_len();
                let info = TensorInfo { dtype: t.dtype, shape: t.shape.clone(), data_offsets: (offset, offset + len) };
                offset += len;
                (t.name.clone(), info)
            })
            .collect();
        let meta = Metadata::new(if metadata.is_empty() { None } else { Some(metadata) }, infos)
            .map_err(|e| anyhow::anyhow!("invalid output header: {e}"))?;
        let mut header = serde_json::to_vec(&meta)?;
        // Pad with spaces so tensor data starts 8-byte aligned, as the reference writer does.
        let pad = (8 - header.len() % 8) % 8;
        header.extend(std::iter::repeat_n(b' ', pad));
        let mut file = BufWriter::with_capacity(8 << 20, tmp);
        let write_err = || format!("cannot write {}", dest.display());
        file.write_all(&(header.len() as u64).to_le_bytes()).with_context(write_err)?;
        file.write_all(&header).with_context(write_err)?;
        Ok(StreamingWriter { dest: dest.to_path_buf(), file, planned, next: 0, written: 0 })
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
        self.file.write_all(data).with_context(|| format!("cannot write {} (disk full?)", self.dest.display()))?;
        self.next += 1;
        self.written += data.len() as u64;
        Ok(())
    }

    /// Bytes of tensor data written so far.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Flushes, syncs and renames the temporary file over the destination.
    pub fn finish(self) -> Result<()> {
        if self.next != self.planned.len() {
            bail!("internal: {} of {} tensors written", self.next, self.planned.len());
        }
        let dest = self.dest;
        let tmp = self.file.into_inner().map_err(|e| anyhow::anyhow!("cannot write {}: {}", dest.display(), e.error()))?;
        tmp.as_file().sync_all().with_context(|| format!("cannot sync {}", dest.display()))?;
        // Temporary files are private (0600); the result is an ordinary file.
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644));
        }
        tmp.persist(&dest).map_err(|e| anyhow::anyhow!("cannot move the output into place at {}: {}", dest.display(), e.error))?;
        Ok(())
    }
}
