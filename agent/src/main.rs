//! husk-agent: PID 1 of the husk guest.
//!
//! Mounts the guest's pseudo filesystems and the virtio-fs share, reaps
//! orphans, and serves the husk protocol (ttrpc) on vsock port 1024 until the
//! host asks it to shut the VM down. When it cannot serve, it ends the VM
//! rather than leaving the host waiting on a guest that will never answer.

#![deny(unsafe_op_in_unsafe_fn)]

mod cgroup;
mod containers;
mod forward;
mod init;
mod net;
mod reaper;
mod server;
mod stdio;
mod tenant;
#[cfg(feature = "test-hooks")]
mod test_hooks;
mod volumes;
mod zygote;

use std::process::ExitCode;

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::prelude::*;
use tracing_subscriber::reload;

/// What reaches the console: the agent's own events from info up, other
/// crates' (libcontainer's) from warn up; with `debug`, everything from
/// debug up.
fn console_filter(debug: bool) -> Targets {
    if debug {
        Targets::new().with_default(LevelFilter::DEBUG)
    } else {
        Targets::new()
            .with_target("husk_agent", LevelFilter::INFO)
            .with_default(LevelFilter::WARN)
    }
}

fn main() -> ExitCode {
    // The console (the guest's serial port, which the host keeps in the
    // sandbox's console log) is the one place the agent logs to, through
    // tracing, from the first line on; each event names its module.
    let (filter, console_level) = reload::Layer::new(console_filter(false));
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .without_time(),
        )
        .init();
    let is_init = std::process::id() == 1;
    let args: Vec<String> = std::env::args().collect();
    let switched = args.get(1).is_some_and(|a| a == init::SWITCHED_ARG);
    let boottime_at_init = if switched {
        args.get(2)
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(init::boottime_ns)
    } else {
        init::boottime_ns()
    };
    if is_init && !switched {
        let e = init::switch_root(boottime_at_init);
        tracing::error!("moving off the initramfs: {e}");
        init::power_off();
    }
    let clock = init::BootClock::start(boottime_at_init);
    if is_init {
        std::panic::set_hook(Box::new(|info| {
            tracing::error!("panic: {info}");
            init::power_off();
        }));
        if let Err(e) = init::setup() {
            tracing::error!("guest setup failed: {e}");
            init::power_off();
        }
    }
    // After setup: /proc is mounted. `husk.debug` on the kernel command
    // line raises every crate's level (libcontainer's too).
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if cmdline.split_whitespace().any(|w| w == "husk.debug") {
        let _ = console_level.reload(console_filter(true));
    }

    if is_init {
        if let Err(e) = init::apply_page_reporting_order(&cmdline) {
            tracing::error!("{e}");
        }
    }

    // Forked while the agent is still single-threaded (see zygote.rs).
    let zygote = match zygote::start() {
        Ok(z) => z,
        Err(e) => return fail(is_init, &format!("cannot start the zygote: {e}")),
    };
    // Blocked before any thread starts, so every thread inherits the mask and
    // SIGCHLD is only ever consumed through the reaper's signalfd.
    let reaper = match reaper::Reaper::start() {
        Ok(r) => r,
        Err(e) => return fail(is_init, &format!("cannot start the child reaper: {e}")),
    };

    match server::serve(clock, reaper, zygote) {
        Ok(()) => {
            tracing::info!("shutdown requested; ending the VM");
            if is_init {
                init::power_off();
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(is_init, &format!("cannot serve: {e}")),
    }
}

fn fail(is_init: bool, msg: &str) -> ExitCode {
    tracing::error!("{msg}");
    if is_init {
        init::power_off();
    }
    ExitCode::FAILURE
}
