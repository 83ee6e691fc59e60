use serde_json::json;

use super::*;

/// A report row as `evaluate` writes it, turned into a sample the way `gather` does: the
/// method from the stage's matrix values, and the parameters given.
fn sample(policy: &str, role: &str, metric: &str, value: f64, params: Value) -> Sample {
    let instance = policy.split_once('@').map(|(base, values)| Instance {
        base: base.to_string(),
        values: values
            .split(',')
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_string(), serde_json::from_str(v).unwrap_or(json!(v)))
            })
            .collect(),
    });
    let mut p = BTreeMap::new();
    flatten("", &params, &mut p);
    Sample {
        evaluate: "report".into(),
        method: method_of(policy, instance.as_ref()),
        role: role.into(),
        metric: metric.into(),
        value,
        params: p,
    }
}

/// Two methods over seeds and a reference: SePO on 3 seeds, DPO on 2, with one figure DPO lacks.
fn samples() -> Vec<Sample> {
    let sepo = json!({"objective": "sepo", "lr": 0.001, "epochs": 1});
    let dpo = json!({"objective": "dpo", "lr": 0.001, "epochs": 1, "beta": 0.1});
    let mut v = Vec::new();
    for (seed, acc, win) in [(1, 0.6, 0.5), (2, 0.7, 0.6), (3, 0.8, 0.55)] {
        let name = format!("policy@seed={seed}");
        v.push(sample(&name, "policy", "accuracy", acc, sepo.clone()));
        v.push(sample(&name, "policy", "win_rate", win, sepo.clone()));
    }
    for (seed, acc) in [(1, 0.5), (2, 0.6)] {
        let name = format!("dpo@seed={seed}");
        v.push(sample(&name, "policy", "accuracy", acc, dpo.clone()));
    }
    v.push(sample(
        "ref",
        "reference",
        "accuracy",
        0.4,
        json!({"objective": "sft"}),
    ));
    v
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[test]
fn seeds_are_one_method_with_mean_and_sample_std() {
    let t = Table::aggregate(&samples());
    assert_eq!(t.metrics, ["accuracy", "win_rate"]);
    let methods: Vec<(&str, &str)> = t
        .rows
        .iter()
        .map(|r| (r.method.as_str(), r.role.as_str()))
        .collect();
    assert_eq!(
        methods,
        [
            ("policy", "policy"),
            ("dpo", "policy"),
            ("ref", "reference")
        ]
    );
    let acc = t.rows[0].stats[0].as_ref().unwrap();
    assert_eq!(acc.n, 3);
    assert!(close(acc.mean, 0.7));
    // Sample std of 0.6, 0.7, 0.8: sqrt((0.01 + 0 + 0.01) / 2) = 0.1.
    assert!(close(acc.std.unwrap(), 0.1), "{acc:?}");
    let dpo = t.rows[1].stats[0].as_ref().unwrap();
    assert!(close(dpo.mean, 0.55) && close(dpo.std.unwrap(), 0.5f64.sqrt() * 0.1));
    assert_eq!(t.rows[1].stats[1], None, "dpo has no win rate");
    let reference = t.rows[2].stats[0].as_ref().unwrap();
    assert_eq!((reference.n, reference.std), (1, None));
}

#[test]
fn only_parameters_that_differ_between_policies_are_shown() {
    let t = Table::aggregate(&samples());
    // lr and epochs are the same for both policies; the seed is what is averaged over.
    assert_eq!(t.param_keys, ["beta", "objective"]);
    assert_eq!(t.rows[0].params.get("beta"), None);
    assert_eq!(t.rows[1].params["beta"], json!(0.1));
    assert_eq!(t.rows[2].params["objective"], json!("sft"));
}

#[test]
fn method_is_the_name_without_seed_values() {
    let inst = |values: Vec<(&str, Value)>| Instance {
        base: "policy".into(),
        values: values
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    };
    assert_eq!(
        method_of("x", Some(&inst(vec![("seed", json!(1))]))),
        "policy"
    );
    assert_eq!(
        method_of(
            "x",
            Some(&inst(vec![
                ("chosen_ratio", json!(0.3)),
                ("seed", json!(1))
            ]))
        ),
        "policy@chosen_ratio=0.3"
    );
    // A name the plan does not know is read as written.
    assert_eq!(
        method_of("policy@chosen_ratio=0.3,seed=1", None),
        "policy@chosen_ratio=0.3"
    );
    assert_eq!(method_of("policy@seed=2", None), "policy");
    assert_eq!(method_of("dpo", None), "dpo");
}

#[test]
fn matrix_values_that_are_not_seeds_are_parameters_and_methods() {
    let mut v = Vec::new();
    for (ratio, seed, acc) in [(0.3, 1, 0.6), (0.3, 2, 0.7), (0.5, 1, 0.5)] {
        let name = format!("policy@chosen_ratio={ratio},seed={seed}");
        let mut s = sample(&name, "policy", "accuracy", acc, json!({"lr": 0.1}));
        s.params.insert("chosen_ratio".into(), json!(ratio));
        v.push(s);
    }
    let t = Table::aggregate(&v);
    let methods: Vec<&str> = t.rows.iter().map(|r| r.method.as_str()).collect();
    assert_eq!(
        methods,
        ["policy@chosen_ratio=0.3", "policy@chosen_ratio=0.5"]
    );
    assert_eq!(t.param_keys, ["chosen_ratio"]);
    assert_eq!(t.rows.iter().map(Row::seeds).collect::<Vec<_>>(), [2, 1]);
}

#[test]
fn text_and_markdown_put_methods_in_rows_and_metrics_in_columns() {
    let t = Table::aggregate(&samples());
    let mut out = Vec::new();
    t.write(&mut out, Format::Md).unwrap();
    let md = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = md.lines().collect();
    assert_eq!(lines.len(), 5, "{md}");
    let cells = |line: &str| -> Vec<String> {
        line.trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_string())
            .collect()
    };
    assert_eq!(
        cells(lines[0]),
        [
            "method",
            "role",
            "beta",
            "objective",
            "seeds",
            "accuracy",
            "win_rate"
        ]
    );
    assert!(lines[1].starts_with("|-"), "{md}");
    assert_eq!(
        cells(lines[2]),
        [
            "policy",
            "policy",
            "-",
            "sepo",
            "3",
            "0.7000 ± 0.1000",
            "0.5500 ± 0.0500"
        ]
    );
    assert_eq!(
        cells(lines[3]),
        ["dpo", "policy", "0.1", "dpo", "2", "0.5500 ± 0.0707", "-"]
    );
    assert_eq!(
        cells(lines[4]),
        ["ref", "reference", "-", "sft", "1", "0.4000", "-"]
    );
    let mut out = Vec::new();
    t.write(&mut out, Format::Text).unwrap();
    let text = String::from_utf8(out).unwrap();
    let first: Vec<&str> = text.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(
        first,
        [
            "policy", "policy", "-", "sepo", "3", "0.7000", "±", "0.1000", "0.5500", "±", "0.0500"
        ],
        "{text}"
    );
}

#[test]
fn fewer_seeds_for_one_metric_is_said_in_its_cell() {
    let mut v = samples();
    v.retain(|s| !(s.method == "policy" && s.metric == "win_rate" && s.value == 0.6));
    let t = Table::aggregate(&v);
    let mut out = Vec::new();
    t.write(&mut out, Format::Md).unwrap();
    let md = String::from_utf8(out).unwrap();
    assert!(md.contains("0.5250 ± 0.0354 (n=2)"), "{md}");
}

#[test]
fn csv_and_json_are_long_form() {
    let t = Table::aggregate(&samples());
    let mut out = Vec::new();
    t.write(&mut out, Format::Csv).unwrap();
    let text = String::from_utf8(out).unwrap();
    let mut r = csv::Reader::from_reader(text.as_bytes());
    let header: Vec<String> = r.headers().unwrap().iter().map(String::from).collect();
    assert_eq!(
        header,
        [
            "evaluate",
            "method",
            "role",
            "metric",
            "mean",
            "std",
            "n_seeds",
            "beta",
            "objective"
        ]
    );
    let rows: Vec<Vec<String>> = r
        .records()
        .map(|x| x.unwrap().iter().map(String::from).collect())
        .collect();
    // policy: 2 metrics, dpo: 1, ref: 1.
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[2][..4], ["report", "dpo", "policy", "accuracy"]);
    assert!(close(rows[2][4].parse().unwrap(), 0.55));
    assert_eq!(rows[2][6..], ["2", "0.1", "dpo"]);
    assert_eq!(rows[3][5], "", "one seed: no std");
    let json = t.to_json();
    let all = json.as_array().unwrap();
    assert_eq!(all.len(), 4);
    assert_eq!(all[0]["method"], "policy");
    assert_eq!(all[0]["metric"], "accuracy");
    assert_eq!(all[0]["n_seeds"], 3);
    assert!(close(all[0]["std"].as_f64().unwrap(), 0.1));
    assert_eq!(all[0]["params"], json!({"objective": "sepo"}));
    assert_eq!(all[3]["std"], Value::Null);
}

#[test]
fn several_evaluations_get_a_column_and_are_not_mixed() {
    let mut v = samples();
    let mut other = samples();
    for s in &mut other {
        s.evaluate = "report_long".into();
        s.value += 1.0;
    }
    v.extend(other);
    let t = Table::aggregate(&v);
    assert_eq!(t.rows.len(), 6);
    assert!(close(t.rows[3].stats[0].as_ref().unwrap().mean, 1.7));
    let mut out = Vec::new();
    t.write(&mut out, Format::Md).unwrap();
    let md = String::from_utf8(out).unwrap();
    assert!(md.lines().next().unwrap().starts_with("| evaluate"), "{md}");
}

#[test]
fn decimals_keep_four_significant_digits() {
    assert_eq!(decimals(0.61234), 4);
    assert_eq!(decimals(12.3456), 2);
    assert_eq!(decimals(123456.0), 0);
    assert_eq!(decimals(0.000012), 6);
    assert_eq!(decimals(f64::NAN), 4);
}
