//! Checks of a report folder without a browser: the HTML is well-formed (every non-void element
//! closed in order, outside `<script>` and `<style>`), and every picture it references exists and
//! decodes as a PNG.

use std::path::Path;

const VOID: [&str; 6] = ["img", "meta", "br", "hr", "input", "link"];

/// The page's text; panics naming what is wrong.
pub fn check_report_folder(folder: &Path) -> String {
    let html = std::fs::read_to_string(folder.join("index.html"))
        .unwrap_or_else(|e| panic!("{}: {e}", folder.join("index.html").display()));
    check_well_formed(&html);
    for picture in &referenced_pictures(&html) {
        let path = folder.join(picture);
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut reader = png::Decoder::new(std::io::BufReader::new(file))
            .read_info()
            .unwrap_or_else(|e| panic!("{}: not a PNG: {e}", path.display()));
        let mut pixels = vec![0; reader.output_buffer_size().expect("size")];
        reader
            .next_frame(&mut pixels)
            .unwrap_or_else(|e| panic!("{}: does not decode: {e}", path.display()));
    }
    html
}

/// Every `src="..."` of the page.
pub fn referenced_pictures(html: &str) -> Vec<String> {
    html.split("src=\"")
        .skip(1)
        .map(|rest| rest[..rest.find('"').expect("closing quote")].to_string())
        .collect()
}

fn check_well_formed(html: &str) {
    assert!(html.starts_with("<!DOCTYPE html>"), "no doctype");
    let mut open: Vec<String> = Vec::new();
    let mut rest = html;
    while let Some(start) = rest.find('<') {
        rest = &rest[start + 1..];
        let end = rest.find('>').expect("an unclosed tag");
        let tag = &rest[..end];
        rest = &rest[end + 1..];
        if tag.starts_with('!') {
            continue;
        }
        if let Some(name) = tag.strip_prefix('/') {
            let top = open.pop().unwrap_or_else(|| panic!("</{name}> closes nothing"));
            assert_eq!(top, name.trim(), "</{name}> closes <{top}>");
            continue;
        }
        let name = tag
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        if VOID.contains(&name.as_str()) || tag.ends_with('/') {
            continue;
        }
        if name == "script" || name == "style" {
            let close = format!("</{name}>");
            let at = rest
                .find(&close)
                .unwrap_or_else(|| panic!("<{name}> is not closed"));
            rest = &rest[at + close.len()..];
            continue;
        }
        open.push(name);
    }
    assert!(open.is_empty(), "unclosed elements: {open:?}");
}
