//! The faults file (`hsm-vault/src/geo.rs`, JSON), which every node of a
//! local fleet re-reads every 100 ms: decoded as the node decodes it (blank
//! means no faults), it must write back to JSON that decodes to the same
//! switches.
//!
//! Input: the file's text.

#![no_main]

use hsm_vault::geo::Faults;
use libfuzzer_sys::fuzz_target;

fuzz_target!(init: vault_fuzz::seeds::init("faults_file"), |data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // As `Geography::new` reads it.
    let parsed = Some(text)
        .filter(|t| !t.trim().is_empty())
        .map(serde_json::from_str::<Faults>)
        .transpose();
    let Ok(faults) = parsed else {
        return;
    };
    let faults = faults.unwrap_or_default();
    let written = serde_json::to_string(&faults).expect("switches encode");
    let again: Faults = serde_json::from_str(&written).expect("written switches decode");
    assert_eq!(again, faults);
    let pretty = serde_json::to_string_pretty(&faults).expect("switches encode");
    assert_eq!(serde_json::from_str::<Faults>(&pretty).expect("decode"), faults);
});
