//! The guests' shared software: pages of this machine's own programs, libraries and
//! data files. Real VMs built from one OS image hold byte-identical copies of these
//! pages (mapped binaries, the page cache), which is what templates exploit; random
//! bytes could never show that.

use std::fs;
use std::path::{Path, PathBuf};

use super::guest::PAGE;

/// Where the OS image (executables and shared libraries) is taken from.
const OS_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu",
    "/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/bin",
    "/usr/sbin",
];

/// Where the page cache's data files (documentation, scripts, headers, locale and
/// time zone data) are taken from.
const DATA_DIRS: &[&str] = &["/usr/share", "/usr/include", "/etc"];

/// Bytes of OS image and of data files kept (all guests draw from these).
const OS_BUDGET: u64 = 40 << 20;
const DATA_BUDGET: u64 = 32 << 20;

/// Files looked at per directory tree at most, so that a huge /usr/share costs a
/// bounded walk.
const MAX_WALK: usize = 20_000;

/// A set of files cut into pages, the last page of each zero-padded as in a page
/// cache.
#[derive(Debug, Default)]
pub(crate) struct FilePool {
    /// The files' pages, back to back.
    bytes: Vec<u8>,
    /// Per file: the index of its first page and its page count.
    pub(crate) files: Vec<(u32, u32)>,
    /// Where the files came from, for the summary line.
    pub(crate) origin: String,
}

impl FilePool {
    /// Page `n` of the pool.
    pub(crate) fn page(&self, n: u32) -> &[u8] {
        let start = n as usize * PAGE;
        &self.bytes[start..start + PAGE]
    }

    /// Bytes of the pool.
    pub(crate) fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn add(&mut self, data: &[u8]) {
        let first = (self.bytes.len() / PAGE) as u32;
        let pages = data.len().div_ceil(PAGE);
        self.bytes.extend_from_slice(data);
        self.bytes.resize((first as usize + pages) * PAGE, 0);
        self.files.push((first, pages as u32));
    }
}

/// The OS image and the data files every guest draws from.
#[derive(Debug)]
pub(crate) struct HostFiles {
    pub(crate) os: FilePool,
    pub(crate) data: FilePool,
}

impl HostFiles {
    /// Reads up to [`OS_BUDGET`] of ELF files and [`DATA_BUDGET`] of other files. The
    /// choice is deterministic on a given machine (files ordered by a hash of their
    /// path, so that the budget samples whole directories rather than their first
    /// letters). Falls back to this demo's own executable where nothing is found.
    pub(crate) fn load() -> Self {
        let mut os = pool(OS_DIRS, false, is_elf, OS_BUDGET);
        let mut data = pool(DATA_DIRS, true, |head| !is_elf(head), DATA_BUDGET);
        for pool in [&mut os, &mut data] {
            if pool.len() < (1 << 20) {
                if let Ok(exe) = std::env::current_exe().and_then(fs::read) {
                    pool.add(&exe);
                    pool.origin = "this demo's own executable (fallback)".into();
                }
            }
        }
        assert!(
            os.len() > 0 && data.len() > 0,
            "no file to build guests from"
        );
        Self { os, data }
    }
}

/// Files of `dirs` (recursively if `deep`) whose first bytes pass `keep`, 8 KiB to
/// 4 MiB each, up to `budget` bytes.
fn pool(dirs: &[&str], deep: bool, keep: fn(&[u8]) -> bool, budget: u64) -> FilePool {
    // /lib and /usr/lib are one directory on most systems: walk each once
    let mut roots: Vec<PathBuf> = dirs.iter().flat_map(fs::canonicalize).collect();
    roots.sort();
    roots.dedup();
    let mut found: Vec<(PathBuf, u64)> = Vec::new();
    for root in &roots {
        walk(root, deep, &mut found);
    }
    found.sort_by_cached_key(|(path, _)| {
        *blake3::hash(path.as_os_str().as_encoded_bytes()).as_bytes()
    });
    let origin: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
    let mut pool = FilePool {
        origin: origin.join(", "),
        ..FilePool::default()
    };
    for (path, size) in found {
        if pool.len() + size > budget {
            continue;
        }
        match fs::read(&path) {
            Ok(data) if keep(&data[..data.len().min(4)]) => pool.add(&data),
            _ => {}
        }
    }
    pool
}

/// Regular files of 8 KiB to 4 MiB under `dir`, at most [`MAX_WALK`] entries looked
/// at, in name order.
fn walk(dir: &Path, deep: bool, found: &mut Vec<(PathBuf, u64)>) {
    let mut todo = vec![dir.to_path_buf()];
    let mut looked = 0;
    while let Some(dir) = todo.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        entries.sort();
        for path in entries.into_iter().rev() {
            looked += 1;
            if looked > MAX_WALK {
                return;
            }
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() && deep {
                todo.push(path);
            } else if meta.is_file() && (8 << 10..=4 << 20).contains(&meta.len()) {
                found.push((path, meta.len()));
            }
        }
    }
}

fn is_elf(head: &[u8]) -> bool {
    head == b"\x7fELF"
}
