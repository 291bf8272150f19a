"""Image folders (e.g. the openclipart clip art) turned into small square arrays for shards."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from hpcq.errors import DataError

logger = logging.getLogger(__name__)

OPENCLIPART_ROOT = Path("/usr/share/openclipart/png")
"""Where the Debian package ``openclipart-png`` installs its PNGs (in topic subfolders)."""

IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)
"""File suffixes (lower case) that :func:`list_images` picks up."""

VALID_CHANNELS = (1, 3)


class BadImageError(DataError):
    """One image file cannot be decoded; callers count and skip it instead of stopping."""


def list_images(root: Path) -> list[Path]:
    """Return every image file under ``root`` (recursively), sorted so that runs are reproducible.

    Raises:
        DataError: ``root`` is missing, not a folder, or holds no file with a suffix in IMAGE_SUFFIXES.
    """
    root = Path(root)
    hint = (
        " Install the clip art with `apt-get install openclipart-png`, or pass another image folder."
        if root == OPENCLIPART_ROOT
        else " Pass a folder that holds image files."
    )
    if not root.exists():
        raise DataError(f"image folder {root} does not exist.{hint}")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder.{hint}")
    # Sorting the relative paths (not os.walk order, which depends on the filesystem) keeps keys and
    # shard contents identical from one machine to the next.
    candidates = sorted(
        (p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    # openclipart-png links one image into several topic folders; listing each link would put the same
    # image into the data set several times. Keep one path per real file: the link-free one if any,
    # else the first in sorted order.
    chosen: dict[Path, Path] = {}
    for path in candidates:
        target = path.resolve()
        if target not in chosen or target == path.absolute():
            chosen[target] = path
    kept = set(chosen.values())
    paths = [p for p in candidates if p in kept]
    if len(paths) < len(candidates):
        logger.info("skipped %d links to images already listed under %s", len(candidates) - len(paths), root)
    if not paths:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise DataError(f"image folder {root} holds no image files (looked for {suffixes}).{hint}")
    logger.info("found %d images under %s", len(paths), root)
    return paths


def prepare_image(data: bytes | Path, image_size: int, channels: int) -> np.ndarray:
    """Decode an image and make it a ``image_size`` x ``image_size`` uint8 array.

    Transparent parts are composited over black (Fashion-MNIST shows light objects on black, so clip art
    on black is the closer domain), the image is padded with black to a square so that the aspect ratio
    is kept, and resized with a Lanczos filter.

    Args:
        data: the encoded file contents, or a path to the file.
        image_size: side of the square result in pixels.
        channels: 1 for gray (result shape (H, W)) or 3 for RGB (result shape (H, W, 3)).

    Raises:
        DataError: ``image_size`` or ``channels`` is invalid.
        BadImageError: the image cannot be read or decoded.
    """
    if image_size < 1:
        raise DataError(f"image_size must be a positive number of pixels, got {image_size}")
    if channels not in VALID_CHANNELS:
        raise DataError(f"channels must be 1 (gray) or 3 (RGB), got {channels}")
    name = str(data) if isinstance(data, Path) else f"<{len(data)} bytes>"
    try:
        image = decode_image(data, image_size)
    except Exception as exc:
        # PIL raises many unrelated types for broken files (OSError, SyntaxError, ValueError, EOFError,
        # struct.error, DecompressionBombError...); all of them mean "this one file is unusable".
        raise BadImageError(f"cannot decode image {name}: {type(exc).__name__}: {exc}") from exc
    width, height = image.size
    if width < 1 or height < 1:
        raise BadImageError(f"image {name} is empty ({width}x{height} pixels)")
    image = image.convert("L" if channels == 1 else "RGB")
    # Resizing first and then pasting on a black square equals padding then resizing, but resamples
    # far fewer pixels.
    scale = image_size / max(width, height)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = image.resize(new_size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    canvas = Image.new(image.mode, (image_size, image_size), 0)
    canvas.paste(image, ((image_size - new_size[0]) // 2, (image_size - new_size[1]) // 2))
    return np.asarray(canvas, dtype=np.uint8).copy()


def decode_image(data: bytes | Path, image_size: int, fit: str = "long") -> Image.Image:
    """Decode an image fully and flatten it (see _flatten): returns L or RGB. ``image_size`` is what its
    ``fit`` side ("long" or "short") will be resized to, so that a huge image can be shrunk cheaply first,
    keeping 4x oversampling on that side. PIL's errors propagate."""
    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    with warnings.catch_warnings():
        # PIL warns about every image above ~90 megapixels (openclipart has a dozen); its hard limit
        # (twice that: DecompressionBombError, so a BadImageError) still protects memory.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        # All work happens inside this block: closing a PIL image frees its pixels.
        with Image.open(source) as opened:
            # load() forces decoding now, so a truncated file fails here rather than later.
            opened.load()
            image = _flatten(_to_8bit(opened), image_size, fit)
            if image is opened:
                image = image.copy()
    return image


def _flatten(image: Image.Image, image_size: int, fit: str = "long") -> Image.Image:
    """Shrink a huge image and composite its alpha over black: returns L or RGB."""
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        image = image.convert("RGBA")
    elif image.mode not in ("L", "RGB"):
        image = image.convert("RGB")  # palette, bilevel, CMYK...: RGB keeps all their information
    # Some clip art exceeds 100 megapixels; an integer box reduction first (PIL premultiplies alpha for
    # it) makes those several times cheaper and keeps 4x oversampling for the final Lanczos filter.
    factor = (max(image.size) if fit == "long" else min(image.size)) // (4 * image_size)
    if factor >= 2:
        image = image.reduce(factor)
    if has_alpha:
        black = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(black, image).convert("RGB")
    return image


def _to_8bit(image: Image.Image) -> Image.Image:
    """Map 16-bit and float gray images to 8-bit gray; PIL's own convert would clip them at 255."""
    if image.mode not in ("I", "I;16", "I;16B", "I;16L", "F"):
        return image
    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I") and values.max(initial=0) > 255 else 255.0
    if image.mode == "F":
        top = max(1.0, float(values.max(initial=0)))
    return Image.fromarray(np.clip(values * (255.0 / top), 0, 255).astype(np.uint8), mode="L")
