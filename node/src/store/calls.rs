//! The call log: every call, both sides, with its state, bounded by `store.max_call_log`.

use super::*;

/// Which side of a call this node was on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// We called.
    Outbound,
    /// We were called.
    Inbound,
}

/// The lifecycle of a call, on both sides. The names are those of A2A task states, one to one
/// (docs/calls.md): `submitted` -> `working` -> `completed` | `failed` | `canceled`, or
/// `rejected` when the callee refused it before running it. Entries written by older versions
/// (`pending`, `running`, `timeout`, `cancelled`, ...) read as the state they became.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CallState {
    /// Sent (caller) or received (callee); not running yet.
    #[serde(alias = "pending", alias = "routed", alias = "queued")]
    Submitted,
    /// The handler runs: an accepted async call, a stream under way.
    #[serde(alias = "running")]
    Working,
    /// Finished with a result.
    Completed,
    /// Ran and failed, ran out of time, or was interrupted by a restart.
    #[serde(alias = "timeout")]
    Failed,
    /// Stopped by the caller.
    #[serde(alias = "cancelled")]
    Canceled,
    /// Refused before it ran: access, limits, unknown skill, bad request.
    Rejected,
}

impl CallState {
    /// Whether the call is over.
    pub fn is_final(self) -> bool {
        !matches!(self, CallState::Submitted | CallState::Working)
    }

    /// The A2A task state name.
    pub fn name(self) -> &'static str {
        match self {
            CallState::Submitted => "submitted",
            CallState::Working => "working",
            CallState::Completed => "completed",
            CallState::Failed => "failed",
            CallState::Canceled => "canceled",
            CallState::Rejected => "rejected",
        }
    }
}

impl std::fmt::Display for CallState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A state a call entered, and when.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// The state entered.
    pub state: CallState,
    /// When, on this node's clock.
    pub at: Timestamp,
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
    /// The mode it ran in.
    #[serde(default)]
    pub mode: Mode,
    /// Every state it entered, in order, with its time.
    #[serde(default)]
    pub history: Vec<Transition>,
}

impl CallLogEntry {
    /// A new entry in `state` as of now.
    pub fn new(
        call_id: CallId,
        direction: Direction,
        peer: PeerId,
        skill: SkillName,
        mode: Mode,
        state: CallState,
    ) -> Self {
        let now = Timestamp::now();
        CallLogEntry {
            call_id,
            direction,
            peer,
            skill,
            state,
            error: None,
            started_at: now,
            updated_at: now,
            mode,
            history: vec![Transition { state, at: now }],
        }
    }

    /// Moves to `state` as of `at`; a final state is never left.
    pub fn enter(&mut self, state: CallState, at: Timestamp) {
        if self.state.is_final() || self.state == state {
            return;
        }
        self.state = state;
        self.updated_at = at;
        self.history.push(Transition { state, at });
    }
}

impl Store {
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

    /// Our log entry of call `id` on the `direction` side, if the log still holds it.
    pub async fn call_entry(
        &self,
        id: CallId,
        direction: Direction,
    ) -> Result<Option<CallLogEntry>, StoreError> {
        let key = {
            let index = self.call_index.lock().unwrap_or_else(|e| e.into_inner());
            index.get(&call_index_key(&id, direction)).copied()
        };
        let Some(key) = key else {
            return Ok(None);
        };
        self.run(move |db, _| {
            let tx = db.begin_read()?;
            let t = tx.open_table(CALL_LOG)?;
            t.get(key.as_slice())?
                .map(|v| decode("call_log", v.value()))
                .transpose()
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
pub(super) fn load_call_index(db: &Database) -> Result<HashMap<IndexKey, LogKey>, StoreError> {
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

fn call_index_key(id: &CallId, dir: Direction) -> IndexKey {
    let mut k = IndexKey::default();
    k[..16].copy_from_slice(&id.0);
    k[16] = match dir {
        Direction::Outbound => 0,
        Direction::Inbound => 1,
    };
    k
}
