//! Throughput of nnU-Net's default augmentation pipeline on 1 x 128^3 patches (input: the enlarged
//! 205^3 patch the loader crops). Prints patches/s on one thread and with all rayon threads.
//!
//! cargo bench --bench augment   (NNFLOW_BENCH_PATCHES=n, default 8)

use std::time::Instant;

use ndarray::Array4;
use nnflow::augment::{DaConfig, Pipeline, Sample, SampleRng};

fn main() {
    let n: usize = std::env::var("NNFLOW_BENCH_PATCHES")
        .ok()
        .and_then(|a| a.parse().ok())
        .unwrap_or(8);
    let da = DaConfig::from_patch_size(&[128, 128, 128]).expect("valid patch");
    let pipeline = Pipeline::nnunet_default(&da);
    let [z, y, x] = [
        da.initial_patch_size[0],
        da.initial_patch_size[1],
        da.initial_patch_size[2],
    ];
    let sample = Sample {
        data: Array4::from_shape_fn((1, z, y, x), |(_, a, b, c)| {
            ((a * 31 + b * 7 + c) % 101) as f32 / 50.0 - 1.0
        }),
        seg: Array4::from_shape_fn((1, z, y, x), |(_, a, b, c)| {
            ((a / 20 + b / 25 + c / 30) % 3) as i16
        }),
    };
    let single = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("thread pool");
    let t = Instant::now();
    single
        .install(|| pipeline.apply_batch(vec![sample.clone(); n], 0, 0, 0))
        .expect("augment");
    let one = n as f64 / t.elapsed().as_secs_f64();
    let threads = rayon::current_num_threads();
    let t = Instant::now();
    pipeline
        .apply_batch(vec![sample.clone(); n], 0, 1, 0)
        .expect("augment");
    let all = n as f64 / t.elapsed().as_secs_f64();
    // the spatial transform dominates when it fires: time one forced rotation on its own
    let mut forced = pipeline.clone();
    if let Some(nnflow::augment::TransformSpec::Spatial(s)) = forced.transforms.first_mut() {
        s.p_rotation = 1.0;
    }
    let t = Instant::now();
    forced.apply(sample, &SampleRng::new(0, 0, 0)).expect("augment");
    println!("default pipeline, 1x128^3 patches from 1x{z}x{y}x{x}, {n} patches");
    println!("  1 thread : {one:.2} patches/s");
    println!(
        "  {threads} threads: {all:.2} patches/s ({:.2} per core)",
        all / threads as f64
    );
    println!(
        "  one patch with forced rotation: {:.3} s",
        t.elapsed().as_secs_f64()
    );
}
