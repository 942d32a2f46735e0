//! Compiles `jai.proto` into the gRPC client and server of the control API.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../jai.proto");
    tonic_prost_build::configure().compile_protos(&["../jai.proto"], &[".."])?;
    Ok(())
}
