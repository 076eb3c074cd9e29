//! NRRD, attached (`.nrrd`) and detached (`.nhdr` + data file), read as ITK's NrrdImageIO (teem)
//! reads it and written as SimpleITK writes it.
//!
//! Reading: encodings raw, gzip and ASCII text (bzip2 and hex are refused), every teem spelling
//! of the scalar types, `endian`, `dimension` 2 or 3 (or 3 / 4 with one vector / RGB / ... axis,
//! whose components become channels), `space` (RAS and LAS are turned into LPS as ITK does; other
//! spaces are taken as they are), `space directions` (spacing is each column's norm, direction
//! the normalised column), `space origin`, `spacings` and `axis mins` when there is no space,
//! `line skip` and `byte skip` (also -1). A `data file` names one file; the `LIST` and format
//! string forms are refused.
//!
//! Writing: label maps as uint8 or int16, gzip, `space: left-posterior-superior` (a 2D geometry
//! gives a 2D file with `space dimension: 2`); `.nhdr` writes the data to `<stem>.raw.gz` first,
//! then the header.

use std::path::Path;

use ndarray::Array3;

use super::raw_data::{self, Element, Storage};
use super::{Decoded, Geometry, ImageError};

pub fn read(path: &Path) -> Result<Decoded, ImageError> {
    let bytes = raw_data::read_file(path)?;
    let (fields, data_start) = parse_fields(path, &bytes)?;
    let header = Header::new(path, &fields)?;
    let count = header.sizes.iter().try_fold(1usize, |n, &s| n.checked_mul(s));
    let count = count.ok_or_else(|| ImageError::invalid(path, "NRRD sizes overflow the address space"))?;

    // The data: after the header's blank line, or in the data file.
    let (data_path, data_bytes, start) = match &header.data_file {
        Some(name) => {
            let data_path = raw_data::beside(path, name);
            let data = std::fs::read(&data_path).map_err(|e| {
                ImageError::invalid(
                    path,
                    format!("cannot read its data file {}: {e}", data_path.display()),
                )
            })?;
            (data_path, data, 0)
        }
        None => {
            let start = data_start.ok_or_else(|| {
                ImageError::invalid(
                    path,
                    "no data: the header neither ends in a blank line nor names a `data file`",
                )
            })?;
            (path.to_path_buf(), bytes, start)
        }
    };
    let mut stored = &data_bytes[start.min(data_bytes.len())..];
    for _ in 0..header.line_skip {
        match stored.iter().position(|&b| b == b'\n') {
            Some(end) => stored = &stored[end + 1..],
            None => {
                return Err(ImageError::invalid(
                    &data_path,
                    "truncated data: fewer lines than `line skip`",
                ))
            }
        }
    }
    let size = header.element.size();
    let values = match (header.storage, header.byte_skip) {
        (Storage::Raw, -1) => {
            let expected = count.saturating_mul(size);
            if stored.len() < expected {
                return Err(raw_data::truncated(&data_path, expected, stored.len(), ""));
            }
            let tail = &stored[stored.len() - expected..];
            raw_data::decode(
                &data_path,
                tail,
                Storage::Raw,
                header.element,
                header.big_endian,
                count,
            )?
        }
        (_, skip) if skip < 0 => {
            return Err(ImageError::invalid(
                path,
                format!("`byte skip: {skip}` (only -1, with raw encoding)"),
            ))
        }
        (Storage::Raw, skip) => {
            let skip = (skip as usize).min(stored.len());
            raw_data::decode(
                &data_path,
                &stored[skip..],
                Storage::Raw,
                header.element,
                header.big_endian,
                count,
            )?
        }
        (Storage::Compressed, skip) => {
            let expected = count.saturating_mul(size).saturating_add(skip as usize);
            let bytes = raw_data::inflate(&data_path, stored, expected)?;
            let data = &bytes[skip as usize..];
            raw_data::decode(
                &data_path,
                data,
                Storage::Raw,
                header.element,
                header.big_endian,
                count,
            )?
        }
        (Storage::Ascii, _) => {
            raw_data::decode(&data_path, stored, Storage::Ascii, header.element, false, count)?
        }
    };
    Ok(Decoded {
        channels: header.channels(&values),
        geometry: header.geometry,
    })
}

pub fn write_labels(path: &Path, labels: &Array3<i16>, geometry: &Geometry) -> Result<(), ImageError> {
    let axes = raw_data::axes_of(path, labels, geometry, "NRRD")?;
    let (is_u8, bytes) = raw_data::label_bytes(labels);
    let data = raw_data::compress(&bytes, true);
    let vector = |v: &[f64]| {
        format!(
            "({})",
            v.iter()
                .map(|&x| raw_data::number(x))
                .collect::<Vec<_>>()
                .join(",")
        )
    };
    let join = |v: Vec<String>| v.join(" ");
    let n = axes.sizes.len();
    let mut header = String::from(
        "NRRD0004\n# Complete NRRD file format specification at:\n# http://teem.sourceforge.net/nrrd/format.html\n",
    );
    header += if is_u8 {
        "type: unsigned char\n"
    } else {
        "type: short\n"
    };
    header += &format!("dimension: {n}\n");
    header += if n == 3 {
        "space: left-posterior-superior\n"
    } else {
        "space dimension: 2\n"
    };
    header += &format!(
        "sizes: {}\n",
        join(axes.sizes.iter().map(|s| s.to_string()).collect())
    );
    let columns = (0..n).map(|i| {
        let column: Vec<f64> = axes.directions[i].iter().map(|d| d * axes.spacing[i]).collect();
        vector(&column)
    });
    header += &format!("space directions: {}\n", join(columns.collect()));
    header += &format!("kinds: {}\n", join(vec!["domain".to_string(); n]));
    if !is_u8 {
        header += "endian: little\n";
    }
    header += "encoding: gzip\n";
    header += &format!("space origin: {}\n", vector(&axes.origin));
    raw_data::write_header_and_data(
        path,
        header,
        &data,
        "nhdr",
        ".raw.gz",
        |name| format!("data file: {name}\n"),
        "\n",
    )
}

/// `(name, value)` pairs of a header.
type Fields = Vec<(String, String)>;

/// The header's fields (`name: value`, name lower-cased without spaces, as teem matches them
/// case-insensitively) and where attached data starts (after the first blank line), if it does.
fn parse_fields(path: &Path, bytes: &[u8]) -> Result<(Fields, Option<usize>), ImageError> {
    if !bytes.starts_with(b"NRRD000") {
        let first: String = String::from_utf8_lossy(&bytes[..bytes.len().min(16)])
            .chars()
            .take_while(|&c| c != '\n')
            .collect();
        return Err(ImageError::invalid(
            path,
            format!("not a NRRD file: it starts with `{first}`, not `NRRD000x`"),
        ));
    }
    let mut fields = Vec::new();
    let mut at = 0;
    let mut first = true;
    while at < bytes.len() {
        let end = bytes[at..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(bytes.len(), |p| at + p);
        let line = String::from_utf8_lossy(&bytes[at..end]);
        let line = line.trim_end_matches('\r');
        at = (end + 1).min(bytes.len());
        if std::mem::take(&mut first) || line.starts_with('#') || line.contains(":=") {
            continue; // magic, comment, key/value pair
        }
        if line.trim().is_empty() {
            return Ok((fields, Some(at)));
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(ImageError::invalid(
                path,
                format!("malformed NRRD header line `{line}` (expected `field: value`)"),
            ));
        };
        let name: String = name
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect::<String>()
            .to_ascii_lowercase();
        if name == "datafile" && value.trim().starts_with("LIST") {
            return Err(ImageError::invalid(
                path,
                "NRRD `data file: LIST` is not supported (one data file only)",
            ));
        }
        fields.push((name, value.trim().to_string()));
    }
    Ok((fields, None))
}

/// What the header says, in ITK's terms.
struct Header {
    element: Element,
    storage: Storage,
    big_endian: bool,
    /// Axis sizes, fastest first (including a range axis).
    sizes: Vec<usize>,
    /// The one non-domain (vector, RGB, ...) axis, whose components become channels.
    range_axis: Option<usize>,
    data_file: Option<String>,
    line_skip: usize,
    byte_skip: i64,
    geometry: Geometry,
}

impl Header {
    fn new(path: &Path, fields: &Fields) -> Result<Header, ImageError> {
        let get = |name: &str| {
            fields
                .iter()
                .rev()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        let require = |name: &str, shown: &str| {
            get(name).ok_or_else(|| ImageError::invalid(path, format!("NRRD header has no `{shown}` field")))
        };
        let bad = |detail: String| Err(ImageError::invalid(path, detail));

        let type_name = require("type", "type")?;
        let Some(element) = element_type(type_name) else {
            return bad(format!(
                "NRRD type `{type_name}` is not supported (int8, uint8, int16, uint16, int32, uint32, int64, uint64, \
                 float, double)"
            ));
        };
        let encoding = require("encoding", "encoding")?;
        let storage = match encoding.to_ascii_lowercase().as_str() {
            "raw" => Storage::Raw,
            "gz" | "gzip" => Storage::Compressed,
            "txt" | "text" | "ascii" => Storage::Ascii,
            _ => {
                return bad(format!(
                    "NRRD encoding `{encoding}` is not supported (raw, gzip, text)"
                ))
            }
        };
        let big_endian = match get("endian").map(str::to_ascii_lowercase).as_deref() {
            Some("little") => false,
            Some("big") => true,
            Some(other) => return bad(format!("NRRD endian `{other}` is not `little` or `big`")),
            None if element.size() > 1 && storage != Storage::Ascii => {
                return bad(format!(
                    "NRRD type `{type_name}` with encoding `{encoding}` needs an `endian` field"
                ))
            }
            None => false,
        };
        let dimension: usize = match require("dimension", "dimension")?.parse() {
            Ok(d) if (1..=16).contains(&d) => d,
            _ => {
                return bad(format!(
                    "NRRD dimension `{}` is not a number of axes",
                    get("dimension").unwrap_or("")
                ))
            }
        };
        let per_axis = |name: &str, shown: &str| -> Result<Option<Vec<String>>, ImageError> {
            let Some(value) = get(name) else { return Ok(None) };
            let words: Vec<String> = value.split_whitespace().map(str::to_string).collect();
            if words.len() != dimension {
                return Err(ImageError::invalid(
                    path,
                    format!(
                        "NRRD `{shown}` has {} entries for dimension {dimension}",
                        words.len()
                    ),
                ));
            }
            Ok(Some(words))
        };
        let numbers = |name: &str, shown: &str| -> Result<Option<Vec<f64>>, ImageError> {
            let Some(words) = per_axis(name, shown)? else {
                return Ok(None);
            };
            let parsed = words.iter().map(|w| parse_f64(w)).collect::<Option<Vec<f64>>>();
            parsed
                .map(Some)
                .ok_or_else(|| ImageError::invalid(path, format!("NRRD `{shown}` holds a non-number")))
        };
        let sizes: Vec<usize> = per_axis("sizes", "sizes")?
            .ok_or_else(|| ImageError::invalid(path, "NRRD header has no `sizes` field"))?
            .iter()
            .map(|w| w.parse().ok().filter(|&s| s > 0))
            .collect::<Option<_>>()
            .ok_or_else(|| {
                ImageError::invalid(
                    path,
                    format!(
                        "NRRD sizes `{}` are not positive integers",
                        get("sizes").unwrap_or("")
                    ),
                )
            })?;

        // Domain axes (space, time, unknown kind) and at most one range axis (the pixel's components).
        let kinds = per_axis("kinds", "kinds")?.unwrap_or_else(|| vec!["domain".into(); dimension]);
        let mut range_axis = None;
        for (axis, kind) in kinds.iter().enumerate() {
            let kind = kind.to_ascii_lowercase();
            if matches!(kind.as_str(), "domain" | "space" | "time" | "???" | "none") {
                continue;
            }
            if kind.contains("masked") {
                return bad(format!("NRRD kind `{kind}` (masked tensors) is not supported"));
            }
            if range_axis.replace(axis).is_some() {
                return bad("NRRD has more than one non-domain axis (kinds); ITK reads at most one".into());
            }
        }
        let domain: Vec<usize> = (0..dimension).filter(|&a| Some(a) != range_axis).collect();
        if domain.len() != 2 && domain.len() != 3 {
            return bad(format!(
                "{}D NRRD images are not supported (2D or 3D, optionally with one vector / RGB axis); kinds: {}",
                domain.len(),
                kinds.join(" ")
            ));
        }
        let n = domain.len();

        // Space: its dimension and which axes ITK flips to reach LPS.
        let (space_dim, flip) = match get("space") {
            Some(space) => match space_of(space) {
                Some(found) => found,
                None => return bad(format!("NRRD space `{space}` is not known")),
            },
            None => match get("spacedimension") {
                Some(d) => match d.parse::<usize>() {
                    Ok(d) if d > 0 => (d, [false; 3]),
                    _ => return bad(format!("NRRD space dimension `{d}` is not a positive integer")),
                },
                None => (0, [false; 3]),
            },
        };
        if space_dim != 0 && space_dim != n {
            return bad(format!(
                "NRRD space has dimension {space_dim} but the image has {n} domain axes; ITK reads only equal ones"
            ));
        }
        let spacings = numbers("spacings", "spacings")?;
        let mut spacing = vec![1.0; n];
        let mut axes: Vec<Vec<f64>> = (0..n)
            .map(|i| (0..n).map(|j| f64::from(u8::from(i == j))).collect())
            .collect();
        let mut origin = vec![0.0; n];
        if space_dim > 0 {
            let directions = match get("spacedirections") {
                Some(value) => Some(space_vectors(
                    path,
                    "space directions",
                    value,
                    dimension,
                    space_dim,
                )?),
                None => None,
            };
            for (i, &axis) in domain.iter().enumerate() {
                match directions.as_ref().and_then(|d| d[axis].as_ref()) {
                    Some(vector) => {
                        let norm = vector.iter().map(|v| v * v).sum::<f64>().sqrt();
                        if norm == 0.0 || !norm.is_finite() {
                            return bad(format!("NRRD space direction of axis {axis} has length {norm}"));
                        }
                        spacing[i] = norm;
                        axes[i] = vector
                            .iter()
                            .enumerate()
                            .map(|(j, v)| (if flip[j] { -v } else { *v }) / norm)
                            .collect();
                    }
                    None if spacings.as_ref().is_some_and(|s| !s[axis].is_nan()) => {
                        return bad(format!(
                            "NRRD axis {axis} has `spacings` but no space direction in a space"
                        ))
                    }
                    None => {}
                }
            }
            if let Some(value) = get("spaceorigin") {
                let vector = space_vector(value)
                    .filter(|v| v.len() == space_dim)
                    .ok_or_else(|| {
                        ImageError::invalid(
                            path,
                            format!("NRRD space origin `{value}` is not a {space_dim}-vector"),
                        )
                    })?;
                if !vector[0].is_nan() {
                    origin = vector
                        .iter()
                        .enumerate()
                        .map(|(j, v)| if flip[j] { -v } else { *v })
                        .collect();
                }
            }
        } else {
            if let Some(spacings) = &spacings {
                for (i, &axis) in domain.iter().enumerate() {
                    if !spacings[axis].is_nan() {
                        spacing[i] = spacings[axis];
                    }
                }
            }
            // teem's nrrdOriginCalculate with cell centering by default.
            let mins = numbers("axismins", "axis mins")?;
            let maxs = numbers("axismaxs", "axis maxs")?;
            let centers = per_axis("centers", "centers")?.or(per_axis("centerings", "centerings")?);
            if let Some(mins) = mins.filter(|m| domain.iter().all(|&a| !m[a].is_nan())) {
                let step = |axis: usize, cell: bool| -> Option<f64> {
                    match spacings.as_ref().map(|s| s[axis]).filter(|s| !s.is_nan()) {
                        Some(s) => Some(s),
                        None => {
                            let max = maxs.as_ref().map(|m| m[axis]).filter(|m| !m.is_nan())?;
                            let denom = if cell { sizes[axis] } else { sizes[axis] - 1 };
                            Some((max - mins[axis]) / denom as f64)
                        }
                    }
                };
                let cells: Vec<bool> = domain
                    .iter()
                    .map(|&a| {
                        centers
                            .as_ref()
                            .is_none_or(|c| !c[a].eq_ignore_ascii_case("node"))
                    })
                    .collect();
                let steps: Option<Vec<f64>> = domain
                    .iter()
                    .zip(&cells)
                    .map(|(&a, &cell)| step(a, cell))
                    .collect();
                if let Some(steps) = steps {
                    for (i, &axis) in domain.iter().enumerate() {
                        origin[i] = mins[axis] + if cells[i] { steps[i] / 2.0 } else { 0.0 };
                    }
                }
            }
        }

        let data_file = get("datafile").map(str::to_string);
        if let Some(name) = &data_file {
            if name.contains('%') || name.split_whitespace().count() > 1 {
                return bad(format!(
                    "NRRD `data file: {name}` (a file name pattern) is not supported (one data file only)"
                ));
            }
        }
        let line_skip = match get("lineskip").map(str::parse::<usize>) {
            None => 0,
            Some(Ok(n)) => n,
            Some(Err(_)) => {
                return bad(format!(
                    "NRRD line skip `{}` is not a count",
                    get("lineskip").unwrap_or("")
                ))
            }
        };
        let byte_skip = match get("byteskip").map(str::parse::<i64>) {
            None => 0,
            Some(Ok(n)) => n,
            Some(Err(_)) => {
                return bad(format!(
                    "NRRD byte skip `{}` is not an integer",
                    get("byteskip").unwrap_or("")
                ))
            }
        };
        let domain_sizes: Vec<usize> = domain.iter().map(|&a| sizes[a]).collect();
        let geometry = raw_data::itk_geometry(n, &domain_sizes, &spacing, &origin, &axes);
        Ok(Header {
            element,
            storage,
            big_endian,
            sizes,
            range_axis,
            data_file,
            line_skip,
            byte_skip,
            geometry,
        })
    }

    /// One `[z, y, x]` array per component of the range axis (wherever it is in the file).
    fn channels(&self, values: &[f32]) -> Vec<Array3<f32>> {
        let strides: Vec<usize> = self
            .sizes
            .iter()
            .scan(1, |acc, &s| {
                let stride = *acc;
                *acc *= s;
                Some(stride)
            })
            .collect();
        let domain: Vec<usize> = (0..self.sizes.len())
            .filter(|&a| Some(a) != self.range_axis)
            .collect();
        let sx = strides[domain[0]];
        let sy = strides[domain[1]];
        let sz = domain.get(2).map_or(0, |&a| strides[a]);
        let (components, sc) = self.range_axis.map_or((1, 0), |r| (self.sizes[r], strides[r]));
        let [nz, ny, nx] = self.geometry.shape_zyx;
        (0..components)
            .map(|c| {
                Array3::from_shape_fn((nz, ny, nx), |(z, y, x)| {
                    values[c * sc + z * sz + y * sy + x * sx]
                })
            })
            .collect()
    }
}

fn element_type(name: &str) -> Option<Element> {
    let name = name.to_ascii_lowercase();
    Some(match name.as_str() {
        "signed char" | "int8" | "int8_t" => Element::I8,
        "uchar" | "unsigned char" | "uint8" | "uint8_t" => Element::U8,
        "short" | "short int" | "signed short" | "signed short int" | "int16" | "int16_t" => Element::I16,
        "ushort" | "unsigned short" | "unsigned short int" | "uint16" | "uint16_t" => Element::U16,
        "int" | "signed int" | "int32" | "int32_t" => Element::I32,
        "uint" | "unsigned int" | "uint32" | "uint32_t" => Element::U32,
        "longlong"
        | "long long"
        | "long long int"
        | "signed long long"
        | "signed long long int"
        | "int64"
        | "int64_t" => Element::I64,
        "ulonglong" | "unsigned long long" | "unsigned long long int" | "uint64" | "uint64_t" => Element::U64,
        "float" => Element::F32,
        "double" => Element::F64,
        _ => return None,
    })
}

/// A space's dimension and which of its axes ITK negates to reach LPS.
fn space_of(name: &str) -> Option<(usize, [bool; 3])> {
    let none = [false; 3];
    Some(match name.to_ascii_lowercase().as_str() {
        "right-anterior-superior" | "ras" => (3, [true, true, false]),
        "left-anterior-superior" | "las" => (3, [true, false, false]),
        "left-posterior-superior" | "lps" => (3, none),
        "scanner-xyz" | "3d-right-handed" | "3d-left-handed" => (3, none),
        "right-anterior-superior-time"
        | "rast"
        | "left-anterior-superior-time"
        | "last"
        | "left-posterior-superior-time"
        | "lpst"
        | "scanner-xyz-time"
        | "3d-right-handed-time"
        | "3d-left-handed-time" => (4, none),
        _ => return None,
    })
}

fn parse_f64(word: &str) -> Option<f64> {
    let word = word.trim();
    if word.eq_ignore_ascii_case("nan") || word.eq_ignore_ascii_case("none") {
        return Some(f64::NAN);
    }
    word.parse().ok()
}

/// `(a,b,c)`: the numbers, or None if malformed.
fn space_vector(text: &str) -> Option<Vec<f64>> {
    let inner = text.trim().strip_prefix('(')?.strip_suffix(')')?;
    inner.split(',').map(parse_f64).collect()
}

/// `space directions`: one `(..)` vector or `none` per axis.
fn space_vectors(
    path: &Path,
    shown: &str,
    value: &str,
    dimension: usize,
    space_dim: usize,
) -> Result<Vec<Option<Vec<f64>>>, ImageError> {
    let mut vectors = Vec::new();
    let mut rest = value.trim();
    while !rest.is_empty() {
        let (word, tail) = if rest.starts_with('(') {
            let end = rest.find(')').map_or(rest.len(), |e| e + 1);
            rest.split_at(end)
        } else {
            rest.split_at(rest.find(char::is_whitespace).unwrap_or(rest.len()))
        };
        rest = tail.trim_start();
        if word.eq_ignore_ascii_case("none") {
            vectors.push(None);
            continue;
        }
        let compact: String = word.chars().filter(|c| !c.is_whitespace()).collect();
        match space_vector(&compact).filter(|v| v.len() == space_dim) {
            Some(v) if v.iter().all(|x| x.is_nan()) => vectors.push(None),
            Some(v) => vectors.push(Some(v)),
            None => {
                return Err(ImageError::invalid(
                    path,
                    format!("NRRD `{shown}` entry `{word}` is not a {space_dim}-vector or `none`"),
                ))
            }
        }
    }
    if vectors.len() != dimension {
        return Err(ImageError::invalid(
            path,
            format!(
                "NRRD `{shown}` has {} entries for dimension {dimension}",
                vectors.len()
            ),
        ));
    }
    Ok(vectors)
}
