//! The anchor state kept in the token's watermark label
//! (`hsm-vault/src/core/index.rs`, `AnchorState`: `seq:digest[;seq:digest]`),
//! read back from the token at every open: decode, then encode and decode
//! again gives the same state; then the open check against a store anchor
//! taken from the input answers consistently.
//!
//! Input: the label bytes, optionally followed by a 0xff byte and a store
//! anchor (8-byte seq, 32-byte digest).

#![no_main]

use hsm_vault::core::index::{check_open, Anchor, AnchorState, OpenCheck};
use hsm_vault::types::Seq;
use libfuzzer_sys::fuzz_target;

fuzz_target!(init: vault_fuzz::seeds::init("anchor_state"), |data: &[u8]| {
    let (label, store) = match data.iter().position(|b| *b == 0xff) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let Some(state) = AnchorState::decode(label) else {
        return;
    };
    let encoded = state.encode();
    assert_eq!(AnchorState::decode(&encoded), Some(state));
    assert_eq!(state.encode(), encoded);
    let Some(store) = store.and_then(|s| s.get(..40)) else {
        return;
    };
    let store = Anchor {
        seq: Seq(u64::from_be_bytes(store[..8].try_into().expect("8 bytes"))),
        digest: store[8..40].try_into().expect("32 bytes"),
    };
    for anchor in [store, state.committed]
        .into_iter()
        .chain(state.pending)
    {
        match check_open(&state, anchor) {
            OpenCheck::Current => {
                assert_eq!(anchor, state.committed);
                assert!(state.pending.is_none());
            }
            OpenCheck::DropPending => {
                assert_eq!(anchor, state.committed);
                assert!(state.pending.is_some());
            }
            OpenCheck::RollForward(a) => {
                assert_eq!(Some(a), state.pending);
                assert_eq!(a, anchor);
            }
            OpenCheck::RolledBack { store, token } => {
                assert!(store < token);
                assert_ne!(Some(anchor), state.pending);
                assert_ne!(anchor, state.committed);
            }
            OpenCheck::Altered => {
                assert_ne!(Some(anchor), state.pending);
                assert_ne!(anchor, state.committed);
            }
        }
    }
});
