"""Synthetic thoraco-abdominal CT phantoms: the embedded default data of every bundle and of the tests.

Each phantom is a CT volume in Hounsfield units with a matching organ label map, written as NIfTI
with a RAS affine (array axes point to patient Right, Anterior, Superior; spacing on the diagonal;
the volume centred on the world origin). The anatomy is laid out relative to the field of view, so
every shape and spacing shows every organ (at 128^3 voxels of 1.5 mm the body is about 160 mm wide,
a scaled-down adult): body outline with subcutaneous fat and muscle wall,
bowel and visceral fat, lungs above a two-domed diaphragm with branching vessel trees, heart,
liver with its own vessel tree, spleen, kidneys (cortex, medulla, sinus fat), aorta, spine
(vertebral bodies with cortical shell and trabecular core, discs, posterior arches) and ribs.
Sizes, positions, rotations, shapes and textures are drawn from a seeded generator, so the same
seed gives the same bytes on disk and different seeds give different anatomy. The image is
blurred by a small point-spread function and carries white plus spatially correlated noise.
``soft_tissue_contrast`` below 1 pulls the soft tissues' mean CT numbers towards muscle's (0: all
equal), leaving the anatomy as it is: organs then differ from each other by shape, position and
texture rather than by intensity.

CLI: ``python -m medssl.data.phantoms --out DIR --num 8 --seed 0 --size 128`` (also installed as
``medssl-phantoms``) writes an MSD-style ``dataset.json`` with ``imagesTr/`` and ``labelsTr/``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import scipy.fft

__all__ = [
    "LABELS", "LABEL_IDS", "HU", "SOFT_TISSUES", "GENERATOR", "tissue_numbers", "generate_phantom",
    "write_phantom_dataset", "main",
]

GENERATOR = "medssl.data.phantoms"  # recorded in dataset.json, so a phantom dataset can be recognised

LABELS: dict[int, str] = {
    0: "background",
    1: "liver",
    2: "spleen",
    3: "kidney_right",
    4: "kidney_left",
    5: "lung",
    6: "bone",
    7: "aorta",
}
LABEL_IDS: dict[str, int] = {name: index for index, name in LABELS.items()}

# Mean CT numbers (HU) of unenhanced tissue; textures and noise are added around them.
HU: dict[str, float] = {
    "air": -1000.0,
    "lung": -850.0,
    "fat": -100.0,
    "visceral_fat": -90.0,
    "bowel": 25.0,
    "bowel_gas": -950.0,
    "muscle": 45.0,
    "heart": 40.0,
    "liver": 60.0,
    "liver_vessel": 38.0,
    "spleen": 50.0,
    "kidney_cortex": 35.0,
    "kidney_medulla": 24.0,
    "aorta": 42.0,
    "calcification": 500.0,
    "lung_vessel": 40.0,
    "disc": 90.0,
    "canal": 15.0,
    "cancellous_bone": 450.0,
    "cortical_bone": 900.0,
    "rib_marrow": 420.0,
}

# The tissues that ``soft_tissue_contrast`` pulls towards SOFT_TISSUE_REFERENCE: the organs of
# LABELS but lung and bone, and the soft tissue around them; fat, air, lung, bone, calcification
# and the spine's discs and canal keep their numbers.
SOFT_TISSUES = ("bowel", "muscle", "heart", "liver", "liver_vessel", "spleen", "kidney_cortex", "kidney_medulla",
                "aorta", "lung_vessel")
SOFT_TISSUE_REFERENCE = "muscle"

DATASET_NAME = "medssl_phantom_ct"
_PSF_SIGMA_MM = 0.9  # in-plane resolution blur of a soft-kernel CT reconstruction


@dataclass(frozen=True)
class _Grid:
    """Voxel-centre coordinates in mm (broadcastable: x (X,1,1), y (1,Y,1), z (1,1,Z))."""

    shape: tuple[int, int, int]
    spacing: np.ndarray  # (3,) mm
    half_extent: np.ndarray  # (3,) mm from the centre to the outermost voxel centre
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray

    @classmethod
    def create(cls, shape: Sequence[int], spacing: Sequence[float]) -> _Grid:
        shape3 = tuple(int(s) for s in shape)
        spacing3 = np.asarray(spacing, dtype=np.float64)
        axes = [((np.arange(n, dtype=np.float32) - (n - 1) / 2) * np.float32(s)) for n, s in zip(shape3, spacing3)]
        half = np.array([max((n - 1) / 2 * s, s) for n, s in zip(shape3, spacing3)])
        return cls(
            shape=shape3,  # type: ignore[arg-type]
            spacing=spacing3,
            half_extent=half,
            x=axes[0][:, None, None],
            y=axes[1][None, :, None],
            z=axes[2][None, None, :],
        )

    def box(self, center: np.ndarray, radius: np.ndarray) -> tuple[slice, slice, slice]:
        """Voxel slices covering the axis-aligned box centre +- radius (mm), clipped to the volume."""
        lo = np.floor((center - radius) / self.spacing + (np.array(self.shape) - 1) / 2).astype(int)
        hi = np.ceil((center + radius) / self.spacing + (np.array(self.shape) - 1) / 2).astype(int) + 1
        lo = np.clip(lo, 0, self.shape)
        hi = np.clip(hi, 0, self.shape)
        return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))  # type: ignore[return-value]

    def to_voxel(self, points_mm: np.ndarray) -> np.ndarray:
        return points_mm / self.spacing + (np.array(self.shape) - 1) / 2


def _gaussian_spectrum(shape: tuple[int, ...], sigma_vox: Sequence[float]) -> np.ndarray:
    """Transfer function of a Gaussian blur on the ``rfftn`` grid of ``shape`` (float32, separable)."""
    transfer = np.ones((1,) * len(shape), dtype=np.float32)
    for axis, (n, sigma) in enumerate(zip(shape, sigma_vox)):
        freq = np.fft.rfftfreq(n) if axis == len(shape) - 1 else np.fft.fftfreq(n)
        profile = np.exp(-2.0 * (np.pi * sigma * freq) ** 2).astype(np.float32)
        transfer = transfer * profile.reshape([-1 if i == axis else 1 for i in range(len(shape))])
    return transfer


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: float) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian random field with correlation length ``sigma_vox`` voxels (float32).

    The random spectrum is drawn directly on the half (rfft) grid and shaped by a Gaussian, so any
    correlation length costs one inverse FFT.
    """
    half_shape = (*shape[:-1], shape[-1] // 2 + 1)
    spectrum = np.empty(half_shape, dtype=np.complex64)
    spectrum.real = rng.standard_normal(half_shape, dtype=np.float32)
    spectrum.imag = rng.standard_normal(half_shape, dtype=np.float32)
    spectrum *= _gaussian_spectrum(shape, [sigma_vox] * len(shape))
    spectrum[(0,) * len(shape)] = 0.0  # zero mean
    field = scipy.fft.irfftn(spectrum, s=shape, overwrite_x=True)
    field /= field[tuple(slice(None, None, 3) for _ in shape)].std() + np.float32(1e-12)  # a subsample suffices
    return field


def _gaussian_blur(volume: np.ndarray, sigma_vox: Sequence[float]) -> np.ndarray:
    """Anisotropic Gaussian blur through the FFT (periodic edges: the phantom's border is air)."""
    spectrum = scipy.fft.rfftn(volume)
    spectrum *= _gaussian_spectrum(volume.shape, sigma_vox)
    return scipy.fft.irfftn(spectrum, s=volume.shape, overwrite_x=True)


def _rotation(
    rng: np.random.Generator, max_degrees: Sequence[float], base_degrees: Sequence[float] = (0, 0, 0)
) -> np.ndarray:
    """Rotation matrix with angles about x, y, z of ``base_degrees`` plus uniform jitter within +-max_degrees."""
    ax, ay, az = (np.deg2rad(base + rng.uniform(-m, m)) for m, base in zip(max_degrees, base_degrees))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _ellipsoid(
    grid: _Grid, center: np.ndarray, radii: np.ndarray, rotation: np.ndarray | None = None
) -> tuple[tuple[slice, slice, slice], np.ndarray]:
    """Normalised squared radius of a (rotated) ellipsoid on its bounding box: < 1 inside.

    Returns the box slices and the field on that box (float32).
    """
    box = grid.box(center, np.full(3, radii.max()))
    dx = grid.x[box[0]] - np.float32(center[0])
    dy = grid.y[:, box[1]] - np.float32(center[1])
    dz = grid.z[:, :, box[2]] - np.float32(center[2])
    rot = np.eye(3) if rotation is None else rotation
    field = np.zeros(tuple(s.stop - s.start for s in box), dtype=np.float32)
    for axis in range(3):  # coordinates in the ellipsoid's own frame: rot^T (p - c)
        local = rot[0, axis] * dx + rot[1, axis] * dy + rot[2, axis] * dz
        field += (local / np.float32(radii[axis])) ** 2
    return box, field


def _tube_coverage(grid: _Grid, points_mm: np.ndarray, radii_mm: np.ndarray) -> np.ndarray:
    """Partial-volume fraction in [0, 1] of a union of spheres swept along sampled centre lines.

    ``points_mm`` (M, 3) are centre-line samples (spaced below a voxel), ``radii_mm`` (M,) their
    radii. A voxel at distance d from a centre point gets clip((r - d) / voxel + 0.5, 0, 1) (a
    linear edge), scaled by min(1, pi r^2 / voxel^2) so a tube thinner than a voxel fills only its
    cross-section's share; the union takes the maximum over points. Points are grouped by radius so
    thin branches only visit a small neighbourhood.
    """
    voxel_size = np.float32(grid.spacing.min())
    shape = np.array(grid.shape)
    if len(points_mm) == 0:
        return np.zeros(grid.shape, dtype=np.float32)
    # a voxel is touched when |offset - frac| < r / voxel + 0.5 with |frac| <= 0.5 per axis
    reach = np.floor(radii_mm / voxel_size + 1.0).astype(int)
    pad = int(np.ceil(reach.max() * voxel_size / grid.spacing).max())
    padded = shape + 4 * pad
    coverage = np.zeros(int(np.prod(padded)), dtype=np.float32)
    strides = np.array([padded[1] * padded[2], padded[2], 1])
    centers = grid.to_voxel(points_mm)
    base = np.round(centers).astype(int)
    inside = np.all((base >= -pad) & (base < shape + pad), axis=1)  # branches that leave the volume are dropped
    spacing = grid.spacing.astype(np.float32)
    radii = radii_mm.astype(np.float32)
    thin_factor = np.minimum(1.0, np.pi * (radii / voxel_size) ** 2)
    for half in np.unique(reach[inside]):
        chosen = inside & (reach == half)
        per_axis = [np.arange(-h, h + 1) for h in np.ceil(half * voxel_size / grid.spacing).astype(int)]
        offsets = np.stack(np.meshgrid(*per_axis, indexing="ij"), axis=-1).reshape(-1, 3)  # (K, 3)
        frac = (centers[chosen] - base[chosen]).astype(np.float32)  # (M, 3)
        dist2 = sum(((offsets[None, :, i] - frac[:, i, None]) * spacing[i]) ** 2 for i in range(3))  # (M, K)
        value = np.clip((radii[chosen, None] - np.sqrt(dist2)) / voxel_size + 0.5, 0.0, 1.0)
        value *= thin_factor[chosen, None]
        flat = ((base[chosen] + 2 * pad) @ strides)[:, None] + (offsets @ strides)[None]  # (M, K)
        touched = value > 0
        np.maximum.at(coverage, flat[touched], value[touched])
    core = tuple(slice(2 * pad, 2 * pad + n) for n in grid.shape)
    return coverage.reshape(padded)[core]


def _branching_tree(
    rng: np.random.Generator,
    root: np.ndarray,
    direction: np.ndarray,
    length: float,
    radius: float,
    generations: int,
    step: float,
    spread_degrees: tuple[float, float] = (22.0, 42.0),
    length_decay: float = 0.78,
    radius_decay: float = 0.72,
) -> tuple[np.ndarray, np.ndarray]:
    """Random bifurcating tree of line segments, sampled every ``step`` mm.

    Every segment splits into two children turned by a random angle in ``spread_degrees`` about a
    random axis perpendicular to it; lengths and radii shrink by the decay factors per generation.
    All segments of a generation are built at once. Returns centre points (M, 3) and radii (M,) mm.
    """
    starts = root[None].astype(np.float64)
    dirs = (direction / np.linalg.norm(direction))[None]
    lengths = np.array([length])
    radii = np.array([radius])
    points, point_radii = [], []
    for _ in range(generations):
        ends = starts + dirs * lengths[:, None]
        counts = np.maximum(np.ceil(lengths / step).astype(int), 1)
        seg = np.repeat(np.arange(len(starts)), counts)
        t = (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)) / np.repeat(counts, counts)
        points.append(starts[seg] + (ends - starts)[seg] * t[:, None])
        point_radii.append(radii[seg] * (1.0 - 0.15 * t))
        # two children per segment: rotate the direction about a random perpendicular axis
        parent_dirs = np.repeat(dirs, 2, axis=0)
        helper = rng.standard_normal(parent_dirs.shape)
        perpendicular = np.cross(parent_dirs, helper)
        perpendicular /= np.linalg.norm(perpendicular, axis=1, keepdims=True) + 1e-12
        angle = np.deg2rad(rng.uniform(*spread_degrees, size=len(parent_dirs)))[:, None]
        dirs = parent_dirs * np.cos(angle) + perpendicular * np.sin(angle)
        starts = np.repeat(ends, 2, axis=0)
        lengths = np.repeat(lengths * length_decay, 2) * rng.uniform(0.75, 1.25, size=len(dirs))
        radii = np.repeat(radii * radius_decay, 2)
    return np.concatenate(points), np.concatenate(point_radii)


@dataclass(frozen=True)
class _Body:
    """Body outline (mm): a superellipse with low-order contour ripples whose semi-axes vary along z."""

    cx: float
    cy: float
    a: float  # mean semi-axis along x (left-right)
    b: float  # mean semi-axis along y (anterior-posterior)
    a_z: np.ndarray  # (1, 1, Z) semi-axis along x per slice
    b_z: np.ndarray
    power: float  # superellipse exponent: 2 = ellipse, larger = boxier
    harmonics: tuple[tuple[int, float, float], ...]  # (order, amplitude, phase) of the contour ripples
    fat: float  # subcutaneous fat thickness, fraction of the radius
    muscle: float  # muscle wall thickness, fraction of the radius

    @classmethod
    def draw(cls, rng: np.random.Generator, grid: _Grid) -> _Body:
        hx, hy, hz = grid.half_extent
        semi_x = rng.uniform(0.74, 0.88) * hx
        semi_y = min(semi_x * rng.uniform(0.62, 0.78), 0.9 * hy)
        zn = grid.z / np.float32(hz)  # (1,1,Z) in [-1, 1]
        widening = rng.uniform(-0.08, 0.04)
        ripples = [
            rng.uniform(0.0, 0.05) * np.sin(np.pi * rng.uniform(0.5, 1.5) * zn + rng.uniform(0, 2 * np.pi))
            for _ in range(2)
        ]
        return cls(
            cx=rng.uniform(-0.04, 0.04) * hx,
            cy=rng.uniform(-0.06, 0.02) * hy,
            a=semi_x,
            b=semi_y,
            a_z=(semi_x * (1 + widening * zn + ripples[0])).astype(np.float32),
            b_z=(semi_y * (1 + 0.5 * widening * zn + ripples[1])).astype(np.float32),
            power=rng.uniform(2.0, 2.6),
            harmonics=tuple((k, rng.uniform(0, 0.025), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4, 5)),
            fat=rng.uniform(0.05, 0.16),
            muscle=rng.uniform(0.05, 0.08),
        )

    def contour_scale(self, theta: np.ndarray) -> np.ndarray:
        """Radial scale of the contour along polar angle ``theta`` (measured in the normalised frame)."""
        scale = np.ones_like(theta)
        for k, amplitude, phase in self.harmonics:
            scale += amplitude * np.cos(k * theta + phase)
        return scale

    def radius(self, grid: _Grid) -> np.ndarray:
        """Normalised radius rho (X, Y, Z): 1 on the skin, below 1 inside."""
        dx = (grid.x - np.float32(self.cx)) / self.a_z
        dy = (grid.y - np.float32(self.cy)) / self.b_z
        p = np.float32(self.power)
        rho = (np.abs(dx) ** p + np.abs(dy) ** p) ** (1 / p) / self.contour_scale(np.arctan2(dy, dx))
        return rho.astype(np.float32)

    def contour_points(self, phi: np.ndarray, rho: float, slice_index: int) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) mm of the points at normalised radius ``rho`` and polar angles ``phi`` in one axial slice."""
        p = self.power
        radial = rho * self.contour_scale(phi) / (np.abs(np.cos(phi)) ** p + np.abs(np.sin(phi)) ** p) ** (1 / p)
        x = self.cx + radial * np.cos(phi) * float(self.a_z[0, 0, slice_index])
        y = self.cy + radial * np.sin(phi) * float(self.b_z[0, 0, slice_index])
        return x, y


@dataclass
class _Canvas:
    """What the drawing steps share: the grid, the generator, two random fields and the two volumes."""

    grid: _Grid
    rng: np.random.Generator
    body: _Body
    deform: np.ndarray  # smooth unit field: organ outlines, fat thickness
    fine: np.ndarray  # voxel-scale unit field: parenchyma and trabecular texture
    hu: np.ndarray  # (X, Y, Z) float32 CT numbers being drawn
    label: np.ndarray  # (X, Y, Z) uint8 organ ids being drawn
    tissue_hu: dict[str, float]  # mean CT number of each tissue (tissue_numbers)

    def paint(self, mask: np.ndarray, tissue: str, texture: float) -> None:
        """Set ``mask`` to a tissue's mean HU plus ``texture`` HU of the fine field."""
        self.hu[mask] = self.tissue_hu[tissue] + texture * self.fine[mask]

    def blend(self, coverage: np.ndarray, values: np.ndarray | float) -> None:
        """Partial-volume mix: a voxel covered by fraction c becomes (1 - c) * itself + c * value."""
        self.hu += coverage * (values - self.hu)

    def slice_index(self, z_mm: float) -> int:
        grid = self.grid
        return int(np.clip(np.round(z_mm / grid.spacing[2] + (grid.shape[2] - 1) / 2), 0, grid.shape[2] - 1))


@dataclass(frozen=True)
class _Trunk:
    """Compartments of the trunk shared by the organ steps (boolean volumes unless noted)."""

    rho: np.ndarray  # normalised body radius
    inside_body: np.ndarray
    fat_inner: np.ndarray  # normalised radius where subcutaneous fat ends
    cavity: np.ndarray  # inside the muscle wall
    thorax: np.ndarray
    abdomen: np.ndarray
    diaphragm: np.ndarray  # (X, Y, 1) mm height of the diaphragm
    dome_right: float
    dome_left: float


@dataclass(frozen=True)
class _Spine:
    """Where the spinal column runs (mm) and how it is segmented along z."""

    x: float
    y: np.ndarray  # (1, 1, Z): the column follows a gentle curve
    body_rx: float  # vertebral body semi-axes
    body_ry: float
    canal_r: float
    pitch: float  # vertebral level height
    phase: float  # z of the first disc
    disc_fraction: float  # share of a level taken by its disc


def _draw_trunk(canvas: _Canvas) -> _Trunk:
    """Body wall (fat, muscle), diaphragm, bowel with gas in the abdomen, mediastinal fat in the thorax."""
    grid, rng, body = canvas.grid, canvas.rng, canvas.body
    hz = grid.half_extent[2]
    rho = body.radius(grid)
    fat_inner = 1.0 - body.fat * (1.0 + 0.45 * canvas.deform)
    muscle_inner = fat_inner - body.muscle
    inside_body = rho <= 1.0
    canvas.paint(inside_body, "fat", 12.0)
    canvas.paint(inside_body & (rho <= fat_inner) & (rho > muscle_inner), "muscle", 6.0)
    cavity = rho <= muscle_inner

    # two domes, the right one higher, both lower posteriorly (costophrenic recess)
    dome_right = rng.uniform(0.15, 0.4) * hz
    dome_left = dome_right - rng.uniform(0.02, 0.12) * hz
    curvature = rng.uniform(0.5, 0.8) * hz
    posterior_drop = rng.uniform(0.1, 0.25) * hz
    xn = (grid.x - np.float32(body.cx)) / np.float32(body.a)
    yn = (grid.y - np.float32(body.cy)) / np.float32(body.b)
    diaphragm = np.maximum(dome_right - curvature * (xn - 0.4) ** 2, dome_left - curvature * (xn + 0.4) ** 2)
    diaphragm = diaphragm + posterior_drop * np.minimum(yn, 0.0)
    thorax = cavity & (grid.z > diaphragm)
    abdomen = cavity & ~thorax

    # bowel loops are sheets around the zero crossings of a smooth field; gas collects in some
    vox_mm = float(grid.spacing.min())
    bowel_field = _smooth_noise(rng, grid.shape, max(0.05 * body.a / vox_mm, 1.0))
    gas_field = _smooth_noise(rng, grid.shape, max(0.065 * body.a / vox_mm, 1.0))
    bowel = abdomen & (np.abs(bowel_field) < rng.uniform(0.35, 0.6))
    canvas.paint(abdomen | thorax, "visceral_fat", 10.0)
    canvas.paint(bowel, "bowel", 8.0)
    canvas.paint(bowel & (gas_field > rng.uniform(1.4, 2.0)), "bowel_gas", 20.0)
    return _Trunk(rho, inside_body, fat_inner, cavity, thorax, abdomen, diaphragm, dome_right, dome_left)


def _draw_heart(canvas: _Canvas, trunk: _Trunk) -> np.ndarray:
    grid, body = canvas.grid, canvas.body
    center = np.array([body.cx - 0.12 * body.a, body.cy + 0.2 * body.b, trunk.dome_left + 0.22 * grid.half_extent[2]])
    radii = np.array([0.3 * body.a, 0.38 * body.b, 0.3 * grid.half_extent[2]]) * canvas.rng.uniform(0.85, 1.1, 3)
    box, field = _ellipsoid(grid, center, radii, _rotation(canvas.rng, (10, 10, 25)))
    heart = np.zeros(grid.shape, dtype=bool)
    heart[box] = field < 1.0 + 0.2 * canvas.deform[box]
    heart &= trunk.thorax
    canvas.paint(heart, "heart", 6.0)
    return heart


def _place_spine(canvas: _Canvas) -> _Spine:
    grid, rng, body = canvas.grid, canvas.rng, canvas.body
    hz = grid.half_extent[2]
    body_rx = rng.uniform(0.12, 0.15) * body.a
    body_ry = body_rx * rng.uniform(0.75, 0.9)
    pitch = rng.uniform(0.17, 0.21) * hz
    return _Spine(
        x=body.cx + rng.uniform(-0.03, 0.03) * body.a,
        y=(body.cy - 0.5 * body.b + 3.0 * rng.uniform(-1, 1) * np.sin(np.pi * grid.z / hz)).astype(np.float32),
        body_rx=body_rx,
        body_ry=body_ry,
        canal_r=0.45 * body_ry,
        pitch=pitch,
        phase=rng.uniform(0, pitch),
        disc_fraction=rng.uniform(0.16, 0.24),
    )


def _draw_lungs(canvas: _Canvas, trunk: _Trunk, spine: _Spine, heart: np.ndarray) -> None:
    """Lungs (thorax outside heart and mediastinum) with hilar and peripheral vessel trees."""
    grid, rng, body = canvas.grid, canvas.rng, canvas.body
    hz = grid.half_extent[2]
    a, b = body.a, body.b
    vox_mm = float(grid.spacing.min())
    # the mediastinum widens anteriorly (heart, great vessels) and around the spine posteriorly
    yn = (grid.y - np.float32(body.cy)) / np.float32(b)
    half_width = np.maximum(
        0.12 * a * (1.0 + 0.6 * np.clip(yn, 0.0, 1.0)),
        np.where(grid.y < spine.y + spine.body_ry, 1.5 * spine.body_rx, 0.0),
    )
    wall_margin = trunk.rho <= trunk.fat_inner - body.muscle - 0.03
    lungs = trunk.thorax & ~heart & (np.abs(grid.x - np.float32(spine.x)) > half_width) & wall_margin
    canvas.hu[lungs] = canvas.tissue_hu["lung"] + 25.0 * canvas.fine[lungs] + 20.0 * canvas.deform[lungs]

    trees = []
    hilum_z = 0.5 * (max(trunk.dome_right, trunk.dome_left) + hz)
    for side in (1.0, -1.0):
        hilum = np.array([body.cx + side * 0.2 * a, body.cy + 0.05 * b, hilum_z])
        # arteries and veins fan out from the hilum: up, down, lateral, anterior, posterior
        for direction in (
            [0.3 * side, 0.0, 1.0],
            [0.3 * side, 0.2, -1.0],
            [side, 0, 0],
            [side, 0.8, 0.3],
            [side, -0.8, -0.3],
        ):
            start = np.asarray(direction, dtype=float) + rng.normal(0, 0.15, 3)
            trees.append(
                _branching_tree(
                    rng, hilum, start, 0.2 * a, 0.04 * a, 11, 0.5 * vox_mm, length_decay=0.75, radius_decay=0.78
                )
            )
    # small trees fill the periphery that the hilar trees leave empty
    low = np.array([body.cx - 0.8 * a, body.cy - 0.8 * b, min(trunk.dome_right, trunk.dome_left)])
    high = np.array([body.cx + 0.8 * a, body.cy + 0.8 * b, hz])
    for _ in range(40):
        trees.append(
            _branching_tree(rng, rng.uniform(low, high), rng.standard_normal(3), 0.07 * a, 0.018 * a, 5, 0.5 * vox_mm)
        )
    points = np.concatenate([t[0] for t in trees])
    radii = np.concatenate([t[1] for t in trees])
    canvas.blend(_tube_coverage(grid, points, radii) * lungs, canvas.tissue_hu["lung_vessel"] + 8.0 * canvas.fine)
    canvas.label[lungs] = LABEL_IDS["lung"]


def _draw_organ(
    canvas: _Canvas, name: str, center: np.ndarray, radii: np.ndarray, rotation: np.ndarray, region: np.ndarray
) -> np.ndarray:
    """Label a noise-deformed ellipsoid organ, limited to ``region``; returns its mask."""
    box, field = _ellipsoid(canvas.grid, center, radii, rotation)
    mask = np.zeros(canvas.grid.shape, dtype=bool)
    mask[box] = field < 1.0 + 0.35 * canvas.deform[box]
    mask &= region
    canvas.label[mask] = LABEL_IDS[name]
    return mask


def _draw_abdominal_organs(canvas: _Canvas, trunk: _Trunk, spine: _Spine) -> None:
    """Liver (two lobes and a vessel tree), spleen, kidneys (cortex, medulla, sinus fat)."""
    grid, rng, body = canvas.grid, canvas.rng, canvas.body
    hz = grid.half_extent[2]
    a, b, cx, cy = body.a, body.b, body.cx, body.cy
    scale = np.array([a, b, hz])
    below_diaphragm = trunk.abdomen & (grid.z < trunk.diaphragm - 0.02 * hz)

    # liver: a right lobe under the right dome and a left lobe reaching across the midline
    top = trunk.dome_right - 0.04 * hz
    right_lobe = np.array([cx + 0.42 * a, cy + 0.05 * b, top - 0.38 * hz]) + rng.normal(0, 0.03, 3) * scale
    radii = np.array([0.45, 0.65, 0.45]) * scale * rng.uniform(0.85, 1.12, 3)
    liver = _draw_organ(canvas, "liver", right_lobe, radii, _rotation(rng, (8, 8, 15)), below_diaphragm)
    left_lobe = np.array([cx, cy + 0.3 * b, top - 0.22 * hz]) + rng.normal(0, 0.03, 3) * scale
    radii = np.array([0.3, 0.25, 0.17]) * scale * rng.uniform(0.8, 1.2, 3)
    liver |= _draw_organ(canvas, "liver", left_lobe, radii, _rotation(rng, (8, 8, 20)), below_diaphragm)
    canvas.hu[liver] = canvas.tissue_hu["liver"] + 7.0 * canvas.fine[liver] + 3.0 * canvas.deform[liver]
    porta = right_lobe + np.array([-0.25 * a, 0.0, 0.05 * hz])
    points, vessel_radii = _branching_tree(
        rng,
        porta,
        np.array([1.0, 0.3, 0.4]),
        0.18 * a,
        0.035 * a,
        7,
        0.5 * float(grid.spacing.min()),
        radius_decay=0.78,
    )
    canvas.blend(_tube_coverage(grid, points, vessel_radii) * liver, canvas.tissue_hu["liver_vessel"])

    # spleen: a flattened ellipsoid under the left dome, posterior, its long axis along the ribs
    center = np.array([cx - 0.55 * a, cy - 0.3 * b, trunk.dome_left - 0.25 * hz]) + rng.normal(0, 0.03, 3) * scale
    radii = np.array([0.17, 0.38, 0.26]) * scale * rng.uniform(0.8, 1.2, 3)
    spleen = _draw_organ(canvas, "spleen", center, radii, _rotation(rng, (10, 10, 15), (0, 0, 35)), below_diaphragm)
    canvas.paint(spleen, "spleen", 5.0)

    # kidneys beside the spine, the right one lower (pushed down by the liver), hilum facing medially
    for name, side, center_z in (
        ("kidney_right", 1.0, trunk.dome_right - 0.72 * hz),
        ("kidney_left", -1.0, trunk.dome_left - 0.62 * hz),
    ):
        center = np.array([spine.x + side * 0.33 * a, cy - 0.38 * b, center_z]) + rng.normal(0, 0.02, 3) * scale
        radii = np.array([0.15, 0.2, 0.28]) * scale * rng.uniform(0.85, 1.15, 3)
        rotation = _rotation(rng, (8, 15, 20))
        box, field = _ellipsoid(grid, center, radii, rotation)
        hilum = center + np.array([-side * 0.75 * radii[0], 0.3 * radii[1], 0.0])
        sinus_box, sinus_field = _ellipsoid(grid, hilum, radii * np.array([0.45, 0.35, 0.4]), rotation)
        kidney = np.zeros(grid.shape, dtype=bool)
        kidney[box] = field < 1.0 + 0.1 * canvas.deform[box]
        medulla = np.zeros(grid.shape, dtype=bool)
        medulla[box] = field < 0.5 + 0.25 * canvas.fine[box]
        sinus = np.zeros(grid.shape, dtype=bool)
        sinus[sinus_box] = sinus_field < 1.0
        kidney &= trunk.abdomen & ~sinus
        canvas.label[kidney] = LABEL_IDS[name]
        canvas.paint(kidney, "kidney_cortex", 5.0)
        canvas.paint(medulla & kidney, "kidney_medulla", 4.0)
        canvas.paint(sinus & trunk.abdomen & ~liver, "visceral_fat", 10.0)


def _draw_aorta(canvas: _Canvas, trunk: _Trunk, spine: _Spine) -> None:
    """A round tube in front of the spine, drifting gently along z, sometimes with wall calcifications."""
    grid, rng, body = canvas.grid, canvas.rng, canvas.body
    hz = grid.half_extent[2]
    radius = rng.uniform(0.055, 0.075) * body.a
    center_x = spine.x - 0.06 * body.a + 0.03 * body.a * np.sin(np.pi * grid.z / hz + rng.uniform(0, np.pi))
    center_y = spine.y + spine.body_ry + radius + 0.03 * body.b
    aorta = (np.sqrt((grid.x - center_x) ** 2 + (grid.y - center_y) ** 2) < radius) & trunk.cavity
    canvas.label[aorta] = LABEL_IDS["aorta"]
    canvas.paint(aorta, "aorta", 5.0)
    if rng.random() < 0.6:
        count = int(rng.integers(2, 8))
        z = rng.uniform(-0.9, 0.5, count) * hz
        angle = rng.uniform(0, 2 * np.pi, count)
        slices = [canvas.slice_index(v) for v in z]
        spots = np.stack(
            [center_x[0, 0, slices] + radius * np.cos(angle), center_y[0, 0, slices] + radius * np.sin(angle), z],
            axis=1,
        )
        plaque_radius = 0.02 * body.a + 0.5 * float(grid.spacing.min())
        canvas.blend(_tube_coverage(grid, spots, np.full(count, plaque_radius)), canvas.tissue_hu["calcification"])


def _draw_spine(canvas: _Canvas, trunk: _Trunk, spine: _Spine) -> np.ndarray:
    """Vertebral bodies (cortical shell, trabecular core), discs, canal, posterior arches, paraspinal muscles.

    Returns the bone mask.
    """
    grid, body = canvas.grid, canvas.body
    vox_mm = float(grid.spacing.min())
    position = (grid.z - spine.phase) / spine.pitch
    level = np.floor(position)
    within = position - level  # (1,1,Z) in [0, 1): each level starts with its disc
    in_vertebra = within >= spine.disc_fraction
    size = 1.0 + 0.06 * np.sin(level * 1.7 + canvas.rng.uniform(0, np.pi))  # vertebrae differ in size
    centered_x = grid.x - np.float32(spine.x)
    radial = np.sqrt((centered_x / (spine.body_rx * size)) ** 2 + ((grid.y - spine.y) / (spine.body_ry * size)) ** 2)
    column = radial < 1.0
    vertebral_body = column & in_vertebra
    endplate_mm = np.minimum(within - spine.disc_fraction, 1.0 - within) * spine.pitch
    shell = vertebral_body & ((radial > 1.0 - 1.2 * vox_mm / spine.body_rx) | (endplate_mm < 1.2 * vox_mm))

    canal_y = spine.y - spine.body_ry - 1.05 * spine.canal_r
    canal_distance = np.sqrt(centered_x**2 + (grid.y - canal_y) ** 2)
    canal = (canal_distance < spine.canal_r) & trunk.inside_body
    back = np.float32(body.cy) - body.b_z * (1.0 - body.fat)  # inner edge of the posterior fat
    arch = (
        (canal_distance >= spine.canal_r)
        & (canal_distance < 1.8 * spine.canal_r)
        & (grid.y < canal_y + 0.3 * spine.canal_r)
    )
    spinous = (np.abs(centered_x) < 0.3 * spine.canal_r) & (grid.y < canal_y) & (grid.y > back + 0.06 * body.b)
    transverse = (np.abs(grid.y - canal_y) < 0.3 * spine.canal_r) & (np.abs(centered_x) < 1.6 * spine.body_rx)
    posterior = (arch | spinous | transverse) & in_vertebra & trunk.inside_body & ~column & ~canal

    gutter_y = 0.5 * (canal_y + back)
    for side in (1.0, -1.0):  # paraspinal muscles fill the gutters beside the spinous processes
        paraspinal = ((centered_x - side * 1.2 * spine.body_rx) / (1.1 * spine.body_rx)) ** 2 + (
            (grid.y - gutter_y) / (0.5 * (canal_y - back) + 1e-3)
        ) ** 2 < 1.0
        canvas.paint(
            paraspinal & trunk.inside_body & (trunk.rho <= trunk.fat_inner) & (canvas.label == 0), "muscle", 6.0
        )
    canvas.paint(column & ~in_vertebra, "disc", 8.0)
    canvas.paint(canal, "canal", 5.0)
    canvas.paint(vertebral_body & ~shell, "cancellous_bone", 90.0)
    canvas.paint(shell | posterior, "cortical_bone", 60.0)
    return vertebral_body | posterior


def _draw_ribs(canvas: _Canvas, trunk: _Trunk, spine: _Spine) -> np.ndarray:
    """Rib pairs of the thoracic levels, from the spine around the wall, sloping down anteriorly.

    Returns the bone mask of the ribs.
    """
    grid, rng, body = canvas.grid, canvas.rng, canvas.body
    hz = grid.half_extent[2]
    vox_mm = float(grid.spacing.min())
    radius = rng.uniform(0.03, 0.04) * body.a
    first = np.floor((max(trunk.dome_left, trunk.dome_right) - 0.35 * hz - spine.phase) / spine.pitch)
    last = np.ceil((hz - spine.phase) / spine.pitch)
    wall_rho = 1.0 - body.fat - 0.5 * body.muscle
    centre_lines = []
    for level in np.arange(first, last + 1):
        z_start = spine.phase + (level + 0.5 * (1 + spine.disc_fraction)) * spine.pitch
        drop = rng.uniform(1.5, 2.5) * spine.pitch
        extent = rng.uniform(0.75, 0.9) * np.pi
        sweep = np.linspace(0.0, 1.0, max(int(np.ceil(extent * body.a / (0.4 * vox_mm))), 2))
        phi = -np.pi / 2 + sweep * extent  # from posterior (-pi/2) around the side towards anterior
        for mirrored_phi in (phi, np.pi - phi):  # right side, then the left mirrored
            x, y = body.contour_points(mirrored_phi, wall_rho, canvas.slice_index(z_start))
            centre_lines.append(np.stack([x, y, z_start - drop * sweep], axis=1))
    if not centre_lines:
        return np.zeros(grid.shape, dtype=bool)
    points = np.concatenate(centre_lines)
    outer = _tube_coverage(grid, points, np.full(len(points), radius))
    marrow = _tube_coverage(grid, points, np.full(len(points), radius - min(1.2 * vox_mm, 0.7 * radius)))
    marrow_hu, cortex_hu = canvas.tissue_hu["rib_marrow"], canvas.tissue_hu["cortical_bone"]
    rib_hu = (marrow_hu * marrow + cortex_hu * (outer - marrow)) / np.maximum(outer, 1e-6)
    canvas.blend(outer, rib_hu)
    return (outer >= 0.5) & trunk.inside_body


def _acquire(canvas: _Canvas) -> np.ndarray:
    """Scanner effects: point-spread blur, white plus correlated noise (stronger for larger bodies); int16 HU."""
    grid, rng = canvas.grid, canvas.rng
    hu = _gaussian_blur(canvas.hu, _PSF_SIGMA_MM / grid.spacing)
    noise_sigma = rng.uniform(9.0, 14.0) * canvas.body.a / (0.8 * grid.half_extent[0])
    hu += noise_sigma * rng.standard_normal(grid.shape, dtype=np.float32)
    hu += 0.6 * noise_sigma * _smooth_noise(rng, grid.shape, 1.0)
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16)


def tissue_numbers(soft_tissue_contrast: float = 1.0) -> dict[str, float]:
    """Mean CT number of each tissue: :data:`HU`, with the :data:`SOFT_TISSUES` moved to
    ``reference + soft_tissue_contrast * (HU - reference)``, the reference being muscle's."""
    if soft_tissue_contrast < 0:
        raise ValueError(f"soft_tissue_contrast must be >= 0 (1: unenhanced CT, 0: all soft tissue alike), "
                         f"got {soft_tissue_contrast}")
    reference = HU[SOFT_TISSUE_REFERENCE]
    return {tissue: reference + soft_tissue_contrast * (hu - reference) if tissue in SOFT_TISSUES else hu
            for tissue, hu in HU.items()}


def generate_phantom(
    shape: Sequence[int] = (128, 128, 128),
    spacing: Sequence[float] = (1.5, 1.5, 1.5),
    seed: int | Sequence[int] = 0,
    soft_tissue_contrast: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate one synthetic CT volume with its organ labels.

    Args:
        shape: voxels along (x: right, y: anterior, z: superior).
        spacing: voxel size in mm along the same axes.
        seed: seed (or seed sequence) of the numpy generator; equal seeds give equal volumes.
        soft_tissue_contrast: scale of the soft tissues' differences from muscle's CT number
            (:func:`tissue_numbers`); the same seed gives the same anatomy and labels at any value.

    Returns:
        image: (X, Y, Z) int16 CT numbers in HU, air at about -1000.
        label: (X, Y, Z) uint8 organ map with the ids of ``LABELS``.
        affine: (4, 4) float64 voxel-to-world (RAS, mm) matrix, spacing on the diagonal.
    """
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"phantom shape must be 3 sizes of at least 8 voxels, got {tuple(shape)}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"phantom spacing must be 3 positive sizes in mm, got {tuple(spacing)}")
    tissue_hu = tissue_numbers(soft_tissue_contrast)
    rng = np.random.default_rng(seed)
    grid = _Grid.create(shape, spacing)
    body = _Body.draw(rng, grid)
    # outlines vary over a fifth of the body's half-width, texture over about a voxel
    deform = _smooth_noise(rng, grid.shape, max(0.18 * body.a / float(grid.spacing.min()), 1.0))
    canvas = _Canvas(
        grid=grid,
        rng=rng,
        body=body,
        deform=deform,
        fine=_smooth_noise(rng, grid.shape, 0.8),
        hu=np.full(grid.shape, tissue_hu["air"], dtype=np.float32),
        label=np.zeros(grid.shape, dtype=np.uint8),
        tissue_hu=tissue_hu,
    )
    trunk = _draw_trunk(canvas)
    heart = _draw_heart(canvas, trunk)
    spine = _place_spine(canvas)
    _draw_lungs(canvas, trunk, spine, heart)
    _draw_abdominal_organs(canvas, trunk, spine)
    _draw_aorta(canvas, trunk, spine)
    bone = _draw_spine(canvas, trunk, spine) | _draw_ribs(canvas, trunk, spine)
    canvas.label[bone] = LABEL_IDS["bone"]
    image = _acquire(canvas)
    affine = np.diag([*grid.spacing, 1.0])
    affine[:3, 3] = -(np.array(grid.shape) - 1) / 2 * grid.spacing
    return image, canvas.label, affine


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write NIfTI with qform and sform set to the affine (scanner space, mm).

    nibabel gzips without a timestamp or file name in the stream, so equal arrays give equal bytes.
    """
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))


def write_phantom_dataset(
    out_dir: str | Path,
    num: int = 8,
    seed: int = 0,
    shape: Sequence[int] = (128, 128, 128),
    spacing: Sequence[float] = (1.5, 1.5, 1.5),
    num_test: int = 0,
    soft_tissue_contrast: float = 1.0,
) -> Path:
    """Write ``num`` training and ``num_test`` test phantoms in the Medical Segmentation Decathlon layout.

    Case ``i`` uses the seed sequence ``(seed, i)``, so cases differ from each other and a dataset
    of more cases starts with the same cases as a smaller one. ``soft_tissue_contrast`` is
    :func:`generate_phantom`'s, recorded in the dataset.json's "generator" entry with the seed.

    Returns:
        the path of the written ``dataset.json`` (training images in ``imagesTr/``, labels in
        ``labelsTr/``, test images in ``imagesTs/``).
    """
    if num < 1 or num_test < 0:
        raise ValueError(f"need num >= 1 training and num_test >= 0 test phantoms, got num={num}, num_test={num_test}")
    out = Path(out_dir)
    for sub in ("imagesTr", "labelsTr") + (("imagesTs",) if num_test else ()):
        (out / sub).mkdir(parents=True, exist_ok=True)
    training, test = [], []
    for index in range(num + num_test):
        image, label, affine = generate_phantom(shape, spacing, (seed, index), soft_tissue_contrast)
        name = f"phantom_{index:03d}.nii.gz"
        if index < num:
            _save_nifti(image, affine, out / "imagesTr" / name)
            _save_nifti(label, affine, out / "labelsTr" / name)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            _save_nifti(image, affine, out / "imagesTs" / name)
            test.append(f"./imagesTs/{name}")
    dataset = {
        "name": DATASET_NAME,
        "description": "Synthetic thoraco-abdominal CT phantoms (HU) with organ labels, made by medssl.data.phantoms",
        "reference": "generated, no patient data",
        "licence": "Apache-2.0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(k): v for k, v in LABELS.items()},
        "numTraining": num,
        "numTest": num_test,
        "training": training,
        "test": test,
        "generator": {
            "module": GENERATOR,
            "seed": int(seed),
            "shape": [int(s) for s in shape],
            "spacing": [float(s) for s in spacing],
            "soft_tissue_contrast": float(soft_tissue_contrast),
        },
    }
    json_path = out / "dataset.json"
    json_path.write_text(json.dumps(dataset, indent=4) + "\n")
    return json_path


def main(argv: Sequence[str] | None = None) -> Path:
    """Command line: write a phantom dataset and print the path of its dataset.json."""
    parser = argparse.ArgumentParser(prog="medssl-phantoms", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--num", type=int, default=8, help="number of training cases (default 8)")
    parser.add_argument("--num-test", type=int, default=0, help="number of unlabelled test cases (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    parser.add_argument(
        "--size", type=int, nargs="+", default=[128], help="voxels per axis: one size or three (default 128)"
    )
    parser.add_argument(
        "--spacing", type=float, nargs="+", default=[1.5], help="mm per voxel: one or three (default 1.5)"
    )
    parser.add_argument(
        "--soft-tissue-contrast", type=float, default=1.0,
        help="scale of the soft tissues' CT-number differences from muscle (default 1: unenhanced CT; 0: all alike)",
    )
    args = parser.parse_args(argv)
    shape = args.size * 3 if len(args.size) == 1 else args.size
    spacing = args.spacing * 3 if len(args.spacing) == 1 else args.spacing
    if len(shape) != 3 or len(spacing) != 3:
        parser.error("--size and --spacing take one value or three")
    start = time.perf_counter()
    json_path = write_phantom_dataset(args.out, args.num, args.seed, shape, spacing, args.num_test,
                                      args.soft_tissue_contrast)
    elapsed = time.perf_counter() - start
    print(f"wrote {args.num + args.num_test} phantoms of {shape} voxels in {elapsed:.1f} s: {json_path}")
    return json_path


if __name__ == "__main__":
    main()
