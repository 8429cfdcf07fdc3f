//! The model's own Jinja chat template, rendered with minijinja the way transformers'
//! `apply_chat_template(messages, add_generation_prompt=True)` renders it (trim_blocks, lstrip_blocks,
//! Python string methods, `raise_exception`, `strftime_now`).

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A chat as the model saw it: the rendered text, each token's byte range in it, and the messages it was
/// rendered from (what the text and chat-turn position selectors read).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RenderedChat {
    pub text: String,
    pub offsets: Vec<(usize, usize)>,
    pub messages: Vec<Message>,
}

impl RenderedChat {
    /// Byte ranges of each message's content in the text, found in order (a template may trim it).
    pub fn turns(&self) -> Result<Vec<(usize, usize)>> {
        let mut from = 0;
        let mut out = vec![];
        for (i, m) in self.messages.iter().enumerate() {
            let content = m.content.trim();
            let at = self.text[from..]
                .find(content)
                .with_context(|| format!("message {i}'s content is not in the rendered prompt"))?
                + from;
            out.push((at, at + content.len()));
            from = at + content.len();
        }
        Ok(out)
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from, for error messages (file and field).
    pub origin: String,
    pub source: String,
    pub bos_token: String,
    pub eos_token: String,
}

impl ChatTemplate {
    pub fn new(source: &str, origin: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |fmt: String| strftime_now(&fmt));
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| anyhow!("{origin}: the chat template does not parse: {e}"))?;
        Ok(Self {
            env,
            origin: origin.into(),
            source: source.into(),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// Reads the template of an HF directory: `chat_template.jinja` (transformers 5) or the
    /// `chat_template` field of `tokenizer_config.json` (a string, or a list of named templates).
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path)
                .with_context(|| format!("cannot read {}", cfg_path.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{}: not valid JSON", cfg_path.display()))?
        } else {
            serde_json::Value::Null
        };
        let token = |k: &str| -> String {
            match cfg.get(k) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(obj) => obj
                    .get("content")
                    .and_then(|c| c.as_str())
                    .unwrap_or("")
                    .to_string(),
                None => String::new(),
            }
        };
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            let src = std::fs::read_to_string(&jinja)
                .with_context(|| format!("cannot read {}", jinja.display()))?;
            return Self::new(
                &src,
                &jinja.display().to_string(),
                &token("bos_token"),
                &token("eos_token"),
            );
        }
        let origin = format!("{} field `chat_template`", cfg_path.display());
        let src = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template").and_then(|s| s.as_str()))
                .map(String::from)
                .with_context(|| format!("{origin}: no template named \"default\""))?,
            _ => bail!(
                "{}: no chat template (neither chat_template.jinja nor a `chat_template` field in tokenizer_config.json)",
                dir.display()
            ),
        };
        Self::new(&src, &origin, &token("bos_token"), &token("eos_token"))
    }

    /// The prompt text for `messages`, ending with the assistant header when `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self.env.get_template("chat").map_err(|e| anyhow!("{e}"))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| anyhow!("{}: the chat template failed to render: {e}", self.origin))
    }
}

/// `strftime_now(fmt)` for templates that stamp today's date (Llama 3.2): %d %m %Y %y %b %B %H %M %S.
fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Howard Hinnant's civil-from-days.
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
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
    let name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out += &format!("{day:02}"),
            Some('m') => out += &format!("{month:02}"),
            Some('Y') => out += &year.to_string(),
            Some('y') => out += &format!("{:02}", year % 100),
            Some('b') => out += &name[..3],
            Some('B') => out += name,
            Some('H') => out += &format!("{:02}", rem / 3600),
            Some('M') => out += &format!("{:02}", rem % 3600 / 60),
            Some('S') => out += &format!("{:02}", rem % 60),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}
