//! The control socket's connections: gRPC ones go on to tonic; the framed ones, the
//! client library's fast paths, are served here.
//!
//! - **Event feeds** (`ham events`, `Client::subscribe`, `--node b`, `--node all`):
//!   after the 8-byte [`FEED_PREFACE`], one frame with a `SocketFeedRequest`, then
//!   hamd's answer and events as frames, as on the mesh's feeds ([`crate::feed`]),
//!   several to a write when they come together.
//! - **Raise streams** (`Client::raise_stream` on the local node): after
//!   [`RAISE_PREFACE`], one `RaiseRequest` per frame, handled as the gRPC
//!   `RaiseStream` handles them ([`crate::raise_stream`]); answered with
//!   `RaiseAnswer` frames.
//!
//! No HTTP/2 at either end of an event's path: over gRPC an event costs an HTTP/2
//! DATA frame in a connection with flow control and a task of its own on either side.
//! The gRPC calls stay, for every other client.
//!
//! A connection is told apart by its first byte, peeked (HTTP/2's preface begins with
//! `P`, the framed ones with `H`). Bounds: the first byte within
//! [`FIRST_BYTE_TIMEOUT`], the preface and a feed's request within
//! [`feed::REQUEST_TIMEOUT`], frames of at most [`ham_proto::socket::MAX_FRAME`] bytes; a client that
//! breaks them is dropped, and a feed's client that writes after its request is done
//! with.

use crate::feed;
use crate::service::{EventStream, HamService};
use bytes::BytesMut;
use futures_util::StreamExt;
use ham_proto::socket::{FEED_PREFACE, RAISE_PREFACE, UnixStream, frame_codec};
use ham_proto::{self as pb, Message};
use std::io;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::codec::FramedRead;
use tonic::Status;

/// How long a new connection may stay silent before it is dropped.
pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts the control socket's connections: event feeds are served here, the rest
/// (gRPC) come out of the returned stream, for tonic.
pub fn accept(listener: UnixListener, svc: HamService) -> ReceiverStream<io::Result<UnixStream>> {
    let (grpc, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                // tonic stopped serving: so does the listener.
                _ = grpc.closed() => return,
            };
            match accepted.and_then(|(s, _)| UnixStream::from_tokio(s)) {
                Ok(stream) => {
                    tokio::spawn(route(stream, grpc.clone(), svc.clone()));
                }
                Err(e) => {
                    // Out of descriptors, most likely: pause rather than spin.
                    tracing::warn!("control socket: cannot accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Sends a connection to the feed server or to tonic, by its first byte.
async fn route(stream: UnixStream, grpc: mpsc::Sender<io::Result<UnixStream>>, svc: HamService) {
    match tokio::time::timeout(FIRST_BYTE_TIMEOUT, stream.peek_first()).await {
        Ok(Ok(Some(first))) if first == FEED_PREFACE[0] => serve_framed(stream, svc).await,
        Ok(Ok(Some(_))) => {
            let _ = grpc.send(Ok(stream)).await;
        }
        // Closed, broken, or silent: nothing to serve.
        _ => {}
    }
}

/// Serves a framed connection, by its preface.
async fn serve_framed(stream: UnixStream, svc: HamService) {
    let (mut rd, wr) = tokio::io::split(stream);
    let mut preface = [0u8; FEED_PREFACE.len()];
    match tokio::time::timeout(feed::REQUEST_TIMEOUT, rd.read_exact(&mut preface)).await {
        Ok(Ok(_)) if &preface == FEED_PREFACE => serve_feed(rd, wr, svc).await,
        Ok(Ok(_)) if &preface == RAISE_PREFACE => serve_raises(rd, wr, svc).await,
        Ok(Ok(_)) => tracing::debug!("control socket: dropped a connection with a wrong preface"),
        _ => {}
    }
}

/// Serves one event feed: reads the request, answers it, then writes events until
/// the stream ends or the client goes.
async fn serve_feed(mut rd: ReadHalf<UnixStream>, mut wr: WriteHalf<UnixStream>, svc: HamService) {
    let req = match tokio::time::timeout(feed::REQUEST_TIMEOUT, read_request(&mut rd)).await {
        Ok(Ok(req)) => req,
        Ok(Err(why)) => {
            tracing::debug!("control socket: dropped an event feed: {why}");
            return;
        }
        Err(_) => return,
    };
    let mut events = match open(&svc, req).await {
        Ok(events) => events,
        Err(status) => {
            let _ = wr.write_all(&feed::status_frame(&status)).await;
            return;
        }
    };
    if wr
        .write_all(&feed::status_frame(&Status::ok("")))
        .await
        .is_err()
    {
        return;
    }
    let mut buf = BytesMut::new();
    let mut byte = [0u8; 1];
    loop {
        let end = tokio::select! {
            biased;
            // The client sends nothing after its request: whatever comes, it is done.
            _ = rd.read(&mut byte) => return,
            end = feed::next_batch(&mut events, &mut buf) => end,
        };
        if wr.write_all(&buf).await.is_err() || end {
            return;
        }
        buf.clear();
    }
}

/// Reads a feed's request frame.
async fn read_request(rd: &mut ReadHalf<UnixStream>) -> Result<pb::SocketFeedRequest, String> {
    let mut frames = FramedRead::new(rd, frame_codec());
    match frames.next().await {
        Some(Ok(body)) => pb::SocketFeedRequest::decode(body.freeze())
            .map_err(|e| format!("an undecodable request: {e}")),
        Some(Err(e)) => Err(format!("a broken request: {e}")),
        None => Err("closed before its request".into()),
    }
}

/// The event stream a request asks for: this node's, or another's over the mesh.
async fn open(svc: &HamService, req: pb::SocketFeedRequest) -> Result<EventStream, Status> {
    let subscribe = req
        .subscribe
        .ok_or_else(|| Status::invalid_argument("the event feed request has no subscription"))?;
    let target = crate::forward::target_node(Some(req.node.as_bytes()), svc.node_name())?;
    svc.events_of(target, subscribe).await
}

/// Serves one raise stream: its frames are read as the gRPC `RaiseStream`'s messages
/// are, and its answers written as frames; a frame that breaks the bounds or does not
/// decode ends the stream with an error, as a bad gRPC message would.
async fn serve_raises(rd: ReadHalf<UnixStream>, mut wr: WriteHalf<UnixStream>, svc: HamService) {
    let inbound = FramedRead::new(rd, frame_codec()).map(|frame| {
        let frame = frame.map_err(|e| Status::invalid_argument(format!("raise stream: {e}")))?;
        pb::RaiseRequest::decode(frame.freeze())
            .map_err(|e| Status::invalid_argument(format!("an undecodable raise: {e}")))
    });
    let mut answers = svc.serve_raises(inbound);
    let mut buf = BytesMut::new();
    while let Some(answer) = answers.next().await {
        let (item, last) = match answer {
            Ok(progress) => (pb::raise_answer::Item::Progress(progress), false),
            Err(status) => (
                pb::raise_answer::Item::Status(pb::FeedStatus::from(&status)),
                true,
            ),
        };
        put_answer(&mut buf, item);
        if wr.write_all(&buf).await.is_err() {
            return;
        }
        buf.clear();
        if last {
            return;
        }
    }
    // Every raise is handled and the client has ended its side.
    put_answer(
        &mut buf,
        pb::raise_answer::Item::Status(pb::FeedStatus::from(&Status::ok(""))),
    );
    let _ = wr.write_all(&buf).await;
}

fn put_answer(buf: &mut BytesMut, item: pb::raise_answer::Item) {
    ham_proto::socket::put_frame(buf, &pb::RaiseAnswer { item: Some(item) });
}
