"""SegFormerHead against numpy, the Segmentor's single- and multi-modal behaviour, its loss output
format, input checks, the config usage of the design, and the unimodal MACs at 480x640."""
import os

import numpy as np
import paddle
import pytest

from plfusion.config import get_config
from plfusion.losses import CrossEntropyLoss
from plfusion.models import build_head, build_model
from plfusion.models.heads import SegFormerHead
from plfusion.utils.flops import count_flops
from conftest import shape_only_linears

MIT_B0 = {"name": "Segmentor", "architecture": {"name": "mit_b0"},
          "head": {"name": "SegFormerHead", "num_classes": 5, "embed_dim": 32}}


def _bilinear(x, size):
    """numpy bilinear resize of [C, h, w] to size, align_corners=False (half-pixel centres)."""
    C, h, w = x.shape
    H, W = size

    def taps(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0
    y0, y1, wy = taps(h, H)
    x0, x1, wx = taps(w, W)
    top = x[:, y0][:, :, x0] * (1 - wx) + x[:, y0][:, :, x1] * wx
    bot = x[:, y1][:, :, x0] * (1 - wx) + x[:, y1][:, :, x1] * wx
    return top * (1 - wy)[:, None] + bot * wy[:, None]


def _head_numpy(head, feats):
    """The all-MLP decoder written out for one image, eval mode."""
    sd = {k: v.numpy() for k, v in head.state_dict().items()}
    size = feats[0].shape[1:]
    maps = []
    for i, f in enumerate(feats):
        C, h, w = f.shape
        e = f.reshape(C, -1).T @ sd[f"linear_c{i + 1}.proj.weight"] + sd[f"linear_c{i + 1}.proj.bias"]
        e = e.T.reshape(-1, h, w)
        maps.append(_bilinear(e, size) if i else e)
    x = np.concatenate(maps[::-1], axis=0)
    x = np.einsum("oc,chw->ohw", sd["linear_fuse.conv.weight"][:, :, 0, 0], x)
    bn = lambda n: sd[f"linear_fuse.bn.{n}"][:, None, None]  # noqa: E731
    x = (x - bn("_mean")) / np.sqrt(bn("_variance") + 1e-5) * bn("weight") + bn("bias")
    x = np.maximum(x, 0)
    return np.einsum("oc,chw->ohw", sd["linear_pred.weight"][:, :, 0, 0], x) + sd["linear_pred.bias"][:, None, None]


def test_segformer_head_matches_numpy():
    head = build_head({"name": "SegFormerHead", "in_channels": [4, 6, 8, 10], "num_classes": 3, "embed_dim": 8})
    rng = np.random.RandomState(0)
    state = head.state_dict()   # move the BN statistics away from 0/1 so they are checked
    state["linear_fuse.bn._mean"].set_value(rng.randn(8).astype("float32"))
    state["linear_fuse.bn._variance"].set_value(rng.rand(8).astype("float32") + 0.5)
    head.eval()
    feats = [rng.randn(2, c, s, s + 1).astype("float32") for c, s in zip([4, 6, 8, 10], [12, 6, 3, 2])]
    out = head([paddle.to_tensor(f) for f in feats]).numpy()
    assert out.shape == (2, 3, 12, 13)
    for b in range(2):
        np.testing.assert_allclose(out[b], _head_numpy(head, [f[b] for f in feats]), rtol=1e-4, atol=1e-5)
    assert sorted(k for k in head.state_dict() if k.startswith("linear_fuse")) == [
        "linear_fuse.bn._mean", "linear_fuse.bn._variance", "linear_fuse.bn.bias", "linear_fuse.bn.weight",
        "linear_fuse.conv.weight"]


def test_segformer_head_rejects_wrong_inputs():
    head = SegFormerHead([4, 6], num_classes=3, embed_dim=8)
    with pytest.raises(ValueError, match="expected a list of 2 feature maps"):
        head([paddle.zeros([1, 4, 8, 8])])
    with pytest.raises(ValueError, match=r"feature map 1 should be \[B, 6, h, w\]"):
        head([paddle.zeros([1, 4, 8, 8]), paddle.zeros([1, 5, 4, 4])])
    with pytest.raises(ValueError, match="in_channels"):
        SegFormerHead(32, num_classes=3)


def test_single_modal_segmentor():
    seg = build_model(MIT_B0)
    seg.eval()
    x = paddle.randn([2, 3, 64, 48])
    out = seg(x)
    assert list(out.shape) == [2, 5, 16, 12]          # logits at 1/4 resolution
    np.testing.assert_array_equal(out.numpy(), seg.head(seg.backbone(x)).numpy())
    np.testing.assert_array_equal(seg([x]).numpy(), out.numpy())
    assert seg.extra_losses() == {} and seg.alpha is None
    assert not any("alpha" in k for k in seg.state_dict())
    with pytest.raises(ValueError, match="takes one input tensor, got a list of 2"):
        seg([x, x])
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        seg(paddle.randn([2, 1, 64, 48]))


def test_segmentor_config_errors():
    with pytest.raises(ValueError, match="num_classes: 0"):
        build_model(dict(MIT_B0, architecture={"name": "mit_b0", "num_classes": 10}))
    with pytest.raises(ValueError, match="out_indices"):
        build_model(dict(MIT_B0, architecture={"name": "swin_tiny_patch4_window7_224", "num_classes": 0}))
    with pytest.raises(ValueError, match="does not match the backbone's out_channels"):
        build_model(dict(MIT_B0, head={"name": "SegFormerHead", "num_classes": 5, "in_channels": [1, 2, 3, 4]}))


def test_multimodal_outputs_ensemble_and_loss():
    seg = build_model(dict(MIT_B0, patches=[{"name": "geminifusion"}]))
    seg.alpha.set_value(paddle.to_tensor([0.3, -0.2]))    # unequal weights, so the softmax is checked
    seg.train()
    rgb, depth = paddle.randn([2, 3, 64, 64]), paddle.randn([2, 3, 64, 64])
    outs = seg([rgb, depth])
    assert len(outs) == 3 and all(list(o.shape) == [2, 5, 16, 16] for o in outs)
    w = np.exp([0.3, -0.2]) / np.exp([0.3, -0.2]).sum()
    np.testing.assert_allclose(outs[2].numpy(), w[0] * outs[0].numpy() + w[1] * outs[1].numpy(), rtol=1e-5, atol=1e-6)

    # the loss takes the list and sums the three cross entropies (labels at full size, 255 ignored)
    label = paddle.to_tensor(np.random.RandomState(0).randint(0, 5, (2, 64, 64)).astype("int64"))
    label[:, :8] = 255
    crit = CrossEntropyLoss(ignore_index=255)
    total = crit(outs, label)
    assert abs(float(total) - sum(float(crit(o, label)) for o in outs)) < 1e-4

    # the ensemble is built from detached logits: its loss reaches neither the network nor (fixed) alpha
    crit(outs[2], label).backward()
    assert all(p.grad is None for p in seg.backbone.parameters()) and seg.alpha.grad is None


def test_trainable_ensemble_weights():
    seg = build_model(dict(MIT_B0, ensemble_trainable=True, patches=[{"name": "tokenfusion"}]))
    assert not seg.alpha.stop_gradient
    outs = seg([paddle.randn([1, 3, 64, 64]), paddle.randn([1, 3, 64, 64])])
    label = paddle.zeros([1, 64, 64], dtype="int64")
    CrossEntropyLoss()(outs[2], label).backward()
    assert seg.alpha.grad is not None and float(seg.alpha.grad.abs().sum()) > 0
    assert all(p.grad is None for p in seg.head.parameters())


def test_design_usage_from_config(root_dir):
    cfg = get_config(os.path.join(root_dir, "configs/geminifusion/nyudv2_mit_b3.yaml"),
                     overrides=["model.architecture.name=mit_b0"])   # b0 keeps the test small
    assert cfg.model.patches[0].name == "geminifusion" and cfg.model.head.num_classes == 40
    seg = build_model(cfg.model)
    seg.eval()
    rgb, depth = paddle.randn([1, 3, 64, 64]), paddle.randn([1, 3, 64, 64])
    outs = seg([rgb, depth])
    assert len(outs) == 3 and list(outs[0].shape) == [1, 40, 16, 16]
    assert not np.allclose(outs[0].numpy(), outs[1].numpy())
    with pytest.raises(ValueError, match="expected 2 modality tensors"):
        seg([rgb])


def test_checkpoint_layouts(tmp_path):
    from plfusion.models import create_model
    # a bare ImageNet MiT: the encoder loads, its 1000-class classifier is not used, the head stays
    mit = create_model("mit_b0", num_classes=1000)
    path = str(tmp_path / "mit_b0_in1k.pdparams")
    paddle.save(mit.state_dict(), path)
    seg = build_model(MIT_B0)
    report = seg.load_pretrained(path)
    assert sorted(report.dropped + report.unexpected) == ["backbone.head.bias", "backbone.head.weight"]
    assert report.missing and all(k.startswith("head.") for k in report.missing)
    np.testing.assert_array_equal(seg.backbone.block4[1].mlp.fc2.weight.numpy(), mit.block4[1].mlp.fc2.weight.numpy())

    # an mmseg-style SegFormer (`backbone.`, `decode_head.`, torch BN names) reproduces the model
    src = build_model(MIT_B0)
    src.head.linear_fuse.bn._mean.set_value(paddle.randn([32]))
    src.eval()
    sd = {}
    for k, v in src.state_dict().items():
        k = k.replace("head.", "decode_head.", 1) if k.startswith("head.") else k
        sd[k.replace("bn._mean", "bn.running_mean").replace("bn._variance", "bn.running_var")] = v.numpy()
    sd["decode_head.linear_fuse.bn.num_batches_tracked"] = np.array(3, dtype="int64")
    path = str(tmp_path / "segformer_mmseg.pdparams")
    paddle.save(sd, path)
    dst = build_model(MIT_B0)
    report = dst.load_pretrained(path)
    assert not report.missing and not report.unexpected
    dst.eval()
    x = paddle.randn([1, 3, 64, 64])
    np.testing.assert_array_equal(dst(x).numpy(), src(x).numpy())




def test_unimodal_mit_b3_macs_at_480x640():
    seg = build_model({"name": "Segmentor", "architecture": {"name": "mit_b3"},
                       "head": {"name": "SegFormerHead", "num_classes": 40}})
    with shape_only_linears():
        gmacs = count_flops(seg, [1, 3, 480, 640])
    assert abs(gmacs - 50.2) / 50.2 < 0.02, gmacs    # REFERENCE: 50.2 G
