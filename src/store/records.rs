//! The byte encodings of stored records, shared by every engine that keeps
//! bytes (redb tables, Redis hashes), so a record means the same wherever it
//! is kept.
//!
//! A checkpoint record is one record-version byte (`1`), `saved_at` as unix
//! milliseconds (`u64`, little-endian), then the checkpoint's JSON text
//! exactly as received (UTF-8, to the end of the record).
//!
//! A session record is one record-version byte (`1`) then the
//! [`SessionRecord`] as JSON.
//!
//! Must not know where records are kept.

use serde_json::value::RawValue;

use super::{Checkpoint, SessionRecord};
use crate::time::Timestamp;

/// First byte of every session record.
pub(crate) const SESSION_RECORD_V1: u8 = 1;

pub(crate) const CHECKPOINT_RECORD_V1: u8 = 1;
/// Record version byte plus the `u64` timestamp.
pub(crate) const CHECKPOINT_HEADER_LEN: usize = 1 + 8;

pub(crate) fn encode_session(record: &SessionRecord) -> Vec<u8> {
    let mut bytes = vec![SESSION_RECORD_V1];
    // Serializing plain strings and numbers into a Vec cannot fail.
    if let Err(e) = serde_json::to_writer(&mut bytes, record) {
        tracing::error!(error = %e, "encoding a session record failed");
    }
    bytes
}

pub(crate) fn decode_session(bytes: &[u8]) -> Result<SessionRecord, String> {
    match bytes.split_first() {
        Some((&SESSION_RECORD_V1, json)) => {
            serde_json::from_slice(json).map_err(|e| format!("not a session record: {e}"))
        }
        Some((&version, _)) => Err(format!("unknown record version {version}")),
        None => Err("empty record".into()),
    }
}

pub(crate) fn encode_checkpoint(checkpoint: &Checkpoint) -> Vec<u8> {
    let json = checkpoint.data.get().as_bytes();
    let mut record = Vec::with_capacity(CHECKPOINT_HEADER_LEN + json.len());
    record.push(CHECKPOINT_RECORD_V1);
    record.extend_from_slice(&checkpoint.saved_at.unix_millis().to_le_bytes());
    record.extend_from_slice(json);
    record
}

pub(crate) fn decode_checkpoint(id: String, record: &[u8]) -> Result<Checkpoint, String> {
    let Some((&version, rest)) = record.split_first() else {
        return Err("empty record".into());
    };
    if version != CHECKPOINT_RECORD_V1 {
        return Err(format!("unknown record version {version}"));
    }
    let Some((millis, json)) = rest.split_first_chunk::<8>() else {
        return Err("record too short".into());
    };
    let json = std::str::from_utf8(json).map_err(|e| format!("data is not UTF-8: {e}"))?;
    let data =
        RawValue::from_string(json.to_owned()).map_err(|e| format!("data is not JSON: {e}"))?;
    Ok(Checkpoint {
        id,
        saved_at: Timestamp::from_unix_millis(u64::from_le_bytes(*millis)),
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::checkpoint;

    #[test]
    fn checkpoint_record_roundtrip() {
        let cp = checkpoint("id", 1_764_064_800_123, r#"{"x": [1, "é"]}"#);
        let record = encode_checkpoint(&cp);
        assert_eq!(record[0], CHECKPOINT_RECORD_V1);
        assert_eq!(record.len(), CHECKPOINT_HEADER_LEN + cp.data.get().len());
        let back = decode_checkpoint("id".into(), &record).unwrap();
        assert_eq!(back.saved_at, cp.saved_at);
        assert_eq!(back.data.get(), cp.data.get());
        assert!(decode_checkpoint("id".into(), &[]).is_err());
        assert!(decode_checkpoint("id".into(), &record[..5]).is_err());
        let mut bad_utf8 = record[..CHECKPOINT_HEADER_LEN].to_vec();
        bad_utf8.extend_from_slice(&[b'"', 0xff, b'"']);
        assert!(decode_checkpoint("id".into(), &bad_utf8).is_err());
    }
}
