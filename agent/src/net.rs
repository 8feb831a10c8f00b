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
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use husk_protocol::containers::{Interface, Network};
use netlink_packet_core::{
    DecodeError, NetlinkHeader, NetlinkMessage, NetlinkPayload, Parseable, NLM_F_ACK, NLM_F_APPEND,
    NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressMessageBuffer,
};
use netlink_packet_route::link::{
    AfSpecInet6, AfSpecUnspec, Inet6IfaceFlags, LinkAttribute, LinkFlags, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAttribute, NeighbourMessage, NeighbourMessageBuffer, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteMessageBuffer, RouteNextHopFlags,
    RouteType,
};
use netlink_packet_route::rule::{RuleAttribute, RuleMessage, RuleMessageBuffer};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::protocols::NETLINK_ROUTE;
use netlink_sys::{Socket, SocketAddr};

/// Brings `lo` up in the network namespace of process `pid`.
pub fn loopback_up(pid: i32) -> io::Result<()> {
    in_netns_of(pid, |nl| {
        let lo = nl
            .links()?
            .into_iter()
            .find(|l| l.header.flags.contains(LinkFlags::Loopback))
            .ok_or_else(|| io::Error::other("the namespace has no loopback"))?;
        nl.set_link(lo.header.index, None, None)
    })
}

/// Moves each NIC of `net` (found by MAC in the agent's own namespace) into
/// the network namespace of process `pid` and makes that namespace a copy
/// of the pod's on the host: links, addresses, routes of every table,
/// policy rules, permanent neighbours and sysctls. The description comes
/// from the host; every field is checked before anything changes.
pub fn configure(pid: i32, net: &Network, spec_sysctls: &[String]) -> io::Result<()> {
    let mut plan = Plan::of(net)?;
    // The container spec's own sysctls are applied as runc applies them,
    // after CNI: the copy leaves them.
    plan.sysctls
        .retain(|(key, _)| !spec_sysctls.iter().any(|s| *s == dotted(key)));
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

/// At most this many messages of each kind, or sysctls, from the host.
const MAX_ITEMS: usize = 4096;

/// What [`configure`] sets up, parsed and checked; link indexes are still
/// the pod namespace's on the host.
struct Plan {
    nics: Vec<Nic>,
    addresses: Vec<AddressMessage>,
    routes: Vec<RouteMessage>,
    rules: Vec<RuleMessage>,
    neighbours: Vec<NeighbourMessage>,
    sysctls: Vec<(String, String)>,
}

struct Nic {
    mac: Vec<u8>,
    name: String,
    mtu: u32,
    /// The link's index in the pod's namespace on the host.
    host_index: u32,
    flags: LinkFlags,
    txqlen: u32,
}

/// The link flags a NIC copies (and only those are changed).
const COPIED_FLAGS: LinkFlags = LinkFlags::Promisc
    .union(LinkFlags::Allmulti)
    .union(LinkFlags::Noarp)
    .union(LinkFlags::Multicast);

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

/// Interface names: 1 to 15 bytes, no '/', ':', whitespace or control.
fn valid_ifname(name: &str) -> bool {
    (1..16).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// A sysctl key: a relative path under `/proc/sys/net`, each part a name.
fn valid_sysctl(key: &str) -> bool {
    key.starts_with("net/")
        && key.len() < 256
        && key.split('/').all(|p| {
            !p.is_empty() && p != "." && p != ".." && p.bytes().all(|b| b.is_ascii_graphic())
        })
}

/// Parses each of `raw` with `parse`, at most [`MAX_ITEMS`], naming `what`.
fn parse_all<T>(
    raw: &[Vec<u8>],
    what: &str,
    parse: impl Fn(&[u8]) -> Result<T, DecodeError>,
) -> io::Result<Vec<T>> {
    if raw.len() > MAX_ITEMS {
        return Err(bad(format!("{} {what}s: at most {MAX_ITEMS}", raw.len())));
    }
    raw.iter()
        .enumerate()
        .map(|(i, b)| parse(b).map_err(|e| bad(format!("{what} {i}: {e}"))))
        .collect()
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

/// `table`, whether in the attribute or the header.
fn route_table(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(m.header.table.into())
}

/// The `local` table: the kernel fills it from the addresses.
const RT_TABLE_LOCAL: u32 = 255;

impl Plan {
    fn of(net: &Network) -> io::Result<Plan> {
        if net.interfaces.len() > 64 {
            return Err(bad(format!(
                "{} interfaces: at most 64",
                net.interfaces.len()
            )));
        }
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
            if i.index == 0 {
                return Err(bad(format!("{what}: no link index")));
            }
            Ok(Nic {
                mac,
                name: i.name.clone(),
                mtu: i.mtu,
                host_index: i.index,
                flags: LinkFlags::from_bits_retain(i.flags) & COPIED_FLAGS,
                txqlen: i.txqlen,
            })
        };
        let nics: Vec<Nic> = net.interfaces.iter().map(nic).collect::<io::Result<_>>()?;
        let known = |index: u32, what: &dyn Fn() -> String| -> io::Result<()> {
            if nics.iter().any(|n| n.host_index == index) {
                Ok(())
            } else {
                Err(bad(format!(
                    "{}: link {index} is none of the pod's NICs",
                    what()
                )))
            }
        };
        let addresses = parse_all(&net.addresses, "address", |b| {
            AddressMessage::parse(&AddressMessageBuffer::new_checked(&b)?)
        })?;
        for a in &addresses {
            known(a.header.index, &|| {
                format!("address {}", describe_address(a))
            })?;
        }
        let routes = parse_all(&net.routes, "route", |b| {
            RouteMessage::parse(&RouteMessageBuffer::new_checked(&b)?)
        })?;
        for r in &routes {
            if route_table(r) == RT_TABLE_LOCAL {
                return Err(bad(format!(
                    "route {}: table local is the kernel's",
                    describe_route(r)
                )));
            }
            for index in route_links(r) {
                known(index, &|| format!("route {}", describe_route(r)))?;
            }
        }
        let rules = parse_all(&net.rules, "rule", |b| {
            RuleMessage::parse(&RuleMessageBuffer::new_checked(&b)?)
        })?;
        let neighbours = parse_all(&net.neighbours, "neighbour", |b| {
            NeighbourMessage::parse(&NeighbourMessageBuffer::new_checked(&b)?)
        })?;
        for n in &neighbours {
            known(n.header.ifindex, &|| "a neighbour".to_owned())?;
        }
        if net.sysctls.len() > MAX_ITEMS {
            return Err(bad(format!(
                "{} sysctls: at most {MAX_ITEMS}",
                net.sysctls.len()
            )));
        }
        let sysctls = net
            .sysctls
            .iter()
            .map(|s| {
                if !valid_sysctl(&s.key) {
                    return Err(bad(format!("sysctl {:?} is not a key under net/", s.key)));
                }
                if s.value.len() > 4096 || s.value.contains('\n') {
                    return Err(bad(format!("sysctl {}: value is not one line", s.key)));
                }
                Ok((s.key.clone(), s.value.clone()))
            })
            .collect::<io::Result<_>>()?;
        Ok(Plan {
            nics,
            addresses,
            routes,
            rules,
            neighbours,
            sysctls,
        })
    }

    /// Configures the moved NICs and the namespace, in the calling thread's
    /// namespace: links, addresses, routes, rules, neighbours, sysctls.
    fn apply(&self, nl: &mut Netlink) -> io::Result<()> {
        let ipv6_events = ipv6_link_events()?;
        let links = nl.links()?;
        let mut map = Vec::new();
        let taken = |name: &str| links.iter().any(|l| link_name(l) == Some(name));
        for nic in &self.nics {
            let what = || format!("NIC {}", mac_string(&nic.mac));
            let link = find_by_mac(&links, &nic.mac)
                .ok_or_else(|| io::Error::other(format!("{} did not arrive", what())))?;
            let index = link.header.index;
            let current = link_name(link);
            let rename =
                (!nic.name.is_empty() && current != Some(nic.name.as_str()) && !taken(&nic.name))
                    .then_some(nic.name.as_str());
            // The host ran duplicate address detection; the copy would be
            // held tentative for a second. The sysctl copy sets it back
            // (the conf directory follows the NIC's rename).
            if let Some(name) = current {
                let _ = write_sysctl(&format!("net/ipv6/conf/{name}/accept_dad"), "0");
            }
            nl.set_link(index, rename, Some(nic))
                .map_err(|e| context(e, format!("{}: MTU {} and up", what(), nic.mtu)))?;
            map.push((nic.host_index, index));
        }
        let ours: Vec<u32> = map.iter().map(|(_, g)| *g).collect();
        // IPv6 sets a link up (its own link-local address from the MAC)
        // once the link is operationally up, which the kernel's link watch
        // learns in a worker of its own a moment after `up`. The copy
        // waits for that: started before it, a NIC whose MAC CNI changed
        // (the tuning plugin) would end with the host's link-local address
        // and, a moment later, the kernel's as well.
        wait_ipv6_ready(nl, &ipv6_events, &ours)?;
        let guest = |host: u32| map.iter().find(|(h, _)| *h == host).map_or(0, |(_, g)| *g);
        self.copy_addresses(nl, &guest, &ours)?;
        self.copy_routes(nl, &guest, &ours)?;
        self.copy_rules(nl)?;
        for n in &self.neighbours {
            let mut m = NeighbourMessage::default();
            m.header = n.header.clone();
            m.header.ifindex = guest(n.header.ifindex);
            m.header.state = NeighbourState::Permanent;
            m.attributes = n
                .attributes
                .iter()
                .filter(|a| {
                    matches!(
                        a,
                        NeighbourAttribute::Destination(_)
                            | NeighbourAttribute::LinkLayerAddress(_)
                    )
                })
                .cloned()
                .collect();
            nl.request(
                RouteNetlinkMessage::NewNeighbour(m),
                NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
            )
            .map_err(|e| context(e, "a permanent neighbour".to_owned()))?;
        }
        for (key, value) in &self.sysctls {
            copy_sysctl(key, value)?;
        }
        Ok(())
    }

    /// Makes the NICs' addresses the host's: adds what is missing (the
    /// kernel's own link-local address is usually there already), removes
    /// what the host does not have.
    fn copy_addresses(
        &self,
        nl: &mut Netlink,
        guest: &dyn Fn(u32) -> u32,
        ours: &[u32],
    ) -> io::Result<()> {
        let wanted: Vec<AddressMessage> = self
            .addresses
            .iter()
            .map(|a| {
                let mut m = AddressMessage::default();
                m.header = a.header.clone();
                m.header.index = guest(a.header.index);
                m.header.flags &= AddressHeaderFlags::Nodad
                    | AddressHeaderFlags::Optimistic
                    | AddressHeaderFlags::Homeaddress;
                m.attributes = a
                    .attributes
                    .iter()
                    .filter_map(|x| match x {
                        AddressAttribute::Flags(f) => Some(AddressAttribute::Flags(
                            *f & (AddressFlags::Nodad
                                | AddressFlags::Optimistic
                                | AddressFlags::Homeaddress
                                | AddressFlags::Managetempaddr
                                | AddressFlags::Noprefixroute
                                | AddressFlags::Mcautojoin),
                        )),
                        AddressAttribute::Address(_)
                        | AddressAttribute::Local(_)
                        | AddressAttribute::Label(_)
                        | AddressAttribute::Broadcast(_)
                        | AddressAttribute::CacheInfo(_)
                        | AddressAttribute::RoutePriority(_) => Some(x.clone()),
                        _ => None,
                    })
                    .collect();
                m
            })
            .collect();
        let have: Vec<AddressMessage> = nl
            .addresses()
            .map_err(|e| context(e, "listing the guest's addresses".to_owned()))?
            .into_iter()
            .filter(|a| ours.contains(&a.header.index))
            .collect();
        for h in &have {
            if !wanted.iter().any(|w| address_key(w) == address_key(h)) {
                nl.request(RouteNetlinkMessage::DelAddress(h.clone()), NLM_F_ACK)
                    .map_err(|e| context(e, format!("removing address {}", describe_address(h))))?;
            }
        }
        for w in &wanted {
            if !have.iter().any(|h| address_key(w) == address_key(h)) {
                nl.change(RouteNetlinkMessage::NewAddress(w.clone()))
                    .map_err(|e| context(e, format!("address {}", describe_address(w))))?;
            }
        }
        Ok(())
    }

    /// Makes the routes of the NICs (every table but `local`) and the
    /// device-less ones the host's: removes what the host does not have
    /// (a prefix route CNI deleted), then adds what is missing, those
    /// whose gateway another route must reach first in a later round.
    fn copy_routes(
        &self,
        nl: &mut Netlink,
        guest: &dyn Fn(u32) -> u32,
        ours: &[u32],
    ) -> io::Result<()> {
        let wanted: Vec<RouteMessage> = self.routes.iter().map(|r| guest_route(r, guest)).collect();
        let have: Vec<RouteMessage> = nl
            .routes()
            .map_err(|e| context(e, "listing the guest's routes".to_owned()))?
            .into_iter()
            .filter(|r| {
                let through = route_links(r);
                route_table(r) != RT_TABLE_LOCAL
                    && !r.header.flags.contains(RouteFlags::Cloned)
                    && (through.iter().any(|i| ours.contains(i))
                        || (through.is_empty() && r.header.kind != RouteType::Unicast))
            })
            .collect();
        for h in &have {
            if !wanted.iter().any(|w| route_key(w) == route_key(h)) {
                nl.request(RouteNetlinkMessage::DelRoute(h.clone()), NLM_F_ACK)
                    .map_err(|e| context(e, format!("removing route {}", describe_route(h))))?;
            }
        }
        let mut pending: Vec<&RouteMessage> = wanted
            .iter()
            .filter(|w| !have.iter().any(|h| route_key(w) == route_key(h)))
            .collect();
        while !pending.is_empty() {
            let mut failed = Vec::new();
            let mut last = None;
            for r in &pending {
                // IPv4 keeps a second route to a prefix (CNI's own beside
                // the kernel's) only when appended; IPv6 takes it as is.
                let flags = if r.header.address_family == AddressFamily::Inet {
                    NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND
                } else {
                    NLM_F_ACK | NLM_F_CREATE
                };
                if let Err(e) = nl.request(RouteNetlinkMessage::NewRoute((*r).clone()), flags) {
                    failed.push(*r);
                    last = Some(context(e, format!("route {}", describe_route(r))));
                }
            }
            if failed.len() == pending.len() {
                return Err(last.unwrap_or_else(|| io::Error::other("routes")));
            }
            pending = failed;
        }
        Ok(())
    }

    /// Makes the policy rules the host's.
    fn copy_rules(&self, nl: &mut Netlink) -> io::Result<()> {
        let wanted: Vec<RuleMessage> = self.rules.iter().map(guest_rule).collect();
        let have = match nl.rules() {
            Ok(have) => have,
            // A guest kernel without policy routing (an operator's own,
            // built without CONFIG_IP_MULTIPLE_TABLES) has the default
            // rules' behaviour and nothing else.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                let extra: Vec<_> = wanted.iter().filter(|w| !is_default_rule(w)).collect();
                if extra.is_empty() {
                    return Ok(());
                }
                return Err(io::Error::other(format!(
                    "the pod has policy rules ({:?}) and the guest kernel has no policy routing (CONFIG_IP_MULTIPLE_TABLES)",
                    extra.iter().map(|r| rule_key(r)).collect::<Vec<_>>()
                )));
            }
            Err(e) => return Err(context(e, "listing the guest's policy rules".to_owned())),
        };
        for h in &have {
            if !wanted.iter().any(|w| rule_key(w) == rule_key(h)) {
                nl.request(RouteNetlinkMessage::DelRule(h.clone()), NLM_F_ACK)
                    .map_err(|e| context(e, format!("removing rule {:?}", rule_key(h))))?;
            }
        }
        for w in &wanted {
            if !have.iter().any(|h| rule_key(w) == rule_key(h)) {
                nl.change(RouteNetlinkMessage::NewRule(w.clone()))
                    .map_err(|e| context(e, format!("rule {:?}", rule_key(w))))?;
            }
        }
        Ok(())
    }
}

/// Host route `r` for the guest: its links the guest's, only the flags and
/// attributes a new route takes.
/// How long a NIC may take to come up for IPv6 (carrier, the link watch).
const IPV6_READY_WITHIN: Duration = Duration::from_secs(10);

/// A netlink socket that hears the kernel's IPv6 link announcements: it
/// sends one when it has set a link up for IPv6.
fn ipv6_link_events() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind(&SocketAddr::new(0, libc::RTMGRP_IPV6_IFINFO as u32))?;
    Ok(socket)
}

/// Waits until IPv6 has set up each link of `nics` (the kernel marks the
/// link ready), or is off for it; looks again at each announcement on
/// `events`, opened before the links went up.
fn wait_ipv6_ready(nl: &mut Netlink, events: &Socket, nics: &[u32]) -> io::Result<()> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let deadline = Instant::now() + IPV6_READY_WITHIN;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let links = nl.links()?;
        let waiting: Vec<&str> = links
            .iter()
            .filter(|l| nics.contains(&l.header.index) && !ipv6_settled(l))
            .map(|l| link_name(l).unwrap_or("?"))
            .collect();
        if waiting.is_empty() {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "NIC {} not up for IPv6 within {IPV6_READY_WITHIN:?} (no carrier from the VMM?)",
                    waiting.join(", ")
                ),
            ));
        }
        let ms = u16::try_from(left.as_millis() + 1).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(events.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
        // The announcement says what changed; the dump above says it all.
        // A full queue (ENOBUFS) lost some: the dump sees them too.
        match events.recv(&mut &mut buf[..], libc::MSG_DONTWAIT) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
            Err(e) => return Err(e),
        }
    }
}

/// Whether IPv6 is done setting up link `l`: marked ready, turned off for
/// it, or absent.
fn ipv6_settled(l: &LinkMessage) -> bool {
    let disabled = link_name(l).is_some_and(|name| {
        std::fs::read_to_string(sysctl_path(&format!("net/ipv6/conf/{name}/disable_ipv6")))
            .is_ok_and(|v| v.trim() == "1")
    });
    let flags = l.attributes.iter().find_map(|a| match a {
        LinkAttribute::AfSpecUnspec(specs) => specs.iter().find_map(|s| match s {
            AfSpecUnspec::Inet6(inet6) => inet6.iter().find_map(|x| match x {
                AfSpecInet6::Flags(f) => Some(*f),
                _ => None,
            }),
            _ => None,
        }),
        _ => None,
    });
    disabled || flags.is_none_or(|f| f.contains(Inet6IfaceFlags::Ready))
}

fn guest_route(r: &RouteMessage, guest: &dyn Fn(u32) -> u32) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header = r.header.clone();
    m.header.flags &= RouteFlags::Onlink;
    m.attributes = r
        .attributes
        .iter()
        .filter_map(|a| match a {
            RouteAttribute::Oif(i) => Some(RouteAttribute::Oif(guest(*i))),
            RouteAttribute::MultiPath(hops) => Some(RouteAttribute::MultiPath(
                hops.iter()
                    .map(|h| {
                        let mut h = h.clone();
                        h.interface_index = guest(h.interface_index);
                        h.flags &= RouteNextHopFlags::Onlink;
                        h.attributes.retain(|x| {
                            matches!(x, RouteAttribute::Gateway(_) | RouteAttribute::Realm(_))
                        });
                        h
                    })
                    .collect(),
            )),
            RouteAttribute::Destination(_)
            | RouteAttribute::Source(_)
            | RouteAttribute::Gateway(_)
            | RouteAttribute::PrefSource(_)
            | RouteAttribute::Priority(_)
            | RouteAttribute::Metrics(_)
            | RouteAttribute::Table(_)
            | RouteAttribute::Preference(_)
            | RouteAttribute::Realm(_) => Some(a.clone()),
            _ => None,
        })
        .collect();
    m
}

/// What makes a route the same route: its family, prefixes, TOS, type,
/// table, metric and next hops (not its protocol, scope or source).
fn route_key(r: &RouteMessage) -> (u8, u8, u8, u8, u8, u32, Vec<String>) {
    let mut attrs: Vec<String> = r
        .attributes
        .iter()
        .filter_map(|a| match a {
            RouteAttribute::Destination(_)
            | RouteAttribute::Source(_)
            | RouteAttribute::Gateway(_)
            | RouteAttribute::Oif(_)
            | RouteAttribute::Priority(_) => Some(format!("{a:?}")),
            RouteAttribute::MultiPath(hops) => {
                let mut h: Vec<String> = hops
                    .iter()
                    .map(|h| {
                        let gw = h
                            .attributes
                            .iter()
                            .find(|x| matches!(x, RouteAttribute::Gateway(_)));
                        format!("{}/{gw:?}", h.interface_index)
                    })
                    .collect();
                h.sort();
                Some(format!("multipath {h:?}"))
            }
            _ => None,
        })
        .collect();
    // IPv6 routes always carry a metric, IPv4 ones only when not 0.
    if !r
        .attributes
        .iter()
        .any(|a| matches!(a, RouteAttribute::Priority(_)))
    {
        attrs.push(format!("{:?}", RouteAttribute::Priority(0)));
    }
    attrs.sort();
    (
        u8::from(r.header.address_family),
        r.header.destination_prefix_length,
        r.header.source_prefix_length,
        r.header.tos,
        u8::from(r.header.kind),
        route_table(r),
        attrs,
    )
}

fn describe_route(r: &RouteMessage) -> String {
    let dst = r
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(v4)) => Some(v4.to_string()),
            RouteAttribute::Destination(RouteAddress::Inet6(v6)) => Some(v6.to_string()),
            _ => None,
        })
        .map_or("default".to_owned(), |d| {
            format!("{d}/{}", r.header.destination_prefix_length)
        });
    let via = r
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Gateway(RouteAddress::Inet(v4)) => Some(format!(" via {v4}")),
            RouteAttribute::Gateway(RouteAddress::Inet6(v6)) => Some(format!(" via {v6}")),
            _ => None,
        })
        .unwrap_or_default();
    format!("{dst}{via} (table {}, {:?})", route_table(r), r.header.kind)
}

/// What makes an address the same: its link, family, prefix and address.
fn address_key(a: &AddressMessage) -> (u32, u8, u8, Option<IpAddr>, Option<IpAddr>) {
    let find = |local: bool| {
        a.attributes.iter().find_map(|x| match x {
            AddressAttribute::Local(ip) if local => Some(*ip),
            AddressAttribute::Address(ip) if !local => Some(*ip),
            _ => None,
        })
    };
    (
        a.header.index,
        u8::from(a.header.family),
        a.header.prefix_len,
        find(true),
        find(false),
    )
}

fn describe_address(a: &AddressMessage) -> String {
    let (_, _, len, local, address) = address_key(a);
    local
        .or(address)
        .map_or("(none)".to_owned(), |ip| format!("{ip}/{len}"))
}

/// Host rule `r` for the guest: only the attributes a new rule takes.
fn guest_rule(r: &RuleMessage) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header = r.header.clone();
    m.attributes = r
        .attributes
        .iter()
        .filter(|a| !matches!(a, RuleAttribute::Other(_)))
        .cloned()
        .collect();
    m
}

/// One of the rules every namespace starts with: `from all lookup local`
/// (0), `lookup main` (32766) and, for IPv4, `lookup default` (32767).
fn is_default_rule(r: &RuleMessage) -> bool {
    let priority = r.attributes.iter().find_map(|a| match a {
        RuleAttribute::Priority(p) => Some(*p),
        _ => None,
    });
    let table = r
        .attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(r.header.table.into());
    // The kernel reports "no suppression" as an all-ones value.
    let selectors = r.attributes.iter().any(|a| {
        !matches!(
            a,
            RuleAttribute::Priority(_)
                | RuleAttribute::Table(_)
                | RuleAttribute::Protocol(_)
                | RuleAttribute::SuppressPrefixLen(u32::MAX)
                | RuleAttribute::SuppressIfGroup(u32::MAX)
        )
    });
    r.header.dst_len == 0
        && r.header.src_len == 0
        && !selectors
        && matches!(
            (priority.unwrap_or(0), table),
            (0, 255) | (32766, 254) | (32767, 253)
        )
}

/// What makes a rule the same: its header and selectors (not protocol).
fn rule_key(r: &RuleMessage) -> (String, Vec<String>) {
    let mut attrs: Vec<String> = r
        .attributes
        .iter()
        .filter(|a| !matches!(a, RuleAttribute::Protocol(_) | RuleAttribute::Other(_)))
        .map(|a| format!("{a:?}"))
        .collect();
    attrs.sort();
    (format!("{:?}", r.header), attrs)
}

/// A sysctl path (`net/ipv4/conf/eth0.100/arp_notify`) as sysctl(8) and
/// OCI name it: `/` and `.` swapped (`net.ipv4.conf.eth0/100.arp_notify`).
fn dotted(path: &str) -> String {
    path.chars()
        .map(|c| match c {
            '/' => '.',
            '.' => '/',
            c => c,
        })
        .collect()
}

fn sysctl_path(key: &str) -> std::path::PathBuf {
    std::path::Path::new("/proc/sys").join(key)
}

fn write_sysctl(key: &str, value: &str) -> io::Result<()> {
    std::fs::write(sysctl_path(key), value)
}

/// Writes sysctl `key` when the guest's value differs from the host's. A
/// key the guest kernel lacks is left (the host's kernel may be newer);
/// one it refuses fails the pod, naming it.
fn copy_sysctl(key: &str, value: &str) -> io::Result<()> {
    let Ok(current) = std::fs::read_to_string(sysctl_path(key)) else {
        tracing::debug!(key, "sysctl the guest kernel lacks: not copied");
        return Ok(());
    };
    let words = |s: &str| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
    if words(&current) == words(value) {
        return Ok(());
    }
    write_sysctl(key, value).map_err(|e| {
        context(
            e,
            format!(
                "sysctl {} = {value:?} (the pod's namespace has it; the guest had {:?})",
                key.replace('/', "."),
                current.trim_end()
            ),
        )
    })
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

    /// Renames link `index` to `name` and, with a `nic`, gives it the
    /// NIC's MTU, queue length and copied flags; brings it up.
    fn set_link(&mut self, index: u32, name: Option<&str>, nic: Option<&Nic>) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        if let Some(name) = name {
            m.attributes.push(LinkAttribute::IfName(name.to_owned()));
        }
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        if let Some(nic) = nic {
            m.attributes.push(LinkAttribute::Mtu(nic.mtu));
            if nic.txqlen != 0 {
                m.attributes.push(LinkAttribute::TxQueueLen(nic.txqlen));
            }
            m.header.flags |= nic.flags;
            m.header.change_mask |= COPIED_FLAGS;
        }
        self.request(RouteNetlinkMessage::SetLink(m), NLM_F_ACK)
            .map(drop)
    }

    /// Every address, route (all tables) or rule of the namespace, both
    /// families.
    fn dump(&mut self, msg: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.request(msg, NLM_F_DUMP)
    }

    fn addresses(&mut self) -> io::Result<Vec<AddressMessage>> {
        Ok(self
            .dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))?
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => Some(a),
                _ => None,
            })
            .collect())
    }

    fn routes(&mut self) -> io::Result<Vec<RouteMessage>> {
        Ok(self
            .dump(RouteNetlinkMessage::GetRoute(RouteMessage::default()))?
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => Some(r),
                _ => None,
            })
            .collect())
    }

    fn rules(&mut self) -> io::Result<Vec<RuleMessage>> {
        Ok(self
            .dump(RouteNetlinkMessage::GetRule(RuleMessage::default()))?
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRule(r) => Some(r),
                _ => None,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use husk_protocol::containers::Sysctl;
    use netlink_packet_core::Emitable;

    use super::*;

    const MAC: [u8; 6] = [2, 0x42, 10, 0, 0, 2];
    /// The pod link's index in the host's pod namespace.
    const HOST_INDEX: u32 = 7;

    fn body(m: &impl Emitable) -> Vec<u8> {
        let mut b = vec![0; m.buffer_len()];
        m.emit(&mut b);
        b
    }

    fn network() -> Network {
        let mut n = Network::new();
        let mut i = Interface::new();
        i.mac = MAC.to_vec();
        i.mtu = 1450;
        i.name = "eth0".into();
        i.index = HOST_INDEX;
        i.flags = (LinkFlags::Promisc | LinkFlags::Up).bits();
        n.interfaces.push(i);
        let mut a = AddressMessage::default();
        a.header.family = AddressFamily::Inet;
        a.header.prefix_len = 24;
        a.header.index = HOST_INDEX;
        a.attributes
            .push(AddressAttribute::Local("10.1.0.2".parse().unwrap()));
        n.addresses.push(body(&a));
        n.routes.push(body(&route(HOST_INDEX, Some(0))));
        n
    }

    /// A default route via 10.1.0.1 out of `oif`, with metric `metric`.
    fn route(oif: u32, metric: Option<u32>) -> RouteMessage {
        let mut r = RouteMessage::default();
        r.header.address_family = AddressFamily::Inet;
        r.header.table = 254;
        r.header.kind = RouteType::Unicast;
        r.header.flags = RouteFlags::Onlink | RouteFlags::Linkdown;
        r.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(
                "10.1.0.1".parse().unwrap(),
            )));
        r.attributes.push(RouteAttribute::Oif(oif));
        r.attributes.push(RouteAttribute::Uid(0));
        if let Some(m) = metric {
            r.attributes.push(RouteAttribute::Priority(m));
        }
        r
    }

    #[test]
    fn a_pod_namespace_parses_and_maps_to_the_guests_links() {
        let plan = Plan::of(&network()).unwrap();
        assert_eq!(plan.nics[0].host_index, HOST_INDEX);
        assert_eq!(plan.nics[0].flags, LinkFlags::Promisc, "only copied flags");
        assert_eq!(plan.addresses.len(), 1);
        let r = guest_route(&plan.routes[0], &|h| if h == HOST_INDEX { 3 } else { 0 });
        assert!(r.attributes.contains(&RouteAttribute::Oif(3)), "{r:?}");
        assert_eq!(r.header.flags, RouteFlags::Onlink, "no LINKDOWN on input");
        assert!(
            !r.attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Uid(_))),
            "{r:?}"
        );
    }

    #[test]
    fn a_route_is_the_same_with_metric_0_said_or_not_and_different_by_link() {
        assert_eq!(route_key(&route(3, Some(0))), route_key(&route(3, None)));
        assert_ne!(route_key(&route(3, None)), route_key(&route(4, None)));
        assert_ne!(route_key(&route(3, None)), route_key(&route(3, Some(100))));
    }

    #[test]
    fn a_link_is_settled_for_ipv6_once_marked_ready_or_without_ipv6() {
        let link = |flags: Option<Inet6IfaceFlags>| {
            let mut l = LinkMessage::default();
            // No such link here: its disable_ipv6 sysctl reads as absent.
            l.attributes
                .push(LinkAttribute::IfName("husk-no-such0".to_owned()));
            if let Some(f) = flags {
                l.attributes
                    .push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(
                        vec![AfSpecInet6::Flags(f)],
                    )]));
            }
            l
        };
        assert!(!ipv6_settled(&link(Some(Inet6IfaceFlags::empty()))));
        assert!(ipv6_settled(&link(Some(Inet6IfaceFlags::Ready))));
        assert!(ipv6_settled(&link(None)), "a link without IPv6");
    }

    #[test]
    fn the_rules_every_namespace_starts_with_are_known_as_such() {
        let rule = |priority: Option<u32>, table: u32, extra: Vec<RuleAttribute>| {
            let mut r = RuleMessage::default();
            r.header.family = AddressFamily::Inet;
            r.header.table = table as u8;
            r.attributes.extend(priority.map(RuleAttribute::Priority));
            r.attributes
                .push(RuleAttribute::SuppressPrefixLen(u32::MAX));
            r.attributes.push(RuleAttribute::Table(table));
            r.attributes.extend(extra);
            r
        };
        // As a 6.18 kernel dumps them.
        assert!(is_default_rule(&rule(None, 255, vec![])));
        assert!(is_default_rule(&rule(Some(32766), 254, vec![])));
        assert!(is_default_rule(&rule(Some(32767), 253, vec![])));
        assert!(!is_default_rule(&rule(Some(100), 254, vec![])));
        assert!(!is_default_rule(&rule(
            Some(32766),
            254,
            vec![RuleAttribute::FwMark(1)]
        )));
        assert!(!is_default_rule(&rule(Some(32766), 100, vec![])));
    }

    #[test]
    fn sysctl_paths_are_named_as_sysctl_names_them() {
        assert_eq!(
            dotted("net/ipv4/ip_unprivileged_port_start"),
            "net.ipv4.ip_unprivileged_port_start"
        );
        assert_eq!(
            dotted("net/ipv4/conf/eth0.100/arp_notify"),
            "net.ipv4.conf.eth0/100.arp_notify"
        );
    }

    #[test]
    fn bad_input_is_refused_naming_it() {
        type Spoil = fn(&mut Network);
        let cases: Vec<(Spoil, &str)> = vec![
            (|n| n.interfaces[0].mac = vec![1, 2, 3], "6 bytes"),
            (|n| n.interfaces[0].mtu = 20, "MTU 20"),
            (|n| n.interfaces[0].name = "../x".into(), "interface name"),
            (|n| n.interfaces[0].index = 0, "no link index"),
            (|n| n.addresses[0].truncate(5), "address 0"),
            (
                |n| n.routes.push(body(&route(HOST_INDEX + 1, None))),
                "none of the pod's NICs",
            ),
            (
                |n| {
                    let mut r = route(HOST_INDEX, None);
                    r.attributes.push(RouteAttribute::Table(255));
                    n.routes.push(body(&r));
                },
                "table local",
            ),
            (
                |n| {
                    let mut s = Sysctl::new();
                    s.key = "net/ipv4/../../kernel/core_pattern".into();
                    n.sysctls.push(s);
                },
                "not a key under net/",
            ),
            (
                |n| {
                    let mut s = Sysctl::new();
                    s.key = "kernel/hostname".into();
                    n.sysctls.push(s);
                },
                "not a key under net/",
            ),
            (
                |n| {
                    let mut s = Sysctl::new();
                    s.key = "net/core/somaxconn".into();
                    s.value = "1\n2".into();
                    n.sysctls.push(s);
                },
                "not one line",
            ),
            (|n| n.routes = vec![Vec::new(); MAX_ITEMS + 1], "at most"),
        ];
        for (spoil, want) in cases {
            let mut net = network();
            spoil(&mut net);
            let e = Plan::of(&net).err().expect(want).to_string();
            assert!(e.contains(want), "{e} lacks {want}");
        }
    }
}
