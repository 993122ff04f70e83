"""decode_image: base64 / data URL to RGB with 400/413/415 for bad input; encode_png round trip."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from lib.errors import InvalidImageError, PayloadTooLargeError, UnsupportedMediaTypeError
from lib.models.imaging import decode_image, encode_png

LIMIT = 4096 * 4096


def picture(width: int = 12, height: int = 8, mode: str = "RGB") -> Image.Image:
    """A small image whose pixels differ, so a round trip that scrambles them is caught."""
    pixels = bytes(
        value
        for y in range(height)
        for x in range(width)
        for value in (x * 20 % 256, y * 30 % 256, (x + y) * 7 % 256)
    )
    return Image.frombytes("RGB", (width, height), pixels).convert(mode)


def encoded(image: Image.Image, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming ``width x height`` pixels with almost no data: what a decompression bomb looks like."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def test_png_decodes_to_identical_rgb() -> None:
    original = picture()
    decoded = decode_image(b64(encoded(original, "PNG")), max_pixels=LIMIT)
    assert decoded.mode == "RGB"
    assert decoded.size == (12, 8)
    assert decoded.tobytes() == original.tobytes()


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("RGBA", "PNG"), ("L", "PNG"), ("P", "PNG"), ("RGB", "JPEG"), ("L", "JPEG"), ("RGB", "WEBP"),
     ("RGB", "BMP"), ("P", "GIF")],
)
def test_formats_and_modes_decode_to_rgb(mode: str, fmt: str) -> None:
    decoded = decode_image(b64(encoded(picture(16, 10, mode), fmt)), max_pixels=LIMIT)
    assert decoded.mode == "RGB"
    assert decoded.size == (16, 10)


def test_jpeg_pixels_are_close_to_the_original() -> None:
    original = Image.new("RGB", (16, 16), (200, 40, 90))
    decoded = decode_image(b64(encoded(original, "JPEG", quality=95)), max_pixels=LIMIT)
    r, g, b = decoded.getpixel((8, 8))  # type: ignore[misc]
    assert abs(r - 200) <= 4 and abs(g - 40) <= 4 and abs(b - 90) <= 4


@pytest.mark.parametrize(
    "prefix",
    ["data:image/png;base64,", "DATA:IMAGE/PNG;BASE64,", "data:image/jpeg;base64,",
     "data:image/png;name=x.png;base64,", "  data:image/png;base64,"],
)
def test_data_url_decodes(prefix: str) -> None:
    # The declared image subtype need not match: the bytes decide the format.
    original = picture()
    decoded = decode_image(prefix + b64(encoded(original, "PNG")) + "\n", max_pixels=LIMIT)
    assert decoded.tobytes() == original.tobytes()


@pytest.mark.parametrize(
    "prefix",
    ["data:text/plain;base64,", "data:application/octet-stream;base64,", "data:;base64,", "data:,"],
)
def test_data_url_with_non_image_media_type_is_415(prefix: str) -> None:
    with pytest.raises(UnsupportedMediaTypeError) as caught:
        decode_image(prefix + b64(encoded(picture(), "PNG")), max_pixels=LIMIT)
    assert caught.value.status_code == 415


def test_unsupported_image_format_is_415() -> None:
    with pytest.raises(UnsupportedMediaTypeError, match="TIFF"):
        decode_image(b64(encoded(picture(), "TIFF")), max_pixels=LIMIT)


@pytest.mark.parametrize(
    "data",
    ["not base64 at all!", "abc", "data:image/png;base64,%%%", "aGVsbG8=\x00", "", "   "],
    ids=["punctuation", "bad-padding", "data-url-garbage", "nul", "empty", "blank"],
)
def test_invalid_base64_is_400(data: str) -> None:
    with pytest.raises(InvalidImageError) as caught:
        decode_image(data, max_pixels=LIMIT)
    assert caught.value.status_code == 400


@pytest.mark.parametrize(
    "raw",
    [b"hello, world", b"\x89PNG\r\n\x1a\n" + b"\0" * 32, encoded(picture(), "PNG")[:60]],
    ids=["text", "png-signature-only", "truncated-png"],
)
def test_non_image_bytes_are_400(raw: bytes) -> None:
    with pytest.raises(InvalidImageError):
        decode_image(b64(raw), max_pixels=LIMIT)


@pytest.mark.parametrize(("width", "height", "limit"), [(12, 8, 95), (100, 100, 9_999), (5000, 5000, LIMIT)])
def test_over_max_pixels_is_413(width: int, height: int, limit: int) -> None:
    data = b64(png_header_only(width, height))
    with pytest.raises(PayloadTooLargeError, match=f"{width}x{height}") as caught:
        decode_image(data, max_pixels=limit)
    assert caught.value.status_code == 413


def test_exactly_max_pixels_is_accepted() -> None:
    assert decode_image(b64(encoded(picture(12, 8), "PNG")), max_pixels=96).size == (12, 8)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the point of the test
def test_decompression_bomb_beyond_pil_limit_is_413() -> None:
    with pytest.raises(PayloadTooLargeError):
        decode_image(b64(png_header_only(10_000, 10_000)), max_pixels=LIMIT)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_encode_png_round_trip(mode: str) -> None:
    original = picture(9, 7, mode)
    text = encode_png(original)
    raw = base64.b64decode(text, validate=True)
    assert raw.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(raw)) as reopened:
        assert reopened.format == "PNG"
        assert reopened.mode == mode
        assert reopened.tobytes() == original.tobytes()
    assert decode_image(text, max_pixels=LIMIT).tobytes() == original.convert("RGB").tobytes()


# --- hostile input: every step bounded ------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        "data:image/png" + ";" * 2_000_000 + "," + "A" * 8,  # the header never ends in its prefix
        "data:image/png;;;base64," + b64(encoded(picture(), "PNG")),  # empty parameters
        "data:" + "i" * 300 + "/png;base64,AAAA",
    ],
    ids=["semicolons", "empty-parameters", "long-media-type"],
)
def test_a_hostile_data_url_header_is_refused_from_its_prefix(data: str) -> None:
    with pytest.raises((InvalidImageError, UnsupportedMediaTypeError)) as caught:
        decode_image(data, max_pixels=LIMIT)
    assert "base64" not in caught.value.message  # refused for its header, never decoded


def test_the_header_is_only_looked_for_in_the_prefix() -> None:
    payload = b64(encoded(picture(), "PNG"))
    padded = "data:image/png;" + "x=1;" * 70 + "base64,"  # 300 characters: past the prefix
    with pytest.raises(InvalidImageError, match="first 256 characters"):
        decode_image(padded + payload, max_pixels=LIMIT)
    assert decode_image("data:image/png;name=a.png;base64," + payload, max_pixels=LIMIT).size == (12, 8)


def test_the_field_is_capped_before_anything_else() -> None:
    with pytest.raises(PayloadTooLargeError, match="exceeds 1000 characters"):
        decode_image("A" * 1001, max_pixels=LIMIT, max_chars=1000)


def test_only_accepted_formats_are_opened(monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[object] = []
    original = Image.open

    def spy(fp: object, mode: str = "r", formats: object = None) -> Image.Image:
        opened.append(formats)
        return original(fp, mode, formats)  # type: ignore[arg-type]

    monkeypatch.setattr(Image, "open", spy)
    decode_image(b64(encoded(picture(), "PNG")), max_pixels=LIMIT)
    assert opened == [["BMP", "GIF", "JPEG", "PNG", "WEBP"]]
    with pytest.raises(UnsupportedMediaTypeError, match="TIFF"):
        decode_image(b64(encoded(picture(), "TIFF")), max_pixels=LIMIT)


def test_a_small_file_claiming_many_pixels_is_413_before_decoding() -> None:
    bomb = png_header_only(4097, 4096)
    assert len(bomb) < 100
    with pytest.raises(PayloadTooLargeError, match="4097x4096"):
        decode_image(b64(bomb), max_pixels=LIMIT)


def test_decodes_run_at_most_two_at_once() -> None:
    import threading

    import lib.models.imaging as imaging

    running, peak = 0, 0
    lock = threading.Lock()
    original = imaging.base64.b64decode

    def slow_decode(data: str, validate: bool = False) -> bytes:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        threading.Event().wait(0.05)
        with lock:
            running -= 1
        return original(data, validate=validate)

    image = b64(encoded(picture(), "PNG"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(imaging.base64, "b64decode", slow_decode)
        threads = [threading.Thread(target=decode_image, args=(image,), kwargs={"max_pixels": LIMIT})
                   for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert peak == imaging.MAX_CONCURRENT_DECODES == 2
