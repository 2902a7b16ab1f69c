"""The arm part of the motion-planning app: forward kinematics from the URDF against pybullet's
``getLinkState`` (1e-6), the sphere Jacobians against finite differences, an unreadable URDF
named, and one seeded scene planned and confirmed collision-free in pybullet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pb = pytest.importorskip("pybullet")

from apps.motion_planning import arm, kinematics  # noqa: E402


@pytest.fixture(scope="module")
def panda() -> arm.Arm:
    return arm.Arm()


def test_forward_kinematics_matches_pybullet(panda: arm.Arm) -> None:
    cid = pb.connect(pb.DIRECT)
    try:
        robot = pb.loadURDF(str(arm.panda_urdf()), useFixedBase=True, physicsClientId=cid)
        index = {pb.getJointInfo(robot, j, physicsClientId=cid)[12].decode(): j
                 for j in range(pb.getNumJoints(robot, physicsClientId=cid))}
        lo, hi = panda.chain.limits()
        gen = torch.Generator().manual_seed(0)
        for _ in range(10):
            q = lo + (hi - lo) * torch.rand(7, dtype=torch.float64, generator=gen)
            for j, v in zip(range(7), q.tolist()):
                pb.resetJointState(robot, j, v, physicsClientId=cid)
            poses = kinematics.forward_kinematics(panda.chain, q)
            for k, link in enumerate(panda.chain.links[1:], 1):
                state = pb.getLinkState(robot, index[link], computeForwardKinematics=True,
                                        physicsClientId=cid)
                t, quat = np.array(state[4]), np.array(state[5])
                assert np.abs(poses[k, :3].numpy() - t).max() < 1e-6, link
                sign = np.sign(quat @ poses[k, 3:].numpy())  # q and -q: one rotation
                assert np.abs(poses[k, 3:].numpy() * sign - quat).max() < 1e-6, link
    finally:
        pb.disconnect(physicsClientId=cid)


def test_sphere_jacobians_match_finite_differences(panda: arm.Arm) -> None:
    q = torch.randn(2, 3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _, J = kinematics.sphere_jacobian(panda.chain, q, panda.index, panda.spheres)
    h = 1e-6
    for k in range(7):
        e = torch.zeros(7, dtype=torch.float64)
        e[k] = h
        fd = (panda.centres(q + e) - panda.centres(q - e)) / (2 * h)
        assert torch.allclose(fd, J[..., k], atol=1e-8)


def test_unreadable_urdf_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot read URDF .*missing.urdf"):
        arm.Arm(tmp_path / "missing.urdf")
    bad = tmp_path / "bad.urdf"
    bad.write_text("<robot><link name='a'>")
    with pytest.raises(ValueError, match=r"cannot read URDF .*bad.urdf"):
        arm.Arm(bad)
    other = tmp_path / "other.urdf"
    other.write_text("<robot name='r'><link name='a'/></robot>")
    with pytest.raises(ValueError, match="has no link 'panda_hand'"):
        arm.Arm(other)


def test_cli_names_an_unreadable_urdf(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        arm.main(["--urdf", str(tmp_path / "missing.urdf"), "--scenes", "1"])
    assert exit_info.value.code == 1
    assert "cannot read URDF" in capsys.readouterr().err


def test_a_scene_is_planned_and_confirmed_in_pybullet(panda: arm.Arm) -> None:
    row, scene, path = arm.run_scene(panda, 0, arm.ArmSpec())
    assert row.line_distance < 0  # the straight line collides
    assert row.success and row.distance > 0
    assert path.shape == (arm.ArmSpec().num_states, 14)
    assert torch.allclose(path[0, :7], scene.start, atol=0.01)
    assert torch.allclose(path[-1, :7], scene.goal, atol=0.01)
