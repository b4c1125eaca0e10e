//! The rank budget of batch-bound column keys: per batch, the rank of every column vector
//! the authority has issued for it.
//!
//! A batch's backward products `dᵀX_k` for keys `d_1..d_m` determine exactly the component
//! of each pixel column of `X_k` in `span(d_1..d_m)`; the rest (dimension `B − rank`) stays
//! free. So the rank over the rationals of the issued vectors is what a budget must bound.
//!
//! # Rank modulo a secret prime
//!
//! The ledger keeps, per batch, the issued vectors reduced modulo a prime `p` in reduced row
//! echelon form (every pivot column zero in the other rows), so that a new vector is reduced
//! in one pass and a vector that raises the rank adds one row. The rank modulo `p` never
//! exceeds the rank over the rationals, and is lower only if `p` divides every maximal minor
//! of the vectors. A caller who knew `p` could craft small integer vectors, independent over
//! the rationals but dependent modulo `p` (a short vector in a lattice of determinant `p`),
//! and so read more than the budget; `p` is therefore drawn at random (62 bits) when the
//! authority starts and never leaves it. For vectors of length `B` with entries below `2^15`
//! (the policy's default `max_abs`)
//! a non-zero minor is below `(2^15 √B)^B`, so it has fewer than `B·(15 + log₂ B / 2) / 61`
//! prime factors of 62 bits (about 19 for `B = 64`), out of about `2^56` such primes.
//!
//! # The journal
//!
//! A served ledger appends, per admitted request, the vectors that raised its batch's rank
//! to a journal file (`ranks.log` in the key directory, mode 0600, locked by the serving
//! process so that two authorities cannot count apart): a length, the bincode of
//! `(batch, vectors)` and its SHA-256. The record is synced before the keys go out, and a
//! restarted authority counts the journal again, so a restart does not refill any budget.
//! Only rank-raising vectors are kept, at most the batch size per batch.
//!
//! Written here because it is a few dozen lines of modular elimination, and the big-number
//! libraries in use (curv over GMP) give primes but no modular matrix rank.

use crate::protocol::BatchId;
use curv::arithmetic::{BigInt, Converter, Primes, Samplable};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A prime modulus of rank counting (62 bits, drawn at random: see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prime(u64);

impl Prime {
    /// A fresh random prime of 62 bits, from the operating system's randomness.
    pub fn random() -> Self {
        Prime(random_prime())
    }
}

/// The issued column vectors of one batch, modulo a prime, in reduced row echelon form.
#[derive(Debug, Clone, Default)]
pub struct BatchRank {
    /// `(pivot column, row)`; every row is 1 at its pivot and 0 at the other rows' pivots.
    rows: Vec<(usize, Vec<u64>)>,
}

impl BatchRank {
    /// The rank of the vectors added so far.
    pub fn rank(&self) -> usize {
        self.rows.len()
    }

    /// Whether adding `v` would raise the rank (modulo `p`).
    pub fn raises<T: Copy + Into<i64>>(&self, p: Prime, v: &[T]) -> bool {
        self.reduce(p.0, v).iter().any(|&x| x != 0)
    }

    /// `v` modulo `p` minus its component in the span of the rows (zero iff in the span).
    fn reduce<T: Copy + Into<i64>>(&self, p: u64, v: &[T]) -> Vec<u64> {
        let mut v: Vec<u64> = v.iter().map(|&x| residue(p, x.into())).collect();
        for (pivot, row) in &self.rows {
            // Vectors of one batch share a length; a shorter one is padded with zeros.
            let f = v.get(*pivot).copied().unwrap_or(0);
            if f != 0 {
                sub_scaled(p, &mut v, row, f);
            }
        }
        v
    }

    /// Adds `v` (modulo `p`, the same for every call on this rank); true if it raised the
    /// rank.
    pub fn add<T: Copy + Into<i64>>(&mut self, p: Prime, v: &[T]) -> bool {
        let p = p.0;
        let mut v = self.reduce(p, v);
        let Some(pivot) = v.iter().position(|&x| x != 0) else {
            return false;
        };
        let inv = pow_mod(p, v[pivot], p - 2);
        for x in v.iter_mut() {
            *x = mul_mod(p, *x, inv);
        }
        for (_, row) in self.rows.iter_mut() {
            let f = row.get(pivot).copied().unwrap_or(0);
            if f != 0 {
                sub_scaled(p, row, &v, f);
            }
        }
        self.rows.push((pivot, v));
        true
    }
}

/// `x mod p` for a signed entry.
fn residue(p: u64, x: i64) -> u64 {
    let m = x.unsigned_abs() % p;
    if x < 0 && m != 0 {
        p - m
    } else {
        m
    }
}

fn mul_mod(p: u64, a: u64, b: u64) -> u64 {
    ((u128::from(a) * u128::from(b)) % u128::from(p)) as u64
}

fn pow_mod(p: u64, mut b: u64, mut e: u64) -> u64 {
    let mut r = 1u64;
    while e > 0 {
        if e & 1 == 1 {
            r = mul_mod(p, r, b);
        }
        b = mul_mod(p, b, b);
        e >>= 1;
    }
    r
}

/// `v -= f·row (mod p)`.
fn sub_scaled(p: u64, v: &mut [u64], row: &[u64], f: u64) {
    for (x, &r) in v.iter_mut().zip(row) {
        let t = mul_mod(p, f, r);
        *x = if *x >= t { *x - t } else { *x + p - t };
    }
}

/// The rank budget's books: one [`BatchRank`] per batch, each behind its own lock so that
/// requests for different batches do not wait for each other.
#[derive(Debug)]
pub struct RankLedger {
    prime: Prime,
    budget: usize,
    batches: Mutex<HashMap<BatchId, Arc<Mutex<BatchRank>>>>,
    /// Where the vectors that raised a rank are appended, so that a restart keeps the count.
    journal: Option<Mutex<Journal>>,
}

/// The open journal: its file (locked for this process), the length of its complete
/// records, and whether a failed write could not be undone (then nothing more is admitted).
#[derive(Debug)]
struct Journal {
    file: File,
    len: u64,
    broken: bool,
}

/// What [`RankLedger::admit`] decided.
#[derive(Debug)]
pub enum Admission {
    /// Within the budget: [`RankLedger::commit`] this once the keys are logged.
    Within(Admitted),
    /// Past the budget: the rank the request would reach, and the rank before it.
    Exceeds {
        /// The rank with the request.
        would_reach: usize,
        /// The rank before the request.
        before: usize,
    },
}

/// An admitted request: its batch, the batch's rank with it, and the vectors that raised it.
#[derive(Debug)]
pub struct Admitted {
    batch: BatchId,
    next: BatchRank,
    raised: Vec<Vec<i32>>,
}

impl Admitted {
    /// The batch's rank once the request is issued.
    pub fn rank(&self) -> usize {
        self.next.rank()
    }
}

/// Errors of the rank journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Reading or writing it failed.
    #[error("rank journal {}: {source}", .path.display())]
    Io {
        /// The journal.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A complete record does not match its checksum, or is malformed.
    #[error(
        "rank journal {} is corrupted at byte {offset}: {reason} (it holds the rank every batch \
         has spent; restore it, or move it away to start every count at zero)",
        .path.display()
    )]
    Corrupt {
        /// The journal.
        path: PathBuf,
        /// Where the bad record starts.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
}

/// Largest record of the journal: a request of 65,536 vectors of 1,024 entries would not fit,
/// but the vectors that raise a rank are at most the batch size.
const MAX_RECORD: usize = 64 << 20;

impl RankLedger {
    /// An empty ledger with a budget of `budget` per batch and a fresh secret prime, kept in
    /// memory only.
    pub fn new(budget: usize) -> Self {
        Self::with_prime(budget, Prime::random())
    }

    /// An empty ledger with a given prime (for tests of the arithmetic).
    fn with_prime(budget: usize, prime: Prime) -> Self {
        RankLedger {
            prime,
            budget,
            batches: Mutex::new(HashMap::new()),
            journal: None,
        }
    }

    /// A ledger kept in the journal `path` (created with mode 0600 if missing): the ranks it
    /// records are counted again, under a fresh prime, and every commit is appended and
    /// synced before the keys go out. A record cut short by a crash is dropped (its keys
    /// were never sent); a complete record that does not match its checksum is an error.
    pub fn open(budget: usize, path: &Path) -> Result<Self, JournalError> {
        let io = |source| JournalError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut ledger = Self::new(budget);
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(e)),
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        // One process per journal: two authorities counting apart would each give the
        // whole budget.
        file.try_lock().map_err(|e| {
            io(std::io::Error::other(format!(
                "locked by another authority serving these keys ({e}); stop it first"
            )))
        })?;
        let valid = ledger.replay(&bytes, path)?;
        if valid < bytes.len() as u64 {
            file.set_len(valid).map_err(io)?;
        }
        ledger.journal = Some(Mutex::new(Journal {
            file,
            len: valid,
            broken: false,
        }));
        Ok(ledger)
    }

    /// Counts the records of `bytes` again; the length of the complete ones.
    fn replay(&mut self, bytes: &[u8], path: &Path) -> Result<u64, JournalError> {
        let mut at = 0usize;
        let batches = self.batches.get_mut().unwrap_or_else(|e| e.into_inner());
        while bytes.len() - at >= 4 {
            let len = u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
                as usize;
            let corrupt = |reason: &str| JournalError::Corrupt {
                path: path.to_path_buf(),
                offset: at as u64,
                reason: reason.into(),
            };
            if len > MAX_RECORD {
                return Err(corrupt("record length out of range"));
            }
            let Some(record) = bytes.get(at + 4..at + 4 + len + 32) else {
                break; // cut short by a crash before its keys were sent
            };
            let (body, sum) = record.split_at(len);
            if Sha256::digest(body).as_slice() != sum {
                return Err(corrupt("checksum mismatch"));
            }
            let (batch, vectors): (BatchId, Vec<Vec<i32>>) =
                bincode::deserialize(body).map_err(|e| corrupt(&e.to_string()))?;
            let rank = Arc::get_mut(batches.entry(batch).or_default())
                .map(|m| m.get_mut().unwrap_or_else(|e| e.into_inner()))
                .ok_or_else(|| corrupt("batch in use"))?;
            for v in &vectors {
                rank.add(self.prime, v);
            }
            at += 4 + len + 32;
        }
        Ok(at as u64)
    }

    /// The budget per batch.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// The lock of batch `batch`'s rank: hold it from [`RankLedger::admit`] to
    /// [`RankLedger::commit`] so that two requests for one batch cannot both pass on the
    /// same remaining budget.
    pub fn batch(&self, batch: BatchId) -> Arc<Mutex<BatchRank>> {
        let mut all = crate::net::lock(&self.batches);
        Arc::clone(all.entry(batch).or_default())
    }

    /// Whether issuing `vectors` for `batch` keeps its rank `current` within the budget.
    pub fn admit(&self, batch: BatchId, current: &BatchRank, vectors: &[Vec<i32>]) -> Admission {
        let mut next = current.clone();
        let mut raised = Vec::new();
        for v in vectors {
            if next.rank() >= v.len() || next.rank() > self.budget {
                break; // full rank, or already past the budget: the answer is known
            }
            if next.add(self.prime, v) {
                raised.push(v.clone());
            }
        }
        if next.rank() > self.budget {
            Admission::Exceeds {
                would_reach: next.rank(),
                before: current.rank(),
            }
        } else {
            Admission::Within(Admitted {
                batch,
                next,
                raised,
            })
        }
    }

    /// Records an admitted request: appended to the journal (and synced) first, then
    /// counted. On an error nothing is counted, and the keys must not be sent; a record
    /// written in part is cut off again, and if that fails too, the ledger admits nothing
    /// more (a torn record inside the journal would hide the records after it).
    pub fn commit(&self, current: &mut BatchRank, admitted: Admitted) -> std::io::Result<()> {
        if let (Some(journal), false) = (&self.journal, admitted.raised.is_empty()) {
            let body = bincode::serialize(&(admitted.batch, &admitted.raised))
                .map_err(std::io::Error::other)?;
            let mut record = (body.len() as u32).to_le_bytes().to_vec();
            record.extend_from_slice(&body);
            record.extend_from_slice(&Sha256::digest(&body));
            let mut j = crate::net::lock(journal);
            if j.broken {
                return Err(std::io::Error::other(
                    "an earlier write failed and could not be undone; restart the authority",
                ));
            }
            let written = j.file.write_all(&record).and_then(|()| j.file.sync_data());
            if let Err(e) = written {
                let len = j.len;
                j.broken = j
                    .file
                    .set_len(len)
                    .and_then(|()| j.file.sync_data())
                    .is_err();
                return Err(e);
            }
            j.len += record.len() as u64;
        }
        *current = admitted.next;
        Ok(())
    }
}

/// A random prime of 62 bits, from the operating system's randomness.
fn random_prime() -> u64 {
    let lo = BigInt::from(1u64 << 61);
    let hi = BigInt::from(1u64 << 62);
    loop {
        let p = BigInt::sample_range(&lo, &hi).next_prime();
        if p < hi {
            let bytes = p.to_bytes();
            let mut be = [0u8; 8];
            be[8 - bytes.len()..].copy_from_slice(&bytes);
            return u64::from_be_bytes(be);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The rank over the rationals by fraction-free elimination on i128 (small cases only).
    fn rational_rank(vs: &[Vec<i32>]) -> usize {
        let mut m: Vec<Vec<i128>> = vs
            .iter()
            .map(|v| v.iter().map(|&x| i128::from(x)).collect())
            .collect();
        let cols = m.first().map_or(0, Vec::len);
        let mut rank = 0;
        for c in 0..cols {
            let Some(r) = (rank..m.len()).find(|&r| m[r][c] != 0) else {
                continue;
            };
            m.swap(rank, r);
            for r in rank + 1..m.len() {
                let (a, b) = (m[rank][c], m[r][c]);
                let pivot_row = m[rank].clone();
                for (x, y) in m[r].iter_mut().zip(&pivot_row) {
                    *x = *x * a - *y * b;
                }
                let g = m[r].iter().fold(0i128, |g, &x| gcd(g, x.abs()));
                if g > 1 {
                    m[r].iter_mut().for_each(|x| *x /= g);
                }
            }
            rank += 1;
        }
        rank
    }

    fn gcd(a: i128, b: i128) -> i128 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }

    fn id(batch: u32) -> BatchId {
        BatchId {
            dataset: [0; 16],
            batch,
        }
    }

    fn rank_of(ledger: &RankLedger, vs: &[Vec<i32>]) -> usize {
        match ledger.admit(id(0), &BatchRank::default(), vs) {
            Admission::Within(r) => r.rank(),
            Admission::Exceeds { would_reach, .. } => would_reach,
        }
    }

    proptest! {
        /// The ledger's rank equals the rank over the rationals for small random vectors,
        /// including dependent ones (sums and multiples of others).
        #[test]
        fn rank_modulo_the_prime_is_the_rational_rank(
            base in prop::collection::vec(prop::collection::vec(-3i32..=3, 6), 1..8),
            combos in prop::collection::vec((0usize..8, 0usize..8, -2i32..=2), 0..4),
        ) {
            let mut vs = base.clone();
            for (i, j, f) in combos {
                let (a, b) = (&base[i % base.len()], &base[j % base.len()]);
                vs.push(a.iter().zip(b).map(|(x, y)| x + f * y).collect());
            }
            let ledger = RankLedger::new(64);
            prop_assert_eq!(rank_of(&ledger, &vs), rational_rank(&vs));
        }
    }

    /// A request that would pass the budget is refused whole, and the batch's rank stays;
    /// a vector in the span already issued costs nothing, and batches are counted apart.
    #[test]
    fn the_budget_refuses_past_its_rank_and_counts_batches_apart() {
        let ledger = RankLedger::new(3);
        let unit = |i: usize| {
            let mut v = vec![0i32; 5];
            v[i] = 1;
            v
        };
        let b0 = ledger.batch(id(0));
        let mut r0 = crate::net::lock(&b0);
        let Admission::Within(next) = ledger.admit(id(0), &r0, &[unit(0), unit(1)]) else {
            panic!("two vectors are within a budget of 3");
        };
        ledger.commit(&mut r0, next).expect("in memory");
        assert_eq!(r0.rank(), 2);
        let sum: Vec<i32> = vec![5, -7, 0, 0, 0];
        let Admission::Within(next) = ledger.admit(id(0), &r0, &[sum.clone(), sum]) else {
            panic!("vectors in the span cost nothing");
        };
        assert_eq!(next.rank(), 2);
        match ledger.admit(id(0), &r0, &[unit(2), unit(3)]) {
            Admission::Exceeds {
                would_reach,
                before,
            } => assert_eq!((would_reach, before), (4, 2)),
            Admission::Within(_) => panic!("rank 4 passes a budget of 3"),
        }
        assert_eq!(r0.rank(), 2, "a refused request leaves the rank");
        drop(r0);
        let b1 = ledger.batch(id(1));
        let r1 = crate::net::lock(&b1);
        assert!(matches!(
            ledger.admit(id(1), &r1, &[unit(2), unit(3), unit(4)]),
            Admission::Within(_)
        ));
    }

    /// Vectors dependent modulo a known small prime but independent over the rationals are
    /// counted low under that prime: why the real prime is secret and large.
    #[test]
    fn a_known_small_prime_undercounts_and_the_secret_prime_does_not() {
        let vs = vec![vec![1, 0], vec![0, 7]];
        assert_eq!(rank_of(&RankLedger::with_prime(64, Prime(7)), &vs), 1);
        assert_eq!(rank_of(&RankLedger::new(64), &vs), 2);
        let p = random_prime();
        assert!(p > 1 << 61 && p < 1 << 62);
        assert!(BigInt::from(p).is_probable_prime(30));
    }
}
