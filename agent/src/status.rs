//! What `tandem status` reports, shared by the daemon (which fills it) and the CLI (which
//! prints it). The JSON form is an interface: fields are added, never renamed or removed.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: String,
    pub cluster: String,
    pub resources: Vec<ResourceStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResourceStatus {
    pub name: String,
    /// "primary" | "secondary"
    pub role: String,
    /// "up_to_date" | "outdated" | "inconsistent"
    pub disk: String,
    /// The block device on the primary, e.g. "/dev/loop3"; null on a secondary.
    pub device: Option<String>,
    pub size: u64,
    pub peers: Vec<PeerStatus>,
    pub stats: ResourceStats,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    pub node: String,
    /// "connected" | "connecting" | "standalone"
    pub connection: String,
    /// "established" (replicating) | "off"
    pub replication: String,
    /// "sync" | "memory" | "async"
    pub mode: String,
    /// Bytes this node, as primary, knows the peer is missing.
    pub out_of_sync_bytes: u64,
    pub peer_role: Option<String>,
    pub peer_disk: Option<String>,
    /// Requests sent to the peer and not yet durably acknowledged.
    pub pending_requests: usize,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ResourceStats {
    /// Application requests completed on this node as primary.
    pub writes: u64,
    pub write_bytes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub reads: u64,
    pub local_io_errors: u64,
    /// Replicated requests applied on this node as secondary.
    pub replicated_writes: u64,
    pub replicated_bytes: u64,
    pub replicated_flushes: u64,
    pub checksum_errors: u64,
    pub protocol_errors: u64,
    pub standby_io_errors: u64,
}

fn human_bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

impl NodeStatus {
    /// The human form of `tandem status`.
    pub fn render(&self) -> String {
        let mut out = format!("node {} (cluster {})\n", self.node, self.cluster);
        for r in &self.resources {
            out += &format!(
                "  {}  role:{}  disk:{}  size:{}{}\n",
                r.name,
                r.role,
                r.disk,
                human_bytes(r.size),
                r.device.as_ref().map(|d| format!("  device:{d}")).unwrap_or_default()
            );
            for p in &r.peers {
                out += &format!(
                    "    {}  connection:{}  replication:{}  mode:{}  out-of-sync:{}",
                    p.node,
                    p.connection,
                    p.replication,
                    p.mode,
                    human_bytes(p.out_of_sync_bytes)
                );
                if let (Some(role), Some(disk)) = (&p.peer_role, &p.peer_disk) {
                    out += &format!("  peer:{role}/{disk}");
                }
                out += "\n";
                if let Some(e) = &p.last_error {
                    out += &format!("      last error: {e}\n");
                }
            }
            let s = &r.stats;
            if r.role == "primary" {
                out += &format!(
                    "    writes:{} ({})  flushes:{}  discards:{}  local I/O errors:{}\n",
                    s.writes,
                    human_bytes(s.write_bytes),
                    s.flushes,
                    s.discards,
                    s.local_io_errors
                );
            } else {
                out += &format!(
                    "    replicated writes:{} ({})  flushes:{}  checksum errors:{}  protocol errors:{}\n",
                    s.replicated_writes,
                    human_bytes(s.replicated_bytes),
                    s.replicated_flushes,
                    s.checksum_errors,
                    s.protocol_errors
                );
            }
        }
        out
    }
}
