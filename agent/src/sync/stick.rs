//! The USB stick flow (`driftless bundle stick`), run by
//! `driftless-usb@.service` when udev sees a stick labelled `DRIFTLESS`.
//!
//! ```text
//! <stick>/driftless/bundles/*.bundle (+ .manifest, .manifest.sig)   written on the connected side
//! <stick>/driftless/reports/<host>.json                              written by each host
//! ```
//!
//! A block device is mounted **read-only** (nosuid, nodev, noexec) under
//! `/run/driftless/stick/`; every bundle on it is verified and imported,
//! oldest first; one sync runs; then the filesystem is remounted
//! read-write just long enough to write this host's report atomically,
//! and unmounted. The stick thus carries the hosts' reports back to the
//! connected side, where `driftless bundle reports` summarises them. A
//! directory (an already mounted stick, or a bind mount in tests) is used
//! as it is; its reports go to `driftless/reports/` in it, or `--reports`.
//!
//! The report is written whatever happened (bad bundle, failed sync):
//! the point is that the operator learns why, without console access.

use crate::desired::spec::TargetPath;
use crate::effects::rootfs::{replace_in, RootFs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::bundle::{self as bundles, BundleOutcome};
use crate::config::Settings;
use crate::effects::state::history::Outcome;
use crate::effects::state::write_json_atomic;
use crate::exit::{Error, Failure};
use crate::plan::inventory::Inventory;

pub const STICK_DIR: &str = "driftless";
pub const MOUNT_BASE: &str = "/run/driftless/stick";

/// One host's report, as written onto the stick.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StickReport {
    pub host: String,
    /// Unix time of the run.
    pub time: i64,
    pub outcome: Outcome,
    /// The commit applied on the host after this run.
    #[serde(default)]
    pub commit: Option<String>,
    /// The commit applied before this run.
    #[serde(default)]
    pub previous: Option<String>,
    #[serde(default)]
    pub created: usize,
    #[serde(default)]
    pub changed: usize,
    #[serde(default)]
    pub removed: usize,
    /// Managed files that had been changed on the host since driftless
    /// last wrote them (repaired by this run).
    #[serde(default)]
    pub drifted: Vec<String>,
    #[serde(default)]
    pub bundles: Vec<BundleReport>,
    #[serde(default)]
    pub message: Option<String>,
    pub agent_version: String,
    /// Webhook events not delivered yet (an air-gapped host keeps them in
    /// its spool): the stick carries them to the connected side.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_events: Vec<crate::effects::notify::event::Event>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BundleReport {
    pub file: String,
    pub result: String,
    #[serde(default)]
    pub tip: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
}

impl From<&BundleOutcome> for BundleReport {
    fn from(b: &BundleOutcome) -> Self {
        BundleReport {
            file: Path::new(&b.file)
                .file_name()
                .map_or(b.file.clone(), |n| n.to_string_lossy().into_owned()),
            result: b.result.clone(),
            tip: b.tip.clone(),
            message: b.message.clone(),
        }
    }
}

pub struct StickOptions {
    /// A block device (mounted here) or a directory.
    pub path: PathBuf,
    /// Where to write the report instead of `<stick>/driftless/reports`.
    pub reports: Option<PathBuf>,
    pub wait: Duration,
}

/// Runs the whole stick flow and returns the report it wrote.
pub fn run(
    settings: &Settings,
    opts: &StickOptions,
    sync_opts: &super::SyncOptions,
    now: i64,
    rt: &tokio::runtime::Handle,
) -> Result<StickReport, Error> {
    let meta = std::fs::metadata(&opts.path)
        .with_context(|| format!("cannot access {}", opts.path.display()))
        .map_err(|e| Error::new(Failure::Failed, e))?;
    use std::os::unix::fs::FileTypeExt;
    let mount = if meta.file_type().is_block_device() {
        Some(Mount::read_only(&opts.path).map_err(|e| Error::new(Failure::Failed, e))?)
    } else if meta.is_dir() {
        None
    } else {
        return Err(Error::new(
            Failure::Failed,
            anyhow::anyhow!(
                "{} is neither a block device nor a directory",
                opts.path.display()
            ),
        ));
    };
    let dir = mount
        .as_ref()
        .map_or(opts.path.clone(), |m| m.target.clone());
    let (mut report, failure) = process(settings, &dir, sync_opts, opts.wait, now, rt);
    report.pending_events = crate::effects::notify::pending(settings);
    // The operator's --reports directory is trusted; the stick's own is
    // written through a handle on the stick, never through a link on it.
    let write = || match &opts.reports {
        Some(d) => write_report(d, &report),
        None => write_report_on_stick(&dir, &report),
    };
    // Remounted read-write only to write on the stick.
    let written = match (&mount, &opts.reports) {
        (Some(m), None) => m.writable(write),
        _ => write(),
    };
    if let Some(m) = mount {
        m.unmount();
    }
    match written {
        Ok(()) => {
            info!(outcome = ?report.outcome, commit = ?report.commit, "report written to the stick");
            result_of(report, failure)
        }
        // The import's or sync's own failure keeps its exit code; the
        // report's is logged beside it.
        Err(e) => match result_of(report, failure) {
            Ok(_) => Err(Error::new(Failure::Failed, e)),
            failed => {
                warn!("{e:#}");
                failed
            }
        },
    }
}

/// The run's result from its report, and the kind of the failure
/// `process` met, if any.
fn result_of(report: StickReport, failure: Option<Failure>) -> Result<StickReport, Error> {
    // The same refusal exits with the same code as `sync` and `bundle
    // import` (an invalid repository arriving on a stick exited 4, not 3).
    if let Some(kind) = failure {
        return Err(Error::new(
            kind,
            anyhow::anyhow!("{}", report.message.clone().unwrap_or_default()),
        ));
    }
    match report.outcome {
        Outcome::Applied | Outcome::Unchanged | Outcome::Skipped => Ok(report),
        Outcome::Refused => Err(Error::new(
            Failure::Refused,
            anyhow::anyhow!("{}", report.message.clone().unwrap_or_default()),
        )),
        Outcome::Degraded => Err(Error::new(
            Failure::Degraded,
            anyhow::anyhow!("{}", report.message.clone().unwrap_or_default()),
        )),
        _ => Err(Error::new(
            Failure::Failed,
            anyhow::anyhow!("{}", report.message.clone().unwrap_or_default()),
        )),
    }
}

/// Imports and syncs; every failure ends up in the report, and the kind of
/// an error (for the exit code) beside it.
fn process(
    settings: &Settings,
    dir: &Path,
    sync_opts: &super::SyncOptions,
    wait: Duration,
    now: i64,
    rt: &tokio::runtime::Handle,
) -> (StickReport, Option<Failure>) {
    let before = crate::effects::state::StateDir::existing(&settings.state_dir)
        .and_then(|s| s.inventory().ok())
        .unwrap_or_default();
    let mut report = StickReport {
        host: settings.host.clone(),
        time: now,
        outcome: Outcome::Failed,
        commit: before.commit.clone(),
        previous: before.commit.clone(),
        created: 0,
        changed: 0,
        removed: 0,
        drifted: Vec::new(),
        bundles: Vec::new(),
        message: None,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        pending_events: Vec::new(),
    };
    let files = match stick_bundles(dir) {
        Ok(f) => f,
        Err(e) => {
            report.message = Some(format!("{e:#}"));
            return (report, Some(Failure::Refused));
        }
    };
    let outcomes = match bundles::import_files(settings, &files, wait, now) {
        Ok(o) => o,
        Err(e) => {
            report.outcome = outcome_of(&e);
            report.message = Some(format!("{:#}", e.error));
            return (report, Some(e.kind));
        }
    };
    report.bundles = outcomes.iter().map(BundleReport::from).collect();
    let refused: Vec<String> = outcomes
        .iter()
        .filter(|b| b.refused())
        .map(|b| {
            format!(
                "{}: {}",
                report_name(&b.file),
                b.message.clone().unwrap_or_default()
            )
        })
        .collect();
    for r in &refused {
        warn!("bundle refused: {r}");
    }
    let mut failure = None;
    // (SIGTERM here, the stick pulled out, ends the run at once: see
    // `stop`. The next run applies what was imported.)
    if let Err(e) = crate::effects::failpoint::hit("stick.imported") {
        report.message = Some(format!("{e:#}"));
        return (report, Some(Failure::Failed));
    }
    match super::sync_once(settings, sync_opts, now, rt) {
        Ok(r) => {
            report.outcome = match (&r.applied, r.skipped_bad) {
                (Some(_), _) => Outcome::Applied,
                (None, true) => Outcome::Skipped,
                (None, false) => Outcome::Unchanged,
            };
            let mut notes = Vec::new();
            if r.skipped_bad {
                // The head the stick brought is marked bad here: the host
                // stays on the commit it ran (the report's `commit`, set
                // from the inventory), and the plan is the bad head's, not
                // a repair's.
                notes.push(format!(
                    "commit {} is marked bad on this host: not applied (`driftless status` says why)",
                    crate::plan::diff::short(&r.commit)
                ));
            } else if r.waiting.is_none() {
                report.commit = Some(r.commit.clone());
                report.drifted = drifted(&r.plan, &before);
            }
            if let Some(a) = &r.applied {
                report.created = a.created;
                report.changed = a.changed;
                report.removed = a.removed;
            }
            if !refused.is_empty() {
                notes.push(format!("bundles refused: {}", refused.join("; ")));
            }
            if !notes.is_empty() {
                report.message = Some(notes.join("; "));
            }
        }
        Err(e) => {
            report.outcome = outcome_of(&e);
            failure = Some(e.kind);
            let mut msg = format!("{:#}", e.error);
            if !refused.is_empty() {
                msg = format!("{msg}; bundles refused: {}", refused.join("; "));
            }
            report.message = Some(msg);
        }
    }
    if report.outcome != Outcome::Refused
        && !refused.is_empty()
        && report.bundles.iter().all(|b| b.result == "refused")
    {
        // Nothing usable on the stick: say so in the outcome (and the
        // exit code) too; the sync's own error is only a consequence.
        report.outcome = Outcome::Refused;
        failure = Some(Failure::Refused);
    }
    (report, failure)
}

fn report_name(file: &str) -> String {
    Path::new(file)
        .file_name()
        .map_or(file.to_string(), |n| n.to_string_lossy().into_owned())
}

fn outcome_of(e: &Error) -> Outcome {
    match e.kind {
        Failure::Refused | Failure::InvalidRepo => Outcome::Refused,
        Failure::Degraded => Outcome::Degraded,
        _ if e.error.downcast_ref::<super::Reverted>().is_some() => Outcome::Reverted,
        _ => Outcome::Failed,
    }
}

/// Files that were changed on the host behind driftless's back: their
/// content, mode or owner before this run differed from what the
/// inventory says driftless last wrote.
pub fn drifted(plan: &crate::plan::Plan, before: &Inventory) -> Vec<String> {
    plan.changes
        .iter()
        .filter_map(|c| {
            let entry = before.files.get(&c.path)?;
            let old = c.before.as_ref()?;
            let differs = old.sha256 != entry.sha256
                || old.mode != entry.mode
                || (plan.ownership_applied && (old.uid != entry.uid || old.gid != entry.gid));
            differs.then(|| c.path.as_str().to_string())
        })
        .collect()
}

/// The bundles of a stick: `driftless/bundles` is reached without
/// following a link on the stick (each file is then opened `O_NOFOLLOW`,
/// regular files only, by the import).
fn stick_bundles(stick: &Path) -> Result<Vec<PathBuf>> {
    let fs = RootFs::open(stick)?;
    let probe = TargetPath::parse(&format!("/{STICK_DIR}/bundles/probe"))
        .map_err(|e| anyhow::anyhow!(e))?;
    fs.open_parent(&probe, None)
        .with_context(|| format!("refusing the stick {}", stick.display()))?;
    list_bundles(&stick.join(STICK_DIR).join("bundles"))
}

/// Writes the report into `<stick>/driftless/reports/` through a handle on
/// the stick: a link there (or at `driftless`) is refused, never followed
/// to a host path of the stick's choosing.
fn write_report_on_stick(stick: &Path, report: &StickReport) -> Result<()> {
    let fs = RootFs::open(stick)?;
    let dir_target =
        TargetPath::parse(&format!("/{STICK_DIR}/reports")).map_err(|e| anyhow::anyhow!(e))?;
    let dir = fs
        .ensure_dir(&dir_target, 0o755)
        .with_context(|| format!("cannot write the report onto the stick {}", stick.display()))?;
    let bytes = serde_json::to_vec_pretty(report).context("cannot serialise the report")?;
    let name = format!("{}.json", sanitize(&report.host));
    replace_in(&dir, &name, &bytes, 0o644, true).with_context(|| {
        format!(
            "cannot write {}",
            stick.join(STICK_DIR).join("reports").join(&name).display()
        )
    })
}

/// `*.bundle` files in `dir`, by name (import orders them by signed time).
pub fn list_bundles(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).with_context(|| {
        format!(
            "cannot read {}: a driftless stick carries its bundles in {STICK_DIR}/bundles/",
            dir.display()
        )
    })?;
    let mut out = Vec::new();
    for e in rd {
        let e = e.with_context(|| format!("cannot read {}", dir.display()))?;
        let p = e.path();
        if p.extension().is_some_and(|x| x == "bundle")
            && !e.file_name().to_string_lossy().starts_with('.')
        {
            out.push(p);
        }
    }
    out.sort();
    if out.is_empty() {
        bail!("no *.bundle files in {}", dir.display());
    }
    Ok(out)
}

fn write_report(dir: &Path, report: &StickReport) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = sanitize(&report.host);
    write_json_atomic(&dir.join(format!("{name}.json")), report)
        .with_context(|| format!("cannot write the report into {}", dir.display()))
}

fn sanitize(host: &str) -> String {
    host.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The largest report read from a stick.
const REPORT_MAX_BYTES: u64 = 16 << 20;

/// The most reports read from a stick (one per host).
const REPORTS_MAX: usize = 100_000;

/// Reads every `*.json` report in `dir` (or `dir/driftless/reports`).
pub fn read_reports(dir: &Path) -> Result<Vec<(PathBuf, Result<StickReport>)>> {
    let nested = dir.join(STICK_DIR).join("reports");
    // Not through a link on the stick (it could point into the host).
    let real_dir = |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir());
    let dir = if real_dir(&dir.join(STICK_DIR)) && real_dir(&nested) {
        nested
    } else {
        dir.to_path_buf()
    };
    let rd = std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?;
    let mut out = Vec::new();
    for e in rd {
        if out.len() >= REPORTS_MAX {
            bail!(
                "{} holds more than {REPORTS_MAX} reports: not a driftless stick, or clean it up",
                dir.display()
            );
        }
        let p = e
            .with_context(|| format!("cannot read {}", dir.display()))?
            .path();
        if p.extension().is_none_or(|x| x != "json") {
            continue;
        }
        // The stick is untrusted: no link followed, no FIFO waited on, no
        // giant read (a report is a few kilobytes).
        let parsed = crate::effects::state::read_nofollow_up_to(&p, REPORT_MAX_BYTES)
            .with_context(|| format!("cannot read {}", p.display()))
            .and_then(|b| {
                serde_json::from_slice::<StickReport>(&b)
                    .with_context(|| format!("{} is not a driftless report", p.display()))
            });
        out.push((p, parsed));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// A stick mounted by us; unmounted on [`Mount::unmount`] (or drop).
struct Mount {
    target: PathBuf,
    mounted: bool,
    /// The stick, as shown in messages.
    device: PathBuf,
    /// The stick, opened once: every later step (the superblock read, the
    /// read-write mount for the report, through `/proc/self/fd`) is on this
    /// very device, not on whatever its path names by then.
    dev: std::fs::File,
    /// Whether the block device was read-only before (it is made so while
    /// mounted read-only, and given back this setting at the end).
    was_ro: bool,
    fstype: &'static str,
}

/// The block layer's read-only flag of a device (`blockdev --setro`):
/// `_IO(0x12, 93)` sets it from an int, `_IO(0x12, 94)` reads it.
const BLKROSET: u32 = 0x125d;
const BLKROGET: u32 = 0x125e;

/// Sets the block layer's read-only flag of `dev`.
fn set_read_only(dev: &std::fs::File, ro: bool) -> nix::Result<()> {
    use std::os::fd::AsRawFd;
    let flag: nix::libc::c_int = ro.into();
    // SAFETY: BLKROSET reads one int through the pointer, which points at
    // `flag` for the call's duration; the fd is open.
    let r = unsafe { nix::libc::ioctl(dev.as_raw_fd(), BLKROSET as _, &flag) };
    nix::errno::Errno::result(r).map(drop)
}

/// The block layer's read-only flag of `dev`.
fn is_read_only(dev: &std::fs::File) -> nix::Result<bool> {
    use std::os::fd::AsRawFd;
    let mut flag: nix::libc::c_int = 0;
    // SAFETY: BLKROGET writes one int through the pointer, to `flag`.
    let r = unsafe { nix::libc::ioctl(dev.as_raw_fd(), BLKROGET as _, &mut flag) };
    nix::errno::Errno::result(r)?;
    Ok(flag != 0)
}

/// The path that names the open `dev` (for `mount(2)`'s source).
fn fd_path(dev: &std::fs::File) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", dev.as_raw_fd()))
}

/// The filesystems a stick may have. Anyone can plug in a stick, and the
/// kernel parses its filesystem as it mounts it: its drivers for the
/// common stick formats are the ones hardened by use and fuzzing, while a
/// crafted image of a rarer one (hfsplus, jfs, udf, minix...) is a known
/// way into the kernel. So only these are ever named to `mount(2)`, which
/// also keeps the kernel from loading another driver's module for a
/// stick. ext2 and ext3 are mounted by the ext4 driver.
const STICK_FILESYSTEMS: [&str; 3] = ["vfat", "exfat", "ext4"];

/// The types to try for `device`, in order: the one udev's blkid probe
/// recorded (`/run/udev/data/b<major>:<minor>`, `ID_FS_TYPE`) first, then
/// the other allowed ones (see [`stick_fs_order`]).
fn fs_candidates(device: &Path) -> Result<Vec<&'static str>> {
    let mut probed = None;
    if let Ok(meta) = std::fs::metadata(device) {
        use std::os::unix::fs::MetadataExt;
        let rdev = meta.rdev();
        let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
        if let Ok(db) = std::fs::read_to_string(format!("/run/udev/data/b{major}:{minor}")) {
            probed = db
                .lines()
                .find_map(|l| l.strip_prefix("E:ID_FS_TYPE="))
                .map(|t| t.trim().to_string());
        }
    }
    stick_fs_order(probed.as_deref())
        .with_context(|| format!("{} is not mounted", device.display()))
}

/// [`STICK_FILESYSTEMS`], the probed type's driver first; an error for a
/// probed type outside them.
fn stick_fs_order(probed: Option<&str>) -> Result<Vec<&'static str>> {
    let first = match probed.filter(|t| !t.is_empty()) {
        None => None,
        Some("ext2" | "ext3" | "ext4") => Some("ext4"),
        Some(t) => match STICK_FILESYSTEMS.iter().find(|&&s| s == t) {
            Some(&s) => Some(s),
            None => bail!(
                "its filesystem is {t:?} (udev's probe), and driftless mounts only {} sticks (a crafted image \
                 of another filesystem can attack the kernel as it is mounted): format the stick as one of them, \
                 e.g. `mkfs.vfat -n DRIFTLESS /dev/sdX1`",
                STICK_FILESYSTEMS.join(", ")
            ),
        },
    };
    let mut out: Vec<&'static str> = first.into_iter().collect();
    out.extend(STICK_FILESYSTEMS.iter().filter(|&&s| Some(s) != first));
    Ok(out)
}

/// Nothing on a stick is executed, treated as a device, or followed as a
/// symlink (`MS_NOSYMFOLLOW`, Linux 5.10: a link on the stick cannot point
/// the report, or a read, at a host path; issue 12 §7).
fn mount_flags() -> nix::mount::MsFlags {
    use nix::mount::MsFlags;
    MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV
        | MsFlags::MS_NOEXEC
        | MsFlags::from_bits_retain(nix::libc::MS_NOSYMFOLLOW)
}

/// The mount data for a read-only mount of `fstype`: ext4 without its
/// journal (`noload`). Mounting ext4 read-only still replays a journal
/// that holds unfinished writes, which writes to the stick, and has the
/// kernel walk a journal the stick's maker wrote, before anything on it
/// was verified.
fn read_only_data(fstype: &str) -> Option<&'static str> {
    (fstype == "ext4").then_some("noload")
}

/// Whether the ext4 filesystem on `device` has writes in its journal
/// that were never finished (`needs_recovery`: the superblock at byte
/// 1024 says so, little-endian, `s_feature_incompat` bit 0x4; its magic
/// 0xEF53 is checked first).
fn ext4_needs_recovery(f: &std::fs::File, device: &Path) -> Result<bool> {
    use std::os::unix::fs::FileExt;
    let mut sb = [0u8; 0x64];
    f.read_exact_at(&mut sb, 1024)
        .with_context(|| format!("cannot read {}'s superblock", device.display()))?;
    if u16::from_le_bytes([sb[0x38], sb[0x39]]) != 0xEF53 {
        bail!("{} no longer holds an ext4 superblock", device.display());
    }
    let incompat = u32::from_le_bytes([sb[0x60], sb[0x61], sb[0x62], sb[0x63]]);
    Ok(incompat & 0x4 != 0)
}

impl Mount {
    /// Mounts `device` read-only, trying the kernel's block filesystems
    /// in turn (what mount(8) does without blkid).
    fn read_only(device: &Path) -> Result<Mount> {
        use nix::mount::{mount, MsFlags};
        let name = device
            .file_name()
            .map_or("stick".into(), |n| n.to_string_lossy().into_owned());
        let target = Path::new(MOUNT_BASE).join(sanitize(&name));
        std::fs::create_dir_all(&target)
            .with_context(|| format!("cannot create mount point {}", target.display()))?;
        // A run stopped while its stick was mounted (SIGTERM outside a
        // transaction, a kill) left the mount behind: detached first, so
        // that this stick is not mounted over it, and what is read is this
        // stick's. (EINVAL: nothing is mounted there, the usual case.)
        match nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) => {
                warn!(target = %target.display(), "detached a stick mount an interrupted run left")
            }
            Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
            Err(e) => warn!("cannot detach {}: {e}", target.display()),
        }
        let flags = mount_flags() | MsFlags::MS_RDONLY;
        let mut tried = Vec::new();
        // The device itself read-only while it is mounted so: a read-only
        // mount still writes (ext4 cleans up its orphan inodes, replays
        // its journal without `noload`), from metadata nothing verified.
        let opened = fs_candidates(device).and_then(|candidates| {
            let dev = std::fs::File::open(device)
                .with_context(|| format!("cannot open {}", device.display()))?;
            let was_ro = is_read_only(&dev)
                .and_then(|was| set_read_only(&dev, true).map(|()| was))
                .with_context(|| {
                    format!(
                        "cannot make {} read-only before mounting it",
                        device.display()
                    )
                })?;
            Ok((candidates, dev, was_ro))
        });
        let (candidates, dev, was_ro) = match opened {
            Ok(o) => o,
            Err(e) => {
                let _ = std::fs::remove_dir(&target);
                return Err(e);
            }
        };
        for fstype in candidates {
            match mount(
                Some(&fd_path(&dev)),
                &target,
                Some(fstype),
                flags,
                read_only_data(fstype),
            ) {
                Ok(()) => {
                    info!(device = %device.display(), fstype = %fstype, target = %target.display(), "stick mounted read-only");
                    return Ok(Mount {
                        target,
                        mounted: true,
                        device: device.to_path_buf(),
                        dev,
                        was_ro,
                        fstype,
                    });
                }
                Err(e) => tried.push(format!("{fstype}: {}", e.desc())),
            }
        }
        if let Err(e) = set_read_only(&dev, was_ro) {
            warn!(
                "cannot give {} its read-only setting back: {e}",
                device.display()
            );
        }
        // Do not leave the mount point behind (only removed if empty).
        let _ = std::fs::remove_dir(&target);
        bail!(
            "cannot mount {} read-only (tried {}): driftless mounts only {} sticks (a crafted image of another \
             filesystem can attack the kernel as it is mounted); format the stick as one of them, e.g. \
             `mkfs.vfat -n DRIFTLESS /dev/sdX1`",
            device.display(),
            tried.join(", "),
            STICK_FILESYSTEMS.join(", ")
        )
    }

    /// Runs `f` with the filesystem remounted read-write, then read-only again.
    ///
    /// An ext4 stick, mounted without its journal (see [`read_only_data`]),
    /// is mounted again whole, with it, if it was unmounted cleanly: then
    /// there is nothing to replay. One whose journal holds unfinished
    /// writes gets no report: replaying it is what the read-only mount
    /// avoided.
    fn writable(&self, f: impl FnOnce() -> Result<()>) -> Result<()> {
        use nix::mount::{mount, MsFlags};
        let base = mount_flags() | MsFlags::MS_REMOUNT;
        if self.fstype == "ext4" {
            if ext4_needs_recovery(&self.dev, &self.device)? {
                bail!(
                    "{}'s ext4 journal holds writes that were never finished (the stick was not unmounted cleanly), \
                     and driftless does not replay a stick's journal: no report written. Check the stick with \
                     `fsck.ext4` on the connected side, and eject it properly after writing to it",
                    self.device.display()
                );
            }
            nix::mount::umount(&self.target).with_context(|| {
                format!(
                    "cannot unmount {} to write the report",
                    self.target.display()
                )
            })?;
            self.writable_device()?;
            mount(
                Some(&fd_path(&self.dev)),
                &self.target,
                Some(self.fstype),
                mount_flags(),
                None::<&str>,
            )
            .with_context(|| {
                format!(
                    "cannot mount {} read-write to write the report (write-protected stick?)",
                    self.device.display()
                )
            })?;
        } else {
            self.writable_device()?;
            mount(None::<&str>, &self.target, None::<&str>, base, None::<&str>).with_context(
                || {
                    format!(
                        "cannot remount {} read-write to write the report (write-protected stick?)",
                        self.target.display()
                    )
                },
            )?;
        }
        let result = f();
        if let Err(e) = mount(
            None::<&str>,
            &self.target,
            None::<&str>,
            base | MsFlags::MS_RDONLY,
            None::<&str>,
        ) {
            warn!("cannot remount {} read-only: {e}", self.target.display());
        }
        result
    }

    /// Lets the device be written (for the report), unless it was
    /// read-only before driftless made it so.
    fn writable_device(&self) -> Result<()> {
        if self.was_ro {
            bail!(
                "{} is read-only (a write-protected stick?): no report written",
                self.device.display()
            );
        }
        set_read_only(&self.dev, false).with_context(|| {
            format!(
                "cannot make {} writable for the report",
                self.device.display()
            )
        })
    }

    fn unmount(mut self) {
        self.do_unmount();
    }

    fn do_unmount(&mut self) {
        if self.mounted {
            match nix::mount::umount(&self.target) {
                // EINVAL: not mounted (an ext4 stick whose read-write
                // mount for the report failed after it was unmounted).
                Ok(()) | Err(nix::errno::Errno::EINVAL) => {
                    let _ = std::fs::remove_dir(&self.target);
                }
                Err(e) => warn!("cannot unmount {}: {e}", self.target.display()),
            }
            if let Err(e) = set_read_only(&self.dev, self.was_ro) {
                warn!(
                    "cannot give {} its read-only setting back: {e}",
                    self.device.display()
                );
            }
            self.mounted = false;
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.do_unmount();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bug this pins: every filesystem udev probed, then btrfs, xfs
    /// and everything in /proc/filesystems, was tried on a stick anyone
    /// can plug in (and naming one to mount(2) loads its module).
    #[test]
    fn only_the_stick_filesystems_are_ever_tried_the_probed_one_first() {
        assert_eq!(stick_fs_order(None).unwrap(), ["vfat", "exfat", "ext4"]);
        assert_eq!(stick_fs_order(Some("")).unwrap(), ["vfat", "exfat", "ext4"]);
        assert_eq!(
            stick_fs_order(Some("exfat")).unwrap(),
            ["exfat", "vfat", "ext4"]
        );
        for ext in ["ext2", "ext3", "ext4"] {
            assert_eq!(
                stick_fs_order(Some(ext)).unwrap(),
                ["ext4", "vfat", "exfat"]
            );
        }
        for other in ["btrfs", "hfsplus", "udf", "squashfs", "ntfs3", "minix"] {
            let e = stick_fs_order(Some(other)).unwrap_err().to_string();
            assert!(
                e.contains(&format!("{other:?}"))
                    && e.contains("vfat, exfat, ext4")
                    && e.contains("mkfs.vfat"),
                "{e}"
            );
        }
    }
}
