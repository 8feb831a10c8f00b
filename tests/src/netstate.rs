//! A pod's network as a process in it sees it, for comparing a husk pod
//! with a runc pod on the same CNI configuration: iproute2's JSON view of
//! links and addresses, routes of every table (IPv4 and IPv6), permanent
//! neighbours, policy rules, and the sysctls of `net.ipv4.conf`,
//! `net.ipv6.conf` and the namespace-wide ones CNI plugins write. Taken by
//! the host's own `ip` (in the test image as `/opt/iproute2/ip`) in both
//! pods, so the two views come from one program.
//!
//! Values that are one pod's own (its addresses, its MAC, its IPv6
//! link-local address) become their role (`POD_IP`, `POD_MAC`, `POD_LL`),
//! so two pods on one network compare equal when they are configured alike.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_json::Value;

use crate::cri::Cri;
use crate::differential::Observation;

const IP: &str = "/opt/iproute2/ip";

/// The namespace-wide sysctls compared (the per-link ones are compared
/// whole).
const SYSCTLS: &[&str] = &[
    "net/core/somaxconn",
    "net/ipv4/ip_forward",
    "net/ipv4/ip_local_port_range",
    "net/ipv4/ip_unprivileged_port_start",
    "net/ipv4/ping_group_range",
    "net/ipv4/tcp_syncookies",
];

/// Link fields that are not the network's but the device's: a veth's peer
/// and its netns id, the index, and the queueing discipline (the guest's
/// NIC is a virtio-net device whose transmit qdisc is the guest kernel's
/// default; the pod's traffic is shaped, if at all, on the host's side of
/// the veth, as for runc).
const DEVICE_FIELDS: &[&str] = &[
    "ifindex",
    "link",
    "link_index",
    "link_netnsid",
    "qdisc",
    "altnames",
];

/// The script run in the pod: sections of `ip -j` output and sysctls.
fn script(links: &[&str]) -> String {
    let mut s = format!(
        "echo '#addr'; {IP} -j addr show\n\
         echo '#route4'; {IP} -j -4 route show table all\n\
         echo '#route6'; {IP} -j -6 route show table all\n\
         echo '#neigh'; {IP} -j neigh show nud permanent\n\
         echo '#rule4'; {IP} -j -4 rule show\n\
         echo '#rule6'; {IP} -j -6 rule show\n\
         echo '#sysctl'\n"
    );
    let mut dirs = vec!["all", "default"];
    dirs.extend_from_slice(links);
    // One grep prints `path:value` for every key (a process per key is
    // slow in an emulated guest); an unreadable key is left out.
    let mut paths: Vec<String> = Vec::new();
    for d in dirs {
        for fam in ["ipv4", "ipv6"] {
            paths.push(format!("/proc/sys/net/{fam}/conf/{d}/"));
        }
    }
    paths.extend(SYSCTLS.iter().map(|k| format!("/proc/sys/{k}")));
    s.push_str(&format!(
        "grep -r -H '' {} 2>/dev/null\ntrue\n",
        paths.join(" ")
    ));
    s
}

/// The network state of the pod of container `id`, whose own addresses are
/// `ips`; `links` are the pod's CNI links (eth0).
pub fn observe(cri: &Cri, id: &str, ips: &[IpAddr], links: &[&str]) -> Observation {
    // An IPv6 address is tentative until duplicate address detection ends
    // (a second or two after the link came up): both pods are observed
    // after it, not in the middle of it.
    let settled = format!(
        "for i in $(seq 100); do {IP} -6 addr show tentative | grep -q inet6 || exit 0; sleep 0.1; done; {IP} -6 addr show tentative; exit 1"
    );
    cri.sh(id, &settled, 60);
    let out = cri.sh(id, &script(links), 60);
    let mut sections: BTreeMap<String, String> = BTreeMap::new();
    let mut current = String::new();
    for line in out.lines() {
        if let Some(name) = line.strip_prefix('#') {
            current = name.to_owned();
            continue;
        }
        let s = sections.entry(current.clone()).or_default();
        s.push_str(line);
        s.push('\n');
    }
    let json = |name: &str| -> Value {
        let text = sections.get(name).map(String::as_str).unwrap_or("[]");
        serde_json::from_str(text.trim())
            .unwrap_or_else(|e| panic!("`ip -j` {name} in {id}: {e}: {text}"))
    };
    let addr = json("addr");
    // The pod's own values, found in its view, replaced by their roles.
    let mut own: Vec<(String, String)> = Vec::new();
    for ip in ips {
        let role = if ip.is_ipv4() { "POD_IP" } else { "POD_IP6" };
        own.push((ip.to_string(), role.to_owned()));
    }
    for link in addr.as_array().into_iter().flatten() {
        if link["ifname"] == "lo" {
            continue;
        }
        if let Some(mac) = link["address"].as_str() {
            own.push((mac.to_owned(), "POD_MAC".to_owned()));
        }
        for a in link["addr_info"].as_array().into_iter().flatten() {
            if let Some(l) = a["local"].as_str().filter(|l| l.starts_with("fe80:")) {
                own.push((l.to_owned(), "POD_LL".to_owned()));
            }
        }
    }
    let role = |v: &Value| -> String {
        let s = match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        own.iter()
            .find(|(value, _)| *value == s)
            .map_or(s, |(_, r)| r.clone())
    };
    let mut map = BTreeMap::new();
    for link in addr.as_array().into_iter().flatten() {
        let name = link["ifname"].as_str().unwrap_or("?").to_owned();
        for (k, v) in link.as_object().into_iter().flatten() {
            if DEVICE_FIELDS.contains(&k.as_str()) || k == "addr_info" || k == "ifname" {
                continue;
            }
            map.insert(format!("link.{name}.{k}"), flat(v, &role));
        }
        for a in link["addr_info"].as_array().into_iter().flatten() {
            let mut a = a.clone();
            // The kernel's mark on the addresses it made itself (IFA_PROTO
            // kernel_ll, kernel_lo, kernel_ra) is Linux 6.3's; the guest's
            // kernel (6.1) makes the same addresses without reporting it.
            if a["protocol"]
                .as_str()
                .is_some_and(|p| p.starts_with("kernel_"))
            {
                a.as_object_mut().map(|o| o.remove("protocol"));
            }
            let key = format!("addr.{name}.{}/{}", role(&a["local"]), a["prefixlen"]);
            insert_numbered(&mut map, key, fields(&a, &["local", "prefixlen"], &role));
        }
    }
    for fam in ["route4", "route6"] {
        for r in json(fam).as_array().into_iter().flatten() {
            let key = format!(
                "{fam}.{}.{}.{}.{}.{}",
                r.get("table").map_or("main".to_owned(), &role),
                r.get("type").map_or("unicast".to_owned(), &role),
                role(&r["dst"]),
                r.get("gateway").map_or("-".to_owned(), &role),
                r.get("metric").map_or("0".to_owned(), &role),
            );
            let value = fields(r, &["table", "type", "dst", "gateway", "metric"], &role);
            // Two routes to one prefix (CNI's own beside the kernel's)
            // differ in their other fields: both kept.
            insert_numbered(&mut map, key, value);
        }
    }
    for n in json("neigh").as_array().into_iter().flatten() {
        map.insert(
            format!("neigh.{}.{}", role(&n["dst"]), role(&n["dev"])),
            fields(n, &["dst", "dev"], &role),
        );
    }
    for fam in ["rule4", "rule6"] {
        for r in json(fam).as_array().into_iter().flatten() {
            map.insert(
                format!("{fam}.{}", r["priority"]),
                fields(r, &["priority"], &role),
            );
        }
    }
    for line in sections
        .get("sysctl")
        .map(String::as_str)
        .unwrap_or("")
        .lines()
    {
        let line = line.strip_prefix("/proc/sys/").unwrap_or(line);
        if let Some((k, v)) = line.split_once(':') {
            let v = v.split_whitespace().collect::<Vec<_>>().join(" ");
            map.insert(format!("sysctl.{k}"), v);
        }
    }
    Observation(map)
}

/// `v` as one line, values in their roles, object keys sorted; a finite
/// address lifetime (it counts down) as `finite`.
/// Inserts `value` at `key`, or at `key#2`, `key#3`… when taken: two
/// entries one role names alike (two link-local addresses on a link, two
/// routes to a prefix) are both kept, so a second one is a difference.
fn insert_numbered(map: &mut BTreeMap<String, String>, key: String, value: String) {
    let mut k = key.clone();
    let mut n = 1;
    while map.contains_key(&k) {
        n += 1;
        k = format!("{key}#{n}");
    }
    map.insert(k, value);
}

fn flat(v: &Value, role: &dyn Fn(&Value) -> String) -> String {
    match v {
        Value::Object(o) => {
            let mut parts: Vec<String> = o
                .iter()
                .map(|(k, v)| {
                    let shown = if k.ends_with("life_time") && v.as_u64() != Some(4294967295) {
                        "finite".to_owned()
                    } else {
                        flat(v, role)
                    };
                    format!("{k}={shown}")
                })
                .collect();
            parts.sort();
            format!("{{{}}}", parts.join(" "))
        }
        Value::Array(a) => {
            let parts: Vec<String> = a.iter().map(|x| flat(x, role)).collect();
            format!("[{}]", parts.join(","))
        }
        other => role(other),
    }
}

/// Object `v` without the fields in `skip`, as [`flat`].
fn fields(v: &Value, skip: &[&str], role: &dyn Fn(&Value) -> String) -> String {
    let mut o = v.as_object().cloned().unwrap_or_default();
    for s in skip {
        o.remove(*s);
    }
    flat(&Value::Object(o), role)
}

/// A link with no transmit queue (a veth or macvlan: `txqlen` 0, which
/// iproute2 leaves out) on runc's side is a device property the guest's
/// NIC cannot copy: a virtio-net device transmits through a qdisc, and
/// pfifo_fast refuses a zero-length ring. Those `txqlen` fields are left
/// out of the comparison (a non-zero one is copied and compared); returns
/// the links.
pub fn drop_queueless_txqlen(runc: &mut Observation, husk: &mut Observation) -> Vec<String> {
    let links: Vec<String> = husk
        .0
        .keys()
        .filter_map(|k| k.strip_prefix("link.")?.strip_suffix(".txqlen"))
        .filter(|l| !runc.0.contains_key(&format!("link.{l}.txqlen")))
        .map(str::to_owned)
        .collect();
    for l in &links {
        husk.0.remove(&format!("link.{l}.txqlen"));
    }
    links
}

/// Keys of `a` and `b` that only one has and that are sysctls: a key one
/// kernel has and the other lacks (the host's kernel is not the guest's).
/// Removed from both, and returned so a test can say how many.
pub fn drop_one_sided_sysctls(a: &mut Observation, b: &mut Observation) -> Vec<String> {
    let one_sided: Vec<String> =
        a.0.keys()
            .filter(|k| k.starts_with("sysctl.") && !b.0.contains_key(*k))
            .chain(
                b.0.keys()
                    .filter(|k| k.starts_with("sysctl.") && !a.0.contains_key(*k)),
            )
            .cloned()
            .collect();
    for k in &one_sided {
        a.0.remove(k);
        b.0.remove(k);
    }
    one_sided
}

/// Waits until a server listens on TCP `port` in container `id`'s network
/// namespace (the container's start does not wait for its server).
pub fn wait_listening(cri: &Cri, id: &str, port: u16) {
    cri.sh(
        id,
        &format!(
            "for i in $(seq 100); do netstat -ltn | grep -q ':{port} ' && exit 0; sleep 0.1; done; netstat -ltn; exit 1"
        ),
        120,
    );
}

/// The body of an HTTP GET of `/` from `ip:port`, from inside container
/// `id`, waiting at most `wait_s` (busybox nc: Debian's static busybox wget
/// crashes, also on the host); an error says what failed.
pub fn fetch(cri: &Cri, id: &str, ip: &IpAddr, port: u16, wait_s: u32) -> Result<String, String> {
    let cmd = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w {wait_s} {ip} {port}");
    let r = cri
        .exec_sync(id, &["sh", "-c", &cmd], i64::from(wait_s) + 60)
        .map_err(|e| format!("exec in {id}: {e}"))?;
    let body = r
        .stdout
        .split("\r\n\r\n")
        .nth(1)
        .map(|b| b.trim().to_owned());
    match (r.exit_code, body) {
        (0, Some(b)) => Ok(b),
        (code, _) => Err(format!(
            "GET http://{ip}:{port}/ from {id}: exit {code}, {:?} {:?}",
            r.stdout, r.stderr
        )),
    }
}

/// An HTTP GET of `/` from `ip:port`, from the host: the whole reply.
pub fn http_get(ip: &IpAddr, port: u16, wait: std::time::Duration) -> Result<String, String> {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::new(*ip, port);
    let err = |what: &str, e: std::io::Error| format!("{what} {addr} from the host: {e}");
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, wait).map_err(|e| err("connecting to", e))?;
    s.set_read_timeout(Some(wait))
        .map_err(|e| err("timeout on", e))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")
        .map_err(|e| err("writing to", e))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| err("reading from", e))?;
    Ok(out)
}

/// An HTTP server on the host at one address, answering every request
/// with `host-ok`, until dropped.
pub struct HostServer {
    pub addr: std::net::SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HostServer {
    pub fn start(ip: IpAddr) -> Self {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind((ip, 0))
            .unwrap_or_else(|e| panic!("binding a host server to {ip}: {e}"));
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local addr");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(5)));
                        let mut buf = [0u8; 1024];
                        let _ = s.read(&mut buf);
                        let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\nhost-ok\n");
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
                }
            }
        });
        Self {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for HostServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A pod serving its name over HTTP on [`WEB_PORT`] from container `web`.
pub struct WebPod {
    pub pod: String,
    pub web: String,
    /// The pod's addresses, as CRI reports them.
    pub ips: Vec<IpAddr>,
}

/// The port a [`WebPod`] serves on.
pub const WEB_PORT: u16 = 8080;

impl WebPod {
    /// Starts pod `name` on `handler` whose container (with capabilities
    /// `caps` added) serves its name; an error says which step failed.
    pub fn start(
        cri: &Cri,
        log_dir: &std::path::Path,
        name: &str,
        handler: &str,
        caps: &[&str],
    ) -> Result<Self, String> {
        Self::start_mapped(cri, log_dir, name, handler, caps, None)
    }

    /// As [`WebPod::start`], with [`WEB_PORT`] published on the node's
    /// `host_port` (CRI port mapping, for the portmap plugin).
    pub fn start_mapped(
        cri: &Cri,
        log_dir: &std::path::Path,
        name: &str,
        handler: &str,
        caps: &[&str],
        host_port: Option<u16>,
    ) -> Result<Self, String> {
        let mut opts = crate::cri::PodOpts::new(name, &log_dir.join(name));
        opts.handler = handler.to_owned();
        opts.port_mappings = host_port
            .map(|p| k8s_cri::v1::PortMapping {
                protocol: k8s_cri::v1::Protocol::Tcp as i32,
                container_port: i32::from(WEB_PORT),
                host_port: i32::from(p),
                host_ip: String::new(),
            })
            .into_iter()
            .collect();
        let pod = cri
            .run_pod(&opts)
            .map_err(|e| format!("RunPodSandbox: {}", e.message()))?;
        let script = format!(
            "mkdir -p /w && echo {name} > /w/index.html && exec httpd -f -p {WEB_PORT} -h /w"
        );
        let c = crate::cri::with_caps(
            crate::cri::container(
                "web",
                crate::containerd::IMAGE,
                &["sh", "-c", &script],
                false,
            ),
            caps,
        );
        let web = match cri.run_container(&pod, &opts, c) {
            Ok(w) => w,
            Err(e) => {
                let _ = cri.stop_pod(&pod);
                let _ = cri.remove_pod(&pod);
                return Err(format!("container: {}", e.message()));
            }
        };
        wait_listening(cri, &web, WEB_PORT);
        let net = cri
            .pod_status(&pod)
            .map_err(|e| format!("PodSandboxStatus: {}", e.message()))?
            .network
            .unwrap_or_default();
        let ips = std::iter::once(net.ip.as_str())
            .chain(net.additional_ips.iter().map(|p| p.ip.as_str()))
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().map_err(|e| format!("pod IP {s:?}: {e}")))
            .collect::<Result<_, _>>()?;
        Ok(Self { pod, web, ips })
    }

    /// Stops and removes the pod.
    pub fn remove(&self, cri: &Cri) {
        cri.stop_pod(&self.pod).expect("StopPodSandbox");
        cri.remove_pod(&self.pod).expect("RemovePodSandbox");
    }
}
