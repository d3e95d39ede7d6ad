//! The engine's view of a connection to one peer for one resource: an ordered, reliable
//! stream of frames each way. The agent backs it with a QUIC stream; tests back it with
//! [`crate::sim`]. Closing either channel means the connection is gone.

use tandem_protocol::Frame;
use tokio::sync::mpsc;

/// Frames buffered towards the transport before the engine feels back-pressure.
pub const LINK_CAPACITY: usize = 1024;

pub struct Link {
    pub tx: mpsc::Sender<Frame>,
    pub rx: mpsc::Receiver<Frame>,
}

impl Link {
    /// Two ends joined directly in memory, without encoding.
    pub fn pair(capacity: usize) -> (Link, Link) {
        let (a_tx, b_rx) = mpsc::channel(capacity);
        let (b_tx, a_rx) = mpsc::channel(capacity);
        (Link { tx: a_tx, rx: a_rx }, Link { tx: b_tx, rx: b_rx })
    }
}
