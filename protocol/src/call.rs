//! Skill calls (`/skillmesh/call/4`, README.md §1, §3): the signed request, its signed result, stream
//! chunks and cancellation, with the stable error codes a caller can act on.

use std::fmt;

use libp2p_identity::PeerId;
use semver::VersionReq;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::envelope::{Kind, MessageId, Payload, Validity};
use crate::error::ValidationError;
use crate::grant::check_window;
use crate::limits::*;
use crate::skill::{Mode, SkillName};
use crate::time::Timestamp;

/// A caller-chosen random id; the callee refuses a second call with the same id while the first
/// could still be valid.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CallId(#[serde(with = "serde_bytes")] pub [u8; 16]);

impl fmt::Display for CallId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for CallId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CallId({self})")
    }
}

/// A request to run `skill` on `target`, signed by `caller`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Call {
    /// Unique per caller within the call window.
    pub call_id: CallId,
    /// Who calls; must be the signer and the connection's peer.
    pub caller: PeerId,
    /// Who must run it; a node refuses calls for anyone else.
    pub target: PeerId,
    /// The skill's name.
    pub skill: SkillName,
    /// Versions the caller accepts.
    pub version_req: VersionReq,
    /// Arguments as CBOR.
    pub args: ByteBuf,
    /// When the caller signed it.
    pub issued_at: Timestamp,
    /// Refused after this (at most [`MAX_CALL_WINDOW`] after `issued_at`).
    pub expires_at: Timestamp,
    /// The mode the caller expects.
    pub mode: Mode,
    /// A grant envelope (kind `grant`) from the skill's owner, for share mode `grants`.
    pub grant: Option<ByteBuf>,
}

impl Payload for Call {
    const KIND: Kind = Kind::Call;

    fn author(&self) -> PeerId {
        self.caller
    }

    fn validity(&self) -> Option<Validity> {
        Some(Validity {
            issued_at: self.issued_at,
            expires_at: self.expires_at,
        })
    }

    fn validate(&self) -> Result<(), ValidationError> {
        if self.args.len() > MAX_CALL_ARGS_BYTES {
            return Err(ValidationError::new(
                "args",
                format!("{} bytes, at most {MAX_CALL_ARGS_BYTES}", self.args.len()),
            ));
        }
        if let Some(g) = &self.grant
            && g.len() > Kind::Grant.max_envelope()
        {
            return Err(ValidationError::new("grant", "oversize grant envelope"));
        }
        check_window(self.issued_at, self.expires_at, MAX_CALL_WINDOW)
    }
}

/// Where a call ended up, as the callee reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CallStatus {
    /// An async call was accepted; its result comes later.
    Accepted,
    /// Done; `output` holds the result.
    Completed,
    /// Not done; `error` says why.
    Failed,
}

/// The callee's signed answer to a call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallResult {
    /// The call answered.
    pub call_id: CallId,
    /// Who answers; must be the signer.
    pub callee: PeerId,
    /// Who asked, so a result cannot be passed off to another caller.
    pub caller: PeerId,
    /// Outcome.
    pub status: CallStatus,
    /// The output as CBOR, when completed.
    pub output: Option<ByteBuf>,
    /// Why it failed, when failed.
    pub error: Option<CallError>,
    /// Where the time went.
    pub timings: Timings,
}

impl Payload for CallResult {
    const KIND: Kind = Kind::CallResult;

    fn author(&self) -> PeerId {
        self.callee
    }

    fn validate(&self) -> Result<(), ValidationError> {
        match (self.status, &self.output, &self.error) {
            (CallStatus::Completed, Some(out), None) if out.len() <= MAX_OUTPUT_BYTES => Ok(()),
            (CallStatus::Completed, Some(out), None) => Err(ValidationError::new(
                "output",
                format!("{} bytes, at most {MAX_OUTPUT_BYTES}", out.len()),
            )),
            (CallStatus::Failed, None, Some(e)) => e.validate(),
            (CallStatus::Accepted, None, None) => Ok(()),
            (status, _, _) => Err(ValidationError::new(
                "status",
                format!("{status:?} does not fit the output and error fields present"),
            )),
        }
    }
}

/// Milliseconds the callee spent, measured on its clock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    /// From receipt to the handler starting (verification, checks, queueing).
    pub queued_ms: u32,
    /// In the handler.
    pub run_ms: u32,
}

/// A failure with a stable code and a human message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct CallError {
    /// Stable code: act on this.
    pub code: ErrorCode,
    /// Human detail: show this.
    pub message: String,
}

impl CallError {
    /// An error with `code`; the message is cut to [`MAX_ERROR_MESSAGE_LEN`].
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_ERROR_MESSAGE_LEN {
            let mut end = MAX_ERROR_MESSAGE_LEN;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        CallError { code, message }
    }

    fn validate(&self) -> Result<(), ValidationError> {
        if self.message.len() > MAX_ERROR_MESSAGE_LEN {
            return Err(ValidationError::new(
                "error.message",
                format!("over {MAX_ERROR_MESSAGE_LEN} bytes"),
            ));
        }
        Ok(())
    }
}

macro_rules! error_codes {
    ($($(#[$doc:meta])* $variant:ident = $code:literal, $name:literal;)*) => {
        /// Stable error codes of call failures. The number is on the wire; the name is for logs
        /// and the CLI. Codes are never reused.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(from = "u16", into = "u16")]
        #[non_exhaustive]
        pub enum ErrorCode {
            $($(#[$doc])* $variant,)*
            /// A code this version does not know (from a newer peer).
            Other(u16),
        }

        impl ErrorCode {
            /// Every known code.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant),*];

            /// The wire number.
            pub fn code(self) -> u16 {
                match self {
                    $(ErrorCode::$variant => $code,)*
                    ErrorCode::Other(c) => c,
                }
            }

            /// The stable name, e.g. `rate_limited`.
            pub fn name(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $name,)*
                    ErrorCode::Other(_) => "other",
                }
            }
        }

        impl From<u16> for ErrorCode {
            fn from(c: u16) -> Self {
                match c {
                    $($code => ErrorCode::$variant,)*
                    other => ErrorCode::Other(other),
                }
            }
        }
    };
}

error_codes! {
    /// The request is not a well-formed call.
    BadRequest = 1, "bad_request";
    /// The signature does not verify.
    BadSignature = 2, "bad_signature";
    /// The signer is not the caller or not the connection's peer.
    SignerMismatch = 3, "signer_mismatch";
    /// The call is addressed to another node.
    WrongTarget = 4, "wrong_target";
    /// The call's window has passed.
    Expired = 5, "expired";
    /// The call is dated in the future beyond the allowed skew.
    NotYetValid = 6, "not_yet_valid";
    /// This call id was seen already.
    Replayed = 7, "replayed";
    /// No skill of that name here.
    UnknownSkill = 8, "unknown_skill";
    /// The skill's version does not match the caller's requirement.
    VersionMismatch = 9, "version_mismatch";
    /// The share mode or grant does not allow this caller.
    AccessDenied = 10, "access_denied";
    /// The caller sent too many calls too fast.
    RateLimited = 11, "rate_limited";
    /// Too many calls running; try again later.
    Busy = 12, "busy";
    /// The arguments exceed the skill's limit.
    ArgsTooLarge = 13, "args_too_large";
    /// The arguments do not match the skill's input schema.
    InvalidArgs = 14, "invalid_args";
    /// The handler did not finish in time.
    Timeout = 15, "timeout";
    /// The handler reported a failure.
    HandlerFailed = 16, "handler_failed";
    /// The caller cancelled the call.
    Cancelled = 17, "cancelled";
    /// The callee failed for its own reasons.
    Internal = 18, "internal";
    /// The skill does not run in the requested mode.
    UnsupportedMode = 19, "unsupported_mode";
    /// The output exceeds the allowed size.
    OutputTooLarge = 20, "output_too_large";
    /// The node is shutting down.
    ShuttingDown = 21, "shutting_down";
    /// The callee has no call of that id from this caller (cancel, query).
    UnknownCall = 22, "unknown_call";
    /// The callee restarted while the call ran; it did not finish.
    Interrupted = 23, "interrupted";
    /// The stream broke its transcript or window (caller's side).
    BrokenStream = 24, "broken_stream";
}

impl From<ErrorCode> for u16 {
    fn from(c: ErrorCode) -> u16 {
        c.code()
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorCode::Other(c) => write!(f, "error {c}"),
            known => f.write_str(known.name()),
        }
    }
}

/// One chunk of a stream-mode result. Chunks form one signed transcript: each names the id of
/// the envelope before it (the call's, for the first), so none can be dropped, reordered or
/// spliced in from another stream without the caller noticing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamChunk {
    /// The call this chunk answers.
    pub call_id: CallId,
    /// Who streams; must be the signer.
    pub callee: PeerId,
    /// 0, 1, 2, ... in order.
    pub seq: u64,
    /// Message id of the previous chunk, or of the call for `seq == 0`.
    pub prev: MessageId,
    /// Data as CBOR (empty on the last chunk if there is no more).
    pub data: ByteBuf,
    /// True on the last chunk.
    pub last: bool,
    /// Set on a last chunk that ends the stream with a failure.
    pub error: Option<CallError>,
}

impl Payload for StreamChunk {
    const KIND: Kind = Kind::StreamChunk;

    fn author(&self) -> PeerId {
        self.callee
    }

    fn validate(&self) -> Result<(), ValidationError> {
        if self.data.len() > MAX_CHUNK_DATA_BYTES {
            return Err(ValidationError::new(
                "data",
                format!("{} bytes, at most {MAX_CHUNK_DATA_BYTES}", self.data.len()),
            ));
        }
        if self.error.is_some() && !self.last {
            return Err(ValidationError::new(
                "error",
                "only the last chunk may carry an error",
            ));
        }
        self.error.as_ref().map_or(Ok(()), CallError::validate)
    }
}

/// The caller asks the callee to stop a call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancel {
    /// The call to stop.
    pub call_id: CallId,
    /// Who cancels; only the original caller may.
    pub caller: PeerId,
    /// The callee.
    pub target: PeerId,
    /// When; a cancel is valid for [`MAX_CALL_WINDOW`].
    pub issued_at: Timestamp,
}

impl Payload for Cancel {
    const KIND: Kind = Kind::Cancel;

    fn author(&self) -> PeerId {
        self.caller
    }

    fn validity(&self) -> Option<Validity> {
        Some(Validity {
            issued_at: self.issued_at,
            expires_at: self.issued_at.saturating_add(MAX_CALL_WINDOW),
        })
    }

    fn validate(&self) -> Result<(), ValidationError> {
        Ok(())
    }
}
