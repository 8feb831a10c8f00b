//! kubelet's atomic writer, as the synced-volume tests and benchmark use
//! it, and the container logs they read what a container saw from.
//!
//! kubelet writes a configMap, secret, downwardAPI or projected volume
//! (pkg/volume/util/atomic_writer.go) as: the data in a new directory
//! `..<timestamp>`, a `..data_tmp` link to it renamed over `..data`, one
//! top-level link `name -> ..data/name` per top-level entry (new ones
//! added, gone ones removed), then the old data directory removed.

use std::collections::BTreeSet;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::containerd::IMAGE;
use crate::cri::{container, Cri, PodOpts};

/// A volume directory written version by version.
pub struct AtomicVolume {
    pub dir: PathBuf,
    current: Option<String>,
}

impl AtomicVolume {
    /// An empty volume at `dir` (created).
    pub fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("volume dir");
        AtomicVolume {
            dir: dir.to_path_buf(),
            current: None,
        }
    }

    /// A data directory name shaped as kubelet's (a timestamp) but made
    /// from the version, so two runs of a case name theirs alike.
    pub fn data_dir(version: u32) -> String {
        format!(
            "..2026_01_01_00_{:02}_{:02}.000000000",
            version / 60,
            version % 60
        )
    }

    /// Writes version `version` holding `files` (relative path, content)
    /// with the writer's steps; returns when `..data` was swapped.
    pub fn write(&mut self, version: u32, files: &[(&str, String)]) -> SystemTime {
        let name = Self::data_dir(version);
        let data = self.dir.join(&name);
        std::fs::create_dir(&data).expect("data dir");
        for (path, content) in files {
            let p = data.join(path);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("data subdir");
            std::fs::write(&p, content).expect("data file");
        }
        let tmp = self.dir.join("..data_tmp");
        symlink(&name, &tmp).expect("..data_tmp");
        std::fs::rename(&tmp, self.dir.join("..data")).expect("rename over ..data");
        let swapped = SystemTime::now();
        let top: BTreeSet<&str> = files
            .iter()
            .map(|(p, _)| p.split('/').next().unwrap_or(p))
            .collect();
        for t in &top {
            let l = self.dir.join(t);
            if std::fs::symlink_metadata(&l).is_err() {
                symlink(Path::new("..data").join(t), &l).expect("user-visible link");
            }
        }
        for e in std::fs::read_dir(&self.dir).expect("volume dir") {
            let n = e.expect("entry").file_name().to_string_lossy().into_owned();
            if !n.starts_with("..") && !top.contains(n.as_str()) {
                std::fs::remove_file(self.dir.join(&n)).expect("remove user-visible link");
            }
        }
        if let Some(old) = self.current.replace(name) {
            std::fs::remove_dir_all(self.dir.join(old)).expect("remove old data dir");
        }
        swapped
    }
}

/// One line a container wrote, with the time containerd's CRI log gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub at: SystemTime,
    pub text: String,
}

/// The lines of a CRI container log (`<RFC 3339 time> <stream> <tag> <text>`).
pub fn read_cri_log(path: &Path) -> Vec<LogLine> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(4, ' ');
            let at = parse_rfc3339(parts.next()?)?;
            let (_stream, _tag) = (parts.next()?, parts.next()?);
            Some(LogLine {
                at,
                text: parts.next().unwrap_or("").to_owned(),
            })
        })
        .collect()
}

/// Parses `2026-12-06T21:40:00.123456789Z` (or with `+hh:mm`/`-hh:mm`), as
/// containerd's CRI log writes Go's RFC3339Nano.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let num = |a: &str| a.parse::<i64>().ok();
    let (date, rest) = s.split_once('T')?;
    let mut d = date.splitn(3, '-');
    let (y, m, day) = (num(d.next()?)?, num(d.next()?)?, num(d.next()?)?);
    let tz_at = rest.find(['Z', '+', '-'])?;
    let (clock, tz) = rest.split_at(tz_at);
    let (hms, frac) = clock.split_once('.').unwrap_or((clock, ""));
    let mut t = hms.splitn(3, ':');
    let (h, mi, sec) = (num(t.next()?)?, num(t.next()?)?, num(t.next()?)?);
    let nanos = if frac.is_empty() {
        0
    } else {
        num(&format!("{frac:0<9}")[..9])?
    };
    let offset = match tz {
        "Z" => 0,
        _ => {
            let sign = if tz.starts_with('-') { -1 } else { 1 };
            let (oh, om) = tz[1..].split_once(':')?;
            sign * (num(oh)? * 3600 + num(om)? * 60)
        }
    };
    // Days from 1970-01-01 of a proleptic Gregorian date.
    let (yy, mm) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * mm + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset;
    let secs = u64::try_from(secs).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_nanos(nanos as u64))
}

/// The command of a container that watches `dir` with inotify (events to
/// its log, see tests/images/inotify-watch.c) and, every 10 ms, checks
/// that `dir/file` reads as one version (all its lines alike; a torn or
/// missing read logs `torn N`).
pub fn watcher_command(dir: &str, file: &str) -> Vec<String> {
    let script = format!(
        "inotify-watch {dir} & while :; do n=$(uniq {dir}/{file} | wc -l); \
         [ \"$n\" = 1 ] || echo \"torn $n\"; usleep 10000; done"
    );
    vec!["sh".into(), "-c".into(), script]
}

/// Version `v` of a configMap: a 40 KiB file `config` of one repeated
/// line (a torn read shows two kinds of line, see [`watcher_command`]), a
/// small one, a nested path (projected volumes have them), and for version
/// 2 only a key that version 3 drops (a top-level link added, then
/// removed).
pub fn configmap(v: u32) -> Vec<(&'static str, String)> {
    let mut files = vec![
        ("config", format!("version-{v}\n").repeat(4000)),
        ("app.conf", format!("a={v}\n")),
        ("certs/ca.crt", format!("ca-{v}\n")),
    ];
    if v == 2 {
        files.push(("extra.conf", "extra\n".into()));
    }
    files
}

/// A pod of one container that watches a synced volume at `mount` (see
/// [`watcher_command`]), on one runtime handler.
pub struct VolumePod<'a> {
    cri: &'a Cri,
    pub pod: String,
    pub id: String,
    /// The container's CRI log.
    pub log: PathBuf,
    pub volume: AtomicVolume,
    swaps: usize,
}

impl<'a> VolumePod<'a> {
    /// Writes version 1 (`files`) of a volume at `volume_dir`, then runs
    /// the pod (named `name`, logs under `log_dir`) on `handler` with the
    /// volume mounted read-only at `mount`, as kubelet mounts a configMap,
    /// and waits until the container's watch is in place.
    pub fn start(
        cri: &'a Cri,
        handler: &str,
        name: &str,
        volume_dir: &Path,
        log_dir: &Path,
        mount: &str,
        files: &[(&str, String)],
    ) -> Result<Self, String> {
        let mut volume = AtomicVolume::new(volume_dir);
        volume.write(1, files);
        std::fs::create_dir_all(log_dir).map_err(|e| format!("{}: {e}", log_dir.display()))?;
        let mut opts = PodOpts::new(name, log_dir);
        opts.handler = handler.into();
        let pod = cri
            .run_pod(&opts)
            .map_err(|e| format!("RunPodSandbox ({handler}): {e}"))?;
        let args = watcher_command(mount, "config");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut c = container("watcher", IMAGE, &args, false);
        c.mounts = vec![k8s_cri::v1::Mount {
            container_path: mount.into(),
            host_path: volume.dir.display().to_string(),
            readonly: true,
            ..Default::default()
        }];
        let id = cri
            .run_container(&pod, &opts, c)
            .map_err(|e| format!("watcher ({handler}): {e}"))?;
        let this = VolumePod {
            cri,
            pod,
            id,
            log: log_dir.join("watcher.log"),
            volume,
            swaps: 0,
        };
        this.wait_for_line(&format!("watching {mount}"), 1)?;
        Ok(this)
    }

    /// Writes version `version` and waits until the container's inotify
    /// saw `..data` swapped, then until it saw the old data directory go
    /// (the writer's last step); returns the time from the swap on the
    /// host to the container's event, as containerd's log stamped it.
    pub fn update(&mut self, version: u32, files: &[(&str, String)]) -> Result<Duration, String> {
        let swapped = self.volume.write(version, files);
        self.swaps += 1;
        let seen = self.wait_for_line("moved_to ..data", self.swaps)?;
        let old = AtomicVolume::data_dir(version - 1);
        self.wait_for_line(&format!("delete {old}"), 1)?;
        Ok(seen.at.duration_since(swapped).unwrap_or_default())
    }

    /// Waits until the log has `count` lines that are `text`; returns the
    /// last of them.
    pub fn wait_for_line(&self, text: &str, count: usize) -> Result<LogLine, String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let hits: Vec<LogLine> = read_cri_log(&self.log)
                .into_iter()
                .filter(|l| l.text == text)
                .collect();
            if hits.len() >= count {
                return Ok(hits[count - 1].clone());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no {count}. {text:?} in the container's log within 30 s:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Removes the pod; returns every line its container logged.
    pub fn stop(self) -> Vec<LogLine> {
        self.cri.stop_pod(&self.pod).expect("StopPodSandbox");
        self.cri.remove_pod(&self.pod).expect("RemovePodSandbox");
        read_cri_log(&self.log)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times_as_containerd_writes_them() {
        let t = parse_rfc3339("2026-12-06T21:40:00.5Z").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap(),
            Duration::from_millis(1_796_593_200_500)
        );
        assert_eq!(
            parse_rfc3339("2026-12-06T22:40:00.5+01:00"),
            Some(t),
            "offset"
        );
        assert_eq!(
            parse_rfc3339("1970-01-01T00:00:00.000000001Z"),
            Some(UNIX_EPOCH + Duration::from_nanos(1))
        );
        assert_eq!(parse_rfc3339("garbage"), None);
    }

    #[test]
    fn the_writer_leaves_kubelets_layout() {
        let d = tempfile::tempdir().unwrap();
        let mut v = AtomicVolume::new(d.path());
        v.write(1, &[("a", "1".into()), ("b", "1".into())]);
        v.write(2, &[("a", "2".into()), ("c/d", "2".into())]);
        let mut names: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["..2026_01_01_00_00_02.000000000", "..data", "a", "c"]
        );
        assert_eq!(std::fs::read_to_string(d.path().join("a")).unwrap(), "2");
        assert_eq!(std::fs::read_to_string(d.path().join("c/d")).unwrap(), "2");
    }
}
