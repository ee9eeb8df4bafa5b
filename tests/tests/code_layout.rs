//! The built `hamd` lays out first the functions `node/hot-code.order` lists (the
//! code a running HAM and Guardian execute): node/build.rs hands the file to lld.
//! Without it they are strewn over the whole executable, and an idle or restarting
//! HAM keeps many times more code resident (the kernel maps 64 KiB around a fault).

use ham_tests::bin;
use std::collections::HashMap;
use std::process::Command;

/// Every code symbol of `path`: name → (address, size), with the lowest address.
fn code_symbols(path: &std::path::Path) -> (HashMap<String, (u64, u64)>, u64) {
    let out = Command::new("nm")
        .args(["-S", "--defined-only"])
        .arg(path)
        .output()
        .expect("nm (binutils, beside the C linker) runs");
    assert!(out.status.success(), "nm failed on {}", path.display());
    let mut symbols = HashMap::new();
    let mut lowest = u64::MAX;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [address, size, kind, name] = fields[..] else {
            continue;
        };
        if !matches!(kind, "t" | "T" | "w" | "W") {
            continue;
        }
        let (Ok(address), Ok(size)) = (
            u64::from_str_radix(address, 16),
            u64::from_str_radix(size, 16),
        ) else {
            continue;
        };
        lowest = lowest.min(address);
        symbols.insert(name.to_owned(), (address, size));
    }
    (symbols, lowest)
}

#[test]
fn hamd_lays_out_the_listed_hot_functions_first() {
    let order_file = concat!(env!("CARGO_MANIFEST_DIR"), "/../node/hot-code.order");
    let order = std::fs::read_to_string(order_file).expect("node/hot-code.order is there");
    let (symbols, text_start) = code_symbols(&bin("hamd"));
    let listed: Vec<(u64, u64)> = order
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|name| symbols.get(name).copied())
        .collect();
    // A debug build keeps fewer of them (other inlining), but std's, main and the
    // runtime's loops are there in every profile.
    assert!(
        listed.len() >= 50,
        "only {} functions of the order file are in hamd: is it stale? (scripts/hot-code)",
        listed.len()
    );
    let total: u64 = listed.iter().map(|(_, size)| size).sum();
    let span = listed
        .iter()
        .map(|(address, size)| address + size - text_start)
        .max()
        .unwrap_or(0);
    // Laid out first, they end within little more than their own size (a section may
    // hold an unlisted neighbour); strewn, they span the whole code (6× and more).
    assert!(
        span <= 2 * total + 64 * 1024,
        "the {} listed functions ({total} bytes) end {span} bytes into the code: \
         not laid out first (is lld given node/hot-code.order?)",
        listed.len()
    );
}
