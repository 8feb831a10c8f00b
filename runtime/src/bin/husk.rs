//! `husk`: the operator CLI.
//!
//! - `husk check`: what this host can run, and which hypervisor `auto` picks.
//! - `husk env`: the effective configuration.
//! - `husk vm-ping`: boot a sandbox VM, wait for the agent, shut it down.
//! - `husk monitor --listen ADDR`: Prometheus metrics of the node's pods.
//! - `husk runtimeclass`: a RuntimeClass whose overhead is this node's
//!   measured cost of a pod.
//! - `husk run --rootfs DIR -- CMD...`: run one command in a container in
//!   its own microVM, without containerd (operators, the nested lab).
//!   SIGINT, SIGTERM, SIGHUP and SIGQUIT go to the container (a second
//!   one kills it), and the pod is deleted whichever way it ends.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use husk_protocol::{ContainerId, SandboxId};
use husk_runtime::config::Config;
use husk_runtime::host::probe;
use husk_runtime::vm::sandbox::{ms, Sandbox};
use signal_hook::consts::{SIGHUP, SIGINT, SIGKILL, SIGQUIT, SIGTERM};

#[derive(Parser)]
#[command(name = "husk", version, about = "husk: microVM-isolated containers")]
struct Cli {
    /// Configuration file (default: $HUSK_CONFIG, then /etc/husk/config.toml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Report what this host has and which hypervisor backend husk will use.
    Check,
    /// Print the effective configuration, every key included.
    Env,
    /// Boot a sandbox VM, wait for its agent's health reply, shut it down.
    VmPing {
        /// Sandbox id (default: ping-<pid>).
        #[arg(long)]
        id: Option<String>,
        /// Print one JSON object instead of text (for benchmarks).
        #[arg(long)]
        json: bool,
    },
    /// List the pods on this host (their state directories): containerd
    /// namespace, sandbox id, the Kubernetes pod, "running" or "dead"
    /// (only state left), backend, VMM pid, uptime, host memory (PSS of
    /// the pod's VMM and device daemons, the guest RAM they touched
    /// included; the shim not) and containers.
    Ps {
        /// One JSON array, an object per pod.
        #[arg(long)]
        json: bool,
    },
    /// Print a pod's guest console (kernel and agent messages), the
    /// rotated older half first.
    Logs {
        /// The pod: its sandbox id, its Kubernetes name or
        /// `namespace/name`, or a prefix of its id.
        pod: String,
        /// Only pods of this containerd namespace.
        #[arg(long)]
        namespace: Option<String>,
    },
    /// Serve the node's pods as Prometheus metrics (OpenMetrics text) on
    /// `GET /metrics` until killed: what a systemd unit or DaemonSet runs.
    Monitor {
        /// Address and port to listen on, e.g. 127.0.0.1:9760 or
        /// [::]:9760.
        #[arg(long, value_name = "ADDR")]
        listen: std::net::SocketAddr,
    },
    /// Measure running pods' host cost beyond their limits (their cgroups:
    /// VMM, daemons, shim, guest kernel and agent) and print a RuntimeClass
    /// whose overhead covers it, the measurement above it.
    Runtimeclass {
        /// Measure only this pod (as `husk logs` names pods); default:
        /// every running pod.
        #[arg(long)]
        pod: Option<String>,
        /// Only pods of this containerd namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// Seconds to measure over.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
        window: u64,
        /// The RuntimeClass's name.
        #[arg(long, default_value = "husk")]
        name: String,
        /// The runtime handler it names (containerd's runtime entry).
        #[arg(long, default_value = "husk")]
        handler: String,
        /// A node label KEY=VALUE to schedule on (`none` for no
        /// scheduling section).
        #[arg(long, default_value = "node.husk.io/runtime=true")]
        node_label: String,
        /// The measurement and the overhead as one JSON object instead.
        #[arg(long)]
        json: bool,
    },
    /// Remove what is left of a pod whose owner (a shim, `husk run`) died:
    /// its processes, mounts and state directory.
    Delete {
        /// The pod's id.
        id: SandboxId,
        /// Its containerd namespace (`husk run`'s pods: `_husk`).
        #[arg(long, default_value = husk_runtime::host::paths::DIRECT_NAMESPACE)]
        namespace: String,
        /// Kill the pod's processes even while they run.
        #[arg(long)]
        force: bool,
    },
    /// Add husk to containerd's CRI runtimes (the handler a Kubernetes
    /// RuntimeClass names), bring its entry up to date, or remove it,
    /// changing nothing else in the file. containerd reads it when
    /// restarted; running containers keep running through that.
    Install {
        /// containerd's config file (version 2: containerd 1.6 and 1.7);
        /// made if missing.
        #[arg(long, value_name = "FILE")]
        containerd_config: PathBuf,
        /// The runtime handler name (the RuntimeClass's `handler`).
        #[arg(long, default_value = "husk")]
        handler: String,
        /// A husk config for this handler's pods (absolute path); without
        /// it they get the default (/etc/husk/config.toml).
        #[arg(long, value_name = "PATH")]
        husk_config: Option<PathBuf>,
        /// Remove the handler's entry instead.
        #[arg(long, conflicts_with = "husk_config")]
        remove: bool,
    },
    /// Run a command in a container in its own microVM; exits with the
    /// command's status.
    Run {
        /// Root filesystem directory of the container (shared read-write).
        #[arg(long)]
        rootfs: PathBuf,
        /// Sandbox and container id (default: run-<pid>).
        #[arg(long)]
        id: Option<ContainerId>,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HUSK_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("husk: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let (config, source) = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Check => Ok(check(&config, &source.to_string())),
        Command::Env => {
            println!("# husk configuration, from {source}");
            print!("{}", config.to_toml());
            println!(
                "# resolved guest kernel: {}",
                resolved(config.guest.kernel.as_deref(), probe::KERNEL_NAME)
            );
            println!(
                "# resolved guest initramfs: {}",
                resolved(config.guest.initramfs.as_deref(), probe::INITRAMFS_NAME)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::VmPing { id, json } => vm_ping(
            &config,
            id.unwrap_or_else(|| format!("ping-{}", std::process::id())),
            json,
        ),
        Command::Ps { json } => ps(&config, json),
        Command::Logs { pod, namespace } => logs(&config, &pod, namespace.as_deref()),
        Command::Monitor { listen } => {
            let listener = std::net::TcpListener::bind(listen)
                .with_context(|| format!("listening on --listen {listen} (is the port taken?)"))?;
            eprintln!("husk monitor: serving http://{listen}/metrics");
            husk_runtime::pod::metrics::serve(&listener, &config)
                .with_context(|| format!("accepting on {listen}"))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Runtimeclass {
            pod,
            namespace,
            window,
            name,
            handler,
            node_label,
            json,
        } => runtimeclass(
            &config,
            pod.as_deref(),
            namespace.as_deref(),
            std::time::Duration::from_secs(window),
            (&name, &handler, &node_label),
            json,
        ),
        Command::Delete {
            id,
            namespace,
            force,
        } => delete(&config, &namespace, &id, force),
        Command::Install {
            containerd_config,
            handler,
            husk_config,
            remove,
        } => install(&containerd_config, &handler, husk_config.as_deref(), remove),
        Command::Run { rootfs, id, args } => run_container(
            &config,
            match id {
                Some(id) => id,
                None => ContainerId::parse(&format!("run-{}", std::process::id()))?,
            },
            &rootfs,
            &args,
        ),
    }
}

fn resolved(configured: Option<&Path>, name: &str) -> String {
    probe::resolve_image(configured, name)
        .map_or_else(|| "(none found)".into(), |p| p.display().to_string())
}

fn check(config: &Config, source: &str) -> ExitCode {
    println!("config: {source}");
    let (findings, choice) = probe::check(config);
    let confinement = husk_runtime::confine::report::report(&config.state_dir);
    if confinement.is_empty() {
        println!(
            "confinement: no sandbox is running under {}",
            config.state_dir.display()
        );
    }
    for c in &confinement {
        println!("confinement: {c}");
    }
    for f in &findings {
        println!(
            "{:<20} {:<4} {}",
            f.item,
            if f.ok { "ok" } else { "MISSING" },
            f.detail
        );
    }
    let mut needed_ok = findings
        .iter()
        // What pods need beyond booting: shown, not required.
        .filter(|f| !matches!(f.item, "containerd" | "guest network" | "host network"))
        .all(|f| f.ok);
    match choice {
        Ok((backend, why)) => {
            println!("hypervisor: {backend}");
            println!("because: {why}");
            if backend.is_emulated() {
                println!("{}", probe::TCG_WARNING);
            } else if backend == probe::Backend::HuskVmm {
                // husk-vmm gets /dev/kvm as a descriptor the shim opens.
            } else if let Err(e) = husk_runtime::vm::sandbox::kvm_group() {
                // QEMU runs under its sandbox's uid and opens the node.
                println!("{:<20} {:<4} {e}", "kvm group", "MISSING");
                needed_ok = false;
            }
            if needed_ok {
                ExitCode::SUCCESS
            } else {
                println!("husk cannot boot sandboxes until the MISSING items above are fixed");
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            println!("hypervisor: none: {e}");
            ExitCode::FAILURE
        }
    }
}

fn ps(config: &Config, json: bool) -> Result<ExitCode> {
    use husk_runtime::pod::inventory;
    let pods: Vec<_> = inventory::list(config)
        .iter()
        .map(inventory::status)
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&pods)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<12} {:<24} {:<28} {:<8} {:<12} {:>8} {:>8} {:>9} CONTAINERS",
        "NAMESPACE", "ID", "POD", "STATE", "BACKEND", "VMM PID", "UPTIME", "MEMORY"
    );
    let dash = || "-".to_owned();
    for p in pods {
        let pod = match (&p.pod_namespace, &p.pod_name) {
            (Some(ns), Some(name)) => format!("{ns}/{name}"),
            (None, Some(name)) => name.clone(),
            _ => dash(),
        };
        // containerd's ids are 64 hex digits: the first 24 tell them apart
        // (`husk logs` takes a prefix).
        let id: String = p.id.chars().take(24).collect();
        println!(
            "{:<12} {:<24} {:<28} {:<8} {:<12} {:>8} {:>8} {:>9} {}",
            p.namespace,
            id,
            pod,
            p.state,
            p.backend.clone().unwrap_or_else(dash),
            p.vmm_pid.map_or_else(dash, |v| v.to_string()),
            p.uptime_s.map_or_else(dash, uptime),
            p.memory_kib
                .map_or_else(dash, |k| format!("{:.1}M", k as f64 / 1024.0)),
            if p.containers.is_empty() {
                dash()
            } else {
                p.containers.join(",")
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `s` seconds as ps(1) would: 42s, 3m12s, 5h03m, 2d04h.
fn uptime(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

fn logs(config: &Config, name: &str, namespace: Option<&str>) -> Result<ExitCode> {
    use husk_runtime::host::paths::SandboxPaths;
    use husk_runtime::pod::inventory;
    use std::io::Write;
    let pods = inventory::list(config);
    let pod = inventory::find(&pods, name, namespace)?;
    let paths = SandboxPaths::new(config, &pod.namespace, &SandboxId::parse(&pod.id)?)?;
    let mut out = std::io::stdout().lock();
    let mut any = false;
    for log in [paths.console_log_rotated(), paths.console_log()] {
        match std::fs::File::open(&log) {
            Ok(mut f) => {
                std::io::copy(&mut f, &mut out)?;
                any = true;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", log.display())),
        }
    }
    out.flush()?;
    if !any {
        bail!(
            "pod {}/{} has no console log in {} (its VM never started)",
            pod.namespace,
            pod.id,
            pod.dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn runtimeclass(
    config: &Config,
    pod: Option<&str>,
    namespace: Option<&str>,
    window: std::time::Duration,
    (name, handler, node_label): (&str, &str, &str),
    json: bool,
) -> Result<ExitCode> {
    use husk_runtime::pod::{inventory, overhead};
    for (flag, v) in [("--name", name), ("--handler", handler)] {
        if !husk_runtime::host::containerd_config::dns_label(v) {
            bail!(
                "{flag} {v:?} is not a DNS label (lower-case letters, digits and '-', at most 63)"
            );
        }
    }
    let label = match node_label {
        "none" => None,
        l => Some(
            l.split_once('=')
                .with_context(|| format!("--node-label {l:?} is not KEY=VALUE (or `none`)"))?,
        ),
    };
    let pods = inventory::list(config);
    let chosen: Vec<&inventory::PodEntry> = match pod {
        Some(p) => vec![inventory::find(&pods, p, namespace)?],
        None => pods
            .iter()
            .filter(|p| namespace.is_none_or(|ns| p.namespace == ns))
            .collect(),
    };
    let measured = overhead::measure(&chosen, window)?;
    if json {
        let out = serde_json::json!({
            "window_s": window.as_secs(),
            "memory_margin_percent": overhead::MEMORY_MARGIN_PERCENT,
            "overhead": overhead::overhead(&measured),
            "pods": measured,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!(
            "{}",
            overhead::manifest(name, handler, &measured, window, label)
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn delete(config: &Config, namespace: &str, id: &SandboxId, force: bool) -> Result<ExitCode> {
    use husk_runtime::host::paths::SandboxPaths;
    use husk_runtime::pod::{cleanup, inventory};
    let paths = SandboxPaths::new(config, namespace, id)?;
    let Some(pod) = inventory::list(config)
        .into_iter()
        .find(|p| p.namespace == namespace && p.id == id.as_str())
    else {
        bail!(
            "no pod {id} in namespace {namespace} under {} (`husk ps` lists them)",
            config.state_dir.display()
        );
    };
    if !pod.pids.is_empty() && !force {
        bail!(
            "pod {id} is running (pids {:?}): stop it through its owner (containerd, husk run), or pass --force to kill it",
            pod.pids
        );
    }
    let done = cleanup::cleanup(&paths, None);
    if !done.survivors.is_empty() {
        bail!(
            "pod {id}: processes {:?} outlived SIGKILL; its mounts and directory stay",
            done.survivors
        );
    }
    if !done.removed {
        bail!("pod {id}: {} could not be removed", paths.root().display());
    }
    let killed = if done.killed.is_empty() {
        String::new()
    } else {
        format!(" (killed {:?})", done.killed)
    };
    println!("deleted pod {id} in namespace {namespace}{killed}");
    Ok(ExitCode::SUCCESS)
}

fn install(
    file: &Path,
    handler: &str,
    husk_config: Option<&Path>,
    remove: bool,
) -> Result<ExitCode> {
    use husk_runtime::host::containerd_config::{apply, Change, Entry, RUNTIME_TYPE};
    let entry = Entry {
        handler,
        husk_config,
    };
    let change = apply(file, &entry, remove)?;
    let file = file.display();
    let what = match change {
        Change::Added => format!("runtime handler {handler} ({RUNTIME_TYPE}) added to {file}"),
        Change::Updated => format!("runtime handler {handler} updated in {file}"),
        Change::Unchanged => format!("runtime handler {handler} already as asked in {file}"),
        Change::Removed => format!("runtime handler {handler} removed from {file}"),
        Change::Absent => format!("{file} has no runtime handler {handler}; nothing to remove"),
    };
    println!("{what}");
    if matches!(change, Change::Added | Change::Updated | Change::Removed) {
        println!(
            "restart containerd to load it (running containers and pods keep running: their shims outlive containerd)"
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn run_container(
    config: &Config,
    id: ContainerId,
    rootfs: &Path,
    args: &[String],
) -> Result<ExitCode> {
    use husk_runtime::host::storage::MountSpec;
    use husk_runtime::pod::{CreateRequest, Io, PodService, Stream, VmBackend};
    use std::os::fd::AsFd;

    if !rootfs.join("bin").is_dir() && !rootfs.join("usr").is_dir() {
        bail!(
            "rootfs {} has no bin or usr directory; pass a container root filesystem",
            rootfs.display()
        );
    }
    let rootfs = rootfs
        .canonicalize()
        .with_context(|| format!("rootfs {}", rootfs.display()))?;
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let spec = husk_runtime::pod::spec::minimal(&id, &argv, &format!("/husk/{id}"));
    // The pod API, as the shim drives it: a pod of one container whose
    // output goes to this process's own stdout and stderr.
    let (events, _) = std::sync::mpsc::channel();
    let pod = PodService::new(
        VmBackend::new(husk_runtime::host::paths::DIRECT_NAMESPACE),
        events,
    );
    let signals = Forwarder::new(pod.clone(), id.clone())?;
    let fail = |e: husk_runtime::pod::PodApiError| anyhow::anyhow!(husk_runtime::error_chain(&e));
    pod.create(CreateRequest {
        id: id.clone(),
        bundle: PathBuf::new(),
        spec: serde_json::from_slice(&spec).context("the container's spec")?,
        rootfs: vec![MountSpec {
            fstype: "bind".into(),
            source: rootfs.display().to_string(),
            options: vec!["rbind".into()],
        }],
        io: Io {
            stdout: Stream::fd(std::io::stdout().as_fd()).context("husk's stdout")?,
            stderr: Stream::fd(std::io::stderr().as_fd()).context("husk's stderr")?,
            ..Io::default()
        },
        config: config.clone(),
    })
    .map_err(fail)
    .with_context(|| format!("creating container {id} in its own VM"))?;
    let ran = match signals.start(|| pod.start(&id, None)) {
        Ok(Ok(_)) => pod.wait(&id, None).map(|e| e.status),
        Ok(Err(e)) => Err(e),
        // A signal before the container started: it never does.
        Err(sig) => Ok(128 + sig as u32),
    };
    // Deleting the pod's only container stops its VM.
    let deleted = pod.delete(&id, None);
    signals.stop();
    let status = ran.map_err(fail)?;
    deleted.map_err(fail)?;
    Ok(ExitCode::from(status.min(255) as u8))
}

/// The signals `husk run` passes on to its container, as `ctr run` does:
/// it ends by deleting the pod (VM, daemons, mounts), so it must not die
/// of them itself.
const FORWARDED: [i32; 4] = [SIGINT, SIGTERM, SIGHUP, SIGQUIT];

/// Passes [`FORWARDED`] signals on to the container's first process once
/// it runs; a second one while it still runs kills it (SIGKILL), since a
/// container's PID 1 ignores the signals it has no handler for. One that
/// comes before the start keeps the container from starting.
struct Forwarder {
    state: Arc<Mutex<Forwarding>>,
    handle: signal_hook::iterator::Handle,
    thread: std::thread::JoinHandle<()>,
}

#[derive(Default)]
struct Forwarding {
    /// The first signal that came.
    first: Option<i32>,
    /// How many came while the container ran.
    forwarded: u32,
    started: bool,
}

impl Forwarder {
    fn new(
        pod: husk_runtime::pod::PodService<husk_runtime::pod::VmBackend>,
        id: ContainerId,
    ) -> Result<Self> {
        let mut signals = signal_hook::iterator::Signals::new(FORWARDED)
            .context("installing husk run's signal handlers")?;
        let handle = signals.handle();
        let state = Arc::new(Mutex::new(Forwarding::default()));
        let shared = state.clone();
        let thread = std::thread::spawn(move || {
            for sig in signals.forever() {
                let mut st = shared.lock().unwrap_or_else(|p| p.into_inner());
                st.first.get_or_insert(sig);
                if !st.started {
                    continue;
                }
                st.forwarded += 1;
                let sig = if st.forwarded > 1 {
                    eprintln!("husk: a second signal: killing container {id}");
                    SIGKILL
                } else {
                    sig
                };
                if let Err(e) = pod.kill(&id, None, sig as u32, false) {
                    tracing::warn!(signal = sig, error = %husk_runtime::error_chain(&e), "passing a signal to the container");
                }
            }
        });
        Ok(Self {
            state,
            handle,
            thread,
        })
    }

    /// Runs `start` unless a signal came first (then returns that signal);
    /// signals that come meanwhile wait for it, then go to the container.
    fn start<T>(&self, start: impl FnOnce() -> T) -> std::result::Result<T, i32> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sig) = st.first {
            return Err(sig);
        }
        st.started = true;
        Ok(start())
    }

    fn stop(self) {
        self.handle.close();
        let _ = self.thread.join();
    }
}

fn vm_ping(config: &Config, id: String, json: bool) -> Result<ExitCode> {
    let t0 = Instant::now();
    let sb = Sandbox::boot(config, &id).with_context(|| format!("booting sandbox {id}"))?;
    let timings = sb.timings().clone();
    let info = sb
        .agent_info()
        .cloned()
        .context("agent info missing after boot")?;
    let backend = sb.backend().to_owned();
    let dir = sb.dir().to_path_buf();
    let pids = sb.pids();
    if !json {
        println!(
            "agent ready in {} on {backend}: {timings}; host overhead outside the guest's boot {}",
            ms(timings.total),
            ms(timings.host_overhead())
        );
        println!(
            "guest kernel {}, husk-agent {}",
            info.kernel_release, info.agent_version
        );
    }
    let report = sb.shutdown().context("shutting the sandbox down")?;
    let left: Vec<u32> = pids
        .iter()
        .copied()
        .filter(|p| Path::new(&format!("/proc/{p}")).exists())
        .collect();
    if !left.is_empty() || dir.exists() {
        bail!(
            "sandbox {id} left processes {left:?} or directory {} behind",
            dir.display()
        );
    }
    if json {
        let t = &timings;
        let v = serde_json::json!({
            "id": id,
            "backend": backend,
            "kernel_release": info.kernel_release,
            "total_ms": t.total.as_secs_f64() * 1e3,
            "daemons_ms": t.daemons.as_secs_f64() * 1e3,
            "vmm_spawn_ms": t.vmm_spawn.as_secs_f64() * 1e3,
            "kernel_to_init_ms": t.kernel_to_init.as_secs_f64() * 1e3,
            "init_to_listening_ms": t.init_to_listening.as_secs_f64() * 1e3,
            "listening_to_serving_ms": t.listening_to_serving.as_secs_f64() * 1e3,
            "serving_to_reply_ms": t.serving_to_reply.as_secs_f64() * 1e3,
            "vmm_start_ms": t.vmm_start.as_secs_f64() * 1e3,
            "vmm_ready_ms": t.vmm_ready.map(|d| d.as_secs_f64() * 1e3),
            "guest_boot_ms": t.guest_boot().as_secs_f64() * 1e3,
            "connect_ms": t.connect.as_secs_f64() * 1e3,
            "handshake_ms": t.handshake.as_secs_f64() * 1e3,
            "first_rpc_ms": t.first_rpc.as_secs_f64() * 1e3,
            "host_overhead_ms": t.host_overhead().as_secs_f64() * 1e3,
            "connect_attempts": t.connect_attempts,
            "shutdown_ms": report.duration.as_secs_f64() * 1e3,
            "shutdown_forced": report.forced,
        });
        println!("{v}");
    } else {
        println!(
            "sandbox {id} stopped in {}{}; no process, socket or directory left ({} total)",
            ms(report.duration),
            if report.forced {
                " (VM had to be killed)"
            } else {
                ""
            },
            ms(t0.elapsed())
        );
    }
    Ok(ExitCode::SUCCESS)
}
