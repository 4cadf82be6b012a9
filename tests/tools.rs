//! The example programs as operators use them: `dedup`, `catalog`, `demo` (and the
//! proxy's command line), run as built binaries.
//!
//! Their command lines (`--help`, `--version`, errors naming the option), a closed
//! stdout (`| head`), and output files that appear whole or not at all. The
//! binaries are `target/<profile>/examples/<name>`: `cargo test` builds them, and
//! `cargo build --examples` does before `cargo test --test tools`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

mod support;

use support::example_binary;

const QEMU_7_2: &str = "testdata/qemu-7.2-pc-paused.mig";
const QEMU_10_0: &str = "testdata/qemu-10.0-q35-paused.mig";

/// Runs example `name` with `args` from the crate's root, no stdin.
fn run(name: &str, args: &[&str]) -> Output {
    Command::new(example_binary(name))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts `out` is a command-line error (clap's status 2) whose message holds
/// every one of `words`.
#[track_caller]
fn assert_usage_error(out: &Output, words: &[&str]) {
    assert_exit(out, 2, words);
}

/// Asserts `out` failed (status 1, the program's own error) with `words` in its
/// message.
#[track_caller]
fn assert_failed(out: &Output, words: &[&str]) {
    assert_exit(out, 1, words);
}

/// Asserts `out` exited with `status`, without a panic, and a message on stderr
/// holding every one of `words`.
#[track_caller]
fn assert_exit(out: &Output, status: i32, words: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(status), "stderr: {err}");
    for word in words {
        assert!(err.contains(word), "{word:?} not in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

#[track_caller]
fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "{:?}: {}{}",
        out.status,
        stdout(out),
        stderr(out)
    );
}

/// A scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("migstream-tools-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self, name: &str) -> String {
        self.0.join(name).to_str().unwrap().to_string()
    }

    /// The names of the files in it, sorted.
    fn files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where a destination's templates come from (`templates::DhtArgs`): the flags of
/// `dedup decode` and `proxy destination`.
const RING_FLAGS: &[&str] = &[
    "--catalog",
    "--dht",
    "--replicas",
    "--dht-catalog",
    "--redis-ca",
    "--redis-cert",
    "--redis-key",
];

#[test]
fn help_and_version_of_every_example_and_subcommand() {
    let commands: &[(&str, &[&str])] = &[
        ("dedup", &[]),
        ("dedup", &["encode"]),
        ("dedup", &["decode"]),
        ("catalog", &[]),
        ("catalog", &["build"]),
        ("catalog", &["info"]),
        ("catalog", &["push"]),
        ("catalog", &["verify"]),
        ("demo", &[]),
        ("inspect", &[]),
        ("proxy", &[]),
        ("proxy", &["source"]),
        ("proxy", &["destination"]),
    ];
    for (name, sub) in commands {
        let mut args = sub.to_vec();
        args.push("--help");
        let out = run(name, &args);
        assert_ok(&out);
        let help = stdout(&out);
        assert!(help.contains("Usage:"), "{name} {sub:?} --help: {help}");
        assert!(help.contains("--help"), "{name} {sub:?} --help: {help}");
    }
    for name in ["dedup", "catalog", "demo", "inspect", "proxy"] {
        let out = run(name, &["--version"]);
        assert_ok(&out);
        // the version is migstream's, as the proxy has always said
        assert_eq!(
            stdout(&out).trim(),
            format!("migstream {}", env!("CARGO_PKG_VERSION")),
            "{name} --version"
        );
    }
    // the subcommands and the flags the operators' scripts use, all listed
    let listed: &[(&str, &[&str], &[&str])] = &[
        ("dedup", &[], &["encode", "decode"]),
        (
            "dedup",
            &["encode"],
            &[
                "--catalog",
                "--zstd",
                "--lz4-acceleration",
                "IN.mig",
                "OUT.mz",
            ],
        ),
        ("dedup", &["decode"], RING_FLAGS),
        ("catalog", &[], &["build", "info", "push", "verify"]),
        (
            "catalog",
            &["build"],
            &["--threshold", "--count", "--out", "inputs", "occurrences"],
        ),
        (
            "catalog",
            &["push"],
            &[
                "--nodes",
                "--replicas",
                "--redis-ca",
                "--redis-cert",
                "--redis-key",
            ],
        ),
        ("demo", &[], &["--qemu", "--workload", "--mem"]),
        ("inspect", &[], &["--json", "--roundtrip", "FILE"]),
        (
            "proxy",
            &["destination"],
            &[RING_FLAGS, &["--template-cooldown"]].concat(),
        ),
    ];
    for (name, sub, words) in listed {
        let mut args = sub.to_vec();
        args.push("--help");
        let help = stdout(&run(name, &args));
        for word in *words {
            assert!(
                help.contains(word),
                "{word} not in {name} {sub:?} --help: {help}"
            );
        }
    }
}

#[test]
fn unknown_flags_are_refused_not_taken_for_files() {
    let cases: &[(&str, &[&str])] = &[
        ("dedup", &["encode", "--bogus", QEMU_7_2, "out.mz"]),
        ("dedup", &["decode", "in.mz", "out.mig", "--bogus"]),
        (
            "catalog",
            &[
                "build",
                "--threshold",
                "2",
                "--out",
                "c",
                "--bogus",
                QEMU_7_2,
            ],
        ),
        ("catalog", &["info", "--bogus"]),
        (
            "catalog",
            &["push", "--nodes", "redis://127.0.0.1:1", "--bogus", "c"],
        ),
        (
            "catalog",
            &["verify", "--nodes", "redis://127.0.0.1:1", "--bogus", "c"],
        ),
        ("demo", &["--bogus"]),
        ("inspect", &["--bogus", QEMU_7_2]),
    ];
    for (name, args) in cases {
        let out = run(name, args);
        assert_usage_error(&out, &["--bogus"]);
    }
    // a subcommand that does not exist, and one where none is given
    assert_usage_error(&run("dedup", &["compress", "a", "b"]), &["compress"]);
    assert_usage_error(&run("catalog", &[]), &["Usage:"]);
    // options of one subcommand are not taken by the other
    assert_usage_error(
        &run("dedup", &["encode", "--dht", "redis://h:1", "a", "b"]),
        &["--dht"],
    );
    // --workload and --mem go with --qemu
    assert_usage_error(&run("demo", &["--mem", "512"]), &["--qemu"]);
}

#[test]
fn a_missing_or_bad_value_names_the_option() {
    // (example, arguments, words the usage error must name)
    let usage_errors: &[(&str, &[&str], &[&str])] = &[
        // at the end of the line
        (
            "dedup",
            &["encode", QEMU_7_2, "out.mz", "--catalog"],
            &["--catalog"],
        ),
        ("catalog", &["build", "--threshold"], &["--threshold"]),
        // before another option: that one is not swallowed as the value
        (
            "dedup",
            &["decode", "--catalog", "--dht", "redis://h:1", "a", "b"],
            &["--catalog"],
        ),
        (
            "catalog",
            &["push", "--nodes", "--replicas", "2", "c"],
            &["--nodes"],
        ),
        // a value that does not parse: the option and the value
        (
            "catalog",
            &["build", "--threshold", "two", "--out", "c", QEMU_7_2],
            &["--threshold", "two"],
        ),
        (
            "catalog",
            &[
                "build",
                "--threshold",
                "2",
                "--count",
                "pages",
                "--out",
                "c",
                QEMU_7_2,
            ],
            &["--count", "pages", "inputs", "occurrences"],
        ),
        (
            "dedup",
            &["encode", "--lz4-acceleration", "fast", QEMU_7_2, "o"],
            &["--lz4-acceleration", "fast"],
        ),
        (
            "demo",
            &["--qemu", "--workload", "sleep"],
            &["--workload", "sleep"],
        ),
        (
            "dedup",
            &[
                "decode",
                "--dht",
                "redis://h:1",
                "--dht-catalog",
                "abc",
                "a",
                "b",
            ],
            &["--dht-catalog", "abc", "64 hex digits"],
        ),
        // --catalog or --dht, and the pairs that go together
        (
            "dedup",
            &["decode", "--catalog", "c", "--dht", "redis://h:1", "a", "b"],
            &["--catalog", "--dht"],
        ),
        (
            "dedup",
            &[
                "decode",
                "--dht",
                "redis://h:1",
                "--redis-cert",
                "c.pem",
                "a",
                "b",
            ],
            &["--redis-key"],
        ),
        (
            "dedup",
            &["encode", "--zstd", "3", "--lz4-acceleration", "2", "a", "b"],
            &["--zstd", "--lz4-acceleration"],
        ),
    ];
    for (name, args, words) in usage_errors {
        assert_usage_error(&run(name, args), words);
    }
    // checked once parsed: still named
    assert_failed(
        &run("dedup", &["decode", "--redis-ca", "ca.pem", "a", "b"]),
        &["--redis-ca", "--dht"],
    );
    let dir = Scratch::new("values");
    let out = dir.path("out.mig");
    assert_failed(
        &run(
            "dedup",
            &["decode", "--catalog", "/nonexistent.cat", "a", &out],
        ),
        &["--catalog", "/nonexistent.cat"],
    );
    assert_failed(
        &run(
            "dedup",
            &["decode", "--dht", "@/nonexistent.urls", "a", &out],
        ),
        &["--dht", "/nonexistent.urls"],
    );
    assert_failed(
        &run("catalog", &["info", "/nonexistent.cat"]),
        &["/nonexistent.cat"],
    );
    // zstd's negative levels are values, not flags
    let mz = dir.path("out.mz");
    let out = run("dedup", &["encode", "--zstd", "-5", QEMU_7_2, &mz]);
    if cfg!(feature = "zstd") {
        assert_ok(&out);
        std::fs::remove_file(&mz).unwrap();
    } else {
        assert_failed(&out, &["--zstd needs the zstd feature"]);
    }
    assert!(dir.files().is_empty(), "{:?}", dir.files());
}

#[test]
fn dedup_round_trip_and_a_failed_decode_leaves_no_output() {
    let dir = Scratch::new("dedup");
    let (mz, mig) = (dir.path("in.mz"), dir.path("out.mig"));
    let out = run("dedup", &["encode", QEMU_10_0, &mz]);
    assert_ok(&out);
    let lines = stdout(&out);
    assert!(lines.starts_with("in "), "{lines}");
    assert!(
        lines.contains(" bytes out ") && lines.contains(" GB/s\npages "),
        "{lines}"
    );
    let out = run("dedup", &["decode", &mz, &mig]);
    assert_ok(&out);
    assert!(stdout(&out).starts_with("in "));
    let original = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(QEMU_10_0)).unwrap();
    assert!(
        std::fs::read(&mig).unwrap() == original,
        "decode(encode(x)) != x"
    );
    assert_eq!(dir.files(), ["in.mz", "out.mig"]);

    // the same bytes on one thread (files read and written on it too) and on four
    let encoded = std::fs::read(&mz).unwrap();
    let other = dir.path("other.mz");
    for threads in ["1", "4"] {
        assert_ok(&run(
            "dedup",
            &["encode", "--threads", threads, QEMU_10_0, &other],
        ));
        assert!(
            std::fs::read(&other).unwrap() == encoded,
            "--threads {threads}"
        );
        assert_ok(&run(
            "dedup",
            &["decode", "--threads", threads, &mz, &other],
        ));
        assert!(
            std::fs::read(&other).unwrap() == original,
            "decode --threads {threads}"
        );
    }
    std::fs::remove_file(&other).unwrap();

    // damage in the middle, and a cut: the decoder finds both
    let mut damaged = encoded.clone();
    let middle = damaged.len() / 2;
    for b in &mut damaged[middle..middle + 64] {
        *b ^= 0x5a;
    }
    let cut = &encoded[..encoded.len() * 2 / 3];
    for (name, bytes) in [("damaged.mz", &damaged[..]), ("cut.mz", cut)] {
        let input = dir.path(name);
        std::fs::write(&input, bytes).unwrap();
        let fresh = dir.path("fresh.mig");
        let out = run("dedup", &["decode", &input, &fresh]);
        assert_failed(&out, &[]);
        assert!(stdout(&out).is_empty(), "{name}: {}", stdout(&out));
        assert!(!Path::new(&fresh).exists(), "{name}: a partial output");
        // an output already there stays as it was
        std::fs::write(&mig, b"the operator's file").unwrap();
        assert_failed(&run("dedup", &["decode", &input, &mig]), &[]);
        assert_eq!(std::fs::read(&mig).unwrap(), b"the operator's file");
        std::fs::remove_file(&input).unwrap();
        assert_eq!(
            dir.files(),
            ["in.mz", "out.mig"],
            "{name}: no temporary left"
        );
    }

    // encode: an input that is not a migration stream
    let bad = dir.path("bad.mig");
    std::fs::write(&bad, b"not a QEMU stream at all").unwrap();
    for threads in ["1", "2"] {
        assert_failed(
            &run("dedup", &["encode", "--threads", threads, &bad, &mz]),
            &[],
        );
    }
    assert_eq!(std::fs::read(&mz).unwrap(), encoded, "OUT.mz clobbered");
    let missing = dir.path("missing.mig");
    assert_failed(&run("dedup", &["encode", &missing, &mz]), &["missing.mig"]);
    std::fs::remove_file(&bad).unwrap();
    assert_eq!(dir.files(), ["in.mz", "out.mig"]);
}

/// An output that is not a file (a pipe here; `/dev/null` alike) is written into,
/// not renamed over: the pipe gets the bytes and stays a pipe.
#[test]
fn an_output_that_is_not_a_file_is_written_not_replaced() {
    use std::os::unix::fs::FileTypeExt;
    let dir = Scratch::new("dedup-pipe");
    let (fifo, mz) = (dir.path("pipe"), dir.path("file.mz"));
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success(), "mkfifo");
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read(fifo).unwrap())
    };
    assert_ok(&run(
        "dedup",
        &["encode", "--threads", "1", QEMU_10_0, &fifo],
    ));
    // checked before the join: a pipe renamed over would leave the reader waiting
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    let through_the_pipe = reader.join().unwrap();
    assert_ok(&run("dedup", &["encode", "--threads", "1", QEMU_10_0, &mz]));
    assert!(through_the_pipe == std::fs::read(&mz).unwrap());
}

/// `dedup encode` takes a multifd channel file as well as a main channel, and the
/// decode gives it back whole.
#[test]
fn dedup_round_trip_of_a_multifd_channel_file() {
    let dir = Scratch::new("dedup-channel");
    let (mz, mfd) = (dir.path("ch.mz"), dir.path("ch.mfd"));
    let channel = "testdata/multifd/real-qemu-10.0-q35.mfd";
    assert_ok(&run("dedup", &["encode", channel, &mz]));
    assert_ok(&run("dedup", &["decode", &mz, &mfd]));
    let original = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(channel)).unwrap();
    assert!(
        std::fs::read(&mfd).unwrap() == original,
        "decode(encode(channel)) != channel"
    );
}

#[test]
fn catalog_build_info_and_an_empty_catalog() {
    let dir = Scratch::new("catalog");
    let cat = dir.path("c.cat");
    let build = |args: &[&str]| run("catalog", &[&["build", "--out", &cat], args].concat());
    // two inputs: no page is in three of them
    let out = build(&["--threshold", "3", QEMU_7_2, QEMU_10_0]);
    assert_failed(
        &out,
        &[
            "no page reaches the threshold",
            "--threshold 3",
            "not written",
        ],
    );
    assert!(dir.files().is_empty(), "{:?}", dir.files());
    // nor does an existing catalog get replaced by an empty one
    std::fs::write(&cat, b"the operator's catalog").unwrap();
    let out = build(&["--threshold", "3", QEMU_7_2, QEMU_10_0]);
    assert_failed(&out, &["no page reaches the threshold"]);
    assert_eq!(std::fs::read(&cat).unwrap(), b"the operator's catalog");
    // a failing input: nothing written either
    let missing = dir.path("missing.mig");
    let out = build(&["--threshold", "1", QEMU_7_2, &missing]);
    assert_failed(&out, &["missing.mig"]);
    assert_eq!(std::fs::read(&cat).unwrap(), b"the operator's catalog");
    assert_eq!(dir.files(), ["c.cat"]);

    // every page of one stream, once: a catalog, the lines as before
    let out = build(&["--threshold", "1", "--count", "occurrences", QEMU_7_2]);
    assert_ok(&out);
    let lines = stdout(&out);
    assert!(
        lines.starts_with(&format!("{QEMU_7_2}: QEMU stream, ")),
        "{lines}"
    );
    assert!(
        lines.contains("templates of ") && lines.contains("(Occurrences(1))"),
        "{lines}"
    );
    assert!(lines.contains(&format!("wrote {cat}: ")), "{lines}");
    let id = lines.lines().last().unwrap().strip_prefix("id ").unwrap();
    assert_eq!(id.len(), 64, "{lines}");
    assert_eq!(dir.files(), ["c.cat"]);
    let out = run("catalog", &["info", &cat]);
    assert_ok(&out);
    let info = stdout(&out);
    assert!(info.contains(&format!("  id         {id}\n")), "{info}");
    assert!(info.contains("verified ok"), "{info}");
}

/// Runs example `name` with `args` and a stdout whose reader is already gone.
async fn run_into_closed_pipe(name: &str, args: &[&str]) -> Output {
    let (writer, reader) = tokio::net::unix::pipe::pipe().unwrap();
    drop(reader);
    let writer = writer.into_blocking_fd().unwrap();
    let child = Command::new(example_binary(name))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::task::spawn_blocking(|| child.wait_with_output())
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn a_closed_stdout_is_not_a_panic() {
    let dir = Scratch::new("pipe");
    let (cat, mz) = (dir.path("c.cat"), dir.path("o.mz"));
    // the files are still written and the status is the work's
    let out = run_into_closed_pipe(
        "catalog",
        &["build", "--threshold", "1", "--out", &cat, QEMU_7_2],
    )
    .await;
    assert_ok(&out);
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
    assert!(Path::new(&cat).exists());
    let out = run_into_closed_pipe("catalog", &["info", &cat]).await;
    assert_ok(&out);
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
    let out = run_into_closed_pipe("dedup", &["encode", "--catalog", &cat, QEMU_7_2, &mz]).await;
    assert_ok(&out);
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
    assert_eq!(dir.files(), ["c.cat", "o.mz"]);
    let out = run_into_closed_pipe("inspect", &["--roundtrip", QEMU_7_2]).await;
    assert_ok(&out);
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
    // the demo stops once nobody reads it
    let out = run_into_closed_pipe("demo", &[]).await;
    assert_ok(&out);
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
    // a failure is still one, and said on stderr
    let out = run_into_closed_pipe("catalog", &["info", &mz]).await;
    assert_failed(&out, &["o.mz"]);
}
