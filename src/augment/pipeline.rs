//! The transform registry and the configurable pipeline: which transforms run, in which order, with
//! which parameters, and how each sample's randomness is derived.
//!
//! A pipeline deserializes from a plain list (JSON, or a TOML array of inline tables):
//! `[{ name = "gaussian_noise", p = 0.1, variance = [0.0, 0.1] }, { name = "mirror" }]`. Every entry
//! names a registered transform; omitted keys take nnU-Net's defaults; unknown names and unknown keys
//! are rejected; `enabled = false` switches an entry off without deleting it.

use ndarray::Axis;
use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::blur::GaussianBlurParams;
use super::cascade::{RandomBinaryOperatorParams, RemoveRandomComponentParams};
use super::da_config::DaConfig;
use super::intensity::{
    BrightnessParams, ContrastParams, GammaDraw, GammaInvertedParams, GammaParams, GaussianNoiseParams,
};
use super::low_resolution::LowResolutionParams;
use super::mirror::MirrorParams;
use super::seg::{MaskImageParams, RemoveLabelParams};
use super::spatial::{SpatialDraw, SpatialParams};
use super::{AugmentError, Sample, SampleRng};

/// One registered transform with its parameters; `name` selects the variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "name", rename_all = "snake_case")]
pub enum TransformSpec {
    Spatial(SpatialParams),
    GaussianNoise(GaussianNoiseParams),
    GaussianBlur(GaussianBlurParams),
    Brightness(BrightnessParams),
    Contrast(ContrastParams),
    LowResolution(LowResolutionParams),
    GammaInverted(GammaInvertedParams),
    Gamma(GammaParams),
    Mirror(MirrorParams),
    MaskImage(MaskImageParams),
    RemoveLabel(RemoveLabelParams),
    RandomBinaryOperator(RandomBinaryOperatorParams),
    RemoveRandomComponent(RemoveRandomComponentParams),
}

impl TransformSpec {
    /// The registry name (the `name` key in configs).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Spatial(_) => "spatial",
            Self::GaussianNoise(_) => "gaussian_noise",
            Self::GaussianBlur(_) => "gaussian_blur",
            Self::Brightness(_) => "brightness",
            Self::Contrast(_) => "contrast",
            Self::LowResolution(_) => "low_resolution",
            Self::GammaInverted(_) => "gamma_inverted",
            Self::Gamma(_) => "gamma",
            Self::Mirror(_) => "mirror",
            Self::MaskImage(_) => "mask_image",
            Self::RemoveLabel(_) => "remove_label",
            Self::RandomBinaryOperator(_) => "random_binary_operator",
            Self::RemoveRandomComponent(_) => "remove_random_component",
        }
    }

    /// `(enabled, p)`: whether the entry is switched on and its per-sample probability.
    pub fn gate(&self) -> (bool, f64) {
        match self {
            Self::Spatial(t) => (t.enabled, t.p),
            Self::GaussianNoise(t) => (t.enabled, t.p),
            Self::GaussianBlur(t) => (t.enabled, t.p),
            Self::Brightness(t) => (t.enabled, t.p),
            Self::Contrast(t) => (t.enabled, t.p),
            Self::LowResolution(t) => (t.enabled, t.p),
            Self::GammaInverted(t) => (t.enabled, t.p),
            Self::Gamma(t) => (t.enabled, t.p),
            Self::Mirror(t) => (t.enabled, t.p),
            Self::MaskImage(t) => (t.enabled, t.p),
            Self::RemoveLabel(t) => (t.enabled, t.p),
            Self::RandomBinaryOperator(t) => (t.enabled, t.p),
            Self::RemoveRandomComponent(t) => (t.enabled, t.p),
        }
    }

    /// Mutable `(enabled, p)`, for switching entries on or off programmatically.
    pub fn gate_mut(&mut self) -> (&mut bool, &mut f64) {
        match self {
            Self::Spatial(t) => (&mut t.enabled, &mut t.p),
            Self::GaussianNoise(t) => (&mut t.enabled, &mut t.p),
            Self::GaussianBlur(t) => (&mut t.enabled, &mut t.p),
            Self::Brightness(t) => (&mut t.enabled, &mut t.p),
            Self::Contrast(t) => (&mut t.enabled, &mut t.p),
            Self::LowResolution(t) => (&mut t.enabled, &mut t.p),
            Self::GammaInverted(t) => (&mut t.enabled, &mut t.p),
            Self::Gamma(t) => (&mut t.enabled, &mut t.p),
            Self::Mirror(t) => (&mut t.enabled, &mut t.p),
            Self::MaskImage(t) => (&mut t.enabled, &mut t.p),
            Self::RemoveLabel(t) => (&mut t.enabled, &mut t.p),
            Self::RandomBinaryOperator(t) => (&mut t.enabled, &mut t.p),
            Self::RemoveRandomComponent(t) => (&mut t.enabled, &mut t.p),
        }
    }

    pub fn validate(&self) -> Result<(), AugmentError> {
        match self {
            Self::Spatial(t) => t.validate(),
            Self::GaussianNoise(t) => t.validate(),
            Self::GaussianBlur(t) => t.validate(),
            Self::Brightness(t) => t.validate(),
            Self::Contrast(t) => t.validate(),
            Self::LowResolution(t) => t.validate(),
            Self::GammaInverted(t) => t.as_gamma().validate("gamma_inverted"),
            Self::Gamma(t) => t.validate("gamma"),
            Self::Mirror(t) => t.validate(),
            Self::MaskImage(t) => t.validate(),
            Self::RemoveLabel(t) => t.validate(),
            Self::RandomBinaryOperator(t) => t.validate(),
            Self::RemoveRandomComponent(t) => t.validate(),
        }
    }

    /// Draws what [`Self::apply`] would draw first from the same stream, without touching data:
    /// batchgeneratorsv2's `get_parameters`. `None` for the label and cascade steps, whose draws
    /// depend on the segmentation.
    pub fn draw(&self, channels: usize, rng: &mut SampleRng) -> Option<TransformDraw> {
        Some(match self {
            Self::Spatial(t) => TransformDraw::Spatial(t.draw_geometry(rng)),
            Self::GaussianNoise(t) => TransformDraw::GaussianNoise(t.draw(rng, channels)),
            Self::GaussianBlur(t) => TransformDraw::GaussianBlur(t.draw(rng, channels)),
            Self::Brightness(t) => TransformDraw::Brightness(t.draw(rng, channels)),
            Self::Contrast(t) => TransformDraw::Contrast(t.draw(rng, channels)),
            Self::LowResolution(t) => TransformDraw::LowResolution(t.draw(rng, channels)),
            Self::GammaInverted(t) => TransformDraw::Gamma(t.as_gamma().draw(rng, channels)),
            Self::Gamma(t) => TransformDraw::Gamma(t.draw(rng, channels)),
            Self::Mirror(t) => TransformDraw::Mirror(t.draw(rng)),
            Self::MaskImage(_)
            | Self::RemoveLabel(_)
            | Self::RandomBinaryOperator(_)
            | Self::RemoveRandomComponent(_) => return None,
        })
    }

    /// Applies the transform unconditionally (the pipeline has already drawn `p`).
    pub fn apply(&self, sample: &mut Sample, rng: &mut SampleRng) {
        match self {
            Self::Spatial(t) => t.apply(sample, rng),
            Self::GaussianNoise(t) => t.apply(sample, rng),
            Self::GaussianBlur(t) => t.apply(sample, rng),
            Self::Brightness(t) => t.apply(sample, rng),
            Self::Contrast(t) => t.apply(sample, rng),
            Self::LowResolution(t) => t.apply(sample, rng),
            Self::GammaInverted(t) => t.as_gamma().apply(sample, rng),
            Self::Gamma(t) => t.apply(sample, rng),
            Self::Mirror(t) => t.apply(sample, rng),
            Self::MaskImage(t) => t.apply(sample, rng),
            Self::RemoveLabel(t) => t.apply(sample, rng),
            Self::RandomBinaryOperator(t) => t.apply(sample, rng),
            Self::RemoveRandomComponent(t) => t.apply(sample, rng),
        }
    }
}

/// One transform's parameters for one sample, as its `draw` returns them: per channel
/// `(channel, value)` pairs for the intensity transforms, per-axis values along (z, y, x).
#[derive(Debug, Clone, PartialEq)]
pub enum TransformDraw {
    Spatial(SpatialDraw),
    /// Noise standard deviation per channel.
    GaussianNoise(Vec<(usize, f64)>),
    GaussianBlur(Vec<(usize, [f64; 3])>),
    Brightness(Vec<(usize, f64)>),
    Contrast(Vec<(usize, f64)>),
    LowResolution(Vec<(usize, [f64; 3])>),
    /// Both `gamma` and `gamma_inverted`.
    Gamma(Vec<GammaDraw>),
    /// The flipped axes.
    Mirror(Vec<usize>),
}

/// What one enabled pipeline entry drew for one sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Drawn {
    pub name: &'static str,
    /// Whether the entry's `p` draw let it run.
    pub fired: bool,
    /// Its parameters when it fired (see [`TransformSpec::draw`]).
    pub params: Option<TransformDraw>,
}

/// An ordered list of transforms; (de)serializes as the bare list.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct Pipeline {
    pub transforms: Vec<TransformSpec>,
}

/// FNV-1a, to turn a transform's name into a stable stream id.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Pipeline {
    /// nnU-Net's `get_training_transforms` for the given geometry, without the cascade / regions /
    /// deep-supervision steps (see [`super::seg::downsample_seg`] for the latter).
    pub fn nnunet_default(da: &DaConfig) -> Self {
        let spatial_patch = if da.dummy_2d {
            da.patch_size[1..].to_vec()
        } else {
            da.patch_size.clone()
        };
        let ignore_axes = if da.dummy_2d { vec![0] } else { Vec::new() };
        Self {
            transforms: vec![
                TransformSpec::Spatial(SpatialParams {
                    patch_size: spatial_patch,
                    rotation_deg: da.rotation_deg,
                    ..Default::default()
                }),
                TransformSpec::GaussianNoise(Default::default()),
                TransformSpec::GaussianBlur(Default::default()),
                TransformSpec::Brightness(Default::default()),
                TransformSpec::Contrast(Default::default()),
                TransformSpec::LowResolution(LowResolutionParams {
                    ignore_axes,
                    ..Default::default()
                }),
                TransformSpec::GammaInverted(Default::default()),
                TransformSpec::Gamma(Default::default()),
                TransformSpec::Mirror(MirrorParams {
                    axes: da.mirror_axes.clone(),
                    ..Default::default()
                }),
                TransformSpec::RemoveLabel(Default::default()),
            ],
        }
    }

    /// Adds nnU-Net's `MaskImageTransform` (before `remove_label`) for channels normalised with the
    /// nonzero mask (`use_mask_for_norm` from the plans); a no-op when none is.
    pub fn with_mask_for_norm(mut self, use_mask_for_norm: &[bool]) -> Self {
        let channels: Vec<usize> = (0..use_mask_for_norm.len())
            .filter(|&c| use_mask_for_norm[c])
            .collect();
        if channels.is_empty() {
            return self;
        }
        let at = self
            .transforms
            .iter()
            .position(|t| t.name() == "remove_label")
            .unwrap_or(self.transforms.len());
        self.transforms.insert(
            at,
            TransformSpec::MaskImage(MaskImageParams {
                channels,
                ..Default::default()
            }),
        );
        self
    }

    /// nnU-Net's cascade steps for a configuration fed by a previous stage (its segmentation in seg
    /// channel 1): `random_binary_operator` and `remove_random_component` with nnU-Net's defaults,
    /// appended at the end (after `remove_label`, as in nnU-Net) unless the list already has them; entries
    /// already present with empty `labels` get the dataset's foreground `labels`.
    pub fn with_previous_stage(mut self, labels: &[i16]) -> Self {
        let (mut has_operator, mut has_removal) = (false, false);
        for t in &mut self.transforms {
            match t {
                TransformSpec::RandomBinaryOperator(p) => {
                    has_operator = true;
                    if p.labels.is_empty() {
                        p.labels = labels.to_vec();
                    }
                }
                TransformSpec::RemoveRandomComponent(p) => {
                    has_removal = true;
                    if p.labels.is_empty() {
                        p.labels = labels.to_vec();
                    }
                }
                _ => {}
            }
        }
        if !has_operator {
            self.transforms
                .push(TransformSpec::RandomBinaryOperator(RandomBinaryOperatorParams {
                    labels: labels.to_vec(),
                    ..Default::default()
                }));
        }
        if !has_removal {
            self.transforms.push(TransformSpec::RemoveRandomComponent(
                RemoveRandomComponentParams {
                    labels: labels.to_vec(),
                    ..Default::default()
                },
            ));
        }
        self
    }

    /// Parses a JSON list of transforms and validates it.
    pub fn from_json(text: &str) -> Result<Self, AugmentError> {
        let pipeline: Self = serde_json::from_str(text).map_err(AugmentError::Json)?;
        pipeline.validate()?;
        Ok(pipeline)
    }

    /// Checks every entry and reports all problems at once.
    pub fn validate(&self) -> Result<(), AugmentError> {
        let problems: Vec<String> = self
            .transforms
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.validate().err().map(|e| format!("entry {i}: {e}")))
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(AugmentError::Config(problems.join("; ")))
        }
    }

    /// The enabled entries in order, each with its own stream (a fork of `rng` keyed by name and
    /// occurrence) after the draw of its `p`, and the outcome of that draw.
    fn gated<'a>(
        &'a self,
        rng: &'a SampleRng,
    ) -> impl Iterator<Item = (&'a TransformSpec, bool, SampleRng)> + 'a {
        let mut seen: Vec<&'static str> = Vec::new();
        self.transforms.iter().filter_map(move |t| {
            let occurrence = seen.iter().filter(|&&n| n == t.name()).count() as u64;
            seen.push(t.name());
            let (enabled, p) = t.gate();
            if !enabled {
                return None;
            }
            let mut r = rng.fork(fnv1a(t.name().as_bytes()) ^ occurrence);
            let fired = r.bernoulli(p);
            Some((t, fired, r))
        })
    }

    /// Augments one sample. `rng` is the sample's stream (usually `SampleRng::new(seed, epoch, index)`);
    /// each entry draws from its own fork keyed by name and occurrence, so switching one entry off or
    /// moving it does not change what the others draw.
    pub fn apply(&self, mut sample: Sample, rng: &SampleRng) -> Result<Sample, AugmentError> {
        check_sample(&sample)?;
        for (t, fired, mut r) in self.gated(rng) {
            if fired {
                t.apply(&mut sample, &mut r);
            }
        }
        // mirroring only flips strides; hand back contiguous arrays
        if !sample.data.is_standard_layout() {
            sample.data = sample.data.as_standard_layout().into_owned();
        }
        if !sample.seg.is_standard_layout() {
            sample.seg = sample.seg.as_standard_layout().into_owned();
        }
        Ok(sample)
    }

    /// What [`Self::apply`] draws for a sample of `channels` image channels with stream `rng`, per
    /// enabled entry, without augmenting anything: for statistics against nnU-Net's transforms.
    /// Training never calls it; `apply` draws through the same functions.
    pub fn draw(&self, channels: usize, rng: &SampleRng) -> Vec<Drawn> {
        self.gated(rng)
            .map(|(t, fired, mut r)| Drawn {
                name: t.name(),
                fired,
                params: if fired { t.draw(channels, &mut r) } else { None },
            })
            .collect()
    }

    /// Augments a batch in parallel; sample `i` uses `SampleRng::new(seed, epoch, first_index + i)`, so
    /// the result does not depend on the thread count. Use `first_index = iteration * batch_size`.
    pub fn apply_batch(
        &self,
        samples: Vec<Sample>,
        seed: u64,
        epoch: u64,
        first_index: u64,
    ) -> Result<Vec<Sample>, AugmentError> {
        samples
            .into_par_iter()
            .enumerate()
            .map(|(i, s)| self.apply(s, &SampleRng::new(seed, epoch, first_index + i as u64)))
            .collect()
    }
}

fn check_sample(sample: &Sample) -> Result<(), AugmentError> {
    let (d, s) = (sample.data.shape(), sample.seg.shape());
    if d[1..] != s[1..] || s[0] == 0 || d[0] == 0 || sample.data.len_of(Axis(1)) == 0 {
        return Err(AugmentError::Shape {
            data: d.to_vec(),
            seg: s.to_vec(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_defaults_and_overrides() {
        let p = Pipeline::from_json(
            r#"[{"name": "gaussian_noise", "p": 0.5, "variance": [0.0, 0.2]},
                {"name": "gamma_inverted"}, {"name": "mirror", "enabled": false, "axes": [1, 2]}]"#,
        )
        .unwrap();
        assert_eq!(p.transforms.len(), 3);
        let TransformSpec::GaussianNoise(n) = &p.transforms[0] else {
            panic!("{:?}", p.transforms[0])
        };
        assert_eq!((n.p, n.variance, n.p_per_channel), (0.5, [0.0, 0.2], 1.0));
        let TransformSpec::GammaInverted(g) = &p.transforms[1] else {
            panic!()
        };
        assert_eq!((g.p, g.p_invert_image), (0.1, 1.0));
        assert_eq!(p.transforms[2].gate(), (false, 1.0));
    }

    #[test]
    fn rejects_unknown_names_keys_and_bad_values() {
        let err = Pipeline::from_json(r#"[{"name": "elastic_magic"}]"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown variant `elastic_magic`"), "{err}");
        let err = Pipeline::from_json(r#"[{"name": "gamma", "gama": [0.7, 1.5]}]"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `gama`"), "{err}");
        let err = Pipeline::from_json(r#"[{"p": 0.1}]"#).unwrap_err().to_string();
        assert!(err.contains("name"), "{err}");
        let err =
            Pipeline::from_json(r#"[{"name": "brightness", "p": 1.5}, {"name": "mirror", "axes": [3]}]"#)
                .unwrap_err()
                .to_string();
        assert!(err.contains("entry 0") && err.contains("entry 1"), "{err}");
    }

    #[test]
    fn default_pipeline_round_trips_through_json() {
        let da = DaConfig::from_patch_size(&[20, 256, 224]).unwrap();
        let p = Pipeline::nnunet_default(&da).with_mask_for_norm(&[false, true]);
        let text = serde_json::to_string(&p).unwrap();
        assert_eq!(Pipeline::from_json(&text).unwrap(), p);
        let names: Vec<&str> = p.transforms.iter().map(|t| t.name()).collect();
        assert_eq!(
            names,
            [
                "spatial",
                "gaussian_noise",
                "gaussian_blur",
                "brightness",
                "contrast",
                "low_resolution",
                "gamma_inverted",
                "gamma",
                "mirror",
                "mask_image",
                "remove_label"
            ]
        );
        let TransformSpec::Spatial(s) = &p.transforms[0] else {
            panic!()
        };
        assert_eq!(s.patch_size, vec![256, 224], "dummy 2D augments in-plane");
    }

    #[test]
    fn previous_stage_steps_are_appended_once_and_get_the_labels() {
        let da = DaConfig::from_patch_size(&[64, 64, 64]).unwrap();
        let p = Pipeline::nnunet_default(&da).with_previous_stage(&[1, 2]);
        let names: Vec<&str> = p.transforms.iter().map(|t| t.name()).collect();
        assert_eq!(
            names[names.len() - 3..],
            [
                "remove_label",
                "random_binary_operator",
                "remove_random_component"
            ]
        );
        let TransformSpec::RandomBinaryOperator(op) = &p.transforms[names.len() - 2] else {
            panic!()
        };
        assert_eq!((op.p, op.p_per_label, op.strel_size), (0.4, 0.5, [1.0, 8.0]));
        assert_eq!(op.labels, [1, 2]);
        let text = serde_json::to_string(&p).unwrap();
        assert_eq!(Pipeline::from_json(&text).unwrap(), p);

        // configured entries keep their place and settings; only empty labels are filled
        let configured = Pipeline::from_json(
            r#"[{"name": "remove_random_component", "p": 1.0}, {"name": "mirror"},
                {"name": "random_binary_operator", "labels": [3]}]"#,
        )
        .unwrap()
        .with_previous_stage(&[1, 2]);
        assert_eq!(configured.transforms.len(), 3);
        let TransformSpec::RemoveRandomComponent(rm) = &configured.transforms[0] else {
            panic!()
        };
        assert_eq!(
            (rm.p, rm.max_fraction, rm.labels.clone()),
            (1.0, 0.15, vec![1, 2])
        );
        let TransformSpec::RandomBinaryOperator(op) = &configured.transforms[2] else {
            panic!()
        };
        assert_eq!(op.labels, [3]);
    }
}
