//! Configured reboots under the fleet lock (`[fleet] reboot = true`), on a
//! real systemd that really reboots: the container runs on its own copy of
//! the rootfs (so its files and the agent's state survive the reboot) in a
//! network namespace where a real etcd runs (so the fleet outlives the
//! container), and the test boots it again when nspawn says it rebooted.
//!
//! The test reads and writes etcd's keys from a thread that joined that
//! namespace (`setns`), with the same etcd client the agent uses.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::machine::{git, guard, Machine, Persistent, BIN};

/// The container is up and no reboot is on its way. The agent only queues
/// `reboot.target`, and nspawn exits a while after, so `running()` right
/// after a sync cannot tell: systemd's job queue and its state can.
#[track_caller]
fn no_reboot_queued(m: &mut Machine, why: &str) {
    assert!(m.running(), "{why}: the container is gone");
    let jobs = m.ok("systemctl list-jobs --no-legend --no-pager");
    assert!(!jobs.contains("reboot.target"), "{why}: {jobs}");
    let state = m.sh("systemctl is-system-running");
    let state = String::from_utf8_lossy(&state.stdout);
    assert!(!state.contains("stopping"), "{why}: the system is {state}");
}

const ENDPOINT: &str = "http://127.0.0.1:23790";

/// etcd alone in a network namespace of its own.
struct NetnsEtcd {
    ns: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl NetnsEtcd {
    fn start() -> NetnsEtcd {
        let ns = format!("driftless-e2e-{}", std::process::id());
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("ip runs");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        ip(&["netns", "add", &ns]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &ns, "etcd", "--name=t"])
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={ENDPOINT}"))
            .arg(format!("--advertise-client-urls={ENDPOINT}"))
            .arg("--listen-peer-urls=http://127.0.0.1:23800")
            .arg("--initial-advertise-peer-urls=http://127.0.0.1:23800")
            .arg("--initial-cluster=t=http://127.0.0.1:23800")
            .arg("--log-level=error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd (Debian package etcd-server) starts");
        let e = NetnsEtcd {
            ns,
            child,
            _dir: dir,
        };
        let start = Instant::now();
        while e.try_keys("/").is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "etcd did not start"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        e
    }

    /// Runs `op` against etcd from a thread inside the namespace.
    fn with<T: Send>(
        &self,
        op: impl FnOnce(
                etcd_client::Client,
            ) -> std::pin::Pin<
                Box<dyn std::future::Future<Output = Result<T, etcd_client::Error>> + Send>,
            > + Send,
    ) -> Result<T, String> {
        let path = format!("/run/netns/{}", self.ns);
        std::thread::scope(|s| {
            s.spawn(move || {
                let ns = std::fs::File::open(&path).map_err(|e| e.to_string())?;
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| e.to_string())?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                rt.block_on(async {
                    let client = tokio::time::timeout(
                        Duration::from_secs(5),
                        etcd_client::Client::connect([ENDPOINT], None),
                    )
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                    op(client).await.map_err(|e| e.to_string())
                })
            })
            .join()
            .unwrap()
        })
    }

    fn try_keys(&self, prefix: &str) -> Result<Vec<String>, String> {
        let prefix = prefix.to_string();
        self.with(move |mut c| {
            Box::pin(async move {
                let r = c
                    .get(
                        prefix,
                        Some(
                            etcd_client::GetOptions::new()
                                .with_prefix()
                                .with_keys_only(),
                        ),
                    )
                    .await?;
                Ok(r.kvs()
                    .iter()
                    .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
                    .collect())
            })
        })
    }

    fn keys(&self, prefix: &str) -> Vec<String> {
        self.try_keys(prefix).expect("etcd answers")
    }

    fn put(&self, key: &str, value: &str) {
        let (key, value) = (key.to_string(), value.to_string());
        self.with(move |mut c| {
            Box::pin(async move {
                c.put(key, value, None).await?;
                Ok(())
            })
        })
        .expect("etcd answers");
    }

    fn delete(&self, key: &str) {
        let key = key.to_string();
        self.with(move |mut c| {
            Box::pin(async move {
                c.delete(key, None).await?;
                Ok(())
            })
        })
        .expect("etcd answers");
    }
}

/// `driftless fleet serve-fleetlock` in the namespace, on [`FLEETLOCK`].
struct NetnsFleetLock {
    child: Child,
    _dir: tempfile::TempDir,
}

const FLEETLOCK: &str = "127.0.0.1:8282";

impl NetnsFleetLock {
    fn start(etcd: &NetnsEtcd) -> NetnsFleetLock {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("agent.toml");
        std::fs::write(
            &config,
            format!("host = \"lock\"\n[fleet]\nendpoints = [\"{ENDPOINT}\"]\n"),
        )
        .unwrap();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &etcd.ns, BIN])
            .args([
                "fleet",
                "serve-fleetlock",
                "--listen",
                FLEETLOCK,
                "--max",
                "1",
            ])
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.path().join("server.log")).unwrap())
            .spawn()
            .expect("ip netns exec driftless runs");
        let mut first = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(
            first.contains(FLEETLOCK),
            "the FleetLock server did not start: {first:?} {}",
            std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default()
        );
        NetnsFleetLock { child, _dir: dir }
    }
}

impl Drop for NetnsFleetLock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NetnsEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

const AGENT: &str = "source = \"/srv/config\"\nhost = \"e2e-reboot\"\ninterval = \"1h\"\nsplay = \"0s\"\njob_timeout = \"30s\"\n\n[fleet]\nendpoints = [\"http://127.0.0.1:23790\"]\ngroup = \"web\"\nreboot = true\n";

const PERMITS: &str = "/driftless/permits/web/";
const MINE: &str = "/driftless/permits/web/e2e-reboot";

/// Issue 16's configured reboot, with issue 17's fleet lock, on a real
/// systemd and a real etcd: a committed change that asks for a reboot
/// reboots the host holding a permit of its group (lease-less, so it
/// survives the reboot), which the first healthy run of the new boot
/// gives back; with the group's permits taken the reboot waits; a host
/// that comes back unhealthy keeps the permit until a run is healthy.
#[test]
fn e2e_24_a_reboot_waits_for_a_fleet_permit_and_gives_it_back_once_healthy() {
    let Some(_g) = guard() else { return };
    let etcd = NetnsEtcd::start();
    let repo = tempfile::tempdir().unwrap();
    let w = |rel: &str, text: &str| {
        let p = repo.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    git(repo.path(), &["init", "-q", "-b", "main"]);
    w("driftless.toml", "roles = [\"kernel\"]\n");
    w("hosts/default.toml", "");
    w("roles/kernel/files/sysctl.conf", "vm.swappiness = 10\n");
    // The check reads /run, a tmpfs: it passes before a reboot only when
    // the test says so, and fails after one until the test says so again.
    w(
        "roles/kernel/role.toml",
        "[[files]]\npath = \"/etc/sysctl.d/90-e2e.conf\"\nsource = \"sysctl.conf\"\nreboot = true\n\n\
         [[checks]]\nname = \"healthy\"\ncommand = { argv = [\"/bin/test\", \"-e\", \"/run/e2e-healthy\"] }\n",
    );
    git(repo.path(), &["add", "-A"]);
    git(repo.path(), &["commit", "-q", "-m", "v1 needs a reboot"]);
    let root = tempfile::tempdir().unwrap();
    let mut m = Machine::boot_persistent(
        "e2e-reboot",
        &[(repo.path(), "/srv/config", false)],
        &Persistent {
            dir: root.path(),
            netns: &etcd.ns,
        },
    );
    m.ok(&format!(
        "mkdir -p /etc/driftless && printf '{}' > /etc/driftless/agent.toml",
        AGENT.replace('\n', "\\n")
    ));
    let boot = |m: &Machine| m.ok("cat /proc/sys/kernel/random/boot_id");
    let sync = |m: &Machine| {
        let out = m.sh("driftless sync --once 2>&1");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    // 1. Applied, healthy, a reboot due: the permit is taken and the host
    //    reboots. First the agent is killed after it recorded the permit
    //    it is about to take, then after etcd granted it: neither leaves a
    //    permit nobody gives back, and the next run reboots with it.
    let boot1 = boot(&m);
    m.ok("touch /run/e2e-healthy");
    let killed = |m: &Machine, point: &str| {
        let out = m.sh(&format!(
            "DRIFTLESS_TEST_FAILPOINT={point} driftless sync --once 2>&1"
        ));
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&out.status),
            None,
            "the shell itself died"
        );
        assert_eq!(
            out.status.code(),
            Some(137),
            "{point}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    };
    killed(&m, "sync.reboot.recorded");
    assert!(etcd.keys(PERMITS).is_empty());
    killed(&m, "sync.reboot.permit");
    assert_eq!(etcd.keys(PERMITS), [MINE]);
    no_reboot_queued(&mut m, "");
    assert_eq!(boot(&m), boot1);
    let log = sync(&m);
    assert!(log.contains("rebooting the host for commit"), "{log}");
    m.rebooted(Duration::from_secs(90));
    assert_ne!(boot(&m), boot1);
    assert_eq!(etcd.keys(PERMITS), [MINE], "the permit survives the reboot");

    // 2. Back, but the check fails: the permit stays (the group waits),
    //    and `status` says so.
    let log = sync(&m);
    assert!(
        log.contains("back from the reboot, but") && log.contains("keeping the fleet permit"),
        "{log}"
    );
    assert_eq!(etcd.keys(PERMITS), [MINE]);
    let fleet = m.ok("driftless fleet status 2>&1");
    assert!(fleet.contains("web: e2e-reboot (reboot)"), "{fleet}");
    let status = m.ok("driftless status");
    assert!(
        status.contains("reboot permit: held since")
            && status.contains("(group web, commit ")
            && status.contains("given back after the first healthy run of this boot"),
        "{status}"
    );

    // 3. Healthy: given back.
    m.ok("touch /run/e2e-healthy");
    let log = sync(&m);
    assert!(log.contains("back from the reboot and healthy"), "{log}");
    assert!(etcd.keys(PERMITS).is_empty(), "{log}");
    m.ok("test ! -e /var/lib/driftless/reboot-permit.json");

    // 4. The file drifts: its repair asks for a reboot again, but the
    //    group's only permit is another host's: the reboot waits.
    etcd.put("/driftless/permits/web/other-host", "other-host");
    m.ok("echo 'vm.swappiness = 60' > /etc/sysctl.d/90-e2e.conf");
    let boot2 = boot(&m);
    let log = sync(&m);
    assert!(
        log.contains(
            "a reboot is due, waiting for a fleet permit: all 1 permits of group web are taken"
        ),
        "{log}"
    );
    no_reboot_queued(&mut m, "rebooted without a permit");
    assert_eq!(boot(&m), boot2);
    assert_eq!(etcd.keys(PERMITS), ["/driftless/permits/web/other-host"]);

    // 5. The other host gives its permit back, but the group is
    //    suspended: still no reboot. Resumed, but the host is unhealthy
    //    now: no reboot of an unhealthy host.
    etcd.delete("/driftless/permits/web/other-host");
    m.ok("driftless suspend --group web --reason e2e >/dev/null 2>&1");
    let log = sync(&m);
    assert!(
        log.contains("waiting for a fleet permit: rollouts of group web are suspended"),
        "{log}"
    );
    assert!(etcd.keys(PERMITS).is_empty(), "{log}");
    m.ok("driftless resume --group web >/dev/null 2>&1");
    m.ok("rm /run/e2e-healthy");
    let log = sync(&m);
    assert!(log.contains("not rebooting an unhealthy host"), "{log}");
    assert!(etcd.keys(PERMITS).is_empty(), "{log}");
    no_reboot_queued(&mut m, "");
    assert_eq!(boot(&m), boot2);

    // 6. Healthy again: the next run reboots.
    m.ok("touch /run/e2e-healthy");
    let log = sync(&m);
    assert!(log.contains("rebooting the host for commit"), "{log}");
    m.rebooted(Duration::from_secs(90));
    assert_ne!(boot(&m), boot2);
    assert_eq!(
        m.ok("cat /etc/sysctl.d/90-e2e.conf"),
        "vm.swappiness = 10\n"
    );
    // 7. Back, unhealthy, and a new commit arrives that changes no file
    //    here: its checks fail, and so do the applied commit's (the same
    //    checks), so the host is unhealthy, not the commit: not recorded,
    //    not marked bad. The run neither leases nor deletes the permit
    //    the host holds; the healthy run records the commit and gives the
    //    permit back.
    git(
        repo.path(),
        &[
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "v2 changes nothing here",
        ],
    );
    let log = sync(&m);
    assert!(
        log.contains("the host is unhealthy, not the commit. Not recorded"),
        "{log}"
    );
    assert!(log.contains("keeping the fleet permit"), "{log}");
    assert_eq!(etcd.keys(PERMITS), [MINE], "{log}");
    m.ok("touch /run/e2e-healthy");
    let log = sync(&m);
    assert!(
        log.contains("recorded as applied: it changes no file on this host"),
        "{log}"
    );
    assert!(log.contains("back from the reboot and healthy"), "{log}");
    assert!(etcd.keys(PERMITS).is_empty(), "{log}");

    // 8. The same host behind a FleetLock server instead of etcd (zincati's
    //    protocol, `driftless fleet serve-fleetlock` over the same
    //    permits): the reboot waits while the group's one slot is
    //    another's, then reboots holding the slot, and the first healthy
    //    run of the new boot gives it back.
    let _server = NetnsFleetLock::start(&etcd);
    let fleetlock = format!(
        "source = \"/srv/config\"\nhost = \"e2e-reboot\"\ninterval = \"1h\"\nsplay = \"0s\"\njob_timeout = \"30s\"\n\n\
         [fleet]\nfleetlock = \"http://{FLEETLOCK}\"\ngroup = \"web\"\nreboot = true\n"
    );
    m.ok(&format!(
        "printf '{}' > /etc/driftless/agent.toml",
        fleetlock.replace('\n', "\\n")
    ));
    etcd.put("/driftless/permits/web/other-host", "other-host");
    m.ok("echo 'vm.swappiness = 61' > /etc/sysctl.d/90-e2e.conf");
    let boot3 = boot(&m);
    let log = sync(&m);
    assert!(
        log.contains("a reboot is due, waiting for a fleet permit: the FleetLock server")
            && log.contains("failed_lock_semaphore_full"),
        "{log}"
    );
    no_reboot_queued(&mut m, "rebooted without a slot");
    assert_eq!(boot(&m), boot3);
    etcd.delete("/driftless/permits/web/other-host");
    let log = sync(&m);
    assert!(log.contains("rebooting the host for commit"), "{log}");
    m.rebooted(Duration::from_secs(90));
    assert_ne!(boot(&m), boot3);
    assert_eq!(etcd.keys(PERMITS), [MINE], "the slot survives the reboot");
    m.ok("touch /run/e2e-healthy");
    let log = sync(&m);
    assert!(log.contains("back from the reboot and healthy"), "{log}");
    assert!(etcd.keys(PERMITS).is_empty(), "{log}");
}
