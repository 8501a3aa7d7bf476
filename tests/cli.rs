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
