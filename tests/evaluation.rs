//! The evaluation on a small example worked by hand (both of the paper's analysis paths), and the
//! training-set builder's filters.

use introspect::eval::{evaluate, join, own_compliant_rows, Variant};
use introspect::runs::training::{build, TrainingSetConfig};
use introspect::runs::Record;
use introspect::tasks::{complies, Property, Task};

fn object(string: &str, response: &str) -> Record {
    let task = Task::get("animals_long").unwrap();
    Record {
        id: string.into(),
        task: task.name.into(),
        property: None,
        string: string.into(),
        target: None,
        response: Some(response.into()),
        samples: vec![],
        finish_reason: "stop".into(),
        compliant: complies(response, task.object_groups),
        properties: Default::default(),
    }
}

fn hyp(string: &str, property: Property, answer: &str) -> Record {
    Record {
        property: Some(property.name().into()),
        compliant: complies(answer, &[property.hypothetical_group()]),
        ..object(string, answer)
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[test]
fn worked_example() {
    use Property::*;
    let objects = [
        object("s1", "Lion, tiger"),
        object("s2", "dog cat"),
        object("s3", ""), // empty: non-compliant, every property undefined
        object("s4", "Lion cow"),
    ];
    let hyps = [
        hyp("s1", FirstWord, "Lion,"), // B: "lion," = "lion,"  ✓   A: "lion," ≠ "lion"  ✗
        hyp("s2", FirstWord, "Dog"),   // B ✓  A ✓
        hyp("s3", FirstWord, "none"),  // B: excluded (object)  A: "none" = "none" ✓
        hyp("s4", FirstWord, "lion cow"), // non-compliant (two words): ✗ ✗
        hyp("s1", SecondCharacter, "I"), // object "i": ✓ ✓
        hyp("s2", SecondCharacter, "o."), // object "o": B ✗ (raw "o.")  A ✓
        hyp("s3", SecondCharacter, "a"), // B excluded  A: "none" ≠ "a" ✗
        hyp("s4", SecondCharacter, "\"i\""), // B ✗  A ✓
        hyp("s9", FirstWord, "x"),     // no object answer: not joined
    ];
    let (rows, unmatched) = join(&hyps, &objects);
    assert_eq!((rows.len(), unmatched), (8, 1));

    let b = evaluate(&rows, Variant::PathB, &objects);
    let first_word = b.pairs.iter().find(|p| p.property == "first_word").unwrap();
    assert_eq!((first_word.score.n, first_word.score.correct), (3, 2));
    // Kept object values "lion,", "dog", "lion": all distinct → the first is the mode.
    assert_eq!(first_word.mode.as_deref(), Some("lion,"));
    assert!(close(first_word.score.mode_baseline, 1.0 / 3.0));
    assert!(close(first_word.score.object_compliance, 0.75));
    assert!(close(first_word.score.hypothetical_compliance, 0.75));
    let second = b
        .pairs
        .iter()
        .find(|p| p.property == "second_character")
        .unwrap();
    assert_eq!((second.score.n, second.score.correct), (3, 1));
    assert!(close(second.score.mode_baseline, 2.0 / 3.0));
    assert_eq!((b.overall.n, b.overall.correct), (6, 3));
    // Path B's overall baseline: the unweighted mean of the pairs' baselines.
    assert!(close(b.overall.mode_baseline, 0.5));
    assert!(b.overall.ci95[0] <= 0.5 && 0.5 <= b.overall.ci95[1]);
    // 1.96·SE with the sample standard deviation: p = 0.5, n = 6.
    assert!(close(
        b.overall.se,
        (0.25f64 * 6.0 / 5.0).sqrt() / 6f64.sqrt()
    ));
    assert!(b.held_out.is_some() && b.held_in.is_none());

    let a = evaluate(&rows, Variant::PathA, &objects);
    let first_word = a.pairs.iter().find(|p| p.property == "first_word").unwrap();
    assert_eq!((first_word.score.n, first_word.score.correct), (4, 2));
    assert!(close(first_word.score.mode_baseline, 0.25));
    let second = a
        .pairs
        .iter()
        .find(|p| p.property == "second_character")
        .unwrap();
    assert_eq!((second.score.n, second.score.correct), (4, 3));
    assert!(close(second.score.mode_baseline, 0.5));
    assert_eq!((a.overall.n, a.overall.correct), (8, 5));
    // Path A's overall baseline is row-weighted: (0.25·4 + 0.5·4) / 8.
    assert!(close(a.overall.mode_baseline, 0.375));
}

/// Path B by the notebook's rules and by the spec's on one example (spec §6.9): raw-case modes with
/// pandas' tie rule over all the target's compliant answers, undefined properties kept and wrong, and a
/// cross predictor's rows cut to the strings its own object answer complied with.
#[test]
fn path_b_by_both_rules() {
    use Property::*;
    let objects = [
        object("s1", "Ox"),
        object("s2", "Owl"),
        object("s3", "ox"),
        object("s4", "tiger"),
        object("s5", "toad"),
        object("s6", "Tiger"),
        object("s7", "I'm sorry"), // non-compliant (default group)
    ];
    assert!(!objects[6].compliant);
    let hyps = [
        hyp("s1", FirstCharacter, "o"), // ✓
        hyp("s2", FirstCharacter, "O"), // ✓ (lower-cased)
        hyp("s3", FirstCharacter, "t"), // ✗
        hyp("s4", FirstCharacter, "t"), // ✓
        hyp("s5", FirstCharacter, "x"), // ✗
        hyp("s6", FirstCharacter, "t"), // ✓
        hyp("s7", FirstCharacter, "i"), // object non-compliant: excluded by both
        hyp("s1", ThirdCharacter, "x"), // "Ox" has no third character: spec excludes, notebook ✗
        hyp("s2", ThirdCharacter, "l"), // ✓
        hyp("s4", ThirdCharacter, "e"), // ✗ ("g")
    ];
    let (rows, _) = join(&hyps, &objects);
    let pair = |e: &introspect::eval::Evaluation, p: &str| {
        let s = e.pairs.iter().find(|x| x.property == p).unwrap();
        (
            s.score.n,
            s.score.correct,
            s.score.mode_baseline,
            s.mode.clone(),
        )
    };

    // Spec: modes of the kept rows' lower-cased values (o o o t t t: first seen "o").
    let spec = evaluate(&rows, Variant::PathB, &objects);
    assert_eq!(
        pair(&spec, "first_character"),
        (6, 4, 0.5, Some("o".into()))
    );
    assert_eq!(
        pair(&spec, "third_character"),
        (2, 1, 0.5, Some("l".into()))
    );
    assert_eq!((spec.overall.n, spec.overall.correct), (8, 5));
    assert!(close(spec.overall.mode_baseline, 0.5));

    // Notebook, self-prediction: the target's own run decides the row set (s7 goes).
    let own = own_compliant_rows(&rows, &objects);
    assert_eq!(own.len(), rows.len() - 1);
    let nb = evaluate(&own, Variant::PathBNotebook, &objects);
    // Raw values O O o t t T over s1–s6: "O" and "t" tie at 2, pandas takes the smaller ("O" < "t").
    assert_eq!(
        pair(&nb, "first_character"),
        (6, 4, 2.0 / 6.0, Some("O".into()))
    );
    // Third characters: – l – g a g over the six compliant answers: "g", 2 of 6 (undefined never is).
    assert_eq!(
        pair(&nb, "third_character"),
        (3, 1, 2.0 / 6.0, Some("g".into()))
    );
    assert_eq!((nb.overall.n, nb.overall.correct), (9, 5));
    assert!(close(nb.overall.mode_baseline, 2.0 / 6.0));

    // Notebook, a cross predictor whose own answer to s4 was a refusal: s4's rows are not asked.
    let mut cross_own = objects.to_vec();
    cross_own[3] = object("s4", "I'm sorry");
    let cross = evaluate(
        &own_compliant_rows(&rows, &cross_own),
        Variant::PathBNotebook,
        &objects,
    );
    assert_eq!(
        pair(&cross, "first_character"),
        (5, 3, 2.0 / 6.0, Some("O".into()))
    );
    assert_eq!(pair(&cross, "third_character").0, 2);
    // Path A is untouched by the rules: every joined row.
    assert_eq!(evaluate(&rows, Variant::PathA, &objects).overall.n, 10);
}

#[test]
fn training_sets_keep_compliant_defined_values() {
    let objects = [
        object("s1", "Lion, tiger"),
        object("s2", "I'm sorry, I cannot"), // non-compliant (default group)
        object("s3", "ox"),                  // third character and word undefined
    ];
    let cfg = TrainingSetConfig {
        properties: Some(vec![Property::FirstWord, Property::ThirdCharacter]),
        ..Default::default()
    };
    let (examples, counts) = build(&objects, &cfg).unwrap();
    let key = |p: &str| ("animals_long".to_string(), p.to_string());
    assert_eq!(counts[&key("first_word")].examples, 2);
    assert_eq!(counts[&key("first_word")].non_compliant, 1);
    assert_eq!(counts[&key("third_character")].examples, 1);
    assert_eq!(counts[&key("third_character")].undefined, 1);
    assert_eq!(examples.len(), 3);
    let task = Task::get("animals_long").unwrap();
    let lion = examples
        .iter()
        .find(|e| {
            e.messages[1].content == task.hypothetical_prompt("s1", Property::FirstWord).unwrap()
        })
        .expect("the first-word example of s1");
    assert_eq!(lion.messages[0].role, "system");
    assert_eq!(lion.messages[0].content, "");
    // The target keeps the raw response's punctuation and case, as the paper's targets do.
    assert_eq!(lion.messages[2].content, "Lion,");
    // At most per_pair examples per (task, property).
    let capped = build(&objects, &TrainingSetConfig { per_pair: 1, ..cfg })
        .unwrap()
        .0;
    assert_eq!(capped.len(), 2);
}
