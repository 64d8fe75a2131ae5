"""Convert a released checkpoint (timm / official .pth, .safetensors) to a plfusion .pdparams.

    python tools/convert_weights.py --src vit_base.safetensors --arch vit_base_patch16_224 --dst vit_base.pdparams

The checkpoint goes through the same path as `model.load_pretrained` (key maps, Linear
transposes, position-table resizing), so the .pdparams loads with plain paddle.load too.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    import paddle
    from plfusion.models import create_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help=".pth / .pth.tar / .pyth / .safetensors / .pdparams")
    p.add_argument("--arch", required=True, help="plfusion model name, e.g. vit_base_patch16_224")
    p.add_argument("--dst", required=True, help="output .pdparams")
    p.add_argument("--kwargs", default="{}", help='JSON model kwargs, e.g. \'{"num_classes": 21}\'')
    p.add_argument("--strict", action="store_true", help="fail on missing or unexpected keys")
    args = p.parse_args(argv)
    if not args.dst.endswith(".pdparams"):
        p.error(f"--dst must end with .pdparams, got {args.dst}")
    try:
        kwargs = json.loads(args.kwargs)
    except json.JSONDecodeError as e:
        p.error(f"--kwargs is not valid JSON: {e}")
    if not isinstance(kwargs, dict):
        p.error(f"--kwargs must be a JSON object of model arguments, got {args.kwargs}")

    # A bad argument or checkpoint is the user's to fix: one line naming it, exit status 1, no --dst written.
    try:
        model = create_model(args.arch, **kwargs)
        report = model.load_pretrained(args.src, strict=args.strict)
    except (KeyError, ValueError, OSError) as e:   # CheckpointError, ConfigError, FileNotFoundError, ...
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"convert_weights: error: {message}", file=sys.stderr)
        return 1
    print(report)
    tmp = args.dst + ".tmp"
    paddle.save(model.state_dict(), tmp)
    os.replace(tmp, args.dst)
    print(f"saved {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
