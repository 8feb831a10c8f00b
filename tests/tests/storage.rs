//! Host-side sharing of bind mounts, with real mounts (needs root): what the
//! guest sees through virtio-fs is what these directories hold.

use std::path::Path;

use husk_runtime::storage::{share_bind_mounts, unmount_all_under};
use husk_tests::e2e;

#[test]
fn read_only_binds_are_read_only_in_the_share_whatever_the_guest_does() {
    if !e2e("read_only_binds_are_read_only_in_the_share_whatever_the_guest_does") {
        return;
    }
    let d = tempfile::Builder::new()
        .prefix("husk-share")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let src = d.path().join("src");
    std::fs::create_dir(&src).expect("mkdir");
    std::fs::write(src.join("f"), "data").expect("write");
    let (private, share) = (d.path().join("private"), d.path().join("share"));
    let mut spec = serde_json::json!({"mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/ro", "type": "bind", "source": src, "options": ["rbind", "ro"]},
        {"destination": "/rw", "type": "bind", "source": src, "options": ["rbind", "rw"]}
    ]});
    let n = share_bind_mounts(&mut spec, &private, &share, Path::new("/guest/binds"))
        .expect("share binds");
    assert_eq!(n, 2);
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
    let mut again = serde_json::json!({"mounts": [
        {"destination": "/x", "type": "bind", "source": src, "options": ["rbind"]}
    ]});
    let trap = d.path().join("trap");
    std::fs::create_dir(&trap).expect("mkdir");
    std::os::unix::fs::symlink("/etc", trap.join("0")).expect("symlink");
    let e = share_bind_mounts(&mut again, &d.path().join("p2"), &trap, Path::new("/g"))
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
