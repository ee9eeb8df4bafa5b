//! nats-server, the peer of the cross-node event figures: where it is (installed from
//! Debian in a full run), a minimal client, a timestamping subscriber and a clustered
//! pair of servers.

pub mod client;
pub mod server;
pub mod tap;

use crate::sut::{apt_install, on_path};
use std::path::PathBuf;

/// The Debian package and its program.
pub const PACKAGE: &str = "nats-server";

/// The `nats-server` program, installing its Debian package first when `install` and
/// it is missing; `None` (after a SKIPPED line) if it is not there.
pub fn find(install: bool) -> Option<PathBuf> {
    if !on_path(PACKAGE) && install {
        eprintln!("installing {PACKAGE}: apt-get install -y {PACKAGE}");
        apt_install(&[PACKAGE]);
    }
    let path = std::env::var_os("PATH")?;
    let found = std::env::split_paths(&path)
        .map(|d| d.join(PACKAGE))
        .find(|p| p.is_file());
    if found.is_none() {
        eprintln!(
            "SKIPPED {PACKAGE}: not installed (Debian package {PACKAGE}; `cargo run --release -p ham-bench -- all` installs it)"
        );
    }
    found
}
