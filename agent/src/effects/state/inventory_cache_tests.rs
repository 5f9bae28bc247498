use super::*;

/// The parsed inventory is reused only for the very file it came
/// from: a replaced inventory (every write is a rename), a corrupted
/// one and a removed one are read again, through every clone of the
/// state directory.
#[test]
fn the_cached_inventory_follows_every_replacement_of_the_file() {
    let d = tempfile::tempdir().unwrap();
    let state = StateDir::open(d.path()).unwrap();
    let other = state.clone();
    let mut inv = (*state.inventory().unwrap()).clone();
    assert!(inv.commit.is_none());
    inv.commit = Some("c1".into());
    write_inventory_atomic(&state.inventory_path(), &inv).unwrap();
    assert_eq!(state.inventory().unwrap().commit.as_deref(), Some("c1"));
    assert_eq!(other.inventory().unwrap().commit.as_deref(), Some("c1"));
    inv.commit = Some("c2".into());
    write_inventory_atomic(&state.inventory_path(), &inv).unwrap();
    assert_eq!(other.inventory().unwrap().commit.as_deref(), Some("c2"));
    std::fs::write(state.inventory_path(), b"{ not json").unwrap();
    let e = format!("{:#}", state.inventory().unwrap_err());
    assert!(e.contains("is corrupt"), "{e}");
    std::fs::remove_file(state.inventory_path()).unwrap();
    assert!(state.inventory().unwrap().commit.is_none());
}
