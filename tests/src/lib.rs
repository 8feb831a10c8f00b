//! Shared helpers for husk's end-to-end tests: configurations that point at
//! the freshly built guest image, guest images made for failure cases, and
//! the leak checks every test ends with.
//!
//! End-to-end tests boot real guests. They are `#[ignore]`d, so `cargo test`
//! stays the fast unit tier and reports them as ignored; `make test` (and CI)
//! runs them with `cargo test -- --include-ignored`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use husk_runtime::config::{Accel, HypervisorChoice};
use husk_runtime::Config;

pub mod bench;
pub mod containerd;
pub mod cri;
pub mod differential;
pub mod netstate;
pub mod stream;
pub mod volumes;

/// Guest image directory written by `make guest-image`.
pub fn guest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest")
}

/// Called first by every end-to-end test. Those tests are `#[ignore]`d, so a
/// plain `cargo test` (the fast unit tier) counts them as skipped, never as
/// passed; `make test` runs them with `--include-ignored`, and then whatever
/// they need and lack is a failure that names it.
pub fn e2e() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(uid, 0, "end-to-end tests run as root (make test)");
    for f in ["vmlinux", "initramfs.cpio", "initramfs-test-hooks.cpio"] {
        let p = guest_dir().join(f);
        assert!(
            p.is_file(),
            "{} is missing: run `make guest-image`",
            p.display()
        );
    }
}

/// Held while a test boots VMs; see [`vm_lock`].
pub struct VmLock {
    _file: std::fs::File,
    _guard: MutexGuard<'static, ()>,
}

/// Serialises VM boots: two cores, TCG guests, deadlines that must hold,
/// and checks that nothing is left on the host, which another test's VM
/// would spoil. Held across test processes too (an flock on a file outside
/// /run/husk), so two test binaries run side by side wait for each other.
pub fn vm_lock() -> VmLock {
    use std::os::fd::AsRawFd;
    static LOCK: Mutex<()> = Mutex::new(());
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let path = "/run/husk-e2e.lock";
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {path}: {e}"));
    // SAFETY: flock(2) on a descriptor this function owns; blocks until the
    // lock is free and ends with the file.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock {path}: {}", std::io::Error::last_os_error());
    VmLock {
        _file: file,
        _guard: guard,
    }
}

/// A configuration with a private state dir and the built guest image.
pub struct TestEnv {
    pub dir: tempfile::TempDir,
    pub config: Config,
}

impl TestEnv {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("husk-e2e")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let mut config = Config {
            state_dir: dir.path().join("run"),
            ..Config::default()
        };
        config.hypervisor = HypervisorChoice::Auto;
        config.qemu.accel = Accel::Auto;
        config.guest.kernel = Some(guest_dir().join("vmlinux"));
        config.guest.initramfs = Some(guest_dir().join("initramfs.cpio"));
        Self { dir, config }
    }

    /// Writes a file into the test's temp dir.
    pub fn file(&self, name: &str, contents: &[u8]) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, contents).expect("write test file");
        p
    }
}

impl Default for TestEnv {
    fn default() -> Self {
        Self::new()
    }
}

/// The state directory husk gives pod `id` of containerd namespace
/// `namespace` under the default state_dir.
pub fn sandbox_dir(namespace: &str, id: &str) -> PathBuf {
    husk_runtime::Config::default()
        .state_dir
        .join(namespace)
        .join(id)
}

/// Every trace of a sandbox (of husk's own namespace) is gone: its processes, any process whose
/// command line mentions its state directory, mounts under it, and the
/// directory itself.
pub fn assert_nothing_left(state_dir: &Path, id: &str, pids: &[u32]) {
    let dir = state_dir
        .join(husk_runtime::host::paths::DIRECT_NAMESPACE)
        .join(id);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let alive: Vec<u32> = pids.iter().copied().filter(|p| is_running(*p)).collect();
        let mentioning = processes_mentioning(&dir);
        if alive.is_empty() && mentioning.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sandbox {id} left processes: pids {alive:?}, mentioning {mentioning:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let mounts: Vec<&str> = info
        .lines()
        .filter(|l| {
            l.split(' ')
                .nth(4)
                .is_some_and(|p| Path::new(p).starts_with(&dir))
        })
        .collect();
    assert!(mounts.is_empty(), "sandbox {id} left mounts: {mounts:#?}");
    assert!(
        !dir.exists(),
        "sandbox directory {} left behind",
        dir.display()
    );
}

/// Running (not a zombie awaiting its parent).
fn is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
    })
}

/// PIDs of live processes whose command line contains `needle`.
pub fn processes_mentioning(needle: &Path) -> Vec<u32> {
    let needle = needle.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != std::process::id() && is_running(*pid))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                String::from_utf8_lossy(&c)
                    .replace('\0', " ")
                    .contains(&needle)
            })
        })
        .collect()
}

/// The husk shims running: the processes of the shim's command line but
/// the waiters it forks outside its VMM's and vsock daemon's PID
/// namespaces (same command line, `comm` husk-nswait).
pub fn shims() -> Vec<u32> {
    not_waiters(processes_mentioning(Path::new("containerd-shim-husk-v2")))
}

/// `pids` but the waiters a shim forks (see [`shims`]).
pub fn not_waiters(pids: Vec<u32>) -> Vec<u32> {
    let waiter = husk_runtime::confine::pidns::WAITER_NAME.to_bytes();
    pids.into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.strip_suffix(b"\n").unwrap_or(&c) != waiter)
        })
        .collect()
}

/// Builds an initramfs whose /init is a static C program, for guests that
/// misbehave on purpose. Needs gcc with glibc's static libraries.
pub fn initramfs_with_init(env: &TestEnv, name: &str, c_source: &str) -> PathBuf {
    let stage = env.dir.path().join(format!("{name}-stage"));
    std::fs::create_dir_all(&stage).expect("stage dir");
    let src = env.file(&format!("{name}.c"), c_source.as_bytes());
    let status = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(stage.join("init"))
        .arg(&src)
        .status()
        .expect("run gcc");
    assert!(status.success(), "gcc -static failed for {name}");
    let out = env.dir.path().join(format!("{name}.cpio"));
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && echo init | cpio --quiet -o -H newc -R 0:0 > '{}'",
            stage.display(),
            out.display()
        ))
        .status()
        .expect("run cpio");
    assert!(status.success(), "cpio failed for {name}");
    out
}

/// Builds tests/images/device-flood.c (build-device-flood.sh), a PVH
/// guest kernel that resets every virtio-mmio device with rings outside
/// guest memory, for ever; its path in `env`'s dir. Needs gcc and objcopy.
pub fn device_flood_kernel(env: &TestEnv) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("images/build-device-flood.sh");
    let out = env.dir.path().join("device-flood.elf");
    let status = Command::new("bash")
        .arg(&script)
        .arg(&out)
        .status()
        .expect("run build-device-flood.sh");
    assert!(status.success(), "building the device-flood kernel failed");
    out
}

/// Fills `rootfs` with Debian's static busybox and links for its applets.
pub fn busybox_rootfs(rootfs: &Path) {
    let bin = rootfs.join("bin");
    std::fs::create_dir_all(&bin).expect("rootfs/bin");
    for d in ["proc", "sys", "dev", "tmp", "etc", "root"] {
        std::fs::create_dir_all(rootfs.join(d)).expect("rootfs dir");
    }
    std::fs::copy("/bin/busybox", bin.join("busybox"))
        .expect("copy /bin/busybox (apt-get install busybox-static)");
    let out = Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|a| *a != "busybox")
    {
        let _ = std::os::unix::fs::symlink("busybox", bin.join(applet));
    }
}

/// A minimal OCI runtime spec like the one `ctr run` generates.
pub fn oci_spec(container_id: &str, args: &[&str]) -> Vec<u8> {
    husk_runtime::pod::spec::minimal(container_id, args, &format!("/husk-test/{container_id}"))
}

/// The `husk` CLI of this build's profile (which `cargo test` does not
/// build; `make test` does), without the caller's HUSK_CONFIG.
pub fn husk_command() -> Command {
    let bin = containerd::profile_dir().join("husk");
    assert!(
        bin.is_file(),
        "{} missing: build it with `cargo build --bins` (make test does)",
        bin.display()
    );
    let mut c = Command::new(bin);
    c.env_remove("HUSK_CONFIG");
    c
}

/// Runs `husk args`, which must succeed unless `fails` (then it must
/// fail); its output.
pub fn husk_cli(args: &[&str], fails: bool) -> Output {
    let out = husk_command()
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("husk {args:?}: {e}"));
    assert_eq!(
        out.status.success(),
        !fails,
        "husk {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Retries `f` until it returns Some, for up to `timeout`.
pub fn eventually<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
