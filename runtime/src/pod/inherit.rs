//! What a container under runc takes from the runtime's own process, which
//! a guest process cannot: the host's hostname (a new UTS namespace starts
//! with its creator's) and resource limits (runc's child inherits those the
//! spec does not set from runc, which has them from the shim and
//! containerd). husk writes both into the spec, so the guest applies what
//! runc's container would have had, instead of the guest kernel's defaults
//! (which size `nproc` and `sigpending` by the guest's small memory).
//! And what runc does with the host's LSM labels, which the guest kernel
//! (no LSM) cannot apply: refused where runc refuses them, dropped where
//! the VM confines the container instead.

use oci_spec::runtime::{LinuxNamespaceType, PosixRlimitBuilder, PosixRlimitType, Process, Spec};

/// Every resource limit the OCI spec names, with its number.
const RLIMITS: [(PosixRlimitType, libc::__rlimit_resource_t); 16] = [
    (PosixRlimitType::RlimitAs, libc::RLIMIT_AS),
    (PosixRlimitType::RlimitCore, libc::RLIMIT_CORE),
    (PosixRlimitType::RlimitCpu, libc::RLIMIT_CPU),
    (PosixRlimitType::RlimitData, libc::RLIMIT_DATA),
    (PosixRlimitType::RlimitFsize, libc::RLIMIT_FSIZE),
    (PosixRlimitType::RlimitLocks, libc::RLIMIT_LOCKS),
    (PosixRlimitType::RlimitMemlock, libc::RLIMIT_MEMLOCK),
    (PosixRlimitType::RlimitMsgqueue, libc::RLIMIT_MSGQUEUE),
    (PosixRlimitType::RlimitNice, libc::RLIMIT_NICE),
    (PosixRlimitType::RlimitNofile, libc::RLIMIT_NOFILE),
    (PosixRlimitType::RlimitNproc, libc::RLIMIT_NPROC),
    (PosixRlimitType::RlimitRss, libc::RLIMIT_RSS),
    (PosixRlimitType::RlimitRtprio, libc::RLIMIT_RTPRIO),
    (PosixRlimitType::RlimitRttime, libc::RLIMIT_RTTIME),
    (PosixRlimitType::RlimitSigpending, libc::RLIMIT_SIGPENDING),
    (PosixRlimitType::RlimitStack, libc::RLIMIT_STACK),
];

/// One limit: (its OCI type, soft, hard).
pub type Rlimit = (PosixRlimitType, u64, u64);

/// This process's own limits, as runc's child would inherit them.
pub fn own_rlimits() -> Vec<Rlimit> {
    RLIMITS
        .iter()
        .filter_map(|&(name, resource)| {
            let mut r = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit(2) writes one rlimit into `r`, which lives
            // across the call.
            (unsafe { libc::getrlimit(resource, &mut r) } == 0)
                .then_some((name, r.rlim_cur, r.rlim_max))
        })
        .collect()
}

/// The host's hostname.
pub fn host_hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim_end().to_owned())
        .filter(|h| !h.is_empty())
}

/// Adds to `process` each of `own` limits it does not set itself.
pub fn rlimits(process: &mut Process, own: &[Rlimit]) {
    let mut list = process.rlimits().clone().unwrap_or_default();
    for &(typ, soft, hard) in own {
        let set = list.iter().any(|r| r.typ() == typ);
        // The builder fails only for a field left out; all three are set.
        if let (false, Ok(r)) = (
            set,
            PosixRlimitBuilder::default()
                .typ(typ)
                .soft(soft)
                .hard(hard)
                .build(),
        ) {
            list.push(r);
        }
    }
    process.set_rlimits(Some(list));
}

/// Gives a spec whose container gets a new UTS namespace and no hostname
/// the host's, as the kernel gives runc's container.
pub fn hostname(spec: &mut Spec, host: Option<&str>) {
    let new_uts = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|ns| {
            ns.iter().any(|n| {
                n.typ() == LinuxNamespaceType::Uts
                    && n.path().as_ref().is_none_or(|p| p.as_os_str().is_empty())
            })
        });
    let unset = spec.hostname().as_ref().is_none_or(String::is_empty);
    if let (true, true, Some(host)) = (new_uts, unset, host) {
        spec.set_hostname(Some(host.to_owned()));
    }
}

/// Both, for a container's spec.
pub fn container(spec: &mut Spec) {
    hostname(spec, host_hostname().as_deref());
    if let Some(p) = spec.process_mut() {
        rlimits(p, &own_rlimits());
    }
}

/// The host's AppArmor, which runc applies a process's profile with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppArmor {
    Off,
    /// On, with the names of the profiles loaded (None: unreadable).
    On(Option<Vec<String>>),
}

impl AppArmor {
    /// As the host's kernel has it now.
    pub fn host() -> Self {
        let on = std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
            .is_ok_and(|v| v.starts_with('Y'));
        if !on {
            return AppArmor::Off;
        }
        let loaded = std::fs::read_to_string("/sys/kernel/security/apparmor/profiles")
            .ok()
            .map(|list| {
                list.lines()
                    .filter_map(|l| l.rsplit_once(" (").map(|(name, _)| name.to_owned()))
                    .collect()
            });
        AppArmor::On(loaded)
    }
}

/// The host LSM labels of an OCI process object, which the guest cannot
/// apply (its kernel has no LSM): where runc would refuse the process,
/// so does husk, naming the profile (AppArmor off, or the profile not
/// loaded); where runc would confine it with a host policy, the VM is its
/// confinement and the label is dropped (an AppArmor profile the host has
/// loaded; an SELinux label, which runc ignores where SELinux is off).
/// Returns what was dropped.
pub fn lsm_labels(process: &mut Process, apparmor: &AppArmor) -> Result<Vec<String>, String> {
    let mut dropped = Vec::new();
    if let Some(profile) = process.apparmor_profile().clone().filter(|s| !s.is_empty()) {
        match apparmor {
            AppArmor::Off => {
                return Err(format!(
                    "it asks for AppArmor profile {profile:?}, but AppArmor is not enabled on this host (runc refuses it too); remove the profile or enable AppArmor"
                ))
            }
            AppArmor::On(Some(loaded))
                if profile != "unconfined" && !loaded.contains(&profile) =>
            {
                return Err(format!(
                    "it asks for AppArmor profile {profile:?}, which the host has not loaded (runc refuses it too); load it with apparmor_parser"
                ))
            }
            AppArmor::On(_) => dropped.push(format!("AppArmor profile {profile:?}")),
        }
    }
    process.set_apparmor_profile(None);
    if let Some(label) = process.selinux_label().clone().filter(|l| !l.is_empty()) {
        dropped.push(format!("SELinux label {label:?}"));
    }
    process.set_selinux_label(None);
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// An OCI process object with `fields` besides the required ones.
    fn process(fields: Value) -> Process {
        let mut p = json!({ "user": { "uid": 0, "gid": 0 }, "cwd": "/", "args": ["sh"] });
        p.as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        serde_json::from_value(p).unwrap()
    }

    fn json_of<T: serde::Serialize>(t: &T) -> Value {
        serde_json::to_value(t).unwrap()
    }

    #[test]
    fn limits_the_spec_sets_stay_and_the_others_are_the_hosts() {
        let mut p = process(
            json!({ "rlimits": [{ "type": "RLIMIT_NOFILE", "soft": 1024, "hard": 1024 }] }),
        );
        let own = [
            (PosixRlimitType::RlimitNofile, 4096, 1 << 20),
            (PosixRlimitType::RlimitNproc, 96367, 96367),
            (PosixRlimitType::RlimitCore, 0, u64::MAX),
        ];
        rlimits(&mut p, &own);
        assert_eq!(
            json_of(&p)["rlimits"],
            json!([
                { "type": "RLIMIT_NOFILE", "soft": 1024, "hard": 1024 },
                { "type": "RLIMIT_NPROC", "soft": 96367, "hard": 96367 },
                { "type": "RLIMIT_CORE", "soft": 0, "hard": u64::MAX },
            ])
        );
        let mut none = process(json!({}));
        rlimits(&mut none, &own[1..2]);
        assert_eq!(json_of(&none)["rlimits"][0]["type"], "RLIMIT_NPROC");
    }

    #[test]
    fn lsm_labels_are_refused_where_runc_refuses_them_and_dropped_where_the_vm_confines() {
        let with = |profile: &str| {
            process(
                json!({ "apparmorProfile": profile, "selinuxLabel": "system_u:system_r:container_t:s0" }),
            )
        };
        let loaded = AppArmor::On(Some(vec!["cri-containerd.apparmor.d".into()]));
        let e = lsm_labels(&mut with("x"), &AppArmor::Off).unwrap_err();
        assert!(e.contains("\"x\"") && e.contains("not enabled"), "{e}");
        let e = lsm_labels(&mut with("x"), &loaded).unwrap_err();
        assert!(e.contains("\"x\"") && e.contains("not loaded"), "{e}");
        for (profile, apparmor) in [
            ("cri-containerd.apparmor.d", &loaded),
            ("unconfined", &loaded),
            ("anything", &AppArmor::On(None)),
        ] {
            let mut p = with(profile);
            let dropped = lsm_labels(&mut p, apparmor).unwrap();
            assert_eq!(p, process(json!({})), "{profile}");
            assert_eq!(dropped.len(), 2, "{dropped:?}");
        }
        let mut none = process(json!({}));
        assert_eq!(lsm_labels(&mut none, &AppArmor::Off), Ok(vec![]));
        assert_eq!(none, process(json!({})));
    }

    #[test]
    fn this_process_has_every_limit() {
        let own = own_rlimits();
        assert_eq!(own.len(), RLIMITS.len());
        assert!(own.iter().all(|(_, soft, hard)| soft <= hard));
    }

    #[test]
    fn only_a_new_uts_namespace_without_a_hostname_gets_the_hosts() {
        let spec = |v: Value| -> Spec { serde_json::from_value(v).unwrap() };
        let uts = |path: Option<&str>| match path {
            Some(p) => spec(json!({ "linux": { "namespaces": [{ "type": "uts", "path": p }] } })),
            None => spec(json!({ "linux": { "namespaces": [{ "type": "uts" }] } })),
        };
        let mut new = uts(None);
        hostname(&mut new, Some("node1"));
        assert_eq!(new.hostname().as_deref(), Some("node1"));
        let mut joined = uts(Some("/proc/7/ns/uts"));
        hostname(&mut joined, Some("node1"));
        assert_eq!(joined.hostname(), &None);
        let mut named = uts(None);
        named.set_hostname(Some("pod-a".into()));
        hostname(&mut named, Some("node1"));
        assert_eq!(named.hostname().as_deref(), Some("pod-a"));
        let mut host_uts = spec(json!({ "linux": { "namespaces": [] } }));
        hostname(&mut host_uts, Some("node1"));
        assert_eq!(host_uts.hostname(), &None);
    }
}
