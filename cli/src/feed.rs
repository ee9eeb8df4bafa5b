//! Following events on the control socket's event feed: the preface
//! ([`FEED_PREFACE`]), one frame with a `SocketFeedRequest`, then `FeedFrame`s from
//! hamd, each a big-endian `u32` length and the bytes: hamd's answer (a status), then
//! one event per frame. No HTTP/2 on the way (see `SocketFeedRequest` in `ham.proto`).
//! A feed that ends on its own ends with a status of code 0; a connection that just
//! closes is a break, which a following subscription resumes after.

use bytes::BytesMut;
use futures_util::StreamExt;
use ham_proto::socket::{FEED_PREFACE, UnixStream, frame_codec, put_frame};
use ham_proto::{self as pb, Message, feed_frame::Item};
use std::path::Path;
use std::pin::Pin;
use tokio::io::{AsyncWriteExt, ReadHalf};
use tokio_stream::Stream;
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};
use tonic::{Code, Status};

/// The events of one feed, as hamd sends them; an error ends it.
pub type EventFeed = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

/// Why a feed could not be opened.
pub(crate) enum OpenError {
    /// Nothing listens on the socket (no such file, or connection refused).
    NobodyListens(String),
    /// hamd refused the request, or the connection broke.
    Status(Status),
}

type Frames = FramedRead<ReadHalf<UnixStream>, LengthDelimitedCodec>;

/// Opens a feed of `node`'s events (`""`: the node of `socket`) as `req` asks.
pub(crate) async fn open(
    socket: &Path,
    node: &str,
    req: pb::SubscribeRequest,
) -> Result<EventFeed, OpenError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                OpenError::NobodyListens(e.to_string())
            }
            _ => OpenError::Status(broken(&e)),
        })?;
    let (rd, mut wr) = tokio::io::split(stream);
    let mut out = BytesMut::from(&FEED_PREFACE[..]);
    let request = pb::SocketFeedRequest {
        node: node.to_string(),
        subscribe: Some(req),
    };
    put_frame(&mut out, &request);
    wr.write_all(&out)
        .await
        .map_err(|e| OpenError::Status(broken(&e)))?;
    let mut frames = FramedRead::new(rd, frame_codec());
    match next_item(&mut frames).await.map_err(OpenError::Status)? {
        Some(Item::Status(s)) if s.code == Code::Ok as i32 => {}
        Some(Item::Status(s)) => return Err(OpenError::Status(Status::from(s))),
        Some(Item::Event(_)) => {
            return Err(OpenError::Status(Status::internal(
                "hamd broke the event feed protocol: an event came before its answer",
            )));
        }
        None => {
            return Err(OpenError::Status(Status::unavailable(
                "the event feed closed before hamd answered",
            )));
        }
    }
    // The write half goes along: dropping it would not close the socket, but the
    // feed is one connection and lives as one.
    let events = futures_util::stream::unfold(Some((frames, wr)), |state| async move {
        let (mut frames, wr) = state?;
        match next_item(&mut frames).await {
            Ok(Some(Item::Event(e))) => Some((Ok(e), Some((frames, wr)))),
            Ok(Some(Item::Status(s))) if s.code == Code::Ok as i32 => None,
            Ok(Some(Item::Status(s))) => Some((Err(Status::from(s)), None)),
            Ok(None) => Some((
                Err(Status::unavailable("the event feed from hamd broke")),
                None,
            )),
            Err(status) => Some((Err(status), None)),
        }
    });
    Ok(Box::pin(events))
}

/// The next frame, decoded; `None` when the connection closed between frames.
async fn next_item(frames: &mut Frames) -> Result<Option<Item>, Status> {
    match frames.next().await {
        Some(Ok(body)) => match pb::FeedFrame::decode(body.freeze()) {
            Ok(pb::FeedFrame { item: Some(item) }) => Ok(Some(item)),
            Ok(pb::FeedFrame { item: None }) => Err(Status::internal(
                "hamd broke the event feed protocol: an empty frame",
            )),
            Err(e) => Err(Status::internal(format!(
                "hamd broke the event feed protocol: an undecodable frame: {e}"
            ))),
        },
        Some(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => Err(Status::internal(
            format!("hamd broke the event feed protocol: {e}"),
        )),
        Some(Err(e)) => Err(broken(&e)),
        None => Ok(None),
    }
}

fn broken(e: &std::io::Error) -> Status {
    Status::unavailable(format!("the event feed connection broke: {e}"))
}
