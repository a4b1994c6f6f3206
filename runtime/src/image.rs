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
        other => Err(Error::invalid(format!(
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
        .map_err(|e| Error::invalid(format!("PNG encoder: {e}")))?;
    w.write_image_data(pixels)
        .map_err(|e| Error::invalid(format!("PNG encoder: {e}")))?;
    w.finish()
        .map_err(|e| Error::invalid(format!("PNG encoder: {e}")))?;
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

/// Encodes a batch `[N, C, H, W]` as one PNG grid with 2-pixel gaps: `cols` columns, or
/// `ceil(sqrt(N))` when None (a strip of frames is `Some(N)`).
pub fn grid_png(x: ArrayView4<f32>, range: [f64; 2], cols: Option<usize>) -> Result<Vec<u8>> {
    let (n, c, h, w) = x.dim();
    let cols = cols
        .unwrap_or_else(|| (1..=n.max(1)).find(|k| k * k >= n).unwrap_or(1))
        .max(1);
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

/// Decodes an 8-bit grayscale or RGB PNG into `[C, H, W]` in the data range `range`, checking
/// it against the model's sample shape `[C, H, W]` (a gray image feeds a 3-channel model by
/// repetition; an RGB image feeds a 1-channel model only if it is gray).
pub fn read_png(bytes: &[u8], shape: [usize; 3], range: [f64; 2]) -> Result<ndarray::Array3<f32>> {
    let [c, h, w] = shape;
    decode_png(bytes, c, Some([h, w]), range)
}

/// [`read_png`] of an image of any height and width (a text-to-image pipeline's input, whose
/// size is then the run's), with `channels` channels.
pub fn read_png_any_size(
    bytes: &[u8],
    channels: usize,
    range: [f64; 2],
) -> Result<ndarray::Array3<f32>> {
    decode_png(bytes, channels, None, range)
}

fn decode_png(
    bytes: &[u8],
    c: usize,
    want: Option<[usize; 2]>,
    range: [f64; 2],
) -> Result<ndarray::Array3<f32>> {
    let bad = |why: String| Error::invalid(format!("PNG input: {why}"));
    let mut dec = png::Decoder::new(std::io::Cursor::new(bytes));
    dec.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = dec.read_info().map_err(|e| bad(e.to_string()))?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| bad("image too large".into()))?;
    let mut buf = vec![0u8; size];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| bad(e.to_string()))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let stride = match info.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => return Err(bad(format!("unsupported colour type {other:?}"))),
    };
    if let Some([mh, mw]) = want.filter(|&s| s != [h, w]) {
        return Err(bad(format!("image is {w}x{h}; the model takes {mw}x{mh}")));
    }
    let colour = stride >= 3;
    let px = |i: usize, j: usize, k: usize| buf[(i * w + j) * stride + if colour { k } else { 0 }];
    if c == 1
        && colour
        && (0..h).any(|i| (0..w).any(|j| px(i, j, 0) != px(i, j, 1) || px(i, j, 1) != px(i, j, 2)))
    {
        return Err(bad(
            "the model takes grayscale images; this one has colour".into()
        ));
    }
    if c != 1 && c != 3 {
        return Err(bad(format!(
            "the model has {c} channels; give .npy input instead"
        )));
    }
    let (lo, hi) = (range[0], range[1]);
    Ok(ndarray::Array3::from_shape_fn((c, h, w), |(k, i, j)| {
        (lo + (hi - lo) * px(i, j, k) as f64 / 255.0) as f32
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_round_trip_keeps_8_bit_values() {
        let x = ndarray::Array3::from_shape_fn((1, 3, 4), |(_, i, j)| (i * 4 + j) as f32 / 11.0);
        let bytes = sample_png(x.view(), [0.0, 1.0]).unwrap();
        let y = read_png(&bytes, [1, 3, 4], [0.0, 1.0]).unwrap();
        let err = (&x - &y).iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(err <= 0.5 / 255.0 + 1e-6, "{err}");
        let e = read_png(&bytes, [1, 4, 4], [0.0, 1.0])
            .unwrap_err()
            .to_string();
        assert!(e.contains("4x3") && e.contains("4x4"), "{e}");
        assert!(read_png(b"not a png", [1, 3, 4], [0.0, 1.0]).is_err());
    }
}
