"""One resolver for "a local folder or a Hugging Face Hub id": every `from_pretrained` goes through it.

Kept free of heavy imports (`huggingface_hub` is imported only when a download is needed) so that
`FusionModel.from_pretrained` on a local folder costs nothing extra.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

# What a fusionkit model folder holds; pickled weights (*.bin, *.pt) are never downloaded.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "README.md"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(name: str | Path) -> bool:
    """`org/name` that is not a local path: neither it nor its `org` part exists here, so a mistyped
    `runs/mvsa` (with a `runs/` folder) is a quick "does not exist", not a hub download attempt."""
    return isinstance(name, str) and bool(_HUB_ID.match(name)) and not Path(name).parent.exists()


def resolve_pretrained_dir(name_or_path: str | Path, **hub_kwargs: Any) -> Path:
    """A local folder for `name_or_path`: itself when it exists, else a hub snapshot (cached once).

    `hub_kwargs` (revision, token, cache_dir, local_files_only, ...) go to
    `huggingface_hub.snapshot_download`; only safetensors, JSON and tokenizer files are fetched.
    """
    path = Path(name_or_path).expanduser()  # "~/models/x" is the home folder's, as on the command line
    if path.exists() or not is_hub_id(str(name_or_path)):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist (and is not a hub id like 'org/name')")
        subfolder = hub_kwargs.get("subfolder")  # a local folder's too, as transformers reads it
        if subfolder and not (path / subfolder).exists():
            raise FileNotFoundError(f"{path} has no subfolder {subfolder!r}")
        return path / subfolder if subfolder else path
    import huggingface_hub

    known = {"revision", "token", "cache_dir", "local_files_only", "force_download", "proxies", "subfolder"}
    kwargs = {k: v for k, v in hub_kwargs.items() if k in known and v is not None}
    subfolder = kwargs.pop("subfolder", None)
    try:
        local = huggingface_hub.snapshot_download(
            repo_id=str(name_or_path), allow_patterns=ALLOW_PATTERNS, **kwargs
        )
    except Exception as e:  # offline, unknown repo, gated, ...: say both things that were tried
        raise FileNotFoundError(
            f"{name_or_path} is not a local folder and could not be fetched from the Hugging Face Hub "
            f"({type(e).__name__}: {e})"
        ) from e
    return Path(local) / subfolder if subfolder else Path(local)
