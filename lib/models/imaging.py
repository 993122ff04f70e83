"""Decoding client images and encoding generated ones."""

from __future__ import annotations

import base64
import binascii
import io
import re

from PIL import Image

from lib.errors import InvalidImageError, PayloadTooLargeError, UnsupportedMediaTypeError

ACCEPTED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP"})
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?)(;base64)?,", re.I)


def decode_image(data: str, *, max_pixels: int) -> Image.Image:
    """Turn a base64 string or a data URL into an RGB image.

    Raises 415 for a data URL that is not an image, 413 for an image over ``max_pixels`` (checked
    from the header, before the pixels are decoded: a small PNG can expand to gigabytes), and 400
    for anything that does not decode.
    """
    payload = data.strip()
    match = _DATA_URL.match(payload)
    if match:
        mime = (match.group("mime") or "").lower()
        if not mime.startswith("image/"):
            raise UnsupportedMediaTypeError(f"data URL media type {mime or 'missing'!r} is not an image")
        payload = payload[match.end():]
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImageError("image is not valid base64") from None
    try:
        # open() reads the header only; the pixel limit is checked before load() decodes.
        image = Image.open(io.BytesIO(raw))
        if image.format not in ACCEPTED_FORMATS:
            raise UnsupportedMediaTypeError(
                f"image format {image.format} is not supported; use one of {sorted(ACCEPTED_FORMATS)}"
            )
        if image.width * image.height > max_pixels:
            raise PayloadTooLargeError(
                f"image of {image.width}x{image.height} exceeds the limit of {max_pixels} pixels"
            )
        image.load()
    except (UnsupportedMediaTypeError, PayloadTooLargeError):
        raise
    except Image.DecompressionBombError:  # beyond Pillow's own hard limit, before ours is checked
        raise PayloadTooLargeError(f"image exceeds the limit of {max_pixels} pixels") from None
    except Exception:
        raise InvalidImageError("image could not be decoded") from None
    return image.convert("RGB")


def encode_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
