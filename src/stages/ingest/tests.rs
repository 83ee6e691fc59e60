use super::parse::dropped;
use super::*;
use proptest::prelude::*;

fn loc() -> Location {
    Location {
        file: "f.jsonl".into(),
        index: 3,
        is_line: true,
    }
}

fn parse(format: Format, row: Value) -> std::result::Result<Pair, Dropped> {
    parse_row(format, &row, &loc(), "x").unwrap()
}

fn reason(format: Format, row: Value) -> Reason {
    parse(format, row).unwrap_err().reason
}

#[test]
fn transcript_turns() {
    let t = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant: See you";
    let turns = parse_transcript(t, "chosen").unwrap();
    assert_eq!(turns.len(), 4);
    assert_eq!(turns[0], ("user".into(), "Hi there".into()));
    assert_eq!(turns[3], ("assistant".into(), "See you".into()));
    assert_eq!(
        parse_transcript("Hello", "chosen").unwrap_err().reason,
        Reason::NotATranscript
    );
    assert_eq!(
        parse_transcript("  ", "chosen").unwrap_err().reason,
        Reason::EmptyConversation
    );
    // A copy that lost the leading blank line reads the same.
    assert_eq!(parse_transcript(t.trim_start(), "chosen").unwrap(), turns);
}

#[test]
fn hh_row_shared_turns_become_the_prompt() {
    let row = json!({
        "chosen": "\n\nHuman: Q1\n\nAssistant: A1\n\nHuman: Q2\n\nAssistant: good",
        "rejected": "\n\nHuman: Q1\n\nAssistant: A1\n\nHuman: Q2\n\nAssistant: bad"
    });
    let p = parse(Format::HhRlhf, row).unwrap();
    assert_eq!(p.prompt.len(), 3);
    assert_eq!(p.prompt[1], ("assistant".into(), "A1".into()));
    assert_eq!((p.chosen.as_str(), p.rejected.as_str()), ("good", "bad"));
    let same = json!({"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "\n\nHuman: Q\n\nAssistant: A"});
    assert_eq!(reason(Format::HhRlhf, same), Reason::IdenticalResponses);
}

/// Every row-level problem of each format is a counted drop with a reason, never an error.
#[test]
fn odd_hh_rows_are_dropped_with_a_reason() {
    let hh = |c: &str, r: &str| json!({"chosen": c, "rejected": r});
    let cases = [
        // helpful-online: the transcript stops after the Human's turn.
        (
            hh(
                "\n\nHuman: Q\n\nAssistant: A\n\nHuman: more?",
                "\n\nHuman: Q\n\nAssistant: A\n\nHuman: more?",
            ),
            Reason::LastTurnNotAssistant,
        ),
        (hh("\n\nHuman: Q", "\n\nHuman: Q"), Reason::NoAssistantTurn),
        (
            hh("\n\nHuman: Q\n\nAssistant: A", "\n\nHuman: Q\n\nAssistant:"),
            Reason::EmptyResponse,
        ),
        (
            hh(
                "\n\nHuman: Q\n\nAssistant: A",
                "\n\nHuman: R\n\nAssistant: B",
            ),
            Reason::PromptMismatch,
        ),
        (hh("\n\nAssistant: A", "\n\nAssistant: B"), Reason::NoPrompt),
        (
            hh("", "\n\nHuman: Q\n\nAssistant: B"),
            Reason::EmptyConversation,
        ),
        (hh("plain text", "plain text 2"), Reason::NotATranscript),
        (
            json!({"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": null}),
            Reason::Missing("rejected"),
        ),
        (
            json!({"chosen": 5, "rejected": "\n\nHuman: Q\n\nAssistant: A"}),
            Reason::WrongType("chosen"),
        ),
        (
            json!({"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "\n\nHuman: Q\n\nAssistant: B", "split": "validation"}),
            Reason::UnknownSplit,
        ),
        (
            json!({"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "\n\nHuman: Q\n\nAssistant: B", "score_chosen": "high"}),
            Reason::WrongType("score_chosen"),
        ),
    ];
    for (row, want) in cases {
        assert_eq!(reason(Format::HhRlhf, row.clone()), want, "{row}");
    }
    assert_eq!(
        Reason::Missing("rejected").key(),
        "missing_rejected",
        "manifest key"
    );
}

#[test]
fn odd_ultrafeedback_and_preference_rows_are_dropped_with_a_reason() {
    let m = |role: &str, content: &str| json!({"role": role, "content": content});
    let uf = |c: Value, r: Value| json!({"chosen": c, "rejected": r});
    let ok = json!([m("user", "Q"), m("assistant", "A")]);
    let cases = [
        (
            uf(
                json!([m("user", "Q"), m("assistant", "A"), m("user", "?")]),
                ok.clone(),
            ),
            Reason::LastTurnNotAssistant,
        ),
        (
            uf(json!([m("user", "Q")]), ok.clone()),
            Reason::NoAssistantTurn,
        ),
        (uf(json!([]), ok.clone()), Reason::EmptyConversation),
        (
            uf(json!([m("assistant", "A")]), ok.clone()),
            Reason::NoPrompt,
        ),
        (
            uf(json!([m("user", "Q"), m("tool", "A")]), ok.clone()),
            Reason::UnknownRole,
        ),
        (
            uf(
                json!([m("user", "Q"), {"role": "assistant", "content": null}]),
                ok.clone(),
            ),
            Reason::BadMessage,
        ),
        (
            uf(ok.clone(), json!([m("user", "Q"), m("assistant", "  ")])),
            Reason::EmptyResponse,
        ),
        (
            uf(ok.clone(), json!([m("user", "Other"), m("assistant", "B")])),
            Reason::PromptMismatch,
        ),
        (uf(ok.clone(), json!("B")), Reason::MixedLayout),
        (uf(ok.clone(), json!(3)), Reason::WrongType("rejected")),
        (
            json!({"prompt": "p", "chosen": "c", "rejected": "r", "metadata": {"score_chosen": [1]}}),
            Reason::WrongType("score_chosen"),
        ),
        (
            json!({"chosen": "c", "rejected": "r"}),
            Reason::Missing("prompt"),
        ),
    ];
    for (row, want) in cases {
        assert_eq!(reason(Format::Ultrafeedback, row.clone()), want, "{row}");
    }
    let cases = [
        (
            json!({"prompt": "p", "chosen": "c"}),
            Reason::Missing("rejected"),
        ),
        (
            json!({"prompt": "", "chosen": "c", "rejected": "r"}),
            Reason::NoPrompt,
        ),
        (
            json!({"prompt": "p", "chosen": "", "rejected": "r"}),
            Reason::EmptyResponse,
        ),
        (
            json!({"prompt": ["p"], "chosen": "c", "rejected": "r"}),
            Reason::WrongType("prompt"),
        ),
    ];
    for (row, want) in cases {
        assert_eq!(reason(Format::Preference, row.clone()), want, "{row}");
    }
}

#[test]
fn missing_field_names_the_field() {
    let d = parse(Format::Preference, json!({"prompt": "p", "chosen": "c"})).unwrap_err();
    assert_eq!(d.reason, Reason::Missing("rejected"));
    assert_eq!(d.detail, "missing field `rejected` (format preference)");
}

#[test]
fn a_row_that_is_not_an_object_is_a_malformed_file() {
    let err = parse_row(Format::Preference, &json!([1, 2]), &loc(), "x").unwrap_err();
    assert!(crate::error::is_user_error(&err));
    assert_eq!(
        err.to_string(),
        "f.jsonl line 3: expected a JSON object, found a list"
    );
}

#[test]
fn drop_summary_ranks_reasons_and_names_the_first_row() {
    let mut drops = Drops::default();
    let at = |i| Location {
        file: "d.jsonl".into(),
        index: i,
        is_line: true,
    };
    drops.add(dropped(Reason::EmptyResponse, "e"), &at(4));
    drops.add(dropped(Reason::Missing("rejected"), "m"), &at(2));
    drops.add(dropped(Reason::Missing("rejected"), "m"), &at(9));
    assert_eq!(drops.total(), 3);
    assert_eq!(
        drops.explain(5),
        "2 missing_rejected (first: d.jsonl line 2: m); 1 empty_response (first: d.jsonl line 4: e)"
    );
    assert_eq!(
        drops.explain(1),
        "2 missing_rejected (first: d.jsonl line 2: m); 1 more for 1 other reasons"
    );
    assert_eq!(percent(1, 2354), "<0.1%");
    assert_eq!(percent(3, 40), "7.5%");
}

#[test]
fn ultrafeedback_string_layout_with_metadata_scores() {
    let row = json!({"prompt": "p", "chosen": "c", "rejected": "r", "metadata": {"score_chosen": 8.5, "score_rejected": 3.0}});
    let p = parse(Format::Ultrafeedback, row).unwrap();
    assert_eq!(p.score_chosen, Some(8.5));
    assert_eq!(p.prompt, vec![("user".to_string(), "p".to_string())]);
}

#[test]
fn split_is_stable_and_roughly_proportional() {
    let n = (0..10_000)
        .filter(|i| in_test(&format!("id{i}"), 0.1))
        .count();
    assert!((900..1100).contains(&n), "{n}");
    assert!(!in_test("anything", 0.0));
}

#[test]
fn renamed_ids_do_not_collide_with_ids_already_there() {
    let mut ids: Vec<String> = ["a", "a", "a#2"].map(String::from).to_vec();
    unique_ids(&mut ids);
    assert_eq!(ids, ["a", "a#3", "a#2"]);
    let mut ids: Vec<String> = ["a", "a", "a", "b"].map(String::from).to_vec();
    unique_ids(&mut ids);
    assert_eq!(ids, ["a", "a#2", "a#3", "b"]);
}

proptest! {
    /// Whatever ids the rows carry (repeats, and ids that look like renamings), the ids
    /// after renaming are unique, every row's first occurrence keeps its id, and a renamed
    /// id is the original plus `#n`.
    #[test]
    fn ids_are_unique_after_renaming(raw in prop::collection::vec("[ab](#[1-4]){0,2}", 0..40)) {
        let mut ids = raw.clone();
        unique_ids(&mut ids);
        let set: HashSet<&String> = ids.iter().collect();
        prop_assert_eq!(set.len(), ids.len(), "{:?} -> {:?}", raw, ids);
        let mut seen = HashSet::new();
        for (before, after) in raw.iter().zip(&ids) {
            if seen.insert(before) {
                prop_assert_eq!(before, after);
            } else {
                let n = after.strip_prefix(&format!("{before}#")).and_then(|n| n.parse::<usize>().ok());
                prop_assert!(n.is_some_and(|n| n >= 2), "{} -> {}", before, after);
            }
        }
    }
}
