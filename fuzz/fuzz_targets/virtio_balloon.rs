//! husk-vmm's virtio-balloon fed by a guest: the descriptor tables,
//! available rings, free page reports and inflated PFNs all come from the
//! input (the first 64 KiB of a 64 MiB memfd-backed guest RAM). Whatever
//! the guest writes, the worker must not panic, loop, read outside guest
//! memory, or give back a page that is not guest RAM: the memfd must keep
//! its size, and only whole pages may have been given back.

#![no_main]

use husk_vmm::balloon::{Backing, Worker};
use husk_vmm::memory::GuestRam;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const INPUT: usize = 64 << 10;

// Queues (see common::queue): inflate at 0, deflate at 0x400, reporting at 0x800.
mod common;
use common::queue;

fuzz_target!(|data: &[u8]| {
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let size = 1u16 << (head % 5);
    let memory = &rest[..rest.len().min(INPUT)];
    let ram = GuestRam::new(64).expect("guest RAM");
    ram.memory
        .write_slice(memory, GuestAddress(0))
        .expect("fill");
    let backing = Backing::new(&ram).expect("backing");
    let call = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let queues = [queue(0, size), queue(0x400, size), queue(0x800, size)];
    let Ok(mut worker) = Worker::new(ram.memory.clone(), &queues, backing.clone(), call) else {
        return;
    };
    for _ in 0..4 {
        if !worker.process() {
            break;
        }
    }
    let len = ram.memfd.metadata().expect("memfd").len();
    assert_eq!(len, ram.size, "the memfd changed size");
    assert_eq!(backing.discarded() % 4096, 0, "part of a page given back");
});
