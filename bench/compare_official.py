"""Check dinokit against the official DINO code: its files load, and give its features and attention.

    python bench/compare_official.py /tmp/dino [--images DIR] [--out bench/results/compare_official.json]

``/tmp/dino`` is a checkout of github.com/facebookresearch/dino (imported from there at run time;
never part of dinokit). For ViT-S/16 and ViT-S/8 with random weights the script
  1. builds the official backbone, student and teacher (``MultiCropWrapper`` + ``DINOHead``, the
     student in DDP as ``main_dino.py`` has it) and saves them as the official code does: a
     backbone-only file, and a full checkpoint (``student``/``teacher``/``optimizer``/``epoch``/
     ``args`` as an ``argparse.Namespace``/``dino_loss``);
  2. loads them with ``dinokit.load_backbone`` (teacher, student) and ``dinokit train``'s
     ``init_training_state``;
  3. compares [CLS] features (``forward``) and last-block attention (``get_last_selfattention``)
     on random inputs and on real images at 224 x 224 and at non-square sizes, and the
     teacher's head logits; prints and saves the largest absolute differences. At sizes other
     than 224 x 224 the comparison is repeated with ours fed the official position embeddings,
     which separates the two codes' position-embedding interpolation from everything else.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from dinokit.config import IMAGENET_MEAN, IMAGENET_STD, TrainConfig
from dinokit.hub.load import load_backbone
from dinokit.train.init_weights import init_training_state
from dinokit.train.loop import build_state

SIZES = [(224, 224), (224, 320), (320, 224)]  # H x W, multiples of 8 and 16
DEFAULT_IMAGES = Path("/work/shared/data/cifar10/train")


def import_official(clone: Path):
    """The official modules, imported from the checkout."""
    sys.path.insert(0, str(clone))
    torch.hub.list = lambda *args, **kwargs: []  # main_dino's parser asks GitHub for XCiT names; offline
    import main_dino
    import utils
    import vision_transformer

    return vision_transformer, utils, main_dino


def perturb(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Noise on every parameter, so norm gains and biases are not at their initial 1 and 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def real_images(folder: Path, n: int, size: tuple[int, int]) -> torch.Tensor:
    """``n`` images (one per class folder), resized bicubically to ``size`` (H x W) and normalised."""
    files = [sorted(d.glob("*.jpg"))[0] for d in sorted(folder.iterdir()) if d.is_dir()][:n]
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    batch = []
    for f in files:
        img = Image.open(f).convert("RGB").resize((size[1], size[0]), Image.BICUBIC)
        batch.append((torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255 - mean) / std)
    return torch.stack(batch)


def save_official(vits, utils, main_dino, patch: int, folder: Path) -> tuple[dict, Path, Path]:
    """Official networks with random weights, saved the official way; returns them and the two files."""
    args = main_dino.get_args_parser().parse_args(["--arch", "vit_small", "--patch_size", str(patch)])
    torch.manual_seed(patch)
    student = utils.MultiCropWrapper(vits.vit_small(patch_size=patch, drop_path_rate=args.drop_path_rate),
                                     main_dino.DINOHead(384, args.out_dim, args.use_bn_in_head, args.norm_last_layer))
    teacher = utils.MultiCropWrapper(vits.vit_small(patch_size=patch),
                                     main_dino.DINOHead(384, args.out_dim, args.use_bn_in_head))
    perturb(student, seed=patch)
    student = torch.nn.parallel.DistributedDataParallel(student)
    teacher.load_state_dict(student.module.state_dict())
    perturb(student.module, seed=100 + patch)  # as after some steps: the student is no longer the teacher
    dino_loss = main_dino.DINOLoss(args.out_dim, args.local_crops_number + 2, args.warmup_teacher_temp,
                                   args.teacher_temp, args.warmup_teacher_temp_epochs, args.epochs)
    dino_loss.center.normal_()
    optimizer = torch.optim.AdamW(utils.get_params_groups(student))
    backbone_file, full_file = folder / f"vits{patch}_backbone.pth", folder / f"vits{patch}_checkpoint.pth"
    torch.save(teacher.backbone.state_dict(), backbone_file)  # what the released *_pretrain.pth files hold
    torch.save({"student": student.state_dict(), "teacher": teacher.state_dict(), "optimizer": optimizer.state_dict(),
                "epoch": 100, "args": args, "dino_loss": dino_loss.state_dict()}, full_file)
    nets = {"teacher": teacher.eval(), "student": student.module.eval(), "center": dino_loss.center}
    return nets, backbone_file, full_file


@torch.no_grad()
def differences(official: torch.nn.Module, ours: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    return {"features": (official(x) - ours(x)).abs().max().item(),
            "attention": (official.get_last_selfattention(x) - ours.get_last_selfattention(x)).abs().max().item()}


@torch.no_grad()
def compare(official: torch.nn.Module, ours: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Largest differences, and again with ours given the official position embeddings for x's size
    (``*_same_positions``): what remains once the two interpolations are taken out of the comparison."""
    result = differences(official, ours, x)
    tokens = torch.cat([official.cls_token.expand(len(x), -1, -1), official.patch_embed(x)], dim=1)
    positions = official.interpolate_pos_encoding(tokens, x.shape[2], x.shape[3])  # its (w, h) are (H, W)
    ours.interpolate_pos_encoding = lambda height, width: positions
    try:
        same = differences(official, ours, x)
    finally:
        del ours.interpolate_pos_encoding
    return {**result, **{f"{k}_same_positions": v for k, v in same.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("clone", type=Path, help="checkout of facebookresearch/dino")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of class folders of .jpg images")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    opts = parser.parse_args()
    vits, utils, main_dino = import_official(opts.clone.resolve())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=0, world_size=1)
        for patch in (16, 8):
            nets, backbone_file, full_file = save_official(vits, utils, main_dino, patch, Path(tmp))
            loaded = {
                "backbone-only file": (nets["teacher"].backbone, load_backbone(backbone_file)),
                "full checkpoint, teacher": (nets["teacher"].backbone, load_backbone(full_file)),
                "full checkpoint, student": (nets["student"].backbone, load_backbone(full_file, which="student")),
            }
            for size in SIZES:
                inputs = {"random": torch.randn(opts.batch, 3, *size, generator=torch.Generator().manual_seed(0))}
                if opts.images.is_dir():
                    inputs["real"] = real_images(opts.images, opts.batch, size)
                for source, (official, ours) in loaded.items():
                    for kind, x in inputs.items():
                        rows.append({"model": f"ViT-S/{patch}", "source": source, "input": kind,
                                     "size": f"{size[0]}x{size[1]}", **compare(official, ours, x)})
                        print(json.dumps(rows[-1]), flush=True)

            cfg = TrainConfig(arch="vit_small", patch_size=patch, device="cpu")
            state = build_state(cfg, torch.device("cpu"))
            messages = init_training_state(state, full_file)
            x = torch.randn(opts.batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                logits = (nets["teacher"](x) - state.teacher(x)).abs().max().item()
            rows.append({"model": f"ViT-S/{patch}", "source": "dinokit train --init (full checkpoint)",
                         "input": "random", "size": "224x224", "teacher_logits": logits,
                         "center": (nets["center"] - state.loss.center).abs().max().item(), "messages": messages})
            print(json.dumps(rows[-1]), flush=True)
        dist.destroy_process_group()

    quantities = ("features", "attention", "features_same_positions", "attention_same_positions", "teacher_logits",
                  "center")
    worst = {q: max(r[q] for r in rows if q in r) for q in quantities}
    print("\nlargest absolute difference, official vs dinokit:")
    for quantity, value in worst.items():
        print(f"  {quantity:<25} {value:.3e}")
    for size in {r["size"] for r in rows}:
        sub = [r for r in rows if r["size"] == size and "features" in r]
        if sub:
            print(f"  at {size}: features {max(r['features'] for r in sub):.3e}, "
                  f"attention {max(r['attention'] for r in sub):.3e}; with the official position embeddings: "
                  f"{max(r['features_same_positions'] for r in sub):.3e}, "
                  f"{max(r['attention_same_positions'] for r in sub):.3e}")
    if opts.out:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps({"torch": torch.__version__, "worst": worst, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
