//! A reader for llama.cpp's GGUF container (versions 2 and 3): header, typed metadata and the tensor
//! directory. Tensor bytes are read lazily from the file by offset; dequantisation lives elsewhere.
//!
//! Layout (little-endian): magic `GGUF`, `u32` version, `u64` tensor count, `u64` metadata count,
//! the metadata key/values, the tensor infos (name, dims, ggml type, offset), then padding to
//! `general.alignment` (default 32) and the tensor data.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

const MAGIC: u32 = 0x4655_4747; // "GGUF" read as little-endian u32
const DEFAULT_ALIGNMENT: u64 = 32;
/// Upper bounds that stop a corrupt header from asking for absurd allocations. Every count is also
/// bounded by the bytes left in the file (each item takes at least its smallest encoding), so a
/// short file can never ask for more memory than a small multiple of its size.
const MAX_STRING_LEN: u64 = 64 << 20;
const MAX_ARRAY_LEN: u64 = 1 << 28;
const MAX_DIMS: u32 = 8;
/// Arrays of arrays nest at most this deep (llama.cpp writes none).
const MAX_ARRAY_DEPTH: usize = 4;
/// Metadata values (array items included) in one file: Model 3's tokenizer holds about 400k.
const MAX_METADATA_VALUES: u64 = 1 << 24;
/// Vector capacity reserved up front at most; beyond it vectors grow as items are actually read.
const MAX_RESERVE: u64 = 1 << 16;
/// The smallest tensor info: name length (8), dimension count (4), type (4), offset (8).
const MIN_TENSOR_INFO: u64 = 24;
/// The smallest metadata entry: key length (8), value type (4), a one-byte value.
const MIN_METADATA_ENTRY: u64 = 13;

/// Errors while reading a GGUF file. Each names what was being read.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file (magic {magic:#010x})")]
    BadMagic { path: PathBuf, magic: u32 },
    #[error("{path}: unsupported GGUF version {version} (supported: 2, 3)")]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("{path}: file truncated while reading {what}")]
    Truncated { path: PathBuf, what: String },
    #[error("{path}: metadata key `{key}` has unknown value type {value_type}")]
    UnknownValueType {
        path: PathBuf,
        key: String,
        value_type: u32,
    },
    #[error("{path}: {what} is too large ({len}); the file is corrupt")]
    TooLarge {
        path: PathBuf,
        what: String,
        len: u64,
    },
    #[error("{path}: {what} is not valid UTF-8")]
    BadUtf8 { path: PathBuf, what: String },
    #[error("{path}: tensor `{name}` has unknown ggml type {ggml_type}")]
    UnknownTensorType {
        path: PathBuf,
        name: String,
        ggml_type: u32,
    },
    #[error("{path}: tensor `{name}` lies outside the file (needs bytes {start}..{end}, file has {file_len})")]
    TensorOutOfBounds {
        path: PathBuf,
        name: String,
        start: u64,
        end: u64,
        file_len: u64,
    },
    #[error("{path}: metadata key `{key}` is missing")]
    MissingKey { path: PathBuf, key: String },
    #[error("{path}: metadata key `{key}` is {found}, expected {expected}")]
    WrongType {
        path: PathBuf,
        key: String,
        expected: &'static str,
        found: &'static str,
    },
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F32(_) => "f32",
            Value::F64(_) => "f64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
        }
    }

    /// Any integer that fits in a u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// ggml tensor element types (the numbering is llama.cpp's `ggml_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    I8,
    I16,
    I32,
    I64,
    F64,
    BF16,
    /// A type this reader knows by number only (IQ formats and the like).
    Other(u32),
}

impl GgmlType {
    pub fn from_u32(v: u32) -> Self {
        match v {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            9 => Self::Q8_1,
            10 => Self::Q2K,
            11 => Self::Q3K,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            15 => Self::Q8K,
            24 => Self::I8,
            25 => Self::I16,
            26 => Self::I32,
            27 => Self::I64,
            28 => Self::F64,
            30 => Self::BF16,
            other => Self::Other(other),
        }
    }

    /// (elements per block, bytes per block), or `None` for a type whose size is unknown here.
    pub fn block_layout(self) -> Option<(u64, u64)> {
        Some(match self {
            Self::F32 | Self::I32 => (1, 4),
            Self::F16 | Self::BF16 | Self::I16 => (1, 2),
            Self::I8 => (1, 1),
            Self::I64 | Self::F64 => (1, 8),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q8_1 => (32, 36),
            Self::Q2K => (256, 84),
            Self::Q3K => (256, 110),
            Self::Q4K => (256, 144),
            Self::Q5K => (256, 176),
            Self::Q6K => (256, 210),
            Self::Q8K => (256, 292),
            Self::Other(_) => return None,
        })
    }
}

/// One entry of the tensor directory.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in PyTorch order (GGUF stores them innermost first; they are reversed here).
    pub shape: Vec<usize>,
    pub ggml_type: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Size of the data in bytes.
    pub size: u64,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A parsed GGUF file: metadata and tensor directory. Tensor bytes stay on disk until asked for.
#[derive(Debug, Clone)]
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    pub data_offset: u64,
}

impl GgufFile {
    /// Reads the header, metadata and tensor directory, and checks every tensor lies inside the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| GgufError::Io {
            path: path.clone(),
            source,
        };
        let (file, file_len) = crate::regular_file::open(&path, None).map_err(io)?;
        let mut r = Reader {
            inner: BufReader::new(file),
            path: path.clone(),
            pos: 0,
            len: file_len,
            values: 0,
        };

        let magic = r.u32("magic")?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic { path, magic });
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion { path, version });
        }
        let tensor_count = r.u64("tensor count")?;
        let kv_count = r.u64("metadata count")?;
        r.check_count(kv_count, MIN_METADATA_ENTRY, "metadata count")?;
        // The tensor infos follow the metadata: at most what is left after the smallest metadata.
        let after_kv = r.remaining().saturating_sub(kv_count * MIN_METADATA_ENTRY);
        if tensor_count > MAX_ARRAY_LEN {
            return Err(r.too_large("tensor count", tensor_count));
        }
        if tensor_count > after_kv / MIN_TENSOR_INFO {
            return Err(r.truncated("tensor count"));
        }

        let mut metadata = BTreeMap::new();
        for i in 0..kv_count {
            let key = r.string(&format!("metadata key #{i}"))?;
            let value_type = r.u32(&format!("type of `{key}`"))?;
            let value = r.value(&key, value_type, 0)?;
            metadata.insert(key, value);
        }

        let mut raw = Vec::with_capacity(tensor_count.min(MAX_RESERVE) as usize);
        for i in 0..tensor_count {
            let name = r.string(&format!("tensor name #{i}"))?;
            let n_dims = r.u32(&format!("dims of `{name}`"))?;
            if n_dims > MAX_DIMS {
                return Err(GgufError::TooLarge {
                    path,
                    what: format!("dimension count of `{name}`"),
                    len: n_dims.into(),
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64(&format!("dims of `{name}`"))?);
            }
            let ggml_type = r.u32(&format!("type of `{name}`"))?;
            let offset = r.u64(&format!("offset of `{name}`"))?;
            raw.push((name, dims, ggml_type, offset));
        }

        let alignment = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .filter(|a| *a > 0)
            .unwrap_or(DEFAULT_ALIGNMENT);
        let header_end = r.pos;
        let data_offset = header_end
            .div_ceil(alignment)
            .checked_mul(alignment)
            .ok_or_else(|| r.too_large("general.alignment", alignment))?;

        let mut tensors = Vec::with_capacity(raw.len());
        for (name, dims, ggml_type, rel_offset) in raw {
            let ty = GgmlType::from_u32(ggml_type);
            let Some((block, block_bytes)) = ty.block_layout() else {
                return Err(GgufError::UnknownTensorType {
                    path,
                    name,
                    ggml_type,
                });
            };
            let out_of_bounds = |start: u64, end: u64| GgufError::TensorOutOfBounds {
                path: path.clone(),
                name: name.clone(),
                start,
                end,
                file_len,
            };
            // Every product and sum is checked: an overflow means the tensor cannot fit the file.
            let size = dims
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d))
                .and_then(|numel| numel.div_ceil(block).checked_mul(block_bytes))
                .ok_or_else(|| out_of_bounds(data_offset, u64::MAX))?;
            let start = data_offset
                .checked_add(rel_offset)
                .ok_or_else(|| out_of_bounds(u64::MAX, u64::MAX))?;
            let end = start
                .checked_add(size)
                .ok_or_else(|| out_of_bounds(start, u64::MAX))?;
            if end > file_len || usize::try_from(size).is_err() {
                return Err(out_of_bounds(start, end));
            }
            let shape = dims
                .iter()
                .rev()
                .map(|&d| usize::try_from(d).map_err(|_| out_of_bounds(start, end)))
                .collect::<Result<_, _>>()?;
            tensors.push(TensorInfo {
                name,
                shape,
                ggml_type: ty,
                offset: start,
                size,
            });
        }

        Ok(Self {
            path,
            version,
            metadata,
            tensors,
            data_offset,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&Value, GgufError> {
        self.metadata.get(key).ok_or_else(|| GgufError::MissingKey {
            path: self.path.clone(),
            key: key.to_string(),
        })
    }

    fn wrong_type(&self, key: &str, expected: &'static str, v: &Value) -> GgufError {
        GgufError::WrongType {
            path: self.path.clone(),
            key: key.to_string(),
            expected,
            found: v.type_name(),
        }
    }

    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.require(key)?;
        v.as_u64()
            .ok_or_else(|| self.wrong_type(key, "an integer", v))
    }

    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        let v = self.require(key)?;
        v.as_f64()
            .ok_or_else(|| self.wrong_type(key, "a number", v))
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.require(key)?;
        v.as_str()
            .ok_or_else(|| self.wrong_type(key, "a string", v))
    }

    pub fn get_array(&self, key: &str) -> Result<&[Value], GgufError> {
        let v = self.require(key)?;
        v.as_array()
            .ok_or_else(|| self.wrong_type(key, "an array", v))
    }

    /// `general.architecture`, e.g. `llama`.
    pub fn architecture(&self) -> Result<&str, GgufError> {
        self.get_str("general.architecture")
    }

    /// A key under the architecture's namespace, e.g. `arch_key("block_count")` → `llama.block_count`.
    pub fn arch_key(&self, suffix: &str) -> Result<String, GgufError> {
        Ok(format!("{}.{suffix}", self.architecture()?))
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Reads the raw (still quantised) bytes of one tensor.
    pub fn read_tensor_bytes(&self, info: &TensorInfo) -> Result<Vec<u8>, GgufError> {
        let io = |source| GgufError::Io {
            path: self.path.clone(),
            source,
        };
        let (mut file, _) = crate::regular_file::open(&self.path, None).map_err(io)?;
        file.seek(SeekFrom::Start(info.offset)).map_err(io)?;
        let mut buf = vec![0u8; info.size as usize];
        file.read_exact(&mut buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => GgufError::Truncated {
                path: self.path.clone(),
                what: format!("tensor `{}`", info.name),
            },
            _ => io(e),
        })?;
        Ok(buf)
    }
}

struct Reader {
    inner: BufReader<File>,
    path: PathBuf,
    /// Bytes read so far.
    pos: u64,
    /// The file's length.
    len: u64,
    /// Metadata values read so far (bounded by [`MAX_METADATA_VALUES`]).
    values: u64,
}

impl Reader {
    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let mut buf = [0u8; N];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| self.err(e, what))?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn err(&self, e: std::io::Error, what: &str) -> GgufError {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            GgufError::Truncated {
                path: self.path.clone(),
                what: what.to_string(),
            }
        } else {
            GgufError::Io {
                path: self.path.clone(),
                source: e,
            }
        }
    }

    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn too_large(&self, what: &str, len: u64) -> GgufError {
        GgufError::TooLarge {
            path: self.path.clone(),
            what: what.to_string(),
            len,
        }
    }

    /// `count` items of at least `min_size` bytes each must fit in what is left of the file.
    /// Beyond the hard cap the file is corrupt; beyond the bytes left it is cut short.
    fn check_count(&self, count: u64, min_size: u64, what: &str) -> Result<(), GgufError> {
        if count > MAX_ARRAY_LEN {
            return Err(self.too_large(what, count));
        }
        if count > self.remaining() / min_size {
            return Err(self.truncated(what));
        }
        Ok(())
    }

    fn truncated(&self, what: &str) -> GgufError {
        GgufError::Truncated {
            path: self.path.clone(),
            what: what.to_string(),
        }
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        if len > MAX_STRING_LEN {
            return Err(self.too_large(what, len));
        }
        if len > self.remaining() {
            return Err(self.truncated(what));
        }
        let mut buf = vec![0u8; len as usize];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| self.err(e, what))?;
        self.pos += len;
        String::from_utf8(buf).map_err(|_| GgufError::BadUtf8 {
            path: self.path.clone(),
            what: what.to_string(),
        })
    }

    /// The smallest encoding of a value of `value_type` (0 for an unknown type: refused later).
    fn min_size(value_type: u32) -> u64 {
        match value_type {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 | 10..=12 => 8,
            9 => 12,
            _ => 1,
        }
    }

    /// One value; arrays nest at most [`MAX_ARRAY_DEPTH`] deep (`depth` is this value's).
    fn value(&mut self, key: &str, value_type: u32, depth: usize) -> Result<Value, GgufError> {
        let what = format!("value of `{key}`");
        self.values += 1;
        if self.values > MAX_METADATA_VALUES {
            return Err(self.too_large("number of metadata values", self.values));
        }
        Ok(match value_type {
            0 => Value::U8(u8::from_le_bytes(self.bytes(&what)?)),
            1 => Value::I8(i8::from_le_bytes(self.bytes(&what)?)),
            2 => Value::U16(u16::from_le_bytes(self.bytes(&what)?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes(&what)?)),
            4 => Value::U32(u32::from_le_bytes(self.bytes(&what)?)),
            5 => Value::I32(i32::from_le_bytes(self.bytes(&what)?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes(&what)?)),
            7 => Value::Bool(self.bytes::<1>(&what)?[0] != 0),
            8 => Value::String(self.string(&what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(
                        self.too_large(&format!("array nesting of `{key}`"), depth as u64 + 1)
                    );
                }
                let item_type = self.u32(&what)?;
                let len = self.u64(&what)?;
                self.check_count(len, Self::min_size(item_type), &what)?;
                let mut items = Vec::with_capacity(len.min(MAX_RESERVE) as usize);
                for _ in 0..len {
                    items.push(self.value(key, item_type, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(u64::from_le_bytes(self.bytes(&what)?)),
            11 => Value::I64(i64::from_le_bytes(self.bytes(&what)?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes(&what)?)),
            other => {
                return Err(GgufError::UnknownValueType {
                    path: self.path.clone(),
                    key: key.to_string(),
                    value_type: other,
                })
            }
        })
    }
}
