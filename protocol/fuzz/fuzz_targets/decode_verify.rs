//! Feeds arbitrary bytes to every decode-and-verify path a peer can reach. Nothing may panic,
//! hang or allocate without bound; anything accepted must re-verify to the same message id.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skillmesh_protocol::envelope::{self, Checks};
use skillmesh_protocol::*;

fuzz_target!(|data: &[u8]| {
    let checks = Checks::at(Timestamp(1_800_000_000_000));
    if let Ok(v) = envelope::verify(data) {
        let id = v.id();
        assert_eq!(envelope::verify(data).map(|again| again.id()).ok(), Some(id));
    }
    let _ = envelope::open::<Call>(data, &checks);
    let _ = envelope::open::<CallResult>(data, &checks);
    let _ = envelope::open::<AgentCard>(data, &checks);
    let _ = envelope::open::<StreamChunk>(data, &checks);
    let _ = envelope::open::<Cancel>(data, &checks);
    let _ = envelope::open::<Event>(data, &checks);
    let _ = envelope::open::<Grant>(data, &checks);
    let _ = envelope::open::<SealedMessage>(data, &checks);
    // Plain CBOR messages that ride authenticated streams unsigned.
    if let Ok(req) = from_cbor::<MailboxRequest>(data, MAX_MAILBOX_REQUEST_BYTES) {
        let _ = req.validate();
    }
    let _ = from_cbor::<MailboxResponse>(data, MAX_MAILBOX_RESPONSE_BYTES);
    let _ = from_cbor::<SkillSpec>(data, MAX_CARD_PAYLOAD_BYTES).map(|s| s.validate());
});
