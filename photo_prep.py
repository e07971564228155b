"""predict.py's photos: image files opened only in the formats named, and a photo turned into a 28x28 image the way
Fashion-MNIST's were made (Xiao et al. 2017, section 2): grey, the background (estimated from the border, uneven
lighting included) subtracted and trimmed, the longest edge resized to 28 px, centred on a 28x28 canvas, light item
on black."""

from plumbing.stops import shown

import contextlib
import math
import os
import stat
import struct
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
# Pillow picks its reader from a file's content, not its name: a PostScript file named shirt.png would go to
# Ghostscript. Only these readers are ever used.
FORMATS = ["PNG", "JPEG", "BMP", "WEBP"]
# What Pillow's readers raise on a damaged file besides OSError: a broken PNG chunk is a SyntaxError, an
# unsupported variant a NotImplementedError, a cut header struct.error, IndexError, TypeError or ValueError.
READ_ERRORS = (OSError, EOFError, SyntaxError, NotImplementedError, struct.error, IndexError, TypeError, ValueError)


def image_paths(arguments):
    """(the image files named and those inside the folders named, sorted within each folder; a line for each folder
    saying what in it was passed over: files of other kinds, like a phone's HEIC photos, and folders within)."""
    paths, skipped = [], []
    for argument in map(Path, arguments):
        try:
            folder = argument.is_dir()
        except OSError:  # in a folder we may not look into: read_image names it, the others are still answered
            folder = False
        if not folder:  # a file, or no such file: read_image says which
            paths.append(argument)
            continue
        try:
            entries = sorted(argument.iterdir())
        except OSError as error:  # a folder we may not list: passed over, the other images are still answered
            skipped.append(f"{shown(argument)}: passed over: cannot list the folder ({error.strerror})")
            continue
        paths += [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
        other = [p.name + "/" * os.path.isdir(p) for p in entries if p.suffix.lower() not in IMAGE_SUFFIXES]
        if other:
            names = ", ".join(map(shown, other[:3])) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
            skipped.append(f"{shown(argument)}: passed over {len(other)} not PNG, JPEG, BMP or WebP: {names}")
    return paths, skipped


def read_image(path):
    """(the image in the file at path, decoded and upright, None), or (None, why the file cannot be used)."""
    try:
        # Only regular files are opened: a FIFO would block until something writes to it, a device never end.
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            return None, "not a regular file (a folder, pipe or device), so not opened"
        if info.st_size == 0:
            return None, "is empty (0 bytes): nothing was saved into it"
        with warnings.catch_warnings():
            # Past Pillow's warning limit (89 megapixels) a file is no photo, and decoding it takes gigabytes.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=FORMATS) as image:
                image.load()
                if 0 in image.size:
                    return None, "has no pixels"
                return ImageOps.exif_transpose(image), None  # phone photos: upright as their camera meant them
    except FileNotFoundError:
        return None, "no such file"
    except PermissionError:  # the file, or a folder above it, that we may not read
        return None, "cannot be read (permission denied); make it readable"
    except UnidentifiedImageError:
        return None, "not an image in a format read here (PNG, JPEG, BMP or WebP)"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "too many pixels to be a photo worth opening (Pillow's decompression-bomb limit)"
    except READ_ERRORS as error:
        if isinstance(error, EOFError) or cut_short(path):
            return None, "is cut short: the file ends before its image does (an interrupted copy or download?)"
        return None, f"cannot be used ({' '.join(str(error).split()) or type(error).__name__})"


def cut_short(path):
    """Whether a file that could not be decoded ends before its format says it does: a PNG without its closing
    IEND chunk, a JPEG without its end-of-image marker, a WebP or BMP shorter than the size its header gives."""
    with contextlib.suppress(OSError), open(path, "rb") as f:
        head, size = f.read(12), os.fstat(f.fileno()).st_size
        f.seek(max(0, size - 12))
        tail = f.read()
        if head.startswith(b"\x89PNG"):
            return b"IEND" not in tail
        if head.startswith(b"\xff\xd8"):
            return b"\xff\xd9" not in tail
        if head.startswith(b"RIFF"):
            return int.from_bytes(head[4:8], "little") + 8 > size
        if head.startswith(b"BM"):
            return int.from_bytes(head[2:6], "little") > size
    return False


def grey_levels(image):
    """The image's grey levels, float32 in 0-255. convert("L") would clip deeper images at 255 and lose the
    item: 16-bit ones are scaled (65535 -> 255); 32-bit integer and float ones are read as 8-bit levels if they
    fit 0-255, as 16-bit ones (how older Pillows open 16-bit PNGs) if they fit 0-65535, else by their own range."""
    if image.mode.startswith("I;16"):
        return np.asarray(image, dtype=np.float32) / 257
    if image.mode not in ("I", "F"):
        return np.asarray(image.convert("L"), dtype=np.float32)
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))
    low, high = float(values.min()), float(values.max())
    if low >= 0 and high <= 65535:
        return (values if high <= 255 else values / 257).astype(np.float32)
    return ((values - low) * (255 / max(high - low, 1))).astype(np.float32)


def colour_levels(image):
    """The image's colours, (height, width, 3) float32 in 0-255: grey images (of any depth, as grey_levels reads
    them) in three equal channels, transparent ones laid on white, or on black when what they show is light (a
    white shirt cut out for a shop would vanish on white)."""
    if image.mode in ("1", "L", "I", "F") or image.mode.startswith("I;16"):
        return np.repeat(grey_levels(image)[..., None], 3, axis=2)
    if "A" in image.mode or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:] / 255
        light = (rgba[..., :3].mean(-1, keepdims=True) * alpha).sum() > 160 * max(float(alpha.sum()), 1)
        return rgba[..., :3] * alpha + (0 if light else 255) * (1 - alpha)
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def shrunk(colours, side):
    """colours with each block of pixels averaged into one, at most `side` pixels a side: the sensor's noise and a
    surface's fine texture average away, and the search is quick on a 12-megapixel photo."""
    factor = max(1, math.ceil(max(colours.shape[:2]) / side))
    size = (max(1, colours.shape[1] // factor), max(1, colours.shape[0] // factor))
    return np.stack(
        [np.asarray(Image.fromarray(c).resize(size, Image.Resampling.BOX)) for c in colours.transpose(2, 0, 1)], axis=-1
    )


def inside_frame(small):
    """(top, bottom, left, right) in small's pixels of the picture inside letterbox bars or a frame: bands along
    the edges of one flat colour, unlike most of what lies just inside them. The background is then looked for
    inside them, not in the bars."""

    def band(lines):  # lines from the edge inward, each (n, 3)
        edge, depth = lines[0].mean(0), 0
        while depth < 0.4 * len(lines) and np.abs(lines[depth] - edge).max() < 16:  # flat, and the edge's colour
            depth += 1
        inside = lines[depth : depth + 3].reshape(-1, 3)
        unlike = len(inside) and (np.abs(inside - edge).max(1) > 24).mean() > 0.6
        return depth + 1 if 0 < depth < 0.4 * len(lines) and unlike else 0  # and the row the edge blurred into

    height, width = small.shape[:2]
    top, bottom = band(small), band(small[::-1])
    left, right = band(small.transpose(1, 0, 2)), band(small.transpose(1, 0, 2)[::-1])
    return top, height - bottom, left, width - right


def background(small, where):
    """(the background's colour at each pixel of small, the sigma of its noise), from the pixels where `where` is
    true. Lighting is uneven (a gradient, a lamp's pool of light): each channel is a cubic surface fitted to those
    pixels, refitted without those it fits worst (the item, where it reaches them), plus the local mean of what the
    surfaces miss (lighting no cubic follows) over a window a quarter of the photo wide."""
    height, width = small.shape[:2]
    v, u = np.mgrid[0:height, 0:width]
    u, v = (u + 0.5) / width, (v + 0.5) / height
    terms = np.stack([u**i * v**j for i in range(4) for j in range(4 - i)], axis=-1)  # 1, v, v², v³, u, uv, ...
    level, keep = np.median(small[where], axis=0), where  # first one colour, the median: the item cannot pull it far
    for _ in range(3):
        residuals = rms(small - level, axis=-1)
        noise = 1.4826 * float(np.median(residuals[keep]))  # the median residual, as a sigma
        keep = where & (residuals <= max(3 * noise, 1))
        chosen = terms[keep]  # least squares by the normal equations: quicker than lstsq on thousands of rows
        level = terms @ np.linalg.lstsq(chosen.T @ chosen, chosen.T @ small[keep], rcond=None)[0]
    noise = 1.4826 * float(np.median(rms(small - level, axis=-1)[keep]))
    radius = max(height, width) // 8
    # Shrunk towards 0 where the window holds little background: deep inside a large item.
    weight = window_sum(keep.astype(np.float64), radius) + 2 * radius + 1
    missed = (
        np.stack([window_sum((small - level)[..., c] * keep, radius) for c in range(3)], axis=-1) / weight[..., None]
    )
    return (level + missed).astype(np.float32), noise


def pattern_colours(small, where, count=4):
    """The few colours a patterned background is made of (the checks of a tablecloth): k-means of the pixels
    where `where` is true, started from the darkest to the lightest."""
    pixels = small[where]
    order = np.argsort(pixels.sum(1))
    colours = pixels[order[np.linspace(0, len(order) - 1, count).astype(int)]]
    for _ in range(8):
        nearest = rms(pixels[:, None] - colours[None], axis=-1).argmin(1)
        colours = np.stack([pixels[nearest == k].mean(0) if (nearest == k).any() else colours[k] for k in range(count)])
    return colours


def distinct(pixels, colours):
    """Whether pixels (n, 3) are made of a few distinct colours (the k-means `colours`), as a tablecloth's checks
    are, rather than a continuum, as a carpet's mottle or a wood grain: the typical pixel lies within a
    twentieth of the colours' spread from one of them (measured: checks 0.003-0.04, carpet and wood 0.08-0.13)."""
    nearest = rms(pixels[:, None] - colours[None], axis=-1).min(1)
    spread = max(float(rms(a - b)) for a in colours for b in colours)
    return float(np.median(nearest)) < spread / 20


def off_pattern(pixels, pattern):
    """How far each of pixels (..., 3) is from a surface made of the colours `pattern` (k, 3): the distance to the
    nearest colour or mix of two of them, since where two colours meet (a check's edge) the camera and the shrinking
    blend them."""
    nearest = np.full(pixels.shape[:-1], np.inf, dtype=np.float32)
    for i, a in enumerate(pattern):
        for b in pattern[i:]:
            along = b - a
            share = np.clip((pixels - a) @ along / max(float(along @ along), 1e-6), 0, 1)
            nearest = np.minimum(nearest, rms(pixels - a - share[..., None] * along, axis=-1))
    return nearest


def rms(difference, axis=-1):
    """The colour distance: the root mean square over the channels, so that a grey photo's is its grey difference."""
    return np.sqrt(np.mean(np.square(difference), axis=axis))


def window_sum(array, radius):
    """The sum of each pixel's (2 radius + 1)² neighbourhood (cut off at the edges), from cumulative sums."""
    height, width = array.shape
    total = np.pad(array.astype(np.float64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    top, bottom = np.clip(np.arange(height) - radius, 0, height), np.clip(np.arange(height) + radius + 1, 0, height)
    left, right = np.clip(np.arange(width) - radius, 0, width), np.clip(np.arange(width) + radius + 1, 0, width)
    return total[bottom][:, right] - total[top][:, right] - total[bottom][:, left] + total[top][:, left]


def spread(array):
    """Each pixel's largest value among itself and its eight neighbours."""
    height, width = array.shape
    padded = np.pad(array, 1)
    return np.max([padded[i : i + height, j : j + width] for i in range(3) for j in range(3)], axis=0)


def components(mask):
    """The 8-connected components of mask, labelled (0 is not the mask), found with numpy alone: each pixel is
    labelled with its own number, then takes the largest label among its neighbours' until none changes."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while not np.array_equal(labels, grown := spread(labels) * mask):
        labels = np.where(mask, grown.ravel()[grown - 1], 0)  # and the label that label's pixel has: far quicker
    return labels


class Found(NamedTuple):
    """What find_item found in a photo. `box`: the item's (top, bottom, left, right) in the photo's pixels, or None;
    `angle`: the degrees it is tilted by (0 when upright); `problem`: why the answer may mean nothing, or None.
    On the small copy searched (`scale`: the photo's rows and columns per pixel of it): `mask`, the item (its holes
    filled); `level`, the background's colour at each pixel; `inside`, the (top, bottom, left, right) inside any
    bars or frame. `pattern`: the distinct colours a patterned surface is made of (None on a plain, grained or
    mottled one). `noise`: the sigma of what is left of the background on the small copy, once the surface's
    colours (or their fitted level) are subtracted."""

    box: tuple
    angle: float
    problem: str
    mask: np.ndarray
    level: np.ndarray
    inside: tuple
    scale: tuple
    pattern: np.ndarray
    noise: float


ANALYSIS_SIDE = 128  # pixels a side of the copy the item is looked for in


def find_item(colours, frame=None):
    """What stands out from the background of a photo (its colours, colour_levels), as a Found. The item differs
    from the background by more than 5% of 255 (the paper's trim) or than 4 sigma of the noise measured on the
    background, in colour: a red shirt on beige stands out though its grey is the beige's. The background is
    estimated from the border inside any bars or frame, then from all but the item; a patterned one (checks, a
    coarse grain) by the few colours it is made of. Bars or a frame inside which nothing stands out, or an item
    reaching all four of their edges, were more likely the background around an item that fills most of the photo:
    it is looked for again without them (`frame`: the (top, bottom, left, right) to look inside, on the small
    copy)."""
    small = shrunk(colours, ANALYSIS_SIDE)
    scale = colours.shape[0] / small.shape[0], colours.shape[1] / small.shape[1]  # rows and columns per pixel
    whole = (0, small.shape[0], 0, small.shape[1])
    top, bottom, left, right = frame or inside_frame(small)
    picture = small[top:bottom, left:right]
    height, width = picture.shape[:2]
    v, u = np.mgrid[0:height, 0:width]
    where = (np.minimum(v, height - 1 - v) < 2) | (np.minimum(u, width - 1 - u) < 2)  # first, the border
    patterned = None
    for _ in range(2):  # then all that is not the item, for lighting that the border alone does not show
        level, noise = background(picture, where)
        surface_noise = noise
        distance = rms(picture - level, axis=-1)
        # A surface more varied than plain cloth or paper (found so, it stays so: without the item, the fit may
        # settle on one of a tablecloth's colours and call the others the item): its colours, wherever they lie.
        if noise > 12 or patterned is not None:
            patterned = pattern_colours(picture, where)
            near = off_pattern(picture, patterned)
            noise = 1.4826 * float(np.median(near[where]))
            distance = np.minimum(distance, near)
        labels = components(distance > max(0.05 * 255, 4 * noise))
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        item = np.isin(labels, np.flatnonzero(sizes >= max(4, sizes.max() / 20))) & (labels > 0)  # no specks
        where = ~spread(spread(item))  # the item's edge, blurred by the averaging, is no background either
        if where.sum() < 100:  # too little background left to fit
            break
    mask = np.zeros(small.shape[:2], dtype=bool)
    mask[top:bottom, left:right] = item
    full = np.zeros(small.shape, dtype=np.float32)  # the background's colour, where the picture is
    full[top:bottom, left:right] = level
    contrast = np.zeros(small.shape[:2], dtype=np.float32)
    contrast[top:bottom, left:right] = distance * spread(spread(item))
    strong = contrast[mask]
    core = mask & (contrast > 0.4 * np.quantile(strong, 0.95)) if strong.size else mask
    found = box_of(spread(core) & mask)
    box = in_photo(found, scale) if found else None
    inside = in_photo((top, bottom, left, right), scale)
    problem = judged(box, apart(labels, sizes), patterned is not None, colours.shape[:2], inside)
    cut_off = "the item reaches all four edges"
    if frame is None and (top, bottom, left, right) != whole and (box is None or problem and cut_off in problem):
        again = find_item(colours, whole)  # the "bars" may be the background around an item that fills the photo
        # Letterbox or pillarbox bars (two sides) stay bars; bands on all four sides may be margins round an item.
        bars = (top, bottom, left, right) != whole and min(top, left, whole[1] - bottom, whole[3] - right) == 0
        if again.box is not None and cut_off not in (again.problem or "") and not bars:
            return again
    angle = tilt(contrast) if box else 0.0
    # The item is cut out by its colours' distance from the pattern's only where these are distinct: a carpet's
    # mottle or a grain goes either way, and its signed difference averages away as the picture shrinks.
    if patterned is not None and not distinct(picture[where], patterned):
        patterned, noise = None, surface_noise
    return Found(box, angle, problem, filled(mask), full, (top, bottom, left, right), scale, patterned, noise)


def in_photo(box, scale):
    """A (top, bottom, left, right) box on the small copy, in the photo's pixels."""
    return tuple(int(round(edge * scale[i // 2])) for i, edge in enumerate(box))


def in_small(box, scale):
    """A (top, bottom, left, right) box in the photo's pixels, as Pillow's (left, top, right, bottom) box on the
    small copy."""
    top, bottom, left, right = box
    return left / scale[1], top / scale[0], right / scale[1], bottom / scale[0]


def difference(colours, found, region):
    """How each pixel of region (top, bottom, left, right) of the photo differs from the background: its colour
    less the background's, per channel, signed (so that a surface's grain and the sensor's noise, which go either
    way, average away as the picture shrinks); on a patterned surface, how far it is from the surface's colours
    (off_pattern). Bars and a frame are no difference at all."""
    top, bottom, left, right = region
    source = in_small(region, found.scale)
    level = np.stack(
        [
            np.asarray(Image.fromarray(c).resize((right - left, bottom - top), Image.Resampling.BILINEAR, box=source))
            for c in found.level.transpose(2, 0, 1)
        ],
        axis=-1,
    )
    picture = colours[top:bottom, left:right]
    result = picture - level
    if found.pattern is not None:
        result = np.minimum(rms(result, axis=-1), off_pattern(picture, found.pattern))[..., None]
    v, u = np.mgrid[top:bottom, left:right]
    inside = in_photo(found.inside, found.scale)
    result[(v < inside[0]) | (v >= inside[1]) | (u < inside[2]) | (u >= inside[3])] = 0
    return result.astype(np.float32)


def apart(labels, sizes):
    """Whether the two largest parts found are two items: the smaller a third of the larger or more, and their
    boxes apart even when each is grown by a sixth of its size (the parts of one item lie close together)."""
    order = np.argsort(sizes)[::-1]
    if len(order) < 3 or sizes[order[1]] < max(16, sizes[order[0]] / 3):
        return False
    (a, b, c, d), (e, f, g, h) = (box_of(labels == k) for k in order[:2])
    grow = max(b - a, d - c, f - e, h - g) / 6
    return e > b + grow or a > f + grow or g > d + grow or c > h + grow


def filled(mask):
    """mask with its holes filled (what it encloses: the dim inside of an item whose outline stands out)."""
    outside = components(~mask)
    border = np.unique(np.concatenate([outside[0], outside[-1], outside[:, 0], outside[:, -1]]))
    return mask | ~np.isin(outside, border[border > 0])


def tilt(contrast, largest=20, sure=0.25, least=3):
    """The angle in degrees (within `largest` either way) that sets the item upright, as Fashion-MNIST's items
    stand, from the item's edges (`contrast`: how much it stands out, 0 elsewhere): upright, most of their edges run
    up and down or across (a sleeve, a trouser leg, a sole). Their directions, taken four times round (so that those
    a right angle apart agree) and weighted by the edges' strength, point to the tilt; 0 unless `sure` of it, or
    for a tilt under `least` degrees (turning the picture blurs it a little)."""
    if min(contrast.shape) < 3:  # a sliver (a panorama shrunk): no direction to read
        return 0.0
    # Scharr's differences: their directions are true to a few tenths of a degree, where np.gradient's lean
    # towards the diagonals (a 12-degree tilt read as 14).
    padded = np.pad(contrast, 1, mode="edge")
    rows = [padded[i : i + contrast.shape[0]] for i in range(3)]
    smooth = [3 * r[:, :-2] + 10 * r[:, 1:-1] + 3 * r[:, 2:] for r in rows]
    dy = smooth[2] - smooth[0]
    dx = sum(w * (r[:, 2:] - r[:, :-2]) for w, r in zip((3, 10, 3), rows, strict=True))
    strength = dx**2 + dy**2
    if not strength.sum():
        return 0.0
    pointer = np.sum(strength * np.exp(4j * np.arctan2(dy, dx))) / strength.sum()
    angle = np.degrees(np.angle(pointer)) / 4
    return float(angle) if abs(pointer) > sure and least <= abs(angle) <= largest else 0.0


def judged(box, several, patterned, shape, inside):
    """Why the model's answer may mean nothing, in a few words, or None."""
    if box is None:
        if patterned:
            return "no item stands out from the busy pattern it lies on: photograph it on a plainer surface"
        return "the image is blank or of one colour: there is no item to classify"
    top, bottom, left, right = box
    height, width = shape
    if top <= inside[0] and left <= inside[2] and bottom >= inside[1] and right >= inside[3]:
        return "the item reaches all four edges: it may be cut off (leave some background around it)"
    if several:
        return "several items stand apart: crop the photo to one of them"
    if max(bottom - top, right - left) < max(height, width) / 10:
        return f"the item found is tiny ({right - left}x{bottom - top} px of {width}x{height}): crop the photo to it"
    return None


def photo_problem(image):
    """Why the model's answer for a photo (PIL, or its grey levels as an array) may mean nothing, in a few words,
    or None: nothing stands out from the background (or from a busy pattern), several items do, the item is a
    speck, or it reaches all four edges."""
    colours = np.repeat(image[..., None], 3, axis=2) if isinstance(image, np.ndarray) else colour_levels(image)
    return find_item(colours).problem


def box_of(mask):
    """(top, bottom, left, right) of the True pixels of mask, or None."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return (int(rows[0]), int(rows[-1] + 1), int(cols[0]), int(cols[-1] + 1)) if len(rows) else None


def prepare_photo(image):
    """prepare(image)'s 28x28 image alone."""
    return prepare(image)[0]


def resized(array, size, resample=Image.Resampling.BILINEAR, box=None):
    """A float32 array (height, width) resized to size (width, height) by Pillow, from `box` of it if given."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(array, dtype=np.float32)).resize(size, resample, box=box))


def turned(array, angle):
    """A float32 array turned by angle degrees (counter-clockwise), grown to hold all of it, 0 in the corners."""
    # Bilinear: a mirrored photo turns by the opposite angle into the mirror image (nearest pixels would differ).
    image = Image.fromarray(np.ascontiguousarray(array, dtype=np.float32))
    return np.asarray(image.rotate(angle, Image.Resampling.BILINEAR, expand=True))


def prepare(image):
    """(a photo (PIL, any size) as a 28x28 uint8 array in Fashion-MNIST's style, why the answer for it may mean
    nothing or None). Light item on black: how far each pixel's colour is from the background's (uneven lighting
    subtracted), the item's box cut out and set upright, its longest edge resized to 28 px, centred."""
    colours = colour_levels(image)
    found = find_item(colours)
    height, width = colours.shape[:2]
    top, bottom, left, right = found.box or (0, height, 0, width)
    if found.angle:  # upright, as Fashion-MNIST's items stand: the item turned with room around it, and its mask
        margin = max(bottom - top, right - left) // 2
        top, bottom = max(0, top - margin), min(height, bottom + margin)
        left, right = max(0, left - margin), min(width, right + margin)
    channels = difference(colours, found, (top, bottom, left, right)).transpose(2, 0, 1)
    if found.angle:
        source = in_small((top, bottom, left, right), found.scale)
        mask = turned(resized(found.mask, (right - left, bottom - top), box=source), found.angle) > 0.5
        channels = np.stack([turned(channel, found.angle) for channel in channels])
        top, bottom, left, right = box_of(mask) or (0, mask.shape[0], 0, mask.shape[1])
        channels = channels[:, top:bottom, left:right]
    # Centred on a square of the longest side before shrinking to 28x28, to the half pixel: an odd margin split into
    # whole pixels would leave a mirrored item a fraction of a pixel off, and its answer another. A square
    # past 4,096 px a side (a panorama's would take gigabytes) is made of the item box-shrunk to fit it first.
    height, width = channels.shape[1:]
    side = max(height, width)
    if side > 4096:
        size = (max(1, round(width * 4096 / side)), max(1, round(height * 4096 / side)))
        channels = np.stack([resized(c, size, Image.Resampling.BOX) for c in channels])
    height, width = channels.shape[1:]
    square = max(height, width)
    above, before = (square - height + 1) // 2, (square - width + 1) // 2  # an odd margin: half a pixel more
    channels = np.pad(channels, ((0, 0), (above, above), (before, before)))
    x0, y0 = before - (square - width) / 2, above - (square - height) / 2  # 0 or 0.5: the square, centred exactly
    square_box = (x0, y0, x0 + square, y0 + square)
    # Each channel shrunk signed, then the distance over the channels: what goes either way (grain, noise) cancels.
    canvas = rms(np.stack([resized(c, (28, 28), Image.Resampling.LANCZOS, square_box) for c in channels], axis=-1))
    # How far each pixel is from the background, less the 5% that counts as background: light on black, whether
    # the item was darker than its background or lighter. The item's strongest part becomes 255, as measured on
    # a box-filtered copy: LANCZOS overshoots at an edge (the box keeps a little background around the item),
    # and that overshoot, taken as the strongest part, would dim all the rest.
    # What the surface's texture leaves after the shrinking (its sigma falls as the pixels averaged grow, about)
    # counts as background too: twice it, where that is more than the 5%.
    left_over = found.noise * float(np.mean(found.scale)) * 28 / side
    floor = max(0.05 * 255, 2 * left_over)
    distance = np.clip(canvas - floor, 0, None)
    boxed = np.stack([resized(c, (28, 28), Image.Resampling.BOX, square_box) for c in channels], axis=-1)
    strongest = min(rms(boxed).max(), canvas.max()) - floor  # the canvas's own where it has no overshoot
    return (255 * distance / max(strongest, 1)).round().clip(0, 255).astype(np.uint8), found.problem
