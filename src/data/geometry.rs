//! The geometry part of a NIfTI-1 header and the two views of it that nnU-Net cares about.
//!
//! This module owns the [`Header`] fields that must survive a read -> write round trip unchanged
//! (dim, pixdim, units, qform/sform and their codes) and the math that turns them into
//! - the RAS+ voxel-to-world affine exactly as nibabel reports it (`img.affine`), and
//! - SimpleITK's view (spacing / origin / direction in LPS), which is what nnU-Net itself sees.
//!
//! Axis conventions: NIfTI stores x fastest, so the header's `dim` / `pixdim` are (x, y, z).
//! nnU-Net (via SimpleITK -> numpy) works in (z, y, x); the `*_zyx` helpers give that order.

use serde::{Deserialize, Serialize};

/// The geometry-relevant fields of a NIfTI-1 header, stored exactly as in the file (f32 values
/// are kept as f32 so that a written header is bit-identical to the one that was read).
///
/// As JSON (preprocessed cases' properties), a NaN or infinite f32 (garbage in a field the file
/// does not use, e.g. `srow` with `sform_code` 0) is written as the string `"NaN"`, `"inf"` or
/// `"-inf"` rather than `null`, so the next stage can read it back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// `dim[0]` = number of dimensions, `dim[1..=3]` = (x, y, z) sizes.
    pub dim: [i16; 8],
    /// `pixdim[0]` = qfac, `pixdim[1..=3]` = (x, y, z) voxel sizes.
    #[serde(with = "json_f32")]
    pub pixdim: [f32; 8],
    pub xyzt_units: u8,
    pub qform_code: i16,
    pub sform_code: i16,
    /// Quaternion (b, c, d); `a` is derived.
    #[serde(with = "json_f32")]
    pub quatern: [f32; 3],
    /// qoffset (x, y, z).
    #[serde(with = "json_f32")]
    pub qoffset: [f32; 3],
    /// srow_x, srow_y, srow_z.
    #[serde(with = "json_f32_rows")]
    pub srow: [[f32; 4]; 3],
    /// NIfTI datatype code of the file this header was read from (informational only; `write`
    /// uses the type of the array it is given).
    pub datatype: i16,
    /// Set when the header was read from a NIfTI-2 file: the file's double-precision geometry.
    /// The f32 fields above then hold these values rounded to f32 (and `dim` the i64 sizes, which
    /// must fit in i16); the geometry math and the NIfTI-2 writer use the f64 values wherever they
    /// still round to the f32 field (so code that edits an f32 field is never overridden by a
    /// stale f64). Absent for NIfTI-1, and then not written to JSON at all, so the JSON of NIfTI-1
    /// headers is unchanged and old JSON (without the field) reads as NIfTI-1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nifti2: Option<Nifti2Geometry>,
}

/// The double-precision fields of a NIfTI-2 header, exactly as in the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Nifti2Geometry {
    #[serde(with = "json_f64")]
    pub pixdim: [f64; 8],
    #[serde(with = "json_f64")]
    pub quatern: [f64; 3],
    #[serde(with = "json_f64")]
    pub qoffset: [f64; 3],
    #[serde(with = "json_f64_rows")]
    pub srow: [[f64; 4]; 3],
}

impl Nifti2Geometry {
    /// The f64 geometry of a header: its own NIfTI-2 values, or the f32 fields widened.
    pub fn of(header: &Header) -> Nifti2Geometry {
        Nifti2Geometry {
            pixdim: header.pixdim_f64(),
            quatern: header.quatern_f64(),
            qoffset: header.qoffset_f64(),
            srow: header.srow_f64(),
        }
    }
}

/// `precise` if it rounds to `stored` (bit for bit; NaN matches NaN), else `stored` widened.
fn precise_or<const N: usize>(stored: [f32; N], precise: Option<[f64; N]>) -> [f64; N] {
    let widened = stored.map(f64::from);
    match precise {
        Some(p)
            if p.iter()
                .zip(&stored)
                .all(|(&p, &s)| (p as f32).to_bits() == s.to_bits() || (p.is_nan() && s.is_nan())) =>
        {
            p
        }
        _ => widened,
    }
}

impl Header {
    /// pixdim in f64: a NIfTI-2 file's own values, else the f32 ones widened.
    pub fn pixdim_f64(&self) -> [f64; 8] {
        precise_or(self.pixdim, self.nifti2.as_ref().map(|n| n.pixdim))
    }

    /// Quaternion (b, c, d) in f64 (see [`Header::pixdim_f64`]).
    pub fn quatern_f64(&self) -> [f64; 3] {
        precise_or(self.quatern, self.nifti2.as_ref().map(|n| n.quatern))
    }

    /// qoffset (x, y, z) in f64 (see [`Header::pixdim_f64`]).
    pub fn qoffset_f64(&self) -> [f64; 3] {
        precise_or(self.qoffset, self.nifti2.as_ref().map(|n| n.qoffset))
    }

    /// srow_x, srow_y, srow_z in f64 (see [`Header::pixdim_f64`]).
    pub fn srow_f64(&self) -> [[f64; 4]; 3] {
        let precise = self.nifti2.as_ref().map(|n| n.srow);
        std::array::from_fn(|r| precise_or(self.srow[r], precise.map(|p| p[r])))
    }

    /// The number of 3D volumes the header declares: `dim[4]` of a 4D image (the product of the
    /// sizes past the third, in general), 1 for 2D and 3D images.
    pub fn volumes(&self) -> usize {
        let ndim = self.dim[0].clamp(0, 7) as usize;
        (4..=ndim).map(|axis| self.dim[axis].max(1) as usize).product()
    }

    /// Spatial size in NIfTI order (x, y, z); missing dimensions (2D images) are 1.
    pub fn shape_xyz(&self) -> [usize; 3] {
        let ndim = self.dim[0].clamp(0, 7) as usize;
        let size = |axis: usize| {
            if axis <= ndim {
                self.dim[axis].max(1) as usize
            } else {
                1
            }
        };
        [size(1), size(2), size(3)]
    }

    /// Spatial size in nnU-Net / SimpleITK-numpy order (z, y, x).
    pub fn shape_zyx(&self) -> [usize; 3] {
        let [x, y, z] = self.shape_xyz();
        [z, y, x]
    }

    /// Voxel size (x, y, z) from pixdim, as ITK reports it. Non-positive values (e.g. pixdim[3]
    /// of a 2D image) become 1, as in niftilib, so downstream code never divides by zero.
    pub fn itk_spacing(&self) -> [f64; 3] {
        let pixdim = self.pixdim_f64();
        [
            pixdim_or_one(pixdim[1]),
            pixdim_or_one(pixdim[2]),
            pixdim_or_one(pixdim[3]),
        ]
    }

    /// Voxel size in (z, y, x) order, matching `Volume::data`'s axes, as nnU-Net sees it: a 2D image
    /// (`dim[0] == 2`) gets 999 x its largest in-plane spacing along z, as nnU-Net's SimpleITK
    /// reader assigns, so planning treats it as a stack of unrelated slices.
    pub fn spacing_zyx(&self) -> [f64; 3] {
        let [x, y, z] = self.itk_spacing();
        if self.dim[0] == 2 {
            return [999.0 * x.max(y), y, x];
        }
        [z, y, x]
    }

    /// The RAS+ affine nibabel reports: sform if sform_code > 0, else qform if qform_code > 0,
    /// else `diag(pixdim[1], pixdim[2], pixdim[3], 1)` (NIfTI "method 1").
    ///
    /// Note: for the last case nibabel itself returns a centred, x-flipped Analyze-style affine;
    /// we follow the NIfTI standard / niftilib / ITK instead (see the report in the fixtures).
    pub fn affine(&self) -> [[f64; 4]; 4] {
        if self.sform_code > 0 {
            self.sform_affine()
        } else if self.qform_code > 0 {
            self.qform_affine()
        } else {
            let [dx, dy, dz] = self.itk_spacing();
            [
                [dx, 0.0, 0.0, 0.0],
                [0.0, dy, 0.0, 0.0],
                [0.0, 0.0, dz, 0.0],
                [0.0, 0.0, 0.0, 1.0],
            ]
        }
    }

    /// The sform matrix (srow_x/y/z), regardless of sform_code.
    pub fn sform_affine(&self) -> [[f64; 4]; 4] {
        let [x, y, z] = self.srow_f64();
        [x, y, z, [0.0, 0.0, 0.0, 1.0]]
    }

    /// The qform matrix, regardless of qform_code: R(quaternion) * diag(dx, dy, qfac * dz).
    pub fn qform_affine(&self) -> [[f64; 4]; 4] {
        let rot = quaternion_to_matrix(self.quatern_f64());
        // The standard says qfac is -1 or 1; anything else (commonly 0) means 1.
        let qfac = if self.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
        let [dx, dy, dz] = self.itk_spacing();
        let scale = [dx, dy, dz * qfac];
        let mut out = [[0.0; 4]; 4];
        for (r, out_row) in out.iter_mut().take(3).enumerate() {
            for c in 0..3 {
                out_row[c] = rot[r][c] * scale[c];
            }
            out_row[3] = self.qoffset_f64()[r];
        }
        out[3][3] = 1.0;
        out
    }

    /// ITK origin in LPS: the RAS affine's translation with x and y negated.
    /// Without sform and qform ITK reports origin 0 (checked with SimpleITK 2.5).
    pub fn itk_origin(&self) -> [f64; 3] {
        if !self.has_transform() {
            return [0.0; 3];
        }
        let a = self.affine();
        [-a[0][3], -a[1][3], a[2][3]]
    }

    /// ITK direction matrix (row-major, LPS): the affine's 3x3 columns normalised to unit length,
    /// rows 0 and 1 negated (RAS -> LPS).
    ///
    /// Without sform and qform ITK reports the identity (no RAS -> LPS flip; checked with
    /// SimpleITK 2.5), so we do too. Known gap: ITK rejects a sheared sform and falls back to the
    /// qform, whereas we always derive this from [`Header::affine`].
    pub fn itk_direction(&self) -> [[f64; 3]; 3] {
        if !self.has_transform() {
            return [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
        }
        let a = self.affine();
        let mut dir = [[0.0; 3]; 3];
        for c in 0..3 {
            let norm = (0..3).map(|r| a[r][c] * a[r][c]).sum::<f64>().sqrt();
            for (r, dir_row) in dir.iter_mut().enumerate() {
                // A degenerate (zero) column cannot be normalised; fall back to the identity axis.
                let v = if norm > 0.0 {
                    a[r][c] / norm
                } else {
                    f64::from(u8::from(r == c))
                };
                dir_row[c] = if r < 2 { -v } else { v };
            }
        }
        dir
    }
}

impl Header {
    /// An axis-aligned image (identity direction in RAS) of the given (z, y, x) shape and spacing,
    /// with both sform and qform set, as a scanner-independent default for generated data.
    pub fn axis_aligned(shape_zyx: [usize; 3], spacing_zyx: [f64; 3], origin_xyz: [f64; 3]) -> Header {
        let [z, y, x] = shape_zyx;
        let [sz, sy, sx] = spacing_zyx.map(|s| s as f32);
        let [ox, oy, oz] = origin_xyz.map(|o| o as f32);
        Header {
            dim: [3, x as i16, y as i16, z as i16, 1, 1, 1, 1],
            pixdim: [1.0, sx, sy, sz, 0.0, 0.0, 0.0, 0.0],
            xyzt_units: 2,
            qform_code: 1,
            sform_code: 1,
            quatern: [0.0, 0.0, 0.0],
            qoffset: [ox, oy, oz],
            srow: [[sx, 0.0, 0.0, ox], [0.0, sy, 0.0, oy], [0.0, 0.0, sz, oz]],
            datatype: 16,
            nifti2: None,
        }
    }

    /// The header ITK writes for an image of this spacing, origin and direction (LPS): sform and
    /// qform both set (code 1, scanner anatomical), the LPS -> RAS flip applied to x and y, and the
    /// direction's handedness in qfac. 2D images keep `dim[0] = 2`.
    pub fn from_itk(
        ndim: u8,
        shape_zyx: [usize; 3],
        spacing: [f64; 3],
        origin: [f64; 3],
        direction: [[f64; 3]; 3],
    ) -> Header {
        let [z, y, x] = shape_zyx;
        let ras_flip = |row: usize| if row < 2 { -1.0 } else { 1.0 };
        let mut rotation = [[0.0; 3]; 3];
        let mut srow = [[0.0f32; 4]; 3];
        for r in 0..3 {
            for c in 0..3 {
                rotation[r][c] = ras_flip(r) * direction[r][c];
                srow[r][c] = (rotation[r][c] * spacing[c]) as f32;
            }
            srow[r][3] = (ras_flip(r) * origin[r]) as f32;
        }
        let (quatern, qfac) = matrix_to_quaternion(rotation);
        Header {
            dim: [i16::from(ndim), x as i16, y as i16, z as i16, 1, 1, 1, 1],
            pixdim: [
                qfac as f32,
                spacing[0] as f32,
                spacing[1] as f32,
                spacing[2] as f32,
                0.0,
                0.0,
                0.0,
                0.0,
            ],
            xyzt_units: 2,
            qform_code: 1,
            sform_code: 1,
            quatern: quatern.map(|q| q as f32),
            qoffset: [srow[0][3], srow[1][3], srow[2][3]],
            srow,
            datatype: 16,
            nifti2: None,
        }
    }

    fn has_transform(&self) -> bool {
        self.sform_code > 0 || self.qform_code > 0
    }
}

/// The quaternion (b, c, d) and qfac of a rotation, as niftilib's `nifti_mat44_to_quatern` computes
/// them: a left-handed matrix gets qfac -1 and its third column negated first.
fn matrix_to_quaternion(mut r: [[f64; 3]; 3]) -> ([f64; 3], f64) {
    let det = r[0][0] * (r[1][1] * r[2][2] - r[1][2] * r[2][1])
        - r[0][1] * (r[1][0] * r[2][2] - r[1][2] * r[2][0])
        + r[0][2] * (r[1][0] * r[2][1] - r[1][1] * r[2][0]);
    let qfac = if det < 0.0 { -1.0 } else { 1.0 };
    if det < 0.0 {
        for row in r.iter_mut() {
            row[2] = -row[2];
        }
    }
    let trace = r[0][0] + r[1][1] + r[2][2] + 1.0;
    let (mut a, mut b, mut c, mut d);
    if trace > 0.5 {
        a = 0.5 * trace.sqrt();
        b = 0.25 * (r[2][1] - r[1][2]) / a;
        c = 0.25 * (r[0][2] - r[2][0]) / a;
        d = 0.25 * (r[1][0] - r[0][1]) / a;
    } else {
        let xd = 1.0 + r[0][0] - (r[1][1] + r[2][2]);
        let yd = 1.0 + r[1][1] - (r[0][0] + r[2][2]);
        let zd = 1.0 + r[2][2] - (r[0][0] + r[1][1]);
        if xd > 1.0 {
            b = 0.5 * xd.sqrt();
            c = 0.25 * (r[0][1] + r[1][0]) / b;
            d = 0.25 * (r[0][2] + r[2][0]) / b;
            a = 0.25 * (r[2][1] - r[1][2]) / b;
        } else if yd > 1.0 {
            c = 0.5 * yd.sqrt();
            b = 0.25 * (r[0][1] + r[1][0]) / c;
            d = 0.25 * (r[1][2] + r[2][1]) / c;
            a = 0.25 * (r[0][2] - r[2][0]) / c;
        } else {
            d = 0.5 * zd.sqrt();
            b = 0.25 * (r[0][2] + r[2][0]) / d;
            c = 0.25 * (r[1][2] + r[2][1]) / d;
            a = 0.25 * (r[1][0] - r[0][1]) / d;
        }
        if a < 0.0 {
            (a, b, c, d) = (-a, -b, -c, -d);
        }
    }
    let _ = a;
    ([b, c, d], qfac)
}

fn pixdim_or_one(v: f64) -> f64 {
    if v > 0.0 && v.is_finite() {
        v
    } else {
        1.0
    }
}

/// Rotation matrix from the NIfTI quaternion (b, c, d), following nibabel (`fillpositive` +
/// `quat2mat`) so that our affine matches `img.affine` to the last bits.
fn quaternion_to_matrix([x, y, z]: [f64; 3]) -> [[f64; 3]; 3] {
    // a^2 may be slightly negative from f32 rounding; nibabel clamps it to 0.
    let w = (1.0 - (x * x + y * y + z * z)).max(0.0).sqrt();
    let nq = w * w + x * x + y * y + z * z;
    if nq < f64::EPSILON {
        return [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    }
    let s = 2.0 / nq;
    let (xs, ys, zs) = (x * s, y * s, z * s);
    let (wx, wy, wz) = (w * xs, w * ys, w * zs);
    let (xx, xy, xz) = (x * xs, x * ys, x * zs);
    let (yy, yz, zz) = (y * ys, y * zs, z * zs);
    [
        [1.0 - (yy + zz), xy - wz, xz + wy],
        [xy + wz, 1.0 - (xx + zz), yz - wx],
        [xz - wy, yz + wx, 1.0 - (xx + yy)],
    ]
}

/// A float in JSON: finite values as numbers, NaN and ±infinity as the strings `"NaN"`, `"inf"`,
/// `"-inf"` (JSON has no such numbers; serde_json would write `null` and refuse to read it).
macro_rules! json_float {
    ($wrapper:ident, $float:ty, $serialize:ident, $module:ident, $rows:ident) => {
        #[derive(Clone, Copy)]
        struct $wrapper($float);

        impl Serialize for $wrapper {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let v = self.0;
                if v.is_finite() {
                    serializer.$serialize(v)
                } else if v.is_nan() {
                    serializer.serialize_str("NaN")
                } else if v > 0.0 {
                    serializer.serialize_str("inf")
                } else {
                    serializer.serialize_str("-inf")
                }
            }
        }

        impl<'de> Deserialize<'de> for $wrapper {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                #[derive(Deserialize)]
                #[serde(untagged)]
                enum Either {
                    Number($float),
                    Text(String),
                }
                match Either::deserialize(deserializer)? {
                    Either::Number(v) => Ok($wrapper(v)),
                    Either::Text(text) => match text.as_str() {
                        "NaN" => Ok($wrapper(<$float>::NAN)),
                        "inf" => Ok($wrapper(<$float>::INFINITY)),
                        "-inf" => Ok($wrapper(<$float>::NEG_INFINITY)),
                        _ => Err(serde::de::Error::custom(format!(
                            "expected a number, \"NaN\", \"inf\" or \"-inf\", got {text:?}"
                        ))),
                    },
                }
            }
        }

        mod $module {
            use serde::{Deserialize, Deserializer, Serialize, Serializer};

            use super::$wrapper;

            pub fn serialize<S: Serializer, const N: usize>(
                values: &[$float; N],
                serializer: S,
            ) -> Result<S::Ok, S::Error>
            where
                [$wrapper; N]: Serialize,
            {
                values.map($wrapper).serialize(serializer)
            }

            pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
                deserializer: D,
            ) -> Result<[$float; N], D::Error>
            where
                [$wrapper; N]: Deserialize<'de>,
            {
                Ok(<[$wrapper; N]>::deserialize(deserializer)?.map(|v| v.0))
            }
        }

        mod $rows {
            use serde::{Deserialize, Deserializer, Serialize, Serializer};

            use super::$wrapper;

            pub fn serialize<S: Serializer>(
                rows: &[[$float; 4]; 3],
                serializer: S,
            ) -> Result<S::Ok, S::Error> {
                rows.map(|row| row.map($wrapper)).serialize(serializer)
            }

            pub fn deserialize<'de, D: Deserializer<'de>>(
                deserializer: D,
            ) -> Result<[[$float; 4]; 3], D::Error> {
                Ok(<[[$wrapper; 4]; 3]>::deserialize(deserializer)?.map(|row| row.map(|v| v.0)))
            }
        }
    };
}

json_float!(JsonF32, f32, serialize_f32, json_f32, json_f32_rows);
json_float!(JsonF64, f64, serialize_f64, json_f64, json_f64_rows);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_header_values_survive_json() {
        let mut h = header();
        h.pixdim[5] = f32::NAN;
        h.srow[1][2] = f32::INFINITY;
        h.quatern[0] = f32::NEG_INFINITY;
        let text = serde_json::to_string(&h).unwrap();
        assert!(!text.contains("null"), "{text}");
        assert!(text.contains(r#""NaN""#) && text.contains(r#""inf""#) && text.contains(r#""-inf""#));
        let back: Header = serde_json::from_str(&text).unwrap();
        assert!(back.pixdim[5].is_nan());
        assert_eq!(back.srow[1][2], f32::INFINITY);
        assert_eq!(back.quatern[0], f32::NEG_INFINITY);
        // Finite values are plain numbers, read back bit for bit.
        let finite: Header = serde_json::from_str(&serde_json::to_string(&header()).unwrap()).unwrap();
        assert_eq!(finite, header());
        assert!(serde_json::to_string(&header())
            .unwrap()
            .contains(r#""pixdim":[1.0,2.0,3.0,4.0,"#));
    }

    fn header() -> Header {
        Header {
            dim: [3, 4, 5, 6, 1, 1, 1, 1],
            pixdim: [1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0],
            xyzt_units: 10,
            qform_code: 1,
            sform_code: 0,
            quatern: [0.0, 0.0, 0.0],
            qoffset: [1.0, 2.0, 3.0],
            srow: [[9.0; 4]; 3],
            datatype: 4,
            nifti2: None,
        }
    }

    #[test]
    fn nifti2_geometry_survives_json_and_nifti1_json_is_unchanged() {
        let nifti1 = serde_json::to_string(&header()).unwrap();
        assert!(!nifti1.contains("nifti2"), "{nifti1}");
        let mut h = header();
        let mut precise = Nifti2Geometry::of(&h);
        precise.pixdim[1] = 0.7;
        precise.srow[0][3] = f64::NAN;
        h.pixdim[1] = 0.7f32;
        h.srow[0][3] = f32::NAN;
        h.nifti2 = Some(precise);
        let back: Header = serde_json::from_str(&serde_json::to_string(&h).unwrap()).unwrap();
        assert_eq!(back.pixdim_f64()[1], 0.7);
        assert!(back.srow_f64()[0][3].is_nan());
        assert_eq!(back.itk_spacing()[0], 0.7);
        // An f32 field edited after reading wins over the stale f64 value.
        let mut edited = back.clone();
        edited.pixdim[1] = 2.0;
        assert_eq!(edited.itk_spacing()[0], 2.0);
    }

    #[test]
    fn identity_quaternion_gives_diagonal_affine() {
        let a = header().affine();
        assert_eq!(a[0], [2.0, 0.0, 0.0, 1.0]);
        assert_eq!(a[1], [0.0, 3.0, 0.0, 2.0]);
        assert_eq!(a[2], [0.0, 0.0, 4.0, 3.0]);
    }

    #[test]
    fn qfac_minus_one_flips_z_column_and_itk_view_flips_xy_rows() {
        let mut h = header();
        h.pixdim[0] = -1.0;
        assert_eq!(h.affine()[2][2], -4.0);
        assert_eq!(h.itk_origin(), [-1.0, -2.0, 3.0]);
        assert_eq!(
            h.itk_direction(),
            [[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]]
        );
        assert_eq!(h.spacing_zyx(), [4.0, 3.0, 2.0]);
        assert_eq!(h.shape_zyx(), [6, 5, 4]);
    }

    #[test]
    fn sform_wins_over_qform_when_coded() {
        let mut h = header();
        h.sform_code = 2;
        assert_eq!(h.affine()[0], [9.0; 4]);
    }
}
