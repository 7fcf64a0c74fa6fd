"""Text sources: tables of texts (.csv, .parquet, .jsonl), Debian's fortunes, and the cipher
control. Bad input is refused in one line that names the file."""

from __future__ import annotations

import json
import string
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.config.params import FORTUNES_DIR, DatasetSpec
from tasks.data.datasets import DataError
from tasks.data.text import encipher, read_fortunes, read_text_table

TEXTS = ["Hello,  world", 'a "quoted"\ttext\non two lines', "  café ünïcode  ", "NA", "007"]
CLEAN = ["Hello, world", 'a "quoted" text on two lines', "café ünïcode", "NA", "007"]


def write(path: Path, frame: pd.DataFrame) -> Path:
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    return path


def table(path: Path, **fields) -> DatasetSpec:
    return DatasetSpec(kind="text", path=path, **fields)


def refused(spec: DatasetSpec, match: str, reader: Callable = read_text_table) -> str:
    with pytest.raises(DataError, match=match) as err:
        reader(spec, "targets.near")
    message = str(err.value)
    assert "\n" not in message
    return message


# --- tables ------------------------------------------------------------------------------------


@pytest.mark.parametrize("labels", [[3, 1, 3, 1, 2], ["pos", "neg", "pos", "neg", "pos"]])
@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_each_format_reads_the_same_texts_and_labels(tmp_path: Path, suffix: str, labels) -> None:
    path = write(tmp_path / f"data{suffix}", pd.DataFrame({"text": TEXTS, "label": labels}))
    raw = read_text_table(table(path), "source")
    assert raw.test is None
    assert raw.pool.x.dtype.kind == "U" and raw.pool.x.shape == (5,)
    assert raw.pool.x.tolist() == CLEAN
    assert raw.pool.y.tolist() == labels
    assert raw.pool.y.dtype == (np.int64 if isinstance(labels[0], int) else np.dtype("<U3"))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_integral_float_labels_become_int64(tmp_path: Path, suffix: str) -> None:
    frame = pd.DataFrame({"text": ["a", "b", "c"], "label": [1.0, 2.0, 1.0]})
    raw = read_text_table(table(write(tmp_path / f"f{suffix}", frame)), "source")
    assert raw.pool.y.dtype == np.int64 and raw.pool.y.tolist() == [1, 2, 1]


def test_string_labels_are_stripped_and_custom_columns_used(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("body,kind\nfirst one, spam\nsecond,ham \n")
    raw = read_text_table(table(path, text_column="body", label_column="kind"), "source")
    assert raw.pool.x.tolist() == ["first one", "second"]
    assert raw.pool.y.tolist() == ["spam", "ham"]


def test_unlabelled_table_gets_zero_labels(tmp_path: Path) -> None:
    path = write(tmp_path / "u.jsonl", pd.DataFrame({"text": ["one", "two", "three"]}))
    raw = read_text_table(table(path, label_column=None), "source")
    assert raw.pool.x.tolist() == ["one", "two", "three"]
    assert raw.pool.y.dtype == np.int64 and raw.pool.y.tolist() == [0, 0, 0]


BAD_TABLES = {
    "empty file": ("e.csv", b"", r"e\.csv: file is empty"),
    "suffix": ("e.txt", b"text,label\n", r"unsupported file type '\.txt'; use one of \.csv, "),
    "csv unclosed quote": ("q.csv", b'text,label\n"open,1\n', r"not a readable \.csv file \("),
    "csv extra field": ("x.csv", b"text,label\na,1,9\nb,2\n", r"not a readable \.csv file"),
    "jsonl truncated": ("t.jsonl", b'{"text": "a", "label": ', r"not a readable \.jsonl file"),
    "not parquet": ("p.parquet", b"PAR0 surely not", r"not a readable \.parquet file"),
    "csv latin-1": (
        "l.csv",
        b"text,label\nok,1\ncaf\xe9,2\n",
        r"not UTF-8 text: byte 0xe9 at line 3 \(byte offset 19\); re-save the file as UTF-8",
    ),
    "jsonl latin-1": ("l.jsonl", b'{"text": "\xff", "label": 1}\n', r"line 1 \(byte offset 10\)"),
    "bom then latin-1": (
        "b.csv",
        b"\xef\xbb\xbftext,label\n\xe9,1\n",
        r"0xe9 at line 2 \(byte offset 14\)",
    ),
    "no text column": (
        "c.csv",
        b"body,label\na,1\nb,2\n",
        r"no column 'text' \(columns: \['body', 'label'\]\); set targets\.near\.text_column",
    ),
    "no label column": (
        "c.jsonl",
        b'{"text": "a", "y": 1}\n',
        r"no column 'label' \(columns: \['text', 'y'\]\); set targets\.near\.label_column",
    ),
    "blank texts": (
        "b.csv",
        b'text,label\na,1\n" \n ",2\nb,1\n,2\n',
        r"column 'text' has 2 empty or blank texts \(first: data row 2, counting from 1 below",
    ),
    "null text": (
        "n.jsonl",
        b'{"text": "a", "label": 1}\n{"text": null, "label": 2}\n',
        r"1 empty",
    ),
    "numbers as text": (
        "m.jsonl",
        b'{"text": "a", "label": 1}\n{"text": 5, "label": 2}\n',
        r"1 values that are not text \(e\.g\. 5 of type int, first: data row 2",
    ),
    "missing labels": (
        "ml.csv",
        b"text,label\na,1\nb,\nc,2\nd,  \n",
        r"column 'label' has 2 missing labels \(first: data row 2",
    ),
    "null labels": (
        "nl.jsonl",
        b'{"text": "a", "label": null}\n',
        r"1 missing labels \(first: data row 1",
    ),
    "one class": (
        "o.csv",
        b"text,label\na,spam\nb,spam\n",
        r"one class only \('spam'\); a classif",
    ),
    "no rows": ("r.csv", b"text,label\n", r"r\.csv: has a header but no rows"),
    "fractional label": (
        "f.csv",
        b"text,label\na,1.5\nb,2\n",
        r"'label' has labels that are not whole",
    ),
    "mixed labels": (
        "x.jsonl",
        b'{"text":"a","label":1}\n{"text":"b","label":"x"}\n',
        r"holds mixed",
    ),
}


@pytest.mark.parametrize("case", BAD_TABLES)
def test_bad_tables_are_refused_in_one_line_naming_the_file(tmp_path: Path, case: str) -> None:
    name, content, match = BAD_TABLES[case]
    path = tmp_path / name
    path.write_bytes(content)
    assert str(path) in refused(table(path), match)


def test_parquet_numbers_as_text_and_a_missing_file(tmp_path: Path) -> None:
    path = write(tmp_path / "n.parquet", pd.DataFrame({"text": [1.5, 2.5], "label": [0, 1]}))
    refused(table(path), r"n\.parquet: column 'text' has 2 values that are not text")
    refused(table(tmp_path / "gone.csv"), r"gone\.csv: no such file")


# --- fortunes ----------------------------------------------------------------------------------

real_fortunes = pytest.mark.skipif(
    not (FORTUNES_DIR / "people").is_file(), reason="Debian's fortunes packages not installed"
)
REAL = ["people", "de/witze", "es/sabiduria.fortunes"]


def fortunes(directory: Path | None = None, **fields) -> DatasetSpec:
    return DatasetSpec(kind="fortunes", path=directory, **fields)


@real_fortunes
def test_real_fortunes_by_class_capped_and_deterministic() -> None:
    spec = fortunes(classes=REAL, max_per_class=40, max_chars=200)
    raw = read_fortunes(spec, "source")
    assert raw.pool.x.dtype.kind == "U" and raw.pool.y.dtype.kind == "U"
    assert raw.pool.y.tolist() == [name for name in REAL for _ in range(40)]
    lengths = np.char.str_len(raw.pool.x)
    assert lengths.max() <= 200 and lengths.min() > 0
    assert all(text == " ".join(text.split()) for text in raw.pool.x.tolist())
    assert not any(c in text for text in raw.pool.x.tolist() for c in "\b\x07\t")
    again = read_fortunes(spec, "source")
    assert np.array_equal(raw.pool.x, again.pool.x)
    # the draw is a subset of the capped-by-length file, kept in file order
    everything = read_fortunes(fortunes(classes=REAL, max_chars=200), "source")
    for name in REAL:
        full = everything.pool.x[everything.pool.y == name].tolist()
        drawn = raw.pool.x[raw.pool.y == name].tolist()
        assert len(full) > 40
        assert [full.index(text) for text in drawn] == sorted(full.index(text) for text in drawn)


@real_fortunes
def test_real_fortunes_quirks_are_cleaned() -> None:
    raw = read_fortunes(fortunes(classes=["people", "italia"]), "source")
    people = raw.pool.x[raw.pool.y == "people"].tolist()
    assert len(people) == 1251  # as strfile counts them (people.dat)
    # "*____\b\b\b\bthis*" is an underlined word on a terminal
    assert any("no better from *this* side" in text for text in people)
    assert people[0].endswith("-- Lazarus Long")  # attributions are kept
    assert (raw.pool.y == "italia").sum() == 4153


def test_fortune_files_quirks(tmp_path: Path) -> None:
    (tmp_path / "mine").write_text(
        "First\tline\nsecond   line\n\t\t-- Somebody\n%\n%\n*____\b\b\b\bthis* and I\bI\a\n%\n"
    )
    (tmp_path / "old").write_bytes("caf\u00e9 au lait\n%\n".encode("latin-1"))
    (tmp_path / "both").write_bytes(b"\xff broken\n%\n")
    (tmp_path / "both.u8").write_text("the UTF-8 twin\n%\n")
    (tmp_path / "rot").write_text("Uryyb, jbeyq!\n%\n")  # rot13, as strfile -x stores it
    (tmp_path / "rot.dat").write_bytes(struct.pack(">5I", 2, 1, 13, 13, 0x4) + b"%\0\0\0")
    raw = read_fortunes(fortunes(tmp_path, classes=["mine", "old", "both", "rot"]), "source")
    assert raw.pool.x.tolist() == [
        "First line second line -- Somebody",
        "*this* and I",
        "café au lait",
        "the UTF-8 twin",
        "Hello, world!",
    ]
    assert raw.pool.y.tolist() == ["mine", "mine", "old", "both", "rot"]


def test_bad_fortunes_are_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "long").write_text("x" * 50 + "\n%\n" + "y" * 60 + "\n")
    (tmp_path / "blank").write_text("%\n  \n%\n")
    message = refused(
        fortunes(tmp_path, classes=["nope"]), r"nope: no such fortune file", read_fortunes
    )
    assert str(tmp_path / "nope") in message
    refused(
        fortunes(tmp_path, classes=["long"], max_chars=10),
        r"long: none of its 2 fortunes has at most 10 characters; raise targets\.near\.max_chars",
        read_fortunes,
    )
    refused(fortunes(tmp_path, classes=["blank"]), r"blank: holds no fortunes", read_fortunes)


# --- the cipher --------------------------------------------------------------------------------

PLAIN = np.array(["The quick brown fox, 42 times!", "ZEBRA zebra", "", "ünï 123 ?!"])


def decipher(texts: np.ndarray, seed: int) -> list[str]:
    """Written independently of `encipher`: letter i was sent to letter perm[i]."""
    perm = np.random.default_rng(seed).permutation(26)
    back = {string.ascii_lowercase[p]: string.ascii_lowercase[i] for i, p in enumerate(perm)}
    back |= {k.upper(): v.upper() for k, v in back.items()}
    return ["".join(back.get(c, c) for c in text) for text in texts.tolist()]


def test_cipher_is_a_deterministic_invertible_letter_substitution() -> None:
    secret = encipher(PLAIN, 7)
    assert secret.shape == PLAIN.shape and secret.dtype.kind == "U"
    assert np.array_equal(secret, encipher(PLAIN, 7))
    assert decipher(secret, 7) == PLAIN.tolist()
    assert secret[0] != PLAIN[0]
    for plain, coded in zip(PLAIN.tolist(), secret.tolist(), strict=True):
        assert len(plain) == len(coded)
        for a, b in zip(plain, coded, strict=True):
            if a in string.ascii_letters:
                assert b in string.ascii_letters and a.isupper() == b.isupper()
            else:
                assert a == b
    # a bijection: 26 distinct images of the alphabet
    alphabet = encipher(np.array([string.ascii_lowercase]), 7)[0]
    assert sorted(alphabet) == list(string.ascii_lowercase)
    # capitals map as their small letters do
    expected = "".join(alphabet[string.ascii_lowercase.index(c)].upper() for c in "zebra")
    assert encipher(np.array(["ZEBRA"]), 7)[0] == expected
    assert not np.array_equal(secret, encipher(PLAIN, 8))


def test_readers_apply_the_cipher_last(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", pd.DataFrame({"text": TEXTS, "label": [0, 1, 0, 1, 0]}))
    plain = read_text_table(table(path), "source")
    secret = read_text_table(table(path, cipher_seed=3), "source")
    assert secret.pool.x.tolist() == encipher(plain.pool.x, 3).tolist()
    assert np.array_equal(secret.pool.y, plain.pool.y)
    (tmp_path / "f").write_text("Some fortune\n%\nAnother   one\n")
    plain = read_fortunes(fortunes(tmp_path, classes=["f"]), "source")
    secret = read_fortunes(fortunes(tmp_path, classes=["f"], cipher_seed=3), "source")
    assert decipher(secret.pool.x, 3) == plain.pool.x.tolist() == ["Some fortune", "Another one"]


def test_hand_written_jsonl_reads_alike(tmp_path: Path) -> None:
    # the JSONL fixture above is what users write by hand as well
    path = tmp_path / "hand.jsonl"
    path.write_text(
        "\n".join(json.dumps({"text": t, "label": i % 2}) for i, t in enumerate(TEXTS))
    )
    assert read_text_table(table(path), "source").pool.x.tolist() == CLEAN


def test_a_utf8_bom_is_not_part_of_the_first_column(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbftext,label\nfirst,1\nsecond,2\n")
    assert read_text_table(table(path), "source").pool.x.tolist() == ["first", "second"]
