//! Serving a stream-mode call: the handler's chunks go out as the caller's window allows, each
//! linked into the transcript, and the last one signed (`skillmesh_protocol::stream`).

use std::sync::Arc;

use futures::StreamExt;
use skillmesh_protocol::{
    CallError, ChainWriter, ErrorCode, MAX_CHUNK_DATA_BYTES, MessageId, to_cbor,
};

use super::{Admitted, Inbound, Outcome, Replier};
use crate::skills::{Chunk, StreamHandler};

impl Inbound {
    /// Runs a stream call to its end and sends its chunks; the last one carries the error,
    /// if it ended with one. `call` is the call payload's message id, where the chain starts.
    pub(super) async fn run_stream(
        &self,
        admitted: Admitted,
        handler: Arc<dyn StreamHandler>,
        call: MessageId,
        reply: &Replier,
    ) -> Outcome {
        let Admitted {
            ctx,
            args,
            timeout,
            skill,
            run,
            ..
        } = admitted;
        let token = run.token().clone();
        let mut chain = ChainWriter::new(call, ctx.call_id, self.me);
        let mut chunks = handler.call(ctx, args);
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let ended: Result<(), CallError> = async {
            loop {
                let next = tokio::select! {
                    biased;
                    _ = token.cancelled() => return Err(cancelled()),
                    _ = &mut deadline => return Err(CallError::new(
                        ErrorCode::Timeout,
                        format!("the stream ran past {timeout:?}"),
                    )),
                    _ = reply.gone() => return Err(gone()),
                    next = chunks.next() => next,
                };
                let chunk = match next {
                    None => return Ok(()),
                    Some(Err(e)) => return Err(CallError::new(ErrorCode::HandlerFailed, e.message)),
                    Some(Ok(c)) => c,
                };
                if let (Chunk::Json(v), Some(schema)) = (&chunk, &skill.output)
                    && let Err(e) = schema.validate(v)
                {
                    tracing::warn!(skill = %skill.spec.name, "stream chunk does not match the output schema: {e}");
                    return Err(CallError::new(
                        ErrorCode::Internal,
                        "a chunk does not match the skill's output schema",
                    ));
                }
                for data in encode(chunk)? {
                    let payload = chain.chunk(data);
                    let sent = tokio::select! {
                        biased;
                        _ = token.cancelled() => return Err(cancelled()),
                        _ = &mut deadline => return Err(CallError::new(
                            ErrorCode::Timeout,
                            format!("the stream ran past {timeout:?}"),
                        )),
                        sent = reply.chunk(payload) => sent,
                    };
                    if !sent {
                        return Err(gone());
                    }
                }
            }
        }
        .await;
        drop(chunks);
        let error = ended.err();
        match chain.last(&self.signing, Vec::new(), error.clone()) {
            Ok(last) => {
                reply.result(Some(last)).await;
            }
            Err(e) => tracing::warn!("cannot seal a stream's last chunk: {e}"),
        }
        drop(run);
        Outcome::Streamed(error)
    }
}

fn cancelled() -> CallError {
    CallError::new(ErrorCode::Cancelled, "cancelled by the caller")
}

fn gone() -> CallError {
    CallError::new(ErrorCode::Cancelled, "the caller went away")
}

/// A chunk's data as CBOR: a JSON value whole, raw bytes split into pieces that fit a chunk.
fn encode(chunk: Chunk) -> Result<Vec<Vec<u8>>, CallError> {
    match chunk {
        Chunk::Json(v) => {
            let data = to_cbor(&v);
            if data.len() > MAX_CHUNK_DATA_BYTES {
                return Err(CallError::new(
                    ErrorCode::OutputTooLarge,
                    format!(
                        "a JSON chunk of {} bytes, at most {MAX_CHUNK_DATA_BYTES}",
                        data.len()
                    ),
                ));
            }
            Ok(vec![data])
        }
        // A byte string's CBOR head takes at most 9 bytes.
        Chunk::Bytes(b) => Ok(b
            .chunks(MAX_CHUNK_DATA_BYTES - 9)
            .map(|piece| to_cbor(&serde_bytes::Bytes::new(piece)))
            .collect()),
    }
}

/// A chunk's data as the caller reads it: a CBOR byte string is raw bytes, anything else JSON.
pub(crate) fn decode(data: &[u8]) -> Result<Chunk, String> {
    match data.first() {
        Some(b) if (0x40..=0x5b).contains(b) => {
            let bytes: serde_bytes::ByteBuf =
                skillmesh_protocol::from_cbor(data, MAX_CHUNK_DATA_BYTES)
                    .map_err(|e| format!("chunk bytes: {e}"))?;
            Ok(Chunk::Bytes(bytes.into_vec()))
        }
        _ => skillmesh_protocol::from_cbor(data, MAX_CHUNK_DATA_BYTES)
            .map(Chunk::Json)
            .map_err(|e| format!("chunk is not JSON-like CBOR: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_encode_and_decode_and_long_bytes_are_split() {
        let json = Chunk::Json(serde_json::json!({"token": "hello"}));
        let enc = encode(json.clone()).expect("fits");
        assert_eq!(decode(&enc[0]).expect("decodes"), json);
        let big = vec![7u8; MAX_CHUNK_DATA_BYTES * 2 + 5];
        let pieces = encode(Chunk::Bytes(big.clone())).expect("split");
        assert_eq!(pieces.len(), 3);
        let mut back = Vec::new();
        for p in &pieces {
            assert!(p.len() <= MAX_CHUNK_DATA_BYTES);
            match decode(p).expect("decodes") {
                Chunk::Bytes(b) => back.extend(b),
                other => panic!("not bytes: {other:?}"),
            }
        }
        assert_eq!(back, big);
        let huge = Chunk::Json(serde_json::Value::String("x".repeat(MAX_CHUNK_DATA_BYTES)));
        assert_eq!(
            encode(huge).expect_err("too big").code,
            ErrorCode::OutputTooLarge
        );
    }
}
