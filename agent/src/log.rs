//! Minimal console logging. The agent's stderr is the guest serial console,
//! which the host keeps in the sandbox's console log.

/// Logs an informational line to the console.
#[macro_export]
macro_rules! log_info {
    ($($arg:tt)*) => { eprintln!("husk-agent: {}", format_args!($($arg)*)) };
}

/// Logs an error line to the console.
#[macro_export]
macro_rules! log_error {
    ($($arg:tt)*) => { eprintln!("husk-agent: error: {}", format_args!($($arg)*)) };
}
