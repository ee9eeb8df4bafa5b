//! A stream of raises to one `hamd` ([`crate::Client::raise_stream`]): a detector that
//! reports at a high rate sends each raise without waiting, and `hamd` handles what
//! has arrived in batches, one store commit each.
//!
//! To the local node the raises go framed on a connection of their own (the preface
//! `HAMRAIS1`, one `RaiseRequest` per frame, `RaiseAnswer`s back; see `ham.proto`),
//! written by a task that puts whatever is queued in one write; to another node
//! (`set_target`) they go as the gRPC `RaiseStream`, which the local `hamd` forwards.

use crate::ClientError;
use bytes::BytesMut;
use futures_util::StreamExt;
use ham_proto::socket::{MAX_FRAME, RAISE_PREFACE, UnixStream, frame_codec, put_frame};
use ham_proto::{self as pb, Message, raise_answer::Item};
use std::path::Path;
use std::pin::Pin;
use std::task::Poll;
use tokio::io::{AsyncWriteExt, WriteHalf};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_util::codec::FramedRead;
use tonic::{Code, Status};

/// `hamd`'s answers: cumulative progress, then at most one error.
type Progress = Pin<Box<dyn Stream<Item = Result<pb::RaiseProgress, Status>> + Send>>;

/// Raises in flight before [`RaiseStream::raise`] waits for `hamd` to catch up.
const BUFFER: usize = 1024;

/// An open stream of raises. Dropping it ends the stream; [`RaiseStream::finish`]
/// also waits until every raise sent is handled.
pub struct RaiseStream {
    tx: Option<mpsc::Sender<pb::RaiseRequest>>,
    progress: Progress,
    sent: u64,
    handled: u64,
}

impl RaiseStream {
    /// A stream over the gRPC call whose request stream reads `tx`'s channel.
    pub(crate) fn new(
        tx: mpsc::Sender<pb::RaiseRequest>,
        progress: tonic::Streaming<pb::RaiseProgress>,
    ) -> RaiseStream {
        RaiseStream::with(tx, Box::pin(progress))
    }

    fn with(tx: mpsc::Sender<pb::RaiseRequest>, progress: Progress) -> RaiseStream {
        RaiseStream {
            tx: Some(tx),
            progress,
            sent: 0,
            handled: 0,
        }
    }

    /// A framed stream to the `hamd` of `socket` (see the module docs).
    pub(crate) async fn framed(socket: &Path) -> std::io::Result<RaiseStream> {
        let stream = UnixStream::connect(socket).await?;
        let (rd, mut wr) = tokio::io::split(stream);
        wr.write_all(RAISE_PREFACE).await?;
        let (tx, rx) = RaiseStream::channel();
        tokio::spawn(write_raises(rx, wr));
        let answers = FramedRead::new(rd, frame_codec());
        let progress = futures_util::stream::unfold(Some(answers), |answers| async move {
            let mut answers = answers?;
            let item = match answers.next().await {
                Some(Ok(frame)) => match pb::RaiseAnswer::decode(frame.freeze()) {
                    Ok(pb::RaiseAnswer { item: Some(item) }) => item,
                    _ => {
                        let broken = "hamd broke the raise stream protocol";
                        return Some((Err(Status::internal(broken)), None));
                    }
                },
                Some(Err(e)) => {
                    let broken = format!("the raise stream connection broke: {e}");
                    return Some((Err(Status::unavailable(broken)), None));
                }
                None => {
                    let broken = "the raise stream connection closed";
                    return Some((Err(Status::unavailable(broken)), None));
                }
            };
            match item {
                Item::Progress(p) => Some((Ok(p), Some(answers))),
                Item::Status(s) if s.code == Code::Ok as i32 => None,
                Item::Status(s) => Some((Err(Status::from(s)), None)),
            }
        });
        Ok(RaiseStream::with(tx, Box::pin(progress)))
    }

    /// The channel a stream reads its raises from.
    pub(crate) fn channel() -> (
        mpsc::Sender<pb::RaiseRequest>,
        mpsc::Receiver<pb::RaiseRequest>,
    ) {
        mpsc::channel(BUFFER)
    }

    /// Sends one raise (fires `raise` conditions on entity `name`). Waits only while
    /// [`BUFFER`] raises are queued. An error is `hamd`'s answer to an earlier raise
    /// (the first one it refused) or a broken connection; [`RaiseStream::handled`]
    /// then says how many took effect.
    pub async fn raise(
        &mut self,
        name: &str,
        severity: u32,
        message: &str,
    ) -> Result<(), ClientError> {
        self.take_progress()?;
        let r = crate::raise_request(name, severity, message);
        if r.encoded_len() + 16 > MAX_FRAME {
            return Err(ClientError::Status(Status::invalid_argument(format!(
                "a raise is at most {MAX_FRAME} bytes"
            ))));
        }
        let sent = match &self.tx {
            Some(tx) => tx.send(r).await.is_ok(),
            None => false,
        };
        if !sent {
            // The call ended: its status says why.
            self.tx = None;
            return Err(self.final_error().await);
        }
        self.sent += 1;
        Ok(())
    }

    /// Raises sent so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Raises `hamd` has handled (committed and published), as last reported.
    pub fn handled(&self) -> u64 {
        self.handled
    }

    /// Ends the stream and waits until `hamd` has handled every raise sent; returns
    /// their number.
    pub async fn finish(mut self) -> Result<u64, ClientError> {
        self.tx = None;
        loop {
            match self.progress.next().await.transpose()? {
                Some(p) => self.handled = self.handled.max(p.handled),
                None if self.handled == self.sent => return Ok(self.handled),
                None => {
                    return Err(ClientError::Status(tonic::Status::unavailable(format!(
                        "the stream ended after {} of {} raises",
                        self.handled, self.sent
                    ))));
                }
            }
        }
    }

    /// Takes in the progress answers that have already arrived, without waiting.
    fn take_progress(&mut self) -> Result<(), ClientError> {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        loop {
            match self.progress.as_mut().poll_next(&mut cx) {
                Poll::Ready(Some(Ok(p))) => self.handled = self.handled.max(p.handled),
                Poll::Ready(Some(Err(s))) => return Err(s.into()),
                Poll::Ready(None) | Poll::Pending => return Ok(()),
            }
        }
    }

    /// The status that ended the call.
    async fn final_error(&mut self) -> ClientError {
        loop {
            match self.progress.next().await {
                Some(Ok(p)) => self.handled = self.handled.max(p.handled),
                None => {
                    return ClientError::Status(tonic::Status::unavailable(
                        "hamd ended the raise stream",
                    ));
                }
                Some(Err(s)) => return s.into(),
            }
        }
    }
}

/// Writes the queued raises as frames, whatever is queued in one write; shuts the
/// writing side down once the stream is dropped or finished, which tells `hamd` the
/// stream is over.
async fn write_raises(mut rx: mpsc::Receiver<pb::RaiseRequest>, mut wr: WriteHalf<UnixStream>) {
    let mut buf = BytesMut::new();
    while let Some(first) = rx.recv().await {
        put_frame(&mut buf, &first);
        while buf.len() < MAX_FRAME {
            match rx.try_recv() {
                Ok(r) => put_frame(&mut buf, &r),
                Err(_) => break,
            }
        }
        if wr.write_all(&buf).await.is_err() {
            // hamd went: the progress stream says why.
            return;
        }
        buf.clear();
    }
    let _ = wr.shutdown().await;
}
