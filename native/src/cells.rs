//! Cell format v1 (see `keys/cells.py`): AES-256-GCM and AES-256-SIV cells of a whole column.
//!
//!   GCM: 0x01 || key id (8) || nonce (12) || ciphertext || tag (16)
//!   SIV: 0x02 || key id (8) || SIV (16)   || ciphertext
//!
//! AES-256-GCM is ring's (BoringSSL's AES-NI/CLMUL/VAES code, chosen at run time); AES-256-SIV is
//! RustCrypto's `aes-siv` (ring has no SIV). The associated data is built by the Python caller
//! (`cell_aad`) and passed in once per key. Nonces are drawn here from the OS CSPRNG (`getrandom`), one
//! draw per block of cells; no caller can supply one. The AES key schedule and GHASH key are computed
//! once per call, not per cell. Nothing here sees a
//! column name or logs; failures carry a fixed code and a row index only.

use aes_siv::aead::inout::InOutBuf;
use aes_siv::aead::KeyInit;
use aes_siv::siv::Aes256Siv;
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM};
use zeroize::Zeroizing;

use crate::par::{run_chunks, Fail};
use crate::view::View;

pub const CELL_GCM: u8 = 0x01;
pub const CELL_SIV: u8 = 0x02;
pub const KEY_ID_LEN: usize = 8;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
pub const GCM_HEADER: usize = 1 + KEY_ID_LEN + NONCE_LEN;
pub const GCM_OVERHEAD: usize = GCM_HEADER + TAG_LEN;
pub const SIV_HEADER: usize = 1 + KEY_ID_LEN + TAG_LEN;
pub const SIV_OVERHEAD: usize = SIV_HEADER;
/// Cells whose nonces come from one `getrandom` call.
const NONCE_BLOCK: usize = 4096;

pub fn overhead(version: u8) -> usize {
    if version == CELL_SIV {
        SIV_OVERHEAD
    } else {
        GCM_OVERHEAD
    }
}

#[inline]
pub fn read_off32(b: &[u8], i: usize) -> usize {
    u32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap()) as usize
}

#[inline]
pub fn read_off64(b: &[u8], i: usize) -> usize {
    u64::from_le_bytes(b[8 * i..8 * i + 8].try_into().unwrap()) as usize
}

/// Output offsets (int32) of the encrypted column: every valid cell grows by `overhead`, nulls stay empty.
/// Returns `None` when the column would exceed 2 GiB.
pub fn encrypt_offsets(view: &View<'_>, overhead: usize, out: &mut [u8]) -> Option<()> {
    let mut total: usize = 0;
    out[0..4].copy_from_slice(&0i32.to_le_bytes());
    for i in 0..view.len {
        if view.is_valid(i) {
            total += view.value_len(i) + overhead;
            if total > i32::MAX as usize {
                return None;
            }
        }
        out[4 * (i + 1)..4 * (i + 2)].copy_from_slice(&(total as i32).to_le_bytes());
    }
    Some(())
}

/// Encrypt every valid cell of `view` into `out` (laid out by `offsets`, int32) under one key.
pub fn encrypt(deterministic: bool, key: &[u8], key_id: &[u8; KEY_ID_LEN], aad: &[u8], view: &View<'_>, offsets: &[u8], out: &mut [std::mem::MaybeUninit<u8>]) -> Result<(), Fail> {
    let start = |i: usize| read_off32(offsets, i);
    let n = view.len;
    if deterministic {
        let key = Zeroizing::new(<[u8; 64]>::try_from(key).map_err(|_| Fail { code: "key_size", row: 0 })?);
        run_chunks(n, view.value_bytes(), out, &start, |range, out| {
            let mut siv = Aes256Siv::new({ let k: &[u8; 64] = &key; k.into() });
            let base = start(range.start);
            for i in range {
                if !view.is_valid(i) {
                    continue;
                }
                let pt = view.value(i);
                let s = start(i) - base;
                let cell = &mut out[s..s + pt.len() + SIV_OVERHEAD];
                cell[0] = CELL_SIV;
                cell[1..1 + KEY_ID_LEN].copy_from_slice(key_id);
                let (tag_dst, ct) = cell[1 + KEY_ID_LEN..].split_at_mut(TAG_LEN);
                let buf = InOutBuf::new(pt, ct).map_err(|_| Fail { code: "internal", row: i })?;
                let tag = siv.encrypt_inout_detached([aad], buf).map_err(|_| Fail { code: "encrypt", row: i })?;
                tag_dst.copy_from_slice(&tag);
            }
            Ok(())
        })
    } else {
        let cipher = gcm_key(key)?;
        run_chunks(n, view.value_bytes(), out, &start, |range, out| {
            let base = start(range.start);
            let mut nonces = NonceBlock::new(range.len());
            for i in range.clone() {
                if !view.is_valid(i) {
                    continue;
                }
                let pt = view.value(i);
                let s = start(i) - base;
                let nonce = nonces.next(i, range.end)?;
                seal_gcm_cell(&cipher, key_id, aad, nonce, pt, &mut out[s..s + pt.len() + GCM_OVERHEAD], i)?;
            }
            Ok(())
        })
    }
}

/// Nonces for the GCM cells of one chunk, drawn from the OS CSPRNG (`getrandom`) `NONCE_BLOCK` at a time.
struct NonceBlock {
    buf: Vec<u8>,
    used: usize,
}

impl NonceBlock {
    fn new(cells: usize) -> Self {
        let buf = vec![0u8; NONCE_LEN * NONCE_BLOCK.min(cells)];
        let used = buf.len() / NONCE_LEN;
        NonceBlock { buf, used }
    }

    /// The next fresh nonce, for the cell of row `row` (of a chunk ending at `end`).
    #[inline]
    fn next(&mut self, row: usize, end: usize) -> Result<[u8; NONCE_LEN], Fail> {
        if self.used * NONCE_LEN == self.buf.len() {
            self.buf.truncate(NONCE_LEN * NONCE_BLOCK.min(end - row));
            getrandom::fill(&mut self.buf).map_err(|_| Fail { code: "random", row })?;
            self.used = 0;
        }
        let nonce = self.buf[NONCE_LEN * self.used..NONCE_LEN * (self.used + 1)].try_into().unwrap();
        self.used += 1;
        Ok(nonce)
    }
}

/// Write one GCM cell (version, key id, nonce, ciphertext, tag) of plaintext `pt` into `cell`.
#[inline]
fn seal_gcm_cell(cipher: &LessSafeKey, key_id: &[u8], aad: &[u8], nonce: [u8; NONCE_LEN], pt: &[u8], cell: &mut [u8], row: usize) -> Result<(), Fail> {
    cell[0] = CELL_GCM;
    cell[1..1 + KEY_ID_LEN].copy_from_slice(key_id);
    cell[1 + KEY_ID_LEN..GCM_HEADER].copy_from_slice(&nonce);
    let (ct, tag_dst) = cell[GCM_HEADER..].split_at_mut(pt.len());
    ct.copy_from_slice(pt);
    let tag = cipher
        .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), ct)
        .map_err(|_| Fail { code: "encrypt", row })?;
    tag_dst.copy_from_slice(tag.as_ref());
    Ok(())
}

/// Encrypt every valid cell of `view` under its own AES-256-GCM key (subject-linked columns): row `i` uses key
/// `k = key_index[i]` (int64 little-endian), i.e. `keys[32k..32k+32]`, key id `key_ids[8k..8k+8]` and associated
/// data `aads[k]`. Same cell format and nonce source as `encrypt`; a row naming no given key fails with
/// "key_index". The key schedule is made once per run of rows that share a key.
pub fn encrypt_keyed(keys: &[u8], key_ids: &[u8], aads: &[Vec<u8>], key_index: &[u8], view: &View<'_>, offsets: &[u8], out: &mut [std::mem::MaybeUninit<u8>]) -> Result<(), Fail> {
    let start = |i: usize| read_off32(offsets, i);
    let n = view.len;
    let nk = aads.len();
    run_chunks(n, view.value_bytes(), out, &start, |range, out| {
        let base = start(range.start);
        let mut nonces = NonceBlock::new(range.len());
        let mut current: Option<(usize, LessSafeKey)> = None;
        for i in range.clone() {
            if !view.is_valid(i) {
                continue;
            }
            let k = i64::from_le_bytes(key_index[8 * i..8 * i + 8].try_into().unwrap());
            if k < 0 || k as usize >= nk {
                return Err(Fail { code: "key_index", row: i });
            }
            let k = k as usize;
            if current.as_ref().map(|c| c.0) != Some(k) {
                current = Some((k, gcm_key(&keys[32 * k..32 * k + 32])?));
            }
            let cipher = &current.as_ref().unwrap().1;
            let pt = view.value(i);
            let s = start(i) - base;
            let nonce = nonces.next(i, range.end)?;
            let key_id = &key_ids[KEY_ID_LEN * k..KEY_ID_LEN * (k + 1)];
            seal_gcm_cell(cipher, key_id, &aads[k], nonce, pt, &mut out[s..s + pt.len() + GCM_OVERHEAD], i)?;
        }
        Ok(())
    })
}

/// Result of checking a column's cell structure before any key is looked up.
pub struct Scan {
    /// First valid cell shorter than version byte + key id.
    pub short_row: Option<usize>,
    /// First cell with an unknown version (`true`) or shorter than its version's overhead (`false`).
    pub bad: Option<(usize, bool)>,
    /// Distinct (version, key id) with the first row using them, ordered as the Python kernel orders them
    /// (key id read as a little-endian u64, then version).
    pub groups: Vec<(u8, [u8; KEY_ID_LEN], usize)>,
}

pub fn scan(view: &View<'_>) -> Scan {
    let mut short_row = None;
    let mut bad = None;
    let mut seen: std::collections::HashMap<(u64, u8), usize> = std::collections::HashMap::new();
    let mut last: Option<(u64, u8)> = None;
    for i in 0..view.len {
        if !view.is_valid(i) {
            continue;
        }
        let c = view.value(i);
        if c.len() < 1 + KEY_ID_LEN {
            short_row.get_or_insert(i);
            continue;
        }
        let v = c[0];
        if v != CELL_GCM && v != CELL_SIV {
            bad.get_or_insert((i, true));
        } else if c.len() < overhead(v) {
            bad.get_or_insert((i, false));
        }
        let kid = u64::from_le_bytes(c[1..1 + KEY_ID_LEN].try_into().unwrap());
        // Columns almost always have one key: skip the map while the key does not change.
        if last != Some((kid, v)) {
            seen.entry((kid, v)).or_insert(i);
            last = Some((kid, v));
        }
    }
    let mut groups: Vec<(u64, u8, usize)> = seen.into_iter().map(|((k, v), r)| (k, v, r)).collect();
    groups.sort_unstable();
    Scan { short_row, bad, groups: groups.into_iter().map(|(k, v, r)| (v, k.to_le_bytes(), r)).collect() }
}

/// One key of a decrypt call: the cells with this (version, key id) use `key` and associated data `aad`.
/// Cells have exactly one associated-data item; SIV accepts several (RFC 5297 S2V vector), which only
/// the Wycheproof AEAD-SIV tests use (their nonce is a second item).
pub struct GroupKey {
    pub version: u8,
    pub key_id: [u8; KEY_ID_LEN],
    pub key: Zeroizing<Vec<u8>>,
    pub aad: Vec<Vec<u8>>,
}

/// ring's AES-256-GCM key (key schedule and GHASH powers computed here, once).
fn gcm_key(key: &[u8]) -> Result<LessSafeKey, Fail> {
    UnboundKey::new(&AES_256_GCM, key).map(LessSafeKey::new).map_err(|_| Fail { code: "key_size", row: 0 })
}

enum Opened {
    Gcm(Box<LessSafeKey>),
    Siv(Zeroizing<[u8; 64]>),
}

/// Plaintext offsets of a decrypted column (cells of unknown groups decrypt to nothing: the caller
/// raises for them). `wide` selects int64 offsets. Returns the total plaintext bytes.
pub fn decrypt_offsets(view: &View<'_>, wide: bool, out: &mut [u8]) -> Result<usize, Fail> {
    let mut total = 0usize;
    for i in 0..view.len {
        if view.is_valid(i) {
            let c = view.value(i);
            let need = if c.is_empty() { usize::MAX } else { overhead(c[0]) };
            if c.len() < need {
                return Err(Fail { code: "malformed", row: i });
            }
            total += c.len() - need;
        }
        if wide {
            out[8 * (i + 1)..8 * (i + 2)].copy_from_slice(&(total as u64).to_le_bytes());
        } else {
            if total > i32::MAX as usize {
                return Err(Fail { code: "too_large", row: i });
            }
            out[4 * (i + 1)..4 * (i + 2)].copy_from_slice(&(total as u32).to_le_bytes());
        }
    }
    Ok(total)
}

/// Sum of plaintext bytes, to choose the offset width before allocating.
pub fn plain_total(view: &View<'_>) -> Result<usize, Fail> {
    let mut total = 0usize;
    for i in 0..view.len {
        if view.is_valid(i) {
            let c = view.value(i);
            let need = if c.is_empty() { usize::MAX } else { overhead(c[0]) };
            if c.len() < need {
                return Err(Fail { code: "malformed", row: i });
            }
            total += c.len() - need;
        }
    }
    Ok(total)
}

/// Decrypt every valid cell whose (version, key id) is among `groups` into `out`.
/// Returns, per group, the first row failing authentication.
pub fn decrypt(groups: &[GroupKey], view: &View<'_>, offsets: &[u8], wide: bool, out: &mut [std::mem::MaybeUninit<u8>]) -> Result<Vec<Option<usize>>, Fail> {
    let mut opened = Vec::with_capacity(groups.len());
    for g in groups {
        if g.aad.is_empty() || (g.version != CELL_SIV && g.aad.len() != 1) {
            return Err(Fail { code: "associated_data", row: 0 });
        }
        opened.push(if g.version == CELL_SIV {
            Opened::Siv(Zeroizing::new(<[u8; 64]>::try_from(g.key.as_slice()).map_err(|_| Fail { code: "key_size", row: 0 })?))
        } else {
            Opened::Gcm(Box::new(gcm_key(&g.key)?))
        });
    }
    let start = |i: usize| if wide { read_off64(offsets, i) } else { read_off32(offsets, i) };
    let fails: std::sync::Mutex<Vec<Option<usize>>> = std::sync::Mutex::new(vec![None; groups.len()]);
    let n = view.len;
    run_chunks(n, view.value_bytes(), out, &start, |range, out| {
        let base = start(range.start);
        let mut sivs: Vec<Option<Aes256Siv>> = (0..groups.len()).map(|_| None).collect();
        let mut local: Vec<Option<usize>> = vec![None; groups.len()];
        let mut last = usize::MAX;
        for i in range {
            if !view.is_valid(i) {
                continue;
            }
            let c = view.value(i);
            let (v, kid) = (c[0], &c[1..1 + KEY_ID_LEN]);
            // Almost every column has one key: test the previous match first.
            let g = if last != usize::MAX && groups[last].version == v && groups[last].key_id == kid {
                last
            } else {
                match groups.iter().position(|g| g.version == v && g.key_id == kid) {
                    Some(g) => g,
                    None => continue,
                }
            };
            last = g;
            if local[g].is_some() {
                continue;
            }
            let s = start(i) - base;
            let ok = match &opened[g] {
                Opened::Gcm(cipher) => {
                    let body = &c[GCM_HEADER..];
                    let (ct, tag) = body.split_at(body.len() - TAG_LEN);
                    let dst = &mut out[s..s + ct.len()];
                    dst.copy_from_slice(ct);
                    let nonce = Nonce::try_assume_unique_for_key(&c[1 + KEY_ID_LEN..GCM_HEADER]).map_err(|_| Fail { code: "internal", row: i })?;
                    let tag = Tag::try_from(tag).map_err(|_| Fail { code: "internal", row: i })?;
                    cipher.open_in_place_separate_tag(nonce, Aad::from(groups[g].aad[0].as_slice()), tag, dst, 0..).is_ok()
                }
                Opened::Siv(key) => {
                    let siv = sivs[g].get_or_insert_with(|| Aes256Siv::new({ let k: &[u8; 64] = key; k.into() }));
                    let tag = c[1 + KEY_ID_LEN..SIV_HEADER].try_into().map_err(|_| Fail { code: "internal", row: i })?;
                    let ct = &c[SIV_HEADER..];
                    let dst = &mut out[s..s + ct.len()];
                    let buf = InOutBuf::new(ct, dst).map_err(|_| Fail { code: "internal", row: i })?;
                    siv.decrypt_inout_detached(groups[g].aad.iter(), buf, tag).is_ok()
                }
            };
            if !ok {
                local[g] = Some(i);
            }
        }
        let mut f = fails.lock().unwrap_or_else(|e| e.into_inner());
        for (a, b) in f.iter_mut().zip(local) {
            if let Some(r) = b {
                *a = Some(a.map_or(r, |x| x.min(r)));
            }
        }
        Ok(())
    })?;
    let fails = fails.into_inner().unwrap_or_else(|e| e.into_inner());
    if fails.iter().any(|f| f.is_some()) {
        // Authentic neighbours of a failed cell are never returned; do not leave them in freed memory.
        // (Every byte was initialized by `run_chunks`.)
        let out = unsafe { &mut *(out as *mut [std::mem::MaybeUninit<u8>] as *mut [u8]) };
        zeroize::Zeroize::zeroize(out);
    }
    Ok(fails)
}
