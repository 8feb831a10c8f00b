//! husk-vmm: husk's own minimal KVM VMM.
//!
//! Not implemented yet (issue: "husk-vmm: our own KVM VMM boots the guest").
//! Until then the runtime's `auto` choice uses QEMU, and this binary only
//! answers `--help` and `--version` and refuses to run.

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "husk-vmm",
    version,
    about = "husk's minimal KVM virtual machine monitor (not implemented yet)"
)]
struct Cli {}

fn main() -> ExitCode {
    let _ = Cli::parse();
    eprintln!("husk-vmm: not implemented yet; husk uses the qemu backend (see `husk check`)");
    ExitCode::FAILURE
}
