//! Framed streams: a QUIC bidirectional stream that carries whole messages, each a
//! big-endian `u32` length and then that many bytes, with no HTTP/2 in between. The
//! node's event feeds use them: one stream per subscription, events written as they
//! are published, several to a write when they come together.
//!
//! Every read is bounded by the reader's own limit; a frame longer than it, or a
//! stream that ends inside a frame, is a protocol violation, and the reader may cut
//! the peer off ([`FrameReceiver::cut_off`]) after saying why.

use crate::NodeName;
use crate::wire::close;
use bytes::{Buf, Bytes, BytesMut};

/// Bytes of the length before each frame.
pub const LENGTH_BYTES: usize = 4;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream or its connection broke, or the peer stopped it.
    #[error("stream broke: {0}")]
    Stream(String),
    /// The peer sent a frame larger than allowed, or ended inside one.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// A framed stream to or from one peer.
pub struct FrameStream {
    /// The writing half.
    pub send: FrameSender,
    /// The reading half.
    pub recv: FrameReceiver,
}

impl FrameStream {
    /// Wraps a stream whose tag has been written or read already.
    pub(crate) fn new(
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        conn: quinn::Connection,
        peer: NodeName,
    ) -> FrameStream {
        FrameStream {
            send: FrameSender { send },
            recv: FrameReceiver {
                recv,
                buf: BytesMut::new(),
                conn,
                peer,
            },
        }
    }

    /// The node at the other end, proven by its certificate.
    pub fn peer(&self) -> &NodeName {
        &self.recv.peer
    }
}

/// The writing half of a framed stream.
pub struct FrameSender {
    send: quinn::SendStream,
}

impl FrameSender {
    /// Writes bytes that already hold whole frames (see [`put_frame`]), without a copy.
    pub async fn write(&mut self, frames: Bytes) -> Result<(), FrameError> {
        self.send
            .write_chunk(frames)
            .await
            .map_err(|e| FrameError::Stream(e.to_string()))
    }

    /// Ends the stream after what was written.
    pub fn finish(&mut self) {
        let _ = self.send.finish();
    }

    /// Resolves when the peer no longer reads this stream (it stopped or reset it,
    /// or the connection closed): the writer can give up without waiting for data.
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let stopped = self.send.stopped();
        async move {
            let _ = stopped.await;
        }
    }
}

/// Appends one frame (length, then `body`) to `out`.
pub fn put_frame(out: &mut BytesMut, body: &[u8]) {
    out.reserve(LENGTH_BYTES + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
}

/// Appends one frame to `out`, its body written by `encode` (which must append exactly
/// the body): the length is filled in afterwards, so the body is not copied.
pub fn put_frame_with(out: &mut BytesMut, encode: impl FnOnce(&mut BytesMut)) {
    let at = out.len();
    out.extend_from_slice(&[0; LENGTH_BYTES]);
    encode(out);
    let len = (out.len() - at - LENGTH_BYTES) as u32;
    out[at..at + LENGTH_BYTES].copy_from_slice(&len.to_be_bytes());
}

/// The reading half of a framed stream.
pub struct FrameReceiver {
    recv: quinn::RecvStream,
    /// Bytes received and not yet returned as frames.
    buf: BytesMut,
    conn: quinn::Connection,
    peer: NodeName,
}

impl FrameReceiver {
    /// The node at the other end.
    pub fn peer(&self) -> &NodeName {
        &self.peer
    }

    /// The next frame's body, or `None` when the peer finished the stream between two
    /// frames. A frame longer than `max` bytes is refused without being read.
    pub async fn read(&mut self, max: usize) -> Result<Option<Bytes>, FrameError> {
        loop {
            if let Some(frame) = self.take_frame(max)? {
                return Ok(Some(frame));
            }
            let want = match self.frame_len() {
                Some(len) => LENGTH_BYTES + len - self.buf.len(),
                None => LENGTH_BYTES - self.buf.len(),
            };
            // Read at least what the frame lacks; more if it is there (the next frames).
            match self.recv.read_chunk(want.max(64 * 1024), true).await {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk.bytes),
                Ok(None) if self.buf.is_empty() => return Ok(None),
                Ok(None) => {
                    return Err(FrameError::Protocol(format!(
                        "the stream ended inside a frame ({} bytes of it)",
                        self.buf.len()
                    )));
                }
                Err(e) => return Err(FrameError::Stream(e.to_string())),
            }
        }
    }

    /// The next frame's body if it is wholly received already.
    fn take_frame(&mut self, max: usize) -> Result<Option<Bytes>, FrameError> {
        let Some(len) = self.frame_len() else {
            return Ok(None);
        };
        if len > max {
            return Err(FrameError::Protocol(format!(
                "a frame of {len} bytes (at most {max})"
            )));
        }
        if self.buf.len() < LENGTH_BYTES + len {
            return Ok(None);
        }
        self.buf.advance(LENGTH_BYTES);
        Ok(Some(self.buf.split_to(len).freeze()))
    }

    /// The length of the next frame, once its length bytes are in.
    fn frame_len(&self) -> Option<usize> {
        let head = self.buf.get(..LENGTH_BYTES)?;
        Some(u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize)
    }

    /// Closes the whole connection to this peer: it broke the protocol. The mesh
    /// reconnects later, as after any failure.
    pub fn cut_off(&self, why: &str) {
        tracing::warn!(peer = %self.peer, "cut off: {why}");
        self.conn.close(close::PROTOCOL.into(), b"malformed frame");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_is_its_length_then_its_body() {
        let mut out = BytesMut::new();
        put_frame(&mut out, b"abc");
        put_frame_with(&mut out, |b| b.extend_from_slice(b"hello"));
        assert_eq!(&out[..], b"\0\0\0\x03abc\0\0\0\x05hello");
    }
}
