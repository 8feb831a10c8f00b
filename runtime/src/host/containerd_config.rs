//! husk's entry in containerd's config (`husk install --containerd-config
//! FILE`): the CRI runtime a Kubernetes RuntimeClass handler names, added
//! or brought up to date in place, or removed, leaving every other byte of
//! the operator's file (comments, order, other runtimes) as it was. Config
//! version 2, the format of containerd 1.6 and 1.7.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use toml_edit::{DocumentMut, Item, Table};

/// containerd's name for husk's shim (`containerd-shim-husk-v2`).
pub const RUNTIME_TYPE: &str = "io.containerd.husk.v2";
/// The CRI plugin's id in a version 2 config.
const CRI_PLUGIN: &str = "io.containerd.grpc.v1.cri";
/// The key under the runtime's `options` that the shim reads its husk
/// config path from.
const CONFIG_PATH: &str = "ConfigPath";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not TOML: {why}")]
    Parse { path: PathBuf, why: String },
    #[error("{path} is containerd config version {version}; husk writes version 2 (containerd 1.6 and 1.7): migrate the file to version 2 first (see containerd's docs/PLUGINS.md), or name a version 2 file")]
    Version { path: PathBuf, version: String },
    #[error("{path}: {key} is not a table; fix or remove that key")]
    NotTable { path: PathBuf, key: String },
    #[error("runtime handler {0:?} is not a DNS label (lower-case letters, digits and '-', at most 63, as a RuntimeClass handler must be)")]
    Handler(String),
    #[error("husk config {0} must be an absolute path to an existing file (the shim reads it as given; `husk env` prints every key to start one)")]
    HuskConfig(PathBuf),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What [`apply`] did to the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Added,
    Updated,
    Unchanged,
    Removed,
    /// Removal asked of a file without the entry.
    Absent,
}

/// husk's runtime entry: the handler a RuntimeClass names, and the husk
/// config its pods get (`options.ConfigPath`; none: the default one).
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    pub handler: &'a str,
    pub husk_config: Option<&'a Path>,
}

impl Entry<'_> {
    fn validate(&self) -> Result<(), InstallError> {
        if !dns_label(self.handler) {
            return Err(InstallError::Handler(self.handler.to_owned()));
        }
        match self.husk_config {
            Some(p) if !p.is_absolute() || !p.is_file() => {
                Err(InstallError::HuskConfig(p.to_path_buf()))
            }
            _ => Ok(()),
        }
    }
}

/// Whether `h` is a DNS label (RFC 1123), as a RuntimeClass's name and
/// handler must be.
pub fn dns_label(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 63
        && h.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !h.starts_with('-')
        && !h.ends_with('-')
}

/// `text` (containerd config file `path`) with `entry` in it, or without
/// it when `remove`; and what changed.
pub fn edit(
    text: &str,
    path: &Path,
    entry: &Entry<'_>,
    remove: bool,
) -> Result<(String, Change), InstallError> {
    let mut doc = text
        .parse::<DocumentMut>()
        .map_err(|e| InstallError::Parse {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
    match doc.get("version").map(|v| v.as_integer()) {
        Some(Some(2)) => {}
        // A new (or empty) file: containerd reads a file without a version
        // as version 1, so this one says it.
        None if doc.iter().next().is_none() => {
            doc.insert("version", toml_edit::value(2));
        }
        other => {
            return Err(InstallError::Version {
                path: path.to_path_buf(),
                version: match other {
                    None => "1 (no version key)".to_owned(),
                    Some(_) => doc["version"].to_string().trim().to_owned(),
                },
            })
        }
    }
    let keys = ["plugins", CRI_PLUGIN, "containerd", "runtimes"];
    let change = if remove {
        let removed = table_at(&mut doc, &keys, path, false)?
            .and_then(|runtimes| runtimes.remove(entry.handler));
        if removed.is_some() {
            Change::Removed
        } else {
            Change::Absent
        }
    } else {
        let runtimes = table_at(&mut doc, &keys, path, true)?.expect("made");
        let existed = runtimes.contains_key(entry.handler);
        let runtime = sub_table(runtimes, entry.handler, path, true)?.expect("made");
        runtime.insert("runtime_type", toml_edit::value(RUNTIME_TYPE));
        match entry.husk_config {
            Some(config) => {
                let options = sub_table(runtime, "options", path, true)?.expect("made");
                options.insert(
                    CONFIG_PATH,
                    toml_edit::value(config.to_string_lossy().into_owned()),
                );
            }
            None => {
                if let Some(options) = sub_table(runtime, "options", path, false)? {
                    options.remove(CONFIG_PATH);
                    if options.is_empty() {
                        runtime.remove("options");
                    }
                }
            }
        }
        if existed {
            Change::Updated
        } else {
            Change::Added
        }
    };
    let out = doc.to_string();
    let change = match change {
        Change::Updated if out == text => Change::Unchanged,
        c => c,
    };
    Ok((out, change))
}

/// The table at `keys` below the document's root; missing ones made
/// (as implicit tables, which print no header of their own) when `make`.
fn table_at<'d>(
    doc: &'d mut DocumentMut,
    keys: &[&str],
    path: &Path,
    make: bool,
) -> Result<Option<&'d mut Table>, InstallError> {
    let mut table = doc.as_table_mut();
    for key in keys {
        match sub_table(table, key, path, make)? {
            Some(t) => table = t,
            None => return Ok(None),
        }
    }
    Ok(Some(table))
}

/// Table `key` of `parent` (a header table, or an inline one as some
/// operators write `options`); made when missing and `make`.
fn sub_table<'t>(
    parent: &'t mut Table,
    key: &str,
    path: &Path,
    make: bool,
) -> Result<Option<&'t mut Table>, InstallError> {
    if !parent.contains_key(key) {
        if !make {
            return Ok(None);
        }
        let mut t = Table::new();
        t.set_implicit(true);
        parent.insert(key, Item::Table(t));
    }
    let item = parent.get_mut(key).expect("present");
    if let Some(inline) = item.as_inline_table() {
        *item = Item::Table(inline.clone().into_table());
    }
    item.as_table_mut()
        .map(Some)
        .ok_or_else(|| InstallError::NotTable {
            path: path.to_path_buf(),
            key: key.to_owned(),
        })
}

/// Brings containerd config file `path` to `entry` (or removes it): a
/// missing file is made; the file is replaced whole (a new file renamed
/// over it, with its mode) and only when its text changes.
pub fn apply(path: &Path, entry: &Entry<'_>, remove: bool) -> Result<Change, InstallError> {
    if !remove {
        entry.validate()?;
    }
    let (text, mode) = match std::fs::read_to_string(path) {
        Ok(t) => {
            let mode = std::fs::metadata(path)
                .map(|m| m.permissions().mode() & 0o7777)
                .unwrap_or(0o644);
            (t, mode)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (String::new(), 0o644),
        Err(source) => {
            return Err(InstallError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let (out, change) = edit(&text, path, entry, remove)?;
    if out == text {
        return Ok(change);
    }
    let write = |source| InstallError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".husk-new");
    let tmp = PathBuf::from(tmp_name);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(out.as_bytes())?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(write(e));
    }
    Ok(change)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of Debian containerd 1.6's `containerd config default`
    /// around the runtimes, with an operator's comment.
    const DEFAULT: &str = r#"version = 2

[plugins]

  [plugins."io.containerd.grpc.v1.cri"]
    # the operator's own note
    sandbox_image = "registry.k8s.io/pause:3.6"

    [plugins."io.containerd.grpc.v1.cri".containerd]
      default_runtime_name = "runc"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes]

        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
          runtime_type = "io.containerd.runc.v2"

          [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
            SystemdCgroup = false
"#;

    fn parsed(text: &str) -> toml::Value {
        text.parse().expect("valid TOML")
    }

    fn runtime<'v>(v: &'v toml::Value, handler: &str) -> Option<&'v toml::Value> {
        v.get("plugins")?
            .get(CRI_PLUGIN)?
            .get("containerd")?
            .get("runtimes")?
            .get(handler)
    }

    const HUSK: Entry<'static> = Entry {
        handler: "husk",
        husk_config: None,
    };

    #[test]
    fn adding_twice_changes_once_and_removing_gives_back_the_same_bytes() {
        let p = Path::new("/etc/containerd/config.toml");
        let (added, change) = edit(DEFAULT, p, &HUSK, false).unwrap();
        assert_eq!(change, Change::Added);
        let v = parsed(&added);
        assert_eq!(
            runtime(&v, "husk").and_then(|r| r.get("runtime_type")),
            Some(&toml::Value::String(RUNTIME_TYPE.into()))
        );
        // runc's entry and the comment are as they were.
        assert!(added.starts_with(DEFAULT.trim_end()), "{added}");
        let (again, change) = edit(&added, p, &HUSK, false).unwrap();
        assert_eq!(
            (again.as_str(), change),
            (added.as_str(), Change::Unchanged)
        );
        let (removed, change) = edit(&added, p, &HUSK, true).unwrap();
        assert_eq!(change, Change::Removed);
        assert_eq!(removed, DEFAULT);
        let (_, change) = edit(DEFAULT, p, &HUSK, true).unwrap();
        assert_eq!(change, Change::Absent);
    }

    #[test]
    fn a_husk_config_is_set_changed_and_dropped_keeping_the_operators_keys() {
        let p = Path::new("c.toml");
        let with = |c: &'static str| Entry {
            handler: "husk-small",
            husk_config: Some(Path::new(c)),
        };
        let (a, _) = edit(DEFAULT, p, &with("/etc/husk/small.toml"), false).unwrap();
        // An operator's own key on the entry stays through updates.
        let a = a.replace(
            "runtime_type = \"io.containerd.husk.v2\"",
            "runtime_type = \"io.containerd.husk.v2\"\npod_annotations = [\"x\"]",
        );
        let (b, change) = edit(&a, p, &with("/etc/husk/big.toml"), false).unwrap();
        assert_eq!(change, Change::Updated);
        let v = parsed(&b);
        let r = runtime(&v, "husk-small").unwrap();
        assert_eq!(
            r["options"][CONFIG_PATH].as_str(),
            Some("/etc/husk/big.toml")
        );
        assert_eq!(r["pod_annotations"][0].as_str(), Some("x"));
        let plain = Entry {
            handler: "husk-small",
            husk_config: None,
        };
        let (c, change) = edit(&b, p, &plain, false).unwrap();
        assert_eq!(change, Change::Updated);
        let v = parsed(&c);
        assert!(
            runtime(&v, "husk-small").unwrap().get("options").is_none(),
            "{c}"
        );
    }

    #[test]
    fn a_new_file_says_version_2_and_other_versions_are_refused_by_name() {
        let p = Path::new("/x/config.toml");
        let (text, change) = edit("", p, &HUSK, false).unwrap();
        assert_eq!(change, Change::Added);
        let v = parsed(&text);
        assert_eq!(v["version"].as_integer(), Some(2));
        assert!(runtime(&v, "husk").is_some(), "{text}");
        for old in ["[plugins.cri]\n", "version = 1\n", "version = 3\n"] {
            let e = edit(old, p, &HUSK, false).unwrap_err();
            assert!(
                matches!(e, InstallError::Version { .. })
                    && e.to_string().contains("/x/config.toml"),
                "{old:?}: {e}"
            );
        }
        let e = edit("version = 2\nplugins = 3\n", p, &HUSK, false).unwrap_err();
        assert!(e.to_string().contains("plugins is not a table"), "{e}");
        let e = edit("version = [", p, &HUSK, false).unwrap_err();
        assert!(matches!(e, InstallError::Parse { .. }), "{e}");
    }

    #[test]
    fn bad_handlers_and_husk_configs_are_refused_before_the_file_is_touched() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.toml");
        for h in ["", "Husk", "husk_vm", "-husk", "a.b", &"h".repeat(64)] {
            let e = apply(
                &file,
                &Entry {
                    handler: h,
                    husk_config: None,
                },
                false,
            )
            .unwrap_err();
            assert!(matches!(e, InstallError::Handler(_)), "{h:?}: {e}");
        }
        for c in ["relative.toml", "/no/such/husk.toml"] {
            let e = apply(
                &file,
                &Entry {
                    handler: "husk",
                    husk_config: Some(Path::new(c)),
                },
                false,
            )
            .unwrap_err();
            assert!(matches!(e, InstallError::HuskConfig(_)), "{c}: {e}");
        }
        assert!(!file.exists());
        // Then a real one: made 0644, and left alone when nothing changes.
        assert_eq!(apply(&file, &HUSK, false).unwrap(), Change::Added);
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(apply(&file, &HUSK, false).unwrap(), Change::Unchanged);
        assert_eq!(apply(&file, &HUSK, true).unwrap(), Change::Removed);
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the file's mode is kept");
        assert!(!dir.path().join("config.toml.husk-new").exists());
    }
}
