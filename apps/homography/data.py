"""Image pairs related by a known homography, cut from real photographs shipped inside the
scikit-image wheel (``skimage/data/*.png|jpg``, read from the installed package; nothing is
fetched), split by image: held-out pairs come from images never seen in training.

A pair follows DeTone et al., "Deep image homography estimation" (2016): each photograph is
converted to gray levels in ``[0, 1]`` and resized so its shorter side is ``image_size``; a crop of
``patch + 2 margin`` pixels is taken at a random place (re-drawn up to 20 times while the patch's
standard deviation is below ``min_std``: no blank sky); the source is the central ``patch x patch``
square; its four corners are moved by offsets drawn uniformly in ``[-rho, rho]^2``, and the
target is the crop sampled (bilinearly, ``grid_sample``) at the homography ``H`` that maps the
square's corners to the moved ones, so ``target(p) = source(H p)`` wherever ``H p`` is inside the
source. Because ``rho <= margin`` the moved corners stay in the crop: no black border enters the
target. The target then gets photometric jitter: gamma, contrast, brightness and Gaussian noise.

Coordinates: a patch pixel ``(column, row)`` in ``0..patch-1`` has normalized coordinates
``x = (pixel - c) / c``, ``c = (patch - 1) / 2``, so the corner pixels are at ``+-1``; ``H`` acts on
these (``core.costs.homography``'s parameters ``h``).

Samples are generated per seed (a held-out seed draws from the held-out images) and cached.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import Tensor

from apps.common import cached
from core.costs.homography import degenerate, params_from_matrix, warp

#: training photographs (two views of one motorcycle stay on one side of the split)
TRAIN_IMAGES = ("astronaut", "brick", "cell", "chelsea", "coins", "grass", "hubble_deep_field",
                "ihc", "moon", "motorcycle_left", "motorcycle_right", "page", "retina", "rocket",
                "text")
#: held-out photographs
VAL_IMAGES = ("camera", "coffee", "gravel")
_ATTEMPTS = 20


@dataclass(frozen=True)
class PairSpec:
    """How pairs are generated (lengths in pixels).

    Fields:
        patch: side of the square source and target patches.
        margin: extra pixels around the patch in the crop the target is sampled from (>= rho).
        rho: corner offsets are uniform in ``[-rho, rho]`` per axis (held-out pairs).
        train_rho: the same for training pairs (null: ``rho``).
        image_size: each photograph is resized so its shorter side is this.
        min_std: re-draw a crop whose source patch has a gray-level std below this.
        train_images, val_images: photograph names (``skimage/data/<name>.png|jpg``).
        gamma: ``(min, max)`` gamma of the target (log-uniform).
        contrast: ``(min, max)`` contrast factor.
        brightness: maximum absolute brightness shift.
        noise: maximum std of the additive Gaussian noise (uniform in ``[0, noise]``).
    """

    patch: int = 128
    margin: int = 32
    rho: float = 16.0
    train_rho: float | None = None
    image_size: int = 240
    min_std: float = 0.05
    train_images: tuple[str, ...] = TRAIN_IMAGES
    val_images: tuple[str, ...] = VAL_IMAGES
    gamma: tuple[float, float] = (0.7, 1.4)
    contrast: tuple[float, float] = (0.7, 1.3)
    brightness: float = 0.1
    noise: float = 0.02

    def __post_init__(self) -> None:
        if self.patch < 16:
            raise ValueError(f"PairSpec.patch must be >= 16, got {self.patch}")
        for name in ("rho", "train_rho"):
            rho = getattr(self, name)
            if rho is not None and not 0 <= rho <= self.margin:
                raise ValueError(f"{name} = {rho} must be in [0, margin = {self.margin}]: the "
                                 "moved corners must stay inside the crop the target is sampled "
                                 "from")
            if rho is not None and rho > self.patch / 4:
                raise ValueError(f"{name} = {rho} must be at most patch / 4 = {self.patch / 4}")
        if self.image_size < self.patch + 2 * self.margin:
            raise ValueError(f"image_size = {self.image_size} must be at least patch + 2 margin "
                             f"= {self.patch + 2 * self.margin}")
        overlap = set(self.train_images) & set(self.val_images)
        if overlap or not self.train_images or not self.val_images:
            raise ValueError(f"train_images and val_images must be non-empty and disjoint; "
                             f"shared: {sorted(overlap)}")
        if not (0 < self.gamma[0] <= self.gamma[1] and 0 < self.contrast[0] <= self.contrast[1]):
            raise ValueError(f"gamma and contrast must be positive (min, max), got {self.gamma}, "
                             f"{self.contrast}")


@dataclass(frozen=True, eq=False)
class Pair:
    """One source/target pair.

    Attributes:
        source: ``(P, P)`` gray levels of the source patch.
        target: ``(P, P)`` the warped, photometrically jittered target patch.
        offsets: ``(4, 2)`` true corner offsets in pixels (corners in the order of
            :func:`corners`): ``H`` maps corner ``i`` to ``corner_i + offsets_i``.
        h: ``(8,)`` the true homography's parameters (normalized coordinates, target -> source).
        image: the photograph's name.
        rho: the corner-offset range it was drawn with.
    """

    source: Tensor
    target: Tensor
    offsets: Tensor
    h: Tensor
    image: str
    rho: float

    def as_dict(self) -> dict[str, object]:
        return {"source": self.source, "target": self.target, "offsets": self.offsets,
                "h": self.h, "image": self.image, "rho": self.rho}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> Pair:
        return cls(d["source"], d["target"], d["offsets"], d["h"], str(d["image"]),  # type: ignore[arg-type]
                   float(d["rho"]))  # type: ignore[arg-type]


def corners(dtype: torch.dtype = torch.float32) -> Tensor:
    """``(4, 2)`` the patch's corners in normalized coordinates, around the square."""
    return torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=dtype)


def image_dir() -> Path:
    """The installed scikit-image's ``data`` folder (photographs ship inside the wheel)."""
    import skimage.data

    return Path(skimage.data.__file__).parent


def to_gray(image: np.ndarray, name: str = "image") -> Tensor:
    """``(H, W)`` float32 gray levels in ``[0, 1]`` from a ``uint8``/``uint16``/float image
    ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` (alpha dropped)."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array, got {type(image).__name__}")
    if image.ndim == 3 and image.shape[2] in (3, 4):
        weights = np.array([0.2125, 0.7154, 0.0721])  # ITU-R 709 luminance, as skimage
        channels = image[..., :3]
    elif image.ndim == 2:
        weights, channels = None, image
    else:
        raise ValueError(f"{name}: expected (H, W), (H, W, 3) or (H, W, 4), got shape "
                         f"{image.shape}")
    if image.dtype == np.uint8 or image.dtype == np.uint16:
        scaled = channels.astype(np.float64) / np.iinfo(image.dtype).max
    elif np.issubdtype(image.dtype, np.floating):
        scaled = channels.astype(np.float64)
        if scaled.size and (scaled.min() < 0 or scaled.max() > 1):
            raise ValueError(f"{name}: float images must lie in [0, 1], got [{scaled.min():.3g}, "
                             f"{scaled.max():.3g}]")
    else:
        raise ValueError(f"{name}: dtype {image.dtype} is not uint8, uint16 or float")
    gray = scaled if weights is None else scaled @ weights
    return torch.from_numpy(np.ascontiguousarray(gray)).float()


@functools.lru_cache(maxsize=64)
def load_image(name: str, image_size: int) -> Tensor:
    """Photograph ``name`` from the scikit-image wheel as ``(H, W)`` gray levels, resized
    (antialiased) so the shorter side is ``image_size``."""
    matches = sorted(image_dir().glob(f"{name}.*"))
    matches = [m for m in matches if m.suffix in (".png", ".jpg")]
    if not matches:
        raise ValueError(f"no photograph {name!r} in {image_dir()}")
    import skimage.io

    gray = to_gray(skimage.io.imread(matches[0]), name)
    scale = image_size / min(gray.shape)
    size = (round(gray.shape[0] * scale), round(gray.shape[1] * scale))
    resized = nnf.interpolate(gray[None, None], size=size, mode="bilinear", antialias=True,
                              align_corners=False)
    return resized[0, 0].clamp(0, 1)


def pixel_grid(size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(size * size, 2)`` normalized coordinates of a ``size x size`` patch's pixels, row-major
    (column varies fastest)."""
    ax = torch.linspace(-1.0, 1.0, size, dtype=dtype)
    y, x = torch.meshgrid(ax, ax, indexing="ij")
    return torch.stack([x, y], dim=-1).reshape(-1, 2)


def homography_from_offsets(offsets: Tensor, patch: int) -> Tensor:
    """``(..., 8)`` parameters of the homography that moves the corners by ``offsets (..., 4, 2)``
    pixels (DLT with ``h33 = 1``, in float64)."""
    c = (patch - 1) / 2
    src = corners(torch.float64).expand(*offsets.shape[:-2], 4, 2)
    dst = src + offsets.double() / c
    x, y, u, v = src[..., 0], src[..., 1], dst[..., 0], dst[..., 1]
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], dim=-1)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], dim=-1)
    A = torch.stack([rows_u, rows_v], dim=-2).flatten(-3, -2)  # (..., 8, 8)
    b = torch.stack([u, v], dim=-1).flatten(-2)
    H = torch.cat([torch.linalg.solve(A, b), torch.ones_like(b[..., :1])], dim=-1)
    return params_from_matrix(H.reshape(*H.shape[:-1], 3, 3))


def warp_patch(crop: Tensor, h: Tensor, patch: int, margin: int) -> Tensor:
    """``(P, P)``: ``crop (P + 2m, P + 2m)`` sampled at ``H(h)`` of each patch pixel (the patch
    sits at ``margin`` in the crop)."""
    c = (patch - 1) / 2
    xw, _ = warp(h.double(), pixel_grid(patch, torch.float64))
    pixel = c * xw + c + margin  # crop pixels (column, row)
    grid = pixel / (crop.shape[-1] - 1) * 2 - 1
    out = nnf.grid_sample(crop.double()[None, None], grid.reshape(1, patch, patch, 2),
                          mode="bilinear", align_corners=True)
    return out[0, 0].float()


def jitter(target: Tensor, spec: PairSpec, gen: torch.Generator) -> Tensor:
    """Gamma, contrast (about the mean), brightness and Gaussian noise on ``target (P, P)``."""
    u = torch.rand(4, generator=gen, dtype=torch.float64).tolist()
    lo, hi = math.log(spec.gamma[0]), math.log(spec.gamma[1])
    gamma = math.exp(lo + (hi - lo) * u[0])
    contrast = spec.contrast[0] + (spec.contrast[1] - spec.contrast[0]) * u[1]
    brightness = spec.brightness * (2 * u[2] - 1)
    out = target.clamp(0, 1) ** gamma
    out = (out - out.mean()) * contrast + out.mean() + brightness
    noise = spec.noise * u[3] * torch.randn(target.shape, generator=gen)
    return (out + noise).clamp(0, 1)


def make_pair(image: Tensor, spec: PairSpec, gen: torch.Generator, name: str = "image",
              rho: float | None = None) -> Pair:
    """One pair from gray ``image (H, W)`` (float in ``[0, 1]``) with corner offsets in
    ``[-rho, rho]`` (default ``spec.rho``); see the module docstring."""
    check_image(image, spec, name)
    rho = spec.rho if rho is None else rho
    if not 0 <= rho <= spec.margin:
        raise ValueError(f"rho = {rho} must be in [0, margin = {spec.margin}]")
    P, m = spec.patch, spec.margin
    side = P + 2 * m
    H, W = image.shape
    for _ in range(_ATTEMPTS):
        r = int(torch.randint(0, H - side + 1, (1,), generator=gen))
        c = int(torch.randint(0, W - side + 1, (1,), generator=gen))
        crop = image[r : r + side, c : c + side]
        if float(crop[m : m + P, m : m + P].std()) >= spec.min_std:
            break
    offsets = rho * (2 * torch.rand(4, 2, generator=gen, dtype=torch.float64) - 1)
    h = homography_from_offsets(offsets, P)
    if bool(degenerate(h, corners(torch.float64))):  # cannot happen for rho < patch / 4
        raise ValueError(f"corner offsets {offsets.tolist()} give a degenerate homography")
    target = jitter(warp_patch(crop, h, P, m), spec, gen)
    return Pair(crop[m : m + P, m : m + P].clone(), target, offsets.float(), h.float(), name,
                float(rho))


def check_image(image: Tensor, spec: PairSpec, name: str = "image") -> None:
    """Raise ``ValueError`` naming the problem unless ``image`` is a float ``(H, W)`` tensor of
    gray levels with both sides at least ``patch + 2 margin``."""
    side = spec.patch + 2 * spec.margin
    if not isinstance(image, Tensor) or not image.is_floating_point():
        raise ValueError(f"{name}: expected a float tensor of gray levels, got "
                         f"{getattr(image, 'dtype', type(image).__name__)}")
    if image.ndim != 2:
        raise ValueError(f"{name}: expected one channel (H, W), got shape {tuple(image.shape)} "
                         "(convert color images with apps.homography.data.to_gray)")
    if min(image.shape) < side:
        raise ValueError(f"{name}: size {tuple(image.shape)} is smaller than patch + 2 margin = "
                         f"{side} on a side")


def generate(spec: PairSpec, seed: int, held_out: bool) -> Pair:
    """The pair of ``seed``: a photograph of the held-out or training list, then
    :func:`make_pair`."""
    gen = torch.Generator().manual_seed(seed)
    names = spec.val_images if held_out else spec.train_images
    name = names[int(torch.randint(0, len(names), (1,), generator=gen))]
    rho = spec.rho if held_out or spec.train_rho is None else spec.train_rho
    return make_pair(load_image(name, spec.image_size), spec, gen, name, rho)


def make_dataset(spec: PairSpec, seeds: Sequence[int], held_out: Sequence[bool],
                 cache: Path | None = None) -> list[Pair]:
    """One pair per seed (``held_out[k]``: from the held-out photographs), cached."""
    key = {**asdict(spec), "seeds": list(seeds), "held_out": list(held_out), "version": 1}
    return cached(cache, "homography_pairs", key,
                  lambda: [generate(spec, s, v) for s, v in zip(seeds, held_out)],
                  Pair.as_dict, Pair.from_dict)
