//! Arbitrary bytes into the YAML loader and every ingest parser: they may refuse the input, but
//! must never panic. (Case counts are set by PROPTEST_CASES; the defaults run in CI.)

use proptest::prelude::*;
use sepo::data::rows::for_each_row;
use sepo::pipeline::Pipeline;
use sepo::stages::ingest::{Format, parse_row};

/// Bytes biased toward the shapes these parsers see, so the fuzzing gets past the first byte.
fn yaml_like() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        "(stages:|name:|cache:|seed:|  [a-z]{1,3}:| \\{kind: [a-z]{1,8}| inputs: \\{[a-z]: [a-z]\\}| \\[|\\]|\\{|\\}|,|\n|-| !!str| &a| \\*a|[0-9.e-]{1,6}| ){0,40}"
            .prop_map(String::into_bytes),
    ]
}

fn json_like() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        "(\\{|\\}|\\[|\\]|\"prompt\"|\"chosen\"|\"rejected\"|\"role\"|\"content\"|\"user\"|\"assistant\"|\"id\"|\"split\"|\"metadata\"|\"score_chosen\"|\\\\n\\\\nHuman:|\\\\n\\\\nAssistant:|\"[a-z ]{0,5}\"|:|,|null|true|[0-9.e-]{1,5}|\n){0,60}"
            .prop_map(String::into_bytes),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(512),
        ..ProptestConfig::default()
    })]

    #[test]
    fn yaml_loader_never_panics(bytes in yaml_like()) {
        let text = String::from_utf8_lossy(&bytes);
        // Inside an empty folder, so relative paths a generated pipeline names resolve to nothing.
        let dir = tempfile::tempdir().unwrap();
        if let Ok(mut p) = Pipeline::parse(&text, &dir.path().join("fuzz.yaml")) {
            let _ = p.apply_set("a.b=1");
            let _ = sepo::pipeline::graph::Graph::build(&p);
            let _ = sepo::pipeline::executor::Plan::new(p, &sepo::stages::REGISTRY);
        }
    }

    #[test]
    fn ingest_parsers_never_panic(bytes in json_like(), ext in prop_oneof![Just("jsonl"), Just("json"), Just("jsonl.gz")]) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("d.{ext}"));
        let content = if ext == "jsonl.gz" {
            use std::io::Write;
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(&bytes).unwrap();
            enc.finish().unwrap()
        } else {
            bytes.clone()
        };
        std::fs::write(&path, content).unwrap();
        for format in [Format::Ultrafeedback, Format::HhRlhf, Format::Preference] {
            let _ = for_each_row(&path, |loc, row| {
                let _ = parse_row(format, &row, &loc, "fuzz")?;
                Ok(())
            });
        }
        // Raw bytes with a .gz name (not gzip at all) must be refused, not crash.
        let raw = dir.path().join("raw.jsonl.gz");
        std::fs::write(&raw, &bytes).unwrap();
        let _ = for_each_row(&raw, |_, _| Ok(()));
    }

    #[test]
    fn parquet_reader_never_panics_on_garbage(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.parquet");
        let mut data = b"PAR1".to_vec();
        data.extend_from_slice(&bytes);
        data.extend_from_slice(b"PAR1");
        std::fs::write(&path, data).unwrap();
        let caught = std::panic::catch_unwind(|| {
            let _ = for_each_row(&path, |_, _| Ok(()));
        });
        prop_assert!(caught.is_ok(), "the Parquet reader panicked");
    }
}

#[test]
fn parquet_reader_survives_a_truncated_real_file() {
    // Every prefix of a real Parquet file is refused with an error, never a panic.
    let dir = tempfile::tempdir().unwrap();
    let mut df = sepo::data::parquet::frame(vec![
        sepo::data::parquet::utf8("prompt", vec!["p".into(); 50]),
        sepo::data::parquet::utf8("chosen", vec!["c".into(); 50]),
        sepo::data::parquet::utf8("rejected", vec!["r".into(); 50]),
    ])
    .unwrap();
    let full = dir.path().join("full.parquet");
    sepo::data::parquet::write(&mut df, &full).unwrap();
    let bytes = std::fs::read(&full).unwrap();
    for cut in (0..bytes.len()).step_by(7) {
        let p = dir.path().join("cut.parquet");
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let caught = std::panic::catch_unwind(|| {
            for_each_row(&p, |loc, row| {
                parse_row(Format::Preference, &row, &loc, "x").map(|_| ())
            })
        });
        assert!(caught.is_ok(), "panic at cut {cut}");
        assert!(
            caught.unwrap().is_err(),
            "a cut file at {cut} bytes read as valid"
        );
    }
}
