//! OPAQUE (opaque-ke 4.0.1, suite `P256-SHA256` of `proto/src/suite.rs`):
//! deserializing every message the vault or its clients receive, and the
//! password file the core reads back from an unsealed record. Whatever
//! deserializes must serialize to the bytes it was read from (a prefix of
//! the input: opaque-ke reads the fields it needs and ignores the rest) and
//! read back the same.
//!
//! Input: a selector byte, then the message.

#![no_main]

use hsm_vault::core::ecdh;
use libfuzzer_sys::fuzz_target;
use opaque_ke::{
    CredentialFinalization, CredentialRequest, CredentialResponse, RegistrationRequest,
    RegistrationResponse, RegistrationUpload, ServerRegistration,
};
use vault_fuzz::select;
use vault_proto::suite::Suite;

/// Deserializes `$bytes` as `$t`; if that works, checks the encoding.
macro_rules! round_trip {
    ($t:ty, $bytes:expr) => {{
        let bytes: &[u8] = $bytes;
        match <$t>::deserialize(bytes) {
            Ok(m) => {
                let encoded = m.serialize();
                assert!(encoded.len() <= bytes.len());
                // It re-encodes to its input, except that a point may come
                // in SEC1's compact form (tag 0x05, x only: accepted by the
                // p256 crate's SEC1 parser) and goes out compressed.
                for (i, (a, b)) in bytes.iter().zip(encoded.iter()).enumerate() {
                    assert!(
                        a == b || (*a == 0x05 && (*b == 0x02 || *b == 0x03)),
                        "{} does not re-encode to its input (byte {i})",
                        stringify!($t)
                    );
                }
                let again = <$t>::deserialize(&encoded).expect("its own encoding deserializes");
                assert_eq!(again.serialize(), encoded);
                true
            }
            Err(_) => false,
        }
    }};
}

fuzz_target!(init: vault_fuzz::seeds::init("opaque_messages"), |data: &[u8]| {
    let Some((which, bytes)) = select(data) else {
        return;
    };
    match which % 8 {
        // Client → vault.
        0 => {
            round_trip!(RegistrationRequest<Suite>, bytes);
        }
        1 => {
            round_trip!(RegistrationUpload<Suite>, bytes);
        }
        2 => {
            // KE1, and the core's check of its ephemeral key before a
            // guess is charged.
            let parsed = round_trip!(CredentialRequest<Suite>, bytes);
            let usable = ecdh::usable_ke1(bytes);
            if usable {
                // The key it reads is a valid point, so the KE1 it sits in
                // parses unless the blinded element or nonce is bad.
                assert!(bytes.len() >= 98);
            }
            let _ = parsed;
        }
        3 => {
            round_trip!(CredentialFinalization<Suite>, bytes);
        }
        // Vault → client.
        4 => {
            round_trip!(RegistrationResponse<Suite>, bytes);
        }
        5 => {
            round_trip!(CredentialResponse<Suite>, bytes);
        }
        // The password file inside an unsealed record.
        6 => {
            round_trip!(ServerRegistration<Suite>, bytes);
        }
        _ => {
            // The AKE public key as read from the token.
            if let Some(pk) = ecdh::ServerPublic::from_sec1(bytes) {
                assert_eq!(ecdh::ServerPublic::from_sec1(&pk.compressed).map(|p| p.compressed), Some(pk.compressed));
            }
        }
    }
});
