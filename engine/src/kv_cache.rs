//! Key/value caches. A [`KvCache`] holds, for every tensor-parallel shard and layer, keys and
//! values laid out `[rows, capacity, kv_heads_of_shard, head_dim]`. Row `i` belongs to one
//! sequence; a batch always uses rows `0..batch`, so the scheduler keeps running sequences packed
//! at the front ([`KvCache::move_row`]). Capacity grows on demand, so memory follows the longest
//! running sequence rather than the model's context length.

use tch::{Device, Kind, Tensor};

/// Where one shard's cache lives and how many key/value heads it holds.
#[derive(Debug, Clone, Copy)]
pub struct ShardLayout {
    pub device: Device,
    pub kv_heads: i64,
}

/// One layer of one shard.
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

const GROW_STEP: i64 = 128;

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
                        let shape = [rows, capacity, l.kv_heads, head_dim];
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

    pub fn rows(&self) -> i64 {
        self.rows
    }

    pub fn capacity(&self) -> i64 {
        self.capacity
    }

    pub fn layer(&mut self, shard: usize, layer: usize) -> &mut LayerKv {
        &mut self.shards[shard][layer]
    }

    /// Makes room for at least `rows` rows of `len` tokens, keeping what is stored.
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
                    let shape = [new_rows, new_cap, layout.kv_heads, self.head_dim];
                    let grown = Tensor::zeros(shape, (self.kind, layout.device));
                    grown.narrow(0, 0, old_rows).narrow(1, 0, old_cap).copy_(t);
                    *t = grown;
                }
            }
        }
        self.rows = new_rows;
        self.capacity = new_cap;
    }

    /// Copies the first `len` positions of row `from` to row `to` (used to keep rows packed).
    pub fn move_row(&mut self, from: i64, to: i64, len: i64) {
        if from == to || len == 0 {
            return;
        }
        for shard in &mut self.shards {
            for kv in shard.iter_mut() {
                for t in [&kv.k, &kv.v] {
                    let src = t.narrow(0, from, 1).narrow(1, 0, len).copy();
                    t.narrow(0, to, 1).narrow(1, 0, len).copy_(&src);
                }
            }
        }
    }

    /// Copies the first `len` positions of row 0 of `src` (a prefill cache) into row `to`.
    pub fn copy_row_from(&mut self, src: &KvCache, to: i64, len: i64) {
        self.ensure(to + 1, len);
        for (dst_shard, src_shard) in self.shards.iter_mut().zip(&src.shards) {
            for (d, s) in dst_shard.iter_mut().zip(src_shard) {
                d.k.narrow(0, to, 1)
                    .narrow(1, 0, len)
                    .copy_(&s.k.narrow(0, 0, 1).narrow(1, 0, len));
                d.v.narrow(0, to, 1)
                    .narrow(1, 0, len)
                    .copy_(&s.v.narrow(0, 0, 1).narrow(1, 0, len));
            }
        }
    }

    /// Bytes held by the cache.
    pub fn bytes(&self) -> i64 {
        let per = self.kind.elt_size_in_bytes() as i64;
        self.layouts
            .iter()
            .map(|l| {
                2 * self.shards[0].len() as i64
                    * self.rows
                    * self.capacity
                    * l.kv_heads
                    * self.head_dim
                    * per
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grow_keeps_contents_and_move_row_copies_prefix() {
        let layout = [ShardLayout {
            device: Device::Cpu,
            kv_heads: 2,
        }];
        let mut c = KvCache::new(&layout, 1, 2, 4, 3, Kind::Float);
        let marker = Tensor::ones([1, 4, 2, 3], (Kind::Float, Device::Cpu));
        c.layer(0, 0).k.narrow(0, 1, 1).copy_(&marker);
        c.ensure(5, 300);
        assert_eq!(c.capacity(), 384);
        assert_eq!(c.rows(), 5);
        let k = &c.layer(0, 0).k;
        assert_eq!(
            k.narrow(0, 1, 1)
                .narrow(1, 0, 4)
                .sum(Kind::Float)
                .double_value(&[]),
            24.0
        );
        assert_eq!(k.narrow(1, 4, 380).sum(Kind::Float).double_value(&[]), 0.0);
        c.move_row(1, 3, 4);
        let k = &c.layer(0, 0).k;
        assert_eq!(k.narrow(0, 3, 1).sum(Kind::Float).double_value(&[]), 24.0);
    }
}
