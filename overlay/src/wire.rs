//! What travels on a mesh connection besides gRPC and framed streams: the hello that
//! names each end, and the one-byte tag that says what a bidirectional stream carries.
//!
//! Every read is bounded: a hello is at most [`MAX_HELLO`] bytes, and anything that
//! does not decode is a protocol violation that closes the connection.

use serde::{Deserialize, Serialize};

/// Protocol version in the hello; a peer with another one is refused.
pub const VERSION: u32 = 1;
/// Largest hello accepted.
pub const MAX_HELLO: usize = 1024;
/// First byte of the stream that carries the hello exchange.
pub const TAG_HELLO: u8 = b'H';
/// First byte of a stream that carries one HTTP/2 (gRPC) connection.
pub const TAG_GRPC: u8 = b'G';
/// First byte of a framed stream that carries one event feed (see `frames`).
pub const TAG_FEED: u8 = b'E';

/// QUIC application close codes, so a log line on either side says why.
pub mod close {
    /// The node is shutting down.
    pub const SHUTDOWN: u32 = 0;
    /// The peer sent something malformed, oversized or out of order.
    pub const PROTOCOL: u32 = 1;
    /// The peer's certificate is not for the name it claims, or it claims ours.
    pub const IDENTITY: u32 = 2;
    /// The peer exceeded its rate limit.
    pub const RATE: u32 = 3;
}

/// The first message on a connection, both ways.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`VERSION`].
    pub version: u32,
    /// The sender's node name (checked against its certificate).
    pub name: String,
    /// Where the sender can be reached (`host:port`), as it advertises itself.
    pub advertise: String,
    /// The sender's incarnation: it grows every time the node starts.
    pub incarnation: u64,
}

/// Why a hello was refused.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The stream broke or ended early.
    #[error("stream: {0}")]
    Stream(String),
    /// The bytes were not what the protocol allows.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

impl Hello {
    /// Encodes as a length-prefixed postcard message, after the tag.
    pub fn encode(&self) -> Vec<u8> {
        let body = postcard::to_allocvec(self).unwrap_or_default();
        let mut out = Vec::with_capacity(body.len() + 3);
        out.push(TAG_HELLO);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Reads one hello (tag, length, body) from a stream, refusing anything else.
    pub async fn read(recv: &mut quinn::RecvStream) -> Result<Hello, WireError> {
        let mut head = [0u8; 3];
        recv.read_exact(&mut head)
            .await
            .map_err(|e| WireError::Stream(e.to_string()))?;
        if head[0] != TAG_HELLO {
            return Err(WireError::Protocol(format!(
                "expected a hello, got tag {:#04x}",
                head[0]
            )));
        }
        let len = u16::from_be_bytes([head[1], head[2]]) as usize;
        if len > MAX_HELLO {
            return Err(WireError::Protocol(format!(
                "hello of {len} bytes (at most {MAX_HELLO})"
            )));
        }
        let mut body = vec![0u8; len];
        recv.read_exact(&mut body)
            .await
            .map_err(|e| WireError::Stream(e.to_string()))?;
        let hello: Hello = postcard::from_bytes(&body)
            .map_err(|e| WireError::Protocol(format!("undecodable hello: {e}")))?;
        if hello.version != VERSION {
            return Err(WireError::Protocol(format!(
                "protocol version {} (this node speaks {VERSION})",
                hello.version
            )));
        }
        Ok(hello)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hello_encodes_with_its_tag_and_length() {
        let h = Hello {
            version: VERSION,
            name: "a".into(),
            advertise: "127.0.0.1:7000".into(),
            incarnation: 7,
        };
        let bytes = h.encode();
        assert_eq!(bytes[0], TAG_HELLO);
        let len = u16::from_be_bytes([bytes[1], bytes[2]]) as usize;
        assert_eq!(len, bytes.len() - 3);
        let back: Hello = postcard::from_bytes(&bytes[3..]).expect("decodes");
        assert_eq!(back, h);
    }
}
