//! The runtime options containerd passes at create (an `Any` whose bytes a
//! CRI RuntimeClass or `ctr --runtime-config-path` chose). Whatever they
//! hold: no panic, and a path is taken only when it is absolute.

#![no_main]

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim_husk_v2::options::config_path;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, value)) = data.split_first() else {
        return;
    };
    let type_url = match sel % 4 {
        0 => "runtimeoptions.v1.Options",
        1 => "type.googleapis.com/runtimeoptions.v1.Options",
        2 => "",
        _ => "io.containerd.runc.v1.Options",
    };
    let any = Any {
        type_url: type_url.into(),
        value: value.to_vec(),
        ..Default::default()
    };
    if let Ok(Some(p)) = config_path(Some(&any)) {
        assert!(p.is_absolute(), "{p:?} taken as a config path");
    }
});
