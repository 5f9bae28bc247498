//! Kernels without `openat2` (Linux before 5.6, such as Ubuntu 20.04's own
//! 5.4, which has the glibc the package asks for): the host's facts and
//! account files are read with it, so that a root's links cannot lead out
//! of the root. Such a kernel is made real here with a seccomp filter that
//! answers `openat2` with ENOSYS, as those kernels do; and with EPERM, as
//! seccomp filters older than the call do (Docker before 20.10, systemd's
//! `SystemCallErrorNumber=EPERM`).
//!
//! Before: a host root lost its `os_release` and `machine_id` facts with a
//! warning on every sync (a template using them failed), and another root
//! failed on `cannot open …/etc/passwd: ENOSYS`.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

use crate::support::*;

/// `c`, run with `openat2` failing with `errno`.
fn without_openat2(c: &mut Command, errno: i32) -> &mut Command {
    // SAFETY: between fork and exec the closure only builds the filter on
    // its stack and makes two prctl calls, both async-signal-safe.
    unsafe {
        c.pre_exec(move || {
            let stmt = |code: u32, k: u32| libc::sock_filter {
                code: code as u16,
                jt: 0,
                jf: 0,
                k,
            };
            let mut filter = [
                // The system call's number (offset 0 of seccomp_data).
                stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0),
                // openat2: on to the next instruction; else skip it.
                libc::sock_filter {
                    code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
                    jt: 0,
                    jf: 1,
                    k: libc::SYS_openat2 as u32,
                },
                stmt(
                    libc::BPF_RET | libc::BPF_K,
                    libc::SECCOMP_RET_ERRNO | errno as u32,
                ),
                stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
            ];
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_mut_ptr(),
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &prog as *const libc::sock_fprog,
                ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// The `ID` of this machine's os-release, as systemd documents the file.
fn os_id() -> String {
    let text = std::fs::read_to_string("/etc/os-release")
        .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
        .expect("this machine has an os-release");
    text.lines()
        .find_map(|l| l.strip_prefix("ID="))
        .map(|v| v.trim_matches('"').to_string())
        .expect("os-release has an ID")
}

#[test]
fn the_host_root_reads_its_facts_without_openat2() {
    the_host_root_reads_its_facts(libc::ENOSYS);
}

#[test]
fn the_host_root_reads_its_facts_when_a_seccomp_filter_refuses_openat2() {
    the_host_root_reads_its_facts(libc::EPERM);
}

fn the_host_root_reads_its_facts(errno: i32) {
    let repo = Repo::new();
    repo.write("driftless.toml", "roles = [\"app\"]\n")
        .write("hosts/h1.toml", "")
        .write(
            "roles/app/role.toml",
            "[[files]]\npath = \"/etc/driftless-openat2-test.conf\"\ntemplate = \"os.tera\"\n",
        )
        .write(
            "roles/app/files/os.tera",
            "os={{ host.facts.os_release.ID }}\n",
        );
    repo.commit("facts");
    let state = tempfile::tempdir().unwrap();
    // `plan` changes nothing, also with the real root.
    let out = without_openat2(
        Command::new(BIN)
            .args(["plan", "--no-config", "--host", "h1", "--root", "/"])
            .arg("--source")
            .arg(repo.path())
            .arg("--state-dir")
            .arg(state.path())
            .env("NO_COLOR", "1"),
        errno,
    )
    .output()
    .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "plan failed without openat2:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains(&format!("os={}", os_id())),
        "the facts of / were not read without openat2:\n{stdout}\n{stderr}"
    );
    assert!(!stderr.contains("fact source not read"), "{stderr}");
    assert!(!std::path::Path::new("/etc/driftless-openat2-test.conf").exists());
}

#[test]
fn another_root_is_refused_without_openat2_saying_so_and_nothing_changes() {
    another_root_is_refused(libc::ENOSYS);
}

#[test]
fn another_root_is_refused_when_a_seccomp_filter_refuses_openat2() {
    another_root_is_refused(libc::EPERM);
}

fn another_root_is_refused(errno: i32) {
    let host = Host::new("h1");
    let repo = simple_repo(&[("/etc/app.conf", "x\n")]);
    let out = without_openat2(&mut host.cmd(repo.path(), &["sync", "--once"]), errno)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("openat2 is not available (Linux 5.6 or later has it")
            && stderr.contains("etc/passwd"),
        "{stderr}"
    );
    assert!(host.tree().is_empty(), "{:?}", host.tree());
    // The same sync where openat2 exists.
    host.sync(repo.path()).ok();
    assert_eq!(host.read("/etc/app.conf").as_deref(), Some("x\n"));
}
