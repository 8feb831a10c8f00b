//! containerd-shim-husk-v2: containerd's shim v2 for husk. One shim and one
//! microVM per container (a `ctr run` is a one-container pod). The ttrpc Task
//! service logs and delegates to plain functions in `task`.

#![deny(unsafe_op_in_unsafe_fn)]

mod options;
mod task;

#[tokio::main]
async fn main() {
    containerd_shim::asynchronous::run::<task::HuskShim>("io.containerd.husk.v2", None).await;
}
