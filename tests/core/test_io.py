"""Tests for core.io: g2o and BAL readers/writers."""

from __future__ import annotations

import bz2
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from core.io import BALProblem, PoseGraph, read_bal, read_g2o, write_bal, write_g2o

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
S_DIAG = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.5, 0.5], dtype=torch.float64)


def data_file(name: str) -> Path:
    """Path of a shared data file; skips the test when it is absent."""
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"data file {path} not available")
    return path


def assert_graph_equal(a: PoseGraph, b: PoseGraph, atol: float = 0.0) -> None:
    """Same graph; ``atol`` applies to poses/measurements (SE2 goes through atan2)."""
    assert a.dim == b.dim
    for name in ("ids", "i", "j"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.information, b.information)
    for name in ("poses", "measurements"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype == torch.float64
        if atol == 0.0:
            assert torch.equal(x, y), name
        else:
            torch.testing.assert_close(x, y, rtol=0.0, atol=atol)


def assert_bal_equal(a: BALProblem, b: BALProblem) -> None:
    for name in ("cameras", "points", "camera_index", "point_index", "observations"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype
        assert torch.equal(x, y), name


def write(tmp_path: Path, text: str, name: str = "bad.g2o") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_at(path: Path, lineno: int | None) -> str:
    """Regex matching the start of an error message for ``path`` at ``lineno``."""
    where = f"{path}:{lineno}: " if lineno is not None else f"{path}: "
    return "^" + re.escape(where)


# --------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------


def random_spd(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(n, d, d, generator=gen, dtype=torch.float64)
    return a @ a.mT + d * torch.eye(d, dtype=torch.float64)


def random_se3(n: int, gen: torch.Generator) -> torch.Tensor:
    q = torch.nn.functional.normalize(torch.randn(n, 4, generator=gen, dtype=torch.float64), dim=1)
    t = 10 * torch.randn(n, 3, generator=gen, dtype=torch.float64)
    return torch.cat([t, q], dim=1)


def random_se2(n: int, gen: torch.Generator) -> torch.Tensor:
    theta = (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * torch.pi
    xy = 10 * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    return torch.cat([xy, torch.cos(theta)[:, None], torch.sin(theta)[:, None]], dim=1)


def synthetic_graph(dim: int, seed: int = 0) -> PoseGraph:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([-4, 0, 3, 17, 1000000000000], dtype=torch.int64)
    i = torch.tensor([0, 1, 2, 3, 4, 0, 2], dtype=torch.int64)
    j = torch.tensor([1, 2, 3, 4, 0, 3, 4], dtype=torch.int64)
    sample = random_se3 if dim == 3 else random_se2
    d = 6 if dim == 3 else 3
    return PoseGraph(
        dim=dim,
        poses=sample(5, gen),
        ids=ids,
        i=i,
        j=j,
        measurements=sample(7, gen),
        information=random_spd(7, d, gen),
    )


def synthetic_bal(seed: int = 0) -> BALProblem:
    gen = torch.Generator().manual_seed(seed)
    c, p, o = 4, 9, 20
    return BALProblem(
        cameras=torch.randn(c, 9, generator=gen, dtype=torch.float64) * 1e3,
        points=torch.randn(p, 3, generator=gen, dtype=torch.float64),
        camera_index=torch.randint(0, c, (o,), generator=gen),
        point_index=torch.randint(0, p, (o,), generator=gen),
        observations=torch.randn(o, 2, generator=gen, dtype=torch.float64) * 1e-7,
    )


# --------------------------------------------------------------------------------------------
# Real data
# --------------------------------------------------------------------------------------------


def test_read_sphere2500() -> None:
    g = read_g2o(data_file("sphere2500.g2o"))
    assert (g.dim, g.num_poses, g.num_edges) == (3, 2500, 4949)
    assert g.poses.shape == (2500, 7) and g.poses.dtype == torch.float64
    assert g.measurements.shape == (4949, 7) and g.information.shape == (4949, 6, 6)
    assert g.ids.dtype == g.i.dtype == g.j.dtype == torch.int64
    assert torch.equal(g.ids, torch.arange(2500))
    assert torch.equal(g.i[:2], torch.tensor([0, 1])) and torch.equal(g.j[:2], torch.tensor([1, 2]))
    torch.testing.assert_close(g.poses[0], torch.tensor([0.0] * 6 + [1.0], dtype=torch.float64))
    torch.testing.assert_close(
        g.poses[:, 3:].norm(dim=1), torch.ones(2500, dtype=torch.float64), rtol=0, atol=1e-15
    )
    # first edge: 10 * I3 translation, rotation block 400.021 0.00193512 2.06612 ...
    info = g.information[0]
    assert torch.equal(info, info.T)
    assert info[0, 0] == 10.0 and info[0, 1] == 0.0
    assert info[3, 3] == 400.021 and info[3, 4] == 0.00193512 and info[4, 3] == 0.00193512
    assert info[5, 5] == 99.203


@pytest.mark.parametrize(
    "name, poses, edges, info00",
    [
        ("intel.g2o", 1728, 2512, 115.187),
        ("M3500.g2o", 3500, 5453, 44.721360),
    ],
)
def test_read_2d(name: str, poses: int, edges: int, info00: float) -> None:
    g = read_g2o(data_file(name))
    assert (g.dim, g.num_poses, g.num_edges) == (2, poses, edges)
    assert g.poses.shape == (poses, 4) and g.information.shape == (edges, 3, 3)
    torch.testing.assert_close(
        g.poses[:, 2] ** 2 + g.poses[:, 3] ** 2, torch.ones(poses, dtype=torch.float64)
    )
    assert g.information[0, 0, 0] == info00
    assert torch.equal(g.information, g.information.mT)
    assert bool((g.i < poses).all() and (g.j < poses).all())


def test_read_m3500_first_records() -> None:
    g = read_g2o(data_file("M3500.g2o"))
    theta = -0.012958
    expected = torch.tensor([1.030390, 0.011350, np.cos(theta), np.sin(theta)], dtype=torch.float64)
    torch.testing.assert_close(g.poses[1], expected, rtol=0, atol=1e-16)
    assert torch.equal(g.measurements[0], g.poses[1])  # EDGE_SE2 0 1 equals VERTEX_SE2 1


def test_read_dubrovnik() -> None:
    b = read_bal(data_file("dubrovnik-3-7-pre.txt"))
    assert (b.num_cameras, b.num_points, b.num_observations) == (3, 7, 19)
    assert b.cameras.shape == (3, 9) and b.points.shape == (7, 3)
    assert b.observations.shape == (19, 2) and b.cameras.dtype == torch.float64
    assert b.camera_index.dtype == b.point_index.dtype == torch.int64
    assert b.camera_index[:3].tolist() == [0, 1, 2] and b.point_index[:3].tolist() == [0, 0, 0]
    assert b.camera_index[-1] == 2 and b.point_index[-1] == 6
    assert b.observations[0].tolist() == [-3.859900e02, 3.871200e02]
    assert b.observations[-1].tolist() == [-5.841998e01, 1.108300e02]
    assert b.cameras[0, 0] == -1.6943983532198115e-02
    assert b.cameras[0, 6] == 1.4300319432711681e03


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, atol",
    [
        ("sphere2500.g2o", 0.0),
        ("intel.g2o", 1e-15),
        ("M3500.g2o", 1e-15),
    ],
)
def test_g2o_round_trip_real(tmp_path: Path, name: str, atol: float) -> None:
    g = read_g2o(data_file(name))
    write_g2o(tmp_path / name, g)
    assert_graph_equal(g, read_g2o(tmp_path / name), atol=atol)


@pytest.mark.parametrize("dim, atol", [(3, 0.0), (2, 1e-15)])
def test_g2o_round_trip_synthetic(tmp_path: Path, dim: int, atol: float) -> None:
    g = synthetic_graph(dim)
    write_g2o(tmp_path / "g.g2o", g)
    assert_graph_equal(g, read_g2o(tmp_path / "g.g2o"), atol=atol)
    write_g2o(tmp_path / "g.g2o.bz2", g)
    assert_graph_equal(g, read_g2o(tmp_path / "g.g2o.bz2"), atol=atol)


@pytest.mark.parametrize("text", ["VERTEX_SE2 4 1 2 3\n", "VERTEX_SE3:QUAT 4 1 2 3 0 0 0 1\r\n"])
def test_g2o_without_edges(tmp_path: Path, text: str) -> None:
    g = read_g2o(write(tmp_path, text, "g.g2o"))
    assert (g.num_poses, g.num_edges) == (1, 0)
    assert g.sqrt_information().shape == (0, g.tangent_dim, g.tangent_dim)
    write_g2o(tmp_path / "h.g2o", g)
    assert_graph_equal(g, read_g2o(tmp_path / "h.g2o"), atol=1e-15)


def test_g2o_vertex_order_fix_and_comments(tmp_path: Path) -> None:
    text = (
        "# a comment\n"
        "\n"
        "EDGE_SE2 7 -2 1 0 0.5 1 0 0 2 0 3\n"  # edge before its vertices
        "VERTEX_SE2 7 1 2 0.25\n"
        "FIX 7\n"
        "   VERTEX_SE2 -2 3 4 -0.5   # trailing comment\n"
        "VERTEX_SE2 5 0 0 0\n"
        "EDGE_SE2 -2 5 0 1 0 4 0.5 0 4 0 4\n"
    )
    g = read_g2o(write(tmp_path, text, "g.g2o"))
    assert torch.equal(g.ids, torch.tensor([-2, 5, 7]))
    assert g.i.tolist() == [2, 0] and g.j.tolist() == [0, 1]
    torch.testing.assert_close(
        g.poses[2],
        torch.tensor([1.0, 2.0, np.cos(0.25), np.sin(0.25)], dtype=torch.float64),
        rtol=0,
        atol=1e-16,
    )
    assert g.information[0].tolist() == [[1, 0, 0], [0, 2, 0], [0, 0, 3]]
    assert g.information[1].tolist() == [[4, 0.5, 0], [0.5, 4, 0], [0, 0, 4]]


def test_g2o_quaternion_normalized(tmp_path: Path) -> None:
    text = (
        "VERTEX_SE3:QUAT 0 1 2 3 0 0 0 2\n"
        "VERTEX_SE3:QUAT 1 0 0 0 1 1 1 1\n"
        "EDGE_SE3:QUAT 0 1 0 0 0 0 0 3 4 " + INFO3 + "\n"
    )
    g = read_g2o(write(tmp_path, text, "q.g2o"))
    assert torch.equal(g.poses[0], torch.tensor([1.0, 2, 3, 0, 0, 0, 1], dtype=torch.float64))
    torch.testing.assert_close(g.poses[1, 3:], torch.full((4,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(
        g.measurements[0, 3:], torch.tensor([0, 0, 0.6, 0.8], dtype=torch.float64)
    )
    assert torch.equal(g.information[0], torch.eye(6, dtype=torch.float64))


def test_bal_round_trip_real(tmp_path: Path) -> None:
    b = read_bal(data_file("dubrovnik-3-7-pre.txt"))
    write_bal(tmp_path / "b.txt", b)
    assert_bal_equal(b, read_bal(tmp_path / "b.txt"))


def test_bal_round_trip_synthetic_and_bz2(tmp_path: Path) -> None:
    b = synthetic_bal()
    write_bal(tmp_path / "b.txt", b)
    assert_bal_equal(b, read_bal(tmp_path / "b.txt"))
    write_bal(tmp_path / "b.txt.bz2", b)
    assert bz2.decompress((tmp_path / "b.txt.bz2").read_bytes()).decode().startswith("4 9 20\n")
    assert_bal_equal(b, read_bal(tmp_path / "b.txt.bz2"))


def test_bal_reads_any_layout(tmp_path: Path) -> None:
    text = "\n1 2 2\n0 1 1.5 -2.5\n0 0 3 4\n" + " ".join(str(k) for k in range(15)) + "\n"
    b = read_bal(write(tmp_path, text, "b.txt"))
    assert b.camera_index.tolist() == [0, 0] and b.point_index.tolist() == [1, 0]
    assert b.observations.tolist() == [[1.5, -2.5], [3.0, 4.0]]
    assert b.cameras.tolist() == [list(map(float, range(9)))]
    assert b.points.tolist() == [[9.0, 10.0, 11.0], [12.0, 13.0, 14.0]]


# --------------------------------------------------------------------------------------------
# Information
# --------------------------------------------------------------------------------------------


def test_sqrt_information_3d() -> None:
    g = synthetic_graph(3)
    u = g.sqrt_information()
    assert u.shape == (7, 6, 6)
    assert torch.equal(u, u.triu())
    s = torch.diag(S_DIAG)
    torch.testing.assert_close(u.mT @ u, s @ g.information @ s)
    torch.testing.assert_close(g.tangent_information(), s @ g.information @ s)


def test_sqrt_information_sphere2500() -> None:
    g = read_g2o(data_file("sphere2500.g2o"))
    u = g.sqrt_information()
    assert torch.equal(u, u.triu())
    s = torch.diag(S_DIAG)
    torch.testing.assert_close(u.mT @ u, s @ g.information @ s)


def test_sqrt_information_2d() -> None:
    g = synthetic_graph(2)
    u = g.sqrt_information()
    assert u.shape == (7, 3, 3)
    assert torch.equal(u, u.triu())
    torch.testing.assert_close(u.mT @ u, g.information)


def test_sphere2500_initial_cost() -> None:
    """README check number: cost at the file's initial estimate is 1,287,028 (zero prior)."""
    pp = pytest.importorskip("pypose")
    g = read_g2o(data_file("sphere2500.g2o"))
    poses, z = pp.SE3(g.poses), pp.SE3(g.measurements)
    err = (z.Inv() @ poses[g.i].Inv() @ poses[g.j]).Log().tensor()
    r = (g.sqrt_information() @ err.unsqueeze(-1)).squeeze(-1)
    assert abs(0.5 * float((r**2).sum()) - 1287028) < 1.0


# --------------------------------------------------------------------------------------------
# Data classes
# --------------------------------------------------------------------------------------------


def test_pose_graph_shape_validation() -> None:
    g = synthetic_graph(3)
    with pytest.raises(ValueError, match="measurements"):
        PoseGraph(
            dim=3,
            poses=g.poses,
            ids=g.ids,
            i=g.i,
            j=g.j,
            measurements=g.measurements[:, :4],
            information=g.information,
        )
    with pytest.raises(ValueError, match="dim"):
        PoseGraph(
            dim=4,
            poses=g.poses,
            ids=g.ids,
            i=g.i,
            j=g.j,
            measurements=g.measurements,
            information=g.information,
        )
    b = synthetic_bal()
    with pytest.raises(ValueError, match="point_index"):
        BALProblem(
            cameras=b.cameras,
            points=b.points,
            camera_index=b.camera_index,
            point_index=b.point_index[1:],
            observations=b.observations,
        )


def test_to_keeps_index_dtype() -> None:
    g = synthetic_graph(2).to(dtype=torch.float32)
    assert g.poses.dtype == g.information.dtype == torch.float32
    assert g.i.dtype == g.ids.dtype == torch.int64
    b = synthetic_bal().to(dtype=torch.float32)
    assert b.cameras.dtype == torch.float32 and b.point_index.dtype == torch.int64
    assert (g.num_poses, g.num_edges, b.num_observations) == (5, 7, 20)


# --------------------------------------------------------------------------------------------
# Malformed input
# --------------------------------------------------------------------------------------------

V2 = "VERTEX_SE2 {} 0 0 0\n"
E2 = "EDGE_SE2 {} {} 1 0 0 1 0 0 1 0 1\n"
V3 = "VERTEX_SE3:QUAT {} 0 0 0 0 0 0 1\n"
INFO3 = "1 0 0 0 0 0 1 0 0 0 0 1 0 0 0 1 0 0 1 0 1"
E3 = "EDGE_SE3:QUAT {} {} 0 0 0 0 0 0 1 " + INFO3 + "\n"

G2O_ERRORS = {
    "unknown tag": (V2.format(0) + "VERTEX_XY 1 0 0\n", 2, "unsupported record"),
    "too few fields": (V2.format(0) + "VERTEX_SE2 1 0 0\n", 2, "needs 4 fields"),
    "too many fields": (
        V2.format(0) + V2.format(1) + "EDGE_SE2 0 1 1 0 0 1 0 0 1 0 1 9\n",
        3,
        "needs 11 fields",
    ),
    "edge info count 3d": (
        V3.format(0) + V3.format(1) + "EDGE_SE3:QUAT 0 1 0 0 0 0 0 0 1 1\n",
        3,
        "needs 30 fields",
    ),
    "non-numeric": (V2.format(0) + "\n# c\nVERTEX_SE2 1 0 abc 0\n", 4, "'abc' is not a number"),
    "non-integer id": (V2.format(0) + "VERTEX_SE2 1.5 0 0 0\n", 2, "'1.5' is not an integer"),
    "nan": (V2.format(0) + V2.format(1) + "EDGE_SE2 0 1 nan 0 0 1 0 0 1 0 1\n", 3, "non-finite"),
    "inf": (V3.format(0) + "VERTEX_SE3:QUAT 1 0 inf 0 0 0 0 1\n", 2, "non-finite"),
    "unknown vertex": (
        V2.format(0) + V2.format(1) + E2.format(0, 1) + E2.format(1, 5),
        4,
        "unknown vertex id 5",
    ),
    "duplicate vertex": (
        V2.format(3) + V2.format(1) + V2.format(2) + V2.format(1),
        4,
        "duplicate vertex id 1",
    ),
    "mixed 2d 3d": (V2.format(0) + V2.format(1) + V3.format(2), 3, "mixes 3D"),
    "mixed 3d 2d": (V3.format(0) + E3.format(0, 0) + E2.format(0, 0), 3, "mixes 2D"),
    "not positive definite": (
        V2.format(0) + V2.format(1) + E2.format(0, 1) + "EDGE_SE2 1 0 1 0 0 1 0 0 -1 0 1\n",
        4,
        "not positive definite",
    ),
    "singular information 3d": (
        V3.format(0)
        + V3.format(1)
        + E3.format(0, 1)
        + E3.format(1, 0).replace(INFO3, INFO3[:-1] + "0"),
        4,
        "not positive definite",
    ),
    "zero quaternion": (V3.format(0) + "VERTEX_SE3:QUAT 1 0 0 0 0 0 0 0\n", 2, "quaternion"),
    "self-loop 2d": (V2.format(0) + V2.format(1) + E2.format(0, 1) + E2.format(1, 1), 4,
                     "joins vertex 1 to itself"),
    "self-loop 3d": (V3.format(0) + V3.format(1) + E3.format(0, 0), 3, "to itself"),
    "indefinite names the option": (
        V2.format(0) + V2.format(1) + "EDGE_SE2 0 1 1 0 0 1 2 0 1 0 1\n",
        3,
        "information='nearest'",
    ),
    "zero measurement quaternion": (
        V3.format(0) + "EDGE_SE3:QUAT 0 0 0 0 0 0 0 0 0 " + INFO3,
        2,
        "quaternion",
    ),
}


@pytest.mark.parametrize("case", sorted(G2O_ERRORS))
def test_read_g2o_errors(tmp_path: Path, case: str) -> None:
    text, lineno, message = G2O_ERRORS[case]
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match=error_at(path, lineno) + ".*" + re.escape(message)):
        read_g2o(path)


@pytest.mark.parametrize("text", ["", "# only a comment\n\n", E2.format(0, 1), "FIX 0\n"])
def test_read_g2o_no_vertices(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ValueError, match=error_at(path, None) + "no vertices"):
        read_g2o(path)


def test_read_g2o_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.g2o"
    path.write_bytes(V2.format(0).encode() + b"VERTEX_SE2 1 0 0 \xff\n")
    with pytest.raises(ValueError, match=error_at(path, 2) + "file is not UTF-8"):
        read_g2o(path)


BAL_GOOD_PARAMS = "\n".join(["0.5"] * (9 * 2 + 3 * 3)) + "\n"  # 2 cameras, 3 points
BAL_OBS = "0 0 1.0 2.0\n1 2 3.0 4.0\n"

BAL_ERRORS = {
    "header two values": ("2 3\n" + BAL_OBS + BAL_GOOD_PARAMS, 1, "header"),
    "header four values": ("2 3 2 1\n" + BAL_OBS + BAL_GOOD_PARAMS, 1, "header"),
    "header not integer": ("2 3.0 2\n" + BAL_OBS + BAL_GOOD_PARAMS, 1, "not integers"),
    "header negative": ("2 -3 2\n" + BAL_OBS + BAL_GOOD_PARAMS, 1, "non-negative"),
    "header after blank lines": ("\n\n2 x 2\n" + BAL_OBS + BAL_GOOD_PARAMS, 3, "not integers"),
    "empty": ("", 1, "header"),
    "camera index out of range": (
        "2 3 2\n0 0 1 2\n2 2 3 4\n" + BAL_GOOD_PARAMS,
        3,
        "camera index 2 out of range",
    ),
    "point index out of range": (
        "2 3 2\n0 3 1 2\n1 2 3 4\n" + BAL_GOOD_PARAMS,
        2,
        "point index 3 out of range",
    ),
    "negative index": ("2 3 2\n0 0 1 2\n-1 2 3 4\n" + BAL_GOOD_PARAMS, 3, "camera index -1"),
    "non-integer index": (
        "2 3 2\n0 0 1 2\n1 0.5 3 4\n" + BAL_GOOD_PARAMS,
        3,
        "'0.5' is not an integer",
    ),
    "non-numeric observation": (
        "2 3 2\n0 0 1 2\n1 2 3 x4\n" + BAL_GOOD_PARAMS,
        3,
        "'x4' is not a number",
    ),
    "non-numeric parameter": (
        "2 3 2\n" + BAL_OBS + "abc\n" + "0.5\n" * 26,
        4,
        "'abc' is not a number",
    ),
    "non-numeric late parameter": (
        "2 3 2\n" + BAL_OBS + "0.5\n" * 20 + "1e\n" + "0.5\n" * 6,
        24,
        "'1e' is not a number",
    ),
    "nan parameter": ("2 3 2\n" + BAL_OBS + "0.5\n" * 26 + "nan\n", 30, "non-finite"),
    "zero focal length": (
        "2 3 2\n" + BAL_OBS + "0.5\n" * 15 + "0\n" + "0.5\n" * 11,
        19,
        "camera 1 has focal length 0",
    ),
    "earliest bad observation token": (
        "2 3 2\n0 0 1 x\n1 0.5 3 4\n" + BAL_GOOD_PARAMS,
        2,
        "'x' is not a number",
    ),
    "inf observation": (
        "2 3 2\n" + "0 0 1.0 -inf\n1 2 3.0 4.0\n" + BAL_GOOD_PARAMS,
        2,
        "non-finite",
    ),
    "truncated": ("2 3 2\n" + BAL_OBS + "0.5\n" * 26 + "\n\n", 29, "unexpected end of file"),
    "truncated observations": ("2 3 2\n0 0 1.0 2.0\n1 2\n", 3, "unexpected end of file"),
    "header only": ("2 3 2\n", 1, "unexpected end of file"),
    "trailing garbage": (
        "2 3 2\n" + BAL_OBS + BAL_GOOD_PARAMS + "\n\n7 junk\n",
        33,
        "trailing data",
    ),
}


@pytest.mark.parametrize("case", sorted(BAL_ERRORS))
def test_read_bal_errors(tmp_path: Path, case: str) -> None:
    text, lineno, message = BAL_ERRORS[case]
    path = write(tmp_path, text, "bad.txt")
    with pytest.raises(ValueError, match=error_at(path, lineno) + ".*" + re.escape(message)):
        read_bal(path)


def test_read_bal_good_fixture_parses(tmp_path: Path) -> None:
    """The error fixtures above differ from this valid file only in the broken token."""
    b = read_bal(write(tmp_path, "2 3 2\n" + BAL_OBS + BAL_GOOD_PARAMS, "good.txt"))
    assert (b.num_cameras, b.num_points, b.num_observations) == (2, 3, 2)


def test_read_bal_bz2_error_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt.bz2"
    path.write_bytes(bz2.compress(("2 3 2\n0 0 1 2\n1 2 3 4\n" + "0.5\n" * 26).encode()))
    with pytest.raises(ValueError, match=error_at(path, 29) + "unexpected end of file"):
        read_bal(path)


# --------------------------------------------------------------------------------------------
# Overflow, corrupt compression, information repair
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("big", [1e154, 1e200, 1.7e308])
def test_huge_quaternion_normalizes(tmp_path: Path, big: float) -> None:
    """Components whose squares overflow still give the unit quaternion they point along."""
    text = V3.format(0) + f"VERTEX_SE3:QUAT 1 0 0 0 0 0 {big!r} {big!r}\n"
    g = read_g2o(write(tmp_path, text, "q.g2o"))
    half = 0.5**0.5
    torch.testing.assert_close(g.poses[1, 3:], torch.tensor([0, 0, half, half],
                                                            dtype=torch.float64))


@pytest.mark.parametrize("reader, name, text", [
    (read_g2o, "g.g2o.bz2", V2.format(0) + V2.format(1) + E2.format(0, 1)),
    (read_bal, "b.txt.bz2", "2 3 2\n" + BAL_OBS + BAL_GOOD_PARAMS),
])
@pytest.mark.parametrize("damage", ["truncated", "not bzip2", "empty-ish"])
def test_corrupt_bz2_names_the_file(tmp_path: Path, reader, name: str, text: str,
                                    damage: str) -> None:
    data = bz2.compress(text.encode())
    data = {"truncated": data[: len(data) // 2], "not bzip2": text.encode(),
            "empty-ish": data[:4]}[damage]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ValueError, match=error_at(path, None) + "not a valid bzip2 file"):
        reader(path)


def indefinite_graph(tmp_path: Path) -> tuple[Path, PoseGraph, torch.Tensor]:
    """sphere2500-like synthetic SE3 graph (a noisy loop) with 3 of its edges' information made
    indefinite; returns the file, the clean graph and the mask of the damaged edges."""
    gen = torch.Generator().manual_seed(3)
    n = 12
    truth = random_se3(n, gen)
    i = torch.cat([torch.arange(n - 1), torch.tensor([0, 3, 5, 0])])
    j = torch.cat([torch.arange(1, n), torch.tensor([6, 9, 11, 11])])
    from core.lie import se3

    z = se3.compose(se3.inverse(truth[i]), truth[j])
    z = se3.retract(z, 0.01 * torch.randn(len(i), 6, generator=gen, dtype=torch.float64))
    info = random_spd(len(i), 6, gen)
    bad = torch.zeros(len(i), dtype=torch.bool)
    bad[[2, 7, 13]] = True
    info[bad, 5, 5] = -3.0  # indefinite
    graph = PoseGraph(3, se3.retract(truth, 0.1 * torch.randn(n, 6, generator=gen,
                                                                 dtype=torch.float64)),
                      torch.arange(n), i, j, z, info)
    path = tmp_path / "indefinite.g2o"
    write_g2o(path, graph)
    return path, graph, bad


@pytest.mark.parametrize("information", ["nearest", "diagonal"])
def test_indefinite_information_repaired_and_solves(tmp_path: Path, information: str) -> None:
    import core

    path, clean, bad = indefinite_graph(tmp_path)
    with pytest.raises(ValueError, match=error_at(path, 15) + ".*information='nearest'"):
        read_g2o(path)
    with pytest.warns(UserWarning, match=f"information='{information}' replaced 3 of 15"):
        g = read_g2o(path, information=information)
    assert torch.equal(g.information[~bad], clean.information[~bad])  # good edges untouched
    assert torch.isfinite(g.sqrt_information()).all()
    torch.testing.assert_close(g.information, g.information.mT, rtol=0, atol=0)
    poses = core.Variable("poses", core.SE3, count=g.num_poses)
    between = core.costs.Between(poses, g.i, g.j, g.measurements, sqrt_info=g.sqrt_information())
    prior = core.costs.Prior(poses, g.poses[0], index=0, sqrt_info=1e3)
    sol = core.LevenbergMarquardt(max_iters=50).solve(core.Objective([between, prior]),
                                                      {"poses": g.poses[None]})
    assert sol.info.status_names == ["converged"]
    assert torch.isfinite(sol.info.final_cost).all()
    assert float(sol.info.final_cost[0]) < 1e-2 * float(sol.info.initial_cost[0])


def test_read_g2o_rejects_unknown_information_choice(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="information must be one of"):
        read_g2o(write(tmp_path, V2.format(0), "g.g2o"), information="lenient")  # type: ignore
