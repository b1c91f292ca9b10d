//! The integer kernels (`tessera_engine::int_dot`) on one decode row, the way a SmolLM2-sized
//! decode step reads them: 30 layers of 4-bit projections (q|k|v 960×576, o 576×576, gate|up
//! 3072×576, down 576×1536, each a distinct random weight, so they come from memory as in a real
//! step) and an 8-bit 49152×576 `lm_head`. Prints the median time of each part and the bytes per
//! second read. Not a test.
//!
//! `cargo run --release --workspace --example int_dot_bench`

use std::time::Instant;
use tessera_engine::int_dot::{int4_matmul_into, int8_matmul_into, QuantRows};
fn main() {
    let mut seed = 1u64;
    let mut next = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as u32
    };
    let shapes = [(960usize, 576usize), (576, 576), (3072, 576), (576, 1536)];
    let mut layers = Vec::new();
    for _ in 0..30 {
        for &(rows, cols) in &shapes {
            let groups = cols / 32;
            let q4: Vec<u8> = (0..rows * cols / 2).map(|_| next() as u8).collect();
            let sm: Vec<f32> = (0..rows * groups * 2)
                .map(|_| (next() % 100) as f32 * 1e-3)
                .collect();
            layers.push((rows, cols, q4, sm));
        }
    }
    let (hr, hc) = (49152usize, 576usize);
    let q8: Vec<i8> = (0..hr * hc).map(|_| next() as i8).collect();
    let d8: Vec<f32> = (0..hr * hc / 32)
        .map(|_| (next() % 100) as f32 * 1e-3)
        .collect();
    let xs: Vec<QuantRows> = [576usize, 1536]
        .iter()
        .map(|&c| {
            let x: Vec<f32> = (0..c)
                .map(|_| (next() % 1000) as f32 * 1e-3 - 0.5)
                .collect();
            QuantRows::quantize(&x, 1, c)
        })
        .collect();
    let mut out = vec![0f32; hr];
    let mut times = Vec::new();
    for it in 0..40 {
        let t = Instant::now();
        for (rows, cols, q4, sm) in &layers {
            let x = if *cols == 576 { &xs[0] } else { &xs[1] };
            int4_matmul_into(q4, sm, *rows, x, &mut out[..*rows]);
        }
        let t_proj = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        int8_matmul_into(&q8, &d8, hr, &xs[0], &mut out);
        let t_head = t.elapsed().as_secs_f64() * 1e3;
        if it >= 5 {
            times.push((t_proj, t_head));
        }
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let p = med(times.iter().map(|t| t.0).collect());
    let h = med(times.iter().map(|t| t.1).collect());
    println!(
        "projections {p:.2} ms ({:.1} GB/s)  head {h:.2} ms ({:.1} GB/s)",
        layers
            .iter()
            .map(|l| l.2.len() + l.3.len() * 4)
            .sum::<usize>() as f64
            / p
            / 1e6,
        (q8.len() + d8.len() * 4) as f64 / h / 1e6
    );
}
