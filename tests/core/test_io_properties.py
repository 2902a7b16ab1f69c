"""Property tests of the g2o and BAL readers on mutated files.

Small pieces of the real data files (when present) and synthetic files written by ``write_g2o`` /
``write_bal`` are damaged (lines or tokens deleted, duplicated, swapped; numbers replaced by
huge, zero, tiny, non-finite or garbage tokens; the text or the compressed bytes truncated). Every
outcome must be a parse that passes the checks every good file passes, or a ``ValueError`` whose
message starts with the file's name (and a line number within the file): never another exception,
a hang (hypothesis deadline) or a numpy overflow warning (a silent infinity).
"""

from __future__ import annotations

import bz2
import functools
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_io import DATA, synthetic_bal, synthetic_graph

from core.io import BALProblem, PoseGraph, read_bal, read_g2o, write_bal, write_g2o

SETTINGS = settings(max_examples=150, deadline=2000, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
TOKENS = ["1e308", "-1e308", "1e154", "-3e200", "1e400", "0", "-0", "1e-320", "nan", "inf",
          "-inf", "NaN", "garbage", "1.5", "-1", "7", "99999999999999999999", "0x10", "1e",
          "VERTEX_SE2", "EDGE_SE3:QUAT", "FIX", "#", "\u00e9"]


def _piece(name: str, keep: int) -> str | None:
    """Vertices with id < keep and the edges between them, from a real g2o file."""
    path = DATA / name
    if not path.is_file():
        return None
    lines = []
    for line in path.read_text().splitlines():
        tokens = line.split()
        ids = tokens[1:2] if tokens[0].startswith("VERTEX") else tokens[1:3]
        if all(int(t) < keep for t in ids):
            lines.append(line)
    return "\n".join(lines) + "\n"


def _g2o_sources(tmp: Path) -> list[str]:
    out = [s for s in (_piece("sphere2500.g2o", 6), _piece("intel.g2o", 6)) if s]
    for dim in (2, 3):
        write_g2o(tmp / f"s{dim}.g2o", synthetic_graph(dim))
        out.append((tmp / f"s{dim}.g2o").read_text())
    return out


def _bal_sources(tmp: Path) -> list[str]:
    real = DATA / "dubrovnik-3-7-pre.txt"
    out = [real.read_text()] if real.is_file() else []
    write_bal(tmp / "s.txt", synthetic_bal())
    return out + [(tmp / "s.txt").read_text()]


@functools.cache
def _sources() -> dict[str, list[str]]:
    with tempfile.TemporaryDirectory() as tmp:
        return {"g2o": _g2o_sources(Path(tmp)), "bal": _bal_sources(Path(tmp))}


KINDS = ["del_line", "dup_line", "swap_lines", "del_token", "dup_token", "swap_tokens",
         "truncate"] + ["replace"] * 6 + ["copy_in_line"] * 2


@st.composite
def mutated(draw: st.DrawFn, texts: list[str]) -> str:
    """One source text with one to three damages at uniformly random places (hypothesis's
    integers favour small values: the first lines and tokens)."""
    rnd = draw(st.randoms(use_true_random=False))
    lines = [line.split() for line in rnd.choice(texts).splitlines()]
    for _ in range(rnd.randint(1, 3)):
        if not lines:
            break
        kind, k = rnd.choice(KINDS), rnd.randrange(len(lines))
        if kind == "del_line":
            del lines[k]
        elif kind == "dup_line":
            lines.insert(k, list(lines[k]))
        elif kind == "swap_lines":
            m = rnd.randrange(len(lines))
            lines[k], lines[m] = lines[m], lines[k]
        elif kind == "truncate":
            lines = lines[: k + 1]
            lines[-1] = lines[-1][: rnd.randint(0, len(lines[-1]))]
        elif lines[k]:
            t = rnd.randrange(len(lines[k]))
            if kind == "del_token":
                del lines[k][t]
            elif kind == "dup_token":
                lines[k].insert(t, lines[k][t])
            elif kind == "swap_tokens":
                m = rnd.randrange(len(lines))
                if lines[m]:
                    u = rnd.randrange(len(lines[m]))
                    lines[k][t], lines[m][u] = lines[m][u], lines[k][t]
            elif kind == "copy_in_line":  # e.g. an edge's first id over its second: a self-loop
                lines[k][t] = rnd.choice(lines[k])
            else:
                lines[k][t] = rnd.choice(TOKENS + [str(rnd.randint(-3, 10))])
    return "\n".join(" ".join(line) for line in lines) + "\n"


def _outcome(reader, path: Path, nlines: int, **kwargs):
    """The reader's result, or None after checking that its ValueError names file and line."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # numpy overflow: a silent inf
            return reader(path, **kwargs)
    except ValueError as exc:
        m = re.match(re.escape(str(path)) + r"(?::(\d+))?: \S", str(exc))
        assert m, f"error does not start with '{path}:<line>: ': {exc}"
        if m.group(1) is not None:
            assert 1 <= int(m.group(1)) <= nlines + 1, str(exc)
        return None


def check_pose_graph(g: PoseGraph) -> None:
    """What every good g2o file gives: finite values, unit rotations, valid distinct indices,
    symmetric positive-definite information with a finite square root."""
    for name in ("poses", "measurements", "information"):
        assert torch.isfinite(getattr(g, name)).all(), name
    for t in (g.poses, g.measurements):
        rot = t[:, 3:] if g.dim == 3 else t[:, 2:]
        torch.testing.assert_close(rot.norm(dim=1), torch.ones(len(t), dtype=torch.float64),
                                   rtol=0, atol=1e-12)
    assert bool((g.ids[1:] > g.ids[:-1]).all())
    for idx in (g.i, g.j):
        assert bool(((idx >= 0) & (idx < g.num_poses)).all())
    assert not bool((g.i == g.j).any())
    assert torch.equal(g.information, g.information.mT)
    U, status = torch.linalg.cholesky_ex(g.tangent_information())
    assert bool((status == 0).all()) and torch.isfinite(U).all()


def check_bal(b: BALProblem) -> None:
    """What every good BAL file gives: finite values, valid indices, non-zero focal lengths."""
    for name in ("cameras", "points", "observations"):
        assert torch.isfinite(getattr(b, name)).all(), name
    assert bool(((b.camera_index >= 0) & (b.camera_index < b.num_cameras)).all())
    assert bool(((b.point_index >= 0) & (b.point_index < b.num_points)).all())
    assert bool((b.cameras[:, 6] != 0).all())


def test_sources_are_good(tmp_path: Path) -> None:
    sources = _sources()
    for k, text in enumerate(sources["g2o"]):
        (tmp_path / f"{k}.g2o").write_text(text)
        check_pose_graph(read_g2o(tmp_path / f"{k}.g2o"))
    for k, text in enumerate(sources["bal"]):
        (tmp_path / f"{k}.txt").write_text(text)
        check_bal(read_bal(tmp_path / f"{k}.txt"))


@SETTINGS
@given(data=st.data())
def test_g2o_mutations(data: st.DataObject, tmp_path: Path) -> None:
    sources = _sources()  # not an argument: a failing example would print them all
    text = data.draw(mutated(sources["g2o"]))
    path = tmp_path / "m.g2o"
    path.write_text(text)
    nlines = text.count("\n")
    g = _outcome(read_g2o, path, nlines)
    if g is not None:
        check_pose_graph(g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the repair's count of changed edges
        for how in ("nearest", "diagonal"):
            repaired = _outcome(read_g2o, path, nlines, information=how)
            if repaired is not None:
                check_pose_graph(repaired)


@SETTINGS
@given(data=st.data())
def test_bal_mutations(data: st.DataObject, tmp_path: Path) -> None:
    sources = _sources()  # not an argument: a failing example would print them all
    text = data.draw(mutated(sources["bal"]))
    path = tmp_path / "m.txt"
    path.write_text(text)
    b = _outcome(read_bal, path, text.count("\n"))
    if b is not None:
        check_bal(b)


@settings(max_examples=30, deadline=2000, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_bz2_byte_damage(data: st.DataObject, tmp_path: Path) -> None:
    sources = _sources()  # not an argument: a failing example would print them all
    """Compressed files truncated or with a byte changed: a parse or a ValueError naming them."""
    kind = data.draw(st.sampled_from(["g2o", "bal"]))
    text = data.draw(st.sampled_from(sources[kind]))
    raw = bytearray(bz2.compress(text.encode()))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
    path = tmp_path / ("m.g2o.bz2" if kind == "g2o" else "m.txt.bz2")
    path.write_bytes(bytes(raw))
    out = _outcome(read_g2o if kind == "g2o" else read_bal, path, text.count("\n"))
    if out is not None:
        (check_pose_graph if kind == "g2o" else check_bal)(out)


def test_checks_catch_what_the_old_reader_let_through() -> None:
    """The validity checks above fail on the silent failures of issue 12 (zero quaternion from
    an overflow, self-loop, zero focal length), so the properties would have found them."""
    g = synthetic_graph(3)
    poses = g.poses.clone()
    poses[1, 3:] = 0.0
    bad = PoseGraph(3, poses, g.ids, g.i, g.j, g.measurements, g.information)
    with pytest.raises(AssertionError):
        check_pose_graph(bad)
    loop = PoseGraph(3, g.poses, g.ids, g.i, g.i, g.measurements, g.information)
    with pytest.raises(AssertionError):
        check_pose_graph(loop)
    b = synthetic_bal()
    cams = b.cameras.clone()
    cams[0, 6] = 0.0
    with pytest.raises(AssertionError):
        check_bal(BALProblem(cams, b.points, b.camera_index, b.point_index, b.observations))
    assert np.isfinite(g.poses.numpy()).all()
