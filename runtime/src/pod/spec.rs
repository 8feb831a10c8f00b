//! A minimal OCI runtime spec, like the one `ctr run` generates, for
//! containers husk starts itself (`husk run`, tests).

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
    #[test]
    fn the_spec_carries_args_hostname_and_cgroup() {
        let v: serde_json::Value =
            serde_json::from_slice(&super::minimal("c1", &["echo", "hi"], "/x/c1")).unwrap();
        assert_eq!(v["process"]["args"], serde_json::json!(["echo", "hi"]));
        assert_eq!(v["hostname"], "c1");
        assert_eq!(v["linux"]["cgroupsPath"], "/x/c1");
    }
}
