//! A label or a region (a union of labels), the unit nnU-Net samples class locations for and
//! evaluates. nnU-Net keys them differently in the two places, so both spellings are here.

#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    Label(i32),
    Region(Vec<i32>),
}

impl Target {
    pub fn labels(&self) -> Vec<i32> {
        match self {
            Target::Label(label) => vec![*label],
            Target::Region(labels) => labels.clone(),
        }
    }

    pub fn contains(&self, value: i32) -> bool {
        match self {
            Target::Label(label) => *label == value,
            Target::Region(labels) => labels.contains(&value),
        }
    }

    pub fn is_background(&self) -> bool {
        *self == Target::Label(0)
    }

    /// The class-locations key: `"2"` for a label, `"[1, 2]"` for a region.
    pub fn location_key(&self) -> String {
        match self {
            Target::Label(label) => label.to_string(),
            Target::Region(labels) => format!("[{}]", join(labels)),
        }
    }

    /// The evaluation summary's key, Python's text of the label or tuple: `"2"`, `"(1, 2)"`, `"(3,)"`.
    pub fn evaluation_key(&self) -> String {
        match self {
            Target::Label(label) => label.to_string(),
            Target::Region(labels) if labels.len() == 1 => format!("({},)", labels[0]),
            Target::Region(labels) => format!("({})", join(labels)),
        }
    }
}

fn join(labels: &[i32]) -> String {
    labels.iter().map(i32::to_string).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_nnunet() {
        assert_eq!(Target::Label(2).location_key(), "2");
        assert_eq!(Target::Region(vec![1, 2]).location_key(), "[1, 2]");
        assert_eq!(Target::Label(2).evaluation_key(), "2");
        assert_eq!(Target::Region(vec![1, 2]).evaluation_key(), "(1, 2)");
        assert_eq!(Target::Region(vec![3]).evaluation_key(), "(3,)");
    }
}
