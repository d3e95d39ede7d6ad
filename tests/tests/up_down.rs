//! Per-resource `down` / `up` on a running agent (what the OCF agent's stop and start use)
//! and the stable device paths of a primary, with real agents, loop devices and FUSE.
//!
//! - `down_takes_one_resource_out_and_up_resyncs_only_the_difference`: two resources on the
//!   same two agents; `down` of one on the standby stops its replication only (the other
//!   stays connected), refuses promotion and `connect` there; the primary's writes
//!   meanwhile are resynced by `up` as a delta, and the images end equal. `down` on the
//!   primary is refused while the device is in use, then demotes.
//! - `stable_device_paths_follow_the_role`: `device_dir/RESOURCE` for a plain resource and
//!   `device_dir/RESOURCE/VOLUME` for a volume group exist exactly while primary.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use tandem_agent::control::Request;
use tandem_agent::status::ResourceStatus;
use tandem_tests::lab::{Lab, LabOptions};
use tandem_tests::*;

const SECOND: &str = "queue";
const MIB: u64 = 1 << 20;

fn call(lab: &Lab, node: &str, req: Request) -> Result<String, String> {
    let r = lab.request(node, &req).unwrap();
    if r.ok {
        Ok(r.message.unwrap_or_default())
    } else {
        Err(r.error.unwrap_or_default())
    }
}

fn ok(lab: &Lab, node: &str, req: Request) -> String {
    call(lab, node, req.clone()).unwrap_or_else(|e| panic!("{node}: {req:?}: {e}"))
}

fn connected(r: &ResourceStatus) -> bool {
    r.peers.iter().all(|p| p.connection == "connected")
}

fn in_sync(r: &ResourceStatus) -> bool {
    r.disk == "up_to_date" && r.peers.iter().all(|p| p.connection == "connected" && p.out_of_sync_bytes == 0)
}

fn write_blocks(dev: &str, first: u64, count: u64, run: u64) {
    for i in first..first + count {
        let off = i * BLOCK as u64;
        write_block_direct(dev, off, &stamped_block(off, run, 1), i + 1 == first + count).unwrap();
    }
}

fn link(p: &Path) -> Option<PathBuf> {
    std::fs::read_link(p).ok()
}

#[test]
fn down_takes_one_resource_out_and_up_resyncs_only_the_difference() {
    let mut lab = new_lab(&["alpha", "beta"], &LabOptions { size: 32 * MIB, ..LabOptions::default() });
    add_resource(&lab, SECOND, "16MiB");
    lab.start("alpha").unwrap();
    lab.start("beta").unwrap();
    for res in ["mail", SECOND] {
        wait_resource(&lab, "alpha", res, "connected", connected);
        ok(&lab, "alpha", Request::Promote { resource: res.into(), force: false });
    }
    let dev =
        wait_resource(&lab, "alpha", "mail", "in sync", |r| r.device.is_some() && in_sync(r)).device.unwrap();
    write_blocks(&dev, 0, 64, 1);
    wait_resource(&lab, "alpha", "mail", "in sync", in_sync);

    // Down on the standby: its replication of mail ends; queue goes on.
    let msg = ok(&lab, "beta", Request::Down { resource: "mail".into() });
    assert!(msg.contains("down"), "{msg}");
    let b = status_of(&lab, "beta", "mail");
    assert!(b.down && b.role == "secondary" && b.peers.iter().all(|p| p.connection == "standalone"), "{b:?}");
    wait_resource(&lab, "alpha", "mail", "peer gone", |r| {
        r.peers.iter().all(|p| p.connection != "connected")
    });
    let q = status_of(&lab, "beta", SECOND);
    assert!(!q.down && connected(&q), "the other resource is untouched: {q:?}");
    let e = call(&lab, "beta", Request::Promote { resource: "mail".into(), force: true }).unwrap_err();
    assert!(e.contains("down"), "{e}");
    let e = call(&lab, "beta", Request::Connect { resource: "mail".into() }).unwrap_err();
    assert!(e.contains("tandem up"), "{e}");

    // What the primary writes meanwhile is tracked, and `up` resyncs exactly that.
    write_blocks(&dev, 1000, 256, 2);
    let owed = status_of(&lab, "alpha", "mail").peers[0].out_of_sync_bytes;
    assert_eq!(owed, 256 * BLOCK as u64, "the primary tracks what beta misses");
    let before = resync_bytes_sent(&lab, "alpha");
    let msg = ok(&lab, "beta", Request::Up { resource: "mail".into() });
    assert!(msg.contains("up"), "{msg}");
    wait_resource(&lab, "alpha", "mail", "resynced", in_sync);
    let moved = resync_bytes_sent(&lab, "alpha") - before;
    assert_eq!(moved, owed, "up resyncs the difference only");
    assert!(!status_of(&lab, "beta", "mail").down);

    // Down on the primary is refused while the device is open exclusively (as a mount
    // holds it), and leaves the resource primary and up.
    let stable = lab.dir.join("alpha/dev/mail");
    assert_eq!(link(&stable), Some(PathBuf::from(&dev)));
    let holder = OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open(&dev).unwrap();
    let e = call(&lab, "alpha", Request::Down { resource: "mail".into() }).unwrap_err();
    assert!(e.contains("in use"), "{e}");
    let a = status_of(&lab, "alpha", "mail");
    assert!(!a.down && a.role == "primary", "{a:?}");
    assert_eq!(link(&stable), Some(PathBuf::from(&dev)), "a refused down keeps the stable path");
    drop(holder);
    ok(&lab, "alpha", Request::Down { resource: "mail".into() });
    let a = status_of(&lab, "alpha", "mail");
    assert!(a.down && a.role == "secondary" && a.device.is_none(), "{a:?}");
    assert_eq!(link(&stable), None, "down removes the stable path");
    assert_eq!(status_of(&lab, "alpha", SECOND).role, "primary", "the other resource stays primary");

    // Both copies of mail are equal once nothing writes.
    ok(&lab, "alpha", Request::Up { resource: "mail".into() });
    wait_resource(&lab, "alpha", "mail", "connected", |r| connected(r) && in_sync(r));
    ok(&lab, "alpha", Request::Demote { resource: SECOND.into() });
    lab.stop("alpha", secs(20)).unwrap();
    lab.stop("beta", secs(20)).unwrap();
    assert_eq!(sha256_file(&lab.image("alpha")), sha256_file(&lab.image("beta")));
}

#[test]
fn stable_device_paths_follow_the_role() {
    const VOLUME: u64 = 8 * MIB;
    let mut lab = new_lab(&["alpha", "beta"], &LabOptions { size: 2 * VOLUME, ..LabOptions::default() });
    // One plain resource (mail) and one volume group (group: volumes data and logs).
    let d = lab.dir.display().to_string();
    let mut text = std::fs::read_to_string(&lab.config).unwrap();
    text += "\n[[resource]]\nname = \"group\"\n\n[[resource.volume]]\nname = \"data\"\nsize = \"8MiB\"\n\n\
             [[resource.volume]]\nname = \"logs\"\nsize = \"8MiB\"\n\n";
    for n in ["alpha", "beta"] {
        text += &format!(
            "[resource.disk.{n}]\nimage = \"{d}/{n}/group-{{volume}}.img\"\nmeta = \"{d}/{n}/group.meta\"\n\n"
        );
    }
    std::fs::write(&lab.config, text).unwrap();
    let dev_dir = lab.dir.join("alpha/dev");
    // A stale link from a crashed agent is removed when the agent starts.
    std::fs::create_dir_all(&dev_dir).unwrap();
    std::os::unix::fs::symlink("/dev/loop-stale", dev_dir.join("mail")).unwrap();
    lab.start("alpha").unwrap();
    lab.start("beta").unwrap();
    assert_eq!(link(&dev_dir.join("mail")), None, "the stale link is gone");
    for res in ["mail", "group"] {
        wait_resource(&lab, "alpha", res, "connected", connected);
        ok(&lab, "alpha", Request::Promote { resource: res.into(), force: false });
    }
    let mail = status_of(&lab, "alpha", "mail");
    assert_eq!(link(&dev_dir.join("mail")), mail.device.map(PathBuf::from));
    let group = status_of(&lab, "alpha", "group");
    assert_eq!(group.volumes.len(), 2);
    for v in &group.volumes {
        let dev = v.device.clone().expect("a volume's device on the primary");
        assert_eq!(link(&dev_dir.join("group").join(&v.name)), Some(PathBuf::from(&dev)), "{v:?}");
        assert!(std::fs::metadata(dev_dir.join("group").join(&v.name)).is_ok(), "the link resolves");
    }
    assert!(!lab.dir.join("beta/dev/mail").exists(), "no stable path on the secondary");

    ok(&lab, "alpha", Request::Demote { resource: "group".into() });
    assert!(!dev_dir.join("group").exists(), "demotion removes a group's links and directory");
    assert!(link(&dev_dir.join("mail")).is_some(), "the other resource keeps its link");
    // A clean agent shutdown removes the links of what is still primary.
    assert!(lab.stop("alpha", secs(20)).unwrap(), "clean exit:\n{}", lab.log_text("alpha"));
    assert_eq!(link(&dev_dir.join("mail")), None, "shutdown removes the stable path");
}
