//! The key/value pool of one engine. For every tensor-parallel shard and layer it holds keys and
//! values laid out `[slots, kv_heads_of_shard, capacity, head_dim]` (the layout attention reads
//! without a copy). A sequence owns one slot from admission to retirement: its prefill writes
//! straight into the slot, decode steps append to it, and nothing is ever moved between slots.
//! Slots are handed out lowest first ([`SlotAllocator`]), so the slots in use stay dense at the front.
//! Capacity (tokens per slot) grows on demand in steps of [`GROW_STEP`], so memory follows the
//! longest running sequence rather than the model's context length; growing is the only copy.

use tch::{Device, Kind, Tensor};

/// Where one shard's cache lives and how many key/value heads it holds.
#[derive(Debug, Clone, Copy)]
pub struct ShardLayout {
    pub device: Device,
    pub kv_heads: i64,
}

/// One layer of one shard: `[slots, kv_heads, capacity, head_dim]` each.
pub struct LayerKv {
    pub k: Tensor,
    pub v: Tensor,
}

pub struct KvCache {
    /// `shards[s][layer]`.
    shards: Vec<Vec<LayerKv>>,
    layouts: Vec<ShardLayout>,
    rows: i64,
    capacity: i64,
    head_dim: i64,
    kind: Kind,
}

/// Capacity grows in multiples of this many tokens.
pub const GROW_STEP: i64 = 128;

impl KvCache {
    pub fn new(
        layouts: &[ShardLayout],
        layers: usize,
        rows: i64,
        capacity: i64,
        head_dim: i64,
        kind: Kind,
    ) -> Self {
        let shards = layouts
            .iter()
            .map(|l| {
                (0..layers)
                    .map(|_| {
                        let shape = [rows, l.kv_heads, capacity, head_dim];
                        LayerKv {
                            k: Tensor::zeros(shape, (kind, l.device)),
                            v: Tensor::zeros(shape, (kind, l.device)),
                        }
                    })
                    .collect()
            })
            .collect();
        Self {
            shards,
            layouts: layouts.to_vec(),
            rows,
            capacity,
            head_dim,
            kind,
        }
    }

    /// Number of slots.
    pub fn rows(&self) -> i64 {
        self.rows
    }

    pub fn capacity(&self) -> i64 {
        self.capacity
    }

    pub fn layers(&self) -> usize {
        self.shards.first().map_or(0, Vec::len)
    }

    pub fn layer(&mut self, shard: usize, layer: usize) -> &mut LayerKv {
        &mut self.shards[shard][layer]
    }

    /// Makes room for at least `rows` slots of `len` tokens, keeping what is stored.
    pub fn ensure(&mut self, rows: i64, len: i64) {
        if rows <= self.rows && len <= self.capacity {
            return;
        }
        let new_rows = rows.max(self.rows);
        let new_cap = if len > self.capacity {
            (len + GROW_STEP - 1) / GROW_STEP * GROW_STEP
        } else {
            self.capacity
        };
        let (old_rows, old_cap) = (self.rows, self.capacity);
        for (shard, layout) in self.shards.iter_mut().zip(&self.layouts) {
            for kv in shard.iter_mut() {
                for t in [&mut kv.k, &mut kv.v] {
                    let shape = [new_rows, layout.kv_heads, new_cap, self.head_dim];
                    let grown = Tensor::zeros(shape, (self.kind, layout.device));
                    if old_rows > 0 && old_cap > 0 {
                        grown.narrow(0, 0, old_rows).narrow(2, 0, old_cap).copy_(t);
                    }
                    *t = grown;
                }
            }
        }
        self.rows = new_rows;
        self.capacity = new_cap;
    }

    /// Positions `[start, start + len)` of `slot`, per shard and layer: `[kv_heads, len, d]` views.
    pub fn span(
        &self,
        shard: usize,
        layer: usize,
        slot: i64,
        start: i64,
        len: i64,
    ) -> (Tensor, Tensor) {
        let kv = &self.shards[shard][layer];
        let view = |t: &Tensor| t.select(0, slot).narrow(1, start, len);
        (view(&kv.k), view(&kv.v))
    }

    pub fn layouts(&self) -> &[ShardLayout] {
        &self.layouts
    }

    /// Bytes held by the cache.
    pub fn bytes(&self) -> i64 {
        let per = self.kind.elt_size_in_bytes() as i64;
        self.layouts
            .iter()
            .map(|l| {
                2 * self.layers() as i64
                    * self.rows
                    * self.capacity
                    * l.kv_heads
                    * self.head_dim
                    * per
            })
            .sum()
    }
}

/// Hands out slot numbers, lowest free first.
#[derive(Debug, Default)]
pub struct SlotAllocator {
    used: Vec<bool>,
}

impl SlotAllocator {
    pub fn new(slots: usize) -> Self {
        Self {
            used: vec![false; slots],
        }
    }

    pub fn take(&mut self) -> Option<i64> {
        let i = self.used.iter().position(|u| !u)?;
        self.used[i] = true;
        Some(i as i64)
    }

    pub fn free(&mut self, slot: i64) {
        self.used[slot as usize] = false;
    }

    pub fn in_use(&self) -> usize {
        self.used.iter().filter(|u| **u).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grow_keeps_contents() {
        let layout = [ShardLayout {
            device: Device::Cpu,
            kv_heads: 2,
        }];
        let mut c = KvCache::new(&layout, 1, 2, 4, 3, Kind::Float);
        let marker = Tensor::ones([1, 2, 4, 3], (Kind::Float, Device::Cpu));
        c.layer(0, 0).k.narrow(0, 1, 1).copy_(&marker);
        c.ensure(5, 300);
        assert_eq!(c.capacity(), 384);
        assert_eq!(c.rows(), 5);
        let (k, _) = c.span(0, 0, 1, 0, 4);
        assert_eq!(k.sum(Kind::Float).double_value(&[]), 24.0);
        let k = &c.layer(0, 0).k;
        assert_eq!(k.narrow(2, 4, 380).sum(Kind::Float).double_value(&[]), 0.0);
    }

    #[test]
    fn slots_are_handed_out_lowest_first() {
        let mut a = SlotAllocator::new(3);
        assert_eq!(
            (a.take(), a.take(), a.take(), a.take()),
            (Some(0), Some(1), Some(2), None)
        );
        a.free(1);
        a.free(0);
        assert_eq!(a.take(), Some(0));
        assert_eq!(a.in_use(), 2);
    }
}
