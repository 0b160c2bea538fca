//! Link options for the `skillmesh` binary.

fn main() {
    println!("cargo:rerun-if-changed=node/build.rs");
    println!("cargo:rerun-if-changed={ORDER}");
    println!("cargo:rerun-if-env-changed=SKILLMESH_NO_RELR");
    println!("cargo:rerun-if-env-changed=SKILLMESH_NO_ORDER");
    if relr_supported() {
        // Relative relocations packed as RELR instead of one 24-byte RELA entry each: a PIE Rust
        // binary carries tens of thousands of them, and the loader reads the whole table at
        // every start, so it stayed resident for the daemon's life (debug build: 1.84 MB of
        // RELA became 24 KB). The binary stays position-independent, ASLR unchanged.
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    if startup_order() {
        // The functions an idle daemon runs, side by side at the start of the code instead of
        // scattered through it: each 4 KiB page one of them sits on stays resident, with the
        // pages the kernel maps around it (node/startup-order.sh, which writes the list).
        let path = std::path::Path::new(&var("CARGO_MANIFEST_DIR")).join(ORDER);
        println!(
            "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
            path.display()
        );
        // A function of the list that this build does not have is no fault: the list was made
        // from one build, and a changed one keeps the rest of the order.
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}

/// The list of functions an idle daemon runs (node/startup-order.sh).
const ORDER: &str = "node/startup.order";

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_default()
}

/// Whether to lay out the binary by [`ORDER`]: for the dist profile (the daemon as shipped; the
/// list names that build's functions), linked by the linker rustc uses by default on
/// x86_64 Linux since 1.90, rust-lld, which takes the option; another linker might not.
fn startup_order() -> bool {
    let out_dir = var("OUT_DIR");
    // target/<profile>/build/<package>-<hash>/out
    let profile = std::path::Path::new(&out_dir)
        .ancestors()
        .nth(3)
        .and_then(|p| p.file_name())
        .and_then(|p| p.to_str())
        .unwrap_or_default()
        .to_owned();
    let flags = var("CARGO_ENCODED_RUSTFLAGS");
    profile == "dist"
        && var("TARGET") == "x86_64-unknown-linux-gnu"
        && std::env::var_os("SKILLMESH_NO_ORDER").is_none()
        && std::env::var_os("RUSTC_LINKER").is_none()
        && !flags.contains("link")
        && std::path::Path::new(&var("CARGO_MANIFEST_DIR"))
            .join(ORDER)
            .exists()
}

/// Whether the binary's loader understands RELR: glibc 2.36 or newer. Only known when the
/// build runs on the system it builds for (then the system's glibc is the binary's);
/// the linkers that ship beside such a glibc (binutils 2.38+, lld 15+, mold) all take the
/// option. A binary linked with RELR refuses to load on an older glibc, so when in doubt: no.
fn relr_supported() -> bool {
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
