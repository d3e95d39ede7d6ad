//! A volume group: two volumes (a mail queue and a message store), one device each, one
//! ordered change stream. A writer moves records from the queue volume to the store volume
//! as an MTA delivers messages (write to the store, flush, remove from the queue, flush);
//! the primary is killed (-9) at random points, and the standby's two volumes must be
//! consistent *with each other*: no record lost, none in both places except the one move
//! that was in flight. `async` mode, so the standby really lags behind the primary.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tandem_tests::lab::{Lab, LabOptions};
use tandem_tests::*;

const VOLUME: u64 = 16 << 20;
const RECORDS: u64 = 2048;

fn group_lab() -> Lab {
    let mut lab = new_lab(
        &["alpha", "beta"],
        &LabOptions {
            size: 2 * VOLUME,
            mode: "async".into(),
            timeout: Duration::from_secs(3),
            ..Default::default()
        },
    );
    let text = std::fs::read_to_string(&lab.config).unwrap();
    // The volume tables go after the resource's own keys, before its disks.
    let volumes = format!(
        "[[resource.volume]]\nname = \"queue\"\nsize = \"{VOLUME}\"\n\n\
         [[resource.volume]]\nname = \"store\"\nsize = \"{VOLUME}\"\n\n[resource.disk.alpha]"
    );
    let text = text
        .replace(&format!("size = \"{}\"\n", 2 * VOLUME), "")
        .replacen("[resource.disk.alpha]", &volumes, 1)
        .replace("/mail.img\"", "/mail-{volume}.img\"");
    assert!(text.contains("[[resource.volume]]") && text.contains("{volume}"), "{text}");
    std::fs::write(&lab.config, text).unwrap();
    lab.start("alpha").unwrap();
    lab.start("beta").unwrap();
    lab.wait_connected("alpha", secs(30)).unwrap();
    lab
}

fn image(lab: &Lab, node: &str, volume: &str) -> PathBuf {
    lab.dir.join(node).join(format!("mail-{volume}.img"))
}

#[derive(Debug, Default, PartialEq)]
struct Census {
    in_queue: u64,
    in_store: u64,
    lost: Vec<u64>,
    doubled: Vec<u64>,
    garbage: Vec<String>,
}

/// Where each record is, from the two volumes' contents.
fn census(queue: &dyn Fn(u64) -> Vec<u8>, store: &dyn Fn(u64) -> Vec<u8>, qrun: u64, srun: u64) -> Census {
    let mut c = Census::default();
    for r in 0..RECORDS {
        let off = r * BLOCK as u64;
        let classify = |b: Vec<u8>, run: u64, what: &str, garbage: &mut Vec<String>| -> bool {
            if b.iter().all(|x| *x == 0) {
                false
            } else if b == stamped_block(off, run, 1) {
                true
            } else {
                garbage.push(format!("record {r} in {what}: neither the record nor empty"));
                false
            }
        };
        let q = classify(queue(r), qrun, "queue", &mut c.garbage);
        let s = classify(store(r), srun, "store", &mut c.garbage);
        match (q, s) {
            (false, false) => c.lost.push(r),
            (true, true) => c.doubled.push(r),
            _ => {}
        }
        c.in_queue += q as u64;
        c.in_store += s as u64;
    }
    c
}

fn census_of_images(queue: &Path, store: &Path, qrun: u64, srun: u64) -> Census {
    census(
        &|r| read_at(queue, r * BLOCK as u64, BLOCK),
        &|r| read_at(store, r * BLOCK as u64, BLOCK),
        qrun,
        srun,
    )
}

#[test]
fn the_census_notices_lost_and_doubled_records() {
    // The check itself must be able to fail: a record in neither volume, one in both.
    let (qrun, srun) = (1, 2);
    let queue = |r: u64| if r < 10 { stamped_block(r * BLOCK as u64, qrun, 1) } else { vec![0; BLOCK] };
    let store =
        |r: u64| if r >= 9 && r != 300 { stamped_block(r * BLOCK as u64, srun, 1) } else { vec![0; BLOCK] };
    let c = census(&queue, &store, qrun, srun);
    assert_eq!(c.lost, vec![300]);
    assert_eq!(c.doubled, vec![9]);
}

#[test]
fn kill9_of_the_primary_leaves_the_standby_volumes_consistent_with_each_other() {
    let iterations: usize =
        std::env::var("TANDEM_SOAK_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    let seed: u64 =
        std::env::var("TANDEM_GROUP_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(rand::random);
    println!("seed {seed} (TANDEM_GROUP_SEED repeats it), {iterations} iterations");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for it in 0..iterations {
        let mut lab = group_lab();
        assert!(lab.promote("alpha", false).unwrap().ok);
        let st = wait_until(&lab, "alpha", "devices", secs(30), |r| {
            r.volumes.iter().all(|v| v.device.is_some()) && r.peers[0].replication == "established"
        });
        let dev = |name: &str| st.volumes.iter().find(|v| v.name == name).unwrap().device.clone().unwrap();
        let (qdev, sdev) = (dev("queue"), dev("store"));
        let (qrun, srun): (u64, u64) = (rng.random(), rng.random());
        // Every record starts in the queue.
        let mut q = BlockWriter::open(&qdev, qrun, true);
        for r in 0..RECORDS {
            q.write(r * BLOCK as u64).unwrap();
        }
        drop(q);
        wait_until(&lab, "alpha", "queue replicated", secs(30), |r| r.peers[0].lag_bytes == 0);
        // The mover: store first (durable), then remove from the queue (durable).
        let (qd, sd) = (qdev.clone(), sdev.clone());
        let mover = std::thread::spawn(move || {
            let zero = vec![0u8; BLOCK];
            let mut moved = 0u64;
            for r in 0..RECORDS {
                let off = r * BLOCK as u64;
                if write_block_direct(&sd, off, &stamped_block(off, srun, 1), true).is_err()
                    || write_block_direct(&qd, off, &zero, true).is_err()
                {
                    break;
                }
                moved += 1;
            }
            moved
        });
        let kill_after = Duration::from_millis(rng.random_range(100..1500));
        std::thread::sleep(kill_after);
        lab.kill9("alpha").unwrap();
        let t = Instant::now();
        let moved = mover.join().unwrap();
        // Let the standby finish applying what it received, then stop it before reading.
        std::thread::sleep(Duration::from_millis(300));
        assert!(lab.stop("beta", secs(20)).unwrap(), "beta did not stop cleanly");
        let c = census_of_images(&image(&lab, "beta", "queue"), &image(&lab, "beta", "store"), qrun, srun);
        println!(
            "iteration {it}: killed after {kill_after:?}; primary acknowledged {moved} moves; \
             standby: {} in queue, {} in store, doubled {:?} ({:?} to check)",
            c.in_queue,
            c.in_store,
            c.doubled,
            t.elapsed()
        );
        assert!(c.garbage.is_empty(), "{:?}", c.garbage);
        assert!(c.lost.is_empty(), "records lost between the volumes: {:?}", c.lost);
        assert!(c.doubled.len() <= 1, "more than the one move in flight is doubled: {:?}", c.doubled);
        if let Some(d) = c.doubled.first() {
            // Only the last move the standby saw can be half done.
            assert_eq!(*d, c.in_store - 1, "a doubled record other than the move in flight");
        }
        // Prefix order: everything before the first record still queued has been stored.
        assert!(c.in_store <= moved + 1, "the standby has moves the primary never made");
        // The old primary's own volumes are just as consistent.
        let c = census_of_images(&image(&lab, "alpha", "queue"), &image(&lab, "alpha", "store"), qrun, srun);
        assert!(c.lost.is_empty() && c.doubled.len() <= 1 && c.garbage.is_empty(), "alpha: {c:?}");
        drop(lab);
    }
}
