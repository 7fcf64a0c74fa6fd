"""Texts as users have them: a table (.csv, .parquet, .jsonl) with a text and a label column, and
the built-in fortunes of Debian's packages. Each reader returns the raw texts (N,) str with their
labels as stored; tokenising happens in `prepare` (tasks/data/tokens.py). Every problem is
refused in one line that names the file, the column and the fix, as tasks/data/npz.py does."""

from __future__ import annotations

import codecs
import io
import re
import string
import struct
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.config.params import DatasetSpec
from tasks.data.datasets import DataError, Labelled, RawDataset
from tasks.data.npz import canonical_labels, listed

TABLE_SUFFIXES = (".csv", ".parquet", ".jsonl")
# Control characters left after undoing overstrikes (BEL in some fortunes, ESC): never text.
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
STR_ROTATED = 0x4  # strfile's flag (in a fortune file's .dat) for a file stored in rot13


def normalise(text: str) -> str:
    """Strip and collapse every run of whitespace (newlines, tabs included) into one space:
    line breaks in a table cell or a fortune are layout, not content."""
    return " ".join(text.split())


def encipher(texts: np.ndarray, seed: int) -> np.ndarray:
    """Replace each ASCII letter by another, the same throughout (case kept, all else as is).

    The study's control: the words are gone, yet a text's class still shows in which
    (enciphered) words it uses, so the task stays learnable from scratch while pretraining on
    plain text has nothing to transfer. texts (N,) str -> (N,) str, each the same length."""
    table = _letter_table(np.random.default_rng(seed).permutation(26))
    texts = np.asarray(texts, dtype=str)
    return np.array([text.translate(table) for text in texts.tolist()], dtype=texts.dtype)


def _letter_table(order: np.ndarray) -> dict[int, int]:
    """A str.translate table that maps letter i to letter order[i] (26,), in either case."""
    lower, upper = string.ascii_lowercase, string.ascii_uppercase
    return str.maketrans(
        lower + upper, "".join(lower[i] for i in order) + "".join(upper[i] for i in order)
    )


def _ciphered(spec: DatasetSpec, data: RawDataset) -> RawDataset:
    if spec.cipher_seed is None:
        return data
    return RawDataset(Labelled(encipher(data.pool.x, spec.cipher_seed), data.pool.y), None)


# --- a table of texts --------------------------------------------------------------------------


def read_text_table(spec: DatasetSpec, key: str) -> RawDataset:
    """A table with one text per row: x (N,) str, whitespace-normalised; y (N,) the labels as
    stored (int64 or str), or zeros when `label_column` is null (unlabelled)."""
    path = spec.path
    frame = _read_table(path, spec.text_column, spec.label_column)
    wanted = {"text_column": spec.text_column, "label_column": spec.label_column}
    for field, column in wanted.items():
        if column is not None and column not in frame.columns:
            raise DataError(
                f"{path}: no column '{column}' (columns: {listed([str(c) for c in frame.columns])}"
                f"); set {key}.{field} to the right one"
            )
    if len(frame) == 0:
        raise DataError(f"{path}: has a header but no rows")
    texts = _texts(path, spec.text_column, frame[spec.text_column])  # (N,) str
    if spec.label_column is None:
        labels = np.zeros(len(texts), dtype=np.int64)  # (N,) no labels: pretraining only
    else:
        labels = _table_labels(path, spec.label_column, frame[spec.label_column])  # (N,)
    return _ciphered(spec, RawDataset(pool=Labelled(x=texts, y=labels), test=None))


def _read_table(path: Path, text_column: str, label_column: str | None) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        supported = ", ".join(TABLE_SUFFIXES)
        raise DataError(f"{path}: unsupported file type '{suffix}'; use one of {supported}")
    raw = path.read_bytes()
    if not raw:
        raise DataError(f"{path}: file is empty")
    text = "" if suffix == ".parquet" else _utf8(path, raw)  # before pandas: it would guess
    try:
        with warnings.catch_warnings():
            # a row with more fields than the header would silently shift the columns
            warnings.simplefilter("error", pd.errors.ParserWarning)
            if suffix == ".parquet":
                return pd.read_parquet(io.BytesIO(raw))
            if suffix == ".jsonl":
                # dtype=False: keep JSON's own types ("007" stays a string)
                return pd.read_json(io.StringIO(text), lines=True, dtype=False)
            return _read_csv(text, text_column, label_column)
    except (ValueError, OSError, pd.errors.ParserWarning) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{path}: not a readable {suffix} file ({first})") from err


def _read_csv(text: str, text_column: str, label_column: str | None) -> pd.DataFrame:
    # Texts stay strings ("NA", "007" and "" included: an empty text is refused later); labels
    # are typed as pandas infers them, only an empty cell is missing ("NA" is a label).
    return pd.read_csv(
        io.StringIO(text),
        index_col=False,
        dtype={text_column: str},
        keep_default_na=False,
        na_values={label_column: [""]} if label_column else None,
    )


def _utf8(path: Path, raw: bytes) -> str:
    """The bytes as UTF-8 text (a leading BOM dropped), or the place of the first bad byte."""
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[bom:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = bom + err.start  # in the file
        line = raw.count(b"\n", 0, offset) + 1
        raise DataError(
            f"{path}: not UTF-8 text: byte 0x{raw[offset]:02x} at line {line} (byte offset "
            f"{offset}); re-save the file as UTF-8"
        ) from err


def _where(bad: np.ndarray) -> str:
    return f"first: data row {int(np.argmax(bad)) + 1}, counting from 1 below any header"


def _texts(path: Path, column: str, series: pd.Series) -> np.ndarray:
    values = series.to_numpy(dtype=object)  # (N,)
    missing = series.isna().to_numpy()  # (N,)
    odd = np.array([not (m or isinstance(v, str)) for v, m in zip(values, missing, strict=True)])
    if odd.any():
        example = values[odd][0]
        raise DataError(
            f"{path}: column '{column}' has {int(odd.sum())} values that are not text (e.g. "
            f"{example!r} of type {type(example).__name__}, {_where(odd)}); store it as strings"
        )
    texts = [normalise(v) if not m else "" for v, m in zip(values, missing, strict=True)]
    empty = np.array([not t for t in texts])
    if empty.any():
        raise DataError(
            f"{path}: column '{column}' has {int(empty.sum())} empty or blank texts "
            f"({_where(empty)}); drop those rows"
        )
    return np.array(texts, dtype=str)  # (N,)


def _table_labels(path: Path, column: str, series: pd.Series) -> np.ndarray:
    """The labels (N,) in npz's canonical form: int64 for integers and integral floats, str for
    strings (stripped: a stray space must not make a class of its own)."""
    values = series.to_numpy(dtype=object)  # (N,)
    values = np.array([v.strip() if isinstance(v, str) else v for v in values], dtype=object)
    missing = series.isna().to_numpy() | np.array([isinstance(v, str) and not v for v in values])
    if missing.any():
        raise DataError(
            f"{path}: column '{column}' has {int(missing.sum())} missing labels "
            f"({_where(missing)}); label or drop those rows"
        )
    kind = pd.api.types.infer_dtype(values, skipna=False)
    if kind == "string":
        labels = canonical_labels(path, column, np.array(values.tolist(), dtype=str))
    elif kind == "integer":
        labels = canonical_labels(path, column, np.array(values.tolist()))
    elif kind in ("floating", "mixed-integer-float"):
        labels = canonical_labels(path, column, np.array(values.tolist(), dtype=np.float64))
    else:
        raise DataError(
            f"{path}: column '{column}' holds {kind} values; labels are integers or strings, "
            "one type throughout"
        )
    classes = np.unique(labels)
    if len(classes) < 2:
        raise DataError(
            f"{path}: column '{column}' has one class only ({classes.tolist()[0]!r}); a "
            "classifier needs at least two"
        )
    return labels


# --- Debian's fortunes -------------------------------------------------------------------------


def read_fortunes(spec: DatasetSpec, key: str) -> RawDataset:
    """Each file of `classes` (under `fortunes_dir`) is a class labelled by its name as listed:
    its fortunes, whitespace-normalised, those over `max_chars` dropped, then at most
    `max_per_class` of them by a seeded draw (kept in file order)."""
    texts: list[str] = []
    labels: list[str] = []
    for index, name in enumerate(spec.classes):
        path = spec.fortunes_dir / str(name)
        fortunes = _fortunes(path, key)
        kept = [f for f in fortunes if spec.max_chars is None or len(f) <= spec.max_chars]
        if not kept:
            raise DataError(
                f"{path}: none of its {len(fortunes)} fortunes has at most {spec.max_chars} "
                f"characters; raise {key}.max_chars"
            )
        if spec.max_per_class is not None and len(kept) > spec.max_per_class:
            draw = np.random.default_rng([0, index]).permutation(len(kept))
            kept = [kept[i] for i in np.sort(draw[: spec.max_per_class])]
        texts += kept
        labels += [str(name)] * len(kept)
    data = RawDataset(Labelled(np.array(texts, dtype=str), np.array(labels, dtype=str)), None)
    return _ciphered(spec, data)


def _fortunes(path: Path, key: str) -> list[str]:
    """The non-empty fortunes of one file, in file order, each cleaned and normalised."""
    if not path.is_file():
        raise DataError(
            f"{path}: no such fortune file; check {key}.classes against the files under "
            f"{path.parent}"
        )
    text = _fortune_text(path)
    entries, lines = [], []
    for line in [*text.splitlines(), "%"]:
        if line.strip() == "%":
            entries.append(normalise(CONTROL.sub("", _unstrike("\n".join(lines)))))
            lines = []
        else:
            lines.append(line)
    fortunes = [entry for entry in entries if entry]
    if not fortunes:
        raise DataError(f"{path}: holds no fortunes (entries separated by lines of '%')")
    return fortunes


def _fortune_text(path: Path) -> str:
    """UTF-8, else the UTF-8 `.u8` sibling that some packages ship, else Latin-1; decoded from
    rot13 when strfile's index marks it so (the offensive ones, e.g. es/off/*)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        sibling = path.with_name(path.name + ".u8")
        try:
            text = sibling.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            text = path.read_bytes().decode("latin-1")
    index = path.with_name(path.name + ".dat")
    if index.is_file():
        header = index.read_bytes()[:20]  # version, count, longest, shortest, flags
        if len(header) == 20 and struct.unpack(">5I", header)[4] & STR_ROTATED:
            text = _rot13(text)
    return text


def _rot13(text: str) -> str:
    return text.translate(_letter_table((np.arange(26) + 13) % 26))


def _unstrike(text: str) -> str:
    """Undo terminal overstrikes ("_\\bx" underlines x, "x\\bx" makes it bold): keep the
    letter. Many English fortunes carry them (people, computers, law)."""
    if "\b" not in text:
        return text
    out: list[str] = []
    cursor = 0
    for char in text:
        if char == "\b":
            cursor = max(cursor - 1, 0)
        elif cursor < len(out):
            out[cursor] = out[cursor] if char == "_" else char
            cursor += 1
        else:
            out.append(char)
            cursor += 1
    return "".join(out)
