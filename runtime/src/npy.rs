//! Minimal `.npy` (NumPy format 1.0/2.0) reading and writing of little-endian float32/float64,
//! C-order arrays: what the CLI exchanges with Python.

use std::io::Write;
use std::path::Path;

use ndarray::{ArrayD, IxDyn};

use crate::error::{Error, Result};

const MAGIC: &[u8] = b"\x93NUMPY";

/// Reads a float32 or float64 C-order array as f32.
pub fn read_npy(path: &Path) -> Result<ArrayD<f32>> {
    let bytes = std::fs::read(path).map_err(Error::io(format!("reading {}", path.display())))?;
    parse_npy(&bytes).map_err(|detail| Error::BadInput {
        path: path.into(),
        detail,
    })
}

/// An array as it was stored: raw 8-bit pixels or floats.
#[derive(Debug, Clone)]
pub enum NpyArray {
    /// uint8 (`|u1`), e.g. raw 0..255 pixels.
    U8(ArrayD<u8>),
    /// float32 or float64, read as f32.
    F32(ArrayD<f32>),
}

/// Reads a uint8, float32 or float64 C-order array.
pub fn read_npy_u8_or_float(path: &Path) -> Result<NpyArray> {
    let bytes = std::fs::read(path).map_err(Error::io(format!("reading {}", path.display())))?;
    let bad = |detail| Error::BadInput {
        path: path.into(),
        detail,
    };
    let (shape, width, offset) = parse_npy_header(&bytes).map_err(bad)?;
    if width != 1 {
        return parse_npy(&bytes).map(NpyArray::F32).map_err(bad);
    }
    let data = checked_data(&bytes[offset..], &shape, 1).map_err(bad)?;
    ArrayD::from_shape_vec(IxDyn(&shape), data.to_vec())
        .map(NpyArray::U8)
        .map_err(|e| bad(e.to_string()))
}

/// The data part of a `.npy`, checked to hold exactly `shape` elements of `width` bytes.
fn checked_data<'a>(
    data: &'a [u8],
    shape: &[usize],
    width: usize,
) -> std::result::Result<&'a [u8], String> {
    let count: usize = shape.iter().product();
    if data.len() != count * width {
        return Err(format!(
            "data holds {} bytes; shape {:?} needs {}",
            data.len(),
            shape,
            count * width
        ));
    }
    Ok(data)
}

/// Reads a 4-D float array `[n, C, H, W]`; `what` is the error detail when it has another
/// rank (e.g. "images must be 4-D [n, C, H, W]").
pub fn read_npy4(path: &Path, what: &str) -> Result<ndarray::Array4<f32>> {
    read_npy(path)?
        .into_dimensionality::<ndarray::Ix4>()
        .map_err(|_| Error::BadInput {
            path: path.into(),
            detail: what.into(),
        })
}

/// Parses `.npy` bytes of a float32 or float64 array; the error says what is wrong.
pub fn parse_npy(bytes: &[u8]) -> std::result::Result<ArrayD<f32>, String> {
    let (shape, width, offset) = parse_npy_header(bytes)?;
    if width == 1 {
        return Err("dtype uint8 is not supported here; save as float32 ('<f4')".into());
    }
    let data = checked_data(&bytes[offset..], &shape, width)?;
    let values: Vec<f32> = if width == 4 {
        data.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    } else {
        data.chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect()
    };
    ArrayD::from_shape_vec(IxDyn(&shape), values).map_err(|e| e.to_string())
}

/// Parses a `.npy` header: (shape, bytes per element, offset of the data). Float32 and float64
/// are 4 and 8 bytes wide; uint8 (1 byte) is the only integer type read.
pub fn parse_npy_header(bytes: &[u8]) -> std::result::Result<(Vec<usize>, usize, usize), String> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("not a .npy file (bad magic)".into());
    }
    let (header_len, start): (usize, usize) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = bytes
        .get(
            start
                ..start
                    .checked_add(header_len)
                    .ok_or("header length overflows")?,
        )
        .ok_or("truncated header")?;
    let header = std::str::from_utf8(header).map_err(|_| "header is not text")?;
    let field = |key: &str| -> std::result::Result<&str, String> {
        let at = header
            .find(&format!("'{key}'"))
            .ok_or(format!("header lacks '{key}'"))?;
        Ok(header[at + key.len() + 2..]
            .trim_start()
            .trim_start_matches(':')
            .trim_start())
    };
    let descr = field("descr")?;
    let width = if descr.starts_with("'<f4'") {
        4
    } else if descr.starts_with("'<f8'") {
        8
    } else if descr.starts_with("'|u1'") || descr.starts_with("'<u1'") {
        1
    } else {
        return Err(format!(
            "dtype {} is not supported; save as float32 ('<f4')",
            descr.split(',').next().unwrap_or("")
        ));
    };
    if field("fortran_order")?.starts_with("True") {
        return Err(
            "Fortran-order arrays are not supported; save with np.ascontiguousarray".into(),
        );
    }
    let shape_text = field("shape")?;
    let shape_text = shape_text.strip_prefix('(').ok_or("malformed shape")?;
    let shape_text = &shape_text[..shape_text.find(')').ok_or("malformed shape")?];
    let shape: Vec<usize> = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("bad dimension '{s}'"))
        })
        .collect::<std::result::Result<_, _>>()?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("shape overflows")?;
    count.checked_mul(width).ok_or("shape overflows")?;
    Ok((shape, width, start + header_len))
}

/// Serialises an array as a float32 `.npy` (format 1.0).
pub fn npy_bytes(shape: &[usize], data: impl Iterator<Item = f32>) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_text = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_text}, }}");
    // Pad so that the data starts on a 64-byte boundary, ending the header with a newline.
    let total = MAGIC.len() + 4 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + 4 * shape.iter().product::<usize>());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    data.for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
    out
}

/// The index and value of the first NaN or infinity in `a`, if any.
pub fn first_non_finite(a: ndarray::ArrayViewD<'_, f32>) -> Option<(Vec<usize>, f32)> {
    a.indexed_iter()
        .find(|(_, v)| !v.is_finite())
        .map(|(i, &v)| (ndarray::Dimension::slice(&i).to_vec(), v))
}

/// Reads a 4-D array (see [`read_npy4`]) that must hold only finite values: inputs such as
/// noise and images, where a NaN would otherwise surface as the network's fault.
pub fn read_npy4_finite(path: &Path, what: &str) -> Result<ndarray::Array4<f32>> {
    let a = read_npy4(path, what)?;
    if let Some((index, v)) = first_non_finite(a.view().into_dyn()) {
        return Err(Error::BadInput {
            path: path.into(),
            detail: format!("holds {v} at {index:?}; the values must be finite"),
        });
    }
    Ok(a)
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a reader never sees a
/// half-written file and a failure leaves any previous file intact.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let ctx = || format!("writing {}", path.display());
    let (mut f, tmp) = crate::files::create_temp(path).map_err(|e| Error::io(ctx())(e))?;
    let result = (|| {
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(ctx())(e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let bytes = npy_bytes(&[2, 3], (0..6).map(|i| i as f32 * 0.5));
        assert_eq!((bytes.len() - 6 * 4) % 64, 0);
        let a = parse_npy(&bytes).unwrap();
        assert_eq!(a.shape(), &[2, 3]);
        assert_eq!(a[[1, 2]], 2.5);
    }

    #[test]
    fn rejects_garbage_and_truncation() {
        assert!(parse_npy(b"hello world").is_err());
        let bytes = npy_bytes(&[4], [1.0f32, 2.0, 3.0, 4.0].into_iter());
        assert!(parse_npy(&bytes[..bytes.len() - 1])
            .unwrap_err()
            .contains("needs"));
        let mut int = bytes.clone();
        let at = int.windows(3).position(|w| w == b"<f4").unwrap();
        int[at..at + 3].copy_from_slice(b"<i8");
        assert!(parse_npy(&int).unwrap_err().contains("not supported"));
    }
}
