use super::*;

/// A small record's reader took the 1 GiB cap of the inventory: a
/// sparse or damaged metrics file of 512 MiB was read whole, into as
/// much memory, on every run. It is refused by its size now, as
/// content (repaired, not left as a failed read); a file that may be
/// large (a journal, the marks) is still read under the large cap.
#[test]
fn a_sparse_small_record_is_refused_by_its_own_cap_not_read() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("metrics-totals.json");
    let size: u64 = 64 << 20;
    File::create(&p).unwrap().set_len(size).unwrap();
    let e = read_json::<serde_json::Value>(&p).unwrap_err();
    assert!(
        format!("{e:#}").contains(&format!(
            "{size} bytes, more than {SMALL_STATE_READ_MAX_BYTES}"
        )),
        "{e:#}"
    );
    assert!(!read_failed(&e));
    let e = read_json_large::<serde_json::Value>(&p).unwrap_err();
    assert!(!format!("{e:#}").contains("more than"), "{e:#}");
}

/// `hash.key` is judged by its size before it is read: a larger one
/// said only "N bytes, more than 4096", without the remedy a short one
/// gets.
#[test]
fn an_oversized_hash_key_is_corrupt_with_its_remedy() {
    let d = tempfile::tempdir().unwrap();
    let state = StateDir::open(d.path()).unwrap();
    for len in [31u64, 33, 1 << 20] {
        File::create(d.path().join("hash.key"))
            .unwrap()
            .set_len(len)
            .unwrap();
        let e = format!("{:#}", state.hash_key().unwrap_err());
        assert!(
            e.contains("is corrupt (not 32 bytes): remove it"),
            "{len}: {e}"
        );
    }
}
