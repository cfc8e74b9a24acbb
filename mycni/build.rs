//! Embeds the eBPF object built by `cargo xtask build-ebpf`.
use std::path::PathBuf;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let object = std::env::var_os("MYCNI_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            manifest_dir.join("../mycni-ebpf/target/bpfel-unknown-none/release/mycni")
        });
    println!("cargo:rerun-if-env-changed=MYCNI_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.exists() {
        panic!(
            "the eBPF object {} is missing: run `cargo xtask build-ebpf` first (or `cargo xtask setup` on a fresh machine)",
            object.display()
        );
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo")).join("mycni.bpf.o");
    std::fs::copy(&object, &out).expect("copy the eBPF object into OUT_DIR");
}
