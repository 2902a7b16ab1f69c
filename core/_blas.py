"""SciPy's BLAS and LAPACK, callable from Numba kernels, and its OpenBLAS thread count.

The compiled kernels call the same Fortran routines SciPy itself calls (``scipy.linalg.
cython_blas`` / ``cython_lapack``, whatever BLAS SciPy was built with): their addresses are
registered as LLVM symbols under ``ariadne_<name>`` and declared as Numba external functions, so
the kernels that call them stay cacheable on disk (the call is resolved by name when the cached
code loads, as Numba's own ``np.dot`` does). Every argument is a pointer (Fortran convention):
pass ``array[i:].ctypes`` for a matrix starting at entry ``i``, and one-element arrays for the
integers (int32: SciPy's LP64 interface), characters (uint8) and scalars.

:func:`blas_threads` sets the thread count of SciPy's OpenBLAS (not the system OpenBLAS that
CHOLMOD uses, which ``core.threads`` sets) where SciPy ships one, and restores it.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager

from core._kernels import numba

ROUTINES = {"dpotrf": "lapack", "dtrsm": "blas", "dsyrk": "blas", "dgemm": "blas"}


def _address(module: object, name: str) -> int:
    """The C address held by the Cython capsule ``module.__pyx_capi__[name]``."""
    capsule = module.__pyx_capi__[name]  # type: ignore[attr-defined]
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype = ctypes.c_void_p
    get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    return int(get_pointer(capsule, get_name(capsule)))


if numba is not None:
    import llvmlite.binding as _ll
    import scipy.linalg.cython_blas as _cython_blas
    import scipy.linalg.cython_lapack as _cython_lapack
    from numba import types as _t

    for _name, _kind in ROUTINES.items():
        _ll.add_symbol(f"ariadne_{_name}",
                       _address(_cython_lapack if _kind == "lapack" else _cython_blas, _name))
    _P = _t.voidptr
    dpotrf = _t.ExternalFunction("ariadne_dpotrf", _t.void(*[_P] * 5))
    """``dpotrf(uplo, n, a, lda, info)``."""
    dtrsm = _t.ExternalFunction("ariadne_dtrsm", _t.void(*[_P] * 11))
    """``dtrsm(side, uplo, transa, diag, m, n, alpha, a, lda, b, ldb)``."""
    dsyrk = _t.ExternalFunction("ariadne_dsyrk", _t.void(*[_P] * 10))
    """``dsyrk(uplo, trans, n, k, alpha, a, lda, beta, c, ldc)``."""
    dgemm = _t.ExternalFunction("ariadne_dgemm", _t.void(*[_P] * 13))
    """``dgemm(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)``."""

_scipy_openblas: list[ctypes.CDLL | None] = []


def _library() -> ctypes.CDLL | None:
    """SciPy's bundled OpenBLAS (``scipy_openblas_set_num_threads``), or None."""
    if not _scipy_openblas:
        found = None
        try:
            import scipy.linalg  # noqa: F401  (loads it)

            with open("/proc/self/maps") as maps:
                paths = sorted({line.split()[-1] for line in maps if "scipy_openblas" in line})
        except OSError:  # pragma: no cover - not Linux
            paths = []
        for path in paths:
            lib = ctypes.CDLL(path)
            if hasattr(lib, "scipy_openblas_set_num_threads"):
                found = lib
                break
        _scipy_openblas.append(found)
    return _scipy_openblas[0]


@contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """SciPy's OpenBLAS on ``n`` threads inside the block (no-op without one)."""
    lib = _library()
    if lib is None:
        yield
        return
    before = int(lib.scipy_openblas_get_num_threads())
    if before == n:
        yield
        return
    lib.scipy_openblas_set_num_threads(n)
    try:
        yield
    finally:
        lib.scipy_openblas_set_num_threads(before)
