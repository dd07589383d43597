"""`fusionkit.embed`: input kinds, streaming, and identical vectors after save/reload."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fusionkit import embed
from fusionkit.data import make_synthetic
from fusionkit.models import FusionModel, create_model


@pytest.fixture(scope="module")
def pairs():
    ds = make_synthetic(12, image_size=32)
    return ds, [ex.text for ex in ds], [ex.image for ex in ds]


def test_saved_and_reloaded_model_gives_same_vectors(tmp_path: Path, pairs) -> None:
    _, texts, images = pairs
    model = create_model("tiny")
    before = embed(model, texts, images, batch_size=5)
    model.save_pretrained(tmp_path / "m")
    after = embed(FusionModel.from_pretrained(tmp_path / "m"), texts, images, batch_size=5)
    assert before.shape == (12, 64) and before.dtype == np.float32
    np.testing.assert_array_equal(before, after)
    np.testing.assert_allclose(np.linalg.norm(before, axis=1), 1.0, atol=1e-5)


def test_input_kinds_and_batching(tmp_path: Path, pairs) -> None:
    ds, texts, images = pairs
    model = create_model("tiny")
    joint = embed(model, texts, images, batch_size=64)
    np.testing.assert_allclose(
        embed(model, iter(texts), (im for im in images), batch_size=5), joint, atol=1e-5
    )
    np.testing.assert_allclose(embed(model, ds.to_hf(), batch_size=5), joint, atol=1e-5)
    paths = []
    for i, im in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        im.save(paths[-1])
    np.testing.assert_allclose(embed(model, texts, [str(p) for p in paths]), joint, atol=1e-5)
    import pandas as pd  # a notebook's columns: a Series of captions, a Series or 1-D array of paths; numpy ints

    frame = pd.DataFrame({"caption": texts, "photo": [str(p) for p in paths]})
    for column in (frame.photo, frame.photo.to_numpy()):
        np.testing.assert_allclose(embed(model, frame.caption, column, batch_size=np.int64(5)), joint, atol=1e-5)
    text_only, image_only = embed(model, texts=texts), embed(model, images=images)
    assert text_only.shape == image_only.shape == (12, 64)
    assert not np.allclose(text_only, joint) and not np.allclose(image_only, joint)
    raw = embed(model, texts, images, normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)


def test_bad_inputs(pairs) -> None:
    _, texts, images = pairs
    model = create_model("tiny")
    with pytest.raises(ValueError, match="images ended after .* items, texts go on"):
        embed(model, texts, images[:-1])
    with pytest.raises(ValueError, match="needs texts"):
        embed(model)
    with pytest.raises(TypeError, match="single string"):
        embed(model, "one caption")
    for single in (images[0], np.zeros((32, 32, 3), np.uint8)):  # not iterated pixel row by pixel row
        with pytest.raises(TypeError, match="one image: a list of one"):
            embed(model, texts[:1], single)


def test_streams_without_materializing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A generator is consumed one batch at a time: never more than a batch ahead of the model."""
    model = create_model("tiny")
    ds = make_synthetic(4, image_size=32)
    produced, seen = [0], []
    original = model.encode

    def images():
        for i in range(40):
            produced[0] += 1
            yield ds[i % 4].image

    def spy(**kw):
        seen.append(produced[0])
        return original(**kw)

    monkeypatch.setattr(model, "encode", spy)
    out = embed(model, (ds[i % 4].text for i in range(40)), images(), batch_size=8)
    assert out.shape == (40, 64) and seen == [8, 16, 24, 32, 40]


def test_several_modalities_from_one_pass_ids_and_missing_entries(pairs) -> None:
    ds, texts, images = pairs
    model = create_model("tiny")
    fp32 = dict(batch_size=5, precision="fp32")
    out, ids = embed(model, ds, modalities=("joint", "text", "image"), return_ids=True, **fp32)
    assert ids == list(ds.ids) and set(out) == {"joint", "text", "image"}
    np.testing.assert_allclose(out["joint"], embed(model, texts, images, **fp32), atol=1e-5)
    np.testing.assert_allclose(out["text"], embed(model, texts, **fp32), atol=1e-5)
    np.testing.assert_allclose(out["image"], embed(model, images=images, **fp32), atol=1e-5)
    vecs, given = embed(model, texts[:3], images[:3], ids=["a", "b", 7], **fp32)
    assert given == ["a", "b", "7"] and vecs.shape == (3, 64)
    vecs, numbered = embed(model, texts, images, return_ids=True, **fp32)  # lists have no ids: row numbers
    assert numbered == [str(i) for i in range(len(texts))] and vecs.shape == (len(texts), 64)
    gaps = embed(model, [texts[0], None], [None, images[1]], modalities=("joint", "text", "image"), **fp32)
    assert np.isfinite(gaps["joint"]).all()  # the model's placeholders stand in for the missing side
    assert np.isnan(gaps["text"][1]).all() and np.isnan(gaps["image"][0]).all()
    assert np.isfinite(gaps["text"][0]).all() and np.isfinite(gaps["image"][1]).all()
    with pytest.raises(ValueError, match="need images"):
        embed(model, texts, modalities="image")
    with pytest.raises(ValueError, match="^ids ended after 1 items, texts go on"):
        embed(model, texts, ids=["x"])


def test_progress_bar(pairs, capsys: pytest.CaptureFixture[str]) -> None:
    _, texts, images = pairs
    embed(create_model("tiny"), texts, images, batch_size=5, progress=True)
    assert "12/12" in capsys.readouterr().err


def test_retrieval_recall_counts_the_matching_row() -> None:
    from fusionkit.embedding import retrieval_recall

    vectors = np.random.default_rng(0).normal(size=(20, 8))
    same = retrieval_recall(vectors, vectors + 1e-3)
    assert same["t2i_r@1"] == same["i2t_r@1"] == 1.0 and same["chance_r@1"] == 0.05
    swapped = retrieval_recall(vectors, vectors[::-1])  # no row keeps its own image
    assert swapped["t2i_r@1"] == swapped["i2t_r@1"] == 0.0 and swapped["t2i_r@10"] < 1.0
    with pytest.raises(ValueError, match="paired row by row"):
        retrieval_recall(vectors, vectors[:5])
    # every image the same (a placeholder photo): ties are no evidence, the score is chance, not 1.0
    constant = retrieval_recall(vectors, np.ones_like(vectors))
    assert constant["t2i_r@1"] == pytest.approx(0.05) and constant["t2i_r@5"] == pytest.approx(0.25)
    twice = np.repeat(vectors[::2], 2, axis=0)  # each pair twice: two equally right images, a coin flip at k=1
    half = retrieval_recall(twice, twice)
    assert half["t2i_r@1"] == pytest.approx(0.5) and half["t2i_r@5"] == 1.0


def test_unreadable_image_names_its_row_or_is_skipped_in_place(tmp_path: Path, pairs) -> None:
    """A corrupt image: an error naming the row's id, or (on_error="skip") NaN in its place, rows aligned."""
    from fusionkit.data import DataError

    _, texts, images = pairs
    paths = []
    for i, im in enumerate(images):
        paths.append(str(tmp_path / f"{i}.jpg"))
        im.save(paths[-1])
    Path(paths[6]).write_bytes(Path(paths[6]).read_bytes()[:40])  # truncated JPEG
    ids = [f"pair-{i}" for i in range(12)]
    model = create_model("tiny")
    with pytest.raises(DataError, match=r"item pair-6.*on_error='skip'"):
        embed(model, texts, paths, ids=ids, batch_size=5)
    vectors, got = embed(model, texts, paths, ids=ids, batch_size=5, on_error="skip")
    assert got == ids
    assert np.isnan(vectors[6]).all() and not np.isnan(np.delete(vectors, 6, axis=0)).any()
    good = embed(model, texts[:6] + texts[7:9], paths[:6] + paths[7:9], batch_size=5)  # the other rows are untouched
    np.testing.assert_allclose(np.delete(vectors, 6, axis=0)[:8], good, atol=1e-5)


@pytest.mark.parametrize("freeze", ["none", "encoders", "top_k"])
def test_several_modalities_in_one_pass_equal_one_at_a_time(pairs, freeze: str) -> None:
    """One encoder pass for joint + text + image must give each modality's own vectors, also when the top
    blocks of the encoders train (their hidden states enter those blocks once, not twice)."""
    _, texts, images = pairs
    model = create_model("tiny", freeze=freeze, trainable_layers=1)
    together = embed(model, texts, images, modalities=("joint", "text", "image"))
    for modality in ("joint", "text", "image"):
        np.testing.assert_allclose(together[modality], embed(model, texts, images, modalities=modality), atol=1e-5)


def test_a_pair_with_neither_side_and_empty_image_strings(pairs) -> None:
    from fusionkit import FusionProcessor
    from fusionkit.data import DataError

    _, texts, images = pairs
    model = create_model("tiny")
    with pytest.raises(DataError, match="item 1: row has neither a caption nor an image"):
        embed(model, [texts[0], None], [images[0], None])
    vectors = embed(model, [texts[0], None], [images[0], None], on_error="skip")
    assert np.isfinite(vectors[0]).all() and np.isnan(vectors[1]).all()
    # an empty path string (a pandas empty cell) is no image, as an empty CSV cell is
    assert model.predict(texts=[texts[0]], images=[""]) == model.predict(texts=[texts[0]])
    with pytest.raises(ValueError, match="empty list"):
        FusionProcessor.from_model(model)(texts=[])


def test_tables_batch_sizes_and_one_sided_models(tmp_path: Path, pairs) -> None:
    """A DataFrame is read by its columns (never its column names as captions); a batch size below 1 is
    refused, not an empty result; a unimodal model refuses a row without its one input; the HF face works."""
    import pandas as pd

    from fusionkit.data import DataError
    from fusionkit.hf import FusionkitModel

    _, texts, images = pairs
    model = create_model("tiny")
    frame = pd.DataFrame({"text": texts[:3] + [float("nan")], "image": images[:4], "id": list("abcd")})
    vectors, ids = embed(model, frame, return_ids=True)
    expected = embed(model, texts[:3] + [None], images[:4])
    assert ids == list("abcd") and np.allclose(vectors, expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"'text', 'image' and 'id' columns; it has \['caption', 'photo', 'id'\]"):
        embed(model, frame.rename(columns={"text": "caption", "image": "photo"}))
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            embed(model, texts, images, batch_size=bad)
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            model.predict(texts=texts, images=images, batch_size=bad)
    assert np.allclose(embed(FusionkitModel.from_fusion_model(model), texts, images), embed(model, texts, images))

    text_only = create_model("tiny", fusion={"strategy": "text_only"})
    with pytest.raises(ValueError, match=r"pairs \[1\] have no caption, the only input of this text_only model"):
        text_only.predict(texts=[texts[0], None], images=images[:2])
    with pytest.raises(DataError, match="item 1: row has no caption"):
        embed(text_only, [texts[0], None], images[:2])
    with pytest.raises(ValueError, match=r"pairs \[1\] have no caption"):  # pandas' NaN is a missing caption
        text_only.predict(texts=[texts[0], float("nan")], images=images[:2])


def test_encode_text_without_a_mask_ignores_padding() -> None:
    from fusionkit import FusionProcessor

    model = create_model("tiny").eval()
    batch = FusionProcessor.from_model(model)(texts=["a short one", "a much longer caption than the first one is"])
    assert not batch["attention_mask"].all()  # the first row is padded
    with_mask = model.encode_text(batch["input_ids"], batch["attention_mask"])
    assert np.allclose(model.encode_text(batch["input_ids"]).detach(), with_mask.detach(), atol=1e-6)


def test_a_file_passed_as_the_model_is_named(tmp_path: Path) -> None:
    model = create_model("tiny")
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match=r"config.json is a file; pass the model folder .*m\)"):
        FusionModel.from_pretrained(tmp_path / "m" / "config.json")


def test_a_blank_caption_is_a_missing_one_everywhere(pairs) -> None:
    """An empty CSV cell is a missing caption; "" or "  " from Python (or `predict --text ''`) is the same."""
    _, texts, images = pairs
    model = create_model("tiny", fusion={"modality_dropout": 0.3})
    blank = model.predict(texts=["", "   "], images=images[:2])
    assert blank == model.predict(texts=[None, None], images=images[:2])
    vectors = embed(model, ["", texts[1]], images[:2], modalities=("joint", "text"))
    assert np.isnan(vectors["text"][0]).all() and np.isfinite(vectors["joint"][0]).all()
    assert np.allclose(vectors["joint"][0], embed(model, [None], images[:1])[0], atol=1e-6)


@pytest.mark.parametrize("side", ["text", "image"])
def test_cli_and_python_give_the_same_vectors_for_a_one_sided_file(tmp_path: Path, side: str) -> None:
    """A caption-only (image-only) file: the command line writes what `embed(model, captions)` (`images=`)
    gives, the text (image) vectors; both used to differ (joint with a placeholder, 0.4 apart)."""
    import pandas as pd

    from fusionkit.cli import main
    from fusionkit.data import load_dataset

    ds = make_synthetic(5, image_size=32)
    model_dir = create_model("tiny").save_pretrained(tmp_path / "model")
    model = FusionModel.from_pretrained(model_dir)
    paths = []
    for ex in ds:
        paths.append(str(tmp_path / f"{ex.id}.png"))
        ex.image.save(paths[-1])
    table = {"id": ds.ids, "text": [ex.text for ex in ds]} if side == "text" else {"id": ds.ids, "image": paths}
    pd.DataFrame(table).to_csv(tmp_path / "one_sided.csv", index=False)
    other = "image" if side == "text" else "text"
    argv = ["embed", str(model_dir), "--data", str(tmp_path / "one_sided.csv"), f"--{other}-column", "",
            "--output", str(tmp_path / "v.npy"), "--precision", "fp32", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    given = {"texts": table["text"]} if side == "text" else {"images": paths}
    python = embed(model, **given, precision="fp32")
    np.testing.assert_allclose(np.load(tmp_path / "v.npy"), python, atol=1e-5)
    read = load_dataset(str(tmp_path / "one_sided.csv"), **{f"{other}_column": "", f"missing_{other}": "keep"})
    np.testing.assert_allclose(embed(model, read, precision="fp32"), python, atol=1e-5)  # the rule for datasets too
    assert main([*argv, "--modality", "joint"]) == 0  # asked for: joint vectors, the absent side a placeholder
    assert not np.allclose(np.load(tmp_path / "v.npy"), python, atol=1e-3)


def test_a_dict_of_columns_is_refused_not_embedded_as_its_column_names(pairs) -> None:
    _, texts, images = pairs
    with pytest.raises(TypeError, match=r"not a dict of columns \(\['text', 'image', 'id'\]\).*DataFrame"):
        embed(create_model("tiny"), {"text": texts[:3], "image": images[:3], "id": ["a", "b", "c"]}, return_ids=True)


def test_a_dataframe_gets_the_ids_and_default_modality_load_dataset_gives(pairs) -> None:
    """Float ids (an int column with a gap) read "100", a missing one its row number, as `load_dataset` reads
    them (not "100.0" / "None"); an image column empty in every row gives text vectors, as its CSV does."""
    import pandas as pd

    from fusionkit import load_dataset

    _, texts, _ = pairs
    model = create_model("tiny")
    frame = pd.DataFrame({"id": [100, None, 300], "text": texts[:3], "image": [None, float("nan"), ""]})
    vectors, ids = embed(model, frame, return_ids=True)
    read = load_dataset(frame, missing_image="keep")
    assert ids == read.ids == ["100", "1", "300"]
    np.testing.assert_allclose(vectors, embed(model, texts[:3]), atol=1e-6)  # text vectors, not joint
    np.testing.assert_allclose(vectors, embed(model, read), atol=1e-6)
    joint = embed(model, frame, modalities="joint")  # asked for: joint, the image a placeholder
    assert not np.allclose(joint, vectors, atol=1e-3)


def test_a_dataframe_is_read_by_the_columns_the_model_trained_on(tmp_path: Path) -> None:
    """`embed(model, df)` of the user's own table (txt, pic, uid) read only 'text'/'image'/'id' and refused it,
    while `fusionkit embed` of the same file reads the columns the run recorded."""
    pd = pytest.importorskip("pandas")
    import fusionkit

    from .test_own_data_multitask import write_table
    from .test_train import tiny_config

    table = write_table(tmp_path / "d", 12)
    summary = fusionkit.train(tiny_config(tmp_path, "own", **{
        "data.dataset": str(table), "data.text_column": "txt", "data.image_column": "pic", "data.id_column": "uid",
        "model.tasks": [{"name": "mood"}], "optim.epochs": 1}))  # fmt: skip
    model = FusionModel.from_pretrained(summary["run_dir"])
    df = pd.read_csv(table)
    df["pic"] = [str(tmp_path / "d" / p) for p in df["pic"]]
    vectors, ids = embed(model, df, return_ids=True)
    renamed = df.rename(columns={"txt": "text", "pic": "image", "uid": "id"})
    np.testing.assert_array_equal(vectors, embed(model, renamed))
    assert ids == list(df["uid"])
    df["id"] = [f"other{i}" for i in range(len(df))]  # a generic id column beside the model's: the model's is read
    assert embed(model, df, return_ids=True)[1] == list(df["uid"])  # (as `fusionkit embed` of the file reads it)
