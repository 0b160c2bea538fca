//! Durable node state in one redb file (DESIGN §2): known peers, verified agent cards, this
//! node's own skills, the mailbox it holds for others, and the call log.
//!
//! Every table is bounded ([`StoreLimits`]). Each write is one redb transaction, fsynced on
//! commit, so a write that returned is on disk. redb is a blocking API: every call here runs on
//! tokio's blocking pool, never on the async worker threads.
//!
//! Records are CBOR. Keys are built by hand as byte strings so that ranges are plain byte ranges:
//! `lp(peer)` is a peer id prefixed by its length, which keeps one peer's keys contiguous.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use libp2p::{Multiaddr, PeerId};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use skillmesh_protocol::{
    CallId, ErrorCode, MessageId, SkillName, SkillSpec, Timestamp, from_cbor, to_cbor,
};

/// The layout version of the store. Bump it with a migration when a table's format changes.
pub const SCHEMA_VERSION: u64 = 1;
/// File name of the store inside the data dir.
pub const STORE_FILE: &str = "store.redb";

/// redb page cache.
const CACHE_BYTES: usize = 4 * 1024 * 1024;
/// Largest record we decode from our own tables; anything bigger is corruption.
const MAX_RECORD_BYTES: usize = 2 * 1024 * 1024;

const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
const PEERS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("peers");
const CARDS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("cards");
const SKILLS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("skills");
/// `lp(recipient) || arrival seq (u64 BE)` -> [`MailRecord`]: one recipient's mail in arrival order.
const MAIL: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("mail");
/// `expires_at (u64 BE) || mail key` -> (): what to purge next.
const MAIL_EXPIRY: TableDefinition<'_, &[u8], ()> = TableDefinition::new("mail_expiry");
/// message id -> mail key: dedupe deposits, find acked messages.
const MAIL_IDS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("mail_ids");
/// `'r' || peer` or `'s' || peer` -> (count, bytes) held for a recipient / from a sender.
const MAIL_USAGE: TableDefinition<'_, &[u8], (u64, u64)> = TableDefinition::new("mail_usage");
/// `log seq (u64 BE) || call id || direction` -> [`CallLogEntry`], in the order calls were first
/// logged: a counter, not a clock, so calls within one millisecond keep their order.
const CALL_LOG: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("call_log");

/// A call log key: `log seq (u64 BE) || call id || direction`.
type LogKey = [u8; 25];
/// `call id || direction`, the last 17 bytes of a [`LogKey`].
type IndexKey = [u8; 17];

/// `call id || direction` -> its call log key, for every entry the log holds: how an update
/// (a call's state changed) finds its entry. It lives in memory, rebuilt from the log's keys on
/// open, at most `max_call_log` entries. As a table it cost each logged call three B-tree
/// operations more (the lookup, the insert, the removal once the entry is dropped): a third of
/// the log's commits, which at 64 calls in flight were the node's largest cost.
type CallIndex = Arc<Mutex<HashMap<IndexKey, LogKey>>>;

mod inbox;
pub(crate) use inbox::OlmState;
pub use inbox::{Accepted, InboxEntry, SessionRow};
use inbox::{INBOX, INBOX_MARK, OLM, OUT_SEQ};

const KEY_SCHEMA: &str = "schema_version";
const KEY_MAIL_SEQ: &str = "next_mail_seq";
const KEY_MAIL_BYTES: &str = "mail_bytes";
const KEY_CALL_SEQ: &str = "next_call_seq";

/// Bounds on every table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreLimits {
    /// Peers remembered; the least recently seen is forgotten first.
    pub max_peers: u64,
    /// Cards cached; expired ones go first, then the soonest to expire.
    pub max_cards: u64,
    /// Skills this node serves.
    pub max_skills: u64,
    /// Call log entries; the oldest go first.
    pub max_call_log: u64,
    /// Mail held for one recipient.
    pub mail_per_recipient: u64,
    /// Bytes held for one recipient.
    pub mail_bytes_per_recipient: u64,
    /// Mail held from one sender, all recipients together.
    pub mail_per_sender: u64,
    /// Bytes held from one sender.
    pub mail_bytes_per_sender: u64,
    /// Bytes of mail held in all.
    pub mail_bytes_total: u64,
}

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits {
            max_peers: 10_000,
            max_cards: 10_000,
            max_skills: skillmesh_protocol::MAX_SKILLS_PER_CARD as u64,
            max_call_log: 10_000,
            mail_per_recipient: 1_000,
            mail_bytes_per_recipient: 64 * 1024 * 1024,
            mail_per_sender: 1_000,
            mail_bytes_per_sender: 64 * 1024 * 1024,
            mail_bytes_total: 1024 * 1024 * 1024,
        }
    }
}

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store file could not be opened.
    #[error("cannot open store {path}: {source} (is another skillmesh node using this data dir?)")]
    Open {
        /// The store file.
        path: PathBuf,
        /// Why.
        source: Box<redb::DatabaseError>,
    },
    /// Written by a newer skillmesh.
    #[error(
        "store schema version {found} is newer than this skillmesh supports ({supported}); upgrade skillmesh"
    )]
    NewerSchema {
        /// Version on disk.
        found: u64,
        /// Version of this build.
        supported: u64,
    },
    /// A database error.
    #[error("store error: {0}")]
    Db(Box<redb::Error>),
    /// A record does not decode.
    #[error("corrupt record in table {table}: {reason}")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// What failed.
        reason: String,
    },
    /// A card with a sequence number not above the stored one.
    #[error("stale card: have seq {have}, got {got}")]
    StaleCard {
        /// Stored seq.
        have: u64,
        /// Offered seq.
        got: u64,
    },
    /// A table is at its limit.
    #[error("{table} is full ({limit} entries)")]
    Full {
        /// The table.
        table: &'static str,
        /// Its limit.
        limit: u64,
    },
    /// A mailbox quota would be exceeded.
    #[error("mailbox quota exceeded: {0}")]
    MailQuota(MailQuota),
    /// The blocking task did not finish (the runtime is shutting down).
    #[error("store task failed: {0}")]
    Task(String),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(Box::new(e.into()))
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// Which mailbox quota a deposit would break.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MailQuota {
    /// Messages for the recipient.
    RecipientCount,
    /// Bytes for the recipient.
    RecipientBytes,
    /// Messages from the sender.
    SenderCount,
    /// Bytes from the sender.
    SenderBytes,
    /// Bytes in the whole mailbox.
    Total,
}

impl std::fmt::Display for MailQuota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MailQuota::RecipientCount => "too many messages waiting for the recipient",
            MailQuota::RecipientBytes => "too many bytes waiting for the recipient",
            MailQuota::SenderCount => "too many messages waiting from this sender",
            MailQuota::SenderBytes => "too many bytes waiting from this sender",
            MailQuota::Total => "the mailbox is full",
        })
    }
}

/// What we know of a peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    /// The peer.
    pub peer: PeerId,
    /// Addresses it was reached at or announced.
    pub addrs: Vec<Multiaddr>,
    /// When it was last connected.
    pub last_seen: Timestamp,
}

/// A verified agent card as stored: the envelope is kept as received, signature and all.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCard {
    /// The card's seq.
    pub seq: u64,
    /// The card's expiry.
    pub expires_at: Timestamp,
    /// The signed card envelope.
    pub envelope: ByteBuf,
}

/// A message held for an offline recipient.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailRecord {
    /// sha256 of the sealed message payload.
    pub id: MessageId,
    /// Who sent it.
    pub sender: PeerId,
    /// Who may fetch it.
    pub recipient: PeerId,
    /// When it arrived.
    pub deposited_at: Timestamp,
    /// When it will be dropped.
    pub expires_at: Timestamp,
    /// The sealed message envelope.
    pub envelope: ByteBuf,
}

/// Whether a deposit was new.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deposited {
    /// Stored now.
    Stored,
    /// Already held (a sender retrying); nothing changed.
    Duplicate,
}

/// Which side of a call this node was on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// We called.
    Outbound,
    /// We were called.
    Inbound,
}

/// The lifecycle of a call (DESIGN §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CallState {
    /// Created, not yet sent.
    Pending,
    /// Sent toward the callee.
    Routed,
    /// Accepted, waiting for a slot.
    Queued,
    /// The handler runs.
    Running,
    /// Finished with a result.
    Completed,
    /// Finished with an error.
    Failed,
    /// Ran out of time.
    Timeout,
    /// Stopped by the caller.
    Cancelled,
}

/// One line of the call log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallLogEntry {
    /// The call.
    pub call_id: CallId,
    /// Our side.
    pub direction: Direction,
    /// The other side.
    pub peer: PeerId,
    /// The skill.
    pub skill: SkillName,
    /// Where it is.
    pub state: CallState,
    /// Why it failed, if it did.
    pub error: Option<ErrorCode>,
    /// When it started.
    pub started_at: Timestamp,
    /// When its state last changed.
    pub updated_at: Timestamp,
}

/// The node's store. Cheap to clone; all clones share one database.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    limits: StoreLimits,
    call_index: CallIndex,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("limits", &self.limits)
            .finish()
    }
}

impl Store {
    /// Opens (or creates) the store at `path` and checks its schema version.
    pub async fn open(path: &Path, limits: StoreLimits) -> Result<Self, StoreError> {
        let path = path.to_owned();
        let (db, index) = tokio::task::spawn_blocking(move || {
            let db = Self::open_blocking(&path)?;
            let index = load_call_index(&db)?;
            Ok::<_, StoreError>((db, index))
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))??;
        Ok(Store {
            db: Arc::new(db),
            limits,
            call_index: Arc::new(Mutex::new(index)),
        })
    }

    fn open_blocking(path: &Path) -> Result<Database, StoreError> {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        // A small page cache: the node's tables are small and hot paths do not read them;
        // redb's default would let the cache grow to a large share of RSS.
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|source| StoreError::Open {
                path: path.to_owned(),
                source: Box::new(source),
            })?;
        let tx = db.begin_write()?;
        {
            let mut meta = tx.open_table(META)?;
            let found = meta.get(KEY_SCHEMA)?.map(|v| v.value());
            match found {
                None => {
                    meta.insert(KEY_SCHEMA, SCHEMA_VERSION)?;
                }
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(StoreError::NewerSchema {
                        found: v,
                        supported: SCHEMA_VERSION,
                    });
                }
                // Older versions would be migrated here; version 1 is the first.
                Some(_) => {}
            }
            // Create every table so that readers never meet a missing one.
            tx.open_table(PEERS)?;
            tx.open_table(CARDS)?;
            tx.open_table(SKILLS)?;
            tx.open_table(MAIL)?;
            tx.open_table(MAIL_EXPIRY)?;
            tx.open_table(MAIL_IDS)?;
            tx.open_table(MAIL_USAGE)?;
            tx.open_table(CALL_LOG)?;
            tx.open_table(OLM)?;
            tx.open_table(OUT_SEQ)?;
            tx.open_table(INBOX)?;
            tx.open_table(INBOX_MARK)?;
        }
        tx.commit()?;
        Ok(db)
    }

    /// The limits in force.
    pub fn limits(&self) -> &StoreLimits {
        &self.limits
    }

    /// Runs `f` on the blocking pool.
    async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database, &StoreLimits) -> Result<T, StoreError> + Send + 'static,
    {
        let db = self.db.clone();
        let limits = self.limits.clone();
        tokio::task::spawn_blocking(move || f(&db, &limits))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Runs `f` on the process's low-priority thread (`background`): for writes that must
    /// never take a core from a call.
    async fn run_in_background<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database, &StoreLimits) -> Result<T, StoreError> + Send + 'static,
    {
        let db = self.db.clone();
        let limits = self.limits.clone();
        crate::background::run(move || f(&db, &limits))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// The schema version on disk.
    pub async fn schema_version(&self) -> Result<u64, StoreError> {
        self.run(|db, _| {
            let tx = db.begin_read()?;
            let meta = tx.open_table(META)?;
            Ok(meta.get(KEY_SCHEMA)?.map(|v| v.value()).unwrap_or(0))
        })
        .await
    }

    // ---- peers -------------------------------------------------------------------------------

    /// Records a peer, forgetting the least recently seen one if the table is full.
    pub async fn put_peer(&self, record: PeerRecord) -> Result<(), StoreError> {
        self.run(move |db, limits| {
            let tx = db.begin_write()?;
            {
                let mut t = tx.open_table(PEERS)?;
                let key = record.peer.to_bytes();
                if t.get(key.as_slice())?.is_none() && t.len()? >= limits.max_peers {
                    let mut oldest: Option<(Vec<u8>, Timestamp)> = None;
                    for row in t.iter()? {
                        let (k, v) = row?;
                        let r: PeerRecord = decode("peers", v.value())?;
                        if oldest.as_ref().is_none_or(|(_, t)| r.last_seen < *t) {
                            oldest = Some((k.value().to_vec(), r.last_seen));
                        }
                    }
                    if let Some((k, _)) = oldest {
                        t.remove(k.as_slice())?;
                    }
                }
                t.insert(key.as_slice(), to_cbor(&record).as_slice())?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// A peer's record.
    pub async fn peer(&self, peer: PeerId) -> Result<Option<PeerRecord>, StoreError> {
        self.run(move |db, _| get(db, PEERS, "peers", peer.to_bytes().as_slice()))
            .await
    }

    /// Every known peer.
    pub async fn peers(&self) -> Result<Vec<PeerRecord>, StoreError> {
        self.run(|db, _| all(db, PEERS, "peers")).await
    }

    // ---- cards -------------------------------------------------------------------------------

    /// Stores a verified card if its seq is higher than the stored one's. The caller verifies
    /// the envelope first; this keeps the seq monotonic per peer.
    pub async fn put_card(
        &self,
        peer: PeerId,
        card: StoredCard,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.run(move |db, limits| {
            let tx = db.begin_write()?;
            {
                let mut t = tx.open_table(CARDS)?;
                let key = peer.to_bytes();
                let existing: Option<StoredCard> = match t.get(key.as_slice())? {
                    Some(v) => Some(decode("cards", v.value())?),
                    None => None,
                };
                if let Some(have) = existing {
                    if have.seq >= card.seq {
                        return Err(StoreError::StaleCard {
                            have: have.seq,
                            got: card.seq,
                        });
                    }
                } else if t.len()? >= limits.max_cards {
                    make_room_for_card(&mut t, now, limits.max_cards)?;
                }
                t.insert(key.as_slice(), to_cbor(&card).as_slice())?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// A peer's card, if stored and not expired at `now`.
    pub async fn card(
        &self,
        peer: PeerId,
        now: Timestamp,
    ) -> Result<Option<StoredCard>, StoreError> {
        let card: Option<StoredCard> = self
            .run(move |db, _| get(db, CARDS, "cards", peer.to_bytes().as_slice()))
            .await?;
        Ok(card.filter(|c| c.expires_at >= now))
    }

    // ---- skills ------------------------------------------------------------------------------

    /// Saves one of this node's skills (replacing one of the same name).
    pub async fn put_skill(&self, spec: SkillSpec) -> Result<(), StoreError> {
        self.run(move |db, limits| {
            let tx = db.begin_write()?;
            {
                let mut t = tx.open_table(SKILLS)?;
                let name = spec.name.as_str();
                if t.get(name)?.is_none() && t.len()? >= limits.max_skills {
                    return Err(StoreError::Full {
                        table: "skills",
                        limit: limits.max_skills,
                    });
                }
                t.insert(name, to_cbor(&spec).as_slice())?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Removes a skill; returns whether it was there.
    pub async fn remove_skill(&self, name: SkillName) -> Result<bool, StoreError> {
        self.run(move |db, _| {
            let tx = db.begin_write()?;
            let removed = tx.open_table(SKILLS)?.remove(name.as_str())?.is_some();
            tx.commit()?;
            Ok(removed)
        })
        .await
    }

    /// This node's skills, by name.
    pub async fn skills(&self) -> Result<Vec<SkillSpec>, StoreError> {
        self.run(|db, _| all(db, SKILLS, "skills")).await
    }

    // ---- mailbox -----------------------------------------------------------------------------

    /// Stores messages for their recipients in one transaction (one fsync for the batch), each
    /// within its quotas. Results are in input order; a refused message does not affect others.
    pub async fn deposit_mail(
        &self,
        records: Vec<MailRecord>,
    ) -> Result<Vec<Result<Deposited, MailQuota>>, StoreError> {
        self.run(move |db, limits| {
            let tx = db.begin_write()?;
            let mut results = Vec::with_capacity(records.len());
            {
                let mut meta = tx.open_table(META)?;
                let mut mail = tx.open_table(MAIL)?;
                let mut expiry = tx.open_table(MAIL_EXPIRY)?;
                let mut ids = tx.open_table(MAIL_IDS)?;
                let mut usage = tx.open_table(MAIL_USAGE)?;
                let mut seq = meta.get(KEY_MAIL_SEQ)?.map(|v| v.value()).unwrap_or(0);
                let mut total = meta.get(KEY_MAIL_BYTES)?.map(|v| v.value()).unwrap_or(0);
                for r in records {
                    if ids.get(r.id.0.as_slice())?.is_some() {
                        results.push(Ok(Deposited::Duplicate));
                        continue;
                    }
                    let size = r.envelope.len() as u64;
                    let rkey = usage_key(b'r', &r.recipient);
                    let skey = usage_key(b's', &r.sender);
                    let (rc, rb) = usage
                        .get(rkey.as_slice())?
                        .map(|v| v.value())
                        .unwrap_or((0, 0));
                    let (sc, sb) = usage
                        .get(skey.as_slice())?
                        .map(|v| v.value())
                        .unwrap_or((0, 0));
                    let refused = if rc + 1 > limits.mail_per_recipient {
                        Some(MailQuota::RecipientCount)
                    } else if rb + size > limits.mail_bytes_per_recipient {
                        Some(MailQuota::RecipientBytes)
                    } else if sc + 1 > limits.mail_per_sender {
                        Some(MailQuota::SenderCount)
                    } else if sb + size > limits.mail_bytes_per_sender {
                        Some(MailQuota::SenderBytes)
                    } else if total + size > limits.mail_bytes_total {
                        Some(MailQuota::Total)
                    } else {
                        None
                    };
                    if let Some(q) = refused {
                        results.push(Err(q));
                        continue;
                    }
                    let key = mail_key(&r.recipient, seq);
                    seq += 1;
                    total += size;
                    mail.insert(key.as_slice(), to_cbor(&r).as_slice())?;
                    expiry.insert(expiry_key(r.expires_at, &key).as_slice(), ())?;
                    ids.insert(r.id.0.as_slice(), key.as_slice())?;
                    usage.insert(rkey.as_slice(), (rc + 1, rb + size))?;
                    usage.insert(skey.as_slice(), (sc + 1, sb + size))?;
                    results.push(Ok(Deposited::Stored));
                }
                meta.insert(KEY_MAIL_SEQ, seq)?;
                meta.insert(KEY_MAIL_BYTES, total)?;
            }
            tx.commit()?;
            Ok(results)
        })
        .await
    }

    /// Up to `limit` unexpired messages for `recipient`, oldest first, and whether more wait.
    pub async fn fetch_mail(
        &self,
        recipient: PeerId,
        limit: usize,
        now: Timestamp,
    ) -> Result<(Vec<MailRecord>, bool), StoreError> {
        self.run(move |db, _| {
            let tx = db.begin_read()?;
            let t = tx.open_table(MAIL)?;
            let (lo, hi) = peer_range(&recipient);
            let mut out = Vec::new();
            let mut more = false;
            for row in t.range(lo.as_slice()..hi.as_slice())? {
                let r: MailRecord = decode("mail", row?.1.value())?;
                if r.expires_at < now {
                    continue;
                }
                if out.len() == limit {
                    more = true;
                    break;
                }
                out.push(r);
            }
            Ok((out, more))
        })
        .await
    }

    /// Deletes `recipient`'s messages with these ids; ids of others' mail are ignored. Returns
    /// how many were deleted.
    pub async fn ack_mail(
        &self,
        recipient: PeerId,
        acked: Vec<MessageId>,
    ) -> Result<u64, StoreError> {
        self.run(move |db, _| {
            let tx = db.begin_write()?;
            let mut n = 0;
            {
                let ids = tx.open_table(MAIL_IDS)?;
                let mut keys = Vec::new();
                let prefix = lp(&recipient);
                for id in &acked {
                    if let Some(k) = ids.get(id.0.as_slice())?
                        && k.value().starts_with(&prefix)
                    {
                        keys.push(k.value().to_vec());
                    }
                }
                drop(ids);
                for k in keys {
                    n += remove_mail(&tx, &k)? as u64;
                }
            }
            tx.commit()?;
            Ok(n)
        })
        .await
    }

    /// Deletes all mail expired at `now`; returns how many.
    pub async fn purge_expired_mail(&self, now: Timestamp) -> Result<u64, StoreError> {
        self.run(move |db, _| {
            let tx = db.begin_write()?;
            let mut n = 0;
            {
                let expiry = tx.open_table(MAIL_EXPIRY)?;
                let hi = (now.as_millis()).to_be_bytes();
                let mut keys = Vec::new();
                for row in expiry.range(..hi.as_slice())? {
                    keys.push(row?.0.value()[8..].to_vec());
                }
                drop(expiry);
                for k in keys {
                    n += remove_mail(&tx, &k)? as u64;
                }
            }
            tx.commit()?;
            Ok(n)
        })
        .await
    }

    /// Messages and bytes held for `recipient`.
    pub async fn mail_usage(&self, recipient: PeerId) -> Result<(u64, u64), StoreError> {
        self.run(move |db, _| {
            let tx = db.begin_read()?;
            let t = tx.open_table(MAIL_USAGE)?;
            Ok(t.get(usage_key(b'r', &recipient).as_slice())?
                .map(|v| v.value())
                .unwrap_or((0, 0)))
        })
        .await
    }

    // ---- call log ----------------------------------------------------------------------------

    /// Adds calls or updates their state in one transaction, dropping the oldest entries
    /// beyond the limit. With `durable` false the commit is not
    /// fsynced (a later durable commit, or a clean close, persists it): the call log is a
    /// record for people, and must not cost every call a disk flush.
    pub async fn log_calls(
        &self,
        entries: Vec<CallLogEntry>,
        durable: bool,
    ) -> Result<(), StoreError> {
        let index = self.call_index.clone();
        self.run(move |db, limits| write_call_log(db, limits, &index, entries, durable))
            .await
    }

    /// [`Store::log_calls`] on the process's low-priority thread (`background`), where the
    /// commit never takes a core from a call.
    pub(crate) async fn log_calls_in_background(
        &self,
        entries: Vec<CallLogEntry>,
        durable: bool,
    ) -> Result<(), StoreError> {
        let index = self.call_index.clone();
        self.run_in_background(move |db, limits| {
            write_call_log(db, limits, &index, entries, durable)
        })
        .await
    }

    /// The newest `limit` call log entries, newest first.
    pub async fn recent_calls(&self, limit: usize) -> Result<Vec<CallLogEntry>, StoreError> {
        self.run(move |db, _| {
            let tx = db.begin_read()?;
            let t = tx.open_table(CALL_LOG)?;
            let mut out = Vec::new();
            for row in t.iter()?.rev().take(limit) {
                out.push(decode("call_log", row?.1.value())?);
            }
            Ok(out)
        })
        .await
    }
}

/// Adds or updates `entries` in one transaction, dropping the oldest beyond the limit.
fn write_call_log(
    db: &Database,
    limits: &StoreLimits,
    index: &Mutex<HashMap<IndexKey, LogKey>>,
    entries: Vec<CallLogEntry>,
    durable: bool,
) -> Result<(), StoreError> {
    // Held through the commit: the index follows the log's transactions one by one.
    let mut index = index.lock().unwrap_or_else(|e| e.into_inner());
    let written = write_call_log_tx(db, limits, &mut index, entries, durable);
    if written.is_err() {
        // The index may hold what the failed transaction did not: read it again from the log.
        *index = load_call_index(db).unwrap_or_else(|e| {
            // Updates then log a call's new state as a new entry instead of replacing the old.
            tracing::warn!("call log index not reloaded: {e}");
            HashMap::new()
        });
    }
    written
}

fn write_call_log_tx(
    db: &Database,
    limits: &StoreLimits,
    index: &mut HashMap<IndexKey, LogKey>,
    entries: Vec<CallLogEntry>,
    durable: bool,
) -> Result<(), StoreError> {
    let mut tx = db.begin_write()?;
    if !durable {
        let _ = tx.set_durability(redb::Durability::None);
    }
    {
        let mut log = tx.open_table(CALL_LOG)?;
        let mut meta = tx.open_table(META)?;
        let mut seq = meta.get(KEY_CALL_SEQ)?.map(|v| v.value()).unwrap_or(0);
        for entry in entries {
            let ikey = call_index_key(&entry.call_id, entry.direction);
            let key = *index.entry(ikey).or_insert_with(|| {
                let mut k = LogKey::default();
                k[..8].copy_from_slice(&seq.to_be_bytes());
                k[8..].copy_from_slice(&ikey);
                seq += 1;
                k
            });
            log.insert(key.as_slice(), to_cbor(&entry).as_slice())?;
        }
        meta.insert(KEY_CALL_SEQ, seq)?;
        while log.len()? > limits.max_call_log {
            let Some((k, _)) = log.pop_first()? else {
                break;
            };
            if let Some(ikey) = index_key_of(k.value()) {
                index.remove(&ikey);
            }
        }
    }
    tx.commit()?;
    Ok(())
}

/// The call index of the entries in the log (see [`CallIndex`]).
fn load_call_index(db: &Database) -> Result<HashMap<IndexKey, LogKey>, StoreError> {
    let tx = db.begin_read()?;
    let log = tx.open_table(CALL_LOG)?;
    let mut index = HashMap::new();
    for row in log.iter()? {
        let (k, _) = row?;
        if let (Some(ikey), Ok(key)) = (index_key_of(k.value()), LogKey::try_from(k.value())) {
            index.insert(ikey, key);
        }
    }
    Ok(index)
}

/// The `call id || direction` part of a call log key.
fn index_key_of(key: &[u8]) -> Option<IndexKey> {
    key.get(8..).and_then(|k| IndexKey::try_from(k).ok())
}

fn decode<T: DeserializeOwned>(table: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    from_cbor(bytes, MAX_RECORD_BYTES).map_err(|e| StoreError::Corrupt {
        table,
        reason: e.to_string(),
    })
}

fn get<T: DeserializeOwned>(
    db: &Database,
    def: TableDefinition<'_, &[u8], &[u8]>,
    name: &'static str,
    key: &[u8],
) -> Result<Option<T>, StoreError> {
    let tx = db.begin_read()?;
    let t = tx.open_table(def)?;
    let v = t.get(key)?;
    v.map(|v| decode(name, v.value())).transpose()
}

fn all<K: redb::Key + 'static, T: DeserializeOwned>(
    db: &Database,
    def: TableDefinition<'_, K, &[u8]>,
    name: &'static str,
) -> Result<Vec<T>, StoreError> {
    let tx = db.begin_read()?;
    let t = tx.open_table(def)?;
    let mut out = Vec::new();
    for row in t.iter()? {
        out.push(decode(name, row?.1.value())?);
    }
    Ok(out)
}

fn make_room_for_card(
    t: &mut redb::Table<'_, &[u8], &[u8]>,
    now: Timestamp,
    limit: u64,
) -> Result<(), StoreError> {
    // Expired cards first; if none, the one that expires soonest.
    let mut victim: Option<(Vec<u8>, Timestamp)> = None;
    for row in t.iter()? {
        let (k, v) = row?;
        let c: StoredCard = decode("cards", v.value())?;
        if c.expires_at < now {
            victim = Some((k.value().to_vec(), c.expires_at));
            break;
        }
        if victim.as_ref().is_none_or(|(_, e)| c.expires_at < *e) {
            victim = Some((k.value().to_vec(), c.expires_at));
        }
    }
    match victim {
        Some((k, _)) => {
            t.remove(k.as_slice())?;
            Ok(())
        }
        None => Err(StoreError::Full {
            table: "cards",
            limit,
        }),
    }
}

/// Removes one message by its mail key and updates the indexes and usage; false if absent.
fn remove_mail(tx: &redb::WriteTransaction, key: &[u8]) -> Result<bool, StoreError> {
    let mut mail = tx.open_table(MAIL)?;
    let Some(v) = mail.remove(key)? else {
        return Ok(false);
    };
    let r: MailRecord = decode("mail", v.value())?;
    drop(v);
    let size = r.envelope.len() as u64;
    tx.open_table(MAIL_EXPIRY)?
        .remove(expiry_key(r.expires_at, key).as_slice())?;
    tx.open_table(MAIL_IDS)?.remove(r.id.0.as_slice())?;
    let mut usage = tx.open_table(MAIL_USAGE)?;
    for (kind, peer) in [(b'r', &r.recipient), (b's', &r.sender)] {
        let k = usage_key(kind, peer);
        let (c, b) = usage
            .get(k.as_slice())?
            .map(|v| v.value())
            .unwrap_or((0, 0));
        if c <= 1 {
            usage.remove(k.as_slice())?;
        } else {
            usage.insert(k.as_slice(), (c - 1, b.saturating_sub(size)))?;
        }
    }
    let mut meta = tx.open_table(META)?;
    let total = meta.get(KEY_MAIL_BYTES)?.map(|v| v.value()).unwrap_or(0);
    meta.insert(KEY_MAIL_BYTES, total.saturating_sub(size))?;
    Ok(true)
}

/// A peer id prefixed by its length, so one peer's keys form a contiguous range.
fn lp(peer: &PeerId) -> Vec<u8> {
    let b = peer.to_bytes();
    let mut out = Vec::with_capacity(b.len() + 1);
    out.push(u8::try_from(b.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(&b);
    out
}

fn peer_range(peer: &PeerId) -> (Vec<u8>, Vec<u8>) {
    let lo = lp(peer);
    let mut hi = lo.clone();
    hi.extend_from_slice(&[0xff; 9]);
    (lo, hi)
}

fn mail_key(recipient: &PeerId, seq: u64) -> Vec<u8> {
    let mut k = lp(recipient);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn expiry_key(expires_at: Timestamp, mail_key: &[u8]) -> Vec<u8> {
    let mut k = expires_at.as_millis().to_be_bytes().to_vec();
    k.extend_from_slice(mail_key);
    k
}

fn usage_key(kind: u8, peer: &PeerId) -> Vec<u8> {
    let mut k = vec![kind];
    k.extend_from_slice(&peer.to_bytes());
    k
}

fn call_index_key(id: &CallId, dir: Direction) -> IndexKey {
    let mut k = IndexKey::default();
    k[..16].copy_from_slice(&id.0);
    k[16] = match dir {
        Direction::Outbound => 0,
        Direction::Inbound => 1,
    };
    k
}
