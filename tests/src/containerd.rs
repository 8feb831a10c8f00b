//! A private containerd for end-to-end tests: its own root, state and
//! socket under a temp dir, husk registered as `io.containerd.husk.v2` (and
//! as CRI handler `husk`), the shim found in this build's target dir, and a
//! busybox image built locally from Debian's busybox-static and imported.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Image reference the harness imports.
pub const IMAGE: &str = "docker.io/husk/busybox:latest";
/// containerd namespace the tests use.
pub const NAMESPACE: &str = "husk-e2e";

pub struct Containerd {
    pub dir: tempfile::TempDir,
    child: Child,
    socket: PathBuf,
}

/// The target dir of this build profile (holds the shim binary).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf()
}

impl Containerd {
    /// Starts containerd and imports the busybox image.
    pub fn start() -> Self {
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
        let config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n[grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\"]\n  restrict_oom_score_adj = true\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.husk]\n  runtime_type = \"io.containerd.husk.v2\"\n",
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = socket.display()
        );
        std::fs::write(d.join("config.toml"), config).expect("write containerd config");
        let log = std::fs::File::create(d.join("containerd.log")).expect("containerd log");
        let path = format!(
            "{}:{}",
            profile_dir().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let child = Command::new("containerd")
            .arg("--config")
            .arg(d.join("config.toml"))
            .env("PATH", path)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start containerd (apt-get install containerd)");
        let c = Self { dir, child, socket };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !c.ctr(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "containerd did not come up:\n{}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
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

    /// `ctr` against this containerd, in the test namespace, stdin from /dev/null.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_cmd(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ctr")
    }

    pub fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", NAMESPACE])
            .args(args);
        c
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
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
