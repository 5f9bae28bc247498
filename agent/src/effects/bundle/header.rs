//! The header of a git bundle file (`git help format-bundle`).
//!
//! ```text
//! # v2 git bundle            (or "# v3 git bundle")
//! @object-format=sha1        (v3 only: capabilities)
//! -<oid> <comment>           prerequisites: commits the receiver must have
//! <oid> <refname>            references carried by the bundle
//!                            (an empty line)
//! PACK...                    a pack, "thin" when there are prerequisites
//! ```
//!
//! Parsed by hand, because gix has no bundle support; the pack after the
//! header is handed to gix for indexing. The parser is strict: anything it
//! does not understand is an error naming the line, since a bundle is
//! untrusted input until its signature and contents are checked.

use anyhow::{bail, Context, Result};

/// Headers longer than this are refused: real ones are a few lines per ref.
pub const MAX_HEADER: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u8,
    /// Commits the receiver must already have (incremental bundles).
    pub prerequisites: Vec<gix::ObjectId>,
    /// References and the objects they point to.
    pub refs: Vec<(String, gix::ObjectId)>,
    /// Byte offset of the pack data.
    pub pack_offset: usize,
}

impl Header {
    /// The object `full_ref` points to in this bundle.
    pub fn tip_of(&self, full_ref: &str) -> Option<gix::ObjectId> {
        self.refs
            .iter()
            .find(|(name, _)| name == full_ref)
            .map(|(_, id)| *id)
    }

    pub fn ref_names(&self) -> Vec<&str> {
        self.refs.iter().map(|(n, _)| n.as_str()).collect()
    }
}

/// Parses the header at the start of `data` (which may hold more than the
/// header; only up to the empty line is read).
pub fn parse(data: &[u8]) -> Result<Header> {
    let mut pos = 0usize;
    let mut line_no = 0usize;
    let next_line = |pos: &mut usize| -> Result<Option<&[u8]>> {
        if *pos >= data.len() {
            return Ok(None);
        }
        let rest = &data[*pos..];
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            bail!("the bundle header ends without a newline: the file is truncated or not a git bundle");
        };
        if *pos + end > MAX_HEADER {
            bail!("the bundle header is longer than {MAX_HEADER} bytes: not a git bundle");
        }
        *pos += end + 1;
        Ok(Some(&rest[..end]))
    };

    line_no += 1;
    let first = next_line(&mut pos)?.context("the file is empty: not a git bundle")?;
    let version = match first {
        b"# v2 git bundle" => 2,
        b"# v3 git bundle" => 3,
        _ => bail!(
            "line 1: expected \"# v2 git bundle\" or \"# v3 git bundle\", found {:?}: not a git bundle",
            String::from_utf8_lossy(&first[..first.len().min(40)])
        ),
    };
    let mut prerequisites = Vec::new();
    let mut refs = Vec::new();
    loop {
        line_no += 1;
        let Some(line) = next_line(&mut pos)? else {
            bail!("the bundle header has no end (no empty line before the pack): the file is truncated");
        };
        if line.is_empty() {
            break;
        }
        let text = std::str::from_utf8(line)
            .with_context(|| format!("line {line_no} of the bundle header is not UTF-8"))?;
        if let Some(cap) = text.strip_prefix('@') {
            if version < 3 {
                bail!("line {line_no}: capability {cap:?} in a v2 bundle");
            }
            let (key, value) = cap.split_once('=').unwrap_or((cap, ""));
            match (key, value) {
                ("object-format", "sha1") => {}
                ("object-format", other) => bail!(
                    "line {line_no}: the bundle uses object format {other:?}; only sha1 repositories are supported"
                ),
                ("filter", f) => bail!(
                    "line {line_no}: the bundle is a partial bundle (filter {f:?}): it lacks objects a host needs; create it without --filter"
                ),
                _ => bail!("line {line_no}: unknown bundle capability {cap:?}"),
            }
            continue;
        }
        if let Some(pre) = text.strip_prefix('-') {
            let hex = pre.split(' ').next().unwrap_or(pre);
            prerequisites.push(oid(hex, line_no)?);
            continue;
        }
        let Some((hex, name)) = text.split_once(' ') else {
            bail!("line {line_no}: expected \"<object id> <ref name>\", found {text:?}");
        };
        let id = oid(hex, line_no)?;
        gix::refs::FullName::try_from(name)
            .with_context(|| format!("line {line_no}: {name:?} is not a valid ref name"))?;
        refs.push((name.to_string(), id));
    }
    if refs.is_empty() {
        bail!("the bundle carries no references: nothing to import");
    }
    if pos + 4 > data.len() || &data[pos..pos + 4] != b"PACK" {
        bail!("no pack data after the bundle header: the file is truncated");
    }
    Ok(Header {
        version,
        prerequisites,
        refs,
        pack_offset: pos,
    })
}

fn oid(hex: &str, line_no: usize) -> Result<gix::ObjectId> {
    if hex.len() != 40 {
        bail!("line {line_no}: {hex:?} is not a 40-digit sha1 object id");
    }
    gix::ObjectId::from_hex(hex.as_bytes())
        .with_context(|| format!("line {line_no}: {hex:?} is not a valid object id"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "1111111111111111111111111111111111111111";
    const B: &str = "2222222222222222222222222222222222222222";

    fn bundle(header: &str) -> Vec<u8> {
        let mut v = header.as_bytes().to_vec();
        v.extend_from_slice(b"PACK\0\0\0\x02");
        v
    }

    #[test]
    fn v2_with_prerequisite_and_ref() {
        let data = bundle(&format!(
            "# v2 git bundle\n-{A} old commit\n{B} refs/heads/main\n\n"
        ));
        let h = parse(&data).unwrap();
        assert_eq!(h.version, 2);
        assert_eq!(
            h.prerequisites,
            vec![gix::ObjectId::from_hex(A.as_bytes()).unwrap()]
        );
        assert_eq!(
            h.tip_of("refs/heads/main"),
            Some(gix::ObjectId::from_hex(B.as_bytes()).unwrap())
        );
        assert_eq!(&data[h.pack_offset..h.pack_offset + 4], b"PACK");
    }

    #[test]
    fn v3_sha1_capability_is_accepted_and_sha256_refused() {
        let ok = bundle(&format!(
            "# v3 git bundle\n@object-format=sha1\n{B} refs/heads/main\n\n"
        ));
        assert_eq!(parse(&ok).unwrap().version, 3);
        let sha256 = bundle(&format!(
            "# v3 git bundle\n@object-format=sha256\n{B} refs/heads/main\n\n"
        ));
        let err = format!("{:#}", parse(&sha256).unwrap_err());
        assert!(err.contains("line 2") && err.contains("sha256"), "{err}");
        let filter = bundle(&format!(
            "# v3 git bundle\n@filter=blob:none\n{B} refs/heads/main\n\n"
        ));
        assert!(format!("{:#}", parse(&filter).unwrap_err()).contains("partial bundle"));
    }

    #[test]
    fn truncated_bundles_are_named_truncated() {
        let full = bundle(&format!("# v2 git bundle\n{B} refs/heads/main\n\n"));
        for cut in [10, 20, 57, full.len() - 8] {
            let err = format!("{:#}", parse(&full[..cut]).unwrap_err());
            assert!(
                err.contains("truncated") || err.contains("not a git bundle"),
                "cut at {cut}: {err}"
            );
        }
        assert!(format!("{:#}", parse(b"").unwrap_err()).contains("empty"));
    }

    #[test]
    fn malformed_lines_name_their_line() {
        for (text, needle) in [
            ("# v2 git bundle\nnonsense\n\n", "line 2"),
            ("# v2 git bundle\n-xyz c\n\n", "line 2"),
            (
                "# v2 git bundle\n2222222222222222222222222222222222222222 refs/heads/..\n\n",
                "not a valid ref name",
            ),
            ("# v2 git bundle\n@object-format=sha1\n\n", "v2 bundle"),
            ("# v4 git bundle\n\n", "line 1"),
            ("# v2 git bundle\n\n", "no references"),
        ] {
            let err = format!("{:#}", parse(&bundle(text)).unwrap_err());
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }
}
