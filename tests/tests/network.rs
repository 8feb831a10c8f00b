//! Pod networking's host side against real network namespaces: a CNI-style
//! veth in a "pod" namespace gets a tap with tc redirects both ways; frames
//! sent to the pod's address arrive on the tap's queue, frames written to
//! the queue leave through the veth, and nothing is left after detach or
//! after a crash's cleanup. Traffic only between the two namespaces the
//! test makes (10.250.77.0/24).

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use husk_runtime::host::network::{cleanup, PodNetwork};
use husk_tests::e2e;

const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 77, 2);
const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 77, 1);
/// IFF_VNET_HDR's default header: struct virtio_net_hdr.
const VNET_HDR: usize = 10;

/// Runs `ip` (test setup only; husk's code uses netlink).
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace of the test's own, removed on drop.
struct Netns(String);

impl Netns {
    fn new(name: &str) -> Self {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        ip(&["netns", "add", name]);
        ip(&["-n", name, "link", "set", "lo", "up"]);
        Netns(name.to_owned())
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.0)
    }

    /// Runs `f` on a thread inside this namespace.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let ns = File::open(self.path()).expect("open netns");
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("netns thread")
        })
    }

    fn link_json(&self, name: &str) -> Option<serde_json::Value> {
        let out = Command::new("ip")
            .args(["-n", &self.0, "-j", "link", "show", name])
            .output()
            .expect("ip link show");
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| v.get(0).cloned())
    }

    fn ingress(&self, dev: &str) -> String {
        let out = Command::new("tc")
            .args(["-n", &self.0, "qdisc", "show", "dev", dev, "ingress"])
            .output()
            .expect("tc");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn mac_bytes(s: &str) -> Vec<u8> {
    s.split(':')
        .map(|b| u8::from_str_radix(b, 16).expect("mac"))
        .collect()
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet frame with an IPv4 UDP datagram (UDP checksum 0: none).
fn udp_frame(
    dst_mac: &[u8],
    src_mac: &[u8],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(dst_mac);
    f.extend_from_slice(src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut iph = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    iph[2..4].copy_from_slice(&total.to_be_bytes());
    iph.extend_from_slice(&src.ip().octets());
    iph.extend_from_slice(&dst.ip().octets());
    let sum = checksum(&iph);
    iph[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&iph);
    f.extend_from_slice(&src.port().to_be_bytes());
    f.extend_from_slice(&dst.port().to_be_bytes());
    f.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

/// Reads frames from a tap queue until one satisfies `want`, for up to 5 s.
fn read_until(tap: &mut File, want: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        let mut pfd = libc::pollfd {
            fd: tap.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one pollfd that lives across the call.
        if unsafe { libc::poll(&mut pfd, 1, 200) } <= 0 {
            continue;
        }
        let n = tap.read(&mut buf).expect("read tap");
        if n > VNET_HDR && want(&buf[VNET_HDR..n]) {
            return Some(buf[VNET_HDR..n].to_vec());
        }
    }
    None
}

#[test]
#[ignore = "end-to-end: root and a guest (make test)"]
fn a_pod_links_frames_reach_its_tap_and_back_and_nothing_is_left() {
    e2e();
    let pod = Netns::new("husk-e2e-pod");
    let peer = Netns::new("husk-e2e-peer");
    ip(&[
        "-n",
        "husk-e2e-pod",
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        "peer0",
        "netns",
        "husk-e2e-peer",
    ]);
    ip(&[
        "-n",
        "husk-e2e-pod",
        "link",
        "set",
        "eth0",
        "mtu",
        "1450",
        "up",
    ]);
    ip(&[
        "-n",
        "husk-e2e-pod",
        "addr",
        "add",
        "10.250.77.2/24",
        "dev",
        "eth0",
    ]);
    ip(&[
        "-n",
        "husk-e2e-peer",
        "link",
        "set",
        "peer0",
        "mtu",
        "1450",
        "up",
    ]);
    ip(&[
        "-n",
        "husk-e2e-peer",
        "addr",
        "add",
        "10.250.77.1/24",
        "dev",
        "peer0",
    ]);
    let eth0 = pod.link_json("eth0").expect("eth0");
    let pod_mac = eth0["address"].as_str().expect("eth0 mac").to_owned();
    let peer_mac = peer.link_json("peer0").expect("peer0")["address"]
        .as_str()
        .expect("peer0 mac")
        .to_owned();

    let net = PodNetwork::attach(&pod.path()).expect("attach");
    assert_eq!(
        net.taps().len(),
        1,
        "one CNI link, loopback skipped: {net:?}"
    );
    let tap = &net.taps()[0];
    assert_eq!(tap.link.name, "eth0");
    assert_eq!(tap.link.mac, mac_bytes(&pod_mac));
    assert_eq!(tap.link.mtu, 1450);
    assert!(
        tap.link.addresses.contains(&(POD_IP.into(), 24)),
        "{:?}",
        tap.link.addresses
    );
    let tap_json = pod
        .link_json(&tap.name)
        .expect("the tap exists in the pod's namespace");
    assert_eq!(tap_json["mtu"], 1450, "{tap_json}");
    assert!(
        tap_json["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x == "UP")),
        "{tap_json}"
    );
    for dev in ["eth0", tap.name.as_str()] {
        assert!(
            pod.ingress(dev).contains("ingress"),
            "no ingress qdisc on {dev}"
        );
        let filters = Command::new("tc")
            .args([
                "-n",
                "husk-e2e-pod",
                "filter",
                "show",
                "dev",
                dev,
                "ingress",
            ])
            .output()
            .expect("tc filter");
        let filters = String::from_utf8_lossy(&filters.stdout);
        assert!(
            filters.contains("mirred") && filters.contains("Redirect"),
            "{dev}: {filters}"
        );
    }

    // The peer to the pod's address: the frame leaves through the tap.
    let mut queue = File::from(tap.fd.try_clone().expect("dup tap fd"));
    ip(&[
        "-n",
        "husk-e2e-peer",
        "neigh",
        "add",
        "10.250.77.2",
        "lladdr",
        &pod_mac,
        "dev",
        "peer0",
    ]);
    peer.run(|| {
        let s = UdpSocket::bind((PEER_IP, 0)).expect("bind in peer");
        s.send_to(b"husk-ping", (POD_IP, 7777))
            .expect("send to pod");
    });
    let frame = read_until(&mut queue, |f| {
        f.len() > 42 && f[12..14] == [0x08, 0x00] && f[30..34] == POD_IP.octets()
    })
    .expect("the datagram to the pod never reached the tap");
    assert_eq!(&frame[..6], &mac_bytes(&pod_mac)[..], "destination MAC");
    assert_eq!(&frame[36..38], &7777u16.to_be_bytes(), "UDP port");
    assert!(frame.ends_with(b"husk-ping"), "{frame:?}");

    // What the guest writes to the queue leaves through the veth.
    let received = peer.run(|| {
        let s = UdpSocket::bind((PEER_IP, 7778)).expect("bind in peer");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut out = vec![0u8; VNET_HDR];
        out.extend(udp_frame(
            &mac_bytes(&peer_mac),
            &mac_bytes(&pod_mac),
            SocketAddrV4::new(POD_IP, 7777),
            SocketAddrV4::new(PEER_IP, 7778),
            b"husk-pong",
        ));
        queue.write_all(&out).expect("write to the tap");
        let mut buf = [0u8; 64];
        s.recv_from(&mut buf)
            .map(|(n, from)| (buf[..n].to_vec(), from))
    });
    let (data, from) = received.expect("the guest's datagram never reached the peer");
    assert_eq!(
        (data.as_slice(), from),
        (&b"husk-pong"[..], SocketAddrV4::new(POD_IP, 7777).into())
    );
    drop(queue);

    let tap_name = tap.name.clone();
    net.detach().expect("detach");
    assert!(pod.link_json(&tap_name).is_none(), "tap {tap_name} left");
    assert!(
        !pod.ingress("eth0").contains("ingress"),
        "ingress qdisc left on eth0"
    );

    // A crash: the shim and its VMM die, the tap with them; `delete`'s
    // cleanup removes the redirect the veth kept.
    let net = PodNetwork::attach(&pod.path()).expect("attach again");
    drop(net);
    assert!(
        pod.ingress("eth0").contains("ingress"),
        "the redirect should outlive the tap"
    );
    cleanup(&pod.path()).expect("cleanup");
    assert!(
        !pod.ingress("eth0").contains("ingress"),
        "ingress qdisc left after cleanup"
    );
    assert!(
        !ip(&["-n", "husk-e2e-pod", "link", "show"]).contains("htap"),
        "a tap left after cleanup"
    );
    // A namespace CNI already removed has nothing to clean.
    cleanup(Path::new("/run/netns/husk-e2e-gone")).expect("cleanup of a missing namespace");
}
