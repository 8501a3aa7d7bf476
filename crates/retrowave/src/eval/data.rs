//! Test cases stored as JSONL: one JSON object per line with `input` (the prompt) and `outputs`
//! (the strings a correct answer contains), as RULER writes them, plus the optional fields that
//! [`Case::to_json`] writes.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value};

use super::tasks::Case;

/// Reads the cases of a JSONL file.
///
/// Every non-blank line must be an object with `input` (a string) and `outputs` (a non-empty
/// list of non-empty strings). Optional: `task` (a string, default `"custom"`),
/// `context_tokens` or `length` (a whole number, default 0 = unknown), `depth` (a number in
/// 0..=1, or null), `seed` (a whole number, default 0); other fields are ignored. A bad line is
/// an error naming the file, the line number and what is wrong; a file without cases too.
pub fn load_jsonl(path: &Path) -> Result<Vec<Case>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the cases file {}", path.display()))?;
    let mut cases = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let case =
            parse_case(line).with_context(|| format!("{}, line {}", path.display(), i + 1))?;
        cases.push(case);
    }
    if cases.is_empty() {
        bail!("the cases file {} holds no cases", path.display());
    }
    Ok(cases)
}

/// Writes `cases` to `path`, one [`Case::to_json`] object per line (replacing the file).
pub fn write_jsonl(path: &Path, cases: &[Case]) -> Result<()> {
    let mut out = String::new();
    for case in cases {
        out.push_str(&case.to_json().to_string());
        out.push('\n');
    }
    let mut file = std::fs::File::create(path)
        .with_context(|| format!("cannot create the cases file {}", path.display()))?;
    file.write_all(out.as_bytes())
        .with_context(|| format!("cannot write the cases file {}", path.display()))
}

fn parse_case(line: &str) -> Result<Case> {
    let value: Value = serde_json::from_str(line).context("not valid JSON")?;
    let Value::Object(obj) = value else {
        bail!("expected a JSON object, found {}", kind_of(&value));
    };
    let input = match obj.get("input") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => bail!("\"input\" must be a string, found {}", kind_of(other)),
        None => bail!("missing \"input\" (the prompt, a string)"),
    };
    let outputs = match obj.get("outputs") {
        Some(Value::Array(items)) => {
            let mut outputs = Vec::with_capacity(items.len());
            for (k, item) in items.iter().enumerate() {
                match item {
                    Value::String(s) if !s.is_empty() => outputs.push(s.clone()),
                    Value::String(_) => bail!("\"outputs\" item {k} is an empty string"),
                    other => bail!(
                        "\"outputs\" must be a list of strings, item {k} is {}",
                        kind_of(other)
                    ),
                }
            }
            if outputs.is_empty() {
                bail!("\"outputs\" is empty (at least one expected answer is needed)");
            }
            outputs
        }
        Some(other) => bail!(
            "\"outputs\" must be a list of strings, found {}",
            kind_of(other)
        ),
        None => bail!("missing \"outputs\" (the expected answers, a list of strings)"),
    };
    let task = match obj.get("task") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => bail!("\"task\" must be a string, found {}", kind_of(other)),
        None => "custom".to_string(),
    };
    let context_tokens = match whole_number(&obj, "context_tokens")? {
        Some(n) => Some(n),
        None => whole_number(&obj, "length")?,
    };
    let context_tokens =
        usize::try_from(context_tokens.unwrap_or(0)).context("\"context_tokens\" is too large")?;
    let depth = match obj.get("depth") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_f64() {
            Some(d) if (0.0..=1.0).contains(&d) => Some(d),
            _ => bail!("\"depth\" must be between 0 and 1, found {n}"),
        },
        Some(other) => bail!("\"depth\" must be a number, found {}", kind_of(other)),
    };
    let seed = whole_number(&obj, "seed")?.unwrap_or(0);
    Ok(Case {
        task,
        context_tokens,
        depth,
        seed,
        input,
        outputs,
    })
}

/// The optional non-negative whole number `key` of `obj`.
fn whole_number(obj: &Map<String, Value>, key: &str) -> Result<Option<u64>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) => Ok(Some(v)),
            None => bail!("\"{key}\" must be a whole number >= 0, found {n}"),
        },
        Some(other) => bail!(
            "\"{key}\" must be a whole number >= 0, found {}",
            kind_of(other)
        ),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new()
            .suffix(".jsonl")
            .tempfile()
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f.flush().unwrap();
        f
    }

    /// The error of loading a file whose line 2 is `bad` (line 1 is good, line 3 blank).
    fn error_for(bad: &str) -> String {
        let good = r#"{"input": "Q?", "outputs": ["A"]}"#;
        let f = file_with(&format!("{good}\n{bad}\n\n"));
        let err = format!("{:#}", load_jsonl(f.path()).unwrap_err());
        let name = f.path().display().to_string();
        assert!(err.contains(&format!("{name}, line 2")), "{err}");
        err
    }

    #[test]
    fn loads_good_lines_and_skips_blank_ones() {
        let f = file_with(concat!(
            "{\"input\": \"What is 2+2? Answer:\", \"outputs\": [\"4\"], \"length\": 128}\n",
            "\n",
            "   \r\n",
            "{\"task\": \"niah\", \"input\": \"x\", \"outputs\": [\"a\", \"b\"], \"depth\": 0.5, ",
            "\"seed\": 9, \"context_tokens\": 4096, \"index\": 3}\r\n",
        ));
        let cases = load_jsonl(f.path()).unwrap();
        assert_eq!(
            cases,
            vec![
                Case {
                    task: "custom".into(),
                    context_tokens: 128,
                    depth: None,
                    seed: 0,
                    input: "What is 2+2? Answer:".into(),
                    outputs: vec!["4".into()],
                },
                Case {
                    task: "niah".into(),
                    context_tokens: 4096,
                    depth: Some(0.5),
                    seed: 9,
                    input: "x".into(),
                    outputs: vec!["a".into(), "b".into()],
                },
            ]
        );
    }

    #[test]
    fn written_cases_load_back_unchanged() {
        let cases = vec![
            Case {
                task: "single-needle".into(),
                context_tokens: 1000,
                depth: Some(0.05 + 0.9 * 2.0 / 3.0),
                seed: u64::MAX,
                input: "line one\nline \"two\" é".into(),
                outputs: vec!["1234567".into()],
            },
            Case {
                task: "custom".into(),
                context_tokens: 0,
                depth: None,
                seed: 0,
                input: String::new(),
                outputs: vec!["x".into(), "y".into()],
            },
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cases.jsonl");
        write_jsonl(&path, &cases).unwrap();
        assert_eq!(load_jsonl(&path).unwrap(), cases);
    }

    #[test]
    fn bad_lines_name_file_line_and_problem() {
        let err = error_for(r#"{"input": "Q?", "outputs": ["A"]"#);
        assert!(err.contains("not valid JSON"), "{err}");
        let err = error_for(r#"["Q?", "A"]"#);
        assert!(
            err.contains("expected a JSON object, found a list"),
            "{err}"
        );
        let err = error_for(r#"{"outputs": ["A"]}"#);
        assert!(err.contains("missing \"input\""), "{err}");
        let err = error_for(r#"{"input": 3, "outputs": ["A"]}"#);
        assert!(
            err.contains("\"input\" must be a string, found a number"),
            "{err}"
        );
        let err = error_for(r#"{"input": "Q?"}"#);
        assert!(err.contains("missing \"outputs\""), "{err}");
        let err = error_for(r#"{"input": "Q?", "outputs": "A"}"#);
        assert!(
            err.contains("\"outputs\" must be a list of strings, found a string"),
            "{err}"
        );
        let err = error_for(r#"{"input": "Q?", "outputs": ["A", 7]}"#);
        assert!(
            err.contains("\"outputs\" must be a list of strings, item 1 is a number"),
            "{err}"
        );
        let err = error_for(r#"{"input": "Q?", "outputs": []}"#);
        assert!(err.contains("\"outputs\" is empty"), "{err}");
        let err = error_for(r#"{"input": "Q?", "outputs": [""]}"#);
        assert!(err.contains("item 0 is an empty string"), "{err}");
        let err = error_for(r#"{"input": "Q?", "outputs": ["A"], "task": 1}"#);
        assert!(err.contains("\"task\" must be a string"), "{err}");
        let err = error_for(r#"{"input": "Q?", "outputs": ["A"], "length": -5}"#);
        assert!(
            err.contains("\"length\" must be a whole number >= 0, found -5"),
            "{err}"
        );
        let err = error_for(r#"{"input": "Q?", "outputs": ["A"], "depth": 2.5}"#);
        assert!(err.contains("\"depth\" must be between 0 and 1"), "{err}");
    }

    #[test]
    fn unreadable_or_empty_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.jsonl");
        let err = format!("{:#}", load_jsonl(&missing).unwrap_err());
        assert!(err.contains(&missing.display().to_string()), "{err}");

        let f = file_with("\n  \n");
        let err = format!("{:#}", load_jsonl(f.path()).unwrap_err());
        assert!(err.contains("holds no cases"), "{err}");
        assert!(err.contains(&f.path().display().to_string()), "{err}");

        let f = file_with("");
        std::fs::write(f.path(), [0xff, 0xfe, b'\n']).unwrap();
        let err = format!("{:#}", load_jsonl(f.path()).unwrap_err());
        assert!(err.contains(&f.path().display().to_string()), "{err}");
    }
}
