import pytest

from plfusion.registry import ConfigError, Registry
from plfusion.models import build_backbone, build_model, create_model, list_models


def test_unknown_model_name_lists_close_matches():
    with pytest.raises(KeyError) as e:
        create_model("vit_bse_patch16_224")
    assert "vit_base_patch16_224" in str(e.value)


def test_unknown_backbone_in_config_names_key_path():
    with pytest.raises(ConfigError) as e:
        build_backbone({"name": "deit_smal_patch16_224"})
    assert "model.architecture.name" in str(e.value) and "deit_small_patch16_224" in str(e.value)


def test_unknown_kwarg_is_an_error_with_suggestion():
    with pytest.raises(ConfigError) as e:
        build_backbone({"name": "vit_tiny_patch16_224", "drop_path": 0.1})
    assert "drop_path_rate" in str(e.value) and "model.architecture" in str(e.value)
    with pytest.raises(ConfigError, match="num_classes"):
        create_model("vit_tiny_patch16_224", num_clases=3)


def test_missing_name_and_non_mapping():
    with pytest.raises(ConfigError, match="missing 'name'"):
        build_backbone({"num_classes": 3})
    with pytest.raises(ConfigError, match="expected a mapping"):
        build_backbone("vit_tiny_patch16_224")


def test_bad_patch_entry_names_index():
    cfg = {"architecture": {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8},
           "patches": [{"name": "not_a_patch"}]}
    with pytest.raises(ConfigError, match=r"model.patches\[0\].name"):
        build_model(cfg)


def test_registry_register_get_and_duplicates():
    reg = Registry("thing")

    @reg.register
    def alpha(x=1):
        return x

    reg.register(lambda: 2, name="beta")
    assert reg.get("alpha") is alpha and reg.names() == ["alpha", "beta"]
    assert reg.build({"name": "alpha", "x": 5}) == 5
    with pytest.raises(KeyError, match="twice"):
        reg.register(lambda: 3, name="alpha")
    with pytest.raises(KeyError, match="Did you mean: alpha"):
        reg.get("alpah")


def test_list_models_pattern():
    names = list_models("deit_*distilled*")
    assert names == ["deit_base_distilled_patch16_224", "deit_small_distilled_patch16_224",
                     "deit_tiny_distilled_patch16_224"]
    assert "vit_base_patch16_384" in list_models()
