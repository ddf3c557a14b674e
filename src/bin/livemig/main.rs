//! `livemig`: migrate, receive and benchmark VM memory.

mod args;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

use livemig::codec::CodecId;
use livemig::dirty::{DirtyTracker, ExplicitTracker, HashScanTracker};
use livemig::engine::{DowntimePolicy, Migration, MigrationConfig, Mode, OnLimit, Verify};
use livemig::memory::{DirtyBitmap, GuestMemory, GuestRegion};
use livemig::receiver::{Receiver, ReceiverConfig};
use livemig::stats::MigrationReport;
use livemig::transport::tcp::{TcpAcceptor, TcpConnector};
use livemig::workload::{self, Content, Dirtier, DirtierConfig, Skew};

#[derive(Parser, Debug)]
#[command(
    name = "livemig",
    version,
    about = "Pre-copy live migration of VM memory"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Migrate a simulated running guest to a destination in this process over loopback.
    Bench(BenchArgs),
    /// Send a stopped guest's memory image to a `livemig recv`.
    Send(SendArgs),
    /// Receive one migration and optionally write the memory to a file.
    Recv(RecvArgs),
    /// Measure this machine's limits: memcpy and raw loopback TCP.
    Limits {
        /// TCP streams.
        #[arg(long, default_value_t = 2)]
        streams: u16,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModeArg {
    Standard,
    Compress,
    Multichannel,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum TrackerArg {
    Explicit,
    Uffd,
    Hash,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum VerifyArg {
    Digest,
    Full,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum OnLimitArg {
    Cancel,
    Force,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum SkewArg {
    Uniform,
    #[value(name = "80-20")]
    Hot8020,
}

/// Transport and policy options shared by `bench` and `send`.
#[derive(Args, Debug, Clone)]
struct MigrateOpts {
    /// Transport mode.
    #[arg(long, value_enum, default_value = "multichannel")]
    mode: ModeArg,
    /// Page streams (standard always uses 1).
    #[arg(long, default_value_t = 2)]
    streams: u16,
    /// Codec for `compress`: lz4 or zstd[:LEVEL].
    #[arg(long, default_value = "lz4")]
    codec: String,
    /// Proof of no loss: digest (per-page hashes) or full (also rescan source memory at brownout).
    #[arg(long, value_enum, default_value = "digest")]
    verify: VerifyArg,
    /// Downtime target in milliseconds.
    #[arg(long, default_value_t = 50)]
    downtime_target: u64,
    /// Maximum pre-copy rounds.
    #[arg(long, default_value_t = 30)]
    max_rounds: u32,
    /// Maximum pre-copy time in seconds.
    #[arg(long, default_value_t = 300)]
    max_time: u64,
    /// At a round/time limit: force brownout or cancel.
    #[arg(long, value_enum, default_value = "force")]
    on_limit: OnLimitArg,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
    /// Send re-sent pages as XOR deltas against their previously sent version.
    #[arg(long)]
    delta: bool,
    /// Delta cache budget (default: 1/16 of guest memory, 1M to 1G).
    #[arg(long, value_parser = args::parse_size)]
    delta_cache: Option<u64>,
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// Guest memory size.
    #[arg(long, default_value = "1G", value_parser = args::parse_size)]
    memory: u64,
    /// Page content: mix, zero, random, text.
    #[arg(long, default_value = "mix")]
    content: Content,
    /// Dirtier rate in MB/s (0: idle guest).
    #[arg(long, default_value_t = 100.0)]
    dirty_rate: f64,
    /// Hot-set size the dirtier writes over.
    #[arg(long, default_value = "64M", value_parser = args::parse_size)]
    hot_set: u64,
    /// Write spread over the hot set.
    #[arg(long, value_enum, default_value = "uniform")]
    skew: SkewArg,
    /// Move the hot set after this many milliseconds (phase change).
    #[arg(long)]
    phase_change_ms: Option<u64>,
    /// Dirty tracker.
    #[arg(long, value_enum, default_value = "explicit")]
    tracker: TrackerArg,
    /// Content seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Measure memcpy and raw loopback TCP (same stream count) right before the
    /// migration and report the ratio `wire_vs_limit`.
    #[arg(long)]
    baseline: bool,
    #[command(flatten)]
    opts: MigrateOpts,
}

#[derive(Args, Debug)]
struct SendArgs {
    /// Destination address (host:port).
    #[arg(long)]
    to: String,
    /// Memory image of the stopped guest.
    #[arg(long)]
    image: PathBuf,
    #[command(flatten)]
    opts: MigrateOpts,
}

#[derive(Args, Debug)]
struct RecvArgs {
    /// Address to listen on (host:port).
    #[arg(long)]
    listen: String,
    /// Write the received memory here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Bench(a) => bench(a),
        Cmd::Send(a) => send(a),
        Cmd::Recv(a) => recv(a),
        Cmd::Limits { streams } => livemig::limits::measure(streams)
            .map_err(|e| e.to_string())
            .and_then(|l| {
                println!("{}", serde_json::to_string(&l).map_err(|e| e.to_string())?);
                Ok(())
            }),
    };
    if let Err(e) = r {
        eprintln!("livemig: error: {e}");
        std::process::exit(1);
    }
}

fn config_of(o: &MigrateOpts) -> Result<MigrationConfig, String> {
    let (mode, streams, codec, level) = match o.mode {
        ModeArg::Standard => (Mode::Standard, 1, CodecId::Raw, 1),
        ModeArg::Multichannel => (Mode::Multichannel, o.streams.max(1), CodecId::Raw, 1),
        ModeArg::Compress => {
            let (name, level) = match o.codec.split_once(':') {
                Some((n, l)) => (
                    n,
                    l.parse::<i32>()
                        .map_err(|_| format!("bad zstd level in {:?}", o.codec))?,
                ),
                None => (o.codec.as_str(), 1),
            };
            let codec = match name {
                "lz4" => CodecId::Lz4,
                "zstd" => CodecId::Zstd,
                other => {
                    return Err(format!(
                        "unknown codec {other:?} (expected lz4 or zstd[:LEVEL])"
                    ))
                }
            };
            (Mode::Compress, o.streams.max(1), codec, level)
        }
    };
    Ok(MigrationConfig {
        mode,
        streams,
        codec,
        zstd_level: level,
        verify: match o.verify {
            VerifyArg::Digest => Verify::Digest,
            VerifyArg::Full => Verify::Full,
        },
        delta: o.delta,
        delta_cache_bytes: o.delta_cache.unwrap_or(0),
        ..Default::default()
    })
}

fn policy_of(o: &MigrateOpts) -> DowntimePolicy {
    DowntimePolicy {
        target: Duration::from_millis(o.downtime_target),
        max_rounds: o.max_rounds,
        max_time: Duration::from_secs(o.max_time),
        on_limit: match o.on_limit {
            OnLimitArg::Cancel => OnLimit::Cancel,
            OnLimitArg::Force => OnLimit::ForceBrownout,
        },
    }
}

fn summary(r: &MigrationReport) {
    println!(
        "migrated {:.2} GiB in {:.0} ms ({:.2} GiB/s guest, {:.2} Gbit/s wire) over {} {} stream(s), tracker {}",
        r.memory_bytes as f64 / (1u64 << 30) as f64,
        r.total_ms,
        r.guest_gib_per_s,
        r.wire_gbit_per_s,
        r.streams,
        r.mode,
        r.tracker
    );
    println!(
        "rounds {}  pages sent {}  zero pages {}  bytes on wire {}  final pages {}",
        r.rounds, r.pages_sent, r.zero_pages, r.bytes_on_wire, r.final_pages
    );
    let b = &r.downtime_breakdown;
    println!(
        "downtime {:.2} ms (predicted {:.2} ms): pause {:.2}, final harvest {:.2}, final pages {:.2}, device state {:.2}, digest {:.2}, commit {:.2} (dest verify {:.2}, restore {:.2})",
        r.downtime_ms,
        r.predicted_downtime_ms,
        b.pause_ms,
        b.final_harvest_ms,
        b.final_pages_ms,
        b.device_state_ms,
        b.digest_ms,
        b.commit_ms,
        b.dest_verify_ms,
        b.dest_restore_ms
    );
    println!("brownout: {}", r.brownout_reason);
    for rs in &r.round_table {
        println!(
            "  round {:>2}: {:>8} pages ({:>7} zero) {:>7.1} ms {:>6.2} Gbit/s, dirty after {:>7}, predicted downtime {:.2} ms",
            rs.round,
            rs.pages,
            rs.zero_pages,
            rs.duration_ms,
            rs.bandwidth_bps * 8.0 / 1e9,
            rs.dirty_after,
            rs.predicted_downtime_ms
        );
    }
}

fn bench(a: BenchArgs) -> Result<(), String> {
    let o = &a.opts;
    let config = config_of(o)?;
    let mem =
        Arc::new(GuestMemory::anonymous(a.memory as usize, false).map_err(|e| e.to_string())?);
    let t_fill = Instant::now();
    workload::fill(&mem, a.content, a.seed, 2).map_err(|e| e.to_string())?;
    let fill_ms = t_fill.elapsed().as_secs_f64() * 1e3;
    if !o.json {
        println!(
            "guest: {} MiB of {} content, filled in {fill_ms:.0} ms",
            a.memory >> 20,
            a.content.name()
        );
    }
    let bitmap = Arc::new(DirtyBitmap::new(mem.total_pages()));
    let tracker: Box<dyn DirtyTracker> = match a.tracker {
        TrackerArg::Explicit => Box::new(ExplicitTracker::new(bitmap.clone())),
        TrackerArg::Hash => Box::new(HashScanTracker::new(2)),
        TrackerArg::Uffd => uffd_tracker()?,
    };
    let dirtier = Dirtier::start(
        mem.clone(),
        (a.tracker == TrackerArg::Explicit).then(|| bitmap.clone()),
        DirtierConfig {
            rate_bytes_per_s: (a.dirty_rate * 1e6) as u64,
            hot_set_bytes: a.hot_set,
            skew: match a.skew {
                SkewArg::Uniform => Skew::Uniform,
                SkewArg::Hot8020 => Skew::Hot80_20,
            },
            phase_change_after: a.phase_change_ms.map(Duration::from_millis),
            seed: a.seed,
            ..Default::default()
        },
    );
    let acceptor = TcpAcceptor::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = acceptor
        .local_addr()
        .map_err(|e| e.to_string())?
        .to_string();
    let receiver = std::thread::spawn(move || {
        Receiver::new()
            .config(ReceiverConfig::default())
            .run(&acceptor)
    });
    let result = Migration::new(mem.clone())
        .tracker(tracker)
        .vm_control(Box::new(dirtier.control()))
        .policy(Box::new(policy_of(o)))
        .config(config)
        .run(&TcpConnector::new(addr));
    let received = receiver
        .join()
        .map_err(|_| "receiver thread panicked".to_string())?;
    let writes = dirtier.writes();
    // The source stays paused after a successful switchover; stop the simulated CPUs.
    drop(dirtier);
    let report = result.map_err(|e| e.to_string())?;
    let received = received.map_err(|e| e.to_string())?;
    // Full-memory comparison (outside the downtime): the destination must equal the
    // source as it was at brownout (the source has been paused since).
    let t_cmp = Instant::now();
    let src = mem.full_digest(2).map_err(|e| e.to_string())?;
    let dst = received.memory.full_digest(2).map_err(|e| e.to_string())?;
    let compare_ms = t_cmp.elapsed().as_secs_f64() * 1e3;
    let memory_equal = src == dst;
    if !o.json {
        summary(&report);
        println!(
            "verification: digest {} ({}), full memory compare {} ({compare_ms:.0} ms), dirtier wrote {writes} pages",
            if report.verified { "matched" } else { "MISMATCH" },
            report.digest,
            if memory_equal { "equal" } else { "DIFFERENT" }
        );
    }
    let mut v = serde_json::to_value(&report).map_err(|e| e.to_string())?;
    let obj = v.as_object_mut().expect("object");
    obj.insert(
        "verified".into(),
        Value::Bool(report.verified && memory_equal),
    );
    obj.insert("memory_equal".into(), Value::Bool(memory_equal));
    obj.insert("content".into(), json!(a.content.name()));
    obj.insert("dirty_rate_mb_s".into(), json!(a.dirty_rate));
    obj.insert("hot_set_bytes".into(), json!(a.hot_set));
    obj.insert("guest_writes".into(), json!(writes));
    obj.insert(
        "receiver".into(),
        serde_json::to_value(&received.report).map_err(|e| e.to_string())?,
    );
    if o.json {
        println!("{}", serde_json::to_string(&v).map_err(|e| e.to_string())?);
    }
    if !memory_equal {
        return Err("destination memory differs from the source".into());
    }
    Ok(())
}

#[cfg(feature = "uffd")]
fn uffd_tracker() -> Result<Box<dyn DirtyTracker>, String> {
    Ok(Box::new(livemig::dirty::uffd::UffdTracker::new(
        livemig::dirty::uffd::UffdMode::Auto,
    )))
}

#[cfg(not(feature = "uffd"))]
fn uffd_tracker() -> Result<Box<dyn DirtyTracker>, String> {
    Err("this build has no userfaultfd support (feature `uffd`)".into())
}

fn send(a: SendArgs) -> Result<(), String> {
    let region = GuestRegion::image_file(0, &a.image).map_err(|e| e.to_string())?;
    let mem = Arc::new(GuestMemory::new(vec![region]).map_err(|e| e.to_string())?);
    let report = Migration::new(mem)
        .policy(Box::new(policy_of(&a.opts)))
        .config(config_of(&a.opts)?)
        .run(&TcpConnector::new(a.to.clone()))
        .map_err(|e| e.to_string())?;
    if a.opts.json {
        println!(
            "{}",
            serde_json::to_string(&report).map_err(|e| e.to_string())?
        );
    } else {
        summary(&report);
    }
    Ok(())
}

fn recv(a: RecvArgs) -> Result<(), String> {
    let acceptor = TcpAcceptor::bind(&a.listen).map_err(|e| e.to_string())?;
    if !a.json {
        eprintln!(
            "listening on {}",
            acceptor.local_addr().map_err(|e| e.to_string())?
        );
    }
    let received = Receiver::new().run(&acceptor).map_err(|e| e.to_string())?;
    if let Some(path) = &a.out {
        write_image(&received.memory, path)?;
    }
    let r = &received.report;
    if a.json {
        let mut v = serde_json::to_value(r).map_err(|e| e.to_string())?;
        let obj = v.as_object_mut().expect("object");
        obj.insert(
            "guest_gib_per_s".into(),
            json!(r.memory_bytes as f64 / (1u64 << 30) as f64 / (r.total_ms / 1e3)),
        );
        println!("{}", serde_json::to_string(&v).map_err(|e| e.to_string())?);
    } else {
        println!(
            "received {} bytes in {:.0} ms over {} stream(s), {} rounds, digest {} verified",
            r.memory_bytes, r.total_ms, r.streams, r.rounds, r.digest
        );
    }
    Ok(())
}

fn write_image(mem: &GuestMemory, path: &PathBuf) -> Result<(), String> {
    use std::io::Write;
    let mut f = std::io::BufWriter::with_capacity(
        1 << 20,
        std::fs::File::create(path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?,
    );
    let mut buf = vec![0u8; 1 << 20];
    let mut i = 0;
    let total = mem.total_pages();
    while i < total {
        let n = (total - i)
            .min(256)
            .min(mem.pages_left_in_region(i).map_err(|e| e.to_string())?);
        let bytes = n as usize * livemig::PAGE_SIZE;
        mem.read_pages(i, &mut buf[..bytes])
            .map_err(|e| e.to_string())?;
        f.write_all(&buf[..bytes]).map_err(|e| e.to_string())?;
        i += n;
    }
    f.flush().map_err(|e| e.to_string())
}
