//! Where an image's voxels are in the world, in the two views nnU-Net keeps: the spacing it plans
//! and resamples with (`properties['spacing']`) and ITK's spacing / origin / direction it writes
//! predictions with (`properties['sitk_stuff']`). A NIfTI image also keeps its header, so a
//! prediction written as NIfTI has bit-for-bit the geometry of the image it was predicted for.

use serde::{Deserialize, Serialize};

use crate::data::geometry::Header;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Geometry {
    /// Spatial dimensions of the file: 2 (pictures, 2D NIfTI/NRRD/MetaImage) or 3.
    pub ndim: u8,
    /// Voxel grid `[z, y, x]` (z = 1 for 2D images).
    pub shape_zyx: [usize; 3],
    /// nnU-Net's spacing, `[z, y, x]`, positive: a 2D image gets 999 x its largest in-plane spacing
    /// along z, so planning treats it as a stack of unrelated slices.
    pub spacing_zyx: [f64; 3],
    /// ITK's spacing (x, y, z); for 2D images z is 1 and unused.
    pub itk_spacing: [f64; 3],
    /// ITK's origin (x, y, z) in LPS.
    pub itk_origin: [f64; 3],
    /// ITK's direction cosines, row-major (columns are the voxel axes' directions), LPS.
    pub itk_direction: [[f64; 3]; 3],
    /// The NIfTI header the image was read from, if it was NIfTI.
    pub nifti: Option<Header>,
}

const IDENTITY: [[f64; 3]; 3] = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];

impl Geometry {
    /// The geometry of a NIfTI image, as SimpleITK reports it.
    pub fn from_nifti(header: Header) -> Geometry {
        Geometry {
            ndim: if header.dim[0] == 2 { 2 } else { 3 },
            shape_zyx: header.shape_zyx(),
            spacing_zyx: header.spacing_zyx(),
            itk_spacing: header.itk_spacing(),
            itk_origin: header.itk_origin(),
            itk_direction: header.itk_direction(),
            nifti: Some(header),
        }
    }

    /// The geometry ITK reports for a 2D or 3D image (2D: only the first two entries of spacing and
    /// origin and the upper-left 2x2 of direction mean anything; pass 1 / 0 / identity for the rest).
    pub fn from_itk(
        ndim: u8,
        shape_zyx: [usize; 3],
        spacing: [f64; 3],
        origin: [f64; 3],
        direction: [[f64; 3]; 3],
    ) -> Geometry {
        let [sx, sy, sz] = spacing.map(f64::abs);
        let spacing_zyx = if ndim == 2 {
            [999.0 * sx.max(sy), sy, sx]
        } else {
            [sz, sy, sx]
        };
        Geometry {
            ndim,
            shape_zyx,
            spacing_zyx,
            itk_spacing: spacing,
            itk_origin: origin,
            itk_direction: direction,
            nifti: None,
        }
    }

    /// A 2D picture (PNG, BMP, TIFF): no geometry in the file, nnU-Net's spacing (999, 1, 1).
    pub fn picture(height: usize, width: usize) -> Geometry {
        Geometry::from_itk(2, [1, height, width], [1.0; 3], [0.0; 3], IDENTITY)
    }

    /// A 3D image known only by nnU-Net's spacing (3D TIFF): ITK's view is that spacing reversed,
    /// at the origin, axis-aligned.
    pub fn from_spacing_zyx(shape_zyx: [usize; 3], spacing_zyx: [f64; 3]) -> Geometry {
        let [z, y, x] = spacing_zyx;
        Geometry {
            spacing_zyx: spacing_zyx.map(f64::abs),
            ..Geometry::from_itk(3, shape_zyx, [x, y, z], [0.0; 3], IDENTITY)
        }
    }

    pub fn shape_zyx(&self) -> [usize; 3] {
        self.shape_zyx
    }

    pub fn spacing_zyx(&self) -> [f64; 3] {
        self.spacing_zyx
    }

    /// The same geometry for a voxel grid of another shape (a header written for resized data).
    pub fn with_shape(&self, shape_zyx: [usize; 3]) -> Geometry {
        let mut geometry = self.clone();
        geometry.shape_zyx = shape_zyx;
        if let Some(header) = geometry.nifti.as_mut() {
            let [z, y, x] = shape_zyx;
            header.dim[1] = x as i16;
            header.dim[2] = y as i16;
            header.dim[3] = z as i16;
        }
        geometry
    }

    /// The NIfTI header a prediction for this image is written with: the image's own if it was
    /// NIfTI, else one that ITK reads back with this spacing, origin and direction (LPS -> RAS),
    /// sform and qform both set as ITK writes them.
    pub fn nifti_header(&self) -> Header {
        if let Some(header) = &self.nifti {
            return header.clone();
        }
        Header::from_itk(
            self.ndim,
            self.shape_zyx,
            self.itk_spacing,
            self.itk_origin,
            self.itk_direction,
        )
    }

    /// Whether two images have the same origin and direction (to 1e-4, relative above 1: the
    /// precision of a float32 header), the check that only warns in nnU-Net.
    pub fn same_position(&self, other: &Geometry) -> bool {
        let close = |a: &f64, b: &f64| (a - b).abs() <= 1e-4 * a.abs().max(1.0);
        let all = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| close(x, y));
        all(&self.itk_origin, &other.itk_origin)
            && all(
                self.itk_direction.as_flattened(),
                other.itk_direction.as_flattened(),
            )
    }
}
