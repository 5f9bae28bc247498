//! Parsing the `source` setting into a local path or a remote URL.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use super::Location;

/// The `source` of an air-gapped host: commits arrive only through
/// `driftless bundle import` into the mirror.
pub(super) const BUNDLES: &str = "bundle:";

/// URL schemes fetched over the network into the mirror.
const REMOTE_SCHEMES: &[&str] = &["https", "http", "ssh", "git"];

pub(super) fn parse(s: &str) -> Result<Location> {
    let s = s.trim();
    if s.is_empty() {
        bail!("the repository source is empty: give a path, a file:// URL, or an https://, http://, ssh:// or git:// URL");
    }
    if s == BUNDLES {
        return Ok(Location::Bundles);
    }
    if let Some((scheme, rest)) = s.split_once("://") {
        let lower = scheme.to_ascii_lowercase();
        if lower == "file" {
            return file_url_to_path(s, rest).map(Location::Local);
        }
        if REMOTE_SCHEMES.contains(&lower.as_str()) {
            // gix's error quotes the input: its password too.
            gix::url::parse(s).map_err(|e| {
                anyhow::anyhow!(
                    "repository source {}: not a valid {lower} URL: {}",
                    super::redact(s),
                    super::redact_in(&e.to_string(), s)
                )
            })?;
            return Ok(Location::Remote(s.to_string()));
        }
        bail!(
            "repository source {}: unsupported URL scheme {scheme:?}; use a local path, file://, https://, http://, ssh://, git:// or user@host:path",
            super::redact(s)
        );
    }
    if is_scp_like(s) {
        gix::url::parse(s).with_context(|| {
            format!("repository source {s}: not a valid scp-like ssh address (user@host:path)")
        })?;
        return Ok(Location::Remote(s.to_string()));
    }
    Ok(Location::Local(PathBuf::from(s)))
}

/// `[user@]host:path` as understood by git: a colon before any slash, with
/// something on both sides. `./a:b` or `/srv/a:b` stay local paths.
fn is_scp_like(s: &str) -> bool {
    match s.split_once(':') {
        Some((host, path)) => {
            !host.is_empty()
                && !path.is_empty()
                && !host.contains('/')
                && !host.starts_with('.')
                && !host.starts_with('~')
        }
        None => false,
    }
}

/// `file:///srv/cfg` or `file://localhost/srv/cfg` -> `/srv/cfg`, with
/// `%XX` escapes decoded.
fn file_url_to_path(url: &str, rest: &str) -> Result<PathBuf> {
    let path = if rest.starts_with('/') {
        rest
    } else if rest.starts_with("localhost/") {
        &rest["localhost".len()..]
    } else {
        bail!("repository source {url}: a file:// URL must name an absolute path on this host (file:///path/to/repo)");
    };
    let decoded = percent_decode(path)
        .with_context(|| format!("repository source {url}: invalid %-escape in the path"))?;
    Ok(PathBuf::from(
        <std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(decoded),
    ))
}

fn percent_decode(s: &str) -> Result<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).context("truncated %-escape")?;
            let hex = std::str::from_utf8(hex).context("non-ASCII %-escape")?;
            out.push(u8::from_str_radix(hex, 16).context("non-hex %-escape")?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(s: &str) -> PathBuf {
        match parse(s).unwrap() {
            Location::Local(p) => p,
            other => panic!("{s} parsed as {other:?}"),
        }
    }

    fn remote(s: &str) -> String {
        match parse(s).unwrap() {
            Location::Remote(u) => u,
            other => panic!("{s} parsed as {other:?}"),
        }
    }

    #[test]
    fn bundle_colon_is_the_air_gapped_source_and_bundle_paths_stay_paths() {
        assert_eq!(parse("bundle:").unwrap(), Location::Bundles);
        assert_eq!(local("bundle"), PathBuf::from("bundle"));
        assert_eq!(local("./bundle:"), PathBuf::from("./bundle:"));
    }

    #[test]
    fn plain_paths_are_local() {
        assert_eq!(local("/srv/config"), PathBuf::from("/srv/config"));
        assert_eq!(local("relative/dir"), PathBuf::from("relative/dir"));
        assert_eq!(local("./odd:name"), PathBuf::from("./odd:name"));
        assert_eq!(local("/srv/odd:name"), PathBuf::from("/srv/odd:name"));
    }

    #[test]
    fn file_urls_become_paths() {
        assert_eq!(local("file:///srv/config"), PathBuf::from("/srv/config"));
        assert_eq!(
            local("file://localhost/srv/config"),
            PathBuf::from("/srv/config")
        );
        assert_eq!(local("file:///srv/a%20b"), PathBuf::from("/srv/a b"));
        let err = format!("{:#}", parse("file://otherhost/srv/x").unwrap_err());
        assert!(err.contains("absolute path on this host"), "{err}");
    }

    #[test]
    fn network_urls_are_remote() {
        for u in [
            "https://example.org/cfg.git",
            "http://example.org/cfg.git",
            "ssh://git@example.org:2222/srv/cfg.git",
            "git://example.org/cfg.git",
            "git@example.org:infra/cfg.git",
            "example.org:cfg.git",
        ] {
            assert_eq!(remote(u), u);
        }
    }

    #[test]
    fn unknown_schemes_and_empty_are_rejected() {
        let err = format!("{:#}", parse("ftp://example.org/x").unwrap_err());
        assert!(err.contains("unsupported URL scheme"), "{err}");
        assert!(err.contains("https://"), "{err}");
        let err = format!("{:#}", parse("s3://user:secret@bucket/x").unwrap_err());
        assert!(!err.contains("secret"), "password leaked: {err}");
        assert!(parse("  ").is_err());
    }
}
