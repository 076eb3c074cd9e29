//! The end of prediction, without libtorch: a case's logits per configuration exported to the
//! input's geometry, an ensemble's probabilities averaged, postprocessing applied, and the label
//! map (and probabilities on request) written. The `nnflow-torch` worker's `predict` hands each
//! predicted case to a [`Writer`].

use std::path::PathBuf;

use ndarray::Array4;

use crate::data::case_store::CaseProperties;
use crate::data::npy;
use crate::evaluate::ensemble::{average_probabilities, probabilities_to_segmentation};
use crate::evaluate::postprocess::{apply_postprocessing, Rule};
use crate::inference::export::{export_case, write_segmentation, RegionInfo};
use crate::inference::InferenceError;
use crate::plans::ResolvedConfiguration;

/// A case's logits per configuration of the model, with what export needs.
pub struct Predicted {
    pub id: String,
    /// The ending (format) the prediction is written with: the input's, NIfTI for a DICOM series.
    pub file_ending: String,
    pub outputs: Vec<(Array4<f32>, CaseProperties, ResolvedConfiguration)>,
}

pub struct Writer {
    pub regions: Option<RegionInfo>,
    pub rules: Vec<Rule>,
    pub output: PathBuf,
    pub save_probabilities: bool,
}

impl Writer {
    /// Exports every configuration's logits to the input's grid, averages the probabilities of an
    /// ensemble, postprocesses, and writes the label map (and the probabilities on request).
    pub fn write(&self, predicted: Predicted) -> Result<(), InferenceError> {
        let Predicted {
            id,
            file_ending,
            outputs,
        } = predicted;
        let ensemble = outputs.len() > 1;
        let want_probabilities = ensemble || self.save_probabilities;
        let mut segmentation = None;
        let mut probabilities: Vec<Array4<f32>> = Vec::new();
        let mut properties = None;
        for (logits, case_properties, configuration) in outputs {
            let exported = export_case(
                logits.view(),
                &case_properties,
                &configuration,
                self.regions.as_ref(),
                want_probabilities,
            )
            .map_err(InferenceError::in_case(&id))?;
            segmentation = Some(exported.segmentation);
            probabilities.extend(exported.probabilities);
            properties = Some(case_properties);
        }
        let properties = properties.ok_or(InferenceError::NoModel)?;
        let mut labels = match (ensemble, segmentation) {
            (false, Some(seg)) => seg.mapv(i32::from),
            _ => {
                let views: Vec<_> = probabilities.iter().map(|p| p.view()).collect();
                let order: Option<Vec<i32>> = self
                    .regions
                    .as_ref()
                    .map(|r| r.regions_class_order.iter().map(|&v| v as i32).collect());
                let averaged = average_probabilities(&views).map_err(InferenceError::in_case(&id))?;
                let seg = probabilities_to_segmentation(averaged.view(), order.as_deref())
                    .map_err(InferenceError::in_case(&id))?;
                probabilities = vec![averaged];
                seg
            }
        };
        if !self.rules.is_empty() {
            labels = apply_postprocessing(labels.view(), &self.rules);
        }
        let file = self.output.join(format!("{id}{file_ending}"));
        write_segmentation(&file, &labels.mapv(|v| v as i16), &properties)?;
        if self.save_probabilities {
            if let Some(p) = probabilities.first() {
                npy::write(&self.output.join(format!("{id}.npy")), p.view())?;
            }
        }
        println!("{id}: written to {}", file.display());
        Ok(())
    }
}
