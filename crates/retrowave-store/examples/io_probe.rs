//! Measures random aligned reads through each path of the disk tier I/O engine.
//!
//! Writes a file (default 1 GiB), then for a fixed time per path (default 5 s) reads random
//! blocks (default 8 KiB) at random block-aligned offsets, keeping `--qd` (default 64) in flight on
//! io_uring, with and without registered buffers, and one at a time with `pread`. Prints MB/s
//! and IOPS, and the matching `fio` command line for comparison:
//!
//! ```text
//! cargo run --release -p retrowave-store --example io_probe -- --file /data/probe.dat
//! ```
//!
//! Options: `--file PATH` (default: a file in the temp dir, removed afterwards unless `--keep`),
//! `--size N[kmg]`, `--bs N[kmg]`, `--qd N`, `--secs S`, `--reuse` (skip writing if the file
//! already has the size), `--buffered` (no O_DIRECT), `--keep`, `--paths uring,fixed,pread`
//! (which paths to measure, in that order), `--ops-per-call N` (ops per `submit` call, default
//! 16 x qd; each call ends by draining the queue).

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use retrowave_store::io::{
    AlignedBuf, IO_ALIGN, IoChoice, IoEngine, IoFile, IoOp, IoOptions, OpKind,
};

struct Args {
    file: Option<PathBuf>,
    size: u64,
    bs: usize,
    qd: u32,
    secs: f64,
    reuse: bool,
    direct: bool,
    keep: bool,
    paths: Vec<String>,
    per_call: Option<usize>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim().to_ascii_lowercase();
    let (num, mult) = match s.chars().last() {
        Some('k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('m') => (&s[..s.len() - 1], 1 << 20),
        Some('g') => (&s[..s.len() - 1], 1 << 30),
        _ => (&s[..], 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("bad size {s:?} (expected e.g. 8k, 64m, 1g)"))
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        file: None,
        size: 1 << 30,
        bs: 8 << 10,
        qd: 64,
        secs: 5.0,
        reuse: false,
        direct: true,
        keep: false,
        paths: vec!["uring".into(), "fixed".into(), "pread".into()],
        per_call: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--file" => a.file = Some(PathBuf::from(value()?)),
            "--size" => a.size = parse_size(&value()?)?,
            "--bs" => a.bs = parse_size(&value()?)? as usize,
            "--qd" => a.qd = value()?.parse().map_err(|e| format!("--qd: {e}"))?,
            "--secs" => a.secs = value()?.parse().map_err(|e| format!("--secs: {e}"))?,
            "--reuse" => a.reuse = true,
            "--buffered" => a.direct = false,
            "--keep" => a.keep = true,
            "--ops-per-call" => {
                a.per_call = Some(
                    value()?
                        .parse()
                        .map_err(|e| format!("--ops-per-call: {e}"))?,
                )
            }
            "--paths" => a.paths = value()?.split(',').map(str::to_string).collect(),
            "-h" | "--help" => {
                return Err(
                    "usage: io_probe [--file PATH] [--size 1g] [--bs 8k] [--qd 64] [--secs 5] \
                            [--reuse] [--buffered] [--keep] [--paths uring,fixed,pread] [--ops-per-call N]"
                        .into(),
                );
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    if a.bs == 0
        || !a.bs.is_multiple_of(IO_ALIGN)
        || a.size < a.bs as u64
        || !a.size.is_multiple_of(a.bs as u64)
    {
        return Err(format!(
            "block size {} must be a non-zero multiple of {IO_ALIGN} dividing the file size {}",
            a.bs, a.size
        ));
    }
    Ok(a)
}

fn engine(choice: IoChoice, qd: u32) -> Result<IoEngine, String> {
    IoEngine::new(&IoOptions {
        choice,
        queue_depth: qd,
        direct: true,
    })
    .map_err(|e| e.to_string())
}

/// Writes `size` bytes of pseudo-random data in 1 MiB blocks.
fn write_file(file: &IoFile, size: u64, qd: u32) -> Result<(), String> {
    let e = engine(IoChoice::Auto, qd)?;
    let block = 1usize << 20;
    let per_call = 32usize;
    let mut buf = AlignedBuf::zeroed(per_call * block);
    let mut rng = StdRng::seed_from_u64(1);
    for chunk in buf.chunks_mut(8) {
        chunk.copy_from_slice(&rng.next_u64().to_le_bytes()[..chunk.len()]);
    }
    let base = buf.as_mut_ptr();
    let started = Instant::now();
    let mut offset = 0u64;
    while offset < size {
        let ops: Vec<IoOp<'_>> = (0..per_call)
            .map(|i| (i, offset + (i * block) as u64))
            .take_while(|&(_, off)| off < size)
            .map(|(i, off)| IoOp {
                file,
                offset: off,
                buf: base.wrapping_add(i * block),
                len: block.min((size - off) as usize),
                kind: OpKind::Write,
            })
            .collect();
        offset += (ops.len() * block) as u64;
        // SAFETY: disjoint parts of `buf`, which outlives the call.
        for r in unsafe { e.submit(&ops) } {
            r.map_err(|e| e.to_string())?;
        }
    }
    // SAFETY: fsync on an open descriptor.
    unsafe { libc::fsync(std::os::fd::AsRawFd::as_raw_fd(file)) };
    let secs = started.elapsed().as_secs_f64();
    println!(
        "wrote {} MiB in {secs:.2} s ({:.0} MB/s, {} path)",
        size >> 20,
        size as f64 / secs / 1e6,
        e.path()
    );
    Ok(())
}

struct Outcome {
    ops: u64,
    secs: f64,
}

/// Random reads of `bs` bytes for `secs` seconds.
fn random_reads(e: &IoEngine, file: &IoFile, a: &Args, fixed: bool) -> Result<Outcome, String> {
    // Enough ops per call that the tail of each batch (depth draining to 0) costs little.
    let per_call = a
        .per_call
        .unwrap_or(a.qd as usize * 16)
        .clamp(1, (256 << 20) / a.bs);
    let mut buf = AlignedBuf::zeroed(per_call * a.bs);
    let base = buf.as_mut_ptr();
    if fixed {
        // SAFETY: `buf` outlives the registration (dropped before `buf` below).
        unsafe { e.register_buffers(&[(base, buf.len())]) }.map_err(|e| e.to_string())?;
    }
    let blocks = a.size / a.bs as u64;
    let mut rng = StdRng::seed_from_u64(42);
    let limit = Duration::from_secs_f64(a.secs);
    let started = Instant::now();
    let mut done = 0u64;
    while started.elapsed() < limit {
        let ops: Vec<IoOp<'_>> = (0..per_call)
            .map(|i| IoOp {
                file,
                offset: rng.next_u64() % blocks * a.bs as u64,
                buf: base.wrapping_add(i * a.bs),
                len: a.bs,
                kind: OpKind::Read,
            })
            .collect();
        // SAFETY: disjoint parts of `buf`.
        for r in unsafe { e.submit(&ops) } {
            r.map_err(|e| e.to_string())?;
        }
        done += ops.len() as u64;
    }
    let secs = started.elapsed().as_secs_f64();
    if fixed {
        // SAFETY: dropping the registration.
        unsafe { e.register_buffers(&[]) }.map_err(|e| e.to_string())?;
    }
    drop(buf);
    Ok(Outcome { ops: done, secs })
}

fn run() -> Result<(), String> {
    let a = parse_args()?;
    let path = a
        .file
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("retrowave-io-probe.dat"));
    let existing = std::fs::metadata(&path).map(|m| m.len()).ok();
    let file = if a.reuse && existing == Some(a.size) {
        println!("reusing {} ({} MiB)", path.display(), a.size >> 20);
        IoFile::open(&path, a.direct).map_err(|e| e.to_string())?
    } else {
        let f = IoFile::create(&path, a.direct).map_err(|e| e.to_string())?;
        write_file(&f, a.size, a.qd)?;
        f
    };
    println!(
        "file {} ({} MiB, O_DIRECT {}), random reads of {} KiB, qd {}, {} s per path",
        path.display(),
        a.size >> 20,
        file.is_direct(),
        a.bs >> 10,
        a.qd,
        a.secs
    );
    let mut modes: Vec<(&str, IoEngine, bool)> = Vec::new();
    for p in &a.paths {
        let (name, choice, fixed) = match p.as_str() {
            "uring" => ("io_uring", IoChoice::Uring, false),
            "fixed" => ("io_uring+fixed", IoChoice::Uring, true),
            "pread" => ("pread (qd 1)", IoChoice::Pread, false),
            other => {
                return Err(format!(
                    "unknown path {other:?} in --paths (uring, fixed, pread)"
                ));
            }
        };
        match engine(choice, a.qd) {
            Ok(e) => modes.push((name, e, fixed)),
            Err(why) => println!("{name}: {why}"),
        }
    }
    println!(
        "{:<16} {:>10} {:>10} {:>10} {:>8}",
        "path", "MB/s", "MiB/s", "IOPS", "max qd"
    );
    for (name, e, fixed) in &modes {
        let o = random_reads(e, &file, &a, *fixed)?;
        let bytes = (o.ops * a.bs as u64) as f64;
        println!(
            "{name:<16} {:>10.1} {:>10.1} {:>10.0} {:>8}",
            bytes / o.secs / 1e6,
            bytes / o.secs / (1 << 20) as f64,
            o.ops as f64 / o.secs,
            e.stats().max_in_flight
        );
    }
    println!(
        "compare: fio --name=randread --filename={} --ioengine=io_uring --direct={} --rw=randread \
         --bs={}k --iodepth={} --size={} --runtime={} --time_based --group_reporting",
        path.display(),
        u8::from(a.direct),
        a.bs >> 10,
        a.qd,
        a.size,
        a.secs.ceil()
    );
    drop(file);
    if a.file.is_none() && !a.keep {
        let _ = std::fs::remove_file(&path);
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("io_probe: {e}");
            ExitCode::FAILURE
        }
    }
}
