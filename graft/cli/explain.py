"""``graft explain``, ``graft probe`` and ``graft fairness``: looking inside a model (chapters 6 and 9).

graft explain MODEL --text "A fine film." [--target LABEL] [--method ig,occlusion] [--out DIR]
graft probe MODEL --data FILE --property COLUMN [--per-token] [--out DIR]
graft fairness MODEL --template "The {} worked as a nurse." --groups he,she
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from graft.cli.app import ModelArg, ReferenceOpt, app
from graft.cli.tasks import DeviceOpt, load_task_model
from graft.errors import GraftError, did_you_mean

MethodOpt = Annotated[
    str,
    typer.Option(
        "--method",
        "-m",
        help="ig, grad-x-input, attention, rollout, occlusion (or several, comma-separated, or all).",
    ),
]


def methods_of(value: str) -> list[str]:
    from graft.interpret import METHODS

    shown = [m for m in METHODS if m != "random"]
    names = shown if value == "all" else [m.strip() for m in value.split(",") if m.strip()]
    if not names:
        raise GraftError(f"--method: empty (one or more of {', '.join(shown)}, or all)")
    for name in names:
        if name not in METHODS:
            raise GraftError(
                f"explain: --method {name!r} is not one of {', '.join(shown)}, or all{did_you_mean(name, METHODS)}"
            )
    return list(dict.fromkeys(names))


@app.command()
def explain(
    model: ModelArg,
    text: Annotated[str, typer.Option("--text", "-t", help="The text to explain (for QA: the question).")],
    context: Annotated[str | None, typer.Option(help="Question answering: the passage.")] = None,
    target: Annotated[
        str | None,
        typer.Option(
            help="Label, tag, start|end (QA) or next token (LM) to explain (default: the prediction)."
        ),
    ] = None,
    position: Annotated[
        int | None, typer.Option(min=0, help="Token classification: the token whose tag is explained.")
    ] = None,
    method: MethodOpt = "ig",
    steps: Annotated[int, typer.Option(min=2, help="Integrated gradients: quadrature points.")] = 50,
    batch_size: Annotated[
        int | None, typer.Option(min=1, help="Integrated gradients: points per forward (default: all).")
    ] = None,
    faithfulness: Annotated[
        bool,
        typer.Option(
            "--faithfulness", help="Also: deletion/insertion areas, comprehensiveness, sufficiency."
        ),
    ] = False,
    out: Annotated[
        Path | None, typer.Option(help="Folder for explanation.json, explanation.png and explanation.html.")
    ] = None,
    max_length: Annotated[
        int | None, typer.Option(min=8, help="Tokens kept (default: the model's window).")
    ] = None,
    device: DeviceOpt = None,
    reference: ReferenceOpt = False,
) -> None:
    """Token attributions for one input: coloured in the terminal, as a PNG and an interactive page."""
    from rich.console import Console

    from graft.interpret import attention_maps, attribute, subject
    from graft.interpret.faithfulness import faithfulness as measure
    from graft.interpret.render import explanation, png, terminal, write_page
    from graft.io.atomic import check_output, write_json

    names = methods_of(method)
    if out is not None:
        check_output(out, "--out", folder=True)
    m, tokenizer = load_task_model(model, device, reference)
    s = subject(m, tokenizer, text, context, target, position, max_length)
    attributions = [attribute(s, name, steps, batch_size) for name in names]
    maps = next((a.maps for a in attributions if a.maps is not None), None)
    if maps is None and out is not None:  # the page shows the attention maps whatever the method
        maps = attention_maps(m, s.batch)[:, 0].float()
    expl = explanation(s, attributions)
    console = Console(highlight=False)
    for a in attributions:
        console.print(terminal(expl, a.method))
    if faithfulness:
        from graft.interpret.attributions import attribute as attribute_one

        table = {
            a.method: measure(s, a.scores).summary() for a in [*attributions, attribute_one(s, "random")]
        }
        expl["faithfulness"] = table
        typer.echo(json.dumps({"faithfulness": table}))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "explanation.json", expl)
        png(expl, out / "explanation.png")
        write_page(expl, out / "explanation.html", maps, title=f"graft explain {Path(model).name}")
        typer.echo(f"wrote {out / 'explanation.html'}", err=True)


@app.command()
def probe(
    model: ModelArg,
    data: Annotated[
        Path, typer.Option("--data", "-d", help="Records with a text (or tokens) and the property.")
    ],
    property: Annotated[str, typer.Option("--property", help="The column to predict from each layer.")],
    per_token: Annotated[
        bool,
        typer.Option("--per-token", help="One label per word (the property is a list per row, as tags are)."),
    ] = False,
    text_column: Annotated[
        str | None, typer.Option(help="The input column (default: text, sentence...).")
    ] = None,
    test_fraction: Annotated[
        float, typer.Option(min=0.05, max=0.9, help="Held out to measure accuracy.")
    ] = 0.25,
    seed: Annotated[int, typer.Option(help="Split, control labels and probe initialization.")] = 0,
    max_length: Annotated[int | None, typer.Option(min=8, help="Tokens per row.")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for probe.json and probe.png.")] = None,
    device: DeviceOpt = None,
) -> None:
    """Linear probes on every layer: accuracy per layer, a control task, and the selectivity."""
    from graft.interpret.probe import plot, probe_layers, read_probe_data
    from graft.io.atomic import check_output, write_json

    if out is not None:
        check_output(out, "--out", folder=True)
    texts, labels = read_probe_data(data, property, text_column, per_token)
    body, tokenizer = load_body(model, device)
    result = probe_layers(body, tokenizer, texts, labels, per_token, test_fraction, seed, max_length)
    typer.echo(json.dumps(result))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "probe.json", result)
        plot(result, out / "probe.png", title=f"{Path(model).name}: {property}")


def load_body(model: str, device: str | None):
    """A model's body (task head or not) without the kernels (hidden states are read), and its tokenizer."""
    from graft.cli.tasks import pick_device
    from graft.io.hf import resolve
    from graft.loading import load_model
    from graft.tasks import TaskModel
    from graft.tokenizer import Tokenizer

    folder = resolve(model)
    m = load_model(folder, device=pick_device(device), kernels=False)
    return (m.body if isinstance(m, TaskModel) else m).eval(), Tokenizer.from_folder(folder)


@app.command()
def fairness(
    model: ModelArg,
    template: Annotated[
        list[str], typer.Option("--template", help="A sentence with {} for the group word (repeatable).")
    ],
    groups: Annotated[str, typer.Option("--groups", help="Group words, comma-separated: he,she.")],
    target: Annotated[
        str | None,
        typer.Option(help="Classification: the label whose probability is compared (default: all)."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="fairness.json here.")] = None,
    device: DeviceOpt = None,
    reference: ReferenceOpt = False,
) -> None:
    """Counterfactual probes: how predictions shift when only the group word changes."""
    from graft.interpret.fairness import counterfactuals, fill, parse_groups
    from graft.io.atomic import check_output, write_json

    if out is not None:
        check_output(out, "--out", example="fairness.json")
    words = parse_groups(groups)
    for t in template:  # every template checked before the model loads
        fill(t, words[0])
    m, tokenizer = load_task_model(model, device, reference)
    result = counterfactuals(m, tokenizer, template, words, target)
    typer.echo(json.dumps(result, ensure_ascii=False))
    if out is not None:
        write_json(out, result)
