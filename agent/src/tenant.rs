//! What a container's processes get as under runc that libcontainer leaves
//! out: an exec's seccomp filter (the container's), and `HOME` for a user
//! the image does not name.
//!
//! libcontainer 0.7 rebuilds an exec's `linux` section from namespaces,
//! cgroups path, personality and time offsets only, so an exec ran
//! unfiltered (`Seccomp: 0`) where runc's has the container's filter. runc
//! loads it for an exec as for the init: late (just before execve) when the
//! process has no_new_privs, else before it drops capabilities, since
//! without no_new_privs loading a filter takes CAP_SYS_ADMIN.
//!
//! Here the filter is loaded by an [`Executor`], the last of libcontainer's
//! steps, which runs after capabilities are set. With no_new_privs it loads
//! and executes. Without, the process is built with CAP_SYS_ADMIN (to load
//! the filter) and CAP_SETPCAP (to drop bounding capabilities) added to its
//! bounding, effective and permitted sets; the executor loads the filter,
//! then sets all five sets to what the process asked for and executes.
//! Between the two, only this code runs in the process, as between runc's
//! filter load and its capability drop.

use std::path::Path;

use libcontainer::capabilities::drop_privileges;
use libcontainer::oci_spec::runtime::{Capability, LinuxCapabilities, LinuxSeccomp, Process, Spec};
use libcontainer::syscall::linux::LinuxSyscall;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};

/// Capabilities an exec without no_new_privs holds until its filter is in.
const LOADING_CAPS: [Capability; 2] = [Capability::SysAdmin, Capability::Setpcap];

/// Runs an exec's payload under its container's seccomp filter.
#[derive(Clone)]
pub struct SeccompExecutor {
    seccomp: LinuxSeccomp,
    /// The capabilities the process asked for, set once the filter is in
    /// (none when the process's own sets already allow the load).
    restore: Option<LinuxCapabilities>,
}

/// Prepares exec `process` of a container whose spec has `seccomp`: returns
/// the executor that loads the filter, having widened the process's
/// capabilities if the load needs it. No filter, no executor.
pub fn prepare(
    process: &mut Process,
    seccomp: Option<LinuxSeccomp>,
) -> Result<Option<SeccompExecutor>, String> {
    normalize_no_new_privileges(process);
    let Some(seccomp) = seccomp else {
        return Ok(None);
    };
    if libcontainer::seccomp::is_notify(&seccomp) {
        return Err(
            "the container's seccomp profile sends syscalls to a notify listener, which husk does not serve for exec processes".into(),
        );
    }
    let nnp = process.no_new_privileges() == Some(true);
    let restore = match process.capabilities() {
        Some(caps) if !nnp && !has(caps.effective(), Capability::SysAdmin) => {
            let original = caps.clone();
            let mut widened = caps.clone();
            widened.set_bounding(Some(with_loading_caps(caps.bounding())));
            widened.set_effective(Some(with_loading_caps(caps.effective())));
            widened.set_permitted(Some(with_loading_caps(caps.permitted())));
            process.set_capabilities(Some(widened));
            Some(original)
        }
        _ => None,
    };
    Ok(Some(SeccompExecutor { seccomp, restore }))
}

/// How many arguments a syscall has: the indexes a seccomp rule may compare.
const SYSCALL_ARGS: usize = 6;

/// Refuses a seccomp profile libseccomp would refuse for a rule that
/// compares an argument past the sixth, naming the rule (libcontainer's
/// error says only "failed to add rule to seccomp"), before anything of
/// the container is built.
pub fn check_seccomp(seccomp: &LinuxSeccomp) -> Result<(), String> {
    for rule in seccomp.syscalls().iter().flatten() {
        let Some(bad) = rule
            .args()
            .iter()
            .flatten()
            .find(|a| a.index() >= SYSCALL_ARGS)
        else {
            continue;
        };
        return Err(format!(
            "its seccomp profile cannot be loaded: the rule for {} compares argument {}, but a syscall has {SYSCALL_ARGS} (0 to {})",
            rule.names().join(", "),
            bad.index(),
            SYSCALL_ARGS - 1
        ));
    }
    Ok(())
}

/// An explicit `noNewPrivileges: false` means the same as none (the OCI
/// spec's default); libcontainer takes any explicit value for true when it
/// decides when to load a filter, so it gets none.
pub fn normalize_no_new_privileges(process: &mut Process) {
    if process.no_new_privileges() == Some(false) {
        process.set_no_new_privileges(None);
    }
}

/// Gives a process without `HOME` the one runc gives it: the home of its
/// uid in the image's `/etc/passwd`, or `/` when the image has no entry
/// for it (libcontainer sets only the first).
pub fn default_home(process: &mut Process, rootfs: &Path) {
    let mut env = process.env().clone().unwrap_or_default();
    if env
        .iter()
        .any(|e| e.strip_prefix("HOME=").is_some_and(|v| !v.is_empty()))
    {
        return;
    }
    let uid = process.user().uid();
    let home = passwd_home(rootfs, uid).unwrap_or_else(|| "/".to_owned());
    env.retain(|e| !e.starts_with("HOME="));
    env.push(format!("HOME={home}"));
    process.set_env(Some(env));
}

/// The home directory of `uid` in `<rootfs>/etc/passwd`, if it names one.
fn passwd_home(rootfs: &Path, uid: u32) -> Option<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // The image's own file, never what a link in it points at.
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(rootfs.join("etc/passwd"))
        .ok()?;
    let mut text = String::new();
    f.by_ref().take(1 << 20).read_to_string(&mut text).ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 7 && f[2].parse::<u32>() == Ok(uid) && !f[5].is_empty())
            .then(|| f[5].to_owned())
    })
}

fn has(set: &Option<std::collections::HashSet<Capability>>, cap: Capability) -> bool {
    set.as_ref().is_some_and(|s| s.contains(&cap))
}

fn with_loading_caps(
    set: &Option<std::collections::HashSet<Capability>>,
) -> std::collections::HashSet<Capability> {
    let mut s = set.clone().unwrap_or_default();
    s.extend(LOADING_CAPS);
    s
}

impl Executor for SeccompExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        libcontainer::seccomp::initialize_seccomp(&self.seccomp).map_err(|e| {
            ExecutorError::Other(format!("loading the container's seccomp filter: {e}"))
        })?;
        if let Some(caps) = &self.restore {
            drop_privileges(caps, &LinuxSyscall).map_err(|e| {
                ExecutorError::Other(format!(
                    "setting the exec's capabilities after its seccomp filter: {e}"
                ))
            })?;
        }
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use libcontainer::oci_spec::runtime::{
        LinuxCapabilitiesBuilder, LinuxSeccompAction, LinuxSeccompBuilder, ProcessBuilder,
    };

    use super::*;

    fn seccomp(default: LinuxSeccompAction) -> LinuxSeccomp {
        LinuxSeccompBuilder::default()
            .default_action(default)
            .build()
            .expect("seccomp")
    }

    fn process(nnp: Option<bool>, caps: &[Capability]) -> Process {
        let set: HashSet<Capability> = caps.iter().copied().collect();
        let mut p = ProcessBuilder::default()
            .args(vec!["sh".to_owned()])
            .capabilities(
                LinuxCapabilitiesBuilder::default()
                    .bounding(set.clone())
                    .effective(set.clone())
                    .permitted(set)
                    .build()
                    .expect("caps"),
            )
            .build()
            .expect("process");
        p.set_no_new_privileges(nnp);
        p
    }

    #[test]
    fn a_rule_on_a_seventh_argument_is_refused_naming_its_syscall() {
        let mut s = seccomp(LinuxSeccompAction::ScmpActAllow);
        assert_eq!(check_seccomp(&s), Ok(()));
        let rule = |index: usize| {
            libcontainer::oci_spec::runtime::LinuxSyscallBuilder::default()
                .names(vec!["chmod".to_owned()])
                .action(LinuxSeccompAction::ScmpActErrno)
                .args(vec![
                    libcontainer::oci_spec::runtime::LinuxSeccompArgBuilder::default()
                        .index(index)
                        .value(0u64)
                        .op(libcontainer::oci_spec::runtime::LinuxSeccompOperator::ScmpCmpEq)
                        .build()
                        .expect("arg"),
                ])
                .build()
                .expect("rule")
        };
        s.set_syscalls(Some(vec![rule(5)]));
        assert_eq!(check_seccomp(&s), Ok(()));
        s.set_syscalls(Some(vec![rule(5), rule(7)]));
        let e = check_seccomp(&s).unwrap_err();
        assert!(
            e.contains("seccomp profile") && e.contains("chmod") && e.contains("argument 7"),
            "{e}"
        );
    }

    #[test]
    fn no_filter_leaves_the_process_as_asked() {
        let mut p = process(None, &[Capability::Kill]);
        let before = p.clone();
        assert!(prepare(&mut p, None).expect("ok").is_none());
        assert_eq!(p, before);
    }

    #[test]
    fn with_no_new_privs_or_sys_admin_held_the_caps_stay_as_asked() {
        for (nnp, cap) in [(Some(true), Capability::Kill), (None, Capability::SysAdmin)] {
            let mut p = process(nnp, &[cap]);
            let before = p.clone();
            let ex = prepare(&mut p, Some(seccomp(LinuxSeccompAction::ScmpActAllow)))
                .expect("ok")
                .expect("executor");
            assert!(ex.restore.is_none(), "{nnp:?} {cap:?}");
            assert_eq!(p, before);
        }
    }

    #[test]
    fn without_no_new_privs_the_load_gets_sys_admin_until_the_caps_are_restored() {
        let mut p = process(None, &[Capability::NetBindService]);
        let asked = p.capabilities().clone().expect("caps");
        let ex = prepare(&mut p, Some(seccomp(LinuxSeccompAction::ScmpActErrno)))
            .expect("ok")
            .expect("executor");
        assert_eq!(ex.restore.as_ref(), Some(&asked), "restores what was asked");
        let widened = p.capabilities().clone().expect("caps");
        for set in [widened.bounding(), widened.effective(), widened.permitted()] {
            let set = set.as_ref().expect("set");
            for c in LOADING_CAPS {
                assert!(set.contains(&c), "{c:?} missing from {set:?}");
            }
            assert!(set.contains(&Capability::NetBindService));
        }
        assert_eq!(widened.inheritable(), asked.inheritable());
        assert_eq!(widened.ambient(), asked.ambient());
    }

    #[test]
    fn home_comes_from_the_images_passwd_or_is_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("etc")).expect("etc");
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nweb:x:33:33::/var/www:/bin/false\nbad:x:34\n",
        )
        .expect("passwd");
        let home = |uid: u32, env: &[&str]| {
            let mut p = process(None, &[]);
            let mut user = p.user().clone();
            user.set_uid(uid);
            p.set_user(user);
            p.set_env(Some(env.iter().map(|s| s.to_string()).collect()));
            default_home(&mut p, dir.path());
            p.env().clone().unwrap_or_default()
        };
        assert!(home(0, &["PATH=/bin"]).contains(&"HOME=/root".to_owned()));
        assert!(home(33, &[]).contains(&"HOME=/var/www".to_owned()));
        assert_eq!(home(1000, &["HOME="]), vec!["HOME=/".to_owned()]);
        assert_eq!(home(34, &[]), vec!["HOME=/".to_owned()]);
        assert_eq!(home(1000, &["HOME=/data"]), vec!["HOME=/data".to_owned()]);
        // No passwd at all.
        let mut p = process(None, &[]);
        default_home(&mut p, &dir.path().join("none"));
        assert!(p
            .env()
            .as_ref()
            .expect("env")
            .contains(&"HOME=/".to_owned()));
    }

    #[test]
    fn explicit_false_no_new_privs_is_the_default() {
        let mut p = process(Some(false), &[]);
        normalize_no_new_privileges(&mut p);
        assert_eq!(p.no_new_privileges(), None);
    }

    #[test]
    fn a_notify_profile_is_refused_for_exec() {
        let mut s = seccomp(LinuxSeccompAction::ScmpActAllow);
        s.set_syscalls(Some(vec![
            libcontainer::oci_spec::runtime::LinuxSyscallBuilder::default()
                .names(vec!["mkdir".to_owned()])
                .action(LinuxSeccompAction::ScmpActNotify)
                .build()
                .expect("rule"),
        ]));
        let err = prepare(&mut process(None, &[]), Some(s))
            .err()
            .expect("refused");
        assert!(err.contains("notify"), "{err}");
    }
}
