//! containerd-shim-husk-v2: containerd's shim v2 for husk.
//!
//! Not implemented yet (issue: "containerd shim v2"); it refuses to start so
//! containerd reports a clear error instead of hanging.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "containerd-shim-husk-v2: not implemented yet; `husk vm-ping` boots a sandbox VM today"
    );
    ExitCode::FAILURE
}
