//! Network namespaces the agent made for containers (a pod's, or a plain
//! container's own): their loopback must be up, as CNI's loopback plugin
//! brings it up on a runc host, or 127.0.0.1 reaches nothing. A pod's
//! sandbox namespace also gets the pod's NICs, configured as CNI configured
//! their host side (addresses, MTU, routes, permanent neighbours).
//!
//! Netlink over a plain blocking socket, from a thread of its own that
//! enters the namespace and ends with it.

use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

use husk_protocol::containers::{Interface, Network, Route};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressHeaderFlags, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::protocols::NETLINK_ROUTE;
use netlink_sys::Socket;

/// Brings `lo` up in the network namespace of process `pid`.
pub fn loopback_up(pid: i32) -> io::Result<()> {
    in_netns_of(pid, |nl| {
        let lo = nl
            .links()?
            .into_iter()
            .find(|l| l.header.flags.contains(LinkFlags::Loopback))
            .ok_or_else(|| io::Error::other("the namespace has no loopback"))?;
        nl.set_link(lo.header.index, None, None, true)
    })
}

/// Moves each NIC of `net` (found by MAC in the agent's own namespace) into
/// the network namespace of process `pid` and configures it there. The
/// description comes from the host; every field is checked before anything
/// changes.
pub fn configure(pid: i32, net: &Network) -> io::Result<()> {
    let plan = Plan::of(net)?;
    let ns = File::open(format!("/proc/{pid}/ns/net"))?;
    let mut nl = Netlink::open()?;
    let links = nl.links()?;
    for nic in &plan.nics {
        let link = find_by_mac(&links, &nic.mac).ok_or_else(|| {
            io::Error::other(format!(
                "the guest has no NIC with MAC {}",
                mac_string(&nic.mac)
            ))
        })?;
        nl.move_link(link.header.index, ns.as_raw_fd())
            .map_err(|e| context(e, format!("moving NIC {}", mac_string(&nic.mac))))?;
    }
    in_netns(&ns, |nl| plan.apply(nl))
}

/// What [`configure`] sets up, parsed.
struct Plan {
    nics: Vec<Nic>,
    routes: Vec<PlannedRoute>,
    neighbours: Vec<(IpAddr, Vec<u8>, Vec<u8>)>,
}

struct Nic {
    mac: Vec<u8>,
    name: String,
    mtu: u32,
    addresses: Vec<(IpAddr, u8)>,
}

struct PlannedRoute {
    destination: Option<(IpAddr, u8)>,
    gateway: Option<IpAddr>,
    source: Option<IpAddr>,
    mac: Vec<u8>,
    scope: u8,
    metric: u32,
    ipv6: bool,
}

fn bad(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

fn context(e: io::Error, what: String) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn parse_mac(mac: &[u8], what: &str) -> io::Result<Vec<u8>> {
    if mac.len() != 6 {
        return Err(bad(format!("{what}: a MAC has 6 bytes, not {}", mac.len())));
    }
    Ok(mac.to_vec())
}

fn parse_ip(s: &str, what: &str) -> io::Result<IpAddr> {
    s.parse()
        .map_err(|_| bad(format!("{what}: {s:?} is not an IP address")))
}

/// `address/prefix length`.
fn parse_cidr(s: &str, what: &str) -> io::Result<(IpAddr, u8)> {
    let (ip, len) = s
        .split_once('/')
        .ok_or_else(|| bad(format!("{what}: {s:?} is not address/prefix")))?;
    let ip = parse_ip(ip, what)?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= max)
        .ok_or_else(|| bad(format!("{what}: prefix length of {s:?} is not 0..={max}")))?;
    Ok((ip, len))
}

/// Interface names: 1 to 15 bytes, no '/', ':', whitespace or control.
fn valid_ifname(name: &str) -> bool {
    (1..16).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

impl Plan {
    fn of(net: &Network) -> io::Result<Plan> {
        let nic = |i: &Interface| -> io::Result<Nic> {
            let mac = parse_mac(&i.mac, "interface")?;
            let what = format!("interface {}", mac_string(&mac));
            if !(68..=65535).contains(&i.mtu) {
                return Err(bad(format!("{what}: MTU {} is not 68..=65535", i.mtu)));
            }
            if !i.name.is_empty() && !valid_ifname(&i.name) {
                return Err(bad(format!(
                    "{what}: {:?} is not an interface name",
                    i.name
                )));
            }
            let addresses = i
                .addresses
                .iter()
                .map(|a| parse_cidr(a, &what))
                .collect::<io::Result<_>>()?;
            Ok(Nic {
                mac,
                name: i.name.clone(),
                mtu: i.mtu,
                addresses,
            })
        };
        let nics: Vec<Nic> = net.interfaces.iter().map(nic).collect::<io::Result<_>>()?;
        let known = |mac: &[u8], what: &str| -> io::Result<Vec<u8>> {
            let mac = parse_mac(mac, what)?;
            if nics.iter().any(|n| n.mac == mac) {
                Ok(mac)
            } else {
                Err(bad(format!(
                    "{what}: device {} is none of the pod's NICs",
                    mac_string(&mac)
                )))
            }
        };
        let route = |r: &Route| -> io::Result<PlannedRoute> {
            let what = format!("route to {:?}", r.destination);
            let opt = |s: &str| (!s.is_empty()).then(|| parse_ip(s, &what)).transpose();
            let destination = (!r.destination.is_empty())
                .then(|| parse_cidr(&r.destination, &what))
                .transpose()?;
            let gateway = opt(&r.gateway)?;
            let ipv6 = destination.map_or(r.ipv6, |(ip, _)| ip.is_ipv6());
            if gateway.is_some_and(|g| g.is_ipv6() != ipv6) {
                return Err(bad(format!("{what}: gateway of another family")));
            }
            Ok(PlannedRoute {
                destination,
                gateway,
                source: opt(&r.source)?,
                mac: known(&r.device_mac, &what)?,
                scope: u8::try_from(r.scope)
                    .map_err(|_| bad(format!("{what}: scope {} is not 0..=255", r.scope)))?,
                metric: r.metric,
                ipv6,
            })
        };
        let mut routes: Vec<PlannedRoute> =
            net.routes.iter().map(route).collect::<io::Result<_>>()?;
        // On-link routes first: a gateway must be reachable when its route
        // is added.
        routes.sort_by_key(|r| r.gateway.is_some());
        let neighbours = net
            .neighbours
            .iter()
            .map(|n| {
                let what = format!("neighbour {:?}", n.address);
                Ok((
                    parse_ip(&n.address, &what)?,
                    parse_mac(&n.lladdr, &what)?,
                    known(&n.device_mac, &what)?,
                ))
            })
            .collect::<io::Result<_>>()?;
        Ok(Plan {
            nics,
            routes,
            neighbours,
        })
    }

    /// Configures the moved NICs in the calling thread's namespace.
    fn apply(&self, nl: &mut Netlink) -> io::Result<()> {
        let links = nl.links()?;
        let index_of = |mac: &[u8]| {
            find_by_mac(&links, mac)
                .map(|l| l.header.index)
                .ok_or_else(|| io::Error::other(format!("NIC {} did not arrive", mac_string(mac))))
        };
        let taken = |name: &str| links.iter().any(|l| link_name(l) == Some(name));
        for nic in &self.nics {
            let what = || format!("NIC {}", mac_string(&nic.mac));
            let index = index_of(&nic.mac)?;
            let current = find_by_mac(&links, &nic.mac).and_then(link_name);
            let rename =
                (!nic.name.is_empty() && current != Some(nic.name.as_str()) && !taken(&nic.name))
                    .then_some(nic.name.as_str());
            nl.set_link(index, rename, Some(nic.mtu), true)
                .map_err(|e| context(e, format!("{}: MTU {} and up", what(), nic.mtu)))?;
            for (ip, len) in &nic.addresses {
                nl.add_address(index, *ip, *len)
                    .map_err(|e| context(e, format!("{}: address {ip}/{len}", what())))?;
            }
        }
        for r in &self.routes {
            let index = index_of(&r.mac)?;
            nl.add_route(index, r).map_err(|e| {
                let to = r
                    .destination
                    .map_or("default".to_owned(), |(ip, l)| format!("{ip}/{l}"));
                context(e, format!("route to {to}"))
            })?;
        }
        for (ip, lladdr, mac) in &self.neighbours {
            nl.add_neighbour(index_of(mac)?, *ip, lladdr)
                .map_err(|e| context(e, format!("neighbour {ip}")))?;
        }
        Ok(())
    }
}

fn mac_string(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn link_name(l: &LinkMessage) -> Option<&str> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn find_by_mac<'a>(links: &'a [LinkMessage], mac: &[u8]) -> Option<&'a LinkMessage> {
    links.iter().find(|l| {
        l.attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::Address(m) if m == mac))
    })
}

/// Runs `f` with a netlink socket in the network namespace of `pid`.
fn in_netns_of<T: Send>(
    pid: i32,
    f: impl FnOnce(&mut Netlink) -> io::Result<T> + Send,
) -> io::Result<T> {
    let ns = File::open(format!("/proc/{pid}/ns/net"))?;
    in_netns(&ns, f)
}

/// Runs `f` with a netlink socket in network namespace `ns`, on a thread of
/// its own that ends with it.
fn in_netns<T: Send>(
    ns: &File,
    f: impl FnOnce(&mut Netlink) -> io::Result<T> + Send,
) -> io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns takes a valid namespace fd and a flag; it changes
            // only this thread, which ends when this closure returns.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            f(&mut Netlink::open()?)
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the network thread panicked")))
    })
}

/// A blocking rtnetlink socket.
struct Netlink {
    socket: Socket,
    seq: u32,
}

impl Netlink {
    fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        Ok(Self { socket, seq: 0 })
    }

    /// Sends `msg` and reads until its acknowledgement (or, for a dump,
    /// its end); returns the messages that came back.
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut req = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        req.finalize();
        let mut buf = vec![0; req.buffer_len()];
        req.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        let mut out = Vec::new();
        let mut rx = vec![0u8; 64 * 1024];
        loop {
            let n = self.socket.recv(&mut &mut rx[..], 0)?;
            let mut at = 0;
            while at < n {
                let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rx[at..n])
                    .map_err(|e| io::Error::other(format!("netlink reply: {e}")))?;
                let len = m.header.length as usize;
                if len == 0 {
                    return Err(io::Error::other("netlink reply of length 0"));
                }
                at += len;
                if m.header.sequence_number != self.seq {
                    continue;
                }
                match m.payload {
                    NetlinkPayload::InnerMessage(inner) => out.push(inner),
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(out),
                            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn change(&mut self, msg: RouteNetlinkMessage) -> io::Result<()> {
        self.request(msg, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)
            .map(drop)
    }

    fn links(&mut self) -> io::Result<Vec<LinkMessage>> {
        Ok(self
            .request(
                RouteNetlinkMessage::GetLink(LinkMessage::default()),
                NLM_F_DUMP,
            )?
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })
            .collect())
    }

    fn move_link(&mut self, index: u32, netns_fd: i32) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes.push(LinkAttribute::NetNsFd(netns_fd));
        self.request(RouteNetlinkMessage::SetLink(m), NLM_F_ACK)
            .map(drop)
    }

    fn set_link(
        &mut self,
        index: u32,
        name: Option<&str>,
        mtu: Option<u32>,
        up: bool,
    ) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        if let Some(name) = name {
            m.attributes.push(LinkAttribute::IfName(name.to_owned()));
        }
        if let Some(mtu) = mtu {
            m.attributes.push(LinkAttribute::Mtu(mtu));
        }
        if up {
            m.header.flags = LinkFlags::Up;
            m.header.change_mask = LinkFlags::Up;
        }
        self.request(RouteNetlinkMessage::SetLink(m), NLM_F_ACK)
            .map(drop)
    }

    fn add_address(&mut self, index: u32, ip: IpAddr, prefix: u8) -> io::Result<()> {
        let mut m = AddressMessage::default();
        m.header.index = index;
        m.header.prefix_len = prefix;
        m.header.family = family(ip.is_ipv6());
        match ip {
            IpAddr::V4(_) => {
                m.attributes.push(AddressAttribute::Local(ip));
                m.attributes.push(AddressAttribute::Address(ip));
            }
            // CNI's host side ran duplicate address detection already; the
            // guest's copy would hold the address tentative for seconds.
            IpAddr::V6(_) => {
                m.header.flags = AddressHeaderFlags::Nodad;
                m.attributes.push(AddressAttribute::Address(ip));
            }
        }
        self.change(RouteNetlinkMessage::NewAddress(m))
    }

    fn add_route(&mut self, index: u32, r: &PlannedRoute) -> io::Result<()> {
        let mut m = RouteMessage::default();
        m.header.address_family = family(r.ipv6);
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.protocol = RouteProtocol::Boot;
        m.header.scope = RouteScope::from(r.scope);
        m.header.kind = RouteType::Unicast;
        if let Some((ip, len)) = r.destination {
            m.header.destination_prefix_length = len;
            m.attributes
                .push(RouteAttribute::Destination(RouteAddress::from(ip)));
        }
        if let Some(gw) = r.gateway {
            m.attributes
                .push(RouteAttribute::Gateway(RouteAddress::from(gw)));
        }
        if let Some(src) = r.source {
            m.attributes
                .push(RouteAttribute::PrefSource(RouteAddress::from(src)));
        }
        m.attributes.push(RouteAttribute::Oif(index));
        if r.metric != 0 {
            m.attributes.push(RouteAttribute::Priority(r.metric));
        }
        self.change(RouteNetlinkMessage::NewRoute(m))
    }

    fn add_neighbour(&mut self, index: u32, ip: IpAddr, lladdr: &[u8]) -> io::Result<()> {
        let mut m = NeighbourMessage::default();
        m.header.family = family(ip.is_ipv6());
        m.header.ifindex = index;
        m.header.state = NeighbourState::Permanent;
        m.attributes.push(NeighbourAttribute::Destination(match ip {
            IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
            IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
        }));
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(lladdr.to_vec()));
        self.change(RouteNetlinkMessage::NewNeighbour(m))
    }
}

fn family(ipv6: bool) -> AddressFamily {
    if ipv6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(mac: &[u8], addrs: &[&str]) -> Interface {
        let mut i = Interface::new();
        i.mac = mac.to_vec();
        i.mtu = 1450;
        i.name = "eth0".into();
        i.addresses = addrs.iter().map(|a| a.to_string()).collect();
        i
    }

    const MAC: [u8; 6] = [2, 0x42, 10, 0, 0, 2];

    #[test]
    fn a_cni_network_parses_with_on_link_routes_first() {
        let mut net = Network::new();
        net.interfaces
            .push(iface(&MAC, &["10.1.0.2/24", "fd00::2/64"]));
        for (dst, gw) in [("", "10.1.0.1"), ("10.9.0.0/16", "")] {
            let mut r = Route::new();
            r.destination = dst.into();
            r.gateway = gw.into();
            r.device_mac = MAC.to_vec();
            net.routes.push(r);
        }
        let plan = Plan::of(&net).unwrap();
        assert_eq!(plan.nics[0].addresses.len(), 2);
        assert_eq!(plan.nics[0].addresses[1].1, 64);
        assert!(plan.routes[0].gateway.is_none());
        assert!(!plan.routes[1].ipv6 && plan.routes[1].destination.is_none());
    }

    #[test]
    fn bad_input_is_refused_naming_it() {
        let cases: Vec<(Network, &str)> = vec![
            (
                {
                    let mut n = Network::new();
                    n.interfaces.push(iface(&[1, 2, 3], &[]));
                    n
                },
                "6 bytes",
            ),
            (
                {
                    let mut n = Network::new();
                    n.interfaces.push(iface(&MAC, &["10.1.0.2/33"]));
                    n
                },
                "prefix length",
            ),
            (
                {
                    let mut n = Network::new();
                    n.interfaces.push(iface(&MAC, &["10.1.0.300/24"]));
                    n
                },
                "not an IP address",
            ),
            (
                {
                    let mut n = Network::new();
                    let mut i = iface(&MAC, &[]);
                    i.mtu = 20;
                    n.interfaces.push(i);
                    n
                },
                "MTU 20",
            ),
            (
                {
                    let mut n = Network::new();
                    let mut i = iface(&MAC, &[]);
                    i.name = "../x".into();
                    n.interfaces.push(i);
                    n
                },
                "interface name",
            ),
            (
                {
                    let mut n = Network::new();
                    n.interfaces.push(iface(&MAC, &[]));
                    let mut r = Route::new();
                    r.gateway = "10.1.0.1".into();
                    r.device_mac = vec![9, 9, 9, 9, 9, 9];
                    n.routes.push(r);
                    n
                },
                "none of the pod's NICs",
            ),
            (
                {
                    let mut n = Network::new();
                    n.interfaces.push(iface(&MAC, &[]));
                    let mut r = Route::new();
                    r.destination = "fd00::/8".into();
                    r.gateway = "10.1.0.1".into();
                    r.device_mac = MAC.to_vec();
                    n.routes.push(r);
                    n
                },
                "another family",
            ),
        ];
        for (net, want) in cases {
            let e = Plan::of(&net).err().expect(want).to_string();
            assert!(e.contains(want), "{e} lacks {want}");
        }
    }
}
