use super::file::{DiskFile, ResourceFile, VolumeFile};
use super::*;
use proptest::prelude::*;
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

/// GOOD with nothing set that has a default.
fn minimal() -> String {
    GOOD.replace("mode = \"sync\"\n", "")
}

/// `GOOD` with `lines` added to the resource (before its disks).
fn with_resource_keys(lines: &str) -> String {
    minimal().replace("size = \"512MiB\"\n", &format!("size = \"512MiB\"\n{lines}\n"))
}

/// `GOOD` with `lines` added to `[resource.disk.beta]`.
fn with_beta_keys(lines: &str) -> String {
    minimal().replace(
        "meta = \"/var/lib/tandem/beta/mailstore.meta\"\n",
        &format!("meta = \"/var/lib/tandem/beta/mailstore.meta\"\n{lines}\n"),
    )
}

fn with_options(lines: &str) -> String {
    minimal().replace("cluster = \"mail\"\n", &format!("cluster = \"mail\"\n[options]\n{lines}\n"))
}

fn err(text: &str) -> String {
    parse(text).unwrap_err().to_string()
}

#[test]
fn every_default_is_the_documented_value() {
    let c = parse(&minimal()).unwrap();
    let o = &c.options;
    assert_eq!(o.timeout, Duration::from_secs(5));
    assert_eq!(o.heartbeat_interval, Duration::from_secs(1));
    assert_eq!(o.connect_retry, Duration::from_secs(1));
    assert_eq!(o.stream_window, 16 << 20);
    assert_eq!(o.max_mtu, 9000);
    assert_eq!(o.socket_buffer, 8 << 20);
    assert_eq!(o.hook_timeout, Duration::from_secs(60));
    assert_eq!(o.congestion, Congestion::Cubic);
    let r = &c.resources[0];
    assert_eq!(r.mode, Mode::Sync);
    assert_eq!(r.timeout, Duration::from_secs(5));
    assert_eq!(r.bitmap_granularity, 4096);
    assert!(r.allocate_full);
    assert_eq!(r.resync_max_rate, None);
    assert_eq!(r.resync_min_rate, 16 << 20);
    assert!(!r.resync_checksum);
    assert_eq!(r.al_extents, 1000);
    assert_eq!(r.al_extent_size, 4 << 20);
    assert_eq!(r.after_split_brain, AfterSplitBrain::Disconnect);
    assert_eq!(r.handlers, Handlers::default());
    assert_eq!(r.handlers.fence_peer, None);
    let beta = &r.disks["beta"];
    assert_eq!((beta.mode, beta.backlog, beta.compression), (Mode::Sync, None, Compression::None));
    assert_eq!(
        r.link_to("gamma"),
        PeerLink { mode: Mode::Sync, backlog: None, compression: Compression::None }
    );
    // A backlog exists only for memory and async disks: 128MiB, ahead.
    let c = parse(&with_resource_keys("mode = \"async\"")).unwrap();
    let backlog = Some(Backlog { limit: 128 << 20, when_full: BacklogPolicy::Ahead });
    assert_eq!(c.resources[0].disks["beta"].backlog, backlog);
    assert_eq!(DEFAULT_BACKLOG, 128 << 20);
}

#[test]
fn inherited_values() {
    // A resource's timeout is options.timeout unless it sets its own.
    let c = parse(&with_options("timeout = \"7s\"")).unwrap();
    assert_eq!(c.resources[0].timeout, Duration::from_secs(7));
    let c = parse(&with_resource_keys("timeout = \"3s\"")).unwrap();
    assert_eq!((c.options.timeout, c.resources[0].timeout), (Duration::from_secs(5), Duration::from_secs(3)));
    // Disks take the resource's mode, backlog and policy, key by key.
    let text = with_resource_keys("mode = \"memory\"\nbacklog = \"64MiB\"\non_backlog_full = \"block\"");
    let c = parse(&text).unwrap();
    let r = &c.resources[0];
    let memory = |limit, when_full| PeerLink {
        mode: Mode::Memory,
        backlog: Some(Backlog { limit, when_full }),
        compression: Compression::None,
    };
    assert_eq!(r.link_to("alpha"), memory(64 << 20, BacklogPolicy::Block));
    assert_eq!(r.link_to("beta"), memory(64 << 20, BacklogPolicy::Block));
    let text = text.replace(
        "meta = \"/var/lib/tandem/beta/mailstore.meta\"\n",
        "meta = \"/var/lib/tandem/beta/mailstore.meta\"\nbacklog = \"2MiB\"\ncompression = \"lz4\"\n",
    );
    let c = parse(&text).unwrap();
    let r = &c.resources[0];
    assert_eq!(r.link_to("alpha"), memory(64 << 20, BacklogPolicy::Block));
    assert_eq!(
        r.link_to("beta"),
        PeerLink { compression: Compression::Lz4, ..memory(2 << 20, BacklogPolicy::Block) }
    );
    let text = text.replace("backlog = \"2MiB\"", "on_backlog_full = \"ahead\"\nmode = \"async\"");
    let r = &parse(&text).unwrap().resources[0];
    assert_eq!(
        r.link_to("beta"),
        PeerLink {
            mode: Mode::Async,
            backlog: Some(Backlog { limit: 64 << 20, when_full: BacklogPolicy::Ahead }),
            compression: Compression::Lz4
        }
    );
    // A sync disk has no backlog, whatever the resource's backlog says.
    let text = with_resource_keys("mode = \"async\"\nbacklog = \"64MiB\"");
    let text = text.replace(
        "meta = \"/var/lib/tandem/beta/mailstore.meta\"\n",
        "meta = \"/var/lib/tandem/beta/mailstore.meta\"\nmode = \"sync\"\n",
    );
    assert_eq!(parse(&text).unwrap().resources[0].disks["beta"].backlog, None);
}

#[test]
fn every_accepted_spelling_of_each_enum() {
    let resource =
        |key: &str, v: &str| parse(&with_resource_keys(&format!("{key} = \"{v}\""))).map(|c| c.resources);
    let disk = |key: &str, v: &str| {
        parse(&with_beta_keys(&format!("{key} = \"{v}\""))).map(|c| c.resources[0].disks["beta"].clone())
    };
    for (s, m) in [("sync", Mode::Sync), ("memory", Mode::Memory), ("async", Mode::Async)] {
        assert_eq!(resource("mode", s).unwrap()[0].mode, m, "{s}");
        assert_eq!(disk("mode", s).unwrap().mode, m, "{s}");
    }
    for (s, p) in [("ahead", BacklogPolicy::Ahead), ("block", BacklogPolicy::Block)] {
        let r = &resource("on_backlog_full", s).unwrap()[0];
        let c = parse(&with_resource_keys(&format!("mode = \"async\"\non_backlog_full = \"{s}\""))).unwrap();
        assert_eq!(c.resources[0].disks["beta"].backlog.unwrap().when_full, p, "{s}");
        assert_eq!(r.disks["beta"].backlog, None, "a sync disk has no backlog");
        let c = parse(&with_beta_keys(&format!("mode = \"memory\"\non_backlog_full = \"{s}\""))).unwrap();
        assert_eq!(c.resources[0].disks["beta"].backlog.unwrap().when_full, p, "{s}");
    }
    for (s, p) in [
        ("disconnect", AfterSplitBrain::Disconnect),
        ("discard-zero-changes", AfterSplitBrain::DiscardZeroChanges),
        ("discard-younger-primary", AfterSplitBrain::DiscardYoungerPrimary),
        ("discard-least-changes", AfterSplitBrain::DiscardLeastChanges),
    ] {
        assert_eq!(resource("after_split_brain", s).unwrap()[0].after_split_brain, p, "{s}");
    }
    for (s, full) in [("full", true), ("sparse", false)] {
        assert_eq!(resource("allocate", s).unwrap()[0].allocate_full, full, "{s}");
    }
    for (s, c) in [
        ("none", Compression::None),
        ("lz4", Compression::Lz4),
        ("zstd", Compression::Zstd(1)),
        ("zstd:1", Compression::Zstd(1)),
        ("zstd:7", Compression::Zstd(7)),
        ("zstd:19", Compression::Zstd(19)),
    ] {
        assert_eq!(disk("compression", s).unwrap().compression, c, "{s}");
    }
    for (s, c) in [("cubic", Congestion::Cubic), ("bbr", Congestion::Bbr)] {
        assert_eq!(parse(&with_options(&format!("congestion = \"{s}\""))).unwrap().options.congestion, c);
    }
    // Spellings are exact: no other case, no synonyms, no out-of-range level.
    for (key, bad) in [("mode", "Sync"), ("mode", "c"), ("on_backlog_full", "Ahead"), ("allocate", "thin")] {
        let e = resource(key, bad).unwrap_err().to_string();
        assert!(e.contains(&format!("resource mailstore: {key}")) && e.contains(bad), "{e}");
    }
    for bad in ["zstd:0", "zstd:20", "zstd:", "gzip", "LZ4"] {
        let e = disk("compression", bad).unwrap_err().to_string();
        assert!(e.contains("disk.beta.compression") && e.contains(bad), "{e}");
    }
    let e = resource("after_split_brain", "discard_zero_changes").unwrap_err().to_string();
    assert!(e.contains("not a split-brain policy"), "{e}");
    let e = err(&with_options("congestion = \"reno\""));
    assert!(e.contains("options.congestion") && e.contains("reno") && e.contains("bbr"), "{e}");
}

#[test]
fn a_bad_value_names_the_file_the_item_and_the_key() {
    let cases = [
        (with_options("timeout = \"5 parsecs\""), "options.timeout", "not a duration"),
        (with_options("heartbeat_interval = 1"), "options.heartbeat_interval", "a duration such as"),
        (with_options("stream_window = \"16 MiB per stream\""), "options.stream_window", "unknown size unit"),
        (with_options("max_mtu = 70000"), "options.max_mtu", "between 1200 and 65527"),
        (with_options("socket_buffer = \"64KiB\""), "options.socket_buffer", "between 256KiB and 1GiB"),
        (with_options("socket_buffer = \"lots\""), "options.socket_buffer", "not a size"),
        (with_resource_keys("timeout = \"soon\""), "resource mailstore: timeout", "not a duration"),
        (with_resource_keys("resync_min_rate = \"fast\""), "resource mailstore: resync_min_rate", "100MiB/s"),
        (with_resource_keys("al_extents = \"many\""), "resource mailstore: al_extents", "invalid type"),
        (with_resource_keys("backlog = -5"), "resource mailstore: backlog", "negative"),
        (with_beta_keys("backlog = \"1 XB\""), "resource mailstore: disk.beta.backlog", "unknown size unit"),
        (with_beta_keys("mode = \"sink\""), "resource mailstore: disk.beta.mode", "unknown replication mode"),
        (
            with_beta_keys("on_backlog_full = true"),
            "resource mailstore: disk.beta.on_backlog_full",
            "invalid type",
        ),
        (
            with_beta_keys("colour = \"red\""),
            "resource mailstore: disk.beta.colour",
            "unknown field `colour`",
        ),
        (
            minimal().replace("image = \"/var/lib/tandem/beta/mailstore.img\"\n", ""),
            "disk.beta",
            "missing field `image`",
        ),
        (minimal().replace("127.0.0.1:7790", "beta.example:7790"), "node beta: address", "not IP:port"),
    ];
    for (text, key, problem) in cases {
        let e = err(&text);
        assert!(e.starts_with("config test.toml: "), "{e}");
        assert!(e.contains(&format!("{key}: ")) && e.contains(problem), "{key}: {e}");
        assert!(e.contains("(line "), "{e}");
    }
    // In a volume group, the volume is named too.
    let group = minimal().replace(
        "size = \"512MiB\"\n",
        "[[resource.volume]]\nname = \"queue\"\nsize = \"64MiB\"\n\
         [[resource.volume]]\nname = \"store\"\nsize = \"lots\"\n",
    );
    let e = err(&group);
    assert!(e.contains("resource mailstore: volume store: size: ") && e.contains("\"lots\""), "{e}");
    // The line is the value's.
    let e = err(&with_beta_keys("backlog = \"1 XB\""));
    let line = minimal().lines().count() + 1;
    assert!(e.ends_with(&format!("(line {line})")), "{e}");
}

#[test]
fn values_that_do_not_fit_together_are_refused() {
    let two_nodes = |a: &str, b: &str| minimal().replace("name = \"beta\"", b).replace("name = \"alpha\"", a);
    let cases = [
        (
            with_options("heartbeat_interval = \"5s\""),
            "options.heartbeat_interval (5s) must be shorter than options.timeout (5s)",
        ),
        (with_options("stream_window = \"512k\""), "options.stream_window (512KiB) must be at least 1MiB"),
        (
            minimal().replace("512MiB", "4097"),
            "resource mailstore: size 4097 must be a positive multiple of 4KiB",
        ),
        (
            minimal().replace("\"512MiB\"", "0"),
            "resource mailstore: size 0 must be a positive multiple of 4KiB",
        ),
        (minimal().replace("size = \"512MiB\"\n", ""), "resource mailstore: size is missing"),
        (
            with_resource_keys("bitmap_granularity = \"12k\""),
            "bitmap_granularity (12KiB) must be a power of two from 4KiB to 1MiB",
        ),
        (with_resource_keys("bitmap_granularity = \"2MiB\""), "must be a power of two from 4KiB to 1MiB"),
        (
            with_resource_keys("al_extent_size = \"2k\""),
            "al_extent_size (2KiB) must be a power of two, at least bitmap_granularity",
        ),
        (with_resource_keys("al_extents = 0"), "al_extents (0) must be 1..=1018"),
        (with_resource_keys("al_extents = 1019"), "al_extents (1019) must be 1..=1018"),
        (with_resource_keys("resync_max_rate = 0"), "resync rates must be positive"),
        (with_resource_keys("resync_min_rate = \"0/s\""), "resync rates must be positive"),
        (
            with_resource_keys("backlog = \"512k\""),
            "resource mailstore: backlog (512KiB) must be at least 1MiB",
        ),
        (
            with_beta_keys("backlog = \"10k\""),
            "resource mailstore: disk.beta.backlog (10KiB) must be at least 1MiB",
        ),
        (
            minimal().replace("beta/mailstore.img", "beta/mailstore.meta"),
            "node beta: image and meta are the same file",
        ),
        (two_nodes("name = \"alpha\"", "name = \"alpha\""), "node \"alpha\" is defined twice"),
        (minimal().replace("7790", "7789"), "node beta: address 127.0.0.1:7789 is used by another node"),
        (two_nodes("name = \"al pha\"", "name = \"beta\""), "node name \"al pha\" must be 1-63 characters"),
        (minimal().replace("cluster = \"mail\"", "cluster = \"\""), "cluster name \"\" must be 1-63"),
        (
            minimal().replace("name = \"mailstore\"", "name = \"mail/store\""),
            "resource name \"mail/store\" must be",
        ),
        (
            minimal() + "[[resource]]\nname = \"mailstore\"\nsize = \"4k\"\n",
            "resource \"mailstore\" is defined twice",
        ),
        (
            minimal().replace("[resource.disk.beta]", "[resource.disk.gamma]"),
            "resource mailstore: disk for unknown node \"gamma\" (nodes: alpha, beta)",
        ),
        (
            minimal()
                .replace("[resource.disk.alpha]", "[resource.extra]")
                .replace("[resource.disk.beta]", "[resource.more]"),
            "unknown field `extra`",
        ),
        ("cluster = \"mail\"\n".to_string(), "no [[node]] defined"),
    ];
    for (text, expected) in cases {
        let e = err(&text);
        assert!(e.starts_with("config test.toml: ") && e.contains(expected), "expected {expected:?} in {e}");
    }
    // No disks, and more than 32 of them.
    let no_disks = minimal().split("[resource.disk.alpha]").next().unwrap().to_string();
    assert!(err(&no_disks).contains("resource mailstore: no [resource.disk.NODE] entries"));
    let mut many = String::from("cluster = \"big\"\n");
    for i in 0..33 {
        many += &format!(
            "[[node]]\nname = \"n{i}\"\naddress = \"127.0.0.1:{}\"\n\
             control = \"/c{i}\"\nrun_dir = \"/r{i}\"\ncert = \"/c{i}.crt\"\nkey = \"/c{i}.key\"\n",
            7000 + i
        );
    }
    many += "[[resource]]\nname = \"r\"\nsize = \"1MiB\"\n";
    for i in 0..33 {
        many += &format!("[resource.disk.n{i}]\nimage = \"/i{i}\"\nmeta = \"/m{i}\"\n");
    }
    let e = parse(&many).unwrap_err().to_string();
    assert!(e.contains("resource r: 33 nodes hold a copy; at most 32 may"), "{e}");
    let cut = many.rfind("[resource.disk.n32]").unwrap();
    assert_eq!(parse(&many[..cut]).unwrap().resources[0].disks.len(), 32);
}

#[test]
fn sizes_and_rates_in_every_form() {
    let c = parse(&minimal().replace("\"512MiB\"", "536870912")).unwrap();
    assert_eq!(c.resources[0].size, 512 << 20);
    for (v, bytes) in [
        ("\"100MiB/s\"", 100 << 20),
        ("\"100MiB\"", 100 << 20),
        ("\"100m/s\"", 100 << 20),
        ("\"1 GiB/s\"", 1 << 30),
        ("4096", 4096),
    ] {
        let c = parse(&with_resource_keys(&format!("resync_max_rate = {v}\nresync_min_rate = {v}"))).unwrap();
        assert_eq!(
            (c.resources[0].resync_max_rate, c.resources[0].resync_min_rate),
            (Some(bytes), bytes),
            "{v}"
        );
    }
    for (s, n) in
        [("4k", 4096), ("4K", 4096), ("4kb", 4096), ("4KiB", 4096), ("2 MiB", 2 << 20), ("3g", 3 << 30)]
    {
        assert_eq!(parse_size(s), Ok(n), "{s}");
    }
    assert_eq!(parse_size("1TB"), Ok(1 << 40));
    assert!(parse_size("-1").is_err() && parse_size("").is_err() && parse_size("1.5GiB").is_err());
    assert_eq!(format_size(512 << 20), "512MiB");
    assert_eq!(format_size(4097), "4097");
    assert_eq!(format_size(0), "0");
    assert_eq!(ByteSize(3 << 40).to_string(), "3TiB");
}

proptest! {
    /// Every size prints in a form that parses back to it, and every unit spelling
    /// multiplies by the same power of 1024.
    #[test]
    fn sizes_round_trip(n in any::<u64>(), k in 0u64..1 << 20, unit in 0usize..5, spelling in 0usize..4) {
        prop_assert_eq!(parse_size(&format_size(n)), Ok(n));
        let names = [
            ["", "b", "B", ""],
            ["k", "KiB", "kb", "K"],
            ["m", "MiB", "MB", "mib"],
            ["g", "GiB", "gb", "G"],
            ["t", "TiB", "TB", "tib"],
        ];
        let bytes = k << (10 * unit);
        prop_assert_eq!(parse_size(&format_size(bytes)), Ok(bytes));
        let text = format!("{k}{}", names[unit][spelling]);
        prop_assert_eq!(parse_size(&text), Ok(bytes));
        let toml = format!("v = \"{text}\"");
        #[derive(Deserialize)]
        struct V { v: ByteSize }
        prop_assert_eq!(toml::from_str::<V>(&toml).map(|x| x.v.0).ok(), Some(bytes));
    }
}

/// The keys a derived `Deserialize` struct accepts, as it declares them to the deserializer.
fn fields_of<T: for<'de> Deserialize<'de>>() -> Vec<&'static str> {
    use serde::de::value::Error;
    use serde::de::{Error as _, Visitor};
    struct Capture<'a>(&'a mut Vec<&'static str>);
    impl<'de> serde::Deserializer<'de> for Capture<'_> {
        type Error = Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Error> {
            Err(Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Error> {
            self.0.extend_from_slice(fields);
            Err(Error::custom("fields captured"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
            unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }
    let mut fields = Vec::new();
    let _ = T::deserialize(Capture(&mut fields));
    assert!(!fields.is_empty(), "{} declares no fields", std::any::type_name::<T>());
    fields
}

/// Every leaf key the parser accepts, dotted from the top ("resource.disk.NODE.mode").
fn schema_keys() -> BTreeSet<String> {
    // Each table of the file, and the key under which it nests.
    let tables: [(&str, Vec<&'static str>); 8] = [
        ("", fields_of::<file::ConfigFile>()),
        ("options.", fields_of::<Options>()),
        ("handlers.", fields_of::<Handlers>()),
        ("node.", fields_of::<Node>()),
        ("resource.", fields_of::<ResourceFile>()),
        ("resource.volume.", fields_of::<VolumeFile>()),
        ("resource.disk.NODE.", fields_of::<DiskFile>()),
        ("resource.handlers.", fields_of::<Handlers>()),
    ];
    let is_table = |key: &str| {
        let key = if key == "resource.disk" { "resource.disk.NODE" } else { key };
        tables.iter().any(|(p, _)| p.strip_suffix('.') == Some(key))
    };
    let mut keys = BTreeSet::new();
    for (prefix, fields) in &tables {
        for f in fields {
            let key = format!("{prefix}{f}");
            if !is_table(&key) {
                keys.insert(key);
            }
        }
    }
    keys
}

const OPERATIONS: &str = include_str!("../../../docs/operations.md");

/// The rows of the "Every key" table of the configuration reference: (key, default).
fn documented_keys() -> Vec<(String, String)> {
    let section =
        OPERATIONS.split("### Every key").nth(1).expect("docs/operations.md has an \"Every key\" table");
    let mut rows = Vec::new();
    for line in section.lines().skip_while(|l| !l.starts_with('|')).take_while(|l| l.starts_with('|')).skip(2)
    {
        // Split on unescaped '|' (types write alternatives as `a` \| `b`).
        let cells: Vec<String> =
            line.replace("\\|", "\u{0}").split('|').map(|c| c.trim().replace('\u{0}', "|")).collect();
        assert!(cells.len() >= 5, "short row {line:?}");
        let key = cells[1].strip_prefix('`').and_then(|k| k.strip_suffix('`')).expect("key in backticks");
        rows.push((key.to_string(), cells[3].clone()));
    }
    assert!(rows.len() > 30, "the table was not found whole: {rows:?}");
    rows
}

/// A documented default: a TOML literal (`"5s"`, `9000`), or the key it is inherited from.
enum DocDefault {
    Literal(String),
    Inherited(String),
    NoneOrRequired,
}

fn doc_default(cell: &str) -> DocDefault {
    if cell == "none" || cell == "required" {
        return DocDefault::NoneOrRequired;
    }
    let inner = cell
        .strip_prefix('`')
        .and_then(|c| c.strip_suffix('`'))
        .unwrap_or_else(|| panic!("default {cell:?} is neither none, required, a `value` nor a `key`"));
    if toml::from_str::<toml::Table>(&format!("v = {inner}")).is_ok() {
        DocDefault::Literal(inner.to_string())
    } else {
        DocDefault::Inherited(inner.to_string())
    }
}

#[test]
fn the_reference_table_lists_exactly_the_keys_the_parser_accepts() {
    let schema = schema_keys();
    let mut documented = BTreeSet::new();
    for (key, default) in documented_keys() {
        if let Some(prefix) = key.strip_suffix('*') {
            // "resource.handlers.*": every key of [handlers], inherited one by one.
            let expanded: Vec<String> =
                fields_of::<Handlers>().iter().map(|f| format!("{prefix}{f}")).collect();
            assert_eq!(default, "`handlers.*`");
            documented.extend(expanded);
            continue;
        }
        if let DocDefault::Inherited(from) = doc_default(&default) {
            assert!(schema.contains(&from), "{key} is documented as inherited from {from}, which is no key");
        }
        assert!(documented.insert(key.clone()), "{key} is documented twice");
    }
    let undocumented: Vec<_> = schema.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&schema).collect();
    assert!(undocumented.is_empty(), "keys missing from docs/operations.md: {undocumented:?}");
    assert!(unknown.is_empty(), "docs/operations.md documents keys the parser refuses: {unknown:?}");
    let al = OPERATIONS.lines().find(|l| l.starts_with("| `resource.al_extents`")).unwrap();
    assert!(al.contains(&format!("1–{}", crate::meta::AL_MAX_EXTENTS)), "{al}");
}

#[test]
fn the_documented_defaults_are_the_parsers() {
    let mut options = String::new();
    let mut resource = String::new();
    let mut disk = String::new();
    let mut node = String::new();
    for (key, default) in documented_keys() {
        let DocDefault::Literal(value) = doc_default(&default) else { continue };
        let line = |k: &str| format!("{k} = {value}\n");
        if let Some(k) = key.strip_prefix("options.") {
            options += &line(k);
        } else if let Some(k) = key.strip_prefix("resource.disk.NODE.") {
            disk += &line(k);
        } else if let Some(k) = key.strip_prefix("resource.") {
            resource += &line(k);
        } else if let Some(k) = key.strip_prefix("node.") {
            node += &line(k);
        } else {
            panic!("a literal default for {key}, which this test does not know where to put");
        }
    }
    assert!(options.lines().count() == 9 && resource.lines().count() > 8 && !disk.is_empty());
    let text = with_options(&options)
        .replace("size = \"512MiB\"\n", &format!("size = \"512MiB\"\n{resource}"))
        .replace(".meta\"\n", &format!(".meta\"\n{disk}"))
        .replace(".sock\"\n", &format!(".sock\"\n{node}"));
    let explicit = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let implicit = parse(&minimal()).unwrap();
    assert_eq!(
        format!("{explicit:?}"),
        format!("{implicit:?}"),
        "documented defaults set explicitly:\n{text}"
    );
}

#[test]
fn the_documented_example_config_parses() {
    let reference = OPERATIONS.split("## Configuration reference").nth(1).unwrap();
    let example = reference.split("```toml\n").nth(1).and_then(|s| s.split("```").next()).unwrap();
    let c = Config::parse(example, Path::new("operations.md")).unwrap_or_else(|e| panic!("{e}"));
    let r = c.resource("mailstore").unwrap();
    assert_eq!(r.resync_max_rate, Some(200 << 20));
    assert_eq!(r.handlers.fence_peer.as_deref(), Some("/usr/local/sbin/tandem-fence"));
    assert_eq!(r.handlers.role_change.as_deref(), Some("logger -t tandem role change"));
    assert_eq!(
        r.link_to("dr"),
        PeerLink {
            mode: Mode::Async,
            backlog: Some(Backlog { limit: 512 << 20, when_full: BacklogPolicy::Ahead }),
            compression: Compression::Zstd(1),
        }
    );
    assert_eq!(r.link_to("alpha").mode, Mode::Sync);
}
