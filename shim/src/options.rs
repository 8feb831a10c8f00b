//! The runtime options containerd passes at create: CRI's
//! `runtimeoptions.v1.Options` (`ConfigPath` in a RuntimeClass handler's
//! options, or `ctr run --runtime-config-path`), which names the husk config
//! file for this container instead of HUSK_CONFIG or /etc/husk/config.toml.

use std::path::{Path, PathBuf};

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::CodedInputStream;

/// The type containerd's CRI plugin (and ctr) send for non-runc runtimes.
const OPTIONS_TYPE: &str = "runtimeoptions.v1.Options";
/// Field number of `config_path` in runtimeoptions.v1.Options.
const CONFIG_PATH_FIELD: u32 = 2;
/// File in the bundle recording the config path, for `delete` after the
/// shim died.
const SAVED: &str = "husk-config-path";

/// The config path named by the create options, if any.
pub fn config_path(options: Option<&Any>) -> Result<Option<PathBuf>, String> {
    let Some(any) = options else {
        return Ok(None);
    };
    if any.type_url.is_empty() && any.value.is_empty() {
        return Ok(None);
    }
    if any.type_url.trim_start_matches("type.googleapis.com/") != OPTIONS_TYPE {
        return Err(format!(
            "runtime options of type {:?} are not understood; husk takes {OPTIONS_TYPE} (ConfigPath)",
            any.type_url
        ));
    }
    let path = decode_string_field(&any.value, CONFIG_PATH_FIELD)
        .map_err(|e| format!("runtime options: {e}"))?;
    match path {
        None => Ok(None),
        Some(p) if p.is_empty() => Ok(None),
        Some(p) if !p.starts_with('/') => Err(format!(
            "runtime option ConfigPath {p:?} is not an absolute path"
        )),
        Some(p) => Ok(Some(PathBuf::from(p))),
    }
}

/// Finds string field `field` in a protobuf message, skipping others.
fn decode_string_field(bytes: &[u8], field: u32) -> Result<Option<String>, String> {
    let mut input = CodedInputStream::from_bytes(bytes);
    let mut found = None;
    while !input.eof().map_err(|e| e.to_string())? {
        let tag = input.read_raw_varint32().map_err(|e| e.to_string())?;
        let (number, wire_type) = (tag >> 3, tag & 7);
        if number == field && wire_type == 2 {
            found = Some(input.read_string().map_err(|e| e.to_string())?);
            continue;
        }
        match wire_type {
            0 => drop(input.read_raw_varint64().map_err(|e| e.to_string())?),
            1 => drop(
                input
                    .read_raw_little_endian64()
                    .map_err(|e| e.to_string())?,
            ),
            2 => drop(input.read_bytes().map_err(|e| e.to_string())?),
            5 => drop(
                input
                    .read_raw_little_endian32()
                    .map_err(|e| e.to_string())?,
            ),
            t => return Err(format!("unsupported protobuf wire type {t}")),
        }
    }
    Ok(found)
}

pub fn save_config_path(bundle: &Path, config: &Path) -> Result<(), String> {
    std::fs::write(bundle.join(SAVED), config.as_os_str().as_encoded_bytes())
        .map_err(|e| format!("recording ConfigPath in {}: {e}", bundle.display()))
}

pub fn saved_config_path(bundle: &Path) -> Option<PathBuf> {
    let s = std::fs::read_to_string(bundle.join(SAVED)).ok()?;
    s.starts_with('/').then(|| PathBuf::from(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(fields: &[(u8, &str)]) -> Any {
        let mut value = Vec::new();
        for (n, s) in fields {
            value.push((n << 3) | 2);
            value.push(s.len() as u8);
            value.extend_from_slice(s.as_bytes());
        }
        let mut a = Any::new();
        a.type_url = OPTIONS_TYPE.into();
        a.value = value;
        a
    }

    #[test]
    fn config_path_is_read_from_runtime_options() {
        let a = options(&[(1, "io.containerd.husk.v2"), (2, "/etc/husk/pod.toml")]);
        assert_eq!(
            config_path(Some(&a)).unwrap(),
            Some(PathBuf::from("/etc/husk/pod.toml"))
        );
        assert_eq!(config_path(None).unwrap(), None);
        assert_eq!(config_path(Some(&options(&[(1, "x")]))).unwrap(), None);
    }

    #[test]
    fn bad_options_are_refused_with_their_name() {
        let e = config_path(Some(&options(&[(2, "relative.toml")]))).unwrap_err();
        assert!(e.contains("relative.toml") && e.contains("absolute"), "{e}");
        let mut a = options(&[(2, "/x")]);
        a.type_url = "containerd.runc.v1.Options".into();
        assert!(config_path(Some(&a)).unwrap_err().contains("runc"));
        let mut a = options(&[]);
        a.value = vec![0x12, 0x50, b'a'];
        assert!(config_path(Some(&a)).is_err(), "truncated field");
    }

    #[test]
    fn saved_path_round_trips() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(saved_config_path(d.path()), None);
        save_config_path(d.path(), Path::new("/etc/husk/a.toml")).unwrap();
        assert_eq!(
            saved_config_path(d.path()),
            Some(PathBuf::from("/etc/husk/a.toml"))
        );
    }
}
