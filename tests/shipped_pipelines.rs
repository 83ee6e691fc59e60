//! Every pipeline in pipelines/ plans: the graph, every stage's parameters and roles are valid
//! (`sepo dag`), and the files it reads are in the repository, except pipelines/real/, whose
//! weights and data a user downloads: `dag` checks those without them and names what is missing.

mod common;

use common::{data, sepo};

fn yaml_files(dir: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(data(dir))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| p.display().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn shipped_pipelines_plan_with_their_files() {
    let files = yaml_files("pipelines");
    assert!(files.len() >= 4, "{files:?}");
    for p in files {
        let cache = tempfile::tempdir().unwrap();
        let cache = cache.path().display().to_string();
        let r = sepo(&["dag", &p, "--cache", &cache]);
        assert_eq!(r.code, 0, "{p}: {}", r.stderr);
        assert!(!r.stdout.contains("needs files"), "{p}: {}", r.stdout);
        // `run --dry-run` hashes every file: all of them are in the repository.
        let r = sepo(&["run", &p, "--dry-run", "--cache", &cache]);
        assert_eq!(r.code, 0, "{p}: {}", r.stderr);
    }
}

#[test]
fn real_run_configurations_validate_without_weights() {
    let files = yaml_files("pipelines/real");
    assert!(!files.is_empty());
    for p in files {
        let cache = tempfile::tempdir().unwrap();
        let cache = cache.path().display().to_string();
        let r = sepo(&["dag", &p, "--cache", &cache]);
        assert_eq!(r.code, 0, "{p}: {}", r.stderr);
        assert!(
            r.stdout.contains("(evaluate, needs files"),
            "{p}: {}",
            r.stdout
        );
        assert!(
            r.stdout.contains("model folder not found"),
            "{p}: {}",
            r.stdout
        );
        // Running it is an error naming the missing file, before anything runs.
        let r = sepo(&["run", &p, "--cache", &cache]);
        assert_eq!(r.code, 2, "{p}: {}", r.stderr);
        assert!(
            r.stderr.contains("matches no file") || r.stderr.contains("not found"),
            "{}",
            r.stderr
        );
        // A typo in a parameter is still caught without the files.
        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replace("chosen_ratio", "chosen_ration");
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("real").join("p.yaml");
        std::fs::create_dir_all(q.parent().unwrap()).unwrap();
        std::fs::write(&q, text).unwrap();
        let r = sepo(&["dag", &q.display().to_string()]);
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert!(r.stderr.contains("chosen_ration"), "{}", r.stderr);
    }
}
