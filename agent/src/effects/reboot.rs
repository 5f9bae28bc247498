//! "Reboot required" (issue #16 step 8): after a transaction that changed
//! a file with `reboot = true` commits, the Debian flag files
//! `/run/reboot-required` and `/run/reboot-required.pkgs` (under `--root`,
//! the prefix's `run/`). The agent reboots by itself only with `[fleet] reboot
//! = true`, under a fleet permit (`sync::reboot`).
//!
//! The request itself lives in the inventory (`Inventory::reboot`), written
//! by the commit: this module only derives the flag files from it, after
//! the commit, and again on every full sync of the same boot, so a crash
//! between the commit and the write loses nothing. A request made in an
//! earlier boot (its `boot_id` differs) is done: on the live system `/run`
//! is a tmpfs that the reboot emptied.
//!
//! Both files are replaced atomically (a temp file beside them, renamed)
//! through [`RootFs`]: `run/` is opened without following a link at or
//! above it (refused, named), and a link planted at either file is
//! replaced by the rename, never followed.

use std::os::fd::OwnedFd;

use anyhow::{Context, Result};
use nix::fcntl::AtFlags;
use nix::sys::stat::{fstatat, SFlag};

use crate::desired::spec::TargetPath;
use crate::effects::rootfs::{read_file_in, replace_in, RootFs};
use crate::plan::inventory::{Inventory, RebootRequest};

/// Where the running kernel says which boot this is.
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// The flag file, and its companion listing why (one package per line).
pub const FLAG: &str = "reboot-required";
pub const PKGS: &str = "reboot-required.pkgs";

/// What Debian's `update-notifier-common` writes in the flag file.
const FLAG_TEXT: &[u8] = b"*** System restart required ***\n";

/// The name `.pkgs` gets for a file no installed package owns.
pub const OWN_NAME: &str = "driftless";

/// The running kernel's boot id (the same under `--root`: it is the boot
/// of the machine the agent runs on). `DRIFTLESS_TEST_BOOT_ID` stands in
/// for it in tests. Empty if it cannot be read.
pub fn boot_id() -> String {
    // Debug builds only (what the tests run): in a release build it could
    // make every boot look like one, and with `[fleet] reboot = true`
    // reboot the host again and again.
    if let Some(id) = std::env::var_os("DRIFTLESS_TEST_BOOT_ID").filter(|_| cfg!(debug_assertions))
    {
        return id.to_string_lossy().trim().to_string();
    }
    std::fs::read_to_string(BOOT_ID)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The request of `inv` still pending in boot `boot`.
pub fn pending<'a>(inv: &'a Inventory, boot: &str) -> Option<&'a RebootRequest> {
    inv.reboot.as_ref().filter(|r| r.boot_id == boot)
}

/// For each of `paths`, the package that owns it according to the dpkg
/// database of the root (`var/lib/dpkg/info/*.list`), else [`OWN_NAME`].
/// Read once for all paths, without running `dpkg-query`, and without
/// following a link at or above `var/lib/dpkg/info` (a link gives no
/// owner). Only run when a transaction asks for a reboot.
pub fn owners(fs: &RootFs, paths: &[TargetPath]) -> Vec<(TargetPath, String)> {
    if paths.is_empty() {
        return Vec::new();
    }
    let found = match dpkg_owners(fs, paths) {
        Ok(f) => f,
        Err(e) => {
            tracing::debug!("no package owners for the reboot request: {e:#}");
            vec![None; paths.len()]
        }
    };
    paths
        .iter()
        .cloned()
        .zip(found)
        .map(|(p, o)| (p, o.unwrap_or_else(|| OWN_NAME.to_string())))
        .collect()
}

/// The package whose file list in the root's dpkg database
/// (`var/lib/dpkg/info/*.list`) names each of `paths`, if any.
pub fn dpkg_owners(fs: &RootFs, paths: &[TargetPath]) -> Result<Vec<Option<String>>> {
    let mut found: Vec<Option<String>> = vec![None; paths.len()];
    if !paths.is_empty() {
        scan_dpkg_lists(fs, paths, &mut found)?;
    }
    Ok(found)
}

fn scan_dpkg_lists(fs: &RootFs, paths: &[TargetPath], found: &mut [Option<String>]) -> Result<()> {
    let probe = TargetPath::parse("/var/lib/dpkg/info/x").map_err(anyhow::Error::msg)?;
    let Some(info) = fs.open_parent(&probe, None)? else {
        return Ok(());
    };
    // Listed through the descriptor opened without following links.
    use std::os::fd::AsRawFd;
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/self/fd/{}", info.as_raw_fd()))
        .context("cannot list the dpkg database")?
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.ends_with(".list"))
        .collect();
    names.sort();
    for name in names {
        let Ok(Some(bytes)) = read_file_in(&info, &name, 64 << 20) else {
            continue;
        };
        let text = String::from_utf8_lossy(&bytes);
        let package = name
            .trim_end_matches(".list")
            .split(':')
            .next()
            .unwrap_or_default()
            .to_string();
        for line in text.lines() {
            if let Some(i) = paths.iter().position(|p| p.as_str() == line) {
                if found[i].is_none() {
                    found[i] = Some(package.clone());
                }
            }
        }
        if found.iter().all(Option::is_some) {
            break;
        }
    }
    Ok(())
}

/// Makes `run/reboot-required` and `run/reboot-required.pkgs` say what
/// `request` asks: the flag file is written if it is not a regular file,
/// and the `.pkgs` file if a package of the request is missing from it
/// (what others listed there stays; each name once). Nothing is
/// rewritten when both already say it. `true` if something was written.
pub fn publish(fs: &RootFs, request: &RebootRequest) -> Result<bool> {
    let run = TargetPath::parse("/run").map_err(anyhow::Error::msg)?;
    let dir = fs.ensure_dir(&run, 0o755)?;
    let mut wrote = false;
    if !is_regular(&dir, FLAG) {
        replace_in(&dir, FLAG, FLAG_TEXT, 0o644, false)
            .with_context(|| format!("cannot write {}", fs.display(&join(&run, FLAG))))?;
        wrote = true;
    }
    let (mut lines, mut changed) = match read_file_in(&dir, PKGS, 1 << 20) {
        Ok(Some(bytes)) => (
            String::from_utf8_lossy(&bytes)
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect::<Vec<_>>(),
            false,
        ),
        Ok(None) => (Vec::new(), false),
        // A link or something else planted there: replaced, not followed.
        Err(e) => {
            tracing::warn!("{} is {e}: replaced", fs.display(&join(&run, PKGS)));
            (Vec::new(), true)
        }
    };
    let mut seen = std::collections::BTreeSet::new();
    lines.retain(|l| seen.insert(l.clone()));
    for p in request.packages() {
        if !lines.iter().any(|l| l == p) {
            lines.push(p.to_string());
            changed = true;
        }
    }
    if changed {
        let mut text = lines.join("\n");
        text.push('\n');
        replace_in(&dir, PKGS, text.as_bytes(), 0o644, false)
            .with_context(|| format!("cannot write {}", fs.display(&join(&run, PKGS))))?;
        wrote = true;
    }
    Ok(wrote)
}

fn is_regular(dir: &OwnedFd, name: &str) -> bool {
    fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).is_ok_and(|st| {
        SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFREG
    })
}

fn join(dir: &TargetPath, name: &str) -> TargetPath {
    TargetPath::parse(&format!("{dir}/{name}")).unwrap_or_else(|_| dir.clone())
}

/// One line for logs and `status`: `/etc/default/grub (commit 3f2a9c1e0b7d)`.
pub fn describe(request: &RebootRequest) -> String {
    request
        .reasons
        .iter()
        .map(|r| match &r.commit {
            Some(c) => format!(
                "{} (commit {})",
                r.path,
                crate::desired::spec::shown(c.get(..12).unwrap_or(c))
            ),
            None => r.path.to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(s: &str) -> TargetPath {
        TargetPath::parse(s).unwrap()
    }

    fn request(pkgs: &[&str]) -> RebootRequest {
        RebootRequest {
            boot_id: "b".into(),
            reasons: pkgs
                .iter()
                .enumerate()
                .map(|(i, p)| crate::plan::inventory::RebootReason {
                    path: tp(&format!("/etc/f{i}")),
                    commit: None,
                    txid: "t".into(),
                    package: p.to_string(),
                })
                .collect(),
        }
    }

    #[test]
    fn publish_adds_unique_lines_and_rewrites_nothing_when_done() {
        let d = tempfile::tempdir().unwrap();
        let fs = RootFs::open(d.path()).unwrap();
        std::fs::create_dir(d.path().join("run")).unwrap();
        std::fs::write(d.path().join("run/reboot-required.pkgs"), "linux-image\n").unwrap();
        assert!(publish(&fs, &request(&["driftless", "linux-image", "driftless"])).unwrap());
        assert_eq!(
            std::fs::read_to_string(d.path().join("run/reboot-required")).unwrap(),
            "*** System restart required ***\n"
        );
        assert_eq!(
            std::fs::read_to_string(d.path().join("run/reboot-required.pkgs")).unwrap(),
            "linux-image\ndriftless\n"
        );
        assert!(!publish(&fs, &request(&["driftless"])).unwrap());
    }

    #[test]
    fn owners_come_from_the_dpkg_lists_of_the_root() {
        let d = tempfile::tempdir().unwrap();
        let info = d.path().join("var/lib/dpkg/info");
        std::fs::create_dir_all(&info).unwrap();
        std::fs::write(
            info.join("grub-pc:amd64.list"),
            "/.\n/etc\n/etc/grub.d/00_header\n",
        )
        .unwrap();
        std::fs::write(info.join("base-files.list"), "/etc/issue\n").unwrap();
        std::fs::write(info.join("base-files.md5sums"), "/etc/motd\n").unwrap();
        let fs = RootFs::open(d.path()).unwrap();
        let got = owners(
            &fs,
            &[
                tp("/etc/grub.d/00_header"),
                tp("/etc/motd"),
                tp("/etc/issue"),
            ],
        );
        let pkgs: Vec<&str> = got.iter().map(|(_, p)| p.as_str()).collect();
        assert_eq!(pkgs, ["grub-pc", "driftless", "base-files"]);
    }

    #[test]
    fn merged_keeps_this_boot_only_and_the_latest_change_of_a_path() {
        let one =
            RebootRequest::merged(None, "b1", Some("c1"), "t1", &[(tp("/a"), "x".into())]).unwrap();
        let two = RebootRequest::merged(
            Some(&one),
            "b1",
            Some("c2"),
            "t2",
            &[(tp("/a"), "x".into()), (tp("/b"), "y".into())],
        )
        .unwrap();
        assert_eq!(two.reasons.len(), 2);
        assert_eq!(two.reasons[0].commit.as_deref(), Some("c2"));
        let later = RebootRequest::merged(Some(&two), "b2", Some("c3"), "t3", &[]);
        assert_eq!(later, None);
        assert_eq!(
            RebootRequest::merged(Some(&two), "b1", None, "t3", &[]),
            Some(two.clone())
        );
    }
}
