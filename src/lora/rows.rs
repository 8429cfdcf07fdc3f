//! Which adapter each row of a batch runs: one adapter (or the base) for every row, or one per row.
//!
//! Rows with different adapters decode and prefill together (the idea of Punica's BGMV and S-LoRA): the
//! frozen product runs once over all rows, and each adapter's rank-r products over its own rows, gathered.

use super::Adapter;

/// The adapter of every row of a batch (None: the base model).
#[derive(Clone, Copy)]
pub enum RowAdapters<'a> {
    /// Every row the same.
    Same(Option<&'a Adapter>),
    /// Row i runs `each[i]`.
    Each(&'a [Option<&'a Adapter>]),
}

impl Default for RowAdapters<'_> {
    fn default() -> Self {
        RowAdapters::Same(None)
    }
}

/// Rows that run one adapter, in row order.
pub struct AdapterGroup<'a> {
    pub adapter: &'a Adapter,
    pub rows: Vec<usize>,
}

/// A batch's rows by adapter.
pub enum RowGroups<'a> {
    /// No row has an adapter.
    Base,
    /// Every row runs this one: no gathering.
    Whole(&'a Adapter),
    /// Each adapter's rows (the rest run the base), adapters in order of their first row.
    Mixed(Vec<AdapterGroup<'a>>),
}

impl<'a> RowAdapters<'a> {
    /// The adapter of row `r`.
    pub fn of(&self, r: usize) -> Option<&'a Adapter> {
        match *self {
            RowAdapters::Same(a) => a,
            RowAdapters::Each(each) => each[r],
        }
    }

    /// The adapters of `rows` rows, grouped; adapters are told apart by address (one loaded adapter,
    /// one group).
    pub fn groups(&self, rows: usize) -> RowGroups<'a> {
        let each = match *self {
            RowAdapters::Same(None) => return RowGroups::Base,
            RowAdapters::Same(Some(a)) => return RowGroups::Whole(a),
            RowAdapters::Each(each) => each,
        };
        debug_assert_eq!(each.len(), rows, "one adapter slot per row");
        let mut groups: Vec<AdapterGroup> = vec![];
        for (r, a) in each.iter().enumerate() {
            let Some(a) = a else { continue };
            match groups.iter_mut().find(|g| std::ptr::eq(g.adapter, *a)) {
                Some(g) => g.rows.push(r),
                None => groups.push(AdapterGroup {
                    adapter: a,
                    rows: vec![r],
                }),
            }
        }
        match groups.as_slice() {
            [] => RowGroups::Base,
            [g] if g.rows.len() == rows => RowGroups::Whole(g.adapter),
            _ => RowGroups::Mixed(groups),
        }
    }

    /// Whether every row runs the same adapter (or every row the base).
    pub fn uniform(&self) -> bool {
        match *self {
            RowAdapters::Same(_) => true,
            RowAdapters::Each(each) => each.windows(2).all(|w| same_adapter(w[0], w[1])),
        }
    }
}

/// Whether two rows run the same adapter (both the base counts).
pub fn same_adapter(a: Option<&Adapter>, b: Option<&Adapter>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => std::ptr::eq(a, b),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::{LoraConfig, Target};

    fn adapter() -> Adapter {
        Adapter {
            config: LoraConfig {
                r: 1,
                alpha: 1.0,
                dropout: 0.0,
                targets: vec![Target::Q],
                layers: None,
                use_rslora: false,
            },
            layers: vec![],
            scale: 1.0,
        }
    }

    #[test]
    fn rows_group_by_adapter() {
        let (a, b) = (adapter(), adapter());
        assert!(matches!(RowAdapters::Same(None).groups(3), RowGroups::Base));
        assert!(matches!(
            RowAdapters::Same(Some(&a)).groups(3),
            RowGroups::Whole(x) if std::ptr::eq(x, &a)
        ));
        let each = [Some(&a), Some(&a)];
        assert!(matches!(
            RowAdapters::Each(&each).groups(2),
            RowGroups::Whole(_)
        ));
        assert!(RowAdapters::Each(&each).uniform());
        let each = [None, None];
        assert!(matches!(
            RowAdapters::Each(&each).groups(2),
            RowGroups::Base
        ));
        // Two equal adapters at different addresses are two groups; base rows belong to none.
        let each = [Some(&b), None, Some(&a), Some(&b)];
        let RowGroups::Mixed(groups) = RowAdapters::Each(&each).groups(4) else {
            panic!("mixed rows");
        };
        assert_eq!(groups.len(), 2);
        assert!(std::ptr::eq(groups[0].adapter, &b));
        assert_eq!(groups[0].rows, vec![0, 3]);
        assert_eq!(groups[1].rows, vec![2]);
        assert!(!RowAdapters::Each(&each).uniform());
        assert!(RowAdapters::Each(&each).of(1).is_none());
    }
}
