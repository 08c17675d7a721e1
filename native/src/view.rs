//! Read-only views of Arrow arrays handed over as their buffers (validity, offsets, data), zero copy.
//!
//! The Python facade (`cloakbeam/keys/native.py`) passes `(length, offset, layout, width, validity,
//! offsets, data)` where the last three are objects exporting the buffer protocol (pyarrow buffers).
//! Every bound is checked once here, before the GIL is released, so the kernels never index out of range.

use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// How the values of an array are laid out.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Layout {
    /// string / binary: int32 offsets into the data buffer.
    Var32,
    /// large_string / large_binary: int64 offsets.
    Var64,
    /// Fixed-width values of `width` bytes each (integers, floats, temporal, decimal, uint8 booleans).
    Fixed(usize),
}

/// The Python-side description of an array: (length, offset, layout code, width, validity, offsets, data).
pub type ViewArgs<'py> = (
    usize,
    usize,
    u8,
    usize,
    Option<Bound<'py, PyAny>>,
    Option<Bound<'py, PyAny>>,
    Option<Bound<'py, PyAny>>,
);

/// Keeps the exported buffers alive while a `View` borrows them.
pub struct Held {
    bufs: [Option<PyUntypedBuffer>; 3],
}

impl Held {
    pub fn get(args: &ViewArgs<'_>) -> PyResult<Self> {
        let grab = |o: &Option<Bound<'_, PyAny>>| -> PyResult<Option<PyUntypedBuffer>> {
            match o {
                None => Ok(None),
                Some(obj) if obj.is_none() => Ok(None),
                Some(obj) => {
                    let b = PyUntypedBuffer::get(obj)?;
                    if !b.is_c_contiguous() {
                        return Err(PyValueError::new_err("array buffer is not contiguous"));
                    }
                    Ok(Some(b))
                }
            }
        };
        Ok(Held { bufs: [grab(&args.4)?, grab(&args.5)?, grab(&args.6)?] })
    }

    fn slice(&self, i: usize) -> &[u8] {
        match &self.bufs[i] {
            None => &[],
            Some(b) if b.len_bytes() == 0 => &[],
            // SAFETY: the buffer is C-contiguous, exported for as long as `self` lives, and read only.
            // pyarrow buffers are immutable; callers never pass buffers another thread writes to.
            Some(b) => unsafe { std::slice::from_raw_parts(b.buf_ptr() as *const u8, b.len_bytes()) },
        }
    }
}

/// A checked view of one array's values.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub len: usize,
    offset: usize,
    layout: Layout,
    validity: Option<&'a [u8]>,
    offsets: &'a [u8],
    data: &'a [u8],
}

impl<'a> View<'a> {
    /// Build and bounds-check a view; errors name the problem, never the content.
    pub fn new(args: &ViewArgs<'_>, held: &'a Held) -> PyResult<Self> {
        let (len, offset, code, width) = (args.0, args.1, args.2, args.3);
        let layout = match code {
            0 => Layout::Var32,
            1 => Layout::Var64,
            2 if width > 0 => Layout::Fixed(width),
            _ => return Err(PyValueError::new_err("unknown array layout")),
        };
        let validity = if held.bufs[0].is_some() { Some(held.slice(0)) } else { None };
        let (offsets, data) = match layout {
            Layout::Fixed(_) => (&[][..], held.slice(1)),
            _ => (held.slice(1), held.slice(2)),
        };
        let end = offset.checked_add(len).ok_or_else(|| PyValueError::new_err("array too long"))?;
        if let Some(v) = validity {
            if v.len() * 8 < end {
                return Err(PyValueError::new_err("validity buffer too short"));
            }
        }
        let view = View { len, offset, layout, validity, offsets, data };
        if len == 0 {
            // An empty array may come without an offsets buffer; nothing will be read.
            return Ok(View { offset: 0, validity: None, offsets: &[], data: &[], ..view });
        }
        match layout {
            Layout::Fixed(w) => {
                if end.checked_mul(w).is_none_or(|b| b > data.len()) {
                    return Err(PyValueError::new_err("data buffer too short"));
                }
            }
            Layout::Var32 | Layout::Var64 => {
                let ow = if layout == Layout::Var32 { 4 } else { 8 };
                if (end + 1) * ow > offsets.len() {
                    return Err(PyValueError::new_err("offsets buffer too short"));
                }
                let mut prev = view.raw_offset(offset)?;
                for i in offset + 1..=end {
                    let cur = view.raw_offset(i)?;
                    if cur < prev {
                        return Err(PyValueError::new_err("offsets are not monotonic"));
                    }
                    prev = cur;
                }
                if prev > data.len() {
                    return Err(PyValueError::new_err("offsets point past the data buffer"));
                }
            }
        }
        Ok(view)
    }

    fn raw_offset(&self, i: usize) -> PyResult<usize> {
        let v = match self.layout {
            Layout::Var32 => i32::from_le_bytes(self.offsets[4 * i..4 * i + 4].try_into().unwrap()) as i64,
            _ => i64::from_le_bytes(self.offsets[8 * i..8 * i + 8].try_into().unwrap()),
        };
        usize::try_from(v).map_err(|_| PyValueError::new_err("negative offset"))
    }

    #[inline]
    fn off(&self, i: usize) -> usize {
        // Checked in `new`: in range, non-negative and monotonic.
        match self.layout {
            Layout::Var32 => i32::from_le_bytes(self.offsets[4 * i..4 * i + 4].try_into().unwrap()) as usize,
            _ => i64::from_le_bytes(self.offsets[8 * i..8 * i + 8].try_into().unwrap()) as usize,
        }
    }

    /// Whether value `i` (0-based, relative to the array's own offset) is non-null.
    #[inline]
    pub fn is_valid(&self, i: usize) -> bool {
        match self.validity {
            None => true,
            Some(v) => {
                let j = self.offset + i;
                v[j >> 3] >> (j & 7) & 1 == 1
            }
        }
    }

    /// The bytes of value `i` (empty for a null of a variable-width array).
    #[inline]
    pub fn value(&self, i: usize) -> &'a [u8] {
        let j = self.offset + i;
        match self.layout {
            Layout::Fixed(w) => &self.data[j * w..(j + 1) * w],
            _ => &self.data[self.off(j)..self.off(j + 1)],
        }
    }

    /// Length of value `i` in bytes.
    #[inline]
    pub fn value_len(&self, i: usize) -> usize {
        let j = self.offset + i;
        match self.layout {
            Layout::Fixed(w) => w,
            _ => self.off(j + 1) - self.off(j),
        }
    }

    /// Total bytes of the values (for the parallelism threshold).
    pub fn value_bytes(&self) -> usize {
        if self.len == 0 {
            return 0;
        }
        match self.layout {
            Layout::Fixed(w) => self.len * w,
            _ => self.off(self.offset + self.len) - self.off(self.offset),
        }
    }

    /// The validity bitmap re-based to offset 0 (`None` when every value is valid), and the null count.
    pub fn rebased_validity(&self) -> (Option<Vec<u8>>, usize) {
        let Some(_) = self.validity else { return (None, 0) };
        let mut bits = vec![0u8; self.len.div_ceil(8)];
        let mut nulls = 0;
        for i in 0..self.len {
            if self.is_valid(i) {
                bits[i >> 3] |= 1 << (i & 7);
            } else {
                nulls += 1;
            }
        }
        if nulls == 0 {
            (None, 0)
        } else {
            (Some(bits), nulls)
        }
    }
}
