"""Built-in tasks, prompt formatting, user spec files and every validation error."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from fedsteer import settings
from fedsteer.data import (
    DataError,
    Example,
    Task,
    TaskSpec,
    builtin_task_names,
    load_examples,
    load_task,
)

LABELS = ("negative", "positive")
PAIR_TASKS = {"rte", "cb"}
NUM_LABELS = {"sst2": 2, "mr": 2, "sst5": 5, "subj": 2, "trec": 6, "agnews": 4, "rte": 2, "cb": 3}


def _real_data_dir() -> Path:
    """The package's own copy: present in every clone and every installed wheel."""
    return settings.BUILTIN_DATA_DIR


def _write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    return _write(path, "".join(json.dumps(r) + "\n" for r in rows))


# --- built-in tasks -------------------------------------------------------------------------


def test_builtin_names() -> None:
    assert sorted(builtin_task_names()) == sorted(NUM_LABELS)


@pytest.mark.parametrize("name", sorted(NUM_LABELS))
def test_builtin_task_loads(name: str) -> None:
    task = load_task(name, data_dir=_real_data_dir())
    assert isinstance(task, Task)
    assert task.name == name and task.num_labels == NUM_LABELS[name]
    assert len(task.spec.label_words) == task.num_labels
    assert task.train and task.test and task.source
    is_pair = name in PAIR_TASKS
    assert task.spec.is_pair == is_pair
    assert all((ex.text_pair is not None) == is_pair for ex in task.train[:50])
    assert {ex.label for ex in task.train} <= set(range(task.num_labels))
    assert all(w.startswith(" ") for w in task.spec.label_words)


def test_sst2_has_dev() -> None:
    task = load_task("sst2", data_dir=_real_data_dir())
    assert task.dev is not None and len(task.dev) == 872
    assert load_task("mr", data_dir=_real_data_dir()).dev is None


def test_builtin_label_count_mismatch(tmp_path: Path) -> None:
    task_dir = tmp_path / "sst2"
    task_dir.mkdir()
    _write(task_dir / "meta.json", json.dumps({"name": "sst2", "labels": ["a", "b", "c"]}))
    with pytest.raises(DataError, match="meta.json, field 'labels'"):
        load_task("sst2", data_dir=tmp_path)


def _sst2_copy(root: Path) -> Path:
    """A user's copy of sst2 with its meta and one training row; the test adds the rest."""
    task_dir = root / "sst2"
    task_dir.mkdir()
    _write(task_dir / "meta.json", json.dumps({"name": "sst2", "labels": list(LABELS)}))
    _jsonl(task_dir / "train.jsonl", [{"text": "ok", "label": 1}])
    return task_dir


def test_builtin_uses_same_validation(tmp_path: Path) -> None:
    task_dir = _sst2_copy(tmp_path)
    _jsonl(task_dir / "test.jsonl", [{"text": "ok", "label": 7}])
    with pytest.raises(DataError, match=r"test\.jsonl, line 1, field 'label'"):
        load_task("sst2", data_dir=tmp_path)


def test_a_users_copy_may_be_plain_or_gzipped(tmp_path: Path) -> None:
    import gzip

    task_dir = _sst2_copy(tmp_path)
    _write(task_dir / "test.jsonl.gz", gzip.compress(b'{"text": "bad", "label": 0}\n'))
    task = load_task("sst2", data_dir=tmp_path)
    assert [ex.text for ex in task.test] == ["bad"] and task.dev is None


def test_a_corrupt_gzip_names_its_file(tmp_path: Path) -> None:
    task_dir = _sst2_copy(tmp_path)
    _write(task_dir / "test.jsonl.gz", b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match=r"test\.jsonl\.gz.*gzip"):
        load_task("sst2", data_dir=tmp_path)


def test_a_missing_task_names_the_folder_it_tried(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path / "trec")):
        load_task("trec", data_dir=tmp_path)


def test_a_missing_split_names_the_file_it_tried(tmp_path: Path) -> None:
    _sst2_copy(tmp_path)
    with pytest.raises(DataError, match=r"test\.jsonl.*file not found"):
        load_task("sst2", data_dir=tmp_path)


def test_unknown_task_name() -> None:
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        load_task("nope")


# --- formatting -----------------------------------------------------------------------------


def test_single_text_formatting() -> None:
    spec = TaskSpec("sst2", LABELS, (" negative", " positive"), "Review: {text}\nSentiment:")
    ex = Example("great fun", 1)
    assert spec.format_query(ex) == "Review: great fun\nSentiment:"
    assert spec.format_demo(ex) == "Review: great fun\nSentiment: positive"
    demos = [Example("dull", 0), ex]
    assert spec.demo_prefix(demos) == (
        "Review: dull\nSentiment: negative\n\nReview: great fun\nSentiment: positive\n\n"
    )
    assert spec.demo_prefix([]) == ""


def test_builtin_pair_formatting() -> None:
    task = load_task("rte", data_dir=_real_data_dir())
    ex = Example("A cat sat.", 1, "A dog sat.")
    assert task.spec.format_query(ex) == "A cat sat.\nQuestion: A dog sat. True or False?\nAnswer:"
    assert task.spec.format_demo(ex).endswith("Answer: false")
    with pytest.raises(ValueError, match="text_pair"):
        task.spec.format_query(Example("A cat sat.", 0))


def test_spec_rejects_bad_definitions() -> None:
    with pytest.raises(ValueError, match="label words"):
        TaskSpec("t", LABELS, (" a",), "{text}:")
    with pytest.raises(ValueError, match="placeholders"):
        TaskSpec("t", LABELS, (" a", " b"), "{txt}:")
    with pytest.raises(ValueError, match="differ"):
        TaskSpec("t", LABELS, (" a", " a"), "{text}:")


# --- row validation -------------------------------------------------------------------------


def _load(path: Path, pair: bool = False, max_chars: int = 2000) -> list[Example]:
    return load_examples(path, LABELS, pair=pair, max_chars=max_chars)


def _assert_error(
    path: Path, line: int | None, field: str | None, message: str, pair: bool = False
) -> None:
    where = rf"{path.name}, line {line}" if line else path.name
    if field:
        where += rf", field '{field}'"
    with pytest.raises(DataError, match=where + r": .*" + message) as info:
        _load(path, pair=pair)
    assert info.value.path == path
    assert info.value.line == line
    assert info.value.field == field


GOOD = '{"text": "fine", "label": 0}\n'


@pytest.mark.parametrize(
    ("body", "line", "field", "message"),
    [
        (GOOD + '{"text": "x", "label": 1\n', 2, None, "invalid JSON"),
        (GOOD + '["x", 1]\n', 2, None, "JSON object"),
        (GOOD + GOOD + '{"label": 1}\n', 3, "text", "missing field"),
        (GOOD + '{"text": "x"}\n', 2, "label", "missing field"),
        (GOOD + '{"text": 5, "label": 1}\n', 2, "text", "expected a string"),
        (GOOD + '{"text": "x", "label": 1.0}\n', 2, "label", "expected an int id"),
        (GOOD + '{"text": "x", "label": true}\n', 2, "label", "expected an int id"),
        (
            GOOD + '{"text": "x", "label": "meh"}\n',
            2,
            "label",
            r"unknown label 'meh' \(known: negative, positive\)",
        ),
        (GOOD + '{"text": "x", "label": 2}\n', 2, "label", "out of range"),
        (GOOD + '{"text": "x", "label": -1}\n', 2, "label", "out of range"),
        (GOOD + '{"text": "  \\n ", "label": 1}\n', 2, "text", "empty text"),
        (GOOD + '{"text": "x", "text_pair": "y", "label": 1}\n', 2, "text_pair", "unexpected"),
    ],
)
def test_jsonl_row_errors(
    tmp_path: Path, body: str, line: int, field: str | None, message: str
) -> None:
    _assert_error(_write(tmp_path / "bad.jsonl", body), line, field, message)


def test_pair_field_errors(tmp_path: Path) -> None:
    path = _write(tmp_path / "pair.jsonl", '{"text": "a", "label": 0}\n')
    _assert_error(path, 1, "text_pair", "missing field", pair=True)
    path = _write(tmp_path / "pair2.jsonl", '{"text": "a", "text_pair": " ", "label": 0}\n')
    _assert_error(path, 1, "text_pair", "empty text", pair=True)


def test_bad_encoding_names_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "enc.jsonl", GOOD.encode() * 3 + b'{"text": "caf\xe9", "label": 0}\n')
    _assert_error(path, 4, None, "UTF-8")


def test_csv_errors(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.csv", "text,label\nhello,positive\n,negative\n")
    _assert_error(path, 3, "text", "empty text")
    path = _write(tmp_path / "b.csv", "text,lbl\nhello,positive\n")
    _assert_error(path, 1, "label", "header lacks column")
    path = _write(tmp_path / "c.csv", "text,label\nhello,positive\nbye,so-so\n")
    _assert_error(path, 3, "label", "unknown label 'so-so'")
    path = _write(tmp_path / "d.csv", 'text,label\n"multi\nline",1\nx,positive,extra\n')
    _assert_error(path, 4, None, "expected 2 columns")


def test_missing_and_empty_files(tmp_path: Path) -> None:
    _assert_error(tmp_path / "none.jsonl", None, None, "file not found")
    _assert_error(_write(tmp_path / "empty.jsonl", "\n"), None, None, "no rows")
    _assert_error(_write(tmp_path / "x.txt", "hi"), None, None, "unsupported file type")


def test_truncation_warns_once_with_count(tmp_path: Path) -> None:
    rows = [
        {"text": "a" * 50, "label": 0},
        {"text": "short", "label": 1},
        {"text": "b" * 11, "label": "positive"},
    ]
    path = _jsonl(tmp_path / "long.jsonl", rows)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        examples = _load(path, max_chars=10)
    assert len(caught) == 1
    assert "truncated 2 row(s)" in str(caught[0].message) and "long.jsonl" in str(caught[0].message)
    assert [len(ex.text) for ex in examples] == [10, 5, 10]
    assert [ex.label for ex in examples] == [0, 1, 1]


def test_blank_lines_and_labels_by_name_or_id(tmp_path: Path) -> None:
    path = _write(tmp_path / "ok.jsonl", GOOD + "\n" + '{"text": "y", "label": "positive"}\n')
    assert [ex.label for ex in _load(path)] == [0, 1]


def test_data_error_pickles() -> None:
    import pickle

    err = pickle.loads(pickle.dumps(DataError("boom", "f.jsonl", 3, "label")))
    assert (err.line, err.field, str(err)) == (3, "label", "f.jsonl, line 3, field 'label': boom")


# --- user spec files ------------------------------------------------------------------------


def _user_files(tmp_path: Path) -> None:
    _jsonl(
        tmp_path / "train.jsonl",
        [
            {"text": "card charged twice", "label": "billing"},
            {"text": "app crashes", "label": 1},
        ],
    )
    _write(tmp_path / "test.csv", "text,label\nrefund please,billing\nerror 500,1\n")


def test_user_task_from_toml(tmp_path: Path) -> None:
    _user_files(tmp_path)
    spec = _write(
        tmp_path / "tickets.toml",
        (
            'name = "tickets"\nlabels = ["billing", "bug"]\nlabel_words = [" billing", " bug"]\n'
            'template = "Ticket: {text}\\nCategory:"\ntrain = "train.jsonl"\ntest = "test.csv"\n'
        ),
    )
    task = load_task(spec)
    assert task.name == "tickets" and task.labels == ("billing", "bug")
    assert [ex.label for ex in task.train] == [0, 1]
    assert [ex.label for ex in task.test] == [0, 1]
    assert task.spec.format_demo(task.test[1]) == "Ticket: error 500\nCategory: bug"
    assert task.dev is None


def test_user_task_from_yaml_defaults(tmp_path: Path) -> None:
    _user_files(tmp_path)
    spec = _write(
        tmp_path / "tickets.yaml",
        "name: tickets\nlabels: [billing, bug]\ntrain: test.csv\ntest: train.jsonl\n",
    )
    task = load_task(str(spec))
    assert task.spec.label_words == (" billing", " bug")
    assert task.spec.format_query(task.test[0]) == "Input: card charged twice\nLabel:"
    assert [ex.label for ex in task.train] == [0, 1]


def test_user_pair_task_yml_default_template(tmp_path: Path) -> None:
    _write(tmp_path / "d.csv", "text,text_pair,label\nA,B,same\nC,D,different\n")
    spec = _write(
        tmp_path / "p.yml",
        "name: p\nlabels: [same, different]\npair: true\ntrain: d.csv\ntest: d.csv\n",
    )
    task = load_task(spec)
    assert task.spec.is_pair
    assert task.spec.format_demo(task.train[0]) == "A\nB\nLabel: same"


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ('name = "t"\nlabels = ["a", "b"]\ntrain = "x.jsonl"\n', "test", "missing spec key"),
        (
            'name = "t"\nlabels = ["a", "b"]\ntrain = "x.jsonl"\ntest = "x.jsonl"\nlables = 1\n',
            "lables",
            "unknown spec key",
        ),
        (
            'name = "t"\nlabels = "a"\ntrain = "x.jsonl"\ntest = "x.jsonl"\n',
            "labels",
            "list of strings",
        ),
        (
            'name = "t"\nlabels = ["a", "b"]\ntrain = "x.jsonl"\ntest = "x.jsonl"\n'
            'template = "{text} vs {text_pair}:"\npair = false\n',
            "template",
            "must not use",
        ),
        (
            'name = "t"\nlabels = ["a", "b"]\ntrain = "x.jsonl"\ntest = "x.jsonl"\n'
            'template = "{text}:"\npair = true\n',
            "template",
            "needs",
        ),
        (
            'name = "t"\nlabels = ["a", "b"]\ntrain = "x.jsonl"\ntest = "x.jsonl"\n'
            'template = "{sentence}:"\n',
            "template",
            "placeholders",
        ),
    ],
)
def test_spec_file_errors(tmp_path: Path, body: str, field: str, message: str) -> None:
    _jsonl(tmp_path / "x.jsonl", [{"text": "x", "label": "a"}])
    spec = _write(tmp_path / "t.toml", body)
    with pytest.raises(DataError, match=rf"t\.toml, field '{field}': .*{message}") as info:
        load_task(spec)
    assert info.value.field == field and info.value.line is None


def test_spec_file_bad_yaml_and_bad_rows(tmp_path: Path) -> None:
    spec = _write(tmp_path / "t.yaml", "name: t\nlabels: [a, b\n")
    with pytest.raises(DataError, match=r"t\.yaml, line \d+: invalid YAML"):
        load_task(spec)
    _jsonl(tmp_path / "x.jsonl", [{"text": "x", "label": "a"}, {"text": "y", "label": "c"}])
    spec = _write(tmp_path / "u.yaml", "name: t\nlabels: [a, b]\ntrain: x.jsonl\ntest: x.jsonl\n")
    with pytest.raises(DataError, match=r"x\.jsonl, line 2, field 'label': unknown label 'c'"):
        load_task(spec)
