//! `retrowave serve` end to end: the real binary on loopback with SmolLM2 on the CPU, driven by a
//! real HTTP client (ureq): completions and chat, streaming and not, 16 concurrent requests
//! through a small KV budget, client disconnects, OpenAI-style errors, API keys, Prometheus
//! output checked by promtool, and SIGTERM draining a request in flight.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const KEY: &str = "sk-test-4f1b2c";

/// A `retrowave serve` process, killed when dropped.
struct Server {
    child: Child,
    base: String,
    stderr: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts the server with `config` (TOML) on a free port and waits until it is ready.
    fn start(config: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serve.toml");
        std::fs::write(&path, config).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_retrowave"))
            .args(["serve", "--device", "cpu", "--port", "0", "--config"])
            .arg(&path)
            .env_remove("RETROWAVE_MODEL")
            .env_remove("RETROWAVE_API_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        let log = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("retrowave: listening on ") {
                    let _ = tx.send(addr.to_string());
                }
                let mut l = log.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let base = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no listening line; stderr: {}", stderr.lock().unwrap()));
        let server = Server {
            child,
            base,
            stderr,
            _dir: dir,
        };
        // Alive at once; ready once the model is loaded.
        assert_eq!(server.get("/health").0, 200);
        let t = Instant::now();
        loop {
            let (status, body) = server.get("/ready");
            if status == 200 {
                assert_eq!(body["model"], "smollm2-135m");
                break;
            }
            assert_eq!(status, 503, "{body}");
            assert!(t.elapsed() < Duration::from_secs(120), "not ready in 120 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into()
    }

    fn get(&self, path: &str) -> (u16, Value) {
        let mut r = Self::agent()
            .get(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {KEY}"))
            .call()
            .unwrap();
        let text = r.body_mut().read_to_string().unwrap();
        (
            r.status().as_u16(),
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    fn metrics(&self) -> String {
        let mut r = Self::agent()
            .get(format!("{}/metrics", self.base))
            .call()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        r.body_mut().read_to_string().unwrap()
    }

    /// POSTs a raw body with `key` (None: no Authorization header).
    fn post_raw(&self, path: &str, body: &str, key: Option<&str>) -> (u16, Value) {
        let mut req = Self::agent()
            .post(format!("{}{path}", self.base))
            .header("Content-Type", "application/json");
        if let Some(k) = key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        let mut r = req.send(body).unwrap();
        let text = r.body_mut().read_to_string().unwrap();
        (
            r.status().as_u16(),
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}")),
        )
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, &body.to_string(), Some(KEY))
    }

    /// Opens a streaming request; returns its SSE `data:` payloads as a line iterator.
    fn stream(&self, path: &str, body: &Value) -> impl Iterator<Item = String> + use<> {
        let r = Self::agent()
            .post(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {KEY}"))
            .send(body.to_string())
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let ct = r.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with("text/event-stream"), "{ct}");
        BufReader::new(r.into_body().into_reader())
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
    }

    /// A gauge or counter value from /metrics (`series`: the name with its labels, as rendered).
    fn metric(&self, series: &str) -> f64 {
        let text = self.metrics();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    }

    /// Waits until `series` reads `value` (10 s at most).
    fn wait_metric(&self, series: &str, value: f64) {
        let t = Instant::now();
        while self.metric(series) != value {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{series} is {} after 10 s, expected {value}",
                self.metric(series)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn assert_error(status: u16, body: &Value, want_status: u16, want_type: &str) {
    assert_eq!(status, want_status, "{body}");
    let e = &body["error"];
    assert_eq!(e["type"], want_type, "{body}");
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{body}"
    );
}

/// The chunks of a finished stream, checked for the closing `[DONE]`.
fn chunks(lines: impl Iterator<Item = String>) -> Vec<Value> {
    let lines: Vec<String> = lines.collect();
    assert_eq!(
        lines.last().map(String::as_str),
        Some("[DONE]"),
        "{lines:?}"
    );
    lines[..lines.len() - 1]
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

const SMALL: &str = r#"
[model]
max_context = 256
[scheduler]
kv_cache_tokens = 96
max_batch_tokens = 64
prefill_chunk = 64
[server]
api_keys = ["sk-test-4f1b2c", "sk-other"]
max_body_bytes = 16384
"#;

#[test]
fn openai_api_batching_errors_auth_and_metrics() {
    let mut s = Server::start(SMALL);

    // Completions, greedy: the stream carries the same text as the whole response.
    let req = json!({"model": "smollm2-135m", "prompt": "The capital of France is", "max_tokens": 8,
                     "temperature": 0, "ignore_eos": true});
    let (status, whole) = s.post("/v1/completions", &req);
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "text_completion");
    assert_eq!(whole["choices"][0]["finish_reason"], "length");
    assert_eq!(whole["usage"]["completion_tokens"], 8);
    let prompt_tokens = whole["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 0);
    assert_eq!(whole["usage"]["total_tokens"], prompt_tokens + 8);
    let text = whole["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(!text.is_empty());
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    sreq["stream_options"] = json!({"include_usage": true});
    let cs = chunks(s.stream("/v1/completions", &sreq));
    let streamed: String = cs
        .iter()
        .filter_map(|c| c["choices"].get(0)?["text"].as_str())
        .collect();
    assert_eq!(streamed, text);
    let last = cs.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], 8);
    assert_eq!(cs[cs.len() - 2]["choices"][0]["finish_reason"], "length");
    assert!(cs[0]["usage"].is_null() && cs[0]["object"] == "text_completion");

    // A stop string cuts the text before it.
    let cut = text.char_indices().nth(text.chars().count() / 2).unwrap().0;
    let stop: String = text[cut..].chars().take(3).collect();
    let mut stopped = req.clone();
    stopped["stop"] = json!([stop]);
    let (status, body) = s.post("/v1/completions", &stopped);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        body["choices"][0]["text"].as_str().unwrap(),
        &text[..text.find(&stop).unwrap()]
    );

    // Chat, greedy, streaming and not.
    let chat = json!({"messages": [{"role": "system", "content": "You are brief."},
                                   {"role": "user", "content": "Name a color."}],
                      "max_tokens": 6, "temperature": 0, "seed": 7});
    let (status, whole) = s.post("/v1/chat/completions", &chat);
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    let content = whole["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let n = whole["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=6).contains(&n));
    let mut schat = chat.clone();
    schat["stream"] = json!(true);
    let cs = chunks(s.stream("/v1/chat/completions", &schat));
    assert_eq!(cs[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(
        cs.iter()
            .all(|c| c["object"] == "chat.completion.chunk" && c.get("usage").is_none())
    );
    let streamed: String = cs
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, content);
    let reason = &cs.last().unwrap()["choices"][0]["finish_reason"];
    assert_eq!(*reason, whole["choices"][0]["finish_reason"]);

    // 16 concurrent requests through a KV budget of 96 tokens: some wait, all finish with the
    // token counts asked for.
    let before = s.metric("retrowave:generation_tokens_total");
    let queued_before = s.metric("retrowave:request_queue_time_seconds_count");
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let base = s.base.clone();
            std::thread::spawn(move || {
                let max = 3 + i % 5;
                let body = json!({"prompt": format!("Count to {i}:"), "max_tokens": max,
                                  "ignore_eos": true, "seed": i});
                let mut r = Server::agent()
                    .post(format!("{base}/v1/completions"))
                    .header("Authorization", format!("Bearer {KEY}"))
                    .send(body.to_string())
                    .unwrap();
                let text = r.body_mut().read_to_string().unwrap();
                (max, serde_json::from_str::<Value>(&text).unwrap())
            })
        })
        .collect();
    let mut total = 0;
    for h in handles {
        let (max, v) = h.join().unwrap();
        assert_eq!(v["usage"]["completion_tokens"], max, "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
        total += max;
    }
    assert_eq!(
        s.metric("retrowave:generation_tokens_total") - before,
        total as f64
    );
    assert_eq!(s.metric("retrowave:num_requests_running"), 0.0);
    assert_eq!(s.metric("retrowave:num_requests_waiting"), 0.0);
    assert_eq!(
        s.metric("retrowave:request_queue_time_seconds_count") - queued_before,
        16.0
    );

    // Errors: OpenAI-style bodies with the right status, and the server stays up.
    let (st, b) = s.post_raw("/v1/completions", "{\"prompt\": \"hi\", ", Some(KEY));
    assert_error(st, &b, 400, "invalid_request_error");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("malformed JSON")
    );
    let (st, b) = s.post(
        "/v1/completions",
        &json!({"prompt": "hi", "max_tokens": "ten"}),
    );
    assert_error(st, &b, 400, "invalid_request_error");
    assert_eq!(b["error"]["param"], "max_tokens");
    let (st, b) = s.post("/v1/chat/completions", &json!({"messages": "hello"}));
    assert_error(st, &b, 400, "invalid_request_error");
    assert_eq!(b["error"]["param"], "messages");
    let (st, b) = s.post("/v1/completions", &json!({"prompt": "hi", "n": 2}));
    assert_error(st, &b, 400, "invalid_request_error");
    let long = "word ".repeat(300);
    let (st, b) = s.post("/v1/completions", &json!({"prompt": long, "max_tokens": 4}));
    assert_error(st, &b, 400, "invalid_request_error");
    let m = b["error"]["message"].as_str().unwrap();
    let n: usize = m
        .split("prompt has ")
        .nth(1)
        .and_then(|r| r.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("{m}"));
    assert!(n >= 256, "{m}");
    assert!(
        m.contains(&format!(
            "prompt has {n} tokens and max_tokens 4, the context is 256 tokens"
        )),
        "{m}"
    );
    assert_eq!(b["error"]["code"], "context_length_exceeded");
    let (st, b) = s.post(
        "/v1/completions",
        &json!({"prompt": "hi", "max_tokens": 250}),
    );
    assert_error(st, &b, 400, "invalid_request_error");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("KV budget of 96 tokens"),
        "{b}"
    );
    let (st, b) = s.post(
        "/v1/completions",
        &json!({"model": "gpt-4", "prompt": "hi"}),
    );
    assert_error(st, &b, 404, "not_found_error");
    assert_eq!(b["error"]["code"], "model_not_found");
    let big = json!({"prompt": "x".repeat(20000)}).to_string();
    let (st, b) = s.post_raw("/v1/completions", &big, Some(KEY));
    assert_error(st, &b, 413, "invalid_request_error");
    let (st, b) = s.post_raw("/v1/completions", "{\"prompt\": \"hi\"}", None);
    assert_error(st, &b, 401, "authentication_error");
    assert_eq!(b["error"]["code"], "missing_api_key");
    let (st, b) = s.post_raw(
        "/v1/completions",
        "{\"prompt\": \"hi\"}",
        Some("sk-test-4f1b2d"),
    );
    assert_error(st, &b, 401, "authentication_error");
    assert_eq!(b["error"]["code"], "invalid_api_key");
    let (st, b) = s.post_raw(
        "/v1/completions",
        "{\"prompt\": \"hi\", \"max_tokens\": 1}",
        Some("sk-other"),
    );
    assert_eq!(st, 200, "{b}");
    let (st, b) = s.get("/v1/nothing");
    assert_error(st, &b, 404, "not_found_error");
    let (st, b) = s.get("/v1/models");
    assert_eq!(st, 200);
    assert_eq!(b["data"][0]["id"], "smollm2-135m");
    assert_eq!(b["data"][0]["max_model_len"], 256);
    assert!(s.metric("retrowave:http_errors_total{status=\"400\"}") >= 6.0);

    // Every documented metric is there, and promtool accepts the exposition.
    let text = s.metrics();
    for name in [
        "retrowave:num_requests_running",
        "retrowave:num_requests_waiting",
        "retrowave:prompt_tokens_total",
        "retrowave:generation_tokens_total",
        "retrowave:request_success_total{finished_reason=\"length\"}",
        "retrowave:time_to_first_token_seconds_bucket",
        "retrowave:inter_token_latency_seconds_bucket",
        "retrowave:e2e_request_latency_seconds_bucket",
        "retrowave:request_queue_time_seconds_bucket",
        "retrowave:kv_cache_usage_perc{tier=\"device\"}",
        "retrowave:kv_cache_usage_perc{tier=\"host\"}",
        "retrowave:kv_cache_usage_perc{tier=\"disk\"}",
        "retrowave:kv_cache_tokens{state=\"reserved\"}",
        "retrowave:wave_buffer_hit_ratio",
        "retrowave:wave_buffer_pages_total{result=\"hit\"}",
        "retrowave:wave_buffer_pages_total{result=\"miss\"}",
        "retrowave:kv_bytes_moved_total{tier=\"host\",link=\"host_to_device\"}",
        "retrowave:index_build_seconds_count",
        "retrowave:retrieval_zone_clusters_count",
        "retrowave:estimation_zone_clusters_count",
        "retrowave:wave_tokens_total{zone=\"estimated\"}",
    ] {
        assert!(text.contains(name), "{name} missing from\n{text}");
    }
    promtool_check(&text);
    assert!(s.child.try_wait().unwrap().is_none(), "the server exited");
}

/// `promtool check metrics` on `text`. promtool's linter reports every name with a colon (it
/// keeps colons for recording rules), which the `retrowave:` names (as vLLM's `vllm:`) have on
/// purpose; any other problem, and any parse error, fails.
fn promtool_check(text: &str) {
    use std::io::Write;
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        eprintln!("NOTICE: promtool not found (apt-get install prometheus); metrics not checked");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let problems: Vec<&str> = report
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.ends_with("metric names should not contain ':'"))
        .collect();
    // Exit 3 is "lint problems"; 1 would be a parse error.
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)) && problems.is_empty(),
        "promtool: {:?}\n{report}",
        out.status
    );
    assert!(
        report.contains("retrowave:num_requests_running"),
        "{report}"
    );
}

const LONG: &str = r#"
[model]
max_context = 4096
"#;

#[test]
fn disconnects_free_sequences_and_sigterm_drains() {
    let mut s = Server::start(LONG);

    // A client that goes away mid-stream: its sequence ends and its slot is freed.
    let body = json!({"prompt": "Tell me a long story.", "max_tokens": 3000, "ignore_eos": true,
                      "stream": true});
    {
        let mut lines = s.stream("/v1/completions", &body);
        for _ in 0..3 {
            let l = lines.next().unwrap();
            assert!(serde_json::from_str::<Value>(&l).is_ok(), "{l}");
        }
        assert_eq!(s.metric("retrowave:num_requests_running"), 1.0);
    } // dropped: the connection closes
    s.wait_metric("retrowave:num_requests_running", 0.0);
    s.wait_metric(
        "retrowave:request_success_total{finished_reason=\"cancelled\"}",
        1.0,
    );
    assert_eq!(
        s.metric("retrowave:kv_cache_tokens{state=\"reserved\"}"),
        0.0
    );

    // SIGTERM while a request streams: it runs to its end, then the process exits 0.
    let body = json!({"prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": true,
                      "stream": true, "stream_options": {"include_usage": true}});
    let mut lines = s.stream("/v1/completions", &body);
    let first = lines.next().unwrap();
    assert!(first.starts_with('{'), "{first}");
    let pid = s.child.id() as i32;
    // SAFETY: kill(2) on the pid of our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let rest = chunks(lines);
    assert_eq!(rest.last().unwrap()["usage"]["completion_tokens"], 40);
    let t = Instant::now();
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "still running 20 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = s.stderr.lock().unwrap().clone();
    assert!(status.success(), "exit {status:?}; stderr:\n{log}");
    assert!(
        log.contains("shutting down") && log.contains("stopped"),
        "{log}"
    );
}

#[test]
fn config_files_flags_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_retrowave"))
            .arg("serve")
            .args(args)
            .env_remove("RETROWAVE_MODEL")
            .env_remove("RETROWAVE_DEVICE")
            .env_remove("RETROWAVE_API_KEY")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    // Flags override the file; the printed configuration reads back the same, keys hidden.
    let file = dir.path().join("a.toml");
    std::fs::write(
        &file,
        "[server]\nport = 9001\napi_keys = [\"sk-file\"]\n[attention]\nmode = \"wave\"\n\
         [attention.wave]\nwindow_tokens = 96\n",
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let (ok, out, err) = run(&["--config", path, "--port", "9002", "--print-config"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("port = 9002") && out.contains("window_tokens = 96"),
        "{out}"
    );
    assert!(
        out.contains("mode = \"wave\"") && !out.contains("sk-file"),
        "{out}"
    );
    let printed = dir.path().join("printed.toml");
    std::fs::write(&printed, &out).unwrap();
    let (ok, again, err) = run(&["--config", printed.to_str().unwrap(), "--print-config"]);
    assert!(ok, "{err}");
    assert_eq!(again, out);
    // Every shipped configuration is valid.
    let configs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut n = 0;
    for e in std::fs::read_dir(&configs).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let (ok, _, err) = run(&["--config", p.to_str().unwrap(), "--print-config"]);
            assert!(ok, "{}: {err}", p.display());
            n += 1;
        }
    }
    assert!(n >= 2, "configs/ has {n} TOML files");
    // Unknown keys and bad values are named.
    for (text, needle) in [
        ("[server]\nprot = 1\n", "prot"),
        ("[attention.wave]\nwindow = 3\n", "window"),
        ("[scheduler]\nmax_seqs = -1\n", "max_seqs"),
        (
            "[attention.wave]\nestimation_fraction = 2.0\n",
            "estimation_fraction",
        ),
    ] {
        std::fs::write(&file, text).unwrap();
        let (ok, _, err) = run(&["--config", path, "--print-config"]);
        assert!(!ok && err.contains(needle), "{text}: {err}");
    }
    let (ok, _, err) = run(&["--device", "tpu", "--print-config"]);
    assert!(!ok && err.contains("tpu"), "{err}");
    let (ok, _, err) = run(&["--config", "/nonexistent/x.toml"]);
    assert!(!ok && err.contains("/nonexistent/x.toml"), "{err}");
}

/// A CPU server keeping its wave KV in a tiered store with a disk tier (`[store] dirs`, 2 MiB of
/// host memory for ~40 MB of records): the answer is the one of host memory, the store's series
/// show the spills and the disk reads, and the finished request leaves no record in either tier.
#[test]
fn wave_kv_on_disk_answers_as_in_host_memory() {
    let disk = tempfile::tempdir().unwrap();
    let base = "[model]\nmax_context = 1024\n[attention]\nmode = \"wave\"\n";
    let prompt = (0..15)
        .map(|i| {
            format!("The quick brown fox number {i} jumps over the lazy dog and keeps running through the field.")
        })
        .collect::<Vec<_>>()
        .join(" ")
        + " The fox number 7";
    let body = json!({"prompt": prompt, "max_tokens": 6, "temperature": 0});
    let answer = |s: &Server| {
        let (st, b) = s.post("/v1/completions", &body);
        assert_eq!(st, 200, "{b}");
        b["choices"][0]["text"].as_str().unwrap().to_string()
    };
    let host = answer(&Server::start(base));
    assert!(host.starts_with(" jumps over"), "{host}");
    let mut s = Server::start(&format!(
        "{base}[store]\nhost_capacity_bytes = 2097152\ndirs = [\"{}\"]\n",
        disk.path().display()
    ));
    assert_eq!(answer(&s), host);
    assert!(s.metric("retrowave_store_spilled_records_total") > 1000.0);
    assert!(s.metric("retrowave_store_cluster_reads_total{tier=\"disk\"}") > 1000.0);
    assert_eq!(s.metric("retrowave_store_bytes{tier=\"host\"}"), 0.0);
    assert_eq!(s.metric("retrowave_store_bytes{tier=\"disk\"}"), 0.0);
    promtool_check(&s.metrics());
    assert!(s.child.try_wait().unwrap().is_none(), "the server exited");
}
