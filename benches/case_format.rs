//! Case format benchmark: nnflow's chunked, compressed preprocessed cases (Zarr v3 through zarrs,
//! shards of inner chunks sized by nnU-Net's blosc2 rule, byte shuffle + zstd) against nnflow's
//! earlier uncompressed `.npy` cases and nnU-Net 2.8.1's blosc2 `.b2nd` files, on the same
//! synthetic CT-like dataset (`nnflow synth`). Prints, asserting nothing about timing:
//!
//! 1. disk footprint of the 3d_fullres preprocessed cases: nnflow's preprocess outputs against
//!    nnU-Net's `nnUNetPlans_3d_fullres` folder (`nnUNetv2_plan_and_preprocess -c 3d_fullres`);
//! 2. write time per case: `case_store::write_case` against the earlier `.npy` writer (image
//!    float32, labels int8 when they fit, each file written and renamed);
//! 3. patch read time: random crops of the plan's patch size through `CaseReader::crop` (decodes
//!    the chunks a crop touches) against the earlier memory-mapped `.npy` crop, on one thread;
//! 4. (`NNFLOW_BENCH_TRAIN=1`) the training loop's data wait: the demo pipeline's fold-0 training
//!    run with each nnflow executable given, `data_wait_seconds` summed over
//!    `training_history.json`. Name an executable built from before the chunked format in
//!    `NNFLOW_BENCH_TRAIN_EXES` to compare.
//!
//! Timings share the machine with whatever else runs: each is repeated and the median and the
//! fastest are printed; compare runs made at the same time. Both formats are read from the page
//! cache (it cannot be dropped here), so the read figures are warm reads.
//!
//! Environment:
//! - `NNFLOW_BENCH_DIR`      dataset folder (default `$HOME/.cache/nnflow/bench-case-format/
//!   Dataset900_SynthCT`); written by `nnflow synth` when missing or of other sizes
//! - `NNFLOW_BENCH_CASES`    cases (default 4)
//! - `NNFLOW_BENCH_SHAPE`    shape z,y,x (default `100,512,512`)
//! - `NNFLOW_BENCH_SPACING`  spacing z,y,x in mm (default `2.5,0.7,0.7`)
//! - `NNFLOW_BENCH_SPACING_VARIATION` per-case spacing variation of `nnflow synth` (default 0:
//!   every case on the median grid, so nothing is resampled and intensities stay quantized; e.g.
//!   0.2 resamples most cases, giving continuous intensities)
//! - `NNFLOW_BENCH_JOBS`     processes on both sides (default: CPU cores)
//! - `NNFLOW_BENCH_REPEAT`   repetitions of each timing (default 3)
//! - `NNFLOW_BENCH_PATCHES`  random patches per case and repetition (default 20)
//! - `NNFLOW_BENCH_NNUNET_VENV` virtual environment with nnunetv2 2.8.1 (default
//!   `$HOME/.cache/nnflow/nnunet-venv`); `NNFLOW_BENCH_NNUNET=0` skips nnU-Net
//! - `NNFLOW_BENCH_TRAIN=1` runs part 4; `NNFLOW_BENCH_TRAIN_EXES` `label=path,...` of nnflow
//!   executables (default: this build's), each with its `nnflow-torch` beside it
//! - `NNFLOW_BENCH_KEEP=1`   keep the work folder and print where it is

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use memmap2::Mmap;
use ndarray::Array4;
use nnflow::data::case_store::{list_cases, read_case, write_case, StoredCase};
use nnflow::data::npy;
use nnflow::train::case_reader::CaseReader;

const DATASET_ID: u32 = 900;
const DATASET_NAME: &str = "Dataset900_SynthCT";
const MB: f64 = 1e6;

fn env_text(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|text| !text.trim().is_empty())
}

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    env_text(name).map_or(default, |text| {
        text.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}: cannot read `{text}` as a number"))
    })
}

fn home() -> PathBuf {
    PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
}

struct Config {
    dataset: PathBuf,
    cases: usize,
    shape: String,
    spacing: String,
    spacing_variation: String,
    jobs: usize,
    repeat: usize,
    patches: usize,
    venv: PathBuf,
    nnunet: bool,
    train: bool,
    train_exes: Vec<(String, PathBuf)>,
    keep: bool,
}

impl Config {
    fn from_env() -> Config {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let train_exes = env_text("NNFLOW_BENCH_TRAIN_EXES").map_or_else(
            || {
                vec![(
                    "this build".to_string(),
                    PathBuf::from(env!("CARGO_BIN_EXE_nnflow")),
                )]
            },
            |text| {
                text.split(',')
                    .map(|entry| {
                        let (label, path) = entry.split_once('=').unwrap_or(("", entry));
                        (label.trim().to_string(), PathBuf::from(path.trim()))
                    })
                    .collect()
            },
        );
        Config {
            dataset: env_text("NNFLOW_BENCH_DIR").map_or_else(
                || home().join(".cache/nnflow/bench-case-format").join(DATASET_NAME),
                PathBuf::from,
            ),
            cases: env_number("NNFLOW_BENCH_CASES", 4),
            shape: env_text("NNFLOW_BENCH_SHAPE").unwrap_or_else(|| "100,512,512".into()),
            spacing: env_text("NNFLOW_BENCH_SPACING").unwrap_or_else(|| "2.5,0.7,0.7".into()),
            spacing_variation: env_text("NNFLOW_BENCH_SPACING_VARIATION").unwrap_or_else(|| "0".into()),
            jobs: env_number("NNFLOW_BENCH_JOBS", cores),
            repeat: env_number("NNFLOW_BENCH_REPEAT", 3usize).max(1),
            patches: env_number("NNFLOW_BENCH_PATCHES", 20usize).max(1),
            venv: env_text("NNFLOW_BENCH_NNUNET_VENV")
                .map_or_else(|| home().join(".cache/nnflow/nnunet-venv"), PathBuf::from),
            nnunet: env_text("NNFLOW_BENCH_NNUNET").as_deref() != Some("0"),
            train: env_text("NNFLOW_BENCH_TRAIN").as_deref() == Some("1"),
            train_exes,
            keep: env_text("NNFLOW_BENCH_KEEP").as_deref() == Some("1"),
        }
    }
}

fn run_checked(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
    if !output.status.success() {
        panic!(
            "{command:?} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Writes the dataset with `nnflow synth` unless one of the same sizes is there.
fn ensure_dataset(config: &Config) {
    let spec = format!(
        "{} {} {} {}\n",
        config.cases, config.shape, config.spacing, config.spacing_variation
    );
    let stamp = config.dataset.with_extension("spec");
    if config.dataset.join("dataset.json").is_file() && fs::read_to_string(&stamp).is_ok_and(|s| s == spec) {
        println!("dataset: {} (cached)", config.dataset.display());
        return;
    }
    let _ = fs::remove_dir_all(&config.dataset);
    fs::create_dir_all(config.dataset.parent().expect("a parent")).expect("create the dataset's folder");
    println!("dataset: writing {} ({})", config.dataset.display(), spec.trim());
    run_checked(
        Command::new(env!("CARGO_BIN_EXE_nnflow"))
            .arg("synth")
            .arg(&config.dataset)
            .args(["--cases", &config.cases.to_string()])
            .args(["--shape", &config.shape])
            .args(["--spacing", &config.spacing])
            .args(["--spacing-variation", &config.spacing_variation]),
    );
    fs::write(&stamp, spec).expect("write the dataset's spec file");
}

/// Bytes of the files under `path` whose name `wanted` accepts (symbolic links not followed).
fn bytes_under(path: &Path, wanted: &dyn Fn(&str) -> bool) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    if meta.is_dir() {
        return fs::read_dir(path).map_or(0, |entries| {
            entries.flatten().map(|e| bytes_under(&e.path(), wanted)).sum()
        });
    }
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    if meta.is_file() && wanted(&name) {
        meta.len()
    } else {
        0
    }
}

fn count_files(path: &Path) -> usize {
    fs::read_dir(path).map_or(0, |entries| {
        entries
            .flatten()
            .map(|e| {
                if e.path().is_dir() {
                    count_files(&e.path())
                } else {
                    1
                }
            })
            .sum()
    })
}

/// nnflow's pipeline (`pipelines/nnunet.toml`) up to `preprocess` for 3d_fullres; returns
/// (plans.json, the preprocessed cases' folder).
fn nnflow_preprocess(config: &Config, work: &Path) -> (serde_json::Value, PathBuf) {
    let project = work.join("nnflow");
    fs::create_dir_all(&project).expect("create the nnflow project");
    let pipeline = project.join("nnunet.toml");
    fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/nnunet.toml"),
        &pipeline,
    )
    .expect("copy the pipeline");
    let started = Instant::now();
    let text = run_checked(
        Command::new(env!("CARGO_BIN_EXE_nnflow"))
            .arg("run")
            .arg(&pipeline)
            .arg("preprocess")
            .arg("--set")
            .arg(format!("dataset={}", config.dataset.display()))
            .args(["--set", "configurations=[\"3d_fullres\"]"])
            .args(["-j", &config.jobs.to_string(), "--json"])
            .current_dir(&project)
            .env("NNFLOW_CACHE_DIR", work.join("nnflow-cache")),
    );
    println!("nnflow: preprocessed in {:.1} s", started.elapsed().as_secs_f64());
    let report: serde_json::Value = serde_json::from_str(&text).expect("nnflow's --json report");
    let outputs = |prefix: &str| -> PathBuf {
        report["stages"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["id"].as_str().is_some_and(|id| id.starts_with(prefix)))
            .and_then(|s| s["outputs"].as_str())
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("no {prefix} stage in nnflow's report:\n{text}"))
    };
    let plans: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(outputs("plan").join("plans.json")).expect("plans.json"))
            .expect("plans.json parses");
    (plans, outputs("preprocess"))
}

/// nnU-Net's `nnUNetv2_plan_and_preprocess -c 3d_fullres`; returns its preprocessed folder.
fn nnunet_preprocess(config: &Config, work: &Path) -> Option<PathBuf> {
    let executable = config.venv.join("bin/nnUNetv2_plan_and_preprocess");
    if !executable.is_file() {
        println!("nnU-Net: no {} (skipped)", executable.display());
        return None;
    }
    let (raw, preprocessed, results) = (work.join("raw"), work.join("preprocessed"), work.join("results"));
    for folder in [&raw, &preprocessed, &results] {
        fs::create_dir_all(folder).expect("create nnU-Net's folders");
    }
    std::os::unix::fs::symlink(&config.dataset, raw.join(DATASET_NAME)).expect("link the dataset");
    let started = Instant::now();
    run_checked(
        Command::new(&executable)
            .args(["-d", &DATASET_ID.to_string(), "-c", "3d_fullres"])
            .args(["-np", &config.jobs.to_string(), "-npfp", &config.jobs.to_string()])
            .arg("--no_pbar")
            .env("nnUNet_raw", &raw)
            .env("nnUNet_preprocessed", &preprocessed)
            .env("nnUNet_results", &results),
    );
    println!(
        "nnU-Net: preprocessed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Some(preprocessed.join(DATASET_NAME).join("nnUNetPlans_3d_fullres"))
}

/// Median and fastest of some timings, in milliseconds.
fn summary(mut seconds: Vec<f64>) -> (f64, f64) {
    seconds.sort_by(f64::total_cmp);
    (seconds[seconds.len() / 2] * 1e3, seconds[0] * 1e3)
}

/// nnflow's earlier case writer: `<id>_data.npy` float32 and `<id>_seg.npy` (int8 when the
/// labels fit), each written under a temporary name and renamed.
fn write_npy_case(folder: &Path, id: &str, case: &StoredCase) {
    let renamed = |name: String, write: &dyn Fn(&Path)| {
        let path = folder.join(name);
        let temporary = path.with_extension("npy.partial");
        write(&temporary);
        fs::rename(&temporary, &path).expect("rename");
    };
    renamed(format!("{id}_data.npy"), &|p| {
        npy::write(p, case.data.view()).expect("write")
    });
    if let Some(seg) = &case.seg {
        let narrow = seg.mapv(|v| v as i8);
        renamed(format!("{id}_seg.npy"), &|p| {
            npy::write(p, narrow.view()).expect("write")
        });
    }
}

/// The earlier reader: the `.npy` arrays memory-mapped, a crop copied row by row.
struct MappedNpy {
    data: Mmap,
    data_offset: usize,
    seg: Mmap,
    seg_offset: usize,
    shape: [usize; 4],
}

impl MappedNpy {
    fn open(folder: &Path, id: &str) -> MappedNpy {
        let map = |name: String| {
            let file = File::open(folder.join(name)).expect("open");
            // SAFETY: the benchmark's own files, not modified while mapped.
            unsafe { Mmap::map(&file) }.expect("map")
        };
        let data = map(format!("{id}_data.npy"));
        let seg = map(format!("{id}_seg.npy"));
        let (shape, data_offset) = npy::parse_header(&data, "<f4").expect("float32 image");
        let (_, seg_offset) = npy::parse_header(&seg, "|i1").expect("int8 labels");
        MappedNpy {
            data,
            data_offset,
            seg,
            seg_offset,
            shape: shape.try_into().expect("four axes"),
        }
    }

    fn crop(&self, lb: [i64; 3], size: [usize; 3]) -> (Array4<f32>, Array4<i16>) {
        let [c, dz, dy, dx] = self.shape;
        let n = self.shape.iter().product::<usize>();
        let data: &[f32] = bytemuck::cast_slice(&self.data[self.data_offset..self.data_offset + 4 * n]);
        let seg = &self.seg[self.seg_offset..];
        let mut out = Array4::<f32>::zeros((c, size[0], size[1], size[2]));
        let mut labels = Array4::<i16>::from_elem((1, size[0], size[1], size[2]), -1);
        let x0 = lb[2].max(0);
        let x1 = (lb[2] + size[2] as i64).min(dx as i64);
        for z in 0..size[0] {
            let sz = lb[0] + z as i64;
            if sz < 0 || sz >= dz as i64 {
                continue;
            }
            for y in 0..size[1] {
                let sy = lb[1] + y as i64;
                if sy < 0 || sy >= dy as i64 || x0 >= x1 {
                    continue;
                }
                let row = (sz as usize * dy + sy as usize) * dx;
                let (from, to) = (row + x0 as usize, row + x1 as usize);
                let at = (x0 - lb[2]) as usize;
                for ch in 0..c {
                    let src = &data[ch * dz * dy * dx + from..ch * dz * dy * dx + to];
                    out.slice_mut(ndarray::s![ch, z, y, at..at + src.len()])
                        .as_slice_mut()
                        .expect("contiguous row")
                        .copy_from_slice(src);
                }
                for (i, v) in labels
                    .slice_mut(ndarray::s![0, z, y, at..at + (to - from)])
                    .iter_mut()
                    .enumerate()
                {
                    *v = seg[from + i] as i8 as i16;
                }
            }
        }
        (out, labels)
    }
}

/// Random crop corners of `patch`, hanging over the border by up to half a patch as nnU-Net's
/// loader allows, from a fixed xorshift stream so both readers get the same crops.
fn corners(shape: [usize; 4], patch: [usize; 3], count: usize, seed: u64) -> Vec<[i64; 3]> {
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..count)
        .map(|_| {
            [0, 1, 2].map(|d| {
                let lo = -(patch[d] as i64) / 2;
                let hi = shape[d + 1] as i64 - (patch[d] as i64) / 2;
                lo + (next() % (hi - lo + 1) as u64) as i64
            })
        })
        .collect()
}

fn patch_of(plans: &serde_json::Value) -> [usize; 3] {
    let patch: Vec<usize> =
        serde_json::from_value(plans["configurations"]["3d_fullres"]["patch_size"].clone())
            .expect("3d_fullres patch_size in plans.json");
    match patch.as_slice() {
        [z, y, x] => [*z, *y, *x],
        other => panic!("3d_fullres patch {other:?}"),
    }
}

fn disk_footprint(nnflow_cases: &Path, nnunet_cases: Option<&Path>, cases: usize) {
    let all = |_: &str| true;
    let ours_arrays = bytes_under(nnflow_cases, &|name: &str| !name.ends_with(".json"));
    let ours_total = bytes_under(nnflow_cases, &all);
    println!();
    println!("1. disk footprint of the 3d_fullres preprocessed cases ({cases} cases)");
    println!(
        "   nnflow chunked (zarr, zstd {}):  {:>9.1} MB arrays, {:>9.1} MB with properties, {} files",
        nnflow::data::chunked::ZSTD_LEVEL,
        ours_arrays as f64 / MB,
        ours_total as f64 / MB,
        count_files(nnflow_cases)
    );
    if let Some(theirs) = nnunet_cases {
        let b2nd = bytes_under(theirs, &|name: &str| name.ends_with(".b2nd"));
        let total = bytes_under(theirs, &all);
        println!(
            "   nnU-Net 2.8.1 blosc2 (.b2nd):    {:>9.1} MB arrays, {:>9.1} MB with properties, {} files",
            b2nd as f64 / MB,
            total as f64 / MB,
            count_files(theirs)
        );
        println!(
            "   nnflow / nnU-Net arrays: {:.3} ({})",
            ours_arrays as f64 / b2nd as f64,
            if ours_arrays <= b2nd {
                "not larger"
            } else {
                "LARGER"
            }
        );
    }
}

fn main() {
    let config = Config::from_env();
    println!(
        "case format benchmark: {} cases of {} voxels (z,y,x), spacing {} (variation {}); timings \
         repeated {}x on a machine shared with other work (noisy: compare within one run)",
        config.cases, config.shape, config.spacing, config.spacing_variation, config.repeat
    );
    ensure_dataset(&config);
    let work = tempfile::Builder::new()
        .prefix("nnflow-bench-case-format")
        .tempdir()
        .expect("a work folder");
    let (plans, nnflow_cases) = nnflow_preprocess(&config, work.path());
    let nnunet_cases = if config.nnunet {
        nnunet_preprocess(&config, work.path())
    } else {
        None
    };
    let patch = patch_of(&plans);
    let ids = list_cases(&nnflow_cases);
    disk_footprint(&nnflow_cases, nnunet_cases.as_deref(), ids.len());
    if let Some(theirs) = nnunet_cases.as_ref().filter(|_| !config.keep) {
        // nnU-Net's cases can be large; what follows needs only nnflow's
        let _ = fs::remove_dir_all(theirs);
    }

    // 2. write time, case by case, both formats into their own folders
    let chunked = work.path().join("write-chunked");
    let old = work.path().join("write-npy");
    let (mut chunked_seconds, mut npy_seconds) = (Vec::new(), Vec::new());
    let mut voxels = 0usize;
    for id in &ids {
        let case = read_case(&nnflow_cases, id).expect("read a preprocessed case");
        voxels += case.data.len();
        for _ in 0..config.repeat {
            let started = Instant::now();
            write_case(&chunked, id, &case, &patch).expect("write the chunked case");
            chunked_seconds.push(started.elapsed().as_secs_f64());
            fs::create_dir_all(&old).expect("create the .npy folder");
            let started = Instant::now();
            write_npy_case(&old, id, &case);
            npy_seconds.push(started.elapsed().as_secs_f64());
        }
    }
    let (chunked_ms, chunked_best) = summary(chunked_seconds);
    let (npy_ms, npy_best) = summary(npy_seconds);
    println!();
    println!(
        "2. write time per case ({:.1} M voxels on average, cores: {})",
        voxels as f64 / ids.len() as f64 / 1e6,
        rayon::current_num_threads()
    );
    println!("   chunked (zarr):  median {chunked_ms:>8.1} ms, fastest {chunked_best:>8.1} ms");
    println!("   .npy:            median {npy_ms:>8.1} ms, fastest {npy_best:>8.1} ms");
    let npy_bytes = bytes_under(&old, &|name: &str| name.ends_with(".npy"));
    println!(
        "   on disk: .npy {:.1} MB, chunked {:.1} MB",
        npy_bytes as f64 / MB,
        bytes_under(&chunked, &|name: &str| !name.ends_with(".json")) as f64 / MB
    );

    // 3. patch reads on one thread, as one augmentation worker reads them
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("a thread pool");
    let (mut chunked_seconds, mut npy_seconds) = (Vec::new(), Vec::new());
    let mut checksum = (0.0f64, 0.0f64);
    for (index, id) in ids.iter().enumerate() {
        let reader = CaseReader::open(&nnflow_cases, id).expect("open a case");
        let mapped = MappedNpy::open(&old, id);
        for round in 0..config.repeat {
            let lbs = corners(
                reader.shape,
                patch,
                config.patches,
                (index * 1000 + round) as u64 + 17,
            );
            let started = Instant::now();
            one.install(|| {
                for &lb in &lbs {
                    let sample = reader.crop(lb, patch).expect("a crop");
                    checksum.0 += f64::from(sample.data.sum());
                }
            });
            chunked_seconds.push(started.elapsed().as_secs_f64() / lbs.len() as f64);
            let started = Instant::now();
            for &lb in &lbs {
                let (data, _) = mapped.crop(lb, patch);
                checksum.1 += f64::from(data.sum());
            }
            npy_seconds.push(started.elapsed().as_secs_f64() / lbs.len() as f64);
        }
    }
    let (chunked_ms, chunked_best) = summary(chunked_seconds);
    let (npy_ms, npy_best) = summary(npy_seconds);
    println!();
    println!("3. patch read time, {patch:?} crops (warm page cache, one thread)");
    println!("   chunked (decode touched chunks): median {chunked_ms:>7.2} ms, fastest {chunked_best:>7.2} ms per patch");
    println!(
        "   .npy memory-mapped:              median {npy_ms:>7.2} ms, fastest {npy_best:>7.2} ms per patch"
    );
    let agree = (checksum.0 - checksum.1).abs() <= 1e-6 * checksum.0.abs().max(1.0);
    println!("   same voxels read: {}", if agree { "yes" } else { "NO" });
    check_same_crop(&nnflow_cases, &old, &ids[0], patch);

    if config.train {
        data_wait(&config, work.path());
    }
    if config.keep {
        println!("work folder kept: {}", work.keep().display());
    }
}

/// One crop through both readers, voxel for voxel.
fn check_same_crop(chunked: &Path, old: &Path, id: &str, patch: [usize; 3]) {
    let reader = CaseReader::open(chunked, id).expect("open a case");
    let mapped = MappedNpy::open(old, id);
    let lb = [-3, 5, -7];
    let ours = reader.crop(lb, patch).expect("a crop");
    let (data, seg) = mapped.crop(lb, patch);
    let same = ours.data == data && ours.seg == seg;
    println!(
        "   one crop compared voxel for voxel: {}",
        if same { "equal" } else { "DIFFERENT" }
    );
}

/// 4. The demo pipeline's fold-0 training run by each executable: the batches' wait.
fn data_wait(config: &Config, work: &Path) {
    println!();
    println!("4. training data wait (demo pipeline, 3d_fullres fold 0, 10 epochs x 12 iterations)");
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    for (label, exe) in &config.train_exes {
        let project = work.join(format!(
            "train-{}",
            label.replace(|c: char| !c.is_alphanumeric(), "_")
        ));
        fs::create_dir_all(&project).expect("create the project");
        for file in ["demo.toml", "nnunet.toml"] {
            fs::copy(demo.join(file), project.join(file)).expect("copy the pipeline");
        }
        let started = Instant::now();
        let text = run_checked(
            Command::new(exe)
                .arg("run")
                .arg(project.join("demo.toml"))
                .arg("train")
                .args(["--set", "configurations=[\"3d_fullres\"]", "--set", "folds=[0]"])
                .args(["-j", &config.jobs.to_string(), "--json"])
                .current_dir(&project)
                .env("NNFLOW_CACHE_DIR", project.join("cache")),
        );
        let report: serde_json::Value = serde_json::from_str(&text).expect("nnflow's --json report");
        let train = report["stages"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["id"].as_str().is_some_and(|id| id.starts_with("train")))
            .and_then(|s| s["outputs"].as_str())
            .map(PathBuf::from)
            .expect("a train stage");
        let history: Vec<serde_json::Value> = serde_json::from_str(
            &fs::read_to_string(train.join("training_history.json")).expect("training_history.json"),
        )
        .expect("training_history.json parses");
        let sum = |key: &str| history.iter().filter_map(|e| e[key].as_f64()).sum::<f64>();
        println!(
            "   {label:<12} data wait {:>7.2} s of {:>7.1} s of epochs ({} epochs; run {:.0} s)",
            sum("data_wait_seconds"),
            sum("epoch_seconds"),
            history.len(),
            started.elapsed().as_secs_f64()
        );
    }
}
