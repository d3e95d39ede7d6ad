//! Stable device paths. While this node is primary for a resource, `DIR/RESOURCE` is a
//! symlink to its loop device (a volume group: `DIR/RESOURCE/VOLUME` for each volume), so
//! `ocf:heartbeat:Filesystem`, fstab entries and scripts never need the loop number, which
//! changes with every promotion. `DIR` is the node's `device_dir` (default `/dev/tandem`).
//!
//! Invariant: the paths exist only while the resource is primary here. They are made after
//! the device is up and removed before the device goes (demotion, `down`, agent shutdown);
//! a crashed agent leaves them behind, so opening the resource removes stale ones.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The stable path of `resource` (a volume group's directory of per-volume links).
pub fn path_of(dir: &Path, resource: &str) -> PathBuf {
    dir.join(resource)
}

/// Links `devices` ((volume, device); one with an empty volume name for a plain resource)
/// under `dir`, replacing whatever stale links were there.
pub fn create(dir: &Path, resource: &str, devices: &[(String, String)]) -> Result<()> {
    remove(dir, resource)?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let base = path_of(dir, resource);
    match devices {
        [(volume, device)] if volume.is_empty() => link(device, &base),
        _ => {
            std::fs::create_dir(&base).with_context(|| format!("cannot create {}", base.display()))?;
            for (volume, device) in devices {
                link(device, &base.join(volume))?;
            }
            Ok(())
        }
    }
}

fn link(device: &str, at: &Path) -> Result<()> {
    std::os::unix::fs::symlink(device, at)
        .with_context(|| format!("cannot link {} to {device}", at.display()))
}

/// Removes `resource`'s links under `dir`, if any. Only symlinks (and the directory that
/// holds a volume group's) are removed: anything else at the path is reported, not deleted.
pub fn remove(dir: &Path, resource: &str) -> Result<()> {
    let base = path_of(dir, resource);
    let meta = match std::fs::symlink_metadata(&base) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", base.display())),
    };
    if meta.file_type().is_symlink() {
        return std::fs::remove_file(&base).with_context(|| format!("cannot remove {}", base.display()));
    }
    if !meta.is_dir() {
        anyhow::bail!("{} is neither a device link nor a directory of them; move it away", base.display());
    }
    for entry in std::fs::read_dir(&base).with_context(|| format!("cannot read {}", base.display()))? {
        let p = entry?.path();
        if std::fs::symlink_metadata(&p)?.file_type().is_symlink() {
            std::fs::remove_file(&p).with_context(|| format!("cannot remove {}", p.display()))?;
        }
    }
    std::fs::remove_dir(&base)
        .with_context(|| format!("cannot remove {} (it holds more than device links)", base.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(p: &Path) -> String {
        std::fs::read_link(p).unwrap().to_string_lossy().into_owned()
    }

    #[test]
    fn a_plain_resource_is_one_link_and_a_group_a_directory_of_links() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("dev");
        create(&dir, "mail", &[(String::new(), "/dev/loop7".into())]).unwrap();
        assert_eq!(target(&dir.join("mail")), "/dev/loop7");
        // A new promotion replaces the stale link.
        create(&dir, "mail", &[(String::new(), "/dev/loop9".into())]).unwrap();
        assert_eq!(target(&dir.join("mail")), "/dev/loop9");
        remove(&dir, "mail").unwrap();
        assert!(std::fs::symlink_metadata(dir.join("mail")).is_err());

        let vols = [("data".to_string(), "/dev/loop3".to_string()), ("logs".into(), "/dev/loop4".into())];
        create(&dir, "grp", &vols).unwrap();
        assert_eq!(target(&dir.join("grp/data")), "/dev/loop3");
        assert_eq!(target(&dir.join("grp/logs")), "/dev/loop4");
        remove(&dir, "grp").unwrap();
        assert!(!dir.join("grp").exists());
        remove(&dir, "grp").unwrap();
    }

    #[test]
    fn something_else_at_the_path_is_never_deleted() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("mail"), b"not a link").unwrap();
        let e = remove(d.path(), "mail").unwrap_err().to_string();
        assert!(e.contains("neither a device link"), "{e}");
        assert!(d.path().join("mail").exists());
        std::fs::create_dir(d.path().join("grp")).unwrap();
        std::fs::write(d.path().join("grp/file"), b"x").unwrap();
        assert!(remove(d.path(), "grp").is_err());
        assert!(d.path().join("grp/file").exists());
    }
}
