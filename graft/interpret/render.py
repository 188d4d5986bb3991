"""Showing an explanation: in the terminal (rich), as a PNG (matplotlib) and as one HTML page.

The page is self-contained (no CDN, no network): the tokens coloured by each method's
attribution, and a layer x head grid of attention maps; hovering a token shows where it
attends (in every map, and as colours on the tokens, for the map clicked or the average of
all), as BertViz's head view does, in one file.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import torch

from graft.interpret.attributions import Attribution
from graft.interpret.subject import Subject

# attention values a page carries at most (L x nh x T x T, one byte each): BERT-base at 512 tokens
# is 38 M; beyond, the page shows the attributions without the maps
PAGE_MAPS_LIMIT = 64_000_000


def explanation(subject: Subject, attributions: list[Attribution]) -> dict[str, Any]:
    """A JSON-ready explanation: task, target, tokens and each method's scores."""
    return {
        "task": subject.model.task,
        "target": subject.label,
        "position": subject.position,
        "score": subject.score(),
        "tokens": subject.tokens,
        "special": subject.fixed,
        "methods": {
            a.method: {
                "scores": [round(s, 6) for s in a.scores],
                **({"delta": a.delta} if a.delta is not None else {}),
            }
            for a in attributions
        },
    }


def shade(value: float, scale: float) -> tuple[int, int, int]:
    """Green for a positive attribution, red for a negative one, white for none."""
    t = 0.0 if scale == 0 else max(-1.0, min(1.0, value / scale))
    fade = int(255 * (1 - abs(t)))
    return (fade, 255, fade) if t >= 0 else (255, fade, fade)


def readable(token: str) -> str:
    """A piece as a reader sees it: byte-level BPE's space (Ġ) and SentencePiece's (▁) shown as a space."""
    return token.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\\n")


def target_line(expl: dict[str, Any]) -> str:
    """ "target 'I-PER' at token 3 (##lace)": what was explained, and where when it is read at a token."""
    at = expl["position"]
    where = (
        ""
        if at is None or expl["task"] == "causal-lm"
        else f" at token {at} ({readable(expl['tokens'][at])})"
    )
    return f"target {expl['target']!r}{where}"


def terminal(expl: dict[str, Any], method: str) -> Any:
    """A rich Text: the tokens on coloured backgrounds, then the target and the method's numbers."""
    from rich.text import Text

    scores = expl["methods"][method]["scores"]
    scale = max((abs(s) for s in scores), default=0.0)
    text = Text()
    for token, s in zip(expl["tokens"], scores, strict=True):
        r, g, b = shade(s, scale)
        text.append(readable(token), style=f"black on rgb({r},{g},{b})")
        text.append(" ")
    delta = expl["methods"][method].get("delta")
    text.append(f"\n{method}: {target_line(expl)} (score {expl['score']:.4f})")
    if delta is not None:
        text.append(f", convergence delta {delta:.2e}")
    return text


def png(expl: dict[str, Any], path: Path) -> None:
    """One row per method: the tokens on coloured boxes (and the last layer's mean attention, if any)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from graft.io.atomic import atomic_path

    methods = list(expl["methods"])
    tokens = [readable(t) for t in expl["tokens"]]
    width = max(6.0, 0.6 * len(tokens))
    fig, axes = plt.subplots(
        len(methods), 1, figsize=(min(width, 40), 1.1 * len(methods) + 0.6), squeeze=False
    )
    for ax, method in zip(axes[:, 0], methods, strict=True):
        scores = expl["methods"][method]["scores"]
        scale = max((abs(s) for s in scores), default=0.0)
        for i, (token, s) in enumerate(zip(tokens, scores, strict=True)):
            color = tuple(c / 255 for c in shade(s, scale))
            ax.text(
                i + 0.5,
                0.5,
                token,
                ha="center",
                va="center",
                fontsize=9,
                bbox={"facecolor": color, "edgecolor": "none"},
            )
        ax.set_xlim(0, len(tokens))
        ax.set_ylim(0, 1)
        ax.set_axis_off()
        ax.set_title(f"{method}: {target_line(expl)}", fontsize=10, loc="left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def packed_maps(maps: torch.Tensor | None) -> dict[str, Any] | None:
    """(L, nh, T, T) probabilities as the page carries them: one byte each (1/255 steps), base64."""
    if maps is None or maps.numel() > PAGE_MAPS_LIMIT:
        return None
    data = maps.float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu().contiguous().numpy().tobytes()
    return {"shape": list(maps.shape), "data": base64.b64encode(data).decode("ascii")}


def page(expl: dict[str, Any], maps: torch.Tensor | None = None, title: str = "graft explain") -> str:
    """The self-contained HTML page (every byte of it: styles, script and data inline)."""
    data = {**expl, "attentions": packed_maps(maps)}
    if maps is not None and data["attentions"] is None:
        data["note"] = (
            f"attention maps left out: {maps.numel():,} values (the page carries {PAGE_MAPS_LIMIT:,})"
        )
    data = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")  # no early </script>
    return PAGE.replace("{{title}}", html.escape(title)).replace("{{data}}", data)


def write_page(
    expl: dict[str, Any], path: Path, maps: torch.Tensor | None = None, title: str = "graft explain"
) -> None:
    from graft.io.atomic import write_text

    write_text(path, page(expl, maps, title))


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{title}}</title>
<style>
body { font: 14px/1.5 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.2em; margin: 0 0 .3em; }
.meta { color: #555; margin-bottom: .8em; }
.tokens { margin: .4em 0 1em; line-height: 2.1; }
.tok { padding: 2px 4px; margin: 1px; border-radius: 3px; cursor: default; border: 1px solid #ddd; white-space: pre; }
.tok.special { color: #888; }
.tok.hover { outline: 2px solid #333; }
button { margin-right: .3em; }
button.on { font-weight: bold; }
#grid { display: grid; gap: 6px; margin-top: .5em; justify-content: start; }
.cell { text-align: center; font-size: 11px; color: #555; }
canvas { border: 1px solid #ccc; cursor: pointer; image-rendering: pixelated; }
canvas.sel { border-color: #d33; }
</style></head><body>
<h1>{{title}}</h1>
<div class="meta" id="meta"></div>
<div id="methods"></div>
<div class="tokens" id="attributed"></div>
<div id="attention-part">
<h1>Attention</h1>
<div class="meta">Hover a token: where it attends, in every head (rows of the maps) and on the tokens below
(for the head clicked, or the mean of all). Click a map to choose it, again to go back to the mean.</div>
<div class="tokens" id="attends"></div>
<div id="grid"></div>
</div>
<script type="application/json" id="data">{{data}}</script>
<script>
"use strict";
const E = JSON.parse(document.getElementById("data").textContent);
const T = E.tokens.length;
const show = t => t.replace(/\\u0120/g, " ").replace(/\\u2581/g, " ");
const methods = Object.keys(E.methods);
let method = methods[0], chosen = null;
const at = E.position === null || E.task === "causal-lm" ? "" : " at token " + E.position + " (" + show(E.tokens[E.position]) + ")";
document.getElementById("meta").textContent =
  E.task + " | target: " + E.target + at + " | score: " + E.score.toFixed(4);

function colour(v, scale) {
  const t = scale === 0 ? 0 : Math.max(-1, Math.min(1, v / scale));
  const f = Math.round(255 * (1 - Math.abs(t)));
  return t >= 0 ? `rgb(${f},255,${f})` : `rgb(255,${f},${f})`;
}
function strip(id, values, label) {
  const box = document.getElementById(id);
  box.textContent = "";
  const scale = Math.max(0, ...values.map(Math.abs));
  E.tokens.forEach((tok, i) => {
    const s = document.createElement("span");
    s.className = "tok" + (E.special[i] ? " special" : "");
    s.textContent = show(tok);
    s.dataset.i = i;
    s.title = label + ": " + values[i].toFixed(4);
    s.style.background = colour(values[i], scale);
    s.addEventListener("mouseenter", () => hover(i));
    s.addEventListener("mouseleave", () => hover(null));
    box.appendChild(s);
  });
}
function drawMethods() {
  const box = document.getElementById("methods");
  box.textContent = "";
  methods.forEach(m => {
    const b = document.createElement("button");
    b.textContent = m + ("delta" in E.methods[m] ? " (delta " + E.methods[m].delta.toExponential(1) + ")" : "");
    b.className = m === method ? "on" : "";
    b.onclick = () => { method = m; drawMethods(); };
    box.appendChild(b);
  });
  strip("attributed", E.methods[method].scores, method);
}
// the maps: [L][nh][T][T] probabilities, sent as bytes (value * 255)
const A = (() => {
  if (!E.attentions) return null;
  const [L, H] = E.attentions.shape, raw = atob(E.attentions.data), out = [];
  let o = 0;
  for (let l = 0; l < L; l++) { const layer = []; for (let h = 0; h < H; h++) { const head = [];
    for (let q = 0; q < T; q++) { const r = new Array(T); for (let k = 0; k < T; k++) r[k] = raw.charCodeAt(o++) / 255; head.push(r); }
    layer.push(head); } out.push(layer); }
  return out;
})();
const maps = [];
function row(i) {  // where token i attends: the chosen head's row, or the mean of all heads' rows
  if (chosen) return A[chosen[0]][chosen[1]][i];
  const out = new Array(T).fill(0);
  let n = 0;
  A.forEach(layer => layer.forEach(head => { head[i].forEach((v, j) => out[j] += v); n++; }));
  return out.map(v => v / n);
}
function paint(c, l, h, focus) {
  const g = c.getContext("2d"), m = A[l][h];
  const img = g.createImageData(T, T);
  for (let q = 0; q < T; q++) for (let k = 0; k < T; k++) {
    const v = m[q][k], o = 4 * (q * T + k), dim = focus !== null && q !== focus;
    const f = Math.round(255 * (1 - v));
    img.data[o] = dim ? 235 : f; img.data[o + 1] = dim ? 235 : f; img.data[o + 2] = dim ? 240 : 255;
    img.data[o + 3] = dim ? 255 * 0.35 + v * 120 : 255;
  }
  g.putImageData(img, 0, 0);
}
function hover(i) {
  document.querySelectorAll(".tok").forEach(s => s.classList.toggle("hover", i !== null && +s.dataset.i === i));
  maps.forEach(([c, l, h]) => paint(c, l, h, i));
  if (i === null) strip("attends", new Array(T).fill(0), "attention");
  else { const r = row(i); strip("attends", r, "attention from " + show(E.tokens[i])); document.querySelectorAll("#attends .tok")[i].classList.add("hover"); }
}
function drawGrid() {
  const grid = document.getElementById("grid");
  if (!A) {
    document.getElementById("attention-part").textContent = E.note || "";
    return;
  }
  const L = A.length, H = A[0].length, size = Math.max(48, Math.min(160, 640 / H));
  grid.style.gridTemplateColumns = `auto repeat(${H}, ${size + 4}px)`;
  grid.appendChild(document.createElement("div"));
  for (let h = 0; h < H; h++) { const d = document.createElement("div"); d.className = "cell"; d.textContent = "head " + h; grid.appendChild(d); }
  for (let l = 0; l < L; l++) {
    const d = document.createElement("div"); d.className = "cell"; d.textContent = "layer " + l; grid.appendChild(d);
    for (let h = 0; h < H; h++) {
      const c = document.createElement("canvas");
      c.width = T; c.height = T; c.style.width = c.style.height = size + "px";
      c.title = `layer ${l}, head ${h}`;
      c.onclick = () => {
        chosen = chosen && chosen[0] === l && chosen[1] === h ? null : [l, h];
        maps.forEach(([m, a, b]) => m.classList.toggle("sel", chosen !== null && a === chosen[0] && b === chosen[1]));
      };
      grid.appendChild(c);
      maps.push([c, l, h]);
      paint(c, l, h, null);
    }
  }
}
drawMethods();
drawGrid();
strip("attends", new Array(T).fill(0), "attention");
</script></body></html>
"""
