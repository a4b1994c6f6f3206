//! PNG output: one image per sample or a grid, mapping the model's data range to 0..255.

use ndarray::{ArrayView3, ArrayView4};

use crate::error::{Error, Result};

fn to_u8(v: f32, lo: f64, hi: f64) -> u8 {
    let u = ((v as f64 - lo) / (hi - lo)).clamp(0.0, 1.0);
    (u * 255.0).round() as u8
}

fn color_type(c: usize) -> Result<png::ColorType> {
    match c {
        1 => Ok(png::ColorType::Grayscale),
        3 => Ok(png::ColorType::Rgb),
        other => Err(Error::InvalidArgument(format!(
            "PNG output needs 1 or 3 channels, the model has {other}; write .npy instead"
        ))),
    }
}

fn encode(width: usize, height: usize, channels: usize, pixels: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, width as u32, height as u32);
    enc.set_color(color_type(channels)?);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc
        .write_header()
        .map_err(|e| Error::InvalidArgument(format!("PNG encoder: {e}")))?;
    w.write_image_data(pixels)
        .map_err(|e| Error::InvalidArgument(format!("PNG encoder: {e}")))?;
    w.finish()
        .map_err(|e| Error::InvalidArgument(format!("PNG encoder: {e}")))?;
    Ok(out)
}

/// Encodes one `[C, H, W]` sample as PNG bytes.
pub fn sample_png(x: ArrayView3<f32>, range: [f64; 2]) -> Result<Vec<u8>> {
    let (c, h, w) = x.dim();
    let mut px = Vec::with_capacity(c * h * w);
    for i in 0..h {
        for j in 0..w {
            for k in 0..c {
                px.push(to_u8(x[[k, i, j]], range[0], range[1]));
            }
        }
    }
    encode(w, h, c, &px)
}

/// Encodes a batch `[N, C, H, W]` as one PNG grid, `ceil(sqrt(N))` columns, 2-pixel gaps.
pub fn grid_png(x: ArrayView4<f32>, range: [f64; 2]) -> Result<Vec<u8>> {
    let (n, c, h, w) = x.dim();
    let cols = (1..=n.max(1)).find(|k| k * k >= n).unwrap_or(1);
    let rows = n.div_ceil(cols).max(1);
    let pad = 2;
    let (gw, gh) = (cols * (w + pad) + pad, rows * (h + pad) + pad);
    let mut px = vec![0u8; gw * gh * c];
    for (s, img) in x.outer_iter().enumerate() {
        let (oy, ox) = (pad + (s / cols) * (h + pad), pad + (s % cols) * (w + pad));
        for i in 0..h {
            for j in 0..w {
                for k in 0..c {
                    px[((oy + i) * gw + ox + j) * c + k] =
                        to_u8(img[[k, i, j]], range[0], range[1]);
                }
            }
        }
    }
    encode(gw, gh, c, &px)
}
