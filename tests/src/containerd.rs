//! A private containerd for end-to-end tests: its own root, state and
//! socket under a temp dir, husk registered as `io.containerd.husk.v2` (and
//! as CRI handler `husk`), the shim found in this build's target dir, and a
//! busybox image built locally from Debian's busybox-static and imported.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Image reference the harness imports.
pub const IMAGE: &str = "docker.io/husk/busybox:latest";
/// The runtime name containerd knows husk by.
pub const RUNTIME: &str = "io.containerd.husk.v2";
/// containerd namespace the tests use.
pub const NAMESPACE: &str = "husk-e2e";
/// The pod sandbox image CRI uses (built locally, see build-busybox-image.sh).
pub const PAUSE_IMAGE: &str = "docker.io/husk/pause:latest";
/// The bridge the test CNI network makes (removed when containerd stops).
pub const TEST_BRIDGE: &str = "husk-e2e0";
/// containerd's namespace for CRI.
pub const CRI_NAMESPACE: &str = "k8s.io";

pub struct Containerd {
    pub dir: tempfile::TempDir,
    child: Child,
    socket: PathBuf,
    /// Whether a test asked for CRI (then Drop removes its pods).
    cri_used: std::sync::atomic::AtomicBool,
}

/// Starts containerd on the config in `d`, logging to `d/containerd.log`
/// (appended, across restarts).
fn spawn_containerd(d: &Path) -> Child {
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(d.join("containerd.log"))
        .expect("containerd log");
    let path = format!(
        "{}:{}",
        profile_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new("containerd")
        .arg("--config")
        .arg(d.join("config.toml"))
        .env("PATH", path)
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start containerd (apt-get install containerd)")
}

/// The CRI handler whose pods boot the agent's test hooks (a hostile
/// guest; see agent/src/test_hooks.rs), with the config
/// [`write_hostile_config`] writes.
pub const HOSTILE_HANDLER: &str = "husk-hostile";

/// How long the hostile handler's guests may sit on a SIGKILL before the
/// host ends their VM (`agent.kill_timeout_ms`).
pub const HOSTILE_KILL_GRACE: Duration = Duration::from_millis(1000);

/// Turns the host's IPv4 forwarding on, as CNI's bridge plugin does at
/// its first pod. containerd makes a pod's network namespace before CNI
/// runs, and a new namespace copies IPv4's `conf/all` and `conf/default`
/// (forwarding, and accept_redirects with it) from the host's
/// (`net.core.devconf_inherit_init_net` = 0, the default). On a host where
/// forwarding was off, the first pod's namespace got 0 and every later
/// one 1: on a fresh machine the CNI matrix's first case compared a runc
/// pod made before the plugin's first run with a husk pod made after it,
/// and failed on 5 sysctls no runtime chose (every fresh machine, never a
/// used one). With it on from the start, both runtimes' pods inherit the
/// same.
fn host_forwarding_on() {
    let knob = Path::new("/proc/sys/net/ipv4/ip_forward");
    if std::fs::read_to_string(knob).is_ok_and(|v| v.trim() == "0") {
        std::fs::write(knob, "1").expect("turn on the host's IPv4 forwarding");
        eprintln!("harness: the host's net.ipv4.ip_forward was 0; now 1, as CNI's bridge plugin sets it at its first pod");
    }
}

/// Where [`write_hostile_config`] puts its file in containerd dir `d`.
fn hostile_config_in(d: &Path) -> PathBuf {
    d.join("husk-hostile.toml")
}

/// A husk config in `d` for guests that swallow SIGKILL
/// (`husk.test.ignore_sigkill`) with a grace of [`HOSTILE_KILL_GRACE`];
/// its path. [`HOSTILE_HANDLER`]'s, and for `ctr run
/// --runtime-config-path` ([`Containerd::hostile_config`]).
fn write_hostile_config(d: &Path) -> PathBuf {
    let guest = crate::guest_dir();
    let path = hostile_config_in(d);
    let text = format!(
        "[guest]\nkernel = \"{}\"\ninitramfs = \"{}\"\nkernel_params = \"husk.test.ignore_sigkill\"\n\
         [agent]\nkill_timeout_ms = {}\n",
        guest.join("vmlinux").display(),
        guest.join("initramfs-test-hooks.cpio").display(),
        HOSTILE_KILL_GRACE.as_millis()
    );
    std::fs::write(&path, text).expect("write the hostile guest's config");
    path
}

/// Writes CNI network list `conflist` into the conf dir under `d`, its
/// `@IPAM_DIR@` and `@DIR@` replaced by dirs of this containerd's own.
fn write_cni(d: &Path, conflist: &str) {
    std::fs::write(
        d.join("cni/10-husk-e2e.conflist"),
        conflist
            .replace("@IPAM_DIR@", &d.join("ipam").display().to_string())
            .replace("@DIR@", &d.display().to_string()),
    )
    .expect("write cni conf");
}

/// A CNI plugin dir under `d`: Debian's plugins (/usr/lib/cni) and the
/// test's own (tests/cni), as links.
fn cni_bin_dir(d: &Path) -> PathBuf {
    let bin = d.join("cni-bin");
    std::fs::create_dir_all(&bin).expect("cni bin dir");
    let ours = Path::new(env!("CARGO_MANIFEST_DIR")).join("cni");
    for dir in [Path::new("/usr/lib/cni"), ours.as_path()] {
        for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let e = e.expect("cni plugin entry");
            std::os::unix::fs::symlink(e.path(), bin.join(e.file_name()))
                .expect("link a cni plugin");
        }
    }
    bin
}

/// The target dir of this build profile (holds the shim binary): the
/// parent of a test's `deps/`, or a binary's own directory.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let dir = exe.parent().expect("target/<profile>");
    match dir.file_name() {
        Some(n) if n == "deps" => dir.parent().expect("target/<profile>").to_path_buf(),
        _ => dir.to_path_buf(),
    }
}

/// The IPv4 pod subnet of the test bridge, its gateway, and the IPv6 one.
pub const POD_SUBNET: &str = "10.244.77.0/24";
pub const POD_GATEWAY: &str = "10.244.77.1";
pub const POD_SUBNET6: &str = "fd00:77::/64";

/// The bridge plugin on [`TEST_BRIDGE`] with host-local addresses from
/// [`POD_SUBNET`] (and [`POD_SUBNET6`] with `dual_stack`), links of `mtu`.
pub fn bridge_plugin(mtu: u32, dual_stack: bool) -> String {
    let v6 = if dual_stack {
        format!(r#",[{{"subnet":"{POD_SUBNET6}"}}]"#)
    } else {
        String::new()
    };
    format!(
        r#"{{"type":"bridge","bridge":"{TEST_BRIDGE}","isGateway":true,"ipMasq":false,"mtu":{mtu},"ipam":{{"type":"host-local","ranges":[[{{"subnet":"{POD_SUBNET}"}}]{v6}],"routes":[{{"dst":"0.0.0.0/0"}}{}],"dataDir":"@IPAM_DIR@"}}}}"#,
        if dual_stack { r#",{"dst":"::/0"}"# } else { "" }
    )
}

/// A CNI network list `husk-e2e` of `main` followed by `more` plugins
/// (each a JSON object with a leading comma, or nothing).
pub fn cni_conflist(main: &str, more: &str) -> String {
    format!(r#"{{"cniVersion":"0.4.0","name":"husk-e2e","plugins":[{main}{more}]}}"#)
}

impl Containerd {
    /// Starts containerd and imports the busybox image; CNI is a bridge of
    /// this test's own, [`TEST_BRIDGE`], with pod subnet 10.244.77.0/24.
    pub fn start() -> Self {
        Self::start_with_cni(&cni_conflist(&bridge_plugin(1500, false), ""))
    }

    /// As [`Containerd::start`] with CNI network list `conflist` (JSON; the
    /// text `@IPAM_DIR@` in it is replaced by a host-local data dir of this
    /// containerd's own).
    pub fn start_with_cni(conflist: &str) -> Self {
        host_forwarding_on();
        let shim = profile_dir().join("containerd-shim-husk-v2");
        assert!(
            shim.is_file(),
            "{} missing: build it with `cargo build --bins` (make test does)",
            shim.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("husk-ctd")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let d = dir.path().to_path_buf();
        let d = d.as_path();
        let socket = d.join("containerd.sock");
        // CNI: a bridge of this test's own with a pod subnet no other host
        // uses (CRI needs a pod interface; issue 10 carries it into the
        // VM); the streaming server on a free loopback port.
        let cni = d.join("cni");
        std::fs::create_dir_all(&cni).expect("cni conf dir");
        let cni_bin = cni_bin_dir(d);
        write_cni(d, conflist);
        let config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n[grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\"]\n  restrict_oom_score_adj = true\n  sandbox_image = \"{PAUSE_IMAGE}\"\n\
             stream_server_address = \"127.0.0.1\"\n  stream_server_port = \"0\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".cni]\n  bin_dir = \"{cni_bin}\"\n  conf_dir = \"{cni}\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.husk]\n  runtime_type = \"io.containerd.husk.v2\"\n  pod_annotations = [\"*\"]\n  container_annotations = [\"*\"]\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.{HOSTILE_HANDLER}]\n  runtime_type = \"io.containerd.husk.v2\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.{HOSTILE_HANDLER}.options]\n  ConfigPath = \"{hostile}\"\n",
            hostile = write_hostile_config(d).display(),
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = socket.display(),
            cni = cni.display(),
            cni_bin = cni_bin.display(),
        );
        std::fs::write(d.join("config.toml"), config).expect("write containerd config");
        let child = spawn_containerd(d);
        let c = Self {
            dir,
            child,
            socket,
            cri_used: Default::default(),
        };
        c.wait_up();
        let tar = d.join("busybox.tar");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("images/build-busybox-image.sh");
        let st = Command::new("bash")
            .arg(&script)
            .arg(&tar)
            .arg(IMAGE)
            .status()
            .expect("run image script");
        assert!(st.success(), "building the busybox image failed");
        let out = c.ctr(&["images", "import", tar.to_str().expect("utf-8")]);
        assert!(
            out.status.success(),
            "image import failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        c
    }

    fn wait_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.ctr(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "containerd did not come up:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Replaces the CNI network list with `conflist` (as
    /// [`Containerd::start_with_cni`]) and restarts containerd on it, so
    /// every pod made after this call is on it (CRI's own reload of the
    /// directory is asynchronous). No pod may be running.
    pub fn set_cni(&mut self, conflist: &str) {
        write_cni(self.dir.path(), conflist);
        self.restart(Duration::ZERO);
    }

    /// Kills containerd as a crash or an upgrade would (its shims live on),
    /// waits `down`, and starts it again on the same state.
    pub fn restart(&mut self, down: Duration) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(down);
        self.child = spawn_containerd(self.dir.path());
        self.wait_up();
    }

    /// A new CRI client (after a restart).
    pub fn cri_client(&self) -> crate::cri::Cri {
        crate::cri::Cri::connect(&self.socket)
    }

    /// Imports the busybox and pause images for CRI (namespace k8s.io) and
    /// returns a CRI client once CRI sees them.
    pub fn cri(&self) -> crate::cri::Cri {
        let d = self.dir.path();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("images/build-busybox-image.sh");
        let pause = d.join("pause.tar");
        let st = Command::new("bash")
            .arg(&script)
            .arg("--pause")
            .arg(&pause)
            .arg(PAUSE_IMAGE)
            .status()
            .expect("run image script");
        assert!(st.success(), "building the pause image failed");
        for tar in [d.join("busybox.tar"), pause] {
            let out = self.ctr_in(
                CRI_NAMESPACE,
                &["images", "import", tar.to_str().expect("utf-8")],
            );
            assert!(
                out.status.success(),
                "image import for CRI failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.cri_used
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let cri = crate::cri::Cri::connect(&self.socket);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(cri.image_present(IMAGE) && cri.image_present(PAUSE_IMAGE)) {
            assert!(
                Instant::now() < deadline,
                "CRI never saw the imported images"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        cri
    }

    /// `ctr` in another containerd namespace.
    pub fn ctr_in(&self, namespace: &str, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", namespace])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ctr")
    }

    /// `ctr` against this containerd, in the test namespace, stdin from /dev/null.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_cmd(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ctr")
    }

    /// `ctr run <flags> --runtime husk <test image> <id> <cmd>`, stdin from
    /// /dev/null.
    pub fn run(&self, flags: &[&str], id: &str, cmd: &[&str]) -> Output {
        self.ctr(&run_args(flags, RUNTIME, id, cmd))
    }

    /// The same as a command to wire up before it starts.
    pub fn run_cmd(&self, flags: &[&str], id: &str, cmd: &[&str]) -> Command {
        self.ctr_cmd(&run_args(flags, RUNTIME, id, cmd))
    }

    pub fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", NAMESPACE])
            .args(args);
        c
    }

    /// A client of the task's shim, over the socket containerd recorded: for
    /// task calls `ctr` 1.6 has no command for (Update).
    pub fn shim_client(&self, id: &str) -> containerd_shim_protos::shim::shim_ttrpc::TaskClient {
        let file = self
            .dir
            .path()
            .join("state/io.containerd.runtime.v2.task")
            .join(NAMESPACE)
            .join(id)
            .join("address");
        let address =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let client = containerd_shim_protos::ttrpc::Client::connect(address.trim())
            .unwrap_or_else(|e| panic!("connect to the shim at {address}: {e}"));
        containerd_shim_protos::shim::shim_ttrpc::TaskClient::new(client)
    }

    /// The husk config of [`HOSTILE_HANDLER`]'s guests (SIGKILL
    /// swallowed, [`HOSTILE_KILL_GRACE`]), written at start.
    pub fn hostile_config(&self) -> PathBuf {
        hostile_config_in(self.dir.path())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// The bundle containerd made for task `id` in `namespace` (`k8s.io`
    /// for CRI's).
    pub fn bundle(&self, namespace: &str, id: &str) -> PathBuf {
        self.dir
            .path()
            .join("state/io.containerd.runtime.v2.task")
            .join(namespace)
            .join(id)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // A failed test's containerd log outlives its directory.
        if std::thread::panicking() {
            let kept = std::env::temp_dir().join(format!(
                "husk-e2e-containerd-{}.log",
                self.dir
                    .path()
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ));
            if std::fs::copy(self.dir.path().join("containerd.log"), &kept).is_ok() {
                eprintln!("containerd's log kept in {}", kept.display());
            }
        }
        // A test that failed midway leaves pods and tasks: end them through
        // containerd, so their shims clean up, before containerd stops.
        // Pods first, through CRI, which waits for their shims' shutdown
        // (killing their tasks with ctr races CRI's own exit handling, and
        // containerd may stop before the shim is told to shut down).
        if self.cri_used.load(std::sync::atomic::Ordering::Relaxed) {
            crate::cri::Cri::connect(&self.socket).remove_all_pods();
        }
        for ns in [NAMESPACE, CRI_NAMESPACE] {
            let ls = |what| {
                String::from_utf8_lossy(&self.ctr_in(ns, &[what, "ls", "-q"]).stdout).into_owned()
            };
            for t in ls("task").split_whitespace() {
                let _ = self.ctr_in(ns, &["task", "kill", "-s", "SIGKILL", t]);
                let _ = self.ctr_in(ns, &["task", "rm", "-f", t]);
            }
            for c in ls("container").split_whitespace() {
                let _ = self.ctr_in(ns, &["container", "rm", c]);
            }
        }
        let _ = nix_kill(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("ip")
            .args(["link", "del", TEST_BRIDGE])
            .stderr(Stdio::null())
            .status();
        // Snapshots may still be mounted if a test failed midway.
        if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
            let root = self.dir.path().to_string_lossy().into_owned();
            for p in info
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .filter(|p| p.starts_with(&root))
            {
                let _ = Command::new("umount").args(["-l", p]).status();
            }
        }
    }
}

fn nix_kill(pid: u32, sig: i32) -> std::io::Result<()> {
    // SAFETY: kill(2) with a pid we spawned and a valid signal number.
    if unsafe { libc::kill(pid as i32, sig) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The arguments of `ctr run <flags> --runtime <runtime> <test image> <id>
/// <cmd>`.
pub fn run_args<'a>(
    flags: &[&'a str],
    runtime: &'a str,
    id: &'a str,
    cmd: &[&'a str],
) -> Vec<&'a str> {
    let mut v = vec!["run"];
    v.extend_from_slice(flags);
    v.extend_from_slice(&["--runtime", runtime, IMAGE, id]);
    v.extend_from_slice(cmd);
    v
}

/// Waits until no husk shim, VM process, sandbox directory or mount is left.
pub fn assert_clean() {
    let deadline = Instant::now() + Duration::from_secs(10);
    // The shims containerd starts read no config file here: the default's.
    let state = husk_runtime::Config::default().state_dir;
    let under = format!("{}/", state.display());
    loop {
        let shims = crate::processes_mentioning(Path::new("containerd-shim-husk-v2"));
        let vms = crate::processes_mentioning(Path::new(&under));
        // Sandbox directories; the namespace directories above them stay,
        // as runc's shim leaves /run/containerd/runc/<namespace>.
        let dirs: Vec<_> = std::fs::read_dir(&state)
            .map(|d| {
                d.flatten()
                    .filter_map(|ns| std::fs::read_dir(ns.path()).ok())
                    .flat_map(|d| d.flatten().map(|e| e.path()))
                    .collect()
            })
            .unwrap_or_default();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .matches(under.as_str())
            .count();
        if shims.is_empty() && vms.is_empty() && dirs.is_empty() && mounts == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: shims {shims:?}, vm processes {vms:?}, dirs {dirs:?}, {mounts} mounts"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `ctr events` running in the background, collecting what it prints.
pub struct Events {
    child: Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Events {
    pub fn start(ctd: &Containerd) -> Self {
        let mut child = ctd
            .ctr_cmd(&["events"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("ctr events");
        let out = child.stdout.take().expect("stdout");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(l);
            }
        });
        // ctr subscribes after it starts; give it a moment.
        std::thread::sleep(Duration::from_millis(500));
        Self { child, lines }
    }

    /// Task topics (`/tasks/...`) seen so far for `container`, in order.
    pub fn task_topics(&self, container: &str) -> Vec<String> {
        let needle = format!("\"{container}\"");
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|l| l.contains(&needle))
            .filter_map(|l| l.split(' ').find(|w| w.starts_with("/tasks/")))
            .map(str::to_owned)
            .collect()
    }

    /// Waits until `topic` has been seen for `container`.
    pub fn wait_for(&self, container: &str, topic: &str, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let t = self.task_topics(container);
            if t.iter().any(|x| x == topic) || Instant::now() > deadline {
                return t;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("ip")
            .args(["link", "del", TEST_BRIDGE])
            .stderr(Stdio::null())
            .status();
    }
}
