use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::client::{HolderClient, HolderError};
use super::server::{run, HolderSettings};

fn start(grace: Duration) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<()>) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("holder.sock");
    let s = HolderSettings { socket: socket.clone(), grace, pid_file: Some(dir.path().join("holder.pid")) };
    let t = std::thread::spawn(move || run(&s).unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    while HolderClient::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "the holder did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    (dir, socket, t)
}

fn pipe() -> (std::fs::File, OwnedFd) {
    let (r, w) = nix::unistd::pipe().unwrap();
    (std::fs::File::from(r), w)
}

/// Our copy is closed, the holder's keeps the pipe open; a later agent takes a working
/// duplicate back, with the state stored beside it.
#[test]
fn a_held_descriptor_outlives_the_agent_that_stored_it() {
    let (_dir, socket, _t) = start(Duration::from_secs(60));
    let (mut reader, w) = pipe();
    let (mut reader2, w2) = pipe();
    {
        let agent = HolderClient::connect(&socket).unwrap();
        agent.hold("/run/tandem/mail", &[w.as_fd(), w2.as_fd()], b"init-params").unwrap();
        drop((w, w2));
        // The agent dies: its socket closes.
    }
    let next = HolderClient::connect(&socket).unwrap();
    assert_eq!(next.list().unwrap(), vec!["/run/tandem/mail".to_string()]);
    let taken = next.take("/run/tandem/mail").unwrap();
    assert_eq!(taken.state, b"init-params");
    // Both descriptors, in the order they were held.
    let mut fds = taken.fds.into_iter();
    std::fs::File::from(fds.next().unwrap()).write_all(b"still connected").unwrap();
    std::fs::File::from(fds.next().unwrap()).write_all(b"second device").unwrap();
    assert!(fds.next().is_none());
    let mut got = [0u8; 15];
    reader.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"still connected");
    let mut got = [0u8; 13];
    reader2.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"second device");
    // Forgotten: the holder's copy is closed too, so the pipe ends.
    next.forget("/run/tandem/mail").unwrap();
    assert!(next.list().unwrap().is_empty());
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    reader2.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

/// An agent that stops cleanly (nothing held any more) lets the holder exit at once: no
/// holder lingers after a clean stop.
#[test]
fn the_holder_exits_when_the_last_agent_leaves_with_nothing_held() {
    let (dir, socket, t) = start(Duration::from_secs(3600));
    assert!(dir.path().join("holder.pid").exists(), "the pid file is written");
    let (_reader, w) = pipe();
    let agent = HolderClient::connect(&socket).unwrap();
    agent.hold("k", &[w.as_fd()], b"").unwrap();
    agent.forget("k").unwrap();
    drop(agent);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(t.join());
    });
    rx.recv_timeout(Duration::from_secs(120)).expect("the holder still runs").unwrap();
    assert!(!socket.exists() && !dir.path().join("holder.pid").exists(), "socket and pid file removed");
}

/// With no agent attached for the grace time, the holder closes its copies (waiting
/// requests then fail) and exits.
#[test]
fn the_holder_lets_go_after_the_grace_time_without_an_agent() {
    let (_dir, socket, t) = start(Duration::from_millis(300));
    let (mut reader, w) = pipe();
    let agent = HolderClient::connect(&socket).unwrap();
    agent.hold("k", &[w.as_fd()], b"").unwrap();
    drop(w);
    // Attached: held however long this takes.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(agent.list().unwrap(), vec!["k".to_string()]);
    drop(agent);
    // The read returns once the holder's copy is closed; bounded, so a holder that never
    // lets go fails the test instead of hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut rest = Vec::new();
        let _ = tx.send(reader.read_to_end(&mut rest).map(|_| rest));
    });
    let rest = rx.recv_timeout(Duration::from_secs(120)).expect("the holder still holds the pipe").unwrap();
    assert!(rest.is_empty());
    t.join().unwrap();
    assert!(!socket.exists(), "the socket is removed when the holder exits");
}

#[test]
fn bad_requests_get_clear_errors_and_leave_the_holder_serving() {
    let (_dir, socket, _t) = start(Duration::from_secs(60));
    let c = HolderClient::connect(&socket).unwrap();
    match c.take("nothing-here") {
        Err(HolderError::Refused(r)) => assert!(r.contains("nothing is held under nothing-here"), "{r}"),
        other => panic!("{:?}", other.map(|_| ())),
    }
    // A hold without a descriptor is refused.
    let raw = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    super::fdpass::send(&raw, &super::Message::Hold { key: "x".into(), state: vec![] }, &[]).unwrap();
    match super::fdpass::recv(&raw).unwrap() {
        Some((super::Message::Error { reason }, fds)) if fds.is_empty() => {
            assert!(reason.contains("no descriptor"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // Garbage: a huge length, then nonsense JSON; each ends only its own connection.
    let mut raw = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    raw.write_all(&u32::MAX.to_le_bytes()).unwrap();
    let mut raw2 = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    raw2.write_all(&5u32.to_le_bytes()).unwrap();
    raw2.write_all(b"{oops").unwrap();
    for r in [&mut raw, &mut raw2] {
        match super::fdpass::recv(r).unwrap() {
            Some((super::Message::Error { reason }, _)) => assert!(!reason.is_empty()),
            other => panic!("{other:?}"),
        }
    }
    assert!(c.list().unwrap().is_empty());
}

#[test]
fn a_second_holder_on_the_same_socket_is_refused() {
    let (_dir, socket, _t) = start(Duration::from_secs(60));
    let e = run(&HolderSettings { socket: socket.clone(), grace: Duration::from_secs(1), pid_file: None })
        .unwrap_err()
        .to_string();
    assert!(e.contains("a holder already runs at"), "{e}");
}
