//! Misbehaviours on request, compiled only with the `test-hooks` feature
//! (`target/guest/initramfs-test-hooks.cpio`), so end-to-end tests can play
//! a hostile guest with a real kernel and a real agent. Each is switched on
//! by a word on the kernel command line (`guest.kernel_params`).

use std::sync::OnceLock;

/// `husk.test.ignore_sigkill`: a SIGKILL from the host is acknowledged
/// and never sent, so the process runs on and no exit is reported while
/// the agent keeps answering (issue 28: the host must enforce the kill).
const IGNORE_SIGKILL: &str = "husk.test.ignore_sigkill";

fn words() -> &'static [String] {
    static WORDS: OnceLock<Vec<String>> = OnceLock::new();
    WORDS.get_or_init(|| {
        std::fs::read_to_string("/proc/cmdline")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    })
}

/// Whether a signal request for `signal` is to be answered without
/// being sent.
pub fn drops_signal(signal: u32) -> bool {
    signal == libc::SIGKILL as u32 && words().iter().any(|w| w == IGNORE_SIGKILL)
}
