//! `cargo xtask build-ebpf`: compile relay-ebpf/src/*.bpf.c with Debian's
//! clang into relay-ebpf/obj/*.o, byte for byte reproducibly, and the check
//! `cargo xtask test` runs: the committed objects equal a fresh build.
//!
//! The objects are committed so that building relay needs no clang.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::workspace;

/// Flags for every object: BTF and func_info (`-g`) are required by aya,
/// and `-fdebug-prefix-map` keeps the checkout path out of the object.
fn clang(root: &Path, source: &Path, out: &Path) -> Command {
    let ebpf = root.join("relay-ebpf");
    let mut cmd = Command::new("clang");
    cmd.current_dir(&ebpf)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg("-I/usr/include/x86_64-linux-gnu")
        .arg("-Iinclude")
        .arg(format!("-fdebug-prefix-map={}=.", ebpf.display()))
        .arg("-c")
        .arg(source.strip_prefix(&ebpf).unwrap_or(source))
        .arg("-o")
        .arg(out);
    cmd
}

/// Every `relay-ebpf/src/*.bpf.c`, sorted.
fn sources(root: &Path) -> Result<Vec<PathBuf>> {
    let dir = root.join("relay-ebpf/src");
    let mut found: Vec<PathBuf> = fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".bpf.c"))
        .collect();
    found.sort();
    Ok(found)
}

fn object_name(source: &Path) -> String {
    let file = source
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("{}.o", file.trim_end_matches(".c"))
}

fn compile(root: &Path, source: &Path, out: &Path) -> Result<()> {
    let status = clang(root, source, out)
        .status()
        .context("running clang (install it: apt-get install clang libbpf-dev)")?;
    if !status.success() {
        bail!("clang failed on {}", source.display());
    }
    Ok(())
}

/// `cargo xtask build-ebpf`
pub fn build() -> Result<()> {
    let root = workspace::root();
    let obj = root.join("relay-ebpf/obj");
    fs::create_dir_all(&obj)?;
    for source in sources(&root)? {
        let out = obj.join(object_name(&source));
        compile(&root, &source, &out)?;
        println!(
            "xtask: built {}",
            out.strip_prefix(&root).unwrap_or(&out).display()
        );
    }
    Ok(())
}

/// Fails naming every object that differs from a fresh build of its source.
pub fn check_fresh() -> Result<()> {
    check_fresh_at(&workspace::root())?;
    println!("xtask: eBPF objects match their sources");
    Ok(())
}

/// [`check_fresh`] for the tree at `root` (which holds `relay-ebpf/`).
fn check_fresh_at(root: &Path) -> Result<()> {
    let root = root.to_path_buf();
    let scratch = std::env::temp_dir().join(format!("relay-ebpf-check-{}", std::process::id()));
    fs::create_dir_all(&scratch)?;
    let mut stale = Vec::new();
    for source in sources(&root)? {
        let name = object_name(&source);
        let fresh = scratch.join(&name);
        compile(&root, &source, &fresh)?;
        let committed = root.join("relay-ebpf/obj").join(&name);
        if fs::read(&committed).ok() != Some(fs::read(&fresh)?) {
            stale.push(format!("relay-ebpf/obj/{name}"));
        }
    }
    let _ = fs::remove_dir_all(&scratch);
    if !stale.is_empty() {
        bail!(
            "stale eBPF object(s): {} differ from a fresh build of relay-ebpf/src; run `cargo xtask build-ebpf` and commit the result",
            stale.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy_dir(from: &Path, to: &Path) {
        fs::create_dir_all(to).unwrap();
        for entry in fs::read_dir(from).unwrap() {
            let path = entry.unwrap().path();
            let dest = to.join(path.file_name().unwrap());
            if path.is_dir() {
                copy_dir(&path, &dest)
            } else {
                fs::copy(&path, &dest).map(|_| ()).unwrap()
            }
        }
    }

    /// A source edited without `cargo xtask build-ebpf` makes the check fail,
    /// naming the object; the committed tree passes.
    #[test]
    fn edited_source_without_rebuild_is_reported_stale() {
        if Command::new("clang").arg("--version").output().is_err() {
            eprintln!(
                "SKIP edited_source_without_rebuild_is_reported_stale: clang not installed (apt-get install clang libbpf-dev)"
            );
            return;
        }
        let copy =
            std::env::temp_dir().join(format!("relay-ebpf-stale-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&copy);
        copy_dir(
            &workspace::root().join("relay-ebpf"),
            &copy.join("relay-ebpf"),
        );
        check_fresh_at(&copy).expect("the committed objects match their sources");

        let source = copy.join("relay-ebpf/src/observe.bpf.c");
        let edited = fs::read_to_string(&source).unwrap().replace(
            "return TC_ACT_UNSPEC;",
            "return TC_ACT_UNSPEC; /* edited */",
        );
        fs::write(&source, edited).unwrap();
        let err = check_fresh_at(&copy)
            .expect_err("an edited source must be reported stale")
            .to_string();
        let _ = fs::remove_dir_all(&copy);
        assert!(
            err.contains("relay-ebpf/obj/observe.bpf.o") && err.contains("cargo xtask build-ebpf"),
            "got: {err}"
        );
    }
}
