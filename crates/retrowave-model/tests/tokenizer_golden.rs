//! The tokenizer and chat templates against the real models and llama.cpp's golden outputs.
//!
//! For every `<model>.json` in the golden folder (`$RETROWAVE_GOLDEN_DIR`, else `shared/golden`
//! next to the workspace) whose GGUF file is present, the prompt ids must equal llama.cpp's
//! exactly, and the golden generated ids must decode to the golden text. SmolLM2 must be there
//! (it is fetched if missing); a missing Qwen file is skipped with a message.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use proptest::prelude::*;
use retrowave_model::chat::{ChatMessage, ChatTemplate};
use retrowave_model::gguf::{GgufFile, GgufValue, GgufWriter};
use retrowave_model::registry;
use retrowave_model::tokenizer::Tokenizer;

const SMOLLM: &str = "smollm2-135m";
const QWEN_05B: &str = "qwen2.5-coder-0.5b";

/// The golden folder: `$RETROWAVE_GOLDEN_DIR`, else `shared/golden` beside or inside the
/// workspace, else `/work/shared/golden`.
fn golden_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("RETROWAVE_GOLDEN_DIR") {
        return PathBuf::from(dir);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let candidates = [
        workspace.join("../shared/golden"),
        workspace.join("shared/golden"),
        PathBuf::from("/work/shared/golden"),
    ];
    candidates
        .iter()
        .find(|p| p.is_dir())
        .cloned()
        .unwrap_or_else(|| {
            panic!("no golden folder; set RETROWAVE_GOLDEN_DIR (tried {candidates:?})")
        })
}

/// The GGUF path of a model: SmolLM2 is required (fetched when missing); other models are
/// optional and `None` (with a printed skip line) when not downloaded.
fn model_file(name: &str) -> Option<PathBuf> {
    if name == SMOLLM {
        return Some(
            registry::ensure_model(name).unwrap_or_else(|e| panic!("{name} is required: {e}")),
        );
    }
    let path = registry::model_path(name).expect("a home folder for the model cache");
    if path.is_file() {
        Some(path)
    } else {
        eprintln!(
            "SKIP {name}: {} is not present (fetch it with the registry to run these checks)",
            path.display()
        );
        None
    }
}

struct Loaded {
    tokenizer: Tokenizer,
    build_seconds: f64,
}

fn load(name: &str) -> Option<&'static Loaded> {
    static CACHE: OnceLock<std::sync::Mutex<BTreeMap<String, Option<&'static Loaded>>>> =
        OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut map = cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(entry) = map.get(name) {
        return *entry;
    }
    let entry = model_file(name).map(|path| {
        let g = GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let start = Instant::now();
        let tokenizer = Tokenizer::from_gguf(&g).unwrap_or_else(|e| panic!("{e}"));
        let build_seconds = start.elapsed().as_secs_f64();
        &*Box::leak(Box::new(Loaded {
            tokenizer,
            build_seconds,
        }))
    });
    map.insert(name.to_string(), entry);
    entry
}

fn tokenizer(name: &str) -> Option<&'static Tokenizer> {
    load(name).map(|l| &l.tokenizer)
}

struct GoldenPrompt {
    name: String,
    prompt: String,
    prompt_ids: Vec<u32>,
    generated_ids: Vec<u32>,
    generated_pieces: Vec<String>,
    generated_text: String,
}

fn ids(v: &serde_json::Value, key: &str) -> Vec<u32> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("golden {key} is not an array"))
        .iter()
        .map(|x| {
            x.as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .expect("a token id")
        })
        .collect()
}

fn golden(path: &Path) -> Vec<GoldenPrompt> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let json: serde_json::Value = serde_json::from_str(&text).expect("golden JSON");
    json["prompts"]
        .as_array()
        .expect("golden prompts")
        .iter()
        .map(|p| GoldenPrompt {
            name: p["name"].as_str().expect("name").to_string(),
            prompt: p["prompt"].as_str().expect("prompt").to_string(),
            prompt_ids: ids(p, "prompt_ids"),
            generated_ids: ids(p, "generated_ids"),
            generated_pieces: p["generated_pieces"]
                .as_array()
                .expect("pieces")
                .iter()
                .map(|s| s.as_str().expect("piece").to_string())
                .collect(),
            generated_text: p["generated_text"].as_str().expect("text").to_string(),
        })
        .collect()
}

fn golden_files() -> Vec<(String, PathBuf)> {
    let dir = golden_dir();
    let mut out: Vec<(String, PathBuf)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("golden folder {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter_map(|p| Some((p.file_stem()?.to_str()?.to_string(), p)))
        .collect();
    out.sort();
    assert!(
        out.iter().any(|(n, _)| n == SMOLLM),
        "no {SMOLLM}.json in {}",
        dir.display()
    );
    out
}

#[test]
fn golden_prompts_encode_and_decode_exactly() {
    let mut checked = 0;
    for (model, path) in golden_files() {
        let Some(tok) = tokenizer(&model) else {
            continue;
        };
        for g in golden(&path) {
            let ids = tok.encode(&g.prompt, true, false).unwrap();
            if ids != g.prompt_ids {
                let first = ids
                    .iter()
                    .zip(&g.prompt_ids)
                    .position(|(a, b)| a != b)
                    .unwrap_or(ids.len().min(g.prompt_ids.len()));
                panic!(
                    "{model} prompt {:?}: {} ids vs llama.cpp's {}; first difference at {first}: \
                     ours {:?} golden {:?}",
                    g.name,
                    ids.len(),
                    g.prompt_ids.len(),
                    &ids[first..(first + 5).min(ids.len())],
                    &g.prompt_ids[first..(first + 5).min(g.prompt_ids.len())],
                );
            }
            assert_eq!(tok.decode(&ids).unwrap(), g.prompt, "{model} {}", g.name);
            assert_eq!(
                tok.decode(&g.generated_ids).unwrap(),
                g.generated_text,
                "{model} {} generated text",
                g.name
            );
            for (id, piece) in g.generated_ids.iter().zip(&g.generated_pieces) {
                assert_eq!(
                    tok.token_bytes(*id).as_deref(),
                    Some(piece.as_bytes()),
                    "{model} piece of {id}"
                );
            }
            let mut stream = tok.stream_decoder();
            let mut streamed = String::new();
            for &id in &g.generated_ids {
                streamed.extend(stream.push(id).unwrap());
            }
            streamed.extend(stream.finish());
            assert_eq!(streamed, g.generated_text, "{model} {} streamed", g.name);
            checked += 1;
        }
        println!("{model}: golden prompts match llama.cpp");
    }
    assert!(checked >= 4, "only {checked} golden prompts checked");
}

#[test]
fn essay_encodes_fast_and_vocab_builds_fast() {
    for model in [SMOLLM, QWEN_05B] {
        let Some(loaded) = load(model) else { continue };
        let path = golden_dir().join(format!("{model}.json"));
        let essay = golden(&path)
            .into_iter()
            .find(|g| g.name == "essay_question")
            .expect("essay prompt");
        assert!(essay.prompt.len() > 7000);
        // Warm the BPE cache once, then time a cold-ish and a warm encode.
        let start = Instant::now();
        let ids = loaded.tokenizer.encode(&essay.prompt, true, false).unwrap();
        let first = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let again = loaded.tokenizer.encode(&essay.prompt, true, true).unwrap();
        let second = start.elapsed().as_secs_f64();
        assert_eq!(ids, again);
        println!(
            "{model}: build {:.3} s, essay ({} chars, {} tokens) encode {:.1} ms first, {:.1} ms \
             again",
            loaded.build_seconds,
            essay.prompt.chars().count(),
            ids.len(),
            first * 1e3,
            second * 1e3
        );
        // Timings are printed for information only: speed is measured by benchmarks, not tests.
    }
}

#[test]
fn chat_markup_is_special_only_with_parse_special() {
    let text = "<|im_start|>user\nhi<|im_end|>";
    for model in [SMOLLM, QWEN_05B] {
        let Some(tok) = tokenizer(model) else {
            continue;
        };
        let start = tok.token_id("<|im_start|>").expect("<|im_start|>");
        let end = tok.token_id("<|im_end|>").expect("<|im_end|>");
        let inner = tok.encode("user\nhi", false, false).unwrap();
        let special = tok.encode(text, false, true).unwrap();
        let mut expected = vec![start];
        expected.extend(&inner);
        expected.push(end);
        assert_eq!(special, expected, "{model}");
        let plain = tok.encode(text, false, false).unwrap();
        assert!(
            !plain.contains(&start) && !plain.contains(&end) && plain.len() > special.len(),
            "{model}: {plain:?}"
        );
        assert_eq!(tok.decode(&plain).unwrap(), text);
        assert_eq!(tok.decode(&special).unwrap(), text);
        assert!(tok.is_end_of_generation(end), "{model}");
        assert!(!tok.is_end_of_generation(start), "{model}");
    }
    // Known ids: SmolLM2's <|im_start|> 1, <|im_end|> 2, <|endoftext|> 0, "\n" 198.
    let tok = tokenizer(SMOLLM).expect("SmolLM2");
    let special = tok.encode(text, false, true).unwrap();
    assert_eq!((special[0], *special.last().unwrap()), (1, 2));
    assert!(special.contains(&198));
    assert_eq!(tok.eos_id(), Some(2));
    assert!(tok.eos_ids().contains(&0) && tok.eos_ids().contains(&2));
    assert!(!tok.adds_bos());
}

#[test]
fn qwen_special_ids_and_user_defined_tokens() {
    let Some(tok) = tokenizer(QWEN_05B) else {
        return;
    };
    assert_eq!(tok.vocab_size(), 151_936);
    assert_eq!(tok.token_id("<|im_start|>"), Some(151_644));
    assert_eq!(tok.token_id("<|im_end|>"), Some(151_645));
    assert_eq!(tok.eos_id(), Some(151_645));
    for id in [151_643, 151_645] {
        assert!(tok.is_end_of_generation(id), "{id}");
    }
    assert!(!tok.adds_bos());
    // <tool_call> is a user-defined token: matched even with parse_special off, as in llama.cpp.
    let call = tok.token_id("<tool_call>").expect("<tool_call>");
    assert_eq!(call, 151_657);
    for parse_special in [false, true] {
        let ids = tok.encode("x<tool_call>y", false, parse_special).unwrap();
        assert!(ids.contains(&call), "{ids:?}");
    }
}

/// Emoji whose bytes the vocabulary splits over several tokens.
fn split_emoji(tok: &Tokenizer) -> (&'static str, Vec<u32>) {
    for e in ["🦀", "🦜", "🧬", "🪐", "🫖", "🦩", "🐙", "😀"] {
        let ids = tok.encode(e, false, false).unwrap();
        let first_is_partial = ids
            .first()
            .and_then(|&id| tok.token_bytes(id))
            .is_some_and(|b| std::str::from_utf8(&b).is_err());
        if ids.len() > 1 && first_is_partial {
            return (e, ids);
        }
    }
    panic!("no emoji split across tokens");
}

#[test]
fn stream_decoder_emits_split_emoji_exactly_once() {
    for model in [SMOLLM, QWEN_05B] {
        let Some(tok) = tokenizer(model) else {
            continue;
        };
        let (emoji, ids) = split_emoji(tok);
        let mut dec = tok.stream_decoder();
        let outputs: Vec<Option<String>> = ids.iter().map(|&id| dec.push(id).unwrap()).collect();
        let (last, before) = outputs.split_last().expect("several tokens");
        assert!(before.iter().all(Option::is_none), "{model}: {outputs:?}");
        assert_eq!(last.as_deref(), Some(emoji), "{model}");
        assert_eq!(dec.finish(), None);

        let text = format!("Crabs {emoji}{emoji} like Rust! 你好, naïve café\n\tend");
        let ids = tok.encode(&text, false, false).unwrap();
        let mut dec = tok.stream_decoder();
        let mut out = String::new();
        for id in ids {
            if let Some(piece) = dec.push(id).unwrap() {
                assert!(!piece.contains('\u{FFFD}'), "{model}: {piece:?}");
                out.push_str(&piece);
            }
        }
        out.extend(dec.finish());
        assert_eq!(out, text, "{model}");
    }
}

#[test]
fn chat_templates_render_like_transformers() {
    let system_user = [
        ChatMessage::new("system", "You are terse."),
        ChatMessage::new("user", "Hi!"),
    ];
    let user_assistant = [
        ChatMessage::new("user", "What is 2+2?"),
        ChatMessage::new("assistant", "4"),
    ];
    let expected: [(&str, [&str; 2]); 2] = [
        (
            SMOLLM,
            [
                "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n\
                 <|im_start|>assistant\n",
                "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by \
                 Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n\
                 <|im_start|>assistant\n4<|im_end|>\n",
            ],
        ),
        (
            QWEN_05B,
            [
                "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n\
                 <|im_start|>assistant\n",
                "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful \
                 assistant.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n\
                 <|im_start|>assistant\n4<|im_end|>\n",
            ],
        ),
    ];
    for (model, [first, second]) in expected {
        let Some(tok) = tokenizer(model) else {
            continue;
        };
        let source = tok.chat_template().expect("the GGUF has a chat template");
        let template = ChatTemplate::new(source).unwrap();
        let bos = tok.bos_id().and_then(|id| tok.token_text(id)).unwrap_or("");
        let eos = tok.eos_id().and_then(|id| tok.token_text(id)).unwrap_or("");
        let rendered = template.render(&system_user, true, bos, eos).unwrap();
        assert_eq!(rendered, first, "{model}");
        let rendered = template.render(&user_assistant, false, bos, eos).unwrap();
        assert_eq!(rendered, second, "{model}");

        // The rendered prompt tokenizes with the markup as single special tokens.
        let ids = tok.encode(&rendered, true, true).unwrap();
        let start = tok.token_id("<|im_start|>").expect("<|im_start|>");
        assert_eq!(ids.first(), Some(&start));
        assert_eq!(ids.iter().filter(|&&i| i == start).count(), 3, "{model}");
        assert_eq!(tok.decode(&ids).unwrap(), rendered);
    }
}

#[test]
fn exported_hf_folder_tokenizes_the_same() {
    for model in [SMOLLM, QWEN_05B] {
        let Some(tok) = tokenizer(model) else {
            continue;
        };
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("tokenizer.json"),
            tok.to_tokenizer_json().unwrap(),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            tok.to_tokenizer_config_json().unwrap(),
        )
        .unwrap();
        let back = Tokenizer::from_hf_folder(dir.path()).unwrap();
        assert_eq!(back.vocab_size(), tok.vocab_size(), "{model}");
        assert_eq!(back.eos_ids(), tok.eos_ids(), "{model}");
        assert_eq!(back.chat_template(), tok.chat_template(), "{model}");
        let path = golden_dir().join(format!("{model}.json"));
        let mut texts: Vec<String> = golden(&path).into_iter().map(|g| g.prompt).collect();
        texts.push("<|im_start|>user\nhi<|im_end|> 12345 🦀 naïve\r\n\t x".to_string());
        for text in &texts {
            for special in [false, true] {
                assert_eq!(
                    back.encode(text, true, special).unwrap(),
                    tok.encode(text, true, special).unwrap(),
                    "{model} parse_special={special}"
                );
            }
        }
    }
}

/// Text fragments that exercise the pre-tokenizers: contractions, digits, whitespace runs,
/// markup, scripts, combining marks, emoji, control characters.
fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => any::<String>(),
        1 => "[ \t\n\r]{1,6}".prop_map(|s| s),
        1 => "[0-9]{1,9}".prop_map(|s| s),
        1 => "('s|'T|'re|'VE|'ll|'d|'m)".prop_map(|s| s),
        2 => prop::sample::select(vec![
            "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool_call>", "Hello", " world",
            "  ", "\n\n", "\r\n", "\t", "é", "e\u{301}", "中文字符", "🦀", "👩‍👩‍👧", "\u{0}",
            "\u{1b}[0m", "\u{a0}", "\u{2028}", "\u{feff}", "ﬁ", "Ⅻ", "½", "x²", "١٢٣", "ㅤ",
            "\u{10ffff}", "...", "?!", "--", "$$", "def f(x):\n    return x",
        ])
        .prop_map(str::to_string),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(fragment(), 0..8).prop_map(|v| v.concat())
}

fn round_trip(tok: &Tokenizer, s: &str) -> Result<(), TestCaseError> {
    let expected: Vec<u8> = s.bytes().filter(|&b| tok.can_encode_byte(b)).collect();
    for parse_special in [false, true] {
        let ids = tok.encode(s, false, parse_special).unwrap();
        let bytes = tok.decode_bytes(&ids).unwrap();
        prop_assert_eq!(&bytes, &expected, "parse_special={}", parse_special);
        if expected.len() == s.len() {
            prop_assert_eq!(tok.decode(&ids).unwrap(), s);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 300,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn smollm_round_trips_every_byte_it_can_spell(s in text()) {
        let tok = tokenizer(SMOLLM).expect("SmolLM2");
        round_trip(tok, &s)?;
    }

    #[test]
    fn qwen_round_trips_every_string(s in text()) {
        let Some(tok) = tokenizer(QWEN_05B) else { return Ok(()); };
        // Qwen's vocabulary has all 256 byte tokens: the round trip is exact for any text.
        prop_assert!((0..=255u8).all(|b| tok.can_encode_byte(b)));
        round_trip(tok, &s)?;
    }
}

#[test]
fn smollm_lacks_some_bytes_and_drops_them_like_llama_cpp() {
    let tok = tokenizer(SMOLLM).expect("SmolLM2");
    let missing: Vec<u8> = (0..=255u8).filter(|&b| !tok.can_encode_byte(b)).collect();
    assert_eq!(
        missing,
        [
            0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, 0xF5, 0xF6, 0xF7, 0xF8,
            0xF9, 0xFA, 0xFB, 0xFC, 0xFD, 0xFE, 0xFF
        ]
    );
    let ids = tok.encode("a\u{4}b", false, false).unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), "ab");
}

/// The tokenizer metadata of a GGUF file with `tokenizer.ggml.pre` replaced.
fn with_pre_tokenizer(g: &GgufFile, pre: &str) -> GgufFile {
    let mut w = GgufWriter::new();
    for (key, value) in g.metadata() {
        if key.starts_with("tokenizer.") && key != "tokenizer.ggml.pre" {
            w.metadata(key, value.clone());
        }
    }
    w.metadata("tokenizer.ggml.pre", GgufValue::String(pre.to_string()));
    GgufFile::from_bytes(w.to_bytes()).unwrap_or_else(|e| panic!("{e}"))
}

fn parse_ids(text: &str) -> Vec<u32> {
    text.split_whitespace()
        .map(|t| t.parse().expect("a token id"))
        .collect()
}

/// Every pre-tokenizer against llama.cpp on adversarial strings (fixture made with the same
/// llama.cpp as the golden files), on both vocabularies.
#[test]
fn pre_tokenizers_match_llama_cpp_on_adversarial_text() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tok_llama_cpp_ids.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let fixture: serde_json::Value = serde_json::from_str(&text).expect("fixture JSON");
    let strings: Vec<&str> = fixture["strings"]
        .as_array()
        .expect("strings")
        .iter()
        .map(|s| s.as_str().expect("a string"))
        .collect();
    let models = fixture["ids"].as_object().expect("ids");
    assert!(models.contains_key(SMOLLM));
    let mut checked = 0;
    for (model, by_pre) in models {
        let Some(file) = model_file(model) else {
            continue;
        };
        let g = GgufFile::open(&file).unwrap_or_else(|e| panic!("{e}"));
        for (pre, expected) in by_pre.as_object().expect("per pre-tokenizer") {
            let tok = Tokenizer::from_gguf(&with_pre_tokenizer(&g, pre))
                .unwrap_or_else(|e| panic!("{model} with {pre}: {e}"));
            let expected = expected.as_array().expect("entries");
            assert_eq!(expected.len(), strings.len());
            for (s, entry) in strings.iter().zip(expected) {
                let entry = entry.as_str().expect("an entry");
                let (plain, special) = entry.split_once('|').expect("two id lists");
                assert_eq!(
                    tok.encode(s, true, false).unwrap(),
                    parse_ids(plain),
                    "{model} pre={pre} parse_special=false {s:?}"
                );
                assert_eq!(
                    tok.encode(s, true, true).unwrap(),
                    parse_ids(special),
                    "{model} pre={pre} parse_special=true {s:?}"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 5 * strings.len(), "only {checked} checked");
}
