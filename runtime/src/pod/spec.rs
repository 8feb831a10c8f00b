//! The bundle's OCI runtime spec, typed as the guest's libcontainer reads
//! it (the same `oci-spec` version: what the host writes back, the guest
//! reads alike), and a minimal one, like the one `ctr run` generates, for
//! containers husk starts itself (`husk run`, tests).

use std::path::{Path, PathBuf};

pub use oci_spec::runtime::Spec;

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not an OCI runtime spec: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{} has no {field}, which a container needs (runc refuses it too); write the bundle's spec with `ctr oci spec` or `runc spec`", path.display())]
    Missing { path: PathBuf, field: &'static str },
}

/// Reads `bundle`'s config.json.
pub fn read(bundle: &Path) -> Result<Spec, SpecError> {
    let path = bundle.join("config.json");
    let bytes = std::fs::read(&path).map_err(|source| SpecError::Read {
        path: path.clone(),
        source,
    })?;
    parse(&bytes, &path)
}

/// Parses a spec (from `path`, which errors name): a field of the wrong
/// type, an unknown namespace or capability, and a missing `process` or
/// `root` are errors here, before any VM boots.
pub fn parse(bytes: &[u8], path: &Path) -> Result<Spec, SpecError> {
    let spec: Spec = serde_json::from_slice(bytes).map_err(|source| SpecError::Parse {
        path: path.to_owned(),
        source,
    })?;
    let missing = |field| SpecError::Missing {
        path: path.to_owned(),
        field,
    };
    if spec.process().is_none() {
        return Err(missing("process"));
    }
    if spec.root().is_none() {
        return Err(missing("root"));
    }
    Ok(spec)
}

/// The spec as JSON: `args` as root with ctr's default capabilities, proc,
/// dev, devpts, shm and sysfs mounts, the usual namespaces, masked and
/// read-only paths, and the cgroup at `cgroups_path`.
pub fn minimal(container_id: &str, args: &[&str], cgroups_path: &str) -> Vec<u8> {
    let caps = [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE",
    ];
    let spec = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": { "uid": 0, "gid": 0 },
            "args": args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "capabilities": { "bounding": caps, "effective": caps, "permitted": caps },
            "rlimits": [{ "type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024 }],
            "noNewPrivileges": true
        },
        "root": { "path": "/host/path/that/the/guest/ignores" },
        "hostname": container_id,
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"] },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
            { "destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"] },
            { "destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
            { "destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"] }
        ],
        "linux": {
            "cgroupsPath": cgroups_path,
            "namespaces": [{ "type": "pid" }, { "type": "ipc" }, { "type": "uts" }, { "type": "mount" }, { "type": "network" }],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    });
    // Serialising a json! value cannot fail.
    serde_json::to_vec(&spec).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn the_spec_carries_args_hostname_and_cgroup() {
        let v: Value =
            serde_json::from_slice(&super::minimal("c1", &["echo", "hi"], "/x/c1")).unwrap();
        assert_eq!(v["process"]["args"], json!(["echo", "hi"]));
        assert_eq!(v["hostname"], "c1");
        assert_eq!(v["linux"]["cgroupsPath"], "/x/c1");
        parse(&minimal("c1", &["sh"], "/x/c1"), Path::new("minimal")).unwrap();
    }

    /// The capability lists are sets to oci-spec: their order is not kept.
    fn canonical(mut v: Value) -> Value {
        if let Some(caps) = v
            .pointer_mut("/process/capabilities")
            .and_then(Value::as_object_mut)
        {
            for list in caps.values_mut().filter_map(Value::as_array_mut) {
                list.sort_by_key(|c| c.as_str().map(str::to_owned));
            }
        }
        v
    }

    #[test]
    fn containerds_default_spec_comes_back_whole() {
        // `ctr oci spec` of containerd 1.6.20 (Debian bookworm).
        let bytes = include_bytes!("testdata/ctr-oci-spec.json");
        let spec = parse(bytes, Path::new("ctr-oci-spec.json")).unwrap();
        let original: Value = serde_json::from_slice(bytes).unwrap();
        assert_eq!(
            canonical(serde_json::to_value(&spec).unwrap()),
            canonical(original)
        );
    }

    #[test]
    fn a_spec_without_process_or_root_or_of_the_wrong_shape_is_refused_by_name() {
        let path = Path::new("/b/config.json");
        let mut v: Value = serde_json::from_slice(&minimal("c1", &["sh"], "/x")).unwrap();
        for field in ["process", "root"] {
            let mut without = v.clone();
            without.as_object_mut().unwrap().remove(field);
            let e = parse(&serde_json::to_vec(&without).unwrap(), path).unwrap_err();
            let text = e.to_string();
            assert!(
                text.contains("/b/config.json") && text.contains(&format!("no {field}")),
                "{text}"
            );
        }
        v["linux"]["namespaces"][0]["type"] = json!("pidd");
        let e = parse(&serde_json::to_vec(&v).unwrap(), path)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/b/config.json is not an OCI runtime spec") && e.contains("pidd"),
            "{e}"
        );
        let e = read(Path::new("/nonexistent/bundle")).unwrap_err();
        assert!(
            crate::error_chain(&e).contains("/nonexistent/bundle/config.json"),
            "{e}"
        );
    }
}
