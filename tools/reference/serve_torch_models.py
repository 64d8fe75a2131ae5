"""PyTorch side of tools/reference/interleave_models.py: one model, a train step or an inference
batch per request (the protocol of tools/reference/lockstep.py).

Scratch torch venv only, never a plfusion dependency. Models (tools/reference/zoo.py): timm
ViT-B/16 and Swin-T, and the official WeTr of TokenFusion (a yikaiw/TokenFusion checkout) or
GeminiFusion (a JiaDingCN/GeminiFusion checkout), built by tools/reference/fusion.py:

    /tmp/torchenv/bin/python tools/reference/serve_torch_models.py --model gemini_b0 --jobs train infer \
        --threads 2 --geminifusion-repo /tmp/GeminiFusion        # then stdin lines `torch train` / `torch infer`

train: forward, loss, backward and an AdamW step, as the official train() (cross entropy summed
over [rgb, depth, ensemble] logits, plus TokenFusion's L1 on its masks); infer: eval mode under
torch.inference_mode (eager PyTorch's fastest).
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zoo  # noqa: E402
from _common import import_timm  # noqa: E402
from lockstep import claim_stdout, serve  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, choices=sorted(zoo.MODELS))
    p.add_argument("--jobs", nargs="+", choices=zoo.JOBS, default=list(zoo.JOBS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--train-batch", type=int, default=None)
    p.add_argument("--infer-batch", type=int, default=None)
    p.add_argument("--tokenfusion-repo", default=None, help="yikaiw/TokenFusion checkout (token_* models)")
    p.add_argument("--geminifusion-repo", default=None, help="JiaDingCN/GeminiFusion checkout (gemini_* models)")
    return p.parse_args(argv)


def build(key, args):
    """(model, description)."""
    kind, what, _ = zoo.MODELS[key]
    if kind == "classifier":
        timm = import_timm()
        model = timm.create_model(what, pretrained=False, drop_path_rate=zoo.DROP_PATH)
        return model, f"timm {timm.__version__} {what}"
    from fusion import build_official
    fusion, backbone = what
    repo = args.tokenfusion_repo if fusion == "tokenfusion" else args.geminifusion_repo
    if not repo:
        raise SystemExit(f"--model {key} needs --{fusion}-repo")
    return build_official(repo, fusion, backbone, dpr=zoo.DROP_PATH), f"official {fusion} WeTr {backbone}"


def train_step(model, kind, images, labels):
    x = [torch.from_numpy(a) for a in images]
    y = torch.from_numpy(labels)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=zoo.LR,
                            weight_decay=zoo.WEIGHT_DECAY)

    def step():
        model.train()
        if kind == "classifier":
            loss = F.cross_entropy(model(x[0]), y)
        else:
            outs, masks = model(x)
            loss = sum(F.cross_entropy(o, y, ignore_index=zoo.IGNORE) for o in outs)
            if masks is not None:   # TokenFusion's sparsity term, as its train()
                loss = loss + zoo.SPARSITY * sum(m.abs().sum() for mask in masks for m in mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def infer(model, kind, images):
    x = [torch.from_numpy(a) for a in images]

    def run():
        model.eval()
        with torch.inference_mode():
            model(x[0] if kind == "classifier" else x)
    return run


def main(argv=None):
    args = parse_args(argv)
    out = claim_stdout()        # the official WeTr prints while it is built
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, what = build(args.model, args)
    kind = zoo.MODELS[args.model][0]
    settings, shapes = {}, {}
    for job in args.jobs:
        batch = args.train_batch if job == "train" else args.infer_batch
        images, labels = zoo.make_inputs(args.model, job, batch, args.seed)
        settings[f"torch {job}"] = train_step(model, kind, images, labels) if job == "train" else \
            infer(model, kind, images)
        shapes[job] = list(images[0].shape)
    serve(settings, {"torch": torch.__version__, "threads": torch.get_num_threads(), "what": what,
                     "shapes": shapes}, args.warmup, out)


if __name__ == "__main__":
    main()
