//! Fuzz the template-reference scanner
//! (`driftless::desired::render::template_refs`): it reads every template
//! of a repository to decide which files a commit can affect, so it must
//! never panic (multi-byte text, unterminated tags and strings), and the
//! names it returns must come from the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(names) = driftless::desired::render::template_refs(text) {
        for n in names {
            assert!(text.contains(n.as_str()), "{n:?} is not in the input");
        }
    }
});
