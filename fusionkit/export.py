"""Deployment: ONNX export (fp32 / int8) with a parity check, int8 dynamic quantization, torch.compile.

    from fusionkit.export import export_onnx, OnnxModel, quantize_dynamic
    report = export_onnx(model, "export/")                  # model.onnx, encode*.onnx + processor files
    session = OnnxModel("export/encode.onnx")
    vectors = session(**processor(texts, images))["vectors"]
    int8_model = quantize_dynamic(model)                    # nn.Linear -> int8 weights, PyTorch CPU

Graphs (each with dynamic batch and, for text, sequence axes; the image size is fixed by the encoder):
- `model.onnx`: input_ids, attention_mask, pixel_values -> one `logits_<task>` per labelled task
  (ITM/contrastive outputs compare a batch with itself and are left out); a unimodal baseline's
  `model.onnx` and `encode.onnx` take the inputs of its one side only;
- `encode.onnx` (joint), `encode_text.onnx`, `encode_image.onnx` -> `vectors` [B, dim].
The graphs take complete pairs: rows with a missing caption or image need the PyTorch model, which
swaps in its learned placeholders with data-dependent control flow that ONNX graphs do not carry.

Exporter: `torch.onnx.export(dynamo=True)` (torch.export + onnxscript). The legacy TorchScript
tracer bakes the example's sequence length into the attention masks of transformers 5 models and
gives wrong outputs for other lengths, so it is not used. `pip install fusionkit[export]`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .config import to_dict
from .models import FusionModel

if TYPE_CHECKING:
    from .processor import FusionProcessor

log = logging.getLogger("fusionkit.export")

PARTS = ("model", "encode", "encode_text", "encode_image")
_TEXT_INPUTS = ("input_ids", "attention_mask")
# Parity tolerances against the PyTorch fp32 model. fp32 graphs agree to ~1e-6 (tiny models and
# MiniLM-L6 + DINOv2-S alike). int8 is lossy and model-dependent: cosine >= 0.9999 on tiny models,
# ~0.97 for MiniLM-L6 + DINOv2-S vectors on real photos (benchmarks/results/inference.md).
FP32_ATOL = 1e-4
INT8_MIN_COSINE = 0.98
# How to read a task type's `logits_<task>` output, written into export.json for serving without fusionkit
# (the PyTorch model's `predict` reads them so); a plugin's task type not listed is said to be its raw output.
OUTPUT_READS = {
    "classification": "logits: softmax over class_names (in that order); the predicted class is the most probable",
    "multilabel": "logits: sigmoid per tag (class_names order); a tag is predicted where its probability > threshold "
                  "(one number for every tag, or one per tag in class_names order)",
    "regression": "values on the target scale (already de-standardized): use them as they are, one column per target",
}


def missing_export_packages() -> list[str]:
    """The packages of the `export` extra that are not installed."""
    import importlib.util

    return [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]


def _require_onnx() -> None:
    if missing := missing_export_packages():
        raise ImportError(f"ONNX export needs {missing}: pip install 'fusionkit[export]'")


class _Part(nn.Module):
    """One exportable entry point of a `FusionModel` with positional tensor inputs."""

    def __init__(self, model: FusionModel, part: str, normalize: bool) -> None:
        super().__init__()
        self.model, self.part, self.normalize = model, part, normalize
        self.tasks = [name for name, task in model.tasks.items() if getattr(task, "needs_labels", True)]

    @property
    def input_names(self) -> list[str]:
        """The inputs the part reads: a unimodal baseline's `model` / `encode` graphs take its one side only
        (a text_only graph asking for pixel_values would refuse rows without an image it never looks at)."""
        if self.part == "encode_text":
            return list(_TEXT_INPUTS)
        if self.part == "encode_image":
            return ["pixel_values"]
        return [*(_TEXT_INPUTS if self.model.needs_text else ()), *(["pixel_values"] if self.model.needs_image else ())]

    @property
    def output_names(self) -> list[str]:
        return [f"logits_{t}" for t in self.tasks] if self.part == "model" else ["vectors"]

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kw = dict(zip(self.input_names, inputs))
        if self.part == "model":
            out = self.model(**kw)
            return tuple(out[t] for t in self.tasks)
        if self.part == "encode":
            return (self.model.encode(normalize=self.normalize, **kw),)
        if self.part == "encode_text":
            return (self.model.encode_text(kw["input_ids"], kw["attention_mask"], normalize=self.normalize),)
        return (self.model.encode_image(kw["pixel_values"], normalize=self.normalize),)


def example_inputs(
    model: FusionModel, batch: int = 2, seq: int = 8, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random valid inputs (token ids in the vocabulary, ragged attention masks, normalized-scale pixels)."""
    g = torch.Generator().manual_seed(seed)
    seq = min(seq, model.config.text.max_length)
    vocab = int(getattr(model.text_encoder.model.config, "vocab_size", 100))
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    for row in range(1, batch):  # ragged lengths: padding must be handled by the graph, not baked in
        mask[row, max(1, seq - 2 * row) :] = 0
    h, w = model.image_preprocess.size
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.randn(batch, 3, h, w, generator=g),
    }


def _dynamic_shapes(names: Sequence[str]) -> dict[str, dict[int, Any]]:
    from torch.export import Dim

    batch, seq = Dim("batch", min=1, max=4096), Dim("sequence", min=1, max=8192)
    return {n: ({0: batch, 1: seq} if n in _TEXT_INPUTS else {0: batch}) for n in names}


def export_part(model: FusionModel, part: str, path: str | Path, normalize: bool = True) -> Path:
    """Export one entry point (`PARTS`) of an eval-mode copy-free model to `path` (.onnx)."""
    _require_onnx()
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; choose from {PARTS}")
    wrapper = _Part(model, part, normalize).eval()
    if part == "model" and not wrapper.tasks:
        raise ValueError("the model has no labelled task to export logits for; export the encode parts")
    inputs = example_inputs(model)
    args = tuple(inputs[n] for n in wrapper.input_names)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper,
            args,
            dynamo=True,
            input_names=wrapper.input_names,
            output_names=wrapper.output_names,
            dynamic_shapes=(tuple(_dynamic_shapes(wrapper.input_names).values()),),  # forward(*inputs)
            optimize=True,
            verbose=False,
        )
    program.save(str(path))
    return path


def quantize_onnx(src: str | Path, dst: str | Path) -> Path:
    """int8 dynamic quantization of an ONNX graph's MatMul/Gemm weights (activations quantized per batch)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    root.addFilter(_no_preprocess_hint)  # onnxruntime's root-logger hint, once per graph: not for dynamic int8
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    finally:
        root.removeFilter(_no_preprocess_hint)
    return Path(dst)


def _no_preprocess_hint(record: logging.LogRecord) -> bool:
    return "Please consider to run pre-processing before quantization" not in record.getMessage()


class OnnxModel:
    """An ONNX Runtime session that takes the processor's tensors and returns `{output name: array}`."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, **inputs: Any) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise ValueError(f"{self.path.name} needs inputs {self.input_names}; missing {missing}")
        for flag, reads in (("text_present", "input_ids"), ("image_present", "pixel_values")):
            present = inputs.get(flag)
            if present is not None and reads in self.input_names and not _numpy(present).all():
                rows = np.flatnonzero(~_numpy(present).astype(bool)).tolist()
                raise ValueError(f"rows {rows[:5]} have no {flag.split('_')[0]}, which {self.path.name} reads in every "
                                 "row (the PyTorch model predicts rows with a missing side)")  # fmt: skip
        feed = {n: _numpy(inputs[n]) for n in self.input_names}
        return dict(zip(self.output_names, self.session.run(None, feed)))


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def parity(
    model: FusionModel, onnx_model: OnnxModel, part: str, normalize: bool = True, seed: int = 1
) -> dict[str, Any]:
    """Max abs difference and min cosine of `onnx_model` vs PyTorch on inputs of new batch/sequence sizes."""
    wrapper = _Part(model, part, normalize).eval()
    inputs = example_inputs(model, batch=3, seq=13, seed=seed)
    with torch.no_grad():
        expected = [t.float().numpy() for t in wrapper(*(inputs[n] for n in wrapper.input_names))]
    got = onnx_model(**inputs)
    diffs, scaled, cosines = [], {}, []
    for name, ref in zip(wrapper.output_names, expected):
        out = got[name].astype(np.float32)
        diffs.append(float(np.abs(out - ref).max()))
        # relative beyond magnitude 1: a regression output of 5,000 carries float32 steps of ~5e-4
        scaled[name] = diffs[-1] / max(1.0, float(np.abs(ref).max()))
        a, b = out.reshape(len(out), -1), ref.reshape(len(ref), -1)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
        cosines.append(float(cos.min()))
    worst = max(scaled, key=scaled.get)  # judged relative beyond magnitude 1; each output's own figures beside
    return {"max_abs_diff": max(diffs), "max_scaled_diff": scaled[worst], "worst_output": worst,
            "min_cosine": min(cosines),
            "per_output": {name: {"max_abs_diff": d, "max_scaled_diff": scaled[name]}
                           for name, d in zip(wrapper.output_names, diffs)}}  # fmt: skip


def check_export_dir(output_dir: str | Path) -> Path:
    """An export goes to a new or empty folder: a user's files are never overwritten, nor mixed with it."""
    out = Path(output_dir)
    if (out / "export.json").exists():  # an earlier export: its graphs are never overwritten or mixed with ours
        raise FileExistsError(f"{out} already holds an export (export.json); export to a new folder")
    if out.is_file():
        raise FileExistsError(f"{out} is a file; export writes a folder of graphs and processor files: name a new one")
    if out.is_dir() and any(out.iterdir()):
        held = sorted(p.name for p in out.iterdir())
        raise FileExistsError(f"{out} is not empty ({', '.join(held[:5])}{', ...' if len(held) > 5 else ''}); "
                              "export writes graphs, tokenizer and processor files: export to a new or empty folder")  # fmt: skip
    return out


def export_onnx(
    model: FusionModel,
    output_dir: str | Path,
    parts: Sequence[str] = PARTS,
    int8: bool = False,
    normalize: bool = True,
    check: bool = True,
) -> dict[str, Any]:
    """Export `parts` to `output_dir/<part>.onnx` (+ `<part>.int8.onnx`), save the processor beside them,
    check parity against PyTorch and write `export.json` (files, inputs, outputs, measured parity, how to read
    each task's output and the preprocessing steps: what serving without fusionkit needs).

    Raises if an fp32 graph differs from PyTorch by more than `FP32_ATOL` (relative for outputs beyond
    magnitude 1): a broken export fails here, not in production, and leaves no folder behind (the graphs
    are written to a temp folder renamed into place). int8 graphs are lossy by design; one under
    `INT8_MIN_COSINE` is logged.
    """
    _require_onnx()
    final = check_export_dir(output_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        report = _export_into(model, out, parts, int8, normalize, check)
        os.replace(out, final)  # over an empty folder too
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    from .models.fusion_model import follow_umask

    follow_umask(final)
    return report


def _export_into(
    model: FusionModel, out: Path, parts: Sequence[str], int8: bool, normalize: bool, check: bool
) -> dict[str, Any]:
    from .processor import FusionProcessor

    was_training = model.training
    model.eval()
    report: dict[str, Any] = {"normalize": normalize, "parts": {}}
    try:
        for part in parts:
            files = {"fp32": export_part(model, part, out / f"{part}.onnx", normalize)}
            if int8:
                files["int8"] = quantize_onnx(files["fp32"], out / f"{part}.int8.onnx")
            entry: dict[str, Any] = {}
            for kind, path in files.items():
                session = OnnxModel(path)
                entry[kind] = {
                    "file": path.name,
                    "inputs": session.input_names,
                    "outputs": session.output_names,
                }
                if check:
                    entry[kind]["parity"] = result = parity(model, session, part, normalize)
                    _check(part, kind, result)
            report["parts"][part] = entry
            log.info("exported %s: %s", part, entry)
    finally:
        model.train(was_training)
    # What each `logits_<task>` column means, so the folder serves without the run dir: label strings in order.
    outputs = {o for entry in report["parts"].values() for kind in entry.values() for o in kind["outputs"]}
    # a multilabel task's threshold(s) too: a tag is predicted where sigmoid(logit) > threshold, not 0.5 always
    report["tasks"] = {name: {"type": task.type, "output": f"logits_{name}", "class_names": task.class_names,
                              **({"threshold": task.cfg.params.get("threshold", 0.5)} if task.type == "multilabel" else {}),
                              "reads": OUTPUT_READS.get(task.type, f"the {task.type} task's raw output")}
                       for name, task in model.tasks.items() if f"logits_{name}" in outputs}  # fmt: skip
    processor = FusionProcessor.from_model(model)
    processor.save_pretrained(out)
    report["preprocess"] = serving_recipe(processor, out)
    (out / "export.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    return report


def serving_recipe(processor: FusionProcessor, folder: Path) -> dict[str, Any]:
    """export.json's "preprocess": the processor's steps in words and fields, so the graphs serve without fusionkit
    (the processor computes exactly these; `processor_config.json` holds the same fields)."""
    from .data.image import _scaled_side, shorter_side
    from .models.encoders import TOKENIZER_FILES

    p = processor.image_preprocess
    h, w = p.size
    sh, sw = _scaled_side(h, p.crop_pct), _scaled_side(w, p.crop_pct)
    short = shorter_side(p)
    if p.crop_mode == "squash":
        resize = f"resize to {sh} x {sw} (height x width: floor(size / crop_pct) each, the aspect ratio not kept)"
    elif short is not None:
        resize = (f"resize the shorter side to {short} (floor({min(h, w)} / crop_pct)), the longer to "
                  f"int({short} * long / short)")  # fmt: skip
    else:
        resize = f"resize keeping the aspect ratio to cover {sh} x {sw} (floor(size / crop_pct)), each side rounded"
    offset = "(resized - size) // 2" if p.crop_offset == "floor" else "round((resized - size) / 2), a half to even"
    image = {**to_dict(p), "steps": [
        "decode, apply the EXIF orientation, convert to RGB (transparency composited on white)",
        f"{resize}, with PIL's {p.interpolation} resampling in one pass",
        f"center-crop to {h} x {w} (height x width), the top and left offsets {offset}",
        "scale to [0, 1] (divide by 255), then per channel subtract mean and divide by std",
        f"pixel_values: float32 [batch, 3, {h}, {w}], RGB",
    ]}  # fmt: skip
    files = [n for n in (*TOKENIZER_FILES, "tokenizer_config.json", "special_tokens_map.json") if (folder / n).is_file()]
    text = {"tokenizer_files": files, "max_length": processor.max_length,
            "normalize": getattr(processor.tokenizer, "fusionkit_normalize", "none"), "steps": [
        "strip the caption's leading and trailing whitespace (a blank caption, or one spelled like a missing value "
        "such as 'nan', is a missing one: those rows need the PyTorch model)",
        f"tokenize with {'tokenizer.json' if 'tokenizer.json' in files else 'transformers.AutoTokenizer'} (its "
        f"normalizer holds `normalize`), truncated at max_length "
        f"{processor.max_length} tokens, padded to the batch's longest",
        "input_ids and attention_mask: int64 [batch, sequence]",
    ]}  # fmt: skip
    return {"text": text, "image": image}


def _check(part: str, kind: str, result: Mapping[str, Any]) -> None:
    if kind == "fp32" and result["max_scaled_diff"] > FP32_ATOL:
        raise ValueError(f"{part}.onnx output {result['worst_output']} differs from PyTorch by "
                         f"{result['max_scaled_diff']:.2e} (relative beyond magnitude 1) > {FP32_ATOL}: the graph "
                         "is not the model; nothing was written")  # fmt: skip
    if kind == "int8" and result["min_cosine"] < INT8_MIN_COSINE:  # lossy by design: say so, keep the file
        log.warning(
            "%s.int8.onnx: min cosine to PyTorch %.4f < %s; check its accuracy before serving it",
            part, result["min_cosine"], INT8_MIN_COSINE,
        )  # fmt: skip


def quantize_dynamic(model: FusionModel) -> FusionModel:
    """A copy of `model` with every `nn.Linear` in int8 (weights static, activations per batch), for CPU.

    Uses `torch.ao.quantization.quantize_dynamic` (deprecated in favour of torchao, still shipped);
    the copy is for inference only.
    """
    import copy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8
        )
    return quantized


def compile_model(model: FusionModel, dynamic: bool = True) -> FusionModel:
    """Compile the two encoders (most of the compute) in place with `torch.compile`; returns the model.

    `dynamic=True`: one graph for every batch size and sequence length (no recompiling per batch).
    """
    for encoder in (model.text_encoder, model.image_encoder):
        if not getattr(encoder, "_fusionkit_compiled", False):
            encoder.forward = torch.compile(encoder.forward, dynamic=dynamic)  # type: ignore[method-assign]
            encoder._fusionkit_compiled = True  # type: ignore[attr-defined]
    return model
