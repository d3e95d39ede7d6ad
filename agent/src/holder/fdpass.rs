//! Messages with an optional descriptor over a unix stream socket (`SCM_RIGHTS`).

use std::io::{self, IoSlice, IoSliceMut, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use super::{Message, MAX_MESSAGE};

fn invalid(reason: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, reason)
}

/// Sends `msg`, with `fd` attached if given, in one `sendmsg`.
pub fn send(sock: &UnixStream, msg: &Message, fd: Option<RawFd>) -> io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(|e| invalid(e.to_string()))?;
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    let fds = fd.map(|f| [f]);
    let cmsgs: Vec<ControlMessage> = fds.iter().map(|f| ControlMessage::ScmRights(f)).collect();
    let mut sent = 0;
    while sent < frame.len() {
        // The descriptor goes with the first bytes only.
        let c = if sent == 0 { &cmsgs[..] } else { &[] };
        let n =
            sendmsg::<()>(sock.as_raw_fd(), &[IoSlice::new(&frame[sent..])], c, MsgFlags::MSG_NOSIGNAL, None)
                .map_err(io::Error::from)?;
        sent += n;
    }
    Ok(())
}

/// Receives one message and the descriptor that came with it. `Ok(None)`: the peer closed
/// the socket between messages.
pub fn recv(sock: &UnixStream) -> io::Result<Option<(Message, Option<OwnedFd>)>> {
    let mut len = [0u8; 4];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let (n, fd) = {
        let mut iov = [IoSliceMut::new(&mut len)];
        let m = recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(io::Error::from)?;
        let mut fd = None;
        for c in m.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for (i, f) in fds.into_iter().enumerate() {
                    // SAFETY: the kernel just installed these descriptors in this process;
                    // nothing else owns them. Any beyond the first are closed at once.
                    let owned = unsafe { OwnedFd::from_raw_fd(f) };
                    if i == 0 && fd.is_none() {
                        fd = Some(owned);
                    }
                }
            }
        }
        (m.bytes, fd)
    };
    if n == 0 {
        return Ok(None);
    }
    let mut reader = sock;
    if n < 4 {
        reader.read_exact(&mut len[n..])?;
    }
    let size = u32::from_le_bytes(len) as usize;
    if size > MAX_MESSAGE {
        return Err(invalid(format!("a {size}-byte message (the limit is {MAX_MESSAGE})")));
    }
    let mut body = vec![0u8; size];
    reader.read_exact(&mut body)?;
    let msg = serde_json::from_slice(&body).map_err(|e| invalid(format!("malformed message: {e}")))?;
    Ok(Some((msg, fd)))
}
