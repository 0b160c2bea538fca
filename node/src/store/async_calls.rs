//! Async calls: those running here for others (so that a restart reports them interrupted),
//! and the signed results of finished ones, both sides, bounded by count and age.

use super::inbox::{SessionRow, put_olm};
use super::*;

/// call id -> [`OpenCall`]: async calls this node accepted and has not finished.
pub(super) const ASYNC_OPEN: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("async_open");
/// `call id || direction` -> [`AsyncRecord`]: finished async calls' results.
pub(super) const ASYNC_RESULTS: TableDefinition<'_, &[u8], &[u8]> =
    TableDefinition::new("async_results");

/// An async call this node runs for a caller.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenCall {
    /// Who asked.
    pub caller: PeerId,
    /// The skill.
    pub skill: SkillName,
    /// When it was accepted.
    pub accepted_at: Timestamp,
}

/// A finished async call's result, as kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AsyncRecord {
    /// The other side: the callee (for our calls), the caller (for calls we ran).
    pub peer: PeerId,
    /// When it was stored.
    pub stored_at: Timestamp,
    /// The callee's signed `call-result` envelope.
    pub result: ByteBuf,
    /// (Callee's side) the caller, or one of its mailboxes, took it.
    #[serde(default)]
    pub delivered: bool,
}

/// How many finished results are kept, and for how long.
#[derive(Clone, Copy, Debug)]
pub struct KeepResults {
    /// At most this many; the oldest go first.
    pub count: u64,
    /// None older than this.
    pub max_age: std::time::Duration,
}

fn result_key(id: &CallId, direction: Direction) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[..16].copy_from_slice(&id.0);
    k[16] = match direction {
        Direction::Outbound => 0,
        Direction::Inbound => 1,
    };
    k
}

impl Store {
    /// Notes an async call accepted for `call.caller`, durably, before it is acknowledged.
    pub async fn open_async(&self, id: CallId, call: OpenCall) -> Result<(), StoreError> {
        self.run(move |db, _| {
            let tx = db.begin_write()?;
            tx.open_table(ASYNC_OPEN)?
                .insert(id.0.as_slice(), to_cbor(&call).as_slice())?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Takes every async call left open (by a node that stopped while they ran).
    pub async fn take_open_async(&self) -> Result<Vec<(CallId, OpenCall)>, StoreError> {
        self.run(move |db, _| {
            let tx = db.begin_write()?;
            let mut out = Vec::new();
            {
                let mut t = tx.open_table(ASYNC_OPEN)?;
                for row in t.iter()? {
                    let (k, v) = row?;
                    if let Ok(id) = <[u8; 16]>::try_from(k.value()) {
                        out.push((CallId(id), decode("async_open", v.value())?));
                    }
                }
                t.retain(|_, _| false)?;
            }
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    /// Keeps the result of async call `id` (and closes it, if it was open here); false if one
    /// was kept already (a second delivery).
    pub async fn put_async_result(
        &self,
        id: CallId,
        direction: Direction,
        record: AsyncRecord,
        keep: KeepResults,
    ) -> Result<bool, StoreError> {
        self.run(move |db, _| {
            let tx = db.begin_write()?;
            let fresh = write_result(&tx, id, direction, &record, keep)?;
            tx.commit()?;
            Ok(fresh)
        })
        .await
    }

    /// A received control message: the ratchet's new state and the result it carried, in one
    /// transaction, so that neither is kept without the other. False if the result was kept
    /// already.
    pub(crate) async fn accept_call_result(
        &self,
        session: SessionRow,
        account: Option<(Vec<u8>, Vec<u8>)>,
        id: CallId,
        record: AsyncRecord,
        keep: KeepResults,
    ) -> Result<bool, StoreError> {
        self.run(move |db, _| {
            let tx = db.begin_write()?;
            let (acc, published) = match &account {
                Some((a, p)) => (Some(a.as_slice()), Some(p.as_slice())),
                None => (None, None),
            };
            put_olm(&tx, Some(&session), acc, published)?;
            let fresh = write_result(&tx, id, Direction::Outbound, &record, keep)?;
            tx.commit()?;
            Ok(fresh)
        })
        .await
    }

    /// Marks the result of async call `id`, run here, as delivered.
    pub async fn async_delivered(&self, id: CallId) -> Result<(), StoreError> {
        self.run(move |db, _| {
            let tx = db.begin_write()?;
            {
                let mut t = tx.open_table(ASYNC_RESULTS)?;
                let key = result_key(&id, Direction::Inbound);
                let record: Option<AsyncRecord> = t
                    .get(key.as_slice())?
                    .map(|v| decode("async_results", v.value()))
                    .transpose()?;
                if let Some(mut r) = record {
                    r.delivered = true;
                    t.insert(key.as_slice(), to_cbor(&r).as_slice())?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Results of async calls run here that no one took yet (a node stopped while it tried).
    pub async fn undelivered_async(&self) -> Result<Vec<(CallId, AsyncRecord)>, StoreError> {
        self.run(move |db, _| {
            let tx = db.begin_read()?;
            let t = tx.open_table(ASYNC_RESULTS)?;
            let mut out = Vec::new();
            for row in t.iter()? {
                let (k, v) = row?;
                let k = k.value();
                if k.get(16) != Some(&1) {
                    continue;
                }
                let r: AsyncRecord = decode("async_results", v.value())?;
                if let (false, Ok(id)) = (r.delivered, <[u8; 16]>::try_from(&k[..16])) {
                    out.push((CallId(id), r));
                }
            }
            Ok(out)
        })
        .await
    }

    /// The kept result of async call `id` on `direction`'s side.
    pub async fn async_result(
        &self,
        id: CallId,
        direction: Direction,
    ) -> Result<Option<AsyncRecord>, StoreError> {
        self.run(move |db, _| {
            let tx = db.begin_read()?;
            let t = tx.open_table(ASYNC_RESULTS)?;
            t.get(result_key(&id, direction).as_slice())?
                .map(|v| decode("async_results", v.value()))
                .transpose()
        })
        .await
    }
}

fn write_result(
    tx: &redb::WriteTransaction,
    id: CallId,
    direction: Direction,
    record: &AsyncRecord,
    keep: KeepResults,
) -> Result<bool, StoreError> {
    if direction == Direction::Inbound {
        tx.open_table(ASYNC_OPEN)?.remove(id.0.as_slice())?;
    }
    let mut t = tx.open_table(ASYNC_RESULTS)?;
    let key = result_key(&id, direction);
    if t.get(key.as_slice())?.is_some() {
        return Ok(false);
    }
    t.insert(key.as_slice(), to_cbor(record).as_slice())?;
    // Bounded: drop what is too old, then the oldest beyond the count. A scan, but of a table
    // of at most `keep.count` rows, on a write that follows a whole call.
    let horizon = Timestamp::now()
        .as_millis()
        .saturating_sub(u64::try_from(keep.max_age.as_millis()).unwrap_or(u64::MAX));
    let mut rows: Vec<(Vec<u8>, u64)> = Vec::new();
    for row in t.iter()? {
        let (k, v) = row?;
        let r: AsyncRecord = decode("async_results", v.value())?;
        rows.push((k.value().to_vec(), r.stored_at.as_millis()));
    }
    rows.sort_by_key(|(_, at)| *at);
    let excess = rows.len().saturating_sub(keep.count as usize);
    for (i, (k, at)) in rows.iter().enumerate() {
        if i < excess || *at < horizon {
            t.remove(k.as_slice())?;
        }
    }
    Ok(true)
}
