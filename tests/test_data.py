"""Calibration and evaluation windows from local files of every supported type."""

import json

import pytest
import torch

from efficientqat.data import TextSource, calibration_windows, eval_windows, load_documents
from efficientqat.errors import DataError
from efficientqat.model_utils import load_tokenizer


@pytest.fixture(scope="module")
def tok(model_factory):
    return load_tokenizer(str(model_factory("llama")))


def test_calibration_windows_are_seeded_disjoint_and_sized(tok, text_files):
    src = TextSource(str(text_files["train"]))
    train, val = calibration_windows(src, tok, 20, 5, 32, seed=3)
    again, _ = calibration_windows(src, tok, 20, 5, 32, seed=3)
    other, _ = calibration_windows(src, tok, 20, 5, 32, seed=4)
    assert train.shape == (20, 32) and val.shape == (5, 32)
    assert torch.equal(train, again) and not torch.equal(train, other)
    stream = tok(text_files["train"].read_text().replace("\n", "\n"), add_special_tokens=False).input_ids
    assert len(stream) >= 25 * 32
    rows = {tuple(r.tolist()) for r in torch.cat([train, val])}
    assert len(rows) == 25  # no window drawn twice, train and val disjoint


def test_too_short_calibration_data_names_the_numbers(tok, text_files):
    with pytest.raises(DataError, match=r"n_train \+ n_val = 100000 \+ 5"):
        calibration_windows(TextSource(str(text_files["train"])), tok, 100000, 5, 64, seed=0)


def test_local_formats_and_document_slices(tmp_path, text_files, tok):
    docs = [json.loads(line)["text"] for line in text_files["docs"].read_text().splitlines()]
    assert load_documents(TextSource(str(text_files["docs"]), docs="10:12")) == docs[10:12]
    (tmp_path / "d.json").write_text(json.dumps([{"body": d} for d in docs[:3]]))
    assert load_documents(TextSource(str(tmp_path / "d.json"), field="body")) == docs[:3]
    import pandas as pd

    pd.DataFrame({"text": docs[:4]}).to_parquet(tmp_path / "d.parquet")
    assert load_documents(TextSource(str(tmp_path / "d.parquet"))) == docs[:4]
    windows = eval_windows(TextSource(str(text_files["docs"]), docs="0:5"), tok, 16)
    joined = tok("\n\n".join(docs[:5]), add_special_tokens=False).input_ids
    assert windows.shape == (len(joined) // 16, 16)
    assert windows.flatten().tolist() == joined[: windows.numel()]


def test_unreadable_or_missing_data_is_named(tmp_path, tok):
    with pytest.raises(DataError, match="does not exist"):
        load_documents(TextSource(str(tmp_path / "nope.jsonl")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match="bad.jsonl"):
        load_documents(TextSource(str(bad)))
    with pytest.raises(DataError, match="no field 'body'"):
        good = tmp_path / "good.jsonl"
        good.write_text('{"text": "a b c"}\n')
        load_documents(TextSource(str(good), field="body"))
    with pytest.raises(DataError, match="unsupported type"):
        (tmp_path / "x.docx").write_text("hi")
        load_documents(TextSource(str(tmp_path / "x.docx")))
