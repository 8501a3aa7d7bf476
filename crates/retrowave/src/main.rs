//! The `retrowave` command: fetch models, generate text, run benchmarks.

/// mimalloc instead of glibc's allocator: decode steps allocate and free tens of kilobytes per
/// head, which glibc keeps trimming back to the OS and faulting in again (3% of a 128K wave step
/// went to zeroing fresh pages).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod attnbench;
mod bench;
mod decodebench;
mod eval;
mod gpubench;
mod load;
mod serve;
mod servebench;
mod storebench;
mod tpbench;

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use retrowave_engine::Event;
use retrowave_model::chat::{ChatMessage, ChatTemplate};
use retrowave_model::registry::{self, FetchOptions, ModelSpec};
use retrowave_model::sampling::SamplingParams;

#[derive(Parser)]
#[command(
    name = "retrowave",
    version,
    about = "Long-context LLM serving runtime"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a model over an OpenAI-compatible HTTP API (default: SmolLM2 on the best device).
    Serve(serve::ServeArgs),
    /// Download, assemble and verify a registry model (or list them).
    Fetch {
        /// Model name (default: the default model).
        name: Option<String>,
        /// List the registry instead.
        #[arg(long)]
        list: bool,
        /// Print only the local path (fetching first if needed).
        #[arg(long)]
        print_path: bool,
        /// Fetch again even if the file is present.
        #[arg(long)]
        force: bool,
    },
    /// Generate text from a prompt, streaming tokens to stdout.
    Generate(GenerateArgs),
    /// Accuracy of full vs wave attention on long-context tasks (or cases from a file).
    Eval(eval::cli::EvalArgs),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        which: bench::BenchCommand,
    },
}

#[derive(clap::Args)]
struct ModelArgs {
    /// Registry name or path to a .gguf file or Hugging Face folder.
    #[arg(long, short, default_value = registry::DEFAULT_MODEL, env = "RETROWAVE_MODEL")]
    model: String,
    /// Tensor-parallel degree (workers; on GPUs, consecutive devices from --device's).
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Where the model runs: auto (the first GPU if there is one, else the CPU), cpu, cuda or
    /// cuda:N.
    #[arg(long, default_value = "auto", env = "RETROWAVE_DEVICE")]
    device: String,
    /// Context limit in tokens (0 = the model's).
    #[arg(long, default_value_t = 0)]
    max_context: usize,
    /// Prompt tokens per prefill step.
    #[arg(long, default_value_t = 512)]
    prefill_chunk: usize,
    /// Decode attention: `full` (exact) or `wave` (the wave index, built after each prefill).
    #[arg(long, default_value = "full")]
    attention: String,
    /// TOML file of wave-index parameters (any subset of them; the rest keep the published
    /// defaults). Implies nothing unless `--attention wave`.
    #[arg(long)]
    wave_config: Option<PathBuf>,
    /// CPU, `--attention wave`: keep the indexed KV in a tiered store with its disk tier in this
    /// directory (repeatable: striped over several), spilling the coldest clusters there once
    /// `--store-host-bytes` of host memory are used.
    #[arg(long)]
    store_dir: Vec<PathBuf>,
    /// Host memory of the tiered store (with --store-dir), in bytes.
    #[arg(long, default_value_t = retrowave_store::StoreConfig::default().host_capacity_bytes)]
    store_host_bytes: u64,
}

impl ModelArgs {
    fn engine_options(&self) -> anyhow::Result<load::EngineOptions> {
        let store = load::cpu_store_in(self.store_dir.clone(), self.store_host_bytes)?;
        Ok(load::EngineOptions {
            attention: load::attention_mode(&self.attention, self.wave_config.as_deref())?,
            tp: self.tp,
            max_context: self.max_context,
            prefill_chunk: self.prefill_chunk,
            store,
        })
    }
}

#[derive(clap::Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Render the prompt as a user message with the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message (with --chat).
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 = no limit.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when this text appears (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Keep going after an end-of-generation token.
    #[arg(long)]
    ignore_eos: bool,
    /// The prompt.
    prompt: String,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RETROWAVE_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Fetch {
            name,
            list,
            print_path,
            force,
        } => fetch(name, list, print_path, force),
        Command::Serve(args) => serve::run(args),
        Command::Generate(args) => generate(args),
        Command::Eval(args) => eval::cli::run(args),
        Command::Bench { which } => bench::run(which),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn fetch(name: Option<String>, list: bool, print_path: bool, force: bool) -> Result<()> {
    if list {
        for e in registry::entries() {
            let mark = if registry::model_path(e.name)
                .map(|p| p.exists())
                .unwrap_or(false)
            {
                "cached"
            } else {
                ""
            };
            println!(
                "{:<22} {:>6.0} MB  {:<8} {}",
                e.name,
                e.size as f64 / 1e6,
                mark,
                e.description
            );
        }
        return Ok(());
    }
    let name = name.unwrap_or_else(|| registry::DEFAULT_MODEL.to_string());
    let path = match registry::resolve(&name)? {
        ModelSpec::Registry(entry) => {
            if force || !registry::model_path(entry.name)?.exists() {
                let mut opts = FetchOptions::interactive();
                opts.force = force;
                if print_path {
                    opts.progress = false;
                }
                registry::fetch_model(entry, &opts)?
            } else {
                registry::ensure_model(entry.name)?
            }
        }
        ModelSpec::Path(p) => bail!("{} is a local path, not a registry model", p.display()),
    };
    if print_path {
        println!("{}", path.display());
    } else {
        eprintln!("{name}: verified, {}", path.display());
    }
    Ok(())
}

fn generate(args: GenerateArgs) -> Result<()> {
    let model = load::open(&args.model.model)?;
    let gpus = load::cuda_backends(&args.model.device, args.model.tp)?;
    if gpus.is_some() && !args.model.store_dir.is_empty() {
        anyhow::bail!(
            "--store-dir serves the CPU backend only (GPU workers keep the wave KV in GPU or \
             pinned host memory); add --device cpu or leave --store-dir out"
        );
    }
    let opts = args.model.engine_options()?;
    let store = opts.store.clone();
    match gpus {
        Some(gpus) => generate_on(&args, load::engine_on(&model, opts, gpus)?),
        None => {
            generate_on(&args, load::engine(&model, opts)?)?;
            if let Some(s) = store {
                let st = s.stats();
                eprintln!(
                    "[KV store: {} cluster records spilled to disk, {} read back]",
                    st.spilled, st.disk_loads,
                );
            }
            Ok(())
        }
    }
}

fn generate_on<B: retrowave_core::Backend + 'static>(
    args: &GenerateArgs,
    mut engine: retrowave_engine::Engine<B>,
) -> Result<()> {
    let tok = engine.tokenizer().clone();
    let prompt_ids = if args.chat {
        let template = tok
            .chat_template()
            .context("this model has no chat template; drop --chat")?;
        let template = ChatTemplate::new(template)?;
        let mut messages = Vec::new();
        if let Some(s) = &args.system {
            messages.push(ChatMessage::new("system", s.as_str()));
        }
        messages.push(ChatMessage::new("user", args.prompt.as_str()));
        let text = template.render_prompt(&messages, &tok)?;
        tok.encode(&text, true, true)?
    } else {
        tok.encode(&args.prompt, true, false)?
    };
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        max_tokens: args.max_tokens,
        stop: args.stop.clone(),
        ignore_eos: args.ignore_eos,
    };
    let start = Instant::now();
    let id = engine.add_request(prompt_ids, params)?;
    let _ = &args.model;
    let mut out = std::io::stdout().lock();
    loop {
        let events = engine.step()?;
        for ev in events {
            match ev {
                Event::Token { text, .. } => {
                    out.write_all(text.as_bytes())?;
                    out.flush()?;
                }
                Event::Finished {
                    id: fid,
                    text,
                    usage,
                    reason,
                } if fid == id => {
                    out.write_all(text.as_bytes())?;
                    writeln!(out)?;
                    out.flush()?;
                    let prefill_s = usage.prefill.as_secs_f64();
                    let decode_s = usage.decode.as_secs_f64();
                    let decoded = usage.completion_tokens.saturating_sub(1);
                    eprintln!(
                        "[{} | prompt {} tokens, prefill {:.1} tok/s | generated {} tokens, decode {:.1} tok/s | finish: {} | {:.2} s]",
                        engine.group().backend_name(),
                        usage.prompt_tokens,
                        usage.prompt_tokens as f64 / prefill_s.max(1e-9),
                        usage.completion_tokens,
                        if decoded > 0 {
                            decoded as f64 / decode_s.max(1e-9)
                        } else {
                            0.0
                        },
                        reason.as_str(),
                        start.elapsed().as_secs_f64(),
                    );
                    return Ok(());
                }
                Event::Finished { .. } => {}
            }
        }
    }
}
