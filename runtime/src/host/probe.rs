//! What this host can run: KVM and its kind, the helper binaries, the guest
//! image; and which backend `hypervisor = "auto"` picks, with the reason.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::config::{Accel, Config, HypervisorChoice};
use crate::confine::process::find_binary;

/// How `/dev/kvm` is served on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmKind {
    /// No /dev/kvm.
    Absent,
    /// /dev/kvm exists but cannot be used (permissions, wrong API version).
    Unusable(String),
    /// Hardware-assisted, Intel VT-x.
    Vmx,
    /// Hardware-assisted, AMD-V.
    Svm,
    /// Pagetable-based software-assisted KVM (`kvm_pvm`): runs only
    /// PVM-enlightened guest kernels.
    Pvm,
    /// KVM answers but the CPU shows neither VMX nor SVM and no PVM module is
    /// loaded (e.g. an unusual nested setup).
    Unknown,
}

impl KvmKind {
    /// Whether KVM can run a standard (non-PVM) guest kernel.
    pub fn runs_standard_guest(&self) -> bool {
        matches!(self, KvmKind::Vmx | KvmKind::Svm)
    }
}

impl std::fmt::Display for KvmKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvmKind::Absent => write!(f, "absent (no /dev/kvm)"),
            KvmKind::Unusable(why) => write!(f, "unusable: {why}"),
            KvmKind::Vmx => write!(f, "VMX (Intel VT-x, hardware-assisted)"),
            KvmKind::Svm => write!(f, "SVM (AMD-V, hardware-assisted)"),
            KvmKind::Pvm => write!(
                f,
                "PVM (kvm_pvm, software-assisted; runs only PVM-enlightened guest kernels)"
            ),
            KvmKind::Unknown => write!(f, "present, but the CPU shows neither VMX nor SVM"),
        }
    }
}

/// KVM_GET_API_VERSION: _IO(0xAE, 0x00).
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
const KVM_API_VERSION: libc::c_int = 12;

/// Finds out how `/dev/kvm` is served.
pub fn detect_kvm() -> KvmKind {
    let dev = Path::new("/dev/kvm");
    if !dev.exists() {
        return KvmKind::Absent;
    }
    let file = match File::options().read(true).write(true).open(dev) {
        Ok(f) => f,
        Err(e) => return KvmKind::Unusable(format!("cannot open /dev/kvm: {e}")),
    };
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an int;
    // the fd is a valid open /dev/kvm for the duration of the call.
    let version = unsafe { libc::ioctl(file.as_raw_fd(), KVM_GET_API_VERSION as _, 0) };
    if version != KVM_API_VERSION {
        return KvmKind::Unusable(format!(
            "KVM API version {version}, expected {KVM_API_VERSION}"
        ));
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    classify(&cpuinfo, Path::new("/sys/module/kvm_pvm").exists())
}

/// Classifies a usable KVM from the CPU flags and whether `kvm_pvm` is loaded.
pub fn classify(cpuinfo: &str, pvm_loaded: bool) -> KvmKind {
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.split_whitespace().collect::<Vec<_>>())
        .unwrap_or_default();
    if pvm_loaded {
        KvmKind::Pvm
    } else if flags.contains(&"vmx") {
        KvmKind::Vmx
    } else if flags.contains(&"svm") {
        KvmKind::Svm
    } else {
        KvmKind::Unknown
    }
}

/// A backend as resolved for this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Qemu { accel: ResolvedAccel },
    HuskVmm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolvedAccel {
    Kvm,
    Tcg,
}

impl Backend {
    /// Whether the guest's CPU is emulated rather than run by KVM.
    pub fn is_emulated(&self) -> bool {
        matches!(
            self,
            Backend::Qemu {
                accel: ResolvedAccel::Tcg
            }
        )
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Qemu {
                accel: ResolvedAccel::Kvm,
            } => write!(f, "qemu (KVM)"),
            Backend::Qemu {
                accel: ResolvedAccel::Tcg,
            } => write!(f, "qemu (TCG)"),
            Backend::HuskVmm => write!(f, "husk-vmm"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChoiceError {
    #[error("qemu.accel = \"kvm\" is configured, but KVM here is {0}; set qemu.accel = \"tcg\" or \"auto\"")]
    KvmUnfit(KvmKind),
    #[error("QEMU would emulate the CPU (TCG: {0}), and qemu.allow_tcg = false forbids it on this node; run husk where KVM runs the standard guest, or set qemu.allow_tcg = true")]
    TcgForbidden(String),
}

/// Why TCG is worth a warning (`husk check`).
pub const TCG_WARNING: &str = "warning: the CPU is emulated (TCG), which QEMU's security policy does not treat as a security boundary; set qemu.allow_tcg = false on nodes that must stay hardened";

/// Picks the backend for `config` on a host with `kvm`, and says why.
/// Emulation is refused where the config forbids it.
pub fn choose_backend(config: &Config, kvm: &KvmKind) -> Result<(Backend, String), ChoiceError> {
    let (backend, why) = choose_any_backend(config, kvm)?;
    if backend.is_emulated() && !config.qemu.allow_tcg {
        return Err(ChoiceError::TcgForbidden(why));
    }
    Ok((backend, why))
}

fn choose_any_backend(config: &Config, kvm: &KvmKind) -> Result<(Backend, String), ChoiceError> {
    let qemu_accel = |why_prefix: &str| -> Result<(Backend, String), ChoiceError> {
        match (config.qemu.accel, kvm.runs_standard_guest()) {
            (Accel::Kvm, true) | (Accel::Auto, true) => {
                Ok((Backend::Qemu { accel: ResolvedAccel::Kvm }, format!("{why_prefix}KVM is {kvm}")))
            }
            (Accel::Kvm, false) => Err(ChoiceError::KvmUnfit(kvm.clone())),
            (Accel::Tcg, _) => Ok((
                Backend::Qemu { accel: ResolvedAccel::Tcg },
                format!("{why_prefix}qemu.accel = \"tcg\" is configured"),
            )),
            (Accel::Auto, false) => Ok((
                Backend::Qemu { accel: ResolvedAccel::Tcg },
                format!("{why_prefix}KVM here is {kvm}, which cannot run the standard guest kernel, so QEMU emulates the CPU (TCG)"),
            )),
        }
    };
    match config.hypervisor {
        HypervisorChoice::HuskVmm if kvm.runs_standard_guest() => Ok((
            Backend::HuskVmm,
            format!("hypervisor = \"husk-vmm\" is configured; KVM is {kvm}"),
        )),
        // An operator may have given a PVM-enlightened guest kernel.
        HypervisorChoice::HuskVmm => Ok((
            Backend::HuskVmm,
            format!("hypervisor = \"husk-vmm\" is configured; KVM here is {kvm}, which runs only a guest kernel built for it"),
        )),
        HypervisorChoice::Qemu => qemu_accel("hypervisor = \"qemu\" is configured; "),
        HypervisorChoice::Auto => {
            if kvm.runs_standard_guest() {
                Ok((
                    Backend::HuskVmm,
                    format!("auto: KVM is {kvm}, which runs the standard guest kernel, so husk's own VMM"),
                ))
            } else {
                qemu_accel("auto: ")
            }
        }
    }
}

/// Install locations searched for the guest image, in order.
pub fn guest_image_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    // A build tree: target/release/husk -> target/guest/.
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().and_then(Path::parent).map(Path::to_path_buf))
    {
        dirs.push(dir.join("guest"));
    }
    dirs.push(PathBuf::from("/usr/local/share/husk"));
    dirs.push(PathBuf::from("/usr/share/husk"));
    dirs
}

/// Guest kernel file name in the install locations.
pub const KERNEL_NAME: &str = "vmlinux";
/// Guest initramfs file name in the install locations.
pub const INITRAMFS_NAME: &str = "initramfs.cpio";

/// The configured path, or the first install location that has `name`.
pub fn resolve_image(configured: Option<&Path>, name: &str) -> Option<PathBuf> {
    match configured {
        Some(p) => Some(p.to_path_buf()),
        None => guest_image_dirs()
            .into_iter()
            .map(|d| d.join(name))
            .find(|p| p.is_file()),
    }
}

/// One line of `husk check`.
#[derive(Debug, Clone)]
pub struct Finding {
    pub item: &'static str,
    pub ok: bool,
    pub detail: String,
}

/// Everything `husk check` reports.
pub fn check(config: &Config) -> (Vec<Finding>, Result<(Backend, String), ChoiceError>) {
    let kvm = detect_kvm();
    let mut out = vec![Finding {
        item: "kvm",
        ok: !matches!(kvm, KvmKind::Absent | KvmKind::Unusable(_)),
        detail: kvm.to_string(),
    }];
    let binaries: [(&'static str, &Path, &str); 4] = [
        ("qemu", &config.qemu.path, "apt-get install qemu-system-x86"),
        (
            "virtiofsd",
            &config.virtiofsd.path,
            "cargo install --root /usr/local virtiofsd",
        ),
        (
            "vhost-device-vsock",
            &config.vsock.path,
            "cargo install --root /usr/local vhost-device-vsock",
        ),
        (
            "containerd",
            Path::new("containerd"),
            "apt-get install containerd",
        ),
    ];
    for (item, path, fix) in binaries {
        out.push(match find_binary(path) {
            Some(p) => Finding {
                item,
                ok: true,
                detail: p.display().to_string(),
            },
            None => Finding {
                item,
                ok: false,
                detail: format!("{} not found; {fix}", path.display()),
            },
        });
    }
    for (item, configured, name) in [
        ("guest kernel", config.guest.kernel.as_deref(), KERNEL_NAME),
        (
            "guest initramfs",
            config.guest.initramfs.as_deref(),
            INITRAMFS_NAME,
        ),
    ] {
        out.push(match resolve_image(configured, name) {
            Some(p) if p.is_file() => Finding {
                item,
                ok: true,
                detail: p.display().to_string(),
            },
            Some(p) => Finding {
                item,
                ok: false,
                detail: format!("{} does not exist; run `make guest-image`", p.display()),
            },
            None => Finding {
                item,
                ok: false,
                detail: format!(
                    "no {name} in {}; run `make guest-image install`",
                    display_dirs()
                ),
            },
        });
    }
    out.push(guest_network(resolve_image(
        config.guest.kernel.as_deref(),
        KERNEL_NAME,
    )));
    out.push(host_network());
    (out, choose_backend(config, &kvm))
}

/// The guest network features pods meet, each with the kernel options it
/// needs (all of them).
const GUEST_NETWORK: &[(&str, &[&str])] = &[
    ("IPv6", &["CONFIG_IPV6"]),
    (
        "policy routing",
        &["CONFIG_IP_MULTIPLE_TABLES", "CONFIG_IPV6_MULTIPLE_TABLES"],
    ),
    ("multipath routes", &["CONFIG_IP_ROUTE_MULTIPATH"]),
    (
        "nf_tables (iptables-nft)",
        &["CONFIG_NF_TABLES", "CONFIG_NFT_COMPAT"],
    ),
    (
        "iptables-legacy",
        &["CONFIG_IP_NF_IPTABLES", "CONFIG_IP6_NF_IPTABLES"],
    ),
    (
        "nat REDIRECT (service meshes)",
        &["CONFIG_NF_NAT", "CONFIG_NETFILTER_XT_TARGET_REDIRECT"],
    ),
    ("bridge", &["CONFIG_BRIDGE"]),
    ("veth", &["CONFIG_VETH"]),
    ("tun/tap", &["CONFIG_TUN"]),
    ("vlan", &["CONFIG_VLAN_8021Q"]),
    ("vxlan", &["CONFIG_VXLAN"]),
];

/// What the host needs to carry a pod's network into its VM: a tap per
/// link and tc redirects both ways (ingress qdisc, u32, mirred).
const HOST_NETWORK: &[(&str, &[&str])] = &[
    ("tap", &["CONFIG_TUN"]),
    ("ingress qdisc", &["CONFIG_NET_SCH_INGRESS"]),
    ("u32 filter", &["CONFIG_NET_CLS_U32"]),
    ("mirred redirect", &["CONFIG_NET_ACT_MIRRED"]),
];

/// Which of `features` a kernel config (`CONFIG_X=y` lines) has, and
/// which it lacks.
fn features(
    config: &str,
    wanted: &[(&'static str, &[&str])],
) -> (Vec<&'static str>, Vec<&'static str>) {
    let set = |sym: &str| {
        config
            .lines()
            .any(|l| l == format!("{sym}=y") || l == format!("{sym}=m"))
    };
    wanted
        .iter()
        .map(|(name, syms)| (*name, syms.iter().all(|s| set(s))))
        .fold((Vec::new(), Vec::new()), |(mut has, mut lacks), (n, ok)| {
            if ok {
                has.push(n)
            } else {
                lacks.push(n)
            }
            (has, lacks)
        })
}

fn feature_finding(
    item: &'static str,
    source: &str,
    config: &str,
    wanted: &[(&'static str, &[&str])],
) -> Finding {
    let (has, lacks) = features(config, wanted);
    let mut detail = format!("{} (from {source})", has.join(", "));
    if !lacks.is_empty() {
        detail = format!("lacks {}; has {detail}", lacks.join(", "));
    }
    Finding {
        item,
        ok: lacks.is_empty(),
        detail,
    }
}

/// The guest kernel's network features, from the `kernel.config` that
/// `make guest-image` puts beside it.
fn guest_network(kernel: Option<PathBuf>) -> Finding {
    let item = "guest network";
    let Some(config) = kernel.map(|k| k.with_file_name("kernel.config")) else {
        return Finding {
            item,
            ok: false,
            detail: "no guest kernel".into(),
        };
    };
    match std::fs::read_to_string(&config) {
        Ok(text) => feature_finding(item, &config.display().to_string(), &text, GUEST_NETWORK),
        Err(e) => Finding {
            item,
            ok: false,
            detail: format!(
                "{}: {e} (it comes with `make guest-image`)",
                config.display()
            ),
        },
    }
}

/// The host kernel's support for the pod network redirect, from
/// /boot/config-<release> or /proc/config.gz.
fn host_network() -> Finding {
    let item = "host network";
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let boot = PathBuf::from(format!("/boot/config-{}", release.trim()));
    let (source, text) = match std::fs::read_to_string(&boot) {
        Ok(t) => (boot.display().to_string(), Some(t)),
        Err(_) => (
            "/proc/config.gz".to_owned(),
            std::process::Command::new("gzip")
                .args(["-dc", "/proc/config.gz"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned()),
        ),
    };
    match text {
        Some(t) => feature_finding(item, &source, &t, HOST_NETWORK),
        None => Finding {
            item,
            ok: true,
            detail: format!("unknown: neither {} nor /proc/config.gz is readable; pods need tap, ingress qdisc, u32 and mirred", boot.display()),
        },
    }
}

fn display_dirs() -> String {
    guest_image_dirs()
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTEL: &str = "processor\t: 0\nflags\t\t: fpu vme vmx sse\n";
    const AMD: &str = "flags\t\t: fpu svm sse\n";
    const PLAIN: &str = "flags\t\t: fpu hypervisor sse\n";

    #[test]
    fn network_features_are_read_from_a_kernel_config() {
        let config = "CONFIG_IPV6=y\nCONFIG_BRIDGE=m\n# CONFIG_VETH is not set\n";
        let wanted: &[(&'static str, &[&str])] = &[
            ("IPv6", &["CONFIG_IPV6"]),
            ("bridge", &["CONFIG_BRIDGE"]),
            ("veth", &["CONFIG_VETH"]),
        ];
        assert_eq!(
            features(config, wanted),
            (vec!["IPv6", "bridge"], vec!["veth"])
        );
        let f = feature_finding("x", "test", config, wanted);
        assert!(!f.ok && f.detail.starts_with("lacks veth;"), "{f:?}");
    }

    #[test]
    fn classifies_cpu_flags_and_pvm() {
        assert_eq!(classify(INTEL, false), KvmKind::Vmx);
        assert_eq!(classify(AMD, false), KvmKind::Svm);
        assert_eq!(classify(PLAIN, true), KvmKind::Pvm);
        assert_eq!(classify(PLAIN, false), KvmKind::Unknown);
    }

    #[test]
    fn auto_on_pvm_picks_qemu_tcg_and_says_why() {
        let (backend, why) = choose_backend(&Config::default(), &KvmKind::Pvm).unwrap();
        assert_eq!(
            backend,
            Backend::Qemu {
                accel: ResolvedAccel::Tcg
            }
        );
        assert!(why.contains("PVM") && why.contains("TCG"), "{why}");
    }

    #[test]
    fn auto_on_hardware_kvm_prefers_husk_vmm_and_qemu_keeps_kvm() {
        let (backend, why) = choose_backend(&Config::default(), &KvmKind::Svm).unwrap();
        assert_eq!(backend, Backend::HuskVmm);
        assert!(why.contains("own VMM"), "{why}");
        let mut cfg = Config {
            hypervisor: HypervisorChoice::Qemu,
            ..Default::default()
        };
        let (backend, _) = choose_backend(&cfg, &KvmKind::Vmx).unwrap();
        assert_eq!(
            backend,
            Backend::Qemu {
                accel: ResolvedAccel::Kvm
            }
        );
        cfg.hypervisor = HypervisorChoice::HuskVmm;
        let (backend, why) = choose_backend(&cfg, &KvmKind::Pvm).unwrap();
        assert_eq!(backend, Backend::HuskVmm);
        assert!(why.contains("built for it"), "{why}");
    }

    #[test]
    fn forced_kvm_on_pvm_is_refused_with_a_fix() {
        let mut cfg = Config::default();
        cfg.qemu.accel = Accel::Kvm;
        let err = choose_backend(&cfg, &KvmKind::Pvm).unwrap_err().to_string();
        assert!(err.contains("qemu.accel") && err.contains("tcg"), "{err}");
    }

    #[test]
    fn a_node_that_forbids_tcg_refuses_to_emulate_but_keeps_kvm() {
        let mut cfg = Config::default();
        cfg.qemu.allow_tcg = false;
        let err = choose_backend(&cfg, &KvmKind::Pvm).unwrap_err().to_string();
        assert!(
            err.contains("qemu.allow_tcg") && err.contains("TCG"),
            "{err}"
        );
        // Auto on hardware KVM is husk-vmm: allowed.
        let (backend, _) = choose_backend(&cfg, &KvmKind::Vmx).unwrap();
        assert!(!backend.is_emulated());
        cfg.hypervisor = HypervisorChoice::Qemu;
        let (backend, _) = choose_backend(&cfg, &KvmKind::Svm).unwrap();
        assert!(!backend.is_emulated());
        // QEMU told to emulate where KVM would do: refused too.
        cfg.qemu.accel = Accel::Tcg;
        assert!(choose_backend(&cfg, &KvmKind::Vmx).is_err());
    }

    #[test]
    fn configured_image_path_wins() {
        assert_eq!(
            resolve_image(Some(Path::new("/x/k")), KERNEL_NAME),
            Some(PathBuf::from("/x/k"))
        );
    }
}
