import textwrap

import pytest

from plfusion.config import ConfigError, get_config, dump_config
from plfusion.models import build_backbone, build_head


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return str(path)


@pytest.fixture
def cfg_dir(tmp_path):
    write(tmp_path / "_base_" / "model.yaml", """
        model:
          name: Classifier
          architecture: {name: vit_tiny_patch16_224, num_classes: 0, drop_path_rate: 0.1}
          head: {name: LinearClsHead, in_channels: 192, num_classes: 1000}
        seed: 1
    """)
    write(tmp_path / "_base_" / "data.yaml", """
        dataloader:
          train:
            dataset:
              name: SyntheticImageNet
              transforms:
                - {name: RandomResizedCrop, size: 224}
                - {name: Normalize}
            sampler: {batch_size: 8, shuffle: true}
        epochs: 10
    """)
    write(tmp_path / "exp" / "child.yaml", """
        _base_: [../_base_/model.yaml, ../_base_/data.yaml]
        model:
          architecture: {drop_path_rate: 0.2}
        epochs: 3
    """)
    return tmp_path


def test_base_list_is_deep_merged(cfg_dir):
    cfg = get_config(str(cfg_dir / "exp" / "child.yaml"))
    assert cfg.model.architecture.drop_path_rate == 0.2
    assert cfg.model.architecture.name == "vit_tiny_patch16_224"   # kept from the base
    assert cfg.model.head.num_classes == 1000
    assert cfg.epochs == 3 and cfg.seed == 1
    assert cfg.dataloader.train.sampler.batch_size == 8


def test_base_string_relative_to_file(tmp_path):
    write(tmp_path / "a" / "base.yaml", "seed: 5\nepochs: 1\n")
    p = write(tmp_path / "a" / "b" / "c.yaml", "_base_: ../base.yaml\nepochs: 2\n")
    cfg = get_config(p)
    assert (cfg.seed, cfg.epochs) == (5, 2)


def test_overrides_are_typed_and_index_lists(cfg_dir):
    cfg = get_config(str(cfg_dir / "exp" / "child.yaml"), [
        "epochs=7", "model.architecture.drop_path_rate=0.05", "dataloader.train.sampler.shuffle=false",
        "dataloader.train.dataset.transforms.0.size=160", "model.head.num_classes=10",
        "+model.architecture.img_size=[160, 160]", "model.patches=[{name: tome, r: 16}]"])
    assert cfg.epochs == 7 and isinstance(cfg.epochs, int)
    assert cfg.model.architecture.drop_path_rate == 0.05
    assert cfg.dataloader.train.sampler.shuffle is False
    assert cfg.dataloader.train.dataset.transforms[0].size == 160
    assert cfg.model.architecture.img_size == [160, 160]
    assert cfg.model.patches[0].r == 16 and cfg.model.patches[0].name == "tome"


def test_override_of_missing_key_lists_nearest(cfg_dir):
    with pytest.raises(ConfigError) as e:
        get_config(str(cfg_dir / "exp" / "child.yaml"), ["model.architecture.drop_path=0.3"])
    msg = str(e.value)
    assert "drop_path" in msg and "drop_path_rate" in msg and "model.architecture" in msg


def test_override_bad_list_index(cfg_dir):
    with pytest.raises(ConfigError, match="not a valid index"):
        get_config(str(cfg_dir / "exp" / "child.yaml"), ["dataloader.train.dataset.transforms.5.size=1"])


def test_override_needs_equals(cfg_dir):
    with pytest.raises(ConfigError, match="key.path=value"):
        get_config(str(cfg_dir / "exp" / "child.yaml"), ["epochs"])


def test_missing_file_gives_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        get_config(str(tmp_path / "nope.yaml"))


def test_missing_base_names_both_files(tmp_path):
    p = write(tmp_path / "c.yaml", "_base_: gone.yaml\n")
    with pytest.raises(FileNotFoundError) as e:
        get_config(p)
    assert "gone.yaml" in str(e.value) and "c.yaml" in str(e.value)


def test_yaml_syntax_error_gives_file_and_line(tmp_path):
    p = write(tmp_path / "bad.yaml", "seed: 1\nmodel:\n  name: [unclosed\nepochs: 2\n")
    with pytest.raises(ConfigError) as e:
        get_config(p)
    assert "bad.yaml:" in str(e.value)
    line = int(str(e.value).split("bad.yaml:")[1].split(":")[0])
    assert line in (3, 4)


def test_unknown_top_level_section_did_you_mean(tmp_path):
    p = write(tmp_path / "c.yaml", "optimiser: {name: AdamW}\n")
    with pytest.raises(ConfigError, match="Did you mean: optimizer"):
        get_config(p)


def test_base_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    p = write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        get_config(p)


def test_attribute_error_suggests(cfg_dir):
    cfg = get_config(str(cfg_dir / "exp" / "child.yaml"))
    with pytest.raises(AttributeError, match="Did you mean: epochs"):
        cfg.epoch


def test_dump_roundtrip(cfg_dir, tmp_path):
    cfg = get_config(str(cfg_dir / "exp" / "child.yaml"))
    out = tmp_path / "resolved.yaml"
    dump_config(cfg, str(out))
    assert get_config(str(out)) == cfg


def test_passl_style_usage_builds_backbone_and_head(cfg_dir):
    import paddle
    cfg = get_config(str(cfg_dir / "exp" / "child.yaml"), ["+model.architecture.img_size=32",
                                                          "+model.architecture.patch_size=8"])
    backbone = build_backbone(cfg.model.architecture)
    head = build_head(cfg.model.head)
    feats = backbone(paddle.randn([2, 3, 32, 32]))
    assert feats.shape == [2, 192]
    assert head(feats).shape == [2, 1000]
