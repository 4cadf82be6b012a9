//! Synthetic guests: what a VM's memory holds, page by page, generated on demand.
//!
//! A guest is a map from page number to where the page's bytes come from (a file of
//! the shared OS image, private heap data, free memory, ...), shuffled like physical
//! memory is. Contents are computed from that map and a seed whenever a page is sent,
//! so a 192 MiB guest costs under a megabyte until it is streamed, and every run
//! streams the same bytes.

use std::sync::Arc;

use super::host_files::HostFiles;
pub(crate) use super::synthetic::{Rng, mix};

/// Target page size (x86).
pub(crate) const PAGE: usize = 4096;

/// The first migration pass sends every page; later ones resend the pages dirtied
/// meanwhile (the last one with the VM stopped).
pub(crate) const PASSES: u8 = 3;

/// What a guest's RAM holds, as percentages of its pages (free memory, i.e. zero
/// pages, takes what the rest leave), and how busy it is.
#[derive(Debug)]
pub(crate) struct Profile {
    pub(crate) kind: &'static str,
    /// Chance that a program or library of the OS image is loaded, in percent.
    os_files: u64,
    /// Chance that a data file is in the page cache, in percent.
    data_files: u64,
    /// Most of RAM the OS image and the page cache may take, in percent.
    os: u64,
    data: u64,
    /// Private heap: log/JSON-like text, incompressible bytes (compressed or
    /// encrypted data, keys, hashes), kernel structures that are mostly zero.
    text: u64,
    random: u64,
    sparse: u64,
    /// Pages filled with one byte value (0xFF buffers, slab poison).
    fill: u64,
    /// Copies of other pages of the same guest (forked processes, caches of caches).
    dup: u64,
    /// Heap pages dirtied during each later pass, in percent of heap pages.
    dirty: u64,
}

/// A web server: mostly OS image, page cache and logs.
pub(crate) const WEB: Profile = Profile {
    kind: "web",
    os_files: 75,
    data_files: 60,
    os: 22,
    data: 16,
    text: 14,
    random: 5,
    sparse: 5,
    fill: 1,
    dup: 4,
    dirty: 8,
};

/// A database: a large private buffer pool of barely compressible pages, busier.
pub(crate) const DB: Profile = Profile {
    kind: "db",
    os_files: 65,
    data_files: 30,
    os: 18,
    data: 8,
    text: 12,
    random: 26,
    sparse: 6,
    fill: 1,
    dup: 3,
    dirty: 15,
};

/// A `pc` machine's RAM blocks besides its RAM and video memory: name, KiB, and KiB
/// holding firmware or ACPI tables (the rest is zero).
const FIRMWARE: [(&str, u32, u32); 6] = [
    ("pc.bios", 256, 256),
    ("pc.rom", 128, 64),
    ("0000:00:02.0/vga.rom", 64, 40),
    ("/rom@etc/acpi/tables", 128, 24),
    ("/rom@etc/table-loader", 4, 4),
    ("/rom@etc/acpi/rsdp", 4, 4),
];

/// Where one page's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Zero,
    Fill(u8),
    /// Page n of the OS image / of the data files.
    Os(u32),
    Data(u32),
    Text,
    Random,
    Sparse,
    /// The same bytes as page n of this block (as first sent).
    Copy(u32),
    /// Firmware and ACPI tables: identical in every guest of a machine type.
    Firmware,
}

/// One RAM block as QEMU lists it.
#[derive(Debug)]
pub(crate) struct Block {
    pub(crate) name: &'static str,
    pages: Vec<Source>,
}

impl Block {
    pub(crate) fn pages(&self) -> u32 {
        self.pages.len() as u32
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.pages.len() as u64 * PAGE as u64
    }
}

/// A guest: its RAM blocks and how to compute their pages.
#[derive(Debug)]
pub(crate) struct Guest {
    pub(crate) name: String,
    pub(crate) profile: &'static Profile,
    pub(crate) blocks: Vec<Block>,
    seed: u64,
    files: Arc<HostFiles>,
}

impl Guest {
    /// A guest of `mib` MiB of RAM (plus firmware and video memory), laid out from
    /// `seed`.
    pub(crate) fn new(
        name: &str,
        profile: &'static Profile,
        mib: u32,
        seed: u64,
        files: Arc<HostFiles>,
    ) -> Self {
        let mut rng = Rng::new(seed);
        let ram = ram(profile, mib as usize * 256, &files, &mut rng);
        // a text console in the first 3 MiB of video memory
        let vram = (0..16 << 8)
            .map(|n| match n < 3 << 8 && rng.chance(20) {
                true => Source::Sparse,
                false => Source::Zero,
            })
            .collect();
        let mut blocks = vec![
            Block {
                name: "pc.ram",
                pages: ram,
            },
            Block {
                name: "0000:00:02.0/vga.vram",
                pages: vram,
            },
        ];
        blocks.extend(FIRMWARE.iter().map(|&(name, kib, used)| {
            Block {
                name,
                pages: (0..kib / 4)
                    .map(|n| match n < used / 4 {
                        true => Source::Firmware,
                        false => Source::Zero,
                    })
                    .collect(),
            }
        }));
        Self {
            name: name.to_string(),
            profile,
            blocks,
            seed,
            files,
        }
    }

    /// RAM in bytes, all blocks.
    pub(crate) fn ram_bytes(&self) -> u64 {
        self.blocks.iter().map(Block::bytes).sum()
    }

    /// Whether page `n` of block `b` is written by the guest during pass `pass`
    /// (1..PASSES), so that it is sent again. Only private heap pages change.
    pub(crate) fn dirtied(&self, b: usize, n: u32, pass: u8) -> bool {
        let heap = matches!(
            self.blocks[b].pages[n as usize],
            Source::Text | Source::Random | Source::Sparse
        );
        heap && pass > 0 && Rng::new(self.key(b, n, pass) ^ 0xD1).below(100) < self.profile.dirty
    }

    /// The bytes of page `n` of block `b` as sent in pass `pass`.
    pub(crate) fn page(&self, b: usize, n: u32, pass: u8, out: &mut [u8; PAGE]) {
        self.original(b, n, out);
        for p in 1..=pass {
            if self.dirtied(b, n, p) {
                dirty(&mut Rng::new(self.key(b, n, p)), out);
            }
        }
    }

    /// The bytes of a page before the guest writes to it during the migration.
    fn original(&self, b: usize, n: u32, out: &mut [u8; PAGE]) {
        let mut rng = Rng::new(self.key(b, n, 0));
        match self.blocks[b].pages[n as usize] {
            Source::Zero => out.fill(0),
            Source::Fill(byte) => out.fill(byte),
            Source::Os(p) => out.copy_from_slice(self.files.os.page(p)),
            Source::Data(p) => out.copy_from_slice(self.files.data.page(p)),
            Source::Text => text(&mut rng, out),
            Source::Random => rng.fill(out),
            Source::Sparse => sparse(&mut rng, out),
            Source::Copy(of) => self.original(b, of, out),
            Source::Firmware => {
                // a seed of the block and page only: the same in every guest
                let mut rng = Rng::new(mix(b as u64, u64::from(n)));
                rng.fill(out);
                out.iter_mut().step_by(2).for_each(|byte| *byte &= 0x0F);
            }
        }
    }

    /// The seed of one page in one pass.
    fn key(&self, b: usize, n: u32, pass: u8) -> u64 {
        mix(
            mix(self.seed, b as u64),
            u64::from(n) << 8 | u64::from(pass),
        )
    }
}

/// The pages of `pages`-page RAM for `profile`: each part in its share, then
/// shuffled in 64 KiB runs (physical memory is fragmented), then copies placed.
fn ram(profile: &Profile, pages: usize, files: &HostFiles, rng: &mut Rng) -> Vec<Source> {
    let share = |percent: u64| pages * percent as usize / 100;
    let mut map = Vec::with_capacity(pages);
    let mut files_of =
        |pool: &super::host_files::FilePool, chance, limit, source: fn(u32) -> Source| {
            let start = map.len();
            for &(first, count) in &pool.files {
                if rng.below(100) < chance && map.len() - start + (count as usize) <= limit {
                    map.extend((first..first + count).map(source));
                }
            }
        };
    files_of(&files.os, profile.os_files, share(profile.os), Source::Os);
    files_of(
        &files.data,
        profile.data_files,
        share(profile.data),
        Source::Data,
    );
    for (percent, source) in [
        (profile.text, Source::Text),
        (profile.random, Source::Random),
        (profile.sparse, Source::Sparse),
    ] {
        map.extend(std::iter::repeat_n(source, share(percent)));
    }
    for _ in 0..share(profile.fill) {
        map.push(Source::Fill(
            [0xFF, 0x6B, 0xAA, 0x5A][rng.below(4) as usize],
        ));
    }
    map.resize(pages, Source::Zero);
    let mut runs: Vec<&[Source]> = map.chunks(16).collect();
    for i in (1..runs.len()).rev() {
        runs.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut map: Vec<Source> = runs.concat();
    let copies = share(profile.dup);
    let (mut placed, mut tries) = (0, 0);
    while placed < copies && tries < 50 * copies {
        tries += 1;
        let (at, of) = (
            rng.below(pages as u64) as usize,
            rng.below(pages as u64) as usize,
        );
        if map[at] == Source::Zero
            && matches!(
                map[of],
                Source::Text | Source::Random | Source::Os(_) | Source::Data(_)
            )
        {
            map[at] = Source::Copy(of as u32);
            placed += 1;
        }
    }
    map
}

/// A guest write during the migration: mostly a few counters and fields changed
/// (what XBZRLE deltas are for), sometimes the whole page rewritten.
fn dirty(rng: &mut Rng, page: &mut [u8; PAGE]) {
    if rng.below(100) < 20 {
        return rng.fill(page);
    }
    for _ in 0..1 + rng.below(6) {
        let len = 4 + rng.below(29) as usize;
        let at = rng.below((PAGE - len) as u64) as usize;
        rng.fill(&mut page[at..at + len]);
    }
}

/// Mostly-zero kernel data: page tables and slabs with a few live entries.
fn sparse(rng: &mut Rng, page: &mut [u8; PAGE]) {
    page.fill(0);
    for _ in 0..1 + rng.below(48) {
        let slot = rng.below((PAGE / 8) as u64) as usize * 8;
        let entry = (rng.below(1 << 22) << 12) | 0x067; // a present, writable page
        page[slot..slot + 8].copy_from_slice(&entry.to_le_bytes());
    }
}

const WORDS: &[&str] = &[
    "GET",
    "POST",
    "/api/v1/orders",
    "/api/v1/users",
    "/static/app.js",
    "/health",
    "200",
    "201",
    "304",
    "404",
    "INFO",
    "WARN",
    "DEBUG",
    "request",
    "completed",
    "session",
    "user_id",
    "cache",
    "miss",
    "hit",
    "upstream",
    "latency_ms",
    "{\"id\":",
    "\"status\":",
    "\"ok\"",
    "true",
    "false",
    "null",
    "connection",
    "reset",
    "by",
    "peer",
    "worker",
];

/// Log lines and JSON fragments: text that compresses about 3:1, different in every
/// page.
fn text(rng: &mut Rng, page: &mut [u8; PAGE]) {
    let mut at = 0;
    let mut put = |bytes: &[u8], at: &mut usize| {
        let n = bytes.len().min(PAGE - *at);
        page[*at..*at + n].copy_from_slice(&bytes[..n]);
        *at += n;
    };
    while at < PAGE {
        let stamp = format!(
            "2025-06-{:02}T{:02}:{:02}:{:02}.{:03}Z ",
            1 + rng.below(28),
            rng.below(24),
            rng.below(60),
            rng.below(60),
            rng.below(1000)
        );
        put(stamp.as_bytes(), &mut at);
        for _ in 0..3 + rng.below(8) {
            put(
                WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes(),
                &mut at,
            );
            put(b" ", &mut at);
        }
        put(
            format!("id={:08x}\n", rng.next() as u32).as_bytes(),
            &mut at,
        );
    }
}
