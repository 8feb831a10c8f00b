//! `/etc/husk/config.toml`: every key has a working default.
//!
//! Precedence: an explicit path (containerd's `ConfigPath` runtime option,
//! `husk --config`), then `$HUSK_CONFIG`, then `/etc/husk/config.toml` if it
//! exists, then the built-in defaults.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default configuration file.
pub const DEFAULT_PATH: &str = "/etc/husk/config.toml";
/// Environment variable naming a configuration file.
pub const ENV_VAR: &str = "HUSK_CONFIG";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: {key} = {value} is out of range ({hint})")]
    Range {
        path: PathBuf,
        key: &'static str,
        value: String,
        hint: &'static str,
    },
}

/// Which VMM boots sandboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HypervisorChoice {
    /// husk-vmm where KVM can run a standard guest, else QEMU with TCG.
    Auto,
    /// QEMU `-M microvm`, with KVM when usable, TCG otherwise.
    Qemu,
    /// husk-vmm (needs KVM with VMX or SVM, or a PVM-enlightened kernel).
    HuskVmm,
}

/// QEMU acceleration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Accel {
    /// KVM when it can run the guest kernel, TCG otherwise.
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `auto`, `qemu` or `husk-vmm`.
    pub hypervisor: HypervisorChoice,
    /// Per-sandbox runtime state: sockets, the share, logs.
    pub state_dir: PathBuf,
    pub guest: GuestConfig,
    pub qemu: QemuConfig,
    pub husk_vmm: HuskVmmConfig,
    pub virtiofsd: VirtiofsdConfig,
    pub vsock: VsockConfig,
    pub agent: AgentConfig,
    pub jail: JailConfig,
}

/// The ids each sandbox's VMM and vsock daemon run under.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JailConfig {
    /// The first uid (and gid) of the range leased to sandboxes, one each
    /// while it runs. High by default, past the ranges /etc/subuid and
    /// kubelet's user namespaces usually take; no user or file of the host
    /// should have one of these ids.
    pub id_base: u32,
    /// How many ids the range holds: the most sandboxes at once.
    pub id_count: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GuestConfig {
    /// Guest kernel (ELF with PVH entry). Unset: searched in the install
    /// locations (see `husk env`).
    pub kernel: Option<PathBuf>,
    /// Guest initramfs holding husk-agent as /init. Unset: searched.
    pub initramfs: Option<PathBuf>,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Appended to the kernel command line husk builds.
    pub kernel_params: String,
    /// A virtio-balloon device with free page reporting: memory the guest
    /// frees (its initramfs, a finished build's cache) goes back to the
    /// host a few seconds later instead of staying with the pod. Costs the
    /// guest a re-fault of such pages when it uses them again.
    pub free_page_reporting: bool,
    /// With free page reporting: the smallest free block the guest reports,
    /// 2^order pages of 4 KiB (0 to 10). Linux 6.1's own choice is 10
    /// (4 MiB), which leaves the smaller holes a guest frees after boot
    /// with the pod; 5 (128 KiB) gave back 2.5 MiB more per idle pod here
    /// (QEMU, 3 pods: guest RAM 47.3 -> 44.8 MiB; 0 gave the same as 5 for
    /// more, smaller reports). The agent applies it (the kernel's own
    /// parameter `page_reporting.page_reporting_order`, which 6.1 ignores).
    pub page_reporting_order: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QemuConfig {
    /// Binary name (searched in PATH) or absolute path.
    pub path: PathBuf,
    pub accel: Accel,
    /// Whether QEMU may emulate the CPU (TCG) where KVM cannot run the
    /// guest. QEMU's security policy does not count TCG as a security
    /// boundary: nodes that must stay hardened set this to false, and
    /// husk then refuses to boot rather than emulate.
    pub allow_tcg: bool,
    /// Under TCG, QEMU's translation cache in MiB (`-accel tcg,tb-size=`);
    /// 0 keeps QEMU's default (1 GiB, filled as code is translated). 32
    /// by default: measured here (QEMU 7.2, busybox pod), QEMU's own PSS
    /// with an idle container is 104 MiB with the default, 92 at 32, 73
    /// at 16 and 64 at 8; boot to agent-ready stayed within noise down to
    /// 16 (0.86-0.88 s against 0.99-1.2 s) and grew at 8 (1.03-1.22 s).
    /// An exec-heavy pod re-translates with a small cache: 200 sequential
    /// `exec true` took 205 ms each at 64, 210 at 32, 666 at 16 (224 with
    /// the default), hence 32.
    pub tcg_tb_size_mib: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HuskVmmConfig {
    /// Binary name (searched in PATH) or absolute path. Unset: the
    /// husk-vmm next to the running husk binary, else PATH.
    pub path: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VirtiofsdConfig {
    pub path: PathBuf,
    /// `--sandbox` mode: only `namespace` is accepted. In `chroot` and
    /// `none` virtiofsd serves the host's share mount itself, which husk
    /// makes writable for a moment at each container it adds: a guest
    /// that plants symlinks there races with husk (Kata CVE-2020-2026's
    /// class). The key stays so that a config naming the mode gets a clear
    /// error rather than an unknown-key one.
    pub sandbox: String,
    /// `--cache` policy: `auto`, `always`, `metadata` or `never`.
    pub cache: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VsockConfig {
    /// vhost-device-vsock binary.
    pub path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// From VMM start until the agent must have answered.
    pub boot_timeout_ms: u64,
    /// Deadline for one RPC.
    pub rpc_timeout_ms: u64,
    /// Deadline for the RPCs that create, start, exec or remove a guest
    /// process (mounts, fork and exec in the guest; slow when many pods
    /// start on few cores).
    pub create_timeout_ms: u64,
    /// How often a booted sandbox's agent gets a health check.
    pub health_interval_ms: u64,
    /// Deadline for a health check; the VM of an agent that misses it is
    /// stopped and every process of the pod exits. With the interval, this
    /// bounds how long a hung guest goes unnoticed.
    pub health_timeout_ms: u64,
    /// How long the guest has to report the exit of a pod's sandbox (or a
    /// pod of one's) init after a SIGKILL; then the host kills the VM and
    /// reports the pod's processes killed itself.
    pub kill_timeout_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            hypervisor: HypervisorChoice::Auto,
            state_dir: PathBuf::from("/run/husk"),
            guest: GuestConfig::default(),
            qemu: QemuConfig::default(),
            virtiofsd: VirtiofsdConfig::default(),
            vsock: VsockConfig::default(),
            husk_vmm: HuskVmmConfig::default(),
            agent: AgentConfig::default(),
            jail: JailConfig::default(),
        }
    }
}

impl Default for JailConfig {
    fn default() -> Self {
        Self {
            id_base: 0x7000_0000,
            id_count: 65_536,
        }
    }
}

impl Default for GuestConfig {
    fn default() -> Self {
        Self {
            kernel: None,
            initramfs: None,
            vcpus: 1,
            memory_mib: 512,
            kernel_params: String::new(),
            free_page_reporting: true,
            page_reporting_order: 5,
        }
    }
}

impl HuskVmmConfig {
    /// The binary to run.
    pub fn binary(&self) -> PathBuf {
        if let Some(p) = &self.path {
            return p.clone();
        }
        std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("husk-vmm")))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("husk-vmm"))
    }
}

impl Default for QemuConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("qemu-system-x86_64"),
            accel: Accel::Auto,
            allow_tcg: true,
            tcg_tb_size_mib: 32,
        }
    }
}

impl Default for VirtiofsdConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("virtiofsd"),
            sandbox: "namespace".into(),
            cache: "auto".into(),
        }
    }
}

impl Default for VsockConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("vhost-device-vsock"),
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            boot_timeout_ms: 60_000,
            rpc_timeout_ms: 5_000,
            create_timeout_ms: 60_000,
            health_interval_ms: 1_000,
            health_timeout_ms: 3_000,
            kill_timeout_ms: 5_000,
        }
    }
}

impl AgentConfig {
    pub fn boot_timeout(&self) -> Duration {
        Duration::from_millis(self.boot_timeout_ms)
    }

    pub fn rpc_timeout(&self) -> Duration {
        Duration::from_millis(self.rpc_timeout_ms)
    }

    pub fn create_timeout(&self) -> Duration {
        Duration::from_millis(self.create_timeout_ms)
    }

    pub fn health_interval(&self) -> Duration {
        Duration::from_millis(self.health_interval_ms)
    }

    pub fn health_timeout(&self) -> Duration {
        Duration::from_millis(self.health_timeout_ms)
    }

    pub fn kill_timeout(&self) -> Duration {
        Duration::from_millis(self.kill_timeout_ms)
    }
}

/// Where the effective configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Defaults,
    File(PathBuf),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Defaults => write!(f, "built-in defaults ({DEFAULT_PATH} absent)"),
            Source::File(p) => write!(f, "{}", p.display()),
        }
    }
}

impl Config {
    /// Loads the effective configuration (see the module docs for precedence).
    pub fn load(explicit: Option<&Path>) -> Result<(Self, Source), ConfigError> {
        let env = std::env::var_os(ENV_VAR)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        let path = match (explicit, env) {
            (Some(p), _) => Some(p.to_path_buf()),
            (None, Some(p)) => Some(p),
            (None, None) => Some(PathBuf::from(DEFAULT_PATH)).filter(|p| p.exists()),
        };
        match path {
            None => Ok((Self::default(), Source::Defaults)),
            Some(path) => {
                let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                let cfg = Self::parse(&text, &path)?;
                Ok((cfg, Source::File(path)))
            }
        }
    }

    /// Parses and range-checks a configuration text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let range = |key, value: String, hint| ConfigError::Range {
            path: path.to_path_buf(),
            key,
            value,
            hint,
        };
        if !(1..=32).contains(&self.guest.vcpus) {
            return Err(range(
                "guest.vcpus",
                self.guest.vcpus.to_string(),
                "1 to 32",
            ));
        }
        if !(64..=65536).contains(&self.guest.memory_mib) {
            return Err(range(
                "guest.memory_mib",
                self.guest.memory_mib.to_string(),
                "64 to 65536",
            ));
        }
        if self.guest.page_reporting_order > 10 {
            return Err(range(
                "guest.page_reporting_order",
                self.guest.page_reporting_order.to_string(),
                "0 to 10: blocks of 4 KiB to 4 MiB",
            ));
        }
        if self.agent.boot_timeout_ms < 100 {
            return Err(range(
                "agent.boot_timeout_ms",
                self.agent.boot_timeout_ms.to_string(),
                "at least 100",
            ));
        }
        for (key, value) in [
            ("agent.health_interval_ms", self.agent.health_interval_ms),
            ("agent.health_timeout_ms", self.agent.health_timeout_ms),
            ("agent.kill_timeout_ms", self.agent.kill_timeout_ms),
        ] {
            if !(100..=600_000).contains(&value) {
                return Err(range(key, value.to_string(), "100 to 600000"));
            }
        }
        for (key, value) in [
            ("agent.rpc_timeout_ms", self.agent.rpc_timeout_ms),
            ("agent.create_timeout_ms", self.agent.create_timeout_ms),
        ] {
            if value < 10 {
                return Err(range(key, value.to_string(), "at least 10"));
            }
        }
        if self.virtiofsd.sandbox != "namespace" {
            return Err(range(
                "virtiofsd.sandbox",
                self.virtiofsd.sandbox.clone(),
                "only namespace: in chroot and none modes virtiofsd serves the host's share mount, which a guest can race with symlinks; remove the key",
            ));
        }
        if !["auto", "always", "metadata", "never"].contains(&self.virtiofsd.cache.as_str()) {
            return Err(range(
                "virtiofsd.cache",
                self.virtiofsd.cache.clone(),
                "auto, always, metadata or never",
            ));
        }
        if self.jail.id_base < 65_536 {
            return Err(range(
                "jail.id_base",
                self.jail.id_base.to_string(),
                "at least 65536: lower ids are the host's users and system accounts",
            ));
        }
        if self.jail.id_count == 0
            || u64::from(self.jail.id_base) + u64::from(self.jail.id_count) > u64::from(u32::MAX)
        {
            return Err(range(
                "jail.id_count",
                self.jail.id_count.to_string(),
                "at least 1, and jail.id_base + jail.id_count at most 4294967295",
            ));
        }
        if !self.state_dir.is_absolute() {
            return Err(range(
                "state_dir",
                self.state_dir.display().to_string(),
                "an absolute path",
            ));
        }
        Ok(())
    }

    /// The configuration as TOML, every key present.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render configuration: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let cfg = Config::parse("", Path::new("x.toml")).unwrap();
        assert_eq!(cfg, Config::default());
    }

    #[test]
    fn partial_file_overrides_only_its_keys() {
        let cfg = Config::parse(
            "hypervisor = \"qemu\"\n[guest]\nmemory_mib = 256\n",
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(cfg.hypervisor, HypervisorChoice::Qemu);
        assert_eq!(cfg.guest.memory_mib, 256);
        assert_eq!(cfg.guest.vcpus, 1);
    }

    #[test]
    fn unknown_key_is_named() {
        let err =
            Config::parse("[guest]\nmemory = 5\n", Path::new("/etc/husk/config.toml")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("/etc/husk/config.toml") && msg.contains("memory"),
            "{msg}"
        );
    }

    #[test]
    fn out_of_range_value_is_named_with_its_range() {
        let err = Config::parse("[guest]\nvcpus = 0\n", Path::new("c.toml")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "config c.toml: guest.vcpus = 0 is out of range (1 to 32)"
        );
        let err =
            Config::parse("[guest]\npage_reporting_order = 11\n", Path::new("c.toml")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "config c.toml: guest.page_reporting_order = 11 is out of range (0 to 10: blocks of 4 KiB to 4 MiB)"
        );
    }

    #[test]
    fn an_id_range_over_the_hosts_users_or_past_the_last_uid_is_refused() {
        for (text, key) in [
            ("[jail]\nid_base = 1000\n", "jail.id_base = 1000"),
            ("[jail]\nid_count = 0\n", "jail.id_count = 0"),
            (
                "[jail]\nid_base = 4294967000\nid_count = 1000\n",
                "jail.id_count = 1000",
            ),
        ] {
            let err = Config::parse(text, Path::new("c.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
        let ok = Config::parse(
            "[jail]\nid_base = 200000\nid_count = 10\n",
            Path::new("c.toml"),
        );
        assert_eq!(ok.unwrap().jail.id_count, 10);
    }

    #[test]
    fn only_virtiofsds_namespace_sandbox_is_accepted() {
        for mode in ["chroot", "none", "Namespace"] {
            let text = format!("[virtiofsd]\nsandbox = \"{mode}\"\n");
            let err = Config::parse(&text, Path::new("c.toml"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("virtiofsd.sandbox = {mode}"))
                    && err.contains("only namespace"),
                "{err}"
            );
        }
        let ok = Config::parse(
            "[virtiofsd]\nsandbox = \"namespace\"\n",
            Path::new("c.toml"),
        );
        assert_eq!(ok.unwrap().virtiofsd.sandbox, "namespace");
    }

    #[test]
    fn defaults_round_trip_through_toml() {
        let text = Config::default().to_toml();
        assert_eq!(
            Config::parse(&text, Path::new("x")).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn explicit_missing_path_is_an_error_naming_it() {
        let err = Config::load(Some(Path::new("/nonexistent/husk.toml"))).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/husk.toml"));
    }
}
