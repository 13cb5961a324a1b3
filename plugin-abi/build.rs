//! Captures the version of the compiler that builds this crate, for the dynamic plugin ABI check
//! (`optimystic_plugin_abi::RUSTC_VERSION`): a host only loads plugins built by the same rustc.

use std::process::Command;

fn main() -> Result<(), String> {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=RUSTC");
    let rustc = std::env::var_os("RUSTC").ok_or("cargo did not set RUSTC for the build script")?;
    let output = Command::new(&rustc)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {} --version: {e}", rustc.to_string_lossy()))?;
    if !output.status.success() {
        return Err(format!("{} --version failed with {}", rustc.to_string_lossy(), output.status));
    }
    let version = String::from_utf8(output.stdout).map_err(|e| format!("rustc --version printed non-UTF-8: {e}"))?;
    let version = version.trim();
    if version.is_empty() {
        return Err("rustc --version printed nothing".into());
    }
    println!("cargo:rustc-env=OPTIMYSTIC_RUSTC_VERSION={version}");
    Ok(())
}
