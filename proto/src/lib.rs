//! Contracts shared by the vault, its clients and its operators:
//!
//! - [`vault::v1`]: the gRPC client API, compiled from `vault/v1/vault.proto`;
//!   [`vault::node::v1`]: the node-to-node API of a replica group;
//!   [`vault::raft::v1`]: the binary encoding of its Raft state, compiled
//!   with protox (no system `protoc`). A breaking change gets a new package
//!   beside the old one.
//! - [`suite`]: the OPAQUE cipher suite (RFC 9807 P256-SHA256 with Argon2id
//!   on the client) and the key derivations both ends must agree on.
//! - [`token`]: the owner-authorization bearer token format.

#![forbid(unsafe_code)]

pub mod operator;
pub mod suite;
pub mod token;

/// The encoded `FileDescriptorSet` of every package above, for gRPC server
/// reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/vault_descriptors.bin"));

pub mod vault {
    pub mod v1 {
        #![allow(missing_debug_implementations, clippy::all)]
        tonic::include_proto!("vault.v1");
    }

    /// The binary encoding of a replica group's Raft state: entries,
    /// messages, snapshot headers, state machine and token values.
    pub mod raft {
        pub mod v1 {
            #![allow(missing_debug_implementations, clippy::all)]
            tonic::include_proto!("vault.raft.v1");
        }
    }

    /// Node-to-node API of a replica group.
    pub mod node {
        pub mod v1 {
            #![allow(missing_debug_implementations, clippy::all)]
            tonic::include_proto!("vault.node.v1");
        }
    }
}
