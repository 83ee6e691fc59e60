//! The stage graph. Edges come only from `inputs`; order among independent stages follows the file.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

use anyhow::Result;

use super::spec::Pipeline;
use crate::error::clip;
use crate::user_bail;
use crate::util::suggest;

#[derive(Debug, Clone)]
pub struct Graph {
    /// Stage names in topological order (file order among independent stages).
    pub order: Vec<String>,
    /// For each stage, the stages it reads (deduplicated).
    pub deps: HashMap<String, Vec<String>>,
}

impl Graph {
    /// Builds the graph, refusing inputs that point at no stage and cycles.
    ///
    /// O((stages + edges) log stages): names are looked up in a hash index and Kahn's algorithm
    /// keeps its ready stages in a heap, so pipelines of tens of thousands of stages plan fast.
    pub fn build(p: &Pipeline) -> Result<Graph> {
        let fname = p.file.display();
        let n = p.stages.len();
        let index: HashMap<&str, usize> = p
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        // deps_idx[i]: the stages stage i reads, deduplicated, in the order written.
        let mut deps_idx: Vec<Vec<usize>> = Vec::with_capacity(n);
        for s in &p.stages {
            let mut d: Vec<usize> = Vec::new();
            let mut seen: HashSet<usize> = HashSet::new();
            for (role, r) in &s.inputs {
                for up in r.stages() {
                    let Some(&u) = index.get(up) else {
                        // Only on the error path: edit distances to every name are not free.
                        let names: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
                        user_bail!(
                            "{fname}: stage `{}`: input `{}` points to `{}`, which is not a stage{}",
                            clip(&s.name),
                            clip(role),
                            clip(up),
                            suggest(up, &names)
                        );
                    };
                    if up == s.name {
                        user_bail!(
                            "{fname}: stage `{}` reads itself (input `{}`)",
                            clip(&s.name),
                            clip(role)
                        );
                    }
                    if seen.insert(u) {
                        d.push(u);
                    }
                }
            }
            deps_idx.push(d);
        }
        // Kahn's algorithm, always taking the earliest-declared ready stage (a min-heap of file
        // positions), so the order is stable: file order among independent stages.
        let mut readers: Vec<Vec<usize>> = vec![Vec::new(); n];
        let mut waiting: Vec<usize> = vec![0; n];
        for (i, d) in deps_idx.iter().enumerate() {
            waiting[i] = d.len();
            for &u in d {
                readers[u].push(i);
            }
        }
        let mut ready: BinaryHeap<Reverse<usize>> =
            (0..n).filter(|&i| waiting[i] == 0).map(Reverse).collect();
        let mut order_idx: Vec<usize> = Vec::with_capacity(n);
        while let Some(Reverse(i)) = ready.pop() {
            order_idx.push(i);
            for &r in &readers[i] {
                waiting[r] -= 1;
                if waiting[r] == 0 {
                    ready.push(Reverse(r));
                }
            }
        }
        if order_idx.len() < n {
            let cycle = find_cycle(&waiting, &deps_idx);
            let shown: Vec<String> = cycle.iter().map(|&i| clip(&p.stages[i].name)).collect();
            user_bail!(
                "{fname}: the stages form a cycle: {}",
                clip_list(&shown, " -> ")
            );
        }
        let name = |i: usize| p.stages[i].name.clone();
        let deps = deps_idx
            .iter()
            .enumerate()
            .map(|(i, d)| (name(i), d.iter().map(|&u| name(u)).collect()))
            .collect();
        Ok(Graph {
            order: order_idx.into_iter().map(name).collect(),
            deps,
        })
    }

    /// The targets and everything they read, transitively, in topological order.
    pub fn with_upstream(&self, targets: &[String]) -> Vec<String> {
        let mut keep: HashSet<&str> = HashSet::new();
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
        self.with_downstream_all(&[root.to_string()])
    }

    /// The stages (a matrix stage's instances) and everything that reads one of them, in
    /// topological order: one pass, however many roots.
    pub fn with_downstream_all(&self, roots: &[String]) -> Vec<String> {
        let mut keep: HashSet<&str> = roots.iter().map(String::as_str).collect();
        for s in &self.order {
            if self.deps[s].iter().any(|d| keep.contains(d.as_str())) {
                keep.insert(s.as_str());
            }
        }
        self.order
            .iter()
            .filter(|s| keep.contains(s.as_str()))
            .cloned()
            .collect()
    }
}

/// A cycle among the stages Kahn's algorithm could not order (`waiting[i] > 0`), as stage
/// indices, first stage repeated at the end, each reading the next one's predecessor.
fn find_cycle(waiting: &[usize], deps: &[Vec<usize>]) -> Vec<usize> {
    // Every stuck stage has a stuck dependency, so walking dependencies must revisit a stage.
    let stuck = |i: usize| waiting[i] > 0;
    let start = (0..waiting.len())
        .find(|&i| stuck(i))
        .expect("a stuck stage");
    let mut path: Vec<usize> = vec![start];
    let mut pos: HashMap<usize, usize> = HashMap::from([(start, 0)]);
    loop {
        let cur = *path.last().expect("non-empty");
        let next = *deps[cur].iter().find(|&&d| stuck(d)).expect("stuck dep");
        if let Some(&at) = pos.get(&next) {
            let mut cycle: Vec<usize> = path[at..].to_vec();
            cycle.reverse();
            cycle.push(cycle[0]);
            return cycle;
        }
        pos.insert(next, path.len());
        path.push(next);
    }
}

/// Joins names for a message, keeping only the first and last few of a long list.
fn clip_list(items: &[String], sep: &str) -> String {
    const SHOW: usize = 8;
    if items.len() <= 2 * SHOW {
        return items.join(sep);
    }
    format!(
        "{}{sep}… ({} more){sep}{}",
        items[..SHOW].join(sep),
        items.len() - 2 * SHOW,
        items[items.len() - SHOW..].join(sep)
    )
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
