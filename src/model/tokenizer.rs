//! Text ↔ token ids: an HF `tokenizer.json`, or a byte-level BPE built from GGUF metadata.
//!
//! Candle's own GGUF tokenizer falls back to GPT-2's pre-tokenizer with a prefix space for unknown
//! `tokenizer.ggml.pre` values (SmolLM2's "smollm"), which breaks round trips; so the pre-tokenizer is chosen
//! here from the `pre` value, as llama.cpp does.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// Llama 3's pre-tokenizer regex (llama.cpp's "llama-bpe").
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub struct TextTokenizer {
    inner: Tokenizer,
}

/// `start..end` in bytes of the text a token came from.
pub type ByteRange = (usize, usize);

impl TextTokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;
        Ok(Self { inner })
    }

    /// Builds the tokenizer from `tokenizer.ggml.*` metadata.
    pub fn from_gguf(content: &gguf_file::Content, path: &Path) -> Result<Self> {
        let md = &content.metadata;
        let field = |k: &str| {
            md.get(k)
                .with_context(|| format!("{}: missing field `{k}`", path.display()))
        };
        let model = field("tokenizer.ggml.model")?.to_string()?.clone();
        if model != "gpt2" {
            bail!(
                "{}: field `tokenizer.ggml.model` is {model:?}; only byte-level BPE (\"gpt2\") tokenizers are built \
                 from GGUF. Put a tokenizer.json beside the model or use an HF directory.",
                path.display()
            );
        }
        let strings = |k: &str| -> Result<Vec<String>> {
            field(k)?
                .to_vec()
                .with_context(|| format!("{}: field `{k}` is not an array", path.display()))?
                .iter()
                .map(|v| {
                    v.to_string().cloned().with_context(|| {
                        format!("{}: field `{k}` holds a non-string", path.display())
                    })
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()?
                .iter()
                .map(|t| {
                    t.to_i32().map_err(|e| {
                        anyhow!("{}: field `tokenizer.ggml.token_type`: {e}", path.display())
                    })
                })
                .collect::<Result<_>>()?,
            None => vec![1; tokens.len()],
        };
        let pre = md
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| "default".into());

        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges: Vec<(String, String)> = merges
            .iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .with_context(|| {
                        format!("{}: merge {i} ({m:?}) is not two tokens", path.display())
                    })
            })
            .collect::<Result<_>>()?;
        let llama3 = matches!(pre.as_str(), "llama-bpe" | "llama3" | "smaug-bpe");
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(llama3)
            .build()
            .map_err(|e| anyhow!("{}: cannot build BPE: {e}", path.display()))?;
        let mut inner = Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, !llama3);
        let pre_tokenizer = match pre.as_str() {
            "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]),
            _ if llama3 => {
                let split = Split::new(SplitPattern::Regex(LLAMA3_SPLIT.into()), SplitDelimiterBehavior::Isolated, false)
                    .map_err(|e| anyhow!("llama3 split regex: {e}"))?;
                Sequence::new(vec![split.into(), byte_level.into()])
            }
            "default" | "gpt2" => Sequence::new(vec![byte_level.into()]),
            other => bail!(
                "{}: field `tokenizer.ggml.pre` is {other:?}, a pre-tokenizer introspect does not know; \
                 put the model's tokenizer.json beside it",
                path.display()
            ),
        };
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevel::default()));
        // Control (3) and user-defined (4) tokens are matched whole in text, as HF's added tokens are.
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(types.iter().chain(std::iter::repeat(&1)))
            .filter(|(_, &t)| t == 3 || t == 4)
            .map(|(tok, &t)| AddedToken::from(tok.clone(), t == 3))
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(|e| anyhow!("{}: cannot add special tokens: {e}", path.display()))?;
        Ok(Self { inner })
    }

    /// Token ids of `text`; special tokens written in the text become their ids, nothing is added around it
    /// (chat templates write BOS themselves, as transformers' `apply_chat_template` expects).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("cannot tokenize: {e}"))?
            .get_ids()
            .to_vec())
    }

    /// Token ids of `text` with each token's byte range in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<ByteRange>)> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("cannot tokenize: {e}"))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| anyhow!("cannot decode: {e}"))
    }

    /// The vocabulary entry of `id` (byte-level form, e.g. "Ġcow").
    /// Token ids of `text` with the special tokens the tokenizer's own post-processor adds (BOS for
    /// Llama-3's tokenizer.json), as transformers' `add_special_tokens=True` and vLLM's raw completions do.
    pub fn encode_with_specials(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, true)
            .map_err(|e| anyhow!("cannot tokenize: {e}"))?
            .get_ids()
            .to_vec())
    }

    pub fn token(&self, id: u32) -> String {
        self.inner.id_to_token(id).unwrap_or_default()
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner
            .save(path, false)
            .map_err(|e| anyhow!("{}: cannot write tokenizer: {e}", path.display()))
    }
}
