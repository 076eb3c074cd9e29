//! Splicing substituted values into one string, word by word as the shell does: a list in a word
//! repeats the word's written text for every item.

use super::matrix::plain_text;

/// A table substituted into a string: it has no text form.
#[derive(Debug, thiserror::Error)]
#[error("cannot splice a table ({table}) into a string")]
pub(super) struct SpliceError {
    table: toml::Value,
}

/// Joins substituted values into one string (`written[i]`: whether `values[i]` is text written
/// in the template rather than a substituted value). A list becomes space-separated words, and
/// the written text attached to it in the same word (see [`ends_word`]) goes with every item, as
/// in shell brace expansion: `cat ${fit[*].outputs}/model.txt` -> `cat A/model.txt B/model.txt`.
/// Two lists in one word give every combination; an empty list removes its word.
pub(super) fn splice(written: &[bool], values: &[toml::Value]) -> Result<String, SpliceError> {
    let mut text = String::new();
    let mut word = Vec::new();
    for (&is_written, value) in written.iter().zip(values) {
        match value {
            toml::Value::String(literal) if is_written => {
                for c in literal.chars() {
                    if ends_word(c) {
                        text.push_str(&expand_word(&mut word));
                        text.push(c);
                    } else {
                        match word.last_mut() {
                            Some(WordPart::Fixed(fixed)) => fixed.push(c),
                            _ => word.push(WordPart::Fixed(c.to_string())),
                        }
                    }
                }
            }
            toml::Value::Array(items) => {
                let items = items.iter().map(item_text).collect::<Result<_, _>>()?;
                word.push(WordPart::Choice(items));
            }
            toml::Value::Table(_) => return Err(SpliceError { table: value.clone() }),
            scalar => {
                let scalar = plain_text(scalar);
                match word.last_mut() {
                    Some(WordPart::Fixed(fixed)) => fixed.push_str(&scalar),
                    _ => word.push(WordPart::Fixed(scalar)),
                }
            }
        }
    }
    text.push_str(&expand_word(&mut word));
    Ok(text)
}

/// Whether a character written in a string separates words, as in the shell: blanks and the
/// operators `;`, `|`, `&`, `<`, `>`, `(`, `)` (`for m in ${fit[*].outputs}; do` stays a loop).
fn ends_word(c: char) -> bool {
    c.is_whitespace() || matches!(c, ';' | '|' | '&' | '<' | '>' | '(' | ')')
}

/// A part of one word of a spliced string: fixed text, or one of a list's items.
enum WordPart {
    Fixed(String),
    Choice(Vec<String>),
}

/// The word's expansions, space-separated; the word is emptied.
fn expand_word(word: &mut Vec<WordPart>) -> String {
    let mut expansions = vec![String::new()];
    for part in word.drain(..) {
        expansions = match part {
            WordPart::Fixed(fixed) => expansions.into_iter().map(|e| e + &fixed).collect(),
            WordPart::Choice(items) => expansions
                .iter()
                .flat_map(|e| items.iter().map(move |item| format!("{e}{item}")))
                .collect(),
        };
    }
    expansions.join(" ")
}

/// A list item as text (a nested list as space-separated words).
fn item_text(item: &toml::Value) -> Result<String, SpliceError> {
    match item {
        toml::Value::Array(items) => Ok(items
            .iter()
            .map(item_text)
            .collect::<Result<Vec<_>, _>>()?
            .join(" ")),
        toml::Value::Table(_) => Err(SpliceError { table: item.clone() }),
        scalar => Ok(plain_text(scalar)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> toml::Value {
        toml::Value::String(s.to_string())
    }

    fn list(items: &[&str]) -> toml::Value {
        toml::Value::Array(items.iter().map(|s| text(s)).collect())
    }

    #[test]
    fn a_list_in_a_word_takes_the_word_s_text_with_every_item() {
        let written = [true, false, true];
        // The resolved form (folders) and the key form (symbolic references) splice alike.
        let resolved = [
            text("cat "),
            list(&["/o/fit/0", "/o/fit/1"]),
            text("/model.txt > r"),
        ];
        assert_eq!(
            splice(&written, &resolved).unwrap(),
            "cat /o/fit/0/model.txt /o/fit/1/model.txt > r"
        );
        let key = [
            text("cat "),
            list(&["${fit[fold=0].outputs}", "${fit[fold=1].outputs}"]),
            text("/model.txt > r"),
        ];
        assert_eq!(
            splice(&written, &key).unwrap(),
            "cat ${fit[fold=0].outputs}/model.txt ${fit[fold=1].outputs}/model.txt > r"
        );
    }

    #[test]
    fn prefixes_values_and_two_lists_in_a_word() {
        let written = [true, false, true, false, true, false];
        let values = [
            text("--in="),
            list(&["a", "b"]),
            text(" x"),
            text("-v"),
            text("/"),
            list(&["1", "2"]),
        ];
        // `x`, the substituted `-v` and `/` form one word with the list after them.
        assert_eq!(splice(&written, &values).unwrap(), "--in=a --in=b x-v/1 x-v/2");
        // An empty list removes its word.
        let values = [list(&["a", "b"]), text("\t"), list(&[]), text("-y z")];
        assert_eq!(splice(&[false, true, false, true], &values).unwrap(), "a b\t z");
        let values = [list(&["a", "b"]), text("/"), list(&["1", "2"])];
        assert_eq!(splice(&[false, true, false], &values).unwrap(), "a/1 a/2 b/1 b/2");
        // Shell operators end a word like blanks do.
        let values = [
            text("for m in "),
            list(&["a", "b"]),
            text("; do x>"),
            list(&["1", "2"]),
            text("|y"),
        ];
        assert_eq!(
            splice(&[true, false, true, false, true], &values).unwrap(),
            "for m in a b; do x>1 2|y"
        );
        let table = toml::Value::Table(toml::Table::new());
        assert!(splice(&[true, false], &[text("x"), table])
            .unwrap_err()
            .to_string()
            .contains("cannot splice a table"));
    }
}
