"""Photos, as predict.py reads and prepares them: image files opened only in the formats named, and a photo turned
into a 28x28 image the way Fashion-MNIST's were made (Xiao et al. 2017, section 2): grey, the background
(estimated from the border, uneven lighting included) subtracted and trimmed, the longest edge resized to 28 px,
centred on a 28x28 canvas, light item on black."""

import math
import os
import stat
import struct
import warnings
from pathlib import Path

from plumbing import UserError

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
# Pillow picks its reader from a file's content, not its name: a PostScript file named shirt.png would go to
# Ghostscript. Only these readers are ever used.
FORMATS = ["PNG", "JPEG", "BMP", "WEBP"]
# What Pillow's readers raise on a damaged file besides OSError: a broken PNG chunk is a SyntaxError, an
# unsupported variant a NotImplementedError, a cut header struct.error, IndexError, TypeError or ValueError.
READ_ERRORS = (OSError, EOFError, SyntaxError, NotImplementedError, struct.error, IndexError, TypeError, ValueError)


def shown(path):
    """A file name as it can be printed and drawn: bytes that are not UTF-8 as \\xff, other characters that
    cannot be shown (a newline, say) escaped too, so that every message stays one line."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def image_paths(arguments):
    """The image files named, and those inside the folders named, sorted within each folder."""
    paths = []
    for argument in map(Path, arguments):
        if argument.is_dir():
            try:
                paths += sorted(p for p in argument.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            except OSError as error:  # an unreadable folder
                raise UserError(f"{shown(argument)}: cannot list the folder ({error.strerror})") from None
        else:
            paths.append(argument)
    return paths


def read_image(path):
    """(the image in the file at path, decoded and upright, None), or (None, why the file cannot be used)."""
    try:
        # Only regular files are opened: a FIFO would block until something writes to it, a device never end.
        if not stat.S_ISREG(path.stat().st_mode):
            return None, "not a regular file (a folder, pipe or device), so not opened"
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
    except UnidentifiedImageError:
        return None, "not an image in a format read here (PNG, JPEG, BMP or WebP)"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "too many pixels to be a photo worth opening (Pillow's decompression-bomb limit)"
    except READ_ERRORS as error:
        return None, f"cannot be used ({' '.join(str(error).split()) or type(error).__name__})"


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


def background(small, where):
    """(the background's level at each pixel of small, the sigma of its noise), from the pixels where `where` is
    true. Lighting is uneven (a gradient, a lamp's pool of light): the level is a cubic surface fitted to those
    pixels, refitted without those it fits worst (the item, where it reaches them), plus the local mean of what the
    surface misses (lighting no cubic follows) over a window a quarter of the photo wide."""
    height, width = small.shape
    v, u = np.mgrid[0:height, 0:width]
    u, v = (u + 0.5) / width, (v + 0.5) / height
    terms = np.stack([u**i * v**j for i in range(4) for j in range(4 - i)], axis=-1)  # 1, v, v², v³, u, uv, ...
    level, keep = np.median(small[where]), where  # first one level, the median: the item cannot pull it far
    for _ in range(3):
        residuals = np.abs(small - level)
        noise = 1.4826 * float(np.median(residuals[keep]))  # the median absolute residual, as a sigma
        keep = where & (residuals <= max(3 * noise, 1))
        chosen = terms[keep]  # least squares by the normal equations: quicker than lstsq on thousands of rows
        level = terms @ np.linalg.lstsq(chosen.T @ chosen, chosen.T @ small[keep], rcond=None)[0]
    noise = 1.4826 * float(np.median(np.abs(small - level)[keep]))
    radius = max(height, width) // 8
    # Shrunk towards 0 where the window holds little background: deep inside a large item.
    missed = window_sum((small - level) * keep, radius) / (window_sum(keep, radius) + 2 * radius + 1)
    return (level + missed).astype(np.float32), noise


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


def largest_parts(mask):
    """mask without its specks: its 8-connected components of under 4 pixels or a twentieth of the largest one.
    Components are found with numpy alone: each pixel is labelled with its own number, then takes the largest
    label among its neighbours' until none changes."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while not np.array_equal(labels, grown := spread(labels) * mask):
        labels = np.where(mask, grown.ravel()[grown - 1], 0)  # and the label that label's pixel has: far quicker
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return np.isin(labels, np.flatnonzero(sizes >= max(4, sizes.max() / 20))) & mask


def find_item(grey):
    """(grey less its background, the item's box (top, bottom, left, right) in grey's pixels, or None when nothing
    stands out from the background). The item is looked for in a copy of at most 128 px a side: averaging blocks
    of pixels averages the sensor's noise away, and makes the search quick on a 12-megapixel photo."""
    factor = max(1, math.ceil(max(grey.shape) / 128))
    size = (max(1, grey.shape[1] // factor), max(1, grey.shape[0] // factor))  # each pixel the mean of as many
    small = np.asarray(Image.fromarray(grey).resize(size, Image.Resampling.BOX), dtype=np.float32)
    height, width = small.shape
    v, u = np.mgrid[0:height, 0:width]
    where = (np.minimum(v, height - 1 - v) < 2) | (np.minimum(u, width - 1 - u) < 2)  # first, the border
    for _ in range(2):  # then all that is not the item, for lighting that the border alone does not show
        level, noise = background(small, where)
        # The item: what differs from the background by more than 5% of 255 (the paper's trim), or by more
        # than the noise measured on the background would (4 sigma), where the photo is noisier than that.
        item = largest_parts(np.abs(small - level) > max(0.05 * 255, 4 * noise))
        where = ~spread(spread(item))  # the item's edge, blurred by the averaging, is no background either
        if where.sum() < 100:  # too little background left to fit
            break
    level = np.asarray(Image.fromarray(level).resize(grey.shape[::-1], Image.Resampling.BILINEAR))
    rows, cols = np.flatnonzero(item.any(1)), np.flatnonzero(item.any(0))
    if not len(rows):
        return grey - level, None
    down, across = grey.shape[0] / small.shape[0], grey.shape[1] / small.shape[1]  # the small pixels' size
    box = round(rows[0] * down), round((rows[-1] + 1) * down), round(cols[0] * across), round((cols[-1] + 1) * across)
    return grey - level, tuple(map(int, box))


def photo_problem(image):
    """Why the model's answer for a photo (PIL, or its grey levels as an array) may mean nothing, in a few words,
    or None: nothing stands out from the background, the item is a speck, or it reaches all four edges."""
    grey = image if isinstance(image, np.ndarray) else grey_levels(image)
    _, box = find_item(grey)
    if box is None:
        return "the image is blank or of one colour: there is no item to classify"
    top, bottom, left, right = box
    height, width = grey.shape
    if max(bottom - top, right - left) < max(height, width) / 10:
        return f"the item found is tiny ({right - left}x{bottom - top} px of {width}x{height}): crop the photo to it"
    if (top, left, bottom, right) == (0, 0, height, width):
        return "the item reaches all four edges: it may be cut off (leave some background around it)"
    return None


def prepare_photo(image):
    """A photo (PIL, any size) as a 28x28 uint8 array in Fashion-MNIST's style: light item on black. Its background
    is subtracted (uneven lighting with it), the item's box cut out, its longest edge resized to 28 px, centred."""
    difference, box = find_item(grey_levels(image))
    if box:
        top, bottom, left, right = box
        difference = difference[top:bottom, left:right]
    height, width = difference.shape
    scale = 28 / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    crop = Image.fromarray(difference)
    small = np.asarray(crop.resize(size, Image.Resampling.LANCZOS), dtype=np.float32)
    canvas = np.zeros((28, 28), dtype=np.float32)  # the background: no difference from itself
    top, left = (28 - size[1]) // 2, (28 - size[0]) // 2
    canvas[top : top + size[1], left : left + size[0]] = small
    # How far each pixel is from the background, less the 5% that counts as background: light on black, whether
    # the item was darker than its background or lighter. The item's strongest part becomes 255, as measured on
    # a box-filtered copy: LANCZOS overshoots at an edge (the box keeps a little background around the item),
    # and that overshoot, taken as the strongest part, would dim all the rest.
    distance = np.clip(np.abs(canvas) - 0.05 * 255, 0, None)
    strongest = np.abs(np.asarray(crop.resize(size, Image.Resampling.BOX))).max() - 0.05 * 255
    return (255 * distance / max(strongest, 1)).round().clip(0, 255).astype(np.uint8)
