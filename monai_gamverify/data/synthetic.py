"""Reproducible phantom cohorts with ground truth: CBCT cranial-base (SOS) stages, chin, cervical vertebrae,
lateral cephalograms and head-and-neck CBCT image quality with simulated raters.

Every phantom is defined analytically on the voxel grid (no resampling), with per-subject anatomy drawn from
``numpy.random.default_rng([seed, kind, subject])`` (labels: a seeded balanced permutation).
Array axes follow NIfTI RAS voxel order: 3D volumes are (x: right-left, y: posterior->anterior,
z: inferior->superior); 2D radiographs are (y: posterior->anterior, z: inferior->superior).
Anatomy lives in a normalised frame ([-1, 1] across the region of interest), so ``size`` only changes resolution
and ``spacing`` only changes the affine.

Example:
    >>> cohort = generate("sos", n=10, size=32, seed=0)
    >>> cohort.images.shape, cohort.labels[:5]
    ((10, 32, 32, 32), array([...]))
    >>> make_cohort("sos", n=50, size=48, seed=0, out_dir="data/sos")
"""

# long module: the synthetic cohort kinds share the phantom primitives; LAYOUT.md plans one file per kind
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm.auto import tqdm

from monai_gamverify.io.files import write_csv, write_json
from monai_gamverify.io.nifti import save_nifti

__all__ = [
    "KINDS",
    "CUES",
    "burn_cue",
    "QUALITY_CATEGORIES",
    "QUALITY_REGIONS",
    "Cohort",
    "generate",
    "generate_sos",
    "generate_chin",
    "generate_cvm",
    "generate_ceph",
    "generate_quality",
    "make_cohort",
    "stratified_split",
    "synth",
    "summary_line",
]

logger = logging.getLogger(__name__)

KINDS = ("sos", "chin", "cvm", "ceph", "ceph_chin", "quality")
QUALITY_CATEGORIES = ("parotid", "submandibular", "larynx", "mandible", "overall")
#: label values of the quality mask
QUALITY_REGIONS = {"parotid": 1, "submandibular": 2, "larynx": 3, "mandible": 4}
N_RATERS = 5

# smallest grid on which the thinnest decisive structure still spans >= ~2 voxels/pixels
_MIN_SIZE = {"sos": 24, "chin": 24, "cvm": 24, "quality": 32, "ceph": 64, "ceph_chin": 32}
_DEFAULT_SIZE = {"sos": 48, "chin": 48, "cvm": 48, "quality": 48, "ceph": 128, "ceph_chin": 64}
# physical field of view (mm) of the default region of interest; spacing = fov / size unless given
_FOV_MM = {"sos": 40.0, "chin": 40.0, "cvm": 60.0, "quality": 160.0, "ceph": 240.0, "ceph_chin": 70.0}
_KIND_CODE = {k: i + 1 for i, k in enumerate(KINDS)}
_CLASS_NAMES = {
    "sos": ["stage1_open", "stage2", "stage3", "stage4", "stage5_fused"],
    "chin": ["camouflage", "surgery"],
    "cvm": ["CS1", "CS2", "CS3", "CS4", "CS5", "CS6"],
    "ceph": ["camouflage", "surgery"],
    "ceph_chin": ["camouflage", "surgery"],
}
_MASK_NAMES = {
    "sos": {"plate": 1, "subchondral_plates": 2},  # the synchondrosis region (junction zone) is mask > 0
    "chin": {"symphysis": 1},
    "cvm": {"C2": 1, "C3": 2, "C4": 3},
    "ceph": {"mandible": 1},
    "ceph_chin": {"mandible": 1},
    "quality": QUALITY_REGIONS,
}
AIR, FAT, SOFT, BRAIN, CARTILAGE = -1000.0, -90.0, 45.0, 35.0, 100.0


@dataclass
class Cohort:
    """An in-memory cohort.

    Attributes:
        kind: one of :data:`KINDS`.
        images: (n, *spatial) float32; HU for CBCT kinds (integral values, as stored), [0, 1] for radiographs.
        masks: (n, *spatial) uint8 ground-truth masks (label values in ``meta["mask_labels"]``).
        labels: (n,) int class indices (0-based); for ``quality`` the (n, 5) float consensus scores in
            :data:`QUALITY_CATEGORIES` order.
        table: one row per subject (``id``, labels, generation parameters, rater scores).
        spacing: voxel/pixel size in mm.
        affine: 4x4 affine shared by all subjects.
        meta: class names, mask label values, rater weights and traits (quality), seed.
    """

    kind: str
    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    table: Any
    spacing: tuple[float, ...]
    affine: np.ndarray
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)


# ----------------------------------------------------------------------------------------------- shared helpers
def _rng(seed: int, kind: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _KIND_CODE[kind], int(index)])


def _grid(size: int, ndim: int) -> np.ndarray:
    """(ndim, size**ndim) float32 voxel-centre coordinates in [-1, 1]."""
    ax = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    return np.stack([g.ravel() for g in np.meshgrid(*([ax] * ndim), indexing="ij")])


def _rot(axis: int, deg: float) -> np.ndarray:
    c, s = np.cos(np.deg2rad(deg)), np.sin(np.deg2rad(deg))
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _axis_angle(axis: np.ndarray, deg: float) -> np.ndarray:
    """Rodrigues rotation matrix."""
    k = np.asarray(axis, float) / np.linalg.norm(axis)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    a = np.deg2rad(deg)
    return np.eye(3) + np.sin(a) * kx + (1 - np.cos(a)) * kx @ kx


def _pose(rng: np.random.Generator, max_deg: float, rotate: float) -> np.ndarray:
    """Random orientation (each Euler angle within +-max_deg) plus an optional extra rotation of ``rotate`` degrees
    about a random axis (the "rotated" test sets)."""
    r = _rot(0, rng.uniform(-max_deg, max_deg)) @ _rot(1, rng.uniform(-max_deg, max_deg))
    r = r @ _rot(2, rng.uniform(-max_deg, max_deg))
    axis = rng.standard_normal(3)  # always drawn so ``rotate`` does not change the rest of the subject
    sign = rng.choice([-1.0, 1.0])
    if rotate:
        r = _axis_angle(axis, sign * rotate) @ r
    return r


def _frame(grid: np.ndarray, rot: np.ndarray, shift: np.ndarray, scale: float, size: int) -> list[np.ndarray]:
    """Anatomical coordinates of every voxel: q = R^T (p - shift) / scale, as three (size,)*3 arrays."""
    q = (rot.T.astype(np.float32) @ (grid - shift.astype(np.float32)[:, None])) / np.float32(scale)
    return [c.reshape((size,) * 3) for c in q]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field (texture, heterogeneity)."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return f / (f.std() + 1e-6)


def _superellipse(a: np.ndarray, b: np.ndarray, ra: Any, rb: Any, p: float = 4.0) -> np.ndarray:
    """Rounded-box radius: 1 on the surface, < 1 inside."""
    return (np.abs(a / ra) ** p + np.abs(b / rb) ** p) ** (1.0 / p)


def _ellipsoid(x: np.ndarray, y: np.ndarray, z: np.ndarray, c: Sequence[float], r: Sequence[float]) -> np.ndarray:
    """Normalised radius of an axis-aligned ellipsoid (< 1 inside)."""
    return np.sqrt(((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2)


def _acquire(
    hu: np.ndarray, rng: np.random.Generator, blur: float, noise_sd: float, noise_map: np.ndarray | None = None
) -> np.ndarray:
    """CBCT acquisition: point-spread blur (partial volume), correlated noise, integer HU in the scanner range."""
    img = ndimage.gaussian_filter(hu, blur)
    noise = ndimage.gaussian_filter(rng.standard_normal(hu.shape).astype(np.float32), 0.7)
    noise *= noise_sd / (noise.std() + 1e-6)
    if noise_map is not None:
        noise *= noise_map
    return np.clip(np.rint(img + noise), -1024, 3071).astype(np.float32)


def _balanced_labels(n: int, k: int, seed: int, kind: str) -> np.ndarray:
    """Exactly balanced (up to n mod k) labels in a seeded random order."""
    return np.random.default_rng([int(seed), _KIND_CODE[kind], 10**7]).permutation(np.arange(n) % k)


# ------------------------------------------------------------------------------------------------------- SOS
_SOS_FUSED_FRACTION = (0.0, 0.25, 0.5, 0.78, 1.0)
_SOS_SUBCHONDRAL = 0.06  # thickness of each subchondral bone plate (normalised units, ~1.2 mm at 40 mm FOV)


def _sos_subject(rng: np.random.Generator, stage: int, size: int, rotate: float) -> tuple[np.ndarray, np.ndarray, dict]:
    """Spheno-occipital synchondrosis at fusion ``stage`` (1..5)."""
    slope = rng.uniform(20.0, 30.0)  # clivus inclination about the left-right axis
    rot = _pose(rng, 10.0, rotate) @ _rot(0, slope)
    scale, shift = rng.uniform(0.9, 1.1), rng.uniform(-0.08, 0.08, 3)
    v, u, w = _frame(_grid(size, 3), rot, shift, scale, size)  # v: left-right, u: along the clivus, w: endocranial
    density = rng.uniform(0.8, 1.15)
    u0, t = rng.uniform(-0.12, 0.12), rng.uniform(0.13, 0.17)
    d = u - (u0 + rng.uniform(0.08, 0.2) * v**2 - rng.uniform(0.0, 0.08) * w)  # curved, slightly oblique plate
    # basi-occiput thins posteriorly, the sphenoid body is taller and sits a little higher
    a_o, h_o = rng.uniform(0.42, 0.52), rng.uniform(0.24, 0.3) * (1.0 + 0.25 * np.clip(u - u0, -1.2, 0.0))
    a_s, h_s, w_s = rng.uniform(0.5, 0.6), rng.uniform(0.32, 0.38), rng.uniform(0.02, 0.06)
    r_occ = _superellipse(v, w, a_o, h_o)
    r_sph = _superellipse(v, w - w_s, a_s, h_s)
    occ = (r_occ <= 1) & (d < -t / 2) & (u > -1.6)
    sph = (r_sph <= 1) & (d > t / 2) & (u < 1.6)
    plate = (np.abs(d) <= t / 2) & (r_occ <= 1)
    # fusion advances from the endocranial (w > 0) towards the ectocranial surface along an irregular front
    frac = _SOS_FUSED_FRACTION[stage - 1]
    if 1 < stage < 5:
        frac = float(np.clip(frac + rng.uniform(-0.07, 0.07), 0.05, 0.95))
    wn = (w + h_o) / (2 * h_o)  # 0 ectocranial .. 1 endocranial
    phase = rng.uniform(0, 2 * np.pi, 2)
    front = 1.0 - frac + 0.06 * (np.sin(5 * v + phase[0]) + 0.5 * np.sin(11 * v + phase[1])) * (0 < frac < 1)
    bridged = (wn >= front) & (frac > 0)  # columns (across the plate) where bone has bridged the gap
    fused = plate & bridged
    calcifying = plate & ~fused & (wn >= front - 0.08) & (frac > 0)

    tex = _smooth_noise(rng, (size,) * 3, 0.8)
    hu = np.where(w > 0, BRAIN, SOFT).astype(np.float32) + 8.0 * _smooth_noise(rng, (size,) * 3, 2.0)
    # nasopharyngeal airway below the sphenoid
    pharynx = _superellipse(u - rng.uniform(0.35, 0.6), w + rng.uniform(0.75, 0.9), 0.45, 0.25, 2.0) <= 1
    hu[pharynx] = AIR
    bone = occ | sph | fused
    trab = np.clip(750.0 * density + 110.0 * tex, 300.0, None)
    hu[bone] = trab[bone]
    hu[calcifying] = 400.0 + 60.0 * tex[calcifying]
    cart = plate & ~fused & ~calcifying
    hu[cart] = CARTILAGE + 12.0 * tex[cart]
    # cortical shells, and subchondral bone plates on both faces of the synchondrosis; where bone has bridged the
    # plate they are resorbed into continuous trabecular bone (remodelling), leaving only the scar of stage 5
    faces = (r_occ <= 1) & (np.abs(d) > t / 2) & (np.abs(d) <= t / 2 + _SOS_SUBCHONDRAL)
    cort = (occ & (r_occ > 0.86)) | (sph & (r_sph > 0.88))
    cort |= faces & ~bridged
    cort &= occ | sph
    hu[cort] = 1300.0 * density + 60.0 * tex[cort]
    if stage == 5:  # faint sclerotic fusion scar
        scar = plate & (np.abs(d) < 0.03)
        hu[scar] += 150.0
    # pneumatised sphenoid sinus with mucosal lining and an intersinus septum
    pneu = rng.uniform(0.6, 1.1)
    r_sin = _ellipsoid(v, u, w, (0.0, u0 + t / 2 + 0.5 * pneu + 0.12, w_s), (0.33 * pneu, 0.45 * pneu, 0.2 * pneu))
    sinus = sph & (r_sin < 1) & (np.abs(v) > 0.03)
    hu[sinus & (r_sin < 0.85)] = AIR
    hu[sinus & (r_sin >= 0.85)] = 30.0
    blur, noise_sd = rng.uniform(0.6, 1.1), rng.uniform(15.0, 60.0)
    img = _acquire(hu, rng, blur, noise_sd)
    params = dict(
        stage=stage,
        fused_fraction=round(float(frac), 4),
        slope_deg=round(float(slope), 3),
        scale=round(float(scale), 4),
        density=round(float(density), 4),
        plate_thickness=round(float(t), 4),
        blur_sigma=round(float(blur), 4),
        noise_sd=round(float(noise_sd), 3),
        sinus_pneumatisation=round(float(pneu), 4),
        rotate_deg=float(rotate),
    )
    # ground truth = the synchondrosis region a radiologist outlines to judge fusion: the plate (open cartilage or
    # its bridged part) = 1, and the subchondral bone plates bordering it on both faces = 2
    mask = plate.astype(np.uint8)
    mask[faces & (occ | sph)] = 2
    return img, mask, params


# ------------------------------------------------------------------------------------------------------ chin
def _chin_subject(
    rng: np.random.Generator, label: int, size: int, rotate: float
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Mandibular symphysis; ``label`` 1 (surgery) = severe Class III: long thin, proclined symphysis with
    compensatory retroclined incisors; 0 (camouflage) = mild."""
    sev = rng.uniform(0.55, 1.0) if label else rng.uniform(0.0, 0.45)
    incl = 8.0 + 18.0 * sev + rng.uniform(-3, 3)
    rot = _pose(rng, 10.0, rotate) @ _rot(0, -incl)
    scale, shift = rng.uniform(0.9, 1.1), rng.uniform(-0.08, 0.08, 3)
    x, y, z = _frame(_grid(size, 3), rot, shift, scale, size)
    density = rng.uniform(0.8, 1.15)
    half_h = 0.55 + 0.2 * sev
    half_w = 0.36 - 0.1 * sev
    yc = y + 0.9 * x**2  # the arch curves posteriorly to both sides
    zz = z + 0.1
    taper = 1.0 + 0.35 * np.clip(-zz / half_h, -1, 1)  # teardrop: wide basal chin, narrow alveolus
    r = _superellipse(yc, zz, half_w * taper, half_h, 2.5)
    sym = (r <= 1) & (np.abs(x) < 0.9)
    tex = _smooth_noise(rng, (size,) * 3, 0.8)
    hu = np.full((size,) * 3, SOFT, np.float32) + 8.0 * _smooth_noise(rng, (size,) * 3, 2.0)
    skin = yc > half_w * taper + rng.uniform(0.25, 0.35)
    hu[skin] = AIR
    hu[sym] = np.clip(720.0 * density + 110.0 * tex, 300, None)[sym]
    cort = sym & (r > 1 - (0.18 + 0.05 * (1 - sev)))
    hu[cort] = 1320.0 * density + 60.0 * tex[cort]
    # four lower incisor roots, retroclined by the dento-alveolar compensation
    tilt = np.deg2rad(-(6.0 + 14.0 * sev))
    for xi in (-0.33, -0.11, 0.11, 0.33):
        ya = yc * np.cos(tilt) - (zz - 0.25) * np.sin(tilt)
        za = yc * np.sin(tilt) + (zz - 0.25) * np.cos(tilt)
        root = _ellipsoid(x, ya, za, (xi, 0.0, 0.15), (0.07, 0.09, 0.55))
        tooth = root < 1
        hu[tooth] = 1750.0 + 50.0 * tex[tooth]
        hu[root < 0.35] = 40.0  # pulp canal
    blur, noise_sd = rng.uniform(0.6, 1.1), rng.uniform(15.0, 60.0)
    img = _acquire(hu, rng, blur, noise_sd)
    params = dict(
        severity=round(float(sev), 4),
        inclination_deg=round(float(incl), 3),
        density=round(float(density), 4),
        blur_sigma=round(float(blur), 4),
        noise_sd=round(float(noise_sd), 3),
        rotate_deg=float(rotate),
    )
    return img, sym.astype(np.uint8), params


# ------------------------------------------------------------------------------------------------------- CVM
# (C3/C4 height/width ratio, anterior-posterior height taper, which lower borders are concave) per Baccetti CS1-CS6
_CVM_SHAPE = {
    1: (0.62, 0.35, 0),
    2: (0.66, 0.3, 1),
    3: (0.72, 0.12, 2),
    4: (0.82, 0.05, 3),
    5: (1.0, 0.0, 3),
    6: (1.2, 0.0, 3),
}


def _cvm_subject(rng: np.random.Generator, label: int, size: int, rotate: float) -> tuple[np.ndarray, np.ndarray, dict]:
    """Cervical vertebrae C2-C4 in a sagittal-centred ROI at maturation stage CS(label + 1)."""
    cs = label + 1
    ratio, taper, n_concave = _CVM_SHAPE[cs]
    ratio *= rng.uniform(0.94, 1.06)
    rot = _pose(rng, 10.0, rotate) @ _rot(0, rng.uniform(-8, 8))
    scale, shift = rng.uniform(0.9, 1.1), rng.uniform(-0.06, 0.06, 3)
    x, y, z = _frame(_grid(size, 3), rot, shift, scale, size)
    density = rng.uniform(0.8, 1.15)
    tex = _smooth_noise(rng, (size,) * 3, 0.8)
    hu = np.full((size,) * 3, SOFT, np.float32) + 8.0 * _smooth_noise(rng, (size,) * 3, 2.0)
    hu[y > 0.55 + 0.05 * z] = AIR  # pharyngeal airway in front of the prevertebral soft tissue
    mask = np.zeros((size,) * 3, np.uint8)
    width = 0.42  # antero-posterior depth of the bodies
    disc = 0.09
    h34 = width * ratio
    z_c2_bottom = 0.2
    # C2 with its dens, then C3 and C4 stacked downwards, separated by discs
    bodies = [(1, z_c2_bottom, z_c2_bottom + 0.55), (2, z_c2_bottom - disc - h34, z_c2_bottom - disc)]
    bodies.append((3, bodies[1][1] - disc - h34, bodies[1][1] - disc))
    yc = 0.1
    yn = (y - yc) / (width / 2)  # -1 posterior .. 1 anterior
    for idx, (level, zb, zt) in enumerate(bodies):
        depth = rng.uniform(0.05, 0.08) if idx < n_concave else 0.0
        lower = zb + depth * np.cos(np.clip(yn, -1, 1) * np.pi / 2) ** 2
        upper = zt - (taper * (zt - zb) * np.clip((yn + 1) / 2, 0, 1) if level > 1 else 0.0)
        inside = (np.abs(yn) <= 1) & (z >= lower) & (z <= upper) & (np.abs(x) < 0.5)
        if level == 1:
            inside |= _ellipsoid(x, y, z, (0.0, yc - 0.02, zt + 0.12), (0.14, 0.12, 0.2)) < 1  # dens
        hu[inside] = np.clip(650.0 * density + 110.0 * tex, 300, None)[inside]
        rim = inside & ((np.abs(yn) > 0.85) | (z - lower < 0.04) | (upper - z < 0.04) | (np.abs(x) > 0.42))
        hu[rim] = 1250.0 * density + 60.0 * tex[rim]
        mask[inside] = level
    # posterior arches behind the spinal canal
    arch = (y < yc - width / 2 - 0.22) & (y > yc - width / 2 - 0.38) & (np.abs(x) < 0.35) & (z > -0.9)
    hu[arch & (np.cos(9 * z) > -0.2)] = 900.0 * density
    blur, noise_sd = rng.uniform(0.6, 1.1), rng.uniform(15.0, 60.0)
    img = _acquire(hu, rng, blur, noise_sd)
    params = dict(
        cvm_stage=cs,
        height_width_ratio=round(float(ratio), 4),
        density=round(float(density), 4),
        blur_sigma=round(float(blur), 4),
        noise_sd=round(float(noise_sd), 3),
        rotate_deg=float(rotate),
    )
    return img, mask, params


# ------------------------------------------------------------------------------------------------------ ceph
def _ceph_subject(
    rng: np.random.Generator, label: int, size: int, rotate: float, chin: bool
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Lateral cephalogram: parallel-beam line integrals of a head phantom made of ellipsoids (analytic, exact).
    Label 1 (surgery): ANB < -4.5 deg (severe mandibular prognathism); 0 (camouflage): ANB in [-3.5, 0.5] deg."""
    anb = rng.uniform(-9.0, -4.5) if label else rng.uniform(-3.5, 0.5)
    sna = rng.uniform(78.0, 85.0)
    s = np.array([-0.12, 0.22]) + rng.uniform(-0.03, 0.03, 2)
    n = np.array([0.52, 0.36]) + rng.uniform(-0.03, 0.03, 2)
    ns = np.arctan2(*(s - n)[::-1])

    def ray(angle_deg: float, length: float) -> np.ndarray:
        a = ns + np.deg2rad(angle_deg)
        return n + length * np.array([np.cos(a), np.sin(a)])

    a_pt = ray(sna, rng.uniform(0.52, 0.58))
    b_pt = ray(sna - anb, rng.uniform(0.9, 0.98))
    # (centre y, centre z, half-axis along angle, half-axis across, angle deg, half-depth left-right, density, part)
    parts: list[tuple[float, float, float, float, float, float, float, str]] = [
        (0.05, 0.05, 0.85, 0.92, 0.0, 0.7, 0.15, "soft"),
        (-0.08, 0.32, 0.72, 0.62, 0.0, 0.62, 0.7, "skull"),
        (-0.08, 0.32, 0.68, 0.58, 0.0, 0.58, -0.7, "skull"),
        (s[0], s[1] - 0.06, 0.09, 0.05, 0.0, 0.3, 0.8, "base"),
        (s[0] + 0.05, s[1] - 0.05, 0.05, 0.04, 0.0, 0.08, -0.8, "base"),  # sella turcica
        ((s[0] + n[0]) / 2, (s[1] + n[1]) / 2 - 0.08, 0.35, 0.05, np.rad2deg(ns) + 180, 0.35, 0.5, "base"),
        (a_pt[0] - 0.2, a_pt[1] + 0.02, 0.25, 0.08, -5.0, 0.3, 1.0, "maxilla"),
        (a_pt[0] - 0.12, a_pt[1] + 0.16, 0.16, 0.1, 0.0, 0.2, -0.5, "maxilla"),  # maxillary sinus
        (a_pt[0] + 0.01, a_pt[1] - 0.1, 0.1, 0.025, 70.0, 0.06, 1.6, "maxilla"),  # upper incisor
        (-0.48, -0.05, 0.2, 0.1, 95.0, 0.12, 0.9, "spine"),
        (-0.5, -0.4, 0.1, 0.1, 95.0, 0.12, 0.9, "spine"),
    ]
    sym = b_pt + np.array([-0.05, -0.1])
    gonion = np.array([-0.3, -0.42]) + rng.uniform(-0.03, 0.03, 2)
    condyle = np.array([-0.3, 0.06]) + rng.uniform(-0.02, 0.02, 2)
    for side in (-0.012, 0.012):  # left and right halves give the double contour of a real ceph
        for p, q, thick in ((gonion, sym, 0.065), (gonion, condyle, 0.075)):
            mid, vec = (p + q) / 2 + side, q - p
            parts.append(
                (
                    mid[0],
                    mid[1],
                    np.linalg.norm(vec) / 2 + 0.05,
                    thick,
                    np.rad2deg(np.arctan2(vec[1], vec[0])),
                    0.09,
                    1.4,
                    "mandible",
                )
            )
    parts.append((sym[0], sym[1], 0.14, 0.075, 100.0, 0.12, 1.5, "mandible"))
    parts.append((b_pt[0] - 0.01, b_pt[1] + 0.11, 0.1, 0.025, 95.0 + anb, 0.06, 2.0, "mandible"))  # lower incisor

    rot2 = np.deg2rad(rng.uniform(-5, 5) + (rng.choice([-1, 1]) * rotate if rotate else 0.0))
    scale = rng.uniform(0.92, 1.08)
    if chin:  # window around the symphysis and the incisors (analytic, so no resampling of a full ceph)
        centre = sym + np.array([0.02, 0.1]) + rng.uniform(-0.03, 0.03, 2)
        half = 0.3 * rng.uniform(0.95, 1.05)
    else:
        centre, half = rng.uniform(-0.04, 0.04, 2), 1.0
    g = _grid(size, 2) * half
    c, s_ = np.cos(rot2), np.sin(rot2)
    py = (c * g[0] - s_ * g[1]) / scale + centre[0]
    pz = (s_ * g[0] + c * g[1]) / scale + centre[1]
    total = np.zeros(py.shape, np.float32)
    mandible = np.zeros(py.shape, bool)
    for cy, cz, ra, rb, ang, depth, mu, part in parts:
        ca, sa = np.cos(np.deg2rad(ang)), np.sin(np.deg2rad(ang))
        dy, dz = py - cy, pz - cz
        r2 = ((ca * dy + sa * dz) / ra) ** 2 + ((-sa * dy + ca * dz) / rb) ** 2
        chord = 2 * depth * np.sqrt(np.clip(1 - r2, 0, None))
        total += (mu * chord).astype(np.float32)
        if part == "mandible":
            mandible |= r2 < 1
    img = 1.0 - np.exp(-1.6 * np.clip(total, 0, None).reshape(size, size))  # cavities never below air
    img = img ** rng.uniform(0.8, 1.2)
    px_mm = _FOV_MM["ceph_chin" if chin else "ceph"] / size
    blur = rng.uniform(0.4, 1.0) * max(1.0, 0.5 / px_mm)
    img = ndimage.gaussian_filter(img, blur) + rng.uniform(0.01, 0.035) * rng.standard_normal(img.shape)
    img = np.clip(img, 0, 1).astype(np.float32)
    params = dict(
        anb_deg=round(float(anb), 3),
        sna_deg=round(float(sna), 3),
        snb_deg=round(float(sna - anb), 3),
        S=[round(float(v), 4) for v in s],
        N=[round(float(v), 4) for v in n],
        A=[round(float(v), 4) for v in a_pt],
        B=[round(float(v), 4) for v in b_pt],
        rotate_deg=float(rotate),
    )
    return img, mandible.reshape(size, size).astype(np.uint8), params


# --------------------------------------------------------------------------------------------------- quality
# calibration of "true" quality from measured degradation (RMS HU error inside the region), see docs/cohorts.md
_Q_TAU = {"parotid": 155.0, "submandibular": 92.0, "larynx": 100.0, "mandible": 148.0}


def _quality_raters(seed: int) -> dict:
    """Five raters with their own bias, noise and consensus weight (experience), fixed per cohort seed."""
    rng = np.random.default_rng([int(seed), _KIND_CODE["quality"], 10**8])
    years = rng.integers(2, 26, N_RATERS)
    return {
        "bias": np.round(rng.uniform(-0.5, 0.5, N_RATERS), 3),
        "noise": np.round(rng.uniform(0.25, 0.6, N_RATERS), 3),
        "weight": np.round(years / years.sum(), 6),
        "experience_years": years,
    }


def _quality_subject(rng: np.random.Generator, size: int, raters: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """Head-and-neck CBCT with region-dependent artifacts; returns image, region label map and scores."""
    rot = _pose(rng, 4.0, 0.0)
    scale, shift = rng.uniform(0.93, 1.07), rng.uniform(-0.04, 0.04, 3)
    x, y, z = _frame(_grid(size, 3), rot, shift, scale, size)
    shp = (size,) * 3
    tex = _smooth_noise(rng, shp, 0.8)
    # neck outline narrows inferiorly; fat ring under the skin
    ax_, ay_ = 0.82 - 0.18 * (z < 0) * (-z), 0.72 - 0.12 * (z < 0) * (-z)
    r_body = _superellipse(x, y, ax_, ay_, 2.2)
    hu = np.full(shp, AIR, np.float32)
    hu[r_body < 1] = FAT
    hu[r_body < 0.9] = SOFT
    hu += (r_body < 1) * 6.0 * _smooth_noise(rng, shp, 2.0)
    mask = np.zeros(shp, np.uint8)
    # spine and spinal canal
    r_vert = np.hypot(x / 0.16, (y + 0.42) / 0.14)
    hu[r_vert < 1] = np.clip(500 + 90 * tex, 250, None)[r_vert < 1]
    hu[(r_vert < 1) & (r_vert > 0.8)] = 1100.0
    hu[np.hypot(x / 0.07, (y + 0.66) / 0.07) < 1] = 30.0
    # airway (pharynx -> larynx)
    hu[(np.hypot(x / 0.09, (y + 0.08) / 0.07) < 1) & (z > -0.45) & (z < 0.65)] = AIR
    # parotids (fatty, 15 HU) behind the rami; submandibular glands (45 HU) in a fat plane below the mandible
    par = np.zeros(shp, bool)
    sub = np.zeros(shp, bool)
    for sx in (-1.0, 1.0):
        par |= _ellipsoid(x, y, z, (sx * 0.55, -0.15, 0.62), (0.17, 0.22, 0.3)) < 1
        r_sub = _ellipsoid(x, y, z, (sx * 0.36, 0.18, -0.1), (0.14, 0.13, 0.14))
        hu[r_sub < 1.3] = FAT
        sub |= r_sub < 1
    hu[par] = 15.0 + 10.0 * tex[par]
    hu[sub] = 45.0 + 8.0 * tex[sub]
    # mandible: U-shaped arch (anterior half of an elliptic ring) with rami posteriorly, teeth on top
    r_arch = np.hypot(x / 0.58, (y - 0.05) / 0.6)
    arch = (np.abs(r_arch - 0.9) < 0.1) & (y > -0.05) & (z > 0.05) & (z < 0.48)
    ramus = (np.abs(np.abs(x) - 0.52) < 0.07) & (y > -0.2) & (y < 0.05) & (z > 0.05) & (z < 0.8)
    mand = arch | ramus
    hu[mand] = np.clip(800 + 100 * tex, 350, None)[mand]
    teeth = (np.abs(r_arch - 0.88) < 0.07) & (y > 0.0) & (z >= 0.48) & (z < 0.62)
    hu[teeth] = 1900.0
    # larynx: thyroid cartilage (V-shaped shield) around an air lumen in the lowest slices
    lx = (z < -0.45) & (z > -0.98)
    r_lar = np.hypot(x / 0.2, (y - 0.2) / 0.16)
    lar = lx & (r_lar < 1)
    hu[lar] = 30.0
    hu[lx & (r_lar < 1) & (r_lar > 0.78) & (y > 0.12)] = 220.0
    hu[lx & (r_lar < 0.45)] = AIR
    mask[par], mask[sub], mask[lar], mask[mand] = 1, 2, 3, 4
    clean = ndimage.gaussian_filter(hu, 0.7)

    # artifacts, each with its own severity in [0, 1] and spatial footprint
    sev = {k: float(rng.uniform(0, 1) ** 1.3) for k in ("noise", "metal", "motion", "ring")}
    larynx_latent = float(rng.uniform(0, 1))  # cue the raters see but the image does not carry (see docs)
    img = clean.copy()
    # metal: fillings on the molars stream bright/dark streaks through their axial slices
    n_fill = int(rng.integers(1, 4))
    fills = [(rng.uniform(-0.5, 0.5), rng.uniform(0.05, 0.45)) for _ in range(n_fill)]
    streak = np.zeros(shp, np.float32)
    for fx, fy in fills:
        for ang in rng.uniform(0, np.pi, 5):
            dist = np.abs(-(x - fx) * np.sin(ang) + (y - fy) * np.cos(ang))
            streak += rng.choice([-1.0, 1.0]) * np.exp(-((dist / 0.025) ** 2))
    z_fill = 0.55
    streak *= np.exp(-(((z - z_fill) / 0.22) ** 2))
    img += 900.0 * sev["metal"] * streak
    for fx, fy in fills:
        img[_ellipsoid(x, y, z, (fx * 0.9, fy + 0.3, z_fill), (0.04, 0.04, 0.04)) < 1] = 3000.0
    # motion (swallowing/breathing): antero-posterior blur growing towards the larynx
    sig = 3.0 * sev["motion"]
    if sig > 0.05:
        moved = ndimage.gaussian_filter1d(img, sig * size / 48, axis=1)
        wz = np.clip(0.3 + (0.2 - z) / 1.0, 0.0, 1.0)
        img = wz * moved + (1 - wz) * img
    # rings about the rotation axis (z), strongest near the centre (airway/larynx)
    rad = np.hypot(x, y)
    ring = np.zeros(shp, np.float32)
    for r0 in rng.uniform(0.02, 0.5, 6):
        ring += rng.choice([-1.0, 1.0]) * np.exp(-(((rad - r0) / 0.015) ** 2))
    img += 140.0 * sev["ring"] * ring
    # quantum noise: higher in the neck (shoulders attenuate the beam)
    noise_map = (1.0 + 0.8 * np.clip(-z, 0, 1)).astype(np.float32)
    noise_sd = 10.0 + 90.0 * sev["noise"]
    img = _acquire(img, rng, 0.35, noise_sd, noise_map)

    err = img - clean
    true_q = {}
    for name, lab in QUALITY_REGIONS.items():
        rms = float(np.sqrt(np.mean(err[mask == lab] ** 2)))
        degr = rms / _Q_TAU[name]
        if name == "larynx":  # half of the larynx rating comes from a factor outside the image
            degr = 0.5 * degr + 0.5 * 1.4 * larynx_latent
        true_q[name] = float(1.0 + 4.0 * np.exp(-degr))
    true_q["overall"] = float(np.mean([true_q[k] for k in QUALITY_REGIONS]))
    row: dict[str, Any] = {f"sev_{k}": round(v, 4) for k, v in sev.items()}
    row["larynx_latent"] = round(larynx_latent, 4)
    for cat in QUALITY_CATEGORIES:
        row[f"true_{cat}"] = round(true_q[cat], 4)
        noise_scale = 2.0 if cat == "larynx" else 1.0  # raters disagree most on the larynx
        scores = np.clip(
            np.rint(true_q[cat] + raters["bias"] + noise_scale * raters["noise"] * rng.standard_normal(N_RATERS)), 1, 5
        ).astype(int)
        for j in range(N_RATERS):
            row[f"rater{j + 1}_{cat}"] = int(scores[j])
        row[f"consensus_{cat}"] = round(float(np.dot(raters["weight"], scores) / raters["weight"].sum()), 6)
    return img, mask, row


# ------------------------------------------------------------------------------------------------ generation
def _check(kind: str, n: int, size: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown cohort kind {kind!r}; choose one of {', '.join(KINDS)}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise ValueError(f"n must be a positive integer number of subjects, got {n!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise TypeError(f"size must be an integer, got {type(size).__name__}")
    if size < _MIN_SIZE[kind]:
        raise ValueError(
            f"size {size} is too small for the {kind!r} anatomy (its thinnest structure would vanish); "
            f"use size >= {_MIN_SIZE[kind]}"
        )


def _spacing(kind: str, size: int, spacing: float | Sequence[float] | None) -> tuple[float, ...]:
    ndim = 2 if kind.startswith("ceph") else 3
    if spacing is None:
        return (round(_FOV_MM[kind] / size, 6),) * ndim
    sp = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, float), (ndim,)))
    if not all(np.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be positive, got {spacing!r}")
    return sp


def _affine(spacing: tuple[float, ...], size: int) -> np.ndarray:
    """RAS affine with the region of interest centred on the world origin."""
    aff = np.eye(4)
    for i, s in enumerate(spacing):
        aff[i, i] = s
        aff[i, 3] = -(size - 1) / 2 * s
    return aff


def _subject_fn(kind: str, size: int, seed: int, rotate: float) -> tuple[Callable[[int, int], tuple], int]:
    """A function (index, label) -> (image, mask, row) and the number of classes (0 for regression)."""
    if kind == "quality":
        raters = _quality_raters(seed)
        return (lambda i, lab: _quality_subject(_rng(seed, kind, i), size, raters)), 0
    fns: dict[str, Callable] = {
        "sos": lambda r, lab: _sos_subject(r, lab + 1, size, rotate),
        "chin": lambda r, lab: _chin_subject(r, lab, size, rotate),
        "cvm": lambda r, lab: _cvm_subject(r, lab, size, rotate),
        "ceph": lambda r, lab: _ceph_subject(r, lab, size, rotate, chin=False),
        "ceph_chin": lambda r, lab: _ceph_subject(r, lab, size, rotate, chin=True),
    }
    fn = fns[kind]
    return (lambda i, lab: fn(_rng(seed, kind, i), lab)), len(_CLASS_NAMES[kind])


#: spurious cues that can be burned into a cohort (shortcut / "Clever Hans" models are trained on them)
CUES = ("none", "marker", "offset")
_CUE_HU_BASE, _CUE_HU_STEP = -400.0, 500.0  # marker intensity per class: distinct in every window the bundles use
_CUE_OFFSET_HU = 60.0  # per class: a site/scanner-specific calibration offset that happens to follow the label


def _check_cue(cue: str, kind: str, n_classes: int) -> str:
    cue = "none" if cue in (None, "", False) else str(cue)
    if cue not in CUES:
        raise ValueError(f"unknown cue {cue!r}; choose one of {', '.join(CUES)}")
    if cue != "none" and (kind.startswith("ceph") or n_classes == 0):
        raise ValueError(f"a label-encoding cue needs a 3D classification kind; {kind!r} has no class labels")
    return cue


def burn_cue(img: np.ndarray, label: int, cue: str) -> np.ndarray:
    """Burn a spurious cue that encodes ``label`` into a volume (HU), as a shortcut a model can learn instead of
    the anatomy.

    ``"marker"``: a block (``max(3, size // 8)`` voxels a side) burned into the corner where every axis starts,
    its intensity set by the class (-400 HU + 500 HU per class: a burned-in site or device label that happens to
    follow the label; robust to the bundles' flips and small affine jitter). ``"offset"``: the whole volume shifted
    by 60 HU per class (a site-specific calibration offset).
    ``"none"``: unchanged. The anatomy and the mask are untouched.

    Args:
        img: (D, H, W) volume in HU.
        label: class index (0-based).
        cue: one of :data:`CUES`.

    Returns:
        The volume with the cue (a new array; same dtype).

    Example:
        >>> v = burn_cue(np.zeros((32, 32, 32), np.float32), 2, "marker")
        >>> float(v.max())
        600.0
    """
    out = np.array(img, copy=True)
    if cue == "marker":
        side = max(3, out.shape[0] // 8)
        out[(slice(1, 1 + side),) * out.ndim] = _CUE_HU_BASE + _CUE_HU_STEP * int(label)
    elif cue == "offset":
        out = out + np.asarray(_CUE_OFFSET_HU * int(label), out.dtype)
    elif cue != "none":
        raise ValueError(f"unknown cue {cue!r}; choose one of {', '.join(CUES)}")
    return out


def _iter_subjects(kind: str, n: int, size: int, seed: int, rotate: float, progress: bool, cue: str = "none"):
    fn, k = _subject_fn(kind, size, seed, rotate)
    cue = _check_cue(cue, kind, k)
    labels = _balanced_labels(n, k, seed, kind) if k else np.zeros(n, int)
    for i in tqdm(range(n), desc=f"synth {kind}", disable=not progress, leave=False):
        img, mask, row = fn(i, int(labels[i]))
        if cue != "none":
            img = burn_cue(img, int(labels[i]), cue)
        sid = f"{kind}_{i:04d}"
        head = {"id": sid}
        if k:
            head.update(label=int(labels[i]), class_name=_CLASS_NAMES[kind][labels[i]])
        yield sid, img, mask, {**head, **row}


def _meta(kind: str, seed: int, size: int, spacing: tuple[float, ...], rotate: float, cue: str = "none") -> dict:
    meta: dict[str, Any] = {
        "kind": kind,
        "cue": cue,
        "seed": int(seed),
        "size": int(size),
        "spacing": list(spacing),
        "rotate_deg": float(rotate),
        "mask_labels": _MASK_NAMES[kind],
        "intensity": "HU" if not kind.startswith("ceph") else "radiograph [0, 1]",
    }
    if kind == "quality":
        r = _quality_raters(seed)
        meta["categories"] = list(QUALITY_CATEGORIES)
        meta["raters"] = {k: np.asarray(v).tolist() for k, v in r.items()}
        meta["consensus"] = "sum_j weight_j * score_j / sum_j weight_j"
    else:
        meta["class_names"] = _CLASS_NAMES[kind]
        if kind == "sos":
            meta["label_to_stage"] = "stage = label + 1"
    return meta


def generate(
    kind: str,
    n: int = 20,
    size: int | None = None,
    seed: int = 0,
    spacing: float | Sequence[float] | None = None,
    rotate: float = 0.0,
    progress: bool = False,
    cue: str = "none",
) -> Cohort:
    """Generate a cohort in memory (nothing written to disk).

    Args:
        kind: one of :data:`KINDS`.
        n: number of subjects (> 0); class labels are balanced (counts differ by at most one).
        size: edge length of the cubic volume / square radiograph (default 48 for volumes, 128 ceph, 64 ceph_chin).
        seed: cohort seed; subject ``i`` depends only on (seed, kind, i, its label, size, rotate).
        spacing: voxel size in mm (scalar or per axis); default: the kind's field of view / size.
        rotate: extra rotation in degrees about a random axis per subject (3D) or in-plane (2D), e.g. 30 for
            the "rotated SOS" test set. The rest of each subject is unchanged.
        progress: show a tqdm progress bar.
        cue: a spurious, label-encoding cue burned into every volume (:func:`burn_cue`: ``"marker"``,
            ``"offset"``; default ``"none"``): the training data of shortcut ("Clever Hans") models.

    Returns:
        :class:`Cohort`.

    Example:
        >>> c = generate("quality", n=4, size=32, seed=1)
        >>> c.labels.shape
        (4, 5)
    """
    size = _DEFAULT_SIZE.get(kind, 48) if size is None else size
    _check(kind, n, size)
    sp = _spacing(kind, size, spacing)
    imgs, masks, rows = [], [], []
    for _, img, mask, row in _iter_subjects(kind, n, size, seed, float(rotate), progress, cue):
        imgs.append(img)
        masks.append(mask)
        rows.append(row)
    table = pd.DataFrame(rows)
    if kind == "quality":
        labels = table[[f"consensus_{c}" for c in QUALITY_CATEGORIES]].to_numpy(np.float32)
    else:
        labels = table["label"].to_numpy(np.int64)
    return Cohort(
        kind,
        np.stack(imgs),
        np.stack(masks),
        labels,
        table,
        sp,
        _affine(sp, size),
        _meta(kind, seed, size, sp, rotate, str(cue or "none")),
    )


def generate_sos(n: int = 50, size: int = 48, seed: int = 0, rotate: float = 0.0, **kwargs: Any) -> Cohort:
    """SOS fusion-stage CBCT cohort (labels 0..4 = stages 1..5). See :func:`generate`."""
    return generate("sos", n=n, size=size, seed=seed, rotate=rotate, **kwargs)


def generate_chin(n: int = 50, size: int = 48, seed: int = 0, **kwargs: Any) -> Cohort:
    """Mandibular symphysis CBCT cohort (0 camouflage, 1 surgery). See :func:`generate`."""
    return generate("chin", n=n, size=size, seed=seed, **kwargs)


def generate_cvm(n: int = 60, size: int = 48, seed: int = 0, **kwargs: Any) -> Cohort:
    """Cervical vertebrae C2-C4 cohort (labels 0..5 = CS1..CS6). See :func:`generate`."""
    return generate("cvm", n=n, size=size, seed=seed, **kwargs)


def generate_ceph(n: int = 50, size: int | None = None, seed: int = 0, chin: bool = False, **kwargs: Any) -> Cohort:
    """Lateral cephalograms (or 2D chin crops with ``chin=True``), 0 camouflage / 1 surgery. See :func:`generate`."""
    return generate("ceph_chin" if chin else "ceph", n=n, size=size, seed=seed, **kwargs)


def generate_quality(n: int = 40, size: int = 48, seed: int = 0, **kwargs: Any) -> Cohort:
    """Head-and-neck CBCT image-quality cohort with 5 simulated raters. See :func:`generate`."""
    return generate("quality", n=n, size=size, seed=seed, **kwargs)


# ---------------------------------------------------------------------------------------------------- on disk
def stratified_split(strata: Sequence[Any], seed: int = 0, fractions: Sequence[float] = (0.7, 0.15, 0.15)) -> list[str]:
    """Assign each item to "training" / "validation" / "test", stratified: every stratum is split in ``fractions``.

    Args:
        strata: one stratum value (e.g. class label) per item.
        seed: shuffling seed.
        fractions: training, validation, test fractions (normalised to sum 1).

    Returns:
        One split name per item.

    Example:
        >>> stratified_split([0, 0, 1, 1, 0, 1, 0, 1, 0, 1], seed=0)
    """
    f = np.asarray(fractions, float)
    if f.shape != (3,) or (f < 0).any() or f.sum() <= 0:
        raise ValueError(f"fractions must be three non-negative numbers, got {fractions!r}")
    f = f / f.sum()
    strata = np.asarray(strata)
    out = np.empty(len(strata), dtype=object)
    rng = np.random.default_rng([int(seed), 10**9])
    for s in np.unique(strata):
        idx = rng.permutation(np.flatnonzero(strata == s))
        n_val, n_test = int(round(f[1] * len(idx))), int(round(f[2] * len(idx)))
        n_train = len(idx) - n_val - n_test
        out[idx[:n_train]] = "training"
        out[idx[n_train : n_train + n_val]] = "validation"
        out[idx[n_train + n_val :]] = "test"
    return out.tolist()


def _prepare_out(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output path {out} exists and is not a directory")
    try:
        (out / "images").mkdir(parents=True, exist_ok=True)
        (out / "masks").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create output directory {out}: {err}") from err
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(f"output directory {out} is not writable")
    return out


def make_cohort(
    kind: str,
    n: int = 50,
    size: int | None = None,
    seed: int = 0,
    out_dir: str | os.PathLike = "cohort",
    spacing: float | Sequence[float] | None = None,
    rotate: float = 0.0,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    progress: bool = True,
    cue: str = "none",
) -> dict:
    """Write a cohort to ``out_dir``: ``images/<id>.nii.gz``, ``masks/<id>.nii.gz``, ``datalist.json`` (MONAI
    decathlon style, stratified ``training``/``validation``/``test``, paths relative to the JSON), ``labels.csv``
    (labels, generation parameters, per-rater and consensus scores) and ``cohort.json`` (class names, mask labels,
    rater weights). Volumes are stored as int16 HU, radiographs as float32, masks as uint8. The same arguments give
    byte-identical files (gzip headers carry no time stamp or name).

    Args:
        kind: one of :data:`KINDS`.
        n: number of subjects.
        size: grid edge length (see :func:`generate`).
        seed: cohort seed.
        out_dir: output directory (created).
        spacing: voxel size in mm; default: field of view / size.
        rotate: extra rotation in degrees (see :func:`generate`).
        fractions: training / validation / test fractions of every stratum (class; quality: rounded overall
            consensus).
        progress: tqdm progress bar.
        cue: a label-encoding spurious cue burned into every volume (see :func:`generate`).

    Returns:
        Summary dict: kind, n, size, spacing, out_dir, datalist, csv, split counts, label counts.

    Example:
        >>> make_cohort("sos", n=100, size=48, seed=0, out_dir="data/sos")["datalist"]
        'data/sos/datalist.json'
    """
    size = _DEFAULT_SIZE.get(kind, 48) if size is None else size
    _check(kind, n, size)
    sp = _spacing(kind, size, spacing)
    affine = _affine(sp, size)
    out = _prepare_out(out_dir)
    img_dtype = np.float32 if kind.startswith("ceph") else np.int16
    rows = []
    for sid, img, mask, row in _iter_subjects(kind, n, size, seed, float(rotate), progress, cue):
        save_nifti(img, out / "images" / f"{sid}.nii.gz", reference=affine, dtype=img_dtype)
        save_nifti(mask, out / "masks" / f"{sid}.nii.gz", reference=affine, dtype=np.uint8)
        rows.append({**row, "image": f"images/{sid}.nii.gz", "mask": f"masks/{sid}.nii.gz"})
    table = pd.DataFrame(rows)
    if kind == "quality":
        strata = np.rint(table["consensus_overall"]).astype(int).to_numpy()
    else:
        strata = table["label"].to_numpy()
    table.insert(1, "split", stratified_split(strata, seed, fractions))
    datalist: dict[str, Any] = {
        "name": f"monai-gamverify synthetic {kind}",
        "description": f"phantom cohort kind={kind} n={n} size={size} seed={seed} rotate={rotate} cue={cue}",
        "kind": kind,
        "tensorImageSize": "2D" if kind.startswith("ceph") else "3D",
        "numTraining": int((table["split"] == "training").sum()),
    }
    for split in ("training", "validation", "test"):
        entries = []
        for _, r in table[table["split"] == split].iterrows():
            e: dict[str, Any] = {"image": r["image"], "mask": r["mask"], "id": r["id"]}
            if kind == "quality":
                e["label"] = [float(r[f"consensus_{c}"]) for c in QUALITY_CATEGORIES]
                e.update({c: float(r[f"consensus_{c}"]) for c in QUALITY_CATEGORIES})
            else:
                e["label"] = int(r["label"])
            entries.append(e)
        datalist[split] = entries
    csv_table = table.copy()
    for col in csv_table.columns:  # list-valued landmark columns as "y;z" strings
        if csv_table[col].map(lambda v: isinstance(v, list)).any():
            csv_table[col] = csv_table[col].map(lambda v: ";".join(f"{x:g}" for x in v))
    write_json(datalist, out / "datalist.json")
    write_csv(csv_table, out / "labels.csv", float_format="%.6g")
    write_json(_meta(kind, seed, size, sp, rotate, cue), out / "cohort.json")
    counts = table["split"].value_counts().to_dict()
    summary = {
        "kind": kind,
        "n": int(n),
        "size": int(size),
        "spacing": list(sp),
        "out_dir": str(out),
        "datalist": str(out / "datalist.json"),
        "csv": str(out / "labels.csv"),
        "splits": {k: int(counts.get(k, 0)) for k in ("training", "validation", "test")},
    }
    if kind != "quality":
        summary["label_counts"] = {int(k): int(v) for k, v in sorted(table["label"].value_counts().items())}
    return summary


def synth(
    kind: str = "sos",
    n: int = 50,
    size: int | None = None,
    seed: int = 0,
    out: str = "cohort",
    rotate: float = 0.0,
    spacing: float | None = None,
    progress: bool = True,
    cue: str = "none",
) -> dict:
    """What ``gamverify synth --kind sos --n 100 --size 48 --seed 0 --out data/sos`` runs: write a cohort with
    :func:`make_cohort`, log a one-line summary (:func:`summary_line`; the CLI prints it) and return the summary.

    Args:
        kind: one of sos, chin, cvm, ceph, ceph_chin, quality.
        n: number of subjects.
        size: grid edge length (default 48 for volumes, 128 ceph, 64 ceph_chin).
        seed: cohort seed.
        out: output directory.
        rotate: extra rotation in degrees (rotated test sets).
        spacing: voxel size in mm (default: field of view / size).
        progress: progress bar.
        cue: a label-encoding spurious cue (``marker``, ``offset``) burned into every volume: training data for a
            shortcut ("Clever Hans") model; default ``none``.

    Returns:
        The summary of :func:`make_cohort`.

    Example:
        >>> synth("chin", n=4, size=24, out="data/chin", progress=False)["splits"]
    """
    summary = make_cohort(
        kind, n=n, size=size, seed=seed, out_dir=out, spacing=spacing, rotate=rotate, progress=progress, cue=cue
    )
    logger.info(summary_line(summary))
    return summary


def summary_line(summary: dict) -> str:
    """One line describing a :func:`make_cohort` summary (what ``gamverify synth`` prints).

    Args:
        summary: the dict :func:`make_cohort` returns.

    Returns:
        e.g. ``wrote 4 chin subjects (24^3, spacing 1.67 mm) to data/chin: splits {...}, labels {...}``.

    Example:
        >>> print(summary_line(make_cohort("chin", n=4, size=24, out_dir="data/chin")))
    """
    kind = str(summary["kind"])
    return (
        f"wrote {summary['n']} {kind} subjects ({summary['size']}^{2 if kind.startswith('ceph') else 3}, "
        f"spacing {summary['spacing'][0]:g} mm) to {summary['out_dir']}: splits {summary['splits']}"
        + (f", labels {summary['label_counts']}" if "label_counts" in summary else "")
    )
