"""A box's depth as surfaces, and the choice of the object's surface among them: how geometry.lift_box reads depth.

Depth is binned by the finest difference the sensor tells apart at each range (its noise, or its step up close),
split into layers at gaps and valleys, and one layer is chosen from where its samples lie in the box. Each box
costs at most MAX_BINS bins, whatever the frame holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEPTH_NOISE_PER_M = 0.005   # sigma_z = k * z^2: stereo / structured-light noise, about RealSense D4xx class
_MIN_BIN_WIDTH = 1e-4   # 1/m: the 1/z bin width when the noise model is switched off (per_m = 0)
MAX_BINS = 1 << 16     # depth bins per box whatever the depths and settings: bounds each box's cost
_SPARSE_BIN = 0.002     # share of a box's samples below which a depth bin counts as empty
_GAP_BINS = 2           # empty depth bins in a row (noise sigmas or sensor steps) that separate two layers: one is
                        # not enough where a steep surface is sampled sparsely (a table seen from above, a strided
                        # 1080p box)
_COMB_BINS = 8          # the longest empty run that a sparsely sampled steep surface leaves inside itself (_comb)
_VALLEY = 0.5           # a depth bin this far below the surfaces on both sides separates them ...
_PEAK = 0.01            # ... when each holds at least this share of the samples in one bin
_CLEAR_SHARE = 0.25     # share of the central region's valid samples that makes a layer a candidate
_CORE = 0.4             # the centre core: this fraction of the central region, in each direction
_CENTRE_SHARE = 1 / 3   # share of the core's valid samples that means a layer reaches the centre
_ENCLOSE_SHARE = 0.1    # share of each quadrant's valid samples that a layer enclosing the centre holds
_AMBIGUOUS_RATIO = 0.6  # a rival holding this much of the chosen layer's share makes the choice a guess
_NEARER_SHARE = 0.1     # share of the central region that makes a layer in front of the chosen one a thing of its
                        # own: a bottle covering 6 % of a loose box holds that much once it reaches into the box's
                        # middle; an occluder at the box's edge (a chair leg, a gripper finger) and stray mixed
                        # pixels hold none of it. Under the 25 % a candidate needs: nothing in front passes unmarked


def depth_noise(z: float | np.ndarray, per_m: float = DEPTH_NOISE_PER_M) -> float | np.ndarray:
    """One standard deviation of the depth noise at range `z` metres (float or array): per_m * z^2, the model of
    stereo and structured-light cameras (per_m = subpixel disparity error / (focal length x baseline); the source
    and a D405's figures are in bench/README.md). In inverse depth (1/z) that noise is the constant per_m. Up close
    it falls below the sensor's step (a millimetre of 16UC1 below about 0.45 m at the default), which is then the
    finest depth that can be told apart: depth_layers bins depth by the larger of the two."""
    return per_m * z * z


@dataclass(frozen=True)
class DepthLayers:
    """The surfaces in a set of depth samples: runs of occupied depth bins, each as wide as the finest depth the
    sensor tells apart at its range (_depth_bins), split where at least _GAP_BINS bins in a row are empty (a gap
    clearly larger than the noise or the sensor's step there) or at the bottom of a valley between two surfaces a
    few sigmas apart (_valleys). Layer 0 is the nearest."""

    labels: np.ndarray   # per sample: its layer, or -1 for a sample in a sparse bin (no surface)
    count: int           # number of layers


def _depth_bins(depths: np.ndarray, noise_per_m: float, step: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Each depth's bin (0 holds the nearest; at most MAX_BINS), the samples per bin, and how many of the nearest
    bins are one `step` wide.

    A bin is as wide as the larger of one noise sigma (noise_per_m * z^2: constant in 1/z) and the sensor's step
    (metres between readings; constant in z), so up close each reading of a 16UC1 frame is a bin of its own and
    neighbouring readings are neighbouring bins: a tilted surface stays one run, and an empty run is a whole step
    or more. The bin coordinate is the integral of 1/width: z / step below the range where the two widths meet,
    1/z / noise beyond it. A reading stands for the step around it, and is counted in the bins that step overlaps,
    so bins a little wider than a step do not hold one reading and two by turns (a comb that would pass for
    valleys between surfaces)."""
    per_m = max(noise_per_m, _MIN_BIN_WIDTH)
    meet = math.sqrt(step / per_m)                   # per_m * meet^2 == step

    def coordinate(z: np.ndarray) -> np.ndarray:
        return np.where(z <= meet, z / step, meet / step + (1 / meet - np.reciprocal(z)) / per_m)

    z = depths.astype(np.float64)
    centre, near, far = coordinate(z), coordinate(np.maximum(z - step / 2, z / 2)), coordinate(z + step / 2)
    nearest = float(centre.min())
    scale = min(1.0, (MAX_BINS - 1) / max(float(centre.max()) - nearest, 1.0))   # wider bins, not more of them
    bins = ((centre - nearest) * scale + 0.5).astype(np.int64)       # readings a step apart: a bin apart
    near, far = (near - nearest) * scale + 0.5, (far - nearest) * scale + 0.5
    first = np.clip(np.floor(near), 0, bins.max()).astype(np.int64)
    in_first = np.clip((np.minimum(far, first + 1) - near) / np.maximum(far - near, 1e-12), 0.0, 1.0)
    size = int(bins.max()) + 2
    counts = (np.bincount(first, in_first, size) + np.bincount(first + 1, 1 - in_first, size))[:size - 1]
    return bins, counts, int(max(0.0, (meet / step - nearest) * scale) + 0.5)


def depth_layers(depths: np.ndarray, step: float, noise_per_m: float = DEPTH_NOISE_PER_M) -> DepthLayers:
    """The surfaces among `depths` (metres, all valid; `step` > 0: metres between the sensor's readings).
    A bin holding fewer than _SPARSE_BIN of the samples counts as empty, so isolated readings (mixed pixels at
    edges, speckle) neither bridge two surfaces nor form one; the samples in empty and valley bins belong to no
    layer."""
    bins, counts, stepped = _depth_bins(depths, noise_per_m, step)
    if counts.max() < _SPARSE_BIN * depths.size:     # readings scattered over every range: no surface stands out
        return DepthLayers(labels=np.zeros(depths.size, np.int64), count=1)
    valley = _valleys(counts, depths.size)
    valley[:stepped] = False     # where the noise is finer than a step, no two surfaces' noise tails overlap
    occupied = np.flatnonzero((counts >= max(1.0, _SPARSE_BIN * depths.size)) & ~valley)
    valleys_before = np.cumsum(valley)[occupied]
    gaps = np.diff(occupied) - 1                                  # empty bins between neighbouring occupied ones
    starts = np.concatenate(([True], (gaps > _GAP_BINS) & ~_comb(gaps) | (np.diff(valleys_before) > 0)))
    first, last = occupied[starts], occupied[np.concatenate((starts[1:], [True]))]
    every_bin = np.arange(counts.size)
    layer = np.searchsorted(first, every_bin, side="right") - 1
    layer_of_bin = np.where((layer >= 0) & (every_bin <= last[layer]), layer, -1)
    return DepthLayers(labels=layer_of_bin[bins], count=int(first.size))


def _comb(gaps: np.ndarray) -> np.ndarray:
    """Which runs of empty bins lie inside a comb: a steep surface sampled sparsely (a can's side near its outline,
    seen up close) fills one bin per sampled line with a few empty ones between, widening gradually. A run there is
    at most _COMB_BINS long and at most _GAP_BINS plus twice a neighbouring run, where a gap between two surfaces
    follows a run inside one (none at all on a flat, noisy or tilted surface)."""
    at = np.arange(gaps.size)
    empty = gaps > 0
    before = np.maximum.accumulate(np.where(empty, at, -1))            # the nearest empty run at or before each
    after = np.minimum.accumulate(np.where(empty, at, gaps.size)[::-1])[::-1]
    previous = np.where(before[:-1] >= 0, gaps[np.maximum(before[:-1], 0)], 0) if gaps.size else gaps
    following = np.where(after[1:] < gaps.size, gaps[np.minimum(after[1:], gaps.size - 1)], 0) if gaps.size else gaps
    neighbour = np.maximum(np.concatenate(([0], previous)), np.concatenate((following, [0])))
    return (gaps <= _COMB_BINS) & (gaps <= _GAP_BINS + 2 * neighbour)


def _valleys(counts: np.ndarray, total: int) -> np.ndarray:
    """The depth bins at the bottom of a valley between two surfaces whose noise tails overlap (a few sigmas apart, no
    empty bin between them): a local minimum of the smoothed counts below _VALLEY of the lower of the highest counts
    on either side within its run of occupied bins, both of those substantial (_PEAK of all samples). The smoothing over
    5 bins keeps what is left of the comb millimetre depth makes in bins a little wider than a millimetre from
    passing for valleys."""
    padded = np.concatenate(([0, 0], counts, [0, 0])).astype(np.float64)
    smooth = (3 * counts + 2 * (padded[1:-3] + padded[3:-1]) + padded[:-4] + padded[4:]) / 9   # 1-2-3-2-1
    # the highest counts on either side within the bin's run: a run ends at more than _GAP_BINS sparse bins in a row,
    # so a far wall never makes the dips of a nearer surface's tail (a steep side sampled line by line) valleys
    edges = np.diff(np.concatenate(([0], counts < max(1.0, _SPARSE_BIN * total), [0])).astype(np.int8))
    sparse_from, sparse_to = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    long_gap_ends = np.zeros(counts.size + 1, bool)
    long_gap_ends[sparse_to[sparse_to - sparse_from > _GAP_BINS]] = True
    run = np.cumsum(long_gap_ends[:-1])
    offset = run * (smooth.max() + 1)                                   # later runs rank above earlier ones
    left = np.maximum.accumulate(smooth + offset) - offset
    back = run[::-1].max() - run[::-1] if run.size else run
    right = (np.maximum.accumulate(smooth[::-1] + back * (smooth.max() + 1)) - back * (smooth.max() + 1))[::-1]
    lower_peak = np.minimum(left, right)
    padded = np.concatenate(([np.inf], smooth, [np.inf]))
    bottom = (smooth <= padded[:-2]) & (smooth <= padded[2:])
    return bottom & (smooth < _VALLEY * lower_peak) & (lower_peak >= _PEAK * total)


@dataclass(frozen=True)
class LayerChoice:
    layer: int           # index into DepthLayers (0 = nearest)
    ambiguous: bool      # another surface of similar share could as well be the object


# Zones of a box, per axis (columns and rows alike): bit 1 the right/lower half, bit 8 the left/upper half (a line
# on the centre line is in both, so a mirrored box's zones are the mirror images), bit 2 the central `shrink`
# region, bit 4 the centre core. A sample's zone is row_zone * ZONES_PER_AXIS + column_zone.
_HIGH_HALF, CENTRAL, _CORE_ZONE, _LOW_HALF = 1, 2, 4, 8
ZONES_PER_AXIS = 16
_ZONE_ROW, _ZONE_COL = np.divmod(np.arange(ZONES_PER_AXIS ** 2), ZONES_PER_AXIS)
_IN_CENTRAL = (_ZONE_ROW & CENTRAL > 0) & (_ZONE_COL & CENTRAL > 0)
_IN_CORE = (_ZONE_ROW & _CORE_ZONE > 0) & (_ZONE_COL & _CORE_ZONE > 0)
_IN_QUADRANT = [(_ZONE_COL & col_half > 0) & (_ZONE_ROW & row_half > 0)
                for col_half in (_LOW_HALF, _HIGH_HALF) for row_half in (_LOW_HALF, _HIGH_HALF)]


def line_zones(place: np.ndarray, shrink: float) -> np.ndarray:
    """The zone bits of sampled lines at `place` (-1 at one edge of the box, +1 at the other)."""
    distance = np.abs(place)
    return ((place >= 0) * _HIGH_HALF + (place <= 0) * _LOW_HALF + (distance <= shrink) * CENTRAL
            + (distance <= _CORE * shrink) * _CORE_ZONE).astype(np.int64)


def choose_layer(layers: DepthLayers, zones: np.ndarray) -> LayerChoice:
    """The object's surface among the layers of a box, from each sample's zone in the box (see line_zones).

    Candidates hold a clear share (_CLEAR_SHARE) of the central region's samples, or enclose the centre (a ring,
    a mug's rim: present in all four quadrants). Among them the nearest that reaches the centre (holds
    _CENTRE_SHARE of the centre core's samples, or encloses it) wins; when none does, the nearest candidate;
    when no layer is a candidate, the largest. So a thin occluder at the box's edge, which holds little of the
    central region and not its centre, never wins. The choice is ambiguous when another layer holds a similar
    share (at least _AMBIGUOUS_RATIO of the chosen one's, of the central region or of the whole box), unless it
    is only a farther background around the chosen one, or is neither a candidate nor nearer. It is ambiguous too
    when a layer in front of the chosen one holds _NEARER_SHARE of the central region: a small object in front of
    the surface the box is centred on (a bottle before a wall) may be the object, so the position is marked rather
    than silently the wall's.
    """
    n = max(layers.count, 1)
    zone_count = ZONES_PER_AXIS ** 2
    counts = np.bincount((layers.labels + 1) * zone_count + zones, minlength=(n + 1) * zone_count)
    counts = counts.reshape(n + 1, zone_count)                      # row 0: samples in no layer
    totals = counts.sum(axis=0)

    def shares(in_zone: np.ndarray) -> np.ndarray:
        return counts[1:, in_zone].sum(axis=1) / max(int(totals[in_zone].sum()), 1)

    box_share, central_share = shares(np.ones(zone_count, bool)), shares(_IN_CENTRAL)
    core_share = shares(_IN_CORE)
    quadrants = np.stack([shares(in_quadrant) for in_quadrant in _IN_QUADRANT], axis=1)
    quadrant_seen = np.array([totals[in_quadrant].sum() > 0 for in_quadrant in _IN_QUADRANT])
    encloses = np.all((quadrants >= _ENCLOSE_SHARE) | ~quadrant_seen, axis=1) & (box_share > 0)
    candidate = (central_share >= _CLEAR_SHARE) | encloses
    reaches = candidate & ((core_share >= _CENTRE_SHARE) | encloses)
    if reaches.any():
        chosen = int(np.argmax(reaches))                           # layers are ordered nearest first
    elif candidate.any():
        chosen = int(np.argmax(candidate))
    else:
        chosen = int(np.argmax(box_share)) if layers.count else 0
    order = np.arange(n)
    similar = ((central_share >= _AMBIGUOUS_RATIO * central_share[chosen])
               | (box_share >= _AMBIGUOUS_RATIO * box_share[chosen]))
    rivals = similar & (candidate | (order < chosen)) & (order != chosen) & (box_share > 0)
    background = (order > chosen) & encloses
    nearer = (order < chosen) & (central_share >= _NEARER_SHARE)
    return LayerChoice(layer=chosen, ambiguous=bool(np.any(rivals & ~background) or np.any(nearer)))
