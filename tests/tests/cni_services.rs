//! Services and NetworkPolicy as a node's own rules make them, around a
//! runc pod and a husk pod on the test's bridge network (one containerd,
//! the same pods for every case; each case run on runc's pod and husk's
//! and required to match):
//! - Services in kube-proxy's iptables style: a ClusterIP:80 DNAT to a
//!   pod's 8080 through SERVICES/SVC/SEP chains, with KUBE-MARK-MASQ for
//!   traffic from outside the pod network and for a pod reaching itself
//!   (hairpin), masqueraded in POSTROUTING. Clients: the host, each pod
//!   (a husk pod reaching runc's Service, runc's reaching husk's), and
//!   each pod its own Service. (IPVS style is not run: this host's kernel
//!   has no IP_VS.)
//! - NetworkPolicy as bridge setups without Calico or Cilium enforce it:
//!   host rules (br_netfilter, physdev) that drop TCP to a pod's 8080 from
//!   the other pod, and anti-spoofing on the pod's bridge port (a source
//!   address or MAC that is not the pod's is dropped): a husk guest that
//!   spoofs from inside is dropped as a runc pod is.
//!
//! Rules live in chains of their own (HUSK-T-*), removed at the end.
//! Traffic goes only to the pods, to a ClusterIP that exists only in these
//! rules, and to a server on the bridge's address.

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use husk_tests::containerd::{
    assert_clean, bridge_plugin, cni_conflist, Containerd, POD_GATEWAY, POD_SUBNET,
};
use husk_tests::cri::Cri;
use husk_tests::netstate::{fetch, http_get, HostServer, WebPod, WEB_PORT};
use husk_tests::{e2e, vm_lock};

fn iptables(table: &str, rule: &str) {
    let out = Command::new("iptables")
        .args(["-w", "-t", table])
        .args(rule.split_whitespace())
        .output()
        .expect("run iptables");
    assert!(
        out.status.success(),
        "iptables -t {table} {rule}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Removes the test's chains and the jumps to them (also after a test
/// that failed midway).
fn remove_rules() {
    for (table, hooks) in [
        ("nat", &["PREROUTING", "OUTPUT", "POSTROUTING"][..]),
        ("filter", &["FORWARD", "INPUT"][..]),
    ] {
        let rules = Command::new("iptables")
            .args(["-w", "-t", table, "-S"])
            .output()
            .expect("iptables -S");
        let rules = String::from_utf8_lossy(&rules.stdout).into_owned();
        for hook in hooks {
            for r in rules
                .lines()
                .filter(|l| l.starts_with(&format!("-A {hook} ")) && l.contains("-j HUSK-T-"))
            {
                let del = r.replacen("-A", "-D", 1);
                let _ = Command::new("iptables")
                    .args(["-w", "-t", table])
                    .args(del.split_whitespace())
                    .status();
            }
        }
        // Every chain emptied first, then removed (one may jump to another).
        for action in ["-F", "-X"] {
            for chain in rules
                .lines()
                .filter_map(|l| l.strip_prefix("-N "))
                .filter(|c| c.starts_with("HUSK-T-"))
            {
                let _ = Command::new("iptables")
                    .args(["-w", "-t", table, action, chain])
                    .status();
            }
        }
    }
}

/// Removes the test's rules when dropped, also when the test fails.
struct RulesGuard;

impl Drop for RulesGuard {
    fn drop(&mut self) {
        remove_rules();
    }
}

/// A Service `name` at `cluster_ip`:80 whose one endpoint is `pod`:8080,
/// in kube-proxy's iptables shape.
fn service(name: &str, cluster_ip: &str, pod: &IpAddr) {
    let (svc, sep) = (format!("HUSK-T-SVC-{name}"), format!("HUSK-T-SEP-{name}"));
    iptables("nat", &format!("-N {svc}"));
    iptables("nat", &format!("-N {sep}"));
    iptables(
        "nat",
        &format!("-A HUSK-T-SERVICES -d {cluster_ip}/32 -p tcp -m tcp --dport 80 -j {svc}"),
    );
    iptables(
        "nat",
        &format!(
            "-A {svc} ! -s {POD_SUBNET} -d {cluster_ip}/32 -p tcp -m tcp --dport 80 -j HUSK-T-MARK-MASQ"
        ),
    );
    iptables("nat", &format!("-A {svc} -j {sep}"));
    iptables("nat", &format!("-A {sep} -s {pod}/32 -j HUSK-T-MARK-MASQ"));
    iptables(
        "nat",
        &format!("-A {sep} -p tcp -m tcp -j DNAT --to-destination {pod}:{WEB_PORT}"),
    );
}

fn services_frame() {
    for c in ["HUSK-T-SERVICES", "HUSK-T-MARK-MASQ", "HUSK-T-POSTROUTING"] {
        iptables("nat", &format!("-N {c}"));
    }
    iptables("nat", "-A PREROUTING -j HUSK-T-SERVICES");
    iptables("nat", "-A OUTPUT -j HUSK-T-SERVICES");
    iptables("nat", "-A POSTROUTING -j HUSK-T-POSTROUTING");
    iptables("nat", "-A HUSK-T-MARK-MASQ -j MARK --or-mark 0x4000");
    iptables(
        "nat",
        "-A HUSK-T-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
    );
    iptables("nat", "-A HUSK-T-POSTROUTING -j MARK --xor-mark 0x4000");
    iptables("nat", "-A HUSK-T-POSTROUTING -j MASQUERADE");
}

/// The host side of a pod's veth: the host link whose index the pod's
/// eth0 names as its peer.
fn host_veth(cri: &Cri, pod: &str) -> String {
    let netns = cri.pod_netns(pod).expect("pod netns");
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["ip", "-o", "link", "show", "eth0"])
        .output()
        .expect("ip link in the pod's netns");
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    let peer: u32 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.split("@if").nth(1))
        .and_then(|n| n.trim_end_matches(':').parse().ok())
        .unwrap_or_else(|| panic!("no veth peer in {line:?}"));
    let host = Command::new("ip")
        .args(["-o", "link"])
        .output()
        .expect("ip link");
    String::from_utf8_lossy(&host.stdout)
        .lines()
        .find(|l| l.starts_with(&format!("{peer}: ")))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(|n| {
            n.trim_end_matches(':')
                .split('@')
                .next()
                .unwrap_or(n)
                .to_owned()
        })
        .unwrap_or_else(|| panic!("no host link {peer}"))
}

/// Whether a connection from container `id`, from source address `src`
/// (added to eth0 and made the preferred source towards `to`: busybox nc
/// cannot bind one), reaches `to`.
fn spoofed_reaches(cri: &Cri, id: &str, src: &str, to: &std::net::SocketAddr) -> bool {
    let cmd = format!(
        "ip addr add {src}/32 dev eth0 && ip route add {ip}/32 dev eth0 src {src} && printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {ip} {}; s=$?; ip route del {ip}/32 dev eth0; ip addr del {src}/32 dev eth0; exit $s",
        to.port(),
        ip = to.ip()
    );
    cri.exec_sync(id, &["sh", "-c", &cmd], 60)
        .is_ok_and(|r| r.exit_code == 0 && r.stdout.contains("host-ok"))
}

/// Whether a connection from container `id` with eth0's MAC set to `mac`
/// reaches `to` (the MAC is put back).
fn mac_spoofed_reaches(cri: &Cri, id: &str, mac: &str, to: &std::net::SocketAddr) -> bool {
    let cmd = format!(
        "old=$(cat /sys/class/net/eth0/address); ip link set eth0 address {mac} && printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {} {}; s=$?; ip link set eth0 address $old; exit $s",
        to.ip(),
        to.port()
    );
    cri.exec_sync(id, &["sh", "-c", &cmd], 60)
        .is_ok_and(|r| r.exit_code == 0 && r.stdout.contains("host-ok"))
}

/// Each case's runc result against husk's: a difference is a failure.
fn compare(failures: &mut Vec<String>, runc: Vec<(String, String)>, husk: Vec<(String, String)>) {
    for ((case, r), (_, h)) in runc.into_iter().zip(husk) {
        eprintln!("{case}: runc {r:?}, husk {h:?}");
        if r != h {
            failures.push(format!("{case}: runc {r:?}, husk {h:?}"));
        }
    }
}

#[test]
#[ignore = "end-to-end: root, runc, iptables, br_netfilter and guests (make test)"]
fn services_and_host_side_policy_treat_a_husk_pod_as_a_runc_pod() {
    e2e();
    let _vm = vm_lock();
    remove_rules();
    let _rules = RulesGuard;
    // hairpinMode, as kubenet and bridge-based clusters set it: a pod
    // reaching itself through its Service leaves and re-enters its own
    // bridge port.
    let ctd = Containerd::start_with_cni(&cni_conflist(
        &bridge_plugin(1500, false).replace(
            r#""isGateway":true"#,
            r#""isGateway":true,"hairpinMode":true"#,
        ),
        "",
    ));
    let cri = ctd.cri();
    let caps = ["NET_ADMIN"];
    let runc = WebPod::start(&cri, ctd.dir.path(), "svc-runc", "runc", &caps).expect("runc pod");
    let husk = WebPod::start(&cri, ctd.dir.path(), "svc-husk", "husk", &caps).expect("husk pod");
    let (rip, hip) = (runc.ips[0], husk.ips[0]);
    let mut failures = Vec::new();

    // Services.
    services_frame();
    service("R", "10.96.77.11", &rip);
    service("H", "10.96.77.10", &hip);
    let cluster = |p: &WebPod| -> IpAddr {
        if p.pod == runc.pod {
            "10.96.77.11"
        } else {
            "10.96.77.10"
        }
        .parse()
        .unwrap()
    };
    let body = |r: Result<String, String>| match r {
        Ok(b) => b
            .split("\r\n\r\n")
            .last()
            .unwrap_or_default()
            .trim()
            .replace("svc-husk", "svc-SELF"),
        Err(e) => format!("failed: {}", e.split(':').next().unwrap_or_default()),
    };
    let see = |p: &WebPod, other: &WebPod| -> Vec<(String, String)> {
        let self_name = |s: String| {
            s.replace("svc-runc", "svc-SELF")
                .replace("svc-husk", "svc-SELF")
        };
        vec![
            (
                "the host to the pod's Service".to_owned(),
                self_name(body(http_get(&cluster(p), 80, Duration::from_secs(10)))),
            ),
            (
                "the other pod to the pod's Service".to_owned(),
                self_name(body(fetch(&cri, &other.web, &cluster(p), 80, 10))),
            ),
            (
                "the pod to its own Service (hairpin)".to_owned(),
                self_name(body(fetch(&cri, &p.web, &cluster(p), 80, 10))),
            ),
        ]
    };
    let (r, h) = (see(&runc, &husk), see(&husk, &runc));
    assert!(
        r.iter().all(|(_, v)| v == "svc-SELF"),
        "on runc (the oracle) every Service path works: {r:?}"
    );
    compare(&mut failures, r, h);
    remove_rules();

    // NetworkPolicy: drop TCP to a pod's 8080 from the other pod.
    let server = HostServer::start(POD_GATEWAY.parse().unwrap());
    iptables("filter", "-N HUSK-T-POLICY");
    iptables("filter", "-I FORWARD -j HUSK-T-POLICY");
    iptables("filter", "-I INPUT -j HUSK-T-POLICY");
    for (p, other) in [(&runc, &husk), (&husk, &runc)] {
        let before = fetch(&cri, &other.web, &p.ips[0], WEB_PORT, 5).is_ok();
        iptables(
            "filter",
            &format!(
                "-A HUSK-T-POLICY -s {} -d {} -p tcp --dport {WEB_PORT} -j DROP",
                other.ips[0], p.ips[0]
            ),
        );
        let after = fetch(&cri, &other.web, &p.ips[0], WEB_PORT, 5).is_ok();
        iptables("filter", "-F HUSK-T-POLICY");
        let which = if p.pod == runc.pod { "runc" } else { "husk" };
        eprintln!("policy to the {which} pod: reached before {before}, after {after}");
        if !before || after {
            failures.push(format!(
                "policy to the {which} pod: reached before {before}, after the drop rule {after}"
            ));
        }
    }

    // Anti-spoofing on the pod's bridge port.
    let spoof = |p: &WebPod| -> Vec<(String, String)> {
        let veth = host_veth(&cri, &p.pod);
        let src = "10.244.77.250";
        let free = spoofed_reaches(&cri, &p.web, src, &server.addr);
        let pod_mac = cri
            .sh(&p.web, "cat /sys/class/net/eth0/address", 30)
            .trim()
            .to_owned();
        let mac_free = mac_spoofed_reaches(&cri, &p.web, "02:00:00:00:0e:99", &server.addr);
        iptables(
            "filter",
            &format!(
                "-A HUSK-T-POLICY -m physdev --physdev-in {veth} ! -s {}/32 -j DROP",
                p.ips[0]
            ),
        );
        iptables(
            "filter",
            &format!(
                "-A HUSK-T-POLICY -m physdev --physdev-in {veth} -m mac ! --mac-source {pod_mac} -j DROP"
            ),
        );
        let blocked = spoofed_reaches(&cri, &p.web, src, &server.addr);
        let mac_blocked = mac_spoofed_reaches(&cri, &p.web, "02:00:00:00:0e:99", &server.addr);
        let own = fetch(&cri, &p.web, &server.addr.ip(), server.addr.port(), 5).is_ok();
        iptables("filter", "-F HUSK-T-POLICY");
        vec![
            ("spoofed source, no rule".into(), free.to_string()),
            ("spoofed MAC, no rule".into(), mac_free.to_string()),
            (
                "spoofed source, anti-spoofing rule".into(),
                blocked.to_string(),
            ),
            (
                "spoofed MAC, anti-spoofing rule".into(),
                mac_blocked.to_string(),
            ),
            (
                "own address and MAC, anti-spoofing rule".into(),
                own.to_string(),
            ),
        ]
    };
    let (r, h) = (spoof(&runc), spoof(&husk));
    assert_eq!(
        r.iter().map(|(_, v)| v.as_str()).collect::<Vec<_>>(),
        ["true", "true", "false", "false", "true"],
        "on runc (the oracle) spoofing works without the rules and not with them: {r:?}"
    );
    compare(&mut failures, r, h);
    remove_rules();
    drop(server);
    runc.remove(&cri);
    husk.remove(&cri);
    drop(ctd);
    assert_clean();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
