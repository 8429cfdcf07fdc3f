//! String generators for the sequence tasks (spec §1.3), seeded, each with the paper's recipe: how many
//! items per string, with or without replacement, trailing space or not, and how the splits are sized.

use std::collections::HashSet;

use anyhow::{bail, Result};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

fn words(text: &'static str) -> Vec<&'static str> {
    text.lines().filter(|l| !l.is_empty()).collect()
}

/// One generator: the paper's recipe for a dataset stem.
pub struct Generator {
    pub name: &'static str,
    /// Default split sizes (train, val), the paper's.
    pub sizes: (usize, usize),
    /// Items per string (inclusive range).
    pub items: (usize, usize),
    /// Drawn with replacement.
    pub replacement: bool,
    pub trailing_space: bool,
    vocabulary: fn() -> Vec<String>,
}

pub static GENERATORS: &[Generator] = &[
    Generator {
        name: "animals",
        sizes: (10_000, 2_500),
        items: (7, 10),
        replacement: true,
        trailing_space: true,
        vocabulary: || strings(include_str!("../../datasets/words/animals.txt")),
    },
    Generator {
        name: "english_words",
        sizes: (10_000, 2_500),
        items: (5, 5),
        replacement: true,
        trailing_space: true,
        vocabulary: || strings(include_str!("../../datasets/words/english_words.txt")),
    },
    Generator {
        name: "colors",
        sizes: (5_000, 5_000),
        items: (5, 5),
        replacement: false,
        trailing_space: false,
        vocabulary: || strings(include_str!("../../datasets/words/colors.txt")),
    },
    Generator {
        name: "countries",
        sizes: (5_000, 5_000),
        items: (3, 6),
        replacement: false,
        trailing_space: false,
        vocabulary: || strings(include_str!("../../datasets/words/countries.txt")),
    },
    Generator {
        name: "numbers",
        sizes: (5_000, 5_000),
        items: (3, 6),
        replacement: true,
        trailing_space: false,
        vocabulary: || (0..10).map(|d| d.to_string()).collect(),
    },
    Generator {
        name: "number_triplets",
        sizes: (10_000, 2_500),
        items: (7, 10),
        replacement: true,
        trailing_space: true,
        vocabulary: || (0..1000).map(|d| format!("{d:03}")).collect(),
    },
];

fn strings(text: &'static str) -> Vec<String> {
    words(text).into_iter().map(String::from).collect()
}

impl Generator {
    pub fn get(name: &str) -> Result<&'static Generator> {
        match GENERATORS.iter().find(|g| g.name == name) {
            Some(g) => Ok(g),
            None => bail!(
                "no generator `{name}`; generators: {}",
                GENERATORS
                    .iter()
                    .map(|g| g.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    pub fn vocabulary(&self) -> Vec<String> {
        (self.vocabulary)()
    }

    /// `n_train + n_val` distinct strings, split without overlap; the same seed gives the same splits.
    pub fn generate(
        &self,
        n_train: usize,
        n_val: usize,
        seed: u64,
    ) -> Result<(Vec<String>, Vec<String>)> {
        let vocab = self.vocabulary();
        let total = n_train + n_val;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(total);
        // Duplicates are skipped; give up when the space is clearly too small for the request.
        let mut attempts = 0usize;
        while out.len() < total {
            attempts += 1;
            if attempts > total * 100 + 10_000 {
                bail!(
                    "generator `{}` found only {} distinct strings of the {total} asked for",
                    self.name,
                    out.len()
                );
            }
            let k = rng.random_range(self.items.0..=self.items.1);
            let items: Vec<&String> = if self.replacement {
                (0..k).map(|_| vocab.choose(&mut rng).unwrap()).collect()
            } else {
                vocab.choose_multiple(&mut rng, k).collect()
            };
            let mut s = items
                .iter()
                .map(|w| w.as_str())
                .collect::<Vec<_>>()
                .join(" ");
            if self.trailing_space {
                s.push(' ');
            }
            if seen.insert(s.clone()) {
                out.push(s);
            }
        }
        let val = out.split_off(n_train);
        Ok((out, val))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipes_hold() {
        for g in GENERATORS {
            let (train, val) = g.generate(300, 100, 7).unwrap();
            assert_eq!((train.len(), val.len()), (300, 100));
            let all: HashSet<&String> = train.iter().chain(&val).collect();
            assert_eq!(all.len(), 400, "{}: splits overlap or repeat", g.name);
            let vocab: HashSet<String> = g.vocabulary().into_iter().collect();
            for s in &train {
                assert_eq!(s.ends_with(' '), g.trailing_space, "{}", g.name);
                let items: Vec<&str> = s.split_whitespace().collect();
                assert!(
                    (g.items.0..=g.items.1).contains(&items.len()),
                    "{}: {s:?}",
                    g.name
                );
                assert!(items.iter().all(|w| vocab.contains(*w)));
                if !g.replacement {
                    assert_eq!(items.iter().collect::<HashSet<_>>().len(), items.len());
                }
            }
            assert_eq!(
                g.generate(300, 100, 7).unwrap().0,
                train,
                "not reproducible"
            );
            assert_ne!(g.generate(300, 100, 8).unwrap().0, train);
        }
        assert_eq!(Generator::get("animals").unwrap().vocabulary().len(), 30);
    }
}
