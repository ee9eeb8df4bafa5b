//! Loopback addresses and ports for the mesh scenarios: node i listens on
//! 127.0.0.(2+i), and every run takes ports of its own (derived from its PID, checked
//! free), so runs never collide with each other or with the test suite.

use anyhow::bail;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicU16, Ordering};

/// The loopback address of node `i` (0-based): 127.0.0.2, 127.0.0.3, …
pub fn host(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + i as u8)
}

/// How many ports each PID's range holds.
const SPAN: u16 = 100;

static NEXT: AtomicU16 = AtomicU16::new(0);

/// A port that TCP and UDP can bind on every address of `hosts` right now. Ports come
/// from a range of [`SPAN`] picked by this process's PID, below the kernel's ephemeral
/// range (32768–60999) so no outgoing connection takes them meanwhile.
pub fn free_port(hosts: &[Ipv4Addr]) -> anyhow::Result<u16> {
    let base = 10_000 + (std::process::id() % 220) as u16 * SPAN;
    for _ in 0..SPAN * 2 {
        let port = base + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN;
        let free = hosts.iter().all(|&h| {
            let a = SocketAddr::from((h, port));
            TcpListener::bind(a).is_ok() && UdpSocket::bind(a).is_ok()
        });
        if free {
            return Ok(port);
        }
    }
    bail!("no free port in {base}..{} on {hosts:?}", base + SPAN)
}
