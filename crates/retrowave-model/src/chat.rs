//! Chat templates: the Jinja templates stored with models (`tokenizer.chat_template` in GGUF,
//! `chat_template` in `tokenizer_config.json`), rendered the way Hugging Face transformers
//! renders them.
//!
//! transformers renders with Jinja2 (`trim_blocks`, `lstrip_blocks`, loop controls), passes
//! `messages`, `add_generation_prompt`, the special token strings, and `tools = None`,
//! `documents = None`; templates use Python string and dict methods (`.strip()`,
//! `.startswith()`, `.items()`), `raise_exception(msg)`, `tojson` (Python's `json.dumps`,
//! non-ASCII kept) and `strftime_now(fmt)`. This module provides the same on minijinja. Every
//! failure, a template syntax error or a `raise_exception` call included, is a [`ChatError`].

use std::fmt::Write as _;
use std::sync::Arc;

use minijinja::value::{Enumerator, Object, ObjectRepr, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text of the message.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Errors compiling or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The template does not parse.
    #[error("chat template does not compile: {0}")]
    Syntax(String),
    /// The template called `raise_exception` (it rejects the conversation, e.g. roles that do
    /// not alternate).
    #[error("chat template rejected the conversation: {0}")]
    Rejected(String),
    /// Rendering failed (unknown filter or method, wrong types, ...).
    #[error("chat template failed to render: {0}")]
    Render(String),
}

/// Name under which the template is stored in the environment.
const TEMPLATE_NAME: &str = "chat_template";
/// Marker put in front of `raise_exception` messages to recognise them after rendering.
const RAISE_MARKER: &str = "\u{1}raise_exception\u{1}";

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
}

/// A message as the template sees it: a dict with keys `role` and `content`, in that order.
#[derive(Debug)]
struct MessageValue {
    role: Value,
    content: Value,
}

impl Object for MessageValue {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "role" => Some(self.role.clone()),
            "content" => Some(self.content.clone()),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["role", "content"])
    }
}

/// Describe a minijinja error with its location and cause chain.
fn describe(err: &Error) -> String {
    let mut text = match err.detail() {
        Some(d) => format!("{}: {d}", err.kind()),
        None => err.kind().to_string(),
    };
    if let Some(line) = err.line() {
        let _ = write!(text, " (line {line})");
    }
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        let _ = write!(text, ": {s}");
        source = s.source();
    }
    text
}

/// Find a `raise_exception` message anywhere in the error chain.
fn raised_message(err: &Error) -> Option<String> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = current {
        let text = e.to_string();
        if let Some(start) = text.find(RAISE_MARKER) {
            let rest = &text[start + RAISE_MARKER.len()..];
            let end = rest.find(RAISE_MARKER).unwrap_or(rest.len());
            return Some(rest[..end].to_string());
        }
        current = e.source();
    }
    None
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISE_MARKER}{message}{RAISE_MARKER}"),
    ))
}

/// Layout options of `tojson`, as Python's `json.dumps` takes them.
struct JsonStyle {
    indent: Option<usize>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

/// Python's `json.dumps(value, ensure_ascii=False, ...)` for template values.
fn write_json(out: &mut String, v: &Value, style: &JsonStyle, depth: usize) -> Result<(), Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = style.indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Ok(i) = i64::try_from(v.clone()) {
                let _ = write!(out, "{i}");
            } else if let Ok(f) = f64::try_from(v.clone()) {
                if f.is_nan() {
                    out.push_str("NaN");
                } else if f.is_infinite() {
                    out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
                } else {
                    // Like Python's float repr: shortest round trip, always with '.' or 'e'.
                    let _ = write!(out, "{f:?}");
                }
            } else {
                let _ = write!(out, "{v}");
            }
        }
        ValueKind::String => write_json_string(out, v.as_str().unwrap_or_default()),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(out, depth + 1);
                write_json(out, item, style, depth + 1)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if style.sort_keys {
                keys.sort();
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(out, depth + 1);
                match key.as_str() {
                    Some(s) => write_json_string(out, s),
                    None => write_json_string(out, &key.to_string()),
                }
                out.push_str(&style.key_sep);
                let item = v.get_item(key)?;
                write_json(out, &item, style, depth + 1)?;
            }
            newline(out, depth);
            out.push('}');
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot serialise a value of type {}", v.kind()),
            ));
        }
    }
    Ok(())
}

fn write_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `tojson(indent=None, separators=None, sort_keys=False)`, as transformers defines it.
fn tojson(value: Value, kwargs: minijinja::value::Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators {
        Some(pair) => match <[String; 2]>::try_from(pair) {
            Ok([item, key]) => (item, key),
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: separators must be two strings (item, key)",
                ));
            }
        },
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let style = JsonStyle {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    write_json(&mut out, &value, &style, 0)?;
    Ok(Value::from_safe_string(out))
}

/// `strftime_now(format)`: the current UTC time formatted with the common `strftime` codes
/// (`%Y %m %d %H %M %S %y %b %B %a %A %j %p %I %e %%`).
fn strftime_now(format: String) -> Result<Value, Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(Value::from(strftime(secs, &format)?))
}

/// Format a Unix time (UTC) with `strftime` codes.
fn strftime(unix_secs: u64, format: &str) -> Result<String, Error> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    let (hour, minute, second) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_march = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_march + 2) / 153;
    let day = doy_march - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    const CUMULATIVE: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let month_idx = (month - 1).clamp(0, 11) as usize;
    let day_of_year = CUMULATIVE[month_idx] + day + i64::from(leap && month > 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday (index 3).
    let month_name = MONTHS[month_idx];
    let day_name = DAYS[weekday];

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(code) = chars.next() else {
            out.push('%');
            break;
        };
        let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
        match code {
            'Y' => write!(out, "{year}"),
            'y' => write!(out, "{:02}", year.rem_euclid(100)),
            'm' => write!(out, "{month:02}"),
            'd' => write!(out, "{day:02}"),
            'e' => write!(out, "{day:>2}"),
            'H' => write!(out, "{hour:02}"),
            'I' => write!(out, "{hour12:02}"),
            'M' => write!(out, "{minute:02}"),
            'S' => write!(out, "{second:02}"),
            'p' => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            'j' => write!(out, "{day_of_year:03}"),
            'b' | 'h' => write!(out, "{}", &month_name[..3]),
            'B' => write!(out, "{month_name}"),
            'a' => write!(out, "{}", &day_name[..3]),
            'A' => write!(out, "{day_name}"),
            '%' => write!(out, "%"),
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: unsupported format code %{other}"),
                ));
            }
        }
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    }
    Ok(out)
}

impl ChatTemplate {
    /// Compile a template.
    pub fn new(source: &str) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()
            .map_err(|e| ChatError::Syntax(describe(&e)))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| ChatError::Syntax(describe(&e)))?;
        Ok(Self {
            env,
            source: source.to_string(),
        })
    }

    /// The template source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` as the prompt of the assistant's next turn, with `tok`'s BOS and EOS
    /// strings (empty where the model has none).
    pub fn render_prompt(
        &self,
        messages: &[ChatMessage],
        tok: &crate::tokenizer::Tokenizer,
    ) -> Result<String, ChatError> {
        let special = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or("");
        self.render(messages, true, special(tok.bos_id()), special(tok.eos_id()))
    }

    /// Render a conversation. `add_generation_prompt` appends the opening of the assistant's
    /// turn; `bos_token` / `eos_token` are the model's special token strings (templates such as
    /// Llama's write them into the prompt).
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String, ChatError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ChatError::Render(describe(&e)))?;
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_object(MessageValue {
                    role: Value::from(m.role.as_str()),
                    content: Value::from(m.content.as_str()),
                })
            })
            .collect();
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => eos_token,
            tools => Value::from(()),
            documents => Value::from(()),
        };
        template.render(ctx).map_err(|e| match raised_message(&e) {
            Some(msg) => ChatError::Rejected(msg),
            None => ChatError::Render(describe(&e)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(src: &str, msgs: &[ChatMessage]) -> Result<String, ChatError> {
        ChatTemplate::new(src)?.render(msgs, false, "<s>", "</s>")
    }

    #[test]
    fn syntax_error_is_reported_not_panicked() {
        let err = ChatTemplate::new("{% for m in messages %}{{ m.content }").unwrap_err();
        assert!(matches!(err, ChatError::Syntax(_)), "{err}");
    }

    #[test]
    fn raise_exception_becomes_rejected() {
        let src = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('need a system \
                   message') }}{% endif %}ok";
        let err = render(src, &[ChatMessage::new("user", "hi")]).unwrap_err();
        match err {
            ChatError::Rejected(msg) => assert_eq!(msg, "need a system message"),
            other => panic!("wrong error {other}"),
        }
        assert_eq!(
            render(src, &[ChatMessage::new("system", "s")]).unwrap(),
            "ok"
        );
    }

    #[test]
    fn unknown_filter_is_a_render_or_syntax_error() {
        let res = render("{{ messages | no_such_filter }}", &[]);
        assert!(res.is_err());
    }

    #[test]
    fn python_string_methods_work() {
        let src = "{% for m in messages %}[{{ m.content.strip() }}|{{ m.role.startswith('us') \
                   }}|{{ m.content.upper() }}]{% endfor %}";
        let out = render(src, &[ChatMessage::new("user", "  hi ")]).unwrap();
        assert_eq!(out, "[hi|True|  HI ]");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let src = "{{ messages[0] | tojson }}|{{ {'a': [1, 2.5, none, true]} | tojson }}|{{ \
                   'é\"\\n' | tojson }}";
        let out = render(src, &[ChatMessage::new("user", "<b>&")]).unwrap();
        assert_eq!(
            out,
            r#"{"role": "user", "content": "<b>&"}|{"a": [1, 2.5, null, true]}|"é\"\n""#
        );
        let out = render("{{ [1, {'k': 'v'}] | tojson(indent=2) }}", &[]).unwrap();
        assert_eq!(out, "[\n  1,\n  {\n    \"k\": \"v\"\n  }\n]");
        let src = "{{ {'b': 1, 'a': [2, 3]} | tojson(separators=[',', ':'], sort_keys=true) }}";
        assert_eq!(render(src, &[]).unwrap(), r#"{"a":[2,3],"b":1}"#);
        assert!(render("{{ 1 | tojson(separators=[',']) }}", &[]).is_err());
        assert!(render("{{ 1 | tojson(bogus=1) }}", &[]).is_err());
    }

    #[test]
    fn message_items_keep_python_order() {
        let src = "{% for k, v in messages[0].items() %}{{ k }}={{ v }};{% endfor %}";
        let out = render(src, &[ChatMessage::new("user", "x")]).unwrap();
        assert_eq!(out, "role=user;content=x;");
    }

    #[test]
    fn tools_are_none_and_undefined_keys_are_falsy() {
        let src = "{% if tools %}T{% endif %}{% if tools is none %}N{% endif %}{% if not \
                   messages[0].tool_calls %}C{% endif %}";
        assert_eq!(render(src, &[ChatMessage::new("user", "x")]).unwrap(), "NC");
    }

    #[test]
    fn trim_and_lstrip_blocks_like_transformers() {
        let src = "{% for m in messages %}\n  {% if true %}\n{{ m.content }}\n  {% endif %}\n{% endfor %}\n";
        assert_eq!(
            render(src, &[ChatMessage::new("user", "x")]).unwrap(),
            "x\n"
        );
    }

    #[test]
    fn loop_controls_are_available() {
        let src = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ \
                   m.content }}{% endfor %}";
        let msgs = [ChatMessage::new("user", "a"), ChatMessage::new("user", "b")];
        assert_eq!(render(src, &msgs).unwrap(), "a");
    }

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = 1_709_211_909;
        assert_eq!(strftime(t, "%d %b %Y").unwrap(), "29 Feb 2024");
        assert_eq!(
            strftime(t, "%A %B %e %H:%M:%S %I%p %j %y %%").unwrap(),
            "Thursday February 29 13:05:09 01PM 060 24 %"
        );
        assert_eq!(strftime(0, "%Y-%m-%d %a").unwrap(), "1970-01-01 Thu");
        assert!(strftime(0, "%Q").is_err());
        let now = render("{{ strftime_now('%Y') }}", &[]).unwrap();
        assert!(now.parse::<u32>().is_ok_and(|y| y >= 2024), "{now}");
    }
}
