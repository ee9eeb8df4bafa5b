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
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

/// The most raises handed to the node loop at once.
pub const MAX_BATCH: usize = 256;

/// How long a count of handled raises may wait before it is sent. Counts are merged
/// over this time: an answer per batch cost the HAM a write to the caller right after
/// each event went out, on the CPU the event's next hop needed (see BENCHMARKS.md).
pub const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(2);

/// The answers of one stream: progress counts, then at most one error.
pub type ProgressStream = ReceiverStream<Result<pb::RaiseProgress, Status>>;

/// Serves one stream: reads raises, hands them to the node loop in batches, answers
/// with progress. Ends at the end of the request stream, or at the first error.
pub fn serve(node: mpsc::Sender<Msg>, mut inbound: Streaming<pb::RaiseRequest>) -> ProgressStream {
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
            let (batch, ended) = match next {
                Ok(b) => b,
                Err(status) => {
                    let _ = out.send(Err(status)).await;
                    return;
                }
            };
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
            if ended {
                let _ = out.send(Ok(pb::RaiseProgress { handled })).await;
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

fn shutting_down() -> Status {
    Status::unavailable("hamd is shutting down")
}

/// Waits for one raise, then takes every one that has already arrived (up to
/// [`MAX_BATCH`]); `true` when the request stream ended.
async fn next_batch(
    inbound: &mut Streaming<pb::RaiseRequest>,
) -> Result<(Vec<Request>, bool), Status> {
    let mut batch = Vec::new();
    let Some(first) = inbound.message().await? else {
        return Ok((batch, true));
    };
    batch.push(raise(first));
    while batch.len() < MAX_BATCH {
        // One poll: a message already received is ready now; otherwise stop here.
        let ready =
            std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *inbound).poll_next(cx))).await;
        match ready {
            Poll::Ready(Some(m)) => batch.push(raise(m?)),
            Poll::Ready(None) => return Ok((batch, true)),
            Poll::Pending => break,
        }
    }
    Ok((batch, false))
}

fn raise(r: pb::RaiseRequest) -> Request {
    Request::Raise {
        name: r.name,
        severity: r.severity,
        message: r.message,
    }
}
