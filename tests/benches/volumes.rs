//! Synced volume benchmark: the time from kubelet's swap of a configMap's
//! `..data` on the host to the container's inotify event for it (as
//! containerd's CRI log stamps the line the container printed), husk
//! against runc on the same containerd, one pod each, updates
//! interleaved. Prints medians, p95 and the husk / runc ratio.

use husk_tests::bench::{self, median, ms};
use husk_tests::containerd::Containerd;
use husk_tests::volumes::{configmap, VolumePod};

fn main() {
    let runs = bench::runs() * 2;
    let ctd = Containerd::start();
    let cri = ctd.cri();
    let logs = tempfile::tempdir().expect("log dir");
    println!("husk synced volume benchmark: {runs} configMap updates each, husk and runc interleaved, through CRI");
    let start = |handler: &str| {
        VolumePod::start(
            &cri,
            handler,
            &format!("bench-{handler}"),
            &ctd.dir.path().join(format!("configmap-{handler}")),
            &logs.path().join(handler),
            "/etc/app",
            &configmap(1),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", ctd.log()))
    };
    let mut pods = [
        ("husk", start("husk"), Vec::new()),
        ("runc", start("runc"), Vec::new()),
    ];
    for v in 2..(2 + runs as u32) {
        for (handler, pod, delays) in pods.iter_mut() {
            let d = pod
                .update(v, &configmap(v))
                .unwrap_or_else(|e| panic!("{handler}: {e}"));
            delays.push(d);
        }
    }
    let rows: Vec<(String, Vec<std::time::Duration>)> = pods
        .iter()
        .map(|(h, _, d)| {
            (
                format!("{h}: ..data swapped to the container's inotify"),
                d.clone(),
            )
        })
        .collect();
    bench::print_table("configMap update, through containerd 1.6", &rows);
    let (h, r) = (&pods[0].2, &pods[1].2);
    println!(
        "update delay, husk / runc (medians): {:.0}x ({:.1} ms / {:.2} ms)",
        median(h).as_secs_f64() / median(r).as_secs_f64().max(1e-6),
        ms(median(h)),
        ms(median(r))
    );
    for (_, pod, _) in pods {
        pod.stop();
    }
}
