//! MetaImage, `.mha` (data in the file) and `.mhd` (data in `ElementDataFile`), read as ITK's
//! MetaImageIO (MetaIO) reads it and written as SimpleITK writes it.
//!
//! Reading: `Key = Value` (or `Key: Value`) lines up to `ElementDataFile`, keys case-sensitive as
//! in MetaIO; `NDims` 2 or 3, `DimSize`, `ElementSpacing` (else `ElementSize`), the origin from
//! `Origin`, else `Position`, else `Offset`, the direction from `TransformMatrix`, else `Rotation`,
//! else `Orientation` (stored axis by axis: the first NDims numbers are the direction of x, as
//! ITK reads them), `ElementType` MET_(U)CHAR / (U)SHORT / (U)INT / (U)LONG / (U)LONG_LONG /
//! FLOAT / DOUBLE (and their `_ARRAY` forms), `ElementNumberOfChannels` (channels),
//! `BinaryDataByteOrderMSB` / `ElementByteOrderMSB`, `BinaryData = False` (ASCII numbers),
//! `CompressedData` (zlib or gzip) with or without `CompressedDataSize`, `HeaderSize` (also -1:
//! the data ends the file). `ElementDataFile = LIST` and file name patterns are refused.
//! `AnatomicalOrientation` is ignored, as ITK ignores it.
//!
//! Writing: label maps as MET_UCHAR or MET_SHORT, zlib-compressed; `.mha` holds the data,
//! `.mhd` writes it to `<stem>.zraw` first, then the header.

use std::path::Path;

use ndarray::Array3;

use super::raw_data::{self, Element, Storage};
use super::{Decoded, Geometry, ImageError};

pub fn read(path: &Path) -> Result<Decoded, ImageError> {
    let bytes = raw_data::read_file(path)?;
    let (fields, local_start) = parse_fields(&bytes);
    let get = |key: &str| {
        fields
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let bad = |detail: String| Err(ImageError::invalid(path, detail));
    let truthy = |key: &str| get(key).map(|v| v.starts_with(['T', 't', '1']));

    let Some(ndims) = get("NDims") else {
        return bad("not a MetaImage header: no `NDims`".into());
    };
    let n: usize = match ndims.parse() {
        Ok(n @ (2 | 3)) => n,
        _ => {
            return bad(format!(
                "{ndims}D MetaImage images are not supported (NDims 2 or 3)"
            ))
        }
    };
    let numbers = |key: &str, count: usize| -> Result<Option<Vec<f64>>, ImageError> {
        let Some(value) = get(key) else { return Ok(None) };
        let values: Vec<f64> = raw_data::numbers(path, key, value)?;
        if values.len() < count {
            return Err(ImageError::invalid(
                path,
                format!(
                    "MetaImage `{key}` has {} values, NDims {n} needs {count}",
                    values.len()
                ),
            ));
        }
        Ok(Some(values[..count].to_vec()))
    };
    let sizes: Vec<usize> = numbers("DimSize", n)?
        .ok_or_else(|| ImageError::invalid(path, "MetaImage header has no `DimSize`"))?
        .iter()
        .map(|&s| (s >= 1.0 && s.fract() == 0.0).then_some(s as usize))
        .collect::<Option<_>>()
        .ok_or_else(|| {
            ImageError::invalid(
                path,
                format!(
                    "MetaImage DimSize `{}` is not positive integers",
                    get("DimSize").unwrap_or("")
                ),
            )
        })?;
    let spacing = match numbers("ElementSpacing", n)? {
        Some(spacing) => spacing,
        None => numbers("ElementSize", n)?.unwrap_or(vec![1.0; n]),
    };
    let origin = ["Origin", "Offset", "Position"]
        .iter()
        .find_map(|key| numbers(key, n).transpose())
        .transpose()?
        .unwrap_or(vec![0.0; n]);
    let matrix = ["TransformMatrix", "Rotation", "Orientation"]
        .iter()
        .find_map(|key| numbers(key, n * n).transpose())
        .transpose()?;
    let axes: Vec<Vec<f64>> = match matrix {
        Some(m) => m.chunks(n).map(<[f64]>::to_vec).collect(),
        None => (0..n)
            .map(|i| (0..n).map(|j| f64::from(u8::from(i == j))).collect())
            .collect(),
    };

    let Some(type_name) = get("ElementType") else {
        return bad("MetaImage header has no `ElementType`".into());
    };
    let Some(element) = element_type(type_name) else {
        return bad(format!(
            "MetaImage ElementType `{type_name}` is not supported (MET_CHAR, MET_UCHAR, MET_SHORT, MET_USHORT, \
             MET_INT, MET_UINT, MET_LONG, MET_ULONG, MET_LONG_LONG, MET_ULONG_LONG, MET_FLOAT, MET_DOUBLE)"
        ));
    };
    let components = match get("ElementNumberOfChannels").map(str::parse::<usize>) {
        None => 1,
        Some(Ok(c)) if c >= 1 => c,
        Some(_) => {
            return bad(format!(
                "MetaImage ElementNumberOfChannels `{}` is not a positive integer",
                get("ElementNumberOfChannels").unwrap_or("")
            ))
        }
    };
    let big_endian = truthy("BinaryDataByteOrderMSB")
        .or(truthy("ElementByteOrderMSB"))
        .unwrap_or(false);
    let storage = match (
        truthy("BinaryData").unwrap_or(true),
        truthy("CompressedData").unwrap_or(false),
    ) {
        (false, _) => Storage::Ascii,
        (true, true) => Storage::Compressed,
        (true, false) => Storage::Raw,
    };

    // Where the data is.
    let Some(data_file) = get("ElementDataFile") else {
        return bad("MetaImage header has no `ElementDataFile`".into());
    };
    let (data_path, data_bytes, mut start) = if matches!(data_file, "LOCAL" | "Local" | "local") {
        (path.to_path_buf(), bytes, local_start)
    } else if data_file.starts_with("LIST") || data_file.contains('%') {
        return bad(format!(
            "MetaImage `ElementDataFile = {data_file}` (a list or pattern of files) is not supported (LOCAL or one file)"
        ));
    } else {
        let data_path = raw_data::beside(path, data_file);
        let data = std::fs::read(&data_path).map_err(|e| {
            ImageError::invalid(
                path,
                format!("cannot read its data file {}: {e}", data_path.display()),
            )
        })?;
        (data_path, data, 0)
    };
    let count = sizes.iter().try_fold(components, |acc, &s| acc.checked_mul(s));
    let count =
        count.ok_or_else(|| ImageError::invalid(path, "MetaImage DimSize overflows the address space"))?;
    let expected = count.saturating_mul(element.size());
    match get("HeaderSize").map(str::parse::<i64>) {
        None => {}
        Some(Ok(-1)) => {
            if data_bytes.len() < expected {
                return Err(raw_data::truncated(&data_path, expected, data_bytes.len(), ""));
            }
            start = data_bytes.len() - expected;
        }
        Some(Ok(size)) if size > 0 => start = size as usize,
        Some(Ok(_)) => {}
        Some(Err(_)) => {
            return bad(format!(
                "MetaImage HeaderSize `{}` is not an integer",
                get("HeaderSize").unwrap_or("")
            ))
        }
    }
    let mut stored = &data_bytes[start.min(data_bytes.len())..];
    if storage == Storage::Compressed {
        let size = get("CompressedDataSize")
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0);
        if size > 0.0 {
            let size = size as usize;
            if stored.len() < size {
                return Err(ImageError::invalid(
                    &data_path,
                    format!(
                        "truncated data: CompressedDataSize is {size} bytes but only {} are there",
                        stored.len()
                    ),
                ));
            }
            stored = &stored[..size];
        }
    }
    let values = raw_data::decode(&data_path, stored, storage, element, big_endian, count)?;
    let geometry = raw_data::itk_geometry(n, &sizes, &spacing, &origin, &axes);
    Ok(Decoded {
        channels: raw_data::channels(values, components, geometry.shape_zyx),
        geometry,
    })
}

pub fn write_labels(path: &Path, labels: &Array3<i16>, geometry: &Geometry) -> Result<(), ImageError> {
    let axes = raw_data::axes_of(path, labels, geometry, "MetaImage")?;
    let (is_u8, bytes) = raw_data::label_bytes(labels);
    let data = raw_data::compress(&bytes, false);
    let n = axes.sizes.len();
    let list = |v: &[f64]| {
        v.iter()
            .map(|&x| raw_data::number(x))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let matrix: Vec<f64> = axes.directions.concat();
    let orientation = orientation(&axes.directions);
    let mut header = format!(
        "ObjectType = Image\nNDims = {n}\nBinaryData = True\nBinaryDataByteOrderMSB = False\nCompressedData = True\n\
         CompressedDataSize = {}\nTransformMatrix = {}\nOffset = {}\nCenterOfRotation = {}\n",
        data.len(),
        list(&matrix),
        list(&axes.origin),
        list(&vec![0.0; n]),
    );
    if n == 3 {
        header += &format!("AnatomicalOrientation = {orientation}\n");
    }
    header += &format!("ElementSpacing = {}\n", list(&axes.spacing));
    header += &format!(
        "DimSize = {}\n",
        axes.sizes
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    if n == 2 {
        header += "AnatomicalOrientation = ??\n";
    }
    header += if is_u8 {
        "ElementType = MET_UCHAR\n"
    } else {
        "ElementType = MET_SHORT\n"
    };
    raw_data::write_header_and_data(
        path,
        header,
        &data,
        "mhd",
        ".zraw",
        |name| format!("ElementDataFile = {name}\n"),
        "ElementDataFile = LOCAL\n",
    )
}

/// The header's `key = value` fields up to and including `ElementDataFile`, and where the data
/// of a `LOCAL` file starts (just after that line).
fn parse_fields(bytes: &[u8]) -> (Vec<(String, String)>, usize) {
    let mut fields = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let end = bytes[at..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(bytes.len(), |p| at + p);
        let line = String::from_utf8_lossy(&bytes[at..end]).into_owned();
        at = (end + 1).min(bytes.len());
        let Some(separator) = line.find(['=', ':']) else {
            continue;
        };
        let key = line[..separator].trim().to_string();
        let value = line[separator + 1..]
            .trim_start_matches(['=', ':'])
            .trim()
            .to_string();
        let last = key == "ElementDataFile";
        fields.push((key, value));
        if last {
            break;
        }
    }
    (fields, at)
}

fn element_type(name: &str) -> Option<Element> {
    Some(match name.strip_suffix("_ARRAY").unwrap_or(name) {
        "MET_CHAR" => Element::I8,
        "MET_UCHAR" => Element::U8,
        "MET_SHORT" => Element::I16,
        "MET_USHORT" => Element::U16,
        "MET_INT" | "MET_LONG" => Element::I32,
        "MET_UINT" | "MET_ULONG" => Element::U32,
        "MET_LONG_LONG" => Element::I64,
        "MET_ULONG_LONG" => Element::U64,
        "MET_FLOAT" => Element::F32,
        "MET_DOUBLE" => Element::F64,
        _ => return None,
    })
}

/// MetaIO's `AnatomicalOrientation` for 3D axes: per axis, the LPS axis it runs closest to (each
/// used once), named by where it comes from (R, A, I when it runs towards L, P, S).
fn orientation(directions: &[Vec<f64>]) -> String {
    let mut used = [false; 3];
    directions
        .iter()
        .map(|column| {
            let mut best = None;
            for (row, value) in column.iter().enumerate() {
                if !used[row] && best.is_none_or(|(_, b): (usize, f64)| value.abs() > b.abs()) {
                    best = Some((row, *value));
                }
            }
            let (row, value) = best.unwrap_or((0, 1.0));
            used[row] = true;
            let letters = [['R', 'L'], ['A', 'P'], ['I', 'S']][row];
            letters[usize::from(value < 0.0)]
        })
        .collect()
}
