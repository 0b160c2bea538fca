//! The mailbox this node holds for others: deposits, fetches, acks, expiry, and the quotas per
//! recipient, per sender and in all.

use super::*;

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

impl Store {
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
