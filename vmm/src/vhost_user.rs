//! virtio devices served by vhost-user daemons (virtiofsd,
//! vhost-device-vsock) behind the virtio-mmio transport. The VMM keeps the
//! register file and the config space; once the guest driver is ready the
//! frontend hands the daemon the guest memory (memfd), the rings, a kick
//! eventfd per queue (an ioeventfd on the QueueNotify register) and the call
//! eventfd (an irqfd on the device's interrupt line). Data never passes
//! through the VMM.

use std::path::{Path, PathBuf};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::virtio_mmio::{QueueConfig, VirtioDevice, F_VERSION_1};

/// VHOST_USER_F_PROTOCOL_FEATURES: a vhost-user bit, not a virtio one.
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// Queue size offered to the guest.
const QUEUE_SIZE: u16 = 128;
/// virtio-fs tags are at most 36 bytes.
pub const FS_TAG_MAX: usize = 36;

/// Which device a daemon serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// virtio-fs (type 26): hiprio + one request queue; config = tag.
    Fs { tag: String },
    /// virtio-vsock (type 19): rx, tx, event; config = guest CID.
    Vsock { guest_cid: u64 },
}

impl Kind {
    fn device_type(&self) -> u32 {
        match self {
            Kind::Fs { .. } => 26,
            Kind::Vsock { .. } => 19,
        }
    }

    fn queues(&self) -> usize {
        match self {
            Kind::Fs { .. } => 2,
            Kind::Vsock { .. } => 3,
        }
    }

    /// The device's config space, as the guest reads it.
    pub fn config(&self) -> Result<Vec<u8>, VhostUserError> {
        match self {
            Kind::Fs { tag } => {
                if tag.is_empty() || tag.len() > FS_TAG_MAX {
                    return Err(VhostUserError::Tag(tag.clone()));
                }
                let mut c = vec![0u8; FS_TAG_MAX + 4];
                c[..tag.len()].copy_from_slice(tag.as_bytes());
                c[FS_TAG_MAX..].copy_from_slice(&1u32.to_le_bytes());
                Ok(c)
            }
            Kind::Vsock { guest_cid } => {
                if *guest_cid < 3 || *guest_cid > u32::MAX as u64 {
                    return Err(VhostUserError::Cid(*guest_cid));
                }
                Ok(guest_cid.to_le_bytes().to_vec())
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error("vhost-user socket {path}: {source}; is the daemon running?")]
    Connect { path: PathBuf, source: vhost::Error },
    #[error("vhost-user {what} with {path}: {source}")]
    Protocol {
        what: &'static str,
        path: PathBuf,
        source: vhost::Error,
    },
    #[error("the daemon at {0} does not offer VIRTIO_F_VERSION_1")]
    NotModern(PathBuf),
    #[error("virtio-fs tag {0:?} must be 1 to 36 bytes")]
    Tag(String),
    #[error("vsock guest CID {0} is reserved or too large (3 ..= 2^32-1)")]
    Cid(u64),
    #[error("queue {0} has an address outside guest memory")]
    QueueAddress(usize),
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
}

pub struct VhostUserDevice {
    kind: Kind,
    path: PathBuf,
    frontend: Frontend,
    /// Virtio features the daemon offers (the vhost-user bit removed).
    features: u64,
    protocol: bool,
    queue_sizes: Vec<u16>,
    config: Vec<u8>,
    memory: GuestMemoryMmap,
    /// One kick eventfd per queue (registered as ioeventfds by the VMM).
    pub kicks: Vec<EventFd>,
    /// The interrupt eventfd (registered as an irqfd by the VMM).
    pub call: EventFd,
}

impl VhostUserDevice {
    /// Connects to the daemon and learns its features.
    pub fn connect(
        kind: Kind,
        path: &Path,
        memory: GuestMemoryMmap,
    ) -> Result<Self, VhostUserError> {
        let config = kind.config()?;
        let queues = kind.queues();
        let frontend =
            Frontend::connect(path, queues as u64).map_err(|source| VhostUserError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let proto = |what| {
            let path = path.to_path_buf();
            move |source| VhostUserError::Protocol { what, path, source }
        };
        frontend.set_owner().map_err(proto("SET_OWNER"))?;
        let raw = frontend.get_features().map_err(proto("GET_FEATURES"))?;
        if raw & F_VERSION_1 == 0 {
            return Err(VhostUserError::NotModern(path.to_path_buf()));
        }
        let mut dev = Self {
            kind,
            path: path.to_path_buf(),
            frontend,
            features: raw & !F_PROTOCOL_FEATURES,
            protocol: raw & F_PROTOCOL_FEATURES != 0,
            queue_sizes: vec![QUEUE_SIZE; queues],
            config,
            memory,
            kicks: (0..queues)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK))
                .collect::<Result<_, _>>()
                .map_err(VhostUserError::EventFd)?,
            call: EventFd::new(libc::EFD_NONBLOCK).map_err(VhostUserError::EventFd)?,
        };
        if dev.protocol {
            // No optional protocol features: the rings and memory table are
            // all husk-vmm needs.
            let offered = dev
                .frontend
                .get_protocol_features()
                .map_err(proto("GET_PROTOCOL_FEATURES"))?;
            dev.frontend
                .set_protocol_features(offered & VhostUserProtocolFeatures::empty())
                .map_err(proto("SET_PROTOCOL_FEATURES"))?;
        }
        Ok(dev)
    }

    pub fn kind(&self) -> &Kind {
        &self.kind
    }

    /// Hands the daemon what the guest driver set up: features, memory,
    /// rings, kick and call eventfds.
    pub fn activate(
        &mut self,
        driver_features: u64,
        queues: &[QueueConfig],
    ) -> Result<(), VhostUserError> {
        let path = self.path.clone();
        let proto = |what| {
            let path = path.clone();
            move |source| VhostUserError::Protocol { what, path, source }
        };
        let mut acked = driver_features;
        if self.protocol {
            acked |= F_PROTOCOL_FEATURES;
        }
        self.frontend
            .set_features(acked)
            .map_err(proto("SET_FEATURES"))?;
        let regions: Vec<VhostUserMemoryRegionInfo> = self
            .memory
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<_, _>>()
            .map_err(proto("memory regions"))?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(proto("SET_MEM_TABLE"))?;
        for (i, q) in queues.iter().enumerate().filter(|(_, q)| q.ready) {
            let hva = |gpa: u64| {
                self.memory
                    .get_host_address(GuestAddress(gpa))
                    .map(|p| p as u64)
                    .map_err(|_| VhostUserError::QueueAddress(i))
            };
            let ring = VringConfigData {
                queue_max_size: q.max_size,
                queue_size: q.size,
                flags: 0,
                desc_table_addr: hva(q.desc)?,
                used_ring_addr: hva(q.device)?,
                avail_ring_addr: hva(q.driver)?,
                log_addr: None,
            };
            self.frontend
                .set_vring_num(i, q.size)
                .map_err(proto("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_addr(i, &ring)
                .map_err(proto("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(i, 0)
                .map_err(proto("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(i, &self.call)
                .map_err(proto("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(i, &self.kicks[i])
                .map_err(proto("SET_VRING_KICK"))?;
            if self.protocol {
                self.frontend
                    .set_vring_enable(i, true)
                    .map_err(proto("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.kind.device_type()
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio_mmio::read_config_bytes(&self.config, offset, data);
    }

    /// Both devices' config spaces are read-only for the driver.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_spaces_are_laid_out_as_the_spec_says() {
        let fs = Kind::Fs { tag: "husk".into() }.config().unwrap();
        assert_eq!(fs.len(), 40);
        assert_eq!(&fs[..5], b"husk\0");
        assert_eq!(&fs[36..], &1u32.to_le_bytes());
        let vsock = Kind::Vsock { guest_cid: 3 }.config().unwrap();
        assert_eq!(vsock, 3u64.to_le_bytes());
    }

    #[test]
    fn bad_tags_and_cids_are_refused() {
        assert!(Kind::Fs { tag: String::new() }.config().is_err());
        assert!(Kind::Fs {
            tag: "x".repeat(37)
        }
        .config()
        .is_err());
        assert!(Kind::Vsock { guest_cid: 2 }.config().is_err());
        assert!(Kind::Vsock { guest_cid: 1 << 33 }.config().is_err());
    }

    #[test]
    fn a_missing_daemon_is_named() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let e = VhostUserDevice::connect(
            Kind::Vsock { guest_cid: 3 },
            Path::new("/nonexistent/vsock.sock"),
            mem,
        )
        .err()
        .expect("connected to nothing");
        assert!(e.to_string().contains("/nonexistent/vsock.sock"), "{e}");
    }
}
