//! The virtio-net data path fed by a guest: descriptor tables, available
//! rings and buffers all come from the input (64 KiB of guest memory), and
//! frames arrive on the "tap" for the receive queue. Malformed chains must
//! end in an error for that chain, never a panic or a read outside memory.

#![no_main]

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use husk_vmm::net::Worker;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM: usize = 64 << 10;

// Queues (see common::queue): transmit at 0, receive at 0x400.
mod common;
use common::queue;

fuzz_target!(|data: &[u8]| {
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let size = 1u16 << (head % 5);
    // The tail of the input beyond guest memory: frames for the receive
    // queue, each prefixed by its length byte.
    let (memory, frames) = rest.split_at(rest.len().min(MEM));
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).expect("memory");
    mem.write_slice(memory, GuestAddress(0)).expect("fill");
    let (ours, peer) = UnixDatagram::pair().expect("socketpair");
    ours.set_nonblocking(true).expect("nonblocking");
    peer.set_nonblocking(true).expect("nonblocking");
    let mut frames = frames;
    while let Some((&len, tail)) = frames.split_first() {
        let (frame, tail) = tail.split_at(usize::from(len).min(tail.len()));
        let _ = peer.send(frame);
        frames = tail;
    }
    let tap = Arc::new(File::from(OwnedFd::from(ours)));
    let call = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let queues = [queue(0x400, size), queue(0, size)];
    let mtu = 68 + u16::from(head) * 8;
    let Ok(mut worker) = Worker::new(mem, &queues, tap, call, mtu) else {
        return;
    };
    for _ in 0..4 {
        let tx = worker.process_tx();
        let rx = worker.process_rx();
        if tx.is_err() || rx.is_err() {
            break;
        }
    }
});
