//! The built `hamd` lays out first, in an output section of their own (`.text.hot`,
//! before `.text`), the functions `node/hot-code.order` lists: the code a running HAM
//! and Guardian execute (node/build.rs makes the linker script). Without it they are
//! strewn over the whole executable, and an idle or restarting HAM keeps many times
//! more code resident (the kernel maps 64 KiB around every code fault). The jump and
//! lookup tables of those functions come first among the constants (`.rodata.hot`,
//! before `.rodata`), for the same reason.

use ham_tests::bin;
use std::process::Command;

/// `(name, address, size)` of every section of `path`, from `readelf -S`.
fn sections(path: &std::path::Path) -> Vec<(String, u64, u64)> {
    let out = Command::new("readelf")
        .args(["-S", "-W"])
        .arg(path)
        .output()
        .expect("readelf (binutils, beside the C linker) runs");
    assert!(out.status.success(), "readelf failed on {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let (_, rest) = line.split_once(']')?;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let [name, _kind, address, _offset, size, ..] = fields[..] else {
                return None;
            };
            Some((
                name.to_owned(),
                u64::from_str_radix(address, 16).ok()?,
                u64::from_str_radix(size, 16).ok()?,
            ))
        })
        .collect()
}

/// The address of the code symbol `name` in `path`, from `nm`.
fn symbol_address(path: &std::path::Path, name: &str) -> Option<u64> {
    let out = Command::new("nm")
        .arg("--defined-only")
        .arg(path)
        .output()
        .expect("nm (binutils, beside the C linker) runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields[..] {
                [address, "T" | "t", symbol] if symbol == name => {
                    u64::from_str_radix(address, 16).ok()
                }
                _ => None,
            }
        })
}

#[test]
fn hamd_lays_out_the_listed_hot_functions_first() {
    let hamd = bin("hamd");
    let sections = sections(&hamd);
    let find = |name: &str| sections.iter().find(|(n, _, _)| n == name).cloned();
    let (_, hot_start, hot_size) = find(".text.hot")
        .expect("hamd has a .text.hot section: is lld given node/build.rs's script?");
    let (_, text_start, text_size) = find(".text").expect("hamd has a .text section");
    assert!(
        hot_start < text_start,
        "the hot code comes before the rest of the code"
    );
    // Every profile keeps dozens of the listed functions (std's, the runtimes' loops),
    // and the whole list is under a megabyte: a section of the size of all the code
    // would mean the patterns match everything.
    assert!(
        hot_size >= 16 * 1024 && hot_size < text_size / 2,
        ".text.hot holds {hot_size} bytes of {text_size}"
    );
    // `main` is listed (it is on the stack for the process's life) and has no hash.
    let main = symbol_address(&hamd, "main").expect("hamd has main");
    assert!(
        (hot_start..hot_start + hot_size).contains(&main),
        "main lies in .text.hot"
    );
}

#[test]
fn hamd_lays_out_the_hot_functions_tables_first() {
    let sections = sections(&bin("hamd"));
    let find = |name: &str| sections.iter().find(|(n, _, _)| n == name).cloned();
    let (_, hot_start, hot_size) = find(".rodata.hot")
        .expect("hamd has a .rodata.hot section: is lld given node/build.rs's script?");
    let (_, rodata_start, rodata_size) = find(".rodata").expect("hamd has a .rodata section");
    assert!(
        hot_start < rodata_start,
        "the hot functions' tables come before the other constants"
    );
    // The listed functions' tables are a few KiB (the loops' state machines jump
    // through them): some must be there, and far from all the constants.
    assert!(
        hot_size >= 1024 && hot_size < rodata_size / 4,
        ".rodata.hot holds {hot_size} bytes of {rodata_size}"
    );
}
