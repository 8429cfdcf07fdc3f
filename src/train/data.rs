//! Training data: chat JSONL in OpenAI's fine-tuning format (`{"messages": [...]}` per line), rendered
//! with the model's own chat template and tokenized once; the loss falls on the assistant turns only.

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::model::{LoadedModel, Message};

/// One conversation from a chat JSONL file, with where it came from.
#[derive(Debug, Clone)]
pub struct ChatRow {
    /// `file:line`, for error messages.
    pub origin: String,
    pub messages: Vec<Message>,
    /// Per message: whether it is trained on (assistant turns, unless `"weight": 0`).
    pub trained: Vec<bool>,
}

/// Reads `{"messages": [{"role", "content"[, "weight"]}, ...]}` per line; blank lines are skipped.
pub fn read_chat_jsonl(path: &Path) -> Result<Vec<ChatRow>> {
    let rows = crate::fsutil::jsonl_lines(path)?
        .iter()
        .map(|(origin, line)| parse_chat_line(line, origin))
        .collect::<Result<Vec<_>>>()?;
    if rows.is_empty() {
        bail!("{}: no conversations", path.display());
    }
    Ok(rows)
}

pub fn parse_chat_line(line: &str, origin: &str) -> Result<ChatRow> {
    let v: serde_json::Value =
        serde_json::from_str(line).with_context(|| format!("{origin}: not valid JSON"))?;
    let msgs = v
        .get("messages")
        .and_then(|m| m.as_array())
        .with_context(|| format!("{origin}: missing field `messages` (an array)"))?;
    if msgs.is_empty() {
        bail!("{origin}: field `messages` is empty");
    }
    let (mut messages, mut trained) = (vec![], vec![]);
    for (k, m) in msgs.iter().enumerate() {
        let field = |name: &str| {
            m.get(name).and_then(|x| x.as_str()).with_context(|| {
                format!("{origin}: field `messages[{k}].{name}` is missing or not a string")
            })
        };
        let role = field("role")?;
        if !["system", "user", "assistant"].contains(&role) {
            bail!("{origin}: field `messages[{k}].role` is `{role}`; expected system, user or assistant");
        }
        let weight = match m.get("weight") {
            None => 1,
            Some(w) => match w.as_u64() {
                Some(w @ (0 | 1)) => w,
                _ => bail!("{origin}: field `messages[{k}].weight` must be 0 or 1"),
            },
        };
        trained.push(role == "assistant" && weight == 1);
        messages.push(Message::new(role, field("content")?));
    }
    Ok(ChatRow {
        origin: origin.to_string(),
        messages,
        trained,
    })
}

/// A tokenized conversation: ids and, per id, whether it is a loss target.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedRow {
    pub ids: Vec<u32>,
    pub targets: Vec<bool>,
}

impl TokenizedRow {
    pub fn num_targets(&self) -> usize {
        self.targets.iter().filter(|&&t| t).count()
    }
}

/// Renders the conversation once and marks the tokens of each trained assistant turn: its content and
/// the template's end-of-turn marker, not the header before it nor whitespace after it. The turn is
/// located by rendering the conversation up to it with and without the assistant turn, so any template
/// that renders conversations incrementally works (ChatML, Llama 3, ...).
pub fn tokenize(model: &LoadedModel, row: &ChatRow, max_len: usize) -> Result<TokenizedRow> {
    let o = &row.origin;
    let render = |upto: usize, gen: bool| {
        model
            .template
            .render(&row.messages[..upto], gen)
            .with_context(|| o.to_string())
    };
    let full = render(row.messages.len(), false)?;
    let mut spans = vec![];
    for (i, m) in row.messages.iter().enumerate() {
        if !row.trained[i] {
            continue;
        }
        let before = render(i, true)?;
        let through = render(i + 1, false)?;
        if !through.starts_with(&before) || !full.starts_with(&through) {
            bail!(
                "{o}: the chat template ({}) does not render this conversation incrementally, so \
                 assistant turn {i} cannot be located",
                model.template.origin
            );
        }
        let end = before.len() + through[before.len()..].trim_end().len();
        if end <= before.len() {
            bail!(
                "{o}: field `messages[{i}].content` renders to nothing ({:?})",
                m.content
            );
        }
        spans.push((before.len(), end));
    }
    if spans.is_empty() {
        bail!("{o}: no assistant message to train on");
    }
    let (ids, offsets) = model.tokenizer.encode_with_offsets(&full)?;
    if ids.len() > max_len {
        bail!(
            "{o}: {} tokens, more than the maximum sequence length {max_len}; shorten the row or raise --max-seq-len",
            ids.len()
        );
    }
    let targets: Vec<bool> = offsets
        .iter()
        .map(|&(s, _)| spans.iter().any(|&(a, b)| s >= a && s < b))
        .collect();
    // The first token is never a target: nothing predicts it.
    if targets.iter().skip(1).all(|&t| !t) {
        bail!("{o}: the assistant turns produce no tokens to train on");
    }
    Ok(TokenizedRow { ids, targets })
}
