"""The Python API keeps the promises of the file/CLI path: configs built in code are checked and resolved as files
are, training leaves the caller's objects and global settings as they were, and documented examples run."""

from __future__ import annotations

import sys
import typing

import fusionkit


def test_embed_is_annotated_to_take_the_hf_model_too() -> None:
    from fusionkit.embed_shards import embed_to_shards
    from fusionkit.hf import FusionkitModel

    for fn in (fusionkit.embed, embed_to_shards):
        hints = typing.get_type_hints(fn, {**vars(sys.modules[fn.__module__]), "FusionkitModel": FusionkitModel})
        assert set(typing.get_args(hints["model"])) == {fusionkit.FusionModel, FusionkitModel}
