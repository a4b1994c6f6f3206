// Embeds the shipped default model when it is present, so the binary needs no models/ folder.
fn main() {
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/mnist-ddpm.onnx");
    println!("cargo:rerun-if-changed={}", model.display());
    println!("cargo::rustc-check-cfg=cfg(edgediff_default_model)");
    if model.exists() {
        println!("cargo:rustc-cfg=edgediff_default_model");
        println!(
            "cargo:rustc-env=EDGEDIFF_DEFAULT_MODEL={}",
            model.canonicalize().unwrap().display()
        );
    }
}
