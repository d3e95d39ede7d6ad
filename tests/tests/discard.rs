//! A discard of the device (`blkdiscard`) reaches every copy as zeroes, and what it does to
//! the images' blocks follows `allocate`: a fully allocated image keeps every block (the range
//! is zeroed in place), a sparse one gives the discarded blocks back.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use tandem_tests::lab::LabOptions;
use tandem_tests::*;

const MIB: u64 = 1 << 20;
/// Written first, then discarded: [DISCARD_AT, DISCARD_AT + DISCARD_LEN).
const WRITTEN_AT: u64 = 4 * MIB;
const WRITTEN_LEN: u64 = 4 * MIB;
const DISCARD_AT: u64 = 5 * MIB;
const DISCARD_LEN: u64 = 2 * MIB;

fn allocated_bytes(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// Writes, discards and returns each node's image (allocated bytes before, after the discard).
fn write_then_discard(allocate: &str) -> Vec<(String, u64, u64)> {
    let opts = LabOptions { resource_extra: format!("allocate = \"{allocate}\""), ..Default::default() };
    let mut lab = new_lab(&["alpha", "beta"], &opts);
    let dev = start_and_promote_alpha(&mut lab, &["alpha", "beta"], all_caught_up);
    let run = rand::random::<u64>();
    for off in (WRITTEN_AT..WRITTEN_AT + WRITTEN_LEN).step_by(BLOCK) {
        write_block_direct(&dev, off, &stamped_block(off, run, 1), true).unwrap();
    }
    let nodes = ["alpha", "beta"];
    let before: Vec<u64> = nodes.iter().map(|n| allocated_bytes(&lab.image(n))).collect();

    let out = Command::new("blkdiscard")
        .args(["-o", &DISCARD_AT.to_string(), "-l", &DISCARD_LEN.to_string(), &dev])
        .output()
        .expect("run blkdiscard (util-linux)");
    assert!(out.status.success(), "blkdiscard {dev}: {}", String::from_utf8_lossy(&out.stderr));
    // sync mode: the discard completed on beta before blkdiscard returned.
    let st = wait_until(&lab, "alpha", "caught up after the discard", secs(30), all_caught_up);
    assert!(st.stats.discards >= 1, "the discard did not reach the volume: {st:#?}");

    let mut result = Vec::new();
    for (n, before) in nodes.iter().zip(before) {
        let image = lab.image(n);
        let data = read_at(&image, WRITTEN_AT, WRITTEN_LEN as usize);
        for (i, block) in data.chunks(BLOCK).enumerate() {
            let off = WRITTEN_AT + (i * BLOCK) as u64;
            if (DISCARD_AT..DISCARD_AT + DISCARD_LEN).contains(&off) {
                assert!(block.iter().all(|b| *b == 0), "{n}: discarded block at {off} is not zero");
            } else {
                assert_eq!(block, stamped_block(off, run, 1), "{n}: block at {off} next to the discard");
            }
        }
        result.push((n.to_string(), before, allocated_bytes(&image)));
    }
    result
}

#[test]
fn a_discard_keeps_a_fully_allocated_image_allocated_on_every_node() {
    for (node, before, after) in write_then_discard("full") {
        assert!(before >= LabOptions::default().size, "{node}: created fully allocated ({before} bytes)");
        assert!(
            after >= before,
            "{node}: the discard freed blocks of a fully allocated image: {before} -> {after}"
        );
    }
}

#[test]
fn a_discard_frees_the_blocks_of_a_sparse_image_on_every_node() {
    for (node, before, after) in write_then_discard("sparse") {
        assert!(after + DISCARD_LEN <= before, "{node}: the discard freed nothing: {before} -> {after}");
    }
}
