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
    let n = 1024 * 1536;
    let g = candle_core::Tensor::randn(0f32, 1.0, (1024, 1536), &dev).unwrap();
    let u = candle_core::Tensor::randn(0f32, 1.0, (1024, 1536), &dev).unwrap();
    let dm = candle_core::Tensor::randn(0f32, 1.0, (1024, 1536), &dev).unwrap();
    let (gv, uv, dmv) = (
        g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        u.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        dm.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    );
    c.bench_function("swiglu forward introspect fused", |b| {
        b.iter(|| {
            let mut m = vec![0f32; n];
            introspect_kernels::swiglu_forward(&gv, &uv, &mut m);
            m
        })
    });
    c.bench_function("swiglu forward candle ops", |b| {
        b.iter(|| (g.silu().unwrap() * &u).unwrap())
    });
    c.bench_function("swiglu backward introspect fused", |b| {
        b.iter(|| {
            let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
            introspect_kernels::swiglu_backward(&gv, &uv, &dmv, &mut dg, &mut du);
            (dg, du)
        })
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

criterion_group! {
    name = kernels;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(300)).measurement_time(std::time::Duration::from_secs(1));
    targets = bench, swiglu
}
criterion_main!(kernels);
