//! Compiles the ttrpc service definitions in `protos/` into Rust.
//!
//! The generated files carry inner attributes (`#![allow(..)]`), which
//! `include!` cannot take; they are folded into one `generated.rs` with each
//! file wrapped in its own module, so `super::health::X` references between
//! them keep working.

use std::fs;
use std::path::{Path, PathBuf};

const PROTOS: &[&str] = &[
    "protos/health.proto",
    "protos/agent.proto",
    "protos/containers.proto",
];

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let raw = out.join("raw");
    fs::create_dir_all(&raw).expect("create OUT_DIR/raw");

    ttrpc_codegen::Codegen::new()
        .out_dir(&raw)
        .inputs(PROTOS)
        .include("protos")
        .rust_protobuf()
        .customize(ttrpc_codegen::Customize::default())
        .run()
        .expect("ttrpc codegen");

    let mut combined = String::new();
    let mut names: Vec<_> = fs::read_dir(&raw)
        .expect("read generated dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs") && !p.ends_with("mod.rs"))
        .collect();
    names.sort();
    for path in names {
        combined.push_str(&wrap_module(&path));
    }
    fs::write(out.join("generated.rs"), combined).expect("write generated.rs");

    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}

fn wrap_module(path: &Path) -> String {
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .expect("utf-8 file name");
    let text = fs::read_to_string(path).expect("read generated file");
    let body: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("#!["))
        .map(|l| format!("{l}\n"))
        .collect();
    format!(
        "#[allow(clippy::all, unused, missing_docs, non_camel_case_types, non_snake_case, \
         non_upper_case_globals, unsafe_op_in_unsafe_fn)]\npub mod {name} {{\n{body}}}\n"
    )
}
