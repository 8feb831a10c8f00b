//! The CNI matrix: pod networks as nodes configure them, with Debian's
//! containernetworking-plugins (and one plugin of the test's own that wires
//! a pod as Calico does), each run on runc first and then on husk in one
//! containerd. For each configuration both pods must start; what a process
//! in the husk pod sees of its network (links, addresses, routes of every
//! table in both families, permanent neighbours, policy rules, sysctls)
//! must equal what the runc pod sees, field by field; and the same traffic
//! must work: host to pod, pod to host, pod to pod (both ways).
//!
//! Traffic goes only to the pods and to addresses this test puts on
//! bridges and dummy devices it makes. Everything it makes is removed.

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use husk_tests::containerd::{assert_clean, cni_conflist, Containerd};
use husk_tests::cri::Cri;
use husk_tests::differential::{differences, Observation};
use husk_tests::netstate::{
    drop_one_sided_sysctls, drop_queueless_txqlen, fetch, http_get, observe, HostServer, WebPod,
    WEB_PORT,
};
use husk_tests::{e2e, vm_lock};

/// One CNI configuration of the matrix.
struct Row {
    name: &'static str,
    /// The plugins of the network list (JSON objects, comma-separated).
    plugins: String,
    /// The host address pods reach the host on (a gateway, or an address
    /// of a device the row makes).
    host: &'static str,
    /// The pods cannot run side by side (one static address, one MAC):
    /// runc's pod is removed before husk's starts, and no pod-to-pod check.
    one_at_a_time: bool,
    /// `ip` commands run before (devices the row needs) ...
    setup: Vec<&'static str>,
    /// ... and devices removed after (bridges the plugins made included).
    remove: Vec<&'static str>,
    /// A link type the host's kernel must have for runc to run the row.
    needs: Option<&'static str>,
    /// Each pod publishes its port on a host port (portmap), reached from
    /// the host at `host`.
    host_ports: bool,
    /// The rate (bits/s) the configuration shapes the pod's traffic to,
    /// both ways (bandwidth): measured on each pod.
    shaped: Option<u64>,
}

fn host_local(subnet: &str, extra: &str) -> String {
    format!(
        r#"{{"type":"host-local","ranges":[[{{"subnet":"{subnet}"}}]],"dataDir":"@IPAM_DIR@"{extra}}}"#
    )
}

fn bridge(name: &str, flags: &str, ipam: &str) -> String {
    format!(r#"{{"type":"bridge","bridge":"{name}"{flags},"ipam":{ipam}}}"#)
}

fn rows() -> Vec<Row> {
    vec![
        Row {
            name: "bridge, route to its own subnet",
            plugins: bridge(
                "husk-cm1",
                r#","isGateway":true"#,
                &host_local(
                    "10.244.81.0/24",
                    r#","routes":[{"dst":"10.244.81.0/24"},{"dst":"0.0.0.0/0"}]"#,
                ),
            ),
            host: "10.244.81.1",
            one_at_a_time: false,
            setup: vec![],
            remove: vec!["husk-cm1"],
            needs: None,
            host_ports: false,
            shaped: None,
        },
        Row {
            name: "bridge, dual stack, 0.0.0.0/0 and ::/0 routes, ipMasq, hairpin",
            plugins: bridge(
                "husk-cm2",
                r#","isGateway":true,"ipMasq":true,"hairpinMode":true"#,
                r#"{"type":"host-local","ranges":[[{"subnet":"10.244.82.0/24"}],[{"subnet":"fd00:82::/64"}]],"routes":[{"dst":"0.0.0.0/0"},{"dst":"::/0"}],"dataDir":"@IPAM_DIR@"}"#,
            ),
            host: "10.244.82.1",
            one_at_a_time: false,
            setup: vec![],
            remove: vec!["husk-cm2"],
            needs: None,
            host_ports: false,
            shaped: None,
        },
        Row {
            name: "bridge, isDefaultGateway",
            plugins: bridge(
                "husk-cm3",
                r#","isDefaultGateway":true"#,
                &host_local("10.244.80.0/24", ""),
            ),
            host: "10.244.80.1",
            one_at_a_time: false,
            setup: vec![],
            remove: vec!["husk-cm3"],
            needs: None,
            host_ports: false,
            shaped: None,
        },
        Row {
            name: "ptp, default route only",
            plugins: format!(
                r#"{{"type":"ptp","ipMasq":true,"ipam":{}}}"#,
                host_local("10.244.83.0/24", r#","routes":[{"dst":"0.0.0.0/0"}]"#)
            ),
            host: "10.244.83.1",
            one_at_a_time: false,
            setup: vec![],
            remove: vec![],
            needs: None,
            host_ports: false,
            shaped: None,
        },
        Row {
            name: "macvlan (bridge mode) on a portless bridge",
            plugins: format!(
                r#"{{"type":"macvlan","master":"husk-cmd4","mode":"bridge","ipam":{}}}"#,
                host_local(
                    "10.244.84.0/24",
                    r#","routes":[{"dst":"0.0.0.0/0","gw":"10.244.84.254"}]"#
                )
            ),
            host: "10.244.84.254",
            one_at_a_time: false,
            setup: vec![
                // This host's kernel has no dummy links; a bridge with no
                // ports is as good a master.
                "link add husk-cmd4 type bridge",
                "link set husk-cmd4 up",
                "link add husk-cmh4 link husk-cmd4 type macvlan mode bridge",
                "addr add 10.244.84.254/24 dev husk-cmh4",
                "link set husk-cmh4 up",
            ],
            remove: vec!["husk-cmh4", "husk-cmd4"],
            needs: None,
            host_ports: false,
            shaped: None,
        },
        Row {
            name: "ipvlan (l2) on a portless bridge",
            plugins: format!(
                r#"{{"type":"ipvlan","master":"husk-cmd5","mode":"l2","ipam":{}}}"#,
                host_local(
                    "10.244.85.0/24",
                    r#","routes":[{"dst":"0.0.0.0/0","gw":"10.244.85.254"}]"#
                )
            ),
            host: "10.244.85.254",
            one_at_a_time: false,
            setup: vec![
                "link add husk-cmd5 type bridge",
                "link set husk-cmd5 up",
                "link add husk-cmh5 link husk-cmd5 type ipvlan mode l2",
                "addr add 10.244.85.254/24 dev husk-cmh5",
                "link set husk-cmh5 up",
            ],
            remove: vec!["husk-cmh5", "husk-cmd5"],
            needs: Some("ipvlan"),
            host_ports: false,
            shaped: None,
        },
        Row {
            name: "static IPAM, tuning (MAC, MTU, promisc, sysctls)",
            plugins: format!(
                r#"{},{{"type":"tuning","mac":"02:42:0a:f4:56:0a","mtu":1400,"promisc":true,"sysctl":{{"net.ipv4.conf.eth0.arp_notify":"1","net.ipv4.conf.eth0.accept_local":"1","net.core.somaxconn":"777"}}}}"#,
                bridge(
                    "husk-cm6",
                    r#","isGateway":true"#,
                    r#"{"type":"static","addresses":[{"address":"10.244.86.10/24","gateway":"10.244.86.1"}],"routes":[{"dst":"0.0.0.0/0"},{"dst":"10.244.0.0/16","gw":"10.244.86.1"}]}"#,
                )
            ),
            host: "10.244.86.1",
            one_at_a_time: true,
            setup: vec![],
            remove: vec!["husk-cm6"],
            needs: None,
            host_ports: false,
            shaped: None,
        },
        Row {
            name: "bridge and firewall",
            plugins: format!(
                r#"{},{{"type":"firewall","backend":"iptables"}}"#,
                bridge(
                    "husk-cm7",
                    r#","isGateway":true"#,
                    &host_local("10.244.87.0/24", r#","routes":[{"dst":"0.0.0.0/0"}]"#)
                )
            ),
            host: "10.244.87.1",
            one_at_a_time: false,
            setup: vec![],
            remove: vec!["husk-cm7"],
            needs: None,
            host_ports: false,
            shaped: None,
        },
        Row {
            name: "bridge and portmap (hostPort)",
            plugins: format!(
                r#"{},{{"type":"portmap","capabilities":{{"portMappings":true}}}}"#,
                bridge(
                    "husk-cm9",
                    r#","isGateway":true"#,
                    &host_local("10.244.89.0/24", r#","routes":[{"dst":"0.0.0.0/0"}]"#)
                )
            ),
            host: "10.244.89.1",
            one_at_a_time: false,
            setup: vec![],
            remove: vec!["husk-cm9"],
            needs: None,
            host_ports: true,
            shaped: None,
        },
        Row {
            name: "bridge and bandwidth (ingress and egress shaped)",
            plugins: format!(
                r#"{},{{"type":"bandwidth","ingressRate":{SHAPED_RATE},"ingressBurst":{SHAPED_BURST},"egressRate":{SHAPED_RATE},"egressBurst":{SHAPED_BURST}}}"#,
                bridge(
                    "husk-cm10",
                    r#","isGateway":true"#,
                    &host_local("10.244.90.0/24", r#","routes":[{"dst":"0.0.0.0/0"}]"#)
                )
            ),
            host: "10.244.90.1",
            one_at_a_time: false,
            setup: vec![],
            remove: vec!["husk-cm10"],
            needs: None,
            host_ports: false,
            shaped: Some(SHAPED_RATE),
        },
        Row {
            name: "Calico-style (/32, default via 169.254.1.1 onlink, proxy ARP)",
            plugins:
                r#"{"type":"husk-calico-style","subnet":"10.244.88.0/24","dataDir":"@DIR@/calico"}"#
                    .to_owned(),
            host: "10.244.88.254",
            one_at_a_time: false,
            setup: vec![
                "link add husk-cmd8 type bridge",
                "addr add 10.244.88.254/32 dev husk-cmd8",
                "link set husk-cmd8 up",
                // What makes the host answer ARP for the made-up gateway:
                // a route to it through another device.
                "route add 169.254.1.1/32 dev husk-cmd8",
            ],
            remove: vec!["husk-cmd8"],
            needs: None,
            host_ports: false,
            shaped: None,
        },
    ]
}

fn ip(args: &str) {
    let out = Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether this host's kernel makes links of type `kind` (on a bridge).
fn host_has_link_type(kind: &str) -> bool {
    ip("link add husk-cmprobe type bridge");
    let ok = Command::new("ip")
        .args([
            "link",
            "add",
            "husk-cmprobe2",
            "link",
            "husk-cmprobe",
            "type",
            kind,
        ])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let _ = Command::new("ip")
        .args(["link", "del", "husk-cmprobe2"])
        .stderr(std::process::Stdio::null())
        .status();
    ip("link del husk-cmprobe");
    ok
}

/// What one runtime's pod of a row did.
#[derive(Default)]
struct Side {
    /// Why it did not start, if it did not.
    failed: Option<String>,
    state: Option<Observation>,
    /// Failed traffic checks, each named.
    traffic: Vec<String>,
    ips: Vec<IpAddr>,
    pod: String,
    web: String,
    /// The host port the pod's port is published on, if any.
    host_port: Option<u16>,
    /// The rates measured into and out of the pod (bits/s), for a shaped
    /// row.
    rates: Option<Result<Rates, String>>,
}

/// What a shaped pod got, in bits/s.
#[derive(Clone, Copy)]
struct Rates {
    ingress: f64,
    egress: f64,
}

const PORT: u16 = WEB_PORT;

/// Starts a pod of `handler` serving its name on [`PORT`] and observes its
/// network; a failure to start is recorded, not raised.
fn start(cri: &Cri, ctd: &Containerd, name: &str, handler: &str, host_port: Option<u16>) -> Side {
    match WebPod::start_mapped(cri, ctd.dir.path(), name, handler, &[], host_port) {
        Ok(w) => Side {
            host_port,
            state: Some(observe(cri, &w.web, &w.ips, &["eth0"])),
            ips: w.ips,
            pod: w.pod,
            web: w.web,
            ..Default::default()
        },
        Err(e) => Side {
            failed: Some(e),
            ..Default::default()
        },
    }
}

/// Host to pod and pod to host, recorded in `side`.
fn host_traffic(cri: &Cri, side: &mut Side, name: &str, host: &HostServer) {
    for ip in side.ips.clone() {
        match http_get(&ip, PORT, Duration::from_secs(10)) {
            Ok(r) if r.contains(name) => {}
            Ok(r) => side
                .traffic
                .push(format!("host to pod {ip}: wrong reply {r:?}")),
            Err(e) => side.traffic.push(format!("host to pod: {e}")),
        }
    }
    if let Some(port) = side.host_port {
        match http_get(&host.addr.ip(), port, Duration::from_secs(10)) {
            Ok(r) if r.contains(name) => {}
            Ok(r) => side
                .traffic
                .push(format!("host port {port}: wrong reply {r:?}")),
            Err(e) => side.traffic.push(format!("host port {port}: {e}")),
        }
    }
    match fetch(cri, &side.web, &host.addr.ip(), host.addr.port(), 10) {
        Ok(b) if b == "host-ok" => {}
        Ok(b) => side.traffic.push(format!("pod to host: wrong reply {b:?}")),
        Err(e) => side.traffic.push(format!("pod to host: {e}")),
    }
}

/// `from` fetches from each of `to`'s addresses, recorded in `from`.
fn pod_traffic(cri: &Cri, from: &mut Side, to: &Side, to_name: &str) {
    for ip in &to.ips {
        match fetch(cri, &from.web, ip, PORT, 10) {
            Ok(b) if b == to_name => {}
            Ok(b) => from
                .traffic
                .push(format!("to pod {to_name} at {ip}: wrong reply {b:?}")),
            Err(e) => from.traffic.push(format!("to pod {to_name}: {e}")),
        }
    }
}

/// The bandwidth row's rate and burst, in bits, as the plugin takes them.
/// Slow enough for a guest under emulation to fill; 4 MiB takes about four
/// seconds at it, so the burst is under 1% of a transfer.
const SHAPED_RATE: u64 = 8_000_000;
const SHAPED_BURST: u64 = 262_144;
const SHAPED_BYTES: usize = 4 << 20;

/// How far husk's shaped rates may be from runc's, as a fraction of runc's.
const SHAPING_TOLERANCE: f64 = 0.2;

/// Times [`SHAPED_BYTES`] into the pod and out of it, between the host
/// (at `host`) and busybox `nc` in container `id`; the clock is the host's.
fn shaped_rates(cri: &Cri, id: &str, host: IpAddr) -> Result<Rates, String> {
    Ok(Rates {
        ingress: timed_transfer(cri, id, host, true)?,
        egress: timed_transfer(cri, id, host, false)?,
    })
}

/// One transfer of [`SHAPED_BYTES`]; its rate in bits/s. Into the pod: the
/// host writes, half-closes and waits for the pod's `nc` to close, which it
/// does once it has read everything. Out of it: from the first byte the host
/// reads to the last.
fn timed_transfer(cri: &Cri, id: &str, host: IpAddr, into_pod: bool) -> Result<f64, String> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind((host, 0))
        .map_err(|e| format!("binding a host listener to {host}: {e}"))?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let server = std::thread::spawn(move || -> Result<(usize, Duration), String> {
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut s = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(format!("the pod never connected: {e}")),
            }
        };
        let io = |e: std::io::Error| e.to_string();
        s.set_nonblocking(false).map_err(io)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(io)?;
        s.set_write_timeout(Some(Duration::from_secs(60)))
            .map_err(io)?;
        let mut buf = vec![0u8; 64 << 10];
        if into_pod {
            let began = std::time::Instant::now();
            s.write_all(&vec![0u8; SHAPED_BYTES]).map_err(io)?;
            s.shutdown(std::net::Shutdown::Write).map_err(io)?;
            while s.read(&mut buf).map_err(io)? > 0 {}
            return Ok((SHAPED_BYTES, began.elapsed()));
        }
        let mut total = s.read(&mut buf).map_err(io)?;
        let began = std::time::Instant::now();
        loop {
            match s.read(&mut buf).map_err(io)? {
                0 => return Ok((total, began.elapsed())),
                n => total += n,
            }
        }
    });
    let cmd = if into_pod {
        format!("nc {host} {port} </dev/null | wc -c")
    } else {
        format!("head -c {SHAPED_BYTES} /dev/zero | nc {host} {port}")
    };
    let direction = if into_pod { "into" } else { "out of" };
    let ran = cri.exec_sync(id, &["sh", "-c", &cmd], 120);
    let served = server
        .join()
        .map_err(|_| "the host side of the transfer panicked".to_owned())?;
    let r = ran.map_err(|e| format!("exec in {id}: {e}"))?;
    let (bytes, took) = served.map_err(|e| format!("{direction} the pod: {e}"))?;
    let got = if into_pod {
        r.stdout.trim().parse().ok()
    } else {
        Some(bytes)
    };
    if r.exit_code != 0 || got != Some(SHAPED_BYTES) {
        return Err(format!(
            "{direction} the pod: exit {}, {:?} of {SHAPED_BYTES} bytes arrived ({:?})",
            r.exit_code, got, r.stderr
        ));
    }
    Ok(bytes as f64 * 8.0 / took.as_secs_f64())
}

/// Failures of a shaped row: runc's rates must show the shaping (between
/// half and 1.5 times the configured rate, or the case is broken: unshaped,
/// a veth moves Gbit/s), and
/// husk's must be within [`SHAPING_TOLERANCE`] of runc's.
fn shaping_failures(name: &str, rate: u64, runc: &Side, husk: &Side) -> Vec<String> {
    let (Some(r), Some(h)) = (&runc.rates, &husk.rates) else {
        return Vec::new();
    };
    let (r, h) = match (r, h) {
        (Ok(r), Ok(h)) => (r, h),
        (r, h) => {
            return [("runc", r), ("husk", h)]
                .into_iter()
                .filter_map(|(who, x)| x.as_ref().err().map(|e| format!("{name}: {who}: {e}")))
                .collect()
        }
    };
    let mbit = |x: f64| x / 1e6;
    eprintln!(
        "{name}: configured {:.2} Mbit/s; into the pod runc {:.2}, husk {:.2}; out of it runc {:.2}, husk {:.2}",
        mbit(rate as f64),
        mbit(r.ingress),
        mbit(h.ingress),
        mbit(r.egress),
        mbit(h.egress)
    );
    let mut failures = Vec::new();
    for (direction, rv, hv) in [
        ("into the pod", r.ingress, h.ingress),
        ("out of the pod", r.egress, h.egress),
    ] {
        let ratio = rv / rate as f64;
        if !(0.5..=1.5).contains(&ratio) {
            failures.push(format!(
                "{name}: runc's pod got {:.2} Mbit/s {direction} where {:.2} is configured: the shaping is not in effect (the case is broken)",
                mbit(rv),
                mbit(rate as f64)
            ));
        }
        if (hv - rv).abs() > SHAPING_TOLERANCE * rv {
            failures.push(format!(
                "{name}: husk's pod got {:.2} Mbit/s {direction}, runc's {:.2} (more than {:.0}% apart)",
                mbit(hv),
                mbit(rv),
                SHAPING_TOLERANCE * 100.0
            ));
        }
    }
    failures
}

fn remove(cri: &Cri, side: &Side) {
    if !side.pod.is_empty() {
        cri.stop_pod(&side.pod).expect("StopPodSandbox");
        cri.remove_pod(&side.pod).expect("RemovePodSandbox");
    }
}

/// A cell of the table: what one side did.
fn cell(side: &Side, equal: Option<bool>) -> String {
    let starts = if side.failed.is_none() { "yes" } else { "NO" };
    let state = match equal {
        None => "-",
        Some(true) => "equal",
        Some(false) => "DIFFERS",
    };
    let traffic = if side.failed.is_some() {
        "-"
    } else if side.traffic.is_empty() {
        "works"
    } else {
        "FAILS"
    };
    match &side.rates {
        Some(Ok(r)) => format!(
            "{starts} / {state} / {traffic}, {:.2} Mbit/s in, {:.2} out",
            r.ingress / 1e6,
            r.egress / 1e6
        ),
        Some(Err(_)) => format!("{starts} / {state} / {traffic}, shaping NOT MEASURED"),
        None => format!("{starts} / {state} / {traffic}"),
    }
}

#[test]
#[ignore = "end-to-end: root, runc, CNI plugins and guests (make test)"]
fn every_cni_configuration_gives_a_husk_pod_the_network_a_runc_pod_gets() {
    e2e();
    let _vm = vm_lock();
    let rows = rows();
    let mut ctd = Containerd::start_with_cni(&cni_conflist(&rows[0].plugins, ""));
    let mut failures = Vec::new();
    let mut table = vec![
        "| CNI configuration | runc: starts / state / traffic | husk: starts / state / traffic |"
            .to_owned(),
        "|---|---|---|".to_owned(),
    ];
    // HUSK_CNI_ROW=<part of a row's name> runs only the rows it names.
    let only = std::env::var("HUSK_CNI_ROW").ok();
    for (i, row) in rows.iter().enumerate() {
        if only
            .as_ref()
            .is_some_and(|o| !row.name.contains(o.as_str()))
        {
            continue;
        }
        if let Some(kind) = row.needs.filter(|k| !host_has_link_type(k)) {
            eprintln!(
                "{}: NOT RUN: this host's kernel has no {kind} links, so runc cannot run it",
                row.name
            );
            table.push(format!(
                "| {} | not run: the host kernel has no {kind} | not run |",
                row.name
            ));
            continue;
        }
        eprintln!("{}: ...", row.name);
        let began = std::time::Instant::now();
        for cmd in &row.setup {
            ip(cmd);
        }
        if i > 0 {
            ctd.set_cni(&cni_conflist(&row.plugins, ""));
        }
        let cri = ctd.cri();
        let (rname, hname) = (format!("cm{i}-runc"), format!("cm{i}-husk"));
        // Host ports free now, one per pod (both listeners held at once,
        // so the two differ).
        let (runc_port, husk_port) = if row.host_ports {
            let free = || std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
            let (a, b) = (free(), free());
            let port = |l: &std::net::TcpListener| l.local_addr().expect("addr").port();
            (Some(port(&a)), Some(port(&b)))
        } else {
            (None, None)
        };
        let mut runc = start(&cri, &ctd, &rname, "runc", runc_port);
        let host_ip: IpAddr = row.host.parse().expect("host address");
        let mut husk;
        if row.one_at_a_time {
            if runc.failed.is_none() {
                let server = HostServer::start(host_ip);
                host_traffic(&cri, &mut runc, &rname, &server);
            }
            remove(&cri, &runc);
            husk = start(&cri, &ctd, &hname, "husk", husk_port);
            if husk.failed.is_none() {
                let server = HostServer::start(host_ip);
                host_traffic(&cri, &mut husk, &hname, &server);
            }
            remove(&cri, &husk);
        } else {
            husk = start(&cri, &ctd, &hname, "husk", husk_port);
            if runc.failed.is_none() && husk.failed.is_none() {
                let server = HostServer::start(host_ip);
                host_traffic(&cri, &mut runc, &rname, &server);
                host_traffic(&cri, &mut husk, &hname, &server);
                pod_traffic(&cri, &mut runc, &husk, &hname);
                pod_traffic(&cri, &mut husk, &runc, &rname);
                if row.shaped.is_some() {
                    runc.rates = Some(shaped_rates(&cri, &runc.web, host_ip));
                    husk.rates = Some(shaped_rates(&cri, &husk.web, host_ip));
                }
            }
            remove(&cri, &runc);
            remove(&cri, &husk);
        }
        let mut equal = None;
        if let Some(e) = &runc.failed {
            failures.push(format!(
                "{}: the runc pod (the oracle) failed: {e}",
                row.name
            ));
        }
        if let Some(e) = &husk.failed {
            failures.push(format!(
                "{}: the husk pod failed where runc's started: {e}",
                row.name
            ));
        }
        if !runc.traffic.is_empty() {
            failures.push(format!(
                "{}: traffic fails on runc (the case is broken): {:?}",
                row.name, runc.traffic
            ));
        }
        if !husk.traffic.is_empty() {
            failures.push(format!(
                "{}: traffic that works on runc fails on husk: {:?}",
                row.name, husk.traffic
            ));
        }
        if let Some(rate) = row.shaped {
            failures.extend(shaping_failures(row.name, rate, &runc, &husk));
        }
        if let (Some(r), Some(h)) = (&mut runc.state, &mut husk.state) {
            let one_sided = drop_one_sided_sysctls(r, h);
            drop_queueless_txqlen(r, h);
            let diff = differences(r, h, &[]);
            equal = Some(diff.is_empty());
            if !diff.is_empty() {
                failures.push(format!(
                    "{}: the husk pod's network differs from the runc pod's in {} field(s):\n  {}",
                    row.name,
                    diff.len(),
                    diff.join("\n  ")
                ));
            }
            eprintln!(
                "{}: {} fields compared; {} sysctls only one kernel has; {:.1} s",
                row.name,
                r.0.len(),
                one_sided.len(),
                began.elapsed().as_secs_f64()
            );
            if i == 0 {
                eprintln!("  sysctls only one kernel has: {}", one_sided.join(" "));
            }
        }
        table.push(format!(
            "| {} | {} | {} |",
            row.name,
            cell(&runc, equal.map(|_| true)),
            cell(&husk, equal)
        ));
        for dev in &row.remove {
            let _ = Command::new("ip").args(["link", "del", dev]).status();
        }
    }
    eprintln!("{}", table.join("\n"));
    drop(ctd);
    assert_clean();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
