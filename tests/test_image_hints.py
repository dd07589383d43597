"""What an image that cannot be read is told: a file object is a wrong type (its bytes are the way in, and
skipping rows is no answer), a URL is not a local file (and keeps its "//" in the message)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

import fusionkit
from fusionkit.data import DataError
from fusionkit.data.image import load_image


@pytest.fixture(scope="module")
def model() -> fusionkit.FusionModel:
    return fusionkit.create_model("tiny").eval()


def test_a_file_object_is_told_to_pass_its_bytes_not_to_skip_rows(model: fusionkit.FusionModel) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (30, 30), (200, 10, 10)).save(buf, "PNG")
    for on_error in ("raise", "skip"):  # skipping would skip every row given this way
        with pytest.raises(DataError, match=r"not a BytesIO\. Pass its bytes \(buf\.getvalue\(\)") as e:
            fusionkit.embed(model, ["a"], [buf], on_error=on_error, progress=False)
        assert "fromarray" not in str(e.value) and "on_error" not in str(e.value)
    # its bytes embed as the image does
    assert fusionkit.embed(model, ["a"], [buf.getvalue()], progress=False).shape == (1, model.config.fusion.dim)


def test_a_url_is_named_intact_and_told_images_are_local_files(model: fusionkit.FusionModel) -> None:
    url = "https://example.com/a.jpg"
    with pytest.raises(DataError, match=r"https://example\.com/a\.jpg: image paths are read from local files only"):
        load_image(url)
    with pytest.raises(DataError, match="item 0: image paths are read from local files only.*Download the image"):
        fusionkit.embed(model, ["a"], [url], progress=False)
