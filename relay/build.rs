//! The static build (`cargo xtask dist`, `+crt-static`) links Debian's
//! libpcap.a, whose D-Bus capture source needs libdbus-1.a after it. Named
//! by file (`-l:`), because rustc switches the linker back to shared
//! libraries before the arguments given here, and a static-pie binary that
//! still needs libdbus-1.so crashes at start. The two libsystemd functions
//! libdbus refers to are in src/main.rs.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let features = std::env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    if features.split(',').any(|f| f == "crt-static") {
        println!("cargo:rustc-link-arg-bins=-l:libdbus-1.a");
    }
}
