//! `overlay-agent`: the node daemon. All logic lives in the library.
fn main() {
    println!("overlay-agent {}", env!("CARGO_PKG_VERSION"));
}
