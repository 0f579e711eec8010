//! CLIP tokenisation of prompts, with the `tokenizers` crate: `tokenizer/tokenizer.json` when the
//! export has one, otherwise the `vocab.json` + `merges.txt` pair Stable Diffusion repositories
//! ship, assembled into the same pipeline Hugging Face's CLIP fast tokenizer uses (NFC,
//! whitespace collapsed, lower case; CLIP's word pattern; byte-level BPE with `</w>` ends).

use std::path::{Path, PathBuf};
use tokenizers::{
    AddedToken, SplitDelimiterBehavior, Tokenizer,
    models::bpe::BPE,
    normalizers::{Lowercase, NFC, Replace, Sequence as Normalizers},
    pre_tokenizers::{byte_level::ByteLevel, sequence::Sequence as PreTokenizers, split::Split},
};

pub const BOS: &str = "<|startoftext|>";
pub const EOS: &str = "<|endoftext|>";
/// CLIP's context: the start token, 75 prompt tokens, the end token.
pub const CONTEXT: usize = 77;
const WORDS: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("tokenizing a prompt: {0}")]
    Encode(String),
}

/// A prompt as the text encoder takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    /// Exactly [`CONTEXT`] ids: start, prompt, end, padding.
    pub ids: Vec<u32>,
    /// Prompt tokens cut to fit (0 when it fit).
    pub truncated: usize,
}

pub struct PromptTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
}

impl PromptTokenizer {
    /// Loads `dir` (an export's `tokenizer/` folder).
    pub fn load(dir: &Path) -> Result<Self, TokenizerError> {
        let fail = |path: &Path, message: String| TokenizerError::Load { path: path.to_owned(), message };
        let json = dir.join("tokenizer.json");
        let inner = if json.exists() {
            Tokenizer::from_file(&json).map_err(|err| fail(&json, err.to_string()))?
        } else {
            clip_from_vocab(dir).map_err(|err| fail(dir, err.to_string()))?
        };
        let id = |token: &str| inner.token_to_id(token).ok_or_else(|| fail(dir, format!("no `{token}` token")));
        let (bos, eos) = (id(BOS)?, id(EOS)?);
        let pad = match pad_token(dir) {
            Some(token) => id(&token)?,
            None => eos,
        };
        Ok(Self { inner, bos, eos, pad })
    }

    /// Start, up to 75 prompt tokens, end, padding: what Stable Diffusion pipelines feed the text
    /// encoder.
    pub fn encode(&self, text: &str) -> Result<Tokens, TokenizerError> {
        let encoding = self.inner.encode(text, false).map_err(|err| TokenizerError::Encode(err.to_string()))?;
        let body = encoding.get_ids();
        let kept = &body[..body.len().min(CONTEXT - 2)];
        let mut ids = Vec::with_capacity(CONTEXT);
        ids.push(self.bos);
        ids.extend_from_slice(kept);
        ids.push(self.eos);
        ids.resize(CONTEXT, self.pad);
        Ok(Tokens { ids, truncated: body.len() - kept.len() })
    }
}

fn clip_from_vocab(dir: &Path) -> tokenizers::Result<Tokenizer> {
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let bpe = BPE::from_file(&path("vocab.json"), &path("merges.txt"))
        .end_of_word_suffix("</w>".into())
        .unk_token(EOS.into())
        .build()?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_normalizer(Some(Normalizers::new(vec![
        NFC.into(),
        Replace::new(tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()), " ")?.into(),
        Lowercase.into(),
    ])));
    tokenizer.with_pre_tokenizer(Some(PreTokenizers::new(vec![
        Split::new(
            tokenizers::pre_tokenizers::split::SplitPattern::Regex(WORDS.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )?
        .into(),
        ByteLevel::new(false, false, false).into(),
    ])));
    tokenizer.add_special_tokens(&[AddedToken::from(BOS, true), AddedToken::from(EOS, true)]);
    Ok(tokenizer)
}

/// `pad_token` from `special_tokens_map.json` (a string or `{"content": ...}`), if any.
fn pad_token(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("special_tokens_map.json")).ok()?;
    let map: serde_json::Value = serde_json::from_str(&text).ok()?;
    match &map["pad_token"] {
        serde_json::Value::String(token) => Some(token.clone()),
        serde_json::Value::Object(token) => token.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}
