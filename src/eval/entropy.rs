//! The entropy-controlled comparison of two bars (spec §6.7). Finetuning usually narrows a model's
//! object-level behaviour, and a narrower behaviour is easier to predict; so before comparing bar A with
//! bar B (before vs after training, old vs new behaviour), both are cut down, per (task, property), to the
//! same distribution of object-level values: for each of A's most common values c, min(count_A(c),
//! count_B(c)) rows with that value from each bar, drawn after a seeded shuffle. Both bars then have the
//! same entropy and the same mode baseline; their accuracies are compared on that footing.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::{bootstrap_ci, mode, std_err};

/// One scored row of a bar: its (task, property, string), whether the prediction was right, and the
/// object-level value it was scored against (as compared).
#[derive(Debug, Clone, PartialEq)]
pub struct BarRow {
    pub task: String,
    pub property: String,
    pub string: String,
    pub correct: bool,
    pub value: String,
}

/// One bar after the adjustment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdjustedBar {
    pub n: usize,
    pub accuracy: f64,
    pub se: f64,
    pub ci95: [f64; 2],
    /// Each row's (task, property) mode recomputed on the kept rows, row-weighted.
    pub mode_baseline: f64,
    /// Row-weighted mean over (task, property) of the Shannon entropy (bits) of the object values,
    /// before the adjustment (on the strings both bars have).
    pub entropy_before: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntropyControlled {
    pub a: AdjustedBar,
    pub b: AdjustedBar,
    /// The entropy both bars have after the adjustment (row-weighted mean, bits).
    pub entropy_after: f64,
    /// How many of A's values per (task, property) are matched, and the shuffle's seed.
    pub top_values: usize,
    pub seed: u64,
}

/// Shannon entropy (base 2) of the empirical distribution of `values`.
pub fn entropy<'a>(values: impl IntoIterator<Item = &'a str>) -> f64 {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    let mut n = 0usize;
    for v in values {
        *counts.entry(v).or_default() += 1;
        n += 1;
    }
    counts
        .values()
        .map(|&c| {
            let p = c as f64 / n as f64;
            -p * p.log2()
        })
        .sum()
}

type Group<'a> = BTreeMap<(&'a str, &'a str), Vec<&'a BarRow>>;

fn groups(rows: &[BarRow]) -> Group<'_> {
    let mut g: Group = BTreeMap::new();
    for r in rows {
        g.entry((r.task.as_str(), r.property.as_str()))
            .or_default()
            .push(r);
    }
    for v in g.values_mut() {
        v.sort_by(|x, y| x.string.cmp(&y.string));
    }
    g
}

/// The rows of `bar` with value `c`, shuffled with a fresh generator from `seed` (as the authors'
/// `shuffle(seed=...)`: the same seed for every value and bar), first `n` of them.
fn take<'a>(bar: &[&'a BarRow], c: &str, n: usize, seed: u64) -> Vec<&'a BarRow> {
    let mut with: Vec<&BarRow> = bar.iter().copied().filter(|r| r.value == c).collect();
    with.shuffle(&mut StdRng::seed_from_u64(seed));
    with.truncate(n);
    with
}

/// Adjusts bars `a` and `b` (rows scored the usual way) to equal value distributions and scores both.
pub fn entropy_controlled(
    a: &[BarRow],
    b: &[BarRow],
    top_values: usize,
    seed: u64,
) -> EntropyControlled {
    let (ga, gb) = (groups(a), groups(b));
    let mut kept_a: Vec<Vec<&BarRow>> = vec![];
    let mut kept_b: Vec<Vec<&BarRow>> = vec![];
    let (mut ent_a, mut ent_b, mut ent_after) = ((0.0, 0), (0.0, 0), (0.0, 0));
    for (key, rows_a) in &ga {
        let Some(rows_b) = gb.get(key) else {
            continue;
        };
        // 1. Only the strings both bars have.
        let in_a: BTreeSet<&str> = rows_a.iter().map(|r| r.string.as_str()).collect();
        let in_b: BTreeSet<&str> = rows_b.iter().map(|r| r.string.as_str()).collect();
        let rows_a: Vec<&BarRow> = rows_a
            .iter()
            .copied()
            .filter(|r| in_b.contains(r.string.as_str()))
            .collect();
        let rows_b: Vec<&BarRow> = rows_b
            .iter()
            .copied()
            .filter(|r| in_a.contains(r.string.as_str()))
            .collect();
        if rows_a.is_empty() {
            continue;
        }
        for (acc, rows) in [(&mut ent_a, &rows_a), (&mut ent_b, &rows_b)] {
            acc.0 += entropy(rows.iter().map(|r| r.value.as_str())) * rows.len() as f64;
            acc.1 += rows.len();
        }
        // 2. A's values by count (ties in first-seen order), the most common `top_values`.
        let mut order: Vec<(&str, usize)> = vec![];
        for r in &rows_a {
            match order.iter_mut().find(|o| o.0 == r.value) {
                Some(o) => o.1 += 1,
                None => order.push((r.value.as_str(), 1)),
            }
        }
        order.sort_by_key(|o| std::cmp::Reverse(o.1)); // stable: ties keep first-seen order
        order.truncate(top_values);
        // 3. Per value, as many rows from each bar as the scarcer bar has.
        let (mut pa, mut pb) = (vec![], vec![]);
        for (c, count_a) in order {
            let count_b = rows_b.iter().filter(|r| r.value == c).count();
            let n = count_a.min(count_b);
            pa.extend(take(&rows_a, c, n, seed));
            pb.extend(take(&rows_b, c, n, seed));
        }
        if pa.is_empty() {
            continue;
        }
        ent_after.0 += entropy(pa.iter().map(|r| r.value.as_str())) * pa.len() as f64;
        ent_after.1 += pa.len();
        kept_a.push(pa);
        kept_b.push(pb);
    }
    let mean = |(s, n): (f64, usize)| if n == 0 { f64::NAN } else { s / n as f64 };
    EntropyControlled {
        a: score(&kept_a, mean(ent_a)),
        b: score(&kept_b, mean(ent_b)),
        entropy_after: mean(ent_after),
        top_values,
        seed,
    }
}

/// 4. The mode recomputed per (task, property) on the kept rows; accuracy pooled over all of them.
fn score(groups: &[Vec<&BarRow>], entropy_before: f64) -> AdjustedBar {
    let flags: Vec<bool> = groups.iter().flatten().map(|r| r.correct).collect();
    let n = flags.len();
    let at_mode: usize = groups
        .iter()
        .map(|g| {
            let m = mode(g.iter().map(|r| r.value.as_str()));
            g.iter().filter(|r| Some(r.value.as_str()) == m).count()
        })
        .sum();
    AdjustedBar {
        n,
        accuracy: super::share(flags.iter().filter(|&&f| f).count(), n),
        se: std_err(&flags),
        ci95: bootstrap_ci(&flags, 1000, 42),
        mode_baseline: super::share(at_mode, n),
        entropy_before,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(string: &str, value: &str, correct: bool) -> BarRow {
        BarRow {
            task: "t".into(),
            property: "p".into(),
            string: string.into(),
            correct,
            value: value.into(),
        }
    }

    #[test]
    fn entropy_in_bits() {
        assert_eq!(entropy(["a", "a"]), 0.0);
        assert!((entropy(["a", "b"]) - 1.0).abs() < 1e-12);
        assert!((entropy(["a", "b", "c", "d"]) - 2.0).abs() < 1e-12);
    }

    #[test]
    fn worked_example() {
        // A (before training): values x x y y on s1..s4, right on s1 and s3; s5 only in A.
        // B (after training): x x x y on s1..s4, right on every x.
        let a = [
            row("s1", "x", true),
            row("s2", "x", false),
            row("s3", "y", true),
            row("s4", "y", false),
            row("s5", "z", true),
        ];
        let b = [
            row("s1", "x", true),
            row("s2", "x", true),
            row("s3", "x", true),
            row("s4", "y", false),
        ];
        let e = entropy_controlled(&a, &b, 100, 42);
        // Shared strings s1..s4; A's counts x 2, y 2; B's x 3, y 1 → take 2 x and 1 y from each bar.
        assert_eq!((e.a.n, e.b.n), (3, 3));
        assert!((e.a.entropy_before - 1.0).abs() < 1e-12);
        let h = entropy(["x", "x", "y"]);
        assert!((e.b.entropy_before - entropy(["x", "x", "x", "y"])).abs() < 1e-12);
        assert!((e.entropy_after - h).abs() < 1e-12);
        // B keeps two of its three right x rows and its wrong y row: 2/3.
        assert!((e.b.accuracy - 2.0 / 3.0).abs() < 1e-12);
        // A keeps both x rows (one right) and one of its y rows (right or wrong, by the shuffle).
        assert!(e.a.accuracy == 1.0 / 3.0 || e.a.accuracy == 2.0 / 3.0);
        // Equal distributions → equal mode baselines.
        assert_eq!(e.a.mode_baseline, e.b.mode_baseline);
        assert!((e.a.mode_baseline - 2.0 / 3.0).abs() < 1e-12);
        // Seeded: the same draw twice.
        assert_eq!(e, entropy_controlled(&a, &b, 100, 42));
        // Only A's most common value when top_values = 1 (ties in first-seen order: x).
        let one = entropy_controlled(&a, &b, 1, 42);
        assert_eq!((one.a.n, one.b.n), (2, 2));
        assert!((one.b.accuracy - 1.0).abs() < 1e-12);
    }
}
