//! The recipient's and sender's side of mail: Olm state, send counters, and the inbox.
//!
//! Every change to the ratchet is committed together with what it produced (a sent counter or
//! a received message), so a crash never leaves a message decrypted but lost, or a message key
//! used twice.

use std::time::Duration;

use libp2p::PeerId;
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use skillmesh_protocol::{MessageId, Timestamp, to_cbor};

use super::{META, Store, StoreError, decode, lp, peer_range};

/// Olm state: `a` the account, `p` the published one-time keys, `s|peer|session id` sessions.
pub(super) const OLM: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("olm");
/// Next sequence number per recipient of our mail.
pub(super) const OUT_SEQ: TableDefinition<'_, &[u8], u64> = TableDefinition::new("out_seq");
/// Received messages the application has not taken yet, keyed `sender|seq`.
pub(super) const INBOX: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("inbox");
/// Per sender, the highest sequence number handed to the application.
pub(super) const INBOX_MARK: TableDefinition<'_, &[u8], u64> = TableDefinition::new("inbox_mark");

const KEY_ACCOUNT: &[u8] = b"a";
const KEY_PUBLISHED: &[u8] = b"p";
const KEY_INBOX_COUNT: &str = "inbox_count";

/// A persisted Olm session with one peer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SessionRow {
    /// The peer.
    pub peer: PeerId,
    /// The session's id.
    pub id: String,
    /// The session, encrypted with the node's pickle key.
    pub pickle: String,
    /// Last use, for choosing the session to send with and for eviction.
    pub last_used: Timestamp,
    /// Whether the session has decrypted a message (both sides have it).
    pub received: bool,
    /// Whether this side opened it from one of the peer's one-time keys (rows saved before
    /// this field existed read as `false`).
    #[serde(default)]
    pub one_time: bool,
}

/// A message received and decrypted, waiting for the application.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxEntry {
    /// The sealed message's id.
    pub id: MessageId,
    /// Who sent it (verified signer).
    pub from: PeerId,
    /// The sender's counter: messages of one sender arrive in this order.
    pub seq: u64,
    /// When the sender sealed it (the sender's clock).
    pub sent_at: Timestamp,
    /// When this node received it.
    pub received_at: Timestamp,
    /// The plaintext.
    pub data: ByteBuf,
}

/// What became of a received message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accepted {
    /// Stored for the application.
    Stored,
    /// Seen before (another mailbox, or a retry); nothing changed.
    Duplicate,
    /// The inbox is full; nothing changed, the sender's copy must stay where it is.
    Full,
}

fn session_key(peer: &PeerId, id: &str) -> Vec<u8> {
    let mut k = b"s".to_vec();
    k.extend_from_slice(&lp(peer));
    k.extend_from_slice(id.as_bytes());
    k
}

fn inbox_key(sender: &PeerId, seq: u64) -> Vec<u8> {
    let mut k = lp(sender);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub(super) fn put_olm(
    tx: &redb::WriteTransaction,
    session: Option<&SessionRow>,
    account: Option<&[u8]>,
    published: Option<&[u8]>,
) -> Result<(), StoreError> {
    let mut t = tx.open_table(OLM)?;
    if let Some(s) = session {
        t.insert(
            session_key(&s.peer, &s.id).as_slice(),
            to_cbor(s).as_slice(),
        )?;
    }
    if let Some(a) = account {
        t.insert(KEY_ACCOUNT, a)?;
    }
    if let Some(p) = published {
        t.insert(KEY_PUBLISHED, p)?;
    }
    Ok(())
}

/// Olm state loaded at start-up.
pub(crate) struct OlmState {
    pub(crate) account: Option<Vec<u8>>,
    pub(crate) published: Option<Vec<u8>>,
    pub(crate) sessions: Vec<SessionRow>,
    pub(crate) out_seq: Vec<(PeerId, u64)>,
}

impl Store {
    /// Everything the messenger keeps between runs.
    pub(crate) async fn olm_state(&self) -> Result<OlmState, StoreError> {
        self.run(|db, _| {
            let tx = db.begin_read()?;
            let t = tx.open_table(OLM)?;
            let account = t.get(KEY_ACCOUNT)?.map(|v| v.value().to_vec());
            let published = t.get(KEY_PUBLISHED)?.map(|v| v.value().to_vec());
            let mut sessions = Vec::new();
            for row in t.range(b"s".as_slice()..b"t".as_slice())? {
                sessions.push(decode("olm", row?.1.value())?);
            }
            let mut out_seq = Vec::new();
            for row in tx.open_table(OUT_SEQ)?.iter()? {
                let (k, v) = row?;
                if let Some(peer) = k.value().get(1..).and_then(|b| PeerId::from_bytes(b).ok()) {
                    out_seq.push((peer, v.value()));
                }
            }
            Ok(OlmState {
                account,
                published,
                sessions,
                out_seq,
            })
        })
        .await
    }

    /// Saves the Olm account (and the one-time keys published with it).
    pub(crate) async fn save_olm_account(
        &self,
        account: Vec<u8>,
        published: Vec<u8>,
    ) -> Result<(), StoreError> {
        self.run(move |db, _| {
            let tx = db.begin_write()?;
            put_olm(&tx, None, Some(&account), Some(&published))?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Records that message `seq` to `recipient` was encrypted with `session`: both are durable
    /// before the ciphertext leaves this node.
    pub(crate) async fn save_outbound(
        &self,
        recipient: PeerId,
        seq: u64,
        session: SessionRow,
    ) -> Result<(), StoreError> {
        self.run(move |db, _| {
            let tx = db.begin_write()?;
            put_olm(&tx, Some(&session), None, None)?;
            tx.open_table(OUT_SEQ)?
                .insert(lp(&recipient).as_slice(), seq)?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Deletes sessions (evicted from the bounded cache).
    pub(crate) async fn remove_sessions(
        &self,
        sessions: Vec<(PeerId, String)>,
    ) -> Result<(), StoreError> {
        self.run(move |db, _| {
            let tx = db.begin_write()?;
            {
                let mut t = tx.open_table(OLM)?;
                for (peer, id) in &sessions {
                    t.remove(session_key(peer, id).as_slice())?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Whether message `seq` of `sender` is new and fits; checked before decrypting, since a
    /// message key works once.
    pub(crate) async fn check_message(
        &self,
        sender: PeerId,
        seq: u64,
        max_inbox: u64,
    ) -> Result<Accepted, StoreError> {
        self.run(move |db, _| {
            let tx = db.begin_read()?;
            let mark = tx
                .open_table(INBOX_MARK)?
                .get(lp(&sender).as_slice())?
                .map(|v| v.value())
                .unwrap_or(0);
            if seq <= mark
                || tx
                    .open_table(INBOX)?
                    .get(inbox_key(&sender, seq).as_slice())?
                    .is_some()
            {
                return Ok(Accepted::Duplicate);
            }
            let count = tx
                .open_table(META)?
                .get(KEY_INBOX_COUNT)?
                .map(|v| v.value())
                .unwrap_or(0);
            Ok(if count >= max_inbox {
                Accepted::Full
            } else {
                Accepted::Stored
            })
        })
        .await
    }

    /// Stores a decrypted message with the ratchet state that decrypted it, in one commit.
    pub(crate) async fn accept_message(
        &self,
        entry: InboxEntry,
        session: SessionRow,
        account: Option<(Vec<u8>, Vec<u8>)>,
        max_inbox: u64,
    ) -> Result<Accepted, StoreError> {
        self.run(move |db, _| {
            let tx = db.begin_write()?;
            {
                let sender = lp(&entry.from);
                let mark = tx
                    .open_table(INBOX_MARK)?
                    .get(sender.as_slice())?
                    .map(|v| v.value())
                    .unwrap_or(0);
                let mut inbox = tx.open_table(INBOX)?;
                let key = inbox_key(&entry.from, entry.seq);
                if entry.seq <= mark || inbox.get(key.as_slice())?.is_some() {
                    return Ok(Accepted::Duplicate);
                }
                let mut meta = tx.open_table(META)?;
                let count = meta.get(KEY_INBOX_COUNT)?.map(|v| v.value()).unwrap_or(0);
                if count >= max_inbox {
                    return Ok(Accepted::Full);
                }
                inbox.insert(key.as_slice(), to_cbor(&entry).as_slice())?;
                meta.insert(KEY_INBOX_COUNT, count + 1)?;
            }
            let (acc, published) = match &account {
                Some((a, p)) => (Some(a.as_slice()), Some(p.as_slice())),
                None => (None, None),
            };
            put_olm(&tx, Some(&session), acc, published)?;
            tx.commit()?;
            Ok(Accepted::Stored)
        })
        .await
    }

    /// Takes the next message the application may have: per sender in sequence order; a
    /// message after a gap waits `reorder_wait` for the missing one, then goes anyway. Also
    /// returns when a waiting message becomes ready, if none is ready now.
    pub(crate) async fn take_inbox(
        &self,
        now: Timestamp,
        reorder_wait: Duration,
    ) -> Result<(Option<InboxEntry>, Option<Timestamp>), StoreError> {
        self.run(move |db, _| {
            let tx = db.begin_write()?;
            let mut taken = None;
            let mut wake: Option<Timestamp> = None;
            {
                let mut inbox = tx.open_table(INBOX)?;
                let mut marks = tx.open_table(INBOX_MARK)?;
                // Each sender's lowest waiting message, then the oldest ready one of those.
                let mut best: Option<(Vec<u8>, InboxEntry)> = None;
                let mut cursor: Option<Vec<u8>> = None;
                loop {
                    let first = match &cursor {
                        None => inbox.first()?,
                        Some(c) => inbox.range(c.as_slice()..)?.next().transpose()?,
                    };
                    let Some((k, v)) = first else { break };
                    let key = k.value().to_vec();
                    let entry: InboxEntry = decode("inbox", v.value())?;
                    let (_, hi) = peer_range(&entry.from);
                    cursor = Some(hi);
                    let mark = marks
                        .get(lp(&entry.from).as_slice())?
                        .map(|v| v.value())
                        .unwrap_or(0);
                    let due = entry.received_at.saturating_add(reorder_wait);
                    let ready = entry.seq == mark + 1 || due <= now;
                    if !ready {
                        wake = Some(wake.map_or(due, |w| w.min(due)));
                        continue;
                    }
                    if best
                        .as_ref()
                        .is_none_or(|(_, b)| entry.received_at < b.received_at)
                    {
                        best = Some((key, entry));
                    }
                }
                if let Some((key, entry)) = best {
                    inbox.remove(key.as_slice())?;
                    marks.insert(lp(&entry.from).as_slice(), entry.seq)?;
                    let mut meta = tx.open_table(META)?;
                    let count = meta.get(KEY_INBOX_COUNT)?.map(|v| v.value()).unwrap_or(1);
                    meta.insert(KEY_INBOX_COUNT, count.saturating_sub(1))?;
                    taken = Some(entry);
                }
            }
            if taken.is_some() {
                tx.commit()?;
            } else {
                tx.abort()?;
            }
            Ok((taken, wake))
        })
        .await
    }

    /// Messages waiting for the application.
    pub async fn inbox_len(&self) -> Result<u64, StoreError> {
        self.run(|db, _| {
            let tx = db.begin_read()?;
            Ok(tx.open_table(INBOX)?.len()?)
        })
        .await
    }
}
