//! `cargo xtask dist`: the deployable files in `target/dist/`.
//!
//! - `relay`: a statically linked binary (libpcap and libdbus-1 from
//!   Debian's static libraries included: libpcap0.8-dev, libdbus-1-dev),
//!   glibc linked in with
//!   `-C target-feature=+crt-static` for `x86_64-unknown-linux-gnu` (the
//!   only target this toolchain has; musl would need rustup's musl target,
//!   which cannot be installed here). It runs on any x86_64 Linux, in a
//!   `FROM scratch` image too;
//! - `ca-certificates.crt`: the build host's trust store, for the image,
//!   which has no `/etc/ssl` of its own (TLS targets verified against the
//!   system store need it);
//! - `completions/relay.{bash,zsh,fish}` and `man/relay*.1`, made by the
//!   binary itself from its clap definition.
//!
//! The Dockerfile at the root of the repository builds its image from this
//! directory: `docker build -f Dockerfile target/dist`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

use crate::{cmd, workspace};

/// The target triple of the static build; glibc, statically linked.
const TARGET: &str = "x86_64-unknown-linux-gnu";
/// Where the host's trust store is (Debian's ca-certificates).
const HOST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Builds everything into `target/dist` and prints what is there.
pub fn run() -> Result<()> {
    let dist = workspace::target_dir().join("dist");
    let bin = build_static()?;
    std::fs::create_dir_all(&dist).with_context(|| format!("creating {}", dist.display()))?;
    let shipped = dist.join("relay");
    std::fs::copy(&bin, &shipped)
        .with_context(|| format!("copying {} to {}", bin.display(), shipped.display()))?;
    ensure!(
        !has_interpreter(&shipped)?,
        "{} still asks for a dynamic loader (PT_INTERP): the +crt-static build did not link statically",
        shipped.display()
    );
    let ca = dist.join("ca-certificates.crt");
    std::fs::copy(HOST_CA_BUNDLE, &ca).with_context(|| {
        format!("copying {HOST_CA_BUNDLE} (Debian package ca-certificates) into the image context")
    })?;
    let completions = dist.join("completions");
    std::fs::create_dir_all(&completions)?;
    for shell in ["bash", "zsh", "fish"] {
        let out = output_of(Command::new(&shipped).args(["completions", shell]))?;
        let file = completions.join(format!("relay.{shell}"));
        std::fs::write(&file, out).with_context(|| format!("writing {}", file.display()))?;
    }
    let man = dist.join("man");
    cmd::run_streaming(Command::new(&shipped).arg("man").arg("--dir").arg(&man))?;
    println!("xtask: dist in {}:", dist.display());
    println!("  relay (static, glibc), ca-certificates.crt, completions/, man/");
    println!(
        "  image: docker build -f Dockerfile {} -t relay",
        dist.display()
    );
    Ok(())
}

/// `cargo build --release -p relay --target x86_64-unknown-linux-gnu` with
/// `+crt-static` (and without debug info). Naming `--target` keeps RUSTFLAGS off build scripts and
/// proc macros, which must stay dynamic; it also puts the output in its own
/// directory, so the ordinary dynamic build is left alone.
fn build_static() -> Result<PathBuf> {
    let mut flags = std::env::var("RUSTFLAGS").unwrap_or_default();
    if !flags.is_empty() {
        flags.push(' ');
    }
    // Debug info would make the image five times larger; symbols stay, so
    // a panic's backtrace still names functions.
    flags.push_str("-C target-feature=+crt-static -C strip=debuginfo");
    // libpcap (the capture filter's compiler) links statically from
    // Debian's libpcap.a; relay/build.rs adds the libdbus-1.a it needs.
    cmd::run_streaming(
        workspace::cargo()
            .args(["build", "--release", "-p", "relay", "--target", TARGET])
            .env("RUSTFLAGS", flags),
    )?;
    let bin = workspace::target_dir()
        .join(TARGET)
        .join("release")
        .join("relay");
    ensure!(
        bin.is_file(),
        "cargo built relay but {} does not exist",
        bin.display()
    );
    Ok(bin)
}

/// Does the ELF file have a PT_INTERP program header (a dynamic loader)?
fn has_interpreter(path: &Path) -> Result<bool> {
    const PT_INTERP: u32 = 3;
    let elf = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let field = |at: usize, len: usize| -> Result<u64> {
        let bytes = elf
            .get(at..at + len)
            .with_context(|| format!("{} is truncated", path.display()))?;
        Ok(bytes
            .iter()
            .rev()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    };
    // A 64-bit little-endian ELF: what x86_64 builds are.
    if elf.get(0..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        bail!("{} is not a 64-bit little-endian ELF file", path.display());
    }
    let phoff = usize::try_from(field(0x20, 8)?)?;
    let phentsize = usize::try_from(field(0x36, 2)?)?;
    let phnum = usize::try_from(field(0x38, 2)?)?;
    for i in 0..phnum {
        if field(phoff + i * phentsize, 4)? == u64::from(PT_INTERP) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The stdout of a command that must succeed.
fn output_of(cmd: &mut Command) -> Result<Vec<u8>> {
    let what = cmd::render(cmd);
    let out = cmd
        .output()
        .with_context(|| format!("cannot run `{what}`"))?;
    ensure!(
        out.status.success(),
        "`{what}` failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}
