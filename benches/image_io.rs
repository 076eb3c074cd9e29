//! Image read / write throughput: nnflow's NIfTI reader and writer against the `nifti` crate's on a
//! realistic volume (512 x 512 x 100, int16 CT-like and float32, `.nii` and `.nii.gz`), what each
//! NIfTI reader accepts (multi-member gzip, NIfTI-2), and every other format through
//! `nnflow::data::image::{read, write_labels}` (a format whose reader or writer fails is skipped,
//! with the reason). nnflow's writers sync each file to disk before renaming it into place; the
//! `nifti` crate's does not, which favours it on small images.
//!
//! `cargo bench --bench image_io`; `NNFLOW_BENCH_SHAPE=z,y,x` (default 100,512,512) and
//! `NNFLOW_BENCH_REPS=n` (default 3, the best time is shown) change the work.
//! MB/s counts the voxel data in its stored type (2 bytes per int16 voxel, 4 per float32).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ndarray::Array3;
use nifti::writer::WriterOptions;
use nifti::{IntoNdArray, NiftiObject, ReaderOptions};
use nnflow::data::image::{self, Geometry};
use nnflow::data::nifti::{self as nnifti, Header, NiftiElement};

fn main() {
    let shape = std::env::var("NNFLOW_BENCH_SHAPE")
        .ok()
        .and_then(|s| {
            let v: Vec<usize> = s.split(',').filter_map(|p| p.trim().parse().ok()).collect();
            <[usize; 3]>::try_from(v).ok()
        })
        .unwrap_or([100, 512, 512]);
    let reps: usize = std::env::var("NNFLOW_BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1);
    let dir = tempfile::tempdir().expect("temporary folder");
    let ct = ct_like(shape);
    let float = ct.mapv(|v| f32::from(v) * 0.37 + 0.125);
    let header = Header::axis_aligned(shape, [2.5, 0.7, 0.7], [-180.0, -180.0, -120.0]);
    let [z, y, x] = shape;
    println!("image_io: volume (z, y, x) = ({z}, {y}, {x}), best of {reps}; MB = 10^6 bytes of voxel data");

    println!("\n== NIfTI: nnflow vs the nifti crate (0.18) ==");
    println!("{:<34} {:>10} {:>10}", "", "ms/image", "MB/s");
    for ending in [".nii", ".nii.gz"] {
        nifti_rows(dir.path(), "int16", ending, &ct, &header, reps);
        nifti_rows(dir.path(), "float32", ending, &float, &header, reps);
    }

    println!("\n== What each NIfTI reader accepts ==");
    capabilities(dir.path(), &ct, &header);

    println!("\n== Every format through nnflow::data::image (CT-like HU + 1024 via write_labels / read) ==");
    println!("{:<34} {:>10} {:>10}", "", "ms/image", "MB/s");
    // Stored as many scanners store CT, unsigned (HU + 1024): label writers refuse negative values.
    let ct = ct.mapv(|v| v + 1024);
    let geometry = Geometry::from_nifti(header.clone());
    let mb = (ct.len() * 2) as f64 / 1e6;
    for ending in [
        ".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".tiff", ".tif",
    ] {
        let path = dir.path().join(format!("api{ending}"));
        let written = best(reps, || image::write_labels(&path, &ct, &geometry));
        let seconds = match written {
            Ok(s) => s,
            Err(e) => {
                println!(
                    "{:<34} skipped: write_labels failed: {e}",
                    format!("{ending} write")
                );
                continue;
            }
        };
        row(&format!("{ending} write"), seconds, mb);
        match best(reps, || image::read(&path)) {
            Ok(s) => {
                let decoded = image::read(&path).expect("read just worked");
                let same = decoded.channels.len() == 1 && decoded.channels[0] == ct.mapv(f32::from);
                row(
                    &format!("{ending} read{}", if same { "" } else { " (VALUES DIFFER)" }),
                    s,
                    mb,
                );
            }
            Err(e) => println!("{:<34} skipped: read failed: {e}", format!("{ending} read")),
        }
    }
    println!(
        "{:<34} skipped: nnflow reads DICOM series but writes none",
        "DICOM series"
    );
}

/// nnflow write + read, the nifti crate's read + write, for one stored type and ending.
fn nifti_rows<T>(dir: &Path, dtype: &str, ending: &str, data: &Array3<T>, header: &Header, reps: usize)
where
    T: nifti::DataElement + bytemuck::Pod + NiftiElement + Clone + 'static,
{
    let mb = (data.len() * std::mem::size_of::<T>()) as f64 / 1e6;
    let ours = dir.join(format!("nnflow_{dtype}{ending}"));
    let theirs = dir.join(format!("crate_{dtype}{ending}"));
    let label = |who: &str, what: &str| format!("{dtype} {ending} {who} {what}");
    let s = best(reps, || nnifti::write(&ours, data, header)).expect("nnflow write");
    row(&label("nnflow", "write"), s, mb);
    let s = best(reps, || nnifti::read(&ours)).expect("nnflow read");
    row(&label("nnflow", "read"), s, mb);
    let s = best(reps, || {
        ReaderOptions::new()
            .read_file(&ours)
            .and_then(|object| object.into_volume().into_ndarray::<f32>())
    });
    match s {
        Ok(s) => row(&label("nifti crate", "read"), s, mb),
        Err(e) => println!("{:<34} failed: {e}", label("nifti crate", "read")),
    }
    let crate_header = ReaderOptions::new()
        .read_file(&ours)
        .map(|object| object.header().clone());
    // The crate indexes [x, y, z]: our [z, y, x] array, axes reversed.
    let xyz = data.t();
    match crate_header.and_then(|h| {
        best(reps, || {
            WriterOptions::new(&theirs).reference_header(&h).write_nifti(&xyz)
        })
    }) {
        Ok(s) => row(&label("nifti crate", "write"), s, mb),
        Err(e) => println!("{:<34} failed: {e}", label("nifti crate", "write")),
    }
}

/// Multi-member gzip and NIfTI-2, read by nnflow and by the nifti crate.
fn capabilities(dir: &Path, ct: &Array3<i16>, header: &Header) {
    // A small image, so the check is quick: its first 4 slices.
    let small = ct.slice(ndarray::s![..4, .., ..]).to_owned();
    let mut small_header = header.clone();
    small_header.dim[3] = 4;
    let plain = dir.join("small.nii");
    nnifti::write(&plain, &small, &small_header).expect("write");
    let bytes = std::fs::read(&plain).expect("read back");
    // Two gzip members, as pigz and other parallel compressors write.
    let mut multi = gzip(&bytes[..bytes.len() / 2]);
    multi.extend(gzip(&bytes[bytes.len() / 2..]));
    let multi_path = dir.join("multimember.nii.gz");
    std::fs::write(&multi_path, multi).expect("write");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nifti");
    let cases: [(&str, PathBuf); 3] = [
        ("multi-member gzip .nii.gz", multi_path),
        (
            "NIfTI-2 (nibabel) .nii.gz",
            fixtures.join("nifti2_oblique_float32.nii.gz"),
        ),
        ("4D, 3 volumes .nii.gz", fixtures.join("image4d_t3_int16.nii.gz")),
    ];
    let expected = small.mapv(f32::from);
    for (what, path) in cases {
        let ours = match nnifti::read_channels(&path) {
            Ok((channels, _)) if what.starts_with("multi") && channels[0] != expected => {
                "WRONG VALUES".to_string()
            }
            Ok((channels, _)) => format!("ok ({} channel(s))", channels.len()),
            Err(e) => format!("error: {e}"),
        };
        let theirs = match ReaderOptions::new()
            .read_file(&path)
            .and_then(|o| o.into_volume().into_ndarray::<f32>())
        {
            Ok(array) if what.starts_with("multi") => {
                let same = array.iter().eq(expected.t().iter());
                if same {
                    "ok".to_string()
                } else {
                    "WRONG VALUES".to_string()
                }
            }
            Ok(array) => format!("ok (shape {:?})", array.shape()),
            Err(e) => format!("error: {e}"),
        };
        println!("{what:<28} nnflow: {ours}\n{:<28} nifti crate: {theirs}", "");
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).expect("gzip");
    encoder.finish().expect("gzip")
}

/// A CT-like int16 volume: air (-1000) around an elliptic body of soft tissue with noise and a
/// brighter "bone" ring, deterministic.
fn ct_like([nz, ny, nx]: [usize; 3]) -> Array3<i16> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    Array3::from_shape_fn((nz, ny, nx), |(_, y, x)| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let noise = (state % 41) as i16 - 20;
        let (dy, dx) = (
            (y as f64 - ny as f64 / 2.0) / (ny as f64 * 0.4),
            (x as f64 - nx as f64 / 2.0) / (nx as f64 * 0.45),
        );
        let r = (dy * dy + dx * dx).sqrt();
        if r > 1.0 {
            -1000 + noise
        } else if r > 0.9 {
            700 + noise
        } else {
            40 + noise
        }
    })
}

/// The best of `reps` runs, in seconds, or the first error.
fn best<T, E>(reps: usize, mut f: impl FnMut() -> Result<T, E>) -> Result<f64, E> {
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let start = Instant::now();
        let out = f()?;
        best = best.min(start.elapsed().as_secs_f64());
        drop(out);
    }
    Ok(best)
}

fn row(label: &str, seconds: f64, mb: f64) {
    println!("{label:<34} {:>10.1} {:>10.1}", seconds * 1e3, mb / seconds);
}
