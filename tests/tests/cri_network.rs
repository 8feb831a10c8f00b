//! Pod networking through containerd's CRI with Debian's CNI plugins: the
//! CNI link of a pod's host network namespace carried into its VM (tap, tc
//! redirects, virtio-net, the agent's configuration in the pod's guest
//! namespace). Traffic goes only to pod addresses on the bridge this test's
//! containerd made, and to that bridge's own address.

use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use husk_tests::containerd::{
    assert_clean, bridge_plugin, cni_conflist, Containerd, IMAGE, POD_GATEWAY, TEST_BRIDGE,
};
use husk_tests::cri::{container, Cri, PodOpts};
use husk_tests::netstate::{self, wait_listening};
use husk_tests::{e2e, vm_lock};

/// ExecSync that must succeed with exit code 0; returns stdout.
fn sh(cri: &Cri, id: &str, cmd: &str) -> String {
    cri.sh(id, cmd, 120)
}

/// Runs a command on the host; its stdout, or a panic naming it.
fn host(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A pod on `handler` running busybox httpd on port 8080 that serves
/// `index.html` with the pod's name, in container `web`; returns the pod
/// id, the container id and the pod's addresses.
struct WebPod {
    pod: String,
    web: String,
    ips: Vec<IpAddr>,
}

fn web_pod(ctd: &Containerd, cri: &Cri, logs: &Path, name: &str, handler: &str) -> WebPod {
    let mut opts = PodOpts::new(name, logs);
    opts.handler = handler.to_owned();
    let pod = cri
        .run_pod(&opts)
        .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e}\n{}", ctd.log()));
    let script =
        format!("mkdir -p /w && echo {name} > /w/index.html && exec httpd -f -p 8080 -h /w");
    let web = cri
        .run_container(
            &pod,
            &opts,
            container("web", IMAGE, &["sh", "-c", &script], false),
        )
        .unwrap_or_else(|e| panic!("web container of {name}: {e}\n{}", ctd.log()));
    wait_listening(cri, &web, 8080);
    let net = cri
        .pod_status(&pod)
        .expect("PodSandboxStatus")
        .network
        .expect("the pod has a network status");
    let mut ips: Vec<IpAddr> = vec![net.ip.parse().expect("pod IP")];
    ips.extend(
        net.additional_ips
            .iter()
            .map(|p| p.ip.parse::<IpAddr>().expect("additional pod IP")),
    );
    WebPod { pod, web, ips }
}

/// `link/ether <mac>` of `dev` in `ip -o link` output.
fn mac_in(link_show: &str) -> String {
    link_show
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC in {link_show:?}"))
        .to_owned()
}

/// The body of an HTTP GET of `/` from `ip:8080`, from inside container
/// `id`; a failure fails the test.
fn fetch(cri: &Cri, id: &str, ip: &IpAddr) -> String {
    netstate::fetch(cri, id, ip, 8080, 20).unwrap_or_else(|e| panic!("{e}"))
}

/// An HTTP GET of `/` from `ip:8080`, from the host; a failure fails the
/// test.
fn http_get(ip: &IpAddr) -> String {
    netstate::http_get(ip, 8080, Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}"))
}

/// husk's NAT rules in `netns` (`iptables -S` lines), both families.
fn forward_rules(netns: &Path) -> Vec<String> {
    ["iptables", "ip6tables"]
        .iter()
        .flat_map(|tool| {
            let out = Command::new("nsenter")
                .arg(format!("--net={}", netns.display()))
                .args([tool, "-t", "nat", "-S", "OUTPUT"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            out.lines()
                .filter(|l| l.contains("husk-port-forward"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The husk taps, ingress qdiscs and NAT rules left in `netns`, if it
/// still exists.
fn leftovers(netns: &Path) -> Option<String> {
    let name = netns.file_name()?.to_string_lossy().into_owned();
    if !netns.exists() {
        return None;
    }
    let links = host("ip", &["-n", &name, "-o", "link", "show"]);
    let qdiscs = host("tc", &["-n", &name, "qdisc", "show"]);
    let taps: Vec<_> = links.lines().filter(|l| l.contains("htap")).collect();
    let ingress: Vec<_> = qdiscs.lines().filter(|l| l.contains("ingress")).collect();
    let rules = forward_rules(netns);
    (!taps.is_empty() || !ingress.is_empty() || !rules.is_empty())
        .then(|| format!("taps {taps:?} qdiscs {ingress:?} rules {rules:?}"))
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn a_pods_vm_has_its_cni_address_mac_and_routes_and_reaches_pods_host_and_gateway() {
    e2e();
    let _vm = vm_lock();
    let ctd = Containerd::start_with_cni(&cni_conflist(&bridge_plugin(1500, false), ""));
    let cri = ctd.cri();
    let logs = tempfile::tempdir().expect("log dir");
    let a = web_pod(&ctd, &cri, logs.path(), "net-a", "husk");
    let b = web_pod(&ctd, &cri, logs.path(), "net-b", "husk");
    let (ip_a, ip_b) = (a.ips[0], b.ips[0]);
    let netns_a = cri.pod_netns(&a.pod).expect("pod a's netns");
    let ns_name = netns_a.file_name().unwrap().to_string_lossy().into_owned();

    // The guest's eth0 has the CNI address, the veth's MAC and MTU, and the
    // default route CNI added.
    let guest_addr = sh(&cri, &a.web, "ip -o addr show eth0");
    assert!(
        guest_addr.contains(&format!(" {ip_a}/24")),
        "guest eth0: {guest_addr}"
    );
    let veth = host("ip", &["-n", &ns_name, "-o", "link", "show", "eth0"]);
    let guest_link = sh(&cri, &a.web, "ip -o link show eth0");
    assert_eq!(
        mac_in(&guest_link),
        mac_in(&veth),
        "guest {guest_link} veth {veth}\nguest links: {}\nhost links: {}",
        sh(&cri, &a.web, "ip -o link"),
        host("ip", &["-n", &ns_name, "-o", "link", "show"])
    );
    assert!(guest_link.contains("mtu 1500"), "{guest_link}");
    let routes = sh(&cri, &a.web, "ip route");
    assert!(
        routes.contains(&format!("default via {POD_GATEWAY} dev eth0")),
        "guest routes: {routes}"
    );
    assert!(
        routes.contains("10.244.77.0/24 dev eth0"),
        "guest routes: {routes}"
    );
    // The host side: a tap in the pod's namespace, redirects on both.
    let links = host("ip", &["-n", &ns_name, "-o", "link", "show"]);
    assert!(links.contains("htap"), "no tap in {ns_name}: {links}");

    // Pod to pod, both ways, over TCP.
    let got = fetch(&cri, &a.web, &ip_b);
    assert_eq!(got.trim(), "net-b");
    let got = fetch(&cri, &b.web, &ip_a);
    assert_eq!(got.trim(), "net-a");
    // Host to pod.
    let got = http_get(&ip_a);
    assert!(got.ends_with("net-a\n"), "host GET: {got:?}");
    // Pod to the bridge's gateway address.
    sh(&cri, &a.web, &format!("ping -c 2 -W 5 {POD_GATEWAY}"));
    // The guest's resolv.conf is the pod's.
    let resolv = sh(&cri, &a.web, "cat /etc/resolv.conf");
    assert!(resolv.contains("nameserver 10.96.0.10"), "{resolv}");

    // A runc pod on the same bridge talks to the husk pod and back.
    let r = web_pod(&ctd, &cri, logs.path(), "net-r", "runc");
    let got = fetch(&cri, &r.web, &ip_a);
    assert_eq!(got.trim(), "net-a");
    let got = fetch(&cri, &a.web, &r.ips[0]);
    assert_eq!(got.trim(), "net-r");

    for p in [&a.pod, &b.pod, &r.pod] {
        cri.stop_pod(p).expect("StopPodSandbox");
        // Between stop and remove the namespace is still there: husk's
        // part of it must be gone already.
        if p == &a.pod {
            assert_eq!(leftovers(&netns_a), None, "after StopPodSandbox");
        }
        cri.remove_pod(p).expect("RemovePodSandbox");
    }
    assert!(!netns_a.exists(), "{} left", netns_a.display());
    assert_clean();
    let bridge = host("ip", &["-o", "link", "show", TEST_BRIDGE]);
    assert!(!bridge.contains("htap"), "{bridge}");
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn with_cni_mtu_1450_full_size_frames_pass_and_50_mib_arrive_intact() {
    e2e();
    let _vm = vm_lock();
    let ctd = Containerd::start_with_cni(&cni_conflist(&bridge_plugin(1450, false), ""));
    let cri = ctd.cri();
    let logs = tempfile::tempdir().expect("log dir");
    let a = web_pod(&ctd, &cri, logs.path(), "mtu-a", "husk");
    let b = web_pod(&ctd, &cri, logs.path(), "mtu-b", "husk");
    let link = sh(&cri, &a.web, "ip -o link show eth0");
    assert!(link.contains("mtu 1450"), "guest eth0: {link}");
    // 1400 and 1422 bytes of payload: 1428- and 1450-byte IP packets, the
    // second exactly the MTU. (busybox ping has no -M: a packet over the
    // MTU would be fragmented, not refused, so the sizes are exact.)
    for size in [1400, 1422] {
        sh(
            &cri,
            &a.web,
            &format!("ping -c 2 -W 10 -s {size} {}", b.ips[0]),
        );
    }
    // 50 MiB from b's web server to a, hashed on both sides.
    let want = sh(
        &cri,
        &b.web,
        "head -c 52428800 /dev/urandom > /w/blob && sha256sum /w/blob",
    );
    let want = want.split_whitespace().next().expect("sha256").to_owned();
    let got = sh(
        &cri,
        &a.web,
        &format!(
            "printf 'GET /blob HTTP/1.0\\r\\n\\r\\n' | nc -w 60 {} 8080 | tail -c 52428800 | sha256sum",
            b.ips[0]
        ),
    );
    assert_eq!(got.split_whitespace().next(), Some(want.as_str()));
    for p in [&a.pod, &b.pod] {
        cri.stop_pod(p).expect("StopPodSandbox");
        cri.remove_pod(p).expect("RemovePodSandbox");
    }
    assert_clean();
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn dual_stack_pods_talk_over_ipv6() {
    e2e();
    let _vm = vm_lock();
    let ctd = Containerd::start_with_cni(&cni_conflist(&bridge_plugin(1500, true), ""));
    let cri = ctd.cri();
    let logs = tempfile::tempdir().expect("log dir");
    let a = web_pod(&ctd, &cri, logs.path(), "v6-a", "husk");
    let b = web_pod(&ctd, &cri, logs.path(), "v6-b", "husk");
    let v6 = |p: &WebPod| {
        *p.ips
            .iter()
            .find(|ip| ip.is_ipv6())
            .unwrap_or_else(|| panic!("pod {} has no IPv6 address: {:?}", p.pod, p.ips))
    };
    let (a6, b6) = (v6(&a), v6(&b));
    let addrs = sh(&cri, &a.web, "ip -o -6 addr show eth0");
    assert!(addrs.contains(&format!(" {a6}/64")), "guest eth0: {addrs}");
    let routes = sh(&cri, &a.web, "ip -6 route");
    assert!(
        routes.contains("default via"),
        "guest IPv6 routes: {routes}"
    );
    sh(&cri, &a.web, &format!("ping -c 2 -W 10 {b6}"));
    assert_eq!(fetch(&cri, &a.web, &b6), "v6-b");
    assert_eq!(fetch(&cri, &b.web, &a6), "v6-a");
    // And IPv4 still, on the same NIC.
    assert_eq!(fetch(&cri, &a.web, &b.ips[0]), "v6-b");
    for p in [&a.pod, &b.pod] {
        cri.stop_pod(p).expect("StopPodSandbox");
        cri.remove_pod(p).expect("RemovePodSandbox");
    }
    assert_clean();
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn after_a_shim_is_killed_delete_leaves_the_pods_netns_as_cni_made_it() {
    e2e();
    let _vm = vm_lock();
    let ctd = Containerd::start_with_cni(&cni_conflist(&bridge_plugin(1500, false), ""));
    let cri = ctd.cri();
    let logs = tempfile::tempdir().expect("log dir");
    let a = web_pod(&ctd, &cri, logs.path(), "crash-net", "husk");
    let netns = cri.pod_netns(&a.pod).expect("netns");
    let before = leftovers(&netns).unwrap_or_default();
    assert!(
        before.contains("htap") && before.contains("husk-port-forward"),
        "before the crash: {before}"
    );
    let shims = husk_tests::shims();
    assert_eq!(shims.len(), 1, "{shims:?}");
    // SAFETY: kill(2) on the pod's shim, a process this test started.
    assert_eq!(unsafe { libc::kill(shims[0] as i32, libc::SIGKILL) }, 0);
    // containerd runs the shim's `delete` for the dead shim's tasks.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while leftovers(&netns).is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "left in {} after the crash: {:?}",
            netns.display(),
            leftovers(&netns)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    cri.stop_pod(&a.pod).expect("StopPodSandbox");
    cri.remove_pod(&a.pod).expect("RemovePodSandbox");
    assert!(!netns.exists(), "{} left", netns.display());
    assert_clean();
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn a_host_port_mapping_through_the_portmap_plugin_reaches_the_vm() {
    e2e();
    let _vm = vm_lock();
    let portmap = r#",{"type":"portmap","capabilities":{"portMappings":true}}"#;
    let ctd = Containerd::start_with_cni(&cni_conflist(&bridge_plugin(1500, false), portmap));
    let cri = ctd.cri();
    let logs = tempfile::tempdir().expect("log dir");
    // The host port: one free now on the bridge's address.
    let host_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("probe port");
        l.local_addr().expect("addr").port()
    };
    let mut opts = PodOpts::new("hostport", logs.path());
    opts.port_mappings = vec![k8s_cri::v1::PortMapping {
        protocol: k8s_cri::v1::Protocol::Tcp as i32,
        container_port: 8080,
        host_port: i32::from(host_port),
        host_ip: String::new(),
    }];
    let pod = cri
        .run_pod(&opts)
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", ctd.log()));
    let script = "mkdir -p /w && echo mapped > /w/index.html && exec httpd -f -p 8080 -h /w";
    let web = cri
        .run_container(
            &pod,
            &opts,
            container("web", IMAGE, &["sh", "-c", script], false),
        )
        .expect("web container");
    wait_listening(&cri, &web, 8080);
    // The bridge's own address is a host address: portmap's DNAT for
    // locally made connections sends it to the pod.
    let gateway: IpAddr = POD_GATEWAY.parse().unwrap();
    let addr = std::net::SocketAddr::new(gateway, host_port);
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("connecting to host port {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut got = String::new();
    s.read_to_string(&mut got).expect("reply");
    assert!(
        got.ends_with("mapped\n"),
        "through host port {host_port}: {got:?}"
    );
    cri.stop_pod(&pod).expect("StopPodSandbox");
    cri.remove_pod(&pod).expect("RemovePodSandbox");
    assert_clean();
    let nat = host("iptables", &["-t", "nat", "-S"]);
    assert!(
        !nat.contains(&format!("--dport {host_port}")),
        "portmap rule left: {nat}"
    );
}

/// The body of an HTTP/1.0 GET of `/` through CRI PortForward to `port` of
/// `pod`.
fn forwarded_get(cri: &Cri, pod: &str, port: u16) -> Result<String, String> {
    let url = cri
        .port_forward(pod, &[i32::from(port)])
        .map_err(|e| format!("PortForward: {e}"))?;
    let got = husk_tests::stream::port_forward(
        &url,
        port,
        b"GET / HTTP/1.0\r\n\r\n",
        Duration::from_secs(60),
        // Until the session ends: the server closes after its reply.
        |_| false,
    )
    .map_err(|e| format!("port-forward session: {e}"))?;
    if !got.error.is_empty() {
        return Err(format!("error channel: {}", got.error));
    }
    let text = String::from_utf8_lossy(&got.data).into_owned();
    Ok(text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .trim()
        .to_owned())
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn port_forward_reaches_servers_on_guest_localhost_v4_and_v6_and_on_the_pod_ip() {
    e2e();
    let _vm = vm_lock();
    let ctd = Containerd::start_with_cni(&cni_conflist(&bridge_plugin(1500, false), ""));
    let cri = ctd.cri();
    let logs = tempfile::tempdir().expect("log dir");
    let a = web_pod(&ctd, &cri, logs.path(), "fwd", "husk");
    let opts = {
        let mut o = PodOpts::new("fwd", logs.path());
        o.handler = "husk".into();
        o
    };
    // Two servers bound to the guest's loopback only.
    let script = "mkdir -p /l4 /l6 && echo lo-v4 > /l4/index.html && echo lo-v6 > /l6/index.html \
                  && httpd -p 127.0.0.1:8081 -h /l4 && exec httpd -f -p '[::1]:8082' -h /l6";
    let lo = cri
        .run_container(
            &a.pod,
            &opts,
            container("lo", IMAGE, &["sh", "-c", script], false),
        )
        .expect("loopback servers");
    wait_listening(&cri, &lo, 8081);
    wait_listening(&cri, &lo, 8082);
    let netns = cri.pod_netns(&a.pod).expect("netns");
    assert_eq!(forward_rules(&netns).len(), 2, "a rule per loopback");
    for (port, want) in [(8081, "lo-v4"), (8082, "lo-v6"), (8080, "fwd")] {
        let got = forwarded_get(&cri, &a.pod, port)
            .unwrap_or_else(|e| panic!("port {port}: {e}\n{}", ctd.log()));
        assert_eq!(got, want, "port {port}");
    }
    // The loopback servers are not on the pod IP: only port-forward
    // reaches them.
    let r = cri
        .exec_sync(
            &a.web,
            &[
                "sh",
                "-c",
                &format!(
                    "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {} 8081",
                    a.ips[0]
                ),
            ],
            60,
        )
        .expect("exec");
    assert!(
        !r.stdout.contains("lo-v4"),
        "8081 answered on the pod IP: {r:?}"
    );
    // Nothing listens on 9: the session ends with nothing, and the pod
    // still forwards after.
    let url = cri.port_forward(&a.pod, &[9]).expect("PortForward 9");
    let none = husk_tests::stream::port_forward(&url, 9, b"x", Duration::from_secs(30), |_| false)
        .expect("session to a closed port");
    assert!(none.data.is_empty(), "{none:?}");
    assert_eq!(forwarded_get(&cri, &a.pod, 8081).expect("after"), "lo-v4");

    cri.stop_pod(&a.pod).expect("StopPodSandbox");
    assert_eq!(leftovers(&netns), None, "after StopPodSandbox");
    cri.remove_pod(&a.pod).expect("RemovePodSandbox");
    assert_clean();
}
