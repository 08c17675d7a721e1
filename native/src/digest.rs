//! Keyed digests and tokens: HMAC-SHA256 of every value of a column under one key.
//!
//! `hmac`: prefix || [counter as 4 bytes big-endian] || value, 32 bytes per value (zeros for nulls).
//! The keyed inner/outer states (and the prefix) are computed once per call; each value then costs a
//! clone of that state and the SHA-256 compressions of its own bytes (SHA-NI when the CPU has it).
//!
//! `render`: the token formats of `vault/tokens.py`, byte-identical:
//! - opaque: prefix || lower-case unpadded base32 (RFC 4648) of the first 16 MAC bytes;
//! - digits: the last `len(value) - keep_last` decimal digits of the MAC read as a big-endian integer,
//!   then the kept digits of the value; with Luhn the last free digit is solved so the token passes; a
//!   token equal to its own value moves on to the next counter.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::par::{run_chunks, Fail};
use crate::view::View;

type HmacSha256 = Hmac<Sha256>;
const B32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
const DOUBLE: [u8; 10] = [0, 2, 4, 6, 8, 1, 3, 5, 7, 9];
const UNDOUBLE: [u8; 10] = [0, 5, 1, 6, 2, 7, 3, 8, 4, 9];
pub const OPAQUE_LEN: usize = 26;

pub struct Keyed {
    base: HmacSha256,
}

impl Keyed {
    pub fn new(key: &[u8], prefix: &[u8]) -> Self {
        let mut base = <HmacSha256 as KeyInit>::new_from_slice(key).expect("HMAC takes keys of any length");
        base.update(prefix);
        Keyed { base }
    }

    #[inline]
    pub fn mac(&self, counter: Option<u32>, value: &[u8]) -> [u8; 32] {
        let mut m = self.base.clone();
        if let Some(c) = counter {
            m.update(&c.to_be_bytes());
        }
        m.update(value);
        m.finalize().into_bytes().into()
    }
}

/// Counters per value (u32, native little-endian), or none.
#[derive(Clone, Copy)]
pub struct Counters<'a>(pub Option<&'a [u8]>);

impl Counters<'_> {
    #[inline]
    pub fn get(&self, i: usize) -> Option<u32> {
        self.0.map(|b| u32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap()))
    }
}

/// HMAC of every valid value into `out` (32 bytes per value, zeros for nulls).
pub fn hmac_all(keyed: &Keyed, view: &View<'_>, counters: Counters<'_>, out: &mut [std::mem::MaybeUninit<u8>]) -> Result<(), Fail> {
    let start = |i: usize| 32 * i;
    run_chunks(view.len, view.value_bytes(), out, &start, |range, out| {
        let base = range.start;
        for i in range {
            if view.is_valid(i) {
                let d = keyed.mac(counters.get(i), view.value(i));
                out[32 * (i - base)..32 * (i - base + 1)].copy_from_slice(&d);
            }
        }
        Ok(())
    })
}

/// Base32 (RFC 4648, lower case, unpadded) of 16 bytes: 26 characters.
#[inline]
pub fn base32_16(mac: &[u8; 32], out: &mut [u8]) {
    let v = u128::from_be_bytes(mac[..16].try_into().unwrap());
    for (i, o) in out[..25].iter_mut().enumerate() {
        *o = B32[((v >> (123 - 5 * i)) & 31) as usize];
    }
    out[25] = B32[((v & 0b111) << 2) as usize];
}

/// The last `out.len()` decimal digits (zero-padded) of `mac` read as a 256-bit big-endian integer.
pub fn last_digits(mac: &[u8; 32], out: &mut [u8]) {
    const P19: u128 = 10_000_000_000_000_000_000;
    let mut limbs = [0u64; 4];
    for (k, l) in limbs.iter_mut().enumerate() {
        *l = u64::from_be_bytes(mac[8 * k..8 * k + 8].try_into().unwrap());
    }
    let mut pos = out.len();
    while pos > 0 {
        let mut r: u128 = 0;
        for l in limbs.iter_mut() {
            let cur = (r << 64) | *l as u128;
            *l = (cur / P19) as u64;
            r = cur % P19;
        }
        let mut r = r as u64;
        for _ in 0..19 {
            if pos == 0 {
                break;
            }
            pos -= 1;
            out[pos] = b'0' + (r % 10) as u8;
            r /= 10;
        }
    }
}

/// Set digit `pos` of the ASCII digit string `d` so that the whole string passes the Luhn check.
pub fn luhn_fix(d: &mut [u8], pos: usize) {
    let n = d.len();
    let mut total = 0u32;
    for (i, &c) in d.iter().enumerate() {
        if i == pos {
            continue;
        }
        let x = c - b'0';
        total += if (n - 1 - i) % 2 == 1 { DOUBLE[x as usize] } else { x } as u32;
    }
    let need = ((10 - total % 10) % 10) as usize;
    d[pos] = b'0' + if (n - 1 - pos) % 2 == 1 { UNDOUBLE[need] } else { need as u8 };
}

pub struct Format<'a> {
    pub digits: bool,
    pub prefix: &'a [u8],
    pub keep_last: usize,
    pub luhn: bool,
}

/// Check inputs and write the token offsets (int32). Digit formats need ASCII digits with at least one
/// free digit (two with Luhn); anything else is refused with the row, so the caller can use the reference.
pub fn token_offsets(fmt: &Format<'_>, view: &View<'_>, out: &mut [u8]) -> Result<(), Fail> {
    let mut total = 0usize;
    for i in 0..view.len {
        if !view.is_valid(i) {
            return Err(Fail { code: "null", row: i });
        }
        let len = if fmt.digits {
            let v = view.value(i);
            if v.len() < fmt.keep_last + if fmt.luhn { 2 } else { 1 } || !v.iter().all(u8::is_ascii_digit) {
                return Err(Fail { code: "not_digits", row: i });
            }
            v.len()
        } else {
            fmt.prefix.len() + OPAQUE_LEN
        };
        total += len;
        if total > i32::MAX as usize {
            return Err(Fail { code: "too_large", row: i });
        }
        out[4 * (i + 1)..4 * (i + 2)].copy_from_slice(&(total as u32).to_le_bytes());
    }
    Ok(())
}

/// Render the token of every value into `out`, laid out by `offsets` (from `token_offsets`).
pub fn render_all(keyed: &Keyed, fmt: &Format<'_>, view: &View<'_>, counters: Counters<'_>, offsets: &[u8], out: &mut [std::mem::MaybeUninit<u8>]) -> Result<(), Fail> {
    let start = |i: usize| crate::cells::read_off32(offsets, i);
    run_chunks(view.len, view.value_bytes(), out, &start, |range, out| {
        let base = start(range.start);
        for i in range {
            let v = view.value(i);
            let s = start(i) - base;
            let dst = &mut out[s..start(i + 1) - base];
            let mut c = counters.get(i).unwrap_or(0);
            if !fmt.digits {
                let mac = keyed.mac(Some(c), v);
                dst[..fmt.prefix.len()].copy_from_slice(fmt.prefix);
                base32_16(&mac, &mut dst[fmt.prefix.len()..]);
                continue;
            }
            let free = v.len() - fmt.keep_last;
            loop {
                let mac = keyed.mac(Some(c), v);
                last_digits(&mac, &mut dst[..free]);
                dst[free..].copy_from_slice(&v[free..]);
                if fmt.luhn {
                    luhn_fix(dst, free - 1);
                }
                if &*dst != v {
                    break;
                }
                // A token never equals its own value: the next counter, as the reference does.
                c = c.checked_add(1).ok_or(Fail { code: "counter", row: i })?;
            }
        }
        Ok(())
    })
}
