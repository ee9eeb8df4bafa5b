//! The control socket's byte stream, woken only by what it waits for.
//!
//! Tokio registers a socket for both readable and writable edges. A Unix stream
//! socket reports "writable" every time its peer reads (the kernel's
//! `unix_write_space`), so with that registration a `hamd` whose subscriber reads an
//! event, or a client whose `hamd` reads its request, is woken for nothing, on the very
//! path of the message: measured on the cross-node event path, a's HAM was woken twice
//! per event instead of once. This stream is registered for readable edges only;
//! writes go straight to the socket, and only a write that would block registers for
//! writable edges (on a duplicate of the descriptor) until it has gone through.

use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// What a client writes first on the control socket to open an event feed (see
/// `SocketFeedRequest` in `ham.proto`); a gRPC client's first bytes are HTTP/2's
/// preface, which begins with `P`, and the framed prefaces begin with `H`.
pub const FEED_PREFACE: &[u8; 8] = b"HAMFEED1";

/// What a client writes first on the control socket to open a framed raise stream
/// (see `RaiseAnswer` in `ham.proto`).
pub const RAISE_PREFACE: &[u8; 8] = b"HAMRAIS1";

/// Largest frame on the control socket's framed connections, either way (events are
/// far smaller: their details are cut to 320 bytes).
pub const MAX_FRAME: usize = 64 * 1024;

/// The codec of the framed connections, both ends: a big-endian `u32` length, then
/// that many bytes, at most [`MAX_FRAME`] (a longer frame is an error).
pub fn frame_codec() -> tokio_util::codec::LengthDelimitedCodec {
    tokio_util::codec::LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

/// Appends `msg` to `buf` as one frame of [`frame_codec`].
pub fn put_frame(buf: &mut bytes::BytesMut, msg: &impl prost::Message) {
    use bytes::BufMut;
    let len = msg.encoded_len();
    buf.reserve(4 + len);
    buf.put_u32(len as u32);
    // The room was reserved: encoding cannot fail.
    let _ = msg.encode(buf);
}

/// A connected Unix stream socket (see the module docs).
pub struct UnixStream {
    io: AsyncFd<std::os::unix::net::UnixStream>,
    /// Registered for writable edges while a write waits for room.
    room: Option<AsyncFd<OwnedFd>>,
    info: tonic::transport::server::UdsConnectInfo,
}

impl UnixStream {
    /// Connects to the socket at `path`.
    pub async fn connect(path: impl AsRef<std::path::Path>) -> io::Result<UnixStream> {
        UnixStream::from_tokio(tokio::net::UnixStream::connect(path).await?)
    }

    /// Takes over a stream registered by tokio (an accepted or connected one): it is
    /// registered again, for readable edges only.
    pub fn from_tokio(stream: tokio::net::UnixStream) -> io::Result<UnixStream> {
        let info = tonic::transport::server::Connected::connect_info(&stream);
        let std = stream.into_std()?;
        std.set_nonblocking(true)?;
        Ok(UnixStream {
            io: register(std, Interest::READABLE)?,
            room: None,
            info,
        })
    }

    /// Waits for the peer's first byte and returns it, leaving it to be read
    /// (`MSG_PEEK`); `None` if the peer closed without sending anything.
    pub async fn peek_first(&self) -> io::Result<Option<u8>> {
        loop {
            let mut guard = self.io.readable().await?;
            let mut byte = [0u8; 1];
            match guard.try_io(|io| {
                rustix::net::recv(io.get_ref(), &mut byte, rustix::net::RecvFlags::PEEK)
                    .map_err(io::Error::from)
            }) {
                Ok(Ok((0, _))) => return Ok(None),
                Ok(Ok(_)) => return Ok(Some(byte[0])),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes with `write` until it does not block; waits for room when it does.
    fn poll_write_with(
        &mut self,
        cx: &mut Context<'_>,
        mut write: impl FnMut(&std::os::unix::net::UnixStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            match write(self.io.get_ref()) {
                Ok(n) => {
                    self.room = None;
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            let room = match &mut self.room {
                Some(room) => room,
                None => {
                    let dup = self.io.get_ref().as_fd().try_clone_to_owned()?;
                    self.room.insert(register(dup, Interest::WRITABLE)?)
                }
            };
            let mut guard = ready!(room.poll_write_ready(cx))?;
            guard.clear_ready();
        }
    }
}

/// Registers a descriptor the value owns with the runtime, for `interest` only.
///
/// `AsyncFd::with_interest` is deprecated because a caller could hand it a descriptor
/// it does not own, and close it while registered. Here the value owns it (a std
/// `UnixStream` or an `OwnedFd`, both moved into the `AsyncFd`, never closed or
/// replaced while there): the condition of the `unsafe` replacement holds, and this
/// crate needs no `unsafe` block for it.
#[allow(deprecated)]
fn register<T: std::os::fd::AsRawFd>(owned: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    AsyncFd::with_interest(owned, interest)
}

impl AsyncRead for UnixStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.io.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let room = unfilled.len();
            match guard.try_io(|io| io.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    // Less than asked for: the socket is drained (as tokio assumes), so
                    // the next read waits for an edge instead of failing once.
                    if n > 0 && n < room {
                        guard.clear_ready();
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for UnixStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_with(cx, |mut io| io.write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_with(cx, |mut io| io.write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.io.get_ref().shutdown(std::net::Shutdown::Write))
    }
}

impl tonic::transport::server::Connected for UnixStream {
    type ConnectInfo = tonic::transport::server::UdsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_go_both_ways_and_a_full_socket_waits_for_room() {
        let (a, b) = tokio::net::UnixStream::pair().expect("pair");
        let (mut a, mut b) = (
            UnixStream::from_tokio(a).expect("a"),
            UnixStream::from_tokio(b).expect("b"),
        );
        // Far more than a socket buffer holds: the writer must wait for the reader.
        let sent: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8).collect();
        let writer = {
            let sent = sent.clone();
            tokio::spawn(async move {
                a.write_all(&sent).await.expect("written");
                a.shutdown().await.expect("shut down");
                a
            })
        };
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.expect("read");
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "the bytes arrive as sent");
        let mut a = writer.await.expect("writer");
        b.write_all(b"back").await.expect("written back");
        let mut four = [0u8; 4];
        a.read_exact(&mut four).await.expect("read back");
        assert_eq!(&four, b"back");
    }
}
