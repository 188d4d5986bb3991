"""Speech data sets: which audio file says what.

Two layouts, as Hugging Face's audiofolder and most speech corpora have them:

- a CSV file with a header naming a ``path`` (or ``file_name``) column and a ``text`` column; paths
  are relative to the CSV's folder;
- a folder of audio files: with a ``metadata.csv`` in it (read as above), or else each audio file
  with its transcript in a .txt file of the same name beside it.
"""

from __future__ import annotations

import csv
from pathlib import Path

from graft.errors import GraftError, did_you_mean

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
PATH_COLUMNS = ("path", "file_name")  # graft's name, Hugging Face audiofolder's


def read_speech_records(path: str | Path) -> list[dict[str, str | Path]]:
    """[{"audio": Path, "text": str}, ...] from a CSV file or an audio folder."""
    path = Path(path)
    if path.is_dir():
        if (path / "metadata.csv").is_file():
            return _read_csv(path / "metadata.csv")
        return _read_folder(path)
    if not path.is_file():
        raise GraftError(f"{path}: no such file or folder")
    if path.suffix.lower() not in (".csv", ".tsv"):
        raise GraftError(f"{path}: speech data is a CSV file (path,text) or a folder of audio files")
    return _read_csv(path)


def _read_csv(path: Path) -> list[dict[str, str | Path]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f, delimiter=delimiter))
    except UnicodeDecodeError:
        raise GraftError(f"{path}: is not UTF-8 text") from None
    except csv.Error as e:
        raise GraftError(f"{path}: is not valid CSV ({e})") from None
    if not rows:
        raise GraftError(f"{path}: is empty (expected a header line: path,text)")
    header = [name.strip() for name in rows[0]]
    column = next((c for c in PATH_COLUMNS if c in header), None)
    for wanted in (column, "text"):
        if wanted is None or wanted not in header:
            missing = wanted or "path"
            hint = next((did_you_mean(missing, [h]) for h in header if did_you_mean(missing, [h])), "")
            raise GraftError(f"{path}: line 1: no {missing!r} column (the header has {header}){hint}")
    where, text_at = header.index(column), header.index("text")
    records: list[dict[str, str | Path]] = []
    for line, row in enumerate(rows[1:], 2):
        if not row:
            continue
        if len(row) != len(header):
            raise GraftError(f"{path}: line {line}: {len(row)} fields, but the header has {len(header)}")
        audio = path.parent / row[where].strip()
        if not row[where].strip():
            raise GraftError(f"{path}: line {line}: the {column!r} field is empty")
        if not audio.is_file():
            raise GraftError(f"{path}: line {line}: audio file {audio} does not exist")
        records.append({"audio": audio, "text": row[text_at].strip()})
    if not records:
        raise GraftError(f"{path}: has a header but no rows")
    return records


def _read_folder(folder: Path) -> list[dict[str, str | Path]]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    if not files:
        raise GraftError(f"{folder}: holds no audio files ({', '.join(AUDIO_SUFFIXES)}) and no metadata.csv")
    records: list[dict[str, str | Path]] = []
    for audio in files:
        transcript = audio.with_suffix(".txt")
        if not transcript.is_file():
            raise GraftError(
                f"{audio}: has no transcript {transcript.name} beside it (or give a metadata.csv)"
            )
        try:
            text = transcript.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            raise GraftError(f"{transcript}: is not UTF-8 text") from None
        records.append({"audio": audio, "text": text})
    return records
