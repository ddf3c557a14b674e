//! `livemig sweep`: run a matrix of `bench` migrations (modes × streams × codecs ×
//! bandwidth caps × content), each in a fresh child process, and write CSV, JSON and
//! an SVG plot of guest GiB/s per mode against link rate.

use std::path::PathBuf;
use std::process::Command;

use clap::Args;
use serde_json::Value;

#[derive(Args, Debug)]
pub struct SweepArgs {
    /// Guest memory per run (e.g. 512M, 2GiB).
    #[arg(long, default_value = "512M", value_parser = super::args::parse_size)]
    memory: u64,
    /// Modes (comma separated).
    #[arg(long, default_value = "standard,compress,multichannel,auto")]
    modes: String,
    /// Stream counts for multichannel/compress/auto (comma separated).
    #[arg(long, default_value = "1,2,4")]
    streams: String,
    /// Codecs for compress mode (comma separated).
    #[arg(long, default_value = "lz4,zstd:1")]
    codecs: String,
    /// Bandwidth caps (comma separated bit rates such as 1gbit; `none` = uncapped).
    #[arg(long, default_value = "1gbit,10gbit,none")]
    bandwidth: String,
    /// Contents (comma separated).
    #[arg(long, default_value = "mix")]
    content: String,
    /// Guest write rate for every run (e.g. 400MB/s; a plain number is MB/s).
    #[arg(long, default_value = "0", value_parser = super::args::parse_rate_mb_s)]
    dirty_rate: u64,
    /// Repetitions per cell (the median is plotted).
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Output directory.
    #[arg(long, default_value = "bench-out/sweep")]
    out: PathBuf,
    /// TCP congestion control of every run's page streams and limits (default: the
    /// system's; see docs/TUNING.md).
    #[arg(long, value_name = "NAME")]
    tcp_congestion: Option<String>,
}

struct Cell {
    mode: String,
    streams: u16,
    codec: String,
    bandwidth: String,
    content: String,
}

fn list(s: &str) -> Vec<String> {
    s.split(',')
        .map(|x| x.trim().to_string())
        .filter(|x| !x.is_empty())
        .collect()
}

pub fn run(a: SweepArgs) -> Result<(), String> {
    std::fs::create_dir_all(&a.out)
        .map_err(|e| format!("cannot create {}: {e}", a.out.display()))?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // Check every cap before the first run, so a typo fails at once, not hours in.
    for bw in list(&a.bandwidth).iter().filter(|b| *b != "none") {
        super::args::parse_bitrate(bw)
            .map_err(|e| format!("invalid value for '--bandwidth': {e}"))?;
    }
    let (memory, dirty_rate) = (format!("{}B", a.memory), format!("{}B/s", a.dirty_rate));
    let mut cells = Vec::new();
    for content in list(&a.content) {
        for bw in list(&a.bandwidth) {
            for mode in list(&a.modes) {
                let streams: Vec<u16> = if mode == "standard" {
                    vec![1]
                } else {
                    list(&a.streams)
                        .iter()
                        .filter_map(|s| s.parse().ok())
                        .collect()
                };
                let codecs = if mode == "compress" {
                    list(&a.codecs)
                } else {
                    vec!["raw".into()]
                };
                for &n in &streams {
                    for c in &codecs {
                        cells.push(Cell {
                            mode: mode.clone(),
                            streams: n,
                            codec: c.clone(),
                            bandwidth: bw.clone(),
                            content: content.clone(),
                        });
                    }
                }
            }
        }
    }
    eprintln!("sweep: {} cells × {} repetitions", cells.len(), a.repeat);
    let mut rows: Vec<Value> = Vec::new();
    let mut csv = String::from(
        "mode,streams,codec,bandwidth,content,run,guest_gib_per_s,wire_gbit_per_s,total_ms,downtime_ms,bytes_on_wire,rounds,verified,limit_wire_gbit_per_s,wire_vs_limit,limit_mem_wire_gbit_per_s,wire_vs_mem_limit\n",
    );
    for (i, c) in cells.iter().enumerate() {
        for rep in 0..a.repeat {
            let mut cmd = Command::new(&exe);
            cmd.args([
                "bench",
                "--json",
                "--memory",
                &memory,
                "--content",
                &c.content,
                "--mode",
                &c.mode,
            ]);
            cmd.args([
                "--streams",
                &c.streams.to_string(),
                "--dirty-rate",
                &dirty_rate,
            ]);
            if c.mode == "compress" {
                cmd.args(["--codec", &c.codec]);
            }
            if let Some(cc) = &a.tcp_congestion {
                cmd.args(["--tcp-congestion", cc]);
            }
            if c.bandwidth != "none" {
                cmd.args(["--bandwidth", &c.bandwidth]);
            } else {
                cmd.arg("--baseline");
            }
            let out = cmd.output().map_err(|e| format!("cannot run bench: {e}"))?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            let last = stdout.lines().last().unwrap_or("");
            let v: Value = match serde_json::from_str(last) {
                Ok(v) if out.status.success() => v,
                _ => {
                    eprintln!(
                        "sweep: cell {} ({} {} streams {} {}) failed: {}",
                        i,
                        c.mode,
                        c.codec,
                        c.streams,
                        c.bandwidth,
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                    continue;
                }
            };
            let f = |k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
            csv.push_str(&format!(
                "{},{},{},{},{},{},{:.4},{:.4},{:.1},{:.2},{},{},{},{:.3},{:.3},{:.3},{:.3}\n",
                c.mode,
                c.streams,
                c.codec,
                c.bandwidth,
                c.content,
                rep,
                f("guest_gib_per_s"),
                f("wire_gbit_per_s"),
                f("total_ms"),
                f("downtime_ms"),
                f("bytes_on_wire"),
                f("rounds"),
                v.get("verified").and_then(Value::as_bool).unwrap_or(false),
                f("limit_wire_gbit_per_s"),
                f("wire_vs_limit"),
                f("limit_mem_wire_gbit_per_s"),
                f("wire_vs_mem_limit"),
            ));
            eprintln!(
                "sweep: {:>12} {:>7} x{} {:>6} {:>5}: {:.2} GiB/s guest, {:.2} Gbit/s wire, {:.0} ms",
                c.mode,
                c.codec,
                c.streams,
                c.bandwidth,
                c.content,
                f("guest_gib_per_s"),
                f("wire_gbit_per_s"),
                f("total_ms")
            );
            let mut row = serde_json::json!({
                "mode": c.mode, "streams": c.streams, "codec": c.codec,
                "bandwidth": c.bandwidth, "content": c.content, "run": rep,
            });
            row["result"] = v;
            rows.push(row);
        }
    }
    std::fs::write(a.out.join("sweep.csv"), &csv).map_err(|e| e.to_string())?;
    std::fs::write(
        a.out.join("sweep.json"),
        serde_json::to_string_pretty(&rows).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let svg = plot(&rows, &list(&a.bandwidth));
    std::fs::write(a.out.join("sweep.svg"), svg).map_err(|e| e.to_string())?;
    println!("{csv}");
    eprintln!(
        "sweep: wrote {}/sweep.csv, sweep.json, sweep.svg",
        a.out.display()
    );
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// Line chart: x = bandwidth cap (categorical, in the order given), y = guest GiB/s
/// (median over repetitions and contents), one series per mode/codec/streams.
fn plot(rows: &[Value], caps: &[String]) -> String {
    let series_key = |r: &Value| {
        format!(
            "{} {} x{}",
            r["mode"].as_str().unwrap_or(""),
            r["codec"].as_str().unwrap_or(""),
            r["streams"]
        )
    };
    let mut keys: Vec<String> = rows.iter().map(series_key).collect();
    keys.sort();
    keys.dedup();
    let mut series = Vec::new();
    let mut ymax: f64 = 0.1;
    for k in &keys {
        let pts: Vec<Option<f64>> = caps
            .iter()
            .map(|cap| {
                let v: Vec<f64> = rows
                    .iter()
                    .filter(|r| {
                        &series_key(r) == k && r["bandwidth"].as_str() == Some(cap.as_str())
                    })
                    .filter_map(|r| r["result"]["guest_gib_per_s"].as_f64())
                    .collect();
                (!v.is_empty()).then(|| median(v))
            })
            .collect();
        for y in pts.iter().flatten() {
            ymax = ymax.max(*y);
        }
        series.push((k.clone(), pts));
    }
    let (w, h, left, right, top, bottom) = (900.0, 520.0, 70.0, 260.0, 40.0, 60.0);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let x = |i: usize| {
        left + if caps.len() > 1 {
            pw * i as f64 / (caps.len() - 1) as f64
        } else {
            pw / 2.0
        }
    };
    let y = |v: f64| top + ph * (1.0 - v / (ymax * 1.1));
    let colors = [
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
        "#bcbd22", "#17becf",
    ];
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" font-size=\"15\">guest GiB/s by mode against link rate (median)</text>\n",
        left
    );
    for t in 0..=5 {
        let v = ymax * 1.1 * t as f64 / 5.0;
        s += &format!(
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.2}</text>\n",
            left + pw,
            left - 6.0,
            y(v) + 4.0,
            yy = y(v)
        );
    }
    for (i, c) in caps.iter().enumerate() {
        s += &format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{c}</text>\n",
            x(i),
            top + ph + 20.0
        );
    }
    s += &format!(
        "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">link rate cap</text>\n",
        left + pw / 2.0,
        h - 15.0
    );
    for (n, (k, pts)) in series.iter().enumerate() {
        let col = colors[n % colors.len()];
        let path: Vec<String> = pts
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.map(|v| format!("{:.1},{:.1}", x(i), y(v))))
            .collect();
        if !path.is_empty() {
            s += &format!(
                "<polyline fill=\"none\" stroke=\"{col}\" stroke-width=\"2\" points=\"{}\"/>\n",
                path.join(" ")
            );
            for p in &path {
                let (px, py) = p.split_once(',').unwrap_or(("0", "0"));
                s += &format!("<circle cx=\"{px}\" cy=\"{py}\" r=\"3\" fill=\"{col}\"/>\n");
            }
        }
        let ly = top + 16.0 * n as f64;
        s += &format!(
            "<rect x=\"{}\" y=\"{:.1}\" width=\"12\" height=\"3\" fill=\"{col}\"/><text x=\"{}\" y=\"{:.1}\">{k}</text>\n",
            left + pw + 15.0,
            ly + 4.0,
            left + pw + 32.0,
            ly + 8.0
        );
    }
    s += "</svg>\n";
    s
}
