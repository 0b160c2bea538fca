//! Durable node state in one redb file (docs/architecture.md): verified agent cards, this node's
//! own skills, the mailbox it holds for others, the call log, Olm state and the inbox.
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

use libp2p::PeerId;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use skillmesh_protocol::{
    CallId, ErrorCode, MessageId, Mode, SkillName, SkillSpec, Timestamp, from_cbor, to_cbor,
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

mod async_calls;
mod calls;
mod inbox;
mod mailbox;
use async_calls::{ASYNC_OPEN, ASYNC_RESULTS};
pub use async_calls::{AsyncRecord, KeepResults, OpenCall};
use calls::load_call_index;
pub use calls::{CallLogEntry, CallState, Direction};
pub(crate) use inbox::OlmState;
pub use inbox::{Accepted, InboxEntry, SessionRow};
use inbox::{INBOX, INBOX_MARK, OLM, OUT_SEQ};
pub use mailbox::{Deposited, MailQuota, MailRecord};

const KEY_SCHEMA: &str = "schema_version";
const KEY_MAIL_SEQ: &str = "next_mail_seq";
const KEY_MAIL_BYTES: &str = "mail_bytes";
const KEY_CALL_SEQ: &str = "next_call_seq";

/// Bounds on every table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreLimits {
    /// No longer used: peers are not stored. Accepted, and ignored, so that configuration
    /// files written by `init` before it went still load; `init` does not write it.
    #[serde(skip_serializing)]
    #[doc(hidden)]
    pub max_peers: Option<u64>,
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
            max_peers: None,
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
            tx.open_table(ASYNC_OPEN)?;
            tx.open_table(ASYNC_RESULTS)?;
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
