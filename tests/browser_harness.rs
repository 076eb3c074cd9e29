//! The headless-Chromium page check (`tests/common/browser.rs`) on small static pages: a good page
//! passes, and a missing image or an uncaught exception is reported. Without Chromium these pass
//! vacuously, unless `NNFLOW_REQUIRE_BROWSER=1` (as `.ci/run` sets it).

mod common;

use std::path::Path;
use std::time::Instant;

use common::browser::{check_page, PageCheck};

/// A `width`×`height` PNG of one colour.
fn write_png(path: &Path, (width, height): (u32, u32), rgb: [u8; 3]) {
    let file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut encoder = png::Encoder::new(file, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().unwrap();
    writer
        .write_image_data(&rgb.repeat((width * height) as usize))
        .unwrap();
}

/// Writes `index.html` (and anything `extra` adds) to a fresh folder and checks it.
fn check(html: &str, extra: impl FnOnce(&Path), size: (u32, u32)) -> Option<(PageCheck, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("index.html"), html).unwrap();
    extra(dir.path());
    let started = Instant::now();
    let page = check_page(&dir.path().join("index.html"), size)?;
    eprintln!(
        "page checked in {:.2} s (Chromium started and stopped); errors: {:?}",
        started.elapsed().as_secs_f64(),
        page.console_errors
    );
    Some((page, dir))
}

/// The screenshot's size and the RGB colour of pixel (x, y).
fn screenshot_pixel(png_bytes: &[u8], (x, y): (u32, u32)) -> ((u32, u32), [u8; 3]) {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().expect("the screenshot is a PNG");
    let mut buffer = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buffer).unwrap();
    let channels = info.color_type.samples();
    let at = (y as usize * info.width as usize + x as usize) * channels;
    let rgb = if channels >= 3 {
        [buffer[at], buffer[at + 1], buffer[at + 2]]
    } else {
        [buffer[at]; 3]
    };
    ((info.width, info.height), rgb)
}

#[test]
fn a_good_page_loads_its_images_without_errors() {
    let html = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>Report: demo</title>
<style>body { margin: 0; background: rgb(0, 128, 255); } img { display: block; }</style></head>
<body>
<table id="t"><tr><th>stage</th></tr><tr><td>b</td></tr><tr><td>a</td></tr></table>
<img src="plot.png" alt="a plot" style="margin-top: 100px">
<script>
  const rows = [...document.querySelectorAll('#t tr')].slice(1);
  rows.sort((x, y) => x.textContent.localeCompare(y.textContent));
  rows.forEach(r => r.parentNode.appendChild(r));
  console.log('sorted', rows.length);
</script>
</body></html>"#;
    let Some((page, _dir)) = check(
        html,
        |dir| write_png(&dir.join("plot.png"), (40, 30), [255, 0, 0]),
        (320, 240),
    ) else {
        return;
    };
    assert_eq!(page.console_errors, Vec::<String>::new());
    assert_eq!(page.images, vec![("plot.png".to_string(), 40)]);
    assert_eq!(page.title, "Report: demo");
    let (size, background) = screenshot_pixel(&page.screenshot_png, (300, 10));
    assert_eq!(size, (320, 240));
    assert_eq!(background, [0, 128, 255]);
}

#[test]
fn a_missing_image_has_no_width_and_is_reported() {
    let html = r#"<!doctype html><html><head><title>missing</title></head>
<body><img src="present.png"><img src="missing.png"></body></html>"#;
    let Some((page, _dir)) = check(
        html,
        |dir| write_png(&dir.join("present.png"), (8, 8), [0, 255, 0]),
        (200, 100),
    ) else {
        return;
    };
    assert_eq!(
        page.images,
        vec![("present.png".to_string(), 8), ("missing.png".to_string(), 0)]
    );
    assert!(
        page.console_errors.iter().any(|e| e.contains("missing.png")),
        "{:?}",
        page.console_errors
    );
    assert!(!page.screenshot_png.is_empty());
}

#[test]
fn an_uncaught_exception_and_console_error_are_reported() {
    let html = r#"<!doctype html><html><head><title>boom</title></head>
<body><p>text</p><script>console.error("bad", 42)</script><script>throw new Error("boom")</script></body></html>"#;
    let Some((page, _dir)) = check(html, |_| {}, (200, 100)) else {
        return;
    };
    assert_eq!(page.images, vec![]);
    assert_eq!(page.title, "boom");
    assert!(
        page.console_errors.iter().any(|e| e.contains("Error: boom")),
        "{:?}",
        page.console_errors
    );
    assert!(
        page.console_errors.iter().any(|e| e == "console.error: bad 42"),
        "{:?}",
        page.console_errors
    );
}
