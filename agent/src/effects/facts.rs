//! Host facts templates can use as `host.facts.*`.
//!
//! Facts are read once per sync. Only stable facts are offered (total
//! memory, not free memory): a fact that changes between runs would make
//! every sync rewrite files. Files under `/etc` (os-release, machine-id)
//! are read from the managed root, so `--root` on an image reports the
//! image; kernel facts (cpus, memory, addresses) come from the running
//! machine.
//!
//! | fact | example |
//! |---|---|
//! | `hostname` | `web1` |
//! | `os_release` | `{ID = "debian", VERSION_ID = "12", ...}` |
//! | `machine_id` | `4f0b...` (empty if absent) |
//! | `cpus` | `2` |
//! | `memory_bytes` | `25217441792` |
//! | `kernel`, `arch` | `6.1.0-18-amd64`, `x86_64` |
//! | `addresses` | `[{iface="eth0", family="ipv4", address="192.0.2.10"}]` |

use std::collections::BTreeMap;

use serde_json::{json, Value as Json};

use crate::effects::rootfs::RootFs;

/// Gathers the facts of this machine, with `/etc` files read under `root`.
/// Never fails: a fact that cannot be read is empty, and logged.
pub fn gather(root: &RootFs) -> Json {
    let hostname = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    let os_release = read_under(root, "etc/os-release")
        .or_else(|| read_under(root, "usr/lib/os-release"))
        .map(|t| parse_os_release(&t))
        .unwrap_or_default();
    let machine_id = read_under(root, "etc/machine-id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let cpus = crate::cpus::cpus();
    let memory_bytes = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| parse_mem_total(&t))
        .unwrap_or(0);
    let uts = nix::sys::utsname::uname().ok();
    let kernel = uts
        .as_ref()
        .and_then(|u| u.release().to_str().map(str::to_string))
        .unwrap_or_default();
    let arch = uts
        .as_ref()
        .and_then(|u| u.machine().to_str().map(str::to_string))
        .unwrap_or_default();
    json!({
        "hostname": hostname,
        "os_release": os_release,
        "machine_id": machine_id,
        "cpus": cpus,
        "memory_bytes": memory_bytes,
        "kernel": kernel,
        "arch": arch,
        "addresses": addresses(),
    })
}

/// Largest os-release or machine-id read.
const MAX_FACT_FILE: u64 = 64 * 1024;

/// A file of the root, symlinks resolved inside it (an image's link to
/// `/etc/machine-id` reads the image's file, never the host's).
fn read_under(root: &RootFs, rel: &str) -> Option<String> {
    match root.read_contained(rel, MAX_FACT_FILE) {
        Ok(bytes) => bytes.map(|b| String::from_utf8_lossy(&b).into_owned()),
        Err(e) => {
            tracing::warn!("fact source not read: {e:#}");
            None
        }
    }
}

/// `KEY=value` and `KEY="quoted value"` lines; comments and blanks skipped.
pub fn parse_os_release(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            if l.starts_with('#') {
                return None;
            }
            let (k, v) = l.split_once('=')?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            Some((k.trim().to_string(), v.replace("\\\"", "\"")))
        })
        .collect()
}

fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn addresses() -> Vec<Json> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out: Vec<(String, &'static str, String)> = Vec::new();
    for a in addrs {
        let Some(addr) = a.address else { continue };
        if let Some(v4) = addr.as_sockaddr_in() {
            let ip = v4.ip();
            if !ip.is_loopback() {
                out.push((a.interface_name.clone(), "ipv4", ip.to_string()));
            }
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            let ip = v6.ip();
            if !ip.is_loopback() {
                out.push((a.interface_name.clone(), "ipv6", ip.to_string()));
            }
        }
    }
    out.sort();
    out.dedup();
    out.into_iter()
        .map(|(iface, family, address)| json!({"iface": iface, "family": family, "address": address}))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_quotes_and_comments() {
        let m = parse_os_release("# c\nID=debian\nPRETTY_NAME=\"Debian GNU/Linux 12\"\nX='y'\n");
        assert_eq!(m["ID"], "debian");
        assert_eq!(m["PRETTY_NAME"], "Debian GNU/Linux 12");
        assert_eq!(m["X"], "y");
    }

    #[test]
    fn mem_total_in_bytes() {
        assert_eq!(
            parse_mem_total("MemTotal:  1000 kB\nMemFree: 5 kB\n"),
            Some(1024000)
        );
    }

    #[test]
    fn facts_read_os_release_under_root() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        std::fs::write(root.path().join("etc/os-release"), "ID=testos\n").unwrap();
        let f = gather(&RootFs::open(root.path()).unwrap());
        assert_eq!(f["os_release"]["ID"], "testos");
        assert!(f["cpus"].as_u64().unwrap() >= 1);
    }
}
