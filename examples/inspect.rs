//! Inspect QEMU migration stream files, and check the codec's byte-exact round trip.
//!
//! ```text
//! cargo run --release --example inspect -- [--json] [--roundtrip] FILE...
//! ```
//!
//! Prints the machine type, RAM blocks, pages by kind, sections by idstr, commands
//! and the device-state bytes. `--roundtrip` also re-encodes every record while
//! streaming (memory stays bounded: the file is read in 1 MiB pieces) and compares the
//! output with the file; it exits non-zero unless they are identical.
//!
//! A multifd channel file (one connection of a multifd migration, starting with
//! `0x11223344`, as `harness/capture-multifd.py` saves them) is recognised by its
//! first 4 bytes: for it the channel id, packets, SYNC packets, pages by kind (normal,
//! zero) and compressed packets are printed, and `--roundtrip` works the same.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Read};
use std::process::ExitCode;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use migstream::qemu::multifd::{self, ChannelRecord, MultifdDecoder, MultifdEncoder, Payload};
use migstream::qemu::{QemuDecoder, QemuEncoder, RamRecord, Record, wire};
use serde_json::{Value, json};

#[path = "support/out.rs"]
mod out;
#[path = "support/mod.rs"]
mod support;

use clap::Parser;
use out::outln;
use support::{READ, read_into};
use tokio_util::codec::{Decoder, Encoder};

/// Inspect QEMU migration stream files and multifd channel files.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// One JSON object per file on stdout.
    #[arg(long)]
    json: bool,
    /// Re-encode every record while reading and compare with the file (exit non-zero
    /// unless identical).
    #[arg(long)]
    roundtrip: bool,
    /// Stream files (main channel) or multifd channel files.
    #[arg(required = true, value_name = "FILE")]
    files: Vec<String>,
}

fn main() -> ExitCode {
    let Cli {
        json: json_out,
        roundtrip,
        files,
    } = Cli::parse();
    let mut ok = true;
    for path in &files {
        let inspected = match is_channel_file(path) {
            Ok(true) => inspect_channel(path, roundtrip).map(|r| Box::new(r) as Box<dyn Shown>),
            Ok(false) => inspect(path, roundtrip).map(|r| Box::new(r) as Box<dyn Shown>),
            Err(e) => Err(e.into()),
        };
        let report = match inspected {
            Ok(report) => report,
            Err(e) => {
                eprintln!("{path}: {e}");
                ok = false;
                continue;
            }
        };
        let printed = match json_out {
            true => outln!("{}", report.to_json(path)),
            false => report.print(path),
        };
        if let Err(e) = printed {
            eprintln!("inspect: stdout: {e}");
            return ExitCode::FAILURE;
        }
        ok &= report.walked().roundtrip_ok.unwrap_or(true);
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// What `inspect` prints of a file, whichever kind it is.
trait Shown {
    fn print(&self, path: &str) -> io::Result<()>;
    fn to_json(&self, path: &str) -> Value;
    fn walked(&self) -> &Walked;
}

#[derive(Default)]
struct Report {
    machine: Option<String>,
    blocks: Vec<(String, u64)>,
    pages: BTreeMap<&'static str, u64>,
    resent: u64,
    /// idstr → [START, PART, END, FULL]
    sections: BTreeMap<String, [u64; 4]>,
    commands: BTreeMap<String, u64>,
    opaque_bytes: u64,
    vmdesc_bytes: Option<u64>,
    devices: Vec<String>,
    walked: Walked,
}

/// Which pages of each RAM block were sent already, to count re-sent pages.
#[derive(Default)]
struct SentPages {
    blocks: HashMap<Bytes, Vec<u64>>,
}

impl SentPages {
    /// Marks a page; true if it was sent before. Offsets beyond 1 TiB are not tracked.
    fn mark(&mut self, block: &Bytes, offset: u64) -> bool {
        let page = (offset / 4096) as usize;
        if page >= 1 << 28 {
            return false;
        }
        let bits = self.blocks.entry(block.clone()).or_default();
        if bits.len() <= page / 64 {
            bits.resize(page / 64 + 1, 0);
        }
        let (word, bit) = (&mut bits[page / 64], 1u64 << (page % 64));
        let seen = *word & bit != 0;
        *word |= bit;
        seen
    }
}

fn inspect(path: &str, roundtrip: bool) -> Result<Report, Box<dyn std::error::Error>> {
    let mut report = Report::default();
    let mut sent = SentPages::default();
    let mut section_names: HashMap<u32, String> = HashMap::new();
    let walked = walk(
        path,
        roundtrip,
        QemuDecoder::new(),
        QemuEncoder::new(),
        |record| report.count(record, &mut sent, &mut section_names),
    )?;
    report.walked = walked;
    Ok(report)
}

/// What reading a file through a codec gave: its bytes and records, and with
/// `--roundtrip` whether re-encoding gave the file back.
#[derive(Default)]
struct Walked {
    bytes: u64,
    records: u64,
    roundtrip_ok: Option<bool>,
    seconds: f64,
}

impl Walked {
    /// With `--roundtrip`, its outcome (and the decode rate).
    fn print_roundtrip(&self, path: &str) -> io::Result<()> {
        match self.roundtrip_ok {
            Some(true) => outln!(
                "roundtrip ok {} bytes {} records {:.2} GB/s",
                self.bytes,
                self.records,
                self.bytes as f64 / self.seconds / 1e9
            ),
            Some(false) => outln!("roundtrip FAILED: re-encoded bytes differ from {path}"),
            None => Ok(()),
        }
    }
}

/// Reads `path` through `dec` in [`READ`]-byte pieces (memory stays bounded),
/// hands every record to `count`, and with `roundtrip` re-encodes each with `enc`
/// and compares the output with the file, read again in step.
fn walk<R, D, E>(
    path: &str,
    roundtrip: bool,
    mut dec: D,
    mut enc: E,
    mut count: impl FnMut(&R),
) -> Result<Walked, Box<dyn std::error::Error>>
where
    D: Decoder<Item = R, Error = migstream::Error>,
    E: for<'a> Encoder<&'a R, Error = migstream::Error>,
{
    let started = Instant::now();
    let mut input = File::open(path)?;
    // the same file again, read in step with the output to compare without holding either
    let mut original = match roundtrip {
        true => Some(File::open(path)?),
        false => None,
    };
    let (mut buf, mut out) = (BytesMut::with_capacity(2 * READ), BytesMut::new());
    let mut expected = vec![0; READ];
    let mut walked = Walked::default();
    let mut at_end = false;
    loop {
        let record = match at_end {
            true => dec.decode_eof(&mut buf)?,
            false => dec.decode(&mut buf)?,
        };
        let Some(record) = record else {
            if at_end {
                break;
            }
            buf.reserve(READ);
            let n = read_into(&mut input, &mut buf)?;
            at_end = n == 0;
            walked.bytes += n as u64;
            continue;
        };
        walked.records += 1;
        count(&record);
        if let Some(original) = original.as_mut() {
            enc.encode(&record, &mut out)?;
            if out.len() >= READ {
                compare(original, &mut out, &mut expected, &mut walked.roundtrip_ok)?;
            }
        }
    }
    if let Some(original) = original.as_mut() {
        compare(original, &mut out, &mut expected, &mut walked.roundtrip_ok)?;
        let mut rest = [0u8; 1];
        if walked.roundtrip_ok != Some(false) && original.read(&mut rest)? > 0 {
            walked.roundtrip_ok = Some(false);
        }
        walked.roundtrip_ok.get_or_insert(true);
    }
    walked.seconds = started.elapsed().as_secs_f64();
    Ok(walked)
}

/// Compares the encoded output so far with the same span of the original file.
fn compare(
    original: &mut File,
    out: &mut BytesMut,
    expected: &mut Vec<u8>,
    roundtrip_ok: &mut Option<bool>,
) -> io::Result<()> {
    expected.resize(out.len(), 0);
    original.read_exact(expected).or_else(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => {
            *roundtrip_ok = Some(false);
            Ok(())
        }
        _ => Err(e),
    })?;
    if expected[..] != out[..] {
        *roundtrip_ok = Some(false);
    }
    out.clear();
    Ok(())
}

impl Report {
    fn count(&mut self, record: &Record, sent: &mut SentPages, names: &mut HashMap<u32, String>) {
        let mut section = |id: u32, name: Option<&Bytes>, kind: usize| {
            let name = match name {
                Some(n) => names
                    .entry(id)
                    .or_insert_with(|| String::from_utf8_lossy(n).into_owned())
                    .clone(),
                None => names.get(&id).cloned().unwrap_or_else(|| format!("#{id}")),
            };
            self.sections.entry(name).or_default()[kind] += 1;
        };
        match record {
            Record::Configuration(c) => {
                self.machine = Some(String::from_utf8_lossy(&c.machine).into_owned())
            }
            Record::SectionStart(h) => section(h.section_id, Some(&h.idstr), 0),
            Record::SectionPart { section_id } => section(*section_id, None, 1),
            Record::SectionEnd { section_id } => section(*section_id, None, 2),
            Record::SectionFull(h) => section(h.section_id, Some(&h.idstr), 3),
            Record::Command(c) => *self.commands.entry(command_name(c.cmd)).or_default() += 1,
            Record::Opaque(b) => self.opaque_bytes += b.len() as u64,
            Record::VmDescription(json) => {
                self.vmdesc_bytes = Some(json.len() as u64);
                self.devices = device_names(json);
            }
            Record::Ram(ram) => {
                let (kind, addr) = match ram {
                    RamRecord::MemSize(m) => {
                        let name = |b: &Bytes| String::from_utf8_lossy(b).into_owned();
                        self.blocks = m
                            .blocks
                            .iter()
                            .map(|b| (name(&b.idstr), b.used_length))
                            .collect();
                        return;
                    }
                    RamRecord::Page { addr, .. } => ("normal", addr),
                    RamRecord::Zero { addr, .. } => ("zero", addr),
                    RamRecord::Xbzrle { addr, .. } => ("xbzrle", addr),
                    RamRecord::Compressed { addr, .. } => ("compressed", addr),
                    _ => return,
                };
                *self.pages.entry(kind).or_default() += 1;
                self.resent += u64::from(sent.mark(&addr.block, addr.offset));
            }
            _ => {}
        }
    }
}

impl Shown for Report {
    fn walked(&self) -> &Walked {
        &self.walked
    }

    fn print(&self, path: &str) -> io::Result<()> {
        outln!(
            "{path}: {} bytes, {} records",
            self.walked.bytes,
            self.walked.records
        )?;
        outln!(
            "  machine      {}",
            self.machine.as_deref().unwrap_or("(no configuration)")
        )?;
        for (name, len) in &self.blocks {
            outln!(
                "  ram block    {name:<24} {:>12} bytes ({} MiB)",
                len,
                len >> 20
            )?;
        }
        let pages: Vec<String> = self.pages.iter().map(|(k, v)| format!("{k} {v}")).collect();
        outln!(
            "  pages        {} (re-sent {})",
            pages.join(", "),
            self.resent
        )?;
        for (name, [start, part, end, full]) in &self.sections {
            outln!("  section      {name:<24} start {start} part {part} end {end} full {full}")?;
        }
        for (name, n) in &self.commands {
            outln!("  command      {name:<24} x{n}")?;
        }
        outln!("  device state {} bytes (opaque)", self.opaque_bytes)?;
        match self.vmdesc_bytes {
            Some(n) => outln!(
                "  vmdesc       {n} bytes, {} devices: {}",
                self.devices.len(),
                self.devices.join(" ")
            )?,
            None => outln!("  vmdesc       none")?,
        }
        self.walked.print_roundtrip(path)
    }

    fn to_json(&self, path: &str) -> Value {
        let sections: serde_json::Map<String, Value> = self
            .sections
            .iter()
            .map(|(k, [s, p, e, f])| {
                (
                    k.clone(),
                    json!({"start": s, "part": p, "end": e, "full": f}),
                )
            })
            .collect();
        json!({
            "file": path,
            "bytes": self.walked.bytes,
            "records": self.walked.records,
            "machine": self.machine,
            "ram_blocks": self.blocks.iter().map(|(n, l)| json!({"name": n, "bytes": l})).collect::<Vec<_>>(),
            "pages": self.pages,
            "pages_resent": self.resent,
            "sections": sections,
            "commands": self.commands,
            "device_state_bytes": self.opaque_bytes,
            "vmdesc_bytes": self.vmdesc_bytes,
            "devices": self.devices,
            "roundtrip_ok": self.walked.roundtrip_ok,
            "seconds": self.walked.seconds,
        })
    }
}

fn command_name(cmd: u16) -> String {
    use wire::command::*;
    let name = match cmd {
        OPEN_RETURN_PATH => "open-return-path",
        PING => "ping",
        POSTCOPY_ADVISE => "postcopy-advise",
        POSTCOPY_LISTEN => "postcopy-listen",
        POSTCOPY_RUN => "postcopy-run",
        POSTCOPY_RAM_DISCARD => "postcopy-ram-discard",
        PACKAGED => "packaged",
        ENABLE_COLO => "enable-colo",
        POSTCOPY_RESUME => "postcopy-resume",
        RECV_BITMAP => "recv-bitmap",
        SWITCHOVER_START => "switchover-start",
        other => return format!("command-{other}"),
    };
    name.to_owned()
}

/// Device names (idstr/instance) from the JSON device description.
fn device_names(json: &[u8]) -> Vec<String> {
    let Ok(desc) = serde_json::from_slice::<Value>(json) else {
        return vec!["(unparsable JSON)".into()];
    };
    let devices = desc["devices"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    devices
        .iter()
        .map(|d| format!("{}/{}", d["name"].as_str().unwrap_or("?"), d["instance_id"]))
        .collect()
}

/// Whether the file starts like a multifd channel (`0x11223344`) rather than a main
/// channel (`QEVM`).
fn is_channel_file(path: &str) -> io::Result<bool> {
    let mut head = [0u8; 4];
    let n = File::open(path)?.read(&mut head)?;
    Ok(multifd::wire::is_channel_start(&head[..n]) == Some(true))
}

/// What one multifd channel carried.
#[derive(Default)]
struct ChannelReport {
    channel_id: Option<u8>,
    packets: u64,
    sync: u64,
    normal_pages: u64,
    zero_pages: u64,
    compressed_packets: u64,
    compressed_bytes: u64,
    /// compression methods by name, in packets with page data
    methods: BTreeMap<String, u64>,
    device_state_packets: u64,
    device_state_bytes: u64,
    walked: Walked,
}

fn inspect_channel(
    path: &str,
    roundtrip: bool,
) -> Result<ChannelReport, Box<dyn std::error::Error>> {
    let mut report = ChannelReport::default();
    let walked = walk(
        path,
        roundtrip,
        MultifdDecoder::new(),
        MultifdEncoder::new(),
        |record| report.count(record),
    )?;
    report.walked = walked;
    Ok(report)
}

impl ChannelReport {
    fn count(&mut self, record: &ChannelRecord) {
        match record {
            ChannelRecord::Greeting(g) => self.channel_id = Some(g.channel_id),
            ChannelRecord::Packet(p) => {
                self.packets += 1;
                self.sync += u64::from(p.is_sync());
                self.normal_pages += u64::from(p.normal_pages);
                self.zero_pages += u64::from(p.zero_pages);
                if let Payload::Compressed(data) = &p.payload {
                    if p.normal_pages > 0 {
                        self.compressed_packets += 1;
                        self.compressed_bytes += data.len() as u64;
                        let method = format!("{:?}", p.compression().expect("decoded flags"));
                        *self.methods.entry(method.to_lowercase()).or_default() += 1;
                    }
                }
            }
            ChannelRecord::DeviceState(d) => {
                self.device_state_packets += 1;
                self.device_state_bytes += d.data.len() as u64;
            }
            _ => {}
        }
    }
}

impl Shown for ChannelReport {
    fn walked(&self) -> &Walked {
        &self.walked
    }

    fn print(&self, path: &str) -> io::Result<()> {
        outln!(
            "{path}: {} bytes, {} records (multifd channel)",
            self.walked.bytes,
            self.walked.records
        )?;
        match self.channel_id {
            Some(id) => outln!("  channel      {id}")?,
            None => outln!("  channel      (no greeting)")?,
        }
        outln!("  packets      {} (SYNC {})", self.packets, self.sync)?;
        outln!(
            "  pages        normal {}, zero {}",
            self.normal_pages,
            self.zero_pages
        )?;
        let methods: Vec<String> = self.methods.keys().cloned().collect();
        outln!(
            "  compressed   {} packets, {} bytes{}",
            self.compressed_packets,
            self.compressed_bytes,
            match methods.is_empty() {
                true => String::new(),
                false => format!(" ({})", methods.join(", ")),
            }
        )?;
        if self.device_state_packets > 0 {
            outln!(
                "  device state {} packets, {} bytes (opaque)",
                self.device_state_packets,
                self.device_state_bytes
            )?;
        }
        self.walked.print_roundtrip(path)
    }

    fn to_json(&self, path: &str) -> Value {
        json!({
            "file": path,
            "kind": "multifd channel",
            "bytes": self.walked.bytes,
            "records": self.walked.records,
            "channel_id": self.channel_id,
            "packets": self.packets,
            "sync_packets": self.sync,
            "pages": {"normal": self.normal_pages, "zero": self.zero_pages},
            "compressed_packets": self.compressed_packets,
            "compressed_bytes": self.compressed_bytes,
            "compression": self.methods,
            "device_state_packets": self.device_state_packets,
            "device_state_bytes": self.device_state_bytes,
            "roundtrip_ok": self.walked.roundtrip_ok,
            "seconds": self.walked.seconds,
        })
    }
}
