"""Where each head looks when the answer to a hidden fact is due: the teacher's attention against the student's memory.

On needle probes (``xlstm_distill.evaluation.heads.needle_probes``: two facts ``The <key> code is <6 digits>.``
hidden in a held-out document more than the window's reach before a question about one), at the position that
predicts the answer's first token, for every layer and head:

* the teacher's attention weights over the prefix, and the share of them on the asked fact's value (the tokens where
  the probe and its counterfactual differ): ``needle mass``;
* the student's memory read as weights over the prefix (``xlstm_distill.modeling.attention_weights``: the mLSTM's
  output at position p is sum_j a_pj v_j), and its needle mass, the sum of a_pj over the value's tokens;
* ``lift``: needle mass over the value's share of the prefix (1 = no preference, what an average over every stored
  token gives); ``tokens read``: the weights' effective number of tokens, (sum a)^2 / sum a^2;
* the student's output gate at p (the memory's share of the head's output beyond the window).

Heads where the teacher puts at least ``--retrieval-mass`` of its attention on the value are its retrieval heads;
the table reports each model there and over all heads. Besides the memory as trained, the script reads it with
the feature maps sharpened (phi(x) = softmax(c (x W + b)), ``--sharpness``) and applied to q and k before RoPE
(``--pre-rope``): conversion-time alternatives, computed from the same activations without training. Every student
also gets its held-out KL to the teacher (the recipe's held-out sequences, all tokens and beyond the window) and, on
the same probes, the share of needles answered and the needle information (nats per answer token the fact adds).

``--variant "NAME: KEY=VALUE ..."`` trains a Stage I with those recipe overrides first (from the recipe's converted
student, under DIR/runs/NAME; made once), so that Stage I objectives can be compared on these measures:

    python benchmarks/memory_selectivity.py --recipe recipes/demo-cpu.yaml --out DIR --probes 16 \\
        --probe-length 1024 --model converted=runs/a/student-init --model "Stage I=runs/a/stage1/model" \\
        --variant "transfer: align.steps=200 align.attention_transfer=0.05"

DIR gets memory_selectivity.json, .md and .png.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from xlstm_distill.benchmarks.report import student_folders, write_results
from xlstm_distill.data.documents import long_documents
from xlstm_distill.evaluation.heads import needle_probes, needle_scores
from xlstm_distill.metrics import paired_kl_difference
from xlstm_distill.modeling import attention_weights
from xlstm_distill.stages import Recipe, RunContext, align, convert
from xlstm_distill.stages.common import autocast, compare_to_teacher


def layer_inputs(model: torch.nn.Module, ids: torch.Tensor) -> list[tuple[torch.Tensor, tuple]]:
    """Every attention layer's input on ``ids`` (T,): (hidden states (1, T, HIDDEN), (cos, sin))."""
    caught: list = [None] * len(model.model.layers)

    def hook(idx: int):
        def grab(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            caught[idx] = (hidden.detach().float(), kwargs["position_embeddings"])
        return grab

    handles = [layer.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(model.model.layers)]
    try:
        model(input_ids=ids[None])
    finally:
        for handle in handles:
            handle.remove()
    return caught


def heads_qk(attn: torch.nn.Module, hidden: torch.Tensor, pos_emb: tuple):
    """q (1, NH, T, DH) and k (1, NH, T, DH) (GQA repeated), after RoPE, of a Llama-style teacher attention module."""
    B, T, _ = hidden.shape
    H, D = attn.config.num_attention_heads, attn.head_dim
    q = attn.q_proj(hidden).view(B, T, H, D).transpose(1, 2)
    k = attn.k_proj(hidden).view(B, T, -1, D).transpose(1, 2)
    q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb(q, k, *pos_emb)
    return q, k.repeat_interleave(H // k.shape[1], dim=1)


def teacher_weights(attn: torch.nn.Module, hidden: torch.Tensor, pos_emb: tuple, p: int) -> torch.Tensor:
    """Softmax attention weights of the query at p over positions 0..p, (NH, p + 1)."""
    q, k = heads_qk(attn, hidden, pos_emb)
    return torch.softmax(torch.einsum("hd,hjd->hj", q[0, :, p], k[0, :, :p + 1]) * attn.scaling, dim=-1)


def memory_weights(attn: torch.nn.Module, hidden: torch.Tensor, pos_emb: tuple, p: int, sharpness: float = 1.0,
                   rope: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The memory's weights a_pj over positions 0..p, (NH, p + 1), and the output gate at p, (NH,), of a student's
    HybridAttention (one document), read with feature maps sharpened by ``sharpness`` and from q, k before RoPE
    if not ``rope``."""
    inputs = attention_weights.head_inputs(attn, hidden, pos_emb, apply_rope=rope)
    queries = torch.tensor([[p]])
    visible = torch.arange(hidden.shape[1])[None, None] <= p  # (1, 1, T)
    with sharpened(attn, sharpness):
        weights = attention_weights.memory_weights(attn, inputs, queries, visible)
    return weights[0, :, 0, :p + 1], inputs.output_gate[0, :, p]


@contextmanager
def sharpened(attn: torch.nn.Module, factor: float):
    """The feature maps' weights and biases scaled by ``factor`` for the duration: softmax(c (x W + b))."""
    maps = [attn.q_feature_map, attn.k_feature_map]
    saved = [(m.weight.data, m.bias.data) for m in maps]
    for m in maps:
        m.weight.data, m.bias.data = m.weight.data * factor, m.bias.data * factor
    try:
        yield
    finally:
        for m, (w, b) in zip(maps, saved):
            m.weight.data, m.bias.data = w, b


def summarize(weights: torch.Tensor, span: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per head: needle mass, lift over an even spread, effective tokens read. ``weights`` (NH, p + 1)."""
    mass = weights[:, span].sum(-1)
    share = len(span) / weights.shape[-1]
    total = weights.sum(-1)
    return {"mass": mass, "lift": mass / total.clamp_min(1e-12) / share,
            "tokens": total ** 2 / (weights ** 2).sum(-1).clamp_min(1e-30)}


def train_variants(recipe_path: Path, out: Path, variants: dict[str, str], overrides: list[str]) -> dict[str, Path]:
    """Stage I of each variant (recipe overrides) from the recipe's converted student (a variant that changes the
    student is converted anew), under out/runs/NAME (made once; resumes). Returns NAME -> the Stage I model."""
    base = RunContext(Recipe.load(recipe_path, overrides + [f"out_dir={out / 'runs' / 'converted'}"]))
    converted = convert.run(base)
    models = {}
    for name, extra in variants.items():
        ctx = RunContext(Recipe.load(recipe_path, overrides + [f"out_dir={out / 'runs' / _slug(name)}", *extra.split()]))
        if ctx.recipe.student != base.recipe.student:  # its own student (e.g. student.feature_dim=256)
            convert.run(ctx)
        elif not ctx.converted_dir.exists():  # every other variant starts from the one converted student
            shutil.copytree(converted, ctx.converted_dir)
        models[name] = align.run(ctx)
    return models


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


@torch.no_grad()
def run(recipe_path: Path, models: dict[str, Path], probes: int, probe_length: int | None, overrides: list[str],
        sharpness: list[float], pre_rope: bool, retrieval_mass: float) -> tuple[list[dict], dict]:
    ctx = RunContext(Recipe.load(recipe_path, overrides))
    students = {name: ctx.load_student(path).eval() for name, path in models.items()}
    for name, student in students.items():
        if not student.config.gated_memory or not student.config.uses_swa:
            raise ValueError(f"--model {name}: memory_selectivity reads the gated memory of an mlstm_swa student.")
    reach = max(s.config.window_reach for s in students.values())
    length = probe_length or ctx.recipe.data.seq_len
    tokenizer, teacher = ctx.tokenizer, ctx.teacher.eval()
    held_out = needle_probes(long_documents(ctx.sources("held_out"), tokenizer, length, probes), tokenizer, probes,
                             length, reach, seed=ctx.recipe.seed + 1000)
    batches = ctx.held_out_batches()
    measured = {"teacher": dict(zip(("needles", "needle_information"), needle_scores(teacher, held_out)))}
    first = None  # the first student's per-sequence KLs: every other student's paired difference to it
    for name, student in students.items():
        with autocast(ctx.device, ctx.autocast):
            held = compare_to_teacher(student, teacher, batches)
        row = {"kl": held["kl"], "kl_beyond_window": held.get("kl_beyond_window"),
               **dict(zip(("needles", "needle_information"), needle_scores(student, held_out)))}
        if first is None:
            first = (name, held["per_sequence"])
        else:
            for part in ("kl", "kl_beyond_window"):
                diff = paired_kl_difference(held["per_sequence"][part], first[1][part])
                row[f"{part} - {first[0]}"] = f"{diff['difference']:+.4f} ± {diff['stderr']:.4f}" if diff else None
        measured[name] = row
        print(name, row, flush=True)
    variants = [(c, True) for c in sharpness] + ([(1.0, False)] if pre_rope else [])
    per_head: dict[str, list[dict[str, torch.Tensor]]] = {}  # model/variant -> per probe {stat: (L, NH)}
    for probe in held_out:
        p = int(probe.scored.nonzero()[0])
        span = (probe.input_ids != probe.counterfactual).nonzero().flatten()
        inputs = layer_inputs(teacher, probe.input_ids)
        stats = [summarize(teacher_weights(layer.self_attn, h, pe, p), span)
                 for layer, (h, pe) in zip(teacher.model.layers, inputs)]
        per_head.setdefault("teacher", []).append({s: torch.stack([x[s] for x in stats]) for s in stats[0]})
        for name, student in students.items():
            inputs = layer_inputs(student, probe.input_ids)
            for c, rope in variants:
                key = name if (c, rope) == (1.0, True) else f"{name}, {_variant(c, rope)}"
                rows, gates = [], []
                for layer, (h, pe) in zip(student.model.layers, inputs):
                    weights, o = memory_weights(layer.self_attn, h, pe, p, c, rope)
                    rows.append(summarize(weights, span))
                    gates.append(o)
                entry = {s: torch.stack([x[s] for x in rows]) for s in rows[0]}
                entry["gate"] = torch.stack(gates)
                per_head.setdefault(key, []).append(entry)
    means = {key: {s: torch.stack([e[s] for e in entries]).mean(0) for s in entries[0]}
             for key, entries in per_head.items()}
    retrieval = means["teacher"]["mass"] >= retrieval_mass  # (L, NH)
    rows = []
    for key, m in means.items():
        row = {"model": key, **measured.get(key, {}), "retrieval_heads": int(retrieval.sum()),
               "needle_mass_retrieval": m["mass"][retrieval].mean().item(),
               "lift_retrieval": m["lift"][retrieval].mean().item(),
               "needle_mass_all": m["mass"].mean().item(), "lift_all": m["lift"].mean().item(),
               "tokens_read_median": m["tokens"].median().item()}
        if "gate" in m:
            row["gate_retrieval"] = m["gate"][retrieval].mean().item()
            row["gated_needle_retrieval"] = (m["gate"] * m["mass"])[retrieval].mean().item()
        rows.append(row)
        print(row, flush=True)
    maps = {key: {s: v.tolist() for s, v in m.items()} for key, m in means.items()}
    return rows, {"per_head": maps, "retrieval_heads": retrieval.nonzero().tolist(), "probes": probes,
                  "length": length, "window_reach": reach}


def _variant(c: float, rope: bool) -> str:
    return ", ".join(([f"sharpness {c:g}"] if c != 1.0 else []) + ([] if rope else ["before RoPE"]))


def plot(rows: list[dict], maps: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["model"] for r in rows]
    trained = [n for n in names if n != "teacher" and "," not in n]
    fig, axes = plt.subplots(1, 2 + len(trained), figsize=(4.2 * (2 + len(trained)), 4.2))
    axes[0].barh(names, [r["needle_mass_retrieval"] for r in rows], color=["k"] + ["C0"] * (len(rows) - 1))
    axes[0].set_xscale("log")
    axes[0].set_title("needle mass, teacher's retrieval heads")
    axes[0].invert_yaxis()
    axes[0].tick_params(axis="y", labelsize=7)
    for ax, key, title in [(axes[1], "teacher", "teacher attention: needle mass")] + [
            (ax, n, f"{n} memory: lift") for ax, n in zip(axes[2:], trained)]:
        stat = "mass" if key == "teacher" else "lift"
        image = ax.imshow(torch.tensor(maps["per_head"][key][stat]).T.numpy(), aspect="auto", cmap="viridis")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylabel("head")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", action="append", default=[], help="NAME=PATH of an mlstm_swa student folder.")
    parser.add_argument("--variant", action="append", default=[],
                        help="'NAME: KEY=VALUE ...': a Stage I trained with these recipe overrides from the recipe's "
                             "converted student (under OUT/runs/NAME), measured beside the --model students.")
    parser.add_argument("--probes", type=int, default=16, help="Held-out needle probes.")
    parser.add_argument("--probe-length", type=int, help="Tokens per needle probe (default: the recipe's seq_len).")
    parser.add_argument("--sharpness", type=float, nargs="+", default=[1.0],
                        help="Feature-map sharpness factors to read the memory with (1 = as trained).")
    parser.add_argument("--pre-rope", action="store_true", help="Also read the memory with features before RoPE.")
    parser.add_argument("--retrieval-mass", type=float, default=0.1,
                        help="Teacher heads with at least this attention on the value count as retrieval heads.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="Recipe override (repeatable).")
    args = parser.parse_args(argv)
    models = student_folders(parser, args.model)
    variants = {}
    for item in args.variant:
        name, sep, extra = item.partition(":")
        if not sep or not name.strip():
            parser.error(f"--variant {item!r}: give 'NAME: KEY=VALUE ...'.")
        variants[name.strip()] = extra
    if not models and not variants:
        parser.error("give at least one --model or --variant.")
    models |= train_variants(args.recipe, args.out, variants, args.overrides)
    rows, maps = run(args.recipe, models, args.probes, args.probe_length, args.overrides, args.sharpness,
                     args.pre_rope, args.retrieval_mass)
    command = "python benchmarks/memory_selectivity.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory_selectivity_heads.json").write_text(__import__("json").dumps(maps))
    paired = list(dict.fromkeys(key for row in rows for key in row if " - " in key))  # vs the first student, ± 1 SE
    write_results(args.out, "memory_selectivity", rows, command,
                  ["model", "kl", "kl_beyond_window", *paired, "needles", "needle_information", "retrieval_heads",
                   "needle_mass_retrieval", "lift_retrieval", "gate_retrieval",
                   "gated_needle_retrieval", "needle_mass_all", "lift_all", "tokens_read_median"],
                  lambda r, path: plot(r, maps, path))


if __name__ == "__main__":
    main()
