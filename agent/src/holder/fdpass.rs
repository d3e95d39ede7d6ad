//! Messages with descriptors over a unix stream socket (`SCM_RIGHTS`).

use std::io::{self, IoSlice, IoSliceMut, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use super::{Message, MAX_MESSAGE};

/// The most descriptors one message carries (a connection's devices: one per FUSE worker).
/// The kernel's own limit (`SCM_MAX_FD`) is 253.
pub const MAX_FDS: usize = 64;

fn invalid(reason: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, reason)
}

/// Sends `msg`, with `fds` attached, in one `sendmsg` (the rest of a long message follows
/// without descriptors).
pub fn send(sock: &UnixStream, msg: &Message, fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(invalid(format!("{} descriptors in one message (the limit is {MAX_FDS})", fds.len())));
    }
    let body = serde_json::to_vec(msg).map_err(|e| invalid(e.to_string()))?;
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    let cmsgs: Vec<ControlMessage> =
        if fds.is_empty() { Vec::new() } else { vec![ControlMessage::ScmRights(fds)] };
    let mut sent = 0;
    while sent < frame.len() {
        // The descriptors go with the first bytes only.
        let c = if sent == 0 { &cmsgs[..] } else { &[] };
        let n =
            sendmsg::<()>(sock.as_raw_fd(), &[IoSlice::new(&frame[sent..])], c, MsgFlags::MSG_NOSIGNAL, None)
                .map_err(io::Error::from)?;
        sent += n;
    }
    Ok(())
}

/// Receives one message and the descriptors that came with it. `Ok(None)`: the peer closed
/// the socket between messages. A message whose descriptors did not all fit (more than
/// [`MAX_FDS`]) is refused; those that came are closed.
pub fn recv(sock: &UnixStream) -> io::Result<Option<(Message, Vec<OwnedFd>)>> {
    let mut len = [0u8; 4];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (n, fds, truncated) = {
        let mut iov = [IoSliceMut::new(&mut len)];
        let m = recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(io::Error::from)?;
        let mut fds = Vec::new();
        for c in m.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(got) = c {
                for f in got {
                    // SAFETY: the kernel just installed these descriptors in this process;
                    // nothing else owns them.
                    fds.push(unsafe { OwnedFd::from_raw_fd(f) });
                }
            }
        }
        (m.bytes, fds, m.flags.contains(MsgFlags::MSG_CTRUNC))
    };
    if n == 0 {
        return Ok(None);
    }
    if truncated {
        return Err(invalid(format!("more than {MAX_FDS} descriptors in one message")));
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
    Ok(Some((msg, fds)))
}
