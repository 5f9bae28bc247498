//! A booted container and the commands to drive it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_driftless");

/// One container at a time: 2 cores do not boot several quickly.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

pub fn rootfs() -> PathBuf {
    std::env::var_os("DRIFTLESS_E2E_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/driftless-e2e/rootfs"))
}

/// Why the suite cannot run here, if it cannot: the missing prerequisite.
pub fn unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("root (the suite boots containers with systemd-nspawn)".into());
    }
    if Command::new("systemd-nspawn")
        .arg("--version")
        .output()
        .is_err()
    {
        return Some("systemd-nspawn (Debian package systemd-container)".into());
    }
    if !rootfs().join("lib/systemd/systemd").exists() {
        return Some(format!(
            "the Debian rootfs at {} (built by tests/e2e/build-rootfs.sh)",
            rootfs().display()
        ));
    }
    None
}

/// Serialises the scenarios, or, when the suite cannot run here, fails
/// naming what is missing; with `DRIFTLESS_TEST_ALLOW_SKIP=1` it records a
/// skip instead and returns None.
pub fn guard() -> Option<MutexGuard<'static, ()>> {
    if let Some(what) = unavailable() {
        skip::missing(&what);
        return None;
    }
    Some(ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner()))
}

pub struct Machine {
    nspawn: Child,
    pub pid: i32,
    /// How it was started: a reboot starts it again the same way.
    args: Vec<String>,
    /// nspawn has exited (a reboot, waited for): nothing left to stop.
    exited: bool,
}

fn children(pid: u32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// A machine that survives a reboot: its own copy of the rootfs (changes
/// stay, unlike `--volatile=overlay`), in a network namespace the test
/// made (a service there, such as etcd, outlives the container).
pub struct Persistent<'a> {
    pub dir: &'a Path,
    pub netns: &'a str,
}

impl Machine {
    /// Boots a container with `binds` (host path, container path, writable).
    pub fn boot(name: &str, binds: &[(&Path, &str, bool)]) -> Machine {
        Machine::start(Machine::args(name, binds, None))
    }

    /// [`Machine::boot`] of a copy of the rootfs in `p.dir`, in network
    /// namespace `p.netns`; it can reboot ([`Machine::rebooted`]).
    pub fn boot_persistent(name: &str, binds: &[(&Path, &str, bool)], p: &Persistent) -> Machine {
        let out = Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(format!("{}/.", rootfs().display()))
            .arg(p.dir)
            .output()
            .expect("cp runs");
        assert!(
            out.status.success(),
            "cannot copy the rootfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Machine::start(Machine::args(name, binds, Some(p)))
    }

    fn args(
        name: &str,
        binds: &[(&Path, &str, bool)],
        persistent: Option<&Persistent>,
    ) -> Vec<String> {
        let mut args = vec![
            "--boot".to_string(),
            "--register=no".into(),
            "--keep-unit".into(),
            format!("--machine={name}"),
        ];
        match persistent {
            None => args.extend([
                "--private-network".to_string(),
                "--volatile=overlay".into(),
                "-D".into(),
                rootfs().display().to_string(),
            ]),
            Some(p) => args.extend([
                format!("--network-namespace-path=/run/netns/{}", p.netns),
                "-D".into(),
                p.dir.display().to_string(),
            ]),
        }
        args.push(format!("--bind-ro={BIN}:/usr/local/bin/driftless"));
        for (host, guest, rw) in binds {
            let flag = if *rw { "--bind" } else { "--bind-ro" };
            args.push(format!("{flag}={}:{guest}", host.display()));
        }
        args
    }

    fn start(args: Vec<String>) -> Machine {
        let script = "mkdir -p /run/systemd/nspawn && mount -t tmpfs tmpfs /run/systemd/nspawn && exec systemd-nspawn \"$@\"";
        let nspawn = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", script, "sh"])
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("systemd-nspawn starts");
        let start = Instant::now();
        // The container's PID 1 is the child of nspawn once it has exec'd
        // systemd.
        let pid = loop {
            let init = children(nspawn.id()).into_iter().find(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .is_ok_and(|c| c.trim() == "systemd")
            });
            if let Some(p) = init {
                break p;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "container did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let m = Machine {
            nspawn,
            pid,
            args,
            exited: false,
        };
        // Wait for boot to finish (running, or degraded with a failed
        // unit); "offline" means the bus is not up yet.
        let start = Instant::now();
        loop {
            let out = m.sh("systemctl is-system-running --wait 2>/dev/null; true");
            let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if state == "running" || state == "degraded" {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "container boot ended as {state:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        m
    }

    /// Waits for the container to go down for a reboot (nspawn exits with
    /// 133 when its systemd reboots), then boots it again the same way.
    #[track_caller]
    pub fn rebooted(&mut self, limit: Duration) {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.nspawn.try_wait().expect("nspawn can be waited for") {
                break status;
            }
            assert!(
                start.elapsed() < limit,
                "the container did not reboot within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        self.exited = true;
        assert_eq!(
            status.code(),
            Some(133),
            "nspawn ended with {status}, not a reboot"
        );
        let again = Machine::start(self.args.clone());
        *self = again;
    }

    /// Whether the container is still up (not gone down for a reboot).
    pub fn running(&mut self) -> bool {
        matches!(self.nspawn.try_wait(), Ok(None))
    }

    /// Runs `cmd` with `/bin/sh -c` inside the container.
    pub fn sh(&self, cmd: &str) -> Output {
        Command::new("nsenter")
            .args(["-t", &self.pid.to_string(), "-a", "/bin/sh", "-c", cmd])
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .output()
            .expect("nsenter runs")
    }

    /// Runs `cmd` and returns stdout, failing on a non-zero exit.
    #[track_caller]
    pub fn ok(&self, cmd: &str) -> String {
        let out = self.sh(cmd);
        assert!(
            out.status.success(),
            "`{cmd}` failed ({:?}):\nstdout: {}\nstderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A unit property, e.g. `MainPID`.
    pub fn prop(&self, unit: &str, prop: &str) -> String {
        self.ok(&format!("systemctl show -P {prop} {unit}"))
            .trim()
            .to_string()
    }

    /// Polls `cmd` until it succeeds or `limit` passes.
    #[track_caller]
    pub fn wait_ok(&self, cmd: &str, limit: Duration) -> String {
        let start = Instant::now();
        loop {
            let out = self.sh(cmd);
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            assert!(
                start.elapsed() < limit,
                "`{cmd}` did not succeed within {limit:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if self.exited {
            return;
        }
        // SIGTERM to nspawn powers the container off; then make sure.
        let pid = nix::unistd::Pid::from_raw(self.nspawn.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

#[path = "../common/git.rs"]
mod git_cli;
pub use git_cli::git;

#[path = "../common/skip.rs"]
pub mod skip;
