//! husk-agent: PID 1 of the husk guest.
//!
//! Mounts the guest's pseudo filesystems and the virtio-fs share, reaps
//! orphans, and serves the husk protocol (ttrpc) on vsock port 1024 until the
//! host asks it to shut the VM down. When it cannot serve, it ends the VM
//! rather than leaving the host waiting on a guest that will never answer.

#![deny(unsafe_op_in_unsafe_fn)]

mod init;
mod log;
mod reaper;
mod server;

use std::process::ExitCode;

fn main() -> ExitCode {
    let clock = init::BootClock::start();
    let is_init = std::process::id() == 1;
    if is_init {
        std::panic::set_hook(Box::new(|info| {
            log_error!("panic: {info}");
            init::power_off();
        }));
        if let Err(e) = init::setup() {
            log_error!("guest setup failed: {e}");
            init::power_off();
        }
    }

    // Blocked before any thread starts, so every thread inherits the mask and
    // SIGCHLD is only ever consumed through the reaper's signalfd.
    let reaper = match reaper::Reaper::start() {
        Ok(r) => r,
        Err(e) => return fail(is_init, &format!("cannot start the child reaper: {e}")),
    };

    match server::serve(clock, reaper) {
        Ok(()) => {
            log_info!("shutdown requested; ending the VM");
            if is_init {
                init::power_off();
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(is_init, &format!("cannot serve: {e}")),
    }
}

fn fail(is_init: bool, msg: &str) -> ExitCode {
    log_error!("{msg}");
    if is_init {
        init::power_off();
    }
    ExitCode::FAILURE
}
