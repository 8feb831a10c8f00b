//! The differential harness: the same container case run on runc and on
//! husk, in the same containerd, and what a process in it observes compared
//! field by field. runc is the oracle; a difference is a failure that names
//! each field with both values, unless the case names that field as an
//! expected difference with its reason.
//!
//! What is observed (see [`SCRIPT`]; every field by the shell itself where
//! it can, so the values are the observed process's, not a child's):
//! - `/proc/self/status`: CapInh, CapPrm, CapEff, CapBnd, CapAmb,
//!   NoNewPrivs, Seccomp, Seccomp_filters, Uid, Gid, Groups;
//! - `id` (names as the image resolves them), `umask`, `cwd`, `hostname`;
//! - every `ulimit` (`ulimit.<flag>`);
//! - every environment variable (`env.<NAME>`);
//! - the per-mount flags of `/` and of the paths a case lists
//!   (`mount.<path>`: mountinfo's sixth field);
//! - `/proc/self/cgroup`'s unified (v2) line (`cgroup`): the guest is
//!   cgroup v2 only, by design; a host that also mounts v1 controllers
//!   (this one) lists those to runc's container as well;
//! - `setuid`: what a setuid-root program of the image (`/bin/euid-suid`)
//!   finds its ids to be;
//! - each probe a case adds (`probe.<name>`: a command's output and exit
//!   status), such as a syscall the case's seccomp profile blocks.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::containerd::{run_args, Containerd};

/// containerd's name for runc.
pub const RUNC: &str = "io.containerd.runc.v2";

/// The shell script that prints one `field=value` line per observation;
/// `$MOUNTS` names extra paths whose mount flags to print, `$PROBES` lines
/// of `name cmd...` to run.
pub const SCRIPT: &str = r#"
while IFS= read -r l; do
  k=${l%%:*}; v=${l#*:}
  case $k in CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp|Seccomp_filters|Uid|Gid|Groups)
    set -- $v; echo "status.$k=$*";; esac
done < /proc/$$/status
echo "id=$(id)"
echo "umask=$(umask)"
echo "cwd=$(pwd)"
echo "hostname=$(cat /proc/sys/kernel/hostname)"
ulimit -a | while IFS= read -r l; do
  f=${l##*(}; f=${f%%)*}; v=${l##* }; echo "ulimit.$f=$v"
done
env | sort | while IFS= read -r l; do echo "env.$l"; done
for m in / $MOUNTS; do
  echo "mount.$m=$(awk -v m="$m" '$5 == m { o = $6 } END { print o }' /proc/$$/mountinfo)"
done
echo "cgroup=$(grep '^0::' /proc/$$/cgroup)"
o=$(/bin/euid-suid 2>&1); echo "setuid=$o (exit $?)"
echo "$PROBES" | while read -r n c; do
  [ -n "$n" ] || continue
  o=$(eval "$c" 2>&1 </dev/null); echo "probe.$n=$o (exit $?)"
done
"#;

/// Variables the observing shell sets for itself, not the runtime.
const SHELL_OWN_ENV: [&str; 3] = ["env.MOUNTS", "env.PROBES", "env.SHLVL"];

/// One container's observations, by field.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observation(pub BTreeMap<String, String>);

impl Observation {
    /// Parses [`SCRIPT`]'s output. A line that is not `field=value` (a
    /// shell's error, say) is kept in the field `unparsed`, so that it
    /// shows in a comparison instead of vanishing.
    pub fn parse(out: &str) -> Self {
        let mut map: BTreeMap<String, String> = out
            .lines()
            .filter_map(|l| l.split_once('='))
            .filter(|(k, _)| !SHELL_OWN_ENV.contains(k))
            .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
            .collect();
        let unparsed: Vec<&str> = out
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.contains('='))
            .collect();
        if !unparsed.is_empty() {
            map.insert("unparsed".to_owned(), unparsed.join(" | "));
        }
        Self(map)
    }

    pub fn get(&self, field: &str) -> Option<&str> {
        self.0.get(field).map(String::as_str)
    }

    /// The same with every `name` in the values written `<as_>`: the ids
    /// of the two runs differ by design (cgroup paths carry them).
    pub fn redact(mut self, name: &str, as_: &str) -> Self {
        if !name.is_empty() {
            for v in self.0.values_mut() {
                *v = v.replace(name, as_);
            }
        }
        self
    }
}

/// What a case runs in the container besides the standard observations.
#[derive(Debug, Clone, Default)]
pub struct Probes {
    /// Paths whose mount flags are compared too.
    pub mounts: Vec<String>,
    /// `(name, shell command)`: output and exit status compared.
    pub probes: Vec<(String, String)>,
}

impl Probes {
    pub fn probe(mut self, name: &str, cmd: &str) -> Self {
        self.probes.push((name.to_owned(), cmd.to_owned()));
        self
    }

    pub fn mount(mut self, path: &str) -> Self {
        self.mounts.push(path.to_owned());
        self
    }

    /// The environment [`SCRIPT`] reads them from, as `export` lines.
    fn exports(&self) -> String {
        let probes: String = self
            .probes
            .iter()
            .map(|(n, c)| format!("{n} {c}\n"))
            .collect();
        format!(
            "export MOUNTS='{}' PROBES='{}'\n",
            self.mounts.join(" "),
            probes.replace('\'', r"'\''")
        )
    }

    /// `sh -c` text of the whole observation.
    pub fn script(&self) -> String {
        format!("{}{SCRIPT}", self.exports())
    }
}

/// The fields where runc and husk differ, each `field: runc X, husk Y`,
/// less those `expected` names (field, reason).
pub fn differences(
    runc: &Observation,
    husk: &Observation,
    expected: &[(&str, &str)],
) -> Vec<String> {
    let mut keys: Vec<&String> = runc.0.keys().chain(husk.0.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| !expected.iter().any(|(f, _)| f == k))
        .filter_map(|k| {
            let (r, h) = (runc.0.get(k), husk.0.get(k));
            (r != h).then(|| {
                let show = |v: Option<&String>| match v {
                    Some(v) => format!("{v:?}"),
                    None => "(missing)".to_owned(),
                };
                format!("{k}: runc {}, husk {}", show(r), show(h))
            })
        })
        .collect()
}

/// What husk's typed reading of a bundle's spec (as the shim reads it, and
/// as the guest's libcontainer reads what the shim sends on) changes of
/// the spec containerd wrote: each JSON pointer whose value differs, with
/// both. The capability lists are sets to the OCI types, so their order
/// does not count. Empty: nothing the container asked for is lost.
pub fn spec_round_trip_losses(config_json: &std::path::Path) -> Vec<String> {
    let bytes = std::fs::read(config_json)
        .unwrap_or_else(|e| panic!("reading {}: {e}", config_json.display()));
    let spec = match husk_runtime::pod::spec::parse(&bytes, config_json) {
        Ok(s) => s,
        Err(e) => return vec![e.to_string()],
    };
    let sorted_caps = |mut v: serde_json::Value| {
        if let Some(caps) = v
            .pointer_mut("/process/capabilities")
            .and_then(serde_json::Value::as_object_mut)
        {
            for list in caps
                .values_mut()
                .filter_map(serde_json::Value::as_array_mut)
            {
                list.sort_by_key(|c| c.as_str().map(str::to_owned));
            }
        }
        v
    };
    let written = serde_json::from_slice(&bytes).expect("containerd's spec is JSON");
    let read = serde_json::to_value(&spec).expect("a typed spec serialises");
    let mut losses = Vec::new();
    json_differences("", &sorted_caps(written), &sorted_caps(read), &mut losses);
    losses
}

/// Pushes `at: written X, read Y` for each leaf where the two differ.
fn json_differences(
    at: &str,
    written: &serde_json::Value,
    read: &serde_json::Value,
    out: &mut Vec<String>,
) {
    use serde_json::Value;
    match (written, read) {
        (Value::Object(w), Value::Object(r)) => {
            let mut keys: Vec<&String> = w.keys().chain(r.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let (a, b) = (w.get(k), r.get(k));
                match (a, b) {
                    (Some(a), Some(b)) => json_differences(&format!("{at}/{k}"), a, b, out),
                    _ => out.push(format!("{at}/{k}: written {a:?}, read {b:?}")),
                }
            }
        }
        (Value::Array(w), Value::Array(r)) if w.len() == r.len() => {
            for (i, (a, b)) in w.iter().zip(r).enumerate() {
                json_differences(&format!("{at}/{i}"), a, b, out);
            }
        }
        (w, r) if w != r => out.push(format!("{at}: written {w}, read {r}")),
        _ => {}
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `ctr run --rm <flags> --runtime <runtime> <image> <id> sh -c <observe>`:
/// what the container's init observes.
pub fn ctr_run(
    ctd: &Containerd,
    runtime: &str,
    id: &str,
    flags: &[&str],
    p: &Probes,
) -> Observation {
    let script = p.script();
    let mut all = vec!["--rm"];
    all.extend_from_slice(flags);
    let out = ctd.ctr(&run_args(&all, runtime, id, &["sh", "-c", &script]));
    assert!(
        out.status.success(),
        "ctr run on {runtime} failed: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    Observation::parse(&text(&out.stdout))
}

/// A detached container whose init observes itself first; then `ctr task
/// exec <exec_flags>` observes from an exec. Returns (init, exec); the
/// container is removed.
///
/// Not `--user` in `exec_flags`: ctr 1.6 resolves it by mounting the
/// container's active snapshot a second time on the host (the kernel warns
/// "upperdir is in-use ... undefined behavior"), after which every file the
/// container creates fails with ENOENT, under runc as under husk.
pub fn ctr_run_and_exec(
    ctd: &Containerd,
    runtime: &str,
    id: &str,
    flags: &[&str],
    exec_flags: &[&str],
    p: &Probes,
) -> (Observation, Observation) {
    let script = p.script();
    let init = format!("( {script} ) > /tmp/observed 2>&1; touch /tmp/done; exec sleep 600");
    let mut all = vec!["-d"];
    all.extend_from_slice(flags);
    let out = ctd.ctr(&run_args(&all, runtime, id, &["sh", "-c", &init]));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert!(
            out.status.success(),
            "ctr run -d on {runtime} failed: {}",
            text(&out.stderr)
        );
        let exec = |n: usize, cmd: &[&str]| {
            let exec_id = format!("obs{n}");
            let mut args = vec!["task", "exec", "--exec-id", &exec_id];
            args.extend_from_slice(exec_flags);
            args.push(id);
            args.extend_from_slice(cmd);
            ctd.ctr(&args)
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut n = 0;
        loop {
            n += 1;
            let done = exec(n, &["test", "-e", "/tmp/done"]);
            if done.status.success() {
                break;
            }
            if Instant::now() > deadline {
                let seen = exec(n + 1, &["sh", "-c", "id; ps -o pid,user,args; ls -la /tmp"]);
                panic!(
                    "the init of {id} on {runtime} never finished observing; the last exec: {}{}; in the container: {}{}",
                    text(&done.stdout),
                    text(&done.stderr),
                    text(&seen.stdout),
                    text(&seen.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let init = exec(n + 1, &["cat", "/tmp/observed"]);
        let observed = exec(n + 2, &["sh", "-c", &script]);
        assert!(
            observed.status.success(),
            "ctr task exec on {runtime} failed: {}",
            text(&observed.stderr)
        );
        (
            Observation::parse(&text(&init.stdout)).redact(id, "<id>"),
            Observation::parse(&text(&observed.stdout)).redact(id, "<id>"),
        )
    }));
    let _ = ctd.ctr(&["task", "kill", "-s", "SIGKILL", id]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ctd.ctr(&["task", "rm", id]).status.success() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = ctd.ctr(&["container", "rm", id]);
    match result {
        Ok(r) => r,
        Err(e) => std::panic::resume_unwind(e),
    }
}

/// Comparisons of many cases, failed together: every case's differences
/// are named at once, not only the first case's.
#[derive(Debug, Default)]
pub struct Report {
    failures: Vec<String>,
    compared: usize,
}

impl Report {
    /// Compares one case's observations (see [`differences`]).
    pub fn compare(
        &mut self,
        case: &str,
        runc: &Observation,
        husk: &Observation,
        expected: &[(&str, &str)],
    ) {
        self.compared += 1;
        if runc.0.is_empty() || runc.get("status.Seccomp").is_none() {
            self.failures.push(format!(
                "{case}: runc's observation is empty or cut short: {runc:?}"
            ));
            return;
        }
        let diff = differences(runc, husk, expected);
        if !diff.is_empty() {
            let mut msg = format!("{case}: husk differs from runc in {} field(s):", diff.len());
            for d in &diff {
                let _ = write!(msg, "\n  {d}");
            }
            self.failures.push(msg);
        }
    }

    /// A check of the case itself (that the oracle shows what the case is
    /// about), failed with the others.
    pub fn require(&mut self, ok: bool, what: impl Into<String>) {
        if !ok {
            self.failures.push(what.into());
        }
    }

    /// Fails the test with every failure, or passes.
    pub fn assert_ok(self) {
        assert!(self.compared > 0, "nothing was compared");
        assert!(
            self.failures.is_empty(),
            "{} of {} comparisons failed:\n{}",
            self.failures.len(),
            self.compared,
            self.failures.join("\n")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_keeps_fields_and_drops_the_shells_own_variables() {
        let o = Observation::parse(
            "status.Seccomp=2\nenv.PATH=/bin\nenv.SHLVL=1\nenv.MOUNTS=\nnoise\nid=uid=0(root) gid=0(root)\n",
        );
        assert_eq!(o.get("status.Seccomp"), Some("2"));
        assert_eq!(o.get("id"), Some("uid=0(root) gid=0(root)"));
        assert_eq!(o.get("env.SHLVL"), None);
        assert_eq!(o.get("unparsed"), Some("noise"));
        assert_eq!(o.0.len(), 4);
    }

    #[test]
    fn differences_name_each_field_with_both_values() {
        let r = Observation::parse("a=1\nb=2\nc=3\n");
        let h = Observation::parse("a=1\nb=9\nd=4\n");
        assert_eq!(
            differences(&r, &h, &[]),
            vec![
                "b: runc \"2\", husk \"9\"".to_owned(),
                "c: runc \"3\", husk (missing)".to_owned(),
                "d: runc (missing), husk \"4\"".to_owned(),
            ]
        );
        assert_eq!(
            differences(&r, &h, &[("b", "why"), ("c", ""), ("d", "")]),
            Vec::<String>::new()
        );
    }

    #[test]
    #[should_panic(expected = "husk differs from runc in 1 field(s)")]
    fn a_report_fails_on_a_difference() {
        let r = Observation::parse("status.Seccomp=2\n");
        let h = Observation::parse("status.Seccomp=0\n");
        let mut report = Report::default();
        report.compare("case", &r, &h, &[]);
        report.assert_ok();
    }

    #[test]
    #[should_panic(expected = "runc's observation is empty")]
    fn an_empty_oracle_is_a_failure_not_a_match() {
        let mut report = Report::default();
        report.compare(
            "case",
            &Observation::default(),
            &Observation::default(),
            &[],
        );
        report.assert_ok();
    }

    #[test]
    fn probes_quote_their_commands_for_the_shell() {
        let p = Probes::default().probe("q", "echo 'x'").mount("/data");
        let s = p.script();
        assert!(
            s.starts_with("export MOUNTS='/data' PROBES='q echo '\\''x'\\''\n'\n"),
            "{s}"
        );
    }
}
