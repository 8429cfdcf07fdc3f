//! Choosing the next token from a row of log-probabilities: greedy, or temperature + top-p with a seeded RNG.

use anyhow::{bail, Result};
use rand::rngs::StdRng;
use rand::Rng;

use crate::model::decode::RowLogprobs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: OrderedF32,
}

/// An f32 that serializes as a plain number (kept Eq for test comparisons).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct OrderedF32(pub f32);
impl Eq for OrderedF32 {}

/// The `k` most likely ids of a log-prob row, most likely first.
pub fn top_k(logprobs: &[f32], k: usize) -> Vec<TokenLogprob> {
    let k = k.min(logprobs.len());
    if k == 0 {
        return vec![];
    }
    let mut idx: Vec<u32> = (0..logprobs.len() as u32).collect();
    let cmp = |a: &u32, b: &u32| {
        logprobs[*b as usize]
            .total_cmp(&logprobs[*a as usize])
            .then(a.cmp(b))
    };
    idx.select_nth_unstable_by(k - 1, cmp);
    idx.truncate(k);
    idx.sort_by(cmp);
    idx.into_iter()
        .map(|id| TokenLogprob {
            id,
            logprob: OrderedF32(logprobs[id as usize]),
        })
        .collect()
}

/// The `k` most likely tokens of a step's row, whole or already chosen on the device.
pub fn best(row: &RowLogprobs, k: usize) -> Vec<TokenLogprob> {
    match row {
        RowLogprobs::All(lp) => top_k(lp, k),
        RowLogprobs::Best(b) => b
            .iter()
            .take(k)
            .map(|&(id, lp)| TokenLogprob {
                id,
                logprob: OrderedF32(lp),
            })
            .collect(),
    }
}

/// The next token of a row and its log-probability: greedy at temperature 0 (the best is enough),
/// sampled otherwise (which needs the whole row).
pub fn choose(
    row: &RowLogprobs,
    temperature: f32,
    top_p: f32,
    rng: &mut StdRng,
) -> Result<TokenLogprob> {
    match row {
        _ if temperature <= 0.0 => match best(row, 1).first() {
            Some(&t) => Ok(t),
            None => bail!("a decode step returned no token"),
        },
        RowLogprobs::All(lp) => {
            let id = sample(lp, temperature, top_p, rng);
            Ok(TokenLogprob {
                id,
                logprob: OrderedF32(lp[id as usize]),
            })
        }
        RowLogprobs::Best(_) => bail!("sampling at temperature {temperature} needs whole rows"),
    }
}

/// Greedy when `temperature` is 0; otherwise samples from softmax(logprobs / T) restricted to the
/// smallest set of tokens whose probability reaches `top_p`.
pub fn sample(logprobs: &[f32], temperature: f32, top_p: f32, rng: &mut StdRng) -> u32 {
    if temperature <= 0.0 {
        return top_k(logprobs, 1)[0].id;
    }
    let max = logprobs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f32)> = logprobs
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l - max) / temperature).exp()))
        .filter(|(_, p)| *p > 0.0)
        .collect();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let total: f32 = probs.iter().map(|p| p.1).sum();
    let mut kept = 0.0;
    let mut n = 0;
    for (_, p) in &probs {
        kept += p;
        n += 1;
        if kept >= top_p.clamp(0.0, 1.0) * total {
            break;
        }
    }
    probs.truncate(n.max(1));
    let mass: f32 = probs.iter().map(|p| p.1).sum();
    let mut u = rng.random::<f32>() * mass;
    for &(id, p) in &probs {
        if u < p {
            return id;
        }
        u -= p;
    }
    probs.last().map(|p| p.0).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn top_k_is_sorted_and_exact() {
        let lp = [-3.0, -0.5, -2.0, -0.1, -9.0];
        let t = top_k(&lp, 3);
        assert_eq!(t.iter().map(|t| t.id).collect::<Vec<_>>(), vec![3, 1, 2]);
    }

    #[test]
    fn sampling_is_seeded_and_follows_the_distribution() {
        let lp = [(0.7f32).ln(), (0.2f32).ln(), (0.1f32).ln()];
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..2000)
                .map(|_| sample(&lp, 1.0, 1.0, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        let d = draw(7);
        let frac0 = d.iter().filter(|&&i| i == 0).count() as f64 / d.len() as f64;
        assert!((frac0 - 0.7).abs() < 0.04, "{frac0}");
        // top_p 0.75 keeps only ids 0 and 1.
        let mut rng = StdRng::seed_from_u64(1);
        assert!((0..500).all(|_| sample(&lp, 1.0, 0.75, &mut rng) != 2));
        // Temperature 0 is greedy.
        assert_eq!(sample(&lp, 0.0, 1.0, &mut rng), 0);
    }
}
