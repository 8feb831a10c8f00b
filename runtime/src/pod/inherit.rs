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

use serde_json::{json, Value};

/// Every resource limit the OCI spec names, with its number.
const RLIMITS: [(&str, libc::__rlimit_resource_t); 16] = [
    ("RLIMIT_AS", libc::RLIMIT_AS),
    ("RLIMIT_CORE", libc::RLIMIT_CORE),
    ("RLIMIT_CPU", libc::RLIMIT_CPU),
    ("RLIMIT_DATA", libc::RLIMIT_DATA),
    ("RLIMIT_FSIZE", libc::RLIMIT_FSIZE),
    ("RLIMIT_LOCKS", libc::RLIMIT_LOCKS),
    ("RLIMIT_MEMLOCK", libc::RLIMIT_MEMLOCK),
    ("RLIMIT_MSGQUEUE", libc::RLIMIT_MSGQUEUE),
    ("RLIMIT_NICE", libc::RLIMIT_NICE),
    ("RLIMIT_NOFILE", libc::RLIMIT_NOFILE),
    ("RLIMIT_NPROC", libc::RLIMIT_NPROC),
    ("RLIMIT_RSS", libc::RLIMIT_RSS),
    ("RLIMIT_RTPRIO", libc::RLIMIT_RTPRIO),
    ("RLIMIT_RTTIME", libc::RLIMIT_RTTIME),
    ("RLIMIT_SIGPENDING", libc::RLIMIT_SIGPENDING),
    ("RLIMIT_STACK", libc::RLIMIT_STACK),
];

/// One limit: (OCI name, soft, hard).
pub type Rlimit = (&'static str, u64, u64);

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

/// Adds to `process` (an OCI process object) each of `own` limits it does
/// not set itself.
pub fn rlimits(process: &mut Value, own: &[Rlimit]) {
    let Some(p) = process.as_object_mut() else {
        return;
    };
    let list = p.entry("rlimits").or_insert_with(|| json!([]));
    let Some(list) = list.as_array_mut() else {
        return;
    };
    for &(name, soft, hard) in own {
        if !list
            .iter()
            .any(|r| r.get("type").and_then(Value::as_str) == Some(name))
        {
            list.push(json!({ "type": name, "soft": soft, "hard": hard }));
        }
    }
}

/// Gives a spec whose container gets a new UTS namespace and no hostname
/// the host's, as the kernel gives runc's container.
pub fn hostname(spec: &mut Value, host: Option<&str>) {
    let new_uts = spec
        .pointer("/linux/namespaces")
        .and_then(Value::as_array)
        .is_some_and(|ns| {
            ns.iter().any(|n| {
                n.get("type").and_then(Value::as_str) == Some("uts")
                    && n.get("path")
                        .and_then(Value::as_str)
                        .is_none_or(str::is_empty)
            })
        });
    let unset = spec
        .get("hostname")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty);
    if let (true, true, Some(host), Some(obj)) = (new_uts, unset, host, spec.as_object_mut()) {
        obj.insert("hostname".into(), json!(host));
    }
}

/// Both, for a container's spec.
pub fn container(spec: &mut Value) {
    hostname(spec, host_hostname().as_deref());
    if let Some(p) = spec.get_mut("process") {
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
pub fn lsm_labels(process: &mut Value, apparmor: &AppArmor) -> Result<Vec<String>, String> {
    let Some(p) = process.as_object_mut() else {
        return Ok(Vec::new());
    };
    let mut dropped = Vec::new();
    if let Some(profile) = p
        .get("apparmorProfile")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
    {
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
            AppArmor::On(_) => {
                p.remove("apparmorProfile");
                dropped.push(format!("AppArmor profile {profile:?}"));
            }
        }
    }
    if let Some(label) = p.remove("selinuxLabel") {
        if label.as_str().is_some_and(|l| !l.is_empty()) {
            dropped.push(format!("SELinux label {label}"));
        }
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_the_spec_sets_stay_and_the_others_are_the_hosts() {
        let mut p = json!({ "args": ["sh"], "rlimits": [{ "type": "RLIMIT_NOFILE", "soft": 1024, "hard": 1024 }] });
        let own = [
            ("RLIMIT_NOFILE", 4096, 1 << 20),
            ("RLIMIT_NPROC", 96367, 96367),
            ("RLIMIT_CORE", 0, u64::MAX),
        ];
        rlimits(&mut p, &own);
        assert_eq!(
            p["rlimits"],
            json!([
                { "type": "RLIMIT_NOFILE", "soft": 1024, "hard": 1024 },
                { "type": "RLIMIT_NPROC", "soft": 96367, "hard": 96367 },
                { "type": "RLIMIT_CORE", "soft": 0, "hard": u64::MAX },
            ])
        );
        let mut none = json!({ "args": ["sh"] });
        rlimits(&mut none, &own[1..2]);
        assert_eq!(none["rlimits"][0]["type"], "RLIMIT_NPROC");
    }

    #[test]
    fn lsm_labels_are_refused_where_runc_refuses_them_and_dropped_where_the_vm_confines() {
        let with = |profile: &str| json!({ "args": ["sh"], "apparmorProfile": profile, "selinuxLabel": "system_u:system_r:container_t:s0" });
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
            assert_eq!(p, json!({ "args": ["sh"] }), "{profile}");
            assert_eq!(dropped.len(), 2, "{dropped:?}");
        }
        let mut none = json!({ "args": ["sh"] });
        assert_eq!(lsm_labels(&mut none, &AppArmor::Off), Ok(vec![]));
        assert_eq!(none, json!({ "args": ["sh"] }));
    }

    #[test]
    fn this_process_has_every_limit() {
        let own = own_rlimits();
        assert_eq!(own.len(), RLIMITS.len());
        assert!(own.iter().all(|(_, soft, hard)| soft <= hard));
    }

    #[test]
    fn only_a_new_uts_namespace_without_a_hostname_gets_the_hosts() {
        let uts = |path: Option<&str>| match path {
            Some(p) => json!({ "linux": { "namespaces": [{ "type": "uts", "path": p }] } }),
            None => json!({ "linux": { "namespaces": [{ "type": "uts" }] } }),
        };
        let mut new = uts(None);
        hostname(&mut new, Some("node1"));
        assert_eq!(new["hostname"], "node1");
        let mut joined = uts(Some("/proc/7/ns/uts"));
        hostname(&mut joined, Some("node1"));
        assert!(joined.get("hostname").is_none());
        let mut named = uts(None);
        named["hostname"] = json!("pod-a");
        hostname(&mut named, Some("node1"));
        assert_eq!(named["hostname"], "pod-a");
        let mut host_uts = json!({ "linux": { "namespaces": [] } });
        hostname(&mut host_uts, Some("node1"));
        assert!(host_uts.get("hostname").is_none());
    }
}
