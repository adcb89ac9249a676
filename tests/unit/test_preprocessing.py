"""consumers/preprocessing.py: request rows and images -> float32 feature tensors."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from toposerve.brokers.messages import FailureCode
from toposerve.models import preprocessing
from toposerve.models.preprocessing import (
    InputError,
    InputLimits,
    check_image_header,
    decode_base64_image,
    image_b64_to_features,
    image_to_features,
    open_image,
    rows_to_features,
)
from toposerve.models.registry import ImagePreprocessing, ModelManifest, ModelRegistry, load_manifests

REPO = Path(__file__).resolve().parents[2]
MODELS_DIR = REPO / "deploy" / "models"
SAMPLES = REPO / "deploy" / "samples" / "digits"
LIMITS = InputLimits()
F32_MAX = float(np.finfo(np.float32).max)


@pytest.fixture(scope="module")
def manifests() -> dict[str, ModelManifest]:
    return load_manifests(MODELS_DIR)


@pytest.fixture(scope="module")
def iris(manifests) -> ModelManifest:
    return manifests["iris"]


@pytest.fixture(scope="module")
def digits(manifests) -> ModelManifest:
    return manifests["digits_fast"]


@pytest.fixture(scope="module")
def spec(digits) -> ImagePreprocessing:
    assert isinstance(digits.preprocessing, ImagePreprocessing)
    return digits.preprocessing


@pytest.fixture
def no_pixel_decoding(monkeypatch):
    """Fail the test if any image's pixels get decoded."""

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"pixels of a {self.size} image were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG whose IHDR declares width x height 8-bit grey pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 256)  # a few bytes; a decoder would want width*height of them
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def raises_input_error(code: FailureCode, call, *args) -> InputError:
    with pytest.raises(InputError) as info:
        call(*args)
    assert info.value.code == code, info.value.message
    assert str(info.value) == info.value.message
    return info.value


# =========================================================================== rows


def test_rows_become_float32_features(iris) -> None:
    rows = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]
    features = rows_to_features(rows, iris, LIMITS)
    assert features.dtype == np.float32
    assert features.shape == (2, 4)
    np.testing.assert_array_equal(features, np.array(rows, dtype=np.float32))


def test_integers_are_numbers_too(iris) -> None:
    assert rows_to_features([[5, 3, 1, 0]], iris, LIMITS).tolist() == [[5.0, 3.0, 1.0, 0.0]]


def test_empty_instances(iris) -> None:
    error = raises_input_error(FailureCode.INVALID_INPUT, rows_to_features, [], iris, LIMITS)
    assert "empty" in error.message


@pytest.mark.parametrize("bad_index, bad_row", [(0, [1.0, 2.0, 3.0]), (2, [1.0] * 5), (1, [])])
def test_wrong_arity_names_the_row_index(iris, bad_index: int, bad_row: list[float]) -> None:
    rows = [[5.1, 3.5, 1.4, 0.2]] * 3
    rows = rows[:bad_index] + [bad_row] + rows[bad_index + 1:]
    error = raises_input_error(FailureCode.INVALID_INPUT, rows_to_features, rows, iris, LIMITS)
    assert f"instances[{bad_index}] has {len(bad_row)} values" in error.message
    assert "expects 4" in error.message
    assert "sepal_length_cm" in error.message  # says which features


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_value_names_its_position(iris, value: float) -> None:
    rows = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, value, 2.3]]
    error = raises_input_error(FailureCode.INVALID_INPUT, rows_to_features, rows, iris, LIMITS)
    assert "instances[1][2]" in error.message
    assert "finite" in error.message


@pytest.mark.parametrize("value", [3.5e38, -3.5e38, 1e300])
def test_values_beyond_float32_range_are_refused(iris, value: float) -> None:
    error = raises_input_error(FailureCode.INVALID_INPUT, rows_to_features, [[value, 1.0, 1.0, 1.0]], iris, LIMITS)
    assert "float32" in error.message


def test_float32_max_itself_is_accepted_and_stays_finite(iris) -> None:
    features = rows_to_features([[F32_MAX, -F32_MAX, 0.0, 1e-45]], iris, LIMITS)
    assert np.isfinite(features).all()
    assert features[0, 0] == np.finfo(np.float32).max


def test_max_rows_is_too_large(iris) -> None:
    limits = InputLimits(max_rows=3)
    rows_to_features([[1.0, 2.0, 3.0, 4.0]] * 3, iris, limits)
    error = raises_input_error(FailureCode.TOO_LARGE, rows_to_features, [[1.0, 2.0, 3.0, 4.0]] * 4, iris, limits)
    assert "4 rows" in error.message and "limit of 3" in error.message


def test_rows_for_an_image_model_are_refused(digits) -> None:
    error = raises_input_error(FailureCode.INVALID_INPUT, rows_to_features, [[0.0] * 64], digits, LIMITS)
    assert "'image'" in error.message and "digits_fast" in error.message


def test_image_for_a_tabular_model_is_refused(iris) -> None:
    png = b64(encode(Image.new("L", (8, 8))))
    for call in (image_b64_to_features, check_image_header):
        error = raises_input_error(FailureCode.INVALID_INPUT, call, png, iris, LIMITS)
        assert "'instances'" in error.message


# =========================================================================== base64

RAW = bytes(range(256)) * 3 + b"\x01\x02"  # 770 bytes: needs '+', '/' and padding
STANDARD = b64(RAW)


def test_fixture_exercises_both_alphabets_and_padding() -> None:
    assert "+" in STANDARD and "/" in STANDARD and STANDARD.endswith("=")


@pytest.mark.parametrize(
    "text",
    [
        STANDARD,
        base64.urlsafe_b64encode(RAW).decode(),
        STANDARD.rstrip("="),
        base64.urlsafe_b64encode(RAW).decode().rstrip("="),
        "data:image/png;base64," + STANDARD,
        "data:image/jpeg;base64," + STANDARD.rstrip("="),
        "DATA:IMAGE/PNG;BASE64," + STANDARD,
        "data:image/png;base64," + base64.urlsafe_b64encode(RAW).decode(),
        base64.encodebytes(RAW).decode(),  # what GNU `base64` prints: 76 columns and a final newline
        base64.encodebytes(RAW).decode().replace("\n", "\r\n"),
        "  " + STANDARD + "\n",
    ],
    ids=["standard", "url-safe", "no-padding", "url-safe-no-padding", "data-url", "data-url-jpeg-no-padding",
         "data-url-uppercase", "data-url-url-safe", "gnu-wrapped", "crlf-wrapped", "surrounding-space"],
)
def test_base64_variants_decode_to_the_same_bytes(text: str) -> None:
    assert decode_base64_image(text, LIMITS) == RAW


def test_gnu_wrapped_fixture_really_is_wrapped() -> None:
    lines = base64.encodebytes(RAW).decode().splitlines()
    assert len(lines) > 10 and all(len(line) <= 76 for line in lines)


@pytest.mark.parametrize("text", ["", "   \n", "data:image/png;base64,"], ids=["empty", "blank", "prefix-only"])
def test_empty_image(text: str) -> None:
    error = raises_input_error(FailureCode.INVALID_INPUT, decode_base64_image, text, LIMITS)
    assert "empty" in error.message


@pytest.mark.parametrize("text", ["iVBOR$%^&*", "abc!", "AAAAA", "A===", "{\"png\": 1}", "iVBORw0K" + "\u00e9" * 4],
                         ids=["symbols", "bang", "one-extra-char", "too-much-padding", "json", "non-ascii"])
def test_invalid_base64_is_invalid_input(text: str) -> None:
    error = raises_input_error(FailureCode.INVALID_INPUT, decode_base64_image, text, LIMITS)
    assert "not valid base64" in error.message


def test_oversized_image_is_too_large_before_decoding(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("an oversized payload was decoded")

    monkeypatch.setattr(preprocessing.base64, "b64decode", refuse)
    limits = InputLimits(max_image_bytes=1024)
    # Not even valid base64: only a size check that runs first can answer too_large.
    error = raises_input_error(FailureCode.TOO_LARGE, decode_base64_image, "!" * 100_000, limits)
    assert "1024" in error.message


def test_size_limit_just_below_it_is_accepted() -> None:
    limits = InputLimits(max_image_bytes=1024)
    assert len(decode_base64_image(b64(bytes(1023)), limits)) == 1023
    raises_input_error(FailureCode.TOO_LARGE, decode_base64_image, b64(bytes(1030)), limits)


def test_image_of_exactly_the_size_limit_is_accepted() -> None:
    limits = InputLimits(max_image_bytes=1024)
    assert len(decode_base64_image(b64(bytes(1024)), limits)) == 1024


# =========================================================================== open_image

NOT_IMAGES = {
    "text": b"hello, I am not an image",
    "empty": b"",
    "gif": encode(Image.new("L", (8, 8)), "GIF"),
    "bmp": encode(Image.new("L", (8, 8)), "BMP"),
    "tiff": encode(Image.new("L", (8, 8)), "TIFF"),
    "png-signature-only": b"\x89PNG\r\n\x1a\n",
}


@pytest.mark.parametrize("raw", list(NOT_IMAGES.values()), ids=list(NOT_IMAGES))
def test_non_png_jpeg_is_refused(raw: bytes) -> None:
    error = raises_input_error(FailureCode.INVALID_INPUT, open_image, raw, LIMITS)
    assert "PNG or JPEG" in error.message


@pytest.mark.parametrize("name, keep", [("digit_0_8x8.png", 70), ("digit_9_24x24_palette.png", 870),
                                        ("digit_3_64x64_rgb.png", 200), ("digit_7_32x32.jpg", 520)])
def test_image_truncated_in_its_pixel_data_is_invalid_input(name: str, keep: int) -> None:
    # PNG: cut inside IDAT (digit_0: IDAT spans bytes 33-107, palette: 813-938); JPEG: inside the scan.
    error = raises_input_error(FailureCode.INVALID_INPUT, open_image, sample(name)[:keep], LIMITS)
    assert "decoded" in error.message or "truncated" in error.message


@pytest.mark.parametrize("name, keep", [("digit_0_8x8.png", 20), ("digit_9_24x24_palette.png", 570),
                                        ("digit_7_32x32.jpg", 100)], ids=["png-in-IHDR", "png-in-PLTE", "jpeg-header"])
def test_image_truncated_inside_its_header_is_invalid_input(name: str, keep: int) -> None:
    raises_input_error(FailureCode.INVALID_INPUT, open_image, sample(name)[:keep], LIMITS)


def test_decompression_bomb_is_too_large_without_decoding(no_pixel_decoding) -> None:
    bomb = png_declaring(100_000, 100_000)
    assert len(bomb) < 200
    error = raises_input_error(FailureCode.TOO_LARGE, open_image, bomb, LIMITS)
    assert "too large" in error.message


def test_image_over_our_pixel_limit_is_too_large_without_decoding(no_pixel_decoding) -> None:
    # 25 M pixels: under Pillow's own bomb threshold (~179 M), over the 16 M default limit.
    error = raises_input_error(FailureCode.TOO_LARGE, open_image, png_declaring(5000, 5000), LIMITS)
    assert "5000x5000" in error.message and "16000000" in error.message


def test_pixel_limit_is_configurable() -> None:
    raw = encode(Image.new("L", (9, 9)))
    raises_input_error(FailureCode.TOO_LARGE, open_image, raw, InputLimits(max_image_pixels=80))
    assert open_image(raw, InputLimits(max_image_pixels=81)).size == (9, 9)


def test_good_image_is_fully_decoded() -> None:
    image = open_image(sample("digit_3_64x64_rgb.png"), LIMITS)
    assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGB"
    assert np.asarray(image).shape == (64, 64, 3)


# =========================================================================== image_to_features


def test_features_are_one_float32_row_of_64(spec) -> None:
    rng = np.random.default_rng(0)
    for size in ((8, 8), (37, 21), (200, 300)):
        image = Image.fromarray(rng.integers(0, 256, size=(*size[::-1], 3), dtype=np.uint8), "RGB")
        features = image_to_features(image, spec)
        assert features.shape == (1, 64)
        assert features.dtype == np.float32
        assert features.min() >= 0.0 and features.max() <= 16.0


def test_black_and_white_are_exactly_0_and_16(spec) -> None:
    assert image_to_features(Image.new("L", (8, 8), 0), spec).tolist() == [[0.0] * 64]
    assert image_to_features(Image.new("L", (8, 8), 255), spec).tolist() == [[16.0] * 64]


def test_8x8_grey_image_maps_to_pixel_times_16_over_255(spec) -> None:
    values = np.arange(256, dtype=np.uint8).reshape(4, 8, 8)
    for block in values:
        features = image_to_features(Image.fromarray(block, "L"), spec)
        expected = (block.astype(np.float64) * 16 / 255).reshape(1, 64)
        # float32 arithmetic: within one unit in the last place of the exact value, same row-major order.
        np.testing.assert_array_max_ulp(features, expected.astype(np.float32), maxulp=1)
        np.testing.assert_allclose(features, expected, rtol=1e-6, atol=0)


def test_downscaling_uses_the_box_filter(spec) -> None:
    # A one-pixel checkerboard: a box filter averages every 2x2 block to mid-grey,
    # nearest-neighbour would keep 0 or 255.
    board = (np.indices((16, 16)).sum(axis=0) % 2 * 255).astype(np.uint8)
    features = image_to_features(Image.fromarray(board, "L"), spec)
    np.testing.assert_allclose(features, np.full((1, 64), 127.5 * 16 / 255), atol=0.5 * 16 / 255)


def test_transparent_pixels_composite_to_black(spec) -> None:
    pixels = np.zeros((8, 8, 4), dtype=np.uint8)
    pixels[..., :3] = 255            # white everywhere ...
    pixels[:4, :, 3] = 0              # ... fully transparent in the top half
    pixels[4:, :, 3] = 255            # opaque in the bottom half
    pixels[7, 7, 3] = 128             # one half-transparent pixel
    features = image_to_features(Image.fromarray(pixels, "RGBA"), spec).reshape(8, 8)
    assert (features[:4] == 0).all()
    assert (features[4:7] == 16).all()
    assert features[7, 7] == pytest.approx(128 * 16 / 255, abs=16 / 255)


@pytest.mark.parametrize("mode", ["LA", "PA"])
def test_other_alpha_modes_composite_to_black(spec, mode: str) -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 255, 255, 0))
    rgba.paste((255, 255, 255, 255), (0, 0, 8, 4))
    image = rgba.convert(mode)
    assert image.mode == mode
    features = image_to_features(image, spec).reshape(8, 8)
    assert (features[:4] == 16).all() and (features[4:] == 0).all()


def test_palette_transparency_composites_to_black(spec) -> None:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 255, 255, 255])
    image.paste(0, (0, 0, 8, 4))
    raw = encode(image, transparency=1)  # the white index is transparent
    features = image_to_features(open_image(raw, LIMITS), spec)
    assert features.max() == 0.0


@pytest.mark.parametrize("mode, key", [("L", 255), ("RGB", (255, 255, 255))])
def test_colour_key_transparency_composites_to_black(spec, mode: str, key) -> None:
    raw = encode(Image.new(mode, (8, 8), key), transparency=key)
    image = open_image(raw, LIMITS)
    assert image.info.get("transparency") == key
    assert image_to_features(image, spec).max() == 0.0


@pytest.mark.parametrize(
    "name", ["digit_3_64x64_rgb.png", "digit_9_24x24_palette.png", "digit_7_32x32.jpg", "digit_5_16x16_rgba.png"]
)
def test_samples_give_the_features_of_their_greyscale_version(spec, name: str) -> None:
    image = open_image(sample(name), LIMITS)
    reference = image.convert("RGBA") if image.mode == "RGBA" else image
    if reference.mode == "RGBA":
        reference = Image.alpha_composite(Image.new("RGBA", reference.size, (0, 0, 0, 255)), reference)
    grey = reference.convert("L")
    np.testing.assert_allclose(image_to_features(image, spec), image_to_features(grey, spec), atol=1e-5)


SAMPLE_FILES = sorted(p.name for p in SAMPLES.iterdir() if p.suffix in (".png", ".jpg"))


@pytest.mark.parametrize("name", SAMPLE_FILES)
def test_samples_recover_the_digits_data_and_are_recognised(spec, digits, name: str) -> None:
    features = image_b64_to_features(b64(sample(name)), digits, LIMITS)
    # Rendered from integer digits data (0..16) as round(v*255/16): features land next to integers.
    tolerance = 0.1 if name.endswith(".jpg") else 0.5 * 16 / 255 + 1e-6
    assert np.abs(features - np.round(features)).max() <= tolerance
    registry = ModelRegistry(MODELS_DIR)
    label = name.split("_")[1]
    for model in ("digits_fast", "digits_accurate"):
        loaded = registry.load(model)
        class_indices, _ = loaded.run(features)
        assert loaded.manifest.labels[int(class_indices[0])] == label, model


# =========================================================================== check_image_header


@pytest.mark.parametrize("name", SAMPLE_FILES)
def test_header_check_accepts_every_sample(digits, name: str) -> None:
    assert check_image_header(b64(sample(name)), digits, LIMITS) is None


@pytest.mark.parametrize("raw", list(NOT_IMAGES.values()) + [sample("digit_0_8x8.png")[:70],
                                                             sample("digit_9_24x24_palette.png")[:600],
                                                             sample("digit_0_8x8.png")[:20]],
                         ids=[*NOT_IMAGES, "png-truncated", "palette-png-truncated", "png-truncated-in-ihdr"])
def test_header_check_refuses_broken_files(digits, raw: bytes) -> None:
    text = b64(raw) or "AAAA"
    raises_input_error(FailureCode.INVALID_INPUT, check_image_header, text, digits, LIMITS)


def test_header_check_refuses_bad_base64(digits) -> None:
    error = raises_input_error(FailureCode.INVALID_INPUT, check_image_header, "not base64!", digits, LIMITS)
    assert "base64" in error.message


def test_header_check_refuses_a_bomb_as_too_large_without_decoding(digits, no_pixel_decoding) -> None:
    raises_input_error(FailureCode.TOO_LARGE, check_image_header, b64(png_declaring(100_000, 100_000)), digits,
                       LIMITS)


@pytest.mark.parametrize("raw, limits", [
    (png_declaring(5000, 5000), LIMITS),
    (encode(Image.new("L", (9, 9))), InputLimits(max_image_pixels=80)),
], ids=["5000x5000", "9x9-over-80"])
def test_header_check_refuses_too_many_pixels_as_too_large(digits, raw: bytes, limits: InputLimits) -> None:
    error = raises_input_error(FailureCode.TOO_LARGE, check_image_header, b64(raw), digits, limits)
    assert "truncated" not in error.message


def test_header_check_refuses_a_truncated_jpeg(digits) -> None:
    raw = sample("digit_7_32x32.jpg")
    truncated = raw[: int(len(raw) * 0.6)]
    raises_input_error(FailureCode.INVALID_INPUT, open_image, truncated, LIMITS)  # the stage would refuse it
    raises_input_error(FailureCode.INVALID_INPUT, check_image_header, b64(truncated), digits, LIMITS)
