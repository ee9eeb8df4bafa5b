//! gRPC over the mesh: one HTTP/2 connection per QUIC bidirectional stream, so the
//! same tonic service that answers on the Unix socket answers other nodes, and a
//! tonic client reaches another node's `hamd` with nothing but a connector.

use crate::NodeName;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A QUIC bidirectional stream as one byte stream (what HTTP/2 runs on).
pub struct MeshStream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    peer: NodeName,
}

impl MeshStream {
    /// Wraps an accepted or opened stream; `peer` is the proven name of the other end.
    pub fn new(send: quinn::SendStream, recv: quinn::RecvStream, peer: NodeName) -> MeshStream {
        MeshStream { send, recv, peer }
    }

    /// The node at the other end.
    pub fn peer(&self) -> &NodeName {
        &self.peer
    }
}

impl AsyncRead for MeshStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for MeshStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.send), cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.send), cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        AsyncWrite::poll_shutdown(Pin::new(&mut self.send), cx)
    }
}

/// What a mesh-served gRPC handler learns about its caller.
#[derive(Clone, Debug)]
pub struct MeshPeer {
    /// The calling node, proven by its certificate.
    pub node: NodeName,
}

impl tonic::transport::server::Connected for MeshStream {
    type ConnectInfo = MeshPeer;

    fn connect_info(&self) -> MeshPeer {
        MeshPeer {
            node: self.peer.clone(),
        }
    }
}
