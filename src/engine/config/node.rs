//! A TOML document as a tree whose every value remembers where it was written, so that merging
//! (`extends`, `--set`) keeps positions and later errors can point at the right file and column.

use std::collections::BTreeMap;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::diagnostics::{Diagnostic, FileId, Location};

#[derive(Clone, Debug)]
pub enum NodeValue {
    Scalar(toml::Value),
    Array(Vec<Node>),
    Table(BTreeMap<String, Node>),
}

#[derive(Clone, Debug)]
pub struct Node {
    pub value: NodeValue,
    /// Where the value is written.
    pub location: Location,
    /// Where its key is written (for "unknown key" errors); None for array elements and roots.
    pub key_location: Option<Location>,
}

impl Node {
    pub fn scalar(value: toml::Value, location: Location) -> Node {
        match value {
            toml::Value::Array(items) => Node {
                value: NodeValue::Array(
                    items
                        .into_iter()
                        .map(|v| Node::scalar(v, location.clone()))
                        .collect(),
                ),
                location,
                key_location: None,
            },
            toml::Value::Table(table) => Node {
                value: NodeValue::Table(
                    table
                        .into_iter()
                        .map(|(k, v)| {
                            let mut child = Node::scalar(v, location.clone());
                            child.key_location = Some(location.clone());
                            (k, child)
                        })
                        .collect(),
                ),
                location,
                key_location: None,
            },
            scalar => Node {
                value: NodeValue::Scalar(scalar),
                location,
                key_location: None,
            },
        }
    }

    /// The parsed document as nodes; numbers TOML allows but 64 bits cannot hold are reported.
    pub fn from_document(table: &Spanned<DeTable<'_>>, file: FileId, errors: &mut Vec<Diagnostic>) -> Node {
        Node {
            value: NodeValue::Table(convert_table(table.get_ref(), file, errors)),
            location: Location::File {
                file,
                span: table.span(),
            },
            key_location: None,
        }
    }

    pub fn as_table(&self) -> Option<&BTreeMap<String, Node>> {
        match &self.value {
            NodeValue::Table(t) => Some(t),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            NodeValue::Scalar(toml::Value::String(s)) => Some(s),
            _ => None,
        }
    }

    pub fn get(&self, key: &str) -> Option<&Node> {
        self.as_table()?.get(key)
    }

    /// The first string value (depth first) whose text is exactly `text`.
    pub fn find_string(&self, text: &str) -> Option<&Node> {
        match &self.value {
            NodeValue::Scalar(toml::Value::String(s)) => (s == text).then_some(self),
            NodeValue::Scalar(_) => None,
            NodeValue::Array(items) => items.iter().find_map(|item| item.find_string(text)),
            NodeValue::Table(table) => table.values().find_map(|value| value.find_string(text)),
        }
    }

    /// The plain TOML value, positions dropped.
    pub fn to_toml(&self) -> toml::Value {
        match &self.value {
            NodeValue::Scalar(v) => v.clone(),
            NodeValue::Array(items) => toml::Value::Array(items.iter().map(Node::to_toml).collect()),
            NodeValue::Table(t) => {
                toml::Value::Table(t.iter().map(|(k, v)| (k.clone(), v.to_toml())).collect())
            }
        }
    }

    /// The node at a path of table keys / array indices (as strings), if any.
    pub fn find(&self, path: &[String]) -> Option<&Node> {
        let mut node = self;
        for segment in path {
            node = match &node.value {
                NodeValue::Table(t) => t.get(segment)?,
                NodeValue::Array(items) => items.get(segment.parse::<usize>().ok()?)?,
                NodeValue::Scalar(_) => return None,
            };
        }
        Some(node)
    }

    /// Deep merge: tables merge key by key, anything else in `over` replaces what is in `self`.
    pub fn merge(&mut self, over: Node) {
        match (&mut self.value, over.value) {
            (NodeValue::Table(base), NodeValue::Table(over_table)) => {
                for (key, value) in over_table {
                    match base.get_mut(&key) {
                        // A stage's `instance_overrides` add up across `extends`: a pipeline that adds one
                        // for its own needs keeps its base's (the later wins where both apply).
                        Some(existing) if key == "instance_overrides" => existing.append(value),
                        Some(existing) => existing.merge(value),
                        None => {
                            base.insert(key, value);
                        }
                    }
                }
            }
            (_, value) => {
                self.value = value;
                self.location = over.location;
                if over.key_location.is_some() {
                    self.key_location = over.key_location;
                }
            }
        }
    }

    /// Appends `over`'s items to this list; a value that is not a list replaces it.
    fn append(&mut self, over: Node) {
        match (&mut self.value, over.value) {
            (NodeValue::Array(items), NodeValue::Array(more)) => items.extend(more),
            (_, value) => {
                self.value = value;
                self.location = over.location;
            }
        }
    }

    /// Sets the value at a dotted path, creating tables on the way.
    pub fn set_path(&mut self, path: &[&str], value: Node) -> Result<(), SetPathError> {
        let Some((first, rest)) = path.split_first() else {
            *self = value;
            return Ok(());
        };
        let NodeValue::Table(table) = &mut self.value else {
            return Err(SetPathError {
                key: first.to_string(),
            });
        };
        if rest.is_empty() {
            let key_location = Some(value.location.clone());
            table.insert(
                first.to_string(),
                Node {
                    key_location,
                    ..value
                },
            );
            return Ok(());
        }
        let location = value.location.clone();
        let child = table.entry(first.to_string()).or_insert_with(|| Node {
            value: NodeValue::Table(BTreeMap::new()),
            location: location.clone(),
            key_location: Some(location),
        });
        child.set_path(rest, value)
    }
}

/// A dotted path that goes through a value that is not a table.
#[derive(Debug, PartialEq, thiserror::Error)]
#[error("`{key}` is inside a value that is not a table")]
pub struct SetPathError {
    pub key: String,
}

fn convert_table(table: &DeTable<'_>, file: FileId, errors: &mut Vec<Diagnostic>) -> BTreeMap<String, Node> {
    table
        .iter()
        .map(|(key, value)| {
            let mut node = convert_value(value, file, errors);
            node.key_location = Some(Location::File {
                file,
                span: key.span(),
            });
            (key.get_ref().to_string(), node)
        })
        .collect()
}

fn convert_value(value: &Spanned<DeValue<'_>>, file: FileId, errors: &mut Vec<Diagnostic>) -> Node {
    let location = Location::File {
        file,
        span: value.span(),
    };
    let mut out_of_range = |text: &str, what: &str| {
        errors.push(Diagnostic::new(
            Some(location.clone()),
            format!("`{text}` is out of range: {what}"),
        ));
    };
    let value = match value.get_ref() {
        DeValue::String(s) => NodeValue::Scalar(toml::Value::String(s.to_string())),
        DeValue::Integer(i) => {
            let parsed = i64::from_str_radix(i.as_str(), i.radix()).unwrap_or_else(|_| {
                out_of_range(i.as_str(), "integers must fit in 64 bits");
                0
            });
            NodeValue::Scalar(toml::Value::Integer(parsed))
        }
        DeValue::Float(f) => {
            let text = f.as_str();
            let parsed = text.parse::<f64>().unwrap_or(f64::NAN);
            // `inf` and `nan` are written as such; a finite literal must stay finite
            let literal_infinite = text.trim_start_matches(['+', '-']).starts_with(['i', 'n']);
            if !parsed.is_finite() && !literal_infinite {
                out_of_range(text, "beyond the largest 64-bit float");
            }
            NodeValue::Scalar(toml::Value::Float(parsed))
        }
        DeValue::Boolean(b) => NodeValue::Scalar(toml::Value::Boolean(*b)),
        DeValue::Datetime(d) => NodeValue::Scalar(toml::Value::Datetime(*d)),
        DeValue::Array(items) => {
            NodeValue::Array(items.iter().map(|v| convert_value(v, file, errors)).collect())
        }
        DeValue::Table(t) => NodeValue::Table(convert_table(t, file, errors)),
    };
    Node {
        value,
        location,
        key_location: None,
    }
}
