"""The model zoo, the Classifier directory format, input adaptation and user models given as code."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from synthkd.errors import SynthkdError
from synthkd.models import (
    MODELS, Classifier, InputFormat, ModelConfig, create_model, is_registered, list_models, load_model, register_model,
    trusting_code, unwrap,
)

ZOO = ["resnet8", "resnet14", "resnet20", "resnet32", "resnet56", "resnet18", "resnet34"]


def test_zoo_lists_every_architecture():
    assert list_models() == MODELS.names()
    assert set(ZOO) <= set(list_models())
    assert all(is_registered(name) for name in list_models())
    assert not is_registered("resnet9")
    assert "neighbourhood-chain" in MODELS and "neighbourhood-chain" not in list_models()  # saved models name it


def test_a_registered_architecture_joins_the_zoo():
    @register_model("test-tiny")
    def tiny(width: float = 1.0, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    try:
        assert "test-tiny" in list_models() and create_model("test-tiny", num_classes=4)(torch.zeros(2, 1, 4, 4)).shape == (2, 4)
        with pytest.raises(SynthkdError, match="already registered"):
            register_model("test-tiny")(lambda **kwargs: nn.Identity())
    finally:
        MODELS.unregister("test-tiny")


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)], ids=["1x28x28", "3x32x32"])
def test_zoo_builds_and_runs(name, shape):
    torch.manual_seed(0)
    net = create_model(name, width=0.5, in_channels=shape[0], num_classes=7).eval()
    with torch.no_grad():
        logits = net(torch.rand(3, *shape))
    assert logits.shape == (3, 7)
    assert torch.isfinite(logits).all()
    # width 0.5 really halves the channels of the first stage (16 or 64 at width 1)
    assert net.stem[0].out_channels in (8, 32)
    assert net.stem[0].in_channels == shape[0]


def test_width_scales_parameters():
    small = sum(p.numel() for p in create_model("resnet20", width=0.5).parameters())
    large = sum(p.numel() for p in create_model("resnet20", width=1.0).parameters())
    assert 3.0 < large / small < 4.5  # conv weights scale with width^2


def test_unknown_architecture_names_the_zoo():
    with pytest.raises(SynthkdError) as info:
        create_model("resnet9")
    message = str(info.value)
    assert "resnet9" in message
    for name in ZOO:
        assert name in message
    # The same through a model config (what train-teacher and from_pretrained use).
    config = ModelConfig(arch="resnet9", input=InputFormat(1, 8, 8), class_names=["a", "b"])
    with pytest.raises(SynthkdError, match="resnet8"):
        Classifier.from_config(config)


def _classifier(arch="resnet8", width=0.5, shape=(1, 8, 8), classes=10, seed=0) -> Classifier:
    torch.manual_seed(seed)
    config = ModelConfig(
        arch=arch,
        arch_kwargs={"width": width, "in_channels": shape[0], "num_classes": classes},
        input=InputFormat(*shape, mean=(0.3,), std=(0.2,)),
        class_names=[f"c{i}" for i in range(classes)],
    )
    model = Classifier.from_config(config)
    # Non-default BatchNorm buffers, so a round trip that dropped them would change the outputs.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_save_and_load_round_trip(tmp_path):
    model = _classifier()
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["arch"] == "resnet8" and config["input_shape"] == [1, 8, 8]
    assert config["mean"] == [0.3] and config["std"] == [0.2]

    loaded = Classifier.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.to_dict() == model.config.to_dict()
    assert loaded.num_classes == 10
    images = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    assert loaded.fingerprint() == model.fingerprint()
    # load_model of a directory is the same thing
    assert load_model(tmp_path / "m").fingerprint() == model.fingerprint()


def test_fingerprint_tracks_weights_and_config():
    model = _classifier()
    before = model.fingerprint()
    assert len(before) == 16 and before == model.fingerprint()
    with torch.no_grad():
        model.net.fc.weight[0, 0] += 1e-3
    changed = model.fingerprint()
    assert changed != before
    with torch.no_grad():
        model.net.stem[1].running_var[0] += 1.0  # buffers are part of the model too
    assert model.fingerprint() != changed
    other = _classifier()
    other.config.class_names[0] = "renamed"
    assert other.fingerprint() != before


def test_not_a_model_directory(tmp_path):
    with pytest.raises(SynthkdError, match="not a model directory"):
        Classifier.from_pretrained(tmp_path)
    model = _classifier()
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(SynthkdError, match="not a valid model config"):
        Classifier.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"arch": "resnet8", "input_shape": [1, 8, 8], "x": 1}))
    with pytest.raises(SynthkdError, match="unknown keys"):
        Classifier.from_pretrained(tmp_path / "m")
    with pytest.raises(SynthkdError, match="drop --weights"):
        load_model(tmp_path / "m", weights=tmp_path / "w.safetensors")


def test_input_format_resizes_and_converts_channels():
    images = torch.rand(4, 1, 8, 8)
    rgb = InputFormat(3, 28, 28)
    out = rgb.adapt(images)
    assert out.shape == (4, 3, 28, 28)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    assert out.min() >= 0 and out.max() <= 1
    # Upsampling keeps the image: a constant image stays that constant.
    constant = torch.full((2, 1, 8, 8), 0.25)
    assert torch.allclose(InputFormat(1, 28, 28).adapt(constant), torch.full((2, 1, 28, 28), 0.25))

    gray = InputFormat(1, 8, 8)
    red = torch.zeros(2, 3, 8, 8)
    red[:, 0] = 1.0
    assert gray.adapt(red).shape == (2, 1, 8, 8)
    assert torch.allclose(gray.adapt(red), torch.full((2, 1, 8, 8), 0.299))
    white = torch.ones(1, 3, 32, 32)
    assert torch.allclose(InputFormat(1, 28, 28).adapt(white), torch.ones(1, 1, 28, 28), atol=1e-5)
    # matching input is returned as is
    assert gray.adapt(images) is images
    with pytest.raises(SynthkdError, match="2-channel"):
        gray.adapt(torch.rand(1, 2, 8, 8))


def test_input_format_normalises_and_validates():
    fmt = InputFormat(3, 4, 4, mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.25))
    out = fmt.normalize(torch.ones(1, 3, 4, 4))
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([1.8, 1.6, 2.8]))
    with pytest.raises(SynthkdError, match="mean has 2 values"):
        InputFormat(3, 4, 4, mean=(0.1, 0.2))
    with pytest.raises(SynthkdError, match="std must be positive"):
        InputFormat(1, 4, 4, std=(0.0,))


def test_classifier_accepts_any_size_and_channels():
    model = _classifier(shape=(1, 8, 8))
    big_rgb = torch.rand(3, 3, 28, 28)
    with torch.no_grad():
        expected = model.net(model.input_format.normalize(model.input_format.adapt(big_rgb)))
        assert torch.equal(model(big_rgb), expected)
        assert model(big_rgb).shape == (3, 10)


USER_MODEL = textwrap.dedent(
    """
    import torch
    from torch import nn

    def factory(classes=4):
        torch.manual_seed(1)
        return nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, classes),
        )

    def not_a_classifier():
        return nn.Conv2d(1, 2, 3)
    """
)


def _user_model(tmp_path):
    path = tmp_path / "user_model.py"
    path.write_text(USER_MODEL)
    torch.manual_seed(123)  # weights differ from what factory() builds by itself
    namespace: dict = {}
    exec(compile(USER_MODEL, str(path), "exec"), namespace)
    net = namespace["factory"]()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
        net[1].running_mean.uniform_(-1, 1)
    return path, net.eval()


@pytest.mark.parametrize("format", ["safetensors", "pt", "pt-wrapped"])
def test_load_user_model_from_file(tmp_path, format):
    path, net = _user_model(tmp_path)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    if format == "safetensors":
        weights = tmp_path / "w.safetensors"
        save_file(state, str(weights))
    elif format == "pt":
        weights = tmp_path / "w.pt"
        torch.save(state, weights)
    else:
        weights = tmp_path / "w.pt"
        torch.save({"state_dict": state, "epoch": 3}, weights)

    model = load_model(f"{path}:factory", weights, input_shape=(1, 8, 8), mean=(0.5,), std=(0.25,))
    assert model.num_classes == 4  # read from the output, not given anywhere
    assert model.config.class_names == ["0", "1", "2", "3"]
    assert model.input_format.shape == (1, 8, 8)
    images = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model.eval()(images), net((images - 0.5) / 0.25))

    # A model given as code can be saved and reopened as a directory, by a caller who trusts its code.
    model.save_pretrained(tmp_path / "dir")
    with pytest.raises(SynthkdError, match="names code"):
        load_model(tmp_path / "dir")
    with trusting_code():
        again = load_model(tmp_path / "dir")
    with torch.no_grad():
        assert torch.equal(again.eval()(images), model(images))


def test_user_model_errors(tmp_path):
    path, net = _user_model(tmp_path)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    with pytest.raises(SynthkdError, match="needs its weights"):
        load_model(f"{path}:factory")
    with pytest.raises(SynthkdError, match="does not exist"):
        load_model(f"{tmp_path / 'missing.py'}:factory", weights, input_shape=(1, 8, 8))
    with pytest.raises(SynthkdError, match="no callable 'nope'"):
        load_model(f"{path}:nope", weights, input_shape=(1, 8, 8))
    with pytest.raises(SynthkdError, match="cannot import module"):
        load_model("no_such_module_xyz:factory", weights, input_shape=(1, 8, 8))
    with pytest.raises(SynthkdError, match="weights file .* does not exist"):
        load_model(f"{path}:factory", tmp_path / "none.pt", input_shape=(1, 8, 8))
    with pytest.raises(SynthkdError, match="do not fit the architecture"):
        load_model("resnet8", weights, input_shape=(1, 8, 8))
    conv_weights = tmp_path / "conv.safetensors"
    save_file({k: v.contiguous() for k, v in nn.Conv2d(1, 2, 3).state_dict().items()}, str(conv_weights))
    with pytest.raises(SynthkdError, match="N x classes"):
        load_model(f"{path}:not_a_classifier", conv_weights, input_shape=(1, 8, 8))


class Payload:
    """Any non-tensor object: unpickling it would run code from this module."""

    def __init__(self):
        self.value = 1


def test_pickled_object_is_refused(tmp_path):
    path, net = _user_model(tmp_path)
    weights = tmp_path / "evil.pt"
    state = dict(net.state_dict())
    state["extra"] = Payload()
    torch.save(state, weights)
    with pytest.raises(SynthkdError, match="weights_only=True"):
        load_model(f"{path}:factory", weights, input_shape=(1, 8, 8))


def test_unwrap():
    net = nn.Linear(2, 2)

    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert unwrap(Wrapper(Wrapper(net))) is net
    assert unwrap(net) is net


def test_input_format_names_the_channel_counts_it_converts():
    assert InputFormat(1, 8, 8).convertible_channels == [1, 3]
    assert InputFormat(3, 8, 8).convertible_channels == [1, 3]
    assert InputFormat(4, 8, 8).convertible_channels == [1, 4]
    with pytest.raises(SynthkdError, match="cannot convert 2-channel images to the model's 1 channels"):
        InputFormat(1, 8, 8).adapt(torch.zeros(1, 2, 8, 8))
    with pytest.raises(SynthkdError, match="three positive integers"):
        InputFormat(1, 0, 8)
