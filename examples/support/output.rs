//! Output files that appear whole or not at all: written to a temporary file next
//! to the output (the same directory, so the rename stays on one file system) and
//! renamed into place only once complete; removed on failure, leaving whatever was
//! at the output's path untouched.

use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind};
use std::path::PathBuf;

/// A temporary file for the output at `out`, removed when dropped uncommitted.
#[derive(Debug)]
pub(crate) struct Output {
    tmp: PathBuf,
    out: PathBuf,
    committed: bool,
}

impl Output {
    /// Creates the temporary file for `out`, `.NAME.PID.tmp` beside it.
    pub(crate) fn create(out: &str) -> io::Result<(Self, File)> {
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
            tmp,
            out,
            committed: false,
        };
        Ok((output, file))
    }

    /// Flushes the temporary file to disk and renames it to the output, replacing
    /// any file there.
    pub(crate) fn commit(mut self) -> io::Result<()> {
        File::open(&self.tmp)?.sync_all()?;
        std::fs::rename(&self.tmp, &self.out)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
