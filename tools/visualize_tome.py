"""Draw ToMe's merged tokens: the image beside its merge maps at each r, in one PNG.

    python tools/visualize_tome.py --model vit_base_patch16_224 [--pretrained w.safetensors] \
        --image dog.jpg --r 0 8 16 --out merged.png

Without --image a built-in synthetic scene is used. With random weights (no --pretrained) the
groups show the mechanics, not semantics: load trained weights for meaningful merges.
"""
import argparse
import os
import sys

import cv2
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

IMAGENET_MEAN = (0.485, 0.456, 0.406)   # timm's AugReg ViTs use 0.5 / 0.5: pass --mean/--std
IMAGENET_STD = (0.229, 0.224, 0.225)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224", help="registered model name")
    p.add_argument("--pretrained", help="weights file (.pdparams/.safetensors/.pth)")
    p.add_argument("--image", help="image file (default: a built-in synthetic scene)")
    p.add_argument("--r", nargs="+", default=["0", "8", "16"], metavar="R",
                   help="r values: 16, '16,-1' (r, inflection) or '[8,8,4]'")
    p.add_argument("--img-size", type=int, default=None, help="square input size (default: the model's)")
    p.add_argument("--mean", type=float, nargs=3, default=IMAGENET_MEAN, help="normalisation mean (0-1 scale)")
    p.add_argument("--std", type=float, nargs=3, default=IMAGENET_STD, help="normalisation std (0-1 scale)")
    p.add_argument("--out", default="merged.png", help="output PNG")
    return p.parse_args(argv)


def fit_image(img, size):
    """Resize the short side to fit (H, W), then centre-crop to exactly (H, W)."""
    h, w = size
    scale = max(h / img.shape[0], w / img.shape[1])
    nh, nw = max(h, round(img.shape[0] * scale)), max(w, round(img.shape[1] * scale))
    img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    top, left = (nh - h) // 2, (nw - w) // 2
    return np.ascontiguousarray(img[top:top + h, left:left + w])


def main(argv=None):
    args = parse_args(argv)
    from plfusion.models import create_model
    from plfusion.patches import tome
    from plfusion.patches.tome.vis import demo_image, label_panel, merge_maps

    r_values = [tome.parse_r_text(v, where="--r") for v in args.r]
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    model = create_model(args.model, pretrained=args.pretrained, **kwargs)
    if not args.pretrained:
        print(f"note: {args.model} has random weights (no --pretrained); merges show the mechanics only")
    tome.apply_patch(model, trace_source=True)
    owner = next(m for m in model.sublayers(include_self=True) if hasattr(m, "patch_embed"))
    size = tuple(owner.patch_embed.img_size)
    if args.image:
        from plfusion.data.image_io import read_image
        img = fit_image(read_image(args.image), size)
    else:
        print("note: no --image given; using the built-in synthetic scene")
        img = fit_image(demo_image(max(size)), size)
    panels = merge_maps(model, img, r_values, args.mean, args.std)
    sheet = label_panel([img] + [v for _, v in panels], ["image"] + [t for t, _ in panels])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if not cv2.imwrite(args.out, cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {args.out} (is the extension an image format opencv knows?)")
    print(f"wrote {args.out}: image + merge maps at r = {', '.join(args.r)}")
    return sheet


if __name__ == "__main__":
    main()
