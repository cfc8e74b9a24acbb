//! Embeds the eBPF object built by `cargo xtask build-ebpf`. Without it (a fresh clone,
//! `cargo check` or clippy before `build-ebpf`) an empty object is embedded and a warning
//! printed; the agent then refuses to load and says how to build it.
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
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo")).join("mycni.bpf.o");
    if object.exists() {
        std::fs::copy(&object, &out).expect("copy the eBPF object into OUT_DIR");
    } else {
        println!(
            "cargo:warning=the eBPF object {} is missing: this build cannot load the datapath; run `cargo xtask build-ebpf` (or `cargo xtask setup` on a fresh machine), then build again",
            object.display()
        );
        std::fs::write(&out, b"").expect("write an empty object into OUT_DIR");
    }
}
