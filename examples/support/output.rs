//! Output files that appear whole or not at all: written to a temporary file next
//! to the output (the same directory, so the rename stays on one file system) and
//! renamed into place only once complete; removed on failure, leaving whatever was
//! at the output's path untouched. An output that is not a file (`/dev/null`, a
//! pipe, a terminal) is written directly: renaming over it would replace the device.

use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind};
use std::path::PathBuf;

/// A temporary file for the output at `out`, removed when dropped uncommitted; or
/// nothing to do for an output that is not a file.
#[derive(Debug)]
pub(crate) struct Output {
    /// The temporary file and the output, for a file.
    tmp: Option<(PathBuf, PathBuf)>,
    committed: bool,
}

impl Output {
    /// Creates the temporary file for `out`, `.NAME.PID.tmp` beside it, or opens
    /// `out` itself if it exists and is not a file.
    pub(crate) fn create(out: &str) -> io::Result<(Self, File)> {
        if std::fs::metadata(out).is_ok_and(|m| !m.is_file() && !m.is_dir()) {
            let direct = Self {
                tmp: None,
                committed: false,
            };
            return Ok((direct, OpenOptions::new().write(true).open(out)?));
        }
        let out = PathBuf::from(out);
        let name = out
            .file_name()
            .ok_or_else(|| io::Error::new(ErrorKind::InvalidInput, "not a file name"))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{}.tmp", std::process::id()));
        let tmp = out.with_file_name(tmp_name);
        let file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        let output = Self {
            tmp: Some((tmp, out)),
            committed: false,
        };
        Ok((output, file))
    }

    /// Flushes the temporary file to disk and renames it to the output, replacing
    /// any file there.
    pub(crate) fn commit(mut self) -> io::Result<()> {
        if let Some((tmp, out)) = &self.tmp {
            File::open(tmp)?.sync_all()?;
            std::fs::rename(tmp, out)?;
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if let Some((tmp, _)) = self.tmp.as_ref().filter(|_| !self.committed) {
            let _ = std::fs::remove_file(tmp);
        }
    }
}
