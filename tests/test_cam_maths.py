"""The one CAM formula (serving/cam_maths.py) against PyTorch, without a server: the weighted sum of the maps,
torch's bilinear upsampling (align_corners=False) and the per-map min-max scaling."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from serving.cam_maths import class_activation_maps, normalize, raw_cam


def torch_cam(features: np.ndarray, weights: np.ndarray, classes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    maps = (torch.from_numpy(weights)[torch.from_numpy(classes)] * torch.from_numpy(features)).sum(1)
    maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    lo = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - lo
    return ((maps - lo) / span).numpy()


@pytest.mark.parametrize("weight_maps", [(1, 1), (7, 7)])  # GAP + linear head; per-pixel contributions
@pytest.mark.parametrize("size", [(28, 28), (7, 7), (32, 20)])
def test_maps_equal_pytorchs(weight_maps, size):
    rng = np.random.default_rng(0)
    features = rng.standard_normal((3, 16, 7, 7)).astype(np.float32)
    weights = rng.standard_normal((10, 16, *weight_maps)).astype(np.float32)
    classes = np.array([0, 9, 4])
    got = class_activation_maps(features, weights, classes, size)
    assert got.shape == (3, *size) and got.dtype == np.float32
    np.testing.assert_allclose(got, torch_cam(features, weights, classes, size), atol=1e-5)
    assert got.min(axis=(1, 2)).tolist() == [0, 0, 0] and np.allclose(got.max(axis=(1, 2)), 1)


def test_the_raw_map_is_the_weighted_sum_and_a_flat_map_scales_to_zero():
    features = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    weights = np.array([[1, 0, 0], [0, 2, -1]], np.float32)[:, :, None, None]
    raw = raw_cam(features, weights, np.array([1, 0]))
    np.testing.assert_array_equal(raw[0], 2 * features[0, 1] - features[0, 2])
    np.testing.assert_array_equal(raw[1], features[1, 0])
    assert not normalize(np.full((1, 4, 4), 3.0, np.float32)).any()
