"""Compare a plfusion model with its reference implementation on the same weights.

The reference side runs `tools/reference/<family>.py` under a scratch PyTorch interpreter
(timm or the official repo's code; never a project dependency). It writes the reference's
state dict (reference names, torch layout), an input batch and the outputs. We then load that
state dict with `load_pretrained` — so the check covers our key maps and transposes too — run
the same input and print the max abs difference per output.

    python3.11 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.13.0 numpy safetensors timm
    python tools/check_reference.py --family vit --variant vit_base_patch16_224 \
        --ref-python /tmp/torchenv/bin/python [--ref-repo /path/to/official/checkout]
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def families():
    return sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(HERE, "reference", "[!_]*.py")))


def run_reference(args, out):
    script = os.path.join(HERE, "reference", f"{args.family}.py")
    cmd = [args.ref_python, script, "--variant", args.variant, "--out", out]
    if args.ref_repo:
        cmd += ["--ref-repo", args.ref_repo]
    if args.img_size:
        cmd += ["--img-size", *map(str, args.img_size)]
    subprocess.run(cmd, check=True)


def run_ours(out):
    import paddle
    from plfusion.models import build_model, create_model
    with open(os.path.join(out, "meta.json")) as f:
        meta = json.load(f)
    if "model_cfg" in meta:   # a whole model config, e.g. a Segmentor with a fusion patch
        model = build_model(meta["model_cfg"])
    else:
        model = create_model(meta["our_name"], **meta.get("kwargs", {}))
    report = model.load_pretrained(os.path.join(out, "weights.safetensors"))
    model.eval()
    inputs = [paddle.to_tensor(np.load(os.path.join(out, f"input_{i}.npy"))) for i in range(meta["num_inputs"])]
    with paddle.no_grad():
        if meta.get("list_input"):   # multimodal models take one list of tensors
            outs = model(inputs)
        else:
            outs = model(*inputs) if len(inputs) > 1 else model(inputs[0])
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    return meta, report, [o.numpy() for o in outs]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", required=True, choices=families())
    p.add_argument("--variant", required=True, help="the reference's model name (timm / official)")
    p.add_argument("--ref-python", default=os.environ.get("PLFUSION_REF_PYTHON", "/tmp/torchenv/bin/python"))
    p.add_argument("--ref-repo", default=None, help="checkout of the official repo, where the family needs it")
    p.add_argument("--img-size", type=int, nargs=2, default=None)
    p.add_argument("--keep", default=None, help="keep the exchanged files in this folder")
    p.add_argument("--atol", type=float, default=1e-4)
    args = p.parse_args(argv)

    out = args.keep or tempfile.mkdtemp(prefix="plfusion_ref_")
    run_reference(args, out)
    meta, report, ours = run_ours(out)
    ok = not report.missing and not report.unexpected
    print(f"reference {args.family}:{args.variant} vs plfusion {meta['our_name']}")
    print(f"  weights: {len(report.loaded)} loaded, {len(report.missing)} missing, "
          f"{len(report.unexpected)} unexpected")
    for i, mine in enumerate(ours):
        ref = np.load(os.path.join(out, f"output_{i}.npy"))
        if ref.shape != mine.shape:
            print(f"  output {i}: shape differs: reference {ref.shape} vs ours {mine.shape}")
            ok = False
            continue
        diff = float(np.abs(ref - mine).max())
        scale = float(np.abs(ref).max())
        print(f"  output {i} {list(ref.shape)}: max abs diff {diff:.3e} (max |ref| {scale:.3e})")
        ok = ok and diff <= args.atol * max(1.0, scale)
    print("  MATCH" if ok else "  MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
