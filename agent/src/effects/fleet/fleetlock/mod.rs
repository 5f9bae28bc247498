//! FleetLock (zincati's reboot-coordination protocol over HTTP), both
//! ways (issue 17's "where etcd is not wanted").
//!
//! Why both: FleetLock is a counting semaphore with two calls,
//! `POST /v1/pre-reboot` (take a slot, recursively: a holder asking again
//! is granted) and `POST /v1/steady-state` (give it back if held), each
//! with `{"client_params": {"id": ..., "group": ...}}` and the header
//! `fleet-lock-protocol: true`. Any status but 200 is a refusal, with
//! `{"kind", "value"}` in the body.
//!
//! - [`client`]: a driftless host with `[fleet] fleetlock = URL` takes a
//!   slot before applying a new commit or rebooting, and gives it back
//!   after. It gets the concurrency limit and nothing else: waves, bake
//!   times, halting and the fleet view need the shared state only etcd
//!   keeps.
//! - [`server`] (etcd builds): `driftless fleet serve-fleetlock` answers
//!   the protocol from the *same* etcd semaphore the driftless hosts use,
//!   so zincati hosts (Fedora CoreOS) and driftless hosts of a group share
//!   one limit, and `driftless fleet status` shows both.
//!
//! This module is the protocol itself, pure: the request body, the rules
//! for its fields (they become etcd key parts on the server, so they are
//! checked here, once, for both sides), and the error body.

use serde::{Deserialize, Serialize};

pub mod client;
#[cfg(feature = "etcd")]
pub mod server;

/// The header every request carries (the protocol's guard against a
/// request that reached the server through an unintended redirect).
pub const HEADER: &str = "fleet-lock-protocol";

/// Take (or keep) a slot.
pub const PRE_REBOOT: &str = "/v1/pre-reboot";
/// Give a slot back if held.
pub const STEADY_STATE: &str = "/v1/steady-state";

/// A request body's size limit on the server (the real ones are ~80
/// bytes).
pub const MAX_BODY: usize = 16 * 1024;

/// The longest id or group accepted (both become part of an etcd key).
pub const MAX_NAME: usize = 253;

/// The request body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub client_params: ClientParams,
}

/// Who asks, for which group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientParams {
    /// The lock holder's identity (zincati: a hash of the machine id;
    /// driftless: the host name).
    pub id: String,
    /// The reboot group.
    pub group: String,
}

/// An error body, as the protocol defines it: a `kind` of small
/// cardinality (zincati counts them in its metrics) and a `value` for
/// people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub kind: String,
    pub value: String,
}

/// The protocol's rule for a group: `^[a-zA-Z0-9.-]+$` (and not longer
/// than [`MAX_NAME`]). `Err` says why, for the error body.
pub fn check_group(group: &str) -> Result<(), String> {
    if group.is_empty() {
        return Err("group is empty".into());
    }
    if group.len() > MAX_NAME {
        return Err(format!("group is longer than {MAX_NAME} bytes"));
    }
    if let Some(c) = group
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '.' || *c == '-'))
    {
        return Err(format!(
            "group {group:?} has {c:?}; FleetLock groups match ^[a-zA-Z0-9.-]+$"
        ));
    }
    Ok(())
}

/// A client id: any printable ASCII but `/` (it becomes one part of an
/// etcd key), not `.` or `..`, at most [`MAX_NAME`] bytes.
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("id is empty".into());
    }
    if id.len() > MAX_NAME {
        return Err(format!("id is longer than {MAX_NAME} bytes"));
    }
    if id == "." || id == ".." {
        return Err(format!("id {id:?} is not a name"));
    }
    if let Some(c) = id.chars().find(|c| !c.is_ascii_graphic() || *c == '/') {
        return Err(format!(
            "id has {c:?}; ids are printable ASCII without '/' or spaces"
        ));
    }
    Ok(())
}

/// The etcd value of a FleetLock slot (`P/permits/<group>/<id>`, no
/// lease): what makes the key a slot, which only the FleetLock server
/// takes and gives back (never a driftless host's permit of the same
/// name).
pub fn slot_value(id: &str, since: i64) -> String {
    serde_json::json!({ "host": id, "fleetlock": true, "since": since }).to_string()
}

/// Whether an etcd value is a FleetLock slot's ([`slot_value`]).
pub fn is_slot(value: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(value)
        .is_ok_and(|v| v.get("fleetlock") == Some(&serde_json::Value::Bool(true)))
}

/// Parses and checks a request body: the client's parameters, or why
/// not (for a 400). Unknown fields are allowed, as the protocol may grow.
pub fn parse_request(body: &[u8]) -> Result<ClientParams, String> {
    let req: Request = serde_json::from_slice(body)
        .map_err(|e| format!("the body is not a FleetLock request: {e}"))?;
    let p = req.client_params;
    check_id(&p.id)?;
    check_group(&p.group)?;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The protocol document's own example body parses.
    #[test]
    fn the_protocol_example_parses() {
        let p = parse_request(
            br#"{"client_params": {"group": "default", "id": "c988d2509fdf5cdcbed39037c56406fb"}}"#,
        )
        .unwrap();
        assert_eq!(p.group, "default");
        assert_eq!(p.id, "c988d2509fdf5cdcbed39037c56406fb");
    }

    #[test]
    fn groups_follow_the_protocols_pattern() {
        for ok in ["default", "workers", "tier-1.eu", "A9"] {
            assert!(check_group(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/b", "a b", "*", "a_b", "grüppe", &"g".repeat(254)] {
            assert!(check_group(bad).is_err(), "{bad:?}");
        }
    }

    /// Ids become an etcd key part: no '/', nothing unprintable, no
    /// path-like dots.
    #[test]
    fn ids_cannot_reach_other_keys() {
        for ok in ["web1", "web1.example.com", "c988d2509fdf", "host:1@x"] {
            assert!(check_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "../x",
            "a b",
            "a\nb",
            "\u{7f}",
            "é",
            &"i".repeat(254),
        ] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn slots_are_told_from_permits() {
        assert!(is_slot(slot_value("z", 5).as_bytes()));
        assert!(!is_slot(br#"{"host":"web1","reboot":"b1","commit":"c"}"#));
        assert!(!is_slot(b"web1"));
        assert!(!is_slot(br#"{"fleetlock":"true"}"#));
    }

    #[test]
    fn bad_bodies_say_why() {
        let e = parse_request(b"not json").unwrap_err();
        assert!(e.contains("not a FleetLock request"), "{e}");
        let e = parse_request(br#"{"client_params": {"id": "x"}}"#).unwrap_err();
        assert!(e.contains("group"), "{e}");
        let e = parse_request(br#"{"client_params": {"id": "x/y", "group": "g"}}"#).unwrap_err();
        assert!(e.contains("'/'"), "{e}");
        // Unknown fields are tolerated (the protocol may grow).
        assert!(
            parse_request(br#"{"client_params": {"id": "x", "group": "g", "v": 2}, "z": 1}"#)
                .is_ok()
        );
    }
}
