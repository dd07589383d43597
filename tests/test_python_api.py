"""The Python API keeps the promises of the file/CLI path: configs built in code are checked and resolved as files
are, training leaves the caller's objects and global settings as they were, and documented examples run."""

from __future__ import annotations

import re
import sys
import textwrap
import typing
from pathlib import Path

import pytest
from PIL import Image

import fusionkit


def test_the_processor_docstring_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (40, 30), (200, 30, 30)).save("a.jpg")
    blocks = re.findall(r"\n\n((?:    .*\n)+)", fusionkit.processor.__doc__ or "")
    assert blocks
    scope = {"fusionkit": fusionkit, "FusionProcessor": fusionkit.FusionProcessor, "pil_image": Image.open("a.jpg")}
    for block in blocks:
        exec(textwrap.dedent(block), scope)  # noqa: S102 (the package's own docstring)
    assert scope["outputs"]["sentiment"].shape == (2, 3)


def test_embed_is_annotated_to_take_the_hf_model_too() -> None:
    from fusionkit.embed_shards import embed_to_shards
    from fusionkit.hf import FusionkitModel

    for fn in (fusionkit.embed, embed_to_shards):
        hints = typing.get_type_hints(fn, {**vars(sys.modules[fn.__module__]), "FusionkitModel": FusionkitModel})
        assert set(typing.get_args(hints["model"])) == {fusionkit.FusionModel, FusionkitModel}
