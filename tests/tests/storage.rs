//! Host-side sharing of bind mounts, with real mounts (needs root): what the
//! guest sees through virtio-fs is what these directories hold.

use std::path::Path;

use husk_runtime::host::storage::{
    mount_share_root, remove_tree, share_bind_mounts, unmount_all_under, ShareWrite, SyncedVolume,
};
use husk_tests::e2e;

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn read_only_binds_are_read_only_in_the_share_whatever_the_guest_does() {
    e2e();
    let d = tempfile::Builder::new()
        .prefix("husk-share")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let src = d.path().join("src");
    std::fs::create_dir(&src).expect("mkdir");
    std::fs::write(src.join("f"), "data").expect("write");
    // kubelet's atomic-writer layout: the read-only bind of it is synced.
    std::fs::create_dir(src.join("..v1")).expect("mkdir");
    std::os::unix::fs::symlink("..v1", src.join("..data")).expect("link");
    let (private, share) = (d.path().join("private"), d.path().join("share"));
    let mut spec = spec_of(serde_json::json!({"mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/ro", "type": "bind", "source": src, "options": ["rbind", "ro"]},
        {"destination": "/rw", "type": "bind", "source": src, "options": ["rbind", "rw"]}
    ]}));
    let synced = share_bind_mounts(
        &mut spec,
        &private,
        d.path(),
        &share,
        Path::new("/guest/binds"),
    )
    .expect("share binds");
    assert_eq!(
        synced,
        [SyncedVolume {
            n: 1,
            dir: private.join("1")
        }],
        "only the read-only bind is synced"
    );
    let spec = serde_json::to_value(&spec).expect("spec");
    assert_eq!(
        spec["mounts"][0]["source"], "proc",
        "non-bind mounts untouched"
    );
    assert_eq!(spec["mounts"][1]["source"], "/guest/binds/1");
    assert_eq!(spec["mounts"][2]["source"], "/guest/binds/2");

    // The share is what virtiofsd serves: the ro one refuses writes at the
    // host's mount, so a guest ignoring its spec cannot write either.
    assert_eq!(
        std::fs::read_to_string(share.join("1/f")).expect("read"),
        "data"
    );
    let e = std::fs::write(share.join("1/new"), "x").expect_err("write through ro bind");
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    std::fs::write(share.join("2/new"), "x").expect("write through rw bind");
    assert_eq!(std::fs::read_to_string(src.join("new")).expect("read"), "x");

    // A symlink the guest planted where a bind goes is not followed.
    let mut again = spec_of(serde_json::json!({"mounts": [
        {"destination": "/x", "type": "bind", "source": src, "options": ["rbind"]}
    ]}));
    let trap = d.path().join("trap");
    std::fs::create_dir(&trap).expect("mkdir");
    std::os::unix::fs::symlink("/etc", trap.join("0")).expect("symlink");
    let e = share_bind_mounts(
        &mut again,
        &d.path().join("p2"),
        d.path(),
        &trap,
        Path::new("/g"),
    )
    .expect_err("bound through a planted symlink");
    assert!(e.to_string().contains("trap/0"), "{e}");
    assert!(std::fs::symlink_metadata(trap.join("0"))
        .expect("still there")
        .file_type()
        .is_symlink());

    let left = unmount_all_under(d.path());
    assert!(left.len() >= 4, "mounts made: {left:?}");
    assert!(unmount_all_under(d.path()).is_empty());
}

fn spec_of(v: serde_json::Value) -> husk_runtime::pod::spec::Spec {
    serde_json::from_value(v).expect("an OCI spec")
}

/// statvfs(3)'s mount flags of `p`.
fn mount_flags(p: &Path) -> u64 {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: a NUL-terminated path and a zeroed statvfs to fill.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; both outlive the call.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    assert_eq!(rc, 0, "statvfs {p:?}");
    st.f_flag
}

fn tmpfs(at: &Path) {
    nix::mount::mount(
        Some("tmpfs"),
        at,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .expect("mount tmpfs");
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn shared_binds_are_nosuid_nodev_and_read_only_ones_are_read_only_all_the_way_down() {
    e2e();
    let d = tempfile::Builder::new()
        .prefix("husk-share")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let src = d.path().join("src");
    std::fs::create_dir_all(src.join("sub")).expect("mkdir");
    // A volume with a mount below it: a plain read-only remount of the
    // bind would leave this one writable.
    tmpfs(&src.join("sub"));
    // A device node and a setuid file, as a guest could write them.
    nix::sys::stat::mknod(
        &src.join("null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .expect("mknod");
    let (private, share) = (d.path().join("private"), d.path().join("share"));
    let mut spec = spec_of(serde_json::json!({"mounts": [
        {"destination": "/ro", "type": "bind", "source": src, "options": ["rbind", "ro"]},
        {"destination": "/rw", "type": "bind", "source": src, "options": ["rbind", "rw"]}
    ]}));
    share_bind_mounts(&mut spec, &private, d.path(), &share, Path::new("/g")).expect("share binds");

    let e = std::fs::write(share.join("0/sub/new"), "x").expect_err("write below a ro rbind");
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    std::fs::write(share.join("1/sub/new"), "x").expect("write below a rw rbind");
    for p in ["0", "0/sub", "1", "1/sub"].map(|p| share.join(p)) {
        let f = mount_flags(&p);
        assert!(
            f & libc::ST_NOSUID != 0 && f & libc::ST_NODEV != 0,
            "{p:?} flags {f:#x}"
        );
    }
    // The source itself is untouched: the host's own mount stays as it was.
    assert_eq!(mount_flags(&src.join("sub")) & libc::ST_RDONLY, 0);
    std::fs::write(src.join("sub/host"), "x").expect("the host's mount is still writable");
    // A device node reached through the share does not open.
    let e = std::fs::File::open(share.join("1/null")).expect_err("opened a device via the share");
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    std::fs::File::open(src.join("null")).expect("the host's own path still opens it");

    unmount_all_under(d.path());
    assert!(unmount_all_under(d.path()).is_empty());
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn the_share_root_is_a_capped_tmpfs_read_only_but_while_husk_writes() {
    e2e();
    let d = tempfile::Builder::new()
        .prefix("husk-share")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let root = d.path().join("shared");
    std::fs::create_dir(&root).expect("mkdir");
    mount_share_root(&root).expect("mount the share root");
    let f = mount_flags(&root);
    for (flag, name) in [
        (libc::ST_RDONLY, "ro"),
        (libc::ST_NOSUID, "nosuid"),
        (libc::ST_NODEV, "nodev"),
        (libc::ST_NOEXEC, "noexec"),
    ] {
        assert!(f & flag != 0, "share root not {name}: {f:#x}");
    }
    let e = std::fs::create_dir(root.join("guest-made")).expect_err("wrote a read-only root");
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    {
        let _w = ShareWrite::begin(&root);
        std::fs::create_dir(root.join("c1")).expect("husk writes while it holds the root");
        // Capped: however much is written, the host's /run is not reached.
        let e = std::fs::write(root.join("c1/fill"), vec![0u8; 4 << 20])
            .expect_err("the share root took 4 MiB");
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
        std::fs::remove_file(root.join("c1/fill")).expect("rm");
    }
    assert!(root.join("c1").is_dir());
    let e = std::fs::create_dir(root.join("c2")).expect_err("read-only again");
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    // A directory that is not a mount point is never remounted (that
    // would reach the file system holding it).
    let plain = d.path().join("plain");
    std::fs::create_dir(&plain).expect("mkdir");
    drop(ShareWrite::begin(&plain));
    assert_eq!(mount_flags(d.path()) & libc::ST_RDONLY, 0);

    unmount_all_under(d.path());
    assert!(unmount_all_under(d.path()).is_empty());
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn a_mount_left_in_a_tree_is_never_removed_through_and_stacked_ones_all_go() {
    e2e();
    let d = tempfile::Builder::new()
        .prefix("husk-remove")
        .tempdir_in("/tmp")
        .expect("tempdir");
    // A host volume on the same filesystem as the tree (so the same
    // st_dev), bound into it, and a tmpfs with two more stacked on it.
    let vol = d.path().join("vol");
    std::fs::create_dir(&vol).expect("mkdir");
    std::fs::write(vol.join("keep"), "keep").expect("write");
    let tree = d.path().join("tree");
    let (bound, stacked) = (tree.join("binds/1"), tree.join("t"));
    for p in [&bound, &stacked] {
        std::fs::create_dir_all(p).expect("mkdir");
    }
    std::fs::write(tree.join("binds/own"), "x").expect("write");
    nix::mount::mount(
        Some(&vol),
        &bound,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .expect("bind");
    for n in 0..3 {
        tmpfs(&stacked);
        std::fs::write(stacked.join("f"), n.to_string()).expect("write");
    }

    // Left mounted (as when an unmount failed): neither is entered.
    let e = remove_tree(&tree).expect_err("removed through a mount");
    assert!(e.to_string().contains("still a mount point"), "{e}");
    assert!(
        e.to_string().contains(bound.to_str().expect("utf-8"))
            || e.to_string().contains(stacked.to_str().expect("utf-8")),
        "{e}"
    );
    assert_eq!(
        std::fs::read_to_string(vol.join("keep")).expect("kept"),
        "keep"
    );
    assert_eq!(
        std::fs::read_to_string(stacked.join("f")).expect("kept"),
        "2"
    );
    assert!(
        !tree.join("binds/own").exists(),
        "the tree's own files go even so"
    );

    // Every stacked mount goes, then the tree, and the volume stays.
    let found = unmount_all_under(&tree);
    assert_eq!(found.len(), 4, "{found:?}");
    assert!(unmount_all_under(&tree).is_empty());
    remove_tree(&tree).expect("remove the unmounted tree");
    assert!(!tree.exists());
    assert_eq!(
        std::fs::read_to_string(vol.join("keep")).expect("kept"),
        "keep"
    );
}
