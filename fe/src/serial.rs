//! Compact, versioned, validated binary encodings of keys, ciphertexts and parameters.
//!
//! Every object is written as an *envelope*:
//!
//! ```text
//! magic "FE" | version u8 | curve-name length u8 | curve name | kind u8 | payload
//! ```
//!
//! Integers are little-endian, vectors carry a `u32` length, points are their canonical
//! compressed encodings (32 bytes on Ristretto255, 33 on secp256k1) and scalars 32 bytes.
//! Decoding checks the magic, version, curve, kind, every length against the bytes that are
//! left, every point encoding (a point of another curve or a non-canonical encoding is
//! rejected) and that no bytes trail. It never panics and never allocates more than the input
//! could hold. The types also implement `serde` through these bytes, so they can travel inside
//! other serde messages.

use crate::backend::Backend;
use crate::error::{FeError, Result};
use crate::group::FeCurve;
use curv::elliptic::curves::{Point, Scalar};
use std::io::Write;
use std::path::Path;

/// Version of the envelope format.
pub const FORMAT_VERSION: u8 = 1;
const MAGIC: &[u8; 2] = b"FE";

/// An object with a versioned binary encoding for curve `E`.
pub trait Encode<E: FeCurve>: Sized {
    /// The tag that identifies the kind of object in the envelope.
    const KIND: u8;
    /// A human-readable name for error messages.
    const NAME: &'static str;
    /// Writes the payload (everything after the header).
    fn encode_payload(&self, out: &mut Vec<u8>);
    /// Reads the payload; must consume exactly what `encode_payload` wrote.
    fn decode_payload(r: &mut Reader<'_>) -> Result<Self>;

    /// The full envelope.
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_header::<E>(&mut out, Self::KIND);
        self.encode_payload(&mut out);
        out
    }

    /// Parses and validates an envelope.
    fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes);
        let bad = |m: String| FeError::Malformed(format!("{}: {m}", Self::NAME));
        if r.take(2).map_err(|_| bad("too short".into()))? != MAGIC {
            return Err(bad("bad magic".into()));
        }
        let v = r.u8()?;
        if v != FORMAT_VERSION {
            return Err(bad(format!(
                "format version {v}, expected {FORMAT_VERSION}"
            )));
        }
        let n = r.u8()? as usize;
        let name = r.take(n)?;
        if name != E::CURVE_NAME.as_bytes() {
            return Err(bad(format!(
                "made for curve {:?}, expected {}",
                String::from_utf8_lossy(name),
                E::CURVE_NAME
            )));
        }
        let kind = r.u8()?;
        if kind != Self::KIND {
            return Err(bad(format!("object kind {kind}, expected {}", Self::KIND)));
        }
        let t = Self::decode_payload(&mut r)?;
        if r.remaining() != 0 {
            return Err(bad(format!("{} trailing bytes", r.remaining())));
        }
        Ok(t)
    }
}

/// Appends the envelope header for an object of `kind`.
pub(crate) fn put_header<E: FeCurve>(out: &mut Vec<u8>, kind: u8) {
    out.extend_from_slice(MAGIC);
    out.push(FORMAT_VERSION);
    let name = E::CURVE_NAME.as_bytes();
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.push(kind);
}

/// A bounds-checked cursor over input bytes.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(FeError::Malformed(format!(
                "truncated input: needed {n} more bytes, {} left",
                self.remaining()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    /// A byte.
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    /// A little-endian `u32`.
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    /// A little-endian `u64`.
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// A little-endian `i64`.
    pub fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    /// A vector length, checked against the bytes left at `elem_size` bytes each.
    pub fn len(&mut self, elem_size: usize) -> Result<usize> {
        let n = self.u32()? as usize;
        if n.saturating_mul(elem_size) > self.remaining() {
            return Err(FeError::Malformed(format!(
                "length {n} does not fit in the {} bytes left",
                self.remaining()
            )));
        }
        Ok(n)
    }

    /// A point in canonical compressed encoding, validated.
    pub fn point<E: FeCurve>(&mut self) -> Result<Point<E>> {
        let b = self.take(E::POINT_LEN)?;
        Point::from_bytes(b).map_err(|_| FeError::InvalidEncoding("group element"))
    }

    /// A vector of points with its length, decoded together on the process's backend.
    pub fn points<E: FeCurve>(&mut self) -> Result<Vec<Point<E>>> {
        let n = self.len(E::POINT_LEN)?;
        decode_points_on(Backend::active(), self.take(n * E::POINT_LEN)?)
    }

    /// A canonical scalar.
    pub fn scalar<E: FeCurve>(&mut self) -> Result<Scalar<E>> {
        let b = self.take(32)?;
        Scalar::from_bytes(b).map_err(|_| FeError::InvalidEncoding("scalar"))
    }

    /// A vector of `i64` with its length.
    pub fn i64s(&mut self) -> Result<Vec<i64>> {
        let n = self.len(8)?;
        (0..n).map(|_| self.i64()).collect()
    }
}

/// Decodes concatenated canonical point encodings on `backend` ([`Reader::points`] uses the
/// process's): for tests and comparisons of the backends.
pub fn decode_points_on<E: FeCurve>(backend: Backend, bytes: &[u8]) -> Result<Vec<Point<E>>> {
    crate::backend::decode_points(backend, bytes)
        .map_err(|_| FeError::InvalidEncoding("group element"))
}

/// Appends a point's compressed encoding.
pub fn put_point<E: FeCurve>(out: &mut Vec<u8>, p: &Point<E>) {
    out.extend_from_slice(&p.to_bytes(true));
}

/// Appends a length-prefixed vector of points.
pub fn put_points<E: FeCurve>(out: &mut Vec<u8>, ps: &[Point<E>]) {
    out.extend_from_slice(&(ps.len() as u32).to_le_bytes());
    for p in ps {
        put_point(out, p);
    }
}

/// Appends a scalar's 32 bytes.
pub fn put_scalar<E: FeCurve>(out: &mut Vec<u8>, s: &Scalar<E>) {
    out.extend_from_slice(&s.to_bytes());
}

/// Appends a length-prefixed vector of `i64`.
pub fn put_i64s(out: &mut Vec<u8>, v: &[i64]) {
    out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

/// Writes `bytes` to `path` atomically (temporary file in the same folder, then rename).
/// With `secret`, the file is created with mode 0600 on Unix.
pub fn write_atomic(path: &Path, bytes: &[u8], secret: bool) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let write = || -> std::io::Result<()> {
        let mut f = opts.open(&tmp)?;
        #[cfg(unix)]
        if secret {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(d) = dir {
            if let Ok(d) = std::fs::File::open(d) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        FeError::io(path, e)
    })
}

/// Implements `serde` for a type through its [`Encode`] envelope.
macro_rules! serde_via_bytes {
    ($t:ident) => {
        impl<E: $crate::group::FeCurve> serde::Serialize for $t<E> {
            fn serialize<S: serde::Serializer>(
                &self,
                s: S,
            ) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_bytes(&$crate::serial::Encode::<E>::to_bytes(self))
            }
        }
        impl<'de, E: $crate::group::FeCurve> serde::Deserialize<'de> for $t<E> {
            fn deserialize<D: serde::Deserializer<'de>>(
                d: D,
            ) -> std::result::Result<Self, D::Error> {
                let b: $crate::serial::serde_bytes_buf::Buf = serde::Deserialize::deserialize(d)?;
                <Self as $crate::serial::Encode<E>>::from_bytes(&b.0)
                    .map_err(serde::de::Error::custom)
            }
        }
    };
}
pub(crate) use serde_via_bytes;

/// A byte buffer that deserializes from serde bytes or a sequence of u8.
pub(crate) mod serde_bytes_buf {
    /// Owned bytes.
    pub struct Buf(pub Vec<u8>);
    impl<'de> serde::Deserialize<'de> for Buf {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Buf;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("bytes")
                }
                fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Buf, E> {
                    Ok(Buf(v.to_vec()))
                }
                fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Buf, E> {
                    Ok(Buf(v))
                }
                fn visit_seq<A: serde::de::SeqAccess<'de>>(
                    self,
                    mut s: A,
                ) -> Result<Buf, A::Error> {
                    let mut out = Vec::new();
                    while let Some(b) = s.next_element::<u8>()? {
                        out.push(b);
                    }
                    Ok(Buf(out))
                }
            }
            d.deserialize_byte_buf(V)
        }
    }
}
