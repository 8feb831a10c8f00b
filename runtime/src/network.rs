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
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::packet_route::tc::TcHandle;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// ETH_P_ALL, as tc's `protocol all`: the kernel compares it with the
/// frame's protocol field, in network byte order.
const ETH_P_ALL: u16 = 0x0003_u16.to_be();
/// The ingress qdisc's handle, `ffff:`.
const INGRESS_HANDLE: u32 = 0xffff_0000;
/// Interface names are at most 15 bytes.
#[cfg(test)]
const IFNAMSIZ: usize = 16;
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

/// A route CNI added (not one the kernel made for an address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRoute {
    /// None: the default route.
    pub destination: Option<(IpAddr, u8)>,
    pub gateway: Option<IpAddr>,
    pub source: Option<IpAddr>,
    /// The index of the pod link it goes out of.
    pub link: u32,
    pub scope: u8,
    pub metric: u32,
    pub ipv6: bool,
}

/// A permanent neighbour entry on a pod link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNeighbour {
    pub address: IpAddr,
    pub lladdr: Vec<u8>,
    pub link: u32,
}

/// The pod's links, each with its tap and redirects, and the routes and
/// neighbours the guest needs to mirror them.
#[derive(Debug)]
pub struct PodNetwork {
    netns: PathBuf,
    taps: Vec<Tap>,
    routes: Vec<PodRoute>,
    neighbours: Vec<PodNeighbour>,
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

/// Runs `f` with a netlink handle inside network namespace `netns`, on a
/// thread of its own.
fn in_netns<T, F, Fut>(netns: &Path, f: F) -> Result<T, NetworkError>
where
    T: Send,
    F: FnOnce(Handle) -> Fut + Send,
    Fut: Future<Output = Result<T, NetworkError>>,
{
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

/// The links CNI made: not loopback, not a husk tap, with an address.
async fn pod_links(handle: &Handle, netns: &Path) -> Result<Vec<PodLink>, NetworkError> {
    let addresses: Vec<_> = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink(netns, "listing addresses"))?;
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
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::Address(mac) => link.mac = mac.clone(),
                LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
                _ => {}
            }
        }
        found.push(link);
    }
    Ok(found)
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// The routes of the main table out of one of `links` that the kernel did
/// not add itself (prefix routes of addresses, IPv6 link-local ones).
async fn pod_routes(
    handle: &Handle,
    netns: &Path,
    links: &[PodLink],
) -> Result<Vec<PodRoute>, NetworkError> {
    let mut found = Vec::new();
    for (ipv6, query) in [
        (
            false,
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        ),
        (
            true,
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        ),
    ] {
        let routes: Vec<RouteMessage> = handle
            .route()
            .get(query)
            .execute()
            .try_collect()
            .await
            .map_err(netlink(netns, "listing routes"))?;
        for m in routes {
            if let Some(r) = pod_route(&m, ipv6, links) {
                found.push(r);
            }
        }
    }
    Ok(found)
}

/// `m` as a route the guest must be given, if it is one.
fn pod_route(m: &RouteMessage, ipv6: bool, links: &[PodLink]) -> Option<PodRoute> {
    let mut table = u32::from(m.header.table);
    let mut route = PodRoute {
        destination: None,
        gateway: None,
        source: None,
        link: 0,
        scope: m.header.scope.into(),
        metric: 0,
        ipv6,
    };
    for a in &m.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(d) => {
                route.destination = route_ip(d).map(|ip| (ip, m.header.destination_prefix_length))
            }
            RouteAttribute::Gateway(g) => route.gateway = route_ip(g),
            RouteAttribute::PrefSource(p) => route.source = route_ip(p),
            RouteAttribute::Oif(i) => route.link = *i,
            RouteAttribute::Priority(p) => route.metric = *p,
            _ => {}
        }
    }
    let wanted = table == u32::from(RouteHeader::RT_TABLE_MAIN)
        && m.header.protocol != RouteProtocol::Kernel
        && m.header.kind == RouteType::Unicast
        && links.iter().any(|l| l.index == route.link)
        && !route.destination.is_some_and(|(ip, _)| is_link_local(&ip));
    wanted.then_some(route)
}

/// The permanent neighbour entries on `links`.
async fn pod_neighbours(
    handle: &Handle,
    netns: &Path,
    links: &[PodLink],
) -> Result<Vec<PodNeighbour>, NetworkError> {
    let all: Vec<_> = handle
        .neighbours()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink(netns, "listing neighbours"))?;
    Ok(all
        .iter()
        .filter(|m| m.header.state == NeighbourState::Permanent)
        .filter(|m| links.iter().any(|l| l.index == m.header.ifindex))
        .filter_map(|m| {
            let mut address = None;
            let mut lladdr = None;
            for a in &m.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                        address = Some(IpAddr::V4(*v4))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                        address = Some(IpAddr::V6(*v6))
                    }
                    NeighbourAttribute::LinkLayerAddress(mac) => lladdr = Some(mac.clone()),
                    _ => {}
                }
            }
            Some(PodNeighbour {
                address: address?,
                lladdr: lladdr?,
                link: m.header.ifindex,
            })
        })
        .collect())
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
    let fd = husk_vmm::net::open_tap(&name)
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
        let (taps, routes, neighbours) = in_netns(netns, |handle| async move {
            let links = pod_links(&handle, netns).await?;
            let routes = pod_routes(&handle, netns, &links).await?;
            let neighbours = pod_neighbours(&handle, netns, &links).await?;
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
            Ok((taps, routes, neighbours))
        })?;
        tracing::info!(netns = %netns.display(), taps = taps.len(), routes = routes.len(), "pod network attached");
        Ok(Self {
            netns: netns.to_path_buf(),
            taps,
            routes,
            neighbours,
        })
    }

    /// What the guest must configure: each link's MAC, MTU and addresses,
    /// the routes and the permanent neighbours, by the link's MAC.
    pub fn guest_config(&self) -> proto::Network {
        let mac_of = |index: u32| {
            self.taps
                .iter()
                .find(|t| t.link.index == index)
                .map(|t| t.link.mac.clone())
                .unwrap_or_default()
        };
        let mut net = proto::Network::new();
        for t in &self.taps {
            let mut i = proto::Interface::new();
            i.mac = t.link.mac.clone();
            i.mtu = t.link.mtu;
            i.name = t.link.name.clone();
            i.addresses = t
                .link
                .addresses
                .iter()
                .map(|(ip, len)| format!("{ip}/{len}"))
                .collect();
            net.interfaces.push(i);
        }
        for r in &self.routes {
            let mut p = proto::Route::new();
            p.destination = r
                .destination
                .map(|(ip, len)| format!("{ip}/{len}"))
                .unwrap_or_default();
            p.gateway = r.gateway.map(|g| g.to_string()).unwrap_or_default();
            p.source = r.source.map(|s| s.to_string()).unwrap_or_default();
            p.device_mac = mac_of(r.link);
            p.scope = r.scope.into();
            p.metric = r.metric;
            p.ipv6 = r.ipv6;
            net.routes.push(p);
        }
        for n in &self.neighbours {
            let mut p = proto::Neighbour::new();
            p.address = n.address.to_string();
            p.lladdr = n.lladdr.clone();
            p.device_mac = mac_of(n.link);
            net.neighbours.push(p);
        }
        net
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
    fn tap_names_fit_and_name_their_link() {
        assert_eq!(tap_name(3), "htap3");
        assert!(
            tap_name(u32::MAX).len() < IFNAMSIZ,
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
