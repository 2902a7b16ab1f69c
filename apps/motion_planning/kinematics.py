"""Forward kinematics of a serial arm read from its URDF, in torch with ``core.lie``, and a sphere
cover of its links made from their collision meshes.

A link's pose is ``T_child = T_parent * origin * Exp(axis q)`` for a revolute joint (``origin``
the joint's URDF ``<origin xyz rpy>``; rpy is fixed-axis roll-pitch-yaw, ``R = Rz Ry Rx``) and
``T_parent * origin`` for a fixed one. Poses are SE3 storage ``(t, q)`` with quaternions
``(x, y, z, w)`` (``core.lie.se3``); the base link is the identity. These are the frames that
pybullet's ``getLinkState`` reports as the world link frame (``tests`` check them to 1e-6).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from core.lie import se3, so3


@dataclass(frozen=True)
class Joint:
    """One URDF joint: ``origin (7,)`` SE3 from parent to joint frame, ``axis (3,)``, kind
    ``revolute`` or ``fixed``, limits ``lower``/``upper`` (radians; 0 for fixed joints)."""

    name: str
    parent: str
    child: str
    kind: str
    origin: Tensor
    axis: Tensor
    lower: float
    upper: float


@dataclass(frozen=True)
class Chain:
    """The joints from the base link to ``tip`` in order, and each link's collision mesh
    (``link -> path`` of an ``.obj``, where the URDF names one)."""

    base: str
    joints: tuple[Joint, ...]
    meshes: dict[str, Path]

    @property
    def actuated(self) -> list[Joint]:
        return [j for j in self.joints if j.kind == "revolute"]

    @property
    def dof(self) -> int:
        return len(self.actuated)

    @property
    def links(self) -> list[str]:
        """The chain's links, base first."""
        return [self.base, *(j.child for j in self.joints)]

    def limits(self) -> tuple[Tensor, Tensor]:
        """``(dof,)`` lower and upper joint limits."""
        a = self.actuated
        return (torch.tensor([j.lower for j in a], dtype=torch.float64),
                torch.tensor([j.upper for j in a], dtype=torch.float64))


def _floats(text: str | None, count: int, what: str) -> list[float]:
    values = [float(v) for v in (text or " ".join(["0"] * count)).split()]
    if len(values) != count:
        raise ValueError(f"{what}: expected {count} numbers, got {text!r}")
    return values


def rpy_to_quaternion(rpy: Tensor) -> Tensor:
    """``(..., 3)`` fixed-axis roll, pitch, yaw -> ``(..., 4)`` quaternion of ``Rz Ry Rx``."""
    e = torch.eye(3, dtype=rpy.dtype)
    rx, ry, rz = (so3.exp(e[k] * rpy[..., k : k + 1]) for k in range(3))
    return so3.compose(rz, so3.compose(ry, rx))


def _joint(node: ET.Element, where: str) -> Joint:
    origin = node.find("origin")
    xyz = _floats(None if origin is None else origin.get("xyz"), 3, f"{where} origin xyz")
    rpy = _floats(None if origin is None else origin.get("rpy"), 3, f"{where} origin rpy")
    axis_node = node.find("axis")
    axis = _floats(None if axis_node is None else axis_node.get("xyz"), 3, f"{where} axis")
    limit = node.find("limit")
    kind = node.get("type", "")
    lower = float(limit.get("lower", 0)) if limit is not None else 0.0
    upper = float(limit.get("upper", 0)) if limit is not None else 0.0
    parent, child = node.find("parent"), node.find("child")
    if parent is None or child is None:
        raise ValueError(f"{where}: needs <parent> and <child>")
    q = rpy_to_quaternion(torch.tensor(rpy, dtype=torch.float64))
    return Joint(node.get("name", ""), parent.get("link", ""), child.get("link", ""), kind,
                 se3.from_rt(q, torch.tensor(xyz, dtype=torch.float64)),
                 torch.tensor(axis, dtype=torch.float64), lower, upper)


def read_chain(path: str | Path, tip: str) -> Chain:
    """The chain from the URDF's root link to ``tip``; ``ValueError`` naming the file when it
    cannot be read or parsed, has no such link, or a joint on the way that is neither revolute
    nor fixed."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise ValueError(f"cannot read URDF {path}: {exc}") from exc
    try:
        joints = {j.child: j for j in (_joint(n, f"URDF {path}: joint {n.get('name')!r}")
                                       for n in root.iter("joint"))}
    except ValueError as exc:
        raise ValueError(f"cannot read URDF {path}: {exc}") from exc
    links = {n.get("name") for n in root.iter("link")}
    if tip not in links:
        raise ValueError(f"URDF {path} has no link {tip!r} (links: {sorted(links)})")
    order, link = [], tip
    while link in joints:
        order.append(joints[link])
        link = joints[link].parent
    for j in order:
        if j.kind not in ("revolute", "fixed"):
            raise ValueError(f"URDF {path}: joint {j.name!r} is {j.kind!r}; only revolute and "
                             "fixed joints are supported")
    meshes = {}
    for n in root.iter("link"):
        mesh = n.find("collision/geometry/mesh")
        if mesh is not None and mesh.get("filename"):
            name = mesh.get("filename", "").replace("package://", "")
            meshes[n.get("name", "")] = path.parent / name
    return Chain(link, tuple(reversed(order)), meshes)


def forward_kinematics(chain: Chain, q: Tensor) -> Tensor:
    """``(..., L, 7)`` world poses of the chain's links (``chain.links``) at joint angles
    ``q (..., dof)``."""
    shape = q.shape[:-1]
    pose = torch.cat([q.new_zeros(*shape, 6), q.new_ones(*shape, 1)], -1)  # the identity
    poses, k = [pose], 0
    for j in chain.joints:
        pose = se3.compose(pose, j.origin.to(q))
        if j.kind == "revolute":
            rot = so3.exp(j.axis.to(q) * q[..., k : k + 1])
            pose = torch.cat([pose[..., :3], so3.compose(pose[..., 3:], rot)], -1)
            k += 1
        poses.append(pose)
    return torch.stack(poses, -2)


def _obj_vertices(path: Path) -> np.ndarray:
    rows = [line.split()[1:4] for line in path.read_text().splitlines() if line.startswith("v ")]
    if not rows:
        raise ValueError(f"mesh {path} has no vertices")
    return np.asarray(rows, dtype=np.float64)


def sphere_cover(chain: Chain, per_link: int = 4, iters: int = 20) -> tuple[Tensor, Tensor]:
    """Spheres covering each link's collision mesh vertices: ``per_link`` k-means clusters
    (started along the mesh's principal axis), each sphere at a cluster's centroid with the
    radius of its farthest vertex. Returns ``link index (S,)`` into ``chain.links`` and
    ``(S, 4)`` local centres and radii."""
    index, spheres = [], []
    for i, link in enumerate(chain.links):
        if link not in chain.meshes:
            continue
        v = _obj_vertices(chain.meshes[link])
        mean = v.mean(0)
        axis = np.linalg.svd(v - mean, full_matrices=False)[2][0]
        proj = (v - mean) @ axis
        centres = mean + np.linspace(proj.min(), proj.max(), per_link + 2)[1:-1, None] * axis
        for _ in range(iters):
            assign = ((v[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
            centres = np.stack([v[assign == c].mean(0) if (assign == c).any() else centres[c]
                                for c in range(per_link)])
        assign = ((v[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        for c in range(per_link):
            members = v[assign == c]
            if len(members):
                radius = np.sqrt(((members - centres[c]) ** 2).sum(-1)).max()
                index.append(i)
                spheres.append([*centres[c], radius])
    return torch.tensor(index), torch.tensor(spheres, dtype=torch.float64)


def sphere_centres(chain: Chain, q: Tensor, index: Tensor, local: Tensor) -> Tensor:
    """``(..., S, 3)`` world centres of the link spheres at ``q (..., dof)``."""
    poses = forward_kinematics(chain, q)[..., index.to(q.device), :]  # (..., S, 7)
    return se3.act(poses, local[:, :3].to(q))


def sphere_jacobian(chain: Chain, q: Tensor, index: Tensor, local: Tensor
                    ) -> tuple[Tensor, Tensor]:
    """Sphere centres ``(..., S, 3)`` and their Jacobians ``(..., S, 3, dof)``: a revolute joint
    ``k`` moves a point ``c`` on a link at or after its child link by ``z_k x (c - o_k)`` per
    radian, ``z_k`` its world axis and ``o_k`` its world origin (the child link's frame)."""
    poses = forward_kinematics(chain, q)  # (..., L, 7)
    centres = se3.act(poses[..., index.to(q.device), :], local[:, :3].to(q))
    columns, k = [], 0
    links = chain.links
    for j in chain.joints:
        if j.kind != "revolute":
            continue
        child = links.index(j.child)
        pose = poses[..., child, :]
        z = so3.act(pose[..., 3:], j.axis.to(q))  # (..., 3)
        moved = (index >= child).to(q)  # (S,): spheres on the child link or after it
        arm = centres - pose[..., None, :3]
        columns.append(torch.cross(z[..., None, :].expand_as(arm), arm, dim=-1)
                       * moved[:, None])
        k += 1
    return centres, torch.stack(columns, -1)
