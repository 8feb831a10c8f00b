//! Synced volumes (configMap, secret, downwardAPI, projected) against runc:
//! a volume kubelet's atomic writer updates on the host shows each new
//! version in the container, an inotify watch on the volume directory (as
//! nginx or envoy place theirs) sees the same events in the same order as
//! under runc, a file is never read as a mix of two versions, and husk's
//! container sees each swap within 1 s.

use std::path::Path;
use std::time::Duration;

use husk_tests::containerd::{assert_clean, Containerd};
use husk_tests::cri::Cri;
use husk_tests::volumes::{configmap, VolumePod};
use husk_tests::{e2e, vm_lock};

/// Where the container sees the volume.
const MOUNT: &str = "/etc/app";
/// The most a husk container may wait for an update (the bound).
const MOST: Duration = Duration::from_secs(1);

/// What one runtime's container saw.
struct Seen {
    /// Every inotify event line, in order.
    events: Vec<String>,
    /// Lines of the torn-read check (none if every read was whole).
    torn: Vec<String>,
    /// From each swap on the host to the container's `moved_to ..data`.
    delays: Vec<Duration>,
    /// What the container read after each update.
    contents: Vec<String>,
}

fn run_case(ctd: &Containerd, cri: &Cri, handler: &str, logs: &Path) -> Seen {
    let fail = |e: String| -> ! { panic!("{handler}: {e}\n{}", ctd.log()) };
    let mut pod = VolumePod::start(
        cri,
        handler,
        "synced",
        &ctd.dir.path().join(format!("configmap-{handler}")),
        &logs.join(handler),
        MOUNT,
        &configmap(1),
    )
    .unwrap_or_else(|e| fail(e));
    let read = |pod: &VolumePod| {
        cri.sh(
            &pod.id,
            &format!("uniq {MOUNT}/config; cat {MOUNT}/app.conf {MOUNT}/certs/ca.crt; ls {MOUNT}"),
            20,
        )
    };
    let mut contents = vec![read(&pod)];
    let mut delays = Vec::new();
    for v in [2, 3, 4] {
        delays.push(pod.update(v, &configmap(v)).unwrap_or_else(|e| fail(e)));
        contents.push(read(&pod));
    }
    let (torn, events): (Vec<String>, Vec<String>) = pod
        .stop()
        .into_iter()
        .map(|l| l.text)
        .filter(|t| !t.starts_with("watching "))
        .partition(|t| t.starts_with("torn "));
    Seen {
        events,
        torn,
        delays,
        contents,
    }
}

fn ms(d: &[Duration]) -> String {
    d.iter()
        .map(|d| format!("{:.1} ms", d.as_secs_f64() * 1e3))
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
#[ignore = "end-to-end: root, runc, CRI and a guest (make test)"]
fn a_configmap_update_reaches_the_container_and_its_inotify_as_under_runc() {
    e2e();
    let _vm = vm_lock();
    let ctd = Containerd::start();
    let cri = ctd.cri();
    let logs = tempfile::tempdir().expect("log dir");
    let runc = run_case(&ctd, &cri, "runc", logs.path());
    let husk = run_case(&ctd, &cri, "husk", logs.path());
    println!(
        "delay from the swap to the container's event: runc {}; husk {}",
        ms(&runc.delays),
        ms(&husk.delays)
    );

    let mut diffs = Vec::new();
    // The oracle first: runc's container saw every version.
    for (i, c) in runc.contents.iter().enumerate() {
        let v = i + 1;
        if !c.starts_with(&format!("version-{v}\na={v}\nca-{v}\n")) {
            diffs.push(format!("oracle: runc read {c:?} after version {v}"));
        }
    }
    if runc.contents != husk.contents {
        diffs.push(format!(
            "contents after each version: runc {:?}, husk {:?}",
            runc.contents, husk.contents
        ));
    }
    let n = runc.events.len().max(husk.events.len());
    for i in 0..n {
        let (r, h) = (runc.events.get(i), husk.events.get(i));
        if r != h {
            diffs.push(format!("inotify event {i}: runc {r:?}, husk {h:?}"));
        }
    }
    for (rt, seen) in [("runc", &runc), ("husk", &husk)] {
        if !seen.torn.is_empty() {
            diffs.push(format!(
                "{rt}: a read of the file was not one version: {:?}",
                seen.torn
            ));
        }
    }
    for (v, d) in husk.delays.iter().enumerate() {
        if *d > MOST {
            diffs.push(format!(
                "husk: version {} reached the container's inotify {:.0} ms after the swap (most {} ms)",
                v + 2,
                d.as_secs_f64() * 1e3,
                MOST.as_millis()
            ));
        }
    }
    assert!(
        diffs.is_empty(),
        "synced volume differs from runc:\n  {}\nrunc events: {:?}\nhusk events: {:?}",
        diffs.join("\n  "),
        runc.events,
        husk.events
    );
    drop(ctd);
    assert_clean();
}
