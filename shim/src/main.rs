//! containerd-shim-husk-v2: containerd's shim v2 for husk. One shim and one
//! microVM per pod (a `ctr run` is a one-container pod). The ttrpc Task
//! service logs and delegates to plain functions in `task`.

#![deny(unsafe_op_in_unsafe_fn)]

mod task;

#[tokio::main]
async fn main() {
    // No reaper and no subreaper. containerd-shim's reaper answers SIGCHLD
    // with waitpid(-1), which takes the exit status of every child, the VMM
    // and the device daemons included, before the runtime's own wait for
    // them: a VMM that died during boot showed as "waiting for exit: No
    // child processes" instead of its exit and console (seen with 20 pods
    // starting at once). husk waits for each child it starts; the pod's
    // processes live in the guest, so nothing is reparented to the shim that
    // it should reap, and orphans go to init.
    let config = containerd_shim::Config {
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    containerd_shim::asynchronous::run::<task::HuskShim>("io.containerd.husk.v2", Some(config))
        .await;
}
