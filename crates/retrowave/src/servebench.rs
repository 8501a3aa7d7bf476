//! `retrowave bench serve`: a load generator for `retrowave serve`. `--concurrency` clients each
//! send streaming completions back to back for `--duration` seconds, with prompt and output
//! lengths drawn uniformly from `--input-len` and `--output-len` (prompts are slices of the essay
//! haystack sent as token ids; `ignore_eos`, so outputs have the length drawn). It reports request
//! throughput, output tokens/s, and time to first token and inter-token latency at p50 and p99,
//! and appends them as JSON lines to bench/results/serve-<model>.jsonl.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use retrowave_model::registry;
use serde_json::{Value, json};

use crate::bench::{commit, cpu_device, essay_prompt};
use crate::load;

/// A length: `N`, or `MIN:MAX` drawn uniformly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LenRange {
    pub min: usize,
    pub max: usize,
}

impl FromStr for LenRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let parse = |x: &str| {
            x.trim()
                .parse::<usize>()
                .map_err(|e| format!("'{x}' is not a token count: {e}"))
        };
        let (min, max) = match s.split_once(':') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => (parse(s)?, parse(s)?),
        };
        if min == 0 || min > max {
            return Err(format!("'{s}': expected N or MIN:MAX with 1 <= MIN <= MAX"));
        }
        Ok(LenRange { min, max })
    }
}

impl std::fmt::Display for LenRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}:{}", self.min, self.max)
        }
    }
}

/// Flags of `retrowave bench serve`.
#[derive(clap::Args, Debug)]
pub struct ServeBenchArgs {
    /// A running server (e.g. http://127.0.0.1:8000); without it, one is started with --model,
    /// --device and --config on a free port and stopped at the end.
    #[arg(long)]
    pub url: Option<String>,
    /// The model (its tokenizer makes the prompts; must be the served one with --url).
    #[arg(long, short, default_value = registry::DEFAULT_MODEL)]
    pub model: String,
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Configuration file of the started server.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, env = "RETROWAVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Clients sending requests back to back.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Prompt tokens: N or MIN:MAX (uniform).
    #[arg(long, default_value = "128:512")]
    pub input_len: LenRange,
    /// Generated tokens: N or MIN:MAX (uniform).
    #[arg(long, default_value = "32:128")]
    pub output_len: LenRange,
    /// Seconds during which new requests start (the last ones then finish).
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// JSON-lines file to append to (default bench/results/serve-<model>.jsonl).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// What one request measured.
#[derive(Debug, Default)]
struct Sample {
    ok: bool,
    ttft: f64,
    /// Gaps between streamed chunks after the first.
    itl: Vec<f64>,
    e2e: f64,
    completion_tokens: u64,
}

/// A started server, killed when dropped.
struct Spawned(Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(600)))
        .build()
        .into()
}

/// Starts `retrowave serve` on a free port; returns it and its base URL once ready.
fn spawn_server(args: &ServeBenchArgs) -> Result<(Spawned, String)> {
    let exe = std::env::current_exe().context("cannot find the retrowave binary")?;
    let mut cmd = Command::new(exe);
    cmd.args(["serve", "--port", "0", "--model", &args.model])
        .args(["--device", &args.device])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(c) = &args.config {
        cmd.arg("--config").arg(c);
    }
    if let Some(k) = &args.api_key {
        cmd.args(["--api-key", k]);
    }
    let mut child = cmd.spawn().context("cannot start retrowave serve")?;
    let stderr = child.stderr.take().context("no stderr of the server")?;
    let server = Spawned(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            match line.strip_prefix("retrowave: listening on ") {
                Some(addr) => {
                    let _ = tx.send(addr.to_string());
                }
                None => eprintln!("[server] {line}"),
            }
        }
    });
    let base = rx
        .recv_timeout(Duration::from_secs(600))
        .context("the server did not start listening")?;
    let t = Instant::now();
    loop {
        if let Ok(r) = agent().get(format!("{base}/ready")).call()
            && r.status().as_u16() == 200
        {
            break;
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!("the server was not ready after 600 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok((server, base))
}

/// One streaming request.
fn request(base: &str, key: Option<&str>, prompt: &[u32], max_tokens: usize) -> Sample {
    let body = json!({
        "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": true, "temperature": 0,
        "stream": true, "stream_options": {"include_usage": true},
    });
    let start = Instant::now();
    let mut req = agent().post(format!("{base}/v1/completions"));
    if let Some(k) = key {
        req = req.header("Authorization", format!("Bearer {k}"));
    }
    let mut s = Sample::default();
    let resp = match req.send(body.to_string()) {
        Ok(r) if r.status().as_u16() == 200 => r,
        Ok(mut r) => {
            let text = r.body_mut().read_to_string().unwrap_or_default();
            eprintln!("request failed: {} {text}", r.status());
            return s;
        }
        Err(e) => {
            eprintln!("request failed: {e}");
            return s;
        }
    };
    let mut last: Option<Instant> = None;
    for line in BufReader::new(resp.into_body().into_reader())
        .lines()
        .map_while(Result::ok)
    {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            s.ok = s.completion_tokens > 0;
            break;
        }
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            continue;
        };
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            s.completion_tokens = n;
        }
        let has_text = v["choices"][0]["text"]
            .as_str()
            .is_some_and(|t| !t.is_empty());
        if has_text {
            let now = Instant::now();
            match last {
                None => s.ttft = (now - start).as_secs_f64(),
                Some(t) => s.itl.push((now - t).as_secs_f64()),
            }
            last = Some(now);
        }
    }
    s.e2e = start.elapsed().as_secs_f64();
    s
}

/// The `p`-th percentile (0..=100) of `v` (nearest rank); 0 for no values.
fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)]
}

/// Runs `retrowave bench serve`.
pub fn run(args: ServeBenchArgs) -> Result<()> {
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let model = load::open(&args.model)?;
    let haystack = essay_prompt(&model.tokenizer, args.input_len.max + 4096)?;
    let (_server, base) = match &args.url {
        Some(u) => (None, u.trim_end_matches('/').to_string()),
        None => {
            let (s, b) = spawn_server(&args)?;
            (Some(s), b)
        }
    };
    let mut info = agent().get(format!("{base}/v1/models"));
    if let Some(k) = &args.api_key {
        info = info.header("Authorization", format!("Bearer {k}"));
    }
    let info: Value = serde_json::from_str(&info.call()?.body_mut().read_to_string()?)?;
    let backend = info["data"][0]["backend"]
        .as_str()
        .unwrap_or("unknown")
        .to_string();
    let device = if backend.starts_with("cpu") {
        cpu_device()
    } else {
        backend.clone()
    };
    eprintln!(
        "bench serve: {} on {device}, {} clients, input {} output {} tokens, {} s",
        args.model, args.concurrency, args.input_len, args.output_len, args.duration
    );
    let duration = Duration::from_secs_f64(args.duration.max(0.0));
    let start = Instant::now();
    let samples: Vec<Sample> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..args.concurrency)
            .map(|c| {
                let (base, haystack, key) = (&base, &haystack, args.api_key.as_deref());
                let (input, output) = (args.input_len, args.output_len);
                let seed = args.seed.wrapping_mul(1_000_003).wrapping_add(c as u64);
                scope.spawn(move || {
                    let mut rng = StdRng::seed_from_u64(seed);
                    let mut out = Vec::new();
                    while start.elapsed() < duration {
                        let n_in = rng.random_range(input.min..=input.max);
                        let n_out = rng.random_range(output.min..=output.max);
                        let off = rng.random_range(0..=haystack.len() - n_in);
                        out.push(request(base, key, &haystack[off..off + n_in], n_out));
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let wall = start.elapsed().as_secs_f64();
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.ok).collect();
    let failed = samples.len() - ok.len();
    if ok.is_empty() {
        bail!("no request succeeded ({failed} failed)");
    }
    let tokens: u64 = ok.iter().map(|s| s.completion_tokens).sum();
    let mut ttft: Vec<f64> = ok.iter().map(|s| s.ttft).collect();
    let mut itl: Vec<f64> = ok.iter().flat_map(|s| s.itl.iter().copied()).collect();
    let mut e2e: Vec<f64> = ok.iter().map(|s| s.e2e).collect();
    let metrics = [
        ("request_throughput", ok.len() as f64 / wall, "requests/s"),
        ("output_tokens_per_s", tokens as f64 / wall, "tokens/s"),
        ("ttft_p50", percentile(&mut ttft, 50.0) * 1e3, "ms"),
        ("ttft_p99", percentile(&mut ttft, 99.0) * 1e3, "ms"),
        ("itl_p50", percentile(&mut itl, 50.0) * 1e3, "ms"),
        ("itl_p99", percentile(&mut itl, 99.0) * 1e3, "ms"),
        ("e2e_p50", percentile(&mut e2e, 50.0), "s"),
    ];
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("bench/results/serve-{}.jsonl", args.model)));
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&out)
        .with_context(|| format!("cannot open {}", out.display()))?;
    let ts = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    for (metric, value, unit) in metrics {
        let rec = json!({
            "bench": "serve", "engine": "retrowave", "metric": metric, "value": value, "unit": unit,
            "device": device, "backend": backend, "model": args.model,
            "concurrency": args.concurrency, "input_len": args.input_len.to_string(),
            "output_len": args.output_len.to_string(), "duration_s": args.duration,
            "wall_s": wall, "requests": ok.len(), "failed": failed, "output_tokens": tokens,
            "commit": commit(), "timestamp": ts,
        });
        writeln!(f, "{rec}")?;
        println!("{rec}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_and_percentiles() {
        assert_eq!("16".parse::<LenRange>(), Ok(LenRange { min: 16, max: 16 }));
        assert_eq!("8:32".parse::<LenRange>(), Ok(LenRange { min: 8, max: 32 }));
        assert_eq!("8:32".parse::<LenRange>().unwrap().to_string(), "8:32");
        for bad in ["0", "9:8", "x", "1:y"] {
            assert!(bad.parse::<LenRange>().is_err(), "{bad}");
        }
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        v.reverse();
        assert_eq!(percentile(&mut v, 50.0), 51.0);
        assert_eq!(percentile(&mut v, 99.0), 99.0);
        assert_eq!(percentile(&mut v, 100.0), 100.0);
        assert_eq!(percentile(&mut [], 50.0), 0.0);
    }
}
