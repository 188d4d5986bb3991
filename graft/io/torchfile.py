"""Files written by ``torch.save``, read without running the code that a pickle can carry."""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from graft.errors import GraftError

# torch names the global that unpickling would call: "Trying to load unsupported GLOBAL
# posix.system whose module posix is blocked" (torch 2.13, for os, subprocess...), "Unsupported
# global: GLOBAL __main__.Hook was not an allowed global by default" (any other function or class)
UNSAFE_GLOBAL = re.compile(r"unsupported global:? (?:GLOBAL )?(\S+)", re.IGNORECASE)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def load_torch_file(path: Path, what: str = "PyTorch file", mmap: bool = False) -> Any:
    """What ``torch.save`` wrote to ``path``, if it is tensors and plain values only.

    A file that refers to any Python function or class is refused: unpickling would call it.
    Every failure is one line naming the file, without torch's advice to turn the check off.
    ``mmap``: map the tensors instead of reading them (zip files, the format since torch 1.6).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about a raw pickle's protocol, then fails
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch's reader fails with many types on damaged bytes
        text = ANSI.sub("", str(e))
        if found := UNSAFE_GLOBAL.search(text):
            raise GraftError(
                f"{path}: refused, it holds more than tensors and plain values: code ({found[1]}) "
                "that loading it would run"
            ) from None
        if isinstance(e, pickle.UnpicklingError):
            why = "damaged, or not written by torch.save"
        else:
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            why = next((line for line in lines if "weights_only" not in line), type(e).__name__)
        raise GraftError(f"{path}: not a readable {what} ({why})") from None
