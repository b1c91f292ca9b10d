//! Multi-adapter LoRA for a batch, unmerged (Punica / S-LoRA style, as masked GEMMs).
//!
//! * [`LoraBank`] holds a set of placed adapters stacked once per (layer, projection, shard): the A
//!   of every adapter that targets the projection side by side along the rank (`[R, in]`), their
//!   B × scale likewise (`[out, R]`), each adapter at a fixed column offset. The engine keeps one
//!   bank across steps and rebuilds it only when a step needs an adapter it lacks.
//! * [`LoraBatch`] is one step's view of a bank: per row (token) which adapter it uses, as a
//!   `[rows, R]` mask per distinct column layout, built once per step and shared by every layer.
//!   Each LoRA projection is then two GEMMs for the whole step, `((x·Aᵀ) ⊙ mask)·Bᵀ`, whatever mix
//!   of adapters (and rows with none) it holds; projections no row's adapter targets are skipped.
//!   An inference batch also keeps each row's rank columns as index ranges, for the fused decode
//!   step, which applies LoRA row by row on flat buffers (`model/fused_decode.rs`).

use std::collections::HashMap;
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use crate::lora::{hashed_dropout, AdapterKey, PlacedAdapter, Proj};

/// The LoRA computation of one projection for a whole batch.
pub struct LoraSlice {
    /// `[R, in]`: the A of every adapter in the bank that targets this projection, stacked.
    a: Tensor,
    /// `[out, R]`: their B × scale, side by side.
    b: Tensor,
    /// `[rows, R]`: 1 where the rank column belongs to the row's adapter; `None` when every row
    /// uses the single adapter present.
    mask: Option<Tensor>,
    /// Dropout on the LoRA input and its seed (training only).
    dropout: Option<(f64, u64)>,
    /// What `mask` says, as each row's rank columns (inference batches only).
    columns: Option<RowColumns>,
}

/// Per row of a step, the rank columns `(offset, rank)` of its adapter in a stacked slice, or
/// `None` where the row's adapter does not target the projection (or the row has none).
pub type RowColumns = Arc<[Option<(usize, usize)>]>;

impl LoraSlice {
    /// `scale · (x·Aᵀ)·Bᵀ` per row, for `x` of shape `[rows, in]` (or `[rows, t, in]`).
    pub fn apply(&self, x: &Tensor) -> Tensor {
        // Training keeps LoRA in float32 under a bf16/f16 base: compute in A's type.
        let input = if x.kind() == self.a.kind() {
            x.shallow_clone()
        } else {
            x.to_kind(self.a.kind())
        };
        let input = match self.dropout {
            Some((p, seed)) if p > 0.0 => hashed_dropout(&input, p, seed),
            _ => input,
        };
        let xa = input.linear::<Tensor>(&self.a, None);
        let xa = match &self.mask {
            Some(m) if xa.dim() == 3 => xa * m.unsqueeze(1),
            Some(m) => xa * m,
            None => xa,
        };
        let out = xa.linear::<Tensor>(&self.b, None);
        if out.kind() == x.kind() {
            out
        } else {
            out.to_kind(x.kind())
        }
    }

    /// A, B × scale and each row's rank columns, for computing an inference batch row by row
    /// (`None` for a training batch).
    pub fn by_rows(&self) -> Option<RowWise<'_>> {
        match (&self.columns, self.dropout) {
            (Some(columns), None) => Some(RowWise {
                a: &self.a,
                b: &self.b,
                columns,
            }),
            _ => None,
        }
    }
}

/// One projection's LoRA of an inference batch, row by row.
pub struct RowWise<'a> {
    /// `[R, in]`, contiguous.
    pub a: &'a Tensor,
    /// `[out, R]` (B × scale), contiguous.
    pub b: &'a Tensor,
    /// Each row's rank columns.
    pub columns: &'a [Option<(usize, usize)>],
}

/// The column layout of one stacked slice: `(adapter index in the bank, rank)` in order.
type Layout = Vec<(usize, i64)>;

struct BankSlice {
    a: Tensor,
    b: Tensor,
    layout: Arc<Layout>,
}

/// Adapters stacked per (layer, projection, shard), each at a fixed column offset.
pub struct LoraBank {
    adapters: Vec<Arc<PlacedAdapter>>,
    shards: usize,
    /// Indexed by `(layer * 7 + proj) * shards + shard`.
    slices: Vec<Option<BankSlice>>,
    /// Whether every A and B is a contiguous float32 CPU tensor of one shard (what computing
    /// row by row reads), checked once here rather than at every step.
    host_f32: bool,
}

impl LoraBank {
    pub fn new(adapters: Vec<Arc<PlacedAdapter>>, layers: usize, shards: usize) -> Self {
        let mut layouts: HashMap<Layout, Arc<Layout>> = HashMap::new();
        let mut slices = Vec::with_capacity(layers * 7 * shards);
        for layer in 0..layers {
            for proj in Proj::ALL {
                for s in 0..shards {
                    let present: Vec<(usize, &(Tensor, Tensor))> = adapters
                        .iter()
                        .enumerate()
                        .filter_map(|(i, a)| {
                            a.layers
                                .get(layer)
                                .and_then(|l| l[proj.index()].as_ref())
                                .map(|v| (i, &v[s]))
                        })
                        .collect();
                    if present.is_empty() {
                        slices.push(None);
                        continue;
                    }
                    let layout: Layout = present.iter().map(|(i, p)| (*i, p.0.size()[0])).collect();
                    let layout = layouts
                        .entry(layout.clone())
                        .or_insert_with(|| Arc::new(layout))
                        .clone();
                    let (a, b) = if present.len() == 1 {
                        (
                            present[0].1 .0.shallow_clone(),
                            present[0].1 .1.shallow_clone(),
                        )
                    } else {
                        (
                            Tensor::cat(&present.iter().map(|(_, p)| &p.0).collect::<Vec<_>>(), 0),
                            Tensor::cat(&present.iter().map(|(_, p)| &p.1).collect::<Vec<_>>(), 1),
                        )
                    };
                    slices.push(Some(BankSlice { a, b, layout }));
                }
            }
        }
        let host_f32 = shards == 1
            && slices.iter().flatten().all(|s| {
                [&s.a, &s.b].iter().all(|t| {
                    t.device() == Device::Cpu && t.kind() == Kind::Float && t.is_contiguous()
                })
            });
        Self {
            adapters,
            shards,
            slices,
            host_f32,
        }
    }

    pub fn adapters(&self) -> &[Arc<PlacedAdapter>] {
        &self.adapters
    }

    /// The bank index of the adapter `key`.
    pub fn index_of(&self, key: &AdapterKey) -> Option<usize> {
        self.adapters.iter().position(|a| &a.key == key)
    }

    /// Total rank of the bank (the width of its widest stacked slice).
    pub fn total_rank(&self) -> i64 {
        self.adapters.iter().map(|a| a.rank).sum()
    }

    /// One step's view: `rows[i]` is the bank index of row `i`'s adapter, or `None`. Returns
    /// `None` when no row uses an adapter.
    pub fn batch(
        &self,
        rows: &[Option<usize>],
        devices: &[Device],
        kind: Kind,
    ) -> Option<LoraBatch> {
        let first = rows.iter().find_map(|r| *r)?;
        let uniform = rows.iter().all(|r| *r == Some(first));
        let mut masks: HashMap<(*const Layout, usize), Tensor> = HashMap::new();
        let mut columns: HashMap<*const Layout, RowColumns> = HashMap::new();
        let slices = self
            .slices
            .iter()
            .enumerate()
            .map(|(i, slice)| {
                let slice = slice.as_ref()?;
                let s = i % self.shards;
                if !slice.layout.iter().any(|(a, _)| rows.contains(&Some(*a))) {
                    return None;
                }
                let layout = Arc::as_ptr(&slice.layout);
                let cols = columns
                    .entry(layout)
                    .or_insert_with(|| row_columns(&slice.layout, rows))
                    .clone();
                let mask = if uniform && slice.layout.len() == 1 {
                    None
                } else {
                    let total = slice.a.size()[0] as usize;
                    Some(
                        masks
                            .entry((layout, s))
                            .or_insert_with(|| row_mask(&cols, total, devices[s], kind))
                            .shallow_clone(),
                    )
                };
                Some(LoraSlice {
                    a: slice.a.shallow_clone(),
                    b: slice.b.shallow_clone(),
                    mask,
                    dropout: None,
                    columns: Some(cols),
                })
            })
            .collect();
        Some(LoraBatch {
            shards: self.shards,
            slices,
            host_f32: self.host_f32,
        })
    }
}

/// The LoRA view of one batch: which adapter each row uses, laid out per projection.
pub struct LoraBatch {
    shards: usize,
    /// Indexed by `(layer * 7 + proj) * shards + shard`.
    slices: Vec<Option<LoraSlice>>,
    /// Its bank's [`LoraBank`] `host_f32` (false for a training batch).
    host_f32: bool,
}

impl LoraBatch {
    /// `rows[i]` is the index in `adapters` of row `i`'s adapter, or `None` for the base model.
    /// Returns `None` when no row uses an adapter. (Stacks the adapters anew: a caller that runs
    /// many steps keeps a [`LoraBank`] instead.)
    pub fn new(
        adapters: &[Arc<PlacedAdapter>],
        rows: &[Option<usize>],
        layers: usize,
        devices: &[Device],
        kind: Kind,
    ) -> Option<Self> {
        LoraBank::new(adapters.to_vec(), layers, devices.len()).batch(rows, devices, kind)
    }

    /// A single-device batch where every row uses the same (trainable) adapter:
    /// `weights[layer][proj]` = (A `[r, in]`, B `[out, r]` already multiplied by the scale).
    /// Dropout masks derive from `seed` and the slice, so a recomputed forward repeats them.
    pub fn for_training(
        weights: &[[Option<(Tensor, Tensor)>; 7]],
        dropout: f64,
        seed: u64,
    ) -> Self {
        let slices = weights
            .iter()
            .flat_map(|layer| layer.iter())
            .enumerate()
            .map(|(i, w)| {
                w.as_ref().map(|(a, b)| LoraSlice {
                    a: a.shallow_clone(),
                    b: b.shallow_clone(),
                    mask: None,
                    dropout: Some((
                        dropout,
                        seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    )),
                    columns: None,
                })
            })
            .collect();
        Self {
            shards: 1,
            slices,
            host_f32: false,
        }
    }

    /// The same batch with every row repeated `t` times in place (a row of `t` tokens, flattened).
    pub fn repeat_rows(&self, t: i64) -> Self {
        let slices = self
            .slices
            .iter()
            .map(|s| {
                s.as_ref().map(|s| LoraSlice {
                    a: s.a.shallow_clone(),
                    b: s.b.shallow_clone(),
                    mask: s
                        .mask
                        .as_ref()
                        .map(|m| m.repeat_interleave_self_int(t, Some(0), None)),
                    dropout: s.dropout,
                    columns: s.columns.as_ref().map(|c| {
                        c.iter()
                            .flat_map(|r| std::iter::repeat_n(*r, t as usize))
                            .collect()
                    }),
                })
            })
            .collect();
        Self {
            shards: self.shards,
            slices,
            host_f32: self.host_f32,
        }
    }

    pub fn get(&self, layer: usize, proj: Proj, shard: usize) -> Option<&LoraSlice> {
        self.slices[(layer * 7 + proj.index()) * self.shards + shard].as_ref()
    }

    /// Whether every slice can be computed row by row on float32 CPU buffers
    /// ([`LoraSlice::by_rows`]): an inference batch on one CPU device in float32.
    pub fn by_rows_on_cpu(&self) -> bool {
        self.host_f32 && self.slices.iter().flatten().all(|s| s.by_rows().is_some())
    }
}

/// Each row's rank columns in a slice stacked as `layout`.
fn row_columns(layout: &[(usize, i64)], rows: &[Option<usize>]) -> RowColumns {
    rows.iter()
        .map(|adapter| {
            let mut offset = 0;
            for &(i, r) in layout {
                if *adapter == Some(i) {
                    return Some((offset, r as usize));
                }
                offset += r as usize;
            }
            None
        })
        .collect()
}

/// `[rows, total]` with ones in each row's rank columns.
fn row_mask(
    columns: &[Option<(usize, usize)>],
    total: usize,
    device: Device,
    kind: Kind,
) -> Tensor {
    let mut data = vec![0f32; columns.len() * total];
    for (row, cols) in columns.iter().enumerate() {
        if let Some((offset, r)) = *cols {
            let start = row * total + offset;
            data[start..start + r].fill(1.0);
        }
    }
    Tensor::from_slice(&data)
        .view([columns.len() as i64, total as i64])
        .to_kind(kind)
        .to_device(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_selects_each_rows_slice() {
        let columns = row_columns(&[(0, 2), (1, 3)], &[Some(1), None, Some(0)]);
        assert_eq!(&columns[..], &[Some((2, 3)), None, Some((0, 2))]);
        let m = row_mask(&columns, 5, Device::Cpu, Kind::Float);
        let v: Vec<f32> = Vec::try_from(m.reshape([-1])).unwrap();
        assert_eq!(
            v,
            vec![0., 0., 1., 1., 1., 0., 0., 0., 0., 0., 1., 1., 0., 0., 0.]
        );
    }
}
