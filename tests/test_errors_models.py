"""Issue #7, models and patches: bad inputs name the model class and what was expected; a refused
patch leaves the model as it was.

ToMe's `model.r` is not covered here: plfusion/patches/tome was not committed when this was written.
"""
import numpy as np
import paddle
import pytest

from plfusion.models import build_model, create_model
from plfusion.patches import geminifusion, tokenfusion

SWIN = dict(img_size=56, depths=(1, 1), num_heads=(1, 2), embed_dim=16)
SEG_HEAD = {"name": "SegFormerHead", "num_classes": 4, "embed_dim": 32}


def family(name):
    """(model, class name, the input size it was built for)."""
    models = {
        "vit": (lambda: create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=5),
                "VisionTransformer", 32),
        "t2t": (lambda: create_model("t2t_vit_14", img_size=32, depth=1, num_classes=5), "T2TViT", 32),
        "mit": (lambda: create_model("mit_b0", depths=(1, 1, 1, 1)), "MixVisionTransformer", 64),
        "swin": (lambda: create_model("swin_tiny_patch4_window7_224", num_classes=5, **SWIN), "SwinTransformer", 56),
        "swin_dense": (lambda: create_model("swin_tiny_patch4_window7_224", num_classes=0, out_indices=(0, 1),
                                            **SWIN), "SwinTransformer", 56),
        "mvit": (lambda: create_model("mvitv2_tiny", img_size=64, depths=(1, 1, 1, 1), num_classes=5),
                 "MultiScaleVit", 64),
    }
    make, cls, size = models[name]
    model = make()
    model.eval()
    return model, cls, size


def x(c, h, w=None, b=1):
    return paddle.randn([b, c, h, w or h])


ALL = ["vit", "t2t", "mit", "swin", "swin_dense", "mvit"]


@pytest.mark.parametrize("name", ALL)
def test_wrong_channel_count_names_the_model(name):
    model, cls, size = family(name)
    model(x(3, size))                                               # the right input runs
    with pytest.raises(ValueError, match=rf"^{cls}: expected 3 input channels, got 4 \(input shape \[1, 4, "):
        model(x(4, size))
    with pytest.raises(ValueError, match=rf"^{cls}: expected a 4-D NCHW image batch, got shape \[3, {size}, {size}\]"):
        model(paddle.randn([3, size, size]))


@pytest.mark.parametrize("name", ALL)
def test_a_list_of_modalities_needs_a_fusion_patch(name):
    model, cls, size = family(name)
    with pytest.raises(TypeError, match=rf"^{cls}: expected one NCHW image batch, got a list of 2; .*fusion patch"):
        model([x(3, size), x(3, size)])
    with pytest.raises(TypeError, match=rf"^{cls}: expected a paddle.Tensor NCHW image batch, got ndarray"):
        model(np.zeros((1, 3, size, size), np.float32))


@pytest.mark.parametrize("name, size, match", [
    ("vit", 40, r"^VisionTransformer: built for 32x32 images, got 40x40. Build it with img_size=\(40, 40\)"),
    ("vit", 36, r"^VisionTransformer: built for 32x32 images, got 36x36"),
    ("t2t", 40, r"^T2TViT: built for 32x32 images, got 40x40"),
    ("mit", 15, r"^MixVisionTransformer: input 15x15 is too small: stage 1 has a 4x4 grid, smaller than its "
                r"sr_ratio 8"),
    ("swin", 64, r"^SwinTransformer: built for 56x56 images, got 64x64"),
    ("mvit", 96, r"^MultiScaleVit: built for 64x64 images, got 96x96"),
    ("mvit", 72, r"^MultiScaleVit: built for 64x64 images, got 72x72"),
])
def test_an_image_size_the_model_cannot_take(name, size, match):
    model, _, _ = family(name)
    with pytest.raises(ValueError, match=match):
        model(x(3, size))


def test_sizes_the_models_can_take():
    # MiT has no position table: any input big enough for its reductions works
    mit, _, _ = family("mit")
    assert [list(f.shape[2:]) for f in mit(x(3, 40, 56))] == [[10, 14], [5, 7], [3, 4], [2, 2]]
    # dense Swin pads to the patch and window sizes, so odd sizes work and come back un-padded
    swin, _, _ = family("swin_dense")
    assert [list(f.shape[2:]) for f in swin(x(3, 37, 45))] == [[10, 12], [5, 6]]


def test_sizes_refused_when_the_model_is_built():
    with pytest.raises(ValueError, match=r"VisionTransformer: img_size \(30, 30\) is not a multiple of patch_size"):
        create_model("vit_tiny_patch16_224", img_size=30, patch_size=8)
    with pytest.raises(ValueError, match=r"SwinTransformer: img_size .* window_size 7 does not tile"):
        create_model("swin_tiny_patch4_window7_224", img_size=64)
    with pytest.raises(ValueError, match=r"MultiScaleVit: img_size \(100, 100\) must be a multiple of 32"):
        create_model("mvitv2_tiny", img_size=100)
    with pytest.raises(ValueError, match=r"T2TModule: img_size \(2, 2\) is too small"):
        create_model("t2t_vit_14", img_size=2)
    # T2T's soft splits take any size: it does not inherit ViT's patch-size rule
    t2t = create_model("t2t_vit_14", img_size=40, depth=1, num_classes=3)
    assert t2t.tokens_to_token.grid_size == (3, 3)
    for name, kwargs in (("swin_tiny_patch4_window7_224", dict(num_classes=0)), ("mvitv2_tiny", dict(num_classes=0)),
                         ("mit_b0", {})):
        with pytest.raises(ValueError, match=r"out_indices \[7\] must be distinct stage indices"):
            create_model(name, out_indices=[7], **kwargs)
        with pytest.raises(ValueError, match=r"out_indices \[1.5\] must be distinct stage indices"):
            create_model(name, out_indices=[1.5], **kwargs)


# --------------------------------------------------------------------------- fusion patches

def segmentor(arch, patch):
    cfg = {"name": "Segmentor", "architecture": arch, "head": SEG_HEAD, "patches": [patch]}
    model = build_model(cfg)
    model.eval()
    return model


MIT = {"name": "mit_b0", "depths": [1, 1, 1, 1]}
SWIN_DENSE = {"name": "swin_tiny_patch4_window7_224", "num_classes": 0, "out_indices": [0, 1, 2, 3],
              "img_size": 64, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8], "embed_dim": 16}
FUSED = [(MIT, {"name": "geminifusion"}, "MixVisionTransformer (geminifusion)"),
         (SWIN_DENSE, {"name": "geminifusion", "num_heads": 8}, "SwinTransformer (geminifusion)"),
         (MIT, {"name": "tokenfusion"}, "MixVisionTransformer (tokenfusion)")]


@pytest.mark.parametrize("arch, patch, where", FUSED)
def test_modality_lists_are_checked(arch, patch, where):
    seg = segmentor(arch, patch)
    good = [x(3, 64, b=2), x(3, 64, b=2)]
    outs = seg(good)
    assert len(outs) == 3 and list(outs[0].shape) == [2, 4, 16, 16]
    w = where.replace("(", r"\(").replace(")", r"\)")
    cases = [([x(3, 64)] * 3, ValueError, rf"^{w}: expected 2 modality tensors \(the model was patched with "
                                          rf"num_modalities=2\), got 3"),
             ([x(3, 64)], ValueError, rf"^{w}: expected 2 modality tensors .* got 1"),
             (x(3, 64), TypeError, rf"^{w}: expected a list of 2 modality tensors \[B, 3, H, W\] .* got a Tensor of "
                                   rf"shape \[1, 3, 64, 64\]"),
             ([x(3, 64), x(3, 32)], ValueError, rf"^{w}: modality 1 has shape \[1, 3, 32, 32\] but modality 0 has "
                                                rf"\[1, 3, 64, 64\]"),
             ([x(3, 64), x(3, 64, 48)], ValueError, rf"^{w}: modality 1 has shape \[1, 3, 64, 48\]"),
             ([x(3, 64, b=2), x(3, 64)], ValueError, rf"^{w}: modality 1 has shape \[1, 3, 64, 64\] but modality 0 "
                                                     rf"has \[2, 3, 64, 64\]"),
             ([x(3, 64), x(1, 64)], ValueError, rf"^{w}: modality 1 has 1 channels, expected 3"),
             ([x(3, 64), np.zeros((1, 3, 64, 64), np.float32)], TypeError, rf"^{w}: modality 1 is a ndarray")]
    for inputs, error, match in cases:
        with pytest.raises(error, match=match):
            seg(inputs)


def _fingerprint(model):
    """Class of every sublayer and every state-dict entry: what a patch would change."""
    return ([(n, type(l).__name__) for n, l in model.named_sublayers(include_self=True)],
            {k: v.numpy().copy() for k, v in model.state_dict().items()})


def _assert_same(model, before):
    layers, state = _fingerprint(model)
    assert layers == before[0]
    assert sorted(state) == sorted(before[1])
    for k in state:
        np.testing.assert_array_equal(state[k], before[1][k], err_msg=k)


def test_a_patch_applied_twice_is_refused_and_changes_nothing():
    for first, second in (("geminifusion", geminifusion), ("tokenfusion", tokenfusion),
                          ("geminifusion", tokenfusion), ("tokenfusion", geminifusion)):
        seg = segmentor(MIT, {"name": first})
        before = _fingerprint(seg)
        with pytest.raises(RuntimeError, match=rf"apply_patch: the model is already patched with {first} "
                                               rf"\(2 modalities\); build a fresh model"):
            second.apply_patch(seg)
        _assert_same(seg, before)
    cfg = {"name": "Segmentor", "architecture": MIT, "head": SEG_HEAD,
           "patches": [{"name": "tokenfusion"}, {"name": "geminifusion"}]}
    with pytest.raises(RuntimeError, match=r"^model.patches\[1\] \(geminifusion\): .*already patched with tokenfusion"):
        build_model(cfg)


@pytest.mark.parametrize("patch, make, match", [
    (geminifusion, lambda: create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1),
     r"expected a MixVisionTransformer or SwinTransformer \(or a Segmentor holding one\), got VisionTransformer$"),
    (geminifusion, lambda: create_model("t2t_vit_14", img_size=32, depth=1), r"got T2TViT$"),
    (geminifusion, lambda: create_model("mvitv2_tiny", img_size=64, depths=(1, 1, 1, 1), num_classes=0),
     r"got MultiScaleVit$"),
    (tokenfusion, lambda: create_model("swin_tiny_patch4_window7_224", num_classes=0, out_indices=(0, 1), **SWIN),
     r"expected a MixVisionTransformer \(or a Segmentor holding one\), got SwinTransformer$"),
    (geminifusion, lambda: create_model("swin_tiny_patch4_window7_224", num_classes=5, **SWIN),
     r"the Swin backbone is in classification mode"),
    (tokenfusion, lambda: create_model("mit_b0", num_classes=10), r"the MiT has a classifier \(num_classes=10\)"),
])
def test_a_patch_on_an_unsupported_model_names_its_class(patch, make, match):
    model = make()
    before = _fingerprint(model)
    with pytest.raises((TypeError, ValueError), match=match):
        patch.apply_patch(model)
    _assert_same(model, before)


def test_an_unsupported_backbone_inside_a_classifier_is_named_with_the_config_key():
    cfg = {"architecture": {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 1},
           "patches": [{"name": "geminifusion"}]}
    with pytest.raises(TypeError, match=r"^model.patches\[0\] \(geminifusion\): geminifusion.apply_patch: expected .* "
                                        r"got Classifier with a VisionTransformer backbone$"):
        build_model(cfg)


@pytest.mark.parametrize("patch, kwargs, match", [
    (geminifusion, dict(num_modalities=1), "num_modalities must be an int >= 2, got 1"),
    (geminifusion, dict(num_modalities="two"), "num_modalities must be an int >= 2, got 'two'"),
    (geminifusion, dict(num_modalities=True), "num_modalities must be an int >= 2, got True"),
    (geminifusion, dict(num_heads=3), "num_heads=3 does not divide the feature dim 32"),
    (geminifusion, dict(num_heads=True), "num_heads must be a positive int, got True"),
    (geminifusion, dict(norm_eps=0), "norm_eps must be a positive number or None, got 0"),
    (tokenfusion, dict(threshold="x"), r"threshold must be a number in \[0, 1\), got 'x'"),
    (tokenfusion, dict(threshold=1.5), r"threshold must be a number in \[0, 1\), got 1.5"),
    (tokenfusion, dict(sparsity_weight=-1), "sparsity_weight must be a number >= 0, got -1"),
])
def test_bad_patch_arguments_are_refused_before_anything_changes(patch, kwargs, match):
    seg = build_model({"name": "Segmentor", "architecture": MIT, "head": SEG_HEAD})
    before = _fingerprint(seg)
    with pytest.raises(ValueError, match=match):
        patch.apply_patch(seg, **kwargs)
    _assert_same(seg, before)
    assert seg.num_modalities == 1
