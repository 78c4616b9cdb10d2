"""Microscope image files: what a file holds (scenes, time points, channels, Z planes, bit depth, pixel size)
and the planes a data set's ``read:`` block chooses from it, as the ``(H, W, C)`` uint8 field the crop stage
cuts.

TIFF, OME-TIFF and ImageJ hyperstacks are read with tifffile (channel names from the OME metadata or the
ImageJ plane labels, pixel size from OME ``PhysicalSizeX/Y`` or the ImageJ resolution and unit); OME-Zarr,
ND2 and LIF (extra ``formats``) and CZI (extra ``czi``) with bioio and its plugins; other formats (PNG,
JPEG) with PIL, as RGB or grey. A file is held as ``(S, T, C, Z, Y, X)``.

Without choices (:class:`ReadParams` all ``None``) a single-plane file (one scene, time point and Z plane;
grey or the samples of one colour image) is read exactly as :func:`preprocessing.io.read_image` reads it;
anything more is refused with one line saying what the file holds and what to set, never cut to its first
page.
"""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from preprocessing.errors import InputError
from preprocessing.io import first_line, read_image, read_image_array

__all__ = [
    "BIOIO_FORMATS",
    "READ_JSON",
    "TIFF_SUFFIXES",
    "FileInfo",
    "ReadParams",
    "ReadSpec",
    "Stack",
    "choose_planes",
    "inspect_file",
    "load_read_spec",
    "open_stack",
    "read_field",
    "read_fields",
    "to_uint8",
]

TIFF_SUFFIXES: frozenset[str] = frozenset({".tif", ".tiff"})
#: formats read through bioio and one plugin each: suffix -> (plugin module, the extra that installs it)
BIOIO_FORMATS: dict[str, tuple[str, str]] = {
    ".zarr": ("bioio_ome_zarr", "formats"),  # OME-Zarr (a folder)
    ".nd2": ("bioio_nd2", "formats"),
    ".lif": ("bioio_lif", "formats"),
    ".czi": ("bioio_czi", "czi"),  # GPL (aicspylibczi) and LGPL (pylibCZIrw): an extra of its own
}


@dataclass(frozen=True)
class ReadParams:
    """A data set's ``read:`` block: which planes of each file the model gets, and their intensity scale.

    ``channels``: names (OME, ImageJ; case-insensitive) or indices, in the order the model gets them;
    ``z``: an index, ``"max"`` or ``"mean"`` (projections); ``time``: an index; ``scene``: an index or
    ``"all"`` (each scene its own field of the group); ``intensity``: ``{"range": [lo, hi]}`` (every
    channel) or ``{"percentiles": [lo, hi]}`` (per channel, computed once over the training images by the
    folder source and recorded in ``read.json``).
    """

    channels: tuple[str | int, ...] | None = None
    z: int | str | None = None
    time: int | None = None
    scene: int | str | None = None
    intensity: dict[str, list[float]] | None = None

    def __post_init__(self) -> None:
        if self.channels is not None:
            object.__setattr__(self, "channels", tuple(self.channels))
            if not self.channels:
                raise InputError("read.channels: give at least one channel (a name or an index)")
        if isinstance(self.z, str) and self.z not in ("max", "mean"):
            raise InputError(f"read.z must be an index, max or mean, got {self.z!r}")
        if isinstance(self.scene, str) and self.scene != "all":
            raise InputError(f"read.scene must be an index or all, got {self.scene!r}")
        if self.intensity is not None:
            _check_intensity(self.intensity)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> ReadParams:
        """From a config's ``read:`` mapping (unknown keys refused with one line)."""
        values = dict(values or {})
        unknown = sorted(set(values) - {"channels", "z", "time", "scene", "intensity"})
        if unknown:
            raise InputError(f"read: unknown key {unknown[0]!r} (channels, z, time, scene, intensity)")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["channels"] = list(self.channels) if self.channels is not None else None
        return out


def _check_intensity(intensity: dict[str, list[float]]) -> None:
    if set(intensity) not in ({"range"}, {"percentiles"}):
        raise InputError("read.intensity: give either range: [lo, hi] or percentiles: [lo, hi]")
    ((kind, pair),) = intensity.items()
    if not (isinstance(pair, list | tuple) and len(pair) == 2 and float(pair[0]) < float(pair[1])):
        raise InputError(f"read.intensity.{kind} must be [lo, hi] with lo < hi, got {pair!r}")
    if kind == "percentiles" and not 0 <= float(pair[0]) < float(pair[1]) <= 100:
        raise InputError(f"read.intensity.percentiles must lie in 0-100, got {pair!r}")


@dataclass
class Stack:
    """One file's pixels ``(S, T, C, Z, Y, X)`` and what is known of them."""

    path: Path
    format: str  # "OME-TIFF", "ImageJ TIFF", "TIFF", "PNG", ...
    data: np.ndarray  # (S, T, C, Z, Y, X)
    channel_names: list[str] = field(default_factory=list)  # len C; "" where unnamed
    pixel_size_um: tuple[float, float] | None = None  # (x, y)
    pages_as_channels: bool = False  # a plain multi-page TIFF: its pages are taken as channels
    samples: bool = False  # the channels are samples of one plane (RGB, RGBA, CMYK)

    @property
    def single_plane(self) -> bool:
        """One scene, time point and Z plane, whose channels are grey or the samples of one colour image:
        what :func:`preprocessing.io.read_image` reads whole (without a ``read:`` block)."""
        s, t, c, z = self.data.shape[:4]
        return s == t == z == 1 and (c == 1 or (self.samples and c in (2, 3, 4)))

    def describe(self) -> str:
        """E.g. ``"4 channels (DAPI, GFP, mCherry, Cy5) × 5 Z"``: the dimensions larger than one."""
        s, t, c, z = self.data.shape[:4]
        named = [n for n in self.channel_names if n]
        kind = "pages" if self.pages_as_channels else "channels"
        channel = f"{c} {kind}" + (f" ({', '.join(named)})" if len(named) == c else "")
        parts = [channel] + [f"{n} {a}" for n, a in ((z, "Z"), (t, "time points"), (s, "scenes")) if n > 1]
        return " × ".join(parts)


def open_stack(path: str | os.PathLike[str]) -> Stack:
    """Read a whole file (:class:`InputError`, one line naming it, when it cannot be read)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".zarr" and path.is_dir():
        return _open_bioio(path, suffix)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    if suffix in TIFF_SUFFIXES:
        return _open_tiff(path)
    if suffix in BIOIO_FORMATS:
        return _open_bioio(path, suffix)
    arr = read_image_array(
        path
    )  # PIL formats, with the checks of read_image  # (H, W) grey, (H, W, 2|3|4) with alpha or colour
    if arr.ndim == 3:
        arr = arr[:, :, 0] if arr.shape[2] <= 2 else arr[:, :, :3]  # alpha dropped
    grey = arr.ndim == 2
    data = (arr[None] if grey else arr.transpose(2, 0, 1))[None, None, :, None]  # (1, 1, C, 1, H, W)
    names = ["grey"] if grey else ["R", "G", "B"]
    return Stack(path, path.suffix.lstrip(".").upper(), data, names, samples=not grey)


def _open_tiff(path: Path) -> Stack:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            kind = "OME-TIFF" if tf.is_ome else "ImageJ TIFF" if tf.is_imagej else "TIFF"
            if not tf.is_ome and len(tf.series) > 1:
                shapes = ", ".join(str(s.shape) for s in tf.series[:4])
                raise InputError(
                    f"{path}: {len(tf.series)} image series ({shapes}): only OME-TIFF scenes are read"
                )
            series = list(tf.series) if tf.is_ome else tf.series[:1]
            arrays = [_canonical(s, path, shaped=tf.is_ome or tf.is_imagej) for s in series]
            names, size = _tiff_metadata(tf, arrays[0].shape[1])  # (T, C, Z, Y, X)
    except InputError as err:
        msg = str(err)
        raise InputError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    except Exception as err:  # noqa: BLE001 - tifffile and its codecs (imagecodecs, zlib) raise their own
        raise InputError(f"{path}: unreadable TIFF ({first_line(err)})") from None
    samples = "S" in series[0].axes and arrays[0].shape[1] > 1
    pages = kind == "TIFF" and arrays[0].shape[1] > 1 and not samples
    return Stack(path, kind, _scenes(path, arrays), names, size, pages_as_channels=pages, samples=samples)


def _scenes(path: Path, scenes: list[np.ndarray]) -> np.ndarray:
    """The scenes ``(T, C, Z, Y, X)`` of one file stacked ``(S, T, C, Z, Y, X)``; one line when their shapes
    differ."""
    if len({a.shape for a in scenes}) > 1:
        raise InputError(f"{path}: its scenes differ in shape ({', '.join(str(a.shape) for a in scenes)})")
    return np.stack(scenes)


def _open_bioio(path: Path, suffix: str) -> Stack:
    """A file of :data:`BIOIO_FORMATS` through bioio: every scene as ``(T, C, Z, Y, X)`` (RGB samples as
    channels), channel names and the X/Y pixel size (µm) bioio reports. A missing plugin: one line naming
    the extra to install."""
    import importlib

    module, extra = BIOIO_FORMATS[suffix]
    try:
        from bioio import BioImage

        plugin = importlib.import_module(module)
    except ImportError:
        raise InputError(
            f"{path}: reading {suffix} files needs bioio and {module.replace('_', '-')}: "
            f"pip install -e '.[{extra}]'"
        ) from None
    try:
        image = BioImage(path, reader=plugin.Reader)
        scenes = []
        for scene in image.scenes:
            image.set_scene(scene)
            scenes.append(_bioio_scene(image, path))
        names = [str(n) for n in (image.channel_names or [])]
        sizes = image.physical_pixel_sizes
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - the plugins raise their libraries' own errors
        raise InputError(f"{path}: unreadable {suffix} file ({first_line(err)})") from None
    data = _scenes(path, scenes)  # (S, T, C, Z, Y, X)
    channels = data.shape[2]
    names = names[:channels] + [""] * (channels - len(names[:channels]))
    size = (float(sizes.X), float(sizes.Y)) if sizes.X and sizes.Y else None
    return Stack(path, suffix.lstrip(".").upper(), data, names, size)


def _bioio_scene(image: Any, path: Path) -> np.ndarray:
    """The current scene of a bioio image as ``(T, C, Z, Y, X)``; RGB samples become the channels."""
    order = image.dims.order
    if "S" in order and image.dims.S > 1:
        if image.dims.C > 1:
            raise InputError(f"{path}: both channels and RGB samples hold several planes")
        data = np.asarray(image.get_image_data("TZYXS"))  # (T, Z, Y, X, S)
        return np.moveaxis(data, 4, 1)  # (T, S, Z, Y, X)
    return np.asarray(image.get_image_data("TCZYX"))  # (T, C, Z, Y, X)


def _canonical(series: Any, path: Path, shaped: bool) -> np.ndarray:
    """One series as ``(T, C, Z, Y, X)``: samples (RGB) and unnamed page axes become channels."""
    data = series.asarray()
    axes = series.get_axes(False) if shaped else series.axes
    data = data.reshape(series.get_shape(False)) if shaped else data
    sizes = dict(zip(axes, data.shape, strict=True))
    extra = [a for a in axes if a not in "TCZYXSQI" and sizes[a] > 1]
    if extra:
        raise InputError(
            f"{path}: axis {extra[0]!r} of size {sizes[extra[0]]} is not supported (only T C Z Y X)"
        )
    channel_like = [a for a in axes if a in "CSQI" and sizes[a] > 1]
    if len(channel_like) > 1:
        raise InputError(f"{path}: both {channel_like[0]} and {channel_like[1]} axes hold several planes")
    order = [a for a in axes if a in "TZYX"] + channel_like
    squeeze = tuple(i for i, a in enumerate(axes) if a not in order)
    data = np.squeeze(data, axis=squeeze) if squeeze else data
    present = "".join(a for a in axes if a in order)
    target = "TCZYX"
    source = present.replace(channel_like[0], "C") if channel_like else present
    for axis in target:
        if axis not in source:
            data, source = data[np.newaxis], axis + source
    return np.moveaxis(data, [source.index(a) for a in target], range(5))


def _tiff_metadata(tf: Any, channels: int) -> tuple[list[str], tuple[float, float] | None]:
    """Channel names and pixel size (µm) from OME or ImageJ metadata (empty / None where absent)."""
    if tf.is_ome:
        return _ome_metadata(tf.ome_metadata, channels)
    if tf.is_imagej:
        meta = tf.imagej_metadata or {}
        labels = list(meta.get("Labels") or [])
        names = [""] * channels
        if labels and len(labels) % channels == 0:
            per_channel = [labels[c::channels] for c in range(channels)]
            if all(len(set(p)) == 1 for p in per_channel):
                names = [p[0] for p in per_channel]
        return names, _imagej_pixel_size(tf.pages[0], meta.get("unit"))
    return [""] * channels, None


def _ome_metadata(xml: str, channels: int) -> tuple[list[str], tuple[float, float] | None]:
    """Channel names and pixel size of an OME-XML; scenes that name their channels differently (another
    order) are refused, since one name would pick another plane in each."""
    root = ET.fromstring(xml)
    ns = {"ome": root.tag[1:].split("}")[0]} if root.tag.startswith("{") else {}
    every = root.findall(".//ome:Pixels", ns) if ns else root.findall(".//Pixels")
    if not every:
        return [""] * channels, None
    per_scene = []
    for pixels in every:
        found = pixels.findall("ome:Channel", ns) if ns else pixels.findall("Channel")
        per_scene.append(tuple(c.get("Name", "") for c in found))
    if len(set(per_scene)) > 1:
        raise InputError(
            f"its scenes name their channels differently ({' / '.join(map(str, set(per_scene)))})"
        )
    pixels = every[0]
    names = list(per_scene[0])[:channels]
    names += [""] * (channels - len(names))
    size = None
    if pixels.get("PhysicalSizeX") and pixels.get("PhysicalSizeY"):
        scale = _unit_um(pixels.get("PhysicalSizeXUnit", "µm"))
        if scale is not None:
            size = (float(pixels.get("PhysicalSizeX")) * scale, float(pixels.get("PhysicalSizeY")) * scale)
    return names, size


def _imagej_pixel_size(page: Any, unit: str | None) -> tuple[float, float] | None:
    scale = _unit_um(unit or "")
    tags = page.tags
    if scale is None or "XResolution" not in tags or "YResolution" not in tags:
        return None
    (xn, xd), (yn, yd) = tags["XResolution"].value, tags["YResolution"].value
    if not (xn and yn):
        return None
    return (xd / xn * scale, yd / yn * scale)


def _unit_um(unit: str) -> float | None:
    """How many µm one ``unit`` is (None: not a length unit this knows)."""
    unit = unit.strip().lower().replace("\\u00b5", "µ")
    return {"µm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit)


def channel_indices(stack: Stack, params: ReadParams) -> list[int]:
    """The channels ``params`` chooses, as indices; one line naming the file when a name or index is
    unknown. Without a choice: all of 1 or 3 channels, else refused (see :func:`refuse_unchosen`)."""
    count = stack.data.shape[2]
    if params.channels is None:
        return list(range(count))
    lower = [n.lower() for n in stack.channel_names]
    chosen = []
    for ch in params.channels:
        if isinstance(ch, int) and not isinstance(ch, bool):
            if not 0 <= ch < count:
                raise InputError(f"{stack.path}: read.channels: index {ch} out of range ({stack.describe()})")
            chosen.append(ch)
        elif str(ch).lower() in lower:
            chosen.append(lower.index(str(ch).lower()))
        else:
            raise InputError(f"{stack.path}: read.channels: no channel named {ch!r} ({stack.describe()})")
    return chosen


def refuse_unchosen(stack: Stack, params: ReadParams) -> None:
    """:class:`InputError` with one line (what the file holds, what to set) when the file has more scenes,
    time points, Z planes or channels than ``params`` chooses from."""
    s, t, c, z = stack.data.shape[:4]
    missing = [
        key
        for key, more, chosen in (
            ("read.channels", c not in (1, 3) or stack.pages_as_channels, params.channels is not None),
            ("read.z", z > 1, params.z is not None),
            ("read.time", t > 1, params.time is not None),
            ("read.scene", s > 1, params.scene is not None),
        )
        if more and not chosen
    ]
    if missing:
        raise InputError(f"{stack.path}: {stack.describe()}: set {' and '.join(missing)}")


def choose_planes(stack: Stack, params: ReadParams) -> list[np.ndarray]:
    """The chosen planes, one ``(C', Y, X)`` array per chosen scene (several with ``scene: all``), in the
    file's own type. Refuses (one line) what :func:`refuse_unchosen` refuses and indices out of range."""
    refuse_unchosen(stack, params)
    s, t, _, z = stack.data.shape[:4]
    scenes = range(s) if params.scene in (None, "all") else [_index(params.scene, s, "scene", stack)]
    time = 0 if params.time is None else _index(params.time, t, "time", stack)
    channels = channel_indices(stack, params)
    out = []
    for scene in scenes:
        planes = stack.data[scene, time][channels]  # (C', Z, Y, X)
        if params.z == "max":
            planes = planes.max(axis=1)
        elif params.z == "mean":
            mean = planes.astype(np.float64).mean(axis=1)
            integer = np.issubdtype(planes.dtype, np.integer)
            planes = np.rint(mean).astype(planes.dtype) if integer else mean  # 16-bit stays 16-bit
        else:
            planes = planes[:, 0 if params.z is None else _index(params.z, z, "z", stack)]
        out.append(planes)  # (C', Y, X)
    return out


def _index(value: int | str, size: int, name: str, stack: Stack) -> int:
    if not isinstance(value, int) or not 0 <= value < size:
        raise InputError(f"{stack.path}: read.{name} {value!r} out of range ({stack.describe()})")
    return value


def to_uint8(planes: np.ndarray, ranges: list[tuple[float, float]] | None, path: Path) -> np.ndarray:
    """``(C, Y, X)`` planes scaled to uint8 ``(Y, X, C)``: by ``ranges`` (one ``(lo, hi)`` per channel:
    ``lo`` -> 0, ``hi`` -> 255, clipped), else uint8 as is and 16-bit by its type's range; other types
    need ranges (one line naming the file)."""
    if ranges is None:
        if planes.dtype == np.uint8:
            return np.ascontiguousarray(planes.transpose(1, 2, 0))
        integer = np.issubdtype(planes.dtype, np.integer)
        if planes.dtype == np.uint16 or (integer and planes.min() >= 0 and planes.max() <= 65535):
            ranges = [(0.0, 65535.0)] * len(planes)  # e.g. 16-bit PNG that PIL opens as int32
        elif planes.dtype == bool:
            ranges = [(0.0, 1.0)] * len(planes)
        else:
            lo, hi = float(np.nanmin(planes)), float(np.nanmax(planes))
            raise InputError(
                f"{path}: {planes.dtype} pixels ({lo:g} to {hi:g}): set read.intensity (range: [lo, hi] "
                "or percentiles: [lo, hi])"
            )
    lo = np.array([r[0] for r in ranges], dtype=np.float64)[:, None, None]
    hi = np.array([r[1] for r in ranges], dtype=np.float64)[:, None, None]
    scaled = np.nan_to_num((planes.astype(np.float64) - lo) / (hi - lo), nan=0.0, posinf=1.0, neginf=0.0)
    out = (np.clip(scaled, 0.0, 1.0) * 255.0).round().astype(np.uint8)  # (C, Y, X)
    return np.ascontiguousarray(out.transpose(1, 2, 0))


def pixel_size_columns(stack: Stack) -> dict[str, str]:
    """``pixel_size_um_x`` and ``pixel_size_um_y`` as images.tsv cells (empty when unknown)."""
    if stack.pixel_size_um is None:
        return {"pixel_size_um_x": "", "pixel_size_um_y": ""}
    x, y = stack.pixel_size_um
    return {"pixel_size_um_x": f"{x:.6g}", "pixel_size_um_y": f"{y:.6g}"}


def safe_name(text: str) -> str:
    """A channel name fit for a log line or a column (no control characters)."""
    return re.sub(r"[\x00-\x1f]", "", text)


# ------------------------------------------------------------------------------------------ read specs

READ_JSON = "read.json"
SAMPLE_PIXELS = 100_000  # per image and channel, for intensity percentiles


@dataclass(frozen=True)
class ReadSpec:
    """How a data set's fields are read, as the acquire stage records it in ``read.json`` beside
    ``images.tsv`` and the crop stage, the bag store and the checkpoint carry it on: the ``read:`` block,
    the intensity range of each chosen channel (``None``: uint8 as is, 16-bit by its type's range) and the
    names of the channels the model gets."""

    params: ReadParams
    ranges: tuple[tuple[float, float], ...] | None = None
    channel_names: tuple[str, ...] = ()

    @property
    def channels_out(self) -> int:
        """Channels of every field: the chosen ones, else 3 (RGB, or grey repeated)."""
        return len(self.params.channels) if self.params.channels is not None else 3

    def to_dict(self) -> dict[str, Any]:
        return {
            "params": self.params.to_dict(),
            "ranges": [list(r) for r in self.ranges] if self.ranges is not None else None,
            "channel_names": list(self.channel_names),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ReadSpec:
        """From :meth:`to_dict`'s form (``read.json``; other keys, such as its ``summary``, are ignored)."""
        ranges = values.get("ranges")
        return cls(
            ReadParams.from_dict(values.get("params")),
            tuple((float(lo), float(hi)) for lo, hi in ranges) if ranges is not None else None,
            tuple(values.get("channel_names") or ()),
        )


def spec_ranges(params: ReadParams, channels: int) -> tuple[tuple[float, float], ...] | None:
    """The ranges a fixed ``intensity: {range: [lo, hi]}`` gives (``None`` without one)."""
    if params.intensity is None or "range" not in params.intensity:
        return None
    lo, hi = (float(v) for v in params.intensity["range"])
    return ((lo, hi),) * channels


def read_fields(path: str | os.PathLike[str], spec: ReadSpec | None) -> list[np.ndarray]:
    """The fields ``(H, W, C)`` uint8 of one file as ``spec`` reads it, one per chosen scene (several with
    ``scene: all``), from one reading of the file. Without a spec or a ``read:`` block: the file as
    :func:`preprocessing.io.read_image` reads it (single-plane files, checked when acquired; bioio formats,
    which PIL cannot read, through their plugin); without chosen channels a grey file is repeated to 3
    channels, as there."""
    path = Path(path)
    legacy = spec is None or spec.params == ReadParams()
    if legacy and path.suffix.lower() not in BIOIO_FORMATS:  # PIL reads it (bioio formats: below)
        return [read_image(path)]
    spec = spec or ReadSpec(ReadParams())
    ranges = list(spec.ranges) if spec.ranges is not None else None
    fields = []
    for planes in choose_planes(open_stack(path), spec.params):  # (C', Y, X) per scene
        field_ = to_uint8(planes, ranges, path)  # (Y, X, C')
        if spec.params.channels is None and field_.shape[2] == 1:
            field_ = np.repeat(field_, 3, axis=2)
        fields.append(field_)
    return fields


def read_field(path: str | os.PathLike[str], spec: ReadSpec | None, scene: int | None = None) -> np.ndarray:
    """One field ``(H, W, C)`` uint8 as :func:`read_fields` reads it; ``scene``: which one (a row of
    ``scene: all``)."""
    if spec is not None and scene is not None:
        spec = replace(spec, params=replace(spec.params, scene=int(scene)))
    return read_fields(path, spec)[0]


def load_read_spec(path: Path) -> ReadSpec | None:
    """The acquire stage's ``read.json`` (None where a source writes none); one line when unreadable."""
    if not path.is_file():
        return None
    try:
        return ReadSpec.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise InputError(f"{path}: unreadable read spec ({err})") from None


def sample_values(planes: np.ndarray, seed: int) -> np.ndarray:
    """Up to :data:`SAMPLE_PIXELS` values per channel of ``(C, Y, X)`` planes, ``(C, k)`` float64 (all of
    them for smaller images; a fixed random subset otherwise)."""
    flat = planes.reshape(len(planes), -1)
    if flat.shape[1] > SAMPLE_PIXELS:
        pick = np.random.default_rng(seed).choice(flat.shape[1], SAMPLE_PIXELS, replace=False)
        flat = flat[:, np.sort(pick)]
    return flat.astype(np.float64)


def percentile_ranges(samples: list[np.ndarray], percentiles: list[float]) -> tuple[tuple[float, float], ...]:
    """Per-channel ``(lo, hi)`` at the given percentiles of the pooled samples; a channel whose two
    percentiles coincide gets ``hi = lo + 1`` (constant: all 0), never a division by zero."""
    if len({len(s) for s in samples}) > 1:
        counts = sorted({len(s) for s in samples})
        raise InputError(f"intensity percentiles: the files hold {counts} channels; set read.channels")
    pooled = np.concatenate(samples, axis=1)  # (C, sum k)
    lo = np.nanpercentile(pooled, float(percentiles[0]), axis=1)
    hi = np.nanpercentile(pooled, float(percentiles[1]), axis=1)
    return tuple((float(a), float(b) if b > a else float(a) + 1.0) for a, b in zip(lo, hi, strict=True))


@dataclass
class FileInfo:
    """What checking one file with a ``read:`` block found: enough for images.tsv and the summary line."""

    format: str
    description: str  # Stack.describe()
    scenes: list[int]  # the chosen scenes (several with scene: all)
    channel_names: list[str]  # of the chosen channels ("" where unnamed)
    pixel_size: dict[str, str]  # images.tsv cells
    dtype: str
    samples: np.ndarray | None = None  # (C', k) values for percentiles


def inspect_file(path: str | os.PathLike[str], params: ReadParams, seed: int = 0) -> FileInfo:
    """Read ``path`` fully as ``params`` chooses (every refusal as one :class:`InputError` line) and say what
    it holds; with percentile intensity, a sample of the chosen planes' values (first chosen scene)."""
    stack = open_stack(path)
    if params == ReadParams():
        return _inspect_single_plane(stack)
    planes = choose_planes(stack, params)
    ranges = spec_ranges(params, len(planes[0]))
    if params.intensity is None or ranges is not None:
        for p in planes:
            to_uint8(p, list(ranges) if ranges is not None else None, Path(path))  # refuses floats unscaled
    s = stack.data.shape[0]
    scenes = list(range(s)) if params.scene in (None, "all") else [int(params.scene)]
    names = [stack.channel_names[i] for i in channel_indices(stack, params)]
    samples = (
        sample_values(planes[0], seed) if params.intensity and "percentiles" in params.intensity else None
    )
    return FileInfo(
        stack.format,
        stack.describe(),
        scenes,
        names,
        pixel_size_columns(stack),
        str(stack.data.dtype),
        samples,
    )


def _inspect_single_plane(stack: Stack) -> FileInfo:
    """Without a ``read:`` block: a single-plane file, decoded as :func:`preprocessing.io.read_image` reads
    it (palettes, alpha, CMYK, 16-bit as before); anything more is refused with what it holds."""
    if not stack.single_plane:
        refuse_unchosen(stack, ReadParams())
        raise InputError(f"{stack.path}: {stack.describe()}: set read.channels")  # e.g. 2 channels of samples
    if stack.path.suffix.lower() in TIFF_SUFFIXES:
        read_image(stack.path)  # tifffile decoded it; the crop stage reads it with PIL (other formats: done)
    return FileInfo(stack.format, stack.describe(), [0], [], pixel_size_columns(stack), str(stack.data.dtype))


def summary_line(info: FileInfo, spec: ReadSpec) -> str:
    """E.g. ``"OME-TIFF, 4 channels (DAPI, GFP, mCherry, Cy5) × 5 Z; using GFP, DAPI at z 2, range
    0-4095"``: what the first file holds and what the data set takes from it."""
    p = spec.params
    names = [n or f"channel {i}" for n, i in zip(info.channel_names, p.channels or range(3), strict=False)]
    using = ", ".join(safe_name(str(n)) for n in names) if p.channels is not None else "all channels"
    where = [f"z {p.z}" if p.z is not None else "", f"time {p.time}" if p.time is not None else ""]
    where.append(f"scene {p.scene}" if p.scene is not None else "")
    at = " at " + ", ".join(w for w in where if w) if any(where) else ""
    if spec.ranges is None:
        scale = "uint8 as is" if info.dtype == "uint8" else f"{info.dtype} by its type's range"
    else:
        scale = "range " + "; ".join(f"{lo:g}-{hi:g}" for lo, hi in dict.fromkeys(spec.ranges))
    return f"{info.format}, {info.description}; using {using}{at}, {scale}"
