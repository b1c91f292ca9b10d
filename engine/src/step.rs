//! One iteration's packed input: every token the step computes, from every sequence, in one flat
//! list, so each weight matrix is read once per step whatever the mix of decode rows and prompt
//! chunks (vLLM V1's "one forward per iteration"). A [`Segment`] is one sequence's run of tokens
//! with the KV slot it reads and writes and the position it starts at. Decode segments (one token
//! each) come first, in ascending slot order, and are attended as one batch; prompt chunks follow,
//! each attended on its own. The index tensors every layer reads are built once per step from this
//! by the model (`model::StepTables`).

/// One sequence's tokens in a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// KV slot of the sequence.
    pub slot: i64,
    /// Tokens already in the slot (the position of the first token of this segment).
    pub start: i64,
    /// Tokens in this step.
    pub len: i64,
}

/// Which rows of the step get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitRows {
    /// The last token of every segment: `[segments, vocab]`.
    Last,
    /// Every token: `[tokens, vocab]`.
    All,
}

/// The packed input of one forward.
#[derive(Debug, Clone)]
pub struct StepBatch {
    /// Token ids, segment after segment.
    pub tokens: Vec<i64>,
    pub segments: Vec<Segment>,
    /// How many leading segments are single-token decode rows (batched attention).
    pub decode: usize,
    pub logits: LogitRows,
}

impl StepBatch {
    /// A step over `segments` (decode rows first, then chunks) with their tokens in the same order.
    pub fn new(tokens: Vec<i64>, segments: Vec<Segment>, logits: LogitRows) -> Self {
        let decode = segments.iter().take_while(|s| s.len == 1).count();
        debug_assert_eq!(
            tokens.len() as i64,
            segments.iter().map(|s| s.len).sum::<i64>(),
            "one token per segment position"
        );
        Self {
            tokens,
            segments,
            decode,
            logits,
        }
    }

    pub fn num_tokens(&self) -> i64 {
        self.tokens.len() as i64
    }

    /// The position of every token.
    pub fn positions(&self) -> Vec<i64> {
        self.segments
            .iter()
            .flat_map(|s| s.start..s.start + s.len)
            .collect()
    }

    /// The slot of every token.
    pub fn token_slots(&self) -> Vec<i64> {
        self.segments
            .iter()
            .flat_map(|s| std::iter::repeat_n(s.slot, s.len as usize))
            .collect()
    }

    /// Indices (into the token list) of the rows that get logits.
    pub fn logit_rows(&self) -> Vec<i64> {
        match self.logits {
            LogitRows::All => (0..self.num_tokens()).collect(),
            LogitRows::Last => {
                let mut end = 0;
                self.segments
                    .iter()
                    .map(|s| {
                        end += s.len;
                        end - 1
                    })
                    .collect()
            }
        }
    }

    /// Tokens each segment holds after this step.
    pub fn max_keys(&self) -> i64 {
        self.segments
            .iter()
            .map(|s| s.start + s.len)
            .max()
            .unwrap_or(0)
    }

    /// The number of slots the pool needs (highest slot + 1).
    pub fn slots_needed(&self) -> i64 {
        self.segments.iter().map(|s| s.slot + 1).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_decode_rows_then_chunks() {
        let segs = vec![
            Segment {
                slot: 0,
                start: 5,
                len: 1,
            },
            Segment {
                slot: 2,
                start: 9,
                len: 1,
            },
            Segment {
                slot: 1,
                start: 0,
                len: 3,
            },
        ];
        let b = StepBatch::new(vec![7, 8, 1, 2, 3], segs, LogitRows::Last);
        assert_eq!(b.decode, 2);
        assert_eq!(b.positions(), vec![5, 9, 0, 1, 2]);
        assert_eq!(b.token_slots(), vec![0, 2, 1, 1, 1]);
        assert_eq!(b.logit_rows(), vec![0, 1, 4]);
        assert_eq!(b.max_keys(), 10);
        assert_eq!(b.slots_needed(), 3);
    }
}
