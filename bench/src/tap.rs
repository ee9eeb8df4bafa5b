//! A subscriber to a `hamd`'s events, on a thread of its own, that stamps every event
//! with the shared monotonic clock the moment it arrives. It subscribes through one
//! node's control socket, to that node's events or (through the mesh, with the
//! `ham-node` metadata, as `ham --node b events --follow` does) to another node's.

use crate::sys::mono_ns;
use anyhow::Context;
use ham::ham_proto::{Event, SubscribeRequest};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio_stream::StreamExt;

/// An event and when it arrived (CLOCK_MONOTONIC ns).
#[derive(Clone, Debug)]
pub struct Arrival {
    /// When the subscriber got it.
    pub at_ns: u64,
    /// The event.
    pub event: Event,
}

/// A running subscription; dropping it ends the subscription and its thread.
pub struct Tap {
    rx: mpsc::Receiver<Arrival>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    accounted: Arc<AtomicU64>,
}

/// How many events a `gap` event says were lost ("events FROM..TO are …").
pub fn gap_size(e: &Event) -> u64 {
    e.detail
        .split_whitespace()
        .nth(1)
        .and_then(|r| r.split_once(".."))
        .and_then(|(a, b)| Some(b.parse::<u64>().ok()?.saturating_sub(a.parse().ok()?) + 1))
        .unwrap_or(0)
}

impl Tap {
    /// Subscribes through the `hamd` on `socket` (to node `target` through the mesh
    /// when given) with `req`, and returns once the publishing node has registered
    /// the subscription (its reply has begun).
    pub fn open(socket: &Path, target: Option<&str>, req: SubscribeRequest) -> anyhow::Result<Tap> {
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let accounted = Arc::new(AtomicU64::new(0));
        let count = accounted.clone();
        let socket: PathBuf = socket.to_path_buf();
        let target = target.map(str::to_string);
        let thread = std::thread::Builder::new()
            .name("ham-tap".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                rt.block_on(follow(socket, target, req, tx, ready_tx, stop_rx, count));
            })
            .context("cannot start the subscriber thread")?;
        let mut tap = Tap {
            rx,
            stop: Some(stop_tx),
            thread: Some(thread),
            accounted,
        };
        match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(())) => Ok(tap),
            Ok(Err(e)) => {
                tap.close();
                anyhow::bail!("cannot subscribe: {e}")
            }
            Err(_) => {
                tap.close();
                anyhow::bail!("the subscription did not start within 30 s")
            }
        }
    }

    /// The next event, waiting at most `timeout`; `None` on timeout or once the
    /// subscription has ended.
    pub fn recv(&self, timeout: Duration) -> Option<Arrival> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// Every event that has arrived and not been taken yet.
    pub fn drain(&self) -> Vec<Arrival> {
        self.rx.try_iter().collect()
    }

    /// A counter of the events that arrived, plus those that `gap` events said were
    /// lost: what publishers may take as delivered, for flow control.
    pub fn accounted(&self) -> Arc<AtomicU64> {
        self.accounted.clone()
    }

    fn close(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.close();
    }
}

async fn follow(
    socket: PathBuf,
    target: Option<String>,
    req: SubscribeRequest,
    tx: mpsc::Sender<Arrival>,
    ready: mpsc::Sender<Result<(), String>>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
    count: Arc<AtomicU64>,
) {
    let opened = async {
        let mut c = ham::Client::connect(&socket).await?;
        c.set_target(target.as_deref())?;
        c.feed(req).await
    };
    let mut stream = match opened.await {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    loop {
        tokio::select! {
            _ = &mut stop => return,
            m = stream.next() => {
                let Some(Ok(event)) = m else { return };
                let at_ns = mono_ns();
                let n = if event.kind == "gap" { gap_size(&event) } else { 1 };
                count.fetch_add(n, Ordering::Relaxed);
                if tx.send(Arrival { at_ns, event }).is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gap_events_say_how_many_were_lost() {
        let e = Event {
            kind: "gap".into(),
            detail: "events 10..19 are no longer available".into(),
            ..Default::default()
        };
        assert_eq!(gap_size(&e), 10);
        assert_eq!(gap_size(&Event::default()), 0);
    }
}
