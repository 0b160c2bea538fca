//! Link options for the `skillmesh` binary.

fn main() {
    println!("cargo:rerun-if-changed=node/build.rs");
    println!("cargo:rerun-if-env-changed=SKILLMESH_NO_RELR");
    if relr_supported() {
        // Relative relocations packed as RELR instead of one 24-byte RELA entry each: a PIE Rust
        // binary carries tens of thousands of them, and the loader reads the whole table at
        // every start, so it stayed resident for the daemon's life (debug build: 1.84 MB of
        // RELA became 24 KB). The binary stays position-independent, ASLR unchanged.
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

/// Whether the binary's loader understands RELR: glibc 2.36 or newer. Only known when the
/// build runs on the system it builds for (then the system's glibc is the binary's);
/// the linkers that ship beside such a glibc (binutils 2.38+, lld 15+, mold) all take the
/// option. A binary linked with RELR refuses to load on an older glibc, so when in doubt: no.
fn relr_supported() -> bool {
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    if var("CARGO_CFG_TARGET_OS") != "linux" || var("CARGO_CFG_TARGET_ENV") != "gnu" {
        return false;
    }
    if var("HOST") != var("TARGET") || std::env::var_os("SKILLMESH_NO_RELR").is_some() {
        return false;
    }
    glibc_version().is_some_and(|v| v >= (2, 36))
}

/// The build system's glibc, from `getconf GNU_LIBC_VERSION` ("glibc 2.36"): part of glibc
/// itself, and no unsafe call into it from here.
fn glibc_version() -> Option<(u32, u32)> {
    let out = std::process::Command::new("getconf")
        .arg("GNU_LIBC_VERSION")
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let version = text.trim().strip_prefix("glibc ")?;
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}
