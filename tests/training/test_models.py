"""The CNN range: published parameter counts, the forward_features/forward_head contract, CAM linearity and
ONNX export with a dynamic batch axis."""

from __future__ import annotations

import pytest
import torch

from training.models import CamUnsupported, compute_cam, create_model, list_models, model_entry

# Names whose default head is not linear in the feature maps, so cam_weights must refuse.
NO_CAM = {"mlp", "lenet5", "alexnet", "vgg11", "vgg13", "vgg16", "vgg19"}

# (channels, (H, W)) of the two small inputs every model must handle: Fashion-MNIST and CIFAR.
SHAPES = [(1, (28, 28)), (3, (32, 32))]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Batches of two gain nothing from intra-op threads, and on a busy machine extra threads only contend.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_meta(name: str, **kwargs) -> torch.nn.Module:
    # Meta tensors have shapes but no storage: the 138M-parameter VGG-16 costs nothing to count.
    with torch.device("meta"):
        return create_model(name, **kwargs)


@pytest.mark.parametrize("name,channels,size,classes,expected", [
    ("lenet5", 1, (32, 32), 10, 61_706),
    ("lenet5", 1, (28, 28), 10, 61_706),  # padded first conv: 28x28 behaves like 32x32
    ("alexnet", 3, (224, 224), 1000, 61_100_840),
    ("vgg16", 3, (224, 224), 1000, 138_357_544),
    ("resnet18", 3, (224, 224), 1000, 11_689_512),
    ("resnet50", 3, (224, 224), 1000, 25_557_032),
    ("resnet34", 3, (224, 224), 1000, 21_797_672),
    ("resnet101", 3, (224, 224), 1000, 44_549_160),
    ("resnet152", 3, (224, 224), 1000, 60_192_808),
    ("vgg11", 3, (224, 224), 1000, 132_863_336),
    ("vgg13", 3, (224, 224), 1000, 133_047_848),
    ("vgg19", 3, (224, 224), 1000, 143_667_240),
])
def test_published_parameter_counts(name, channels, size, classes, expected):
    model = build_meta(name, in_channels=channels, num_classes=classes, input_size=size)
    assert n_params(model) == expected


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_cifar_resnet20_is_about_027m(shortcut):
    model = build_meta("resnet20", in_channels=3, num_classes=10, input_size=(32, 32), shortcut=shortcut)
    assert 0.26e6 < n_params(model) < 0.28e6


def test_every_family_is_registered():
    families = {model_entry(n).family for n in list_models()}
    assert {"linear", "mlp", "lenet", "alexnet", "vgg", "resnet", "resnet_cifar"} <= families


@pytest.fixture(scope="module", params=[(n, c, s) for n in list_models() for c, s in SHAPES],
                ids=lambda p: f"{p[0]}-{p[1]}x{p[2][0]}x{p[2][1]}")
def built(request):
    # Module scope: pytest groups the tests by parameter, so each model is built once and dropped after.
    name, channels, size = request.param
    torch.manual_seed(0)
    model = create_model(name, in_channels=channels, num_classes=10, input_size=size).eval()
    x = torch.rand(2, channels, *size)
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model(x)
    return name, model, x, features, logits


def test_forward_shape(built):
    _, _, _, features, logits = built
    assert logits.shape == (2, 10)
    assert features.ndim == 4 and features.shape[0] == 2
    assert torch.isfinite(logits).all()


def test_forward_is_head_of_features(built):
    _, model, _, features, logits = built
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(features), logits)


def assert_cam_reproduces_logits(model: torch.nn.Module, features: torch.Tensor, logits: torch.Tensor) -> None:
    """CAM_k = sum_c W[k, c] f[c]; its mean (GAP head) or sum (linear head) plus the bias is logit k."""
    weights = model.cam_weights()
    k, c, hw = weights.shape[0], weights.shape[1], tuple(weights.shape[2:])
    assert (k, c) == (logits.shape[1], features.shape[1])
    assert hw in {(1, 1), tuple(features.shape[2:])}
    with torch.no_grad():
        bias = model.forward_head(torch.zeros_like(features[:1]))[0]  # an affine head maps 0 to its bias
    scale = max(1.0, float(logits.abs().max()))
    for cls in range(k):
        cam = compute_cam(features, weights, torch.full((features.shape[0],), cls))
        assert cam.shape == (features.shape[0], *features.shape[2:])
        # Spatially broadcast weights mean a GAP head; full-size weights are per-pixel contributions.
        pooled = cam.mean(dim=(1, 2)) if hw == (1, 1) else cam.sum(dim=(1, 2))
        torch.testing.assert_close(pooled + bias[cls], logits[:, cls], rtol=1e-4, atol=1e-4 * scale)


def test_cam_matches_logits_or_is_refused(built):
    name, model, _, features, logits = built
    if name in NO_CAM:
        with pytest.raises(CamUnsupported, match=r"\w"):
            model.cam_weights()
    else:
        assert_cam_reproduces_logits(model, features, logits)


@pytest.mark.parametrize("kwargs", [
    {"name": "linear", "num_classes": 2, "binary": True},
    {"name": "mlp", "hidden": ()},
    {"name": "mlp", "hidden": (), "num_classes": 2, "binary": True},
    {"name": "lenet5", "head": "gap", "activation": "relu", "batch_norm": True},
    {"name": "alexnet", "head": "gap", "gap_channels": 0},
    {"name": "vgg11", "head": "gap", "batch_norm": True},
    {"name": "resnet20", "shortcut": "A"},
    {"name": "resnet18", "batch_norm": False, "dropout": 0.2},
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_cam_options(kwargs):
    kwargs = dict(kwargs)
    name, classes = kwargs.pop("name"), kwargs.pop("num_classes", 10)
    torch.manual_seed(0)
    model = create_model(name, in_channels=1, num_classes=classes, input_size=(28, 28), **kwargs).eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        features, logits = model.forward_features(x), model(x)
    assert logits.shape == (2, 1 if kwargs.get("binary") else classes)
    assert_cam_reproduces_logits(model, features, logits)


@pytest.mark.parametrize("kwargs", [
    {"name": "mlp"},
    {"name": "mlp", "hidden": (32,), "activation": "sigmoid", "dropout": 0.1},
    {"name": "lenet5", "head": "classic"},
    {"name": "alexnet"},
    {"name": "vgg11", "batch_norm": True},
])
def test_nonlinear_heads_refuse_cam(kwargs):
    kwargs = dict(kwargs)
    model = create_model(kwargs.pop("name"), in_channels=1, num_classes=10, input_size=(28, 28), **kwargs)
    with pytest.raises(CamUnsupported, match="nonlinear"):
        model.cam_weights()


def test_an_int_input_size_means_a_square_input():
    """torchvision and timm users pass one int; it means the same as the pair."""
    square = create_model("resnet18", input_size=64, num_classes=10)
    assert square.input_size == (64, 64)
    assert square(torch.zeros(2, 3, 64, 64)).shape == (2, 10)
    torch.manual_seed(0)
    a = create_model("small_fmnist", input_size=28)
    torch.manual_seed(0)
    b = create_model("small_fmnist", input_size=(28, 28))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_binary_needs_two_classes():
    with pytest.raises(ValueError):
        create_model("linear", in_channels=1, num_classes=10, input_size=(28, 28), binary=True)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name,channels,size,kwargs", [
    ("linear", 1, (28, 28), {"num_classes": 2, "binary": True}),
    ("lenet5_gap", 1, (28, 28), {}),
    ("vgg11_gap", 1, (28, 28), {}),
    ("resnet20", 3, (32, 32), {"shortcut": "A"}),
])
def test_onnx_export_dynamic_batch(tmp_path, name, channels, size, kwargs):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    kwargs = {"num_classes": 10, **kwargs}
    model = create_model(name, in_channels=channels, input_size=size, **kwargs).eval()
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (torch.rand(2, channels, *size),), str(path), dynamo=False, input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(5, channels, *size)  # a batch size the export never saw
    (out,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-3, atol=1e-4)
