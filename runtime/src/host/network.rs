//! Pod networking, host side: carries the links CNI made in a pod's network
//! namespace to taps a VMM can serve, as Kata does. For each CNI link (not
//! loopback, with an address) a tap is made in the same namespace, with the
//! link's MTU, and an ingress qdisc on both with a match-all u32 filter whose
//! action is `mirred egress redirect` to the other: what arrives on the link
//! leaves through the tap to the guest, and what the guest sends leaves
//! through the link. The guest's NIC takes the link's MAC, so the CNI
//! network sees the same endpoint it configured.
//!
//! Netlink through rtnetlink, from a thread of its own that enters the pod's
//! namespace (a netlink socket and a tap belong to the namespace of the
//! thread that opens them); no shared worker ever changes namespace.

use std::fs::File;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use futures_util::TryStreamExt;
use husk_protocol::containers as proto;
use nix::sched::CloneFlags;
use rtnetlink::packet_core::{Emitable, Nla};
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage, AddressProtocol};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteType,
};
use rtnetlink::packet_route::tc::TcHandle;
use rtnetlink::{Handle, IpVersion, LinkUnspec, RouteMessageBuilder};

/// ETH_P_ALL, as tc's `protocol all`: the kernel compares it with the
/// frame's protocol field, in network byte order.
const ETH_P_ALL: u16 = 0x0003_u16.to_be();
/// The ingress qdisc's handle, `ffff:`.
const INGRESS_HANDLE: u32 = 0xffff_0000;
/// A tap's name: `htap<index of its link>`, so a later cleanup knows which
/// link it serves (15 bytes at most, whatever the index).
const TAP_PREFIX: &str = "htap";

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("network namespace {}", path.display())]
    Netns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("netlink in {}: {what}", netns.display())]
    Netlink {
        netns: PathBuf,
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("the pod's network namespace {} holds {what}, which the guest kernel cannot copy; husk refuses the pod rather than give it a different network", netns.display())]
    Unsupported { netns: PathBuf, what: String },
    #[error("network namespace {} is the host's own: husk puts no pod on the host network (its taps and redirects, and their removal at the end, would hit the node's links)", path.display())]
    HostNamespace { path: PathBuf },
    #[error("creating tap {name} in {}", netns.display())]
    Tap {
        name: String,
        netns: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A link CNI made in the pod's namespace, as the guest's NIC must mirror
/// it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLink {
    pub name: String,
    pub index: u32,
    pub mac: Vec<u8>,
    pub mtu: u32,
    /// Addresses with their prefix lengths.
    pub addresses: Vec<(IpAddr, u8)>,
    /// The link's [`COPIED_LINK_FLAGS`] that are set.
    pub flags: u32,
    pub txqlen: u32,
}

/// A tap serving one pod link.
#[derive(Debug)]
pub struct Tap {
    pub name: String,
    pub index: u32,
    /// The tap's queue (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`), for the VMM.
    pub fd: OwnedFd,
    pub link: PodLink,
}

/// The pod namespace's state the guest copies, as the kernel dumped it:
/// netlink message bodies (header and attributes, no `nlmsghdr`), link
/// indexes still the pod namespace's, and sysctls by dotted key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodState {
    /// RTM_NEWADDR bodies: every address of the pod links.
    pub addresses: Vec<Vec<u8>>,
    /// RTM_NEWROUTE bodies: every route of every table but `local` that
    /// goes out of a pod link, or has no device (blackhole, unreachable,
    /// prohibit, throw).
    pub routes: Vec<Vec<u8>>,
    /// RTM_NEWRULE bodies: every policy rule, both families.
    pub rules: Vec<Vec<u8>>,
    /// RTM_NEWNEIGH bodies: the permanent neighbours of the pod links.
    pub neighbours: Vec<Vec<u8>>,
    /// (key, value) of the per-link and namespace-wide sysctls CNI
    /// plugins and node set-ups write; the key is the path under
    /// `/proc/sys` (`net/ipv4/conf/eth0/arp_notify`: a link name may hold
    /// a dot).
    pub sysctls: Vec<(String, String)>,
}

/// The pod's links, each with its tap and redirects, and the state of the
/// pod's namespace the guest copies.
#[derive(Debug)]
pub struct PodNetwork {
    netns: PathBuf,
    taps: Vec<Tap>,
    state: PodState,
}

/// The tap name for the link with `index`.
pub fn tap_name(index: u32) -> String {
    format!("{TAP_PREFIX}{index}")
}

/// The link index a tap name encodes, for a husk tap.
fn tap_link(name: &str) -> Option<u32> {
    let digits = name.strip_prefix(TAP_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Runs `f` on a thread of its own that has entered network namespace
/// `netns` (sockets and taps it makes belong there, and so do children it
/// starts); no shared worker ever changes namespace. `ns_err` wraps the
/// failure to enter it.
pub(crate) fn on_thread_in<T, E>(
    netns: &Path,
    ns_err: impl Fn(io::Error) -> E + Sync,
    f: impl FnOnce() -> Result<T, E> + Send,
) -> Result<T, E>
where
    T: Send,
    E: Send,
{
    let file = File::open(netns).map_err(&ns_err)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
                .map_err(|e| ns_err(e.into()))?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(ns_err(io::Error::other("the namespace thread panicked"))))
    })
}

/// Refuses `netns` when it is this process's own network namespace or
/// init's (the node's): a spec may name any path.
fn refuse_host_namespace(netns: &Path) -> Result<(), NetworkError> {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let Some(pod) = id(netns) else {
        // Not there: entering it fails and says so.
        return Ok(());
    };
    let host = ["/proc/self/ns/net", "/proc/1/ns/net"];
    if host.iter().any(|h| id(Path::new(h)) == Some(pod)) {
        return Err(NetworkError::HostNamespace {
            path: netns.to_path_buf(),
        });
    }
    Ok(())
}

/// Runs `f` with a netlink handle inside network namespace `netns`, on a
/// thread of its own; never in the host's.
fn in_netns<T, F, Fut>(netns: &Path, f: F) -> Result<T, NetworkError>
where
    T: Send,
    F: FnOnce(Handle) -> Fut + Send,
    Fut: Future<Output = Result<T, NetworkError>>,
{
    refuse_host_namespace(netns)?;
    let ns_err = |source| NetworkError::Netns {
        path: netns.to_path_buf(),
        source,
    };
    on_thread_in(netns, ns_err, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(ns_err)?;
        rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection().map_err(ns_err)?;
            tokio::spawn(conn);
            f(handle).await
        })
    })
}

fn netlink(netns: &Path, what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let (netns, what) = (netns.to_path_buf(), what.into());
    move |source| NetworkError::Netlink {
        netns,
        what,
        source,
    }
}

/// Every link of the namespace.
async fn links(handle: &Handle, netns: &Path) -> Result<Vec<LinkMessage>, NetworkError> {
    handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink(netns, "listing links"))
}

fn link_name(m: &LinkMessage) -> String {
    m.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

/// Every address of the namespace.
async fn addresses(handle: &Handle, netns: &Path) -> Result<Vec<AddressMessage>, NetworkError> {
    handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink(netns, "listing addresses"))
}

/// The links CNI made: not loopback, not a husk tap, with an address.
async fn pod_links(handle: &Handle, netns: &Path) -> Result<Vec<PodLink>, NetworkError> {
    let addresses = addresses(handle, netns).await?;
    let mut found = Vec::new();
    for m in links(handle, netns).await? {
        let name = link_name(&m);
        if m.header.flags.contains(LinkFlags::Loopback) || tap_link(&name).is_some() {
            continue;
        }
        let index = m.header.index;
        let addrs: Vec<(IpAddr, u8)> = addresses
            .iter()
            .filter(|a| a.header.index == index)
            .filter_map(|a| {
                a.attributes.iter().find_map(|attr| match attr {
                    AddressAttribute::Address(ip) => Some((*ip, a.header.prefix_len)),
                    _ => None,
                })
            })
            .filter(|(ip, _)| !ip.is_loopback() && !is_link_local(ip))
            .collect();
        if addrs.is_empty() {
            continue;
        }
        let mut link = PodLink {
            name,
            index,
            mac: Vec::new(),
            mtu: 1500,
            addresses: addrs,
            flags: (m.header.flags & COPIED_LINK_FLAGS).bits(),
            txqlen: 0,
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::Address(mac) => link.mac = mac.clone(),
                LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
                LinkAttribute::TxQueueLen(q) => link.txqlen = *q,
                _ => {}
            }
        }
        found.push(link);
    }
    Ok(found)
}

/// The flags of a link the guest's NIC copies (tuning's `promisc` and
/// `allmulti`, `noarp`, `multicast`); `up` is always set.
pub const COPIED_LINK_FLAGS: LinkFlags = LinkFlags::Promisc
    .union(LinkFlags::Allmulti)
    .union(LinkFlags::Noarp)
    .union(LinkFlags::Multicast);

/// The namespace-wide sysctls copied (per-link ones are copied whole):
/// Kubernetes' safe set, what CNI plugins and node set-ups write, and
/// nothing sized from the host's memory (`tcp_rmem`, `tcp_mem`) or global
/// to the kernel.
const NAMESPACE_SYSCTLS: &[&str] = &[
    "net.core.somaxconn",
    "net.ipv4.ip_forward",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.ip_nonlocal_bind",
    "net.ipv4.ip_default_ttl",
    "net.ipv4.ping_group_range",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_tw_reuse",
    "net.ipv4.fib_multipath_hash_policy",
    "net.ipv6.ip_nonlocal_bind",
    "net.ipv6.fib_multipath_hash_policy",
];

/// Route types the guest kernel has; any other fails the pod naming it.
fn route_type_supported(kind: RouteType) -> bool {
    matches!(
        kind,
        RouteType::Unicast
            | RouteType::Local
            | RouteType::Broadcast
            | RouteType::Anycast
            | RouteType::Multicast
            | RouteType::BlackHole
            | RouteType::Unreachable
            | RouteType::Prohibit
            | RouteType::Throw
    )
}

/// The name of a route attribute the guest cannot be given, if `a` is one.
fn unsupported_route_attribute(a: &RouteAttribute) -> Option<&'static str> {
    match a {
        RouteAttribute::Encap(_) | RouteAttribute::EncapType(_) => {
            Some("a lightweight-tunnel encapsulation (RTA_ENCAP)")
        }
        RouteAttribute::Via(_) | RouteAttribute::NewDestination(_) => {
            Some("an MPLS next hop (RTA_VIA, RTA_NEWDST)")
        }
        RouteAttribute::Other(nla) if nla.kind() == RTA_NH_ID => {
            Some("a nexthop object (RTA_NH_ID; `ip nexthop`)")
        }
        _ => None,
    }
}

/// RTA_NH_ID: a route through a nexthop object.
const RTA_NH_ID: u16 = 30;
/// The `local` table: the kernel fills it from the addresses.
const RT_TABLE_LOCAL: u32 = 255;

fn body(m: &impl Emitable) -> Vec<u8> {
    let mut buf = vec![0; m.buffer_len()];
    m.emit(&mut buf);
    buf
}

/// The links a route goes out of: its `oif` and its multipath hops'.
fn route_links(m: &RouteMessage) -> Vec<u32> {
    let mut out = Vec::new();
    for a in &m.attributes {
        match a {
            RouteAttribute::Oif(i) => out.push(*i),
            RouteAttribute::MultiPath(hops) => out.extend(hops.iter().map(|h| h.interface_index)),
            _ => {}
        }
    }
    out
}

/// The route's table, from its attribute (tables past 255) or its header.
fn route_table(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(m.header.table.into())
}

fn describe_route(m: &RouteMessage) -> String {
    let dst = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(v4)) => Some(v4.to_string()),
            RouteAttribute::Destination(RouteAddress::Inet6(v6)) => Some(v6.to_string()),
            _ => None,
        })
        .map_or("default".to_owned(), |d| {
            format!("{d}/{}", m.header.destination_prefix_length)
        });
    format!("{dst} (table {}, type {:?})", route_table(m), m.header.kind)
}

/// Whether route `m` is pod state the guest copies: not in table `local`
/// (the kernel makes it from the addresses), not a cached clone, and out
/// of a pod link or without a device. Unsupported ones are an error.
fn wanted_route(m: &RouteMessage, links: &[PodLink], netns: &Path) -> Result<bool, NetworkError> {
    if route_table(m) == RT_TABLE_LOCAL || m.header.flags.contains(RouteFlags::Cloned) {
        return Ok(false);
    }
    let through = route_links(m);
    let ours = through.iter().any(|i| links.iter().any(|l| l.index == *i));
    let deviceless = through.is_empty();
    if !ours && !deviceless {
        return Ok(false);
    }
    let unsupported = |what: String| NetworkError::Unsupported {
        netns: netns.to_path_buf(),
        what,
    };
    if through.iter().any(|i| !links.iter().any(|l| l.index == *i)) {
        return Err(unsupported(format!(
            "route {} has a next hop through a link that is not the pod's",
            describe_route(m)
        )));
    }
    if !route_type_supported(m.header.kind) {
        return Err(unsupported(format!("route {}", describe_route(m))));
    }
    if let Some(what) = m.attributes.iter().find_map(unsupported_route_attribute) {
        return Err(unsupported(format!(
            "route {} with {what}",
            describe_route(m)
        )));
    }
    Ok(true)
}

/// Reads the sysctls the guest copies, in the order it writes them:
/// namespace-wide, then `all` and `default`, then each pod link. Called
/// on a thread in the pod's namespace (`/proc/sys/net` is the opener's
/// namespace). Keys this kernel lacks, and unreadable or read-only ones,
/// are left out.
fn pod_sysctls(links: &[PodLink]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut read = |key: String| {
        let path = Path::new("/proc/sys").join(&key);
        let writable = std::fs::metadata(&path)
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o200 != 0)
            .unwrap_or(false);
        if let (true, Ok(v)) = (writable, std::fs::read_to_string(&path)) {
            out.push((key, v.trim_end_matches('\n').to_owned()));
        }
    };
    for key in NAMESPACE_SYSCTLS {
        read(key.replace('.', "/"));
    }
    let mut dirs = vec!["all".to_owned(), "default".to_owned()];
    dirs.extend(links.iter().map(|l| l.name.clone()));
    for family in ["ipv4", "ipv6"] {
        for dir in &dirs {
            let base = Path::new("/proc/sys/net")
                .join(family)
                .join("conf")
                .join(dir);
            let Ok(entries) = std::fs::read_dir(&base) else {
                continue;
            };
            let mut names: Vec<String> = entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect();
            names.sort();
            for n in names {
                read(format!("net/{family}/conf/{dir}/{n}"));
            }
        }
    }
    out
}

/// The state of the pod's namespace the guest copies (see [`PodState`]).
async fn pod_state(
    handle: &Handle,
    netns: &Path,
    links: &[PodLink],
) -> Result<PodState, NetworkError> {
    let ours = |index: u32| links.iter().any(|l| l.index == index);
    let mut state = PodState::default();
    let addresses = addresses(handle, netns).await?;
    for a in addresses.iter().filter(|a| ours(a.header.index)) {
        // The kernel marks the addresses it makes itself (since Linux
        // 6.3); the guest's kernel makes those itself too. An address a
        // program marked is one the guest's 6.1 kernel cannot mark.
        if let Some(AddressAttribute::Protocol(AddressProtocol::Other(p))) = a
            .attributes
            .iter()
            .find(|x| matches!(x, AddressAttribute::Protocol(_)))
        {
            return Err(NetworkError::Unsupported {
                netns: netns.to_path_buf(),
                what: format!("an address with protocol {p} (IFA_PROTO; the guest kernel is 6.1)"),
            });
        }
        state.addresses.push(body(a));
    }
    for query in [
        RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    ] {
        let routes: Vec<RouteMessage> = handle
            .route()
            .get(query)
            .execute()
            .try_collect()
            .await
            .map_err(netlink(netns, "listing routes"))?;
        for m in routes {
            if wanted_route(&m, links, netns)? {
                state.routes.push(body(&m));
            }
        }
    }
    for version in [IpVersion::V4, IpVersion::V6] {
        let rules: Vec<_> = handle
            .rule()
            .get(version)
            .execute()
            .try_collect()
            .await
            .map_err(netlink(netns, "listing policy rules"))?;
        state.rules.extend(rules.iter().map(body));
    }
    let neighbours: Vec<_> = handle
        .neighbours()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink(netns, "listing neighbours"))?;
    state.neighbours = neighbours
        .iter()
        .filter(|m| m.header.state == NeighbourState::Permanent && ours(m.header.ifindex))
        .map(body)
        .collect();
    state.sysctls = pod_sysctls(links);
    Ok(state)
}

/// fe80::/10: every IPv6 link has one; it says nothing about CNI.
fn is_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

/// An ingress qdisc on `index` whose one filter redirects everything to
/// the egress of `to`.
async fn redirect(handle: &Handle, netns: &Path, index: u32, to: u32) -> Result<(), NetworkError> {
    handle
        .qdisc()
        .add(index as i32)
        .ingress()
        .execute()
        .await
        .map_err(netlink(
            netns,
            format!("adding an ingress qdisc to link {index}"),
        ))?;
    handle
        .traffic_filter(index as i32)
        .add()
        .parent(INGRESS_HANDLE)
        .protocol(ETH_P_ALL)
        .redirect(to)
        .map_err(netlink(netns, "building the redirect filter"))?
        .execute()
        .await
        .map_err(netlink(
            netns,
            format!("redirecting link {index}'s ingress to link {to}"),
        ))
}

/// Removes the ingress qdisc of `index` (and so its filters).
async fn remove_ingress(handle: &Handle, netns: &Path, index: u32) -> Result<(), NetworkError> {
    let mut req = handle.qdisc().del(index as i32);
    req.message_mut().header.parent = TcHandle::INGRESS;
    req.message_mut().header.handle = TcHandle::from(INGRESS_HANDLE);
    match req.execute().await {
        Ok(()) => Ok(()),
        // Gone with its link, or never there.
        Err(rtnetlink::Error::NetlinkError(e))
            if matches!(
                e.raw_code().abs(),
                libc::ENOENT | libc::ENODEV | libc::EINVAL
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(netlink(
            netns,
            format!("removing link {index}'s ingress qdisc"),
        )(e)),
    }
}

/// Makes one link's tap, sizes it, brings it up and redirects both ways.
async fn attach_link(handle: &Handle, netns: &Path, link: PodLink) -> Result<Tap, NetworkError> {
    let name = tap_name(link.index);
    // Opened on this thread, which is in the pod's namespace.
    let fd = husk_sys::tap::open_tap(&name)
        .map(OwnedFd::from)
        .map_err(|source| NetworkError::Tap {
            name: name.clone(),
            netns: netns.to_path_buf(),
            source,
        })?;
    let index = handle
        .link()
        .get()
        .match_name(name.clone())
        .execute()
        .try_next()
        .await
        .map_err(netlink(netns, format!("finding tap {name}")))?
        .map(|m| m.header.index)
        .unwrap_or(0);
    let tap = Tap {
        name: name.clone(),
        index,
        fd,
        link,
    };
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(index)
                .mtu(tap.link.mtu)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(netlink(
            netns,
            format!("setting tap {name}'s MTU and bringing it up"),
        ))?;
    redirect(handle, netns, tap.link.index, index).await?;
    redirect(handle, netns, index, tap.link.index).await?;
    Ok(tap)
}

impl PodNetwork {
    /// Finds the CNI links of namespace `netns` and gives each a tap with
    /// redirects both ways. On error nothing of it stays.
    pub fn attach(netns: &Path) -> Result<Self, NetworkError> {
        let (taps, state) = in_netns(netns, |handle| async move {
            let links = pod_links(&handle, netns).await?;
            let state = pod_state(&handle, netns, &links).await?;
            let mut taps = Vec::new();
            for link in links {
                let veth = link.index;
                match attach_link(&handle, netns, link).await {
                    Ok(tap) => taps.push(tap),
                    Err(e) => {
                        let _ = remove_ingress(&handle, netns, veth).await;
                        for t in &taps {
                            let _ = remove_ingress(&handle, netns, t.link.index).await;
                        }
                        return Err(e);
                    }
                }
            }
            Ok((taps, state))
        })?;
        tracing::info!(
            netns = %netns.display(),
            taps = taps.len(),
            addresses = state.addresses.len(),
            routes = state.routes.len(),
            rules = state.rules.len(),
            neighbours = state.neighbours.len(),
            sysctls = state.sysctls.len(),
            "pod network attached"
        );
        Ok(Self {
            netns: netns.to_path_buf(),
            taps,
            state,
        })
    }

    /// What the guest must configure: each link (by MAC, with the pod
    /// namespace's index the messages name) and the namespace's state.
    pub fn guest_config(&self) -> proto::Network {
        let mut net = proto::Network::new();
        for t in &self.taps {
            let mut i = proto::Interface::new();
            i.mac = t.link.mac.clone();
            i.mtu = t.link.mtu;
            i.name = t.link.name.clone();
            i.index = t.link.index;
            i.flags = t.link.flags;
            i.txqlen = t.link.txqlen;
            net.interfaces.push(i);
        }
        net.addresses = self.state.addresses.clone();
        net.routes = self.state.routes.clone();
        net.rules = self.state.rules.clone();
        net.neighbours = self.state.neighbours.clone();
        net.sysctls = self
            .state
            .sysctls
            .iter()
            .map(|(k, v)| {
                let mut s = proto::Sysctl::new();
                s.key = k.clone();
                s.value = v.clone();
                s
            })
            .collect();
        net
    }

    /// The pod namespace's state the guest copies.
    pub fn state(&self) -> &PodState {
        &self.state
    }

    pub fn netns(&self) -> &Path {
        &self.netns
    }

    pub fn taps(&self) -> &[Tap] {
        &self.taps
    }

    /// Removes the redirects and the taps: the namespace is as CNI left it.
    pub fn detach(self) -> Result<(), NetworkError> {
        let PodNetwork { netns, taps, .. } = self;
        // A tap without `persist` goes with its last descriptor; the VMM's
        // copy is gone with the VMM. Removing it by name covers the rest.
        drop(taps);
        cleanup(&netns)
    }
}

/// Removes every husk tap of namespace `netns` and the ingress qdiscs of
/// the CNI links (`delete` after a shim crash; [`PodNetwork::detach`]). A
/// tap goes with the VMM that held it, so after a crash only the CNI
/// link's redirect is left: it is found by the link, not by the tap. (CNI
/// plugins put no ingress qdisc inside a pod's namespace; the bandwidth
/// plugin's is on the host side.) A namespace that is gone has nothing left
/// to clean.
pub fn cleanup(netns: &Path) -> Result<(), NetworkError> {
    if !netns.exists() {
        return Ok(());
    }
    in_netns(netns, |handle| async move {
        for link in pod_links(&handle, netns).await? {
            remove_ingress(&handle, netns, link.index).await?;
        }
        for m in links(&handle, netns).await? {
            let name = link_name(&m);
            if tap_link(&name).is_none() {
                continue;
            }
            match handle.link().del(m.header.index).execute().await {
                Ok(()) => {}
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code().abs() == libc::ENODEV => {}
                Err(e) => return Err(netlink(netns, format!("removing tap {name}"))(e)),
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hosts_own_network_namespace_is_refused_by_name() {
        for host in ["/proc/self/ns/net", "/proc/thread-self/ns/net"] {
            let e = refuse_host_namespace(Path::new(host)).unwrap_err();
            assert!(matches!(e, NetworkError::HostNamespace { .. }), "{e}");
            assert!(e.to_string().contains(host), "{e}");
            // Attach and clean-up meet the refusal before they touch a link.
            let e = cleanup(Path::new(host)).unwrap_err();
            assert!(matches!(e, NetworkError::HostNamespace { .. }), "{e}");
        }
        let other = tempfile::NamedTempFile::new().unwrap();
        assert!(refuse_host_namespace(other.path()).is_ok());
    }

    #[test]
    fn tap_names_fit_and_name_their_link() {
        assert_eq!(tap_name(3), "htap3");
        assert!(
            tap_name(u32::MAX).len() < husk_sys::tap::IFNAMSIZ,
            "{}",
            tap_name(u32::MAX)
        );
        assert_eq!(tap_link("htap3"), Some(3));
        assert_eq!(tap_link(&tap_name(u32::MAX)), Some(u32::MAX));
        for other in [
            "eth0",
            "htap",
            "htap+3",
            "htapx",
            "tap3_kata",
            "htap99999999999",
        ] {
            assert_eq!(tap_link(other), None, "{other}");
        }
    }

    #[test]
    fn only_fe80_is_link_local() {
        assert!(is_link_local(&"fe80::1".parse().unwrap()));
        assert!(!is_link_local(&"fd00::1".parse().unwrap()));
        assert!(!is_link_local(&"10.0.0.1".parse().unwrap()));
    }
}
