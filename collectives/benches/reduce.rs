//! Reduction kernels on 1 MiB (the executor's segment): `cargo bench -p phalanx-collectives
//! --bench reduce`. The f32 sum is the reference a bf16 or f16 sum should approach per byte;
//! the division is the last step of an average.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use phalanx_collectives::reduce::{divide, reduce_into, DType, ReduceOp};

fn kernels(c: &mut Criterion) {
    let bytes = 1 << 20;
    let mut g = c.benchmark_group("reduce_1MiB");
    g.throughput(Throughput::Bytes(bytes as u64));
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        // Small values (1.0 and 2.0 in every type's bytes would differ): any bits will do for
        // timing, and a sum of finite numbers keeps clear of NaN paths.
        let mut dst = vec![0u8; bytes];
        let src: Vec<u8> = (0..bytes).map(|i| if i % 2 == 1 { 0x3c } else { (i % 251) as u8 }).collect();
        g.bench_with_input(BenchmarkId::new("sum", format!("{dtype:?}")), &src, |b, src| {
            b.iter(|| reduce_into(dtype, ReduceOp::Sum, &mut dst, src))
        });
        let mut buf = src.clone();
        g.bench_function(BenchmarkId::new("divide", format!("{dtype:?}")), |b| b.iter(|| divide(dtype, &mut buf, 3)));
    }
    g.finish();
}

criterion_group!(benches, kernels);
criterion_main!(benches);
