//! Log-probabilities in OpenAI's two shapes: chat's `logprobs.content` and text completions'
//! columns.

use tessera_actors::messages::TokenOut;

use super::types::*;

/// What log-probabilities JSON cannot carry (`-inf`) is reported as this (as vLLM does).
pub const FLOOR_LOGPROB: f32 = -9999.0;

fn finite(logprob: f32) -> f32 {
    if logprob.is_finite() {
        logprob
    } else {
        FLOOR_LOGPROB
    }
}

/// `logprobs.content` of a chat completion for these tokens.
pub fn chat_logprobs(tokens: &[TokenOut]) -> ChatLogprobs {
    ChatLogprobs {
        content: tokens
            .iter()
            .map(|t| ChatTokenLogprob {
                token: t.token.clone(),
                logprob: finite(t.logprob),
                bytes: t.token.as_bytes().to_vec(),
                top_logprobs: t
                    .top_logprobs
                    .iter()
                    .map(|a| ChatTopLogprob {
                        token: a.token.clone(),
                        logprob: finite(a.logprob),
                        bytes: a.token.as_bytes().to_vec(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// `logprobs` of a text completion for these tokens; `offset` is the completion's length in
/// characters before them, and is advanced past them (so stream chunks continue the count).
pub fn completion_logprobs(tokens: &[TokenOut], offset: &mut usize) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    for t in tokens {
        out.tokens.push(t.token.clone());
        out.token_logprobs.push(finite(t.logprob));
        let mut top: Vec<(String, f32)> = Vec::with_capacity(t.top_logprobs.len());
        for a in &t.top_logprobs {
            if !top.iter().any(|(k, _)| *k == a.token) {
                top.push((a.token.clone(), finite(a.logprob)));
            }
        }
        out.top_logprobs.push(TopMap(top));
        out.text_offset.push(*offset);
        *offset += t.token.chars().count();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tessera_actors::messages::TopLogprob;

    fn token(tok: &str, text: &str, logprob: f32, top: &[(&str, f32)]) -> TokenOut {
        TokenOut {
            id: 1,
            token: tok.into(),
            text: text.into(),
            logprob,
            top_logprobs: top
                .iter()
                .enumerate()
                .map(|(i, (t, l))| TopLogprob {
                    id: i as u32,
                    token: t.to_string(),
                    logprob: *l,
                })
                .collect(),
        }
    }

    #[test]
    fn chat_logprobs_have_bytes_and_alternatives() {
        let lp = chat_logprobs(&[
            token("é", "é", -0.5, &[("é", -0.5), ("e", -1.5)]),
            token(" x", " x", f32::NEG_INFINITY, &[]),
        ]);
        let v = serde_json::to_value(&lp).unwrap();
        assert_eq!(v["content"][0]["token"], "é");
        assert_eq!(v["content"][0]["bytes"], json!([0xc3, 0xa9]));
        assert_eq!(v["content"][0]["top_logprobs"][1]["token"], "e");
        assert_eq!(v["content"][0]["top_logprobs"][1]["bytes"], json!([b'e']));
        assert_eq!(v["content"][0]["top_logprobs"].as_array().unwrap().len(), 2);
        assert_eq!(v["content"][1]["logprob"], json!(FLOOR_LOGPROB));
        assert_eq!(v["content"][1]["top_logprobs"], json!([]));
    }

    #[test]
    fn completion_logprobs_are_columns_with_offsets() {
        let mut offset = 0;
        let first = completion_logprobs(
            &[
                token(
                    "Hel",
                    "Hel",
                    -0.1,
                    &[("Hel", -0.1), ("He", -2.0), ("Hel", -3.0)],
                ),
                token("lo", "lo", -0.2, &[]),
            ],
            &mut offset,
        );
        assert_eq!(first.tokens, vec!["Hel", "lo"]);
        assert_eq!(first.token_logprobs, vec![-0.1, -0.2]);
        assert_eq!(first.text_offset, vec![0, 3]);
        // Duplicates keep the likelier; order is rank order.
        assert_eq!(
            serde_json::to_string(&first.top_logprobs[0]).unwrap(),
            r#"{"Hel":-0.1,"He":-2.0}"#
        );
        assert_eq!(offset, 5);
        // A stream chunk continues the count.
        let next = completion_logprobs(&[token(" wörld", " wörld", -0.3, &[])], &mut offset);
        assert_eq!(next.text_offset, vec![5]);
        assert_eq!(offset, 11);
    }
}
