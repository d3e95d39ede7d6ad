//! A node that crashed while primary marks its activity log out of sync for every peer when
//! it opens the resource again, in the extent size the log was written with — even when the
//! configured extent size changed since and the log itself is damaged. These open a
//! resource without starting it (no FUSE, no loop device), so they need no root.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use tandem_agent::config::Config;
use tandem_agent::daemon::events::EventBus;
use tandem_agent::daemon::resource::{create_md, NodeShared, Resource};
use tandem_agent::meta::MetaFile;

const MIB: u64 = 1 << 20;
/// Not a multiple of the 8 MiB configured later: the last extent is partial.
const SIZE_MIB: u64 = 36;
/// Where the metadata file keeps its two activity-log copies (see `agent/src/meta.rs`).
const AL_COPIES: std::ops::Range<u64> = 8192..16384;

fn config(dir: &Path, al_extent_size: &str) -> Config {
    let d = dir.display();
    let text = format!(
        r#"cluster = "mail"
[[node]]
name = "alpha"
address = "127.0.0.1:17789"
control = "{d}/alpha.sock"
run_dir = "{d}/alpha"
cert = "{d}/alpha.crt"
key = "{d}/alpha.key"
[[node]]
name = "beta"
address = "127.0.0.1:17790"
control = "{d}/beta.sock"
run_dir = "{d}/beta"
cert = "{d}/beta.crt"
key = "{d}/beta.key"
[[resource]]
name = "mailstore"
size = "{SIZE_MIB}MiB"
allocate = "sparse"
al_extent_size = "{al_extent_size}"
[resource.disk.alpha]
image = "{d}/alpha.img"
meta = "{d}/alpha.meta"
[resource.disk.beta]
image = "{d}/beta.img"
meta = "{d}/beta.meta"
"#
    );
    Config::parse(&text, &dir.join("tandem.toml")).expect("test config parses")
}

/// Creates alpha's metadata with 4 MiB extents and leaves it as a primary that crashed with
/// `hot` in its activity log.
fn crashed_primary(dir: &Path, hot: &[u32]) -> std::path::PathBuf {
    let c = config(dir, "4MiB");
    create_md(&c.cluster, "alpha", &c.resources[0]).unwrap();
    let meta_path = dir.join("alpha.meta");
    let mut m = MetaFile::open(&meta_path).unwrap();
    assert_eq!(m.record().al_extent_size, 4 * MIB);
    m.update(|r| r.primary = true).unwrap();
    m.store_al(hot).unwrap();
    meta_path
}

/// Opens alpha's resource with 8 MiB extents configured, as a restarted agent would, and
/// returns beta's bitmap as persisted by the replay.
fn reopen_with_8mib_extents(dir: &Path) -> tandem_replicator::DirtyBitmap {
    let c = config(dir, "8MiB");
    let shared = NodeShared {
        hook_timeout: Duration::from_secs(5),
        connect_retry: Duration::from_secs(1),
        events: EventBus::new(),
        keeper: None,
        held: Vec::new(),
    };
    let r = Resource::open(&c.cluster, "alpha", &dir.join("run"), &dir.join("dev"), &c.resources[0], &shared)
        .expect("open the resource");
    drop(r);
    let m = MetaFile::open_readonly(&dir.join("alpha.meta")).unwrap();
    assert!(!m.record().primary && m.record().crashed_primary, "recorded as a crashed primary");
    assert_eq!(m.record().al_extent_size, 8 * MIB, "the emptied log takes the configured size");
    assert_eq!(m.load_al().unwrap(), Vec::<u32>::new(), "the log is emptied after the replay");
    m.load_bitmap("beta").unwrap()
}

#[test]
fn a_damaged_log_marks_the_whole_volume_although_the_configured_extent_grew() {
    let dir = tempfile::tempdir().unwrap();
    let meta_path = crashed_primary(dir.path(), &[0]);
    let f = std::fs::OpenOptions::new().write(true).open(&meta_path).unwrap();
    f.write_all_at(&vec![0xa5; (AL_COPIES.end - AL_COPIES.start) as usize], AL_COPIES.start).unwrap();
    drop(f);
    assert!(MetaFile::open_readonly(&meta_path).unwrap().load_al().is_err(), "both copies damaged");

    let bm = reopen_with_8mib_extents(dir.path());
    assert_eq!(bm.count(), bm.bit_count(), "every block of the volume must be out of sync for beta");
    assert_eq!(bm.dirty_bytes(), SIZE_MIB * MIB);
}

#[test]
fn an_intact_log_marks_its_extents_in_the_size_they_were_written_with() {
    let dir = tempfile::tempdir().unwrap();
    // Extent 1 of 4 MiB is [4, 8) MiB; extent 8 is the volume's last, [32, 36) MiB.
    crashed_primary(dir.path(), &[1, 8]);

    let bm = reopen_with_8mib_extents(dir.path());
    assert_eq!(bm.dirty_runs(), vec![(4 * MIB, 4 * MIB), (32 * MIB, 4 * MIB)]);
}
