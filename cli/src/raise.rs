//! A stream of raises to one `hamd` ([`crate::Client::raise_stream`]): a detector that
//! reports at a high rate sends each raise without waiting, and `hamd` handles what
//! has arrived in batches, one store commit each.

use crate::ClientError;
use ham_proto as pb;
use std::pin::Pin;
use std::task::Poll;
use tokio::sync::mpsc;
use tokio_stream::Stream;

/// Raises in flight before [`RaiseStream::raise`] waits for `hamd` to catch up.
const BUFFER: usize = 1024;

/// An open stream of raises. Dropping it ends the stream; [`RaiseStream::finish`]
/// also waits until every raise sent is handled.
pub struct RaiseStream {
    tx: Option<mpsc::Sender<pb::RaiseRequest>>,
    progress: tonic::Streaming<pb::RaiseProgress>,
    sent: u64,
    handled: u64,
}

impl RaiseStream {
    pub(crate) fn new(
        tx: mpsc::Sender<pb::RaiseRequest>,
        progress: tonic::Streaming<pb::RaiseProgress>,
    ) -> RaiseStream {
        RaiseStream {
            tx: Some(tx),
            progress,
            sent: 0,
            handled: 0,
        }
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
            match self.progress.message().await? {
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
            match Pin::new(&mut self.progress).poll_next(&mut cx) {
                Poll::Ready(Some(Ok(p))) => self.handled = self.handled.max(p.handled),
                Poll::Ready(Some(Err(s))) => return Err(s.into()),
                Poll::Ready(None) | Poll::Pending => return Ok(()),
            }
        }
    }

    /// The status that ended the call.
    async fn final_error(&mut self) -> ClientError {
        loop {
            match self.progress.message().await {
                Ok(Some(p)) => self.handled = self.handled.max(p.handled),
                Ok(None) => {
                    return ClientError::Status(tonic::Status::unavailable(
                        "hamd ended the raise stream",
                    ));
                }
                Err(s) => return s.into(),
            }
        }
    }
}
