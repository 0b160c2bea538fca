//! CBOR encoding with the limits the wire needs: a byte cap before decoding, a depth cap while
//! decoding, and no trailing bytes after the value.

use cbor4ii::core::dec::Read as _;
use cbor4ii::core::utils::SliceReader;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::DecodeError;
use crate::limits::MAX_CBOR_DEPTH;

/// Encodes `value` as CBOR.
pub fn to_cbor<T: Serialize>(value: &T) -> Vec<u8> {
    // Writing into a Vec cannot fail; the error type is only there for io writers.
    cbor4ii::serde::to_vec(Vec::new(), value).unwrap_or_default()
}

/// Decodes one CBOR value of at most `max_len` bytes, rejecting trailing bytes.
pub fn from_cbor<T: DeserializeOwned>(bytes: &[u8], max_len: usize) -> Result<T, DecodeError> {
    if bytes.len() > max_len {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            max: max_len,
        });
    }
    if nesting_depth(bytes) > MAX_CBOR_DEPTH {
        return Err(DecodeError::TooDeep {
            max: MAX_CBOR_DEPTH,
        });
    }
    let mut de = cbor4ii::serde::Deserializer::new(SliceReader::new(bytes));
    let value = T::deserialize(&mut de).map_err(|e| DecodeError::Cbor(e.to_string()))?;
    let mut rest = de.into_inner();
    match rest.fill(1) {
        Ok(r) if r.as_ref().is_empty() => Ok(value),
        _ => Err(DecodeError::TrailingBytes),
    }
}

/// The nesting depth of the CBOR in `bytes`, found without allocating per item.
///
/// cbor4ii allows 256 levels of recursion; we allow far fewer, and check before serde recurses.
/// The scan only follows headers: a malformed item ends the scan and lets the decoder report it.
fn nesting_depth(bytes: &[u8]) -> usize {
    // Items still expected by each open container; `INDEFINITE` waits for a break byte.
    const INDEFINITE: u64 = u64::MAX;
    let mut open: Vec<u64> = Vec::new();
    let mut max = 0;
    let mut i = 0;
    while i < bytes.len() {
        let major = bytes[i] >> 5;
        let info = bytes[i] & 0x1f;
        i += 1;
        let arg = match info {
            0..=23 => Some(u64::from(info)),
            24..=27 => {
                let n = 1usize << (info - 24);
                let Some(b) = bytes.get(i..i + n) else {
                    return max;
                };
                i += n;
                Some(b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
            }
            31 => None,
            _ => return max,
        };
        let items = match (major, arg) {
            (7, None) => {
                // A break closes the innermost indefinite container, which is then one
                // finished item of its parent.
                open.pop();
                finish_item(&mut open);
                continue;
            }
            (6, _) => continue, // a tag wraps the next item and adds no level
            (2 | 3, Some(len)) => {
                i = i.saturating_add(usize::try_from(len).unwrap_or(usize::MAX));
                None
            }
            (2..=5, None) => Some(INDEFINITE),
            (4, Some(n)) => Some(n),
            (5, Some(n)) => Some(n.saturating_mul(2)),
            _ => None,
        };
        match items {
            Some(n) => {
                max = max.max(open.len() + 1);
                if n == 0 {
                    finish_item(&mut open);
                } else {
                    open.push(n);
                }
            }
            None => finish_item(&mut open),
        }
    }
    max
}

/// Counts one finished item against the innermost container, closing every container that
/// this completes.
fn finish_item(open: &mut Vec<u64>) {
    while let Some(top) = open.last_mut() {
        if *top == u64::MAX {
            return;
        }
        *top -= 1;
        if *top > 0 {
            return;
        }
        open.pop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut bytes = to_cbor(&7u32);
        bytes.push(0);
        assert!(matches!(
            from_cbor::<u32>(&bytes, 100),
            Err(DecodeError::TrailingBytes)
        ));
    }

    #[test]
    fn too_large_is_rejected_before_decoding() {
        let bytes = to_cbor(&vec![1u8; 100]);
        assert!(matches!(
            from_cbor::<Vec<u8>>(&bytes, 10),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn deep_nesting_is_rejected() {
        // 100 nested one-element arrays around a 0.
        let mut bytes = vec![0x81u8; 100];
        bytes.push(0x00);
        assert!(matches!(
            from_cbor::<serde_json::Value>(&bytes, 1000),
            Err(DecodeError::TooDeep { .. })
        ));
        let mut ok = vec![0x81u8; 10];
        ok.push(0x00);
        assert!(from_cbor::<serde_json::Value>(&ok, 1000).is_ok());
    }

    #[test]
    fn depth_counts_maps_and_siblings() {
        // [[0], [[0]]] has depth 3, not 4: siblings do not add up.
        let v = serde_json::json!([[0], [[0]]]);
        assert_eq!(nesting_depth(&to_cbor(&v)), 3);
        let v = serde_json::json!({"a": {"b": [1, 2, {"c": 3}]}});
        assert_eq!(nesting_depth(&to_cbor(&v)), 4);
    }
}
