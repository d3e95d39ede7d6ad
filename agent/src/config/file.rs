//! The config file as written: the serde schema, typed and with defaults filled in.
//!
//! Every struct refuses unknown keys. A value that does not parse is refused here, with
//! the path of its key ("resource mailstore: disk.beta.backlog") and its line; checks
//! that relate several values are made when this is turned into a [`Config`](super::Config).
//! `[options]`, `[[node]]` and `[handlers]` need no such step and are the public types
//! themselves ([`Options`], [`Node`], [`Handlers`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_path_to_error::{Path, Segment};
use tandem_protocol::Compression;
use tandem_replicator::split_brain::AfterSplitBrain;
use tandem_replicator::{BacklogPolicy, Mode};

use super::defaults;
use super::units::{parsed, rate, size, snapshot_schedule, some_parsed, some_rate, some_size, SnapshotTier};
use super::{Handlers, Node, Options};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ConfigFile {
    pub cluster: String,
    #[serde(default)]
    pub options: Options,
    #[serde(default)]
    pub node: Vec<Node>,
    #[serde(default)]
    pub resource: Vec<ResourceFile>,
    #[serde(default)]
    pub handlers: Handlers,
}

/// How a new image file is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Allocation {
    /// Written out in full, so that later writes never find the file system full.
    Full,
    /// Left sparse.
    Sparse,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ResourceFile {
    pub name: String,
    /// The volume's size; for a volume group, omitted (the sum of the volumes).
    #[serde(default, deserialize_with = "some_size")]
    pub size: Option<u64>,
    /// A volume group: several volumes, one device each, one ordered change stream.
    #[serde(default)]
    pub volume: Vec<VolumeFile>,
    #[serde(default = "defaults::mode", deserialize_with = "parsed")]
    pub mode: Mode,
    /// `None`: `options.timeout`.
    #[serde(default, deserialize_with = "some_parsed")]
    pub timeout: Option<Duration>,
    #[serde(default = "defaults::bitmap_granularity", deserialize_with = "size")]
    pub bitmap_granularity: u64,
    #[serde(default = "defaults::allocate")]
    pub allocate: Allocation,
    #[serde(default = "defaults::resync_max_rate", deserialize_with = "some_rate")]
    pub resync_max_rate: Option<u64>,
    #[serde(default = "defaults::resync_min_rate", deserialize_with = "rate")]
    pub resync_min_rate: u64,
    #[serde(default = "defaults::resync_checksum")]
    pub resync_checksum: bool,
    #[serde(default = "defaults::snapshot_before_resync")]
    pub snapshot_before_resync: bool,
    #[serde(default = "defaults::al_extents")]
    pub al_extents: usize,
    #[serde(default = "defaults::al_extent_size", deserialize_with = "size")]
    pub al_extent_size: u64,
    #[serde(default = "defaults::after_split_brain", deserialize_with = "parsed")]
    pub after_split_brain: AfterSplitBrain,
    /// For `memory` and `async` disks that do not set their own.
    #[serde(default = "defaults::backlog", deserialize_with = "size")]
    pub backlog: u64,
    #[serde(default = "defaults::on_backlog_full", deserialize_with = "parsed")]
    pub on_backlog_full: BacklogPolicy,
    /// Overrides the top-level `[handlers]` key by key.
    #[serde(default)]
    pub handlers: Handlers,
    #[serde(default)]
    pub disk: BTreeMap<String, DiskFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct VolumeFile {
    pub name: String,
    #[serde(deserialize_with = "size")]
    pub size: u64,
}

/// Replication *to* one node; `None` is the resource's value.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DiskFile {
    pub image: PathBuf,
    pub meta: PathBuf,
    #[serde(default, deserialize_with = "some_parsed")]
    pub mode: Option<Mode>,
    #[serde(default, deserialize_with = "some_size")]
    pub backlog: Option<u64>,
    #[serde(default, deserialize_with = "some_parsed")]
    pub on_backlog_full: Option<BacklogPolicy>,
    #[serde(default = "defaults::compression", deserialize_with = "parsed")]
    pub compression: Compression,
    #[serde(default)]
    pub snapshot_dir: Option<PathBuf>,
    #[serde(default, deserialize_with = "snapshot_schedule")]
    pub snapshot_schedule: Vec<SnapshotTier>,
}

impl ConfigFile {
    /// Parses `text`. A syntax error is toml's report (with the line shown); a value or key
    /// the schema refuses is "ITEM: KEY: PROBLEM (line N)", with `[[node]]`, `[[resource]]`
    /// and `[[resource.volume]]` entries named by their `name`.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let de = toml::Deserializer::parse(text).map_err(|e| e.to_string())?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let item = describe_path(e.path(), &EntryNames::of(text));
            let inner = e.inner();
            let line = inner.span().map(|s| {
                let start = s.start.min(text.len());
                text.as_bytes()[..start].iter().filter(|&&b| b == b'\n').count() + 1
            });
            let mut msg = if item.is_empty() { String::new() } else { format!("{item}: ") };
            msg.push_str(inner.message().trim_end());
            if let Some(line) = line {
                msg.push_str(&format!(" (line {line})"));
            }
            msg
        })
    }
}

/// The `name` of each array entry, read leniently (anything else ignored), so an error
/// deep in the third resource can say which resource it is.
#[derive(Debug, Default, Deserialize)]
struct EntryNames {
    #[serde(default)]
    node: Vec<Named>,
    #[serde(default)]
    resource: Vec<NamedResource>,
}

#[derive(Debug, Default, Deserialize)]
struct Named {
    #[serde(default)]
    name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct NamedResource {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    volume: Vec<Named>,
}

impl EntryNames {
    fn of(text: &str) -> Self {
        toml::from_str(text).unwrap_or_default()
    }
}

/// "resource mailstore: disk.beta.backlog" for `resource[0].disk.beta.backlog`: an entry
/// of an array of tables by its name (or its position, counted from 1, if it has none),
/// keys below it dotted.
fn describe_path(path: &Path, names: &EntryNames) -> String {
    let segments: Vec<&Segment> = path.iter().collect();
    let mut parts: Vec<String> = Vec::new();
    let mut keys: Vec<String> = Vec::new();
    let mut resource = None;
    let mut i = 0;
    while i < segments.len() {
        match (segments[i], segments.get(i + 1)) {
            (Segment::Map { key }, Some(Segment::Seq { index })) => {
                let index = *index;
                let name = match (key.as_str(), resource) {
                    ("node", None) => names.node.get(index).and_then(|n| n.name.clone()),
                    ("resource", None) => {
                        resource = Some(index);
                        names.resource.get(index).and_then(|r| r.name.clone())
                    }
                    ("volume", Some(r)) => {
                        names.resource.get(r).and_then(|r| r.volume.get(index)).and_then(|v| v.name.clone())
                    }
                    _ => None,
                };
                if !keys.is_empty() {
                    parts.push(keys.join("."));
                    keys.clear();
                }
                parts.push(format!("{key} {}", name.unwrap_or_else(|| format!("#{}", index + 1))));
                i += 2;
            }
            (Segment::Map { key }, _) => {
                keys.push(key.clone());
                i += 1;
            }
            (Segment::Seq { index }, _) => {
                keys.push(format!("#{}", index + 1));
                i += 1;
            }
            (Segment::Enum { variant }, _) => {
                keys.push(variant.clone());
                i += 1;
            }
            (Segment::Unknown, _) => i += 1,
        }
    }
    if !keys.is_empty() {
        parts.push(keys.join("."));
    }
    parts.join(": ")
}
