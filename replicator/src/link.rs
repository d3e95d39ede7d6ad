//! The engine's view of a connection to one peer for one resource: an ordered, reliable
//! stream of frames each way. The agent backs it with a QUIC stream; tests back it with
//! [`crate::sim`]. Closing either channel means the connection is gone.
//!
//! Outbound frames go into an unbounded channel so the engine can queue them under its
//! admission lock without waiting; what bounds them is the engine's own accounting (requests
//! in flight wait for their acks). Inbound frames come through a bounded channel, so a slow
//! engine pushes back on the transport and, through QUIC flow control, on the sender.

use tandem_protocol::Frame;
use tokio::sync::mpsc;

/// Inbound frames buffered between the transport and the engine.
pub const LINK_CAPACITY: usize = 1024;

pub struct Link {
    pub tx: mpsc::UnboundedSender<Frame>,
    pub rx: mpsc::Receiver<Frame>,
}
