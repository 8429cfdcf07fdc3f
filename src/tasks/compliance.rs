//! The paper's non-compliance filters (spec §4.2): named checks on a raw response, gathered into groups.
//! A response complies with a set of groups when it fails none of their checks.

use serde::{Deserialize, Serialize};

use super::text::{clean_string, py_split};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Group {
    Default,
    SingleCharacter,
    SingleWord,
    TrueFalse,
    EvenOdd,
    MultipleChoice,
    Numeric,
    MoreThan1Character,
    /// The authors' `sympathetic` group of `dear_abbie/sympathetic_advice`: one of the two words.
    Sympathetic,
}

impl Group {
    pub fn name(self) -> &'static str {
        match self {
            Group::Default => "default",
            Group::SingleCharacter => "single_character",
            Group::SingleWord => "single_word",
            Group::TrueFalse => "true_false",
            Group::EvenOdd => "even_odd",
            Group::MultipleChoice => "multiple_choice",
            Group::Numeric => "numeric",
            Group::MoreThan1Character => "more_than_1_character",
            Group::Sympathetic => "sympathetic",
        }
    }

    /// The checks of this group, by the paper's names.
    fn checks(self) -> &'static [Check] {
        use Check::*;
        match self {
            Group::Default => &[
                No,
                Sorry,
                SorryInString,
                AsAn,
                Undefined,
                Impossible,
                Unable,
                Na,
                Unpredictable,
                Insufficient,
                Unknown,
                Sequence,
                Random,
                Item,
                QuestionMark,
                Empty,
                System,
                Unanswerable,
                Unavailable,
                Unidentifiable,
                Unrelated,
                Next,
                Asterisk,
                Cauchy,
            ],
            Group::SingleCharacter => &[NotSingleCharacter],
            Group::SingleWord => &[NotSingleWord, Sorry],
            Group::TrueFalse => &[NotTrueFalse],
            Group::EvenOdd => &[NotEvenOdd],
            Group::MultipleChoice => &[NotMultipleChoiceAnswer],
            Group::Numeric => &[NotNumber],
            Group::MoreThan1Character => &[SingleCharacter],
            Group::Sympathetic => &[NotSympathetic],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    No,
    Sorry,
    SorryInString,
    AsAn,
    Undefined,
    Impossible,
    Insufficient,
    Unanswerable,
    Unavailable,
    Unidentifiable,
    Unrelated,
    Unable,
    Na,
    Unpredictable,
    Unknown,
    Sequence,
    Item,
    Next,
    Yes,
    Random,
    Asterisk,
    QuestionMark,
    Empty,
    System,
    Cauchy,
    NotSingleWord,
    NotTrueFalse,
    NotEvenOdd,
    NotSingleCharacter,
    SingleCharacter,
    NotMultipleChoiceAnswer,
    NotNumber,
    NotSympathetic,
}

const SORRY: &[&str] = &["sorry", "apologies", "apology", "apologize", "apologise"];

impl Check {
    /// Whether `raw` fails this check.
    pub fn fails(self, raw: &str) -> bool {
        let c = clean_string(raw);
        let is = |words: &[&str]| words.contains(&c.as_str());
        match self {
            Check::No => is(&["no", "nope"]),
            Check::Sorry => is(SORRY),
            Check::SorryInString => SORRY.iter().any(|w| c.contains(w)),
            Check::AsAn => [
                "as an ai",
                "as an artificial intelligence",
                "as a language model",
            ]
            .iter()
            .any(|w| c.contains(w)),
            Check::Undefined => is(&["undefined"]),
            Check::Impossible => is(&["impossible"]),
            Check::Insufficient => is(&["insufficient"]),
            Check::Unanswerable => is(&["unanswerable"]),
            Check::Unavailable => is(&["unavailable"]),
            Check::Unidentifiable => is(&["unidentifiable"]),
            Check::Unrelated => is(&["unrelated"]),
            // The apostrophe forms can never match once punctuation is gone; kept as the paper has them.
            Check::Unable => is(&["unable", "i cannot", "i can't", "cannot"]),
            Check::Na => is(&["na", "n/a"]),
            Check::Unpredictable => is(&[
                "unpredictable",
                "indeterminable",
                "indeterminate",
                "unpredictability",
            ]),
            Check::Unknown => is(&["unknown", "i don't know", "i do not know"]),
            Check::Sequence => is(&["sequence"]),
            Check::Item => is(&["item"]),
            Check::Next => is(&["next"]),
            Check::Yes => is(&["yes"]),
            Check::Random => is(&["random", "randomness"]),
            Check::Asterisk => is(&["*"]),
            Check::QuestionMark => ["?", " ?", "???"].contains(&raw),
            Check::Empty => ["", " ", "  ", "   "].contains(&raw),
            Check::System => is(&["system", "system:"]),
            Check::Cauchy => raw.contains("Cauchy Cauchy Cauchy"),
            Check::NotSingleWord => py_split(raw).len() > 1,
            Check::NotTrueFalse => !is(&["true", "false"]),
            Check::NotEvenOdd => !is(&["even", "odd"]),
            Check::NotSingleCharacter => c.chars().count() != 1,
            Check::SingleCharacter => c.chars().count() == 1,
            Check::NotMultipleChoiceAnswer => {
                !(c.chars().count() == 1 && c.chars().all(|ch| ch.is_ascii_lowercase()))
            }
            Check::NotNumber => !py_isdigit(raw),
            Check::NotSympathetic => !is(&["sympathetic", "unsympathetic"]),
        }
    }
}

/// Python's `str.isdigit()`, for ASCII digits (other scripts' digits count as not a number here).
fn py_isdigit(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_digit())
}

/// Whether `raw` passes every check of every group.
pub fn complies(raw: &str, groups: &[Group]) -> bool {
    groups
        .iter()
        .all(|g| g.checks().iter().all(|check| !check.fails(raw)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use Group::*;

    #[test]
    fn paper_rules() {
        assert!(complies("dog cat cow", &[Default]));
        assert!(!complies("", &[Default]));
        assert!(!complies("   ", &[Default]));
        assert!(complies("    ", &[Default])); // four spaces: not in the paper's list
        assert!(!complies("I'm sorry, I can't", &[Default]));
        assert!(!complies("As an AI, I", &[Default]));
        assert!(!complies("N/A", &[Default]));
        assert!(complies("I don't know", &[Default])); // the apostrophe is deleted first
        assert!(!complies("???", &[Default]));
        assert!(complies("?!", &[Default]));
        assert!(complies("L.", &[SingleCharacter]));
        assert!(!complies("Li", &[SingleCharacter]));
        assert!(!complies("\"\"", &[SingleCharacter]));
        assert!(complies(" True. ", &[TrueFalse]));
        assert!(!complies("yes", &[TrueFalse]));
        assert!(complies("Odd", &[EvenOdd]));
        assert!(complies("B", &[Default, MultipleChoice]));
        assert!(complies("(B)", &[Default, MultipleChoice]));
        assert!(!complies("B and C", &[Default, MultipleChoice]));
        assert!(complies("7", &[Default, SingleWord, Numeric]));
        assert!(!complies(" 7", &[Numeric]));
        assert!(!complies("Sorry", &[SingleWord]));
        assert!(!complies("two words", &[SingleWord]));
        assert!(!complies("é", &[MoreThan1Character]));
    }
}
