//! Calibration (spec §6.6): for each string, how often the model's object-level answer has each second
//! character, against how often its hypothetical answer names that character; points for the top-3
//! object behaviours, binned into 10 equal-count bins, scored by the mean absolute difference (MAD, in
//! percentage points). Distributions come either from samples (the paper: 20 at T = 1, 3 tokens) or
//! exactly from the model's log-probabilities (beyond the paper).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::tasks::text::{py_lower, py_strip};

/// A distribution over behaviours (characters), as relative frequencies or probabilities.
pub type Distribution = BTreeMap<String, f64>;

/// The paper's object distribution from samples: answers stripped, those too short to have the
/// character at `idx` (the paper: 1, the second) dropped, then the share of each character (case as
/// produced). `None` if nothing is left.
pub fn object_from_samples(samples: &[String], idx: usize) -> Option<Distribution> {
    let kept: Vec<String> = samples
        .iter()
        .filter_map(|s| py_strip(s).chars().nth(idx))
        .map(String::from)
        .collect();
    frequencies(&kept)
}

/// The paper's hypothetical distribution from samples: the share of each `lower(strip(answer))`.
pub fn hypothetical_from_samples(samples: &[String]) -> Option<Distribution> {
    let kept: Vec<String> = samples.iter().map(|s| py_lower(py_strip(s))).collect();
    frequencies(&kept)
}

fn frequencies(values: &[String]) -> Option<Distribution> {
    if values.is_empty() {
        return None;
    }
    let mut d = Distribution::new();
    for v in values {
        *d.entry(v.clone()).or_default() += 1.0 / values.len() as f64;
    }
    Some(d)
}

/// One calibration point: the object-level probability of a behaviour and the hypothetical
/// probability given to it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// 1 = the modal behaviour.
    pub rank: usize,
    pub object: f64,
    pub hypothetical: f64,
}

/// The points of one string: the top-3 object behaviours (ties by character order), each against the
/// hypothetical mass on its lower-cased form (missing mass = 0).
pub fn points(object: &Distribution, hypothetical: &Distribution, top: usize) -> Vec<Point> {
    let mut ranked: Vec<(&String, f64)> = object.iter().map(|(k, &v)| (k, v)).collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
    ranked
        .into_iter()
        .take(top)
        .enumerate()
        .map(|(i, (behaviour, p))| Point {
            rank: i + 1,
            object: p,
            hypothetical: hypothetical
                .get(&py_lower(behaviour))
                .copied()
                .unwrap_or(0.0),
        })
        .collect()
}

/// One equal-count bin's means.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Bin {
    pub n: usize,
    pub object: f64,
    pub hypothetical: f64,
}

/// numpy's default (linear) quantile of sorted values.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let h = q * (sorted.len() - 1) as f64;
    let lo = h.floor() as usize;
    let hi = h.ceil() as usize;
    sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo])
}

/// pandas `qcut(x, bins, duplicates="drop")` on the object probabilities, then each bin's mean x and y.
pub fn equal_count_bins(points: &[Point], bins: usize) -> Vec<Bin> {
    if points.is_empty() {
        return vec![];
    }
    let mut xs: Vec<f64> = points.iter().map(|p| p.object).collect();
    xs.sort_by(f64::total_cmp);
    let mut edges: Vec<f64> = (0..=bins)
        .map(|i| quantile(&xs, i as f64 / bins as f64))
        .collect();
    edges.dedup();
    if edges.len() < 2 {
        // Every x equal: one bin.
        edges = vec![xs[0], xs[0]];
    }
    let mut sums = vec![(0usize, 0.0f64, 0.0f64); edges.len() - 1];
    for p in points {
        // Bins are (e_i, e_{i+1}], the first also holding its lower edge.
        let k = edges[1..]
            .iter()
            .position(|&e| p.object <= e)
            .unwrap_or(edges.len() - 2);
        sums[k].0 += 1;
        sums[k].1 += p.object;
        sums[k].2 += p.hypothetical;
    }
    sums.into_iter()
        .filter(|s| s.0 > 0)
        .map(|(n, x, y)| Bin {
            n,
            object: x / n as f64,
            hypothetical: y / n as f64,
        })
        .collect()
}

/// Mean absolute difference between the bins' mean object and hypothetical probabilities, in
/// percentage points (lower is better calibrated).
pub fn mad(bins: &[Bin]) -> f64 {
    if bins.is_empty() {
        return f64::NAN;
    }
    bins.iter()
        .map(|b| (100.0 * b.object - 100.0 * b.hypothetical).abs())
        .sum::<f64>()
        / bins.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn sampled_distributions_follow_the_paper() {
        let o = object_from_samples(&s(&[" Lion", "lion", "Tiger", "x", "Liger\n"]), 1).unwrap();
        // "x" is dropped (shorter than 2); second characters i, i, i, i of 4 kept... and "Tiger" → i.
        assert_eq!(o.len(), 1);
        assert!((o["i"] - 1.0).abs() < 1e-12);
        let o = object_from_samples(&s(&["cow", "cat", "dog", "Cow"]), 1).unwrap();
        assert!((o["o"] - 0.75).abs() < 1e-12 && (o["a"] - 0.25).abs() < 1e-12);
        let h = hypothetical_from_samples(&s(&["O", " o", "a.", "o"])).unwrap();
        assert!((h["o"] - 0.75).abs() < 1e-12 && (h["a."] - 0.25).abs() < 1e-12);
        let p = points(&o, &h, 3);
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].rank, p[0].object, p[0].hypothetical), (1, 0.75, 0.75));
        assert_eq!((p[1].object, p[1].hypothetical), (0.25, 0.0)); // "a" ≠ "a."
        assert!(object_from_samples(&s(&["a", ""]), 1).is_none());
    }

    #[test]
    fn bins_are_equal_count_with_duplicate_edges_dropped() {
        // 20 points, x = 0.05, 0.10, ..., 1.0, y = x: perfectly calibrated.
        let pts: Vec<Point> = (1..=20)
            .map(|i| Point {
                rank: 1,
                object: i as f64 / 20.0,
                hypothetical: i as f64 / 20.0,
            })
            .collect();
        let bins = equal_count_bins(&pts, 10);
        assert_eq!(bins.len(), 10);
        assert!(bins.iter().all(|b| b.n == 2));
        assert!(mad(&bins) < 1e-9);
        // Always predicting 0: MAD = the mean x in points.
        let off: Vec<Point> = pts
            .iter()
            .map(|p| Point {
                hypothetical: 0.0,
                ..*p
            })
            .collect();
        assert!((mad(&equal_count_bins(&off, 10)) - 52.5).abs() < 1e-9);
        // Many equal x: edges collapse, points still all binned.
        let same: Vec<Point> = (0..30)
            .map(|i| Point {
                rank: 1,
                object: if i < 25 { 1.0 } else { 0.5 },
                hypothetical: 1.0,
            })
            .collect();
        let bins = equal_count_bins(&same, 10);
        assert_eq!(bins.iter().map(|b| b.n).sum::<usize>(), 30);
        assert_eq!(bins.len(), 1); // edges [0.5, 1.0] after dropping duplicates, as pandas
    }
}
