"""Issue #7, configs: unknown keys, wrong types and out-of-range numbers in the model, dataset and
transform sections are ConfigErrors naming the key path (with a did-you-mean for unknown keys).

The checks come from the constructors' signatures (`plfusion.registry.check_values`), so they
hold for YAML files, `-o` overrides and create_model() alike.
"""
import textwrap
from typing import Optional

import pytest

import plfusion.data  # noqa: F401  (registers the datasets)
from plfusion.config import get_config
from plfusion.models import build_model, create_model
from plfusion.registry import DATASETS, ConfigError, PositiveInt, Rate, Registry, check_values

BASE = """\
model:
  name: Classifier
  architecture:
    name: vit_tiny_patch16_224
    img_size: 32
    patch_size: 8
    depth: 1
    num_classes: 0
  head:
    name: LinearClsHead
    in_channels: 192
    num_classes: 10
"""


def write(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_the_base_config_builds(tmp_path):
    # the harness: without a bad value the same config builds, so the errors below come from the value
    model = build_model(get_config(write(tmp_path, BASE)).model)
    assert model.backbone.embed_dim == 192 and model.head.num_classes == 10


@pytest.mark.parametrize("key, value, expected", [
    ("model.architecture.num_classes", "ten", "expected an int >= 0, got 'ten'"),
    ("model.architecture.num_classes", "-1", "expected an int >= 0, got -1"),
    ("model.architecture.drop_path_rate", "0.1x", "expected a number in [0, 1), got '0.1x'"),
    ("model.architecture.drop_path_rate", "1.5", "expected a number in [0, 1), got 1.5"),
    ("model.architecture.img_size", "abc", "expected a positive int or a pair [h, w] of positive ints, got 'abc'"),
    ("model.architecture.img_size", "[32, 0]", "got [32, 0]"),
    ("model.architecture.img_size", "[32, 32, 32]", "got [32, 32, 32]"),
    ("model.architecture.embed_dim", "0", "expected a positive int, got 0"),
    ("model.architecture.depth", "-2", "expected a positive int, got -2"),
    ("model.architecture.depth", "true", "expected a positive int, got True (bool)"),
    ("model.architecture.depth", "2.5", "expected a positive int, got 2.5"),
    ("model.architecture.num_heads", "'3'", "expected a positive int, got '3' (str)"),
    ("model.architecture.qkv_bias", "1", "expected a bool (true/false), got 1"),
    ("model.architecture.global_pool", "3", "expected a string, got 3"),
    ("model.architecture.mlp_ratio", "[4]", "expected a positive number, got [4]"),
    ("model.head.num_classes", "0", "expected a positive int, got 0"),
    ("model.head.in_channels", "null", "expected a positive int, got None"),
    ("model.head.dropout", "-0.1", "expected a number in [0, 1), got -0.1"),
])
def test_wrong_types_and_ranges_name_the_key_path(tmp_path, key, value, expected):
    path = write(tmp_path, BASE)
    with pytest.raises(ConfigError) as info:
        build_model(get_config(path, [f"+{key}={value}"]).model)
    message = str(info.value)
    assert message.startswith(f"{key}: ") and expected in message, message


def test_values_written_in_the_yaml_file(tmp_path):
    text = BASE.replace("    depth: 1\n", "    depth: 1\n    norm_eps: 1e-6\n")
    with pytest.raises(ConfigError, match=r"^model.architecture.norm_eps: expected a positive number, got '1e-6' "
                                          r"\(str\) .*write 1.0e-6"):
        build_model(get_config(write(tmp_path, text)).model)
    text = BASE.replace("img_size: 32", "img_size: abc")
    with pytest.raises(ConfigError, match="^model.architecture.img_size: .* got 'abc'"):
        build_model(get_config(write(tmp_path, text)).model)
    # what the type rules allow: a pair for a size, an int where a float is expected
    text = BASE.replace("img_size: 32", "img_size: [32, 48]").replace("depth: 1", "depth: 1\n    mlp_ratio: 2")
    model = build_model(get_config(write(tmp_path, text)).model)
    assert model.backbone.patch_embed.grid_size == (4, 6)
    assert model.backbone.blocks[0].mlp.fc1.weight.shape == [192, 384]


@pytest.mark.parametrize("arch, key, value, expected", [
    ({"name": "mit_b0"}, "depths", [2, 2, "x", 2], "expected a non-empty list of positive ints"),
    ({"name": "mit_b0"}, "mlp_ratios", "4444", "expected a non-empty list of positive numbers, got '4444'"),
    ({"name": "mit_b0"}, "sr_ratios", [8, 4, 2, 0], "got [8, 4, 2, 0]"),
    ({"name": "swin_tiny_patch4_window7_224"}, "window_size", 0, "expected a positive int, got 0"),
    ({"name": "swin_tiny_patch4_window7_224"}, "num_heads", [3, 6, -12, 24], "got [3, 6, -12, 24]"),
    ({"name": "mvitv2_tiny"}, "depths", [1, -1, 1, 1], "got [1, -1, 1, 1]"),
    ({"name": "mvitv2_tiny"}, "kernel_qkv", "3", "got '3'"),
    ({"name": "t2t_vit_14"}, "token_dim", 0, "expected a positive int, got 0"),
    ({"name": "t2t_vit_14"}, "tokens_type", 1, "expected a string, got 1"),
])
def test_every_backbone_family_checks_its_values(arch, key, value, expected):
    with pytest.raises(ConfigError) as info:
        build_model({"architecture": {**arch, key: value}})
    message = str(info.value)
    assert message.startswith(f"model.architecture.{key}: ") and expected in message, message


def test_constructor_errors_carry_the_key_path():
    arch = {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 1}
    with pytest.raises(ValueError, match=r"^model.architecture: Attention: dim 192 is not divisible by num_heads 5"):
        build_model({"architecture": {**arch, "num_heads": 5}})
    with pytest.raises(ValueError, match=r"^model.architecture: VisionTransformer: img_size \(30, 30\) is not a "
                                         r"multiple of patch_size \(8, 8\)"):
        build_model({"architecture": {**arch, "img_size": 30}})
    with pytest.raises(ValueError, match=r"^model.architecture: MixVisionTransformer: depths needs one entry per "
                                         r"stage \(4\), got \[2, 2, 2\]"):
        build_model({"architecture": {"name": "mit_b0", "depths": [2, 2, 2]}})
    with pytest.raises(ConfigError, match="^model.head: LinearClsHead needs 'in_channels'"):
        build_model({"architecture": {**arch, "num_classes": 0}, "head": {"name": "LinearClsHead"}})
    with pytest.raises(ConfigError, match="^model: Segmentor needs 'head'"):
        build_model({"name": "Segmentor", "architecture": {"name": "mit_b0"}})


@pytest.mark.parametrize("cfg, expected", [
    ({"architecture": {"name": "vit_tiny_patch16_224", "drop_path": 0.1}},
     "model.architecture: unknown key 'drop_path' for vit_tiny_patch16_224. Did you mean: drop_path_rate"),
    ({"architecture": {"name": "vit_tiny_patch16_224", "pretrain": "w.pth"}},
     "model.architecture: unknown key 'pretrain' for vit_tiny_patch16_224. Did you mean: pretrained?"),
    ({"architecture": {"name": "vit_tiny_patch16_224"}, "patchs": []},
     "model: unknown key 'patchs' for Classifier. Did you mean: patches?"),
    ({"architecture": {"name": "vit_tiny_patch16_224", "num_classes": 0},
      "head": {"name": "LinearClsHead", "in_channel": 192}},
     "model.head: unknown key 'in_channel' for LinearClsHead. Did you mean: in_channels?"),
    ({"name": "Segmentor", "architecture": {"name": "mit_b0"}, "head": {"name": "SegFormerHead", "num_classes": 4},
      "patches": [{"name": "geminifusion", "num_head": 4}]},
     "model.patches[0]: unknown key 'num_head' for apply_patch. Did you mean: num_heads"),
])
def test_unknown_model_keys_have_a_did_you_mean(cfg, expected):
    with pytest.raises(ConfigError) as info:
        build_model(cfg)
    assert str(info.value).startswith(expected), str(info.value)


def test_patch_arguments_are_checked():
    seg = {"name": "Segmentor", "architecture": {"name": "mit_b0"},
           "head": {"name": "SegFormerHead", "num_classes": 4, "embed_dim": 32}}
    cases = [({"name": "tokenfusion", "threshold": "x"}, r"^model.patches\[0\].threshold: expected a number"),
             ({"name": "tokenfusion", "norm_eps": "small"},
              r"^model.patches\[0\].norm_eps: expected a positive number, or null"),
             ({"name": "geminifusion", "num_heads": True}, r"^model.patches\[0\].num_heads: expected an int"),
             ({"name": "geminifusion", "num_modalities": 1},
              r"^model.patches\[0\] \(geminifusion\): .*num_modalities must be an int >= 2, got 1")]
    for patch, match in cases:
        with pytest.raises(ConfigError if "expected" in match else ValueError, match=match):
            build_model({**seg, "patches": [patch]})
    # norm_eps: null is allowed (keep each norm's eps)
    model = build_model({**seg, "patches": [{"name": "geminifusion", "norm_eps": None}]})
    assert model.backbone.patch_embed1.norm.epsilon == 1e-5


def test_dataset_and_transform_sections(tmp_path):
    where = "dataloader.train.dataset"
    cases = [
        ({"name": "SyntheticRGBD", "num_sample": 4}, "unknown key 'num_sample' for SyntheticRGBD. Did you mean: "
                                                     "num_samples"),
        ({"name": "SyntheticRGBD", "num_samples": "ten"}, f"{where}.num_samples: expected an int, got 'ten'"),
        ({"name": "SyntheticRGBD", "ignore_index": "255"}, f"{where}.ignore_index: expected an int, got '255'"),
        ({"name": "SyntheticImageNet", "image_size": True}, f"{where}.image_size: expected an int, got True"),
        ({"name": "NYUDv2", "root": str(tmp_path), "aug_seed": "x"}, f"{where}: NYUDv2: aug_seed must be an int"),
        ({"name": "NYUDv2", "root": str(tmp_path), "depth_scale": "1/1000"},
         f"{where}: NYUDv2: depth_scale must be positive"),
        ({"name": "SyntheticRGBD", "transforms": [{"name": "RandomResizedCrop", "crop_sise": 32}]},
         f"{where}: SyntheticRGBD.transforms[0]: unknown key 'crop_sise' for RandomResizedCrop. Did you mean: "
         f"crop_size"),
        ({"name": "SyntheticImageNet", "transforms": [{"name": "RandomResizedCrop", "size": 32, "scale": 0.5}]},
         "SyntheticImageNet.transforms[0].scale: expected a list, got 0.5"),
        ({"name": "SyntheticImageNet", "transforms": [{"name": "ResizeCenterCrop"}]},
         "SyntheticImageNet.transforms[0]: ResizeCenterCrop needs 'size'"),
    ]
    for cfg, expected in cases:
        with pytest.raises(ConfigError) as info:
            DATASETS.build(cfg, where=where)
        message = str(info.value)
        assert message.startswith(where) and expected in message, message


def test_create_model_checks_its_arguments():
    with pytest.raises(ConfigError, match=r"^create_model\('vit_tiny_patch16_224'\).num_classes: expected an int "
                                          r">= 0, got 'ten'"):
        create_model("vit_tiny_patch16_224", num_classes="ten")
    with pytest.raises(ConfigError, match=r"create_model\('mit_b0'\): unknown key 'depth' for mit_b0. Did you mean: "
                                          r"depths"):
        create_model("mit_b0", depth=2)


def test_check_values_rules():
    reg = Registry("thing")

    @reg.register
    def thing(count: PositiveInt = 1, rate: Rate = 0.0, flag=False, scale=1.0, size=3, pair=(1, 2), label="a",
              maybe=None, either: Optional[int] = 5, required=None):
        return dict(count=count, rate=rate, flag=flag, scale=scale, size=size, pair=pair, label=label)

    ok = reg.build({"name": "thing", "count": 2, "rate": 0.5, "flag": True, "scale": 2, "size": 4,
                    "pair": [3, 4], "label": "b", "maybe": [1, "x"], "either": None})
    assert ok["scale"] == 2 and ok["pair"] == [3, 4]              # int for float, list for tuple
    bad = [({"count": 0}, "count: expected a positive int, got 0"),
           ({"rate": 1.0}, "rate: expected a number in [0, 1), got 1.0"),
           ({"rate": float("nan")}, "rate: expected a number in [0, 1), got nan"),
           ({"flag": 1}, "flag: expected a bool (true/false), got 1"),
           ({"scale": "2"}, "scale: expected a number, got '2' (str) (a quoted number"),
           ({"scale": None}, "scale: expected a number, got None"),
           ({"size": 4.0}, "size: expected an int, got 4.0"),
           ({"pair": "12"}, "pair: expected a list, got '12'"),
           ({"label": 1}, "label: expected a string, got 1")]
    for kwargs, expected in bad:
        with pytest.raises(ConfigError) as info:
            reg.build({"name": "thing", **kwargs}, where="cfg.thing")
        assert str(info.value).startswith(f"cfg.thing.{expected}"), str(info.value)
    check_values(thing, {"unknown_is_not_my_job": 1, "either": "x"}, "w")   # others: the constructor's job


def test_a_key_given_twice_in_a_yaml_file_is_an_error(tmp_path):
    # PyYAML keeps the last value and drops the first without a word; a config must not
    text = BASE.replace("    depth: 1\n", "    depth: 1\n    drop_rate: 0.1\n    depth: 6\n")
    with pytest.raises(ConfigError, match=r"^YAML error in .*exp.yaml:9:5: key 'depth' is given twice \(first on "
                                          r"line 7\)"):
        get_config(write(tmp_path, text))
    # YAML merge keys still override what they merge
    merged = write(tmp_path, "description: &d {a: 1, b: 2}\nlog:\n  <<: *d\n  a: 5\n", name="merge.yaml")
    assert get_config(merged).log == {"a": 5, "b": 2}
    with pytest.raises(ConfigError, match=r"_base_ entries must be paths, got 3"):
        get_config(write(tmp_path, "_base_: [3]\nseed: 1\n", name="base.yaml"))
