//! The block mat-vec kernels against Candle's quantized matmul and f32 matmul, on SmolLM2's shapes
//! (576×1536 MLP up/gate, 1536×576 down, 49152×576 head), one activation row (decode) and 16 (batched decode).

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use introspect_kernels::{BlockFormat, QuantMatrix};

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    for (rows, cols, dtype, format) in [
        (1536, 576, GgmlDType::Q4_1, BlockFormat::Q4_1),
        (576, 1536, GgmlDType::Q4_1, BlockFormat::Q4_1),
        (49152, 576, GgmlDType::Q8_0, BlockFormat::Q8_0),
    ] {
        let w = Tensor::randn(0f32, 0.05, (rows, cols), &dev).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let ours = QuantMatrix::new(format, rows, cols, q.data().unwrap().into_owned()).unwrap();
        let candle_q = QMatMul::from_qtensor(q).unwrap();
        let dense = ours.dequantize();
        let dense16: Vec<half::bf16> = dense.iter().map(|v| half::bf16::from_f32(*v)).collect();
        let wd = Tensor::from_vec(dense.clone(), (rows, cols), &dev).unwrap();
        for m in [1usize, 16, 32] {
            let x = Tensor::randn(0f32, 1.0, (m, cols), &dev).unwrap();
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut y = vec![0f32; m * rows];
            let name = format!("{format:?} {rows}x{cols} m={m}");
            c.bench_function(&format!("{name} introspect blocks"), |b| {
                b.iter(|| ours.matmul(&xs, m, &mut y))
            });
            c.bench_function(&format!("{name} introspect f32"), |b| {
                b.iter(|| introspect_kernels::dense_matmul(&dense, rows, cols, &xs, m, &mut y))
            });
            c.bench_function(&format!("{name} introspect bf16"), |b| {
                b.iter(|| introspect_kernels::dense_matmul(&dense16, rows, cols, &xs, m, &mut y))
            });
            c.bench_function(&format!("{name} candle QMatMul"), |b| {
                b.iter(|| candle_q.forward(&x).unwrap())
            });
            c.bench_function(&format!("{name} candle f32 matmul"), |b| {
                b.iter(|| x.matmul(&wd.t().unwrap()).unwrap())
            });
        }
    }
}

/// The training MLP gate on one 16 × 64 batch of SmolLM2 (1024 × 1536): fused kernel against Candle's
/// element-wise composition, forward and backward.
fn swiglu(c: &mut Criterion) {
    let dev = candle_core::Device::Cpu;
    let g = candle_core::Tensor::randn(0f32, 1.0, (1024, 1536), &dev).unwrap();
    let u = candle_core::Tensor::randn(0f32, 1.0, (1024, 1536), &dev).unwrap();
    let dm = candle_core::Tensor::randn(0f32, 1.0, (1024, 1536), &dev).unwrap();
    let (gv, uv, dmv) = (
        g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        u.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        dm.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    );
    c.bench_function("swiglu forward introspect fused", |b| {
        b.iter(|| introspect_kernels::swiglu_forward(&gv, &uv))
    });
    c.bench_function("swiglu forward candle ops", |b| {
        b.iter(|| (g.silu().unwrap() * &u).unwrap())
    });
    c.bench_function("swiglu backward introspect fused", |b| {
        b.iter(|| introspect_kernels::swiglu_backward(&gv, &uv, &dmv))
    });
    c.bench_function("swiglu backward candle ops", |b| {
        b.iter(|| {
            let s = candle_nn::ops::sigmoid(&g).unwrap();
            let dsilu = (&s * ((&g * (1.0 - &s).unwrap()).unwrap() + 1.0).unwrap()).unwrap();
            let dg = ((&dm * &u).unwrap() * dsilu).unwrap();
            let du = (&dm * g.silu().unwrap()).unwrap();
            (dg, du)
        })
    });
}

fn vec_of(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// One LoRA projection of the training step (1024 rows, SmolLM2's 576 → 1536 gate, rank 32), forward and
/// backward: the GEMM-accumulating kernel against Candle's matmul-and-add composition.
fn lora_linear(c: &mut Criterion) {
    use introspect_kernels::{lora_backward, lora_forward, Elements, Frozen, LoraGrads, LoraPair};
    let dev = Device::Cpu;
    let (m, inp, out, r, s) = (1024, 576, 1536, 32, 2.0f32);
    let x = Tensor::randn(0f32, 1.0, (m, inp), &dev).unwrap();
    let w = Tensor::randn(0f32, 0.05, (out, inp), &dev).unwrap();
    let a = Tensor::randn(0f32, 0.05, (r, inp), &dev).unwrap();
    let bm = Tensor::randn(0f32, 0.05, (out, r), &dev).unwrap();
    let dy = Tensor::randn(0f32, 1.0, (m, out), &dev).unwrap();
    let (xv, wv, av, bv, dyv) = (vec_of(&x), vec_of(&w), vec_of(&a), vec_of(&bm), vec_of(&dy));
    let pair = LoraPair {
        a: &av,
        b: &bv,
        r,
        scale: s,
    };
    let frozen = Frozen {
        w: Elements::F32(&wv),
        out,
        inp,
    };
    let mut z = vec![0f32; m * r];
    c.bench_function("lora linear forward introspect", |b| {
        b.iter(|| lora_forward(&xv, &xv, m, frozen, pair, &mut z))
    });
    c.bench_function("lora linear forward candle ops", |b| {
        b.iter(|| {
            let z = (x.matmul(&a.t().unwrap()).unwrap() * s as f64).unwrap();
            (x.matmul(&w.t().unwrap()).unwrap() + z.matmul(&bm.t().unwrap()).unwrap()).unwrap()
        })
    });
    let zt = Tensor::from_vec(z.clone(), (m, r), &dev).unwrap();
    c.bench_function("lora linear backward introspect", |b| {
        b.iter(|| {
            let (mut da, mut db) = (vec![0f32; r * inp], vec![0f32; out * r]);
            let g = LoraGrads {
                pair,
                x_in: introspect_kernels::Elements::F32(&xv),
                z: &z,
                keep: None,
                da: &mut da,
                db: &mut db,
            };
            lora_backward(&dyv, m, frozen, true, g)
        })
    });
    c.bench_function("lora linear backward candle ops", |b| {
        b.iter(|| {
            let db = dy.t().unwrap().matmul(&zt).unwrap();
            let dz = (dy.matmul(&bm).unwrap() * s as f64).unwrap();
            let da = dz.t().unwrap().matmul(&x).unwrap();
            let dx = (dy.matmul(&w).unwrap() + dz.matmul(&a).unwrap()).unwrap();
            (dx, da, db)
        })
    });
}

/// One layer's attention of the training step (16 sequences × 64 tokens, 9 query heads on 3 kv heads,
/// d 64), forward and backward: one task per (sequence, kv head) against Candle's batched matmuls.
fn causal_attention(c: &mut Criterion) {
    use introspect_kernels::{causal_attention_backward, causal_attention_forward, AttentionShape};
    let dev = Device::Cpu;
    let (b, nkv, g, t, d) = (16, 3, 3, 64, 64);
    let shape = AttentionShape {
        batch: b,
        kv_heads: nkv,
        group: g,
        seq: t,
        head_dim: d,
    };
    let scale = 1.0 / (d as f32).sqrt();
    let q = Tensor::randn(0f32, 1.0, (b, nkv, g * t, d), &dev).unwrap();
    let k = Tensor::randn(0f32, 1.0, (b, nkv, t, d), &dev).unwrap();
    let v = Tensor::randn(0f32, 1.0, (b, nkv, t, d), &dev).unwrap();
    let d_o = Tensor::randn(0f32, 1.0, (b, nkv, g * t, d), &dev).unwrap();
    let mask: Vec<f32> = (0..t * t)
        .map(|i| {
            if i % t > i / t {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (1, 1, t, t), &dev).unwrap();
    let (qv, kv, vv, dov) = (vec_of(&q), vec_of(&k), vec_of(&v), vec_of(&d_o));
    let mut probs = vec![0f32; b * nkv * g * t * t];
    c.bench_function("attention forward introspect", |bn| {
        bn.iter(|| {
            let mut o = vec![0f32; qv.len()];
            causal_attention_forward(&qv, &kv, &vv, shape, scale, &mut probs, &mut o);
            o
        })
    });
    let candle_forward = || {
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale as f64)
            .unwrap()
            .reshape((b, nkv * g, t, t))
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
        let p = candle_nn::ops::softmax_last_dim(&scores)
            .unwrap()
            .reshape((b, nkv, g * t, t))
            .unwrap();
        let o = p.matmul(&v).unwrap();
        (p, o)
    };
    c.bench_function("attention forward candle ops", |bn| bn.iter(candle_forward));
    let pt = candle_forward().0;
    c.bench_function("attention backward introspect", |bn| {
        bn.iter(|| {
            let (mut dq, mut dk, mut dv) = (
                vec![0f32; qv.len()],
                vec![0f32; kv.len()],
                vec![0f32; vv.len()],
            );
            causal_attention_backward(
                &qv, &kv, &vv, &probs, &dov, shape, scale, &mut dq, &mut dk, &mut dv,
            );
            (dq, dk, dv)
        })
    });
    c.bench_function("attention backward candle ops", |bn| {
        bn.iter(|| {
            let dp = d_o.matmul(&v.t().unwrap()).unwrap();
            let dv = pt.t().unwrap().matmul(&d_o).unwrap();
            let row = (&dp * &pt)
                .unwrap()
                .sum_keepdim(candle_core::D::Minus1)
                .unwrap();
            let ds = ((&pt * dp.broadcast_sub(&row).unwrap()).unwrap() * scale as f64).unwrap();
            (
                ds.matmul(&k).unwrap(),
                ds.t().unwrap().matmul(&q).unwrap(),
                dv,
            )
        })
    });
}

/// A frozen projection's products on a 64-token prefill and one 16 × 64 training batch (1024 rows), f32
/// against bf16 × bf16 (native `vdpbf16ps` where the CPU has avx512_bf16, and the f32-GEMM emulation of the
/// same rounding): `y = x Wᵀ` (forward, prefill) and `dx = dy W` (backward). Throughput in flops.
fn frozen_products(c: &mut Criterion) {
    use criterion::Throughput;
    use introspect_kernels::{
        matmul, matmul_bf16, matmul_bf16_emulated, Bf16Operand, Elements, Operand,
    };
    let mut g = c.benchmark_group("frozen products");
    for (m, out, inp) in [
        (64, 1536usize, 576usize),
        (64, 576, 1536),
        (1024, 1536, 576),
        (1024, 576, 1536),
    ] {
        let w: Vec<f32> = (0..out * inp)
            .map(|i| ((i * 7919 % 2003) as f32 - 1001.0) / 20000.0)
            .collect();
        let w16: Vec<half::bf16> = w.iter().map(|v| half::bf16::from_f32(*v)).collect();
        let x: Vec<f32> = (0..m * inp)
            .map(|i| ((i * 104729 % 1999) as f32 - 999.0) / 500.0)
            .collect();
        let dy: Vec<f32> = (0..m * out)
            .map(|i| ((i * 15485863 % 1997) as f32 - 998.0) / 500.0)
            .collect();
        g.throughput(Throughput::Elements((2 * m * out * inp) as u64));
        let name = format!("{m}x{inp}->{out}");
        let fwd = Bf16Operand {
            elems: Elements::Bf16(&w16),
            rows: inp,
            cols: out,
            transposed: true,
        };
        let bwd = Bf16Operand {
            elems: Elements::Bf16(&w16),
            rows: out,
            cols: inp,
            transposed: false,
        };
        let (mut y, mut dx) = (vec![0f32; m * out], vec![0f32; m * inp]);
        g.bench_function(format!("{name} forward f32"), |b| {
            b.iter(|| {
                matmul(
                    &mut y,
                    Operand::new(&x, m, inp),
                    Operand::t(&w, out, inp),
                    1.0,
                    false,
                )
            })
        });
        let frozen = introspect_kernels::Frozen {
            w: Elements::F32(&w),
            out,
            inp,
        };
        g.bench_function(format!("{name} forward f32 frozen"), |b| {
            b.iter(|| frozen.forward(&x, m, &mut y))
        });
        g.bench_function(format!("{name} forward f32 team"), |b| {
            b.iter(|| introspect_kernels::linear_team(&x, m, &w, out, inp, &mut y))
        });
        g.bench_function(format!("{name} forward bf16"), |b| {
            b.iter(|| matmul_bf16(&mut y, &x, m, fwd, false))
        });
        g.bench_function(format!("{name} forward bf16 emulated"), |b| {
            b.iter(|| matmul_bf16_emulated(&mut y, &x, m, fwd, false))
        });
        g.bench_function(format!("{name} backward f32"), |b| {
            b.iter(|| {
                matmul(
                    &mut dx,
                    Operand::new(&dy, m, out),
                    Operand::new(&w, out, inp),
                    1.0,
                    false,
                )
            })
        });
        g.bench_function(format!("{name} backward bf16"), |b| {
            b.iter(|| matmul_bf16(&mut dx, &dy, m, bwd, false))
        });
    }
    g.finish();
}

criterion_group! {
    name = kernels;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(300)).measurement_time(std::time::Duration::from_secs(1));
    targets = bench, swiglu, lora_linear, causal_attention, frozen_products
}
criterion_main!(kernels);
