//! `${...}` substitution in string values: variables, matrix values and references to another
//! stage's outputs folder (`${stage.outputs}`, `${stage[*].outputs}`, `${stage[key=value].outputs}`).
//! `$${` writes a literal `${`,
//! and a `$` not followed by `{` is left alone, so shell variables like `$HOME` pass through.

#[derive(Debug, PartialEq, Clone)]
pub enum Piece {
    Text(String),
    /// A `[vars]` or matrix name.
    Name(String),
    /// The outputs folder of another stage's instances, chosen by `select`.
    Outputs {
        stage: String,
        select: Select,
    },
}

/// Which instances of a stage an outputs reference means.
#[derive(Debug, PartialEq, Clone)]
pub enum Select {
    /// `${stage.outputs}`: the instance whose matrix values agree with the referring instance's.
    Matching,
    /// `${stage[*].outputs}`: every instance, as a list.
    All,
    /// `${stage[key=value,...].outputs}`: the instances with these matrix values.
    Filter(Vec<(String, String)>),
}

/// A `${...}` that cannot be parsed; `whole` is the text between the braces.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum TemplateError {
    #[error("unclosed `${{` in {text:?} (write `$${{` for a literal `${{`)")]
    Unclosed { text: String },
    #[error("`${{{whole}}}`: write `[*]` or `[key=value,...]` after the stage name")]
    BadFilter { whole: String },
    #[error("`${{{whole}}}`: `{key}=` needs a value")]
    EmptyFilterValue { whole: String, key: String },
    #[error(
        "`${{{whole}}}` is not a variable, matrix value or `${{stage.outputs}}` reference \
         (write `$${{` for a literal `${{`, e.g. for shell syntax)"
    )]
    InvalidName { whole: String },
}

/// Splits a string into literal text and substitutions.
pub fn parse(text: &str) -> Result<Vec<Piece>, TemplateError> {
    let mut pieces = Vec::new();
    let mut literal = String::new();
    let mut rest = text;
    while let Some(pos) = rest.find('$') {
        literal.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(escaped) = after.strip_prefix("${") {
            literal.push_str("${");
            rest = escaped;
        } else if let Some(inner) = after.strip_prefix('{') {
            let end = inner.find('}').ok_or_else(|| TemplateError::Unclosed {
                text: text.to_string(),
            })?;
            if !literal.is_empty() {
                pieces.push(Piece::Text(std::mem::take(&mut literal)));
            }
            pieces.push(parse_substitution(inner[..end].trim())?);
            rest = &inner[end + 1..];
        } else {
            literal.push('$');
            rest = after;
        }
    }
    literal.push_str(rest);
    if !literal.is_empty() || pieces.is_empty() {
        pieces.push(Piece::Text(literal));
    }
    Ok(pieces)
}

fn parse_substitution(inner: &str) -> Result<Piece, TemplateError> {
    if let Some(stage) = inner.strip_suffix(".outputs") {
        let (stage, select) = match stage.strip_suffix(']').and_then(|s| s.split_once('[')) {
            Some((stage, "*")) => (stage, Select::All),
            Some((stage, filter)) => (stage, Select::Filter(parse_filter(filter, inner)?)),
            None => (stage, Select::Matching),
        };
        check_name(stage, inner)?;
        return Ok(Piece::Outputs {
            stage: stage.to_string(),
            select,
        });
    }
    check_name(inner, inner)?;
    Ok(Piece::Name(inner.to_string()))
}

/// `key=value,key=value` inside a reference's brackets.
fn parse_filter(filter: &str, whole: &str) -> Result<Vec<(String, String)>, TemplateError> {
    filter
        .split(',')
        .map(|pair| {
            let (key, value) = pair.split_once('=').ok_or_else(|| TemplateError::BadFilter {
                whole: whole.to_string(),
            })?;
            let (key, value) = (key.trim(), value.trim());
            check_name(key, whole)?;
            if value.is_empty() {
                return Err(TemplateError::EmptyFilterValue {
                    whole: whole.to_string(),
                    key: key.to_string(),
                });
            }
            Ok((key.to_string(), value.to_string()))
        })
        .collect()
}

fn check_name(name: &str, whole: &str) -> Result<(), TemplateError> {
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if valid {
        Ok(())
    } else {
        Err(TemplateError::InvalidName {
            whole: whole.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_names_references_and_text() {
        assert_eq!(
            parse("a ${x}/b ${prep.outputs} ${train[*].outputs}${train[fold=0, c=2d].outputs}").unwrap(),
            vec![
                Piece::Text("a ".into()),
                Piece::Name("x".into()),
                Piece::Text("/b ".into()),
                Piece::Outputs {
                    stage: "prep".into(),
                    select: Select::Matching
                },
                Piece::Text(" ".into()),
                Piece::Outputs {
                    stage: "train".into(),
                    select: Select::All
                },
                Piece::Outputs {
                    stage: "train".into(),
                    select: Select::Filter(vec![("fold".into(), "0".into()), ("c".into(), "2d".into())])
                },
            ]
        );
    }

    #[test]
    fn escapes_and_shell_dollars_stay_literal() {
        assert_eq!(
            parse("echo $HOME $${X} $").unwrap(),
            vec![Piece::Text("echo $HOME ${X} $".into())]
        );
    }

    #[test]
    fn rejects_unclosed_and_bad_names() {
        assert!(parse("${x").unwrap_err().to_string().contains("unclosed"));
        assert!(parse("${a b}")
            .unwrap_err()
            .to_string()
            .contains("not a variable"));
        assert!(parse("${t[fold].outputs}")
            .unwrap_err()
            .to_string()
            .contains("key=value"));
        assert!(parse("${t[fold=].outputs}")
            .unwrap_err()
            .to_string()
            .contains("needs a value"));
    }
}
