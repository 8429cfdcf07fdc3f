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
        for m in [1usize, 16] {
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

criterion_group! {
    name = kernels;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(300)).measurement_time(std::time::Duration::from_secs(1));
    targets = bench
}
criterion_main!(kernels);
