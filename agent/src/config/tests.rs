use super::*;
use tandem_replicator::BacklogPolicy;

const GOOD: &str = r#"
cluster = "mail"
[[node]]
name = "alpha"
address = "127.0.0.1:7789"
control = "/run/tandem/alpha.sock"
run_dir = "/run/tandem/alpha"
cert = "/etc/tandem/alpha.crt"
key = "/etc/tandem/alpha.key"
[[node]]
name = "beta"
address = "127.0.0.1:7790"
control = "/run/tandem/beta.sock"
run_dir = "/run/tandem/beta"
cert = "/etc/tandem/beta.crt"
key = "/etc/tandem/beta.key"
[[resource]]
name = "mailstore"
size = "512MiB"
mode = "sync"
[resource.disk.alpha]
image = "/var/lib/tandem/alpha/mailstore.img"
meta = "/var/lib/tandem/alpha/mailstore.meta"
[resource.disk.beta]
image = "/var/lib/tandem/beta/mailstore.img"
meta = "/var/lib/tandem/beta/mailstore.meta"
"#;

fn parse(s: &str) -> Result<Config, ConfigError> {
    Config::parse(s, Path::new("test.toml"))
}

#[test]
fn the_documented_example_parses() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.resources[0].size, 512 << 20);
    assert_eq!(c.resources[0].mode, Mode::Sync);
    assert_eq!(c.peers_of("alpha").len(), 1);
    assert_eq!(c.resources[0].peers_of("beta"), vec!["alpha".to_string()]);
}

#[test]
fn errors_name_the_problem() {
    let e = parse(&GOOD.replace("[resource.disk.beta]", "[resource.disk.gamma]")).unwrap_err().to_string();
    assert!(e.contains("unknown node \"gamma\""), "{e}");
    let e = parse(&GOOD.replace("512MiB", "512 parsecs")).unwrap_err().to_string();
    assert!(e.contains("mailstore") && e.contains("size"), "{e}");
    let e = parse(&GOOD.replace("mode = \"sync\"", "mode = \"fast\"")).unwrap_err().to_string();
    assert!(e.contains("unknown replication mode"), "{e}");
    let e = parse(&GOOD.replace("127.0.0.1:7790", "localhost")).unwrap_err().to_string();
    assert!(e.contains("beta") && e.contains("address"), "{e}");
    let e =
        parse(&GOOD.replace("cluster = \"mail\"", "cluster = \"mail\"\ncolor = 1")).unwrap_err().to_string();
    assert!(e.contains("unknown field"), "{e}");
    let c = parse(GOOD).unwrap();
    let e = c.node("gamma").unwrap_err().to_string();
    assert!(e.contains("gamma") && e.contains("alpha, beta"), "{e}");
}

#[test]
fn handlers_and_split_brain_policy() {
    let text = GOOD.replace(
        "mode = \"sync\"",
        "mode = \"sync\"\nafter_split_brain = \"discard-zero-changes\"\n\
         [resource.handlers]\nsplit_brain = \"/bin/alert sb\"",
    ) + "[handlers]\nsplit_brain = \"/bin/other\"\nfence_peer = \"/bin/fence\"\n";
    let c = parse(&text).unwrap();
    let r = &c.resources[0];
    assert_eq!(r.after_split_brain, AfterSplitBrain::DiscardZeroChanges);
    assert_eq!(r.handlers.split_brain.as_deref(), Some("/bin/alert sb"));
    assert_eq!(r.handlers.fence_peer.as_deref(), Some("/bin/fence"));
    assert_eq!(r.handlers.sync_done, None);
    let e =
        parse(&GOOD.replace("mode = \"sync\"", "after_split_brain = \"coin-flip\"")).unwrap_err().to_string();
    assert!(e.contains("after_split_brain") && e.contains("coin-flip"), "{e}");
    let e = parse(&(GOOD.to_string() + "[handlers]\nfence = \"x\"\n")).unwrap_err().to_string();
    assert!(e.contains("unknown field") && e.contains("fence"), "{e}");
}

#[test]
fn per_peer_modes_and_backlogs() {
    let text = GOOD.replace(
        "meta = \"/var/lib/tandem/beta/mailstore.meta\"",
        "meta = \"/var/lib/tandem/beta/mailstore.meta\"\nmode = \"async\"\nbacklog = \"64MiB\"",
    );
    let c = parse(&text).unwrap();
    let r = &c.resources[0];
    assert_eq!(
        r.link_to("alpha"),
        PeerLink { mode: Mode::Sync, backlog: None, compression: Compression::None }
    );
    assert_eq!(
        r.link_to("beta"),
        PeerLink {
            mode: Mode::Async,
            backlog: Some(Backlog { limit: 64 << 20, when_full: BacklogPolicy::Ahead }),
            compression: Compression::None,
        }
    );
    let e = parse(&text.replace("mode = \"async\"", "mode = \"asap\"")).unwrap_err().to_string();
    assert!(e.contains("disk.beta.mode") && e.contains("asap"), "{e}");
    let e = parse(&text.replace("64MiB", "10k")).unwrap_err().to_string();
    assert!(e.contains("disk.beta.backlog") && e.contains("1MiB"), "{e}");
    let e =
        parse(&text.replace("backlog = \"64MiB\"", "on_backlog_full = \"wait\"")).unwrap_err().to_string();
    assert!(e.contains("on_backlog_full") && e.contains("wait"), "{e}");
}

#[test]
fn volume_groups() {
    let text = GOOD
        .replace("size = \"512MiB\"\n", "")
        .replacen(
            "[resource.disk.alpha]",
            "[[resource.volume]]\nname = \"queue\"\nsize = \"64MiB\"\n[[resource.volume]]\nname = \"store\"\n\
             size = \"1GiB\"\n[resource.disk.alpha]",
            1,
        )
        .replace("mailstore.img", "mailstore-{volume}.img");
    let c = parse(&text).unwrap();
    let r = &c.resources[0];
    assert_eq!(r.size, (64 << 20) + (1 << 30));
    assert_eq!(r.volumes[1], VolumeLayout { name: "store".into(), offset: 64 << 20, size: 1 << 30 });
    assert_eq!(
        r.disks["alpha"].image_for(&r.volumes[0]),
        PathBuf::from("/var/lib/tandem/alpha/mailstore-queue.img")
    );
    let e = parse(&text.replace("mailstore-{volume}.img", "mailstore.img")).unwrap_err().to_string();
    assert!(e.contains("{volume}"), "{e}");
    let e = parse(&text.replace("name = \"store\"", "name = \"queue\"")).unwrap_err().to_string();
    assert!(e.contains("defined twice"), "{e}");
}

#[test]
fn sizes_and_durations() {
    assert_eq!(parse_size("4k").unwrap(), 4096);
    assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
    assert_eq!(parse_size("123").unwrap(), 123);
    assert!(parse_size("12XB").is_err());
    assert!(parse_size("99999999999999TiB").is_err());
    assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
}
