//! Lays out first, in `hot-code.order`'s order, the functions a running hamd executes
//! once up (made by `scripts/hot-code`). The kernel maps 64 KiB of page cache around
//! every code fault, so this sets how much of the executable an idle or restarting
//! HAM keeps resident. Only for lld, the linker of x86_64-unknown-linux-gnu since
//! Rust 1.90; a function the file names that is gone is skipped.

fn main() {
    let order = "hot-code.order";
    println!("cargo:rerun-if-changed={order}");
    println!("cargo:rerun-if-env-changed=HAM_NO_CODE_ORDER");
    let lld_by_default = std::env::var("TARGET").as_deref() == Ok("x86_64-unknown-linux-gnu");
    if !lld_by_default || std::env::var_os("HAM_NO_CODE_ORDER").is_some() {
        return;
    }
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rustc-link-arg-bin=hamd=-Wl,--symbol-ordering-file={dir}/{order}");
    println!("cargo:rustc-link-arg-bin=hamd=-Wl,--no-warn-symbol-ordering");
}
