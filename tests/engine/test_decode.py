"""The one decode path, alone: every wire form of an image into the batch buffer, no model and no server."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from serving.engine.decode import decode_batch, decode_images
from serving.engine.errors import InvalidInput
from serving.engine.inference import (
    MAX_IMAGES_PER_REQUEST,
    MODEL_INPUT,
    MODEL_INPUT_BATCH,
    PIXELS,
    PIXELS_BATCH,
    ImageBatch,
    InferenceRequest,
    RawTensor,
)
from serving.repository_format import Preprocessing

GRAY = Preprocessing(1, 28, 28)
UNIT = np.float32(1 / 255)  # the one scaling of pixels
RGB = Preprocessing(3, 8, 6)


def pictures(n: int, h: int = 28, w: int = 28, c: int | None = None, seed: int = 0) -> np.ndarray:
    shape = (n, h, w) if c is None else (n, h, w, c)
    return np.random.default_rng(seed).integers(0, 256, shape, np.uint8)


def decoded(images, pre: Preprocessing = GRAY, finite_only: bool = True) -> np.ndarray:
    out = np.full((len(images), pre.channels, pre.height, pre.width), -1, np.float32)
    decode_images(images, pre, out, finite_only)
    return out


def test_pixels_of_every_form_give_the_same_model_input():
    """One picture as a uint8 tensor (classifier.v1), as a PNG, inside a KServe [N, C, H, W] UINT8 tensor, and
    in a batch job's block of pictures: the same buffer, pixels / 255."""
    px = pictures(3)
    expected = px[:, None] * UNIT
    as_tensors = [RawTensor((28, 28), "uint8", p.tobytes(), PIXELS) for p in px]
    pngs = []
    for p in px:
        buffer = io.BytesIO()
        Image.fromarray(p).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    kserve = ImageBatch((3, 1, 28, 28), "uint8", px[:, None].tobytes(), MODEL_INPUT_BATCH)
    block = ImageBatch(px.shape, "uint8", px, PIXELS_BATCH)
    for form in (as_tensors, pngs, kserve, block):
        np.testing.assert_array_equal(decoded(form), expected)


def test_colour_pictures_are_laid_out_channels_first():
    px = pictures(2, 8, 6, 3)
    expected = px.transpose(0, 3, 1, 2) * UNIT
    np.testing.assert_array_equal(decoded([RawTensor(p.shape, "uint8", p.tobytes()) for p in px], RGB), expected)
    np.testing.assert_array_equal(decoded(ImageBatch(px.shape, "uint8", px, PIXELS_BATCH), RGB), expected)


def test_floats_are_the_model_input_as_sent_and_float16_is_widened():
    x = np.random.default_rng(1).random((2, 1, 28, 28), np.float32)
    np.testing.assert_array_equal(decoded(ImageBatch(x.shape, "float32", x, MODEL_INPUT_BATCH)), x)
    half = x.astype("<f2")
    np.testing.assert_array_equal(decoded(ImageBatch(x.shape, "float16", half, MODEL_INPUT_BATCH)),
                                  half.astype(np.float32))
    np.testing.assert_array_equal(decoded([RawTensor((1, 28, 28), "float32", x[0].tobytes(), MODEL_INPUT)]), x[:1])


def test_non_finite_floats_are_refused_unless_the_request_passes_them_through():
    x = np.zeros((1, 1, 28, 28), np.float32)
    x[0, 0, 3, 3] = np.nan
    batch = ImageBatch(x.shape, "float32", x, MODEL_INPUT_BATCH)
    with pytest.raises(InvalidInput, match="NaN"):
        decoded(batch)
    assert np.isnan(decoded(batch, finite_only=False)[0, 0, 3, 3])


def test_pictures_of_another_size_are_resized_like_pillow():
    px = pictures(2, 56, 56)
    expected = np.stack([np.asarray(Image.fromarray(p).resize((28, 28), Image.BILINEAR)) for p in px])
    expected = expected[:, None] * UNIT
    np.testing.assert_array_equal(decoded(ImageBatch(px.shape, "uint8", px, PIXELS_BATCH)), expected)
    np.testing.assert_array_equal(decoded([RawTensor(p.shape, "uint8", p.tobytes()) for p in px]), expected)


@pytest.mark.parametrize(("image", "message"), [
    (RawTensor((28, 28), "uint8", b"\0" * 10), "10 bytes, but shape [28, 28] of uint8 needs 784"),
    (RawTensor((28, 28), "int64", b"\0" * 6272), "dtype 'int64' is not supported"),
    (RawTensor((0, 28), "uint8", b""), "positive dimensions"),
    (RawTensor((2, 28, 28), "float32", b"\0" * 6272), "must be the model input [1, 28, 28]"),
    (RawTensor((28, 28, 2), "uint8", b"\0" * 1568), "is not [H, W] or [H, W, C]"),
    (b"not an image", "cannot decode image (12 bytes"),
    (b"", "image is empty"),
])
def test_bad_images_say_what_is_wrong(image, message):
    with pytest.raises(InvalidInput) as caught:
        decoded([image])
    assert message in str(caught.value)


def test_a_kserve_tensor_of_the_wrong_size_or_shape_is_refused():
    with pytest.raises(InvalidInput, match="input data is 100 bytes"):
        decoded(ImageBatch((1, 1, 28, 28), "float32", b"\0" * 100, MODEL_INPUT_BATCH))
    with pytest.raises(InvalidInput, match=r"must be the model input \[1, 28, 28\]"):
        decoded(ImageBatch((1, 3, 28, 28), "uint8", b"\0" * 2352, MODEL_INPUT_BATCH))


def test_a_batch_is_decoded_request_by_request_and_a_bad_one_fails_alone():
    px = pictures(3)
    good = [InferenceRequest([RawTensor((28, 28), "uint8", p.tobytes())]) for p in px[:2]]
    bad = InferenceRequest([RawTensor((28, 28), "uint8", b"\1" * 5)])
    kserve = InferenceRequest(ImageBatch((1, 1, 28, 28), "uint8", px[2:].tobytes(), MODEL_INPUT_BATCH))
    batch = [good[0], bad, good[1], kserve]
    out = np.full((4, 1, 28, 28), -1, np.float32)
    errors = decode_batch(batch, [slice(i, i + 1) for i in range(4)], out, GRAY)
    assert [type(e) for e in errors] == [type(None), InvalidInput, type(None), type(None)]
    np.testing.assert_array_equal(out[[0, 2, 3]], px[:, None] * UNIT)
    assert not out[1].any()  # the failed request's rows are zeros, not stale values


def test_slicing_an_image_batch_takes_a_view_of_its_rows():
    px = pictures(5)
    batch = ImageBatch((5, 1, 28, 28), "uint8", px[:, None].tobytes(), MODEL_INPUT_BATCH)
    part = batch[1:4]
    assert len(part) == 3 and part.shape == (3, 1, 28, 28) and isinstance(part.data, memoryview)
    np.testing.assert_array_equal(decoded(part), px[1:4, None] * UNIT)
    request = InferenceRequest(batch)[3:5]
    assert len(request) == 2 and request.images.shape[0] == 2


@pytest.mark.parametrize("count", [0, MAX_IMAGES_PER_REQUEST + 1])
def test_a_request_holds_one_image_at_least_and_the_limit_at_most(count):
    with pytest.raises(InvalidInput, match="no images|the limit is"):
        InferenceRequest(ImageBatch((count, 1, 28, 28), "uint8", b"", MODEL_INPUT_BATCH))
    assert len(InferenceRequest([b"x"] * MAX_IMAGES_PER_REQUEST)) == MAX_IMAGES_PER_REQUEST
