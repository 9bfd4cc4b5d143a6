"""Edit-fidelity measurements between two images of one scene: global shift, zoom, the PSNR of the region the
edit should leave alone, the change inside the region it should edit and how much of that region took the
target's colour (``edit_score``). Pure numpy / torch, no model.

The defect these catch is the commonest complaint about edit LoRAs: "the output is shifted / zoomed". A LoRA
trained on misaligned pairs learns the misalignment, and a loss curve never shows it; these numbers do.

Conventions (both images are ``(width, height)`` PIL images or ``HxW`` / ``HxWxC`` arrays, uint8 or [0, 1]):

- ``reference`` is the control, ``moved`` the generated sample (or a dataset's target);
- ``dx`` / ``dy``: the content of ``moved`` sits ``dx`` pixels right of / ``dy`` pixels below where it is in
  ``reference``, in ``moved``'s pixels; ``zoom`` > 1: ``moved`` shows the content magnified about the image
  centre (a zoom-in), < 1 a zoom-out; a shift is measured after the zoom is undone;
- a mask is white (>= 0.5) where the edit happens; only the rest takes part in shift / zoom / PSNR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

# Zooms searched: a real zoom beyond +-20% is not a subtle defect, and the search cost grows with the range.
ZOOM_RANGE = (0.83, 1.2)
ZOOM_COARSE_STEP = 0.02  # in log-zoom; the peak of the match score is a few steps wide, so this cannot miss it
PSNR_CAP = 100.0  # dB for identical regions (infinity is not JSON)
AGREE_TOLERANCE = 0.04  # control and target "agree" where no channel differs by more (~10/255: JPEG noise)
# ``edit_score``: a sample pixel has the target's colour when no channel differs by more (~38/255: far below the
# distance between any two builtin:shapes colours, above a small VAE's error inside a flat shape)
EDIT_TOLERANCE = 0.15
# Below this correlation peak the images share no structure: no alignment is reported. Unrelated textured
# images still reach 0.1-0.3 (the zoom search takes the best of many tries), aligned copies 0.6-1.0: the peak is
# reported with the alignment, and a shift read off a low peak means little.
MIN_PEAK = 0.1


@dataclass(frozen=True)
class Alignment:
    """How ``moved`` is placed relative to ``reference`` (see the module docstring for signs)."""

    dx: float
    dy: float
    zoom: float
    peak: float  # phase-correlation peak at the found zoom, 0..1: 1 = the (unmasked) images match exactly

    @property
    def shift_px(self) -> float:
        return math.hypot(self.dx, self.dy)


def as_array(image: Any) -> np.ndarray:
    """``HxWxC`` float64 in [0, 1] from a PIL image or an array (uint8 arrays are scaled by 1/255)."""
    if hasattr(image, "convert"):  # PIL
        image = np.asarray(image.convert("L" if image.mode in ("L", "1", "I", "F") else "RGB"))
    array = np.asarray(image)
    scaled = array.astype(np.float64) / 255.0 if array.dtype == np.uint8 else array.astype(np.float64)
    return scaled[..., None] if scaled.ndim == 2 else scaled


def gray(image: Any) -> np.ndarray:
    """``HxW`` luma in [0, 1]."""
    array = as_array(image)
    if array.shape[2] >= 3:
        return array[..., 0] * 0.299 + array[..., 1] * 0.587 + array[..., 2] * 0.114
    return array[..., 0]


def mask_array(mask: Any | None, size: tuple[int, int]) -> np.ndarray | None:
    """Boolean ``HxW`` (True = edited) at ``size`` (w, h), or None."""
    if mask is None:
        return None
    m = as_array(mask)[..., 0]
    if m.shape != (size[1], size[0]):
        m = _resize(m, size)
    return m >= 0.5


def _resize(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``HxW`` float array resized to ``size`` (w, h), antialiased (a downscale must not alias texture)."""
    import torch

    if array.shape == (size[1], size[0]):
        return array
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64))[None, None]
    out = torch.nn.functional.interpolate(t, size=(size[1], size[0]), mode="bilinear", antialias=True,
                                          align_corners=False)
    return out[0, 0].numpy()


def _warp(array: np.ndarray, zoom: float, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    """``array`` magnified by ``zoom`` about its centre, then moved by (dx, dy) pixels (same size; borders
    repeat the edge pixels): output(x) = input((x - c - d) / zoom + c)."""
    import torch

    if zoom == 1.0 and dx == 0.0 and dy == 0.0:
        return array
    h, w = array.shape
    # grid_sample's normalized coordinates (align_corners=False): pixel i has its centre at (2i + 1) / n - 1
    xs = ((np.arange(w) - (w - 1) / 2 - dx) / zoom + (w - 1) / 2) * 2 / w + 1 / w - 1
    ys = ((np.arange(h) - (h - 1) / 2 - dy) / zoom + (h - 1) / 2) * 2 / h + 1 / h - 1
    grid = np.empty((1, h, w, 2))
    grid[0, :, :, 0], grid[0, :, :, 1] = xs[None, :], ys[:, None]
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64))[None, None]
    out = torch.nn.functional.grid_sample(t, torch.from_numpy(grid), mode="bicubic", padding_mode="border",
                                          align_corners=False)
    return out[0, 0].numpy()


def _weight(shape: tuple[int, int], edited: np.ndarray | None) -> np.ndarray:
    """A Tukey window (flat, with cosine tapers on the outer eighths: the image borders would otherwise
    correlate as a wrap-around edge, and a Hann window would all but ignore a region the edit leaves near a
    border) times a softened "not edited" map: the weight tapers to zero over a few pixels instead of drawing
    a new sharp edge."""
    h, w = shape
    weight = np.outer(_tukey(h), _tukey(w))
    if edited is not None:
        radius = max(1, round(min(h, w) / 64))
        # grow the mask by the taper's reach first, so that nothing of the edited region leaks into the weight
        # (an unmoved edit would otherwise pull the peak towards zero shift)
        grown = edited.astype(np.float64)
        for axis in (0, 1):
            grown = _box(grown, 2 * radius, axis)
        keep = (grown <= 1e-9).astype(np.float64)
        for axis in (0, 1):  # separable box blur, twice (a tent): cheap and enough to soften the mask edge
            for _ in range(2):
                keep = _box(keep, radius, axis)
        weight = weight * keep
    return weight


def _tukey(n: int, taper: float = 0.125) -> np.ndarray:
    edge = max(1, int(n * taper))
    ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(edge) + 0.5) / edge)
    window = np.ones(n)
    window[:edge], window[n - edge:] = ramp, ramp[::-1]
    return window


def _box(array: np.ndarray, radius: int, axis: int) -> np.ndarray:
    pad = [(0, 0), (0, 0)]
    pad[axis] = (radius, radius)
    padded = np.pad(array, pad, mode="edge")
    c = np.cumsum(padded, axis=axis, dtype=np.float64)
    c = np.concatenate([np.zeros_like(np.take(c, [0], axis=axis)), c], axis=axis)
    n = array.shape[axis]
    hi = np.take(c, np.arange(2 * radius + 1, 2 * radius + 1 + n), axis=axis)
    lo = np.take(c, np.arange(0, n), axis=axis)
    return (hi - lo) / (2 * radius + 1)


def _prepared(image: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Weighted-mean removed, then weighted: the weight multiplies structure but adds none of its own, so it
    cannot pull the correlation peak towards zero shift."""
    mean = float((image * weight).sum() / max(weight.sum(), 1e-12))
    return (image - mean) * weight


def _lowpass(shape: tuple[int, int]) -> np.ndarray:
    """Gaussian weights on the frequencies: whitening alone lets pixel noise (JPEG, sampling noise) dominate.
    Symmetric, so it widens the correlation peak without moving it."""
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.fftfreq(shape[1])[None, :]
    return np.exp(-(fy**2 + fx**2) / (2 * 0.25**2))


def _correlate(reference: np.ndarray, moved: np.ndarray, weight: np.ndarray,
               factor: int = 20) -> tuple[float, float, float]:
    """Phase correlation with a sub-pixel peak: ``(dx, dy, peak)``; peak is 1 for an exact shifted copy."""
    a = np.fft.fft2(_prepared(reference, weight))
    b = np.fft.fft2(_prepared(moved, weight))
    cross = b * np.conj(a)  # b(x) = a(x - t)  =>  cross = |A|^2 exp(-2 pi i f t): its inverse peaks at +t
    magnitude = np.abs(cross)
    if magnitude.max() <= 1e-12:
        return 0.0, 0.0, 0.0
    lowpass = _lowpass(cross.shape)
    # whitened (each frequency counts alike: a sharp peak), except frequencies far weaker than the average,
    # which hold only numerical or pixel noise and are damped instead of amplified
    cross = cross / (magnitude + 1e-2 * magnitude.mean()) * lowpass
    surface = np.fft.ifft2(cross).real
    h, w = surface.shape
    py, px = np.unravel_index(int(np.argmax(surface)), surface.shape)
    py, px = (py - h if py > h // 2 else py), (px - w if px > w // 2 else px)
    dy, dx, value = _refine(cross, float(py), float(px), factor)
    return dx, dy, value / float(np.abs(cross).mean())  # the height an exact shifted copy would reach


def _refine(cross: np.ndarray, py: float, px: float, factor: int) -> tuple[float, float, float]:
    """The inverse DFT of ``cross`` evaluated on a 1/``factor`` pixel grid within 1 px of the integer peak
    (Guizar-Sicairos' matrix DFT): the sub-pixel peak without a model of its shape."""
    h, w = cross.shape
    offsets = np.arange(-factor, factor + 1) / factor
    ys, xs = py + offsets, px + offsets
    ky = np.exp(2j * np.pi * np.outer(ys, np.fft.fftfreq(h)))
    kx = np.exp(2j * np.pi * np.outer(np.fft.fftfreq(w), xs))
    # einsum, not @: these products are small and BLAS threads only contend for the cores here
    values = np.einsum("yj,jx->yx", np.einsum("yi,ij->yj", ky, cross), kx).real / (h * w)
    i, j = np.unravel_index(int(np.argmax(values)), values.shape)
    return float(ys[i]), float(xs[j]), float(values[i, j])


def _working(array: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """``array`` scaled so that its longer side is at most ``max_side``; returns it and the scale used."""
    h, w = array.shape
    scale = min(1.0, max_side / max(h, w))
    if scale == 1.0:
        return array, 1.0
    return _resize(array, (max(8, round(w * scale)), max(8, round(h * scale)))), scale


def _register(source: np.ndarray, target: np.ndarray, weight: np.ndarray, zoom: float, dx: float, dy: float,
              factor: int = 20, rounds: int = 4) -> tuple[float, float, float]:
    """The shift of ``target`` relative to ``source`` zoomed by ``zoom``, starting from (dx, dy): each round
    moves the source by the estimate and measures what is left. The weight stays put while the content
    moves under it, which pulls a single measurement towards zero shift (strongly so when the unedited region
    is a thin frame around a masked centre); measuring residuals removes that bias."""
    peak = 0.0
    for _ in range(rounds):
        rx, ry, peak = _correlate(_warp(source, zoom, dx, dy), target, weight, factor)
        dx, dy = dx + rx, dy + ry
        if math.hypot(rx, ry) < 1 / factor:
            break
    return dx, dy, peak


def _at_size(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return _resize(array, (shape[1], shape[0]))


def estimate_alignment(reference: Any, moved: Any, mask: Any | None = None, max_side: int = 128,
                       shift_max_side: int = 512) -> Alignment | None:
    """Shift and zoom of ``moved`` relative to ``reference`` outside ``mask``.

    At up to ``max_side`` pixels: the shift at zoom 1, then the zoom at which the reference, zoomed and moved
    by that shift, correlates best with ``moved`` (a log-spaced search over ``ZOOM_RANGE``, then a parabola
    through the best three, twice). At up to ``shift_max_side`` pixels: the shift at that zoom, in
    ``moved``'s pixels. ``reference`` is resized to ``moved``'s size first (callers check that the aspects
    agree). None when the unmasked images share no structure to correlate (flat, or everything masked).
    """
    target = gray(moved)
    source = _at_size(gray(reference), target.shape)
    edited = mask_array(mask, (target.shape[1], target.shape[0]))

    def working(side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        t, _ = _working(target, side)
        e = _at_size(edited.astype(np.float64), t.shape) >= 0.5 if edited is not None else None
        return _at_size(source, t.shape), t, _weight(t.shape, e)

    small_s, small_t, weight = working(max_side)
    if weight.sum() < 1e-3 * weight.size or small_t.std() < 1e-6 or small_s.std() < 1e-6:
        return None
    dx, dy, _ = _register(small_s, small_t, weight, 1.0, 0.0, 0.0, factor=4)

    def score(log_zoom: float) -> float:
        # a coarse sub-pixel grid suffices here: the score only has to follow the true peak's height
        return _correlate(_warp(small_s, math.exp(log_zoom), dx, dy), small_t, weight, factor=4)[2]

    lo, hi = math.log(ZOOM_RANGE[0]), math.log(ZOOM_RANGE[1])
    grid = list(np.arange(lo, hi + 1e-9, ZOOM_COARSE_STEP))
    scores = [score(z) for z in grid]
    log_zoom, step = grid[int(np.argmax(scores))], ZOOM_COARSE_STEP
    for _ in range(2):  # refine: a parabola through the best and its neighbours, at a finer step each time
        step /= 4
        left, mid, right = score(log_zoom - step), score(log_zoom), score(log_zoom + step)
        curvature = left - 2 * mid + right
        if curvature < 0:
            log_zoom += step * float(np.clip(0.5 * (left - right) / curvature, -1.0, 1.0))
        dx, dy, _ = _register(small_s, small_t, weight, math.exp(log_zoom), dx, dy, factor=10, rounds=2)
    zoom = math.exp(log_zoom)

    full_s, full_t, full_w = working(shift_max_side)
    sx, sy = full_t.shape[1] / small_t.shape[1], full_t.shape[0] / small_t.shape[0]
    dx, dy, peak = _register(full_s, full_t, full_w, zoom, dx * sx, dy * sy)
    if peak < MIN_PEAK:
        return None
    return Alignment(dx=dx * target.shape[1] / full_t.shape[1], dy=dy * target.shape[0] / full_t.shape[0],
                     zoom=zoom, peak=peak)


def unedited_region(control: Any, target: Any, mask: Any | None = None,
                    tolerance: float = AGREE_TOLERANCE) -> np.ndarray:
    """Boolean ``HxW`` at the target's size: True where the edit should leave the image alone. With a mask:
    outside it; without one: where control and target agree (no channel differs by more than ``tolerance``)."""
    t = as_array(target)
    size = (t.shape[1], t.shape[0])
    edited = mask_array(mask, size)
    if edited is not None:
        return ~edited
    c = _resized_rgb(control, size)
    return np.abs(c - t).max(axis=2) <= tolerance


def _resized_rgb(image: Any, size: tuple[int, int]) -> np.ndarray:
    array = as_array(image)
    if array.shape[:2] == (size[1], size[0]):
        return array
    return np.stack([_resize(array[..., k], size) for k in range(array.shape[2])], axis=2)


def psnr(a: Any, b: Any, region: np.ndarray | None = None) -> float | None:
    """PSNR in dB of ``b`` against ``a`` (both at ``b``'s size) over ``region`` (all pixels when None), for
    [0, 1] images; capped at ``PSNR_CAP`` for identical pixels; None for an empty region."""
    y = as_array(b)
    x = _resized_rgb(a, (y.shape[1], y.shape[0]))
    channels = min(x.shape[2], y.shape[2])
    diff = (x[..., :channels] - y[..., :channels]) ** 2
    if region is not None:
        if not region.any():
            return None
        diff = diff[region]
    mse = float(diff.mean())
    return PSNR_CAP if mse <= 10 ** (-PSNR_CAP / 10) else min(PSNR_CAP, -10.0 * math.log10(mse))


def mean_change(a: Any, b: Any, region: np.ndarray) -> float | None:
    """Mean absolute difference (0..1, all channels) between ``a`` and ``b`` inside ``region``; None if empty."""
    if not region.any():
        return None
    y = as_array(b)
    x = _resized_rgb(a, (y.shape[1], y.shape[0]))
    channels = min(x.shape[2], y.shape[2])
    return float(np.abs(x[..., :channels] - y[..., :channels])[region].mean())


def edit_score(target: Any, sample: Any, region: np.ndarray, tolerance: float = EDIT_TOLERANCE) -> float | None:
    """The fraction (0..1) of the pixels inside ``region`` (the edited region, True = edited) where ``sample``
    has the target's colour: no channel further than ``tolerance`` from ``target`` (both at ``sample``'s size).
    For a recolour of a flat shape (``builtin:shapes``): the share of the shape's pixels that took the new
    colour; for a move: the share of the old and new places that show the background / the shape. None for an
    empty region."""
    if not region.any():
        return None
    y = as_array(sample)
    x = _resized_rgb(target, (y.shape[1], y.shape[0]))
    channels = min(x.shape[2], y.shape[2])
    close = np.abs(x[..., :channels] - y[..., :channels]).max(axis=2) <= tolerance
    return float(close[region].mean())


def same_aspect(a: tuple[int, int], b: tuple[int, int], tolerance: float = 0.02) -> bool:
    """Whether sizes ``a`` and ``b`` (w, h) have the same aspect within ``tolerance`` (relative): only then
    is one a resized copy of the other's frame and an alignment between them meaningful."""
    return abs(math.log((a[0] / a[1]) / (b[0] / b[1]))) <= tolerance
