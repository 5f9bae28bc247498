//! The Debian package as an operator meets it: `apt-get install` of the
//! .deb built by `packaging/build-deb`, pointed at a repository, started,
//! upgraded to a newer build, removed and purged, in the container with
//! the package's own units (no path rewriting), and lintian on the file.
//!
//! `tests/run` builds the two packages first and passes their paths in
//! `DRIFTLESS_DEB` and `DRIFTLESS_DEB_UPGRADE` (the same binary with a
//! higher Debian revision: what dpkg sees as a newer build).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::machine::{git, guard, skip, Machine};

fn deb(var: &str) -> Option<PathBuf> {
    match std::env::var_os(var).map(PathBuf::from) {
        Some(p) if p.is_file() => Some(p),
        _ => {
            skip::missing(&format!(
                "the Debian package in ${var} (tests/run builds it with packaging/build-deb, \
                 which needs cargo-deb)"
            ));
            None
        }
    }
}

#[test]
fn e2e_16_package_is_lintian_clean() {
    let Some(deb) = deb("DRIFTLESS_DEB") else {
        return;
    };
    let out = match Command::new("lintian")
        .args(["--fail-on", "error,warning", "--pedantic", "--display-info"])
        .arg(&deb)
        .output()
    {
        Ok(out) => out,
        Err(_) => return skip::missing("lintian (Debian package lintian)"),
    };
    // Errors and warnings fail (--fail-on); informational tags about the
    // Rust binary (no fortify functions, misspellings inside dependencies'
    // strings) are shown, not failed.
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && !text
                .lines()
                .any(|l| l.starts_with("E:") || l.starts_with("W:")),
        "lintian on {}:\n{text}{}",
        deb.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn repo() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let w = |rel: &str, text: &str| {
        let p = dir.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    git(dir.path(), &["init", "-q", "-b", "main"]);
    w("driftless.toml", "roles = [\"motd\"]\n");
    w("hosts/default.toml", "");
    w(
        "roles/motd/role.toml",
        "[[files]]\npath = \"/etc/motd.d/driftless\"\ntemplate = \"motd.tera\"\n",
    );
    w("roles/motd/files/motd.tera", "managed on {{ host.name }}\n");
    git(dir.path(), &["add", "-A"]);
    git(dir.path(), &["commit", "-q", "-m", "motd"]);
    dir
}

fn bound(p: &Path) -> String {
    format!("/opt/deb/{}", p.file_name().unwrap().to_string_lossy())
}

#[test]
fn e2e_16_package_installs_runs_upgrades_removes_and_purges() {
    let Some(_g) = guard() else { return };
    let (Some(first), Some(second)) = (deb("DRIFTLESS_DEB"), deb("DRIFTLESS_DEB_UPGRADE")) else {
        return;
    };
    let repo = repo();
    let debs = tempfile::tempdir().unwrap();
    for d in [&first, &second] {
        std::fs::copy(d, debs.path().join(d.file_name().unwrap())).unwrap();
    }
    let m = Machine::boot(
        "e2e-deb",
        &[
            (repo.path(), "/srv/config", false),
            (debs.path(), "/opt/deb", false),
        ],
    );
    // The package's binary, not the one the suite binds into /usr/local.
    m.ok("rm -f /usr/local/bin/driftless 2>/dev/null; umount /usr/local/bin/driftless 2>/dev/null; true");

    // Install: enabled, not started, and it says what to do.
    let install = m.ok(&format!(
        "DEBIAN_FRONTEND=noninteractive apt-get install -y {} 2>&1",
        bound(&first)
    ));
    assert!(
        install.contains("not started: no repository is configured")
            && install.contains("/etc/driftless/agent.toml"),
        "{install}"
    );
    assert_eq!(
        m.ok("systemctl is-enabled driftless.service").trim(),
        "enabled"
    );
    assert_eq!(
        m.ok("systemctl is-enabled driftless.timer || true").trim(),
        "disabled"
    );
    assert_eq!(m.ok("stat -c %a /var/lib/driftless").trim(), "700");
    for f in [
        "/usr/bin/driftless",
        "/usr/share/man/man1/driftless.1.gz",
        "/usr/share/man/man1/driftless-sync.1.gz",
        "/usr/share/bash-completion/completions/driftless",
        "/usr/share/zsh/vendor-completions/_driftless",
        "/usr/share/fish/vendor_completions.d/driftless.fish",
        "/usr/lib/systemd/catalog/driftless.catalog",
        "/usr/lib/udev/rules.d/99-driftless-usb.rules",
        "/etc/cron.d/driftless",
    ] {
        m.ok(&format!("test -f {f}"));
    }
    // The packaged units are valid for this systemd (the rootfs has no
    // man-db to look up their Documentation= pages).
    m.ok("systemd-analyze verify --man=no /usr/lib/systemd/system/driftless.service /usr/lib/systemd/system/driftless-once.service /usr/lib/systemd/system/driftless.timer /usr/lib/systemd/system/driftless-fleetlock.service");
    // The journal catalog was updated: the revert entry is explained.
    let catalog = m.ok("journalctl --list-catalog 2>/dev/null | grep -c driftless || true");
    assert!(
        catalog.trim().parse::<u32>().unwrap_or(0) >= 5,
        "catalog: {catalog}"
    );
    // Started without a source: skipped by its ExecCondition, not failed.
    m.ok("systemctl start driftless.service");
    assert_eq!(m.prop("driftless.service", "ActiveState"), "inactive");
    assert_eq!(m.prop("driftless.service", "Result"), "exec-condition");
    m.ok("! systemctl --quiet is-failed driftless.service");
    // The cron fallback does nothing either.
    let cron_line =
        m.ok("grep -v '^#' /etc/cron.d/driftless | grep driftless | sed 's/.* root //'");
    m.sh(&cron_line);
    m.ok("test ! -e /etc/motd.d/driftless");

    // The FleetLock server's unit, sandboxed, answers the protocol (an
    // etcd that is not there: 503, store_unavailable) and is not enabled.
    assert_eq!(
        m.ok("systemctl is-enabled driftless-fleetlock.service || true")
            .trim(),
        "disabled"
    );
    m.ok("printf '[fleet]\\nendpoints = [\"http://127.0.0.1:2\"]\\n' > /etc/driftless/fleetlock.toml");
    m.ok("mkdir -p /etc/systemd/system/driftless-fleetlock.service.d && printf '[Service]\\nExecStart=\\nExecStart=/usr/bin/driftless fleet serve-fleetlock --listen 127.0.0.1:8282 --config /etc/driftless/fleetlock.toml\\n' > /etc/systemd/system/driftless-fleetlock.service.d/e2e.conf && systemctl daemon-reload");
    m.ok("systemctl start driftless-fleetlock.service");
    assert_eq!(
        m.prop("driftless-fleetlock.service", "ActiveState"),
        "active"
    );
    // bash's /dev/tcp, with the protocol's request written out by hand.
    let answer = m.ok(concat!(
        "cat > /tmp/fleetlock-req.sh <<'EOF'\n",
        "exec 3<>/dev/tcp/127.0.0.1/8282\n",
        "body='{\"client_params\":{\"id\":\"a\",\"group\":\"b\"}}'\n",
        "printf 'POST /v1/pre-reboot HTTP/1.1\\r\\nHost: x\\r\\nfleet-lock-protocol: true\\r\\nContent-Length: %d\\r\\nConnection: close\\r\\n\\r\\n%s' \"${#body}\" \"$body\" >&3\n",
        "timeout 20 cat <&3\n",
        "EOF\n",
        "bash /tmp/fleetlock-req.sh"
    ));
    assert!(
        answer.starts_with("HTTP/1.1 503") && answer.contains("store_unavailable"),
        "{answer}"
    );
    m.ok("systemctl stop driftless-fleetlock.service && rm -r /etc/systemd/system/driftless-fleetlock.service.d /etc/driftless/fleetlock.toml && systemctl daemon-reload");

    // Configure and start: the repository is applied.
    m.ok("printf 'source = \"/srv/config\"\\nhost = \"web1\"\\ninterval = \"1h\"\\nsplay = \"0s\"\\n' >> /etc/driftless/agent.toml");
    m.ok("systemctl start driftless.service");
    m.wait_ok(
        "systemctl show -P StatusText driftless.service | grep -q 'idle since'",
        Duration::from_secs(60),
    );
    assert_eq!(m.ok("cat /etc/motd.d/driftless"), "managed on web1\n");
    let head = git(repo.path(), &["rev-parse", "HEAD"]);
    let status = m.ok("driftless status");
    assert!(status.contains(&head[..12]), "{status}");
    // While the daemon is active, the cron line is a no-op. Every run
    // touches last-run.json (a new file, or at least its mtime, hence its
    // ctime), even one that changes nothing; the daemon polls hourly.
    let last_run = "stat -c '%i %z' /var/lib/driftless/last-run.json";
    let before = m.ok(last_run);
    m.sh(&cron_line);
    assert_eq!(m.ok(last_run), before, "cron ran beside the daemon");

    // Upgrade to a newer build: restarted, configuration and state kept.
    let pid = m.prop("driftless.service", "MainPID");
    m.ok(&format!(
        "DEBIAN_FRONTEND=noninteractive apt-get install -y {} 2>&1",
        bound(&second)
    ));
    m.wait_ok(
        "systemctl show -P StatusText driftless.service | grep -q 'idle since'",
        Duration::from_secs(60),
    );
    assert_ne!(m.prop("driftless.service", "MainPID"), pid, "not restarted");
    assert_eq!(m.prop("driftless.service", "ActiveState"), "active");
    assert!(m
        .ok("dpkg-query -W -f '${Version}' driftless")
        .ends_with("-99"));
    assert!(m
        .ok("cat /etc/driftless/agent.toml")
        .contains("/srv/config"));
    let status = m.ok("driftless status");
    assert!(
        status.contains(&head[..12]),
        "state lost on upgrade: {status}"
    );

    // Remove: the agent stops and goes; managed files, state and config stay.
    m.ok("DEBIAN_FRONTEND=noninteractive apt-get remove -y driftless 2>&1");
    m.ok("test ! -e /usr/bin/driftless");
    assert_ne!(m.prop("driftless.service", "ActiveState"), "active");
    assert_eq!(m.ok("cat /etc/motd.d/driftless"), "managed on web1\n");
    m.ok("test -d /var/lib/driftless && test -f /etc/driftless/agent.toml");

    // Purge: the agent's state and config go; the managed files never do.
    m.ok("DEBIAN_FRONTEND=noninteractive apt-get purge -y driftless 2>&1");
    m.ok("test ! -e /var/lib/driftless && test ! -e /etc/driftless");
    assert_eq!(m.ok("cat /etc/motd.d/driftless"), "managed on web1\n");
    assert!(
        m.ok("dpkg-query -W -f '${db:Status-Abbrev}' driftless 2>/dev/null || true")
            .trim()
            .is_empty()
            || !m
                .ok("dpkg -l driftless 2>/dev/null | tail -1 || true")
                .starts_with("ii")
    );
}

fn oldroot() -> Option<PathBuf> {
    let root = std::env::var_os("DRIFTLESS_E2E_OLDROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/driftless-e2e/bullseye"));
    if root.join("usr/bin/dpkg").exists() {
        Some(root)
    } else {
        skip::missing(&format!(
            "the Debian 11 root at {} (built by tests/e2e/build-oldroot.sh)",
            root.display()
        ));
        None
    }
}

/// The package's glibc floor, proven on the oldest release it names:
/// Debian 11 (glibc 2.31) takes the .deb with dpkg (its Depends hold) and
/// the binary syncs a repository there. The cached root is the lower layer
/// of an overlay in a private mount namespace: nothing is left in it.
#[test]
fn e2e_17_package_installs_and_syncs_on_debian_11_glibc_2_31() {
    let Some(deb) = deb("DRIFTLESS_DEB") else {
        return;
    };
    let Some(lower) = oldroot() else { return };
    if !nix::unistd::geteuid().is_root() {
        return skip::missing("root (the Debian 11 test mounts an overlay and chroots)");
    }
    let repo = repo();
    let work = tempfile::tempdir().unwrap();
    for d in ["upper", "work", "merged"] {
        std::fs::create_dir(work.path().join(d)).unwrap();
    }
    std::fs::copy(&deb, work.path().join("driftless.deb")).unwrap();
    let script = r#"set -e
w=$1; lower=$2; repo=$3
m=$w/merged
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$w/upper,workdir=$w/work" "$m"
mount -t proc proc "$m/proc"
mount --bind /dev "$m/dev"
mkdir -p "$m/srv/config" "$m/tmp/pkg"
mount --bind "$repo" "$m/srv/config"
cp "$w/driftless.deb" "$m/tmp/pkg/"
chroot "$m" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin sh -c '
  ldd --version | head -1
  dpkg -i /tmp/pkg/driftless.deb
  driftless --version
  driftless sync --once --no-config --source /srv/config --host web1 --root /tmp/r --state-dir /tmp/s
  cat /tmp/r/etc/motd.d/driftless
'"#;
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", script, "sh"])
        .arg(work.path())
        .arg(&lower)
        .arg(repo.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("2.31"), "not glibc 2.31:\n{stdout}");
    assert!(stdout.contains("driftless 0."), "{stdout}");
    assert!(stdout.ends_with("managed on web1\n"), "{stdout}\n{stderr}");
}
