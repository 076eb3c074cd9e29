//! DICOM series: a folder of single-frame CT / MR files read as one 3D image, the way SimpleITK
//! reads a series (`ImageSeriesReader` over `GetGDCMSeriesFileNames(folder)`), but stricter.
//!
//! What is read, and how it compares with SimpleITK 2.5.7 (ITK 5.4 with GDCM):
//!
//! - **Files.** Every plain file in the folder, not its subfolders (GDCM does not recurse
//!   either). Hidden files (`.name`) are skipped; so is every file without the DICOM Part 10
//!   signature (`DICM` after the 128-byte preamble: README, checksums, thumbnails) and every
//!   DICOM file without Pixel Data (DICOMDIR, structured reports, presentation states), as GDCM
//!   skips what its image reader cannot read.
//! - **One series.** GDCM returns the first series (by SeriesInstanceUID) and ignores the rest;
//!   nnflow refuses a folder holding several and lists them.
//! - **Slice order.** Along the slice normal (row cosine x column cosine of
//!   ImageOrientationPatient), ascending by `normal . ImagePositionPatient`: GDCM's
//!   `ImagePositionPatientOrdering`. File names and InstanceNumber play no part, so a series
//!   stored head-to-feet reads like one stored feet-to-head (origin = the slice furthest against
//!   the normal). Where two slices share a position GDCM falls back to InstanceNumber order;
//!   nnflow refuses, naming both files.
//! - **Geometry.** ITK's: origin = ImagePositionPatient of the first slice in that order;
//!   direction = the first slice's row cosine, column cosine and normal, re-orthogonalised as
//!   `itk::GDCMImageIO` does (normal = row x column normalised, row = column x normal normalised,
//!   column = normal x row); spacing = (PixelSpacing\[1\], PixelSpacing\[0\],
//!   |last position - first position| / (slices - 1)). A single slice gets GDCM's z spacing:
//!   |SpacingBetweenSlices| where present and non-zero, else 1 (SimpleITK fails on a zero).
//! - **Checks ITK does not make.** Slices must agree on Rows, Columns, PixelSpacing and
//!   orientation; consecutive gaps along the normal must be within 1% of the median gap (ITK
//!   only warns above 1e-4 relative and builds the image anyway). 1% catches a missing slice (a gap
//!   twice the others) and mixed spacings, yet accepts positions written with two decimals (a
//!   0.625 mm gap stored as 0.62 / 0.63); a slice then sits at most about 1% of a slice off
//!   the grid ITK and nnflow assume. The stack must also run along the normal (in-plane drift
//!   within 1% of the gap): a gantry-tilted stack would need resampling, and ITK's orthogonal
//!   direction would misplace it.
//! - **Voxels.** Stored values masked to BitsStored (shifted down when HighBit is not
//!   BitsStored - 1), sign-extended when PixelRepresentation is 1, then RescaleSlope x value +
//!   RescaleIntercept per slice in f64, then f32: what GDCM computes. SimpleITK's default output
//!   type comes from the *first* slice alone, so when a later slice has a fractional slope the
//!   default read truncates it; nnflow's values equal SimpleITK's with output type Float32.
//!   MONOCHROME1 is not inverted (neither does ITK); colour images are refused.
//! - **Transfer syntaxes.** Implicit VR little endian, explicit VR little and big endian,
//!   deflated explicit VR little endian, RLE lossless, and JPEG baseline / extended / lossless
//!   (processes 1, 2-4, 14 and 14 SV1) through pure-Rust decoders. JPEG 2000, JPEG-LS, JPEG XL,
//!   MPEG and HTJ2K are refused with the file, the UID and its name. Decoded 16-bit samples are
//!   taken as little endian: nnflow runs on little-endian machines.
//! - **Unsupported.** Multi-frame files (enhanced CT / MR, NumberOfFrames > 1) are refused,
//!   naming the file, as are files without ImagePositionPatient / ImageOrientationPatient /
//!   PixelSpacing (GDCM would make up a default geometry).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, FileMetaTable, OpenFileOptions, Tag};
use dicom_pixeldata::PixelDecoder;
use dicom_transfer_syntax_registry::{TransferSyntaxIndex, TransferSyntaxRegistry};
use ndarray::Array3;
use rayon::prelude::*;

use super::{Decoded, Geometry, ImageError};

/// Relative tolerance on consecutive slice gaps (and in-plane drift), see the module docs.
const GAP_TOLERANCE: f64 = 1e-2;
/// Positions along the normal closer than this (mm) are the same position.
const SAME_POSITION_MM: f64 = 1e-4;
/// Absolute tolerance on direction cosines (as GDCM's `DirectionCosines::IsValid`) and relative
/// tolerance on PixelSpacing when slices are compared.
const COSINE_TOLERANCE: f64 = 1e-3;
const PIXEL_SPACING_TOLERANCE: f64 = 1e-4;

/// Reads the DICOM series in `folder` as one image (one channel).
pub fn read_series(folder: &Path) -> Result<Decoded, ImageError> {
    let candidates = list_files(folder)?;
    let opened: Vec<Option<Opened>> = candidates
        .par_iter()
        .map(|path| open(path))
        .collect::<Result<_, _>>()?;
    let skipped = opened.iter().filter(|o| o.is_none()).count();
    let files: Vec<Opened> = opened.into_iter().flatten().collect();
    if files.is_empty() {
        return Err(ImageError::invalid(
            folder,
            format!(
                "no DICOM image files in this folder ({skipped} files skipped: without the DICOM \
                 signature or without pixel data; hidden files and subfolders are not read)"
            ),
        ));
    }
    check_one_series(folder, &files)?;

    let mut slices: Vec<Slice> = files.into_iter().map(Slice::new).collect::<Result<_, _>>()?;
    check_consistent(&slices)?;
    // The unit slice normal (sorting needs only its direction; gaps are measured in mm).
    let orientation = itk_direction(&slices[0].path, slices[0].iop)?;
    let normal = orientation.map(|row| row[2]);
    for slice in &mut slices {
        slice.distance = dot(normal, slice.ipp);
    }
    slices.sort_by(|a, b| {
        a.distance
            .total_cmp(&b.distance)
            .then_with(|| a.path.cmp(&b.path))
    });
    let spacing_z = check_stack(&slices, normal)?;

    let first = &slices[0];
    let direction = itk_direction(&first.path, first.iop)?;
    let (rows, cols) = (usize::from(first.rows), usize::from(first.cols));
    let spacing = [first.pixel_spacing[1], first.pixel_spacing[0], spacing_z];
    let geometry = Geometry::from_itk(3, [slices.len(), rows, cols], spacing, first.ipp, direction);

    let planes: Vec<Vec<f32>> = slices.par_iter().map(Slice::decode).collect::<Result<_, _>>()?;
    let mut voxels = Vec::with_capacity(slices.len() * rows * cols);
    for plane in planes {
        voxels.extend(plane);
    }
    let channel = Array3::from_shape_vec((slices.len(), rows, cols), voxels)
        .expect("every decoded slice has rows x columns values");
    Ok(Decoded {
        channels: vec![channel],
        geometry,
    })
}

/// The plain, non-hidden files of `folder`, by name.
fn list_files(folder: &Path) -> Result<Vec<PathBuf>, ImageError> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(folder).map_err(ImageError::io(folder))? {
        let entry = entry.map_err(ImageError::io(folder))?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        // Follows symlinks: a linked slice counts, a linked folder does not.
        if path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// A DICOM file holding pixel data, with what tells series apart.
struct Opened {
    path: PathBuf,
    object: DefaultDicomObject,
    series_uid: String,
}

/// Whether `path` carries the DICOM Part 10 signature: "DICM" after a 128-byte preamble.
fn has_dicom_signature(path: &Path) -> Result<bool, ImageError> {
    let mut head = [0u8; 132];
    let mut file = File::open(path).map_err(ImageError::io(path))?;
    let mut filled = 0;
    while filled < head.len() {
        match file.read(&mut head[filled..]).map_err(ImageError::io(path))? {
            0 => return Ok(false),
            n => filled += n,
        }
    }
    Ok(&head[128..] == b"DICM")
}

/// Opens one file: `None` when it is not a DICOM image (see the module docs).
fn open(path: &Path) -> Result<Option<Opened>, ImageError> {
    if !has_dicom_signature(path)? {
        return Ok(None);
    }
    let object = OpenFileOptions::new().open_file(path).map_err(|error| {
        // An unknown transfer syntax stops the parser: name it from the file meta group.
        if let Some(uid) = meta_transfer_syntax(path) {
            if TransferSyntaxRegistry.get(&uid).is_none() {
                return unsupported_syntax(path, &uid);
            }
        }
        ImageError::invalid(path, format!("not a readable DICOM file: {}", chain(&error)))
    })?;
    if object.get(tags::PIXEL_DATA).is_none() {
        return Ok(None);
    }
    let series_uid = text(&object, tags::SERIES_INSTANCE_UID).unwrap_or_default();
    Ok(Some(Opened {
        path: path.to_path_buf(),
        object,
        series_uid,
    }))
}

/// The transfer syntax UID in the file meta group of `path`, if that much can be read.
fn meta_transfer_syntax(path: &Path) -> Option<String> {
    let mut file = File::open(path).ok()?;
    let mut preamble = [0u8; 128];
    file.read_exact(&mut preamble).ok()?;
    let meta = FileMetaTable::from_reader(std::io::BufReader::new(file)).ok()?;
    Some(meta.transfer_syntax().to_string())
}

fn unsupported_syntax(path: &Path, uid: &str) -> ImageError {
    let name = TransferSyntaxRegistry
        .get(uid)
        .map_or("unknown transfer syntax", |ts| ts.name());
    ImageError::invalid(
        path,
        format!(
            "transfer syntax {uid} ({name}) is not supported; nnflow decodes implicit and \
             explicit VR little endian, explicit VR big endian, deflated explicit VR little \
             endian, RLE lossless and JPEG baseline / extended / lossless (convert e.g. with \
             `gdcmconv --raw` or `dcmdjpeg`)"
        ),
    )
}

/// An error with its sources, one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn text(object: &DefaultDicomObject, tag: Tag) -> Option<String> {
    let value = object.get(tag)?.to_str().ok()?;
    Some(value.trim_end_matches(['\0', ' ']).trim().to_string())
}

fn check_one_series(folder: &Path, files: &[Opened]) -> Result<(), ImageError> {
    let mut series: BTreeMap<&str, Vec<&Opened>> = BTreeMap::new();
    for file in files {
        series.entry(file.series_uid.as_str()).or_default().push(file);
    }
    if series.len() == 1 {
        return Ok(());
    }
    let list: Vec<String> = series
        .iter()
        .map(|(uid, members)| {
            let object = &members[0].object;
            let number = text(object, tags::SERIES_NUMBER).unwrap_or_default();
            let description = text(object, tags::SERIES_DESCRIPTION).unwrap_or_default();
            let uid = if uid.is_empty() {
                "(no SeriesInstanceUID)"
            } else {
                uid
            };
            format!(
                "{uid} (series number {number:?}, {description:?}, {} files, e.g. {})",
                members.len(),
                file_name(&members[0].path)
            )
        })
        .collect();
    Err(ImageError::invalid(
        folder,
        format!(
            "the folder holds {} DICOM series, nnflow reads one series per folder: {}",
            series.len(),
            list.join("; ")
        ),
    ))
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// One slice's header, checked, and its object for decoding.
struct Slice {
    path: PathBuf,
    object: DefaultDicomObject,
    rows: u16,
    cols: u16,
    ipp: [f64; 3],
    iop: [f64; 6],
    /// (row spacing, column spacing), as stored.
    pixel_spacing: [f64; 2],
    spacing_between_slices: Option<f64>,
    slope: f64,
    intercept: f64,
    bits_allocated: u16,
    bits_stored: u16,
    high_bit: u16,
    signed: bool,
    /// Position along the series' normal, set once all slices are read.
    distance: f64,
}

impl Slice {
    fn new(opened: Opened) -> Result<Slice, ImageError> {
        let Opened { path, object, .. } = opened;
        let uid = object.meta().transfer_syntax().to_string();
        match TransferSyntaxRegistry.get(&uid) {
            Some(ts) if ts.can_decode_all() => {}
            _ => return Err(unsupported_syntax(&path, &uid)),
        }
        let invalid = |detail: String| ImageError::invalid(&path, detail);

        let frames = match object.get(tags::NUMBER_OF_FRAMES) {
            Some(element) => element.to_int::<i64>().unwrap_or(1),
            None => 1,
        };
        if frames > 1 {
            return Err(invalid(format!(
                "multi-frame DICOM ({frames} frames, e.g. enhanced CT / MR) is not supported: \
                 nnflow reads series of single-frame files"
            )));
        }
        let samples = uint(&object, &path, tags::SAMPLES_PER_PIXEL, "SamplesPerPixel")?;
        let photometric = text(&object, tags::PHOTOMETRIC_INTERPRETATION).unwrap_or_default();
        if samples != 1 || !photometric.starts_with("MONOCHROME") {
            return Err(invalid(format!(
                "only grayscale images are supported (SamplesPerPixel 1, MONOCHROME1/2); this \
                 file has SamplesPerPixel {samples}, PhotometricInterpretation {photometric:?}"
            )));
        }
        let rows = uint(&object, &path, tags::ROWS, "Rows")?;
        let cols = uint(&object, &path, tags::COLUMNS, "Columns")?;
        if rows == 0 || cols == 0 {
            return Err(invalid(format!("empty image: Rows {rows}, Columns {cols}")));
        }
        let bits_allocated = uint(&object, &path, tags::BITS_ALLOCATED, "BitsAllocated")?;
        if ![8, 16, 32].contains(&bits_allocated) {
            return Err(invalid(format!(
                "BitsAllocated {bits_allocated} is not supported (8, 16 or 32)"
            )));
        }
        let bits_stored = match object.get(tags::BITS_STORED) {
            Some(_) => uint(&object, &path, tags::BITS_STORED, "BitsStored")?,
            None => bits_allocated,
        };
        let high_bit = match object.get(tags::HIGH_BIT) {
            Some(_) => uint(&object, &path, tags::HIGH_BIT, "HighBit")?,
            None => bits_stored.saturating_sub(1),
        };
        if bits_stored == 0
            || bits_stored > bits_allocated
            || high_bit >= bits_allocated
            || high_bit + 1 < bits_stored
        {
            return Err(invalid(format!(
                "inconsistent pixel format: BitsAllocated {bits_allocated}, BitsStored \
                 {bits_stored}, HighBit {high_bit}"
            )));
        }
        let signed = match object.get(tags::PIXEL_REPRESENTATION) {
            Some(_) => uint(&object, &path, tags::PIXEL_REPRESENTATION, "PixelRepresentation")? == 1,
            None => false,
        };

        let ipp = floats::<3>(
            &object,
            &path,
            tags::IMAGE_POSITION_PATIENT,
            "ImagePositionPatient",
        )?;
        let iop = floats::<6>(
            &object,
            &path,
            tags::IMAGE_ORIENTATION_PATIENT,
            "ImageOrientationPatient",
        )?;
        let pixel_spacing = floats::<2>(&object, &path, tags::PIXEL_SPACING, "PixelSpacing")?;
        if pixel_spacing.iter().any(|s| *s <= 0.0) {
            return Err(invalid(format!(
                "PixelSpacing {pixel_spacing:?} must be positive"
            )));
        }
        let spacing_between_slices = optional_float(
            &object,
            &path,
            tags::SPACING_BETWEEN_SLICES,
            "SpacingBetweenSlices",
        )?;
        let slope = optional_float(&object, &path, tags::RESCALE_SLOPE, "RescaleSlope")?.unwrap_or(1.0);
        let intercept =
            optional_float(&object, &path, tags::RESCALE_INTERCEPT, "RescaleIntercept")?.unwrap_or(0.0);
        Ok(Slice {
            path,
            object,
            rows,
            cols,
            ipp,
            iop,
            pixel_spacing,
            spacing_between_slices,
            slope,
            intercept,
            bits_allocated,
            bits_stored,
            high_bit,
            signed,
            distance: 0.0,
        })
    }

    /// The slice's values, row by row, rescaled.
    fn decode(&self) -> Result<Vec<f32>, ImageError> {
        let decoded = self.object.decode_pixel_data().map_err(|error| {
            ImageError::invalid(&self.path, format!("cannot decode pixel data: {}", chain(&error)))
        })?;
        let data = decoded.data();
        let count = usize::from(self.rows) * usize::from(self.cols);
        let bytes = usize::from(self.bits_allocated / 8);
        if data.len() < count * bytes {
            return Err(ImageError::invalid(
                &self.path,
                format!(
                    "pixel data too short: {} bytes for {} x {} pixels of {} bits",
                    data.len(),
                    self.rows,
                    self.cols,
                    self.bits_allocated
                ),
            ));
        }
        let shift = u32::from(self.high_bit + 1 - self.bits_stored);
        let stored_bits = u32::from(self.bits_stored);
        let mask = if stored_bits == 32 {
            u32::MAX
        } else {
            (1u32 << stored_bits) - 1
        };
        let (slope, intercept, signed) = (self.slope, self.intercept, self.signed);
        let value = |raw: u32| -> f32 {
            let bits = (raw >> shift) & mask;
            let stored = if signed && stored_bits < 32 && bits & (1 << (stored_bits - 1)) != 0 {
                i64::from(bits) - (1i64 << stored_bits)
            } else if signed {
                i64::from(bits as i32)
            } else {
                i64::from(bits)
            };
            (stored as f64 * slope + intercept) as f32
        };
        let values = match bytes {
            1 => data[..count].iter().map(|&b| value(u32::from(b))).collect(),
            2 => data[..count * 2]
                .chunks_exact(2)
                .map(|c| value(u32::from(u16::from_le_bytes([c[0], c[1]]))))
                .collect(),
            _ => data[..count * 4]
                .chunks_exact(4)
                .map(|c| value(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
        };
        Ok(values)
    }
}

fn uint(object: &DefaultDicomObject, path: &Path, tag: Tag, name: &str) -> Result<u16, ImageError> {
    let element = object
        .get(tag)
        .ok_or_else(|| ImageError::invalid(path, format!("no {name} {tag}")))?;
    element
        .to_int::<u16>()
        .map_err(|error| ImageError::invalid(path, format!("unreadable {name} {tag}: {error}")))
}

fn floats<const N: usize>(
    object: &DefaultDicomObject,
    path: &Path,
    tag: Tag,
    name: &str,
) -> Result<[f64; N], ImageError> {
    let element = object.get(tag).ok_or_else(|| {
        ImageError::invalid(
            path,
            format!("no {name} {tag}: nnflow needs it to place the slice"),
        )
    })?;
    let values = element
        .to_multi_float64()
        .map_err(|error| ImageError::invalid(path, format!("unreadable {name} {tag}: {error}")))?;
    let array: [f64; N] = values.as_slice().try_into().map_err(|_| {
        ImageError::invalid(
            path,
            format!("{name} {tag} has {} values, expected {N}", values.len()),
        )
    })?;
    if array.iter().any(|v| !v.is_finite()) {
        return Err(ImageError::invalid(
            path,
            format!("{name} {tag} is not finite: {array:?}"),
        ));
    }
    Ok(array)
}

fn optional_float(
    object: &DefaultDicomObject,
    path: &Path,
    tag: Tag,
    name: &str,
) -> Result<Option<f64>, ImageError> {
    let Some(element) = object.get(tag) else {
        return Ok(None);
    };
    if element
        .to_str()
        .map(|s| s.trim_end_matches(['\0', ' ']).trim().is_empty())
        .unwrap_or(false)
    {
        return Ok(None);
    }
    let value = element
        .to_float64()
        .map_err(|error| ImageError::invalid(path, format!("unreadable {name} {tag}: {error}")))?;
    if !value.is_finite() {
        return Err(ImageError::invalid(path, format!("{name} {tag} is not finite")));
    }
    Ok(Some(value))
}

/// Rows, Columns, PixelSpacing and orientation must match the first file's.
fn check_consistent(slices: &[Slice]) -> Result<(), ImageError> {
    let first = &slices[0];
    for slice in &slices[1..] {
        let mismatch = |what: &str, this: String, other: String| {
            ImageError::invalid(
                &slice.path,
                format!(
                    "{what} {this} differs from {other} in {} of the same series",
                    file_name(&first.path)
                ),
            )
        };
        if (slice.rows, slice.cols) != (first.rows, first.cols) {
            return Err(mismatch(
                "Rows x Columns",
                format!("{} x {}", slice.rows, slice.cols),
                format!("{} x {}", first.rows, first.cols),
            ));
        }
        let same_spacing = slice
            .pixel_spacing
            .iter()
            .zip(&first.pixel_spacing)
            .all(|(a, b)| (a - b).abs() <= PIXEL_SPACING_TOLERANCE * a.abs().max(b.abs()));
        if !same_spacing {
            return Err(mismatch(
                "PixelSpacing",
                format!("{:?}", slice.pixel_spacing),
                format!("{:?}", first.pixel_spacing),
            ));
        }
        if slice
            .iop
            .iter()
            .zip(&first.iop)
            .any(|(a, b)| (a - b).abs() > COSINE_TOLERANCE)
        {
            return Err(mismatch(
                "ImageOrientationPatient",
                format!("{:?}", slice.iop),
                format!("{:?}", first.iop),
            ));
        }
    }
    Ok(())
}

/// Checks the sorted stack (distinct positions, uniform gaps, no in-plane drift) and gives ITK's
/// slice spacing.
fn check_stack(slices: &[Slice], normal: [f64; 3]) -> Result<f64, ImageError> {
    let n = slices.len();
    let (first, last) = (&slices[0], &slices[n - 1]);
    if n == 1 {
        return Ok(match first.spacing_between_slices {
            Some(s) if s != 0.0 => s.abs(),
            _ => 1.0,
        });
    }
    for pair in slices.windows(2) {
        if pair[1].distance - pair[0].distance < SAME_POSITION_MM {
            return Err(ImageError::invalid(
                &pair[1].path,
                format!(
                    "same slice position as {} (ImagePositionPatient {:?} and {:?}, {} mm along \
                     the slice normal): a series holds one slice per position",
                    file_name(&pair[0].path),
                    pair[1].ipp,
                    pair[0].ipp,
                    pair[0].distance
                ),
            ));
        }
    }
    let gaps: Vec<f64> = slices
        .windows(2)
        .map(|pair| pair[1].distance - pair[0].distance)
        .collect();
    // Gaps are compared with the median gap, so the message names the odd one out (a missing
    // slice) rather than the regular gaps around it.
    let mut sorted = gaps.clone();
    sorted.sort_by(f64::total_cmp);
    let typical = sorted[sorted.len() / 2];
    let (worst, gap) = gaps
        .iter()
        .copied()
        .enumerate()
        .max_by(|a, b| (a.1 - typical).abs().total_cmp(&(b.1 - typical).abs()))
        .expect("two slices or more have a gap");
    if (gap - typical).abs() > GAP_TOLERANCE * typical {
        let (before, after) = (&slices[worst], &slices[worst + 1]);
        return Err(ImageError::invalid(
            after.path.parent().unwrap_or(&after.path),
            format!(
                "slices are not evenly spaced: {} and {} are {gap} mm apart along the slice \
                 normal, most slices {typical} mm (a missing slice or mixed spacings; tolerance \
                 {}%)",
                file_name(&before.path),
                file_name(&after.path),
                GAP_TOLERANCE * 100.0
            ),
        ));
    }
    let span = last.distance - first.distance;
    let offset = sub(last.ipp, first.ipp);
    let along = span;
    let drift = sub(offset, normal.map(|c| c * along));
    let drift = dot(drift, drift).sqrt();
    if drift > GAP_TOLERANCE * along {
        return Err(ImageError::invalid(
            first.path.parent().unwrap_or(&first.path),
            format!(
                "the slices shift within their plane along the stack ({drift} mm from {} to {}, \
                 over {along} mm along the normal): a tilted-gantry or sheared series, which \
                 nnflow does not resample",
                file_name(&first.path),
                file_name(&last.path)
            ),
        ));
    }
    Ok(dot(offset, offset).sqrt() / (n - 1) as f64)
}

/// ITK's direction from ImageOrientationPatient (`itk::GDCMImageIO`), row-major, columns = axes.
fn itk_direction(path: &Path, iop: [f64; 6]) -> Result<[[f64; 3]; 3], ImageError> {
    let mut row = [iop[0], iop[1], iop[2]];
    let mut column = [iop[3], iop[4], iop[5]];
    // GDCM normalises cosines that are not unit length; it gives up (identity) where they are
    // not orthogonal either, which nnflow refuses.
    let valid = |r: [f64; 3], c: [f64; 3]| {
        (dot(r, r).sqrt() - 1.0).abs() < COSINE_TOLERANCE
            && (dot(c, c).sqrt() - 1.0).abs() < COSINE_TOLERANCE
            && dot(r, c).abs() < COSINE_TOLERANCE
    };
    if !valid(row, column) {
        row = normalize(row);
        column = normalize(column);
        if !valid(row, column) {
            return Err(ImageError::invalid(
                path,
                format!("ImageOrientationPatient {iop:?} is not two orthogonal unit vectors"),
            ));
        }
    }
    let slice = normalize(cross(row, column));
    let row = normalize(cross(column, slice));
    let column = cross(slice, row);
    let mut direction = [[0.0; 3]; 3];
    for i in 0..3 {
        direction[i] = [row[i], column[i], slice[i]];
    }
    Ok(direction)
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn sub(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}

/// `vnl_vector::normalize`: times the reciprocal of the length, as ITK computes it.
fn normalize(a: [f64; 3]) -> [f64; 3] {
    let squared = dot(a, a);
    if squared == 0.0 {
        a
    } else {
        let scale = 1.0 / squared.sqrt();
        a.map(|c| c * scale)
    }
}
