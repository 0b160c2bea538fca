//! `quickcheck` plus `GenRange` and `SliceRandom`, the generator extensions rust-libp2p's unit
//! tests import from their unpublished `quickcheck-ext`. Only vendor/libp2p-kad's tests use it.

pub use upstream::*;

use std::ops::Range;

use num_traits::{PrimInt, Unsigned};

/// A value drawn from a half-open range.
pub trait GenRange {
    /// A value in `range`, which must not be empty.
    fn gen_range<T: PrimInt + Unsigned + Arbitrary>(&mut self, range: Range<T>) -> T;

    /// An index below `len`, which must not be 0.
    fn gen_index(&mut self, len: usize) -> usize {
        self.gen_range(0..len)
    }
}

impl GenRange for Gen {
    fn gen_range<T: PrimInt + Unsigned + Arbitrary>(&mut self, range: Range<T>) -> T {
        let width = range.end - range.start;
        range.start + T::arbitrary(self) % width
    }
}

/// Shuffling and sampling slices.
pub trait SliceRandom {
    /// Puts `items` in a random order (Fisher-Yates).
    fn shuffle<T>(&mut self, items: &mut [T]);

    /// `amount` distinct elements of `items` (all of them if fewer), in a random order.
    fn choose_multiple<'a, T>(
        &mut self,
        items: &'a [T],
        amount: usize,
    ) -> std::iter::Take<std::vec::IntoIter<&'a T>> {
        let mut refs: Vec<&T> = items.iter().collect();
        self.shuffle(&mut refs);
        refs.into_iter().take(amount)
    }
}

impl SliceRandom for Gen {
    fn shuffle<T>(&mut self, items: &mut [T]) {
        for last in (1..items.len()).rev() {
            let other = self.gen_index(last + 1);
            items.swap(last, other);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_shuffles_stay_in_bounds() {
        let mut g = Gen::new(100);
        for _ in 0..1000 {
            let v = g.gen_range(5u32..9);
            assert!((5..9).contains(&v));
        }
        let mut items: Vec<u8> = (0..20).collect();
        g.shuffle(&mut items);
        items.sort_unstable();
        assert_eq!(items, (0..20).collect::<Vec<u8>>());
        assert_eq!(g.choose_multiple(&items, 5).count(), 5);
    }
}
