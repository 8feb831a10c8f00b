//! The parts of the shim that stand alone: decoding the runtime options
//! containerd sends at create (a library so the fuzzer can reach it).

#![deny(unsafe_op_in_unsafe_fn)]

pub mod options;
