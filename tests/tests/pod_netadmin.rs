//! Pods that program their own network namespace, each case on runc first
//! and then on husk, in one containerd (the test's bridge network):
//! - a service mesh's init container (NET_ADMIN, NET_RAW) programs the
//!   pod's nat table with Debian's iptables as istio-init does (inbound
//!   port 80 redirected to 15001, with the owner, multiport, comment,
//!   conntrack and mark matches, IPv4 and IPv6; iptables-legacy too); a
//!   server on 15001 then answers clients that connect to port 80 from
//!   the host and from the other pod, and `iptables-save` shows the same
//!   rules;
//! - a container with NET_ADMIN (and /dev/net/tun) makes a bridge (with
//!   `ip` and with `brctl`), a veth pair enslaved to it, tun and tap
//!   devices, a VLAN, a VXLAN, a dummy and a macvlan device.
//!
//! Traffic goes only to the pods, on the bridge the test's containerd
//! makes.

use std::net::IpAddr;
use std::time::Duration;

use husk_tests::containerd::{assert_clean, Containerd, IMAGE};
use husk_tests::cri::{container, with_caps, Cri, PodOpts};
use husk_tests::differential::{differences, Observation};
use husk_tests::netstate::{fetch, http_get, wait_listening};
use husk_tests::{e2e, vm_lock};
use k8s_cri::v1::{ContainerConfig, Device};

const IP: &str = "/opt/iproute2/ip";

/// `c` with capabilities `caps` added (and, with `tun`, /dev/net/tun
/// mapped in, as a device plugin would).
fn netadmin(c: ContainerConfig, caps: &[&str], tun: bool) -> ContainerConfig {
    let mut c = with_caps(c, caps);
    if tun {
        c.devices.push(Device {
            container_path: "/dev/net/tun".into(),
            host_path: "/dev/net/tun".into(),
            permissions: "rwm".into(),
        });
    }
    c
}

/// istio-init's shape of rules: inbound TCP to port 80 redirected to
/// 15001, the proxy's own traffic (uid 1337) and loopback left alone,
/// established connections marked; the same inbound redirect for IPv6;
/// and a rule through iptables-legacy, as linkerd-init may use.
const MESH_INIT: &str = r#"set -e
iptables -t nat -N ISTIO_REDIRECT
iptables -t nat -A ISTIO_REDIRECT -p tcp -m comment --comment "husk mesh" -j REDIRECT --to-ports 15001
iptables -t nat -N ISTIO_INBOUND
iptables -t nat -A PREROUTING -p tcp -j ISTIO_INBOUND
iptables -t nat -A ISTIO_INBOUND -p tcp -m multiport --dports 80,8081 -j ISTIO_REDIRECT
iptables -t nat -N ISTIO_OUTPUT
iptables -t nat -A OUTPUT -p tcp -j ISTIO_OUTPUT
iptables -t nat -A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
iptables -t nat -A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
iptables -t mangle -A PREROUTING -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j MARK --set-xmark 0x539/0xffffffff
iptables -t filter -A INPUT -p tcp -m state --state INVALID -j DROP
ip6tables -t nat -A PREROUTING -p tcp --dport 80 -j REDIRECT --to-ports 15001
iptables-legacy -t nat -A OUTPUT -p tcp -m owner --uid-owner 1338 -j RETURN
"#;

/// The pod's rules as `iptables-save` prints them, without its comment
/// lines and counters (they count this pod's own packets).
const SAVE: &str = r#"for t in iptables-save ip6tables-save iptables-legacy-save; do
  echo "== $t"; $t | grep -v '^#' | sed 's/\[[0-9]*:[0-9]*\]//'
done"#;

struct MeshPod {
    pod: String,
    app: String,
    ip: IpAddr,
    init_exit: Option<i32>,
    rules: String,
}

fn mesh_pod(cri: &Cri, ctd: &Containerd, name: &str, handler: &str) -> MeshPod {
    let mut opts = PodOpts::new(name, &ctd.dir.path().join(format!("logs-{name}")));
    opts.handler = handler.to_owned();
    let pod = cri
        .run_pod(&opts)
        .unwrap_or_else(|e| panic!("RunPodSandbox {name} on {handler}: {e}"));
    let init = cri
        .run_container(
            &pod,
            &opts,
            netadmin(
                container("mesh-init", IMAGE, &["sh", "-c", MESH_INIT], false),
                &["NET_ADMIN", "NET_RAW"],
                false,
            ),
        )
        .unwrap_or_else(|e| panic!("init container of {name}: {e}"));
    let init_exit = cri.wait_exited(&init, Duration::from_secs(120));
    if init_exit != Some(0) {
        let log =
            std::fs::read_to_string(ctd.dir.path().join(format!("logs-{name}/mesh-init.log")))
                .unwrap_or_default();
        eprintln!("{name}: the init container exited {init_exit:?}: {log}");
    }
    let script =
        format!("mkdir -p /w && echo mesh-{name} > /w/index.html && exec httpd -f -p 15001 -h /w");
    let app = cri
        .run_container(
            &pod,
            &opts,
            netadmin(
                container("app", IMAGE, &["sh", "-c", &script], false),
                &["NET_ADMIN", "NET_RAW"],
                false,
            ),
        )
        .unwrap_or_else(|e| panic!("app container of {name}: {e}"));
    wait_listening(cri, &app, 15001);
    let rules = cri.sh(&app, SAVE, 60);
    let ip = cri
        .pod_status(&pod)
        .expect("PodSandboxStatus")
        .network
        .expect("pod network")
        .ip
        .parse()
        .expect("pod IP");
    MeshPod {
        pod,
        app,
        ip,
        init_exit,
        rules,
    }
}

#[test]
#[ignore = "end-to-end: root, runc, iptables and guests (make test)"]
fn a_mesh_init_container_redirects_the_pods_port_80_as_under_runc() {
    e2e();
    let _vm = vm_lock();
    let ctd = Containerd::start();
    let cri = ctd.cri();
    let runc = mesh_pod(&cri, &ctd, "mesh-runc", "runc");
    let husk = mesh_pod(&cri, &ctd, "mesh-husk", "husk");
    let mut failures = Vec::new();
    assert_eq!(
        runc.init_exit,
        Some(0),
        "runc's init container (the oracle) failed"
    );
    if husk.init_exit != Some(0) {
        failures.push(format!("husk's init container exited {:?}", husk.init_exit));
    }
    let rules = |p: &MeshPod| Observation([("rules".to_owned(), p.rules.clone())].into());
    for d in differences(&rules(&runc), &rules(&husk), &[]) {
        failures.push(format!("iptables-save differs: {d}"));
    }
    let observe = |p: &MeshPod, other: &MeshPod| {
        let mut o = Observation::default();
        let host = http_get(&p.ip, 80, Duration::from_secs(10)).map(|r| {
            r.split("\r\n\r\n")
                .nth(1)
                .unwrap_or_default()
                .trim()
                .to_owned()
        });
        o.0.insert("host to pod:80".into(), format!("{host:?}"));
        let pod = fetch(&cri, &other.app, &p.ip, 80, 10);
        o.0.insert("other pod to pod:80".into(), format!("{pod:?}"));
        o
    };
    let (r, h) = (observe(&runc, &husk), observe(&husk, &runc));
    assert_eq!(
        r.get("host to pod:80"),
        Some(r#"Ok("mesh-mesh-runc")"#),
        "on runc the redirect works: {r:?}"
    );
    let h_norm = Observation(
        h.0.iter()
            .map(|(k, v)| (k.clone(), v.replace("mesh-husk", "mesh-runc")))
            .collect(),
    );
    for d in differences(&r, &h_norm, &[]) {
        failures.push(format!("traffic differs: {d}"));
    }
    for p in [&runc, &husk] {
        cri.stop_pod(&p.pod).expect("StopPodSandbox");
        cri.remove_pod(&p.pod).expect("RemovePodSandbox");
    }
    drop(ctd);
    assert_clean();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Each device kind: the command that makes it, then the name to show.
const DEVICES: &[(&str, &str, &str)] = &[
    ("bridge", "$IP link add hb0 type bridge && $IP link set hb0 up", "hb0"),
    ("brctl", "brctl addbr hb1", "hb1"),
    (
        "veth",
        "$IP link add hv0 type veth peer name hv1 && $IP link set hv1 master hb0 && $IP link set hv1 up",
        "hv0",
    ),
    ("tap", "$IP tuntap add dev ht0 mode tap", "ht0"),
    ("tun", "$IP tuntap add dev ht1 mode tun", "ht1"),
    ("vlan", "$IP link add link eth0 name eth0.7 type vlan id 7", "eth0.7"),
    (
        "vxlan",
        "$IP link add hx0 type vxlan id 42 dstport 4789 dev eth0",
        "hx0",
    ),
    ("dummy", "$IP link add hd0 type dummy", "hd0"),
    (
        "macvlan",
        "$IP link add hm0 link eth0 type macvlan mode bridge",
        "hm0",
    ),
];

/// What making each device kind gives in container `id`: the exit status
/// and the kind the kernel reports (`kind.<name>`), and the error, apart
/// (`error.<name>`: its wording is the kernel's and iproute2's).
fn devices(cri: &Cri, id: &str) -> Observation {
    let mut o = Observation::default();
    for (kind, make, name) in DEVICES {
        let cmd = format!(
            "IP={IP}; {make} 2>/tmp/err; s=$?; k=$($IP -d -o link show {name} 2>/dev/null | grep -o '{kind_word} ' | head -1); echo \"exit $s ${{k% }}\"; cat /tmp/err",
            kind_word = match *kind {
                "brctl" => "bridge",
                "tap" | "tun" => "tun",
                k => k,
            }
        );
        let r = cri
            .exec_sync(id, &["sh", "-c", &cmd], 60)
            .unwrap_or_else(|e| panic!("exec in {id}: {e}"));
        let mut lines = r.stdout.lines();
        o.0.insert(
            format!("kind.{kind}"),
            lines.next().unwrap_or_default().trim().to_owned(),
        );
        o.0.insert(format!("error.{kind}"), lines.collect::<Vec<_>>().join(" "));
    }
    o
}

#[test]
#[ignore = "end-to-end: root, runc and guests (make test)"]
fn a_pod_makes_bridges_veths_taps_vlans_and_vxlans_as_under_runc() {
    e2e();
    let _vm = vm_lock();
    let ctd = Containerd::start();
    let cri = ctd.cri();
    let mut seen = Vec::new();
    for (name, handler) in [("dev-runc", "runc"), ("dev-husk", "husk")] {
        let mut opts = PodOpts::new(name, &ctd.dir.path().join(format!("logs-{name}")));
        opts.handler = handler.to_owned();
        let pod = cri
            .run_pod(&opts)
            .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e}"));
        let c = cri
            .run_container(
                &pod,
                &opts,
                netadmin(
                    container("net", IMAGE, &["sleep", "600"], false),
                    &["NET_ADMIN"],
                    true,
                ),
            )
            .unwrap_or_else(|e| panic!("container of {name}: {e}"));
        seen.push((pod, devices(&cri, &c)));
    }
    let (runc, husk) = (&seen[0].1, &seen[1].1);
    let mut failures = Vec::new();
    for (kind, _, _) in DEVICES {
        let key = format!("kind.{kind}");
        let (r, h) = (runc.get(&key).unwrap_or(""), husk.get(&key).unwrap_or(""));
        let err = |o: &Observation| o.get(&format!("error.{kind}")).unwrap_or("").to_owned();
        if r.starts_with("exit 0") {
            if r != h {
                failures.push(format!("{kind}: runc {r:?}, husk {h:?} ({})", err(husk)));
            }
        } else if !h.starts_with("exit 0") {
            // runc failed too: the host's kernel lacks the kind (this
            // host has no dummy, VLAN or ipvlan). A node that has it runs
            // it under runc, so husk must.
            failures.push(format!(
                "{kind}: fails on husk ({h:?}: {}) and on runc ({r:?}: {})",
                err(husk),
                err(runc)
            ));
        } else {
            eprintln!(
                "{kind}: runc fails on this host's kernel ({r:?}: {}); husk: {h:?}",
                err(runc)
            );
        }
    }
    for (pod, _) in &seen {
        cri.stop_pod(pod).expect("StopPodSandbox");
        cri.remove_pod(pod).expect("RemovePodSandbox");
    }
    drop(ctd);
    assert_clean();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
