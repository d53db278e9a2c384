"""Any timm or torchvision model as the backbone, by name: names, the Hugging Face hub cache (built
here, in its own layout, in a temporary HF_HOME: no test reaches a hub), stage splits, layer-wise
learning-rate decay, and the way through training, resume, predict and export.

The families are timm's small pretrained models, most made smaller still through the keyword
arguments timm.create_model passes to the architecture (depth, width, image size): registered
under their own catalogue name, so that everything else (head, normalisation, hub repository)
is the catalogue's."""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import pytest
import torch

from finetune_core import models
from finetune_core.config import TrainConfig

# family: (timm model with its pretrained tag, create_model arguments that make it tiny, input px)
FAMILIES = {
    "vit": ("test_vit.r160_in1k", dict(img_size=32), 32),
    "deit": ("deit_tiny_patch16_224.fb_in1k", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2), 32),
    "deit3": ("deit3_small_patch16_224.fb_in1k", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2),
              32),
    "dinov2": ("vit_small_patch14_dinov2.lvd142m", dict(img_size=28, embed_dim=32, depth=2, num_heads=2), 28),
    "beit": ("beitv2_base_patch16_224.in1k_ft_in1k", dict(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                                         num_heads=2), 32),
    "swin": ("swin_tiny_patch4_window7_224.ms_in1k", dict(img_size=32, window_size=4, embed_dim=16, depths=(1, 1, 1, 1),
                                                         num_heads=(1, 1, 1, 1)), 32),
    "convnext": ("test_convnext.r160_in1k", {}, 32),
    "convnextv2": ("convnextv2_atto.fcmae_ft_in1k", dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)), 32),
    "efficientnet": ("test_efficientnet.r160_in1k", {}, 32),
    "tinynet": ("tinynet_e.in1k", {}, 32),
    "mobilenetv3": ("mobilenetv3_small_050.lamb_in1k", {}, 32),
    "lcnet": ("lcnet_050.ra2_in1k", {}, 32),
    "regnet": ("regnetx_002.pycls_in1k", {}, 32),
    "resnet": ("test_resnet.r160_in1k", {}, 32),
    "byobnet": ("test_byobnet.r160_in1k", {}, 32),
    "nfnet": ("test_nfnet.r160_in1k", {}, 32),
    "edgenext": ("edgenext_xx_small.in1k", {}, 32),
    "rexnet": ("rexnet_100.nav_in1k", dict(width_mult=0.5), 32),
    "ghostnet": ("ghostnet_100.in1k", {}, 32),
    "hgnetv2": ("hgnetv2_b0.ssld_stage2_ft_in1k", {}, 32),
}

# exported in the fast suite: one of each way a model is built (attention, a ConvNeXt, an EfficientNet)
EXPORTED_FAMILIES = ("vit", "convnext", "efficientnet")
# the family whose trained run the command line also exports and predicts from: the bundle's path
# (model.json, model.pt2, predict --run BUNDLE) is the same for every family, and each family's
# torch.export is proven above; an export costs 5-7 s of CPU a family, the training before it 2 s
BUNDLED_FAMILY = "vit"


@pytest.fixture
def catalogue(monkeypatch):
    """register(family) -> the catalogue name, now built tiny; what models remembers of backbones
    is forgotten before and after, so no other test sees the tiny builds."""
    import timm

    def register(family: str) -> str:
        name, kwargs, size = FAMILIES[family]
        spec = models.backbone_spec(name)
        tiny = dataclasses.replace(spec, build=functools.partial(timm.create_model, spec.model_name, pretrained=False,
                                                                 num_classes=1000, **kwargs), native_size=size)
        monkeypatch.setitem(models.BACKBONES, name, tiny)
        models.forget_backbones()
        return name

    models.forget_backbones()
    yield register
    models.forget_backbones()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache in a temporary HF_HOME, with HF_HUB_OFFLINE=1, and any
    download made to fail the test."""
    import huggingface_hub

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("a download was tried"))
    return tmp_path / "hf" / "hub"


def put_in_hub(hub: Path, name: str, state: dict) -> Path:
    """A state_dict where huggingface_hub caches timm/NAME: refs/main names a revision whose
    snapshot holds model.safetensors."""
    from safetensors.torch import save_file

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / f"models--timm--{name}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    path = repo / "snapshots" / revision / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def pretrained_like(name: str) -> dict:
    """What the hub would hold for this (tiny) model: its own state_dict, with a 1000-class head."""
    with models.seeded_init(1):
        return models.backbone_spec(name).build().state_dict()


# --------------------------------------------------------------------------------------------
# Names


def test_a_backbone_is_any_timm_or_torchvision_name_and_an_unknown_one_is_refused_with_close_matches():
    assert models.backbone_spec("convnext_tiny") is models.BACKBONES["convnext_tiny"]  # the nine stay as they were
    tagged = models.backbone_spec("convnext_tiny.fb_in22k_ft_in1k")
    assert (tagged.source, tagged.head, tagged.hf_hub_id) == ("timm", "head.fc", "timm/convnext_tiny.fb_in22k_ft_in1k")
    assert (tagged.mean, tagged.interpolation, tagged.native_size) == ((0.485, 0.456, 0.406), "bicubic", 224)
    bare = models.backbone_spec("timm/convnext_atto")  # timm's default tag; "timm/" where torchvision has the name
    assert bare.model_name.startswith("convnext_atto.") and bare.model_name in models.timm_pretrained_names()
    tv = models.backbone_spec("regnet_y_400mf")
    assert (tv.source, tv.head, tv.torchvision_weights) == ("torchvision", "fc", "RegNet_Y_400MF_Weights.IMAGENET1K_V2")
    dino = models.backbone_spec("vit_small_patch14_dinov2.lvd142m")
    assert dino.mean == (0.485, 0.456, 0.406) and dino.native_size == 518  # its pretrained config's, not 224

    problem = TrainConfig(data="d", backbone="convnxt_tiny.fb_in22k").validate()["backbone"]
    assert "unknown backbone 'convnxt_tiny.fb_in22k'" in problem and "convnext_tiny.fb_in22k" in problem
    with pytest.raises(models.UnknownBackbone, match="2 classification heads"):
        models.backbone_spec("deit_tiny_distilled_patch16_224.fb_in1k")
    assert TrainConfig(data="d", backbone="convnext_tiny.fb_in22k_ft_in1k").validate() == {}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_builds_splits_into_stages_trains_a_step_and_exports(catalogue, family):
    """Each split computes the model's own output from the model's own parameters, each once; one
    SGD step on the last stage (with layer decay) moves only what trains; torch.export gives the
    same logits (EXPORTED_FAMILIES here, the others in the slow test_every_other_family_exports)."""
    name = catalogue(family)
    size = FAMILIES[family][2]
    torch.manual_seed(0)
    model = models.build_model(name, 3, "none").eval()
    head = models.get_head(model, name)
    assert head.out_features == 3
    stages = models.stage_names(name)
    assert stages, f"{family}: no stage split"
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
        for train_stages in ("head", "1", str(len(stages))):
            bottom, top = models.split_model(model, name, train_stages)
            bottom.eval(), top.eval()
            assert torch.allclose(top(bottom(x)), expected, rtol=0, atol=1e-5), train_stages
            ids = sorted([id(p) for p in bottom.parameters()] + [id(p) for p in top.parameters()])
            assert ids == sorted(id(p) for p in model.parameters()), train_stages

    groups = models.parameter_groups(model, name, lr=0.1, train_stages=str(min(2, len(stages))), layer_decay=0.5)
    assert groups[-1]["name"] == "head" and groups[-1]["lr"] == pytest.approx(1.0)
    bottom, top = models.split_model(model, name, "1")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    top.train()
    loss = torch.nn.functional.cross_entropy(top(bottom(x)), torch.tensor([0, 1]))
    loss.backward()
    torch.optim.SGD(groups, lr=0.1).step()
    trained = {id(p) for g in groups for p in g["params"]}
    changed = {id(p) for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trained and {id(p) for p in head.parameters()} <= changed

    if family in EXPORTED_FAMILIES:
        program = torch.export.export(model.eval(), (x,))
        with torch.no_grad():
            assert torch.allclose(program.module()(x), model(x), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in EXPORTED_FAMILIES])
def test_every_other_family_exports(catalogue, family):
    """torch.export gives the model's own logits (the fast suite exports EXPORTED_FAMILIES only:
    an export takes about 2 s a family)."""
    name = catalogue(family)
    size = FAMILIES[family][2]
    model = models.build_model(name, 3, "none").eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        assert torch.allclose(program.module()(x), model(x), atol=1e-5)


def test_a_model_whose_stages_take_more_than_one_input_trains_head_or_all(catalogue, monkeypatch):
    """EVA-02's blocks take rotary embeddings besides the tokens: a cut between them would drop
    them, so its only splits are "head" and "all" (found by checking the split, not by a list)."""
    import timm

    spec = models.backbone_spec("eva02_tiny_patch14_224.mim_in22k")
    monkeypatch.setitem(models.BACKBONES, spec.name, dataclasses.replace(spec, native_size=28, build=functools.partial(
        timm.create_model, spec.model_name, num_classes=1000, img_size=28, embed_dim=32, depth=2, num_heads=2)))
    models.forget_backbones()
    assert models.train_stages_choices(spec.name) == ["head", "all"]
    assert f"Trainable part must be head or all: {spec.name} trains only its head or all its layers" in \
        TrainConfig(data="d", backbone=spec.name, train_stages="1").validate()["train_stages"]


def test_layer_decay_sets_each_earlier_stage_at_lr_times_decay_to_its_depth():
    model = models.build_model("resnet18", 2, "none")
    groups = models.parameter_groups(model, "resnet18", lr=1.0, head_lr_mult=10, layer_decay=0.5)
    by_name = {g["name"]: g for g in groups}
    assert [g["name"] for g in groups] == ["backbone-d4", "backbone-d3", "backbone-d2", "backbone-d1", "backbone", "head"]
    assert [by_name[f"backbone-d{d}"]["lr"] for d in (4, 3, 2, 1)] == [0.0625, 0.125, 0.25, 0.5]
    assert by_name["backbone"]["lr"] == 1.0 and by_name["head"]["lr"] == 10.0
    assert {id(p) for p in by_name["backbone-d4"]["params"]} == {id(p) for m in (model.conv1, model.bn1)
                                                                 for p in m.parameters()}  # the stem
    assert {id(p) for p in by_name["backbone"]["params"]} == {id(p) for p in model.layer4.parameters()}
    assert {id(p) for p in by_name["backbone-d1"]["params"]} == {id(p) for p in model.layer3.parameters()}
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in model.parameters())
    off = models.parameter_groups(model, "resnet18", lr=1.0, layer_decay=1.0)
    assert [g["name"] for g in off] == ["backbone", "head"]  # off by default: the book's two groups
    assert TrainConfig().layer_decay == 1.0


# --------------------------------------------------------------------------------------------
# Weights from the hub cache, offline


def test_cached_hub_weights_load_offline_and_the_home_page_lists_them(catalogue, hub):
    name = catalogue("convnext")
    state = pretrained_like(name)
    put_in_hub(hub, name, state)
    assert models.weights_problem(name, "auto") is None
    assert name in models.offline_backbones()
    model = models.build_model(name, 2, "auto")
    assert torch.equal(model.stem[0].weight, state["stem.0.weight"])
    assert models.get_head(model, name).out_features == 2


def test_a_truncated_cached_file_and_a_failed_offline_download_are_refused_by_name_before_a_run_folder(
        catalogue, hub, tiny_dataset, tmp_path, monkeypatch, capsys):
    from finetune_core.__main__ import main

    monkeypatch.setenv("TUNEBOARD_RUNS_DIR", str(tmp_path / "runs"))
    name = catalogue("convnext")

    def train_refusal() -> str:
        assert main(["train", "--data", str(tiny_dataset), "--backbone", name, "--image-size", "32"]) == 2
        assert not (tmp_path / "runs").exists()
        return capsys.readouterr().err

    err = train_refusal()  # not in the cache, and offline
    assert f"The ImageNet weights of {name} (timm/{name}) are not in the Hugging Face hub cache" in err
    assert "HF_HUB_OFFLINE is set" in err and f"hf download timm/{name} model.safetensors" in err
    path = put_in_hub(hub, name, pretrained_like(name))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a download cut short
    err = train_refusal()
    assert f"{path}: a damaged weights file" in err and "delete it and fetch it again" in err
    with pytest.raises(models.WeightsError, match="cannot be loaded as weights"):
        models.build_model(name, 2, "auto")


# --------------------------------------------------------------------------------------------
# Through the command line: train (partial, then all layers), resume, predict, export


@pytest.mark.slow
@pytest.mark.parametrize("family", ["vit", "convnext", "efficientnet", "regnet"])
def test_a_cached_timm_model_trains_resumes_predicts_and_exports(catalogue, hub, tiny_dataset, tmp_path, capsys,
                                                                  family):
    """Train the last stage, then every layer (stopped, resumed by the command line), predict;
    BUNDLED_FAMILY's run is also exported and predicts from its bundle."""
    import threading

    from finetune_core.__main__ import main
    from finetune_core.engine import train
    from finetune_core.runs import RunDir

    name = catalogue(family)
    put_in_hub(hub, name, pretrained_like(name))
    size = str(FAMILIES[family][2])
    common = ["--data", str(tiny_dataset), "--backbone", name, "--image-size", size, "--batch-size", "8",
              "--lr", "0.01", "--loss-reduction", "mean", "--device", "cpu", "--quiet", "--json",
              "--runs-dir", str(tmp_path / "runs")]
    assert main(["train", *common, "--train-stages", "1", "--epochs", "1", "--layer-decay", "0.7"]) == 0, \
        capsys.readouterr().err
    partial = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    record = RunDir(partial["run_dir"]).read_config()
    assert record["backbone"]["model"] == name and record["backbone"]["interpolation"] == "bicubic"
    assert record["normalisation"]["mean"] == list(models.backbone_spec(name).mean)

    stop = threading.Event()  # all layers, stopped after its first epoch, then resumed by the command line
    config = TrainConfig(data=str(tiny_dataset), backbone=name, image_size=int(size), batch_size=8, lr=0.01,
                         loss_reduction="mean", device="cpu", epochs=2)
    train(config, tmp_path / "full", cache_dir="", stop_event=stop, on_event=lambda e: e["kind"] == "epoch" and stop.set())
    assert RunDir(tmp_path / "full").read_status()["state"] == "stopped"
    assert main(["resume", str(tmp_path / "full"), "--quiet"]) == 0, capsys.readouterr().err
    assert RunDir(tmp_path / "full").read_status()["state"] == "completed"
    capsys.readouterr()

    image = next((tiny_dataset / "test" / "cat").iterdir())
    assert main(["predict", "--run", str(tmp_path / "full"), str(image), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top"][0]["class"] in ("cat", "dog")
    if family != BUNDLED_FAMILY:
        return
    assert main(["export", "--run", str(tmp_path / "full"), "--out", str(tmp_path / "bundle")]) == 0
    meta = json.loads((tmp_path / "bundle" / "model.json").read_text())
    assert meta["backbone"] == name and (tmp_path / "bundle" / "model.pt2").is_file()
    assert (tmp_path / "bundle" / "model.onnx").is_file() or meta["onnx_error"].startswith("model.onnx could not")
    assert main(["predict", "--run", str(tmp_path / "bundle"), str(image), "--json"]) == 0


# --------------------------------------------------------------------------------------------
# The Train page's picker


def test_the_train_page_takes_any_model_by_name_and_names_an_unknown_one(dashboard_env, tmp_path, monkeypatch):
    """A searchable list that holds every timm and torchvision name after the common ones, the
    chosen model's size and resolution under it, and a box to type any name: a misspelt one is
    refused next to the field with close matches."""
    from conftest import page

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    at = page("pages/1_Train.py").run()
    assert not at.exception
    options = at.selectbox(key="f_backbone").options
    assert options.index("resnet18 (weights need a download)") < options.index(
        "convnext_tiny.fb_in22k_ft_in1k (weights need a download)") < options.index(
        "vit_base_patch16_clip_224.openai_ft_in1k (weights need a download)")
    assert "regnet_y_400mf (weights need a download)" in options
    labels = [w.label for w in at.text_input]  # layer decay drawn right after the multiplier
    assert labels.index("Layer-wise learning-rate decay") == labels.index("Head learning-rate multiplier") + 1
    at.text_input(key="f_backbone_typed").set_value("test_vit.r160_in1k").run()
    assert at.selectbox(key="f_backbone").value == "test_vit.r160_in1k"
    assert any("160 px, bicubic; weights not on this machine" in c.value for c in at.caption)
    at.text_input(key="f_backbone_typed").set_value("convnxt_tiny").run()
    errors = [e.value.replace("\\", "") for e in at.error]  # markdown escapes the underscores
    assert any("unknown backbone 'convnxt_tiny'; did you mean convnext_tiny" in e for e in errors), errors
    assert at.button(key="train_button").disabled


def test_layer_decay_is_shown_inactive_where_no_stage_below_the_last_trains():
    from finetune_core.config import inactive_settings

    assert "no pretrained layer to decay" in inactive_settings(TrainConfig(train_stages="head"))["layer_decay"]
    assert "nothing below it to decay" in inactive_settings(TrainConfig(train_stages="1"))["layer_decay"]
    assert "layer_decay" not in inactive_settings(TrainConfig(train_stages="2"))


def test_a_download_is_made_through_huggingface_hub_before_the_run_folder_and_a_failed_one_is_refused(
        catalogue, hub, tiny_dataset, tmp_path, monkeypatch, capsys):
    """Online (HF_HUB_OFFLINE unset) the command line fetches a timm model's weights into the hub
    cache before it writes anything; a download that fails is refused naming the model, the error
    and how to fetch them, with no run folder. The hub itself is never reached: huggingface_hub's
    download is replaced."""
    import huggingface_hub

    from finetune_core.__main__ import main

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("TUNEBOARD_RUNS_DIR", str(tmp_path / "runs"))
    name = catalogue("convnext")
    calls = []

    def no_network(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        raise OSError("Network is unreachable")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    assert main(["train", "--data", str(tiny_dataset), "--backbone", name, "--image-size", "32"]) == 2
    err = capsys.readouterr().err
    assert f"The ImageNet weights of {name} (timm/{name})" in err and "OSError: Network is unreachable" in err
    assert f"hf download timm/{name}" in err and not (tmp_path / "runs").exists()
    assert calls == [(f"timm/{name}", "model.safetensors", {"cache_dir": str(hub), "etag_timeout": 10.0})]

    state = pretrained_like(name)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename, **kw: str(
        put_in_hub(hub, repo_id.split("/", 1)[1], state)))  # as a download would leave it
    models.fetch_weights(name, "auto")
    assert models.hub_cached_file(models.backbone_spec(name)) is not None  # no second download from here on
    assert torch.equal(models.build_model(name, 2, "auto").stem[0].weight, state["stem.0.weight"])
