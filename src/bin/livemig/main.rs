//! `livemig`: migrate, receive and benchmark VM memory.
//!
//! Why one file of over 600 lines: the argument structs of every subcommand and their
//! dispatch; `sweep`, `serve`, `progress`, `args` and `tls_opts` are already their
//! own files, and bench/send/recv are to follow.

mod args;
mod chaos;
mod progress;
mod serve;
mod sweep;
mod tls_opts;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

use livemig::codec::CodecId;
use livemig::dirty::{DirtyTracker, ExplicitTracker, HashScanTracker};
use livemig::engine::{
    CancelToken, DowntimePolicy, HostSlots, Migration, MigrationConfig, MigrationError, Mode,
    OnLimit, Verify,
};
use livemig::memory::{DirtyBitmap, GuestMemory, GuestRegion};
use livemig::receiver::{Receiver, ReceiverConfig};
use livemig::stats::{Event, MigrationReport, ProgressSink};
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
    /// Log more on stderr: -v info, -vv debug, -vvv trace (default: warnings).
    /// `RUST_LOG` (e.g. `livemig=debug`) overrides it. Logs never go to stdout.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
}

/// Send the library's `tracing` output to stderr, filtered by `RUST_LOG` when set,
/// otherwise by the `-v` count.
fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var(EnvFilter::DEFAULT_ENV) {
        Ok(spec) if !spec.trim().is_empty() => EnvFilter::new(spec),
        _ => EnvFilter::new(match verbose {
            0 => "warn",
            1 => "info",
            2 => "debug",
            _ => "trace",
        }),
    };
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Migrate a simulated running guest to a destination in this process over loopback.
    Bench(BenchArgs),
    /// Send a stopped guest's memory image to a `livemig recv`.
    Send(SendArgs),
    /// Receive one migration and optionally write the memory to a file, or (with
    /// `--serve`) serve many migrations until SIGINT/SIGTERM.
    Recv(RecvArgs),
    /// Run a matrix of benches and write CSV, JSON and an SVG plot.
    Sweep(sweep::SweepArgs),
    /// Ask a destination what became of a migration whose source is in doubt
    /// (exit status 3 from `send`/`bench`): prints committed (the VM runs on the
    /// destination: discard the paused source), discarded (resume the source),
    /// in_progress or unknown.
    Resolve(ResolveArgs),
    /// Run a fault campaign: many small migrations with random faults, each
    /// checked against the paused source (docs/FAULTS.md, "The fault campaign").
    Chaos(chaos::ChaosArgs),
    /// Measure this machine's limits: memcpy and raw loopback TCP.
    Limits {
        /// TCP streams.
        #[arg(long, default_value_t = 2)]
        streams: u16,
        /// TCP congestion control of the sending sockets (default: the system's).
        #[arg(long, value_name = "NAME")]
        tcp_congestion: Option<String>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModeArg {
    Standard,
    Compress,
    Multichannel,
    Auto,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum TrackerArg {
    Explicit,
    Uffd,
    Hash,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum GuestPagesArg {
    Huge,
    Small,
}

impl GuestPagesArg {
    fn name(self) -> &'static str {
        match self {
            Self::Huge => "huge",
            Self::Small => "small",
        }
    }

    /// The default for a tracker: huge, but small for userfaultfd's write-protection.
    fn resolve(choice: Option<Self>, tracker: TrackerArg) -> Self {
        choice.unwrap_or(if tracker == TrackerArg::Uffd {
            Self::Small
        } else {
            Self::Huge
        })
    }
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
    /// Most clean pages the sampled tracker audit re-hashes per round (0: off).
    #[arg(long, default_value_t = livemig::proof::AuditConfig::default().sample_pages)]
    audit_sample_pages: u32,
    /// Skip the audit of the paused source after switchover.
    #[arg(long)]
    no_post_audit: bool,
    /// Downtime target (e.g. 50ms, 0.05s; a plain number is milliseconds).
    #[arg(long, default_value = "50ms", value_parser = args::parse_ms)]
    downtime_target: Duration,
    /// Maximum pre-copy rounds.
    #[arg(long, default_value_t = 30)]
    max_rounds: u32,
    /// Maximum pre-copy time (e.g. 10m, 90s; a plain number is seconds).
    #[arg(long, default_value = "300s", value_parser = args::parse_secs)]
    max_time: Duration,
    /// At a round/time limit: force brownout or cancel.
    #[arg(long, value_enum, default_value = "force")]
    on_limit: OnLimitArg,
    /// Cap the page streams' total send rate (e.g. 1G, 10gbit, 500M; bits/s).
    #[arg(long, value_parser = args::parse_bitrate)]
    bandwidth: Option<u64>,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
    /// Do not throttle the guest when it outruns the link (auto-converge off).
    #[arg(long)]
    no_auto_converge: bool,
    /// Defer pages dirtied in this many consecutive rounds to the final round (0: off).
    #[arg(long, default_value_t = 3)]
    hot_page_rounds: u32,
    /// Expected device-state save/transfer/restore time, counted in the prediction
    /// (e.g. 5ms; a plain number is milliseconds).
    #[arg(long, default_value = "0ms", value_parser = args::parse_ms)]
    device_state_ms: Duration,
    /// Write the event stream to this file as JSON lines.
    #[arg(long)]
    events: Option<PathBuf>,
    /// Send re-sent pages as XOR deltas against their previously sent version.
    #[arg(long)]
    delta: bool,
    /// Delta cache budget (default: 1/16 of guest memory, 1M to 1G).
    #[arg(long, value_parser = args::parse_size)]
    delta_cache: Option<u64>,
    /// Send raw pages with vmsplice + splice (no sender copy) instead of writev, on
    /// TCP page streams. Slower over loopback here; meant for real NICs.
    #[arg(long)]
    splice: bool,
    /// Give up on a destination that takes no data or stops answering for this long
    /// (write deadline, TCP keepalive and TCP_USER_TIMEOUT on every stream).
    #[arg(long, default_value = "20s", value_parser = args::parse_secs)]
    peer_timeout: Duration,
    /// When the connection breaks during the rounds, keep trying to resume the
    /// migration for this long (the VM runs meanwhile); 0 never resumes.
    #[arg(long, default_value = "30s", value_parser = args::parse_secs)]
    reconnect_timeout: Duration,
    /// TCP congestion control of the streams this side opens, which carry the
    /// pages (e.g. cubic; default: the system's). On a VM host, BBR's internal
    /// pacing timers cost a VM exit each: see docs/TUNING.md.
    #[arg(long, value_name = "NAME")]
    tcp_congestion: Option<String>,
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// Do not pre-fault the destination's memory during round 0 (it is only done on
    /// a host with more CPUs than page streams plus one).
    #[arg(long)]
    no_prefault: bool,
    /// Commit all destination memory during setup, before any page is sent (the
    /// spec's skeleton VM; QEMU's -mem-prealloc). Setup takes longer, the transfer
    /// then writes into resident memory; a host that cannot commit it fails before
    /// any page moves.
    #[arg(long, conflicts_with = "no_prefault")]
    prealloc: bool,
    /// Do not ask for transparent huge pages on the destination.
    #[arg(long)]
    no_huge_pages: bool,
    /// Guest memory size (e.g. 2GiB, 2G, 512MiB; K/M/G/T are powers of 1024).
    #[arg(long, default_value = "1G", value_parser = args::parse_size)]
    memory: u64,
    /// How the source guest's memory is mapped: `huge` asks for transparent huge
    /// pages, as QEMU and Cloud Hypervisor do for guest RAM; `small` keeps 4 KiB
    /// pages. Default: huge, except with `--tracker uffd`, whose write-protection
    /// reports a whole 2 MiB page for one write to it.
    #[arg(long, value_enum)]
    guest_pages: Option<GuestPagesArg>,
    /// Page content: mix, zero, random, text.
    #[arg(long, default_value = "mix")]
    content: Content,
    /// Guest write rate (e.g. 400MB/s, 1GB/s; a plain number is MB/s; 0: idle guest).
    #[arg(long, default_value = "100MB/s", value_parser = args::parse_rate_mb_s)]
    dirty_rate: u64,
    /// Hot-set size the dirtier writes over (e.g. 64M).
    #[arg(long, default_value = "64M", value_parser = args::parse_size)]
    hot_set: u64,
    /// Write spread over the hot set.
    #[arg(long, value_enum, default_value = "uniform")]
    skew: SkewArg,
    /// Move the hot set after this long (phase change; e.g. 2s; a plain number is
    /// milliseconds).
    #[arg(long, value_parser = args::parse_ms)]
    phase_change_ms: Option<Duration>,
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
    /// Run this many migrations of the configured guest at once (each with its own
    /// memory, dirtier and receiver).
    #[arg(long, default_value_t = 1)]
    concurrent: usize,
    /// Simultaneous migrations allowed on this host; extra ones queue (FIFO).
    #[arg(long, default_value_t = livemig::engine::slots::DEFAULT_HOST_SLOTS)]
    slots: usize,
    #[command(flatten)]
    opts: MigrateOpts,
    #[command(flatten)]
    tls: tls_opts::TlsOpts,
    /// Run every stream over mutual TLS with an ephemeral CA and two certificates
    /// generated in memory (no files needed).
    #[arg(long)]
    tls_self_signed: bool,
}

#[derive(Args, Debug)]
struct SendArgs {
    /// Destination address (host:port), or several comma-separated addresses of the
    /// same destination (one per migration network) in priority order: streams go to
    /// the first that answers.
    #[arg(long, value_delimiter = ',', required = true)]
    to: Vec<String>,
    /// Memory image of the stopped guest.
    #[arg(long)]
    image: PathBuf,
    #[command(flatten)]
    opts: MigrateOpts,
    #[command(flatten)]
    tls: tls_opts::TlsOpts,
    /// Send in cleartext without authenticating the destination (required when no
    /// --tls-* flag is given).
    #[arg(long)]
    plaintext: bool,
}

#[derive(Args, Debug)]
struct ResolveArgs {
    /// Destination address (host:port), as given to `send --to`.
    #[arg(long)]
    to: String,
    /// Session id, as reported by `send --json` / `bench --json` (`session`).
    #[arg(long)]
    session: String,
    /// Keep asking while the answer is in_progress or the destination does not
    /// answer, up to this many seconds.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Exit status when the outcome is in doubt: the source VM is paused and only
/// `livemig resolve` can tell whether to resume or discard it.
const EXIT_IN_DOUBT: i32 = 3;

/// A command's failure and its exit status.
#[derive(Debug)]
struct CliError {
    message: String,
    code: i32,
}

impl From<String> for CliError {
    fn from(message: String) -> Self {
        Self { message, code: 1 }
    }
}

impl CliError {
    fn of(e: &MigrationError) -> Self {
        Self {
            message: e.to_string(),
            code: if matches!(e, MigrationError::InDoubt { .. }) {
                EXIT_IN_DOUBT
            } else {
                1
            },
        }
    }
}

/// The `outcome` / `session` keys of a failed migration's JSON.
fn failure_json(e: &MigrationError) -> Value {
    match e {
        MigrationError::InDoubt { session, reason } => json!({
            "outcome": "in_doubt",
            "session": livemig::receiver::outcomes::session_to_string(*session),
            "in_doubt_reason": reason.to_string(),
        }),
        _ => json!({ "outcome": "failed" }),
    }
}

#[derive(Args, Debug)]
struct RecvArgs {
    /// Address to listen on (host:port).
    #[arg(long)]
    listen: String,
    /// Write the received memory here.
    #[arg(long, conflicts_with = "serve")]
    out: Option<PathBuf>,
    /// Print one JSON object as the last line of stdout (with `--serve`: one JSON
    /// line per event: listening, queued, session start and end, refused
    /// connection, stopped).
    #[arg(long)]
    json: bool,
    /// Serve many migrations, one after another and at once, until SIGINT/SIGTERM
    /// (then running ones finish). Stray connections are refused without
    /// disturbing them.
    #[arg(long)]
    serve: bool,
    /// With `--serve`: migrations received at once; later ones queue (FIFO).
    #[arg(long, requires = "serve", default_value_t = livemig::service::DEFAULT_MAX_SESSIONS)]
    max_sessions: usize,
    /// With `--serve`: write each received guest to DIR/<session>.img (otherwise
    /// it is discarded once verified).
    #[arg(long, requires = "serve")]
    out_dir: Option<PathBuf>,
    /// Commit all guest memory during setup, before any page is sent; refuse the
    /// migration if this host cannot. With `--memory`: commit it when `recv`
    /// starts, before listening.
    #[arg(long)]
    prealloc: bool,
    /// Prepare SIZE of guest memory (e.g. 2G) when `recv` starts, before
    /// listening, as a VMM started for an incoming migration does. A guest whose
    /// memory is exactly SIZE in one region at address 0 uses it (nothing is
    /// allocated at setup); any other guest is refused, naming both sizes.
    #[arg(long, value_name = "SIZE", value_parser = args::parse_size, conflicts_with = "serve")]
    memory: Option<u64>,
    /// Keep the record of sessions' outcomes in this file too, so that a source in
    /// doubt (or `livemig resolve`) can still learn them from a restarted `recv`.
    #[arg(long)]
    outcome_log: Option<PathBuf>,
    /// After a migration whose source may not know the outcome, keep answering
    /// its outcome queries for up to this many seconds.
    #[arg(long, default_value_t = 60)]
    outcome_linger: u64,
    /// Give up on a source that takes no data or stops answering for this long
    /// (write deadline, TCP keepalive and TCP_USER_TIMEOUT on every stream).
    #[arg(long, default_value = "20s", value_parser = args::parse_secs)]
    peer_timeout: Duration,
    /// Keep a session whose connection broke during the rounds this long for its
    /// source to resume it; 0 fails it at once.
    #[arg(long, default_value = "60s", value_parser = args::parse_secs)]
    resume_window: Duration,
    /// Refuse a guest needing more than SIZE of memory here (e.g. 2G). Default:
    /// what this host can commit (MemAvailable and the cgroup limit).
    #[arg(long, value_name = "SIZE", value_parser = args::parse_size)]
    max_memory: Option<u64>,
    #[command(flatten)]
    tls: tls_opts::TlsOpts,
    /// Accept a cleartext, unauthenticated source (required when no --tls-* flag
    /// is given).
    #[arg(long)]
    plaintext: bool,
}

fn main() {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let r = match cli.cmd {
        Cmd::Bench(a) => bench(a),
        Cmd::Send(a) => send(a),
        Cmd::Recv(a) => recv(a).map_err(CliError::from),
        Cmd::Resolve(a) => resolve(a),
        Cmd::Chaos(a) => chaos::run(a),
        Cmd::Sweep(a) => sweep::run(a).map_err(CliError::from),
        Cmd::Limits {
            streams,
            tcp_congestion,
        } => livemig::limits::measure(streams, tcp_congestion.as_deref())
            .map_err(|e| e.to_string())
            .and_then(|l| {
                println!("{}", serde_json::to_string(&l).map_err(|e| e.to_string())?);
                Ok(())
            })
            .map_err(CliError::from),
    };
    if let Err(e) = r {
        eprintln!("livemig: error: {}", e.message);
        std::process::exit(e.code);
    }
}

fn config_of(o: &MigrateOpts) -> Result<MigrationConfig, String> {
    let (mode, streams, codec, level) = match o.mode {
        ModeArg::Standard => (Mode::Standard, 1, CodecId::Raw, 1),
        ModeArg::Multichannel => (Mode::Multichannel, o.streams.max(1), CodecId::Raw, 1),
        ModeArg::Auto => (Mode::Auto, o.streams.max(1), CodecId::Raw, 1),
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
    Ok({
        let mut settings = MigrationConfig::default();
        settings.mode = mode;
        settings.streams = streams;
        settings.codec = codec;
        settings.zstd_level = level;
        settings.verify = match o.verify {
            VerifyArg::Digest => Verify::Digest,
            VerifyArg::Full => Verify::Full,
        };
        settings.bandwidth = o
            .bandwidth
            .map(livemig::transport::shaped::TokenBucket::new);
        settings.expected_device_state = o.device_state_ms;
        settings.delta = o.delta;
        settings.delta_cache_bytes = o.delta_cache.unwrap_or(0);
        settings.splice = o.splice;
        // Heartbeat silence uses the same limit as the streams' deadlines.
        settings.peer_timeout = o.peer_timeout;
        settings.reconnect_timeout = o.reconnect_timeout;
        settings.audit = livemig::proof::AuditConfig {
            sample_pages: o.audit_sample_pages,
            ..Default::default()
        };
        settings.post_audit = !o.no_post_audit;
        settings
    })
}

/// The congestion control of the page streams: the one asked for, else the system's.
fn congestion_in_use(o: &MigrateOpts) -> Option<String> {
    o.tcp_congestion
        .clone()
        .or_else(livemig::transport::tcp::default_congestion)
}

fn policy_of(o: &MigrateOpts) -> DowntimePolicy {
    let mut p = DowntimePolicy::with_target(o.downtime_target);
    p.max_rounds = o.max_rounds;
    p.max_time = o.max_time;
    p.on_limit = match o.on_limit {
        OnLimitArg::Cancel => OnLimit::Cancel,
        OnLimitArg::Force => OnLimit::ForceBrownout,
    };
    p.auto_converge = !o.no_auto_converge;
    p.hot_page_rounds = o.hot_page_rounds;
    p
}

type EventFile = Arc<std::sync::Mutex<std::io::BufWriter<std::fs::File>>>;

/// The sinks for one migration: the `--events` file (lines tagged with the
/// migration's index) and, on a terminal, a progress bar.
fn sinks_of(
    o: &MigrateOpts,
    index: usize,
    file: Option<EventFile>,
    bar: bool,
) -> Option<Arc<dyn ProgressSink>> {
    let mut v: Vec<Arc<dyn ProgressSink>> =
        vec![Arc::new(livemig::stats::sink::TracingSink::new())];
    if let Some(f) = file {
        v.push(Arc::new(move |e: &Event| {
            use std::io::Write;
            if let Ok(mut j) = serde_json::to_value(e) {
                if let Some(obj) = j.as_object_mut() {
                    obj.insert("migration".into(), json!(index));
                }
                let mut f = f.lock().expect("events lock");
                let _ = writeln!(f, "{j}");
                // Flush all but the frequent progress events, so a reader
                // following the file sees phases as they happen.
                if !matches!(e, Event::Progress { .. }) {
                    let _ = f.flush();
                }
            }
        }));
    }
    if bar && !o.json {
        use std::io::IsTerminal;
        if std::io::stdout().is_terminal() {
            v.push(Arc::new(progress::Bar::new(&format!("migration {index}"))));
        }
    }
    match v.len() {
        0 => None,
        1 => v.pop(),
        _ => Some(Arc::new(livemig::stats::sink::Tee(v))),
    }
}

fn open_events(o: &MigrateOpts) -> Result<Option<EventFile>, String> {
    o.events
        .as_ref()
        .map(|p| {
            std::fs::File::create(p)
                .map(|f| Arc::new(std::sync::Mutex::new(std::io::BufWriter::new(f))))
                .map_err(|e| format!("cannot create {}: {e}", p.display()))
        })
        .transpose()
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
        "downtime {:.2} ms (predicted {:.2} ms = {:.2} ms x margin {:.2} on its time-dependent part): pause {:.2}, final harvest {:.2}, final pages {:.2}, device state {:.2}, digest {:.2}, commit {:.2} (dest verify {:.2}, restore {:.2})",
        r.downtime_ms,
        r.predicted_downtime_ms,
        r.predicted_downtime_raw_ms,
        r.prediction_margin,
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
    let post = match &r.post_audit {
        Some(a) => format!(
            "after switchover {} pages, {} stale ({:.0} ms)",
            a.pages, a.mismatches, a.ms
        ),
        None => "after switchover off".into(),
    };
    println!(
        "audit: {} clean pages sampled ({:.1} ms), {} tracker misses{}; {post}",
        r.audit_pages_checked,
        r.audit_ms,
        r.audit_misses,
        if r.tracker_fallback {
            " (fell back to a hash scan against what was sent)"
        } else {
            ""
        }
    );
    for d in &r.auto_decisions {
        println!("auto: {d}");
    }
    for rs in &r.round_table {
        println!(
            "  round {:>2}: {:>8} pages ({:>7} zero) {:>7.1} ms {:>6.2} Gbit/s, dirty after {:>7}{}",
            rs.round,
            rs.pages,
            rs.zero_pages,
            rs.duration_ms,
            rs.bandwidth_bps * 8.0 / 1e9,
            rs.dirty_after,
            if rs.prediction_margin > 0.0 {
                format!(
                    ", predicted downtime {:.2} ms (margin {:.2}){}",
                    rs.predicted_downtime_ms,
                    rs.prediction_margin,
                    if rs.prediction_error > 0.0 {
                        format!(", round took {:.2}x its prediction", rs.prediction_error)
                    } else {
                        String::new()
                    }
                )
            } else {
                " (final round)".to_string()
            }
        );
    }
}

fn bench(a: BenchArgs) -> Result<(), CliError> {
    let n = a.concurrent.max(1);
    let slots = Arc::new(HostSlots::new(a.slots));
    let tokens: Vec<CancelToken> = (0..n).map(|_| CancelToken::new()).collect();
    progress::cancel_on_interrupt(tokens.clone());
    let events = open_events(&a.opts)?;
    let tls = a.tls.bench(a.tls_self_signed)?;
    if n == 1 {
        return bench_one(&a, 0, slots, tokens[0].clone(), events, tls).map(|_| ());
    }
    let a = Arc::new(a);
    let t0 = Instant::now();
    let handles: Vec<_> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, tok)| {
            let (a, slots, events, tls) = (a.clone(), slots.clone(), events.clone(), tls.clone());
            std::thread::spawn(move || bench_one(&a, i, slots, tok, events, tls))
        })
        .collect();
    let results: Vec<_> = handles
        .into_iter()
        .map(|h| {
            h.join()
                .unwrap_or_else(|_| Err(CliError::from("bench thread panicked".to_string())))
        })
        .collect();
    let wall_ms = t0.elapsed().as_secs_f64() * 1e3;
    let ok: Vec<&Value> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    // Fair sharing: Jain's index over the per-migration wire rates.
    let rates: Vec<f64> = ok
        .iter()
        .filter_map(|v| v["wire_gbit_per_s"].as_f64())
        .collect();
    let jain = if rates.is_empty() {
        0.0
    } else {
        let sum: f64 = rates.iter().sum();
        sum * sum / (rates.len() as f64 * rates.iter().map(|r| r * r).sum::<f64>())
    };
    if a.opts.json {
        let runs: Vec<Value> = results
            .iter()
            .map(|r| match r {
                Ok(v) => v.clone(),
                Err(e) => json!({ "error": e.message }),
            })
            .collect();
        println!(
            "{}",
            json!({ "concurrent": n, "slots": a.slots, "wall_ms": wall_ms,
                    "fairness_jain": jain, "runs": runs })
        );
    } else {
        println!(
            "{n} migrations, {} slot(s): {} succeeded in {wall_ms:.0} ms; fairness (Jain, wire rates {rates:.2?} Gbit/s) {jain:.3}",
            a.slots,
            ok.len()
        );
    }
    match results.into_iter().find_map(Result::err) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn bench_one(
    a: &BenchArgs,
    index: usize,
    slots: Arc<HostSlots>,
    cancel: CancelToken,
    events: Option<EventFile>,
    tls: Option<Arc<tls_opts::BenchTls>>,
) -> Result<Value, CliError> {
    let o = &a.opts;
    let tag = if a.concurrent > 1 {
        format!("[{index}] ")
    } else {
        String::new()
    };
    let config = config_of(o)?;
    let guest_pages = GuestPagesArg::resolve(a.guest_pages, a.tracker);
    let mem = Arc::new(
        GuestMemory::anonymous(a.memory as usize, guest_pages == GuestPagesArg::Huge)
            .map_err(|e| e.to_string())?,
    );
    let t_fill = Instant::now();
    workload::fill(&mem, a.content, a.seed, 2).map_err(|e| e.to_string())?;
    let fill_ms = t_fill.elapsed().as_secs_f64() * 1e3;
    if !o.json {
        println!(
            "{tag}guest: {} MiB of {} content on {} pages, filled in {fill_ms:.0} ms",
            a.memory >> 20,
            a.content.name(),
            guest_pages.name()
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
            rate_bytes_per_s: a.dirty_rate,
            hot_set_bytes: a.hot_set,
            skew: match a.skew {
                SkewArg::Uniform => Skew::Uniform,
                SkewArg::Hot8020 => Skew::Hot80_20,
            },
            phase_change_after: a.phase_change_ms,
            seed: a.seed + index as u64,
            ..Default::default()
        },
    );
    let limits = if a.baseline {
        Some(
            livemig::limits::measure(config.streams, o.tcp_congestion.as_deref())
                .map_err(|e| format!("measuring limits: {e}"))?,
        )
    } else {
        None
    };
    let acceptor = TcpAcceptor::bind("127.0.0.1:0")
        .map_err(|e| e.to_string())?
        .peer_timeout(o.peer_timeout);
    let addr = acceptor
        .local_addr()
        .map_err(|e| e.to_string())?
        .to_string();
    let (acceptor, connector): tls_opts::BenchEnds = match &tls {
        Some(t) => t.wrap(
            acceptor,
            TcpConnector::new(addr).congestion(o.tcp_congestion.clone()),
        )?,
        None => (
            Box::new(acceptor),
            Box::new(TcpConnector::new(addr).congestion(o.tcp_congestion.clone())),
        ),
    };
    let (rtx, rrx) = crossbeam_channel::bounded(1);
    let (prefault, prealloc, huge_pages) = (!a.no_prefault, a.prealloc, !a.no_huge_pages);
    let receiver = std::thread::spawn(move || {
        let log = Arc::new(livemig::receiver::OutcomeLog::default());
        let r = Receiver::new()
            .outcome_log(log.clone())
            .config({
                let mut settings = ReceiverConfig::default();
                // Queued migrations connect late: wait as long as the slot queue may.
                settings.accept_timeout = Duration::from_secs(600);
                settings.prefault = prefault;
                settings.prealloc = prealloc;
                settings.huge_pages = huge_pages;
                settings
            })
            .run(&*acceptor);
        let _ = rtx.send(r);
        // A source in doubt asks here before it gives up.
        log.serve(&*acceptor, Duration::from_secs(60));
    });
    let vm = dirtier.control();
    let mut mig = Migration::new(mem.clone())
        .tracker(tracker)
        .vm_control(Box::new(vm.clone()))
        .policy(Box::new(policy_of(o)))
        .config(config)
        .slots(slots)
        .cancel_token(cancel);
    if let Some(s) = sinks_of(o, index, events, a.concurrent == 1) {
        mig = mig.progress(s);
    }
    let result = mig.run(&*connector);
    let writes = dirtier.writes();
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            // The source keeps running (the engine resumed it if it had paused it).
            let source_running = !vm.is_paused();
            drop(dirtier);
            // The destination discards what it received; it may never have been
            // contacted (cancelled while queued), so do not wait for it long.
            let dest = match rrx.recv_timeout(Duration::from_secs(10)) {
                Ok(Ok(_)) => "completed (unexpected)".to_string(),
                Ok(Err(de)) => format!("discarded: {de}"),
                Err(_) => "not contacted".to_string(),
            };
            if receiver.is_finished() {
                let _ = receiver.join();
            }
            let cancelled = matches!(e, MigrationError::Cancelled);
            let aborted = matches!(e, MigrationError::PolicyAbort(_));
            if o.json {
                let mut v = json!({ "error": e.to_string(), "cancelled": cancelled,
                            "policy_abort": aborted, "source_running": source_running,
                            "destination": dest, "converged": false, "verified": false,
                            "dirty_rate_mb_s": a.dirty_rate as f64 / 1e6, "hot_set_bytes": a.hot_set,
                            "skew": format!("{:?}", a.skew),
                            "guest_writes": writes, "migration": index,
                            "tls": tls.is_some() });
                if let (Some(obj), Value::Object(f)) = (v.as_object_mut(), failure_json(&e)) {
                    obj.extend(f);
                }
                println!("{v}");
            }
            return Err(CliError {
                message: format!(
                    "{tag}{e} (source {}; destination {dest})",
                    if source_running { "running" } else { "PAUSED" }
                ),
                code: CliError::of(&e).code,
            });
        }
    };
    let received = rrx
        .recv()
        .map_err(|_| "receiver thread panicked".to_string())?;
    let _ = receiver.join();
    // The source stays paused after a successful switchover; stop the simulated CPUs.
    drop(dirtier);
    let received = received.map_err(|e| e.to_string())?;
    // Full-memory comparison (outside the downtime): the destination must equal the
    // source as it was at brownout (the source has been paused since).
    let t_cmp = Instant::now();
    let src = mem.full_digest(2).map_err(|e| e.to_string())?;
    let dst = received.memory.full_digest(2).map_err(|e| e.to_string())?;
    let compare_ms = t_cmp.elapsed().as_secs_f64() * 1e3;
    let memory_equal = src == dst;
    if !o.json {
        if !tag.is_empty() {
            println!("{tag}migration {index}:");
        }
        summary(&report);
        println!(
            "verification: digest matched ({}), audits {}, full memory compare {} ({compare_ms:.0} ms), dirtier wrote {writes} pages",
            report.digest,
            if report.verified { "passed" } else { "FOUND STALE PAGES" },
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
    obj.insert("outcome".into(), json!("committed"));
    obj.insert("content".into(), json!(a.content.name()));
    obj.insert("guest_pages".into(), json!(guest_pages.name()));
    obj.insert("dirty_rate_mb_s".into(), json!(a.dirty_rate as f64 / 1e6));
    obj.insert("hot_set_bytes".into(), json!(a.hot_set));
    obj.insert("guest_writes".into(), json!(writes));
    obj.insert("migration".into(), json!(index));
    obj.insert("skew".into(), json!(format!("{:?}", a.skew)));
    obj.insert("tls".into(), json!(tls.is_some()));
    obj.insert("tcp_congestion".into(), json!(congestion_in_use(o)));
    obj.insert(
        "receiver".into(),
        serde_json::to_value(&received.report).map_err(|e| e.to_string())?,
    );
    if let Some(l) = &limits {
        let ratio = report.wire_gbit_per_s / l.tcp_gbit_per_s;
        obj.insert("limit_wire_gbit_per_s".into(), json!(l.tcp_gbit_per_s));
        obj.insert("limit_memcpy_gb_per_s".into(), json!(l.memcpy_gb_per_s));
        obj.insert("limit_tcp_congestion".into(), json!(l.congestion));
        obj.insert("wire_vs_limit".into(), json!(ratio));
        let mem_ratio = report.wire_gbit_per_s / l.mem_tcp_gbit_per_s;
        obj.insert(
            "limit_mem_wire_gbit_per_s".into(),
            json!(l.mem_tcp_gbit_per_s),
        );
        obj.insert("wire_vs_mem_limit".into(), json!(mem_ratio));
        obj.insert(
            "transfer_vs_limit".into(),
            json!(report.transfer_wire_gbit_per_s / l.tcp_gbit_per_s),
        );
        if !o.json {
            println!(
                "limits (same run): memcpy {:.1} GB/s, loopback TCP {:.1} Gbit/s with {} stream(s) ({}); this migration's wire rate is {:.0} % of it",
                l.memcpy_gb_per_s,
                l.tcp_gbit_per_s,
                l.streams,
                l.congestion,
                ratio * 100.0
            );
            println!(
                "  raw TCP from cold memory into fresh memory: {:.1} Gbit/s; this migration's wire rate is {:.0} % of it",
                l.mem_tcp_gbit_per_s,
                mem_ratio * 100.0
            );
        }
    }
    if o.json && a.concurrent == 1 {
        println!("{}", serde_json::to_string(&v).map_err(|e| e.to_string())?);
    }
    if !memory_equal {
        return Err(format!("{tag}destination memory differs from the source").into());
    }
    Ok(v)
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

fn send(a: SendArgs) -> Result<(), CliError> {
    let addrs: Vec<&str> =
        a.to.iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .collect();
    let tcp = Arc::new(
        TcpConnector::with_addrs(addrs.iter().copied())
            .peer_timeout(a.opts.peer_timeout)
            .congestion(a.opts.tcp_congestion.clone()),
    );
    let (connector, tls) = a.tls.connector(
        tcp.clone(),
        addrs.first().copied().unwrap_or(""),
        a.plaintext,
    )?;
    let region = GuestRegion::image_file(0, &a.image).map_err(|e| e.to_string())?;
    let mem = Arc::new(GuestMemory::new(vec![region]).map_err(|e| e.to_string())?);
    let guest_bytes = mem.total_bytes();
    // The image is file-backed: every anonymous byte is the engine's own.
    let rss = livemig::stats::rss::AnonRssSampler::start(Duration::from_millis(5));
    let cancel = CancelToken::new();
    progress::cancel_on_interrupt(vec![cancel.clone()]);
    let mut mig = Migration::new(mem)
        .policy(Box::new(policy_of(&a.opts)))
        .config(config_of(&a.opts)?)
        .cancel_token(cancel);
    if let Some(s) = sinks_of(&a.opts, 0, open_events(&a.opts)?, true) {
        mig = mig.progress(s);
    }
    let report = match mig.run(&*connector) {
        Ok(r) => r,
        Err(e) => {
            if a.opts.json {
                let mut v = json!({ "error": e.to_string(),
                                    "source_running": e.source_running(), "tls": tls });
                if let (Some(obj), Value::Object(f)) = (v.as_object_mut(), failure_json(&e)) {
                    obj.extend(f);
                }
                println!("{v}");
            }
            let mut err = CliError::of(&e);
            err.message = format!("migration to {} failed: {e}", connector.describe());
            return Err(err);
        }
    };
    let connected_to = tcp.active_addr().unwrap_or_default().to_string();
    let rss = rss.map(|s| s.finish());
    if a.opts.json {
        let mut v = serde_json::to_value(&report).map_err(|e| e.to_string())?;
        if let Some(obj) = v.as_object_mut() {
            obj.insert("outcome".into(), json!("committed"));
            obj.insert("connected_to".into(), json!(connected_to));
            obj.insert("tls".into(), json!(tls));
            obj.insert("tcp_congestion".into(), json!(congestion_in_use(&a.opts)));
        }
        if let (Some(r), Some(obj)) = (rss, v.as_object_mut()) {
            obj.insert("sender_anon_rss_start_bytes".into(), json!(r.start_bytes));
            obj.insert("sender_anon_rss_peak_bytes".into(), json!(r.peak_bytes));
            obj.insert(
                "sender_overhead_vs_guest".into(),
                json!(r.peak_bytes as f64 / guest_bytes as f64),
            );
        }
        println!("{}", serde_json::to_string(&v).map_err(|e| e.to_string())?);
    } else {
        summary(&report);
        println!("destination: {connected_to} (of {})", a.to.join(","));
        if let Some(r) = rss {
            println!(
                "sender memory: peak anonymous RSS {:.1} MiB = {:.2} % of the guest",
                r.peak_bytes as f64 / (1u64 << 20) as f64,
                r.peak_bytes as f64 * 100.0 / guest_bytes as f64
            );
        }
    }
    Ok(())
}

fn recv(a: RecvArgs) -> Result<(), String> {
    if a.serve {
        let tls = a.tls.server_config(a.plaintext)?;
        if a.max_sessions == 0 {
            return Err("--max-sessions must be at least 1".into());
        }
        let config = livemig::service::ServiceConfig {
            max_sessions: a.max_sessions,
            stop_on_signals: true,
            peer_timeout: a.peer_timeout,
            tls,
            ..Default::default()
        };
        let receiver = {
            let mut settings = ReceiverConfig::default();
            settings.prealloc = a.prealloc;
            settings.max_memory = a.max_memory;
            settings.control_timeout = a.peer_timeout;
            settings.resume_window = a.resume_window;
            settings
        };
        return serve::run(&a.listen, config, receiver, a.out_dir, a.json);
    }
    let config = {
        let mut settings = ReceiverConfig::default();
        settings.prealloc = a.prealloc;
        settings.max_memory = a.max_memory;
        settings.outcome_linger = Duration::from_secs(a.outcome_linger);
        // The source's heartbeats come several times per peer timeout.
        settings.control_timeout = a.peer_timeout;
        settings.resume_window = a.resume_window;
        settings
    };
    let identity = a.tls.recv_identity(a.plaintext)?;
    // Sampled from before guest memory exists: with --prealloc (the whole guest
    // resident), peak − guest size is what the receiver costs beyond the guest.
    let rss = livemig::stats::rss::AnonRssSampler::start(Duration::from_millis(5));
    let mut receiver = Receiver::new();
    if let Some(bytes) = a.memory {
        if let Some(max) = a.max_memory.filter(|max| bytes > *max) {
            return Err(format!(
                "--memory {bytes} bytes exceeds --max-memory {max} bytes"
            ));
        }
        let m = livemig::receiver::prepare_memory(bytes, &config).map_err(|e| {
            format!(
                "cannot {} {bytes} bytes of guest memory: {e}",
                if a.prealloc { "commit" } else { "allocate" }
            )
        })?;
        receiver = receiver.prepared_memory(m);
    }
    let tcp = TcpAcceptor::bind(&a.listen)
        .map_err(|e| e.to_string())?
        .peer_timeout(a.peer_timeout);
    let local = tcp.local_addr().map_err(|e| e.to_string())?;
    let (acceptor, tls) = a.tls.acceptor(tcp, identity)?;
    if !a.json {
        eprintln!(
            "listening on {local} ({})",
            if tls { "mutual TLS" } else { "plaintext" }
        );
    }
    let log = Arc::new(match &a.outcome_log {
        Some(p) => {
            livemig::receiver::OutcomeLog::open(p, livemig::receiver::outcomes::DEFAULT_CAPACITY)
                .map_err(|e| e.to_string())?
        }
        None => livemig::receiver::OutcomeLog::default(),
    });
    let linger = config.outcome_linger;
    let span = livemig::stats::sink::receive_span();
    let result = span.in_scope(|| {
        receiver
            .config(config)
            .outcome_log(log.clone())
            .run(&*acceptor)
    });
    livemig::stats::sink::trace_receive_outcome(&span, &result);
    // A source that released the VM but may not know the outcome asks: answer it
    // (after reporting, so the report is not held up).
    let serve = || {
        if log.awaiting_query() > 0 {
            if !a.json {
                eprintln!(
                    "answering outcome queries for up to {}s (the source may be in doubt)",
                    a.outcome_linger
                );
            }
            log.serve(&*acceptor, linger);
        }
    };
    let received = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("livemig: error: {e}");
            serve();
            return Err(e.to_string());
        }
    };
    if let Some(path) = &a.out {
        write_image(&received.memory, path)?;
    }
    let r = &received.report;
    let rss = rss.map(|s| s.finish());
    if a.json {
        let mut v = serde_json::to_value(r).map_err(|e| e.to_string())?;
        let obj = v.as_object_mut().expect("object");
        obj.insert(
            "guest_gib_per_s".into(),
            json!(r.memory_bytes as f64 / (1u64 << 30) as f64 / (r.total_ms / 1e3)),
        );
        if let Some(rss) = rss {
            obj.insert(
                "receiver_anon_rss_start_bytes".into(),
                json!(rss.start_bytes),
            );
            obj.insert("receiver_anon_rss_peak_bytes".into(), json!(rss.peak_bytes));
            // Only with --prealloc is the whole guest resident (zero pages included).
            if a.prealloc {
                obj.insert(
                    "receiver_anon_rss_beyond_guest_bytes".into(),
                    json!(rss.peak_bytes.saturating_sub(r.memory_bytes)),
                );
            }
        }
        obj.insert("tls".into(), json!(tls));
        println!("{}", serde_json::to_string(&v).map_err(|e| e.to_string())?);
    } else {
        println!(
            "received {} bytes in {:.0} ms over {} stream(s), {} rounds, digest {} verified",
            r.memory_bytes, r.total_ms, r.streams, r.rounds, r.digest
        );
    }
    serve();
    Ok(())
}

fn resolve(a: ResolveArgs) -> Result<(), CliError> {
    let session =
        livemig::receiver::outcomes::parse_session(&a.session).map_err(|e| e.to_string())?;
    let connector = TcpConnector::new(a.to.clone());
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    let r = livemig::engine::commit::resolve(&connector, session, Duration::from_secs(5), deadline);
    let (outcome, detail) = match &r {
        Ok(o) => (o.name(), None),
        Err(why) => ("unresolved", Some(why.to_string())),
    };
    let advice = match r {
        Ok(livemig::wire::control::SessionOutcome::Committed) => {
            "the VM runs on the destination: discard the paused source"
        }
        Ok(livemig::wire::control::SessionOutcome::Discarded) => {
            "the destination dropped the VM: resume the source"
        }
        _ => "still unknown: keep the source paused and ask again",
    };
    if a.json {
        println!(
            "{}",
            json!({ "session": a.session, "outcome": outcome, "detail": detail,
                    "advice": advice })
        );
    } else {
        println!("{outcome}");
        eprintln!(
            "{advice}{}",
            detail.map(|d| format!(" ({d})")).unwrap_or_default()
        );
    }
    if r.is_ok() {
        Ok(())
    } else {
        Err(CliError {
            message: format!("session {} is still in doubt", a.session),
            code: EXIT_IN_DOUBT,
        })
    }
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
