//! How husk confines the host processes it starts: the jail (namespaces,
//! an own root, dropped capabilities, rlimits), seccomp policies, spawning
//! under them, and the report of what actually confines each running
//! process (`husk check`).

pub mod ids;
pub mod jail;
pub mod pidns;
pub mod process;
pub mod report;
pub mod seccomp;
