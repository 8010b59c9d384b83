"""The CPU kernels of ``sparse_kernels.c`` and ``kquant_kernels.c``: compiled on first use with the system's C
compiler, loaded with ctypes.

The library is built once per source, compiler, flags and CPU (``-O3 -march=native -fopenmp``) into
``$RESMOE_CACHE`` (default ``~/.cache/resmoe``), written under a temporary name and renamed, so
that concurrent processes never load a half-written file. Without a compiler, or with
``RESMOE_NATIVE=0``, :func:`library` returns None and the runtime uses torch's own sparse
products (float32 CSR) instead: same results within float32 rounding, more memory, slower.

:class:`SparseRows` holds a sparse matrix in the encoding the kernels read (a bitmap of 16-column
words or CSR with uint16 columns, whichever is smaller; values float32 or bfloat16) and multiplies
by it; :func:`pack_rows` builds one from a dense matrix. :func:`kq_matmul` and :func:`kq_rmatmul` multiply by a
k-quant matrix from its packed codes and scales (spec 5.10), decoding each weight on the fly.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SOURCES = tuple(Path(__file__).with_name(f) for f in ("sparse_kernels.c", "kquant_kernels.c"))
FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11")


def _flags() -> tuple[str, ...]:
    """The compiler's flags: FLAGS and ``-march=$RESMOE_NATIVE_MARCH`` (default ``native``: the AVX-512 paths where
    this CPU has them; ``x86-64`` builds the portable loops, which the tests check against them)."""
    return FLAGS + (f"-march={os.environ.get('RESMOE_NATIVE_MARCH', 'native')}",)
_lock = threading.Lock()
_state: dict[str, object] = {}
_loaded: list[ctypes.CDLL] = []


def _cache_dir() -> Path:
    return Path(os.environ.get("RESMOE_CACHE") or Path.home() / ".cache" / "resmoe")


def _cpu_signature() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return sys.platform
    return next((ln for ln in lines if ln.startswith(("flags", "Features"))), sys.platform)


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build(force: bool = False) -> Path | None:
    """Compile the kernels (once; ``force``: again) and return the library's path, or None without a compiler
    or when compiling fails (the reason is kept in :func:`unavailable_reason`)."""
    cc = _compiler()
    if cc is None:
        _state["reason"] = "no C compiler (cc, gcc or $CC) on PATH"
        return None
    src = b"".join(f.read_bytes() for f in SOURCES)
    key = hashlib.sha256(src + " ".join((cc, *_flags(), _cpu_signature())).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"resmoe_kernels-{key}.so"
    if lib.exists() and not force:
        return lib
    try:
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            out = Path(tmp) / lib.name
            proc = subprocess.run([cc, *_flags(), *map(str, SOURCES), "-o", str(out)], capture_output=True, text=True)
            if proc.returncode:
                _state["reason"] = f"{cc} failed: {proc.stderr.strip()[-500:]}"
                return None
            os.replace(out, lib)
    except OSError as e:
        _state["reason"] = f"cannot build the kernels in {lib.parent}: {e}"
        return None
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (RESMOE_NATIVE=0, no compiler, a failed build)."""
    if os.environ.get("RESMOE_NATIVE", "1") == "0":
        _state.setdefault("reason", "disabled by RESMOE_NATIVE=0")
        return None
    with _lock:
        if "lib" not in _state:
            path = build()
            lib = None
            if path is not None:
                try:
                    lib = ctypes.CDLL(str(path))
                except OSError as e:
                    _state["reason"] = f"cannot load {path}: {e}"
            if lib is not None:
                i64, ptr = ctypes.c_int64, ctypes.c_void_p
                lib.resmoe_bitmap_matmul.argtypes = [i64, i64, ptr, ptr, ptr, ctypes.c_int, i64, ptr, i64, ptr, i64,
                                                     ctypes.c_int]
                lib.resmoe_csr_matmul.argtypes = [i64, ptr, ptr, ptr, ctypes.c_int, i64, ptr, i64, ptr, i64,
                                                  ctypes.c_int]
                lib.resmoe_bitmap_matmul_bf16.argtypes = [i64, i64, ptr, ptr, ptr, i64, ptr, i64, ptr, i64,
                                                          ctypes.c_int]
                lib.resmoe_bitmap_matmul.restype = lib.resmoe_csr_matmul.restype = None
                lib.resmoe_bitmap_matmul_bf16.restype = None
                lib.resmoe_bitmap_rmatmul.argtypes = lib.resmoe_bitmap_matmul.argtypes
                lib.resmoe_bitmap_rmatmul.restype = None
                lib.resmoe_bitmap_rmatmul_bf16.argtypes = lib.resmoe_bitmap_matmul_bf16.argtypes
                lib.resmoe_bitmap_rmatmul_bf16.restype = ctypes.c_int
                lib.resmoe_dense_bf16_matmul.argtypes = [i64, i64, ptr, i64, i64, ptr, i64, ptr, i64, ctypes.c_int]
                lib.resmoe_dense_bf16_matmul.restype = ctypes.c_int
                lib.resmoe_bitmap_densify.argtypes = [i64, i64, ptr, ptr, ptr, ctypes.c_int, ptr, i64, ctypes.c_int]
                lib.resmoe_bitmap_densify.restype = None
                kq = [i64, i64, ptr, ctypes.c_int, ptr, ptr, ctypes.c_int, ctypes.c_int, i64, ptr, i64, ptr, i64,
                      ctypes.c_int]
                lib.resmoe_kq_matmul.argtypes = lib.resmoe_kq_rmatmul.argtypes = kq
                lib.resmoe_kq_matmul.restype = lib.resmoe_kq_rmatmul.restype = None
                lib.resmoe_kq_avx512.restype = lib.resmoe_kq_dpbf16.restype = ctypes.c_int
                lib.resmoe_kq_matmul_bf16.argtypes = lib.resmoe_kq_matmul.argtypes
                lib.resmoe_kq_matmul_bf16.restype = ctypes.c_int
                lib.resmoe_kq_rmatmul_bf16.argtypes = lib.resmoe_kq_matmul_bf16.argtypes
                lib.resmoe_kq_rmatmul_bf16.restype = ctypes.c_int
                lib.resmoe_kq_dequantize.argtypes = [i64, ptr, ctypes.c_int, ptr, ptr, ctypes.c_int, ptr, ctypes.c_int]
                lib.resmoe_kq_dequantize.restype = None
            _state["lib"] = lib
            if lib is not None:
                _loaded.append(lib)
        return _state["lib"]


def _kernels() -> ctypes.CDLL:
    """The library that built :class:`SparseRows` hold: loaded once, kept for the process (a later
    RESMOE_NATIVE=0 decides only what is built from then on)."""
    return _loaded[0] if _loaded else library()


def available() -> bool:
    """Whether the compiled kernels are in use."""
    return library() is not None


def unavailable_reason() -> str | None:
    """Why :func:`library` is None (None when it is not)."""
    return None if available() else str(_state.get("reason", "unknown"))


def uses_avx512() -> bool:
    """Whether the loaded kernels run their AVX-512 path."""
    lib = library()
    return bool(lib is not None and lib.resmoe_kernels_avx512())


def uses_dpbf16() -> bool:
    """Whether bf16 values meet bf16 activations in AVX512-BF16 dot products (vdpbf16ps)."""
    lib = _kernels()
    return bool(lib is not None and lib.resmoe_kernels_dpbf16()) and os.environ.get("RESMOE_DPBF16", "1") != "0"


#: up to this many tokens a bf16 matrix-vector product runs in :func:`dense_bf16_linear`, beyond it in torch (a
#: blocked GEMM reuses each weight across tokens)
DENSE_TOKENS = 8


def dense_bf16_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, w)`` for bf16 x (T, n) and a contiguous bf16 w (m, n): in one pass over w's bytes with
    vdpbf16ps (float32 sums, rounded to bf16 once) for T <= DENSE_TOKENS on the CPU, else torch's."""
    if (x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16 or x.shape[0] > DENSE_TOKENS or x.device.type != "cpu"
            or not uses_dpbf16() or not w.is_contiguous()):
        return torch.nn.functional.linear(x, w)
    x = x.contiguous()
    m, n = w.shape
    y = torch.empty(x.shape[0], m, dtype=torch.float32)
    _kernels().resmoe_dense_bf16_matmul(m, n, w.data_ptr(), n, x.shape[0], x.data_ptr(), n, y.data_ptr(), m,
                                        torch.get_num_threads())
    return y.to(torch.bfloat16)


#: the group size the k-quant kernels read (the reference writer's; spec 5.10)
KQ_GROUP = 64


def uses_kq_avx512() -> bool:
    """Whether the loaded k-quant kernels run their AVX-512 (VBMI) path."""
    lib = library()
    return bool(lib is not None and lib.resmoe_kq_avx512())


def uses_kq_dpbf16() -> bool:
    """Whether bf16 activations meet k-quant codes in AVX512-BF16 dot products (the weights exact)."""
    lib = _kernels()
    return lib is not None and bool(lib.resmoe_kq_dpbf16()) and os.environ.get("RESMOE_DPBF16", "1") != "0"


def kq_supported(shape: tuple[int, ...], group: int, device: torch.device) -> bool:
    """Whether :func:`kq_matmul` and :func:`kq_rmatmul` take a k-quant matrix of ``shape`` and ``group``: 2-D, rows
    of whole 64-value groups, on the CPU, with the kernels loaded."""
    return (len(shape) == 2 and group == KQ_GROUP and shape[1] % KQ_GROUP == 0 and torch.device(device).type == "cpu"
            and library() is not None)


def kq_dequantize(codes: torch.Tensor, bits: int, pairs: torch.Tensor, supers: torch.Tensor, sup: int,
                  n: int) -> torch.Tensor:
    """The ``n`` float32 values (a multiple of 64: whole groups) of a k-quant value part held as for :func:`kq_matmul`,
    decoded bit for bit as spec 5.10 says."""
    out = torch.empty(n, dtype=torch.float32)
    _kernels().resmoe_kq_dequantize(n // KQ_GROUP, codes.data_ptr(), bits, pairs.data_ptr(), supers.data_ptr(), sup,
                                    out.data_ptr(), torch.get_num_threads())
    return out


def _kq_product(name: str, codes: torch.Tensor, bits: int, pairs: torch.Tensor, supers: torch.Tensor, sup: int,
                round_bf16: bool, shape: tuple[int, int], x: torch.Tensor, out_width: int) -> torch.Tensor:
    """Kernel ``name`` (``resmoe_kq_matmul`` or ``resmoe_kq_rmatmul``) on x (T, k): its ``_bf16`` form for bf16 x with
    AVX512-BF16 (it declines 8-bit codes), else the float32 one."""
    lib, m, n, T = _kernels(), shape[0], shape[1], x.shape[0]
    y = torch.empty(T, out_width, dtype=torch.float32)
    if x.dtype == torch.bfloat16 and uses_kq_dpbf16():
        xb = x.contiguous()
        if getattr(lib, f"{name}_bf16")(m, n, codes.data_ptr(), bits, pairs.data_ptr(), supers.data_ptr(), sup,
                                         int(round_bf16), T, xb.data_ptr(), xb.shape[1], y.data_ptr(), out_width,
                                         torch.get_num_threads()):
            return y
    xf = x.to(torch.float32).contiguous()
    getattr(lib, name)(m, n, codes.data_ptr(), bits, pairs.data_ptr(), supers.data_ptr(), sup, int(round_bf16), T,
                       xf.data_ptr(), xf.shape[1], y.data_ptr(), out_width, torch.get_num_threads())
    return y


def kq_matmul(codes: torch.Tensor, bits: int, pairs: torch.Tensor, supers: torch.Tensor, sup: int, round_bf16: bool,
              shape: tuple[int, int], x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` in float32 for x (T, n) and a k-quant matrix W (m, n) held as its packed ``codes`` (``bits`` 2 ... 8,
    0 for ternary), unpacked (G, 2) uint8 scale codes ``pairs`` and (S, 2) float16 ``supers`` (``sup`` groups each);
    every weight decoded as spec 5.10 says (then rounded to bf16 with ``round_bf16``), float32 sums. Needs
    :func:`kq_supported`. For bf16 x with AVX512-BF16 (codes of up to 6 bits) vdpbf16ps multiplies x by the codes
    and each group's scale and offset follow in float32 (spec 6.7): the weights exact (with ``round_bf16``: by a
    table of the group's weights rounded to bf16)."""
    return _kq_product("resmoe_kq_matmul", codes, bits, pairs, supers, sup, round_bf16, shape, x, shape[0])


def kq_rmatmul(codes: torch.Tensor, bits: int, pairs: torch.Tensor, supers: torch.Tensor, sup: int, round_bf16: bool,
               shape: tuple[int, int], h: torch.Tensor) -> torch.Tensor:
    """``h @ W`` in float32 for h (T, m), W as for :func:`kq_matmul` (bf16 h: as there, the weights exact, and each
    h[r] times a group's scale rounded to bf16 once)."""
    return _kq_product("resmoe_kq_rmatmul", codes, bits, pairs, supers, sup, round_bf16, shape, h, shape[1])


#: the value dtypes the kernels read, by code
VKIND = {torch.float32: 0, torch.bfloat16: 1}


@dataclass
class SparseRows:
    """A sparse matrix (m, n) as the kernels read it: ``fmt`` "bitmap" (``index``: uint16 words, m·ceil(n/16))
    or "csr" (``index``: uint16 columns); ``offsets`` (m + 1,) int64: where each row's values start."""

    fmt: str
    shape: tuple[int, int]
    index: torch.Tensor
    offsets: torch.Tensor
    values: torch.Tensor

    @property
    def words(self) -> int:
        """16-column words a row (an even number: rows are padded to 32 columns)."""
        return 2 * -(-self.shape[1] // 32)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.index, self.offsets, self.values))

    def dense(self) -> torch.Tensor:
        """D (m, n) as a dense tensor of the values' dtype (a bitmap; for many tokens at once)."""
        m, n = self.shape
        out = torch.zeros(m, n, dtype=self.values.dtype)
        _kernels().resmoe_bitmap_densify(m, self.words // 2, self.index.data_ptr(), self.offsets.data_ptr(),
                                         self.values.data_ptr(), self.values.element_size(), out.data_ptr(), n,
                                         torch.get_num_threads())
        return out

    def _expanded(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, D dense) in x's precision (bf16, else float32): for many tokens, whose blocked GEMM on the expanded
        matrix is faster than reading the bitmap row by row once per 8 tokens."""
        dt = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
        return x.to(dt), self.dense().to(dt)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ D.T`` in float32 for x (T, n) of any float dtype."""
        lib = _kernels()
        m, n = self.shape
        T = x.shape[0]
        if T > DENSE_TOKENS and self.fmt == "bitmap":
            xd, d = self._expanded(x)
            return (xd @ d.T).float()
        threads = torch.get_num_threads()
        if self.fmt == "bitmap" and x.dtype == self.values.dtype == torch.bfloat16 and uses_dpbf16():
            width = 16 * self.words
            xb = torch.zeros(T, width, dtype=torch.bfloat16) if width != n else x.contiguous()
            if width != n:
                xb[:, :n] = x
            y = torch.empty(T, m, dtype=torch.float32)
            lib.resmoe_bitmap_matmul_bf16(m, self.words // 2, self.index.data_ptr(), self.offsets.data_ptr(),
                                          self.values.data_ptr(), T, xb.data_ptr(), width, y.data_ptr(), m, threads)
            return y
        width = 16 * self.words if self.fmt == "bitmap" else n
        xf = torch.zeros(T, width, dtype=torch.float32) if width != n else torch.empty(T, n, dtype=torch.float32)
        xf[:, :n] = x
        y = torch.empty(T, m, dtype=torch.float32)
        vk = VKIND[self.values.dtype]
        if self.fmt == "bitmap":
            lib.resmoe_bitmap_matmul(m, self.words, self.index.data_ptr(), self.offsets.data_ptr(),
                                     self.values.data_ptr(), vk, T, xf.data_ptr(), width, y.data_ptr(), m, threads)
        else:
            lib.resmoe_csr_matmul(m, self.index.data_ptr(), self.offsets.data_ptr(), self.values.data_ptr(), vk, T,
                                  xf.data_ptr(), width, y.data_ptr(), m, threads)
        return y

    def rmatmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ D`` in float32 for x (T, m) of any float dtype (bitmap only; bf16 values and bf16 x with AVX512-BF16:
        rows in pairs through vdpbf16ps, the same exact products)."""
        m, n = self.shape
        T, width = x.shape[0], 16 * self.words
        if T > DENSE_TOKENS:
            xd, d = self._expanded(x)
            return (xd @ d).float()
        if x.dtype == self.values.dtype == torch.bfloat16 and uses_dpbf16():
            xb, y = x.contiguous(), torch.empty(T, width, dtype=torch.float32)
            if _kernels().resmoe_bitmap_rmatmul_bf16(m, self.words // 2, self.index.data_ptr(),
                                                     self.offsets.data_ptr(), self.values.data_ptr(), T,
                                                     xb.data_ptr(), m, y.data_ptr(), width, torch.get_num_threads()):
                return y[:, :n]
        xf = x.to(torch.float32).contiguous()
        y = torch.zeros(T, width, dtype=torch.float32)
        _kernels().resmoe_bitmap_rmatmul(m, self.words // 2, self.index.data_ptr(), self.offsets.data_ptr(),
                                        self.values.data_ptr(), VKIND[self.values.dtype], T, xf.data_ptr(), m,
                                        y.data_ptr(), width, torch.get_num_threads())
        return y[:, :n]

    def to_dense(self) -> torch.Tensor:
        """D as a float32 tensor (for checks)."""
        m, n = self.shape
        out = torch.zeros(m, n, dtype=torch.float32)
        rows = torch.repeat_interleave(torch.arange(m), self.offsets.diff())
        if self.fmt == "bitmap":
            bits = np.unpackbits(self.index.numpy().view(np.uint8).reshape(m, -1), axis=1, bitorder="little")[:, :n]
            cols = torch.from_numpy(np.nonzero(bits)[1])
        else:
            cols = self.index.to(torch.int64)
        out[rows, cols] = self.values.float()
        return out


def pack_rows(d: np.ndarray, values: torch.dtype) -> SparseRows:
    """The non-zero entries of ``d`` (m, n) as :class:`SparseRows` with values cast to ``values`` (float32, or
    bfloat16 when every value is one: the cast must be exact), in the smaller of bitmap and csr."""
    m, n = d.shape
    nz = d != 0
    nnz = int(nz.sum())
    words = 2 * -(-n // 32)
    offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(nz.sum(axis=1))]).astype(np.int64))
    vals = torch.from_numpy(np.ascontiguousarray(d[nz], dtype=np.float32))
    if values == torch.bfloat16:
        b = vals.to(torch.bfloat16)
        if not torch.equal(b.float(), vals):
            raise ValueError("values are not all bfloat16 numbers")
        vals = b
    if n <= 65536 and 2 * nnz < 2 * m * words:
        index = torch.from_numpy(np.nonzero(nz)[1].astype(np.uint16))
        return SparseRows("csr", (m, n), index, offsets, vals)
    padded = np.zeros((m, 16 * words), dtype=bool)
    padded[:, :n] = nz
    index = torch.from_numpy(np.packbits(padded, axis=1, bitorder="little").view(np.uint16).copy())
    return SparseRows("bitmap", (m, n), index.reshape(-1), offsets, vals)


#: popcount of every byte value
_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1).astype(np.int64)


def bitmap_record_rows(mask: np.ndarray, values: np.ndarray, value_dtype: str, shape: tuple[int, int]
                       ) -> SparseRows | None:
    """A ``bitmap`` record's own bytes as :class:`SparseRows`, without copying them: ``mask`` (the record's LSB-first
    bits, row-major) and ``values`` (bf16 or float32, row-major order of their positions) as the file maps them.
    None when the kernels cannot read it in place (no kernels, rows not whole 32-bit words, other value dtypes).
    Raises ValueError when the mask's set bits do not match the number of values (a hostile file)."""
    m, n = shape
    if (library() is None or n % 32 or value_dtype not in ("bf16", "fp32") or mask.size != m * n // 8
            or values.dtype.itemsize != (2 if value_dtype == "bf16" else 4)):
        return None
    counts = _POPCOUNT[mask.reshape(m, n // 8)].sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    if int(offsets[-1]) != values.size:
        raise ValueError(f"bitmap: {int(offsets[-1])} bits set but {values.size} values stored")
    with warnings.catch_warnings():  # read-only mapped bytes: the kernels never write to them
        warnings.simplefilter("ignore", UserWarning)
        index = torch.from_numpy(mask.view(np.uint8)).view(torch.uint16)  # rows of whole 32-bit words
        vals = torch.from_numpy(values.view(np.uint16 if values.dtype.itemsize == 2 else np.float32))
    if values.dtype.itemsize == 2:
        vals = vals.view(torch.bfloat16)
    return SparseRows("bitmap", (m, n), index, torch.from_numpy(offsets.astype(np.int64)), vals)
