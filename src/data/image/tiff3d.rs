//! 3D TIFF, read and written as nnU-Net's Tiff3DIO does: the voxels are what `tifffile.imread`
//! gives (pages stacked along z) and the spacing comes from a JSON file next to the image,
//! `{"spacing": [z, y, x]}`. An image `case_0000.tif` takes it from `case.json` (Tiff3DIO strips
//! the ending and the five characters of the channel suffix), a segmentation `case.tif` from
//! `case.json` too. Without that file the spacing is (1, 1, 1), as in nnU-Net (which prints a
//! warning).
//!
//! This module also holds the TIFF decoding shared with 2D TIFF pictures ([`imread`]): the array
//! `tifffile.imread` returns, for the TIFFs nnU-Net users make (grey or RGB(A), 8 to 64-bit
//! integer or float samples, uncompressed, Deflate/zlib, LZW or PackBits, strips or tiles,
//! chunky or planar).

use std::fs::File;
use std::io::{BufReader, Cursor};
use std::path::{Path, PathBuf};

use ndarray::Array3;
use tiff::decoder::{ChunkType, Decoder, DecodingResult};
use tiff::encoder::colortype::{Gray16, Gray8};
use tiff::encoder::{Compression, DeflateLevel, TiffEncoder};
use tiff::tags::{PlanarConfiguration, Tag};

use super::{Decoded, Geometry, ImageError, Role};

/// The number of pages (image file directories) of a TIFF file.
pub fn page_count(path: &Path) -> Result<usize, ImageError> {
    let mut decoder = open(path)?;
    let mut pages = 1;
    while decoder.more_images() {
        decoder.next_image().map_err(|e| tiff_error(path, e))?;
        pages += 1;
    }
    Ok(pages)
}

/// Reads a 3D TIFF: `tifffile.imread` must give a 3D array `(z, y, x)` (a multi-page grey TIFF,
/// or, as in nnU-Net, a single RGB page read as a `(y, x, 3)` volume), one channel; the spacing
/// from the JSON file next to it (see the module docs).
pub fn read(path: &Path, role: Role) -> Result<Decoded, ImageError> {
    let array = imread(path)?;
    let shape: [usize; 3] = array.shape.as_slice().try_into().map_err(|_| {
        ImageError::invalid(
            path,
            format!(
                "a 3D TIFF must hold a 3D array (z, y, x), i.e. several grey pages of one size; this file holds \
                 an array of shape {:?} (a 2D picture is read as 2D only with the ending .tif)",
                array.shape
            ),
        )
    })?;
    let spacing = read_spacing(path, role)?;
    let voxels = Array3::from_shape_vec(shape, array.values).expect("imread returns shape-sized data");
    Ok(Decoded {
        channels: vec![voxels],
        geometry: Geometry::from_spacing_zyx(shape, spacing),
    })
}

/// Writes a label map `[z, y, x]` as a multi-page TIFF (uint8 when every label is below 255, else
/// uint16; zlib-compressed as nnU-Net writes it) and its spacing to the JSON file next to it
/// (`case.tif` -> `case.json`), both atomically.
pub fn write_labels(path: &Path, labels: &Array3<i16>, geometry: &Geometry) -> Result<(), ImageError> {
    let bytes = encode_labels(path, "TIFF", labels)?;
    let json = spacing_json(&geometry.spacing_zyx);
    let json_path = json_path(path, Role::Label);
    write_atomically(path, &bytes)?;
    write_atomically(&json_path, json.as_bytes())
}

/// The file a TIFF's spacing is read from, as Tiff3DIO finds it: the path without its ending
/// (the text after the last dot) and, for images, without the five characters before it too.
pub(super) fn json_path(path: &Path, role: Role) -> PathBuf {
    let strip = match role {
        Role::Image => 5,
        Role::Label => 0,
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = match name.rfind('.') {
        Some(dot) => &name[..dot],
        None => "",
    };
    let stem_chars: Vec<char> = stem.chars().collect();
    if stem_chars.len() >= strip {
        let kept: String = stem_chars[..stem_chars.len() - strip].iter().collect();
        return path.with_file_name(format!("{kept}.json"));
    }
    // Python slices the whole path string: too short a name eats into the folder name.
    let text: Vec<char> = path.to_string_lossy().chars().collect();
    let ending = name.len() - stem.len();
    let cut = text.len().saturating_sub(ending + strip);
    PathBuf::from(format!("{}.json", text[..cut].iter().collect::<String>()))
}

fn read_spacing(path: &Path, role: Role) -> Result<[f64; 3], ImageError> {
    let json_path = json_path(path, role);
    let text = match std::fs::read_to_string(&json_path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok([1.0; 3]),
        Err(e) => return Err(ImageError::io(&json_path)(e)),
    };
    let bad = |detail: String| {
        ImageError::invalid(
            &json_path,
            format!(
                "spacing file of {}: {detail}; expected {{\"spacing\": [z, y, x]}}",
                path.display()
            ),
        )
    };
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let spacing = value
        .get("spacing")
        .ok_or_else(|| bad("no \"spacing\" entry".to_string()))?
        .as_array()
        .ok_or_else(|| bad("\"spacing\" is not a list".to_string()))?;
    let numbers: Vec<f64> = spacing.iter().filter_map(serde_json::Value::as_f64).collect();
    if spacing.len() != 3 || numbers.len() != 3 {
        return Err(bad(format!(
            "\"spacing\" must be 3 numbers, one per axis, it is {}",
            value["spacing"]
        )));
    }
    if numbers.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
        return Err(bad(format!("spacing must be > 0, it is {}", value["spacing"])));
    }
    Ok([numbers[0], numbers[1], numbers[2]])
}

/// `{"spacing": [...]}` exactly as nnU-Net's `save_json` writes it (`json.dump` with indent 4,
/// Python's float repr, no final newline).
pub(super) fn spacing_json(spacing: &[f64; 3]) -> String {
    let items: Vec<String> = spacing
        .iter()
        .map(|&s| format!("        {}", python_float(s)))
        .collect();
    format!("{{\n    \"spacing\": [\n{}\n    ]\n}}", items.join(",\n"))
}

/// Python's `repr(float)`: the shortest digits that round-trip, positional for exponents -4..16.
fn python_float(v: f64) -> String {
    if !v.is_finite() {
        return if v.is_nan() {
            "NaN".into()
        } else if v > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let sci = format!("{v:e}");
    let (mantissa, exponent) = sci.split_once('e').expect("{:e} has an exponent");
    let exponent: i32 = exponent.parse().expect("{:e} exponent is an integer");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exponent) {
        let body = if exponent < 0 {
            format!("0.{}{digits}", "0".repeat((-exponent - 1) as usize))
        } else {
            let point = exponent as usize + 1;
            if digits.len() <= point {
                format!("{digits}{}.0", "0".repeat(point - digits.len()))
            } else {
                format!("{}.{}", &digits[..point], &digits[point..])
            }
        };
        format!("{sign}{body}")
    } else {
        let exp_sign = if exponent < 0 { '-' } else { '+' };
        format!("{sign}{mantissa}e{exp_sign}{:02}", exponent.abs())
    }
}

/// An n-dimensional array in C order, as `tifffile.imread` returns it (values cast to f32, as
/// nnU-Net casts them).
pub(super) struct TiffArray {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

fn open(path: &Path) -> Result<Decoder<BufReader<File>>, ImageError> {
    let file = File::open(path).map_err(ImageError::io(path))?;
    Decoder::new(BufReader::new(file)).map_err(|e| tiff_error(path, e))
}

fn tiff_error(path: &Path, error: tiff::TiffError) -> ImageError {
    match error {
        tiff::TiffError::IoError(source) => ImageError::io(path)(source),
        other => ImageError::invalid(path, format!("cannot decode TIFF: {other}")),
    }
}

/// The array `tifffile.imread` gives for `path`: one page `(y, x)`, `(y, x, samples)` when its
/// samples are interleaved or `(samples, y, x)` when they are stored as planes; several pages of
/// one shape stacked along a new first axis.
pub(super) fn imread(path: &Path) -> Result<TiffArray, ImageError> {
    let mut decoder = open(path)?;
    let mut page_shape: Option<Vec<usize>> = None;
    let mut values = Vec::new();
    let mut pages = 0;
    loop {
        // The tiff crate asserts on some malformed files: refuse the file rather than crash.
        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            read_page(path, &mut decoder, pages)
        }));
        let (shape, page) = decoded.unwrap_or_else(|_| {
            Err(ImageError::invalid(
                path,
                format!("page {pages}: the TIFF decoder failed on this file"),
            ))
        })?;
        match &page_shape {
            None => page_shape = Some(shape),
            Some(first) if *first != shape => {
                return Err(ImageError::invalid(
                    path,
                    format!(
                        "TIFF pages differ in shape: page 0 is {first:?}, page {pages} is {shape:?}; nnflow reads \
                         TIFFs whose pages all have one shape"
                    ),
                ))
            }
            Some(_) => {}
        }
        values.extend(page);
        pages += 1;
        if !decoder.more_images() {
            break;
        }
        decoder.next_image().map_err(|e| tiff_error(path, e))?;
    }
    let mut shape = page_shape.expect("a TIFF has at least one page");
    if pages > 1 {
        shape.insert(0, pages);
    }
    Ok(TiffArray { shape, values })
}

fn read_page(
    path: &Path,
    decoder: &mut Decoder<BufReader<File>>,
    page: usize,
) -> Result<(Vec<usize>, Vec<f32>), ImageError> {
    let err = |e| tiff_error(path, e);
    let (width, height) = decoder.dimensions().map_err(err)?;
    let (width, height) = (width as usize, height as usize);
    let samples: usize = decoder
        .find_tag_unsigned(Tag::SamplesPerPixel)
        .map_err(err)?
        .unwrap_or(1);
    let planar = decoder
        .find_tag_unsigned::<u16>(Tag::PlanarConfiguration)
        .map_err(err)?
        == Some(PlanarConfiguration::Planar.to_u16());
    let bits: Vec<u16> = decoder
        .find_tag_unsigned_vec(Tag::BitsPerSample)
        .map_err(err)?
        .unwrap_or_else(|| vec![1]);
    if bits.iter().any(|&b| !matches!(b, 8 | 16 | 32 | 64)) {
        return Err(ImageError::invalid(
            path,
            format!(
                "page {page} has {bits:?} bits per sample; nnflow reads TIFF samples of 8, 16, 32 or 64 bits"
            ),
        ));
    }
    let values = if decoder.get_chunk_type() == ChunkType::Tile {
        read_tiles(decoder, width, height, samples, planar).map_err(err)?
    } else {
        let mut result = DecodingResult::U8(Vec::new());
        let layout = decoder.read_image_to_buffer(&mut result).map_err(err)?;
        if layout.planes != if planar { samples } else { 1 } {
            return Err(ImageError::invalid(
                path,
                format!("page {page}: decoded {} planes", layout.planes),
            ));
        }
        to_f32(result)
    };
    let expected = width * height * samples;
    if values.len() != expected {
        return Err(ImageError::invalid(
            path,
            format!(
                "page {page}: decoded {} samples, expected {height} x {width} x {samples}",
                values.len()
            ),
        ));
    }
    let shape = match (samples, planar) {
        (1, _) => vec![height, width],
        (_, true) => vec![samples, height, width],
        (_, false) => vec![height, width, samples],
    };
    Ok((shape, values))
}

/// A tiled page, tile by tile (the tiff crate's whole-image readout trips over edge tiles).
fn read_tiles(
    decoder: &mut Decoder<BufReader<File>>,
    width: usize,
    height: usize,
    samples: usize,
    planar: bool,
) -> tiff::TiffResult<Vec<f32>> {
    let (tile_w, tile_h) = decoder.chunk_dimensions();
    let (tile_w, tile_h) = (tile_w as usize, tile_h as usize);
    let across = width.div_ceil(tile_w);
    let per_plane = across * height.div_ceil(tile_h);
    let (planes, per_pixel) = if planar { (samples, 1) } else { (1, samples) };
    let mut values = vec![0.0f32; width * height * samples];
    for plane in 0..planes {
        for tile in 0..per_plane {
            let data = to_f32(decoder.read_chunk((plane * per_plane + tile) as u32)?);
            let (x0, y0) = ((tile % across) * tile_w, (tile / across) * tile_h);
            let (w, h) = (tile_w.min(width - x0), tile_h.min(height - y0));
            if data.len() < w * h * per_pixel {
                return Err(tiff::TiffError::FormatError(
                    tiff::TiffFormatError::InconsistentSizesEncountered,
                ));
            }
            for row in 0..h {
                let from = &data[row * w * per_pixel..(row + 1) * w * per_pixel];
                let at = plane * width * height + ((y0 + row) * width + x0) * per_pixel;
                values[at..at + w * per_pixel].copy_from_slice(from);
            }
        }
    }
    Ok(values)
}

fn to_f32(result: DecodingResult) -> Vec<f32> {
    match result {
        DecodingResult::U8(v) => v.into_iter().map(f32::from).collect(),
        DecodingResult::U16(v) => v.into_iter().map(f32::from).collect(),
        DecodingResult::U32(v) => v.into_iter().map(|x| x as f32).collect(),
        DecodingResult::U64(v) => v.into_iter().map(|x| x as f32).collect(),
        DecodingResult::F16(v) => v.into_iter().map(f32::from).collect(),
        DecodingResult::F32(v) => v,
        DecodingResult::F64(v) => v.into_iter().map(|x| x as f32).collect(),
        DecodingResult::I8(v) => v.into_iter().map(f32::from).collect(),
        DecodingResult::I16(v) => v.into_iter().map(f32::from).collect(),
        DecodingResult::I32(v) => v.into_iter().map(|x| x as f32).collect(),
        DecodingResult::I64(v) => v.into_iter().map(|x| x as f32).collect(),
    }
}

/// Encodes a label map `[z, y, x]` as a TIFF with one zlib-compressed grey page per z, uint8 when
/// every label is below 255, else uint16 (`format` names the file type in errors).
pub(super) fn encode_labels(
    path: &Path,
    format: &'static str,
    labels: &Array3<i16>,
) -> Result<Vec<u8>, ImageError> {
    let wide = label_depth(path, format, labels)?;
    let (depth, height, width) = labels.dim();
    let cannot = |e: tiff::TiffError| ImageError::CannotWrite {
        path: path.to_path_buf(),
        format,
        detail: e.to_string(),
    };
    let mut bytes = Cursor::new(Vec::new());
    {
        let mut encoder = TiffEncoder::new(&mut bytes)
            .map_err(cannot)?
            .with_compression(Compression::Deflate(DeflateLevel::Balanced));
        for z in 0..depth {
            let plane = labels.index_axis(ndarray::Axis(0), z);
            let (w, h) = (width as u32, height as u32);
            if wide {
                let data: Vec<u16> = plane.iter().map(|&v| v as u16).collect();
                encoder.write_image::<Gray16>(w, h, &data).map_err(cannot)?;
            } else {
                let data: Vec<u8> = plane.iter().map(|&v| v as u8).collect();
                encoder.write_image::<Gray8>(w, h, &data).map_err(cannot)?;
            }
        }
    }
    Ok(bytes.into_inner())
}

/// Whether a label map needs 16 bits (nnU-Net: uint8 if max < 255 else uint16); negative labels
/// cannot be written.
pub(super) fn label_depth(
    path: &Path,
    format: &'static str,
    labels: &Array3<i16>,
) -> Result<bool, ImageError> {
    if labels.is_empty() {
        return Err(ImageError::CannotWrite {
            path: path.to_path_buf(),
            format,
            detail: format!("the label map is empty (shape {:?})", labels.shape()),
        });
    }
    let min = labels.iter().copied().min().unwrap_or(0);
    if min < 0 {
        return Err(ImageError::CannotWrite {
            path: path.to_path_buf(),
            format,
            detail: format!("labels must be >= 0, the label map holds {min}"),
        });
    }
    Ok(labels.iter().copied().max().unwrap_or(0) >= 255)
}

/// Writes `bytes` under a temporary name next to `path` and renames it, so a crash never leaves
/// a half-written file behind.
pub(super) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    use std::io::Write;
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    let result = File::create(&tmp)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp); // best effort: the original error is what matters
    }
    result.map_err(ImageError::write(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_float_repr() {
        let cases = [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (2.5, "2.5"),
            (0.1, "0.1"),
            (123.456, "123.456"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (999999999999999.0, "999999999999999.0"),
            (-0.75, "-0.75"),
            (100.0, "100.0"),
        ];
        for (v, want) in cases {
            assert_eq!(python_float(v), want, "{v}");
        }
    }

    #[test]
    fn json_paths() {
        let p = Path::new("/d/case_0000.tif");
        assert_eq!(json_path(p, Role::Image), Path::new("/d/case.json"));
        assert_eq!(
            json_path(Path::new("/d/case.tiff"), Role::Label),
            Path::new("/d/case.json")
        );
        assert_eq!(
            json_path(Path::new("/d/a.b_0001.tif"), Role::Image),
            Path::new("/d/a.b.json")
        );
    }
}
