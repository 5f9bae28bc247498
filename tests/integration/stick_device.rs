//! The block-device half of the USB flow, on a real filesystem image
//! attached to a loop device: `bundle stick /dev/loopN` mounts it
//! read-only, imports, syncs, remounts read-write for the report, and
//! unmounts. (The nspawn suite covers the directory half without network.)
//! Needs root and loop devices: without them it fails, naming what is
//! missing, unless `DRIFTLESS_TEST_ALLOW_SKIP=1` (then the skip is counted).

use std::path::Path;
use std::process::Command;

use crate::support::*;
use crate::trust::{app_repo, create_bundle, run_with, Signer};

fn sh(cmd: &str) -> std::process::Output {
    Command::new("sh").args(["-c", cmd]).output().unwrap()
}

fn unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root".into());
    }
    for tool in ["losetup", "mkfs.ext4", "debugfs"] {
        if !sh(&format!("command -v {tool}")).status.success() {
            return Some(format!("{tool} missing"));
        }
    }
    None
}

/// Detaches the loop device at the end, whatever happens.
struct Loop(String);
impl Drop for Loop {
    fn drop(&mut self) {
        let _ = sh(&format!(
            "umount /run/driftless/stick/{} 2>/dev/null; losetup -d {}",
            &self.0[5..],
            self.0
        ));
    }
}

/// Runs `mkfs` (a shell command that makes the image `img`), then
/// attaches `img` to a loop device; an error says why it cannot be
/// attached (a missing prerequisite).
/// An ext4 stick labelled DRIFTLESS holding `content`, attached; `then`
/// (a shell command, `{}` the image) runs on the image before that.
fn ext4_stick(img: &Path, content: &Path, then: &str) -> Result<Loop, String> {
    make_and_attach(
        img,
        &format!(
            "truncate -s 16M {0} && mkfs.ext4 -q -L DRIFTLESS -d {1} {0} {2}",
            img.display(),
            content.display(),
            then.replace("{}", &img.display().to_string())
        ),
    )
}

fn make_and_attach(img: &Path, mkfs: &str) -> Result<Loop, String> {
    let mk = sh(mkfs);
    assert!(
        mk.status.success(),
        "{}",
        String::from_utf8_lossy(&mk.stderr)
    );
    let out = sh(&format!("losetup --find --show {}", img.display()));
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr).to_string();
        return Err(format!("cannot attach a loop device: {why}"));
    }
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // A loop device keeps the block layer's read-only flag across a
    // detach: a fresh stick is writable, whatever an earlier test left.
    let rw = sh(&format!("blockdev --setrw {dev}"));
    assert!(
        rw.status.success(),
        "{}",
        String::from_utf8_lossy(&rw.stderr)
    );
    Ok(Loop(dev))
}

/// `bundle stick DEVICE` on `host`, trusting `signer`.
fn stick_run(host: &Host, device: &str, signer: &Signer) -> Run {
    run_with(
        host,
        Path::new("bundle:"),
        &["bundle", "stick", device],
        signer,
    )
}

/// A signed repository, and an ext4 stick image holding its bundle
/// (`prepare` may add to the stick's content first), attached. Fields
/// drop in order: the loop device is detached before its image goes.
struct SignedStick {
    dev: Loop,
    img: std::path::PathBuf,
    _img_dir: tempfile::TempDir,
    signer: Signer,
    repo: crate::support::Repo,
}

impl SignedStick {
    fn new(prepare: impl FnOnce(&Path)) -> Result<SignedStick, String> {
        SignedStick::made(prepare, "")
    }

    /// [`SignedStick::new`], with `then` run on the image after mkfs
    /// (see [`ext4_stick`]).
    fn made(prepare: impl FnOnce(&Path), then: &str) -> Result<SignedStick, String> {
        let signer = Signer::new("release@example.com");
        let repo = app_repo(&signer, "from the stick\n");
        let content = tempfile::tempdir().unwrap();
        let bundles = content.path().join("driftless/bundles");
        std::fs::create_dir_all(&bundles).unwrap();
        create_bundle(&repo, &bundles.join("site.bundle"), &signer, None).ok();
        prepare(content.path());
        let img_dir = tempfile::tempdir().unwrap();
        let img = img_dir.path().join("stick.img");
        let dev = ext4_stick(&img, content.path(), then)?;
        Ok(SignedStick {
            dev,
            img,
            _img_dir: img_dir,
            signer,
            repo,
        })
    }
}

#[test]
fn stick_on_a_block_device_is_mounted_read_only_and_gets_the_report() {
    if let Some(why) = unavailable() {
        return skip::missing(&format!("the USB stick device test cannot run: {why}"));
    }
    let stick = match SignedStick::new(|_| {}) {
        Ok(stick) => stick,
        Err(why) => return skip::missing(&why),
    };
    let (signer, repo, dev, img) = (&stick.signer, &stick.repo, &stick.dev, &stick.img);

    let host = Host::new("web1");
    let run = stick_run(&host, &dev.0, signer);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stderr.contains("mounted read-only"), "{}", run.stderr);
    assert_eq!(
        host.read("/etc/app.conf").as_deref(),
        Some("from the stick\n")
    );
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !mounts.contains(&dev.0),
        "the stick is unmounted afterwards: {mounts}"
    );
    // Read the report straight out of the image, as the connected side would.
    let report = sh(&format!(
        "debugfs -R 'cat /driftless/reports/web1.json' {} 2>/dev/null",
        img.display()
    ));
    let report: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap_or_else(|e| {
        panic!(
            "no report on the stick ({e}): {}",
            String::from_utf8_lossy(&report.stdout)
        )
    });
    assert_eq!(report["outcome"], "applied");
    assert_eq!(report["commit"], repo.head());
}

/// Issue 12 §7: symlinks on the stick were followed, so the report was
/// written as root to a host path the stick chose. The stick is mounted
/// `nosymfollow`: a link in place of `driftless/reports` leads nowhere.
#[test]
fn a_symlink_on_the_stick_cannot_send_the_report_to_a_host_path() {
    if let Some(why) = unavailable() {
        return skip::missing(&format!("the USB stick device test cannot run: {why}"));
    }
    let victim = tempfile::tempdir().unwrap();
    let stick = match SignedStick::new(|content| {
        std::os::unix::fs::symlink(victim.path(), content.join("driftless/reports")).unwrap()
    }) {
        Ok(stick) => stick,
        Err(why) => return skip::missing(&why),
    };
    let (signer, dev) = (&stick.signer, &stick.dev);
    let host = Host::new("web1");
    let run = stick_run(&host, &dev.0, signer);
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    assert!(run.stderr.contains("mounted read-only"), "{}", run.stderr);
    // The stick's update itself still applies.
    assert_eq!(
        host.read("/etc/app.conf").as_deref(),
        Some("from the stick\n"),
        "{}",
        run.stderr
    );
    let leaked: Vec<_> = std::fs::read_dir(victim.path())
        .unwrap()
        .flatten()
        .collect();
    assert!(
        leaked.is_empty(),
        "the report went through the stick's link to {}: {leaked:?}\n{}",
        victim.path().display(),
        run.stderr
    );
}

/// The bug this pins: a stick of any filesystem was mounted (the kernel
/// parsing a crafted image of a rarely used driver as root), trying every
/// type the kernel knew. A minix stick is now refused before anything is
/// mounted, with an error that says which filesystems a stick may have.
#[test]
fn a_stick_of_another_filesystem_is_refused_unmounted_naming_the_ones_allowed() {
    if let Some(why) = unavailable() {
        return skip::missing(&format!("the USB stick device test cannot run: {why}"));
    }
    if !sh("command -v mkfs.minix").status.success() {
        return skip::missing("mkfs.minix (util-linux) is missing");
    }
    let img_dir = tempfile::tempdir().unwrap();
    let img = img_dir.path().join("stick.img");
    let dev = match make_and_attach(
        &img,
        &format!(
            "truncate -s 4M {0} && mkfs.minix {0} >/dev/null",
            img.display()
        ),
    ) {
        Ok(dev) => dev,
        Err(why) => return skip::missing(&why),
    };
    let host = Host::new("web1");
    let signer = crate::trust::Signer::new("release@example.com");
    let run = stick_run(&host, &dev.0, &signer);
    assert_ne!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr.contains("vfat, exfat, ext4") && run.stderr.contains(&dev.0),
        "{}",
        run.stderr
    );
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains(&dev.0), "mounted: {mounts}");
    assert!(host.tree().is_empty(), "the host changed");
}

/// A run stopped while its stick was mounted (SIGTERM outside a
/// transaction, a kill) leaves the mount behind. The next stick with that
/// device name is not mounted over it: the leftover is detached, this
/// stick is read, and nothing stays mounted afterwards.
#[test]
fn a_mount_an_interrupted_run_left_is_detached_not_mounted_over() {
    if let Some(why) = unavailable() {
        return skip::missing(&format!("the USB stick device test cannot run: {why}"));
    }
    let stick = match SignedStick::new(|_| {}) {
        Ok(stick) => stick,
        Err(why) => return skip::missing(&why),
    };
    let (signer, dev) = (&stick.signer, &stick.dev);
    // The leftover: an empty tmpfs where the stick is mounted.
    let target = format!("/run/driftless/stick/{}", &dev.0[5..]);
    let left = sh(&format!(
        "mkdir -p {target} && mount -t tmpfs -o size=1M leftover {target}"
    ));
    assert!(
        left.status.success(),
        "{}",
        String::from_utf8_lossy(&left.stderr)
    );
    let host = Host::new("web1");
    let run = stick_run(&host, &dev.0, signer);
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    if mounts.contains(&format!(" {target} ")) {
        let _ = sh(&format!("umount -l {target}"));
    }
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        host.read("/etc/app.conf").as_deref(),
        Some("from the stick\n")
    );
    assert!(
        !mounts.contains(&format!(" {target} ")),
        "still mounted at {target}: {mounts}"
    );
}

/// The bug: an ext4 stick whose journal held unfinished writes (pulled
/// out without unmounting) had its journal replayed by the "read-only"
/// mount, which wrote to the stick, the kernel walking a journal the
/// stick's maker wrote before anything on it was verified; and a
/// read-only mount also cleans up the orphan inodes the superblock lists
/// (`last_orphan`), truncating files. It is mounted without its journal
/// now (`noload`), from a device made read-only for the time, imported
/// from, and given no report, which would need the replay: not one byte
/// of it changes.
#[test]
fn a_stick_with_an_unfinished_ext4_journal_is_read_without_replaying_it() {
    if let Some(why) = unavailable() {
        return skip::missing(&format!("the USB stick device test cannot run: {why}"));
    }
    // Inode 12: the first file mkfs copied onto the stick.
    let dirty =
        "&& debugfs -w -R 'feature needs_recovery' {} && debugfs -w -R 'ssv last_orphan 12' {}";
    let stick = match SignedStick::made(|_| {}, dirty) {
        Ok(stick) => stick,
        Err(why) => return skip::missing(&why),
    };
    let (signer, dev, img) = (&stick.signer, &stick.dev, &stick.img);
    let sum = || sh(&format!("sha256sum < {}", img.display())).stdout;
    let before = sum();
    let host = Host::new("web1");
    let run = stick_run(&host, &dev.0, signer);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("journal holds writes that were never finished")
            && run.stderr.contains("no report written")
            && run.stderr.contains("fsck.ext4"),
        "{}",
        run.stderr
    );
    assert_eq!(
        host.read("/etc/app.conf").as_deref(),
        Some("from the stick\n"),
        "{}",
        run.stderr
    );
    assert_eq!(sum(), before, "the stick was written to");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains(&dev.0), "still mounted: {mounts}");
    // The device was given its setting back.
    let ro = sh(&format!("blockdev --getro {}", dev.0));
    assert_eq!(String::from_utf8_lossy(&ro.stdout).trim(), "0");
    // A bundle refused on such a stick exits 4, as refused (the report's
    // failure, exit 1, does not hide it).
    let stranger = Signer::new("stranger@example.com");
    let refused = stick_run(&Host::new("web2"), &dev.0, &stranger);
    assert_eq!(refused.code, 4, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("no report written"),
        "{}",
        refused.stderr
    );
    assert_eq!(sum(), before, "the stick was written to");
}
