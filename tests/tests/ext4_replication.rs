//! Two real agents on loopback: promote, mkfs.ext4, mount, write 1000 files with fsync,
//! unmount, demote — both images byte-identical, and the standby's own filesystem holds
//! every file intact.

use std::collections::BTreeMap;
use std::io::Write;

use sha2::{Digest, Sha256};
use tandem_tests::lab::{run_cmd, LabOptions};
use tandem_tests::*;

#[test]
fn ext4_with_1000_fsynced_files_replicates_exactly() {
    let mut lab = new_lab(&["alpha", "beta"], &LabOptions { size: 128 << 20, ..Default::default() });
    lab.start("alpha").unwrap();
    lab.start("beta").unwrap();
    lab.wait_connected("alpha", secs(30)).unwrap();
    let r = lab.promote("alpha", false).unwrap();
    assert!(r.ok, "promote failed: {r:?}");
    let st = lab
        .wait_for("alpha", "replication established", secs(30), |r| {
            r.device.is_some() && r.peers[0].replication == "established"
        })
        .unwrap();
    let dev = st.device.unwrap();
    assert!(dev.starts_with("/dev/loop"), "{dev}");
    // The standby exposes no device.
    assert_eq!(lab.resource_status("beta").unwrap().device, None);

    run_cmd(std::process::Command::new("mkfs.ext4").args(["-q", "-F", &dev])).unwrap();
    let mnt = lab.dir.join("mnt");
    lab.mount(&dev, &mnt, "").unwrap();
    let mut manifest = BTreeMap::new();
    for i in 0..1000u32 {
        let name = format!("f{i:04}");
        let body: Vec<u8> = (0..(512 + (i as usize * 97) % 9000))
            .map(|j| (j as u32 ^ i.wrapping_mul(2654435761)) as u8)
            .collect();
        let mut f = std::fs::File::create(mnt.join(&name)).unwrap();
        f.write_all(&body).unwrap();
        f.sync_all().unwrap();
        manifest.insert(name, format!("{:x}", Sha256::digest(&body)));
    }
    let st = lab.resource_status("alpha").unwrap();
    assert!(st.stats.flushes >= 1000, "each fsync must reach the engine as a flush: {:?}", st.stats);
    assert_eq!(st.peers[0].out_of_sync_bytes, 0);
    assert_eq!(st.stats.local_io_errors, 0);
    lab.umount(&mnt).unwrap();
    let r = lab.demote("alpha").unwrap();
    assert!(r.ok, "demote failed: {r:?}");
    let standby = lab.resource_status("beta").unwrap();
    assert!(standby.stats.replicated_flushes >= 1000, "{:?}", standby.stats);
    assert_eq!(standby.stats.checksum_errors, 0);
    let clean = lab.stop_all();
    assert!(clean.values().all(|c| *c), "agents did not stop cleanly: {clean:?}");

    assert_eq!(sha256_file(&lab.image("alpha")), sha256_file(&lab.image("beta")), "images differ");
    // Equal images prove nothing if both are wrong: read every file back from the standby.
    let fsck =
        std::process::Command::new("e2fsck").args(["-f", "-n"]).arg(lab.image("beta")).output().unwrap();
    assert!(fsck.status.success(), "fsck of the standby: {}", String::from_utf8_lossy(&fsck.stdout));
    let beta_image = lab.image("beta");
    let ro_dev = lab.attach_ro(&beta_image).unwrap();
    let ro = lab.dir.join("ro");
    lab.mount(&ro_dev, &ro, "ro,noload").unwrap();
    for (name, sum) in &manifest {
        let data =
            std::fs::read(ro.join(name)).unwrap_or_else(|e| panic!("{name} missing on the standby: {e}"));
        assert_eq!(&format!("{:x}", Sha256::digest(&data)), sum, "{name} differs on the standby");
    }
    lab.umount(&ro).unwrap();
    lab.detach(&ro_dev).unwrap();
    // Loop device of the primary is gone after demote.
    let loops = run_cmd(std::process::Command::new("losetup").arg("-a")).unwrap();
    assert!(!loops.contains(&lab.dir.to_string_lossy().to_string()), "leftover loop devices: {loops}");
}
