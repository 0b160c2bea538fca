//! The transcript of a streamed result (README.md §3, StreamChunk): a hash chain over the
//! chunks, closed by one signature.
//!
//! Every chunk names the message id (`sha256` of the payload) of the one before it, and the
//! first names the call's. Only the last chunk is a signed envelope; the others travel as bare
//! payloads. The last chunk's signature covers its `prev`, which covers the chunk before, and
//! so on to the call: one signature makes the whole output a receipt the caller can keep and
//! show. A chunk that does not fit the chain ends the call with an error at once.

use libp2p_identity::PeerId;

use crate::call::{CallId, StreamChunk};
use crate::codec::{from_cbor, to_cbor};
use crate::envelope::{self, Checks, MessageId, SigningKey, Unsigned};
use crate::error::EnvelopeError;
use crate::limits::MAX_CHUNK_PAYLOAD_BYTES;

/// Why a chunk does not fit the transcript.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// Not a chunk payload at all.
    #[error("chunk {seq}: {source}")]
    Decode {
        /// The sequence number expected.
        seq: u64,
        /// What failed.
        source: crate::DecodeError,
    },
    /// The signed last chunk does not verify, or is not the callee's.
    #[error("last chunk: {0}")]
    Envelope(#[from] EnvelopeError),
    /// A field that must follow from what came before does not.
    #[error("chunk {seq} does not fit the transcript: {what}")]
    Broken {
        /// The sequence number expected.
        seq: u64,
        /// Which field is wrong.
        what: String,
    },
    /// A chunk arrived after the last one.
    #[error("a chunk after the last one")]
    Ended,
}

/// The caller's side: checks each chunk against the chain as it arrives.
#[derive(Clone, Debug)]
pub struct ChainReader {
    call_id: CallId,
    callee: PeerId,
    next: u64,
    prev: MessageId,
    ended: bool,
}

impl ChainReader {
    /// A reader for the answer to the call whose payload has message id `call`.
    pub fn new(call: MessageId, call_id: CallId, callee: PeerId) -> Self {
        ChainReader {
            call_id,
            callee,
            next: 0,
            prev: call,
            ended: false,
        }
    }

    /// Chunks accepted so far.
    pub fn count(&self) -> u64 {
        self.next
    }

    /// The message id the next chunk must name as `prev`.
    pub fn head(&self) -> MessageId {
        self.prev
    }

    /// Takes an unsigned chunk payload; it must not be the last.
    pub fn chunk(&mut self, payload: &[u8]) -> Result<StreamChunk, ChainError> {
        let seq = self.next;
        let c: StreamChunk = from_cbor(payload, MAX_CHUNK_PAYLOAD_BYTES)
            .map_err(|source| ChainError::Decode { seq, source })?;
        if c.last {
            return Err(self.broken("an unsigned chunk says it is the last"));
        }
        self.fits(&c)?;
        self.prev = MessageId::of(payload);
        self.next += 1;
        Ok(c)
    }

    /// Takes the signed last chunk.
    pub fn last(&mut self, envelope: &[u8]) -> Result<StreamChunk, ChainError> {
        let opened =
            envelope::open::<StreamChunk>(envelope, &Checks::now().signed_by(self.callee))?;
        let c = opened.value;
        if !c.last {
            return Err(self.broken("a signed chunk that is not the last"));
        }
        self.fits(&c)?;
        self.prev = opened.id;
        self.next += 1;
        self.ended = true;
        Ok(c)
    }

    fn fits(&self, c: &StreamChunk) -> Result<(), ChainError> {
        if self.ended {
            return Err(ChainError::Ended);
        }
        if c.call_id != self.call_id {
            return Err(self.broken(format!("call id {}", c.call_id)));
        }
        if c.callee != self.callee {
            return Err(self.broken(format!("callee {}", c.callee)));
        }
        if c.seq != self.next {
            return Err(self.broken(format!("seq {}", c.seq)));
        }
        if c.prev != self.prev {
            return Err(self.broken(format!("prev {}", c.prev)));
        }
        Ok(())
    }

    fn broken(&self, what: impl Into<String>) -> ChainError {
        ChainError::Broken {
            seq: self.next,
            what: what.into(),
        }
    }
}

/// The callee's side: builds the chunks of one call's transcript.
#[derive(Clone, Debug)]
pub struct ChainWriter {
    call_id: CallId,
    callee: PeerId,
    next: u64,
    prev: MessageId,
}

impl ChainWriter {
    /// A writer answering the call whose payload has message id `call`.
    pub fn new(call: MessageId, call_id: CallId, callee: PeerId) -> Self {
        ChainWriter {
            call_id,
            callee,
            next: 0,
            prev: call,
        }
    }

    /// The payload of the next chunk, unsigned, holding `data` (CBOR).
    pub fn chunk(&mut self, data: Vec<u8>) -> Vec<u8> {
        let payload = to_cbor(&self.make(data, false, None));
        self.prev = MessageId::of(&payload);
        self.next += 1;
        payload
    }

    /// The last chunk, prepared for signing: `error` set ends the stream with a failure.
    pub fn last(
        &mut self,
        key: &SigningKey,
        data: Vec<u8>,
        error: Option<crate::CallError>,
    ) -> Result<Unsigned, EnvelopeError> {
        let c = self.make(data, true, error);
        let u = envelope::prepare(key, &c)?;
        self.prev = MessageId::of(u.payload());
        self.next += 1;
        Ok(u)
    }

    /// Chunks written so far.
    pub fn count(&self) -> u64 {
        self.next
    }

    fn make(&self, data: Vec<u8>, last: bool, error: Option<crate::CallError>) -> StreamChunk {
        StreamChunk {
            call_id: self.call_id,
            callee: self.callee,
            seq: self.next,
            prev: self.prev,
            data: serde_bytes::ByteBuf::from(data),
            last,
            error,
        }
    }
}

/// Checks a kept transcript: the call's payload, the unsigned chunk payloads in order, and the
/// signed last chunk. Returns the last chunk when all of it holds together.
pub fn verify_transcript(
    call_payload: &[u8],
    call_id: CallId,
    callee: PeerId,
    chunks: &[Vec<u8>],
    last: &[u8],
) -> Result<StreamChunk, ChainError> {
    let mut r = ChainReader::new(MessageId::of(call_payload), call_id, callee);
    for c in chunks {
        r.chunk(c)?;
    }
    r.last(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CallError, ErrorCode};

    fn key() -> SigningKey {
        SigningKey::from_keypair(&libp2p_identity::Keypair::generate_ed25519()).expect("ed25519")
    }

    fn transcript(k: &SigningKey, n: usize) -> (MessageId, Vec<Vec<u8>>, Vec<u8>) {
        let call = MessageId::of(b"the call");
        let mut w = ChainWriter::new(call, CallId([1; 16]), k.peer_id());
        let chunks = (0..n).map(|i| w.chunk(to_cbor(&i))).collect();
        let last = w.last(k, Vec::new(), None).expect("prepare").sign(k);
        (call, chunks, last)
    }

    #[test]
    fn a_transcript_verifies_and_any_change_breaks_it() {
        let k = key();
        let (_, chunks, last) = transcript(&k, 5);
        let ok = verify_transcript(b"the call", CallId([1; 16]), k.peer_id(), &chunks, &last);
        assert_eq!(ok.expect("verifies").seq, 5);

        // Another call, another callee, a chunk dropped, two swapped, one changed.
        let other = verify_transcript(b"another", CallId([1; 16]), k.peer_id(), &chunks, &last);
        assert!(matches!(other, Err(ChainError::Broken { seq: 0, .. })));
        let stranger = key().peer_id();
        assert!(verify_transcript(b"the call", CallId([1; 16]), stranger, &chunks, &last).is_err());
        let mut dropped = chunks.clone();
        dropped.remove(2);
        let e = verify_transcript(b"the call", CallId([1; 16]), k.peer_id(), &dropped, &last);
        assert!(matches!(e, Err(ChainError::Broken { seq: 2, .. })), "{e:?}");
        let mut swapped = chunks.clone();
        swapped.swap(1, 3);
        assert!(
            verify_transcript(b"the call", CallId([1; 16]), k.peer_id(), &swapped, &last).is_err()
        );
        let mut tampered = chunks.clone();
        let n = tampered[3].len();
        tampered[3][n - 20] ^= 1;
        let e = verify_transcript(b"the call", CallId([1; 16]), k.peer_id(), &tampered, &last);
        assert!(e.is_err(), "a changed chunk is caught by the next link");
    }

    #[test]
    fn the_reader_refuses_a_chunk_out_of_place_at_once() {
        let k = key();
        let (call, chunks, last) = transcript(&k, 3);
        let mut r = ChainReader::new(call, CallId([1; 16]), k.peer_id());
        r.chunk(&chunks[0]).expect("first");
        assert!(r.chunk(&chunks[2]).is_err(), "skips one");
        let mut r = ChainReader::new(call, CallId([1; 16]), k.peer_id());
        for c in &chunks {
            r.chunk(c).expect("in order");
        }
        r.last(&last).expect("last");
        assert!(matches!(r.chunk(&chunks[0]), Err(ChainError::Ended)));
        // A last chunk signed by someone else.
        let (_, _, forged) = transcript(&key(), 3);
        let mut r = ChainReader::new(call, CallId([1; 16]), k.peer_id());
        for c in &chunks {
            r.chunk(c).expect("in order");
        }
        assert!(matches!(r.last(&forged), Err(ChainError::Envelope(_))));
    }

    #[test]
    fn a_stream_can_end_with_an_error() {
        let k = key();
        let call = MessageId::of(b"c");
        let mut w = ChainWriter::new(call, CallId([2; 16]), k.peer_id());
        let first = w.chunk(to_cbor(&"partial"));
        let err = CallError::new(ErrorCode::Cancelled, "stopped");
        let last = w
            .last(&k, Vec::new(), Some(err.clone()))
            .expect("prepare")
            .sign(&k);
        let mut r = ChainReader::new(call, CallId([2; 16]), k.peer_id());
        r.chunk(&first).expect("first");
        assert_eq!(r.last(&last).expect("last").error, Some(err));
    }
}
