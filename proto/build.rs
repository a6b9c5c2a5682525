//! Generates the moe.v1 code with protox, so no system `protoc` is needed,
//! and writes the descriptor set that gRPC reflection serves.

use std::path::PathBuf;

use prost::Message;

const PROTOS: [&str; 3] = [
    "moe/v1/tensor.proto",
    "moe/v1/expert.proto",
    "moe/v1/inference.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptors = protox::compile(PROTOS, ["."])?;
    std::fs::write(
        out_dir.join("moe_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .bytes(".moe.v1")
        .compile_fds(descriptors)?;
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
