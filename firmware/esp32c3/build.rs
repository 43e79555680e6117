//! Links with esp-hal's linker scripts.
fn main() {
    println!("cargo:rustc-link-arg=-Tlinkall.x");
}
