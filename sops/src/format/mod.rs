//! The five sops stores: parsers into the common tree ([`super::tree`]) and
//! emitters back out of it.
//!
//! Every parser returns the document trees with the `sops` metadata cut out,
//! and the metadata as a nested map (already unflattened for dotenv and
//! INI). Parsers never panic on any input, bound nesting depth and the size
//! of alias expansion, and their error messages never quote file content.

pub(crate) mod dotenv;
pub(crate) mod ini;
pub(crate) mod json;
pub(crate) mod yaml;

use zeroize::Zeroizing;

use super::error::ErrorKind;
use super::gocompat;
use super::tree::{Node, Scalar};
use super::Store;

/// Deepest nesting accepted (the walkers and emitters recurse).
pub(crate) const MAX_DEPTH: usize = 128;
/// Most nodes a YAML file may expand to through aliases.
pub(crate) const MAX_NODES: usize = 1_000_000;

/// A parsed file: one tree per document, and the `sops` map if present.
/// (`Debug` is the redacted tree shape.)
#[derive(Debug)]
pub(crate) struct Parsed {
    pub docs: Vec<Node>,
    pub sops: Option<Node>,
}

/// Parses `text` as `store`.
pub(crate) fn parse(store: Store, text: &str) -> Result<Parsed, ErrorKind> {
    match store {
        Store::Yaml => yaml::parse(text),
        Store::Json => json::parse(text),
        Store::Dotenv => dotenv::parse(text),
        Store::Ini => ini::parse(text),
        Store::Binary => json::parse_binary(text),
    }
}

/// The plain text of a scalar for formats that only hold strings (dotenv,
/// INI). `None` for bytes that are not UTF-8.
pub(crate) fn scalar_text(s: &Scalar) -> Option<Zeroizing<String>> {
    Some(Zeroizing::new(match s {
        Scalar::Str(v) => v.to_string(),
        Scalar::Int(i) => i.to_string(),
        Scalar::Float(f) => gocompat::format_float(*f),
        Scalar::Bool(b) => b.to_string(),
        Scalar::Time(t) => t.format_rfc3339_nano(),
        Scalar::Bytes(b) => std::str::from_utf8(b).ok()?.to_string(),
    }))
}
