//! Throughput of nnU-Net's default augmentation pipeline on 1 x 128^3 patches (input: the enlarged
//! 205^3 patch the loader crops). Prints patches/s on one thread and with all rayon threads, then the
//! time of each transform forced on. `benches/augment_nnunet.py` prints the same for nnU-Net itself.
//! Besides wall time it reports CPU time, which stays comparable on a machine busy with other work.
//!
//! cargo bench --bench augment   (NNFLOW_BENCH_PATCHES=n, default 32)

use std::time::Instant;

use ndarray::Array4;
use nnflow::augment::{DaConfig, Pipeline, Sample, SampleRng, TransformSpec};

/// nnU-Net's batch size for 3d_fullres.
const BATCH: usize = 2;

fn main() {
    let n: usize = std::env::var("NNFLOW_BENCH_PATCHES")
        .ok()
        .and_then(|a| a.parse().ok())
        .unwrap_or(32);
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
    // Batches of nnU-Net's 3d_fullres batch size. Each batch is cloned from the loader's crop outside
    // the timing (benches/augment_nnunet.py does the same), so only augmentation is timed, and n clones
    // up front do not turn into gigabytes of page faults.
    let run = |epoch: u64| {
        let (mut wall, mut cpu) = (0.0, 0.0);
        for b in (0..n).step_by(BATCH) {
            let batch = vec![sample.clone(); BATCH.min(n - b)];
            let (t, c) = (Instant::now(), cpu_seconds(libc::CLOCK_PROCESS_CPUTIME_ID));
            let out = pipeline.apply_batch(batch, 0, epoch, b as u64).expect("augment");
            cpu += cpu_seconds(libc::CLOCK_PROCESS_CPUTIME_ID) - c;
            wall += t.elapsed().as_secs_f64();
            drop(out);
        }
        (n as f64 / wall, n as f64 / cpu)
    };
    let (one, one_cpu) = single.install(|| run(0));
    let threads = rayon::current_num_threads();
    let (all, _) = run(1);
    // the spatial transform dominates when it fires: time one forced rotation on its own
    let mut forced = pipeline.clone();
    if let Some(TransformSpec::Spatial(s)) = forced.transforms.first_mut() {
        s.p_rotation = 1.0;
    }
    let t = Instant::now();
    forced
        .apply(sample.clone(), &SampleRng::new(0, 0, 0))
        .expect("augment");
    println!("default pipeline, 1x128^3 patches from 1x{z}x{y}x{x}, {n} patches");
    println!("  1 thread : {one:.2} patches/s ({one_cpu:.2} per CPU-second)");
    println!(
        "  {threads} threads: {all:.2} patches/s ({:.2} per core)",
        all / threads as f64
    );
    println!(
        "  one patch with forced rotation: {:.3} s",
        t.elapsed().as_secs_f64()
    );
    per_transform(&pipeline, &sample);
}

/// Each transform on its own with its probability forced to 1 (inputs cloned outside the timing); all
/// but the spatial transform see the 128^3 patch the spatial transform produces.
fn per_transform(pipeline: &Pipeline, sample: &Sample) {
    println!("  per transform, forced on, 1 thread (ms wall, ms CPU):");
    let mut rng = SampleRng::new(0, 0, 0);
    let patch = match pipeline.transforms.first() {
        Some(TransformSpec::Spatial(s)) => {
            let mut p = sample.clone();
            s.apply(&mut p, &mut rng);
            p
        }
        _ => sample.clone(),
    };
    let time = |label: String, t: &TransformSpec, input: &Sample, reps: usize, rng: &mut SampleRng| {
        let (mut wall, mut cpu) = (0.0, 0.0);
        for _ in 0..reps {
            let mut s = input.clone();
            let (start, c) = (Instant::now(), cpu_seconds(libc::CLOCK_THREAD_CPUTIME_ID));
            t.apply(&mut s, rng);
            cpu += cpu_seconds(libc::CLOCK_THREAD_CPUTIME_ID) - c;
            wall += start.elapsed().as_secs_f64();
        }
        let ms = |s: f64| 1e3 * s / reps as f64;
        println!("    {label:<40} {:8.1} {:8.1}", ms(wall), ms(cpu));
    };
    for t in &pipeline.transforms {
        if let TransformSpec::Spatial(s) = t {
            let rotated = TransformSpec::Spatial(nnflow::augment::spatial::SpatialParams {
                p_rotation: 1.0,
                p_scaling: 1.0,
                ..s.clone()
            });
            time("spatial (rotation+scaling)".into(), &rotated, sample, 2, &mut rng);
            let elastic = TransformSpec::Spatial(nnflow::augment::spatial::SpatialParams {
                p_elastic_deform: 1.0,
                ..s.clone()
            });
            time(
                "spatial (rotation+scaling+elastic)".into(),
                &elastic,
                sample,
                2,
                &mut rng,
            );
        } else {
            time(t.name().into(), t, &patch, 5, &mut rng);
        }
    }
}

/// CPU time of the process or of the calling thread.
fn cpu_seconds(clock: libc::clockid_t) -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we own
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as f64 + 1e-9 * ts.tv_nsec as f64
}
