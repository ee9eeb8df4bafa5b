//! ham's mesh overlay: QUIC (quinn) between nodes, mutual TLS with a cluster CA,
//! SWIM membership and failure detection (foca) over QUIC datagrams, and the control
//! API (gRPC) carried over QUIC bidirectional streams so that a node can call any
//! other node's `hamd` exactly as a local client calls its own, and framed streams
//! (no HTTP/2) for what must be fast: event feeds.
//!
//! Invariants: a connection carries nothing until both ends proved their names (the
//! chain in the TLS handshake, the name in the hello); a peer that sends anything
//! malformed or oversized is disconnected, never trusted, and never stalls the node.

pub mod frames;
pub mod grpc;
pub mod identity;
mod membership;
mod mesh;
mod name;
pub mod wire;

pub use frames::{FrameError, FrameReceiver, FrameSender, FrameStream};
pub use identity::{IdentityError, IdentityFiles, TlsIdentity};
pub use membership::{MemberInfo, MemberState, SwimTuning};
pub use mesh::{Mesh, MeshConfig, MeshError, MeshEvent, MeshIncoming};
pub use name::{NodeName, NodeNameError};
