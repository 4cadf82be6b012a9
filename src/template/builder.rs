//! Choosing the templates: count page contents over many VMs, keep the frequent ones.
//!
//! Two passes, so that memory grows with the number of distinct contents and not
//! with their bytes: [`CatalogBuilder::add`] counts each input's pages by fingerprint
//! (a 16-byte key and an 8-byte tally per distinct content, about 30 bytes with the
//! hash table's overhead, instead of a 4 KiB page), and [`CatalogBuilder::build`]
//! reads the inputs again to copy out only the pages that qualify.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use super::Catalog;
use super::input::{self, InputKind};
use crate::error::{Error, Result};
use crate::page::{self, Fingerprint};
use crate::qemu::DEFAULT_PAGE_SIZE;

/// When a page content becomes a template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threshold {
    /// Found in at least this many inputs (VMs): a content counts once per input,
    /// however often that input holds it. What TMDM means by "shared by VMs".
    Inputs(u32),
    /// Found at least this many times in all, every occurrence counting: a page
    /// repeated inside one VM can qualify alone.
    Occurrences(u32),
}

/// What one input contributed, as [`CatalogBuilder::add`] found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct InputStats {
    /// How the input was read.
    pub kind: InputKind,
    /// Pages read, zero pages included.
    pub pages: u64,
    /// All-zero pages: never templates (the zero check restores them for free).
    pub zero_pages: u64,
}

/// Builds a [`Catalog`] from many VMs' migration streams or memory images.
///
/// ```no_run
/// use migstream::template::{CatalogBuilder, Threshold};
///
/// let mut builder = CatalogBuilder::new(Threshold::Inputs(2));
/// builder.add("vm1.mig")?;
/// builder.add("vm2.img")?;
/// let catalog = builder.build()?;
/// # Ok::<(), migstream::Error>(())
/// ```
pub struct CatalogBuilder {
    threshold: Threshold,
    page_size: usize,
    inputs: Vec<PathBuf>,
    tallies: HashMap<Fingerprint, Tally, ahash::RandomState>,
    failed: bool,
}

/// The count of one page content.
struct Tally {
    count: u32,
    /// The last input that counted it, so that [`Threshold::Inputs`] counts once per input.
    last_input: u32,
}

/// Summary only: the tallies may be millions.
impl fmt::Debug for CatalogBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CatalogBuilder")
            .field("threshold", &self.threshold)
            .field("page_size", &self.page_size)
            .field("inputs", &self.inputs)
            .field("distinct", &self.tallies.len())
            .field("failed", &self.failed)
            .finish()
    }
}

impl CatalogBuilder {
    /// A builder of 4 KiB templates.
    pub fn new(threshold: Threshold) -> Self {
        Self {
            threshold,
            page_size: DEFAULT_PAGE_SIZE,
            inputs: Vec::new(),
            tallies: HashMap::default(),
            failed: false,
        }
    }

    /// Sets the page size: a power of two from 1 KiB to 64 KiB (it panics
    /// otherwise), chosen before any input is added. It is also the target page
    /// size QEMU streams are decoded with, unless they announce theirs.
    pub fn with_page_size(mut self, page_size: usize) -> Self {
        assert!(
            page_size.is_power_of_two() && (1024..=65536).contains(&page_size),
            "page size must be a power of two from 1 KiB to 64 KiB"
        );
        assert!(
            self.inputs.is_empty(),
            "page size set after inputs were added"
        );
        self.page_size = page_size;
        self
    }

    /// Counts the pages of the input file at `path` (first pass), and remembers the
    /// path for [`build`](Self::build).
    ///
    /// After an error the input is partly counted, so `build` fails too.
    pub fn add(&mut self, path: impl AsRef<Path>) -> Result<InputStats> {
        let input = self.inputs.len() as u32;
        let once_per_input = matches!(self.threshold, Threshold::Inputs(_));
        let (mut pages, mut zero_pages) = (0, 0);
        let tallies = &mut self.tallies;
        let kind = input::for_each_page(path.as_ref(), self.page_size, |page| {
            pages += 1;
            if page::is_zero(page) {
                zero_pages += 1;
                return ControlFlow::Continue(());
            }
            let tally = tallies.entry(Fingerprint::of(page)).or_insert(Tally {
                count: 0,
                last_input: u32::MAX,
            });
            if !(once_per_input && tally.last_input == input) {
                tally.count = tally.count.saturating_add(1);
                tally.last_input = input;
            }
            ControlFlow::Continue(())
        });
        self.failed |= kind.is_err();
        let kind = kind?;
        self.inputs.push(path.as_ref().to_owned());
        Ok(InputStats {
            kind,
            pages,
            zero_pages,
        })
    }

    /// Distinct non-zero page contents counted so far.
    pub fn distinct(&self) -> usize {
        self.tallies.len()
    }

    /// The catalog of the contents that reach the threshold, copied out of the
    /// inputs by a second pass over them (stopping once every template was found).
    ///
    /// Fails if an input failed in [`add`](Self::add), or with an
    /// [`io::ErrorKind::InvalidData`] error if a template is no longer in the inputs
    /// (they changed since they were added).
    pub fn build(self) -> Result<Catalog> {
        if self.failed {
            return Err(Error::InvalidRecord {
                field: "catalog input",
                reason: "an input failed and was only partly counted",
            });
        }
        let (Threshold::Inputs(min) | Threshold::Occurrences(min)) = self.threshold;
        let mut chosen: Vec<Fingerprint> = self
            .tallies
            .into_iter()
            .filter(|(_, tally)| tally.count >= min)
            .map(|(fp, _)| fp)
            .collect();
        chosen.sort_unstable();
        let ps = self.page_size;
        let mut pages = vec![0; chosen.len() * ps];
        let mut found = vec![false; chosen.len()];
        let mut missing = chosen.len();
        for path in &self.inputs {
            if missing == 0 {
                break;
            }
            input::for_each_page(path, ps, |page| {
                if page::is_zero(page) {
                    return ControlFlow::Continue(());
                }
                if let Ok(i) = chosen.binary_search(&Fingerprint::of(page)) {
                    if !found[i] {
                        found[i] = true;
                        pages[i * ps..(i + 1) * ps].copy_from_slice(page);
                        missing -= 1;
                    }
                }
                match missing {
                    0 => ControlFlow::Break(()),
                    _ => ControlFlow::Continue(()),
                }
            })?;
        }
        if missing > 0 {
            return Err(Error::Io(io::Error::new(
                io::ErrorKind::InvalidData,
                "template inputs changed between the two passes",
            )));
        }
        Ok(Catalog::from_sorted(ps as u32, chosen, pages))
    }
}
