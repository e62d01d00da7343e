//! Compiles `proto/` with protox (pure Rust, no system protoc) and prost-build.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/contextd/v1/records.proto",
        "proto/contextd/v1/snapshot.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    prost_build::Config::new()
        // An event's properties decode into `Bytes`: from a records-log
        // entry (itself `Bytes`) as a slice of it, from a borrowed slice
        // with one copy (a `Vec<u8>` field is copied twice, into a
        // `BytesMut` and then into the vector).
        .bytes([".contextd.v1.StoredEvent.properties"])
        .type_attribute(
            "contextd.v1.TypeRef",
            "#[derive(Eq, Hash, PartialOrd, Ord)]",
        )
        .type_attribute(
            "contextd.v1.Identifier",
            "#[derive(Eq, Hash, PartialOrd, Ord)]",
        )
        .compile_fds(fds)?;
    Ok(())
}
