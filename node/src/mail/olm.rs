//! End-to-end encryption with vodozemac's Olm (3DH + Double Ratchet).
//!
//! The node's Olm account (a Curve25519 identity key, one-time keys and a fallback key) is
//! published in its agent card: the card's Ed25519 signature binds the keys to the PeerId.
//! One-time keys are public in the DHT, so two senders may pick the same one; only the first
//! session can use it. A sender therefore uses a one-time key only when it talks to the
//! recipient directly (a refusal comes back at once and it retries with the fallback key), and
//! the fallback key for mail deposited at a relay, which must never be undecryptable.
//!
//! Everything is pickled with a key derived from the node's Ed25519 secret, so the store holds
//! no usable key material without the identity file.

use std::collections::HashMap;

use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use skillmesh_protocol::{
    CipherKind, MAX_ONE_TIME_KEYS, OneTimeKey, PrekeyBundle, Timestamp, from_cbor, to_cbor,
};
use vodozemac::Curve25519PublicKey;
use vodozemac::olm::{Account, AccountPickle, OlmMessage, Session, SessionConfig, SessionPickle};
use zeroize::Zeroizing;

use crate::store::{OlmState, SessionRow};

/// Sessions kept per peer (each side may open one, plus retries); the least recently used go.
const MAX_SESSIONS_PER_PEER: usize = 4;
/// Peers with sessions kept in memory and on disk.
pub(crate) const MAX_SESSION_PEERS: usize = 10_000;
/// Below this many published one-time keys, new ones are published.
const REPLENISH_BELOW: usize = MAX_ONE_TIME_KEYS / 2;

/// Why a message could not be encrypted or decrypted.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CryptoError {
    #[error("the recipient publishes no prekeys")]
    NoPrekeys,
    #[error("the recipient's prekeys are unusable: {0}")]
    BadPrekeys(String),
    #[error("no session with the sender decrypts this message")]
    NoSession,
    #[error("the message used a one-time key this node no longer has")]
    UnknownPrekey,
    #[error("cannot decrypt: {0}")]
    Decrypt(String),
    #[error("stored Olm state is unreadable: {0}")]
    Corrupt(String),
}

/// The one-time keys currently in the card, by key id.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Published {
    keys: Vec<OneTimeKey>,
    /// vodozemac hands out a fallback key only until it is marked published.
    fallback: Option<OneTimeKey>,
}

struct Held {
    id: String,
    session: Session,
    last_used: Timestamp,
    received: bool,
    /// Opened from one of the peer's one-time keys: until the peer is heard from, its
    /// messages may be undecryptable (another sender may take the key first), so none of
    /// them may wait at a mailbox.
    one_time: bool,
}

impl Held {
    /// Whether a message sealed with this session may wait at a mailbox.
    fn durable(&self) -> bool {
        self.received || !self.one_time
    }
}

/// The node's Olm account and sessions.
pub(crate) struct Crypto {
    account: Account,
    published: Published,
    sessions: HashMap<PeerId, Vec<Held>>,
    pickle_key: Zeroizing<[u8; 32]>,
}

/// A fresh ciphertext and the state to persist before it is sent.
pub(crate) struct Sealed {
    pub(crate) cipher: CipherKind,
    pub(crate) bytes: Vec<u8>,
    pub(crate) session: SessionRow,
    /// Sealed with a session opened from a one-time key that the peer has not confirmed:
    /// on a refusal, or to leave it at a mailbox, seal again with [`Crypto::encrypt`] for a
    /// mailbox.
    pub(crate) unconfirmed_one_time: bool,
}

/// A decrypted message and the state to persist with it.
pub(crate) struct Opened {
    pub(crate) plaintext: Vec<u8>,
    pub(crate) session: SessionRow,
    /// Set when a one-time key was used up: the account and published keys to save.
    pub(crate) account: Option<(Vec<u8>, Vec<u8>)>,
}

/// The pickle key: derived from the identity secret, never stored.
pub(crate) fn pickle_key(identity_secret: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut h = Sha256::new();
    h.update(b"skillmesh/v1/olm-pickle\0");
    h.update(identity_secret);
    Zeroizing::new(h.finalize().into())
}

impl Crypto {
    /// Loads the account and sessions, or creates an account on first start. Returns whether
    /// the account must be saved (new, or keys replenished).
    pub(crate) fn load(
        state: &OlmState,
        pickle_key: Zeroizing<[u8; 32]>,
    ) -> Result<(Self, bool), CryptoError> {
        let (account, fresh) = match &state.account {
            Some(blob) => {
                let text =
                    std::str::from_utf8(blob).map_err(|e| CryptoError::Corrupt(e.to_string()))?;
                let pickle = AccountPickle::from_encrypted(text, &pickle_key)
                    .map_err(|e| CryptoError::Corrupt(format!("account: {e}")))?;
                (Account::from_pickle(pickle), false)
            }
            None => {
                let mut a = Account::new();
                a.generate_fallback_key();
                (a, true)
            }
        };
        let published = match &state.published {
            Some(b) => from_cbor(b, 64 * 1024)
                .map_err(|e| CryptoError::Corrupt(format!("published keys: {e}")))?,
            None => Published::default(),
        };
        let mut sessions: HashMap<PeerId, Vec<Held>> = HashMap::new();
        for row in &state.sessions {
            let pickle = SessionPickle::from_encrypted(&row.pickle, &pickle_key)
                .map_err(|e| CryptoError::Corrupt(format!("session with {}: {e}", row.peer)))?;
            sessions.entry(row.peer).or_default().push(Held {
                id: row.id.clone(),
                session: Session::from_pickle(pickle),
                last_used: row.last_used,
                received: row.received,
                one_time: row.one_time,
            });
        }
        let mut crypto = Crypto {
            account,
            published,
            sessions,
            pickle_key,
        };
        let replenished = crypto.replenish();
        Ok((crypto, fresh || replenished))
    }

    /// Publishes new one-time keys when fewer than half are left. Returns whether it did.
    pub(crate) fn replenish(&mut self) -> bool {
        if self.published.keys.len() >= REPLENISH_BELOW {
            return false;
        }
        let want = MAX_ONE_TIME_KEYS - self.published.keys.len();
        self.account.generate_one_time_keys(want);
        let mut fresh: Vec<_> = self.account.one_time_keys().into_iter().collect();
        fresh.sort_by_key(|(id, _)| id.to_base64());
        for (id, key) in fresh.into_iter().take(want) {
            self.published.keys.push(OneTimeKey {
                id: id.to_base64().into_bytes(),
                key: key.to_bytes(),
            });
        }
        if let Some((id, key)) = self.account.fallback_key().into_iter().next() {
            self.published.fallback = Some(OneTimeKey {
                id: id.to_base64().into_bytes(),
                key: key.to_bytes(),
            });
        }
        self.account.mark_keys_as_published();
        true
    }

    /// The prekey bundle for this node's card.
    pub(crate) fn bundle(&self) -> PrekeyBundle {
        PrekeyBundle {
            identity_key: self.account.curve25519_key().to_bytes(),
            one_time_keys: self.published.keys.clone(),
            fallback_key: self.published.fallback.clone(),
        }
    }

    /// The account and published keys, pickled, for the store.
    pub(crate) fn account_blobs(&self) -> (Vec<u8>, Vec<u8>) {
        (
            self.account.pickle().encrypt(&self.pickle_key).into_bytes(),
            to_cbor(&self.published),
        )
    }

    fn row(&self, peer: PeerId, h: &Held) -> SessionRow {
        SessionRow {
            peer,
            id: h.id.clone(),
            pickle: h.session.pickle().encrypt(&self.pickle_key),
            last_used: h.last_used,
            received: h.received,
            one_time: h.one_time,
        }
    }

    /// Whether a session with `peer` exists (so no prekeys are needed to send).
    pub(crate) fn has_session(&self, peer: &PeerId) -> bool {
        self.sessions.get(peer).is_some_and(|v| !v.is_empty())
    }

    /// Drops a session opened for a delivery that did not happen.
    pub(crate) fn forget(&mut self, peer: &PeerId, id: &str) {
        if let Some(v) = self.sessions.get_mut(peer) {
            v.retain(|h| h.id != id);
        }
    }

    /// Encrypts for `peer` with the best existing session, else a new one from `bundle`.
    ///
    /// With `direct` set (the peer is being reached now, and a refusal comes back at once) a
    /// new session takes one of its one-time keys. Without it the message may wait at a
    /// mailbox, so only a session that cannot be refused is used: one the peer has confirmed,
    /// or one from its fallback key, opened now if need be.
    pub(crate) fn encrypt(
        &mut self,
        peer: PeerId,
        bundle: Option<&PrekeyBundle>,
        direct: bool,
        plaintext: &[u8],
    ) -> Result<(Sealed, Vec<(PeerId, String)>), CryptoError> {
        let mut evicted = Vec::new();
        if self.pick(&peer, direct).is_none() {
            let bundle = bundle.ok_or(CryptoError::NoPrekeys)?;
            let identity = Curve25519PublicKey::from_bytes(bundle.identity_key);
            let (key, one_time) = if direct && !bundle.one_time_keys.is_empty() {
                let i = rand::random_range(0..bundle.one_time_keys.len());
                (bundle.one_time_keys[i].key, true)
            } else {
                let fallback = bundle.fallback_key.as_ref().ok_or(CryptoError::NoPrekeys)?;
                (fallback.key, false)
            };
            let session = self
                .account
                .create_outbound_session(
                    SessionConfig::version_1(),
                    identity,
                    Curve25519PublicKey::from_bytes(key),
                )
                .map_err(|e| CryptoError::BadPrekeys(e.to_string()))?;
            evicted = self.insert(peer, session, false, one_time);
        }
        let i = self.pick(&peer, direct).ok_or(CryptoError::NoSession)?;
        let list = self.sessions.get_mut(&peer).ok_or(CryptoError::NoSession)?;
        let held = list.get_mut(i).ok_or(CryptoError::NoSession)?;
        let message = held
            .session
            .encrypt(plaintext)
            .map_err(|e| CryptoError::Decrypt(e.to_string()))?;
        held.last_used = Timestamp::now();
        let unconfirmed_one_time = !held.durable();
        let (kind, bytes) = message.to_parts();
        let cipher = if kind == 0 {
            CipherKind::PreKey
        } else {
            CipherKind::Normal
        };
        let session = self.row(peer, &self.sessions[&peer][i]);
        Ok((
            Sealed {
                cipher,
                bytes,
                session,
                unconfirmed_one_time,
            },
            evicted,
        ))
    }

    /// Decrypts a message from `peer`.
    pub(crate) fn decrypt(
        &mut self,
        peer: PeerId,
        cipher: CipherKind,
        bytes: &[u8],
    ) -> Result<(Opened, Vec<(PeerId, String)>), CryptoError> {
        let kind = match cipher {
            CipherKind::PreKey => 0,
            CipherKind::Normal => 1,
        };
        let message =
            OlmMessage::from_parts(kind, bytes).map_err(|e| CryptoError::Decrypt(e.to_string()))?;
        let now = Timestamp::now();
        // A known session first: a sender keeps sending pre-key messages until it hears back.
        let sessions = self.sessions.entry(peer).or_default();
        let matching: Vec<usize> = match &message {
            OlmMessage::PreKey(m) => {
                let id = m.session_id();
                sessions
                    .iter()
                    .position(|h| h.id == id)
                    .into_iter()
                    .collect()
            }
            OlmMessage::Normal(_) => {
                let mut order: Vec<usize> = (0..sessions.len()).collect();
                order.sort_by_key(|&i| std::cmp::Reverse(sessions[i].last_used));
                order
            }
        };
        for i in matching {
            if let Ok(plaintext) = sessions[i].session.decrypt(&message) {
                sessions[i].last_used = now;
                sessions[i].received = true;
                let session = self.row(peer, &self.sessions[&peer][i]);
                return Ok((
                    Opened {
                        plaintext,
                        session,
                        account: None,
                    },
                    Vec::new(),
                ));
            }
        }
        let OlmMessage::PreKey(pre) = &message else {
            return Err(CryptoError::NoSession);
        };
        let created = self
            .account
            .create_inbound_session(SessionConfig::version_1(), pre.identity_key(), pre)
            .map_err(|e| match e {
                vodozemac::olm::SessionCreationError::MissingOneTimeKey(_) => {
                    CryptoError::UnknownPrekey
                }
                other => CryptoError::Decrypt(other.to_string()),
            })?;
        let used = pre.one_time_key().to_bytes();
        self.published.keys.retain(|k| k.key != used);
        self.replenish();
        let evicted = self.insert(peer, created.session, true, false);
        let i = self.pick(&peer, true).ok_or(CryptoError::NoSession)?;
        let session = self.row(peer, &self.sessions[&peer][i]);
        Ok((
            Opened {
                plaintext: created.plaintext,
                session,
                account: Some(self.account_blobs()),
            },
            evicted,
        ))
    }

    /// Adds a session as the most recently used; returns sessions evicted to stay in bounds.
    fn insert(
        &mut self,
        peer: PeerId,
        session: Session,
        received: bool,
        one_time: bool,
    ) -> Vec<(PeerId, String)> {
        let mut evicted = Vec::new();
        if !self.sessions.contains_key(&peer) && self.sessions.len() >= MAX_SESSION_PEERS {
            let oldest = self
                .sessions
                .iter()
                .map(|(p, v)| (*p, v.iter().map(|h| h.last_used).max()))
                .min_by_key(|(_, t)| *t)
                .map(|(p, _)| p);
            if let Some(p) = oldest
                && let Some(v) = self.sessions.remove(&p)
            {
                evicted.extend(v.into_iter().map(|h| (p, h.id)));
            }
        }
        let list = self.sessions.entry(peer).or_default();
        if list.len() >= MAX_SESSIONS_PER_PEER {
            list.sort_by_key(|h| h.last_used);
            let h = list.remove(0);
            evicted.push((peer, h.id));
        }
        list.push(Held {
            id: session.session_id(),
            session,
            // Strictly newest, even within one millisecond.
            last_used: Timestamp::now().max(
                list.iter()
                    .map(|h| h.last_used)
                    .max()
                    .map_or(Timestamp(0), |t| {
                        t.saturating_add(std::time::Duration::from_millis(1))
                    }),
            ),
            received,
            one_time,
        });
        evicted
    }

    /// The session to send with (its index in the peer's list): the most recent one that has
    /// heard from the peer, else the most recent; for mail that may wait at a mailbox
    /// (`direct` unset), only sessions that cannot be refused.
    fn pick(&self, peer: &PeerId, direct: bool) -> Option<usize> {
        let list = self.sessions.get(peer)?;
        let usable = |h: &&Held| direct || h.durable();
        let newest = |it: &mut dyn Iterator<Item = (usize, &Held)>| {
            it.max_by_key(|(_, h)| h.last_used).map(|(i, _)| i)
        };
        newest(&mut list.iter().enumerate().filter(|(_, h)| h.received))
            .or_else(|| newest(&mut list.iter().enumerate().filter(|(_, h)| usable(h))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh() -> Crypto {
        let state = OlmState {
            account: None,
            published: None,
            sessions: Vec::new(),
            out_seq: Vec::new(),
        };
        Crypto::load(&state, pickle_key(&rand::random::<[u8; 32]>()))
            .expect("new account")
            .0
    }

    fn peer() -> PeerId {
        PeerId::random()
    }

    #[test]
    fn a_bundle_has_one_time_keys_and_a_fallback_key() {
        let c = fresh();
        let b = c.bundle();
        assert_eq!(b.one_time_keys.len(), MAX_ONE_TIME_KEYS);
        assert!(b.fallback_key.is_some());
    }

    #[test]
    fn messages_decrypt_out_of_order_and_tampering_is_rejected() {
        let (mut alice, mut bob) = (fresh(), fresh());
        let (a, b) = (peer(), peer());
        let bundle = bob.bundle();
        let mut sealed = Vec::new();
        for i in 0..3 {
            let (s, _) = alice
                .encrypt(b, Some(&bundle), false, format!("m{i}").as_bytes())
                .expect("encrypt");
            sealed.push(s);
        }
        let mut bad = sealed[2].bytes.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(bob.decrypt(a, sealed[2].cipher, &bad).is_err());
        // Out of order, and the tampered copy did not spoil the real one.
        for i in [2, 0, 1] {
            let (o, _) = bob
                .decrypt(a, sealed[i].cipher, &sealed[i].bytes)
                .expect("decrypt");
            assert_eq!(o.plaintext, format!("m{i}").into_bytes());
        }
        // Once Bob has answered, Alice sends normal messages; a replayed one does not decrypt
        // twice. (A replayed pre-key message would open a second session from the fallback
        // key: the store's per-sender sequence check stops those before decryption.)
        let (r, _) = bob.encrypt(a, None, false, b"reply").expect("reply");
        assert_eq!(
            alice
                .decrypt(b, r.cipher, &r.bytes)
                .expect("reply")
                .0
                .plaintext,
            b"reply"
        );
        let (n, _) = alice.encrypt(b, None, false, b"normal").expect("encrypt");
        assert_eq!(n.cipher, CipherKind::Normal);
        assert_eq!(
            bob.decrypt(a, n.cipher, &n.bytes)
                .expect("normal")
                .0
                .plaintext,
            b"normal"
        );
        assert!(bob.decrypt(a, n.cipher, &n.bytes).is_err());
    }

    #[test]
    fn mail_for_a_mailbox_never_uses_an_unconfirmed_one_time_key_session() {
        // Sends race: one opens a session from a one-time key for its direct attempt, and
        // others seal with that session before the attempt fails. Their mail must not wait at
        // a mailbox under it: another sender may take the key first, and the eviction of old
        // sessions at the recipient may make a second pre-key message from it unreadable.
        let (mut alice, mut bob) = (fresh(), fresh());
        let (a, b) = (peer(), peer());
        let bundle = bob.bundle();
        let (direct, _) = alice
            .encrypt(b, Some(&bundle), true, b"direct")
            .expect("encrypt");
        assert!(direct.unconfirmed_one_time);
        let (again, _) = alice.encrypt(b, None, true, b"again").expect("reuse");
        assert_eq!(again.session.id, direct.session.id, "direct sends share it");
        assert!(again.unconfirmed_one_time);
        let (deposit, _) = alice
            .encrypt(b, Some(&bundle), false, b"deposit")
            .expect("fallback");
        assert_ne!(deposit.session.id, direct.session.id);
        assert!(!deposit.unconfirmed_one_time && !deposit.session.one_time);
        // Later mail, direct or not, keeps to the durable session, and needs no bundle.
        let (later, _) = alice.encrypt(b, None, false, b"later").expect("durable");
        assert_eq!(later.session.id, deposit.session.id);
        // The fallback-key message opens at Bob even after another sender took every
        // one-time key.
        let (o, _) = bob
            .decrypt(a, deposit.cipher, &deposit.bytes)
            .expect("deposit");
        assert_eq!(o.plaintext, b"deposit");
        let (o, _) = bob.decrypt(a, later.cipher, &later.bytes).expect("later");
        assert_eq!(o.plaintext, b"later");
    }

    #[test]
    fn a_used_one_time_key_is_replaced_and_a_second_use_is_refused() {
        let mut bob = fresh();
        let b = peer();
        let mut bundle = bob.bundle();
        bundle.one_time_keys.truncate(1);
        let (mut first, mut second) = (fresh(), fresh());
        let (s1, _) = first
            .encrypt(b, Some(&bundle), true, b"one")
            .expect("encrypt");
        let (s2, _) = second
            .encrypt(b, Some(&bundle), true, b"two")
            .expect("encrypt");
        assert!(s1.unconfirmed_one_time && s2.unconfirmed_one_time);
        let (o, _) = bob.decrypt(peer(), s1.cipher, &s1.bytes).expect("first");
        assert!(o.account.is_some(), "a used key changes the account");
        assert!(
            !bob.bundle()
                .one_time_keys
                .contains(&bundle.one_time_keys[0])
        );
        assert_eq!(bob.bundle().one_time_keys.len(), MAX_ONE_TIME_KEYS - 1);
        assert!(matches!(
            bob.decrypt(peer(), s2.cipher, &s2.bytes),
            Err(CryptoError::UnknownPrekey)
        ));
    }

    #[test]
    fn state_survives_a_pickle_round_trip() {
        let key = rand::random::<[u8; 32]>();
        let (mut alice, mut bob) = (fresh(), fresh());
        let (a, b) = (peer(), peer());
        let (s, _) = alice
            .encrypt(b, Some(&bob.bundle()), false, b"hi")
            .expect("encrypt");
        let (o, _) = bob.decrypt(a, s.cipher, &s.bytes).expect("decrypt");
        let _ = o;
        let reopen = |c: &Crypto, rows: Vec<SessionRow>| {
            let mut c2 = Crypto {
                account: Account::from_pickle(c.account.pickle()),
                published: c.published.clone(),
                sessions: HashMap::new(),
                pickle_key: Zeroizing::new(key),
            };
            let (acc, published) = c2.account_blobs();
            let state = OlmState {
                account: Some(acc),
                published: Some(published),
                sessions: rows,
                out_seq: Vec::new(),
            };
            c2 = Crypto::load(&state, Zeroizing::new(key)).expect("load").0;
            c2
        };
        // Bob's session, re-pickled under `key`, still decrypts Alice's next message.
        let row = {
            let held = &bob.sessions[&a][bob.pick(&a, true).expect("session")];
            SessionRow {
                peer: a,
                id: held.id.clone(),
                pickle: held.session.pickle().encrypt(&key),
                last_used: held.last_used,
                received: held.received,
                one_time: held.one_time,
            }
        };
        let mut bob2 = reopen(&bob, vec![row]);
        let (s, _) = alice.encrypt(b, None, false, b"again").expect("encrypt");
        let (o, _) = bob2
            .decrypt(a, s.cipher, &s.bytes)
            .expect("decrypt after reload");
        assert_eq!(o.plaintext, b"again");
        // A wrong pickle key is an error, never a silently new account.
        let (acc, _) = bob2.account_blobs();
        let state = OlmState {
            account: Some(acc),
            published: None,
            sessions: Vec::new(),
            out_seq: Vec::new(),
        };
        assert!(Crypto::load(&state, pickle_key(b"another identity")).is_err());
    }
}
