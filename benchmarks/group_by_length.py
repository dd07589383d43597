"""What `data.group_by_length` saves when text blocks train: MiniLM's top 2 blocks on cached hidden states.

The same model and batches (MVSA-Single, CLMLF train; `model.freeze: top_k` with the top 2 MiniLM
blocks trainable, cross-attention fusion) are timed for N optimizer steps with batches drawn in
random order (the default) and with batches of similar caption length, alternating the two
settings R times in one process so machine load hits both alike. Reported: text positions per
step (the padding) and seconds per step, as ratios.

    python benchmarks/group_by_length.py [--steps 20] [--repeats 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from itertools import islice

import torch
from bench_common import RESULTS, machine
from mvsa_recipe import BASE, CROSS, TOP_TEXT, base_overrides, selection_view

from fusionkit.models import model_inputs
from fusionkit.training.config import build_config
from fusionkit.training.trainer import Trainer


def timed_steps(trainer: Trainer, steps: int) -> tuple[float, float]:
    """Seconds per optimizer step and text positions per batch over `steps` steps of epoch 0."""
    model = trainer.model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    trainer.train_sampler.set_epoch(0)
    positions, seconds = [], []
    for batch in islice(trainer.train_loader, steps):
        t0 = time.perf_counter()
        loss = model.loss(model(**model_inputs(batch)), batch["labels"], batch["label_mask"])["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t0)
        positions.append(batch["attention_mask"].numel())
    return statistics.fmean(seconds), statistics.fmean(positions)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", default="/work/.fkcache")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = selection_view()
    base = {**base_overrides(args.cache_dir, "runs/group_by_length"), **CROSS, **TOP_TEXT,
            "model.fusion.dim": 128, "model.fusion.image_grid": 4, "run.name_exists": "increment"}  # fmt: skip
    trainers = {
        g: Trainer(build_config(BASE, {**base, "data.group_by_length": g, "run.name": f"g{int(g)}"}), data=data)
        for g in (False, True)
    }
    results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for r in range(args.repeats):
        for g, trainer in trainers.items():
            results[g].append(timed_steps(trainer, args.steps))
            print(f"repeat {r} group_by_length={g}: {results[g][-1][0]:.3f} s/step, "
                  f"{results[g][-1][1]:.0f} text positions/batch", flush=True)  # fmt: skip
    s = {g: statistics.fmean(x[0] for x in v) for g, v in results.items()}
    pos = {g: statistics.fmean(x[1] for x in v) for g, v in results.items()}
    out = {
        "machine": machine(),
        "setting": "MVSA-Single CLMLF train, top 2 MiniLM-L6 blocks on cached hidden states + cross-attention, batch 32",
        "steps": args.steps, "repeats": args.repeats, "threads": args.threads,
        "seconds_per_step": {"random": s[False], "grouped": s[True]},
        "text_positions_per_batch": {"random": pos[False], "grouped": pos[True]},
        "speedup": s[False] / s[True], "padding_ratio": pos[False] / pos[True],
    }  # fmt: skip
    (RESULTS / "group_by_length.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
