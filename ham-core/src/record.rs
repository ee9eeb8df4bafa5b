//! The store's record codec: how engine state and events become bytes and back.
//!
//! Every record starts with a format byte, so a newer `hamd` can tell an old record
//! from a foreign one; the body is postcard (compact, deterministic serde).

use crate::engine::state::{EntityRecord, NodeRecord};
use crate::event::Event;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The record format this build writes and reads.
pub const RECORD_FORMAT: u8 = 1;

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = vec![RECORD_FORMAT];
    // Serialising plain data into a Vec cannot fail.
    out.extend(postcard::to_stdvec(v).expect("postcard serialises plain data"));
    out
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    match bytes.split_first() {
        None => Err("empty record".into()),
        Some((&RECORD_FORMAT, body)) => {
            postcard::from_bytes(body).map_err(|e| format!("undecodable record: {e}"))
        }
        Some((f, _)) => Err(format!(
            "record format {f} is unknown (this build reads {RECORD_FORMAT})"
        )),
    }
}

/// Encodes an entity record.
pub fn encode_entity(r: &EntityRecord) -> Vec<u8> {
    encode(r)
}

/// Decodes an entity record.
pub fn decode_entity(bytes: &[u8]) -> Result<EntityRecord, String> {
    decode(bytes)
}

/// Encodes the node record.
pub fn encode_node(r: &NodeRecord) -> Vec<u8> {
    encode(r)
}

/// Decodes the node record.
pub fn decode_node(bytes: &[u8]) -> Result<NodeRecord, String> {
    decode(bytes)
}

/// Encodes an event.
pub fn encode_event(e: &Event) -> Vec<u8> {
    encode(e)
}

/// Decodes an event.
pub fn decode_event(bytes: &[u8]) -> Result<Event, String> {
    decode(bytes)
}
