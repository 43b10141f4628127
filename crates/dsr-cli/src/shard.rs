//! `dsr predict --shard I/N`: one of N disjoint parts of the input list, for batch jobs spread
//! over machines (a Kubernetes Indexed Job, a Slurm array; see docs/deploy.md).
//!
//! The inputs are expanded as for a whole run (arguments in order, each folder's and pattern's
//! matches sorted); shard I keeps the inputs whose position k in that list has k mod N = I. The
//! output names are those of the whole run (a repeated stem gets the same `_2` in every shard),
//! so the N shards together give exactly the rows and files of one run over the same inputs.

use std::str::FromStr;

/// Shard `index` of `count` (0 ≤ index < count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// Which part, from 0.
    pub index: usize,
    /// How many parts.
    pub count: usize,
}

impl FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| format!("expected I/N (for example 0/4), got '{s}'"))?;
        let index: usize = i
            .trim()
            .parse()
            .map_err(|_| format!("'{i}' is not a whole number"))?;
        let count: usize = n
            .trim()
            .parse()
            .map_err(|_| format!("'{n}' is not a whole number"))?;
        if count == 0 {
            return Err("the shard count N must be at least 1".into());
        }
        if index >= count {
            return Err(format!(
                "the shard index must be below the count (0 to {}), got {index}/{count}",
                count - 1
            ));
        }
        Ok(Self { index, count })
    }
}

impl Shard {
    /// Whether the input at position `k` of the whole run's list belongs to this shard.
    pub fn holds(&self, k: usize) -> bool {
        k % self.count == self.index
    }

    /// The items of this shard, in their order.
    pub fn select<T>(&self, items: Vec<T>) -> Vec<T> {
        items
            .into_iter()
            .enumerate()
            .filter(|(k, _)| self.holds(*k))
            .map(|(_, item)| item)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_parse_and_partition_the_list() {
        assert_eq!("1/3".parse(), Ok(Shard { index: 1, count: 3 }));
        for bad in ["3/3", "1/0", "1", "a/2", "1/b", "-1/2"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
        let items: Vec<usize> = (0..10).collect();
        let mut seen: Vec<usize> = (0..3)
            .flat_map(|index| Shard { index, count: 3 }.select(items.clone()))
            .collect();
        assert_eq!(
            Shard { index: 2, count: 3 }.select(items.clone()),
            vec![2, 5, 8]
        );
        seen.sort();
        assert_eq!(seen, items);
        assert_eq!(Shard { index: 0, count: 1 }.select(items.clone()), items);
    }
}
