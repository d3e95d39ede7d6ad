//! Values in the config file that are not plain TOML types — sizes, rates, durations and
//! the engine's enums — and the serde helpers that read them.
//!
//! Every string form is parsed by the same function the CLI uses (`parse_size`,
//! `parse_duration`, the enums' `FromStr`, `parse_policy`), so a spelling accepted on the
//! command line is accepted in the file and the other way round, and a refused value gets
//! the same message in both places. serde adds the key path and the file around it.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use tandem_protocol::Compression;
use tandem_replicator::split_brain::{parse_policy, AfterSplitBrain};
use tandem_replicator::{BacklogPolicy, Mode};

/// Binary units a size may carry, largest first (`k`/`kb`/`kib` all mean 1024).
const UNITS: [(u32, &str); 4] = [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")];

/// Parses "512MiB", "1GiB", "4096", "4k" (binary units; bytes if no unit).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size (e.g. 512MiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        "t" | "tib" | "tb" => 1 << 40,
        other => return Err(format!("unknown size unit {other:?} in {s:?}")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("size {s:?} overflows"))
}

/// `n` bytes in the largest binary unit that divides it exactly ("512MiB", "4097"), in a
/// form [`parse_size`] reads back to `n`.
pub fn format_size(n: u64) -> String {
    for (shift, unit) in UNITS {
        if n != 0 && n.trailing_zeros() >= shift {
            return format!("{}{unit}", n >> shift);
        }
    }
    n.to_string()
}

/// Parses "5s", "500ms", "1m", "1h 30m" (humantime's forms).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("{s:?} is not a duration (e.g. 5s, 500ms): {e}"))
}

/// A size in bytes: a string for [`parse_size`] ("512MiB", "4k", "4096") or a TOML integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_size(self.0))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SizeVisitor { per_second: false }).map(ByteSize)
    }
}

/// Bytes per second: a size, with or without "/s" ("100MiB/s", "100MiB", 104857600).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRate(pub u64);

impl<'de> Deserialize<'de> for ByteRate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SizeVisitor { per_second: true }).map(ByteRate)
    }
}

struct SizeVisitor {
    per_second: bool,
}

impl Visitor<'_> for SizeVisitor {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.per_second {
            f.write_str("a rate such as \"100MiB/s\" or a number of bytes per second")
        } else {
            f.write_str("a size such as \"512MiB\" or a number of bytes")
        }
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        u64::try_from(v).map_err(|_| E::custom(format!("{v} is negative; a size is 0 or more bytes")))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
        if self.per_second {
            parse_size(v.trim().trim_end_matches("/s"))
                .map_err(|e| E::custom(format!("{e} (e.g. \"100MiB/s\")")))
        } else {
            parse_size(v).map_err(E::custom)
        }
    }
}

/// `deserialize_with` for a size held as `u64`.
pub fn size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    ByteSize::deserialize(d).map(|ByteSize(n)| n)
}

/// `deserialize_with` for an optional size (with `#[serde(default)]`: absent is `None`).
pub fn some_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    size(d).map(Some)
}

/// `deserialize_with` for a rate held as bytes per second.
pub fn rate<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    ByteRate::deserialize(d).map(|ByteRate(n)| n)
}

/// `deserialize_with` for an optional rate (with `#[serde(default)]`: absent is `None`).
pub fn some_rate<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    rate(d).map(Some)
}

/// A value written in the file as a string and read by the parser the CLI uses too.
pub trait FromConfigStr: Sized {
    /// What the value looks like, for serde's "invalid type" message.
    const EXPECTING: &'static str;
    fn from_config_str(s: &str) -> Result<Self, String>;
}

impl FromConfigStr for Duration {
    const EXPECTING: &'static str = "a duration such as \"5s\" or \"500ms\"";
    fn from_config_str(s: &str) -> Result<Self, String> {
        parse_duration(s)
    }
}

impl FromConfigStr for Mode {
    const EXPECTING: &'static str = "a replication mode: \"sync\", \"memory\" or \"async\"";
    fn from_config_str(s: &str) -> Result<Self, String> {
        s.parse()
    }
}

impl FromConfigStr for BacklogPolicy {
    const EXPECTING: &'static str = "a backlog policy: \"ahead\" or \"block\"";
    fn from_config_str(s: &str) -> Result<Self, String> {
        s.parse()
    }
}

impl FromConfigStr for Compression {
    const EXPECTING: &'static str = "a compression: \"none\", \"lz4\", \"zstd\" or \"zstd:LEVEL\"";
    fn from_config_str(s: &str) -> Result<Self, String> {
        s.parse()
    }
}

impl FromConfigStr for AfterSplitBrain {
    const EXPECTING: &'static str = "a split-brain policy such as \"disconnect\"";
    fn from_config_str(s: &str) -> Result<Self, String> {
        parse_policy(s)
    }
}

struct ParsedVisitor<T>(std::marker::PhantomData<T>);

impl<T: FromConfigStr> Visitor<'_> for ParsedVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(T::EXPECTING)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        T::from_config_str(v).map_err(E::custom)
    }
}

/// `deserialize_with` for a [`FromConfigStr`] value.
pub fn parsed<'de, D: Deserializer<'de>, T: FromConfigStr>(d: D) -> Result<T, D::Error> {
    d.deserialize_str(ParsedVisitor(std::marker::PhantomData))
}

/// `deserialize_with` for an optional [`FromConfigStr`] value (with `#[serde(default)]`:
/// absent is `None`, which is inherited from the enclosing item).
pub fn some_parsed<'de, D: Deserializer<'de>, T: FromConfigStr>(d: D) -> Result<Option<T>, D::Error> {
    parsed(d).map(Some)
}

/// `deserialize_with` for `options.max_mtu`: a UDP payload size QUIC can use, 1200 (its
/// minimum) to 65527 (the largest UDP payload over IPv6).
pub fn mtu<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    let n = i64::deserialize(d)?;
    u16::try_from(n)
        .ok()
        .filter(|m| (1200..=65527).contains(m))
        .ok_or_else(|| de::Error::custom(format!("{n} must be between 1200 and 65527")))
}

/// `deserialize_with` for `options.socket_buffer`: a size from 256 KiB (below it the
/// kernel's own default is as good) to 1 GiB.
pub fn socket_buffer<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let n = size(d)?;
    if (256 << 10..=1 << 30).contains(&n) {
        Ok(n)
    } else {
        Err(de::Error::custom(format!("{} must be between 256KiB and 1GiB", format_size(n))))
    }
}

/// `deserialize_with` for a node's address: an IP and a port, never a host name (the
/// agent must not depend on name resolution to find its peers).
pub fn socket_address<'de, D: Deserializer<'de>>(d: D) -> Result<std::net::SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(|_| de::Error::custom(format!("{s:?} is not IP:port (e.g. 192.0.2.1:7789)")))
}

/// As [`socket_address`], for a key that may be absent.
pub fn optional_socket_address<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<std::net::SocketAddr>, D::Error> {
    socket_address(d).map(Some)
}

/// One tier of a copy's snapshot schedule: a snapshot every `every`, the newest `keep` kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotTier {
    pub every: std::time::Duration,
    pub keep: u32,
}

impl SnapshotTier {
    /// The tier's name in snapshot names and records: its period as written, e.g. "15m".
    pub fn name(&self) -> String {
        humantime::format_duration(self.every).to_string().replace(' ', "")
    }
}

/// `"EVERY:KEEP"`, e.g. `"15m:96"`.
pub fn parse_snapshot_tier(s: &str) -> Result<SnapshotTier, String> {
    let (every, keep) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not EVERY:KEEP (e.g. \"15m:96\": every 15 minutes, keep 96)"))?;
    let every = parse_duration(every.trim())?;
    if every < std::time::Duration::from_secs(5) {
        return Err(format!("{s:?}: EVERY must be at least 5s"));
    }
    let keep: u32 = keep.trim().parse().map_err(|_| format!("{s:?}: KEEP must be a whole number"))?;
    if keep == 0 {
        return Err(format!("{s:?}: KEEP must be at least 1"));
    }
    Ok(SnapshotTier { every, keep })
}

pub fn snapshot_schedule<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SnapshotTier>, D::Error> {
    let v = Vec::<String>::deserialize(d)?;
    let tiers: Vec<SnapshotTier> =
        v.iter().map(|s| parse_snapshot_tier(s)).collect::<Result<_, _>>().map_err(de::Error::custom)?;
    let mut names: Vec<String> = tiers.iter().map(|t| t.name()).collect();
    names.sort();
    names.dedup();
    if names.len() != tiers.len() {
        return Err(de::Error::custom("two tiers with the same period"));
    }
    Ok(tiers)
}
