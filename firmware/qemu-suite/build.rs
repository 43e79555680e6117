//! Links with `qemu.ld` (RAM of the QEMU `virt` board).
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo");
    println!("cargo:rustc-link-search={dir}");
    println!("cargo:rustc-link-arg=-Tqemu.ld");
    println!("cargo:rerun-if-changed=qemu.ld");
}
