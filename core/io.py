"""Readers and writers for g2o pose graphs and BAL (bundle adjustment in the large) problems.

Pure parsing: depends only on numpy and torch. All real-valued tensors are float64 on the CPU,
all index tensors int64.

Storage conventions (see ``shared/data/README.md``):

- SE3 pose ``(7,)`` = (tx, ty, tz, qx, qy, qz, qw), the pose maps body to world.
- SE2 pose ``(4,)`` = (x, y, cos(theta), sin(theta)).
- Tangent vectors are ordered (translation, rotation).

Every parse error is a ``ValueError`` whose message starts with ``"{path}:{lineno}: "`` (1-based
line number), or with ``"{path}: "`` when no single line is to blame.
"""

from __future__ import annotations

import bz2
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

PathLike = str | os.PathLike[str]
Information = Literal["strict", "nearest", "diagonal"]

__all__ = [
    "BALProblem",
    "PoseGraph",
    "read_bal",
    "read_g2o",
    "write_bal",
    "write_g2o",
]

# tag -> (dimension, record kind, number of fields after the tag)
_G2O_RECORDS: dict[str, tuple[int, str, int]] = {
    "VERTEX_SE2": (2, "vertex", 1 + 3),
    "EDGE_SE2": (2, "edge", 2 + 3 + 6),
    "VERTEX_SE3:QUAT": (3, "vertex", 1 + 7),
    "EDGE_SE3:QUAT": (3, "edge", 2 + 7 + 21),
}
_G2O_IGNORED = frozenset({"FIX"})
_VERTEX_TAG = {2: "VERTEX_SE2", 3: "VERTEX_SE3:QUAT"}
_EDGE_TAG = {2: "EDGE_SE2", 3: "EDGE_SE3:QUAT"}
_POSE_SIZE = {2: 4, 3: 7}  # storage layout width
_FILE_POSE_SIZE = {2: 3, 3: 7}  # width as written in a g2o file (SE2 uses theta)
_TANGENT_DIM = {2: 3, 3: 6}
# g2o's SE3 error uses the quaternion vector part, half the rotation vector for small angles.
_SE3_INFO_SCALE = (1.0, 1.0, 1.0, 0.5, 0.5, 0.5)
_QUAT_MIN_NORM = 1e-6
# Quaternions already unit to working precision are kept bit-for-bit (exact write/read round trip).
_QUAT_UNIT_TOL = 1e-14
# Repaired information matrices get eigenvalues (or diagonal entries) of at least
# max(_INFO_FLOOR_REL * largest magnitude, _INFO_FLOOR_ABS): positive definite and well
# conditioned enough for a Cholesky factorization.
_INFO_FLOOR_REL = 1e-9
_INFO_FLOOR_ABS = 1e-12
_INFORMATION_CHOICES = ("strict", "nearest", "diagonal")
_FLOAT_FMT = "%.17g"


# --------------------------------------------------------------------------------------------
# Data classes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PoseGraph:
    """A pose graph as read from a g2o file.

    Attributes:
        dim: 2 (SE2) or 3 (SE3).
        poses: ``(N, 7)`` SE3 or ``(N, 4)`` SE2 initial estimates in storage layout, float64.
        ids: ``(N,)`` int64 original vertex ids, ascending; ``poses[k]`` has id ``ids[k]``.
        i: ``(E,)`` int64 row index (into ``poses``) of each edge's first pose.
        j: ``(E,)`` int64 row index of each edge's second pose.
        measurements: ``(E, 7)`` or ``(E, 4)`` relative poses Z ~ Ti^-1 Tj in storage layout.
        information: ``(E, 6, 6)`` or ``(E, 3, 3)`` symmetric information matrices exactly as
            written in the file (for SE3: g2o's (translation, quaternion vector) error).
    """

    dim: int
    poses: Tensor
    ids: Tensor
    i: Tensor
    j: Tensor
    measurements: Tensor
    information: Tensor

    def __post_init__(self) -> None:
        if self.dim not in (2, 3):
            raise ValueError(f"PoseGraph.dim must be 2 or 3, got {self.dim}")
        p, d = _POSE_SIZE[self.dim], _TANGENT_DIM[self.dim]
        n, e = self.poses.shape[0], self.i.shape[0]
        expected = {
            "poses": (n, p),
            "ids": (n,),
            "i": (e,),
            "j": (e,),
            "measurements": (e, p),
            "information": (e, d, d),
        }
        for name, shape in expected.items():
            actual = tuple(getattr(self, name).shape)
            if actual != shape:
                raise ValueError(f"PoseGraph.{name} has shape {actual}, expected {shape}")

    @property
    def num_poses(self) -> int:
        """Number of poses N."""
        return int(self.poses.shape[0])

    @property
    def num_edges(self) -> int:
        """Number of edges E."""
        return int(self.i.shape[0])

    @property
    def tangent_dim(self) -> int:
        """Tangent dimension D: 6 for SE3, 3 for SE2."""
        return _TANGENT_DIM[self.dim]

    def tangent_information(self) -> Tensor:
        """Information in tangent coordinates (translation, rotation vector), ``(E, D, D)``.

        SE3: ``S Omega S`` with ``S = diag(1, 1, 1, 1/2, 1/2, 1/2)``; SE2: ``Omega`` unchanged.
        """
        if self.dim == 2:
            return self.information
        s = self.information.new_tensor(_SE3_INFO_SCALE)
        return self.information * s[:, None] * s[None, :]

    def sqrt_information(self) -> Tensor:
        """Upper-triangular ``U`` with ``U^T U`` = tangent information, ``(E, D, D)``.

        The whitened residual of edge k is ``U[k] @ Log(Z_k^-1 T_i^-1 T_j)``.
        """
        return torch.linalg.cholesky(self.tangent_information(), upper=True)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
           ) -> PoseGraph:
        """Copy with real tensors moved/cast to ``device``/``dtype`` (index tensors keep int64)."""
        return _move(self, device, dtype, real=("poses", "measurements", "information"))


@dataclass(frozen=True, eq=False)
class BALProblem:
    """A bundle-adjustment problem in BAL format.

    Attributes:
        cameras: ``(C, 9)`` float64: angle-axis rotation (3), translation (3), f, k1, k2.
        points: ``(P, 3)`` float64 world points.
        camera_index: ``(O,)`` int64 camera of each observation.
        point_index: ``(O,)`` int64 point of each observation.
        observations: ``(O, 2)`` float64 measured image coordinates.
    """

    cameras: Tensor
    points: Tensor
    camera_index: Tensor
    point_index: Tensor
    observations: Tensor

    def __post_init__(self) -> None:
        c, p, o = self.cameras.shape[0], self.points.shape[0], self.observations.shape[0]
        expected = {
            "cameras": (c, 9),
            "points": (p, 3),
            "camera_index": (o,),
            "point_index": (o,),
            "observations": (o, 2),
        }
        for name, shape in expected.items():
            actual = tuple(getattr(self, name).shape)
            if actual != shape:
                raise ValueError(f"BALProblem.{name} has shape {actual}, expected {shape}")

    @property
    def num_cameras(self) -> int:
        """Number of cameras C."""
        return int(self.cameras.shape[0])

    @property
    def num_points(self) -> int:
        """Number of points P."""
        return int(self.points.shape[0])

    @property
    def num_observations(self) -> int:
        """Number of observations O."""
        return int(self.observations.shape[0])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
           ) -> BALProblem:
        """Copy with real tensors moved/cast to ``device``/``dtype`` (index tensors keep int64)."""
        return _move(self, device, dtype, real=("cameras", "points", "observations"))


def _move(obj: PoseGraph | BALProblem, device: torch.device | str | None,
          dtype: torch.dtype | None, real: tuple[str, ...]) -> PoseGraph | BALProblem:
    """Rebuild a data class with its tensor fields moved to ``device``, ``real`` ones cast."""
    kwargs: dict[str, object] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, Tensor):
            value = value.to(device=device, dtype=dtype if f.name in real else None)
        kwargs[f.name] = value
    return type(obj)(**kwargs)


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _error(path: PathLike, lineno: int | None, message: str) -> ValueError:
    """``ValueError`` with the ``"{path}:{lineno}: "`` (or ``"{path}: "``) prefix."""
    where = f"{os.fspath(path)}:{lineno}" if lineno is not None else os.fspath(path)
    return ValueError(f"{where}: {message}")


def _is_bz2(path: PathLike) -> bool:
    return Path(path).suffix.lower() == ".bz2"


def _read_text(path: PathLike) -> str:
    """Whole file as text; ``.bz2`` files are decompressed. Non-UTF-8 bytes, and a truncated or
    corrupt ``.bz2`` file, raise ValueError (a missing file stays ``FileNotFoundError``)."""
    data = Path(path).read_bytes()
    if _is_bz2(path):
        try:
            data = bz2.decompress(data)
        except (OSError, EOFError, ValueError) as exc:
            raise _error(path, None, f"not a valid bzip2 file (truncated or corrupt: {exc})"
                         ) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = data.count(b"\n", 0, exc.start) + 1
        raise _error(path, lineno, "file is not UTF-8 text") from exc


def _write_text(path: PathLike, text: str) -> None:
    """Write text (UTF-8, ``\\n`` line ends); ``.bz2`` paths are compressed."""
    data = text.encode("utf-8")
    if _is_bz2(path):
        with bz2.open(path, "wb") as f:
            f.write(data)
    else:
        Path(path).write_bytes(data)


def _convert_rows(rows: list[list[str]], lines: Sequence[int], ncols: int, dtype: type,
                  path: PathLike) -> np.ndarray:
    """Convert equal-length token rows to an ``(R, ncols)`` array in bulk.

    On failure, finds the first bad row and raises with its line number ``lines[row]``.
    """
    if not rows:
        return np.zeros((0, ncols), dtype=dtype)
    try:
        return np.array(rows, dtype=dtype).reshape(len(rows), ncols)
    except (ValueError, OverflowError):
        pass
    kind = "an integer" if dtype is np.int64 else "a number"
    for row, lineno in zip(rows, lines, strict=True):
        for token in row:
            try:
                np.array(token, dtype=dtype)
            except (ValueError, OverflowError):
                raise _error(path, lineno, f"{token!r} is not {kind}") from None
    raise AssertionError("unreachable: bulk conversion failed but no bad token found")


def _check_finite(values: np.ndarray, lines: Sequence[int], path: PathLike) -> None:
    """Raise at the first row of ``values (R, K)`` holding a NaN or infinity."""
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        k = int(np.argmax(bad))
        raise _error(path, lines[k], "non-finite value")


# --------------------------------------------------------------------------------------------
# g2o
# --------------------------------------------------------------------------------------------


@dataclass
class _G2ORecords:
    """Raw token rows of a g2o file, grouped by record kind (fields after the tag)."""

    dim: int | None = None
    vertex_rows: list[list[str]] = field(default_factory=list)
    vertex_lines: list[int] = field(default_factory=list)
    edge_rows: list[list[str]] = field(default_factory=list)
    edge_lines: list[int] = field(default_factory=list)


def _scan_g2o(text: str, path: PathLike) -> _G2ORecords:
    """Split a g2o file into vertex and edge token rows, validating tags and field counts."""
    rec = _G2ORecords()
    first_line = 0
    for lineno, raw in enumerate(text.split("\n"), start=1):
        tokens = raw.split("#", 1)[0].split()
        if not tokens or tokens[0] in _G2O_IGNORED:
            continue
        spec = _G2O_RECORDS.get(tokens[0])
        if spec is None:
            raise _error(path, lineno, f"unsupported record type {tokens[0]!r}")
        dim, kind, nfields = spec
        if len(tokens) - 1 != nfields:
            raise _error(path, lineno,
                         f"{tokens[0]} needs {nfields} fields, got {len(tokens) - 1}")
        if rec.dim is None:
            rec.dim, first_line = dim, lineno
        elif dim != rec.dim:
            raise _error(path, lineno, f"{tokens[0]} mixes {dim}D records into a {rec.dim}D "
                         f"graph (first record at line {first_line})")
        if kind == "vertex":
            rec.vertex_rows.append(tokens[1:])
            rec.vertex_lines.append(lineno)
        else:
            rec.edge_rows.append(tokens[1:])
            rec.edge_lines.append(lineno)
    return rec


def _parse_records(rows: list[list[str]], lines: list[int], nids: int, nvals: int,
                   path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Token rows ``[id * nids, value * nvals]`` -> ``(R, nids)`` int64, ``(R, nvals)`` float64."""
    ids = _convert_rows([r[:nids] for r in rows], lines, nids, np.int64, path)
    vals = _convert_rows([r[nids:] for r in rows], lines, nvals, np.float64, path)
    _check_finite(vals, lines, path)
    return ids, vals


def _to_storage(vals: np.ndarray, lines: Sequence[int], dim: int, path: PathLike) -> np.ndarray:
    """File pose values ``(R, 3)`` (x, y, theta) or ``(R, 7)`` -> storage layout ``(R, 4|7)``.

    SE3 quaternions are normalized (kept as is when already unit to working precision); the
    norm is computed after dividing by the largest component, so any finite quaternion (1e300
    components included) normalizes without overflow; a quaternion of norm below 1e-6 raises.
    """
    if dim == 2:
        theta = vals[:, 2]
        return np.stack([vals[:, 0], vals[:, 1], np.cos(theta), np.sin(theta)], axis=1)
    quat = vals[:, 3:7]
    biggest = np.abs(quat).max(axis=1, initial=0.0)
    scaled = quat / np.where(biggest > 0, biggest, 1.0)[:, None]
    scaled_norm = np.sqrt(np.sum(scaled * scaled, axis=1))  # in [1, 2]: scaled is in [-1, 1]
    with np.errstate(over="ignore"):
        norm = biggest * scaled_norm  # inf for norms beyond float64: only compared below
    bad = norm < _QUAT_MIN_NORM
    if bad.any():
        k = int(np.argmax(bad))
        raise _error(path, lines[k], f"quaternion norm {norm[k]:.3g} is (near) zero")
    unit = np.abs(norm - 1.0) <= _QUAT_UNIT_TOL
    quat = np.where(unit[:, None], quat, scaled / np.where(unit, 1.0, scaled_norm)[:, None])
    return np.concatenate([vals[:, :3], quat], axis=1)


def _from_storage(poses: np.ndarray, dim: int) -> np.ndarray:
    """Storage layout ``(R, 4|7)`` -> file pose values ``(R, 3|7)`` (SE2 theta via atan2)."""
    if dim == 2:
        return np.stack([poses[:, 0], poses[:, 1], np.arctan2(poses[:, 3], poses[:, 2])], axis=1)
    return poses


def _symmetric_from_upper(upper: np.ndarray, d: int) -> np.ndarray:
    """Row-major upper triangles ``(R, d(d+1)/2)`` -> symmetric matrices ``(R, d, d)``."""
    rows, cols = np.triu_indices(d)
    out = np.zeros((upper.shape[0], d, d), dtype=upper.dtype)
    out[:, rows, cols] = upper
    out[:, cols, rows] = upper
    return out


def _index_vertices(vids: np.ndarray, vlines: list[int], path: PathLike
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Sort vertex ids; returns (order (N,), sorted ids (N,)). Raises on duplicate ids."""
    if vids.size == 0:
        raise _error(path, None, "no vertices")
    order = np.argsort(vids, kind="stable")
    sorted_ids = vids[order]
    dup = np.nonzero(sorted_ids[1:] == sorted_ids[:-1])[0]
    if dup.size:
        later = order[dup + 1]  # stable sort: the later occurrence in file order
        k = int(later[np.argmin(np.asarray(vlines)[later])])
        raise _error(path, vlines[k], f"duplicate vertex id {int(vids[k])}")
    return order, sorted_ids


def _edge_rows(sorted_ids: np.ndarray, eids: np.ndarray, elines: list[int], path: PathLike
               ) -> np.ndarray:
    """Map raw edge vertex ids ``(E, 2)`` to row indices ``(E, 2)``; raises on unknown ids."""
    rows = np.searchsorted(sorted_ids, eids)
    found = sorted_ids[np.minimum(rows, sorted_ids.size - 1)] == eids
    if not found.all():
        k, col = np.argwhere(~found)[0]
        raise _error(path, elines[k], f"edge references unknown vertex id {int(eids[k, col])}")
    return rows.astype(np.int64)


def _not_positive_definite(tangent_info: np.ndarray) -> np.ndarray:
    """``(E,)`` bool: information ``(E, D, D)`` whose Cholesky factorization fails or is not
    finite (entries so large that the factor overflows)."""
    if tangent_info.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    factor, status = torch.linalg.cholesky_ex(torch.from_numpy(tangent_info))
    finite = torch.isfinite(factor).flatten(1).all(1)
    return ((status != 0) | ~finite).numpy()


def _floor(magnitude: np.ndarray) -> np.ndarray:
    """The smallest eigenvalue (or diagonal entry) a repaired matrix keeps, ``(E,)``."""
    return np.maximum(_INFO_FLOOR_REL * magnitude, _INFO_FLOOR_ABS)


def _repair_information(info: np.ndarray, how: Information) -> np.ndarray:
    """Positive-definite replacements for symmetric matrices ``(E, D, D)``.

    ``"nearest"``: the nearest symmetric positive-(semi)definite matrix in the Frobenius norm
    (Higham 1988: negative eigenvalues set to zero) with eigenvalues raised to a small floor
    (``1e-9`` times the largest eigenvalue magnitude, at least ``1e-12``); ``"diagonal"``: the
    diagonal only, entries raised to the same kind of floor (relative to the largest diagonal
    magnitude). May return non-finite values when the entries are too large (~1e300) to work with.
    """
    if how == "diagonal":
        diag = np.diagonal(info, axis1=1, axis2=2)
        floor = _floor(np.abs(diag).max(axis=1))
        return np.eye(info.shape[1]) * np.maximum(diag, floor[:, None])[:, :, None]
    with np.errstate(all="ignore"):
        lam, vec = np.linalg.eigh(info)
        lam = np.maximum(lam, _floor(np.abs(lam).max(axis=1))[:, None])
        out = (vec * lam[:, None, :]) @ np.swapaxes(vec, 1, 2)
    return 0.5 * (out + np.swapaxes(out, 1, 2))


def _checked_information(graph: PoseGraph, elines: list[int], information: Information,
                         path: PathLike) -> PoseGraph:
    """``graph`` if every information matrix is positive definite; else an error (``"strict"``)
    or a copy with those matrices repaired (``"nearest"``/``"diagonal"``) and a warning."""
    bad = _not_positive_definite(graph.tangent_information().numpy())
    if not bad.any():
        return graph
    first = int(np.argmax(bad))
    if information == "strict":
        raise _error(path, elines[first], "information matrix is not positive definite (pass "
                     "read_g2o(..., information='nearest') or information='diagonal' to repair "
                     "such edges)")
    info = graph.information.numpy().copy()
    info[bad] = _repair_information(info[bad], information)
    repaired = replace(graph, information=torch.from_numpy(info))
    still = _not_positive_definite(repaired.tangent_information().numpy())
    if still.any():
        k = int(np.argmax(still))
        raise _error(path, elines[k], f"information matrix is not positive definite and "
                     f"information={information!r} could not repair it (values too large)")
    warnings.warn(f"{os.fspath(path)}: information={information!r} replaced {int(bad.sum())} of "
                  f"{bad.size} information matrices that were not positive definite (first at "
                  f"line {elines[first]})", stacklevel=3)
    return repaired


def _check_self_loops(ij: np.ndarray, eids: np.ndarray, elines: list[int], path: PathLike
                      ) -> None:
    """Raise at the first edge ``(E, 2)`` joining a pose to itself."""
    loop = ij[:, 0] == ij[:, 1]
    if loop.any():
        k = int(np.argmax(loop))
        raise _error(path, elines[k], f"edge joins vertex {int(eids[k, 0])} to itself")


def read_g2o(path: PathLike, information: Information = "strict") -> PoseGraph:
    """Read a 2D (VERTEX_SE2/EDGE_SE2) or 3D (VERTEX_SE3:QUAT/EDGE_SE3:QUAT) g2o pose graph.

    ``FIX`` records, blank lines and ``#`` comments are ignored. Rows of ``poses`` are sorted by
    vertex id; edge ``i``/``j`` are row indices. ``.bz2`` files are decompressed. Quaternions are
    normalized (any finite non-zero quaternion; see ``_to_storage``).

    Args:
        path: the file.
        information: what to do with an edge whose information matrix is not positive definite
            (some public benchmarks have such edges): ``"strict"`` (default) raises;
            ``"nearest"`` replaces it by the nearest positive-definite matrix (eigenvalues
            clipped to a small positive floor, see ``_repair_information``); ``"diagonal"``
            keeps only its diagonal, clipped to that floor. Both warn with the number of edges
            they changed; positive-definite matrices are never changed.

    Raises:
        ValueError: ``"{path}:{lineno}: ..."`` on any malformed record (unknown tag, wrong
            field count, non-numeric or non-finite value, duplicate or unknown vertex id,
            mixed 2D/3D, zero quaternion, self-loop edge, information not positive definite);
            ``"{path}: ..."`` for a file without vertices or a corrupt ``.bz2`` file.
            Tag and field-count problems are reported at the first such line; value problems
            at an offending line (checks run per record kind, not strictly in file order).
    """
    if information not in _INFORMATION_CHOICES:
        raise ValueError(f"read_g2o: information must be one of {_INFORMATION_CHOICES}, "
                         f"got {information!r}")
    rec = _scan_g2o(_read_text(path), path)
    if rec.dim is None or not rec.vertex_rows:
        raise _error(path, None, "no vertices")
    dim, d = rec.dim, _TANGENT_DIM[rec.dim]
    fp = _FILE_POSE_SIZE[dim]
    vids, vvals = _parse_records(rec.vertex_rows, rec.vertex_lines, 1, fp, path)
    eids, evals = _parse_records(rec.edge_rows, rec.edge_lines, 2, fp + d * (d + 1) // 2, path)
    order, sorted_ids = _index_vertices(vids[:, 0], rec.vertex_lines, path)
    poses = _to_storage(vvals, rec.vertex_lines, dim, path)[order]
    ij = _edge_rows(sorted_ids, eids, rec.edge_lines, path)
    measurements = _to_storage(evals[:, :fp], rec.edge_lines, dim, path)
    _check_self_loops(ij, eids, rec.edge_lines, path)
    information_ = _symmetric_from_upper(evals[:, fp:], d)
    graph = PoseGraph(
        dim=dim,
        poses=torch.from_numpy(np.ascontiguousarray(poses)),
        ids=torch.from_numpy(np.ascontiguousarray(sorted_ids)),
        i=torch.from_numpy(np.ascontiguousarray(ij[:, 0])),
        j=torch.from_numpy(np.ascontiguousarray(ij[:, 1])),
        measurements=torch.from_numpy(np.ascontiguousarray(measurements)),
        information=torch.from_numpy(information_),
    )
    return _checked_information(graph, rec.edge_lines, information, path)


def _format_rows(prefix: str, ints: np.ndarray, vals: np.ndarray) -> list[str]:
    """Text lines ``prefix ints vals``: ints ``(R, a)`` as ``%d``, vals ``(R, b)`` as ``%.17g``."""
    parts = [prefix] if prefix else []
    fmt = " ".join(parts + ["%d"] * ints.shape[1] + [_FLOAT_FMT] * vals.shape[1])
    return [fmt % (*a, *b) for a, b in zip(ints.tolist(), vals.tolist(), strict=True)]


def write_g2o(path: PathLike, graph: PoseGraph) -> None:
    """Write ``graph`` in g2o format (``%.17g``); ``read_g2o`` reproduces it.

    SE3 tensors round-trip exactly; SE2 angles go through atan2/cos/sin (~1e-16 error).
    ``.bz2`` paths are compressed.
    """
    dim, d = graph.dim, graph.tangent_dim

    def numpy(t: Tensor) -> np.ndarray:
        return t.detach().cpu().to(torch.float64).numpy()

    ids = graph.ids.detach().cpu().to(torch.int64).numpy()
    i = graph.i.detach().cpu().to(torch.int64).numpy()
    j = graph.j.detach().cpu().to(torch.int64).numpy()
    rows, cols = np.triu_indices(d)
    info_upper = numpy(graph.information)[:, rows, cols]
    edge_vals = np.concatenate([_from_storage(numpy(graph.measurements), dim), info_upper], 1)
    lines = _format_rows(_VERTEX_TAG[dim], ids[:, None], _from_storage(numpy(graph.poses), dim))
    lines += _format_rows(_EDGE_TAG[dim], np.stack([ids[i], ids[j]], axis=1), edge_vals)
    _write_text(path, "\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------
# BAL
# --------------------------------------------------------------------------------------------


def _token_line(text: str, index: int) -> int:
    """1-based line number of the ``index``-th (0-based) whitespace-separated token of text."""
    seen = 0
    lines = text.split("\n")
    for lineno, line in enumerate(lines, start=1):
        seen += len(line.split())
        if seen > index:
            return lineno
    return len(lines)


def _bal_header(text: str, path: PathLike) -> tuple[int, int, int, int]:
    """Parse the header line; returns (C, P, O, character offset just past the header line)."""
    start = len(text) - len(text.lstrip())
    lineno = text.count("\n", 0, start) + 1
    end = text.find("\n", start)
    end = len(text) if end < 0 else end
    tokens = text[start:end].split()
    if len(tokens) != 3:
        raise _error(path, lineno, "header must be 'num_cameras num_points num_observations'")
    try:
        c, p, o = (int(t) for t in tokens)
    except ValueError:
        raise _error(path, lineno, f"header values {tokens} are not integers") from None
    if min(c, p, o) < 0:
        raise _error(path, lineno, f"header values {tokens} must be non-negative")
    return c, p, o, end


def _bal_array(text: str, tokens: list[str], first: int, stride: int, dtype: type,
               path: PathLike) -> np.ndarray:
    """Convert ``tokens`` ``(K,)`` in bulk; token k is token ``first + stride * k`` of text.

    A non-numeric (or, for float64, non-finite) token raises with its line number.
    """
    try:
        out = np.array(tokens, dtype=dtype).reshape(len(tokens))
    except (ValueError, OverflowError):
        kind = "an integer" if dtype is np.int64 else "a number"
        for k, token in enumerate(tokens):
            try:
                np.array(token, dtype=dtype)
            except (ValueError, OverflowError):
                lineno = _token_line(text, first + stride * k)
                raise _error(path, lineno, f"{token!r} is not {kind}") from None
        raise AssertionError("unreachable: bulk conversion failed but no bad token found") from None
    if dtype is np.float64 and not np.isfinite(out).all():
        k = int(np.argmax(~np.isfinite(out)))
        raise _error(path, _token_line(text, first + stride * k), "non-finite value")
    return out


def _check_bal_index(text: str, index: np.ndarray, count: int, column: int, what: str,
                     path: PathLike) -> None:
    """Raise at the first observation whose ``what`` index is outside ``[0, count)``."""
    bad = (index < 0) | (index >= count)
    if bad.any():
        k = int(np.argmax(bad))
        lineno = _token_line(text, 3 + 4 * k + column)
        raise _error(path, lineno, f"{what} index {int(index[k])} out of range [0, {count})")


def read_bal(path: PathLike) -> BALProblem:
    """Read a BAL problem (``.bz2`` files are decompressed transparently).

    Format: header ``C P O``; O observations ``cam point x y``; 9*C camera values; 3*P point
    values (any whitespace layout after the header).

    Raises:
        ValueError: ``"{path}:{lineno}: ..."`` for a bad header, non-numeric or non-finite
            values, out-of-range indices, a camera with focal length 0, a truncated file or
            trailing data; ``"{path}: ..."`` for a corrupt ``.bz2`` file.
    """
    text = _read_text(path)
    c, p, o, header_end = _bal_header(text, path)
    body = text[header_end:].split()
    first = 3  # token index (in the whole text) of body[0]
    need = 4 * o + 9 * c + 3 * p
    if len(body) < need:
        lineno = _token_line(text, first + len(body) - 1)
        raise _error(path, lineno, f"unexpected end of file: {need} values expected after "
                     f"the header, found {len(body)}")
    if len(body) > need:
        raise _error(path, _token_line(text, first + need),
                     f"trailing data after {need} values ({len(body) - need} extra tokens)")
    # whole observation block as numbers first, so the earliest bad token is the one reported
    obs = _bal_array(text, body[:4 * o], first, 1, np.float64, path).reshape(o, 4)[:, 2:]
    cam_idx = _bal_array(text, body[0:4 * o:4], first, 4, np.int64, path)
    pt_idx = _bal_array(text, body[1:4 * o:4], first + 1, 4, np.int64, path)
    _check_bal_index(text, cam_idx, c, 0, "camera", path)
    _check_bal_index(text, pt_idx, p, 1, "point", path)
    params = _bal_array(text, body[4 * o:], first + 4 * o, 1, np.float64, path)
    focal = params[6: 9 * c: 9]
    if (focal == 0).any():
        k = int(np.argmax(focal == 0))
        lineno = _token_line(text, first + 4 * o + 9 * k + 6)
        raise _error(path, lineno, f"camera {k} has focal length 0 (every point would project "
                     "to the image centre)")
    return BALProblem(
        cameras=torch.from_numpy(params[: 9 * c].reshape(c, 9).copy()),
        points=torch.from_numpy(params[9 * c:].reshape(p, 3).copy()),
        camera_index=torch.from_numpy(cam_idx),
        point_index=torch.from_numpy(pt_idx),
        observations=torch.from_numpy(np.ascontiguousarray(obs)),
    )


def write_bal(path: PathLike, problem: BALProblem) -> None:
    """Write ``problem`` in BAL format (``%.17g``, parameters one per line); exact round trip.

    ``.bz2`` paths are compressed.
    """

    def numpy(t: Tensor) -> np.ndarray:
        return t.detach().cpu().to(torch.float64).numpy()

    index = np.stack([problem.camera_index.detach().cpu().to(torch.int64).numpy(),
                      problem.point_index.detach().cpu().to(torch.int64).numpy()], axis=1)
    header = f"{problem.num_cameras} {problem.num_points} {problem.num_observations}"
    lines = [header]
    lines += _format_rows("", index, numpy(problem.observations))
    params = np.concatenate([numpy(problem.cameras).reshape(-1), numpy(problem.points).reshape(-1)])
    lines += [_FLOAT_FMT % v for v in params.tolist()]
    _write_text(path, "\n".join(lines) + "\n")
