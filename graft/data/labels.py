"""The label map: class names <-> ids, fixed by the training data and saved with the model."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from graft.data.records import label_error
from graft.errors import GraftError
from graft.io.atomic import write_text

FILENAME = "labels.json"  # the name save() gives the file inside a model folder


def _order(label: str) -> tuple[int, int | str]:
    # Integer-looking labels sort as numbers ("2" before "10"), then every other label as text.
    return (0, int(label)) if re.fullmatch(r"-?\d+", label) else (1, label)


class LabelMap:
    """Labels sorted deterministically, numbered from 0.

    ``multi_label`` marks a map for records whose label is a list (several classes at once).
    """

    def __init__(self, labels: Iterable[str], multi_label: bool = False) -> None:
        self.id2label: list[str] = sorted({str(label) for label in labels}, key=_order)
        self.label2id: dict[str, int] = {label: i for i, label in enumerate(self.id2label)}
        self.multi_label = multi_label

    def __len__(self) -> int:
        return len(self.id2label)

    def __contains__(self, label: object) -> bool:
        return label in self.label2id

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelMap) and (self.id2label, self.multi_label) == (
            other.id2label,
            other.multi_label,
        )

    def __repr__(self) -> str:
        return f"LabelMap({self.id2label!r}, multi_label={self.multi_label})"

    def encode(self, label: str | list[str], where: str = "label") -> int | list[int]:
        """The id of ``label`` (a list of ids for a list of labels).

        ``where`` names the place in the data for the error, e.g. "dev.csv, line 4, column 'label'".
        """
        if isinstance(label, list):
            return [self.encode(item, where) for item in label]
        if label not in self.label2id:
            raise label_error("unseen label", where, label, self.id2label, "was never seen in training")
        return self.label2id[label]

    def decode(self, index: int) -> str:
        return self.id2label[index]

    def to_json(self) -> str:
        """JSON with Hugging Face's ``id2label`` / ``label2id`` layout (ids as string keys)."""
        return json.dumps(
            {
                "id2label": {str(i): label for i, label in enumerate(self.id2label)},
                "label2id": self.label2id,
                "multi_label": self.multi_label,
            },
            indent=2,
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, text: str, where: str = "label map") -> LabelMap:
        try:
            data = json.loads(text)
            id2label = {int(i): str(label) for i, label in data["id2label"].items()}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
            raise GraftError(f"{where}: not a label map ({type(error).__name__}: {error})") from None
        if sorted(id2label) != list(range(len(id2label))):
            raise GraftError(
                f"{where}, column 'id2label': ids must be 0..{len(id2label) - 1}, got {sorted(id2label)}"
            )
        label_map = cls([], multi_label=bool(data.get("multi_label", False)))
        # Keep the saved order: a trained model's output i means id2label[i], however labels would sort now.
        label_map.id2label = [id2label[i] for i in range(len(id2label))]
        label_map.label2id = {label: i for i, label in enumerate(label_map.id2label)}
        return label_map

    def save(self, folder: str | Path) -> Path:
        """Write ``labels.json`` into a model folder."""
        path = Path(folder) / FILENAME
        write_text(path, self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> LabelMap:
        """Read ``labels.json`` from a model folder (or the file itself)."""
        path = Path(folder)
        path = path / FILENAME if path.is_dir() else path
        if not path.exists():
            raise GraftError(f"{path}: no such file (a model folder keeps its label map in {FILENAME})")
        return cls.from_json(path.read_text(encoding="utf-8"), where=str(path))
