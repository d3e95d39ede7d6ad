//! The `tandem` binary refuses bad configurations with a message naming the problem, and
//! exits non-zero, before touching any disk. These need no root: the agent fails before it
//! mounts anything.

use std::path::Path;
use std::process::{Command, Output};

fn tandem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .expect("run tandem")
}

fn config(dir: &Path) -> String {
    let d = dir.display();
    format!(
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
size = "16MiB"
mode = "sync"
[resource.disk.alpha]
image = "{d}/alpha.img"
meta = "{d}/alpha.meta"
[resource.disk.beta]
image = "{d}/beta.img"
meta = "{d}/beta.meta"
"#
    )
}

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        for n in ["alpha", "beta"] {
            let out = tandem(&["keygen", "--name", n, "--out", dir.path().to_str().unwrap()]);
            assert!(out.status.success(), "keygen: {}", String::from_utf8_lossy(&out.stderr));
        }
        Self { dir }
    }

    fn write(&self, text: &str) -> String {
        let p = self.dir.path().join("tandem.toml");
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    }

    /// Runs the agent expecting it to refuse; returns stderr.
    fn agent_fails(&self, cfg: &str, node: &str) -> String {
        let out = tandem(&["agent", "--config", cfg, "--node", node]);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "agent accepted a bad setup; stderr: {err}");
        err
    }
}

#[test]
fn keygen_writes_a_private_key_and_refuses_to_overwrite() {
    let s = Setup::new();
    let key = s.dir.path().join("alpha.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    let out = tandem(&["keygen", "--name", "alpha", "--out", s.dir.path().to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
}

#[test]
fn unknown_node_is_named() {
    let s = Setup::new();
    let cfg = s.write(&config(s.dir.path()));
    let err = s.agent_fails(&cfg, "gamma");
    assert!(err.contains("\"gamma\"") && err.contains("alpha, beta"), "{err}");
}

#[test]
fn disk_for_unknown_node_is_named() {
    let s = Setup::new();
    let cfg = s.write(&config(s.dir.path()).replace("[resource.disk.beta]", "[resource.disk.gamma]"));
    let err = s.agent_fails(&cfg, "alpha");
    assert!(err.contains("mailstore") && err.contains("unknown node \"gamma\""), "{err}");
}

#[test]
fn missing_certificate_is_named() {
    let s = Setup::new();
    std::fs::remove_file(s.dir.path().join("beta.crt")).unwrap();
    let cfg = s.write(&config(s.dir.path()));
    let err = s.agent_fails(&cfg, "alpha");
    assert!(err.contains("beta.crt") && err.contains("node beta"), "{err}");
    // Nothing was created for the resource.
    assert!(!s.dir.path().join("alpha.img").exists());
}

#[test]
fn image_of_another_size_is_refused_and_kept() {
    let s = Setup::new();
    let img = s.dir.path().join("alpha.img");
    std::fs::write(&img, vec![7u8; 8 << 20]).unwrap();
    let cfg = s.write(&config(s.dir.path()));
    let err = s.agent_fails(&cfg, "alpha");
    assert!(err.contains("alpha.img") && err.contains("8388608 bytes") && err.contains("16777216"), "{err}");
    assert_eq!(std::fs::read(&img).unwrap(), vec![7u8; 8 << 20], "the image was modified");
}

#[test]
fn malformed_toml_and_bad_values_are_explained() {
    let s = Setup::new();
    let cfg = s.write("cluster = \"mail\"\n[[node]\nname=1");
    let err = s.agent_fails(&cfg, "alpha");
    assert!(err.contains("tandem.toml"), "{err}");
    let cfg = s.write(&config(s.dir.path()).replace("16MiB", "16 parsecs"));
    let err = s.agent_fails(&cfg, "alpha");
    assert!(err.contains("mailstore") && err.contains("size"), "{err}");
    let cfg = s.write(&config(s.dir.path()).replace("mode = \"sync\"", "mode = \"eventually\""));
    let err = s.agent_fails(&cfg, "alpha");
    assert!(err.contains("unknown replication mode"), "{err}");
}

#[test]
fn corrupt_metadata_is_refused() {
    let s = Setup::new();
    // Valid-looking size, garbage content in both metadata copies.
    std::fs::write(s.dir.path().join("alpha.meta"), vec![0x5au8; 8192]).unwrap();
    let cfg = s.write(&config(s.dir.path()));
    let err = s.agent_fails(&cfg, "alpha");
    assert!(err.contains("alpha.meta") && err.contains("corrupt"), "{err}");
}

#[test]
fn status_without_an_agent_says_so() {
    let s = Setup::new();
    let cfg = s.write(&config(s.dir.path()));
    let out = tandem(&["--config", &cfg, "--node", "alpha", "status"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the agent"), "{err}");
}
