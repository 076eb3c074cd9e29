//! 2D pictures (`.png`, `.bmp`, `.tif`), read and written as nnU-Net's NaturalImage2DIO does.
//!
//! NaturalImage2DIO reads with `skimage.io.imread`: PNG and BMP through Pillow (as imageio's
//! Pillow plugin converts them), TIFF through `tifffile`. A 2D array is one grey channel, a 3D
//! array `(y, x, 3 or 4)` is RGB(A), each channel `(1, y, x)`; values are cast to float32 and the
//! spacing is (999, 1, 1). What Pillow gives, format by format:
//! - PNG grey 1-bit: 0 / 1 (a bool image); 2- and 4-bit: scaled to 0..255; 8- and 16-bit: as
//!   stored. Grey + alpha 8-bit: two samples, which NaturalImage2DIO rejects; 16-bit: RGBA
//!   reduced to 8 bits (the high byte). RGB(A) 16-bit: reduced to 8 bits (the high byte).
//!   Palette: RGB through the palette (transparency dropped). `tRNS` is ignored.
//! - BMP 1/4/8-bit palette: RGB through the palette, except that a palette of greys `i -> (i, i, i)`
//!   gives one grey channel of the indices (1-bit black/white: 0 / 1); 24- and 32-bit: RGB (the
//!   fourth byte ignored unless bit fields name an alpha mask, then RGBA); 16-bit: RGB.
//!   RLE-compressed BMPs are not supported.
//! - TIFF: whatever `tifffile.imread` gives (see [`super::tiff3d::imread`]); `skimage` moves a
//!   leading axis of 3 or 4 samples last, so planar RGB reads as RGB.

use std::path::Path;

use ndarray::{Array3, Axis};

use super::tiff3d::{self, TiffArray};
use super::{Decoded, Geometry, ImageError};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Png,
    Bmp,
    Tiff,
}

fn kind_of_ending(path: &Path) -> Kind {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if name.ends_with(".png") {
        Kind::Png
    } else if name.ends_with(".bmp") {
        Kind::Bmp
    } else {
        Kind::Tiff
    }
}

/// Reads a 2D picture: one grey channel or 3 / 4 RGB(A) channels, each `[1, y, x]`.
pub fn read(path: &Path) -> Result<Decoded, ImageError> {
    let array = match kind_of_ending(path) {
        Kind::Tiff => tiff3d::imread(path)?,
        // Pillow goes by the content, not the ending.
        Kind::Png | Kind::Bmp => {
            let bytes = std::fs::read(path).map_err(ImageError::io(path))?;
            if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
                read_png(path, &bytes)?
            } else if bytes.starts_with(b"BM") {
                read_bmp(path, &bytes)?
            } else {
                return Err(ImageError::invalid(
                    path,
                    "not a PNG or BMP file (no PNG or BMP signature)",
                ));
            }
        }
    };
    to_channels(path, array)
}

/// What NaturalImage2DIO makes of the array `skimage.io.imread` returns.
fn to_channels(path: &Path, array: TiffArray) -> Result<Decoded, ImageError> {
    let TiffArray { shape, values } = array;
    let rejected = |shape: &[usize]| {
        ImageError::invalid(
            path,
            format!(
                "a 2D picture must be grey (y, x) or RGB(A) (y, x, 3 or 4); this file holds an array of shape {shape:?}"
            ),
        )
    };
    match *shape.as_slice() {
        [h, w] => {
            let channel =
                Array3::from_shape_vec((1, h, w), values).expect("decoders return shape-sized data");
            Ok(Decoded {
                channels: vec![channel],
                geometry: Geometry::picture(h, w),
            })
        }
        [a, b, c] => {
            let mut array =
                Array3::from_shape_vec((a, b, c), values).expect("decoders return shape-sized data");
            // skimage.io.imread: a leading axis of 3 or 4 (and a last one that is not) is moved last.
            if !matches!(c, 3 | 4) && matches!(a, 3 | 4) {
                array = array.permuted_axes([1, 2, 0]);
            }
            let (h, w, n) = array.dim();
            if !matches!(n, 3 | 4) {
                return Err(rejected(array.shape()));
            }
            let channels = array
                .axis_iter(Axis(2))
                .map(|channel| channel.to_owned().insert_axis(Axis(0)))
                .collect();
            Ok(Decoded {
                channels,
                geometry: Geometry::picture(h, w),
            })
        }
        _ => Err(rejected(&shape)),
    }
}

fn read_png(path: &Path, bytes: &[u8]) -> Result<TiffArray, ImageError> {
    use png::{BitDepth, ColorType};
    let bad = |e: png::DecodingError| ImageError::invalid(path, format!("cannot decode PNG: {e}"));
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::IDENTITY);
    let mut reader = decoder.read_info().map_err(bad)?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| ImageError::invalid(path, "PNG too large"))?;
    let mut buffer = vec![0; size];
    let frame = reader.next_frame(&mut buffer).map_err(bad)?;
    let palette = reader.info().palette.as_ref().map(|p| p.to_vec());
    let (h, w) = (frame.height as usize, frame.width as usize);
    let depth = match frame.bit_depth {
        BitDepth::One => 1,
        BitDepth::Two => 2,
        BitDepth::Four => 4,
        BitDepth::Eight => 8,
        BitDepth::Sixteen => 16,
    };
    let rows = buffer.chunks(frame.line_size).take(h);
    // Sample `i` of a row, for every depth.
    let sample = |row: &[u8], i: usize| -> u32 {
        match depth {
            16 => u32::from(u16::from_be_bytes([row[2 * i], row[2 * i + 1]])),
            8 => u32::from(row[i]),
            d => {
                let bit = i * d;
                let shift = 8 - d - bit % 8;
                u32::from(row[bit / 8] >> shift) & ((1 << d) - 1)
            }
        }
    };
    // 16-bit colour samples are cut to their high byte.
    let high = |v: u32| if depth == 16 { v >> 8 } else { v };
    let mut values = Vec::new();
    let shape = match frame.color_type {
        ColorType::Grayscale => {
            let scale = match depth {
                2 => 85,
                4 => 17,
                _ => 1,
            };
            for row in rows {
                values.extend((0..w).map(|i| (sample(row, i) * scale) as f32));
            }
            vec![h, w]
        }
        ColorType::GrayscaleAlpha if depth == 8 => {
            for row in rows {
                values.extend((0..2 * w).map(|i| sample(row, i) as f32));
            }
            vec![h, w, 2]
        }
        ColorType::GrayscaleAlpha => {
            for row in rows {
                for i in 0..w {
                    let (g, a) = (
                        high(sample(row, 2 * i)) as f32,
                        high(sample(row, 2 * i + 1)) as f32,
                    );
                    values.extend([g, g, g, a]);
                }
            }
            vec![h, w, 4]
        }
        ColorType::Rgb | ColorType::Rgba => {
            let n = if frame.color_type == ColorType::Rgb { 3 } else { 4 };
            for row in rows {
                values.extend((0..n * w).map(|i| high(sample(row, i)) as f32));
            }
            vec![h, w, n]
        }
        ColorType::Indexed => {
            let palette =
                palette.ok_or_else(|| ImageError::invalid(path, "palette PNG without a palette"))?;
            for row in rows {
                for i in 0..w {
                    let index = sample(row, i) as usize;
                    let rgb = palette.get(3 * index..3 * index + 3).unwrap_or(&[0, 0, 0]);
                    values.extend(rgb.iter().map(|&v| f32::from(v)));
                }
            }
            vec![h, w, 3]
        }
    };
    Ok(TiffArray { shape, values })
}

fn read_bmp(path: &Path, bytes: &[u8]) -> Result<TiffArray, ImageError> {
    let bad = |detail: String| ImageError::invalid(path, detail);
    let truncated = || bad(format!("truncated BMP ({} bytes)", bytes.len()));
    let u16_at = |at: usize| bytes.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |at: usize| {
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let data_offset = u32_at(10).ok_or_else(truncated)? as usize;
    let header_size = u32_at(14).ok_or_else(truncated)? as usize;
    if bytes.len() < 14 + header_size {
        return Err(truncated());
    }
    let (width, height, bits, compression, mut colors, palette_padding, top_down);
    let mut masks: Option<[u32; 4]> = None;
    let mut palette_at = 14 + header_size;
    if header_size == 12 {
        width = i64::from(u16_at(18).ok_or_else(truncated)?);
        height = i64::from(u16_at(20).ok_or_else(truncated)?);
        bits = u16_at(24).ok_or_else(truncated)?;
        compression = 0;
        colors = 0;
        palette_padding = 3;
        top_down = false;
    } else if matches!(header_size, 40 | 52 | 56 | 64 | 108 | 124) {
        width = i64::from(u32_at(18).ok_or_else(truncated)? as i32);
        let raw_height = u32_at(22).ok_or_else(truncated)? as i32;
        top_down = raw_height < 0;
        height = i64::from(raw_height).abs();
        bits = u16_at(28).ok_or_else(truncated)?;
        compression = u32_at(30).ok_or_else(truncated)?;
        colors = u32_at(46).ok_or_else(truncated)? as usize;
        palette_padding = 4;
        if compression == 3 {
            let mut m = [0u32; 4];
            if header_size >= 52 {
                let count = if header_size >= 56 { 4 } else { 3 };
                for (i, mask) in m.iter_mut().take(count).enumerate() {
                    *mask = u32_at(54 + 4 * i).ok_or_else(truncated)?;
                }
            } else {
                for (i, mask) in m.iter_mut().take(3).enumerate() {
                    *mask = u32_at(palette_at + 4 * i).ok_or_else(truncated)?;
                }
                palette_at += 12;
            }
            masks = Some(m);
        }
    } else {
        return Err(bad(format!("unsupported BMP header type ({header_size})")));
    }
    if width <= 0 || height == 0 {
        return Err(bad(format!("BMP of {width} x {height} pixels")));
    }
    let (w, h) = (width as usize, height as usize);
    if colors == 0 {
        colors = 1usize.checked_shl(u32::from(bits)).unwrap_or(0);
    }
    if !matches!(bits, 1 | 4 | 8 | 16 | 24 | 32) {
        return Err(bad(format!("unsupported BMP pixel depth ({bits})")));
    }
    match compression {
        0 | 3 => {}
        1 | 2 => {
            return Err(bad(
                "RLE-compressed BMPs are not supported; save it uncompressed".into()
            ))
        }
        c => return Err(bad(format!("unsupported BMP compression ({c})"))),
    }
    // The channel layout: bytes of a little-endian pixel word, or palette lookups.
    enum Layout {
        Grey,
        Bilevel,
        Palette(Vec<[u8; 3]>),
        Masks(Vec<u32>),
    }
    let layout = if bits <= 8 {
        if compression == 3 {
            return Err(bad("unsupported BMP bitfields layout".into()));
        }
        if !(1..=65536).contains(&colors) {
            return Err(bad(format!("unsupported BMP palette size ({colors})")));
        }
        let entry = |i: usize| -> Result<[u8; 3], ImageError> {
            let at = palette_at + i * palette_padding;
            let b = bytes.get(at..at + 3).ok_or_else(truncated)?;
            Ok([b[2], b[1], b[0]])
        };
        let palette = (0..colors).map(entry).collect::<Result<Vec<_>, _>>()?;
        let grey_values: Vec<u8> = if colors == 2 {
            vec![0, 255]
        } else {
            (0..colors).map(|i| i as u8).collect()
        };
        let grey = colors <= 256 && palette.iter().zip(&grey_values).all(|(rgb, &v)| *rgb == [v; 3]);
        match (grey, bits) {
            (true, 1) if colors <= 2 => Layout::Bilevel,
            (true, 8) if colors > 2 => Layout::Grey,
            (true, _) => {
                return Err(bad(format!(
                    "unsupported BMP: {bits}-bit with a grey palette of {colors} entries"
                )))
            }
            (false, _) => Layout::Palette(palette),
        }
    } else {
        let rgba = match (bits, masks) {
            (16, None) => vec![0x7C00, 0x3E0, 0x1F],
            (24, None) => vec![0xFF0000, 0xFF00, 0xFF],
            (32, None) => vec![0xFF0000, 0xFF00, 0xFF],
            (32, Some([0, 0, 0, 0])) => vec![0xFF0000, 0xFF00, 0xFF, 0xFF000000],
            (32, Some(m)) if SUPPORTED_32.contains(&m) => {
                if m[3] == 0 {
                    m[..3].to_vec()
                } else {
                    m.to_vec()
                }
            }
            (24, Some([0xFF0000, 0xFF00, 0xFF, _])) => vec![0xFF0000, 0xFF00, 0xFF],
            (16, Some([r @ (0xF800 | 0x7C00), g @ (0x7E0 | 0x3E0), 0x1F, _]))
                if (r == 0xF800) == (g == 0x7E0) =>
            {
                vec![r, g, 0x1F]
            }
            _ => return Err(bad("unsupported BMP bitfields layout".into())),
        };
        Layout::Masks(rgba)
    };
    let stride = ((w * bits as usize + 31) >> 3) & !3;
    let start = if data_offset == 0 {
        palette_at + colors * palette_padding
    } else {
        data_offset
    };
    if bytes.len() < start + stride * h {
        return Err(truncated());
    }
    let channels = match &layout {
        Layout::Grey | Layout::Bilevel => 1,
        Layout::Palette(_) => 3,
        Layout::Masks(m) => m.len(),
    };
    let mut values = Vec::with_capacity(w * h * channels);
    for y in 0..h {
        let file_row = if top_down { y } else { h - 1 - y };
        let row = &bytes[start + file_row * stride..start + (file_row + 1) * stride];
        for x in 0..w {
            let index = |d: usize| {
                let bit = x * d;
                usize::from(row[bit / 8] >> (8 - d - bit % 8)) & ((1 << d) - 1)
            };
            match &layout {
                Layout::Grey => values.push(f32::from(row[x])),
                Layout::Bilevel => values.push(index(1) as f32),
                Layout::Palette(palette) => {
                    let i = index(bits as usize);
                    values.extend(palette.get(i).unwrap_or(&[0, 0, 0]).iter().map(|&v| f32::from(v)));
                }
                Layout::Masks(masks) => {
                    let n = bits as usize / 8;
                    let mut word = [0u8; 4];
                    word[..n].copy_from_slice(&row[x * n..x * n + n]);
                    let pixel = u32::from_le_bytes(word);
                    values.extend(masks.iter().map(|&mask| {
                        let v = (pixel & mask) >> mask.trailing_zeros();
                        let max = mask >> mask.trailing_zeros();
                        // 5- and 6-bit fields are scaled to 0..255, as Pillow's unpackers do.
                        (if max == 255 { v } else { v * 255 / max }) as f32
                    }));
                }
            }
        }
    }
    let shape = if channels == 1 {
        vec![h, w]
    } else {
        vec![h, w, channels]
    };
    Ok(TiffArray { shape, values })
}

/// The 32-bit bit-field masks (r, g, b, a) Pillow reads.
const SUPPORTED_32: [[u32; 4]; 7] = [
    [0xFF0000, 0xFF00, 0xFF, 0x0],
    [0xFF000000, 0xFF0000, 0xFF00, 0x0],
    [0xFF000000, 0xFF00, 0xFF, 0x0],
    [0xFF000000, 0xFF0000, 0xFF00, 0xFF],
    [0xFF, 0xFF00, 0xFF0000, 0xFF000000],
    [0xFF0000, 0xFF00, 0xFF, 0xFF000000],
    [0xFF000000, 0xFF00, 0xFF, 0xFF0000],
];

/// Writes a label map `[1, y, x]` as a grey picture in the format of `path`'s ending (PNG, BMP or
/// TIFF), atomically: 8-bit when every label is below 255, else 16-bit (as nnU-Net writes it);
/// BMP holds 8-bit labels only.
pub fn write_labels(path: &Path, labels: &Array3<i16>, _geometry: &Geometry) -> Result<(), ImageError> {
    let kind = kind_of_ending(path);
    let format = match kind {
        Kind::Png => "PNG",
        Kind::Bmp => "BMP",
        Kind::Tiff => "TIFF",
    };
    if labels.dim().0 != 1 {
        return Err(ImageError::CannotWrite {
            path: path.to_path_buf(),
            format,
            detail: format!(
                "a 2D picture holds one slice, the label map has shape (z, y, x) {:?}",
                labels.shape()
            ),
        });
    }
    let wide = tiff3d::label_depth(path, format, labels)?;
    let bytes = match kind {
        Kind::Tiff => tiff3d::encode_labels(path, format, labels)?,
        Kind::Png => encode_png(path, labels, wide)?,
        Kind::Bmp if wide => {
            return Err(ImageError::CannotWrite {
                path: path.to_path_buf(),
                format,
                detail: format!(
                    "BMP holds labels up to 254 (8-bit grey), the label map holds {}; use .png or .tif",
                    labels.iter().max().copied().unwrap_or(0)
                ),
            })
        }
        Kind::Bmp => encode_bmp(labels),
    };
    tiff3d::write_atomically(path, &bytes)
}

fn encode_png(path: &Path, labels: &Array3<i16>, wide: bool) -> Result<Vec<u8>, ImageError> {
    let (_, h, w) = labels.dim();
    let data: Vec<u8> = if wide {
        labels.iter().flat_map(|&v| (v as u16).to_be_bytes()).collect()
    } else {
        labels.iter().map(|&v| v as u8).collect()
    };
    let cannot = |e: png::EncodingError| ImageError::CannotWrite {
        path: path.to_path_buf(),
        format: "PNG",
        detail: e.to_string(),
    };
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut bytes, w as u32, h as u32);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_depth(if wide {
            png::BitDepth::Sixteen
        } else {
            png::BitDepth::Eight
        });
        let mut writer = encoder.write_header().map_err(cannot)?;
        writer.write_image_data(&data).map_err(cannot)?;
        writer.finish().map_err(cannot)?;
    }
    Ok(bytes)
}

/// An 8-bit BMP with a grey palette (Pillow reads it as one grey channel), rows bottom-up.
fn encode_bmp(labels: &Array3<i16>) -> Vec<u8> {
    let (_, h, w) = labels.dim();
    let stride = (w + 3) & !3;
    let data_offset = 14 + 40 + 256 * 4;
    let size = data_offset + stride * h;
    let mut out = Vec::with_capacity(size);
    out.extend(b"BM");
    out.extend((size as u32).to_le_bytes());
    out.extend([0u8; 4]);
    out.extend((data_offset as u32).to_le_bytes());
    out.extend(40u32.to_le_bytes());
    out.extend((w as i32).to_le_bytes());
    out.extend((h as i32).to_le_bytes());
    out.extend(1u16.to_le_bytes());
    out.extend(8u16.to_le_bytes());
    out.extend(0u32.to_le_bytes()); // uncompressed
    out.extend(((stride * h) as u32).to_le_bytes());
    out.extend(2835u32.to_le_bytes()); // 72 dpi, as most writers put it
    out.extend(2835u32.to_le_bytes());
    out.extend(256u32.to_le_bytes());
    out.extend(0u32.to_le_bytes());
    for i in 0..=255u8 {
        out.extend([i, i, i, 0]);
    }
    let plane = labels.index_axis(Axis(0), 0);
    for row in plane.axis_iter(Axis(0)).rev() {
        let start = out.len();
        out.extend(row.iter().map(|&v| v as u8));
        out.resize(start + stride, 0);
    }
    out
}
