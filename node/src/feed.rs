//! Event feeds: how a node follows another node's events over the mesh (`ham --node b
//! events`, `--node all`, remote entities). The follower opens a framed stream to the
//! node it follows and sends its `SubscribeRequest`; that node answers with a status
//! (accepted, or the error its own `Subscribe` would give), then with its events, one
//! frame each, as they are published — several to a write when they come together.
//!
//! No HTTP/2 on the way: an event costs one QUIC stream frame, not a gRPC message in an
//! HTTP/2 DATA frame relayed through a second HTTP/2 connection. Bounds: a request is at
//! most [`MAX_REQUEST`] bytes and must come within [`REQUEST_TIMEOUT`]; a frame is at
//! most [`MAX_FRAME`] bytes; a peer that breaks them, or sends what does not decode, is
//! cut off. A follower that stops reading holds back only its own feed (QUIC flow
//! control), and then gets a `gap` event for what it missed, as on the socket.

use crate::service::{EventStream, HamService};
use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, StreamExt};
use ham_overlay::frames::{put_frame, put_frame_with};
use ham_overlay::{FrameError, FrameReceiver, FrameStream, Mesh, NodeName};
use ham_proto::{self as pb, Message};
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::{Code, Status};

/// Largest subscription request a node reads.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Largest frame (one event or status) a follower reads; events are far smaller
/// (their details are cut to 320 bytes).
pub const MAX_FRAME: usize = 64 * 1024;
/// How long a follower may take to send its request (also on the control socket).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a follower waits for the answer to its request.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Events written together are at most about this many bytes.
const BATCH_BYTES: usize = 32 * 1024;

/// Serves the feeds other nodes open with this node's events, each on its own task.
pub fn serve(mut feeds: mpsc::Receiver<FrameStream>, svc: HamService) {
    tokio::spawn(async move {
        while let Some(feed) = feeds.recv().await {
            tokio::spawn(serve_one(feed, svc.clone()));
        }
    });
}

/// One feed: read the request, answer it, then write events until the follower goes.
async fn serve_one(feed: FrameStream, svc: HamService) {
    let FrameStream { mut send, mut recv } = feed;
    let req = match tokio::time::timeout(REQUEST_TIMEOUT, recv.read(MAX_REQUEST)).await {
        Ok(Ok(Some(body))) => match pb::SubscribeRequest::decode(body) {
            Ok(r) => r,
            Err(e) => return recv.cut_off(&format!("undecodable event feed request: {e}")),
        },
        Ok(Err(FrameError::Protocol(e))) => return recv.cut_off(&format!("event feed: {e}")),
        // Broken, ended before asking, or too slow: nothing to answer.
        _ => return,
    };
    drop(recv);
    let mut events = match svc.events(req).await {
        Ok(events) => events,
        Err(status) => {
            let _ = send.write(status_frame(&status)).await;
            send.finish();
            return;
        }
    };
    if send.write(status_frame(&Status::ok(""))).await.is_err() {
        return;
    }
    let stopped = send.stopped();
    tokio::pin!(stopped);
    let mut buf = BytesMut::new();
    loop {
        let end = tokio::select! {
            biased;
            _ = &mut stopped => return,
            end = next_batch(&mut events, &mut buf) => end,
        };
        if send.write(buf.split().freeze()).await.is_err() {
            return;
        }
        if end {
            send.finish();
            return;
        }
    }
}

/// Waits for the next event and appends it to `buf` as a frame, with whatever else the
/// stream has ready (up to about [`BATCH_BYTES`]): one write for events that come
/// together. Returns true once the stream is over; its last frame, then, is a status
/// (code 0 when it simply ended), so that a follower can tell an end from a break.
pub(crate) async fn next_batch(events: &mut EventStream, buf: &mut BytesMut) -> bool {
    let mut end = !put_item(buf, events.next().await);
    while !end && buf.len() < BATCH_BYTES {
        match events.next().now_or_never() {
            Some(item) => end = !put_item(buf, item),
            None => break,
        }
    }
    end
}

/// Appends an item of the event stream as a frame; false once the stream is over.
fn put_item(buf: &mut BytesMut, item: Option<Result<pb::Event, Status>>) -> bool {
    let frame = match item {
        None => pb::feed_frame::Item::Status(pb::FeedStatus::from(&Status::ok(""))),
        Some(Ok(event)) => pb::feed_frame::Item::Event(event),
        Some(Err(status)) => pb::feed_frame::Item::Status(pb::FeedStatus::from(&status)),
    };
    let more = matches!(frame, pb::feed_frame::Item::Event(_));
    let frame = pb::FeedFrame { item: Some(frame) };
    // A `BytesMut` grows as needed: encoding into it cannot fail.
    put_frame_with(buf, |b| {
        let _ = frame.encode(b);
    });
    more
}

/// A status alone, as one frame: a feed's answer to its request.
pub(crate) fn status_frame(status: &Status) -> Bytes {
    let frame = pb::FeedFrame {
        item: Some(pb::feed_frame::Item::Status(pb::FeedStatus::from(status))),
    };
    let mut buf = BytesMut::new();
    put_frame(&mut buf, &frame.encode_to_vec());
    buf.freeze()
}

/// Follows `node`'s events as `req` asks (its `nodes` as `node` reads it): the stream
/// `node`'s own `Subscribe` would give, or its error.
pub async fn follow(
    mesh: &Mesh,
    node: &NodeName,
    req: pb::SubscribeRequest,
) -> Result<EventStream, Status> {
    let unavailable =
        |e: &dyn std::fmt::Display| Status::unavailable(format!("node {node} did not answer: {e}"));
    let FrameStream { mut send, mut recv } =
        mesh.open_feed(node).await.map_err(|e| unavailable(&e))?;
    let mut buf = BytesMut::new();
    put_frame(&mut buf, &req.encode_to_vec());
    send.write(buf.freeze())
        .await
        .map_err(|e| unavailable(&e))?;
    send.finish();
    let answer = tokio::time::timeout(ANSWER_TIMEOUT, read_item(&mut recv))
        .await
        .map_err(|_| {
            Status::deadline_exceeded(format!(
                "node {node} did not answer within {ANSWER_TIMEOUT:?}"
            ))
        })?;
    match answer? {
        Some(pb::feed_frame::Item::Status(s)) if s.code == Code::Ok as i32 => {}
        Some(pb::feed_frame::Item::Status(s)) => return Err(Status::from(s)),
        Some(pb::feed_frame::Item::Event(_)) => {
            recv.cut_off("an event feed began with an event, not a status");
            return Err(Status::unavailable(format!(
                "node {node} broke the event feed protocol"
            )));
        }
        None => return Err(unavailable(&"the feed ended before its answer")),
    }
    let events = futures_util::stream::unfold(Some(recv), |recv| async move {
        let mut recv = recv?;
        match read_item(&mut recv).await {
            Ok(Some(pb::feed_frame::Item::Event(e))) => Some((Ok(e), Some(recv))),
            Ok(Some(pb::feed_frame::Item::Status(s))) if s.code == Code::Ok as i32 => None,
            Ok(Some(pb::feed_frame::Item::Status(s))) => Some((Err(Status::from(s)), None)),
            Ok(None) => None,
            Err(status) => Some((Err(status), None)),
        }
    });
    Ok(Box::pin(events))
}

/// The next frame of a feed, decoded; `None` at its end. A frame that breaks the
/// protocol cuts the peer off.
async fn read_item(recv: &mut FrameReceiver) -> Result<Option<pb::feed_frame::Item>, Status> {
    let broken = |recv: &FrameReceiver, why: String| {
        recv.cut_off(&why);
        Status::unavailable(format!(
            "node {} broke the event feed protocol: {why}",
            recv.peer()
        ))
    };
    match recv.read(MAX_FRAME).await {
        Ok(Some(body)) => match pb::FeedFrame::decode(body) {
            Ok(pb::FeedFrame { item: Some(item) }) => Ok(Some(item)),
            Ok(pb::FeedFrame { item: None }) => Err(broken(recv, "an empty frame".into())),
            Err(e) => Err(broken(recv, format!("an undecodable frame: {e}"))),
        },
        Ok(None) => Ok(None),
        Err(FrameError::Protocol(why)) => Err(broken(recv, why)),
        Err(FrameError::Stream(e)) => Err(Status::unavailable(format!(
            "the event feed from node {} broke: {e}",
            recv.peer()
        ))),
    }
}
