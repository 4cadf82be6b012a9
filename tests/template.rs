//! The TMDM template catalog: thresholds, canonical identity, the catalog file and
//! its hostile variants, the source's index, and the builder on real QEMU streams.
//!
//! `MIGSTREAM_BLESS=1 cargo test --test template` rewrites the seed corpus of the
//! `catalog_load` fuzz target (`fuzz/corpus/catalog_load/`).

mod support;

use std::path::{Path, PathBuf};

use bytes::BytesMut;
use migstream::page::Fingerprint;
use migstream::qemu::{QemuDecoder, RamRecord, Record};
use migstream::template::{Catalog, CatalogBuilder, InputKind, TemplateIndex, Threshold, format};
use migstream::{Error, ErrorKind};
use proptest::prelude::*;

const KIB: usize = 1024;

/// A non-zero page of `size` bytes, different for every `seed`.
fn page(seed: u32, size: usize) -> Vec<u8> {
    (0..size)
        .map(|i| (seed as usize * 31 + i * 7 + 1) as u8)
        .collect()
}

/// A fresh directory for one test's files.
fn scratch(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("template")
        .join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

/// Writes a raw memory image of these pages.
fn image(dir: &Path, name: &str, pages: &[&[u8]]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pages.concat()).expect("image written");
    path
}

fn build(threshold: Threshold, inputs: &[PathBuf]) -> Catalog {
    let mut builder = CatalogBuilder::new(threshold);
    for path in inputs {
        builder.add(path).expect("input counted");
    }
    builder.build().expect("catalog built")
}

fn has(catalog: &Catalog, page: &[u8]) -> bool {
    catalog.find(&Fingerprint::of(page)).is_some()
}

fn file_bytes(catalog: &Catalog) -> Vec<u8> {
    let mut out = Vec::new();
    catalog.write_to(&mut out).expect("written");
    out
}

/// What to compare of an error: everything but an i/o error's message.
fn summary(e: &Error) -> (ErrorKind, Option<u64>, Option<&'static str>) {
    (e.kind(), e.offset(), e.field())
}

#[test]
fn inputs_and_occurrences_thresholds_differ() {
    let dir = scratch("thresholds");
    let (p1, p2, p3) = (page(1, 4096), page(2, 4096), page(3, 4096));
    let zero = vec![0; 4096];
    let inputs = [
        image(&dir, "a", &[&p1, &p1, &p1, &p2]),
        image(&dir, "b", &[&p2, &p3, &zero]),
        image(&dir, "c", &[&p3, &zero, &zero]),
    ];
    let kept = |threshold| {
        let catalog = build(threshold, &inputs);
        [&p1, &p2, &p3].map(|p| has(&catalog, p))
    };
    // p1 is three times in one input: enough occurrences, but one input only
    assert_eq!(kept(Threshold::Inputs(2)), [false, true, true]);
    assert_eq!(kept(Threshold::Occurrences(2)), [true, true, true]);
    assert_eq!(kept(Threshold::Occurrences(3)), [true, false, false]);
    assert_eq!(kept(Threshold::Inputs(3)), [false, false, false]);
    assert_eq!(build(Threshold::Inputs(1), &inputs).len(), 3);
}

#[test]
fn zero_pages_are_never_templates() {
    let dir = scratch("zero");
    let zero = vec![0; 4096];
    let raw = image(&dir, "raw", &[&zero, &zero, &page(1, 4096), &zero]);
    // a QEMU stream with a PAGE record of zeros, ZERO records and an XBZRLE record
    let mut records = support::sample_records();
    let at = records
        .iter()
        .position(|r| matches!(r, Record::Ram(RamRecord::Page { .. })));
    records.insert(at.expect("a page") + 1, support::page("pc.ram", 3, true, 0));
    let stream = dir.join("stream.mig");
    std::fs::write(&stream, support::encode(&records)).expect("stream written");

    let mut builder = CatalogBuilder::new(Threshold::Occurrences(1));
    let raw_stats = builder.add(&raw).expect("raw image");
    assert_eq!(
        (raw_stats.kind, raw_stats.pages, raw_stats.zero_pages),
        (InputKind::RawImage, 4, 3)
    );
    let stream_stats = builder.add(&stream).expect("stream");
    // the PAGE records only: ZERO and XBZRLE records carry no page
    assert_eq!(
        (
            stream_stats.kind,
            stream_stats.pages,
            stream_stats.zero_pages
        ),
        (InputKind::QemuStream, 5, 1)
    );
    let catalog = builder.build().expect("built");
    assert!(!has(&catalog, &zero));
    let expected: Vec<Vec<u8>> = [0xAB, 0x11, 0x22, 0x33]
        .iter()
        .map(|&b| vec![b; 4096])
        .chain([page(1, 4096)])
        .collect();
    assert_eq!(catalog.len(), expected.len());
    assert!(expected.iter().all(|p| has(&catalog, p)));
}

#[test]
fn a_partial_page_at_the_end_of_an_image_does_not_count() {
    let dir = scratch("partial");
    let p1 = page(1, 4096);
    let path = image(&dir, "a", &[&p1, &p1[..100]]);
    let mut builder = CatalogBuilder::new(Threshold::Occurrences(1));
    assert_eq!(builder.add(&path).expect("image").pages, 1);
    let mut builder = CatalogBuilder::new(Threshold::Occurrences(1)).with_page_size(KIB);
    assert_eq!(builder.add(&path).expect("image").pages, 4);
    assert_eq!(builder.build().expect("built").page_size(), KIB);
}

#[test]
fn the_identity_does_not_depend_on_input_order() {
    let dir = scratch("canonical");
    let pages: Vec<Vec<u8>> = (0..6).map(|s| page(s, 4096)).collect();
    let p: Vec<&[u8]> = pages.iter().map(Vec::as_slice).collect();
    let a = image(&dir, "a", &[p[0], p[1], p[2], p[3]]);
    let b = image(&dir, "b", &[p[3], p[2], p[4]]);
    let c = image(&dir, "c", &[p[5], p[1], p[0], p[4]]);
    let one = build(Threshold::Inputs(2), &[a.clone(), b.clone(), c.clone()]);
    let other = build(Threshold::Inputs(2), &[c, a, b]);
    assert_eq!(one.len(), 5);
    assert_eq!(one.id(), other.id());
    assert_eq!(file_bytes(&one), file_bytes(&other));
    let reversed = Catalog::from_pages(4096, p.iter().rev()).expect("pages");
    assert_eq!(
        Catalog::from_pages(4096, &p).expect("pages").id(),
        reversed.id()
    );
    assert_ne!(one.id(), reversed.id());
}

/// The identity is the documented digest (docs/catalog-format.md), computed here
/// independently of the crate.
#[test]
fn the_identity_is_the_documented_digest() {
    let catalog = Catalog::from_pages(KIB, (0..3).map(|s| page(s, KIB))).expect("pages");
    let bytes = file_bytes(&catalog);
    assert_eq!(bytes.len(), 56 + 3 * (16 + KIB));
    assert_eq!(&bytes[24..56], &catalog.id().0);
    assert_eq!(
        &bytes[24..56],
        &identity(&bytes[12..16], &bytes[16..24], &bytes[56..56 + 48])
    );
    assert_eq!(catalog.id().to_string(), hex(&bytes[24..56]));
}

fn identity(page_size: &[u8], count: &[u8], table: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("migstream template catalog v1 identity");
    h.update(page_size).update(count).update(table);
    *h.finalize().as_bytes()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn catalog_file_round_trip() {
    let dir = scratch("round-trip");
    let pages: Vec<Vec<u8>> = (0..5).map(|s| page(s, 4096)).collect();
    let catalog = Catalog::from_pages(4096, &pages).expect("pages");
    let path = dir.join("templates.cat");
    catalog.save(&path).expect("saved");
    let bytes = std::fs::read(&path).expect("file");
    assert_eq!(&bytes[..8], &format::MAGIC);
    for loaded in [
        Catalog::load(&path),
        Catalog::from_bytes(&bytes),
        Catalog::from_reader(&bytes[..]),
    ] {
        assert_eq!(loaded.expect("loads"), catalog);
    }
    for p in &pages {
        let n = catalog.find(&Fingerprint::of(p)).expect("a template");
        assert_eq!(catalog.get(n), Some(&p[..]));
        assert_eq!(catalog.fingerprint(n), Some(Fingerprint::of(p)));
    }
    assert_eq!((catalog.get(5), catalog.fingerprint(5)), (None, None));
    assert_eq!(catalog.get(u32::MAX), None);
}

/// A small valid catalog file: three 1 KiB templates.
fn small_file() -> Vec<u8> {
    file_bytes(&Catalog::from_pages(KIB, (0..3).map(|s| page(s, KIB))).expect("pages"))
}

#[test]
fn every_truncation_is_a_typed_error_at_the_cut() {
    let file = small_file();
    for len in 0..file.len() {
        let cut = &file[..len];
        let whole = Catalog::from_bytes(cut).expect_err("truncated");
        let streamed = Catalog::from_reader(cut).expect_err("truncated");
        assert_eq!(
            (whole.kind(), whole.offset()),
            (ErrorKind::Truncated, Some(len as u64))
        );
        assert_eq!(summary(&whole), summary(&streamed));
        let index = TemplateIndex::from_reader(cut).expect_err("truncated");
        assert_eq!(summary(&index), summary(&whole));
    }
    let mut longer = file.clone();
    longer.push(0);
    let trailing = Catalog::from_bytes(&longer).expect_err("trailing byte");
    assert_eq!(
        (trailing.kind(), trailing.offset()),
        (ErrorKind::Malformed, Some(file.len() as u64))
    );
}

#[test]
fn every_flipped_byte_is_detected() {
    let file = small_file();
    for at in 0..file.len() {
        for mask in [0x01, 0x80, 0xFF] {
            let mut bad = file.clone();
            bad[at] ^= mask;
            let e = Catalog::from_bytes(&bad).expect_err("a flipped byte");
            assert_ne!(e.kind(), ErrorKind::Io, "byte {at}");
            assert_eq!(
                summary(&e),
                summary(&Catalog::from_reader(&bad[..]).expect_err("flipped"))
            );
            if at < 56 + 3 * 16 {
                // the header and the table: the source's index sees it too
                TemplateIndex::from_reader(&bad[..]).expect_err("a flipped head byte");
            }
        }
    }
}

#[test]
fn hostile_headers_fail_before_allocating() {
    let file = small_file();
    let with_count = |count: u64| {
        let mut f = file.clone();
        f[16..24].copy_from_slice(&count.to_be_bytes());
        f
    };
    let e = Catalog::from_bytes(&with_count(u64::MAX)).expect_err("count");
    assert!(
        matches!(
            e,
            Error::LimitExceeded {
                offset: 16,
                value: u64::MAX,
                limit: format::MAX_TEMPLATES,
                ..
            }
        ),
        "{e}"
    );
    // 2^32 - 1 templates of 1 KiB would be 4 TiB: refused from the length of the bytes,
    // and from a reader of unknown length by running out of input
    let huge = with_count(format::MAX_TEMPLATES);
    for e in [Catalog::from_bytes(&huge), Catalog::from_reader(&huge[..])] {
        let e = e.expect_err("count beyond the input");
        assert_eq!(
            summary(&e),
            (
                ErrorKind::Truncated,
                Some(huge.len() as u64),
                Some("fingerprint table")
            )
        );
    }
    let mut bad = file.clone();
    bad[..8].copy_from_slice(b"MGSTCAT1");
    assert_eq!(
        Catalog::from_bytes(&bad).expect_err("magic").offset(),
        Some(0)
    );
    let mut bad = file.clone();
    bad[11] = 2;
    assert_eq!(
        Catalog::from_bytes(&bad).expect_err("version").kind(),
        ErrorKind::Unsupported
    );
    for size in [0u32, 512, 3000, 128 * 1024] {
        let mut bad = file.clone();
        bad[12..16].copy_from_slice(&size.to_be_bytes());
        let e = Catalog::from_bytes(&bad).expect_err("page size");
        assert_eq!((e.kind(), e.offset()), (ErrorKind::Malformed, Some(12)));
    }
}

/// A table out of order is refused even with a digest that matches it.
#[test]
fn an_unsorted_table_is_refused() {
    let mut file = small_file();
    let (a, b) = (file[56..72].to_vec(), file[72..88].to_vec());
    file[56..72].copy_from_slice(&b);
    file[72..88].copy_from_slice(&a);
    let digest = identity(&file[12..16], &file[16..24], &file[56..104]);
    file[24..56].copy_from_slice(&digest);
    let e = Catalog::from_bytes(&file).expect_err("unsorted");
    assert_eq!((e.kind(), e.offset()), (ErrorKind::Malformed, Some(72)));
}

#[test]
fn the_index_finds_templates_and_nothing_else() {
    let dir = scratch("index");
    let pages: Vec<Vec<u8>> = (0..50).map(|s| page(s, 4096)).collect();
    let catalog = Catalog::from_pages(4096, &pages).expect("pages");
    let path = dir.join("templates.cat");
    catalog.save(&path).expect("saved");
    let loaded = TemplateIndex::load(&path).expect("indexed");
    let holding = TemplateIndex::holding(std::sync::Arc::new(catalog.clone()));
    for index in [TemplateIndex::new(&catalog), loaded, holding] {
        assert_eq!(
            (index.id(), index.len(), index.page_size()),
            (catalog.id(), 50, 4096)
        );
        for p in &pages {
            let fp = Fingerprint::of(p);
            assert_eq!(
                index.lookup(p),
                Some((catalog.find(&fp).expect("template"), fp))
            );
        }
        assert_eq!(index.lookup(&page(50, 4096)), None);
        assert_eq!(index.lookup(&[0; 4096]), None);
        assert_eq!(index.lookup(&pages[0][..1024]), None);
        let mut almost = pages[7].clone();
        almost[4095] ^= 1;
        assert_eq!(index.lookup(&almost), None);
    }
}

/// A template page damaged in the file: the catalog refuses it; the index loads
/// (it reads pages only for their pre-filter values) but never returns that page.
#[test]
fn a_damaged_page_is_never_a_wrong_index_hit() {
    let pages: Vec<Vec<u8>> = (0..3).map(|s| page(s, KIB)).collect();
    let catalog = Catalog::from_pages(KIB, &pages).expect("pages");
    let mut file = file_bytes(&catalog);
    let first = 56 + 3 * 16;
    file[first + 10] ^= 0x40;
    let e = Catalog::from_bytes(&file).expect_err("damaged page");
    assert_eq!(
        (e.kind(), e.offset(), e.field()),
        (
            ErrorKind::Malformed,
            Some(first as u64),
            Some("template page")
        )
    );
    let index = TemplateIndex::from_reader(&file[..]).expect("head intact");
    let damaged = &file[first..first + KIB];
    assert_eq!(index.lookup(damaged), None);
    let n = (1..3)
        .map(|n| catalog.get(n).expect("page"))
        .collect::<Vec<_>>();
    assert!(n.iter().all(|p| index.lookup(p).is_some()));
}

/// The two real streams: QEMU 7.2's and 10.0's firmware differ in every page (their
/// SeaBIOS builds differ), so they share no template; a second copy of the same
/// VM's stream, or an image of its pages, does.
#[test]
fn builder_on_real_qemu_streams() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let (v72, v10) = (
        data.join("qemu-7.2-pc-paused.mig"),
        data.join("qemu-10.0-q35-paused.mig"),
    );
    let pages72 = stream_pages(&v72);
    let pages10 = stream_pages(&v10);
    assert_eq!((pages72.len(), pages10.len()), (49, 52));

    let mut builder = CatalogBuilder::new(Threshold::Inputs(2));
    assert_eq!(builder.add(&v72).expect("7.2").kind, InputKind::QemuStream);
    builder.add(&v10).expect("10.0");
    assert_eq!(builder.distinct(), 101);
    assert!(builder.build().expect("built").is_empty());

    let dir = scratch("real");
    let refs: Vec<&[u8]> = pages72.iter().map(Vec::as_slice).collect();
    let image72 = image(&dir, "image72", &refs);
    for inputs in [[&v72, &v72, &v10], [&v10, &image72, &v72]] {
        let catalog = build(Threshold::Inputs(2), &inputs.map(PathBuf::clone));
        assert_eq!(catalog.len(), 49);
        let index = TemplateIndex::new(&catalog);
        assert!(pages72.iter().all(|p| index.lookup(p).is_some()));
        assert!(pages10.iter().all(|p| index.lookup(p).is_none()));
    }
}

/// The PAGE payloads of a stream, decoded independently of the builder.
fn stream_pages(path: &Path) -> Vec<Vec<u8>> {
    let mut buf = BytesMut::from(&std::fs::read(path).expect("stream")[..]);
    let mut dec = QemuDecoder::new();
    let mut pages = Vec::new();
    while let Some(record) = dec.decode_eof(&mut buf).expect("a valid stream") {
        if let Record::Ram(RamRecord::Page { data, .. }) = record {
            pages.push(data.to_vec());
        }
    }
    pages
}

#[test]
fn a_failed_input_fails_the_build() {
    let dir = scratch("failed");
    let broken = dir.join("broken.mig");
    let stream = support::encode(&support::sample_records());
    std::fs::write(&broken, &stream[..stream.len() / 2]).expect("written");
    let mut builder = CatalogBuilder::new(Threshold::Inputs(1));
    assert_eq!(
        builder.add(&broken).expect_err("truncated").kind(),
        ErrorKind::Truncated
    );
    assert_eq!(
        builder.build().expect_err("failed input").kind(),
        ErrorKind::InvalidRecord
    );
}

proptest! {
    #[test]
    fn write_then_load_is_identity(
        pages in prop::collection::vec(prop::collection::vec(any::<u8>(), KIB), 0..8),
        dup in any::<prop::sample::Index>(),
    ) {
        let mut pages = pages;
        if !pages.is_empty() {
            pages.push(pages[dup.index(pages.len())].clone());
        }
        let catalog = Catalog::from_pages(KIB, &pages).expect("pages");
        let bytes = file_bytes(&catalog);
        prop_assert_eq!(bytes.len(), 56 + catalog.len() * (16 + KIB));
        let loaded = Catalog::from_bytes(&bytes).expect("loads");
        prop_assert_eq!(&file_bytes(&loaded), &bytes);
        prop_assert_eq!(&loaded, &catalog);
        let index = TemplateIndex::from_reader(&bytes[..]).expect("indexes");
        for p in &pages {
            prop_assert_eq!(index.lookup(p).map(|(n, _)| loaded.get(n)), Some(Some(&p[..])));
        }
    }
}

/// A fuzz seed: its name, its bytes, and the error kind and offset loading it gives.
type Seed = (&'static str, Vec<u8>, Option<(ErrorKind, u64)>);

/// The seed corpus of the `catalog_load` fuzz target.
fn fuzz_seeds() -> Vec<Seed> {
    let catalog = |n: u32, size: usize| {
        file_bytes(&Catalog::from_pages(size, (0..n).map(|s| page(s, size))).expect("pages"))
    };
    let three = catalog(3, KIB);
    let patch = |at: usize, bytes: &[u8]| {
        let mut f = three.clone();
        f[at..at + bytes.len()].copy_from_slice(bytes);
        f
    };
    let mut unsorted = three.clone();
    unsorted[56..88].rotate_left(16);
    let digest = identity(&unsorted[12..16], &unsorted[16..24], &unsorted[56..104]);
    unsorted[24..56].copy_from_slice(&digest);
    let mut trailing = catalog(1, KIB);
    trailing.push(0);
    use ErrorKind::*;
    vec![
        ("ok-empty", catalog(0, KIB), None),
        ("ok-one", catalog(1, KIB), None),
        ("ok-three", three.clone(), None),
        ("ok-two-2k", catalog(2, 2 * KIB), None),
        ("empty-file", Vec::new(), Some((Truncated, 0))),
        ("trunc-header", three[..30].to_vec(), Some((Truncated, 30))),
        ("trunc-table", three[..80].to_vec(), Some((Truncated, 80))),
        (
            "trunc-pages",
            three[..2000].to_vec(),
            Some((Truncated, 2000)),
        ),
        ("bad-magic", patch(0, b"QEVM"), Some((Malformed, 0))),
        (
            "bad-version",
            patch(8, &2u32.to_be_bytes()),
            Some((Unsupported, 8)),
        ),
        (
            "bad-page-size",
            patch(12, &1000u32.to_be_bytes()),
            Some((Malformed, 12)),
        ),
        (
            "huge-count",
            patch(16, &(1u64 << 40).to_be_bytes()),
            Some((LimitExceeded, 16)),
        ),
        (
            "max-count",
            patch(16, &format::MAX_TEMPLATES.to_be_bytes()),
            Some((Truncated, three.len() as u64)),
        ),
        ("bad-digest", patch(40, &[0x55]), Some((Malformed, 24))),
        (
            "bad-page",
            patch(56 + 48 + KIB + 5, &[0]),
            Some((Malformed, (56 + 48 + KIB) as u64)),
        ),
        ("unsorted", unsorted, Some((Malformed, 72))),
        (
            "trailing",
            trailing,
            Some((Malformed, (56 + 16 + KIB) as u64)),
        ),
    ]
}

#[test]
fn fuzz_seeds_load_as_expected_and_are_current() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/catalog_load");
    let bless = std::env::var_os("MIGSTREAM_BLESS").is_some();
    for (name, bytes, expected) in fuzz_seeds() {
        let got = Catalog::from_bytes(&bytes)
            .err()
            .map(|e| (e.kind(), e.offset().expect("an offset")));
        assert_eq!(got, expected, "seed {name}");
        let path = dir.join(name);
        if bless {
            std::fs::create_dir_all(&dir).expect("corpus directory");
            std::fs::write(&path, &bytes).expect("seed written");
        } else {
            let on_disk = std::fs::read(&path).unwrap_or_default();
            assert!(
                on_disk == bytes,
                "{} is stale: MIGSTREAM_BLESS=1 rewrites it",
                path.display()
            );
        }
    }
}
