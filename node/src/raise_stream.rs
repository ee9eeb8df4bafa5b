//! `RaiseStream`: many raises over one stream. What has arrived when the node loop is
//! free is handed to it as one batch (one engine step, one store commit), and the
//! stream is answered with the cumulative count handled (counts merged over at most
//! [`PROGRESS_EVERY`]), so that a detector reporting at a high rate pays neither a
//! round trip nor a commit per event.

use crate::convert;
use crate::node::Msg;
use ham_core::Request;
use ham_proto as pb;
use std::pin::Pin;
use std::task::Poll;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

/// The most raises handed to the node loop at once.
pub const MAX_BATCH: usize = 256;

/// How long a count of handled raises may wait before it is sent. Counts are merged
/// over this time: an answer per batch cost the HAM a write to the caller right after
/// each event went out, on the CPU the event's next hop needed (see BENCHMARKS.md).
pub const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(2);

/// The answers of one stream: progress counts, then at most one error.
pub type ProgressStream = ReceiverStream<Result<pb::RaiseProgress, Status>>;

/// Raises as they are read: a gRPC request stream, or frames off the control socket.
pub trait Inbound:
    Stream<Item = Result<pb::RaiseRequest, Status>> + Unpin + Send + 'static
{
}
impl<T: Stream<Item = Result<pb::RaiseRequest, Status>> + Unpin + Send + 'static> Inbound for T {}

/// Serves one stream: reads raises, hands them to the node loop in batches, answers
/// with progress. Ends at the end of the request stream, or at the first error.
pub fn serve(node: mpsc::Sender<Msg>, mut inbound: impl Inbound) -> ProgressStream {
    // Progress is cumulative, so a slow reader only misses intermediate counts: the
    // loop never waits for the client to read them (which could deadlock a client
    // that writes before it reads). Only the final error is waited for.
    let (out, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        let mut handled = 0u64;
        // A count not yet sent, and when it is due.
        let mut unsent: Option<tokio::time::Instant> = None;
        loop {
            let next = match unsent {
                Some(due) => tokio::select! {
                    biased;
                    b = next_batch(&mut inbound) => b,
                    () = tokio::time::sleep_until(due) => {
                        unsent = None;
                        let _ = out.try_send(Ok(pb::RaiseProgress { handled }));
                        continue;
                    }
                },
                None => next_batch(&mut inbound).await,
            };
            let (batch, ending) = next;
            if !batch.is_empty() {
                let index = handled;
                let (reply, answer) = oneshot::channel();
                if node.send(Msg::Batch { reqs: batch, reply }).await.is_err() {
                    let _ = out.send(Err(shutting_down())).await;
                    return;
                }
                let Ok((done, err)) = answer.await else {
                    let _ = out.send(Err(shutting_down())).await;
                    return;
                };
                handled += done as u64;
                if let Some(e) = err {
                    let s = convert::status_of(e);
                    let message = format!(
                        "raise {} of this stream: {}",
                        index + done as u64 + 1,
                        s.message()
                    );
                    let _ = out.try_send(Ok(pb::RaiseProgress { handled }));
                    let _ = out.send(Err(Status::new(s.code(), message))).await;
                    return;
                }
                unsent.get_or_insert_with(|| tokio::time::Instant::now() + PROGRESS_EVERY);
            }
            match ending {
                Ending::More => {}
                Ending::Ended => {
                    let _ = out.send(Ok(pb::RaiseProgress { handled })).await;
                    return;
                }
                Ending::Broken(status) => {
                    let _ = out.try_send(Ok(pb::RaiseProgress { handled }));
                    let message =
                        format!("raise {} of this stream: {}", handled + 1, status.message());
                    let _ = out.send(Err(Status::new(status.code(), message))).await;
                    return;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

fn shutting_down() -> Status {
    Status::unavailable("hamd is shutting down")
}

/// How a batch ends the reading of a stream.
enum Ending {
    /// More may come.
    More,
    /// The request stream ended.
    Ended,
    /// The next message could not be read (undecodable, too large, a broken
    /// connection): the raises before it are handled, nothing after it is.
    Broken(Status),
}

/// Waits for one raise, then takes every one that has already arrived (up to
/// [`MAX_BATCH`]), stopping before a message that cannot be read.
async fn next_batch(inbound: &mut impl Inbound) -> (Vec<Request>, Ending) {
    let mut batch = Vec::new();
    match inbound.next().await {
        Some(Ok(first)) => batch.push(raise(first)),
        Some(Err(status)) => return (batch, Ending::Broken(status)),
        None => return (batch, Ending::Ended),
    }
    while batch.len() < MAX_BATCH {
        // One poll: a message already received is ready now; otherwise stop here.
        let ready =
            std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *inbound).poll_next(cx))).await;
        match ready {
            Poll::Ready(Some(Ok(m))) => batch.push(raise(m)),
            Poll::Ready(Some(Err(status))) => return (batch, Ending::Broken(status)),
            Poll::Ready(None) => return (batch, Ending::Ended),
            Poll::Pending => break,
        }
    }
    (batch, Ending::More)
}

fn raise(r: pb::RaiseRequest) -> Request {
    Request::Raise {
        name: r.name,
        severity: r.severity,
        message: r.message,
    }
}
