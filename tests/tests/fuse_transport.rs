//! The agent's own FUSE transport against the real kernel: INIT negotiation and
//! FUSE_NOTIFY_RESEND, which agent takeover relies on (a request read but not answered is
//! queued again and read a second time with the resend bit in its `unique`), and
//! `Session::resume`, which a new agent serves a held connection with: every request the
//! previous one had read is answered, in the order the kernel first sent them.

use std::time::Duration;

use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use tandem_agent::frontend::fuse_kernel::abi::{
    self, init_flags, FileAttr, FileKind, Operation, Request, Ttl,
};

use nix::errno::Errno;
use tandem_agent::frontend::fuse_kernel::connection::Device;
use tandem_agent::frontend::fuse_kernel::{mount, Connection, Handler, InitWanted, Reply, Session};

const WANTED: InitWanted = InitWanted {
    // Parallel lookups: several may wait unanswered in one directory at once.
    flags: init_flags::ASYNC_READ
        | init_flags::BIG_WRITES
        | init_flags::MAX_PAGES
        | init_flags::PARALLEL_DIROPS,
    max_write: 1 << 20,
    max_background: 16,
    congestion_threshold: 12,
};

fn root_attr() -> FileAttr {
    FileAttr {
        ino: abi::ROOT_ID,
        size: 0,
        blocks: 0,
        kind: FileKind::Directory,
        perm: 0o700,
        nlink: 2,
        uid: 0,
        gid: 0,
        blksize: 4096,
    }
}

/// Reads requests, answering any but a LOOKUP (the root's GETATTR with its attributes,
/// others ENOSYS), and returns the first LOOKUP's header unanswered.
fn next_lookup(dev: &Device, buf: &mut [u8]) -> abi::InHeader {
    loop {
        let n = dev.read_request(buf).expect("read a FUSE request");
        let req = Request::decode(&buf[..n]).expect("decode a FUSE request");
        let unique = req.header.unique;
        match req.op {
            Operation::Lookup { name } => {
                assert_eq!(name, "missing");
                return req.header;
            }
            Operation::Getattr => {
                let body = abi::attr_out(&root_attr(), Ttl(Duration::from_secs(60)));
                let hdr = abi::out_header(abi::OUT_HEADER_SIZE + body.len(), 0, unique);
                dev.send(&[&hdr, &body]).unwrap();
            }
            op if op.expects_reply() => {
                dev.send(&[&abi::out_header(abi::OUT_HEADER_SIZE, -libc::ENOSYS, unique)]).unwrap();
            }
            _ => {}
        }
    }
}

#[test]
fn an_unanswered_request_is_read_again_after_notify_resend() {
    let (mounted, conn) = mount_answering_init();
    let mp = &mounted.mp;
    let params = *conn.params();
    assert!(
        params.kernel_flags & init_flags::HAS_RESEND != 0,
        "this kernel does not offer FUSE_NOTIFY_RESEND"
    );
    assert_eq!(params.flags & WANTED.flags, WANTED.flags, "the kernel refused a wanted flag");
    assert!(params.max_pages >= 256);

    let target = mp.join("missing");
    let stat = std::thread::spawn(move || std::fs::metadata(target).map(|_| ()));
    let mut buf = vec![0u8; params.read_buffer_size()];
    let first = next_lookup(conn.device(), &mut buf);
    assert_eq!(first.unique & abi::UNIQUE_RESEND, 0);

    // Read and not answered: as after an agent died holding it. The resend queues it again.
    conn.notify_resend().expect("send FUSE_NOTIFY_RESEND");
    let again = next_lookup(conn.device(), &mut buf);
    assert_eq!(again.unique, first.unique | abi::UNIQUE_RESEND, "the resent request keeps its unique");
    assert_eq!(again.nodeid, first.nodeid);
    let hdr = abi::out_header(abi::OUT_HEADER_SIZE, -libc::ENOENT, again.unique);
    conn.device().send(&[&hdr]).expect("answer the resent request");

    let got = stat.join().unwrap();
    assert_eq!(
        got.unwrap_err().kind(),
        std::io::ErrorKind::NotFound,
        "the answer to the resent request counts"
    );
}

/// Why a takeover holder must keep every device, clones included: a request read from a
/// device that is then closed is failed at once (ECONNABORTED), not kept for a resend.
#[test]
fn closing_the_device_a_request_was_read_from_fails_that_request() {
    let (mounted, conn) = mount_answering_init();
    let mp = &mounted.mp;
    let clone = conn.device().try_clone().expect("clone the device");

    let target = mp.join("missing");
    let stat = std::thread::spawn(move || std::fs::metadata(target).map(|_| ()));
    let mut buf = vec![0u8; conn.params().read_buffer_size()];
    next_lookup(&clone, &mut buf);
    drop(clone);
    let got = stat.join().unwrap();
    assert_eq!(got.unwrap_err().raw_os_error(), Some(libc::ECONNABORTED));
    drop(conn);
}

/// Answers LOOKUPs with ENOENT and records their names in the order it is given them.
struct RecordingLookups {
    seen: Arc<Mutex<Vec<String>>>,
}

impl Handler for RecordingLookups {
    fn lookup(&self, _parent: u64, name: &std::ffi::OsStr, reply: Reply) {
        self.seen.lock().unwrap().push(name.to_string_lossy().to_string());
        reply.error(Errno::ENOENT)
    }
    fn getattr(&self, _ino: u64, reply: Reply) {
        reply.attr(&root_attr(), Ttl(Duration::from_secs(60)))
    }
    fn read(&self, _ino: u64, _arg: &abi::ReadIn, reply: Reply) {
        reply.error(Errno::EIO)
    }
    fn readdir(&self, _ino: u64, _arg: &abi::ReadIn, reply: Reply) {
        reply.error(Errno::EIO)
    }
}

/// A takeover in one process: three LOOKUPs read and left unanswered (the agent that read
/// them died; the holder's copy of the device kept them); a new session on a duplicate of
/// the device answers all three, first to last, before it serves anything else.
#[test]
fn resume_answers_what_the_previous_server_read_in_the_kernels_order() {
    let (mounted, conn) = mount_answering_init();
    let mp = mounted.mp.clone();
    let mut buf = vec![0u8; conn.params().read_buffer_size()];
    let mut waiting = Vec::new();
    let mut read = Vec::new();
    for i in 0..3 {
        let target = mp.join(format!("missing-{i}"));
        waiting.push(std::thread::spawn(move || std::fs::metadata(target).map(|_| ())));
        // Read before the next is issued: the kernel's order is 0, 1, 2.
        loop {
            let n = conn.device().read_request(&mut buf).unwrap();
            let req = Request::decode(&buf[..n]).unwrap();
            match req.op {
                Operation::Lookup { name } => {
                    read.push((req.header.unique, name.to_string_lossy().to_string()));
                    break;
                }
                Operation::Getattr => {
                    let body = abi::attr_out(&root_attr(), Ttl(Duration::from_secs(60)));
                    let hdr = abi::out_header(abi::OUT_HEADER_SIZE + body.len(), 0, req.header.unique);
                    conn.device().send(&[&hdr, &body]).unwrap();
                }
                op if op.expects_reply() => {
                    let hdr = abi::out_header(abi::OUT_HEADER_SIZE, -libc::ENOSYS, req.header.unique);
                    conn.device().send(&[&hdr]).unwrap();
                }
                _ => {}
            }
        }
    }
    assert!(read.windows(2).all(|w| w[0].0 < w[1].0), "uniques grow: {read:?}");
    let held = Device::new(conn.device().as_fd().try_clone_to_owned().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (mut session, replayed) =
        Session::resume(vec![held], *conn.params(), &mp, RecordingLookups { seen: seen.clone() }, "resumed")
            .expect("resume the session");
    assert_eq!(replayed.resent, 3, "{replayed:?}");
    for w in waiting {
        let got = w.join().unwrap();
        assert_eq!(got.unwrap_err().kind(), std::io::ErrorKind::NotFound, "answered after the takeover");
    }
    let want: Vec<String> = read.iter().map(|(_, n)| n.clone()).collect();
    assert_eq!(&seen.lock().unwrap()[..3], &want[..], "answered in the kernel's order");
    // The resumed session serves new requests too.
    assert!(std::fs::metadata(mp.join("new")).is_err());
    assert_eq!(seen.lock().unwrap().last().map(String::as_str), Some("new"));
    drop(conn);
    let _ = session.unmount_and_join();
}

/// A FUSE mount of the test's own at a fresh directory, unmounted when dropped (also when
/// an assertion fails).
struct TestMount {
    mp: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for TestMount {
    fn drop(&mut self) {
        // Aborted first, so requests a failed test left unanswered end (their threads
        // would otherwise wait forever and the process never exit).
        let minor = std::fs::read_to_string("/proc/self/mountinfo").ok().and_then(|info| {
            info.lines()
                .find(|l| l.split(' ').nth(4) == self.mp.to_str())
                .and_then(|l| l.split(' ').nth(2)?.split_once(':').map(|(_, m)| m.to_string()))
        });
        if let Some(m) = minor.and_then(|m| m.parse().ok()) {
            let _ = mount::abort_connection(m);
        }
        let _ = mount::unmount(&self.mp);
    }
}

/// Mounts a read-only FUSE filesystem and answers its FUSE_INIT with [`WANTED`].
fn mount_answering_init() -> (TestMount, Connection) {
    tandem_tests::require_real_devices();
    let dir = tempfile::tempdir_in(tandem_tests::lab_parent()).unwrap();
    let mp = dir.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let opts = mount::MountOptions { fsname: "tandem-test".into(), subtype: None, read_only: true };
    let fd = mount::mount(&mp, &opts).expect("mount FUSE");
    let mounted = TestMount { mp, _dir: dir };
    let conn = Connection::negotiate(fd, &WANTED).expect("answer FUSE_INIT");
    (mounted, conn)
}
