//! One generation in flight: its tokens, sampler, streaming text with stop strings held back,
//! finish rules, and the channel its events go out on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedSender;

use crate::constraint::GrammarState;
use crate::lora::PlacedAdapter;
use crate::sampling::{Sampled, Sampler, SamplingParams};
use crate::tokenizer::{IncrementalDecoder, Tokenizer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The client cancelled (or went away).
    Cancelled,
}

/// What a sequence streams out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// A generated token and the text it completes (possibly empty while a multi-byte character
    /// or a possible stop string is held back).
    Token { sampled: Sampled, text: String },
    /// The end: the text still held back (if any), why it ended, and the counts.
    Finished {
        text: String,
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The sequence failed: what failed, and how.
    Error { message: String, kind: FailKind },
}

/// What made a sequence fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailKind {
    /// Its adapter could not be loaded.
    Adapter,
    /// Its grammar (structured outputs) could not go on.
    Grammar,
    /// The step it was part of failed inside the model.
    Engine,
}

pub(crate) struct Sequence {
    pub id: u64,
    pub prompt: Vec<u32>,
    pub generated: Vec<u32>,
    pub sampler: Sampler,
    pub adapter: Option<Arc<PlacedAdapter>>,
    /// Tokens whose keys/values are in the cache.
    pub cached: i64,
    pub cancel: Arc<AtomicBool>,
    pub events: UnboundedSender<Event>,
    decoder: IncrementalDecoder,
    /// Decoded text not yet sent (it might be the start of a stop string).
    pending: String,
    /// Ids that end generation (`min_tokens` bans them until it is reached).
    pub stop_ids: Vec<u32>,
    /// The grammar the output follows (structured outputs); out while a step computes its mask.
    pub grammar: Option<GrammarState>,
    /// The first `resumed` tokens of `generated` were given (a generation resumed on this engine
    /// after the replica serving it was lost), not sampled here: they are prefilled with the
    /// prompt.
    pub resumed: usize,
    /// Events are not sent (while the given tokens are replayed).
    silent: bool,
}

/// The outcome of adding one token.
pub(crate) enum Progress {
    Continue,
    Finished(FinishReason),
    /// The token broke the sequence's grammar (it cannot go on).
    Failed(String),
}

impl Sequence {
    pub fn new(
        id: u64,
        prompt: Vec<u32>,
        params: SamplingParams,
        tokenizer: &Tokenizer,
        cancel: Arc<AtomicBool>,
        events: UnboundedSender<Event>,
    ) -> Self {
        let mut stop_ids = params.stop_token_ids.clone();
        if !params.ignore_eos {
            stop_ids.extend_from_slice(tokenizer.stop_token_ids());
        }
        let decoder = IncrementalDecoder::new(&prompt, false);
        Self {
            id,
            prompt,
            generated: Vec::new(),
            sampler: Sampler::new(params),
            adapter: None,
            cached: 0,
            cancel,
            events,
            decoder,
            pending: String::new(),
            stop_ids,
            grammar: None,
            resumed: 0,
            silent: false,
        }
    }

    /// Continues a generation begun elsewhere: `tokens` were generated and streamed there. They
    /// are taken as this sequence's first output without a word sent (the decoder, the text held
    /// back for stop strings, the grammar and the counts end where the lost sequence's were, so
    /// stop strings are found across the seam), the seeded generator skips the draws they took,
    /// and they are prefilled after the prompt. `Some` when they already end the generation
    /// (the lost replica's last event was lost with it): the reason; `Err` when they cannot be this
    /// request's output.
    pub fn resume(
        &mut self,
        tokens: &[u32],
        tokenizer: &Tokenizer,
    ) -> Result<Option<FinishReason>, String> {
        self.silent = true;
        let mut end = Ok(None);
        for (i, &token) in tokens.iter().enumerate() {
            let sampled = Sampled {
                token,
                logprob: 0.0,
                top_logprobs: Vec::new(),
            };
            match self.accept(sampled, tokenizer) {
                Progress::Continue => {}
                Progress::Finished(reason) if i + 1 == tokens.len() => end = Ok(Some(reason)),
                Progress::Finished(_) => {
                    end = Err(format!("the generation ends at the {}th of them", i + 1));
                    break;
                }
                Progress::Failed(why) => {
                    end = Err(why);
                    break;
                }
            }
        }
        self.silent = false;
        self.resumed = self.generated.len();
        self.sampler.skip_draws(self.resumed);
        end
    }

    /// Tokens prefilled before the first token is sampled: the prompt, and the resumed tokens.
    pub fn prefill_len(&self) -> usize {
        self.prompt.len() + self.resumed
    }

    /// The `i`th token of the prefill.
    pub fn prefill_token(&self, i: usize) -> u32 {
        match i.checked_sub(self.prompt.len()) {
            None => self.prompt[i],
            Some(j) => self.generated[j],
        }
    }

    /// Every token of the prefill, in order (the prompt itself unless resumed).
    pub fn prefill_tokens(&self) -> std::borrow::Cow<'_, [u32]> {
        if self.resumed == 0 {
            return std::borrow::Cow::Borrowed(&self.prompt);
        }
        let mut all = self.prompt.clone();
        all.extend_from_slice(&self.generated[..self.resumed]);
        std::borrow::Cow::Owned(all)
    }

    fn emit(&self, event: Event) {
        if !self.silent {
            let _ = self.events.send(event);
        }
    }

    pub fn params(&self) -> &SamplingParams {
        self.sampler.params()
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.events.is_closed()
    }

    /// Tokens of KV cache this sequence may come to need.
    pub fn reserved_tokens(&self) -> i64 {
        // Submission checked that this sum fits the context, so it cannot overflow here.
        self.prompt.len().saturating_add(self.params().max_tokens) as i64
    }

    /// The token to feed next: the last generated one (after prefill there always is one).
    pub fn last_token(&self) -> u32 {
        *self
            .generated
            .last()
            .expect("a sequence decodes after its first token")
    }

    /// The tokens a repetition penalty looks at (prompt and generated), or none without one.
    pub fn penalty_history(&self) -> Vec<u32> {
        if self.params().repetition_penalty == 1.0 {
            return Vec::new();
        }
        let mut history = Vec::with_capacity(self.prompt.len() + self.generated.len());
        history.extend_from_slice(&self.prompt);
        history.extend_from_slice(&self.generated);
        history
    }

    /// Every token whose key/value is in the cache, in order (prompt, then generated).
    pub fn cached_tokens(&self) -> Vec<u32> {
        self.prompt
            .iter()
            .chain(&self.generated)
            .take(self.cached as usize)
            .copied()
            .collect()
    }

    /// Takes the sampled token, streams the result and says whether the sequence is done.
    pub fn accept(&mut self, sampled: Sampled, tokenizer: &Tokenizer) -> Progress {
        let token = sampled.token;
        self.generated.push(token);
        if self.stop_ids.contains(&token) {
            self.emit(Event::Token {
                sampled,
                text: String::new(),
            });
            return Progress::Finished(FinishReason::Stop);
        }
        if let Some(grammar) = &mut self.grammar {
            if let Err(e) = grammar.advance(token) {
                return Progress::Failed(format!("structured output: {e}"));
            }
        }
        let piece = self.decoder.push(tokenizer, token).unwrap_or_default();
        self.pending.push_str(&piece);
        // Stop strings count from `min_tokens` on (vLLM's rule).
        let stops: &[String] = if self.generated.len() < self.params().min_tokens {
            &[]
        } else {
            &self.sampler.params().stop
        };
        if let Some(at) = stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            self.pending.truncate(at);
            let text = std::mem::take(&mut self.pending);
            self.emit(Event::Token { sampled, text });
            return Progress::Finished(FinishReason::Stop);
        }
        // Keep back the longest suffix that could still grow into a stop string.
        let keep = stops
            .iter()
            .map(|s| longest_prefix_suffix(&self.pending, s))
            .max()
            .unwrap_or(0);
        let text = self.pending[..self.pending.len() - keep].to_string();
        self.pending.drain(..self.pending.len() - keep);
        self.emit(Event::Token { sampled, text });
        if self.generated.len() >= self.params().max_tokens {
            Progress::Finished(FinishReason::Length)
        } else if self.grammar.as_ref().is_some_and(GrammarState::is_done) {
            // The grammar is complete and admits nothing more: the output is whole.
            let rest = self.decoder.finish(tokenizer).unwrap_or_default();
            self.pending.push_str(&rest);
            Progress::Finished(FinishReason::Stop)
        } else {
            Progress::Continue
        }
    }

    /// Sends the final event with whatever text is still held back.
    pub fn finish(&mut self, reason: FinishReason, tokenizer: &Tokenizer) {
        let mut text = std::mem::take(&mut self.pending);
        if reason == FinishReason::Length {
            text.push_str(&self.decoder.finish(tokenizer).unwrap_or_default());
        }
        let _ = self.events.send(Event::Finished {
            text,
            reason,
            prompt_tokens: self.prompt.len(),
            completion_tokens: self.generated.len(),
        });
    }

    pub fn fail(&self, kind: FailKind, message: String) {
        let _ = self.events.send(Event::Error { message, kind });
    }
}

/// Length in bytes of the longest suffix of `text` that is a proper prefix of `stop`.
fn longest_prefix_suffix(text: &str, stop: &str) -> usize {
    let max = stop.len().saturating_sub(1).min(text.len());
    (1..=max)
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && stop.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::longest_prefix_suffix;

    #[test]
    fn holds_back_only_what_could_become_a_stop_string() {
        assert_eq!(longest_prefix_suffix("hello wor", "world"), 3);
        assert_eq!(longest_prefix_suffix("hello", "world"), 0);
        assert_eq!(longest_prefix_suffix("ab", "abc"), 2);
        assert_eq!(
            longest_prefix_suffix("abc", "abc"),
            0,
            "a full match is found, not held"
        );
        assert_eq!(longest_prefix_suffix("é", "éa"), "é".len());
    }
}
