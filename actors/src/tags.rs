//! Node tags (Ray's labels): `key=value` pairs a node carries (`--tag`, `resources.tags`), shown
//! in `/cluster`, and that work may require (`placement.tags` of a fine-tune job): a node
//! satisfies a requirement when it carries every required pair.

use std::collections::BTreeMap;

/// Tags, or required tags, by key.
pub type Tags = BTreeMap<String, String>;

/// Keys and values are plain tokens: 1 to 63 of `A-Z a-z 0-9 . _ -` (so that they print, log and
/// compare as they are).
pub fn check(tags: &Tags) -> Result<(), String> {
    if tags.len() > 32 {
        return Err(format!("at most 32 tags, got {}", tags.len()));
    }
    let plain = |s: &str| {
        (1..=63).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    };
    for (k, v) in tags {
        if !plain(k) || !plain(v) {
            return Err(format!(
                "`{k}={v}`: keys and values are 1 to 63 letters, digits, `.`, `_` or `-`"
            ));
        }
    }
    Ok(())
}

/// Whether a node carrying `node` satisfies `required`.
pub fn satisfies(node: &Tags, required: &Tags) -> bool {
    required.iter().all(|(k, v)| node.get(k) == Some(v))
}

/// `zone=b, gpu=h100`.
pub fn describe(tags: &Tags) -> String {
    tags.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parses `key=value` (the `--tag` flag).
pub fn parse_pair(text: &str) -> Result<(String, String), String> {
    let (k, v) = text
        .split_once('=')
        .ok_or_else(|| format!("`{text}` is not key=value"))?;
    let (k, v) = (k.trim().to_string(), v.trim().to_string());
    check(&Tags::from([(k.clone(), v.clone())]))?;
    Ok((k, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(pairs: &[(&str, &str)]) -> Tags {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_node_satisfies_what_it_carries() {
        let node = tags(&[("zone", "b"), ("gpu", "h100")]);
        assert!(satisfies(&node, &Tags::new()));
        assert!(satisfies(&node, &tags(&[("zone", "b")])));
        assert!(satisfies(&node, &node));
        assert!(!satisfies(&node, &tags(&[("zone", "a")])));
        assert!(!satisfies(&node, &tags(&[("disk", "ssd")])));
        assert_eq!(describe(&node), "gpu=h100, zone=b");
    }

    #[test]
    fn only_plain_tokens_are_tags() {
        assert_eq!(
            parse_pair("zone=eu-1").unwrap(),
            ("zone".into(), "eu-1".into())
        );
        for bad in ["zone", "=b", "zone=", "zo ne=b", "zone=<b>", "z=é"] {
            assert!(parse_pair(bad).is_err(), "{bad}");
        }
        assert!(check(&tags(&[("a", &"x".repeat(64))])).is_err());
    }
}
