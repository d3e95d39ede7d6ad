use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use tandem_agent::cli::{Cli, Command, SnapshotCommand};
use tandem_agent::config::Config;
use tandem_agent::control::{self, Request, SnapshotOp};
use tandem_agent::{daemon, demo, sysutil, tls};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,quinn=warn,rustls=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn node_name(cli: &Cli, cfg: &Config) -> Result<String> {
    if let Some(n) = &cli.node {
        cfg.node(n)?;
        return Ok(n.clone());
    }
    let host = nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_default();
    let short = host.split('.').next().unwrap_or_default().to_string();
    if cfg.node(&short).is_ok() {
        return Ok(short);
    }
    bail!("no --node given and the host name {host:?} is not a node in {}", cfg.path.display())
}

fn call(cli: &Cli, req: Request) -> Result<control::Response> {
    // Promotion mounts and attaches devices; give it time.
    call_with(cli, req, Duration::from_secs(120))
}

fn call_with(cli: &Cli, req: Request, timeout: Duration) -> Result<control::Response> {
    let cfg = Config::load(&cli.config)?;
    let node = node_name(cli, &cfg)?;
    let socket = cfg.node(&node)?.control.clone();
    control::call(&socket, &req, timeout)
}

fn run(cli: Cli) -> Result<ExitCode> {
    match &cli.cmd {
        Command::Agent => {
            let cfg = Config::load(&cli.config)?;
            let node = node_name(&cli, &cfg)?;
            cfg.node(&node)?;
            sysutil::harden_for_block_io();
            // One runtime thread for QUIC and the control plane: the data path's blocking work
            // runs on the FUSE and applier threads, and quinn spends far less CPU per byte on
            // a single-threaded runtime than on a work-stealing one.
            let rt = tokio::runtime::Builder::new_current_thread()
                .thread_name("tandem")
                .enable_all()
                .build()
                .context("cannot start the runtime")?;
            rt.block_on(async move {
                let agent = daemon::Agent::new(cfg, &node)?;
                agent.run().await.map(|daemon::Exit::Stopped| ())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Holder { socket, grace, pid_file } => {
            tandem_agent::holder::server::run(&tandem_agent::holder::server::HolderSettings {
                socket: socket.clone(),
                grace: *grace,
                pid_file: pid_file.clone(),
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Keygen { name, out, force } => {
            let (crt, key) = tls::keygen(name, out, *force)?;
            let cert = tls::load_certs(&crt)?;
            println!("wrote {} and {}", crt.display(), key.display());
            println!("fingerprint {}", tls::fingerprint(&cert[0]));
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json, statistics } => {
            let resp = call(&cli, Request::Status)?;
            let status =
                resp.status.ok_or_else(|| anyhow!(resp.error.unwrap_or_else(|| "no status".into())))?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                let bars = std::io::IsTerminal::is_terminal(&std::io::stdout());
                print!("{}", status.render(bars, *statistics));
                if bars {
                    draw_resync_bars(&status);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::State { resource } => state(&cli, resource),
        Command::Events { resource, json } => events(&cli, resource.clone(), *json),
        Command::Promote { resource, force } => {
            verb(call(&cli, Request::Promote { resource: resource.clone(), force: *force })?)
        }
        Command::Demote { resource } => verb(call(&cli, Request::Demote { resource: resource.clone() })?),
        Command::Invalidate { resource, checksum } => {
            verb(call(&cli, Request::Invalidate { resource: resource.clone(), checksum: *checksum })?)
        }
        Command::Connect { resource } => verb(call(&cli, Request::Connect { resource: resource.clone() })?),
        Command::Disconnect { resource } => {
            verb(call(&cli, Request::Disconnect { resource: resource.clone() })?)
        }
        Command::Down { resource } => verb(call(&cli, Request::Down { resource: resource.clone() })?),
        Command::Up { resource } => verb(call(&cli, Request::Up { resource: resource.clone() })?),
        Command::PeerLost { peer } => verb(call(&cli, Request::PeerLost { peer: peer.clone() })?),
        Command::Resync { resource } => verb(call(&cli, Request::Resync { resource: resource.clone() })?),
        Command::Resolve { resource, discard_local } => {
            verb(call(&cli, Request::Resolve { resource: resource.clone(), discard_local: *discard_local })?)
        }
        Command::Verify { resource, repair, json } => {
            let resp = call(&cli, Request::Verify { resource: resource.clone(), repair: *repair })?;
            if *json && resp.ok {
                println!("{}", serde_json::to_string_pretty(&resp.verify)?);
                return Ok(ExitCode::SUCCESS);
            }
            for r in resp.verify.iter().flatten() {
                println!("{}: {} of {} bytes differ", r.peer, r.differing_bytes, r.checked_bytes);
                for (off, len) in r.ranges.iter().take(20) {
                    println!("  [{off}, +{len})");
                }
                if r.ranges.len() > 20 {
                    println!("  ... {} more ranges", r.ranges.len() - 20);
                }
            }
            verb(resp)
        }
        Command::Snapshot(op) => snapshot(&cli, op),
        Command::Restart { timeout } => restart(&cli, *timeout),
        Command::Held { resource, release } => held(&cli, resource, *release),
        Command::CreateMd { resource } => {
            let cfg = Config::load(&cli.config)?;
            let node = node_name(&cli, &cfg)?;
            let r =
                cfg.resource(resource).ok_or_else(|| anyhow!("no resource {resource:?} in the config"))?;
            println!("{}", tandem_agent::daemon::resource::create_md(&cfg.cluster, &node, r)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::DumpMd { resource, json } => {
            let cfg = Config::load(&cli.config)?;
            let node = node_name(&cli, &cfg)?;
            let r =
                cfg.resource(resource).ok_or_else(|| anyhow!("no resource {resource:?} in the config"))?;
            let disk =
                r.disks.get(&node).ok_or_else(|| anyhow!("resource {resource} has no disk on {node}"))?;
            let dump = tandem_agent::meta::dump(&disk.meta)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&dump)?);
            } else {
                print!("{}", dump.render());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { messages, size, keep, workdir } => {
            let ok = demo::run(&demo::DemoOptions {
                messages: *messages,
                size: tandem_agent::config::parse_size(size).map_err(|e| anyhow!(e))?,
                keep: *keep,
                parent: workdir.clone(),
            })?;
            Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
    }
}

/// `tandem restart`: see its help. Exit 1 if a primary's device was not taken over.
fn restart(cli: &Cli, timeout: Duration) -> Result<ExitCode> {
    let cfg = Config::load(&cli.config)?;
    let socket = cfg.node(&node_name(cli, &cfg)?)?.control.clone();
    let before = control::call(&socket, &Request::Status, Duration::from_secs(30))?
        .status
        .ok_or_else(|| anyhow!("the agent sent no status"))?;
    let primaries: Vec<String> = before
        .resources
        .iter()
        .filter(|r| r.role == tandem_agent::status::Role::Primary)
        .map(|r| r.name.clone())
        .collect();
    let asked = std::time::Instant::now();
    let resp = control::call(&socket, &Request::Restart, Duration::from_secs(30))?;
    if !resp.ok {
        return verb(resp);
    }
    if let Some(m) = &resp.message {
        println!("{m}");
    }
    let after = loop {
        // The old agent answers until it execs; the new one has a later start.
        let now =
            control::call(&socket, &Request::Status, Duration::from_secs(5)).ok().and_then(|r| r.status);
        if let Some(st) = now.filter(|s| s.agent_started_ms != before.agent_started_ms) {
            break st;
        }
        if asked.elapsed() > timeout {
            bail!(
                "the new agent did not answer on {} within {timeout:?}; see its log (primaries' devices wait \
                 until takeover_grace has passed)",
                socket.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    println!("agent restarted: answering after {} ms", asked.elapsed().as_millis());
    let mut all = true;
    for name in &primaries {
        match after.resources.iter().find(|r| &r.name == name).and_then(|r| r.takeover) {
            Some(t) => println!(
                "{name}: taken over after a pause of {} ms ({} requests re-sent, {} waiting)",
                t.paused_ms, t.resent, t.waited
            ),
            None => {
                all = false;
                println!("{name}: NOT taken over: the device was lost (see the agent's log)");
            }
        }
    }
    Ok(if all { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// `tandem held`: see its help.
fn held(cli: &Cli, resource: &str, release: bool) -> Result<ExitCode> {
    let cfg = Config::load(&cli.config)?;
    let node = cfg.node(&node_name(cli, &cfg)?)?.clone();
    if cfg.resource(resource).is_none() {
        bail!("no resource {resource:?} in {}", cli.config.display());
    }
    let key = daemon::resource::fuse_mountpoint(&node.run_dir, resource).display().to_string();
    let socket = tandem_agent::holder::keeper::socket_path(&node.run_dir);
    let Ok(holder) = tandem_agent::holder::client::HolderClient::connect(&socket) else {
        println!("no descriptor holder runs for node {}", node.name);
        return Ok(ExitCode::from(1));
    };
    let is_held = holder.list()?.contains(&key);
    if !release {
        println!("{}", if is_held { "held" } else { "not held" });
        return Ok(if is_held { ExitCode::SUCCESS } else { ExitCode::from(1) });
    }
    if control::call(&node.control, &Request::Status, Duration::from_secs(5)).is_ok() {
        bail!("the agent of node {} is running: it serves the device (use `tandem demote`)", node.name);
    }
    if is_held {
        holder.forget(&key)?;
        println!("released {resource}'s device: its requests fail from now on");
    } else {
        println!("{resource}'s device is not held");
    }
    Ok(ExitCode::SUCCESS)
}

/// `tandem state`: see its help. Exit codes: 0, 2 (no such resource), 3 (no agent).
fn state(cli: &Cli, resource: &str) -> Result<ExitCode> {
    let cfg = Config::load(&cli.config)?;
    let socket = cfg.node(&node_name(cli, &cfg)?)?.control.clone();
    let resp = match control::call(&socket, &Request::Status, Duration::from_secs(30)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e:#}");
            return Ok(ExitCode::from(3));
        }
    };
    let status = resp.status.ok_or_else(|| anyhow!(resp.error.unwrap_or_else(|| "no status".into())))?;
    let Some(r) = status.resources.iter().find(|r| r.name == resource) else {
        eprintln!("error: no resource {resource:?} on node {}", status.node);
        return Ok(ExitCode::from(2));
    };
    let flag = |b: bool| if b { 1 } else { 0 };
    println!("role {}", r.role);
    println!("disk {}", r.disk);
    println!("down {}", flag(r.down));
    println!("device {}", r.device.as_deref().unwrap_or("-"));
    println!("peers {}", r.peers.len());
    println!("peers_known {}", r.peers.iter().filter(|p| p.peer_disk.is_some()).count());
    println!(
        "peer_primary {}",
        flag(r.peers.iter().any(|p| p.peer_role == Some(tandem_agent::status::Role::Primary)))
    );
    for p in &r.peers {
        println!(
            "peer {} {} {} {}",
            p.node,
            p.connection,
            p.peer_role.map_or("-", |r| r.as_str()),
            p.peer_disk.map_or("-", |d| d.as_str())
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `tandem snapshot ...`.
fn snapshot(cli: &Cli, cmd: &SnapshotCommand) -> Result<ExitCode> {
    let (resource, op, json) = match cmd {
        SnapshotCommand::Create { resource, name } => {
            (resource, SnapshotOp::Create { name: name.clone() }, false)
        }
        SnapshotCommand::List { resource, json } => (resource, SnapshotOp::List, *json),
        SnapshotCommand::Delete { resource, name } => {
            (resource, SnapshotOp::Delete { name: name.clone() }, false)
        }
        SnapshotCommand::Expose { resource, name, overlay } => {
            (resource, SnapshotOp::Expose { name: name.clone(), overlay: *overlay }, false)
        }
        SnapshotCommand::Unexpose { resource, name } => {
            (resource, SnapshotOp::Unexpose { name: name.clone() }, false)
        }
        SnapshotCommand::Restore { resource, name } => {
            (resource, SnapshotOp::Restore { name: name.clone() }, false)
        }
    };
    let listing = matches!(op, SnapshotOp::List);
    // A restore writes back what changed since the snapshot: allow it time.
    let resp =
        call_with(cli, Request::Snapshot { resource: resource.clone(), op }, Duration::from_secs(3600))?;
    if !(listing && resp.ok) {
        return verb(resp);
    }
    let list = resp.snapshots.unwrap_or_default();
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    if list.is_empty() {
        println!("no snapshots of {resource}");
    }
    for s in &list {
        let kind = match (&s.tier, &s.peer) {
            (Some(t), _) => format!("scheduled/{t}"),
            (_, Some(p)) => format!("before-resync/{p}"),
            _ => s.kind.clone(),
        };
        println!(
            "{}  {}  seq:{}{}  {}  {}  used:{}{}{}",
            s.name,
            s.created,
            s.seq,
            if s.at_barrier { "" } else { " (between barriers)" },
            kind,
            s.state,
            tandem_agent::status::human_bytes(s.bytes_used),
            s.invalid_reason.as_ref().map(|r| format!("  ({r})")).unwrap_or_default(),
            if s.exposed.is_empty() {
                String::new()
            } else {
                format!(
                    "  exposed:{}",
                    s.exposed.iter().map(|(_, d)| d.as_str()).collect::<Vec<_>>().join(",")
                )
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `tandem events`: see its help. Exit codes: 0 (interrupted, or stdout closed), 2 (no
/// such resource), 3 (the agent stopped or died), 4 (this reader fell behind).
fn events(cli: &Cli, resource: Option<String>, json: bool) -> Result<ExitCode> {
    use std::io::Write;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    use tokio::signal::unix::{signal, SignalKind};

    let cfg = Config::load(&cli.config)?;
    let socket = cfg.node(&node_name(cli, &cfg)?)?.control.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(async move {
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let s = tokio::net::UnixStream::connect(&socket).await.with_context(|| {
            format!("cannot reach the agent at {} (is `tandem agent` running for this node?)", socket.display())
        })?;
        let (r, mut w) = s.into_split();
        let mut req = serde_json::to_string(&Request::Events { resource })?;
        req.push('\n');
        w.write_all(req.as_bytes()).await?;
        let mut lines = tokio::io::BufReader::new(r).lines();
        let stopped = || {
            eprintln!("error: the agent at {} stopped: no more events", socket.display());
            Ok(ExitCode::from(3))
        };
        let answer = match lines.next_line().await {
            Ok(Some(l)) => l,
            _ => return stopped(),
        };
        let answer: control::Response = serde_json::from_str(&answer)
            .with_context(|| format!("unreadable answer from the agent: {answer:?}"))?;
        if !answer.ok {
            eprintln!("error: {}", answer.error.unwrap_or_else(|| "refused".into()));
            return Ok(ExitCode::from(2));
        }
        let mut out = std::io::stdout().lock();
        loop {
            let line = tokio::select! {
                l = lines.next_line() => match l {
                    Ok(Some(l)) => l,
                    _ => return stopped(),
                },
                _ = interrupt.recv() => return Ok(ExitCode::SUCCESS),
                _ = terminate.recv() => return Ok(ExitCode::SUCCESS),
            };
            let record: tandem_agent::events::Record = serde_json::from_str(&line)
                .with_context(|| format!("unreadable event from the agent: {line:?}"))?;
            let written = if json { writeln!(out, "{line}") } else { writeln!(out, "{}", record.render()) };
            if written.and_then(|()| out.flush()).is_err() {
                // Whoever read our output is gone (`| head`): nothing more to do.
                return Ok(ExitCode::SUCCESS);
            }
            if record.kind == tandem_agent::events::Kind::Lost {
                eprintln!(
                    "error: this reader fell behind the agent's events and lost {} records; run `tandem events` again",
                    record.lost.unwrap_or(0)
                );
                return Ok(ExitCode::from(4));
            }
        }
    })
}

fn verb(resp: control::Response) -> Result<ExitCode> {
    if resp.ok {
        println!("{}", resp.message.unwrap_or_default());
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("error: {}", resp.error.unwrap_or_else(|| "failed".into()));
        Ok(ExitCode::from(1))
    }
}

/// On a terminal, draws each running resync as a progress bar (instead of the text line).
fn draw_resync_bars(status: &tandem_agent::status::NodeStatus) {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    for r in &status.resources {
        for p in &r.peers {
            let Some(rs) = p.resync.as_ref().filter(|x| x.active) else { continue };
            let pb = ProgressBar::with_draw_target(Some(rs.total_bytes), ProgressDrawTarget::stdout());
            if let Ok(style) = ProgressStyle::with_template(
                "{msg} [{bar:40}] {percent}% {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
            ) {
                pb.set_style(style.progress_chars("=> "));
            }
            pb.set_message(format!("{} -> {}", r.name, p.node));
            pb.set_position(rs.done_bytes);
            pb.abandon();
        }
    }
}
