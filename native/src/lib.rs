//! `cloakbeam._native`: the native core behind `cloakbeam.keys.native` (the typed Python facade).
//!
//! Kernels take an Arrow array as its buffers (zero copy in), release the GIL for the whole batch, and
//! write their result into buffers they allocate once (`bytes` objects that pyarrow wraps without
//! copying). Primitives come from maintained crates only: ring (AES-256-GCM), RustCrypto `aes-siv`,
//! `hmac` and `sha2`; nonces from `getrandom`. Every failure is raised as `CellError(code, row)`: a fixed code and a row index, never
//! content or key material; the facade turns it into cloakbeam's own errors.

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use zeroize::Zeroizing;

mod cells;
mod digest;
mod par;
mod view;

use par::Fail;
use view::{Held, View, ViewArgs};

create_exception!(_native, CellError, PyException, "A cell or value the kernel refused: args are (code, row).");

/// A `bytes` object of `len` bytes that `init` fills (the kernels initialize every byte, in parallel
/// for large outputs, so the allocation is not zeroed up front).
fn new_bytes<'py, F>(py: Python<'py>, len: usize, init: F) -> PyResult<Bound<'py, PyBytes>>
where
    F: FnOnce(&mut [std::mem::MaybeUninit<u8>]) -> PyResult<()>,
{
    use pyo3::ffi;
    // SAFETY: PyBytes_FromStringAndSize(NULL, len) returns a new bytes object with `len` writable bytes
    // (uninitialized) that nothing else references yet; `init` sees them as `MaybeUninit` only, and the
    // object is dropped (never exposed) if `init` fails.
    unsafe {
        let ptr = ffi::PyBytes_FromStringAndSize(std::ptr::null(), len as ffi::Py_ssize_t);
        let obj = Bound::from_owned_ptr_or_err(py, ptr)?.cast_into_unchecked::<PyBytes>();
        let buf = ffi::PyBytes_AsString(ptr) as *mut std::mem::MaybeUninit<u8>;
        init(std::slice::from_raw_parts_mut(buf, len))?;
        Ok(obj)
    }
}

fn cell_error(f: Fail) -> PyErr {
    CellError::new_err((f.code, f.row))
}

type Buffers<'py> = (Option<Bound<'py, PyBytes>>, Bound<'py, PyBytes>, Bound<'py, PyBytes>, usize);

fn validity<'py>(py: Python<'py>, view: &View<'_>) -> (Option<Bound<'py, PyBytes>>, usize) {
    let (bits, nulls) = view.rebased_validity();
    (bits.map(|b| PyBytes::new(py, &b)), nulls)
}

/// Encrypt every valid cell of an array under one data key; returns (validity, int32 offsets, data, nulls).
#[pyfunction]
#[pyo3(signature = (deterministic, key, key_id, aad, view))]
fn encrypt_cells<'py>(py: Python<'py>, deterministic: bool, key: &[u8], key_id: &[u8], aad: &[u8], view: ViewArgs<'py>) -> PyResult<Buffers<'py>> {
    let key_id: [u8; cells::KEY_ID_LEN] = key_id.try_into().map_err(|_| PyValueError::new_err("key id must be 8 bytes"))?;
    if key.len() != if deterministic { 64 } else { 32 } {
        return Err(PyValueError::new_err("wrong data key size for the cell mode"));
    }
    let held = Held::get(&view)?;
    let v = View::new(&view, &held)?;
    let overhead = if deterministic { cells::SIV_OVERHEAD } else { cells::GCM_OVERHEAD };
    encrypted_buffers(py, &v, overhead, |obytes, out| cells::encrypt(deterministic, key, &key_id, aad, &v, obytes, out))
}

/// The buffers of an encrypted column: int32 offsets (each valid cell grows by `overhead`; "too_large" past
/// 2 GiB), the cell data that `fill` writes with the GIL released, and the input's validity.
fn encrypted_buffers<'py, F>(py: Python<'py>, v: &View<'_>, overhead: usize, fill: F) -> PyResult<Buffers<'py>>
where
    F: FnOnce(&[u8], &mut [std::mem::MaybeUninit<u8>]) -> Result<(), Fail> + Send,
{
    let mut too_large = false;
    let offsets = PyBytes::new_with(py, 4 * (v.len + 1), |o| {
        too_large = cells::encrypt_offsets(v, overhead, o).is_none();
        Ok(())
    })?;
    if too_large {
        return Err(cell_error(Fail { code: "too_large", row: 0 }));
    }
    let obytes = offsets.as_bytes();
    let total = cells::read_off32(obytes, v.len);
    let data = new_bytes(py, total, |out| py.detach(|| fill(obytes, out)).map_err(cell_error))?;
    let (bits, nulls) = validity(py, v);
    Ok((bits, offsets, data, nulls))
}

/// Encrypt every valid cell under its own AES-256-GCM key (`cells::encrypt_keyed`): `keys` is k raw 32-byte
/// keys back to back, `key_ids` k 8-byte ids, `aads` k associated-data strings, `key_index` one int64 (LE) per
/// row. Returns (validity, int32 offsets, data, nulls).
#[pyfunction]
#[pyo3(signature = (keys, key_ids, aads, key_index, view))]
fn encrypt_cells_keyed<'py>(py: Python<'py>, keys: &[u8], key_ids: &[u8], aads: Vec<Vec<u8>>, key_index: &[u8], view: ViewArgs<'py>) -> PyResult<Buffers<'py>> {
    let k = aads.len();
    if keys.len() != 32 * k || key_ids.len() != cells::KEY_ID_LEN * k {
        return Err(PyValueError::new_err("keyed encryption needs 32 key bytes, 8 key id bytes and one associated data per key"));
    }
    let held = Held::get(&view)?;
    let v = View::new(&view, &held)?;
    if key_index.len() != 8 * v.len {
        return Err(PyValueError::new_err("key_index must hold one int64 per row"));
    }
    encrypted_buffers(py, &v, cells::GCM_OVERHEAD, |obytes, out| cells::encrypt_keyed(keys, key_ids, &aads, key_index, &v, obytes, out))
}

/// Check the structure of a column of cells: (first short row, (first bad row, unknown version?),
/// [(version, key id, first row)] in the order the reference kernel visits them).
#[pyfunction]
#[allow(clippy::type_complexity)]
fn scan_cells<'py>(py: Python<'py>, view: ViewArgs<'py>) -> PyResult<(Option<usize>, Option<(usize, bool)>, Vec<(u8, Bound<'py, PyBytes>, usize)>)> {
    let held = Held::get(&view)?;
    let v = View::new(&view, &held)?;
    let s = py.detach(|| cells::scan(&v));
    let groups = s.groups.into_iter().map(|(ver, kid, row)| (ver, PyBytes::new(py, &kid), row)).collect();
    Ok((s.short_row, s.bad, groups))
}

/// Decrypt the cells of the given (version, key id, key, [associated data]) groups; returns
/// (validity, offsets, data, nulls, offsets are int64?, [first failing row per group]).
#[pyfunction]
#[pyo3(signature = (groups, view, wide))]
#[allow(clippy::type_complexity)]
fn decrypt_cells<'py>(
    py: Python<'py>,
    groups: Vec<(u8, Vec<u8>, Vec<u8>, Vec<Vec<u8>>)>,
    view: ViewArgs<'py>,
    wide: bool,
) -> PyResult<(Option<Bound<'py, PyBytes>>, Bound<'py, PyBytes>, Bound<'py, PyBytes>, usize, bool, Vec<Option<usize>>)> {
    let mut keys = Vec::with_capacity(groups.len());
    for (version, kid, key, aad) in groups {
        let key = Zeroizing::new(key);
        let key_id = kid.as_slice().try_into().map_err(|_| PyValueError::new_err("key id must be 8 bytes"))?;
        keys.push(cells::GroupKey { version, key_id, key, aad });
    }
    let held = Held::get(&view)?;
    let v = View::new(&view, &held)?;
    let total = cells::plain_total(&v).map_err(cell_error)?;
    let wide = wide || total > i32::MAX as usize;
    let ow = if wide { 8 } else { 4 };
    let offsets = PyBytes::new_with(py, ow * (v.len + 1), |o| cells::decrypt_offsets(&v, wide, o).map(|_| ()).map_err(cell_error))?;
    let obytes = offsets.as_bytes();
    let mut fails = Vec::new();
    let data = new_bytes(py, total, |out| {
        fails = py.detach(|| cells::decrypt(&keys, &v, obytes, wide, out)).map_err(cell_error)?;
        Ok(())
    })?;
    let (bits, nulls) = validity(py, &v);
    Ok((bits, offsets, data, nulls, wide, fails))
}

/// HMAC-SHA256 of prefix || [counter u32 big-endian] || value for every value: n * 32 bytes (nulls zero).
#[pyfunction]
#[pyo3(signature = (key, prefix, view, counters=None))]
fn hmac_sha256<'py>(py: Python<'py>, key: &[u8], prefix: &[u8], view: ViewArgs<'py>, counters: Option<Bound<'py, PyAny>>) -> PyResult<Bound<'py, PyBytes>> {
    let held = Held::get(&view)?;
    let v = View::new(&view, &held)?;
    let cbuf = counter_buffer(counters.as_ref(), v.len)?;
    let cslice = cbuf.as_ref().map(buffer_bytes);
    let keyed = digest::Keyed::new(key, prefix);
    new_bytes(py, 32 * v.len, |out| {
        py.detach(|| digest::hmac_all(&keyed, &v, digest::Counters(cslice), out)).map_err(cell_error)
    })
}

/// Tokens of every value (no nulls): (int32 offsets, UTF-8 data).
#[pyfunction]
#[pyo3(signature = (key, digits, prefix, keep_last, luhn, view, counters=None))]
#[allow(clippy::too_many_arguments)]
fn render_tokens<'py>(
    py: Python<'py>,
    key: &[u8],
    digits: bool,
    prefix: &[u8],
    keep_last: usize,
    luhn: bool,
    view: ViewArgs<'py>,
    counters: Option<Bound<'py, PyAny>>,
) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
    let held = Held::get(&view)?;
    let v = View::new(&view, &held)?;
    let cbuf = counter_buffer(counters.as_ref(), v.len)?;
    let cslice = cbuf.as_ref().map(buffer_bytes);
    let fmt = digest::Format { digits, prefix, keep_last, luhn };
    let offsets = PyBytes::new_with(py, 4 * (v.len + 1), |o| digest::token_offsets(&fmt, &v, o).map_err(cell_error))?;
    let obytes = offsets.as_bytes();
    let keyed = digest::Keyed::new(key, b"");
    let data = new_bytes(py, cells::read_off32(obytes, v.len), |out| {
        py.detach(|| digest::render_all(&keyed, &fmt, &v, digest::Counters(cslice), obytes, out)).map_err(cell_error)
    })?;
    Ok((offsets, data))
}

fn counter_buffer(obj: Option<&Bound<'_, PyAny>>, n: usize) -> PyResult<Option<pyo3::buffer::PyUntypedBuffer>> {
    let Some(obj) = obj else { return Ok(None) };
    if obj.is_none() {
        return Ok(None);
    }
    let b = pyo3::buffer::PyUntypedBuffer::get(obj)?;
    if !b.is_c_contiguous() || b.len_bytes() < 4 * n {
        return Err(PyValueError::new_err("counters must be a contiguous uint32 buffer with one counter per value"));
    }
    Ok(Some(b))
}

fn buffer_bytes(b: &pyo3::buffer::PyUntypedBuffer) -> &[u8] {
    if b.len_bytes() == 0 {
        return &[];
    }
    // SAFETY: contiguous, exported while `b` lives, read only (a numpy array the facade just made).
    unsafe { std::slice::from_raw_parts(b.buf_ptr() as *const u8, b.len_bytes()) }
}

/// Set the kernel thread count (0: `CLOAKBEAM_NATIVE_THREADS` or the CPU count); returns the count in force.
#[pyfunction]
fn set_threads(n: usize) -> usize {
    par::set_threads(n)
}

/// The number of threads large batches run on.
#[pyfunction]
fn get_threads() -> usize {
    par::threads()
}

/// CPU features the RustCrypto backends detect at run time (for benchmark reports).
#[pyfunction]
fn cpu_features() -> Vec<&'static str> {
    let mut out = Vec::new();
    #[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
    {
        if std::arch::is_x86_feature_detected!("aes") {
            out.push("aes");
        }
        if std::arch::is_x86_feature_detected!("pclmulqdq") {
            out.push("pclmulqdq");
        }
        if std::arch::is_x86_feature_detected!("sha") {
            out.push("sha");
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            out.push("avx2");
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("aes") {
            out.push("aes");
        }
        if std::arch::is_aarch64_feature_detected!("sha2") {
            out.push("sha2");
        }
    }
    out
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("CellError", m.py().get_type::<CellError>())?;
    m.add("PARALLEL_MIN_CELLS", par::PARALLEL_MIN_CELLS)?;
    m.add("PARALLEL_MIN_BYTES", par::PARALLEL_MIN_BYTES)?;
    m.add_function(wrap_pyfunction!(encrypt_cells, m)?)?;
    m.add_function(wrap_pyfunction!(encrypt_cells_keyed, m)?)?;
    m.add_function(wrap_pyfunction!(scan_cells, m)?)?;
    m.add_function(wrap_pyfunction!(decrypt_cells, m)?)?;
    m.add_function(wrap_pyfunction!(hmac_sha256, m)?)?;
    m.add_function(wrap_pyfunction!(render_tokens, m)?)?;
    m.add_function(wrap_pyfunction!(set_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_threads, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_features, m)?)?;
    Ok(())
}
