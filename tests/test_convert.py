"""PyTorch checkpoint import (`keras_mfm.convert`): features equal a plain-PyTorch reference.

The references below are written here in plain PyTorch with timm's / torchvision's key names,
randomly initialised (LayerNorm and BatchNorm parameters and statistics included, so a wrong
mapping changes the features), run in float64 on the normalised images.
"""

import argparse
import copy
import math

import keras
import numpy as np
import pytest
import torch
from torch import nn

from keras_mfm import backbones
from keras_mfm.convert import (
    ConversionError,
    convert_checkpoint,
    load_torch_state_dict,
    read_checkpoint,
    main,
    resample_position_embedding,
)
from tests.conftest import BACKEND, to_numpy
from tests.helpers_subprocess import run_python

MEAN, STD = np.array(backbones.IMAGENET_MEAN), np.array(backbones.IMAGENET_STD)
VIT = dict(image_size=16, patch_size=4, hidden_dim=64, depth=2, num_heads=2)
ATOL = 1e-4


def images(n=2, size=16, seed=0):
    return np.random.default_rng(seed).random((n, size, size, 3)).astype("float32")


def torch_input(x):
    """NHWC [0, 1] -> normalised NCHW float64 (the encoders normalise their input themselves)."""
    return torch.from_numpy(((x.astype("float64") - MEAN) / STD).transpose(0, 3, 1, 2).copy())


# -- a plain-PyTorch ViT, timm key names (BEiT/MFM's q_bias, v_bias and gamma_1/2 on request) ---------
class Attention(nn.Module):
    def __init__(self, dim, heads, beit):
        super().__init__()
        self.heads, self.beit = heads, beit
        self.qkv = nn.Linear(dim, 3 * dim, bias=not beit)
        if beit:
            self.q_bias = nn.Parameter(torch.randn(dim))
            self.v_bias = nn.Parameter(torch.randn(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        batch, length, dim = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias]) if self.beit else self.qkv.bias
        qkv = nn.functional.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.reshape(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attention = ((q @ k.transpose(-2, -1)) / math.sqrt(dim // self.heads)).softmax(-1)
        return self.proj((attention @ v).transpose(1, 2).reshape(batch, length, dim))


class Mlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, beit):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp, self.beit = Attention(dim, heads, beit), Mlp(dim), beit
        if beit:  # layer scale, MFM's INIT_VALUES (randomised here)
            self.gamma_1 = nn.Parameter(torch.rand(dim) + 0.5)
            self.gamma_2 = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        if self.beit:
            x = x + self.gamma_1 * self.attn(self.norm1(x))
            return x + self.gamma_2 * self.mlp(self.norm2(x))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)


class TorchViT(nn.Module):
    def __init__(self, image_size=16, patch_size=4, hidden_dim=64, depth=2, num_heads=2, beit=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        grid = image_size // patch_size
        self.patch_embed = PatchEmbed(hidden_dim, patch_size)
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid * grid, hidden_dim))
        self.blocks = nn.ModuleList(Block(hidden_dim, num_heads, beit) for _ in range(depth))
        self.norm = nn.LayerNorm(hidden_dim, eps=1e-6)
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.uniform_(module.weight, 0.5, 1.5)
                nn.init.normal_(module.bias, std=0.2)
        self.float().double().eval()  # the float32 values of the checkpoint, computed in float64

    @torch.no_grad()
    def forward(self, x):
        x = self.patch_embed.proj(torch_input(x)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x).numpy()


# -- a plain-PyTorch ResNet-50 v1.5, torchvision key names -------------------------------------------
class Bottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)  # v1.5: stride here
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, 4 * planes, 1, bias=False), nn.BatchNorm2d(4 * planes)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or inplanes != 4 * planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, 4 * planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(4 * planes))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchResNet50(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64)
        self.relu, self.maxpool = nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for index, (planes, blocks, stride) in enumerate([(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]):
            layers = []
            for block in range(blocks):
                layers.append(Bottleneck(inplanes, planes, stride if block == 0 else 1))
                inplanes = 4 * planes
            setattr(self, f"layer{index + 1}", nn.Sequential(*layers))
        self.fc = nn.Linear(2048, 1000)
        self.double()

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(torch_input(x).to(self.conv1.weight.dtype)))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    @torch.no_grad()
    def randomise_batch_norm(self, x):
        """Random BatchNorm parameters and running statistics, near the statistics each BatchNorm
        sees on a calibration batch `x` (set in forward order, so the network stays well scaled)."""
        generator = torch.Generator().manual_seed(1)

        def calibrate(bn, inputs):
            shape, (h,) = bn.running_mean.shape, inputs
            mean, var = h.mean(dim=(0, 2, 3)), h.var(dim=(0, 2, 3))
            bn.running_mean.copy_(mean + 0.2 * var.sqrt() * torch.randn(shape, generator=generator, dtype=h.dtype))
            bn.running_var.copy_(var * (0.5 + torch.rand(shape, generator=generator, dtype=h.dtype)))
            bn.weight.copy_(0.5 + torch.rand(shape, generator=generator, dtype=h.dtype))
            bn.bias.copy_(0.2 * torch.randn(shape, generator=generator, dtype=h.dtype))

        self.eval()
        hooks = [m.register_forward_pre_hook(calibrate) for m in self.modules() if isinstance(m, nn.BatchNorm2d)]
        self(x)
        for hook in hooks:
            hook.remove()
        self.float().double()  # the float32 values of the checkpoint, computed in float64


def save(state, path):
    torch.save(state, path)
    return str(path)


def timm_state(model):
    return {key: value.float() for key, value in model.state_dict().items()}


# -- ViT --------------------------------------------------------------------------------------------
def test_vit_timm_checkpoint_features_match(tmp_path):
    reference = TorchViT()
    path = save(timm_state(reference), tmp_path / "vit.pth")
    encoder, report = convert_checkpoint(path, "vit_tiny", return_report=True, **VIT)
    x = images(3)
    want = reference(x)
    got = to_numpy(encoder(x))
    difference = np.abs(got - want).max()
    print(f"\nViT max abs difference ({BACKEND}): {difference:.2e} (features up to {np.abs(want).max():.1f})")
    assert difference < ATOL
    np.testing.assert_allclose(to_numpy(encoder.pooled_features(encoder(x))), want[:, 0], atol=ATOL)
    assert report.architecture == "vit" and report.unused == [] and report.missing == []
    assert len(report.loaded) == len(reference.state_dict()) and report.source == path


def test_vit_mae_training_checkpoint_reports_decoder_unused(tmp_path):
    """MAE: {"model": encoder + decoder_* + mask_token, "args": Namespace, "epoch": ...}."""
    reference = TorchViT(seed=1)
    state = timm_state(reference)
    decoder = {"mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.zeros(32, 64),
               "decoder_pos_embed": torch.zeros(1, 17, 32), "decoder_blocks.0.norm1.weight": torch.ones(32),
               "decoder_norm.weight": torch.ones(32), "decoder_pred.weight": torch.zeros(48, 32)}
    checkpoint = {"model": {**state, **decoder}, "optimizer": {"state": {}}, "epoch": 799,
                  "args": argparse.Namespace(model="mae_vit_tiny", mask_ratio=0.75), "scaler": {}}
    path = save(checkpoint, tmp_path / "checkpoint-799.pth")
    with pytest.warns(UserWarning, match="6 checkpoint keys were not loaded"):
        encoder, report = convert_checkpoint(path, "vit_tiny", return_report=True, **VIT)
    assert report.unused == sorted(decoder)
    x = images(2, seed=1)
    np.testing.assert_allclose(to_numpy(encoder(x)), reference(x), atol=ATOL)


def test_vit_mfm_checkpoint_with_encoder_prefix_and_beit_layout(tmp_path):
    """MFM / SimMIM: "encoder." keys (q_bias, v_bias, gamma_1/2), "decoder." keys unused, DDP's "module."."""
    reference = TorchViT(beit=True, seed=2)
    state = {f"module.encoder.{key}": value for key, value in timm_state(reference).items()}
    state.update({"module.decoder.0.weight": torch.zeros(48, 64, 1, 1), "module.decoder.0.bias": torch.zeros(48)})
    path = save({"model": state, "epoch": 299}, tmp_path / "mfm.pth")
    with pytest.warns(UserWarning, match="not loaded"):
        encoder, report = convert_checkpoint(path, "vit_tiny", return_report=True, **VIT)
    assert report.unused == ["module.decoder.0.bias", "module.decoder.0.weight"]
    assert "module.encoder.blocks.0.gamma_1" in report.loaded
    assert "module.encoder.blocks.1.attn.v_bias" in report.loaded
    assert any("layer scale" in note for note in report.notes) and any("q_bias" in note for note in report.notes)
    x = images(2, seed=2)
    difference = np.abs(to_numpy(encoder(x)) - reference(x)).max()
    print(f"\nViT (MFM layout) max abs difference ({BACKEND}): {difference:.2e}")
    assert difference < ATOL


def test_vit_position_embedding_interpolation_matches_pytorch(tmp_path):
    reference = TorchViT(seed=3)
    state = timm_state(reference)
    with pytest.raises(ConversionError, match="4x4 patch grid.*8x8.*--interpolate-position-embedding"):
        convert_checkpoint(state, "vit_tiny", **dict(VIT, image_size=32))
    encoder, report = convert_checkpoint(state, "vit_tiny", interpolate_position_embedding=True,
                                         return_report=True, **dict(VIT, image_size=32))
    assert "pos_embed resampled bicubically from 4x4 to 8x8" in report.notes
    # PyTorch's own resampling (MAE's interpolate_pos_embed), in a 32x32 reference
    grid = reference.pos_embed[:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    grid = nn.functional.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False)
    table = torch.cat([reference.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 64, 64)], dim=1)
    np.testing.assert_allclose(resample_position_embedding(reference.pos_embed.detach().numpy(), (8, 8)),
                               table.detach().numpy(), atol=1e-12)
    large = TorchViT(**dict(VIT, image_size=32), seed=3)
    large.load_state_dict({**reference.state_dict(), "pos_embed": table})
    x = images(2, size=32)
    np.testing.assert_allclose(to_numpy(encoder(x)), large(x), atol=ATOL)


def test_vit_pos_embed_without_cls_slot_and_sincos_encoder():
    reference = TorchViT(seed=4)
    state = timm_state(reference)
    state["pos_embed"] = state["pos_embed"][:, 1:]  # timm's no_embed_class: [CLS] gets no position
    encoder = convert_checkpoint(state, "vit_tiny", position_embedding="sincos", **VIT)
    with torch.no_grad():
        reference.pos_embed[:, :1] = 0
    x = images(2)
    np.testing.assert_allclose(to_numpy(encoder(x)), reference(x), atol=ATOL)
    assert not encoder.position_embedding.trainable


def test_converted_encoder_round_trips_through_keras_file(tmp_path):
    reference = TorchViT(seed=5)
    encoder = convert_checkpoint(timm_state(reference), "vit_tiny", **VIT)
    path = str(tmp_path / "encoder.keras")
    encoder.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, backbones.ViTBackbone) and loaded.get_config() == encoder.get_config()
    x = images(2)
    np.testing.assert_allclose(to_numpy(loaded(x)), reference(x), atol=ATOL)


@pytest.mark.slow_on("jax", "tensorflow")  # end to end: XLA / graph tracing make it 2-8x the PyTorch time
def test_command_line_end_to_end(tmp_path):
    reference = TorchViT(seed=6)
    checkpoint = save({"model": timm_state(reference)}, tmp_path / "vit.pth")
    output = str(tmp_path / "out" / "encoder.keras")
    result = run_python(
        ["-m", "keras_mfm.convert", checkpoint, "--backbone", "vit_tiny", "--image-size", "16", "--patch-size", "4",
         "--hidden-dim", "64", "--depth", "2", "--num-heads", "2", "--output", output, "--backend", BACKEND],
        BACKEND,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"converted {checkpoint} (vit: 30 tensors loaded) to {output}" in result.stdout
    encoder = keras.saving.load_model(output)
    x = images(2, seed=6)
    np.testing.assert_allclose(to_numpy(encoder(x)), reference(x), atol=ATOL)


def test_command_line_errors_are_one_line(tmp_path, capsys):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(b"PK\x03\x04 not a whole zip archive")
    cases = [
        ([str(truncated)], f"Cannot read the checkpoint file {truncated}"),
        ([str(tmp_path / "nothing.pth")], "No checkpoint file at"),
        ([str(truncated), "--output", "encoder.h5"], "must be a .keras file"),
    ]
    for arguments, message in cases:
        if "--output" not in arguments:
            arguments = arguments + ["--output", str(tmp_path / "e.keras")]
        assert main(arguments + ["--backbone", "vit_tiny"]) == 2
        error = capsys.readouterr().err
        assert error.startswith("convert: error: ") and message in error and error.count("\n") == 1, error
    assert not (tmp_path / "e.keras").exists()


# -- bad input --------------------------------------------------------------------------------------
def resnet_like_state():
    """A few torchvision ResNet keys (enough to be recognised; shapes do not matter here)."""
    return {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.ones(64),
            "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1), "fc.weight": torch.zeros(1000, 2048)}


def test_wrong_architecture_depth_and_shapes():
    state = timm_state(TorchViT())
    with pytest.raises(ConversionError, match=r"holds a ResNet .*but the encoder is a ViTBackbone"):
        convert_checkpoint(resnet_like_state(), "vit_tiny", **VIT)
    with pytest.raises(ConversionError, match="no known architecture"):
        convert_checkpoint({"weight": torch.zeros(3)}, "vit_tiny", **VIT)
    with pytest.raises(ConversionError, match=r"2 transformer blocks, the encoder 1.*--depth 2"):
        convert_checkpoint(state, "vit_tiny", **dict(VIT, depth=1))
    with pytest.raises(ConversionError, match=r"cls_token: checkpoint \(1, 1, 64\), encoder \(1, 1, 32\)"):
        convert_checkpoint(state, "vit_tiny", **dict(VIT, hidden_dim=32))
    with pytest.raises(ConversionError, match=r"patch_embed.proj.weight: checkpoint \(64, 3, 4, 4\), "
                                              r"encoder \(64, 3, 8, 8\).*patch size"):
        convert_checkpoint(state, "vit_tiny", **dict(VIT, patch_size=8))
    with pytest.raises(ConversionError, match="not a state dict"):
        convert_checkpoint({"epoch": 3, "model": "nothing"}, "vit_tiny", **VIT)
    # presets are checked before the (large) encoder is built
    with pytest.raises(ConversionError, match=r"holds a ViT .*but the encoder is a ResNetBackbone"):
        convert_checkpoint(state, "resnet50_v1_5", image_size=32)
    with pytest.raises(ConversionError, match=r"Keras' ResNet-50 v1 .*--backbone resnet50 "):
        convert_checkpoint(resnet_like_state(), "resnet50_v1", image_size=32)
    with pytest.raises(ConversionError, match=r"Swin Transformer"):
        convert_checkpoint({"layers.0.blocks.0.norm1.weight": torch.ones(4)}, "vit_tiny", **VIT)


def test_missing_and_unsupported_keys():
    state = timm_state(TorchViT())
    partial = {k: v for k, v in state.items() if k not in ("norm.weight", "blocks.1.mlp.fc2.bias")}
    with pytest.raises(ConversionError, match=r"lacks 2 weights.*blocks.1.mlp.fc2.bias, norm.weight"):
        convert_checkpoint(partial, "vit_tiny", **VIT)
    encoder = backbones.ViTBackbone(**VIT)
    with pytest.warns(UserWarning, match="keep their initial values"):
        report = load_torch_state_dict(encoder, partial, strict=False)
    assert report.missing == ["blocks.1.mlp.fc2.bias", "norm.weight"]
    with pytest.raises(ConversionError, match=r"no place for.*blocks.0.attn.q_norm.weight"):
        convert_checkpoint({**state, "blocks.0.attn.q_norm.weight": torch.ones(32)}, "vit_tiny", **VIT)
    with pytest.raises(ConversionError, match="qkv_bias=True"):
        convert_checkpoint(state, "vit_tiny", qkv_bias=False, **VIT)
    no_bias = {k: v for k, v in state.items() if not k.endswith("qkv.bias")}
    with pytest.raises(ConversionError, match="--no-qkv-bias"):
        convert_checkpoint(no_bias, "vit_tiny", **VIT)
    with pytest.raises(ConversionError, match="register tokens"):
        convert_checkpoint({**state, "reg_token": torch.zeros(1, 4, 64)}, "vit_tiny", **VIT)
    broken = dict(state)
    broken["blocks.1.attn.proj.weight"] = state["blocks.1.attn.proj.weight"].clone()
    broken["blocks.1.attn.proj.weight"][0, 0] = float("nan")
    encoder = backbones.ViTBackbone(**VIT)
    before = encoder.get_weights()
    with pytest.raises(ConversionError, match=r"NaN or infinite values in 1 weights \(blocks.1.attn.proj.weight\)"):
        load_torch_state_dict(encoder, broken)
    assert all(np.array_equal(a, b) for a, b in zip(before, encoder.get_weights()))  # nothing assigned


class Config(dict):
    """Like yacs' CfgNode: a dict subclass, which torch.load(weights_only=True) cannot rebuild."""


def test_vit_safetensors_file_features_match(tmp_path):
    """timm / Hugging Face ship `.safetensors`: the same weights as the .pth give the same encoder."""
    from safetensors.torch import save_file

    reference = TorchViT(seed=4)
    path = str(tmp_path / "model.safetensors")
    save_file({key: value.contiguous() for key, value in timm_state(reference).items()}, path)
    encoder, report = convert_checkpoint(path, "vit_tiny", return_report=True, **VIT)
    x = images(2, seed=4)
    assert np.abs(to_numpy(encoder(x)) - reference(x)).max() < ATOL
    assert report.unused == [] and report.missing == [] and report.source == path
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(open(path, "rb").read()[:100])
    with pytest.raises(ConversionError, match=f"Cannot read the safetensors file {broken}: it is corrupt"):
        convert_checkpoint(str(broken), "vit_tiny", **VIT)


def test_vit_mfm_release_with_a_yacs_config_is_read_without_running_it(tmp_path, monkeypatch):
    import sys
    import types

    yacs, yacs_config = types.ModuleType("yacs"), types.ModuleType("yacs.config")

    class Node(dict):  # pickled as yacs.config.CfgNode: NEWOBJ, SETITEMS, BUILD of its flags
        def __init__(self, values=None):
            super().__init__({k: Node(v) if isinstance(v, dict) else v for k, v in (values or {}).items()})
            self.__dict__["__immutable__"] = False

    Node.__module__, Node.__qualname__, Node.__name__ = "yacs.config", "CfgNode", "CfgNode"
    yacs_config.CfgNode = Node
    monkeypatch.setitem(sys.modules, "yacs", yacs)
    monkeypatch.setitem(sys.modules, "yacs.config", yacs_config)
    reference = TorchViT(seed=5)
    config = Node({"MODEL": {"TYPE": "vit", "VIT": {"DEPTH": 2}}, "TRAIN": {"EPOCHS": 300}})
    state = {f"encoder.{key}": value for key, value in timm_state(reference).items()}
    path = save({"model": state, "config": config, "epoch": 299, "max_accuracy": 0.0}, tmp_path / "mfm_release.pth")
    monkeypatch.delitem(sys.modules, "yacs.config")  # yacs is not installed where we read it
    monkeypatch.delitem(sys.modules, "yacs")

    checkpoint = read_checkpoint(path)
    assert type(checkpoint["config"]).__name__ == "OrderedDict"  # an inert dict, not yacs' class
    assert checkpoint["config"]["TRAIN"]["EPOCHS"] == 300 and checkpoint["epoch"] == 299
    encoder = convert_checkpoint(path, "vit_tiny", **VIT)
    x = images(2, seed=5)
    assert np.abs(to_numpy(encoder(x)) - reference(x)).max() < ATOL


def test_unreadable_files(tmp_path):
    state = timm_state(TorchViT())
    path = save({"model": state}, tmp_path / "whole.pth")
    data = open(path, "rb").read()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match=f"Cannot read the checkpoint file {truncated}: .*truncated") as error:
        convert_checkpoint(str(truncated), "vit_tiny", **VIT)
    assert "\n" not in str(error.value)
    with pytest.raises(ConversionError, match="No checkpoint file at"):
        convert_checkpoint(str(tmp_path / "missing.pth"), "vit_tiny", **VIT)
    configured = save({"model": state, "config": Config(lr=1e-3)}, tmp_path / "configured.pth")
    with pytest.raises(ConversionError, match=r"pickles Python objects \(tests.test_convert.Config\).*torch.save"):
        convert_checkpoint(configured, "vit_tiny", **VIT)


# -- ResNet-50 --------------------------------------------------------------------------------------
def test_resnet50_v1_5_features_match(tmp_path):
    """torchvision / MFM ResNet-50 (v1.5) -> ResNetBackbone(variant="v1.5"), 64x64 images."""
    reference = TorchResNet50()
    x = images(2, size=64, seed=7)
    reference.randomise_batch_norm(images(4, size=64, seed=8))
    state = {f"module.{key}": value.float() for key, value in reference.state_dict().items()}
    path = save({"state_dict": state}, tmp_path / "resnet50.pth")
    with pytest.warns(UserWarning, match="2 checkpoint keys were not loaded"):
        encoder, report = convert_checkpoint(path, "resnet50_v1_5", image_size=64, return_report=True)
    assert report.unused == ["module.fc.bias", "module.fc.weight"]
    assert len(report.loaded) == 53 + 53 * 4  # convolutions, BatchNorms (num_batches_tracked ignored)
    with torch.no_grad():
        want = reference(x).numpy().transpose(0, 2, 3, 1)
        # PyTorch's own float32 error on the same weights: what float32 rounding costs here
        torch_float32 = np.abs(copy.deepcopy(reference).float()(x).numpy().transpose(0, 2, 3, 1) - want).max()
    got = to_numpy(encoder(x))
    scale = np.abs(want).max()
    difference = np.abs(got - want).max()
    print(f"\nResNet-50 max abs difference ({BACKEND}): {difference:.2e} (features up to {scale:.2f}; "
          f"PyTorch float32: {torch_float32:.2e})")
    assert got.shape == want.shape == (2, 2, 2, 2048)
    # 50 float32 convolutions: an absolute 1e-4 of the feature scale (PyTorch's float32 is as far)
    assert difference < ATOL * scale
    pooled = to_numpy(encoder.pooled_features(got))
    np.testing.assert_allclose(pooled, want.mean(axis=(1, 2)), atol=ATOL * np.abs(pooled).max())
    # a ViT checkpoint is refused by the ResNet, and so is ResNet-101
    with pytest.raises(ConversionError, match=r"holds a ViT .*but the encoder is a ResNetBackbone"):
        load_torch_state_dict(encoder, timm_state(TorchViT()))
    three_stages = {k: v for k, v in state.items() if not k.startswith("module.layer4.2.")}
    with pytest.raises(ConversionError, match=r"\(3, 4, 6, 2\) blocks per stage"):
        load_torch_state_dict(encoder, three_stages)


class Payload:
    """A pickle whose loading would run code: `__reduce__` asks for os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_with_code_in_it_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    path = save({"model": timm_state(TorchViT()), "hook": Payload(marker)}, tmp_path / "hostile.pth")
    with pytest.raises(ConversionError, match=r"pickles Python objects \((posix|os)\.system\)"):
        convert_checkpoint(path, "vit_tiny", **VIT)
    assert not marker.exists()  # nothing from the file ran
