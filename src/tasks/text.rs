//! Python's string semantics, which the paper's property rules and filters are written in: `str.split()`,
//! `str.strip()`, `str.lower()`, and the analysis code's cleaning helpers.

/// Python's `str.isspace()` for one character: Unicode White_Space plus the ASCII separators 0x1C–0x1F.
pub fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `s.split()` (no argument): runs of whitespace separate, empty fields are dropped.
pub fn py_split(s: &str) -> Vec<&str> {
    s.split(is_py_space).filter(|w| !w.is_empty()).collect()
}

/// Python's `s.strip()`.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(is_py_space)
}

/// Python's `s.lower()` (full Unicode lower-casing, like Rust's).
pub fn py_lower(s: &str) -> String {
    s.to_lowercase()
}

/// Python's `string.punctuation`.
pub const ASCII_PUNCTUATION: &str = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";

fn without_punctuation(s: &str) -> String {
    s.chars()
        .filter(|c| !ASCII_PUNCTUATION.contains(*c))
        .collect()
}

/// The compliance filters' `clean_string`: lower-case, strip, delete every ASCII punctuation character.
pub fn clean_string(s: &str) -> String {
    without_punctuation(py_strip(&py_lower(s)))
}

/// The analysis code's `apply_all_cleaning`: lower-case, delete ASCII punctuation, `\n` `\r` `\t` → space,
/// collapse whitespace runs and trim. (Its prefix removal — `Answer:` etc. — can never fire once the colons
/// are gone, so it is a no-op here as there.)
pub fn apply_all_cleaning(s: &str) -> String {
    let s = without_punctuation(&py_lower(s)).replace(['\n', '\r', '\t'], " ");
    py_split(&s).join(" ")
}

/// The analysis code's `clean_for_comparison`: lower-case and strip.
pub fn clean_for_comparison(s: &str) -> String {
    py_strip(&py_lower(s)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_semantics() {
        assert_eq!(
            py_split("  Dog,  cat\n\tcow \u{1f}x"),
            ["Dog,", "cat", "cow", "x"]
        );
        assert_eq!(py_split(" \u{a0}\u{2029} "), Vec::<&str>::new());
        assert_eq!(py_strip("\u{1c} a b \u{3000}"), "a b");
        assert_eq!(clean_string("  N/A. "), "na");
        assert_eq!(clean_string("“Lion”!"), "“lion”");
        assert_eq!(
            apply_all_cleaning("Answer: Lion,\n\ttiger  "),
            "answer lion tiger"
        );
        assert_eq!(clean_for_comparison(" Suddenly, "), "suddenly,");
    }
}
