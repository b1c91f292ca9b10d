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
    /// First and second moments, one pair per parameter.
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    /// Optimizer steps taken.
    pub step: i64,
}

impl AdamW {
    pub fn new(params: &[&Tensor], weight_decay: f64) -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            m: params.iter().map(|p| p.zeros_like()).collect(),
            v: params.iter().map(|p| p.zeros_like()).collect(),
            step: 0,
        }
    }

    /// One update with learning rate `lr` from the gradients in `params`; clears the gradients.
    pub fn step(&mut self, params: &[&Tensor], lr: f64) {
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2 = 1.0 - self.beta2.powi(t);
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
                let m = &mut self.m[i];
                *m *= self.beta1;
                *m += &g * (1.0 - self.beta1);
                let v = &mut self.v[i];
                *v *= self.beta2;
                *v += (&g * &g) * (1.0 - self.beta2);
                let denom = (&*v / bc2).sqrt() + self.eps;
                p -= (&*m / bc1) / denom * lr;
            }
        });
        for p in params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
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
