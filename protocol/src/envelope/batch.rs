//! Batches: one signature over many payloads (a Merkle root; the layout is in the module docs
//! of `envelope`), and many signatures checked in one multiplication.

use sha2::Digest;

use super::*;

/// Signs `items` with one signature per [`MAX_SIGN_BATCH`] of them: the envelopes, in input
/// order. A batch of one is a plain (version 1) envelope; larger ones are version 2, each
/// envelope with its payload's Merkle path (module docs). A signature costs far more than the
/// hashes of a path (the `sign` rows of `cargo bench --bench calls`), so a pipe that signs what
/// queued together pays for one signature per write instead of one per call. `key` must be the key that
/// prepared them.
pub fn sign_batch(key: &SigningKey, items: &[&Unsigned]) -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity(items.len());
    for chunk in items.chunks(MAX_SIGN_BATCH) {
        if let [one] = chunk {
            out.push(one.sign(key));
            continue;
        }
        let leaves: Vec<[u8; 32]> = chunk
            .iter()
            .map(|u| leaf_hash(u.kind, &u.payload))
            .collect();
        let (root, proofs) = merkle(&leaves);
        let sig = key.sign_root(&root);
        let public = key.public_key();
        for (u, proof) in chunk.iter().zip(proofs) {
            let mut e =
                Vec::with_capacity(ENVELOPE_HEADER_BYTES + 2 + 32 * proof.len() + u.payload.len());
            e.extend_from_slice(&MAGIC);
            e.push(BATCH_VERSION);
            e.push(u.kind.code());
            e.extend_from_slice(&public);
            e.extend_from_slice(&sig);
            // At most 6 levels for 64 leaves: both fit a byte.
            e.push(proof.len() as u8);
            e.push(
                proof
                    .iter()
                    .enumerate()
                    .filter(|(_, (_, left))| *left)
                    .fold(0u8, |sides, (i, _)| sides | (1 << i)),
            );
            for (sibling, _) in &proof {
                e.extend_from_slice(sibling);
            }
            e.extend_from_slice(&u.payload);
            out.push(e);
        }
    }
    out
}

/// A leaf's siblings on the way to the root, each with whether it is the left one.
type Path = Vec<([u8; 32], bool)>;

/// The root of a Merkle tree over `leaves` (2..=64 of them) and each leaf's path to it: the
/// siblings, leaf level first, each with whether it is the left one. Pairs are hashed level by
/// level; an odd last node rises to the next level as it is.
fn merkle(leaves: &[[u8; 32]]) -> ([u8; 32], Vec<Path>) {
    let mut proofs: Vec<Path> = vec![Vec::new(); leaves.len()];
    let mut level = leaves.to_vec();
    let mut at: Vec<usize> = (0..leaves.len()).collect();
    while level.len() > 1 {
        for (proof, i) in proofs.iter_mut().zip(&mut at) {
            if let Some(sibling) = level.get(*i ^ 1) {
                proof.push((*sibling, *i % 2 == 1));
            }
            *i /= 2;
        }
        level = level
            .chunks(2)
            .map(|pair| pair.get(1).map_or(pair[0], |r| node_hash(&pair[0], r)))
            .collect();
    }
    (level[0], proofs)
}

/// Envelopes at most per batch multiplication in [`verify_batch`]; larger inputs are split.
/// Past a few dozen the saving per signature hardly grows, and a bad signature sends its
/// whole batch to one-by-one checks.
pub const MAX_BATCH: usize = 64;

/// [`verify`] for many envelopes at once: each gets the same size and header checks, and the
/// signatures of those that pass are checked together, as one multiscalar multiplication, at
/// a fraction of the cost per signature (the `verify` rows of `cargo bench --bench calls`).
/// Envelopes of one signed batch (version 2, same signer, signature and root) share one
/// check. If a batch fails, its signatures are checked one by one, so every envelope gets its
/// own verdict, the same as [`verify`] would give it. Results are in input order.
///
/// The batch equation is ed25519-dalek's (with weights derived from every input, and
/// canonical `s` required); when one key signed them all, as on a call pipe, that key's terms
/// are summed first (see `verify_one_signer`). It can differ from one-by-one `verify_strict`
/// only on a signature its own signer built with a small-order component, which no one else
/// can make: what a third party cannot forge stays unforgeable. Small-order signer keys, under
/// which forgeries can pass a batch equation, never get this far (see `signer_key`).
pub fn verify_batch<'a>(envelopes: &[&'a [u8]]) -> Vec<Result<Verified<'a>, EnvelopeError>> {
    let mut out = Vec::with_capacity(envelopes.len());
    for chunk in envelopes.chunks(MAX_BATCH) {
        let headers: Vec<Result<Header<'a>, EnvelopeError>> =
            chunk.iter().map(|b| header(b)).collect();
        // The distinct signatures to check, and which one each envelope needs. The key is part
        // of what makes two the same: a batch signature copied under another key is not its.
        let mut distinct: Vec<&Header<'a>> = Vec::new();
        // (key, signature, root) of each batch signature seen: its index in `distinct`.
        type Signed = ([u8; 32], [u8; 64], [u8; 32]);
        let mut seen: std::collections::HashMap<Signed, usize> = std::collections::HashMap::new();
        let needs: Vec<Option<usize>> = headers
            .iter()
            .map(|h| {
                let h = h.as_ref().ok()?;
                let mut add = || {
                    distinct.push(h);
                    distinct.len() - 1
                };
                Some(match h.root {
                    Some(root) => *seen
                        .entry((h.key.to_bytes(), h.signature.to_bytes(), root))
                        .or_insert_with(add),
                    None => add(),
                })
            })
            .collect();
        let together = distinct.len() > 1 && {
            let inputs: Vec<Vec<u8>> = distinct.iter().map(|h| h.message()).collect();
            let messages: Vec<&[u8]> = inputs.iter().map(Vec::as_slice).collect();
            let signatures: Vec<ed25519_dalek::Signature> =
                distinct.iter().map(|h| h.signature).collect();
            if distinct.iter().all(|h| h.key == distinct[0].key) {
                verify_one_signer(&distinct[0].key, &messages, &signatures)
            } else {
                let keys: Vec<ed25519_dalek::VerifyingKey> =
                    distinct.iter().map(|h| h.key).collect();
                ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok()
            }
        };
        let good: Vec<bool> = distinct
            .iter()
            .map(|h| together || h.key.verify_strict(&h.message(), &h.signature).is_ok())
            .collect();
        out.extend(headers.into_iter().zip(needs).map(|(h, need)| {
            let h = h?;
            if need.is_some_and(|i| !good[i]) {
                return Err(EnvelopeError::BadSignature);
            }
            Ok(h.verified)
        }));
    }
    out
}

/// ed25519-dalek's batch equation for signatures that one key made (a call pipe's are all its
/// peer's), with that key's terms summed: `[-sum z_i s_i]B + sum [z_i]R_i + [sum z_i h_i]A`
/// must be the identity. It is ed25519-dalek's equation with `A`'s n terms added up, so a
/// batch passes or fails as it would there (weights aside), but the multiplication has n + 2
/// points instead of 2n + 1: each point costs a lookup table and its additions, so a
/// signature costs about a third less (the `verify` rows of `cargo bench --bench calls`).
/// The weights `z_i` are 128-bit, derived like ed25519-dalek's (from its own transcript) from
/// every signature and message in the batch, so no signer can choose inputs that cancel out.
#[allow(non_snake_case)] // the equation's names
pub(super) fn verify_one_signer(
    key: &ed25519_dalek::VerifyingKey,
    messages: &[&[u8]],
    signatures: &[ed25519_dalek::Signature],
) -> bool {
    use curve25519_dalek::constants::ED25519_BASEPOINT_POINT;
    use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
    use curve25519_dalek::scalar::Scalar;
    use curve25519_dalek::traits::{IsIdentity, VartimeMultiscalarMul};
    use sha2::Sha512;

    let mut transcript = Sha512::new();
    transcript.update(b"skillmesh one-signer batch v1");
    transcript.update(key.as_bytes());
    let mut terms = Vec::with_capacity(signatures.len());
    for (message, signature) in messages.iter().zip(signatures) {
        // A non-canonical s is refused, as verify_strict and ed25519-dalek's batch refuse it.
        let Some(s) = Option::<Scalar>::from(Scalar::from_canonical_bytes(*signature.s_bytes()))
        else {
            return false;
        };
        let hram: [u8; 64] = Sha512::new()
            .chain_update(signature.r_bytes())
            .chain_update(key.as_bytes())
            .chain_update(message)
            .finalize()
            .into();
        transcript.update(hram);
        transcript.update(signature.s_bytes());
        terms.push((
            CompressedEdwardsY(*signature.r_bytes()),
            s,
            Scalar::from_bytes_mod_order_wide(&hram),
        ));
    }
    let seed = transcript.finalize();
    let zs: Vec<Scalar> = (0..terms.len() as u64)
        .map(|i| {
            let d = Sha512::new()
                .chain_update(seed)
                .chain_update(i.to_le_bytes())
                .finalize();
            let mut z = [0u8; 16];
            z.copy_from_slice(&d[..16]);
            Scalar::from(u128::from_le_bytes(z))
        })
        .collect();
    let B_coefficient: Scalar = terms.iter().zip(&zs).map(|((_, s, _), z)| z * s).sum();
    let A_coefficient: Scalar = terms.iter().zip(&zs).map(|((_, _, h), z)| z * h).sum();
    let Rs = terms.iter().map(|(r, _, _)| r.decompress());
    EdwardsPoint::optional_multiscalar_mul(
        [-B_coefficient, A_coefficient].into_iter().chain(zs),
        [Some(ED25519_BASEPOINT_POINT), Some(key.to_edwards())]
            .into_iter()
            .chain(Rs),
    )
    .is_some_and(|p| p.is_identity())
}
