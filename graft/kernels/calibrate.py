"""Which route each linear call takes on this CPU: measured once per processor, then read from a file.

oneDNN's matmul on weights packed once into its blocked layout, oneDNN on the weights as they
are, and torch's F.linear compute the same product, and which is fastest depends on the
processor, the dtype and the shape: on an AMD EPYC oneDNN on packed weights decodes up to twice
as fast as F.linear, while on an Intel Xeon with AMX F.linear decodes fp32 20% faster. So graft
measures rather than guesses. The first time a model multiplies in a dtype at a class of row
counts (1 row and 2-32 rows: decoding; more: batch inference and training), its ``Calibration``
times the three routes on each of the model's own weight shapes (fused Q/K/V and gate/up
included, GELU fused where the layer has it), the fastest of a few single calls taken in turns
counting (weights over 64 MiB and products over 2^27 multiply-adds are timed on a slice of their
rows and scaled), and keeps the figures in a JSON file per processor, torch version and thread
count, under $XDG_CACHE_HOME/graft/kernels (~/.cache/graft/kernels by default). Each call then
takes the fastest route it allows, torch's F.linear unless another is at least ``MARGIN``
faster: the kernels are never slower than the plain path by more than the timing's noise. A file
that cannot be read or written is ignored, with one line in the log. Figures timed while other
work holds the machine's CPUs (a load average above their number, or parallel calls that wait
for one) are marked so, and timed again by the
first process that starts at a quiet moment; until then they stand, so that the processes of
one machine (a training run and its resumption, say) take the same routes.

Attention at inference (float32, CPU) is chosen the same way, per class of shapes: torch's SDPA
or matmul-softmax-matmul written out (graft.kernels.attention.matmul_attention). SDPA's flash
kernel has a fixed cost per block of queries and keys that some short lengths do not earn back:
on an AMD EPYC at MiniLM's (32 texts, 12 heads, 24 tokens, head size 32), one thread, SDPA took
1.70 ms a layer and the written-out math 1.35 ms (another run of the same CPU kind: 1.6-1.8 and
0.9-1.1 ms), but at 16 tokens they were even and from 32 tokens on SDPA won by 2-3x. No fixed
threshold fits every CPU, so graft times both at the first call of each class: batch 1, up to 8 or more
(timed at 1, 8, 32), query and key counts rounded up to the next of LENGTHS, the heads, head size
and mask (none, causal, bool or an added float bias); longer than LENGTHS, SDPA without timing.
The figures go into the same file, under "attention".

``GRAFT_KERNEL_ROUTE`` skips the measuring and forces a route wherever a call allows it:
``packed`` (oneDNN on packed weights while frozen, oneDNN elsewhere: graft's tuning for AMD),
``onednn`` (never packed), ``torch`` (F.linear everywhere), attention on SDPA for each of them;
``measure``, the default, measures.
``graft.kernels.report(model)`` shows the figures and names the file; delete it to measure again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import threading
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from graft.errors import GraftError, did_you_mean
from graft.io.atomic import write_json
from graft.kernels.attention import matmul_attention
from graft.kernels.linear import ROUTES, onednn_linear, pack, torch_linear

log = logging.getLogger("graft")

ENV = "GRAFT_KERNEL_ROUTE"
# a route to force -> what a call takes, the first of these it allows
FORCED = {"packed": ROUTES, "onednn": ("onednn", "torch"), "torch": ("torch",)}
NAMES = {"packed": "oneDNN packed", "onednn": "oneDNN", "torch": "F.linear"}
ROWS = {"one": 1, "few": 8, "many": 256}  # class of row counts -> the row count it is timed at
FEW = 32  # up to this many rows: "few" (decoding a batch); more: "many"
MARGIN = 0.05  # how much faster than F.linear another route must be to be taken
MIN_ROUNDS, MAX_ROUNDS, BUDGET = 3, 30, 0.01  # rounds of each shape's timing: more while under BUDGET seconds
MAX_BYTES = 64 * 2**20  # larger weights stream from memory all the same: timed on a slice
MAX_MACS = 2**27  # larger products run at the same rate: timed on a slice (>= 256 output rows)

# attention at inference: torch's SDPA, or matmul-softmax-matmul (graft.kernels.attention)
ATTENTION = ("sdpa", "matmul")
ATTENTION_NAMES = {"sdpa": "SDPA", "matmul": "matmul-softmax-matmul"}
LENGTHS = (1, 8, 16, 24, 32, 48, 64, 96, 128)  # classes of query and key counts, timed at their top
BATCHES = (1, 8, 32)  # classes of batch sizes, timed at their top (larger ones at 32: costs per row alike)
MASKINGS = ("none", "causal", "bool", "bias")

# measure(dtype, rows, out, inp, activation) -> seconds per call of each route in ROUTES
Measure = Callable[[torch.dtype, int, int, int, str], dict[str, float]]
# measure(dtype, batch, heads, queries, keys, head_dim, masking) -> seconds per call of each of ATTENTION
MeasureAttention = Callable[[torch.dtype, int, int, int, int, int, str], dict[str, float]]


def rows_class(rows: int) -> str:
    return "one" if rows == 1 else "few" if rows <= FEW else "many"


def time_routes(dtype: torch.dtype, rows: int, out: int, inp: int, activation: str) -> dict[str, float]:
    """Seconds per call of each route for (rows, inp) inputs through an (out, inp) weight and the
    activation ("none", or one oneDNN fuses): the fastest of a few calls of each, taken in turns,
    so a moment of load on the machine hits every route alike."""
    size = torch.finfo(dtype).bits // 8
    part = MAX_MACS // (rows * inp) if rows > FEW else MAX_BYTES // (inp * size)
    part = min(out, max(part, 256))  # the output rows timed
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(part, inp, generator=generator).to(dtype)  # (part, inp)
    x = torch.randn(rows, inp, generator=generator).to(dtype)  # (rows, inp)
    act = None if activation == "none" else activation
    runs = {
        "packed": partial(onednn_linear, x, pack(w), None, act),
        "onednn": partial(onednn_linear, x, w, None, act),
        "torch": partial(torch_linear, x, w, None, act),
    }
    return {name: seconds * out / part for name, seconds in fastest_calls(runs).items()}


def time_attention(
    dtype: torch.dtype, batch: int, heads: int, queries: int, keys: int, head_dim: int, masking: str
) -> dict[str, float]:
    """Seconds per call of SDPA and of matmul-softmax-matmul on random (batch, heads, queries |
    keys, head_dim) tensors laid out as the model's projections leave them (heads transposed out
    of (batch, tokens, heads, head_dim)), with ``masking`` (MASKINGS; "bool": every other text
    padded to half its keys)."""
    generator = torch.Generator().manual_seed(0)

    def heads_of(tokens: int) -> torch.Tensor:  # (batch, heads, tokens, head_dim), strided as in the model
        return torch.randn(batch, tokens, heads, head_dim, generator=generator).to(dtype).transpose(1, 2)

    q, k, v = heads_of(queries), heads_of(keys), heads_of(keys)
    mask = None
    if masking == "bool":
        mask = torch.ones(batch, 1, 1, keys, dtype=torch.bool)  # (batch, 1, 1, keys): the keys of each text
        mask[1::2, ..., (keys + 1) // 2 :] = False
    elif masking == "bias":
        mask = torch.randn(1, heads, queries, keys, generator=generator).to(
            dtype
        )  # (1, heads, queries, keys)
    causal, scale = masking == "causal", head_dim**-0.5
    runs = {
        "sdpa": partial(F.scaled_dot_product_attention, q, k, v, mask, is_causal=causal, scale=scale),
        "matmul": partial(matmul_attention, q, k, v, mask, causal, scale),
    }
    return fastest_calls(runs)


def fastest_calls(runs: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Seconds of each run's fastest single call, the runs taken in turns, so a moment of load on
    the machine hits every one alike."""
    best = dict.fromkeys(runs, float("inf"))
    with torch.inference_mode():
        for run in runs.values():
            run()  # oneDNN makes its primitive at the first call
        # single calls, the fastest counting: a call that another process delayed (on a busy
        # machine, most calls of a parallel matmul wait for one of its threads) is not the route's
        # speed. Quick calls get more rounds, for the same time.
        start = time.perf_counter()
        for round in range(MAX_ROUNDS):
            if round >= MIN_ROUNDS and time.perf_counter() - start > BUDGET:
                break
            for name, run in runs.items():
                begin = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - begin)
    return best


def processor() -> str:
    """The CPU's model name (/proc/cpuinfo's, as lscpu shows it), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> str:
    """The CPU's feature flags as /proc/cpuinfo lists them ("" where there is no such file)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def busy() -> str:
    """Why other work competes for this process's CPUs ('load 6.1 on 2 CPUs'), else ''."""
    try:
        cpus = len(os.sched_getaffinity(0))
        average = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on this system
        cpus, average = os.cpu_count() or 1, 0.0
    if average > cpus + 0.5:
        return f"load {average:.1f} on {cpus} CPUs"
    threads = torch.get_num_threads()
    if threads > 1:
        # A parallel add of 1 MB takes some µs; while another process holds one of the CPUs, every
        # parallel call waits for a thread that is not running, a scheduling slice (ms), whatever
        # the load average says
        x = torch.zeros(2**18)
        waits = []
        for _ in range(5):
            start = time.perf_counter()
            x.add_(1)
            waits.append(time.perf_counter() - start)
        if min(waits) > 1e-3:
            return f"each parallel call of its {threads} threads waits {min(waits) * 1e3:.0f} ms for a CPU"
    return ""


def cache_folder() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "graft" / "kernels"


def forced_route() -> str | None:
    """$GRAFT_KERNEL_ROUTE: a route to force, or None to measure."""
    value = os.environ.get(ENV, "measure").strip().lower() or "measure"
    if value == "measure":
        return None
    if value not in FORCED:
        raise GraftError(
            f"{ENV}={value}: not a route; use one of measure, {', '.join(FORCED)}"
            + did_you_mean(value, ["measure", *FORCED])
        )
    return value


class Calibration:
    """Chooses each linear call's route, and each inference attention's, on this CPU from timings
    measured at first use.

    ``measure`` times the routes of one linear shape (``time_routes``; a test passes its own
    figures), ``attention`` those of one attention shape (``time_attention``); ``force`` takes a
    route wherever a call allows it, and SDPA for attention, measuring nothing (default:
    $GRAFT_KERNEL_ROUTE); ``cache`` is the folder of the timing files, False for none. Shared by
    the threads calling one model (a lock guards the measuring), and by its copies.
    """

    def __init__(
        self,
        measure: Measure = time_routes,
        force: str | None = None,
        cache: Path | bool = True,
        attention: MeasureAttention = time_attention,
    ) -> None:
        if force is not None and force not in FORCED:
            raise GraftError(f"force={force!r}: not a route; use one of {', '.join(FORCED)}")
        self.measure = measure
        self.measure_attention = attention
        self.force = force if force is not None else forced_route()
        self.folder = cache_folder() if cache is True else Path(cache) if cache else None
        self.processor = processor()
        self.tables: dict[str, dict[str, dict[str, float]]] = {}  # identity -> key -> figures
        self.chosen: dict[tuple, str] = {}  # every call's question -> its route, asked once
        self.expected: set[tuple[int, int, str]] = set()  # (out, inp, activation) of the model's layers
        self.lock = threading.Lock()
        self.warned: set[str] = set()
        self.unreadable: set[Path] = set()  # files not to write either (a folder in the way, say)

    # -- what a call asks -----------------------------------------------------------------------

    def route(
        self, dtype: torch.dtype, rows: int, out: int, inp: int, activation: str, candidates: tuple[str, ...]
    ) -> str:
        """The route among ``candidates`` (in ROUTES) a call of this shape takes."""
        if self.force is not None:
            return next(r for r in FORCED[self.force] if r in candidates)
        question = (torch.get_num_threads(), dtype, rows_class(rows), out, inp, activation, candidates)
        route = self.chosen.get(question)
        if route is None:
            route = self.chosen[question] = fastest(
                self.figures(dtype, rows, out, inp, activation), candidates
            )
        return route

    def figures(self, dtype: torch.dtype, rows: int, out: int, inp: int, activation: str) -> dict[str, float]:
        """Seconds per call of each route for this shape's class of rows (measured if not yet)."""
        table = self.table()
        figures = table.get(key(dtype, rows_class(rows), out, inp, activation))
        return (
            figures
            if figures is not None
            else self.calibrate(dtype, rows_class(rows), (out, inp, activation))
        )

    def explain(
        self, dtype: torch.dtype, rows: int, out: int, inp: int, activation: str, candidates: tuple[str, ...]
    ) -> str:
        """The route a call of this shape takes, and why: 'F.linear (oneDNN packed 17 µs, ...)'."""
        route = self.route(dtype, rows, out, inp, activation, candidates)
        if self.force is not None:
            return f"{NAMES[route]} (forced to {self.force}, not measured)"
        figures = self.figures(dtype, rows, out, inp, activation)
        busy = "; timed while other work held the CPUs" if figures.get("busy") else ""
        return f"{NAMES[route]} ({', '.join(f'{NAMES[r]} {microseconds(figures[r])}' for r in candidates)}{busy})"

    def attention(
        self, dtype: torch.dtype, batch: int, heads: int, queries: int, keys: int, head_dim: int, masking: str
    ) -> str:
        """How an inference attention call of this shape runs: "sdpa", or "matmul" where its class
        of shapes timed that at least MARGIN faster; SDPA past LENGTHS[-1] queries or keys, and
        when a route is forced, without timing. ``masking``: one of MASKINGS."""
        if self.force is not None or max(queries, keys) > LENGTHS[-1]:
            return "sdpa"
        # asked once per shape (a decoding step asks in every layer), answered once per class
        question = (
            "attention",
            torch.get_num_threads(),
            dtype,
            batch,
            heads,
            queries,
            keys,
            head_dim,
            masking,
        )
        route = self.chosen.get(question)
        if route is None:
            shape = attention_class(batch, heads, queries, keys, head_dim, masking)
            route = self.chosen[question] = fastest(self.attention_figures(dtype, shape), ATTENTION, "sdpa")
        return route

    def attention_figures(
        self, dtype: torch.dtype, shape: tuple[int, int, int, int, int, str]
    ) -> dict[str, float]:
        """Seconds per call of SDPA and matmul-softmax-matmul at an ``attention_class`` (timed if not yet)."""
        name = attention_key(dtype, *shape)
        figures = self.table().get(name)
        if figures is None:
            runs = lambda table: {name: partial(self.measure_attention, dtype, *shape)}  # noqa: E731
            figures = self.timed(name, runs, "attention shape")
        return figures

    def explain_attention(self, dtype: torch.dtype) -> str:
        """How inference attention runs in ``dtype``, and the classes of shapes timed so far, with
        their figures: 'per class of shapes, ...; b32 h12 q24 k24 d32 bool: matmul-softmax-matmul
        (SDPA 1,712 µs, matmul-softmax-matmul 1,003 µs)'."""
        if self.force is not None:
            return f"SDPA (forced to {self.force}, not measured)"
        prefix = f"attention {str(dtype).removeprefix('torch.')} "  # (attention_key's)
        timed = [
            f"{name.removeprefix(prefix)}: {ATTENTION_NAMES[fastest(figures, ATTENTION, 'sdpa')]} ("
            + ", ".join(f"{ATTENTION_NAMES[r]} {microseconds(figures[r])}" for r in ATTENTION)
            + ("; timed while other work held the CPUs" if figures.get("busy") else "")
            + ")"
            for name, figures in sorted(self.table().items())
            if name.startswith(prefix)
        ]
        return "; ".join(
            [
                f"per class of shapes up to {LENGTHS[-1]} tokens, SDPA unless matmul-softmax-matmul timed "
                f"{MARGIN:.0%} faster (timed at first use)",
                *timed,
            ]
        )

    def expect(self, shapes: Iterable[tuple[int, int, str]]) -> None:
        """The (out, inp, activation) of a model's layers: measured together, at the first call of each."""
        self.expected.update(shapes)

    # -- measuring and keeping ------------------------------------------------------------------

    def calibrate(self, dtype: torch.dtype, rows: str, shape: tuple[int, int, str]) -> dict[str, float]:
        """Time ``shape`` and every expected shape not timed yet, for this dtype and rows class."""

        def todo(table: dict) -> dict[str, Callable[[], dict[str, float]]]:
            shapes = sorted(s for s in self.expected | {shape} if key(dtype, rows, *s) not in table)
            return {key(dtype, rows, *s): partial(self.measure, dtype, ROWS[rows], *s) for s in shapes}

        name = str(dtype).removeprefix("torch.")
        return self.timed(key(dtype, rows, *shape), todo, f"linear shapes at {ROWS[rows]} rows ({name})")

    def timed(
        self, wanted: str, todo: Callable[[dict], dict[str, Callable[[], dict[str, float]]]], what: str
    ) -> dict[str, float]:
        """The figures of key ``wanted``, timing (under the lock) each run ``todo(table)`` names by
        its key; figures timed on a busy machine are marked so."""
        with self.lock:
            table = self.table()
            if wanted in table:  # another thread measured it meanwhile
                return table[wanted]
            runs = todo(table)
            competing = busy() if self.path() is not None else ""
            start = time.perf_counter()
            for name, measure in runs.items():
                table[name] = {
                    **{r: float(seconds) for r, seconds in measure().items()},
                    **({"busy": True} if competing else {}),  # marked: report() says so
                }
            # debug, not info: a command's stderr carries its own output and errors only
            log.debug(
                "kernels: timed %d %s in %.2f s, once per processor (%s)",
                len(runs), what, time.perf_counter() - start, self.path() or "kept in memory",
            )  # fmt: skip
            if competing:
                log.debug(
                    "kernels: timed while other work holds the CPUs (%s); these timings are kept "
                    "(delete %s at a quiet moment to time them again)",
                    competing,
                    self.path(),
                )
            self.save(table)
            return table[wanted]

    def identity(self) -> str:
        return f"{self.processor}, torch {torch.__version__}, {torch.get_num_threads()} threads"

    def path(self) -> Path | None:
        """The file this CPU's timings are kept in (None: in memory only)."""
        if self.folder is None:
            return None
        name = re.sub(r"[^A-Za-z0-9.]+", "-", self.identity()).strip("-")
        # one model name can stand for CPUs with and without AVX-512 (an "AMD EPYC" under KVM is a
        # Zen 3 or a Zen 4), whose routes differ: their instruction sets tell their files apart
        flags = hashlib.sha256(cpu_flags().encode()).hexdigest()[:8]
        return self.folder / f"{name}-{flags}.json"

    def table(self) -> dict[str, dict[str, float]]:
        """The timings for this processor, torch and thread count: read from the file once."""
        identity = self.identity()
        table = self.tables.get(identity)
        if table is None:
            table = self.tables[identity] = self.read()
        return table

    def read(self) -> dict[str, dict[str, float]]:
        path = self.path()
        if path is None:
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except OSError as e:
            self.unreadable.add(path)
            self.warn(f"kernels: {path}: cannot read it ({e.strerror or e}); timings kept in memory")
            return {}
        except ValueError as e:
            self.warn(f"kernels: {path}: not JSON ({e}); timing again, and replacing it")
            return {}
        timings = data.get("timings") if isinstance(data, dict) else None
        attention = data.get("attention", {}) if isinstance(data, dict) else None  # (a file before it: none)
        if (
            not isinstance(timings, dict)
            or not isinstance(attention, dict)
            or data.get("identity") != self.identity()
            or not all(valid(figures, ROUTES) for figures in timings.values())
            or not all(k.startswith("attention ") and valid(f, ATTENTION) for k, f in attention.items())
        ):
            self.warn(f"kernels: {path}: not timings of {self.identity()}; timing again, and replacing it")
            return {}
        # kept as they are, busy or not: every process of this machine takes the same routes, so a
        # resumed run computes exactly what the run it continues did
        return {**timings, **attention}

    def save(self, table: dict[str, dict[str, float]]) -> None:
        """Write the timings (with any that another process wrote meanwhile), atomically."""
        path = self.path()
        if path is None or path in self.unreadable:
            return
        table.update({k: v for k, v in self.read().items() if k not in table})
        attention = {k: v for k, v in sorted(table.items()) if k.startswith("attention ")}
        linear = {k: v for k, v in sorted(table.items()) if k not in attention}
        try:
            write_json(path, {"identity": self.identity(), "timings": linear, "attention": attention})
        except (OSError, GraftError) as e:
            self.warn(
                f"kernels: cannot write {path} ({getattr(e, 'strerror', None) or e}); timings kept in memory"
            )

    def warn(self, message: str) -> None:
        if message not in self.warned:  # one line, not one per call
            self.warned.add(message)
            log.warning(message)


def key(dtype: torch.dtype, rows: str, out: int, inp: int, activation: str) -> str:
    """'float32 576x1536 none one': the JSON key of a shape's timings."""
    return f"{str(dtype).removeprefix('torch.')} {out}x{inp} {activation} {rows}"


def attention_class(
    batch: int, heads: int, queries: int, keys: int, head_dim: int, masking: str
) -> tuple[int, int, int, int, int, str]:
    """The shape an attention call is timed at: batch and lengths rounded up to BATCHES and LENGTHS."""
    rounded = lambda n, classes: next((c for c in classes if c >= n), classes[-1])  # noqa: E731
    return (
        rounded(batch, BATCHES),
        heads,
        rounded(queries, LENGTHS),
        rounded(keys, LENGTHS),
        head_dim,
        masking,
    )


def attention_key(
    dtype: torch.dtype, batch: int, heads: int, queries: int, keys: int, head_dim: int, masking: str
) -> str:
    """'attention float32 b32 h12 q24 k24 d32 bool': the JSON key of an attention class's timings."""
    name = str(dtype).removeprefix("torch.")
    return f"attention {name} b{batch} h{heads} q{queries} k{keys} d{head_dim} {masking}"


def valid(figures: object, routes: tuple[str, ...]) -> bool:
    return isinstance(figures, dict) and all(
        isinstance(figures.get(r), int | float) and figures[r] > 0 for r in routes
    )


def fastest(figures: dict[str, float], candidates: tuple[str, ...], plain: str = "torch") -> str:
    """The fastest of ``candidates``; the plain path (F.linear; SDPA for attention) unless another
    beats it by MARGIN."""
    best = min(candidates, key=figures.__getitem__)
    if plain in candidates and figures[best] > (1 - MARGIN) * figures[plain]:
        return plain
    return best


def microseconds(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} µs" if seconds >= 1e-5 else f"{seconds * 1e6:.1f} µs"
