//! A NATS subscriber on a thread of its own that stamps every message with the shared
//! monotonic clock the moment it is read (the counterpart of `crate::tap`).

use super::client::Conn;
use crate::sys::mono_ns;
use anyhow::Context;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

/// A message's payload and when it arrived (CLOCK_MONOTONIC ns).
#[derive(Clone, Debug)]
pub struct Delivery {
    /// When the subscriber read it.
    pub at_ns: u64,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// A running subscription; dropping it closes the connection and joins the thread.
pub struct NatsTap {
    rx: mpsc::Receiver<Delivery>,
    socket: TcpStream,
    thread: Option<JoinHandle<()>>,
    received: Arc<AtomicU64>,
}

impl NatsTap {
    /// Connects to the server at `addr`, subscribes to `subject` and returns once the
    /// server has registered the subscription.
    pub fn open(addr: SocketAddr, subject: &str) -> anyhow::Result<NatsTap> {
        let mut c = Conn::connect(addr)?;
        c.subscribe(subject, 1)?;
        c.flush()?;
        let socket = c.socket()?;
        let (tx, rx) = mpsc::channel();
        let received = Arc::new(AtomicU64::new(0));
        let count = received.clone();
        let thread = std::thread::Builder::new()
            .name("nats-tap".into())
            .spawn(move || {
                while let Ok(payload) = c.next_msg() {
                    let at_ns = mono_ns();
                    count.fetch_add(1, Ordering::Relaxed);
                    if tx.send(Delivery { at_ns, payload }).is_err() {
                        return;
                    }
                }
            })
            .context("cannot start the NATS subscriber thread")?;
        Ok(NatsTap {
            rx,
            socket,
            thread: Some(thread),
            received,
        })
    }

    /// The next message, waiting at most `timeout`.
    pub fn recv(&self, timeout: Duration) -> Option<Delivery> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// Every message that has arrived and not been taken yet.
    pub fn drain(&self) -> Vec<Delivery> {
        self.rx.try_iter().collect()
    }

    /// A counter of the messages that arrived, for flow control.
    pub fn received(&self) -> Arc<AtomicU64> {
        self.received.clone()
    }
}

impl Drop for NatsTap {
    fn drop(&mut self) {
        let _ = self.socket.shutdown(Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
