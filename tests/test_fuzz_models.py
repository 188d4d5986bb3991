"""Hostile model files: the faults found so far, then a fuzz suite over the GGUF reader, the
safetensors reader and config.json.

Every read has two possible outcomes: a load, or a GraftError whose one line names the file.
Never another exception, never more than LIMIT bytes of memory, never a hang. The readers run
in a worker process (this file, run as a script) whose address space is capped with
``resource.setrlimit(RLIMIT_AS)``: a header that makes graft allocate what the file does not
hold ends the read in a MemoryError there, reported as a failure here.

The fuzz is derandomized and small by default (a few seconds); ``-m slow`` runs a longer one.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import select
import shutil
import struct
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

LIMIT = 2 << 30  # bytes the worker's address space may grow by, beyond what its imports took
HANG = 120  # seconds without an answer: a hang (a guard against loops, not a timing assertion)
FAST, LONG = 60, 1500  # examples per fuzz test, by default and under -m slow


# ---------------------------------------------------------------------------------------------
# The worker: reads each file it is sent under the memory cap, answers the outcome
# ---------------------------------------------------------------------------------------------


def serve() -> None:
    import resource

    from graft.errors import GraftError
    from graft.io.gguf import read_gguf
    from graft.loading import load_model

    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # what the readers print goes to stderr, not into the answers
    torch.set_num_threads(1)
    with open("/proc/self/statm") as f:  # the address space after the imports
        size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (size + LIMIT, resource.RLIM_INFINITY))
    for line in sys.stdin:
        kind, path = json.loads(line)
        try:
            read_gguf(path) if kind == "gguf" else load_model(path, task="base")
            answer = ["ok", ""]
        except GraftError as e:
            answer = ["graft", str(e)]
        except BaseException:  # MemoryError included: the cap was hit
            answer = ["other", traceback.format_exc()]
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


class Worker:
    """The worker process, started again if a read killed it."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def read(self, kind: str, path: Path) -> tuple[str, str]:
        if self.proc is None or self.proc.poll() is not None:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
            self.proc = subprocess.Popen(
                [sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
            )
        self.proc.stdin.write(json.dumps([kind, str(path)]) + "\n")
        self.proc.stdin.flush()
        if not select.select([self.proc.stdout], [], [], HANG)[0]:
            self.proc.kill()
            pytest.fail(f"{path}: no answer in {HANG} s")
        line = self.proc.stdout.readline()
        if not line:
            pytest.fail(f"{path}: the reader died (exit status {self.proc.wait()})")
        outcome, detail = json.loads(line)
        return outcome, detail

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


def check(answer: tuple[str, str], names: Path) -> str:
    """A load, or a one-line GraftError naming ``names`` (the file, or the model folder)."""
    outcome, detail = answer
    assert outcome in ("ok", "graft"), detail
    if outcome == "graft":
        assert "\n" not in detail and detail.startswith(str(names)), detail
    return outcome


def fuzz(examples: int, strategy: Any, test: Any) -> None:
    """Run ``test`` on ``examples`` values drawn by Hypothesis, derandomized."""
    from hypothesis import HealthCheck, given, settings

    options = settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    options(given(strategy)(test))()


EXAMPLES = [pytest.param(FAST, id="fast"), pytest.param(LONG, id="long", marks=pytest.mark.slow)]


# ---------------------------------------------------------------------------------------------
# Model folders and files to start from
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A tiny Hugging Face folder per family, written by transformers."""
    from conftest import hf_model

    from graft.models import FAMILIES

    root = tmp_path_factory.mktemp("families")
    out = {}
    for family in sorted(n for n, f in FAMILIES.items() if f.inputs == "tokens"):
        hf_model(family).save_pretrained(root / family)
        out[family] = root / family
    return out


def with_config(base: Path, folder: Path, config: dict) -> Path:
    """``folder``: ``base``'s weights (linked) with ``config`` as its config.json."""
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(base / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


HIDDEN, FF, HEADS, KV_HEADS = 64, 128, 4, 2
SPM = ["<unk>", "<s>", "</s>", "▁", "a", "b", "c", "ab", "abc", "▁a", "▁ab", "ba", "cab"]


def small_gguf(path: Path, meta: dict[str, Any] | None = None) -> Path:
    """A 1-block llama GGUF with a SentencePiece vocabulary; ``meta`` replaces or (None) drops keys."""
    rng = np.random.default_rng(0)
    values: dict[str, Any] = {
        "llama.block_count": 1,
        "llama.context_length": 64,
        "llama.embedding_length": HIDDEN,
        "llama.feed_forward_length": FF,
        "llama.attention.head_count": HEADS,
        "llama.attention.head_count_kv": KV_HEADS,
        "llama.rope.freq_base": 10000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": SPM,
        "tokenizer.ggml.scores": [0.0] * 3 + [-float(i) for i in range(len(SPM) - 3)],
        "tokenizer.ggml.token_type": [2, 3, 3] + [1] * (len(SPM) - 3),
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.chat_template": "{{ messages[0]['content'] }}",
    } | (meta or {})
    w = gguf.GGUFWriter(path, "llama")
    for key, value in values.items():
        if value is not None:
            add_value(w, key, value)
    head_dim = HIDDEN // HEADS
    shapes = {
        "token_embd.weight": (len(SPM), HIDDEN),
        "output_norm.weight": (HIDDEN,),
        "blk.0.attn_norm.weight": (HIDDEN,),
        "blk.0.attn_q.weight": (HEADS * head_dim, HIDDEN),
        "blk.0.attn_k.weight": (KV_HEADS * head_dim, HIDDEN),
        "blk.0.attn_v.weight": (KV_HEADS * head_dim, HIDDEN),
        "blk.0.attn_output.weight": (HIDDEN, HEADS * head_dim),
        "blk.0.ffn_norm.weight": (HIDDEN,),
        "blk.0.ffn_gate.weight": (FF, HIDDEN),
        "blk.0.ffn_up.weight": (FF, HIDDEN),
        "blk.0.ffn_down.weight": (HIDDEN, FF),
    }
    for name, shape in shapes.items():
        x = (0.02 * rng.standard_normal(shape)).astype(np.float32)
        if name == "blk.0.ffn_up.weight":  # one quantized tensor: blocks of 32 values
            w.add_tensor(
                name,
                gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0),
                raw_dtype=gguf.GGMLQuantizationType.Q8_0,
            )
        else:
            w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def add_value(w: gguf.GGUFWriter, key: str, value: Any) -> None:
    """A metadata value, in the GGUF type that fits its Python type."""
    V = gguf.GGUFValueType
    if isinstance(value, list):
        if all(isinstance(v, str) for v in value):
            w.add_key_value(key, value, V.ARRAY, V.STRING)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            w.add_key_value(key, value, V.ARRAY, V.INT64)
        else:
            w.add_key_value(key, [float(v) for v in value], V.ARRAY, V.FLOAT32)
    elif isinstance(value, bool):
        w.add_key_value(key, value, V.BOOL)
    elif isinstance(value, int):
        w.add_key_value(
            key, value, V.UINT64 if value >= 2**63 else V.INT64 if value < 0 or value >= 2**32 else V.UINT32
        )
    elif isinstance(value, float):
        w.add_key_value(key, value, V.FLOAT32)
    else:
        w.add_key_value(key, value, V.STRING)


@pytest.fixture(scope="module")
def base_gguf(tmp_path_factory) -> Path:
    return small_gguf(tmp_path_factory.mktemp("gguf") / "small.gguf")


# ---------------------------------------------------------------------------------------------
# The faults of issue 12, each as it was found
# ---------------------------------------------------------------------------------------------

CONFIG_FAULTS = {  # config.json change -> the one line that names the key (or the tensor)
    "num_attention_heads=0": (
        {"num_attention_heads": 0},
        r"config\.json: num_attention_heads must be an integer >= 1, found 0$",
    ),
    "hidden_size=200000": (  # 24 GB of embeddings for a 30k vocabulary: refused from the header
        {"hidden_size": 200000},
        r"model\.safetensors: tensor 'embeddings\.word_embeddings\.weight' has shape \(99, 32\) but the "
        r"config implies \(99, 200000\)$",
    ),
    "max_position_embeddings=1e10": (
        {"max_position_embeddings": 1e10},
        r"config\.json: max_position_embeddings must be an integer >= 1, found 10000000000\.0$",
    ),
    "max_position_embeddings=10**10": (
        {"max_position_embeddings": 10**10},
        r"model\.safetensors: tensor 'embeddings\.position_embeddings\.weight' has shape \(512, 32\) but "
        r"the config implies \(10000000000, 32\)$",
    ),
    'hidden_size="384"': (
        {"hidden_size": "384"},
        r'config\.json: hidden_size must be an integer >= 1, found "384"$',
    ),
    "hidden_size=30": (
        {"hidden_size": 30},
        r"config\.json: hidden_size 30 is not divisible by num_attention_heads 4$",
    ),
    "num_hidden_layers=true": (
        {"num_hidden_layers": True},
        r"config\.json: num_hidden_layers must be an integer from 1 to 1,024, found true$",
    ),
    "hidden_dropout_prob=2": (
        {"hidden_dropout_prob": 2},
        r"config\.json: hidden_dropout_prob must be a number from 0 to 1\.0, found 2$",
    ),
    "architectures=3": (
        {"architectures": 3},
        r"config\.json: architectures must be a list of class names, found 3$",
    ),
}


@pytest.mark.parametrize("case", CONFIG_FAULTS)
def test_config_json_values_are_checked_before_a_model_is_allocated(folders, tmp_path, worker, case):
    change, match = CONFIG_FAULTS[case]
    config = json.loads((folders["bert"] / "config.json").read_text()) | change
    folder = with_config(folders["bert"], tmp_path / "model", config)
    outcome, message = worker.read("model", folder)  # under the memory cap
    assert outcome == "graft", message
    assert message.startswith(str(folder)) and "\n" not in message
    assert re.search(match, message), message


def test_llama_head_settings_name_their_keys(folders, tmp_path):
    from graft.errors import GraftError
    from graft.loading import load_model

    base = json.loads((folders["llama"] / "config.json").read_text())
    for change, match in [
        ({"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
        ({"head_dim": 7}, r"the head size 7 \(head_dim"),
        ({"rope_scaling": "linear"}, 'rope_scaling must be an object, found "linear"'),
        (
            {"rope_scaling": {"rope_type": "linear", "factor": 0}},
            r"rope_scaling\.factor must be a number > 0",
        ),
    ]:
        folder = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
        with pytest.raises(GraftError, match=rf"^{folder}/config\.json: {match}"):
            load_model(with_config(folders["llama"], folder, base | change), task="base")


class Payload:
    """What an attacker pickles: unpickling calls os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_weights_file_holding_code_is_refused_plainly(folders, tmp_path, capfd):
    from graft.errors import GraftError
    from graft.loading import load_model

    marker = tmp_path / "ran"
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(folders["bert"] / "config.json", folder)
    torch.save(
        {"embeddings.word_embeddings.weight": torch.zeros(2), "x": Payload(marker)},
        folder / "pytorch_model.bin",
    )
    with pytest.raises(GraftError) as info:
        load_model(folder)
    message = str(info.value)
    assert message == (
        f"{folder}/pytorch_model.bin: refused, it holds more than tensors and plain values: code "
        "(posix.system) that loading it would run"
    )
    assert not marker.exists()
    assert "weights_only" not in message and "\x1b" not in message

    # a raw pickle (not torch.save's zip): one line, and no warning from torch on the way
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": [1.0]}, f, protocol=4)
    with pytest.raises(GraftError) as info:
        load_model(folder)
    assert str(info.value) == (
        f"{folder}/pytorch_model.bin: not a readable PyTorch weights file (damaged, or not written by torch.save)"
    )
    assert capfd.readouterr().err == ""


def test_a_checkpoint_holding_code_is_refused_by_the_trainer_too(tmp_path):
    from graft.errors import GraftError
    from graft.train.checkpoint import read_file

    torch.save({"step": 3, "hook": Payload(tmp_path / "ran")}, tmp_path / "trainer.pt")
    with pytest.raises(GraftError, match=r"trainer\.pt: refused, .* code \(posix\.system\)"):
        read_file(tmp_path / "trainer.pt")
    assert not (tmp_path / "ran").exists()


def test_an_index_cannot_point_outside_its_folder(folders, tmp_path):
    from graft.errors import GraftError
    from graft.loading import load_model

    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(folders["bert"] / "config.json", folder)
    index = {"weight_map": {"embeddings.word_embeddings.weight": "../../model.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        GraftError, match=r"index\.json: shard '\.\./\.\./model\.safetensors' is not a file name"
    ):
        load_model(folder)


# ---------------------------------------------------------------------------------------------
# Fuzz: GGUF
# ---------------------------------------------------------------------------------------------

INTERESTING = [0, 1, 2, 3, 4, 7, 8, 9, 13, 24, 31, 32, 33, 255, 256, 2**16, 2**31 - 1, 2**31, 2**32 - 1]
INTERESTING += [2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


def gguf_slots(path: Path) -> list[tuple[int, int]]:
    """(offset, size) of every integer in the header: versions, counts, lengths, types, dims, offsets."""
    reader = gguf.GGUFReader(path)
    slots = []
    for field in [*reader.fields.values(), *(t.field for t in reader.tensors)]:
        offset = field.offset
        for part in field.parts:
            if part.dtype.kind in "ui" and part.size == 1 and part.nbytes in (4, 8):
                slots.append((offset, part.nbytes))
            offset += part.nbytes
    return slots


def mutations(size: int, slots: list[tuple[int, int]]):
    from hypothesis import strategies as st

    value = st.one_of(st.sampled_from(INTERESTING), st.integers(0, 2**64 - 1))
    one = st.one_of(
        st.tuples(st.just("slot"), st.sampled_from(slots), value),
        st.tuples(st.just("cut"), st.integers(0, size - 1), st.none()),
        st.tuples(st.just("bytes"), st.integers(0, size - 1), st.binary(min_size=1, max_size=16)),
    )
    return st.lists(one, min_size=1, max_size=4)


def mutate(data: bytes, changes: list) -> bytes:
    for kind, where, what in changes:
        if kind == "slot":
            (offset, size), value = where, what
            data = data[:offset] + (value % 256**size).to_bytes(size, "little") + data[offset + size :]
        elif kind == "cut":
            data = data[:where]
        else:
            data = data[:where] + what + data[where + len(what) :]
    return data


def test_the_small_gguf_loads(base_gguf, worker):
    assert worker.read("gguf", base_gguf) == ("ok", "")


@pytest.mark.parametrize("examples", EXAMPLES)
def test_fuzz_gguf_bytes(base_gguf, tmp_path, worker, examples):
    data = base_gguf.read_bytes()

    def read(changes: list) -> None:
        path = tmp_path / "fuzz.gguf"
        path.write_bytes(mutate(data, changes))
        check(worker.read("gguf", path), path)

    fuzz(examples, mutations(len(data), gguf_slots(base_gguf)), read)


GGUF_KEYS = [
    "llama.block_count", "llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
    "llama.attention.head_count", "llama.attention.head_count_kv", "llama.attention.key_length",
    "llama.rope.freq_base", "llama.rope.dimension_count", "llama.attention.layer_norm_rms_epsilon",
    "llama.rope.scaling.type", "llama.rope.scaling.factor", "llama.vocab_size", "general.alignment",
    "general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.add_bos_token", "tokenizer.chat_template", "tokenizer.chat_template.tool_use",
]  # fmt: skip


def gguf_values():
    from hypothesis import strategies as st

    token = st.one_of(st.text(max_size=6), st.just("a" * 60_000), st.just("<s>"), st.just("ab"))
    return st.one_of(
        st.none(),  # the key dropped
        st.sampled_from([0, 1, 2, 3, 7, 16, 64, 2**31, 2**32 - 1, 2**40, 10**9, -1]),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(width=32),
        st.booleans(),
        st.text(max_size=10),
        st.sampled_from(["llama", "gpt2", "linear", "yarn", "smollm", "a b", "ab c"]),
        st.lists(token, min_size=1, max_size=20),  # the writer refuses empty arrays
        st.lists(st.integers(-3, 40), min_size=1, max_size=20),
        st.lists(st.floats(width=32), min_size=1, max_size=20),
    )


@pytest.mark.parametrize("examples", EXAMPLES)
def test_fuzz_gguf_metadata_values_and_types(tmp_path, worker, examples):
    from hypothesis import strategies as st

    def read(meta: dict) -> None:
        path = small_gguf(tmp_path / "fuzz.gguf", meta)
        check(worker.read("gguf", path), path)

    fuzz(examples, st.dictionaries(st.sampled_from(GGUF_KEYS), gguf_values(), min_size=1, max_size=3), read)


# ---------------------------------------------------------------------------------------------
# Fuzz: safetensors headers, offsets, dtypes, truncation
# ---------------------------------------------------------------------------------------------

DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "X", "", 5, None]


def header_changes(names: list[str]):
    from hypothesis import strategies as st

    number = st.one_of(st.sampled_from(INTERESTING), st.integers(-10, 10**6))
    entry = st.one_of(
        st.tuples(st.just("dtype"), st.sampled_from(DTYPES)),
        st.tuples(st.just("shape"), st.lists(number, max_size=4)),
        st.tuples(st.just("data_offsets"), st.lists(number, min_size=0, max_size=3)),
        st.tuples(st.just("drop"), st.none()),
        st.tuples(st.just("rename"), st.text(max_size=12)),
    )
    return st.lists(st.tuples(st.sampled_from(names), entry), min_size=1, max_size=3)


def rewrite_header(data: bytes, changes: list) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8 : 8 + n]), data[8 + n :]
    for name, (field, value) in changes:
        if name not in header:
            continue
        if field == "drop":
            del header[name]
        elif field == "rename":
            header[value] = header.pop(name)
        else:
            header[name][field] = value
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


@pytest.mark.parametrize("examples", EXAMPLES)
def test_fuzz_safetensors(folders, tmp_path, worker, examples):
    from hypothesis import strategies as st

    base = folders["bert"]
    data = (base / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    names = [k for k in json.loads(data[8 : 8 + n]) if k != "__metadata__"]
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(base / "config.json", folder)

    def read(change: tuple) -> None:
        kind, changes = change
        mutated = rewrite_header(data, changes) if kind == "header" else mutate(data, changes)
        (folder / "model.safetensors").write_bytes(mutated)
        check(worker.read("model", folder), folder)

    # the header's length is the first 8 bytes: a slot of its own
    strategy = st.one_of(
        st.tuples(st.just("header"), header_changes(names)),
        st.tuples(st.just("bytes"), mutations(len(data), [(0, 8)])),
    )
    fuzz(examples, strategy, read)


# ---------------------------------------------------------------------------------------------
# Fuzz: config.json values and types, per key, for every family
# ---------------------------------------------------------------------------------------------

EXTRA_KEYS = [
    "head_dim", "num_key_value_heads", "rope_scaling", "rope_parameters", "rope_theta", "sliding_window",
    "use_sliding_window", "layer_types", "max_window_layers", "architectures", "model_type", "graft_task",
    "n_inner", "num_hidden_groups", "inner_group_num", "embedding_size", "position_embedding_type",
]  # fmt: skip


def json_values():
    from hypothesis import strategies as st

    rope = st.dictionaries(
        st.sampled_from(["rope_type", "type", "factor", "low_freq_factor", "high_freq_factor",
                         "original_max_position_embeddings", "rope_theta"]),
        st.one_of(st.sampled_from(["linear", "llama3", "default", "yarn"]), st.integers(-1, 64), st.floats(-1, 100)),
        max_size=6,
    )  # fmt: skip
    return st.one_of(
        st.sampled_from([0, 1, 2, 3, 4, 5, 8, 16, 32, 64, -1, 200000, 10**10, 2**63, 1e10, 0.5, 1.5, -0.5]),
        st.sampled_from([math.nan, math.inf, "384", "", "gelu", "llama", "bert", True, False, None, [], {}]),
        st.integers(-5, 10**6),
        st.floats(),
        st.text(max_size=8),
        st.lists(st.one_of(st.integers(-2, 100), st.text(max_size=3)), max_size=3),
        rope,
    )


@pytest.mark.parametrize("examples", EXAMPLES)
def test_fuzz_config_json(folders, tmp_path, worker, examples):
    from hypothesis import strategies as st

    configs = {family: json.loads((folder / "config.json").read_text()) for family, folder in folders.items()}
    count = iter(range(10**9))

    def read(change: tuple) -> None:
        family, values, dropped = change
        config = {k: v for k, v in (configs[family] | values).items() if k not in dropped}
        folder = with_config(folders[family], tmp_path / f"model-{next(count)}", config)
        check(worker.read("model", folder), folder)

    def changes(family: str):
        keys = st.sampled_from(sorted(configs[family]) + EXTRA_KEYS)
        return st.tuples(
            st.just(family),
            st.dictionaries(keys, json_values(), max_size=3),
            st.sets(keys, max_size=1),
        )

    fuzz(examples, st.sampled_from(sorted(configs)).flatmap(changes), read)


if __name__ == "__main__":
    serve()
