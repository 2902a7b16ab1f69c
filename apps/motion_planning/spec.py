"""The settings shared by the map generator and the planner (one flat frozen dataclass: the
``data`` config group; expert trajectories depend on the planner's settings, so both are part of
the dataset's cache key)."""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("forest", "tarpit", "mixed")


@dataclass(frozen=True)
class MapSpec:
    """Procedural maps and the GPMP2-style planner on them (lengths in metres, times seconds).

    Fields:
        size: cells per side of the square occupancy grid.
        extent: the map covers ``[-extent, extent]^2``.
        kinds: map kinds drawn in turn: ``forest`` (random rectangles), ``tarpit`` (walls across
            the map with gaps), ``mixed`` (one wall and a sparser forest).
        obstacles: ``(min, max)`` rectangles of a forest map (a mixed map has half as many).
        obstacle_size: ``(min, max)`` side length of a rectangle.
        wall_thickness: thickness of a tarpit wall.
        gap: width of a gap in a wall.
        min_distance: start and goal are at least this far apart.
        num_states: support states of a trajectory (position and velocity each).
        total_time: the trajectory's duration (``dt = total_time / (num_states - 1)``).
        qc: power-spectral density of the GP prior's acceleration noise.
        robot_radius: the robot is a disc of this radius (success: clearance > radius).
        safety: the collision hinge's margin beyond the radius (``eps = robot_radius + safety``).
        collision_weight: weight of the collision hinge's residual.
        sdf_interp: how the planner reads the SDF: ``bilinear`` (gradient piecewise constant
            across cells) or ``bicubic`` (Catmull-Rom: continuous gradient); see
            ``core.costs.motion.sdf_lookup``. Success is always judged on the bilinear SDF.
        hinge_smooth: width over which the collision hinge's kink at ``d = eps`` is rounded
            (``core.costs.motion.smoothed_hinge``; 0: the plain hinge ``max(0, eps - d)``).
        boundary_weight: weight of the start/goal position priors.
        expert_iters: Levenberg-Marquardt iterations of the expert's long solves.
        goal_tolerance: a plan reaches the goal (and leaves the start) within this distance.
    """

    size: int = 128
    extent: float = 5.0
    kinds: tuple[str, ...] = KINDS
    obstacles: tuple[int, int] = (8, 14)
    obstacle_size: tuple[float, float] = (0.6, 1.8)
    wall_thickness: float = 0.4
    gap: float = 1.5
    min_distance: float = 6.0
    num_states: int = 101
    total_time: float = 10.0
    qc: float = 1.0
    robot_radius: float = 0.3
    safety: float = 0.15
    collision_weight: float = 100.0
    sdf_interp: str = "bilinear"
    hinge_smooth: float = 0.3
    boundary_weight: float = 100.0
    expert_iters: int = 150
    goal_tolerance: float = 0.1

    def __post_init__(self) -> None:
        unknown = sorted(set(self.kinds) - set(KINDS))
        checks = [
            (self.size >= 8, f"data.size must be >= 8, got {self.size}"),
            (self.extent > 0, f"data.extent must be > 0, got {self.extent}"),
            (bool(self.kinds) and not unknown,
             f"data.kinds must be a non-empty list of {list(KINDS)}, got {list(self.kinds)}"),
            (len(self.obstacles) == 2 and 0 <= self.obstacles[0] <= self.obstacles[1],
             f"data.obstacles must be (min, max) with 0 <= min <= max, got {self.obstacles}"),
            (len(self.obstacle_size) == 2 and 0 < self.obstacle_size[0] <= self.obstacle_size[1],
             f"data.obstacle_size must be (min, max) > 0, got {self.obstacle_size}"),
            (self.num_states >= 3, f"data.num_states must be >= 3, got {self.num_states}"),
            (self.total_time > 0, f"data.total_time must be > 0, got {self.total_time}"),
            (self.qc > 0, f"data.qc must be > 0, got {self.qc}"),
            (self.robot_radius > 0, f"data.robot_radius must be > 0, got {self.robot_radius}"),
            (self.sdf_interp in ("bilinear", "bicubic"),
             f"data.sdf_interp must be 'bilinear' or 'bicubic', got {self.sdf_interp!r}"),
            (self.hinge_smooth >= 0, f"data.hinge_smooth must be >= 0, got {self.hinge_smooth}"),
            (self.safety >= 0, f"data.safety must be >= 0, got {self.safety}"),
            (0 < self.min_distance < 2 * self.extent,
             f"data.min_distance must be in (0, {2 * self.extent}), got {self.min_distance}"),
            (self.gap > 2 * self.robot_radius,
             f"data.gap must exceed the robot's diameter {2 * self.robot_radius}, got {self.gap}"),
            (self.expert_iters >= 1, f"data.expert_iters must be >= 1, got {self.expert_iters}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def cell(self) -> float:
        """The side of a grid cell."""
        return 2 * self.extent / self.size

    @property
    def origin(self) -> tuple[float, float]:
        """The map's lower-left corner."""
        return (-self.extent, -self.extent)

    @property
    def dt(self) -> float:
        """Time between consecutive support states."""
        return self.total_time / (self.num_states - 1)

    @property
    def eps(self) -> float:
        """The collision hinge's threshold on the signed distance."""
        return self.robot_radius + self.safety
