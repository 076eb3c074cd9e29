//! nnU-Net's augmentation geometry decisions (`nnUNetTrainer.configure_rotation_dummyDA_mirroring_and_
//! inital_patch_size` and `compute_initial_patch_size.get_patch_size`): rotation range, whether an
//! anisotropic 3D patch gets in-plane ("dummy 2D") augmentation only, the mirror axes, and the enlarged
//! patch the loader must crop so that rotation and scaling rarely sample outside the data.

use super::AugmentError;

/// nnU-Net's `ANISO_THRESHOLD`: a 3D patch whose largest edge exceeds 3x its first (lowest-resolution)
/// edge is augmented in-plane only.
pub const ANISO_THRESHOLD: f64 = 3.0;

/// The scale range nnU-Net passes to `get_patch_size` (not the (0.7, 1.4) used for augmenting: nnU-Net
/// keeps the old value on purpose, so the loader's enlarged patch stays as in nnU-Net v1).
const INITIAL_PATCH_SCALE_MIN: f64 = 0.85;

/// What the trainer derives from the configured patch size.
#[derive(Debug, Clone, PartialEq)]
pub struct DaConfig {
    /// Final patch size as planned: 3 entries (z, y, x) or 2 entries (y, x) for the `2d` configuration.
    pub patch_size: Vec<usize>,
    /// Symmetric rotation range in degrees, per axis.
    pub rotation_deg: [f64; 2],
    /// In-plane augmentation of an anisotropic 3D patch.
    pub dummy_2d: bool,
    /// The enlarged patch the loader crops before augmentation (same length as `patch_size`).
    pub initial_patch_size: Vec<usize>,
    /// Mirror axes as indices into the (z, y, x) axes of a [`super::Sample`]: (0, 1, 2) for 3D, (1, 2) for 2D.
    pub mirror_axes: Vec<usize>,
}

impl DaConfig {
    /// nnU-Net's decisions for a planned patch size (2 or 3 entries).
    pub fn from_patch_size(patch_size: &[usize]) -> Result<Self, AugmentError> {
        if !(patch_size.len() == 2 || patch_size.len() == 3) || patch_size.contains(&0) {
            return Err(AugmentError::Config(format!(
                "patch size must have 2 or 3 non-zero entries, got {patch_size:?}"
            )));
        }
        let max = *patch_size.iter().max().unwrap_or(&1) as f64;
        let (rotation, dummy_2d, mirror_axes) = if patch_size.len() == 2 {
            let min = *patch_size.iter().min().unwrap_or(&1) as f64;
            // elongated 2D patches would rotate their long side out of the sampled region
            let rot = if max / min > 1.5 { 15.0 } else { 180.0 };
            (rot, false, vec![1, 2])
        } else {
            let dummy = max / patch_size[0] as f64 > ANISO_THRESHOLD;
            (if dummy { 180.0 } else { 30.0 }, dummy, vec![0, 1, 2])
        };
        let mut initial_patch_size = initial_patch_size(patch_size, rotation);
        if dummy_2d {
            initial_patch_size[0] = patch_size[0];
        }
        Ok(Self {
            patch_size: patch_size.to_vec(),
            rotation_deg: [-rotation, rotation],
            dummy_2d,
            initial_patch_size,
            mirror_axes,
        })
    }
}

/// `get_patch_size`: the bounding extent of the patch rotated by the largest angle about each axis in
/// turn (capped at 90 degrees), divided by the smallest scale, truncated.
pub fn initial_patch_size(patch_size: &[usize], max_rotation_deg: f64) -> Vec<usize> {
    let a = max_rotation_deg.abs().min(90.0).to_radians();
    let (s, c) = a.sin_cos();
    let p: Vec<f64> = patch_size.iter().map(|&v| v as f64).collect();
    let mut extent = p.clone();
    let mut widen = |rotated: [f64; 3]| {
        for (e, r) in extent.iter_mut().zip(rotated) {
            *e = e.max(r.abs());
        }
    };
    if p.len() == 3 {
        // row vector times the rotation matrix, as batchgenerators' rotate_coords_3d does
        widen([p[0], p[1] * c + p[2] * s, -p[1] * s + p[2] * c]);
        widen([p[0] * c - p[2] * s, p[1], p[0] * s + p[2] * c]);
        widen([p[0] * c + p[1] * s, -p[0] * s + p[1] * c, p[2]]);
    } else {
        widen([p[0] * c + p[1] * s, -p[0] * s + p[1] * c, 0.0]);
    }
    extent
        .iter()
        .map(|&e| (e / INITIAL_PATCH_SCALE_MIN) as usize)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isotropic_3d_and_dummy_2d() {
        let cfg = DaConfig::from_patch_size(&[128, 128, 128]).unwrap();
        assert_eq!(cfg.initial_patch_size, vec![205, 205, 205]);
        assert!(!cfg.dummy_2d);
        let cfg = DaConfig::from_patch_size(&[20, 256, 224]).unwrap();
        assert!(cfg.dummy_2d);
        assert_eq!(cfg.rotation_deg, [-180.0, 180.0]);
        assert_eq!(cfg.initial_patch_size[0], 20);
        assert!(DaConfig::from_patch_size(&[1, 2, 3, 4]).is_err());
    }
}
