//! Automatic prefix caching (vLLM's automatic prefix caching, SGLang's radix cache, by blocks).
//!
//! Keys and values of prompt prefixes are kept in blocks of [`BLOCK_TOKENS`] tokens in a pool of
//! their own, allocated once (`[blocks, kv_heads, BLOCK_TOKENS, head_dim]` per shard and layer).
//! A block is identified by its whole prefix: a hash chained from its parent block's hash, the
//! adapter (blocks are never shared across adapters, nor across versions of one adapter) and its
//! own tokens; the block also records its parent and tokens, so a hash collision can never serve
//! wrong keys. A new sequence copies the longest run of cached blocks that starts its prompt into
//! its KV slot and prefills only the rest; a sequence that finished its prompt (and again when it
//! retires, with its generated tokens) adds its full blocks. Blocks are reference-counted by the
//! blocks that extend them: only a block nothing extends can go, least recently used first, so a
//! cached chain is never cut in the middle. Sequences hold no references (they copy), so
//! eviction never waits for a request.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use tch::{Kind, Tensor};

use crate::kv_cache::{KvCache, ShardLayout};

/// Tokens per block.
pub const BLOCK_TOKENS: usize = 16;

struct Block {
    hash: u64,
    parent: Option<usize>,
    tokens: [u32; BLOCK_TOKENS],
    /// Cached blocks whose parent this is.
    children: u32,
    last_used: u64,
}

/// Counters for metrics: prompt tokens looked up and found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    pub queried_tokens: u64,
    pub hit_tokens: u64,
    pub blocks: usize,
    pub capacity_blocks: usize,
}

pub struct PrefixCache {
    /// `k[shard][layer]`, `v[shard][layer]`: `[blocks, kv_heads, BLOCK_TOKENS, head_dim]`.
    k: Vec<Vec<Tensor>>,
    v: Vec<Vec<Tensor>>,
    blocks: Vec<Option<Block>>,
    free: Vec<usize>,
    by_hash: HashMap<u64, usize>,
    clock: u64,
    stats: PrefixStats,
}

/// The identity of the weights a block was computed with: the base model alone, or an adapter
/// version (its path, mtime and size as hashed by the caller).
pub type AdapterTag = Option<u64>;

impl PrefixCache {
    /// A cache of `tokens` tokens (rounded down to whole blocks) shaped like `layouts`.
    pub fn new(
        layouts: &[ShardLayout],
        layers: usize,
        tokens: usize,
        head_dim: i64,
        kind: Kind,
    ) -> Self {
        let n = tokens / BLOCK_TOKENS;
        let alloc = |l: &ShardLayout| {
            (0..layers)
                .map(|_| {
                    Tensor::zeros(
                        [n as i64, l.kv_heads, BLOCK_TOKENS as i64, head_dim],
                        (kind, l.device),
                    )
                })
                .collect::<Vec<_>>()
        };
        Self {
            k: layouts.iter().map(alloc).collect(),
            v: layouts.iter().map(alloc).collect(),
            blocks: (0..n).map(|_| None).collect(),
            free: (0..n).rev().collect(),
            by_hash: HashMap::new(),
            clock: 0,
            stats: PrefixStats {
                capacity_blocks: n,
                ..PrefixStats::default()
            },
        }
    }

    pub fn stats(&self) -> PrefixStats {
        PrefixStats {
            blocks: self.by_hash.len(),
            ..self.stats
        }
    }

    fn chain(parent: u64, adapter: AdapterTag, tokens: &[u32]) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        parent.hash(&mut h);
        adapter.hash(&mut h);
        tokens.hash(&mut h);
        h.finish()
    }

    /// The cached blocks that start `tokens`, longest run first to last.
    fn matching(&self, adapter: AdapterTag, tokens: &[u32]) -> Vec<usize> {
        let mut found = Vec::new();
        let mut parent_hash = 0u64;
        let mut parent = None;
        for chunk in tokens.chunks_exact(BLOCK_TOKENS) {
            let hash = Self::chain(parent_hash, adapter, chunk);
            let Some(&id) = self.by_hash.get(&hash) else {
                break;
            };
            let b = self.blocks[id].as_ref().expect("mapped blocks exist");
            if b.parent != parent || b.tokens[..] != *chunk {
                break;
            }
            found.push(id);
            parent_hash = hash;
            parent = Some(id);
        }
        found
    }

    /// Copies the longest cached prefix of `prompt` (leaving at least its last token to be
    /// computed, whose logits start generation) into `slot` of `cache`. Returns the tokens copied.
    pub fn load_into(
        &mut self,
        adapter: AdapterTag,
        prompt: &[u32],
        cache: &mut KvCache,
        slot: i64,
    ) -> usize {
        let usable = prompt.len().saturating_sub(1);
        self.stats.queried_tokens += prompt.len() as u64;
        let ids = self.matching(adapter, &prompt[..usable]);
        if ids.is_empty() {
            return 0;
        }
        self.clock += 1;
        for &id in &ids {
            self.blocks[id].as_mut().expect("matched").last_used = self.clock;
        }
        let n = ids.len() as i64;
        let tokens = n * BLOCK_TOKENS as i64;
        cache.ensure(slot + 1, tokens);
        let layers = cache.layers();
        for (s, layout) in cache.layouts().to_vec().iter().enumerate() {
            let index = Tensor::from_slice(&ids.iter().map(|&i| i as i64).collect::<Vec<_>>())
                .to_device(layout.device);
            for layer in 0..layers {
                let (k_dst, v_dst) = cache.span(s, layer, slot, 0, tokens);
                for (src, mut dst) in [(&self.k[s][layer], k_dst), (&self.v[s][layer], v_dst)] {
                    // [n, kv_heads, B, d] → [kv_heads, n·B, d]
                    let blocks = src.index_select(0, &index).permute([1, 0, 2, 3]).reshape([
                        layout.kv_heads,
                        tokens,
                        -1,
                    ]);
                    dst.copy_(&blocks);
                }
            }
        }
        self.stats.hit_tokens += tokens as u64;
        tokens as usize
    }

    /// Adds the full blocks of `tokens` (whose keys/values are in `slot` of `cache`) that are not
    /// cached yet, evicting least recently used leaf blocks when the pool is full.
    pub fn insert_from(
        &mut self,
        adapter: AdapterTag,
        tokens: &[u32],
        cache: &mut KvCache,
        slot: i64,
    ) {
        if self.blocks.is_empty() {
            return;
        }
        self.clock += 1;
        let mut parent_hash = 0u64;
        let mut parent: Option<usize> = None;
        let mut new: Vec<(usize, usize)> = Vec::new(); // (block id, block number in the sequence)
        for (i, chunk) in tokens.chunks_exact(BLOCK_TOKENS).enumerate() {
            let hash = Self::chain(parent_hash, adapter, chunk);
            let existing = self.by_hash.get(&hash).copied().filter(|&id| {
                let b = self.blocks[id].as_ref().expect("mapped blocks exist");
                b.parent == parent && b.tokens[..] == *chunk
            });
            let id = match existing {
                Some(id) => id,
                None => {
                    if self.by_hash.contains_key(&hash) {
                        break; // a colliding hash: leave the rest uncached
                    }
                    let Some(id) = self.allocate(parent) else {
                        break;
                    };
                    let mut block_tokens = [0u32; BLOCK_TOKENS];
                    block_tokens.copy_from_slice(chunk);
                    self.blocks[id] = Some(Block {
                        hash,
                        parent,
                        tokens: block_tokens,
                        children: 0,
                        last_used: self.clock,
                    });
                    self.by_hash.insert(hash, id);
                    if let Some(p) = parent {
                        self.blocks[p].as_mut().expect("parent exists").children += 1;
                    }
                    new.push((id, i));
                    id
                }
            };
            self.blocks[id].as_mut().expect("block exists").last_used = self.clock;
            parent_hash = hash;
            parent = Some(id);
        }
        if new.is_empty() {
            return;
        }
        let layers = cache.layers();
        let b = BLOCK_TOKENS as i64;
        for (s, layout) in cache.layouts().to_vec().iter().enumerate() {
            let index =
                Tensor::from_slice(&new.iter().map(|&(id, _)| id as i64).collect::<Vec<_>>())
                    .to_device(layout.device);
            for layer in 0..layers {
                let parts = |t: &Tensor| {
                    let views: Vec<Tensor> = new
                        .iter()
                        .map(|&(_, i)| t.narrow(1, i as i64 * b, b))
                        .collect();
                    // [n, kv_heads, B, d]
                    Tensor::stack(&views, 0)
                };
                let (k_src, v_src) = cache.span(s, layer, slot, 0, tokens.len() as i64 / b * b);
                let _ = self.k[s][layer].index_copy_(0, &index, &parts(&k_src));
                let _ = self.v[s][layer].index_copy_(0, &index, &parts(&v_src));
            }
        }
    }

    /// A free block, evicting the least recently used block that nothing extends (never
    /// `protect`, the parent of the block being added).
    fn allocate(&mut self, protect: Option<usize>) -> Option<usize> {
        if let Some(id) = self.free.pop() {
            return Some(id);
        }
        let victim = self
            .blocks
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.as_ref().map(|b| (i, b)))
            .filter(|(i, b)| b.children == 0 && Some(*i) != protect)
            .min_by_key(|(_, b)| b.last_used)
            .map(|(i, _)| i)?;
        let b = self.blocks[victim].take().expect("victim exists");
        self.by_hash.remove(&b.hash);
        if let Some(p) = b.parent {
            self.blocks[p].as_mut().expect("parent exists").children -= 1;
        }
        Some(victim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn layouts() -> [ShardLayout; 1] {
        [ShardLayout {
            device: Device::Cpu,
            kv_heads: 2,
        }]
    }

    /// A cache whose slot `slot` holds value `100·slot + position` at every position.
    fn filled(slots: i64, len: i64) -> KvCache {
        let c = KvCache::new(&layouts(), 1, slots, len, 3, Kind::Float);
        for s in 0..slots {
            let vals = Tensor::arange(len, (Kind::Float, Device::Cpu)) + (100 * s) as f64;
            let (mut k, mut v) = c.span(0, 0, s, 0, len);
            k.copy_(&vals.view([1, len, 1]).expand([2, len, 3], false));
            v.copy_(&(vals.view([1, len, 1]).expand([2, len, 3], false) * -1.0));
        }
        c
    }

    #[test]
    fn a_cached_prefix_is_copied_and_adapters_never_share() {
        let mut cache = filled(2, 64);
        let mut pc = PrefixCache::new(&layouts(), 1, 64, 3, Kind::Float);
        let prompt: Vec<u32> = (0..40).collect();
        pc.insert_from(None, &prompt, &mut cache, 0);
        assert_eq!(pc.stats().blocks, 2);
        // Slot 1 gets slot 0's first 32 positions.
        let mut longer = prompt.clone();
        longer.extend([7, 7, 7]);
        assert_eq!(pc.load_into(None, &longer, &mut cache, 1), 32);
        let (k, v) = cache.span(0, 0, 1, 0, 33);
        let k: Vec<f32> = Vec::try_from(k.select(0, 0).select(1, 0)).unwrap();
        let expected: Vec<f32> = (0..32).map(|p| p as f32).chain([132.0]).collect();
        assert_eq!(k, expected);
        assert_eq!(v.select(0, 1).select(0, 5).double_value(&[0]), -5.0);
        // Another adapter, another prefix, or a prompt of exactly one block: nothing to reuse.
        assert_eq!(pc.load_into(Some(1), &longer, &mut cache, 1), 0);
        let other: Vec<u32> = (1..41).collect();
        assert_eq!(pc.load_into(None, &other, &mut cache, 1), 0);
        assert_eq!(pc.load_into(None, &prompt[..16], &mut cache, 1), 0);
        assert_eq!(pc.stats().hit_tokens, 32);
    }

    #[test]
    fn eviction_takes_least_recently_used_leaves_first() {
        let mut cache = filled(1, 64);
        let mut pc = PrefixCache::new(&layouts(), 1, 48, 3, Kind::Float);
        let a: Vec<u32> = (0..32).collect();
        pc.insert_from(None, &a, &mut cache, 0); // blocks a0 <- a1
        let b: Vec<u32> = (100..116).collect();
        pc.insert_from(None, &b, &mut cache, 0); // block b0; pool full
        let c: Vec<u32> = (200..216).collect();
        pc.insert_from(None, &c, &mut cache, 0); // evicts a1 (a0 has a child until then)
        let probe = |pc: &mut PrefixCache, t: &[u32]| {
            let mut t = t.to_vec();
            t.push(0);
            let mut scratch = filled(1, 64);
            pc.load_into(None, &t, &mut scratch, 0)
        };
        assert_eq!(probe(&mut pc, &a), 16, "a0 stays, a1 went");
        assert_eq!(probe(&mut pc, &b), 16);
        assert_eq!(probe(&mut pc, &c), 16);
    }
}
