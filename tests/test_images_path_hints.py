"""An image path only a shell would understand ('~', '$HOME', a file:// URL) is told so through the Python API,
as the table readers tell it: "image file not found. Check the path" left a '~' path looking right."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

import fusionkit
from fusionkit.data import DataError


@pytest.fixture(scope="module")
def model() -> fusionkit.FusionModel:
    return fusionkit.create_model("tiny").eval()


def test_a_home_or_variable_path_is_said_to_be_unexpanded(model: fusionkit.FusionModel) -> None:
    for path, expand in (("~/no_such_fusionkit_photo.jpg", "expanduser"), ("$HOME/photo.jpg", "expandvars")):
        with pytest.raises(DataError, match=rf"leading '{re.escape(path[0])}' is not expanded .*os\.path\.{expand}\(path\)"):
            model.predict(texts=["a"], images=[path])


def test_a_file_url_is_told_its_plain_path(model: fusionkit.FusionModel, tmp_path: Path) -> None:
    Image.new("RGB", (40, 40)).save(tmp_path / "a b.png")
    url = (tmp_path / "a b.png").as_uri()  # file:///.../a%20b.png
    with pytest.raises(DataError, match="not URLs") as e:
        model.predict(texts=["a"], images=[url])
    assert str(e.value).endswith(f"pass its plain path, {tmp_path / 'a b.png'}")
    assert "Download" not in str(e.value)
    model.predict(texts=["a"], images=[str(tmp_path / "a b.png")])  # the path it names reads
