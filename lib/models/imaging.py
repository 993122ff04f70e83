"""Decoding client images and encoding generated ones.

Client images are hostile input, so every step of :func:`decode_image` is bounded before it runs:

* the field: at most ``max_chars`` characters (413), checked before anything is copied;
* a ``data:`` URL's header is looked for in its first :data:`MAX_DATA_URL_HEADER_CHARS`
  characters only, and parsed by splitting, never by a backtracking pattern over the payload
  (a 19 MiB ``data:image/png;;;...`` held a classifier's GIL for seconds);
* only :data:`ACCEPTED_FORMATS` are tried by Pillow (``Image.open(formats=...)``): no other
  decoder plugin ever sees the bytes;
* the pixel count comes from the header, before any pixel is decoded (413 over ``max_pixels``,
  ``MAX_IMAGE_PIXELS``, default 4096x4096): a 15 KB PNG can claim 4096x4096 or far more;
* at most :data:`MAX_CONCURRENT_DECODES` images decode at once per process; callers run
  :func:`decode_image` in a worker thread (``asyncio.to_thread``), never on an event loop, so a
  waiting decode holds a thread, not the replica.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import threading

from PIL import Image

from lib.errors import InvalidImageError, PayloadTooLargeError, UnsupportedMediaTypeError

ACCEPTED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP"})
# "data:image/png;base64," is 22 characters; a few parameters (charset, name) fit in 256.
MAX_DATA_URL_HEADER_CHARS = 256
# The longest image field: the default body cap of /v1/classify (20 MiB), base64 of ~15 MiB.
MAX_IMAGE_CHARS = 20 * 1024 * 1024
# Decodes at once per process. Reasoned: a classifier replica reserves 0.4 CPU; two decodes keep
# a core busy while a batch's others wait, and cap the decoded pixels held at once.
MAX_CONCURRENT_DECODES = 2
_DECODES = threading.BoundedSemaphore(MAX_CONCURRENT_DECODES)
# Signatures of image formats that are not accepted, recognised without opening them, so that
# the client hears 415 (use another format) rather than 400 (broken data).
_OTHER_SIGNATURES = (
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"\x00\x00\x01\x00", "ICO"), (b"8BPS", "PSD"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xff\x4f\xff\x51", "JPEG 2000"),
)
_MEDIA_TYPE = re.compile(r"^[a-z0-9.+-]{1,64}/[a-z0-9.+-]{1,64}$")


def decode_image(data: str, *, max_pixels: int, max_chars: int = MAX_IMAGE_CHARS) -> Image.Image:
    """Turn a base64 string or a data URL into an RGB image.

    Raises 413 for a field over ``max_chars`` or an image over ``max_pixels`` (checked from the
    header, before the pixels are decoded), 415 for a data URL that is not an image or a format
    not accepted, and 400 for anything that does not decode.
    """
    if len(data) > max_chars:
        raise PayloadTooLargeError(f"the image field exceeds {max_chars} characters")
    payload = _data_url_payload(data.strip())
    with _DECODES:
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidImageError("image is not valid base64") from None
        try:
            # open() reads the header only; the pixel limit is checked before load() decodes.
            image = Image.open(io.BytesIO(raw), formats=sorted(ACCEPTED_FORMATS))
            if image.width * image.height > max_pixels:
                raise PayloadTooLargeError(
                    f"image of {image.width}x{image.height} exceeds the limit of {max_pixels} pixels"
                )
            image.load()
            return image.convert("RGB")
        except PayloadTooLargeError:
            raise
        except Image.DecompressionBombError:  # beyond Pillow's own hard limit, before ours
            raise PayloadTooLargeError(f"image exceeds the limit of {max_pixels} pixels") from None
        except Image.UnidentifiedImageError:
            other = _other_image_format(raw)
            if other is None:
                raise InvalidImageError("image could not be decoded") from None
            raise UnsupportedMediaTypeError(
                f"image format {other} is not supported; use one of {sorted(ACCEPTED_FORMATS)}"
            ) from None
        except Exception:
            raise InvalidImageError("image could not be decoded") from None


def _other_image_format(raw: bytes) -> str | None:
    for signature, name in _OTHER_SIGNATURES:
        if raw.startswith(signature):
            return name
    if raw[4:8] == b"ftyp":  # ISO media: HEIC, AVIF
        return "HEIF/AVIF"
    return None


def _data_url_payload(data: str) -> str:
    """The base64 part of a data URL (the string itself when it is not one)."""
    if data[:5].lower() != "data:":
        return data
    comma = data.find(",", 5, MAX_DATA_URL_HEADER_CHARS)
    if comma < 0:
        raise InvalidImageError(
            f"data URL without a ',' in its first {MAX_DATA_URL_HEADER_CHARS} characters"
        )
    media_type, *parameters = data[5:comma].split(";")
    media_type = media_type.strip().lower()
    if not _MEDIA_TYPE.match(media_type) or not media_type.startswith("image/"):
        shown = media_type[:64] or "missing"
        raise UnsupportedMediaTypeError(f"data URL media type {shown!r} is not an image")
    if any(not parameter.strip() for parameter in parameters):
        raise InvalidImageError("data URL header has an empty parameter")
    return data[comma + 1 :]


def encode_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
