//! AdamW with moments we own (so a checkpoint can save and restore them exactly), a global-norm
//! gradient clip, and the learning-rate schedules of transformers' `get_scheduler` (linear warmup
//! then linear decay, cosine decay, or constant).

use tch::{Kind, Tensor};

use crate::train::hyperparams::LrScheduler;

pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// First and second moments, one pair per parameter: views into `m_flat` and `v_flat`. A
    /// caller may replace them (a checkpoint restore does); the next step copies them back in.
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    /// Every moment in one buffer, so a step is a dozen ops over all parameters instead of a
    /// dozen per parameter (a LoRA of 7 targets on 30 layers has 420 tensors).
    m_flat: Tensor,
    v_flat: Tensor,
    /// Optimizer steps taken.
    pub step: i64,
}

/// `numel` of each tensor, and the offset of each in a flat buffer of all of them.
fn layout(params: &[&Tensor]) -> Vec<(i64, i64)> {
    let mut offset = 0;
    params
        .iter()
        .map(|p| {
            let n = p.numel() as i64;
            offset += n;
            (offset - n, n)
        })
        .collect()
}

/// `flat[offset..offset + n]` shaped like `like`.
fn view_of(flat: &Tensor, (offset, n): (i64, i64), like: &Tensor) -> Tensor {
    flat.narrow(0, offset, n).view(like.size().as_slice())
}

impl AdamW {
    pub fn new(params: &[&Tensor], weight_decay: f64) -> Self {
        let total: i64 = layout(params).iter().map(|(_, n)| n).sum();
        let opts = params
            .first()
            .map(|p| (p.kind(), p.device()))
            .unwrap_or((Kind::Float, tch::Device::Cpu));
        let m_flat = Tensor::zeros([total], opts);
        let v_flat = Tensor::zeros([total], opts);
        let spans = layout(params);
        let views = |flat: &Tensor| -> Vec<Tensor> {
            spans
                .iter()
                .zip(params)
                .map(|(&span, p)| view_of(flat, span, p))
                .collect()
        };
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            m: views(&m_flat),
            v: views(&v_flat),
            m_flat,
            v_flat,
            step: 0,
        }
    }

    /// Makes `m` and `v` views of the flat buffers again where a caller replaced a tensor
    /// (copying its values in first).
    fn repack(&mut self, params: &[&Tensor]) {
        let spans = layout(params);
        let size = self.m_flat.kind().elt_size_in_bytes();
        for (flat, list) in [(&self.m_flat, &mut self.m), (&self.v_flat, &mut self.v)] {
            let base = flat.data_ptr() as usize;
            for ((i, &(offset, n)), p) in spans.iter().enumerate().zip(params) {
                let t = &list[i];
                if t.data_ptr() as usize != base + offset as usize * size || !t.is_contiguous() {
                    let mut dst = flat.narrow(0, offset, n);
                    tch::no_grad(|| dst.copy_(&t.reshape([-1])));
                    list[i] = view_of(flat, (offset, n), p);
                }
            }
        }
    }

    /// One update with learning rate `lr` from the gradients in `params`; clears the gradients.
    pub fn step(&mut self, params: &[&Tensor], lr: f64) {
        self.clip_and_step(params, lr, 0.0);
    }

    /// Clips the gradients to a global L2 norm of at most `max_norm` (0: no clipping), then
    /// updates; returns the norm before clipping and clears the gradients. With every gradient
    /// present this is one pass over flat buffers; parameters without a gradient are skipped
    /// (no moment update, no decay), as torch's AdamW does, through the per-tensor path.
    pub fn clip_and_step(&mut self, params: &[&Tensor], lr: f64, max_norm: f64) -> f64 {
        self.repack(params);
        let grads: Vec<Tensor> = params.iter().map(|p| p.grad()).collect();
        let norm = if grads.iter().all(Tensor::defined) && !grads.is_empty() {
            self.step_flat(params, &grads, lr, max_norm)
        } else {
            let norm = clip_grad_norm(params, max_norm);
            self.step_each(params, lr);
            norm
        };
        for mut g in grads {
            if g.defined() {
                let _ = g.zero_();
            }
        }
        norm
    }

    fn bias_corrections(&mut self) -> (f64, f64) {
        self.step += 1;
        let t = self.step as i32;
        (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t))
    }

    fn step_flat(&mut self, params: &[&Tensor], grads: &[Tensor], lr: f64, max_norm: f64) -> f64 {
        let (bc1, bc2) = self.bias_corrections();
        tch::no_grad(|| {
            let flat: Vec<Tensor> = grads.iter().map(|g| g.reshape([-1])).collect();
            let mut g = Tensor::cat(&flat, 0);
            let norm = g.norm().double_value(&[]);
            if max_norm > 0.0 && norm > max_norm {
                g *= max_norm / (norm + 1e-6);
            }
            let _ = self.m_flat.lerp_(&g, 1.0 - self.beta1);
            let _ = self.v_flat.lerp_(&(&g * &g), 1.0 - self.beta2);
            let mut denom = self.v_flat.sqrt();
            denom /= bc2.sqrt();
            denom += self.eps;
            let mut update = &self.m_flat / &denom;
            update *= lr / bc1;
            if self.weight_decay > 0.0 {
                let values: Vec<Tensor> = params.iter().map(|p| p.detach().reshape([-1])).collect();
                update += Tensor::cat(&values, 0) * (lr * self.weight_decay);
            }
            for (span, p) in layout(params).into_iter().zip(params) {
                let mut p = p.shallow_clone();
                p -= view_of(&update, span, &p);
            }
            norm
        })
    }

    /// The per-tensor update, for parameters some of which lack a gradient.
    fn step_each(&mut self, params: &[&Tensor], lr: f64) {
        let (bc1, bc2) = self.bias_corrections();
        tch::no_grad(|| {
            for (i, p) in params.iter().enumerate() {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let mut p = p.shallow_clone();
                if self.weight_decay > 0.0 {
                    p *= 1.0 - lr * self.weight_decay;
                }
                let _ = self.m[i].lerp_(&g, 1.0 - self.beta1);
                let _ = self.v[i].lerp_(&(&g * &g), 1.0 - self.beta2);
                let denom = self.v[i].sqrt() / bc2.sqrt() + self.eps;
                p -= &self.m[i] / denom * (lr / bc1);
            }
        });
    }
}

/// Scales the gradients so their global L2 norm is at most `max_norm` (0: no clipping); returns the
/// norm before clipping. Parameters without a gradient are skipped.
pub fn clip_grad_norm(params: &[&Tensor], max_norm: f64) -> f64 {
    let grads: Vec<Tensor> = params
        .iter()
        .map(|p| p.grad())
        .filter(|g| g.defined())
        .collect();
    if grads.is_empty() {
        return 0.0;
    }
    let norm = tch::no_grad(|| {
        let squares: Vec<Tensor> = grads
            .iter()
            .map(|g| g.to_kind(Kind::Float).pow_tensor_scalar(2).sum(Kind::Float))
            .collect();
        Tensor::stack(&squares, 0)
            .sum(Kind::Float)
            .sqrt()
            .double_value(&[])
    });
    if max_norm > 0.0 && norm > max_norm {
        let factor = max_norm / (norm + 1e-6);
        tch::no_grad(|| {
            for g in &grads {
                let mut g = g.shallow_clone();
                g *= factor;
            }
        });
    }
    norm
}

/// The learning rate at optimizer step `step` (0-based) of `total`.
pub fn learning_rate(
    base: f64,
    schedule: LrScheduler,
    warmup: usize,
    step: usize,
    total: usize,
) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / decay_steps).min(1.0);
    match schedule {
        LrScheduler::Constant => base,
        LrScheduler::Linear => base * (1.0 - progress),
        LrScheduler::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_warm_up_then_decay() {
        let lr = |s, step| learning_rate(1.0, s, 10, step, 110);
        assert!((lr(LrScheduler::Linear, 0) - 0.1).abs() < 1e-12);
        assert!((lr(LrScheduler::Linear, 9) - 1.0).abs() < 1e-12);
        assert!((lr(LrScheduler::Linear, 60) - 0.5).abs() < 1e-12);
        assert!((lr(LrScheduler::Cosine, 60) - 0.5).abs() < 1e-12);
        assert_eq!(lr(LrScheduler::Constant, 100), 1.0);
    }

    /// Parameters of a few shapes with the gradient of `sum(p³)` (a different gradient each step).
    /// Their values are a fixed function of `seed`, not torch's global generator, which tests on
    /// other threads draw from at the same time.
    fn params(seed: i64) -> Vec<Tensor> {
        [[3i64, 5], [7, 2], [4, 4]]
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let n = s[0] * s[1];
                ((Tensor::arange(n, (Kind::Float, tch::Device::Cpu)) * 0.731
                    + (seed * 10 + i as i64) as f64)
                    .sin()
                    * 1.5)
                    .reshape(s)
                    .set_requires_grad(true)
            })
            .collect()
    }

    fn refs(v: &[Tensor]) -> Vec<&Tensor> {
        v.iter().collect()
    }

    fn backward(ps: &[Tensor]) {
        let loss: Vec<Tensor> = ps
            .iter()
            .map(|p| p.pow_tensor_scalar(3).sum(Kind::Float))
            .collect();
        Tensor::stack(&loss, 0).sum(Kind::Float).backward();
    }

    fn max_diff(a: &[Tensor], b: &[Tensor]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs().max().double_value(&[]))
            .fold(0.0, f64::max)
    }

    #[test]
    fn flat_step_matches_the_per_tensor_step() {
        // Weight decay and clipping on: the flat path (one pass over every parameter) against the
        // per-tensor one, over several steps.
        let (a, b) = (params(1), params(1));
        let (mut fa, mut fb) = (AdamW::new(&refs(&a), 0.1), AdamW::new(&refs(&b), 0.1));
        for step in 0..5 {
            backward(&a);
            backward(&b);
            let na = fa.clip_and_step(&refs(&a), 0.01, 1.0);
            let nb = clip_grad_norm(&refs(&b), 1.0);
            fb.step_each(&refs(&b), 0.01);
            for p in &b {
                let _ = p.grad().zero_();
            }
            assert!(
                (na - nb).abs() < 1e-4 * nb,
                "step {step}: norm {na} vs {nb}"
            );
            assert!(max_diff(&a, &b) < 1e-6, "step {step}: {}", max_diff(&a, &b));
            assert!(max_diff(&fa.m, &fb.m) < 1e-6 && max_diff(&fa.v, &fb.v) < 1e-6);
            assert!(a
                .iter()
                .all(|p| p.grad().abs().max().double_value(&[]) == 0.0));
        }
    }

    #[test]
    fn replaced_moments_are_taken_back_into_the_flat_buffers() {
        // A resumed run replaces `m` and `v` with the saved tensors (new allocations); the next
        // step must use them, exactly as the uninterrupted optimizer does.
        let (a, b) = (params(2), params(2));
        let mut full = AdamW::new(&refs(&a), 0.0);
        for _ in 0..3 {
            backward(&a);
            full.clip_and_step(&refs(&a), 0.01, 0.0);
        }
        tch::no_grad(|| {
            for (x, y) in a.iter().zip(&b) {
                let mut y = y.shallow_clone();
                y.copy_(x);
            }
        });
        let mut resumed = AdamW::new(&refs(&b), 0.0);
        resumed.m = full.m.iter().map(|t| t.copy()).collect();
        resumed.v = full.v.iter().map(|t| t.copy()).collect();
        resumed.step = full.step;
        backward(&a);
        backward(&b);
        full.clip_and_step(&refs(&a), 0.01, 0.0);
        resumed.clip_and_step(&refs(&b), 0.01, 0.0);
        assert!(max_diff(&a, &b) < 1e-7, "{}", max_diff(&a, &b));
        // And `m` is a view of the flat buffer again: a step moves what `m` shows.
        let before = resumed.m[0].copy();
        backward(&b);
        resumed.clip_and_step(&refs(&b), 0.01, 0.0);
        assert!(max_diff(&[before], &resumed.m[..1]) > 0.0);
    }

    #[test]
    fn a_parameter_without_gradient_is_left_alone() {
        let ps = params(3);
        let refs: Vec<&Tensor> = ps.iter().collect();
        let before: Vec<Tensor> = ps.iter().map(|p| p.detach().copy()).collect();
        let mut opt = AdamW::new(&refs, 0.1);
        backward(&ps[..2]);
        opt.clip_and_step(&refs, 0.01, 1.0);
        assert!(max_diff(&ps[2..], &before[2..]) == 0.0);
        assert!(opt.m[2].abs().max().double_value(&[]) == 0.0);
        assert!(max_diff(&ps[..1], &before[..1]) > 0.0);
    }

    #[test]
    fn adamw_first_step_moves_by_lr_and_clip_scales() {
        let p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        (&p * &p).sum(Kind::Float).backward();
        let norm = clip_grad_norm(&[&p], 1.0);
        assert!((norm - 20f64.sqrt()).abs() < 1e-5);
        let mut opt = AdamW::new(&[&p], 0.0);
        opt.step(&[&p], 0.1);
        let v: Vec<f32> = p.detach().try_into().unwrap();
        // Adam's first step is lr · sign(g) (up to eps).
        assert!(
            (v[0] - 0.9).abs() < 1e-5 && (v[1] + 1.9).abs() < 1e-5,
            "{v:?}"
        );
    }
}
