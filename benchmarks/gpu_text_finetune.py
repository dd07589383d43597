"""Fine-tune the whole MiniLM-L6 text encoder on MVSA-Single, image side from cached DINOv2-S features.

A GPU probe of the lever `mvsa_single_recipe.md` names (letting the text encoder adapt), sized to one
64-MiB device call: fp16 MiniLM weights + DINOv2 features pooled to CLS + mean patch (image_grid 1).
Same protocol as the CPU table: fit on 90% of CLMLF train, select the epoch on the held-out 10%,
report CLMLF dev at that epoch, 3 seeds.

    python benchmarks/gpu_text_finetune.py pack gpu_assets        # here: write the assets (~50 MB)
    PYTHONPATH=. python benchmarks/gpu_text_finetune.py train gpu_assets OUT.json   # on the GPU
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

SPLITS = ("train", "val", "test")  # fit / held-out selection / CLMLF dev


def pack(out: Path) -> None:
    """MiniLM in fp16, DINOv2's config, captions + labels + pooled image features of the selection view."""
    import glob
    import shutil

    import numpy as np
    from bench_common import minilm_dir
    from mvsa_recipe import selection_view
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    src = Path(minilm_dir() or "")
    (out / "minilm").mkdir(exist_ok=True)
    for f in (
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.txt",
    ):
        shutil.copy(src / f, out / "minilm" / f)
    save_file({k: v.half() for k, v in load_file(str(src / "model.safetensors")).items()},
              str(out / "minilm" / "model.safetensors"))  # fmt: skip
    (out / "dinov2").mkdir(exist_ok=True)
    for f in ("config.json", "preprocessor_config.json"):
        shutil.copy(Path("/work/shared/weights/dinov2-small") / f, out / "dinov2" / f)
    view = selection_view()
    text = {ex.id: ex.text or "" for ex in view}
    data = {}
    for split in SPLITS:
        [path] = glob.glob(f"/work/.fkcache/features-mvsa-single[[]select[]][[]{split}[]]-*")
        meta = json.loads((Path(path) / "meta.json").read_text())
        image = np.load(Path(path) / "image.npy", mmap_mode="r")
        pooled = np.stack([image[:, 0], image[:, 1:].astype(np.float32).mean(1)], axis=1).astype(np.float16)
        data[split] = {"ids": meta["ids"], "text": [text[i] for i in meta["ids"]],
                       "labels": [lab["sentiment"] for lab in meta["labels"]], "image": torch.from_numpy(pooled)}  # fmt: skip
    torch.save(data, out / "data.pt")


def batch(enc: dict, image: torch.Tensor, idx: torch.Tensor, dev: torch.device) -> dict:
    return {"input_ids": enc["input_ids"][idx].to(dev), "attention_mask": enc["attention_mask"][idx].to(dev),
            "image_features": image[idx].float().to(dev)}  # fmt: skip


@torch.no_grad()
def scores(model: torch.nn.Module, enc: dict, image: torch.Tensor, y: torch.Tensor) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    model.eval()
    dev, preds = y.device, []
    for i in range(0, len(y), 256):
        idx = torch.arange(i, min(i + 256, len(y)))
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            preds.append(model(**batch(enc, image, idx, dev))["sentiment"].argmax(-1).cpu())
    model.train()
    p, t = torch.cat(preds).numpy(), y.cpu().numpy()
    return {"accuracy": accuracy_score(t, p), "macro_f1": f1_score(t, p, average="macro"),
            "weighted_f1": f1_score(t, p, average="weighted")}  # fmt: skip


def train(assets: Path, out: Path, seeds: int = 3, epochs: int = 5) -> None:
    from fusionkit.config import ImageEncoderConfig, TaskConfig, TextEncoderConfig
    from fusionkit.models import FusionModel, get_config
    from fusionkit.training.config import OptimConfig
    from fusionkit.training.optim import build_optimizer, build_scheduler

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = torch.load(assets / "data.pt", weights_only=False)
    limit = int(os.environ.get("SMOKE", "0"))  # a local smoke test on the first rows only
    if limit:
        data = {k: {f: v[:: max(1, len(v) // limit)] for f, v in d.items()} for k, d in data.items()}
    labels = data["train"]["labels"]
    counts = [labels.count(c) for c in range(3)]
    weights = [round(len(labels) / (3 * n), 6) for n in counts]
    sentiment = TaskConfig("sentiment", class_names=["positive", "neutral", "negative"], num_classes=3,
                           class_weights=weights, label_smoothing=0.1)  # fmt: skip
    supcon = TaskConfig(
        "supcon", "supcon", weight=0.3, params={"labels_from": "sentiment", "temperature": 0.1}
    )
    results = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        cfg = get_config("minilm-dinov2-small")
        cfg.text = TextEncoderConfig(str(assets / "minilm"), max_length=64)
        cfg.image = ImageEncoderConfig("hf", str(assets / "dinov2"), pretrained=False)
        cfg.fusion.strategy, cfg.fusion.dim, cfg.fusion.image_grid = "late", 128, 1
        cfg.tasks, cfg.freeze = [sentiment, supcon], "none"
        model = FusionModel(cfg).to(dev)
        model.image_encoder.requires_grad_(False)  # the image side comes from cached features
        tok = model.tokenizer
        enc = {
            s: tok(data[s]["text"], max_length=64, truncation=True, padding=True, return_tensors="pt")
            for s in SPLITS
        }
        ocfg = OptimConfig(lr=1e-3, encoder_lr_scale=0.03, weight_decay=0.05, warmup_ratio=0.1, epochs=epochs)
        opt = build_optimizer(model, ocfg)
        n = len(labels)
        steps = epochs * ((n + 31) // 32)
        sched = build_scheduler(opt, ocfg, steps)
        y = {s: torch.tensor(data[s]["labels"], device=dev) for s in SPLITS}

        t0, history = time.perf_counter(), []
        model.train()
        for epoch in range(epochs):
            g = torch.Generator().manual_seed(seed * 100 + epoch)
            for idx in torch.randperm(n, generator=g).split(32):
                b = batch(enc["train"], data["train"]["image"], idx, dev)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                    outputs = model(**b)
                    lab = {"sentiment": y["train"][idx.to(dev)]}
                    loss = model.loss(
                        outputs, lab, {"sentiment": torch.ones(len(idx), dtype=torch.bool, device=dev)}
                    )["loss"]
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            history.append({"epoch": epoch + 1, "val": scores(model, enc["val"], data["val"]["image"], y["val"]),
                            "dev": scores(model, enc["test"], data["test"]["image"], y["test"])})  # fmt: skip
        best = max(history, key=lambda h: h["val"]["weighted_f1"])
        results.append({"seed": seed, "best_epoch": best["epoch"], "dev": best["dev"], "held_out": best["val"],
                        "seconds": time.perf_counter() - t0, "history": history})  # fmt: skip
        print(
            json.dumps(results[-1]["dev"]),
            results[-1]["best_epoch"],
            f"{results[-1]['seconds']:.1f}s",
            flush=True,
        )
    summary = {m: (statistics.fmean(r["dev"][m] for r in results), statistics.stdev(r["dev"][m] for r in results)
                   if len(results) > 1 else 0.0) for m in ("accuracy", "macro_f1", "weighted_f1")}  # fmt: skip
    device = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    out.write_text(
        json.dumps(
            {"device": device, "torch": torch.__version__, "summary": summary, "runs": results}, indent=1
        )
    )
    print(json.dumps({"device": device, "summary": summary}))


if __name__ == "__main__":
    mode, path = sys.argv[1], Path(sys.argv[2])
    if mode == "pack":
        pack(path)
    else:
        train(path, Path(sys.argv[3]), seeds=int(sys.argv[4]) if len(sys.argv) > 4 else 3,
              epochs=int(sys.argv[5]) if len(sys.argv) > 5 else 5)  # fmt: skip
