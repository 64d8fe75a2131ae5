"""Pictures of ToMe's merged tokens, as in the paper's figures (numpy + opencv)."""
import cv2
import numpy as np

__all__ = ["make_visualization", "group_map", "paint_groups", "dense_groups", "merge_maps", "label_panel",
           "demo_image"]


def _to_numpy(t):
    return t.numpy() if hasattr(t, "numpy") else np.asarray(t)


def group_map(source, grid, class_token=True):
    """[gh, gw] int map: which merged token each patch ended up in.

    source: [T, T0] or [1, T, T0] (model._tome_info["source"] for one image); class_token: True/False
    or the number of prefix tokens (2 for DeiT distilled), whose columns are dropped."""
    src = _to_numpy(source)
    if src.ndim == 3:
        if src.shape[0] != 1:
            raise ValueError(f"make_visualization: source has a batch of {src.shape[0]}; pass one image's, "
                             f"e.g. source[i:i + 1]")
        src = src[0]
    if src.ndim != 2:
        raise ValueError(f"make_visualization: source must be [T, T0] or [1, T, T0], got shape {list(src.shape)}")
    prefix = int(class_token)
    gh, gw = grid
    if src.shape[1] - prefix != gh * gw:
        raise ValueError(f"make_visualization: source covers {src.shape[1]} input tokens, but the image makes a "
                         f"{gh}x{gw} patch grid plus {prefix} prefix token(s) = {gh * gw + prefix}; check patch_size "
                         f"and class_token")
    return src[:, prefix:].argmax(axis=0).reshape(gh, gw)


def make_visualization(img, source, patch_size=16, class_token=True, seed=0):
    """Colour each merged group with its mean image colour and outline it in a random colour.

    img: uint8 [H, W, 3]; returns uint8 [H, W, 3]."""
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"make_visualization: img must be a uint8 HxWx3 array, got {img.dtype} {list(img.shape)}")
    h, w = img.shape[:2]
    if patch_size <= 0 or h < patch_size or w < patch_size:
        raise ValueError(f"make_visualization: patch_size {patch_size} does not fit a {h}x{w} image")
    groups = group_map(source, (h // patch_size, w // patch_size), class_token)
    return paint_groups(img, groups, seed)


def paint_groups(img, groups, seed=0):
    """Colour each group of a [gh, gw] int map (nearest-upsampled to the image) with its mean image
    colour, outlined in a random colour. img: uint8 [H, W, 3]; returns uint8 [H, W, 3]."""
    h, w = img.shape[:2]
    # nearest upsampling of the token grid to pixels (the grid may not divide the image exactly)
    rows = np.arange(h) * groups.shape[0] // h
    cols = np.arange(w) * groups.shape[1] // w
    label = groups[rows[:, None], cols[None, :]]

    n = int(groups.max()) + 1
    counts = np.bincount(label.ravel(), minlength=n).astype(np.float64)
    mean = np.stack([np.bincount(label.ravel(), weights=img[..., c].ravel().astype(np.float64), minlength=n)
                     for c in range(3)], axis=1) / np.maximum(counts, 1)[:, None]
    palette = np.random.default_rng(seed).integers(0, 256, size=(n, 3))

    # a pixel is on a border if a 4-neighbour belongs to another group or lies outside the image
    pad = np.pad(label, 1, constant_values=-1)
    edge = ((pad[:-2, 1:-1] != label) | (pad[2:, 1:-1] != label) |
            (pad[1:-1, :-2] != label) | (pad[1:-1, 2:] != label))
    out = np.where(edge[..., None], palette[label], mean[label])
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def dense_groups(model, stage=0, block=0, sample=0):
    """[H, W] int map of one sample's merge groups in a block of a dense (MiT, Swin or MViTv2) model patched with
    trace_source=True, after a forward pass; None when that block merged nothing."""
    info = getattr(model, "_tome_info", None)
    if info is None or not info.get("dense") or not info["trace_source"]:
        raise ValueError(f"dense_groups: patch {type(model).__name__} with tome.apply_patch(model, trace_source=True) "
                         f"first (a MiT, Swin or MViTv2 model)")
    found = info["maps"].get((stage, block))
    if found is None:
        return None
    inverse, H, W = found
    return _to_numpy(inverse)[sample].reshape(H, W)


def merge_maps(model, img, r_values, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    """Run a ToMe model patched with trace_source=True on one uint8 HxWx3 image at each r.

    Returns [(caption, visualisation uint8 HxWx3)]; the image must already be the model's input size."""
    import paddle
    info = getattr(model, "_tome_info", None)
    if info is None or not info["trace_source"]:
        raise ValueError(f"merge_maps: patch {type(model).__name__} with tome.apply_patch(model, trace_source=True) "
                         f"first")
    owner = next((m for m in model.sublayers(include_self=True) if hasattr(m, "patch_embed")), None)
    if owner is None:
        raise ValueError(f"merge_maps: {type(model).__name__} has no patch_embed to read the patch size from")
    patch = owner.patch_embed.patch_size[0]
    prefix = getattr(owner, "num_prefix_tokens", 1)
    x = (img.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    x = paddle.to_tensor(x.transpose(2, 0, 1)[None])
    out = []
    model.eval()
    for r in r_values:
        model.r = r
        with paddle.no_grad():
            model(x)
        source = info["source"]
        if source is None:   # nothing merged: every token is its own group
            source = np.eye(info["num_tokens"], dtype=np.float32)[None]
        out.append((f"r={r}: {source.shape[1]} tokens",
                    make_visualization(img, source, patch_size=patch, class_token=prefix)))
    return out


def label_panel(images, labels, height=24):
    """Put uint8 HxWx3 images side by side, each with a caption strip above it."""
    if len(images) != len(labels):
        raise ValueError(f"label_panel: {len(images)} images but {len(labels)} labels")
    h = max(im.shape[0] for im in images)
    tiles = []
    for im, text in zip(images, labels):
        tile = np.full((h + height, im.shape[1], 3), 255, np.uint8)
        tile[height:height + im.shape[0]] = im
        cv2.putText(tile, str(text), (4, height - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(tile)
        tiles.append(np.full((h + height, 4, 3), 255, np.uint8))
    return np.concatenate(tiles[:-1], axis=1)


def demo_image(size=224, seed=0):
    """A synthetic RGB scene (sky, ground, sun, house, tree) for demos without an image file."""
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size, 3), np.uint8)
    horizon = int(size * 0.62)
    sky = np.linspace(150, 235, horizon, dtype=np.float64)
    img[:horizon] = np.stack([sky * 0.55, sky * 0.75, sky], axis=1)[:, None, :].astype(np.uint8)
    img[horizon:] = (70, 140, 60)
    s = size / 224.0
    cv2.circle(img, (int(180 * s), int(40 * s)), int(20 * s), (250, 220, 90), -1)
    cv2.rectangle(img, (int(30 * s), int(95 * s)), (int(110 * s), int(160 * s)), (190, 60, 50), -1)
    pts = np.array([[25 * s, 95 * s], [70 * s, 55 * s], [115 * s, 95 * s]], np.int32)
    cv2.fillPoly(img, [pts], (110, 50, 40))
    cv2.rectangle(img, (int(60 * s), int(125 * s)), (int(80 * s), int(160 * s)), (80, 50, 30), -1)
    cv2.rectangle(img, (int(150 * s), int(110 * s)), (int(160 * s), int(160 * s)), (100, 70, 40), -1)
    cv2.circle(img, (int(155 * s), int(95 * s)), int(28 * s), (40, 110, 40), -1)
    noise = rng.integers(-6, 7, size=img.shape)
    return np.clip(img.astype(np.int64) + noise, 0, 255).astype(np.uint8)
