//! The stage graph. Edges come only from `inputs`; order among independent stages follows the file.

use std::collections::{BTreeSet, HashMap};

use anyhow::Result;

use super::spec::{Pipeline, suggest};
use crate::user_bail;

#[derive(Debug, Clone)]
pub struct Graph {
    /// Stage names in topological order (file order among independent stages).
    pub order: Vec<String>,
    /// For each stage, the stages it reads (deduplicated).
    pub deps: HashMap<String, Vec<String>>,
}

impl Graph {
    /// Builds the graph, refusing inputs that point at no stage and cycles.
    pub fn build(p: &Pipeline) -> Result<Graph> {
        let fname = p.file.display();
        let names: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
        let mut deps: HashMap<String, Vec<String>> = HashMap::new();
        for s in &p.stages {
            let mut d: Vec<String> = Vec::new();
            for (role, r) in &s.inputs {
                for up in r.stages() {
                    if !names.contains(&up) {
                        user_bail!(
                            "{fname}: stage `{}`: input `{role}` points to `{up}`, which is not a stage{}",
                            s.name,
                            suggest(up, &names)
                        );
                    }
                    if up == s.name {
                        user_bail!("{fname}: stage `{}` reads itself (input `{role}`)", s.name);
                    }
                    if !d.iter().any(|x| x == up) {
                        d.push(up.to_string());
                    }
                }
            }
            deps.insert(s.name.clone(), d);
        }
        // Kahn's algorithm, always taking the earliest-declared ready stage, so the order is stable.
        let mut done: BTreeSet<usize> = BTreeSet::new();
        let mut order = Vec::new();
        while order.len() < names.len() {
            let next = (0..names.len()).find(|&i| {
                !done.contains(&i)
                    && deps[names[i]]
                        .iter()
                        .all(|d| order.iter().any(|o: &String| o == d))
            });
            match next {
                Some(i) => {
                    done.insert(i);
                    order.push(names[i].to_string());
                }
                None => {
                    let stuck: Vec<&str> = (0..names.len())
                        .filter(|i| !done.contains(i))
                        .map(|i| names[i])
                        .collect();
                    let cycle = find_cycle(&stuck, &deps);
                    user_bail!("{fname}: the stages form a cycle: {}", cycle.join(" -> "));
                }
            }
        }
        Ok(Graph { order, deps })
    }

    /// The targets and everything they read, transitively, in topological order.
    pub fn with_upstream(&self, targets: &[String]) -> Vec<String> {
        let mut keep: BTreeSet<&str> = BTreeSet::new();
        let mut stack: Vec<&str> = targets.iter().map(String::as_str).collect();
        while let Some(s) = stack.pop() {
            if keep.insert(s) {
                stack.extend(self.deps[s].iter().map(String::as_str));
            }
        }
        self.order
            .iter()
            .filter(|s| keep.contains(s.as_str()))
            .cloned()
            .collect()
    }

    /// The stage and everything that reads it, transitively, in topological order.
    pub fn with_downstream(&self, root: &str) -> Vec<String> {
        let mut keep: BTreeSet<String> = BTreeSet::from([root.to_string()]);
        for s in &self.order {
            if self.deps[s].iter().any(|d| keep.contains(d)) {
                keep.insert(s.clone());
            }
        }
        self.order
            .iter()
            .filter(|s| keep.contains(*s))
            .cloned()
            .collect()
    }
}

fn find_cycle(stuck: &[&str], deps: &HashMap<String, Vec<String>>) -> Vec<String> {
    // Every stuck stage has a stuck dependency, so walking dependencies must revisit a stage.
    let mut path: Vec<String> = vec![stuck[0].to_string()];
    loop {
        let cur = path.last().expect("non-empty").clone();
        let next = deps[&cur]
            .iter()
            .find(|d| stuck.contains(&d.as_str()))
            .expect("stuck dep");
        if let Some(pos) = path.iter().position(|p| p == next) {
            let mut cycle: Vec<String> = path[pos..].to_vec();
            cycle.reverse();
            cycle.push(cycle[0].clone());
            return cycle;
        }
        path.push(next.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn graph(yaml: &str) -> Result<Graph> {
        Graph::build(&Pipeline::parse(yaml, Path::new("x.yaml")).unwrap())
    }

    #[test]
    fn topological_and_stable() {
        let g = graph(
            "stages:\n  c: {kind: k, inputs: {a: b}}\n  b: {kind: k, inputs: {a: a}}\n  a: {kind: k}\n  d: {kind: k}\n",
        )
        .unwrap();
        // Each step takes the earliest-declared stage whose inputs are done.
        assert_eq!(g.order, ["a", "b", "c", "d"]);
        assert_eq!(g.with_upstream(&["b".into()]), ["a", "b"]);
        assert_eq!(g.with_downstream("b"), ["b", "c"]);
    }

    #[test]
    fn cycle_is_named() {
        let err =
            graph("stages:\n  a: {kind: k, inputs: {x: b}}\n  b: {kind: k, inputs: {x: a}}\n")
                .unwrap_err();
        let msg = crate::error::render(&err);
        assert!(
            msg.contains("cycle") && msg.contains("a -> b -> a") || msg.contains("b -> a -> b"),
            "{msg}"
        );
    }

    #[test]
    fn dangling_input_is_named() {
        let err = graph("stages:\n  a: {kind: k, inputs: {data: pairz}}\n  pairs: {kind: k}\n")
            .unwrap_err();
        let msg = crate::error::render(&err);
        assert!(
            msg.contains("`pairz`") && msg.contains("did you mean `pairs`"),
            "{msg}"
        );
    }
}
