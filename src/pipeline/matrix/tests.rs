use std::path::Path;

use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::pipeline::stage::{BuildContext, Role, Stage, params_schema};

/// The parameters every test kind has (only their names matter to expansion).
#[derive(schemars::JsonSchema)]
#[allow(dead_code)]
struct Params {
    seed: u64,
    lr: f64,
    ratio: f64,
    name: String,
}

fn never_built(_: &Value, _: &BuildContext) -> Result<Box<dyn Stage>> {
    anyhow::bail!("expansion never builds a stage")
}

const fn kind(kind: &'static str, roles: &'static [Role]) -> StageKind {
    StageKind {
        kind,
        version: "1",
        roles,
        uses_device: false,
        build: never_built,
        params_schema: params_schema::<Params>,
    }
}

const fn role(name: &'static str, many: bool) -> Role {
    Role {
        name,
        required: false,
        many,
        kinds: &[],
    }
}

static DATA: StageKind = kind("data", &[]);
static STEP: StageKind = kind("step", &[role("data", false), role("model", false)]);
static EVAL: StageKind = kind("eval", &[role("policies", true), role("reference", false)]);
static KINDS: Registry = Registry::new(&[&DATA, &STEP, &EVAL]);

fn load(yaml: &str, sets: &[&str]) -> Result<Pipeline> {
    let mut p = Pipeline::parse(yaml, Path::new("p/x.yaml"))?;
    for s in sets {
        p.apply_set(s)?;
    }
    expand(&mut p, &KINDS)?;
    Ok(p)
}

fn names(p: &Pipeline) -> Vec<&str> {
    p.stages.iter().map(|s| s.name.as_str()).collect()
}

fn stage<'a>(p: &'a Pipeline, name: &str) -> &'a StageDecl {
    p.stage(name)
        .unwrap_or_else(|| panic!("no stage {name} in {:?}", names(p)))
}

fn input(p: &Pipeline, name: &str, role: &str) -> InputRef {
    stage(p, name).inputs[role].clone()
}

fn err(yaml: &str, sets: &[&str]) -> String {
    let e = load(yaml, sets).expect_err("an error");
    assert!(crate::error::is_user_error(&e), "{e:#}");
    crate::error::render(&e)
}

fn many(v: &[&str]) -> InputRef {
    InputRef::Many(v.iter().map(|s| s.to_string()).collect())
}

#[test]
fn own_keys_make_the_product_in_written_order() {
    let p = load(
        "stages:\n  a: {kind: data, name: x, matrix: {seed: [1, 2], lr: [0.1, 1e-3]}}\n  b: {kind: data}\n",
        &[],
    )
    .unwrap();
    assert_eq!(
        names(&p),
        [
            "a@seed=1,lr=0.1",
            "a@seed=1,lr=0.001",
            "a@seed=2,lr=0.1",
            "a@seed=2,lr=0.001",
            "b"
        ]
    );
    let s = stage(&p, "a@seed=2,lr=0.1");
    assert_eq!(s.params["seed"], json!(2));
    assert_eq!(s.params["lr"], json!(0.1));
    assert_eq!(s.params["name"], json!("x"));
    assert!(s.matrix.is_empty());
    assert_eq!(
        s.instance,
        Some(Instance {
            base: "a".into(),
            values: vec![("seed".into(), json!(2)), ("lr".into(), json!(0.1))]
        })
    );
    assert_eq!(p.matrices["a"].len(), 4);
    assert!(!p.matrices.contains_key("b"));
    // Strings are shown as themselves in names.
    let p = load(
        "stages:\n  a: {kind: data, matrix: {name: [x, 'y']}}\n",
        &[],
    )
    .unwrap();
    assert_eq!(names(&p), ["a@name=x", "a@name=y"]);
}

#[test]
fn a_single_stage_role_makes_the_reader_a_matrix_down_the_graph() {
    let p = load(
        "stages:\n  keys: {kind: data, matrix: {ratio: [0.3, 0.5]}}\n  ref: {kind: data}\n  policy: {kind: step, inputs: {data: keys, model: ref}, lr: 0.1}\n  after: {kind: step, inputs: {model: policy}}\n",
        &[],
    )
    .unwrap();
    assert_eq!(
        names(&p),
        [
            "keys@ratio=0.3",
            "keys@ratio=0.5",
            "ref",
            "policy@ratio=0.3",
            "policy@ratio=0.5",
            "after@ratio=0.3",
            "after@ratio=0.5"
        ]
    );
    let pol = stage(&p, "policy@ratio=0.5");
    assert_eq!(pol.inputs["data"], InputRef::One("keys@ratio=0.5".into()));
    assert_eq!(pol.inputs["model"], InputRef::One("ref".into()));
    // An inherited key is the upstream's parameter, not the reader's.
    assert!(!pol.params.contains_key("ratio"));
    assert_eq!(
        input(&p, "after@ratio=0.3", "model"),
        InputRef::One("policy@ratio=0.3".into())
    );
    assert_eq!(
        p.matrices["policy"],
        ["policy@ratio=0.3", "policy@ratio=0.5"]
    );
}

#[test]
fn a_list_role_gets_every_instance() {
    let p = load(
        "stages:\n  policy: {kind: step, matrix: {seed: [1, 2]}}\n  dpo: {kind: step}\n  report: {kind: eval, inputs: {policies: [policy, dpo], reference: dpo}}\n  one: {kind: eval, inputs: {policies: policy}}\n",
        &[],
    )
    .unwrap();
    assert_eq!(
        input(&p, "report", "policies"),
        many(&["policy@seed=1", "policy@seed=2", "dpo"])
    );
    // One name written in a list role is a list too.
    assert_eq!(
        input(&p, "one", "policies"),
        many(&["policy@seed=1", "policy@seed=2"])
    );
    assert!(stage(&p, "report").instance.is_none());
}

#[test]
fn several_matrices_join_on_shared_keys() {
    let p = load(
        "stages:\n  ref: {kind: data, matrix: {seed: [1, 2]}}\n  keys: {kind: step, inputs: {model: ref}, matrix: {ratio: [0.3, 0.5]}}\n  policy: {kind: step, inputs: {data: keys, model: ref}}\n  report: {kind: eval, inputs: {policies: [policy], reference: ref}}\n",
        &[],
    )
    .unwrap();
    // keys: inherited seed first, then its own ratio; policy reads matching instances only.
    assert_eq!(
        p.matrices["keys"],
        [
            "keys@seed=1,ratio=0.3",
            "keys@seed=1,ratio=0.5",
            "keys@seed=2,ratio=0.3",
            "keys@seed=2,ratio=0.5"
        ]
    );
    assert_eq!(p.matrices["policy"].len(), 4);
    let pol = stage(&p, "policy@seed=2,ratio=0.3");
    assert_eq!(
        pol.inputs["data"],
        InputRef::One("keys@seed=2,ratio=0.3".into())
    );
    assert_eq!(pol.inputs["model"], InputRef::One("ref@seed=2".into()));
    // The report is a matrix over seed (its reference), listing that seed's policies.
    assert_eq!(p.matrices["report"], ["report@seed=1", "report@seed=2"]);
    assert_eq!(
        input(&p, "report@seed=1", "policies"),
        many(&["policy@seed=1,ratio=0.3", "policy@seed=1,ratio=0.5"])
    );
}

#[test]
fn an_own_key_an_input_has_is_matched_not_multiplied() {
    let p = load(
        "stages:\n  ref: {kind: data, matrix: {seed: [1, 2, 3]}}\n  s: {kind: step, inputs: {model: ref}, matrix: {seed: [3, 2], lr: [0.1]}}\n",
        &[],
    )
    .unwrap();
    assert_eq!(p.matrices["s"], ["s@seed=2,lr=0.1", "s@seed=3,lr=0.1"]);
    let s = stage(&p, "s@seed=3,lr=0.1");
    assert_eq!(s.params["seed"], json!(3));
    assert_eq!(s.inputs["model"], InputRef::One("ref@seed=3".into()));
    let e = err(
        "stages:\n  ref: {kind: data, matrix: {seed: [1]}}\n  s: {kind: step, inputs: {model: ref}, matrix: {seed: [2]}}\n",
        &[],
    );
    assert!(e.contains("`s`") && e.contains("matrix.seed"), "{e}");
    let e = err(
        "stages:\n  a: {kind: data, matrix: {seed: [1]}}\n  b: {kind: data, matrix: {seed: [2]}}\n  s: {kind: step, inputs: {model: a, data: b}}\n",
        &[],
    );
    assert!(
        e.contains("p/x.yaml: stage `s`") && e.contains("no instance"),
        "{e}"
    );
}

#[test]
fn one_instance_can_be_named_directly() {
    // Declared before the matrix it reads: the order comes from the graph.
    let p = load(
        "stages:\n  b: {kind: step, inputs: {model: a@seed=2}}\n  a: {kind: data, matrix: {seed: [1, 2]}}\n",
        &[],
    )
    .unwrap();
    assert_eq!(names(&p), ["b", "a@seed=1", "a@seed=2"]);
    assert_eq!(input(&p, "b", "model"), InputRef::One("a@seed=2".into()));
    assert!(stage(&p, "b").instance.is_none());
}

#[test]
fn no_matrix_leaves_the_pipeline_as_it_is() {
    let yaml = "stages:\n  b: {kind: step, inputs: {model: a}, lr: 0.1}\n  a: {kind: data}\n";
    let before = Pipeline::parse(yaml, Path::new("p/x.yaml")).unwrap();
    let after = load(yaml, &[]).unwrap();
    assert_eq!(names(&after), names(&before));
    for (x, y) in before.stages.iter().zip(&after.stages) {
        assert_eq!((&x.inputs, &x.params), (&y.inputs, &y.params));
    }
    assert!(after.matrices.is_empty());
}

#[test]
fn matrix_errors_name_the_file_and_stage() {
    let e = err("stages:\n  a: {kind: data, matrix: {sed: [1]}}\n", &[]);
    assert!(
        e.contains("p/x.yaml: stage `a`")
            && e.contains("`sed` is not a parameter")
            && e.contains("did you mean `seed`"),
        "{e}"
    );
    let e = err("stages:\n  a: {kind: data, matrix: {seed: []}}\n", &[]);
    assert!(e.contains("stage `a`") && e.contains("empty list"), "{e}");
    let e = err("stages:\n  a: {kind: data, matrix: {seed: 1}}\n", &[]);
    assert!(
        e.contains("stage `a`") && e.contains("must be a list"),
        "{e}"
    );
    let e = err("stages:\n  a: {kind: data, matrix: [1, 2]}\n", &[]);
    assert!(
        e.contains("stage `a`") && e.contains("must map parameters"),
        "{e}"
    );
    for dup in ["[1, 2, 1]", "[1, 1.0]", "['1', 1]"] {
        let e = err(
            &format!("stages:\n  a: {{kind: data, matrix: {{seed: {dup}}}}}\n"),
            &[],
        );
        assert!(e.contains("stage `a`") && e.contains("twice"), "{dup}: {e}");
    }
    let e = err(
        "stages:\n  a: {kind: data, seed: 3, matrix: {seed: [1]}}\n",
        &[],
    );
    assert!(
        e.contains("stage `a`") && e.contains("both a parameter and a matrix key"),
        "{e}"
    );
    let e = err(
        "stages:\n  a: {kind: data, matrix: {seed: [1]}}\n  a@seed=1: {kind: data}\n",
        &[],
    );
    assert!(e.contains("`a@seed=1`, the name of another stage"), "{e}");
}

#[test]
fn too_many_instances_is_an_error_before_any_is_made() {
    let seeds: Vec<u32> = (0..101).collect();
    let lrs: Vec<u32> = (0..100).collect();
    let yaml = format!(
        "stages:\n  a: {{kind: data, matrix: {{seed: {seeds:?}, lr: {lrs:?}}}}}\n  b: {{kind: data, matrix: {{seed: [1]}}}}\n"
    );
    let e = err(&yaml, &[]);
    assert!(
        e.contains("stage `a`") && e.contains("more than 10000"),
        "{e}"
    );
    // The cap counts every matrix of the pipeline.
    let yaml = format!(
        "stages:\n  a: {{kind: data, matrix: {{seed: {lrs:?}, lr: {lrs:?}}}}}\n  b: {{kind: step, inputs: {{model: a}}}}\n"
    );
    let e = err(&yaml, &[]);
    assert!(
        e.contains("stage `b`") && e.contains("more than 10000"),
        "{e}"
    );
}

#[test]
fn set_addresses_all_instances_one_instance_or_the_values() {
    let yaml = "stages:\n  keys: {kind: data, matrix: {ratio: [0.3, 0.5]}}\n  policy: {kind: step, inputs: {data: keys}}\n";
    let p = load(
        yaml,
        &[
            "policy.lr=0.1",
            "policy@ratio=0.5.lr=0.2",
            "keys@ratio=0.3.name=n",
        ],
    )
    .unwrap();
    assert_eq!(stage(&p, "policy@ratio=0.3").params["lr"], json!(0.1));
    assert_eq!(stage(&p, "policy@ratio=0.5").params["lr"], json!(0.2));
    assert_eq!(stage(&p, "keys@ratio=0.3").params["name"], json!("n"));
    assert!(!stage(&p, "keys@ratio=0.5").params.contains_key("name"));
    let p = load(
        yaml,
        &["keys.matrix.ratio=[0.1]", "keys.matrix.seed=[7, 8]"],
    )
    .unwrap();
    assert_eq!(
        p.matrices["keys"],
        ["keys@ratio=0.1,seed=7", "keys@ratio=0.1,seed=8"]
    );
    let p = load(yaml, &["keys.matrix={}"]).unwrap();
    assert_eq!(names(&p), ["keys", "policy"]);
    let e = err(yaml, &["keys@ratio=0.3.ratio=0.4"]);
    assert!(e.contains("matrix key of `keys`"), "{e}");
    let e = err(yaml, &["keys@ratio=0.4.name=n"]);
    assert!(
        e.contains("no stage or matrix instance `keys@ratio=0.4`")
            && e.contains("did you mean `keys@ratio=0.3`"),
        "{e}"
    );
    let e = err(yaml, &["keys.ratio=0.4"]);
    assert!(e.contains("both a parameter and a matrix key"), "{e}");
}

proptest! {
    /// Any matrix of own keys makes the product of its lists: unique names, in order, each
    /// instance with its values set and named by them.
    #[test]
    fn own_matrix_is_the_product(sizes in proptest::collection::vec(1usize..5, 1..4)) {
        let keys = ["seed", "lr", "ratio"];
        let axes: Vec<String> = sizes
            .iter()
            .zip(keys)
            .map(|(n, k)| format!("{k}: {:?}", (0..*n).collect::<Vec<_>>()))
            .collect();
        let yaml = format!("stages:\n  a: {{kind: data, matrix: {{{}}}}}\n", axes.join(", "));
        let p = load(&yaml, &[]).unwrap();
        let n: usize = sizes.iter().product();
        prop_assert_eq!(p.stages.len(), n);
        let unique: HashSet<&str> = names(&p).into_iter().collect();
        prop_assert_eq!(unique.len(), n);
        for (i, s) in p.stages.iter().enumerate() {
            // Mixed radix: the first key varies slowest.
            let mut rest = i;
            let mut digits = vec![0; sizes.len()];
            for (d, size) in digits.iter_mut().zip(&sizes).rev() {
                *d = rest % size;
                rest /= size;
            }
            let values: Vec<(String, Value)> =
                keys.iter().zip(&digits).map(|(k, d)| (k.to_string(), json!(d))).collect();
            prop_assert_eq!(&s.name, &instance_name("a", &values));
            for (k, v) in &values {
                prop_assert_eq!(&s.params[k], v);
            }
        }
    }
}
