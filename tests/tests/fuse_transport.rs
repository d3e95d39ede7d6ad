//! The agent's own FUSE transport against the real kernel: INIT negotiation and
//! FUSE_NOTIFY_RESEND, which agent takeover relies on (a request read but not answered is
//! queued again and read a second time with the resend bit in its `unique`).

use std::time::Duration;

use tandem_agent::frontend::fuse_kernel::abi::{
    self, init_flags, FileAttr, FileKind, Operation, Request, Ttl,
};
use tandem_agent::frontend::fuse_kernel::connection::Device;
use tandem_agent::frontend::fuse_kernel::{mount, Connection, InitWanted};

const WANTED: InitWanted = InitWanted {
    flags: init_flags::ASYNC_READ | init_flags::BIG_WRITES | init_flags::MAX_PAGES,
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

/// A FUSE mount of the test's own at a fresh directory, unmounted when dropped (also when
/// an assertion fails).
struct TestMount {
    mp: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for TestMount {
    fn drop(&mut self) {
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
