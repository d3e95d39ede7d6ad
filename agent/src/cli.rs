//! Command-line interface: every argument of every verb is defined here.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "tandem", version, about = "Block-level, real-time replication of mail volumes over QUIC")]
pub struct Cli {
    /// Cluster configuration file.
    #[arg(
        short = 'c',
        long,
        global = true,
        env = "TANDEM_CONFIG",
        default_value = "/etc/tandem/tandem.toml"
    )]
    pub config: PathBuf,
    /// This node's name in the configuration (default: the host name).
    #[arg(short = 'n', long, global = true, env = "TANDEM_NODE")]
    pub node: Option<String>,
    #[command(subcommand)]
    pub cmd: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node's daemon in the foreground (logs to stderr; RUST_LOG sets the level).
    Agent,
    /// Hold the agents' FUSE connections while no agent runs (started by the agent; see
    /// docs/architecture.md "The descriptor holder").
    #[command(hide = true)]
    Holder {
        /// The holder's unix socket.
        #[arg(long)]
        socket: PathBuf,
        /// How long to keep the connections with no agent attached.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        grace: std::time::Duration,
        /// Write the holder's pid here while it runs.
        #[arg(long)]
        pid_file: Option<PathBuf>,
    },
    /// Generate a node's key and self-signed certificate: DIR/NAME.crt and DIR/NAME.key.
    Keygen {
        #[arg(long)]
        name: String,
        #[arg(long)]
        out: PathBuf,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Show roles, disk states, peers and replication.
    Status {
        #[arg(long)]
        json: bool,
        /// Also per-resource and per-peer statistics: request latency, data sent and
        /// received, acks (the JSON always has them; the same figures as the metrics).
        #[arg(long, short = 's')]
        statistics: bool,
    },
    /// Follow state changes as they happen (like `drbdsetup events2`): the current state of
    /// every resource, volume and peer (`exists` records), `exists -`, then one record per
    /// change — roles, disk states, connections, replication, resyncs, split brains,
    /// handler runs. Runs until interrupted (exit 0); exits with 3 if the agent stops, 2 if
    /// it has no such resource, 4 if this reader fell too far behind.
    /// Record format: docs/operations.md, "Events".
    Events {
        /// Only this resource's records.
        resource: Option<String>,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// One resource's state as `KEY VALUE` lines, for scripts such as the OCF resource agent:
    /// role, disk, down (0|1), device (- if none), peers, peers_known (peers whose disk state
    /// is known), peer_primary (0|1), then `peer NODE CONNECTION ROLE DISK` per peer.
    /// Exits with 3 if the agent does not answer, 2 if it has no such resource.
    State { resource: String },
    /// Make this node primary for RESOURCE and expose its block device.
    Promote {
        resource: String,
        /// Promote even if the local disk is not up to date (peers then need a full resync).
        #[arg(long)]
        force: bool,
    },
    /// Remove the device and make this node secondary for RESOURCE.
    Demote { resource: String },
    /// Discard this node's copy of RESOURCE and take a full resync from an up-to-date peer.
    Invalidate {
        resource: String,
        /// Compare block checksums and copy only blocks that differ (seeding from an old copy).
        #[arg(long)]
        checksum: bool,
    },
    /// Resume replication of RESOURCE after `disconnect`.
    Connect { resource: String },
    /// Stop replicating RESOURCE with its peers (planned maintenance); the primary tracks
    /// what they miss.
    Disconnect { resource: String },
    /// Take RESOURCE out of service on this node (like `drbdadm down`): demote it if primary
    /// (refused while its device is in use) and stop replicating it with every peer. The
    /// agent's other resources are untouched.
    Down { resource: String },
    /// Put RESOURCE back in service on this node after `down`: it connects to its peers
    /// again, as secondary.
    Up { resource: String },
    /// Tell the agent that PEER is known to be down (fenced, or lost by the cluster manager):
    /// its connection is closed at once, so a promotion need not wait for the peer timeout.
    PeerLost { peer: String },
    /// Compare every block of RESOURCE with each peer while it is in use (run on the primary).
    Verify {
        resource: String,
        /// Resync the blocks found different right away.
        #[arg(long)]
        repair: bool,
        #[arg(long)]
        json: bool,
    },
    /// Resync the blocks marked out of sync (after `verify`) to connected peers.
    Resync { resource: String },
    /// Settle a split brain of RESOURCE: run on the node whose changes since the split are
    /// to be thrown away (it must be secondary); it then resyncs from the other node.
    Resolve {
        resource: String,
        /// Discard this node's changes (required: nothing is discarded implicitly).
        #[arg(long, required = true)]
        discard_local: bool,
    },
    /// Restart this node's agent in place (after an upgrade: the binary at the path it was
    /// started from) without taking a primary's device down: its requests wait while the
    /// new agent starts, which takes the device over. Prints each primary's pause.
    Restart {
        /// How long to wait for the new agent to answer.
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// For scripts (the OCF agent): whether the descriptor holder keeps RESOURCE's device
    /// for the next agent (exit 0) or not (exit 1). With `--release`, and no agent running:
    /// have the holder let go of it now — its requests fail with EIO, as without a holder,
    /// and the next agent starts secondary.
    #[command(hide = true)]
    Held {
        resource: String,
        #[arg(long)]
        release: bool,
    },
    /// Point-in-time snapshots of this node's copy of a resource (run on a secondary).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Create RESOURCE's metadata (and its image if missing) on this node without an agent.
    CreateMd { resource: String },
    /// Print RESOURCE's metadata on this node: identity, generations, activity log, bitmaps.
    DumpMd {
        resource: String,
        #[arg(long)]
        json: bool,
    },
    /// Run a complete two-node replication on this machine and verify it.
    Demo {
        /// Mail messages to deliver into the replicated Maildir.
        #[arg(long, default_value_t = 600)]
        messages: usize,
        /// Size of the replicated volume.
        #[arg(long, default_value = "256MiB")]
        size: String,
        /// Keep the working directory (keys, config, images, logs) afterwards.
        #[arg(long)]
        keep: bool,
        /// Parent directory for the working directory.
        #[arg(long, default_value = "/var/tmp")]
        workdir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot at the next barrier of the change stream (exactly the primary's state
    /// after a flush) without pausing replication; prints its name.
    Create {
        resource: String,
        /// Default: manual-TIMESTAMP.
        #[arg(long)]
        name: Option<String>,
    },
    /// List the snapshots: name, creation time, stream position, kind, state, space used.
    List {
        resource: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot (its blocks the next older one needs are handed to it).
    Delete { resource: String, name: String },
    /// Make block devices of a snapshot; prints them (one per volume). Read-only, unless
    /// `--overlay`.
    Expose {
        resource: String,
        name: String,
        /// Devices that take writes into a throwaway overlay (the snapshot never changes), so
        /// that `mount -o ro` can replay the filesystem's journal: a snapshot is
        /// crash-consistent, and its acknowledged files may still be in the journal.
        #[arg(long)]
        overlay: bool,
    },
    /// Remove the devices `expose` made.
    Unexpose { resource: String, name: String },
    /// Roll this (secondary) copy back to the snapshot: it becomes the newest data, and the
    /// other nodes resync only the blocks that differ.
    Restore { resource: String, name: String },
}
