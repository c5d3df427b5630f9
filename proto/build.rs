//! Compiles the .proto contracts with protox (pure Rust), so no system `protoc`
//! is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "vault/v1/vault.proto",
        "vault/node/v1/node.proto",
        "vault/raft/v1/raft.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["."])?;
    // The encoded descriptors, for server reflection (grpcurl works without
    // the .proto files).
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("vault_descriptors.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        // Ordered maps: a Raft value's encoding is part of the replicas'
        // state digest, so it must not depend on a hash map's order.
        .btree_map(".vault.raft.v1")
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
