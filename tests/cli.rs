//! End-to-end tests of the `retrowave` binary on the real default model.

use std::path::PathBuf;
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_retrowave"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run retrowave")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn generate_streams_the_reference_answer_and_reports_speed() {
    let out = run(&["generate", "--max-tokens", "8", "The capital of France is"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with(" Paris."), "got {stdout:?}");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("prefill") && stderr.contains("decode") && stderr.contains("tok/s"),
        "{stderr}"
    );
    assert!(stderr.contains("generated 8 tokens"), "{stderr}");
}

#[test]
fn generate_stops_at_stop_string_and_chat_template_works() {
    let out = run(&[
        "generate",
        "--max-tokens",
        "40",
        "--stop",
        "\n",
        "def fibonacci(n):",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // golden continuation starts with "\n    if n == 0:" so the stop string ends it at once
    assert_eq!(text(&out.stdout), "\n");
    assert!(text(&out.stderr).contains("finish: stop"));

    // The template's default system message names the model, and <|im_end|> ends the answer.
    let out = run(&[
        "generate",
        "--chat",
        "--max-tokens",
        "48",
        "Hi! Who are you?",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("SmolLM"),
        "{}",
        text(&out.stdout)
    );
    let out = run(&[
        "generate",
        "--chat",
        "--max-tokens",
        "64",
        "Write a haiku about the sea.",
    ]);
    assert!(
        text(&out.stderr).contains("finish: stop"),
        "{}",
        text(&out.stderr)
    );
    assert!(!text(&out.stdout).contains("<|im_end|>"));
}

#[test]
fn sampling_with_a_seed_is_reproducible() {
    let args = [
        "generate",
        "--max-tokens",
        "12",
        "--temperature",
        "0.9",
        "--top-p",
        "0.95",
        "--top-k",
        "40",
        "--seed",
        "42",
        "Once upon a time",
    ];
    let a = run(&args);
    let b = run(&args);
    assert!(a.status.success(), "{}", text(&a.stderr));
    assert_eq!(a.stdout, b.stdout);
}

#[test]
fn bad_inputs_fail_with_clear_errors() {
    let out = run(&["generate", "--model", "no-such-model", "hi"]);
    assert!(!out.status.success());
    let e = text(&out.stderr);
    assert!(
        e.contains("smollm2-135m") && e.contains("no-such-model"),
        "{e}"
    );

    // a truncated copy of the real model
    let dir = tempfile::tempdir().unwrap();
    let real = PathBuf::from(text(&run(&["fetch", "--print-path"]).stdout).trim());
    let bytes = std::fs::read(&real).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let out = run(&["generate", "--model", cut.to_str().unwrap(), "hi"]);
    assert!(!out.status.success());
    let e = text(&out.stderr);
    assert!(e.starts_with("error:") && !e.contains("panicked"), "{e}");
    assert!(e.contains("cut.gguf"), "{e}");

    let out = run(&["generate", "--temperature=-1", "hi"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("temperature"));
}

#[test]
fn fetch_lists_the_registry() {
    let out = run(&["fetch", "--list"]);
    assert!(out.status.success());
    let s = text(&out.stdout);
    for name in ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"] {
        assert!(s.contains(name), "{s}");
    }
}

fn records(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON record per line"))
        .collect()
}

#[test]
fn wave_attention_answers_a_2k_needle_question_as_dense_attention_does() {
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("eval.jsonl");
    let cases_file = dir.path().join("cases.jsonl");
    // At 2K the default's 128-cluster minimum retrieves every cluster; the sparse budgets of the
    // default before it (at least 64) leave most of the context to the estimate or skip it.
    let sparse = dir.path().join("sparse.toml");
    // 64 clusters of 16 tokens retrieved, as the default was: the default's 2048-token floor
    // (and its smaller clusters at short contexts) would retrieve every cluster at 2K.
    std::fs::write(
        &sparse,
        "min_retrieval_clusters = 64\nmin_retrieval_tokens = 0\nmin_index_clusters = 0\n\
         min_estimation_tokens = 0\n",
    )
    .unwrap();
    let out = run(&[
        "eval",
        "--tasks",
        "single-needle",
        "--lengths",
        "2048",
        "--cases",
        "1",
        "--attention",
        &format!("full,wave={}", sparse.display()),
        "--fidelity",
        "1",
        "--out",
        out_file.to_str().unwrap(),
        "--write-cases",
        cases_file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let recs = records(&out_file);
    let case = |mode: &str| {
        recs.iter()
            .find(|r| r["kind"] == "case" && r["attention"] == mode)
            .unwrap_or_else(|| panic!("no {mode} case record in {recs:?}"))
            .clone()
    };
    let (full, wave) = (case("full"), case("wave:sparse"));
    let expected = full["expected"][0].as_str().unwrap().to_string();
    assert!(
        (2000..=2048).contains(&full["prompt_tokens"].as_u64().unwrap()),
        "{full}"
    );
    // Dense attention finds the needle, and wave attention gives the very same answer while
    // attending exactly to only part of the context.
    assert!(
        full["answer"].as_str().unwrap().contains(&expected),
        "{full}"
    );
    // The same answer text; what follows it (a newline, or the end of the turn) may differ
    // with the float rounding of the zones.
    assert_eq!(
        full["answer"].as_str().unwrap().trim(),
        wave["answer"].as_str().unwrap().trim(),
        "{full}\n{wave}"
    );
    assert_eq!(wave["score"], 100.0);
    // At 2K 64 retrieval clusters (1024 tokens) and the steady zone are a little over half the
    // context; a fifth more is estimated from cluster summaries, the rest skipped.
    let share = wave["exact_share"].as_f64().unwrap();
    assert!(share > 0.0 && share < 0.6, "{wave}");
    let estimated = wave["estimated_share"].as_f64().unwrap();
    assert!(estimated > 0.1 && share + estimated < 0.9, "{wave}");
    // The table and the fidelity summary are printed; fidelity records are written per head.
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("single-needle") && stdout.contains("wave:sparse-full"),
        "{stdout}"
    );
    let fid: Vec<_> = recs.iter().filter(|r| r["kind"] == "fidelity").collect();
    assert_eq!(
        fid.len(),
        30 * 9,
        "one record per layer and query head of SmolLM2"
    );
    for r in &fid {
        let (exact, all) = (
            r["mass_exact"].as_f64().unwrap(),
            r["mass_all"].as_f64().unwrap(),
        );
        assert!(
            0.0 < exact && exact <= all + 1e-9 && all <= 1.0 + 1e-9,
            "{r}"
        );
    }

    // The written cases read back through --data and score the same in full attention.
    let out_file2 = dir.path().join("eval2.jsonl");
    let out = run(&[
        "eval",
        "--data",
        cases_file.to_str().unwrap(),
        "--attention",
        "full",
        "--out",
        out_file2.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let again = records(&out_file2);
    let c = again.iter().find(|r| r["kind"] == "case").unwrap();
    assert_eq!(c["answer"], full["answer"]);

    // Teacher forcing on the same case: every mode is fed full attention's answer; full against
    // itself agrees exactly, and a wave config from a file that retrieves every cluster differs
    // only by float rounding.
    let all = dir.path().join("everything.toml");
    std::fs::write(&all, "min_retrieval_clusters = 100000\n").unwrap();
    let out_file3 = dir.path().join("eval3.jsonl");
    let out = run(&[
        "eval",
        "--data",
        cases_file.to_str().unwrap(),
        "--attention",
        &format!("full,full,wave={},wave:published", all.display()),
        "--teacher-forced",
        "--out",
        out_file3.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let forced = records(&out_file3);
    let cases: Vec<_> = forced.iter().filter(|r| r["kind"] == "case").collect();
    assert_eq!(cases.len(), 4, "{forced:?}");
    for (r, label) in cases
        .iter()
        .zip(["full", "full", "wave:everything", "wave:published"])
    {
        assert_eq!(r["attention"], label, "{r}");
        assert_eq!(r["teacher_forced"], true, "{r}");
        // Every mode carries the baseline's answer (whose ending may differ from the run
        // above in float rounding: the batch holds four rows here).
        assert_eq!(r["answer"], cases[0]["answer"], "{r}");
        assert_eq!(
            r["answer"].as_str().unwrap().trim(),
            c["answer"].as_str().unwrap().trim()
        );
    }
    let f = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap();
    assert_eq!(f(cases[1], "top1_agreement"), 100.0);
    assert_eq!(f(cases[1], "mean_kl"), 0.0);
    assert!(f(cases[2], "top1_agreement") >= 90.0, "{}", cases[2]);
    assert!(f(cases[2], "mean_kl") < 0.02, "{}", cases[2]);
    assert!(f(cases[3], "mean_kl") > 0.0, "{}", cases[3]);
    assert_eq!(f(cases[2], "exact_share"), 1.0, "{}", cases[2]);
    let out = run(&["eval", "--attention", "full,wave=/nonexistent/w.toml"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("/nonexistent/w.toml"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn eval_rejects_bad_case_files_and_modes() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"input\": \"hi\", \"outputs\": [\"x\"]}\n{\"input\": 3}\n",
    )
    .unwrap();
    let out = run(&["eval", "--data", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("bad.jsonl") && err.contains("line 2"), "{err}");
    let out = run(&["eval", "--attention", "sparse", "--cases", "1"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("unknown attention mode"),
        "{}",
        text(&out.stderr)
    );
    let out = run(&["generate", "--attention", "wave:nope", "hi"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("wave preset"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn generate_with_wave_attention_and_a_wave_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("wave.toml");
    std::fs::write(
        &cfg,
        "retrieval_fraction = 0.05\nmin_retrieval_clusters = 8\n",
    )
    .unwrap();
    let out = run(&[
        "generate",
        "--attention",
        "wave",
        "--wave-config",
        cfg.to_str().unwrap(),
        "--max-tokens",
        "8",
        "The capital of France is",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // A 6-token prompt leaves nothing to index: the answer is the dense one.
    assert!(
        text(&out.stdout).starts_with(" Paris."),
        "{}",
        text(&out.stdout)
    );
    std::fs::write(&cfg, "retrieval_fraction = 2.0\n").unwrap();
    let out = run(&[
        "generate",
        "--attention",
        "wave",
        "--wave-config",
        cfg.to_str().unwrap(),
        "hi",
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("retrieval_fraction") && err.contains("wave.toml"),
        "{err}"
    );
    std::fs::write(&cfg, "retreival_fraction = 0.1\n").unwrap();
    let out = run(&[
        "generate",
        "--attention",
        "wave",
        "--wave-config",
        cfg.to_str().unwrap(),
        "hi",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("retreival_fraction"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn generate_with_the_wave_kv_in_a_tiered_store_on_disk_gives_the_same_text() {
    let dir = tempfile::tempdir().unwrap();
    let prompt = (0..15)
        .map(|i| {
            format!("The quick brown fox number {i} jumps over the lazy dog and keeps running through the field.")
        })
        .collect::<Vec<_>>()
        .join(" ")
        + " The fox number 7";
    let generate = |store: bool| {
        let mut args = vec![
            "generate",
            "--device",
            "cpu",
            "--attention",
            "wave",
            "--max-tokens",
            "6",
        ];
        if store {
            // 2 MiB of host memory for about 40 MB of cluster records (SmolLM2's 90 KV heads
            // at ~300 tokens, clusters of about one token here): most live on disk.
            args.extend([
                "--store-dir",
                dir.path().to_str().unwrap(),
                "--store-host-bytes",
                "2097152",
            ]);
        }
        args.push(&prompt);
        let out = run(&args);
        assert!(out.status.success(), "{}", text(&out.stderr));
        (text(&out.stdout), text(&out.stderr))
    };
    let (host, _) = generate(false);
    let (tiered, err) = generate(true);
    assert_eq!(host, tiered);
    assert!(host.starts_with(" jumps over"), "{host}");
    // The records went to disk and decode steps read them back.
    let line = err
        .lines()
        .find(|l| l.starts_with("[KV store:"))
        .unwrap_or_else(|| panic!("no store summary in {err}"));
    let n: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(n.len() == 2 && n[0] > 1000 && n[1] > 1000, "{line}");
    // The store's private files are gone with the process.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    // A disk tier that cannot be opened is a clear error.
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let out = run(&[
        "generate",
        "--device",
        "cpu",
        "--attention",
        "wave",
        "--store-dir",
        file.to_str().unwrap(),
        "hi",
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("cannot open the KV store's disk tier") && err.contains("not-a-dir"),
        "{err}"
    );
}
