//! Lays out first, in `hot-code.order`'s order, the functions a running hamd executes
//! once up (the list is made by `scripts/hot-code`), and ahead of the other constants
//! the tables those functions jump through. The kernel maps 64 KiB of page cache
//! around every fault on a file's page, so this sets how much of the executable an
//! idle or restarting HAM keeps resident.
//!
//! The list names functions by their symbols, whose hashes change with every change to
//! a crate's metadata, even with which packages a `cargo build` selects (features are
//! unified over them). So each name becomes a pattern without its hashes, matched
//! against the function's section (`.text.SYMBOL`, or `.text.unlikely.SYMBOL` for a
//! cold one: Rust puts each function in its own), in a linker script that lld
//! inserts before `.text` as the output section `.text.hot`. A function that is gone
//! matches nothing. Only for lld, the linker of x86_64-unknown-linux-gnu since Rust 1.90.
//!
//! The static build (`scripts/build-static`) links the C library in: its functions are
//! listed by archive member (`libc.a:close.o`), whose code and constants go with the
//! hot ones. A dynamic build has no such member, and those entries match nothing.

use std::fmt::Write as _;

/// The section pattern of a symbol: its v0 crate disambiguators (`Cs…_`) and
/// back-references (`B…_`, offsets that move with them) left open, and its end (a
/// `.llvm.N` suffix comes and goes with how code is split into units). A C name
/// (`main`) stands as it is.
fn pattern(symbol: &str) -> String {
    let symbol = symbol.split(".llvm.").next().unwrap_or(symbol);
    if !symbol.starts_with("_R") {
        return symbol.to_owned();
    }
    open_v0_hashes(symbol) + "*"
}

/// `symbol` with every `Cs<base62>_` and `B<base62>_` as `Cs*_` and `B*_` (an
/// identifier that happens to hold such letters only makes the pattern looser).
fn open_v0_hashes(symbol: &str) -> String {
    let bytes = symbol.as_bytes();
    let mut out = String::with_capacity(symbol.len());
    let mut i = 0;
    while i < bytes.len() {
        let tag = if bytes[i..].starts_with(b"Cs") {
            2
        } else if bytes[i] == b'B' {
            1
        } else {
            0
        };
        if tag > 0 {
            let digits = bytes[i + tag..]
                .iter()
                .take_while(|b| b.is_ascii_alphanumeric())
                .count();
            if bytes.get(i + tag + digits) == Some(&b'_') {
                out.push_str(&symbol[i..i + tag]);
                out.push_str("*_");
                i += tag + digits + 1;
                continue;
            }
        }
        out.push(char::from(bytes[i]));
        i += 1;
    }
    out
}

/// An `ARCHIVE:MEMBER` entry (`libc.a:close.o`): a C library function's object,
/// which a static build links in, named as lld matches a member of an archive. Such
/// an entry matches nothing in a dynamic build.
fn archive_member(entry: &str) -> Option<&str> {
    let (archive, member) = entry.split_once(':')?;
    (archive.ends_with(".a") && member.ends_with(".o")).then_some(entry)
}

fn main() {
    let order = "hot-code.order";
    println!("cargo:rerun-if-changed={order}");
    println!("cargo:rerun-if-env-changed=HAM_NO_CODE_ORDER");
    let lld_by_default = std::env::var("TARGET").as_deref() == Ok("x86_64-unknown-linux-gnu");
    if !lld_by_default || std::env::var_os("HAM_NO_CODE_ORDER").is_some() {
        return;
    }
    let list = std::fs::read_to_string(order).expect("node/hot-code.order is readable");
    let mut script = String::from(
        "/* Made by node/build.rs from hot-code.order. */\nSECTIONS {\n  .text.hot : {\n",
    );
    // A static build calls the C library's string functions (chosen for the CPU at
    // start) through stubs of its own, `.iplt`, that lld would put after all the code:
    // every memmove would touch a window of cold code.
    script.push_str("    *(.iplt)\n");
    let mut patterns = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for symbol in list.lines().map(str::trim) {
        if symbol.is_empty() || symbol.starts_with('#') {
            continue;
        }
        let p = pattern(symbol);
        if seen.insert(p.clone()) {
            patterns.push(p);
        }
    }
    for p in &patterns {
        if let Some(member) = archive_member(p) {
            // A C library's function, linked in by a static build: its object's code
            // (glibc's variants live in `.text.avx`, `.text.evex`…).
            let _ = writeln!(script, "    *{member}(.text .text.*)");
        } else {
            // A cold function (`#[cold]`: a vector's growth…) has its section under
            // `.text.unlikely.`.
            let _ = writeln!(script, "    *(.text.{p} .text.unlikely.{p})");
        }
    }
    script.push_str("  }\n}\nINSERT BEFORE .text;\n");
    // The constants those functions read that carry their name: their jump tables
    // (`.rodata.SYMBOL`) and lookup tables (`.rodata..Lswitch.table.SYMBOL`).
    // Aligned to 64 KiB, fault-around's window, so that the few KiB of it are one window
    // and not the ends of two: a static executable is mapped at a 64 KiB (or larger)
    // boundary, so its offsets and addresses share their windows.
    script.push_str("SECTIONS {\n  .rodata.hot ALIGN(0x10000) : {\n");
    for p in &patterns {
        if let Some(member) = archive_member(p) {
            let _ = writeln!(script, "    *{member}(.rodata .rodata.*)");
        } else {
            let _ = writeln!(script, "    *(.rodata.{p} .rodata..Lswitch.table.{p})");
        }
    }
    script.push_str("  }\n}\nINSERT BEFORE .rodata;\n");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("hot-code.ld");
    std::fs::write(&out, script).expect("OUT_DIR is writable");
    println!("cargo:rustc-link-arg-bin=hamd=-Wl,-T,{}", out.display());
}
