//! Command-line quantities as people type them: one parser per kind.
//!
//! | kind | parser | accepted | plain number |
//! |---|---|---|---|
//! | size | [`parse_size`] | `4096`, `64K`, `512M`, `512MiB`, `2G`, `2GiB`, `2GB`, `1.5T` (K/M/G/T are powers of 1024) | bytes |
//! | data rate | [`parse_rate_mb_s`] | `400`, `400MB/s`, `1.5GB/s`, `64MiB/s`, `800KB/s`, `1000000B/s` (KB/MB/GB decimal, KiB/MiB/GiB binary) | MB/s |
//! | duration | [`parse_ms`], [`parse_secs`] | `50ms`, `0.05s`, `500us`, `90s`, `10m`, `1h`, `1m30s` | ms or s (per flag) |
//! | bit rate | [`parse_bitrate`] | `1gbit`, `10Gbit/s`, `500M`, `2.5gbps`, `100mbit` (decimal) | bits/s |
//!
//! Every parser returns a [`UnitError`] that says what was wrong and which forms are
//! accepted; clap prefixes it with the flag's name.

use std::time::Duration;

/// A quantity on the command line that could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UnitError {
    /// No number where one was expected.
    #[error("{input:?} is not a {kind}: expected {forms}")]
    NotANumber {
        /// What was typed.
        input: String,
        /// Which kind of quantity.
        kind: &'static str,
        /// The accepted forms.
        forms: &'static str,
    },
    /// A number with a unit this kind does not know.
    #[error("unknown unit {unit:?} in {input:?} for a {kind}: expected {forms}")]
    UnknownUnit {
        /// The unit as typed.
        unit: String,
        /// What was typed.
        input: String,
        /// Which kind of quantity.
        kind: &'static str,
        /// The accepted forms.
        forms: &'static str,
    },
    /// Negative, not finite, or too large for the quantity.
    #[error("{input:?} is out of range for a {kind}")]
    OutOfRange {
        /// What was typed.
        input: String,
        /// Which kind of quantity.
        kind: &'static str,
    },
}

const SIZE_FORMS: &str =
    "bytes with an optional K, M, G or T suffix (powers of 1024), e.g. 4096, 512M, 2GiB";
const RATE_FORMS: &str =
    "MB/s as a plain number, or a number with B/s, KB/s, MB/s, GB/s (decimal) or KiB/s, MiB/s, GiB/s, e.g. 400, 400MB/s, 1.5GB/s";
const MS_FORMS: &str =
    "milliseconds as a plain number, or a number with us, ms, s, m or h, e.g. 50, 50ms, 0.05s";
const SECS_FORMS: &str =
    "seconds as a plain number, or a number with us, ms, s, m or h, e.g. 300, 90s, 10m, 1m30s";
const BITRATE_FORMS: &str =
    "bits/s with an optional k, M or G prefix (decimal) and an optional bit, bit/s or bps, e.g. 1gbit, 500M, 10Gbit/s";

/// Split `"12.5GiB"` into `(12.5, "GiB")`; the number must be finite and ≥ 0.
fn number_and_unit<'a>(
    input: &'a str,
    kind: &'static str,
    forms: &'static str,
) -> Result<(f64, &'a str), UnitError> {
    let t = input.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| UnitError::NotANumber {
        input: input.into(),
        kind,
        forms,
    })?;
    Ok((n, unit.trim()))
}

fn unknown(unit: &str, input: &str, kind: &'static str, forms: &'static str) -> UnitError {
    UnitError::UnknownUnit {
        unit: unit.into(),
        input: input.into(),
        kind,
        forms,
    }
}

/// `n × mult` as a whole `u64`, or out of range.
fn whole(n: f64, mult: f64, input: &str, kind: &'static str) -> Result<u64, UnitError> {
    let v = (n * mult).round();
    if !v.is_finite() || v < 0.0 || v >= u64::MAX as f64 {
        return Err(UnitError::OutOfRange {
            input: input.into(),
            kind,
        });
    }
    Ok(v as u64)
}

/// A size in bytes: `4096`, `64K`, `512MiB`, `2G`, `2GB`, `1.5T`. K, M, G and T are
/// powers of 1024 whether written `M`, `MB` or `MiB` (memory sizes).
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    const KIND: &str = "size";
    let (n, unit) = number_and_unit(s, KIND, SIZE_FORMS)?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(unknown(unit, s, KIND, SIZE_FORMS)),
    };
    whole(n, (1u64 << shift) as f64, s, KIND)
}

/// A data rate in bytes/s; a plain number is MB/s (10^6 bytes/s): `400`,
/// `400MB/s`, `1.5GB/s`, `64MiB/s`.
pub fn parse_rate_mb_s(s: &str) -> Result<u64, UnitError> {
    const KIND: &str = "data rate";
    let (n, unit) = number_and_unit(s, KIND, RATE_FORMS)?;
    let lower = unit.to_ascii_lowercase();
    let per_s = lower.strip_suffix("/s").unwrap_or(&lower);
    let mult = match per_s {
        "" if unit.is_empty() => 1e6,
        "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "gb" | "g" => 1e9,
        "kib" => 1024.0,
        "mib" => (1u64 << 20) as f64,
        "gib" => (1u64 << 30) as f64,
        _ => return Err(unknown(unit, s, KIND, RATE_FORMS)),
    };
    whole(n, mult, s, KIND)
}

/// A duration from terms like `1m30s`, `50ms`, `0.05s`; a lone plain number is
/// `plain` units.
fn parse_duration(s: &str, plain: Duration, forms: &'static str) -> Result<Duration, UnitError> {
    const KIND: &str = "duration";
    let t = s.trim();
    let mut rest = t;
    let mut total = 0f64;
    let mut terms = 0;
    while !rest.is_empty() {
        let (n, after) = number_and_unit(rest, KIND, forms)?;
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let unit = &after[..unit_len];
        let secs = match unit.to_ascii_lowercase().as_str() {
            "" if terms == 0 && unit_len == after.len() => plain.as_secs_f64(),
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" | "sec" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            _ => return Err(unknown(unit, s, KIND, forms)),
        };
        total += n * secs;
        terms += 1;
        rest = after[unit_len..].trim_start();
    }
    if terms == 0 {
        return Err(UnitError::NotANumber {
            input: s.into(),
            kind: KIND,
            forms,
        });
    }
    Duration::try_from_secs_f64(total).map_err(|_| UnitError::OutOfRange {
        input: s.into(),
        kind: KIND,
    })
}

/// A duration whose plain number means milliseconds: `50`, `50ms`, `0.05s`.
pub fn parse_ms(s: &str) -> Result<Duration, UnitError> {
    parse_duration(s, Duration::from_millis(1), MS_FORMS)
}

/// A duration whose plain number means seconds: `300`, `90s`, `10m`, `1m30s`.
pub fn parse_secs(s: &str) -> Result<Duration, UnitError> {
    parse_duration(s, Duration::from_secs(1), SECS_FORMS)
}

/// A link rate in bits/s (decimal): `1gbit`, `10Gbit/s`, `500M`, `2.5gbps`.
pub fn parse_bitrate(s: &str) -> Result<u64, UnitError> {
    const KIND: &str = "bit rate";
    let (n, unit) = number_and_unit(s, KIND, BITRATE_FORMS)?;
    let lower = unit.to_ascii_lowercase();
    let prefix = ["bit/s", "bits/s", "bps", "bit", "bits"]
        .iter()
        .find_map(|suffix| lower.strip_suffix(suffix))
        .unwrap_or(&lower);
    let mult = match prefix {
        "" => 1e0,
        "k" => 1e3,
        "m" => 1e6,
        "g" => 1e9,
        _ => return Err(unknown(unit, s, KIND, BITRATE_FORMS)),
    };
    whole(n, mult, s, KIND)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("512MB").unwrap(), 512 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("2gib").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size(" 8 k ").unwrap(), 8192);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
    }

    #[test]
    fn size_errors_name_the_forms() {
        let e = parse_size("12Q").unwrap_err();
        assert!(matches!(e, UnitError::UnknownUnit { ref unit, .. } if unit == "Q"));
        assert!(e.to_string().contains("512M"), "{e}");
        assert!(matches!(
            parse_size("GiB").unwrap_err(),
            UnitError::NotANumber { .. }
        ));
        assert!(matches!(
            parse_size("").unwrap_err(),
            UnitError::NotANumber { .. }
        ));
        assert!(matches!(
            parse_size("-1G").unwrap_err(),
            UnitError::NotANumber { .. }
        ));
        assert!(matches!(
            parse_size("99999999999T").unwrap_err(),
            UnitError::OutOfRange { .. }
        ));
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate_mb_s("400").unwrap(), 400_000_000);
        assert_eq!(parse_rate_mb_s("0").unwrap(), 0);
        assert_eq!(parse_rate_mb_s("400MB/s").unwrap(), 400_000_000);
        assert_eq!(parse_rate_mb_s("400mb/s").unwrap(), 400_000_000);
        assert_eq!(parse_rate_mb_s("400M").unwrap(), 400_000_000);
        assert_eq!(parse_rate_mb_s("1.5GB/s").unwrap(), 1_500_000_000);
        assert_eq!(parse_rate_mb_s("64MiB/s").unwrap(), 64 << 20);
        assert_eq!(parse_rate_mb_s("800KB/s").unwrap(), 800_000);
        assert_eq!(parse_rate_mb_s("1000B/s").unwrap(), 1000);
        assert_eq!(parse_rate_mb_s("12.5").unwrap(), 12_500_000);
        assert!(parse_rate_mb_s("400mbps").is_err(), "bits are not bytes");
        let e = parse_rate_mb_s("400Mbit/s").unwrap_err();
        assert!(matches!(e, UnitError::UnknownUnit { .. }), "{e}");
        assert!(e.to_string().contains("400MB/s"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_ms("50").unwrap(), Duration::from_millis(50));
        assert_eq!(parse_ms("50ms").unwrap(), Duration::from_millis(50));
        assert_eq!(parse_ms("0.05s").unwrap(), Duration::from_millis(50));
        assert_eq!(parse_ms("500us").unwrap(), Duration::from_micros(500));
        assert_eq!(parse_ms("2.5").unwrap(), Duration::from_micros(2500));
        assert_eq!(parse_secs("300").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_secs("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_secs("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_secs("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_secs("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_secs("250ms").unwrap(), Duration::from_millis(250));
    }

    #[test]
    fn duration_errors() {
        let e = parse_ms("50 parsecs").unwrap_err();
        assert!(matches!(e, UnitError::UnknownUnit { ref unit, .. } if unit == "parsecs"));
        assert!(e.to_string().contains("0.05s"), "{e}");
        // A unit-less term after the first one is ambiguous.
        assert!(parse_secs("1m30").is_err());
        assert!(matches!(
            parse_secs("").unwrap_err(),
            UnitError::NotANumber { .. }
        ));
        assert!(matches!(
            parse_secs("soon").unwrap_err(),
            UnitError::NotANumber { .. }
        ));
        assert!(parse_secs("1e400").is_err());
    }

    #[test]
    fn bitrates() {
        assert_eq!(parse_bitrate("1gbit").unwrap(), 1_000_000_000);
        assert_eq!(parse_bitrate("10Gbit/s").unwrap(), 10_000_000_000);
        assert_eq!(parse_bitrate("500M").unwrap(), 500_000_000);
        assert_eq!(parse_bitrate("2.5gbps").unwrap(), 2_500_000_000);
        assert_eq!(parse_bitrate("100mbit").unwrap(), 100_000_000);
        assert_eq!(parse_bitrate("1000").unwrap(), 1000);
        let e = parse_bitrate("1GB/s").unwrap_err();
        assert!(matches!(e, UnitError::UnknownUnit { .. }), "{e}");
        assert!(e.to_string().contains("1gbit"), "{e}");
    }
}
