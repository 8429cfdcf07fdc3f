//! Figures written twice, as SVG (for papers) and PNG (for READMEs and quick looks), from one drawing
//! function. Text needs a TrueType font: a system one is found, or named with INTROSPECT_FONT.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::fsutil::write_atomic;

/// Where common systems keep a sans-serif TrueType font.
const FONT_CANDIDATES: [&str; 6] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Registers the font as "sans-serif" once per process.
fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    let outcome = REGISTERED.get_or_init(|| {
        let mut paths: Vec<PathBuf> = std::env::var_os("INTROSPECT_FONT")
            .map(PathBuf::from)
            .into_iter()
            .collect();
        paths.extend(FONT_CANDIDATES.iter().map(PathBuf::from));
        for path in paths {
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            // The font table wants 'static data; one font per process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return Ok(path);
            }
        }
        Err("no TrueType font for the figures' text: install one (Debian: apt-get install fonts-dejavu-core) or set INTROSPECT_FONT=/path/to/font.ttf".into())
    });
    match outcome {
        Ok(_) => Ok(()),
        Err(e) => bail!("{e}"),
    }
}

/// A figure that can draw itself on any plotters backend.
pub trait Figure {
    fn size(&self) -> (u32, u32) {
        (900, 520)
    }
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static;
}

/// Converts plotters' errors, which borrow nothing useful, into anyhow's.
pub fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing failed: {e:?}")
}

/// Writes `stem.svg` and `stem.png` atomically; returns their paths.
pub fn save(figure: &impl Figure, stem: &Path) -> Result<[PathBuf; 2]> {
    ensure_font()?;
    let size = figure.size();
    let svg_path = stem.with_extension("svg");
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        figure.draw(&root)?;
        root.present().map_err(err)?;
    }
    write_atomic(&svg_path, svg.as_bytes())?;

    let png_path = stem.with_extension("png");
    let tmp = stem.with_extension("partial.png");
    {
        let root = BitMapBackend::new(&tmp, size).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        figure.draw(&root)?;
        root.present().map_err(err)?;
    }
    std::fs::rename(&tmp, &png_path)
        .map_err(|e| anyhow!("cannot move {} into place: {e}", tmp.display()))?;
    Ok([svg_path, png_path])
}
