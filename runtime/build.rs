// Embeds the shipped default model when it is present, so the binary needs no models/ folder.
fn main() {
    // The variable as cargo sets it for this run: `env!` would bake in the directory the build
    // script was compiled in, which a target directory shared between checkouts reuses.
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let model = std::path::Path::new(&dir).join("../models/mnist-ddpm.onnx");
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
