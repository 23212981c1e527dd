"""Which heads should keep the teacher's full attention? Every KV head is scored by how much restoring it alone (its
query group attending to the whole prefix, as in the teacher) lowers the student's KL to the teacher on a
calibration set: key-value facts hidden in training text beyond the window (the default; unlike RULER's needle
tasks, which evaluation uses), a synthetic key-value list, or long training text beyond the window. Within a budget,
the best heads alone are kept, or heads are added one at a time, each the best given those before (greedy).

    probes = needle_probes(documents, tokenizer, count=16, length=1024, reach=student.config.window_reach)
    scores = head_scores(student, teacher, probes)        # (layers, kv_heads) KL lowered by restoring each head
    heads = choose_heads(scores.scores, budget=0.05)      # [[layer, kv_head], ...] -> HybridConfig.full_attention_heads
    heads, kl_after = choose_heads_greedy(student, teacher, probes, scores, budget=0.05)
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tqdm.auto import tqdm

PROBES = ("needles", "retrieval", "text")


@dataclass
class Calibration:
    """One calibration sequence and the positions whose next-token prediction is scored."""

    input_ids: torch.Tensor  # (T,) long
    scored: torch.Tensor  # (T,) bool: the prediction made at this position (of token t + 1) counts
    counterfactual: torch.Tensor | None = None  # (T,) long: needle probes, the asked fact's value swapped (same length)


@dataclass
class HeadScores:
    scores: torch.Tensor  # (L, KV) KL(teacher || student) lowered by restoring each head alone
    baseline: float  # the KL with no head restored (beyond those the student already keeps)
    tokens: int  # scored predictions
    teacher_logp: list[torch.Tensor] | None = None  # the teacher's log-probabilities per batch (N, V), for reuse


def retrieval_probes(tokenizer: Any, count: int, length: int, seed: int = 0) -> list[Calibration]:
    """Synthetic key-value retrieval: a list of ``code NNNNN: NNNNNN`` lines filling about ``length`` tokens, then a
    question about one line chosen at random; the answer's tokens are scored."""
    if count < 1 or length < 32:
        raise ValueError(f"retrieval_probes needs count >= 1 and length >= 32 tokens, got {count} and {length}.")
    rng = random.Random(seed)

    def size(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    question = "Question: what is the value of code {key}?\nAnswer: code {key}: "
    tail = size(question.format(key=10_000)) + size("100000\n")
    out = []
    for _ in range(count):
        head = "A register of codes. Each code has one value.\n"
        lines, used = [], size(head)
        while True:
            line = f"code {rng.randrange(10_000, 100_000)}: {rng.randrange(100_000, 1_000_000)}\n"
            cost = size(line)
            if used + cost > length - tail and lines:
                break
            lines.append(line)
            used += cost
        while True:  # (token counts of pieces need not add up exactly: drop lines until it fits)
            line = rng.choice(lines)
            key, value = line[5:].split(": ")
            prompt_ids = tokenizer(head + "".join(lines) + question.format(key=key),
                                   add_special_tokens=False)["input_ids"]
            answer_ids = tokenizer(value, add_special_tokens=False)["input_ids"]
            if len(prompt_ids) + len(answer_ids) <= length or len(lines) == 1:
                break
            lines.pop()
        ids = torch.tensor(prompt_ids + answer_ids, dtype=torch.long)
        scored = torch.zeros(len(ids), dtype=torch.bool)
        scored[len(prompt_ids) - 1:len(ids) - 1] = True  # the predictions of the answer's tokens
        out.append(Calibration(ids, scored))
    return out


NEEDLE_KEYS = ("amber", "cobalt", "violet", "maple", "falcon", "harbor", "silver", "meadow", "copper", "willow",
               "granite", "saffron", "orchid", "lantern", "glacier", "thistle")


def needle_probes(documents: list[torch.Tensor], tokenizer: Any, count: int, length: int, reach: int = 0,
                  needles: int = 2, seed: int = 0) -> list[Calibration]:
    """Key-value facts hidden in real text: ``needles`` sentences ``The <key> code is <6 digits>.`` inserted at
    sentence ends of a training document (1-D token tensors; special tokens dropped), then a question about one of
    them; the answer's digits are scored. Every fact lies more than ``reach`` tokens before the answer, where the
    window alone cannot see it. Unlike RULER's needle tasks (a synthetic haystack and the "special magic number"
    template), which evaluation uses, the haystack is the student's own kind of text."""
    if count < 1 or needles < 1 or not documents:
        raise ValueError("needle_probes needs count >= 1, needles >= 1 and at least one document.")
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    header = ("Some codes are hidden in the following text. Remember them: you will be asked about one of them "
              "afterwards.\n\n")

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    out = []
    for index in range(count):
        keys = rng.sample(NEEDLE_KEYS, needles)
        values = [str(rng.randrange(100_000, 1_000_000)) for _ in keys]
        facts = [ids(f" The {key} code is {value}.") for key, value in zip(keys, values)]
        asked = rng.randrange(needles)
        question = ids(f"\n\nQuestion: What is the {keys[asked]} code?\nAnswer: The {keys[asked]} code is")
        answer = ids(f" {values[asked]}")
        other = _same_length_value(ids, keys[asked], values[asked], random.Random(seed * 1_000_003 + index))
        room = length - len(ids(header)) - len(question) - len(answer) - sum(map(len, facts))  # haystack tokens
        if room - reach < needles:
            raise ValueError(f"needle_probes: {length} tokens leave no room for {needles} facts more than {reach} "
                             "tokens before the answer; use longer probes or fewer needles.")
        haystack = [t for t in documents[index % len(documents)].tolist() if t not in special][:room]
        if len(haystack) < room:
            raise ValueError(f"needle_probes needs documents of at least {room} tokens, got {len(haystack)}.")
        ends = [i for i in range(1, room - reach) if tokenizer.decode(haystack[i - 1:i]).rstrip(" ")[-1:] in ".!?\n"]
        depths = sorted(rng.sample(ends if len(ends) >= needles else range(room - reach), needles))
        swapped = facts[:asked] + [ids(f" The {keys[asked]} code is {other}.")] + facts[asked + 1:]
        prompts = []
        for hidden in (facts, swapped):  # the probe, and the same text with the asked fact's value swapped
            prompt = ids(header)
            for depth, fact, start in zip(depths, hidden, [0] + depths):
                prompt += haystack[start:depth] + fact
            prompts.append(prompt + haystack[depths[-1]:] + question)
        prompt, swapped_prompt = prompts
        while tokenizer.decode(answer[:1]).strip() == "":  # the space before the digits (a token of its own in some
            prompt, answer = prompt + answer[:1], answer[1:]  # vocabularies) is not what retrieval is about
        full = torch.tensor(prompt + answer, dtype=torch.long)
        scored = torch.zeros(len(full), dtype=torch.bool)
        scored[len(prompt) - 1:len(full) - 1] = True  # the predictions of the answer's tokens
        counterfactual = torch.tensor(swapped_prompt + full[len(swapped_prompt):].tolist(), dtype=torch.long)
        out.append(Calibration(full, scored, counterfactual))
    return out


def _same_length_value(ids: Any, key: str, value: str, rng: random.Random) -> str:
    """Another 6-digit value whose fact sentence has as many tokens as the one with ``value``."""
    size = len(ids(f" The {key} code is {value}."))
    for _ in range(1000):
        other = str(rng.randrange(100_000, 1_000_000))
        if other != value and len(ids(f" The {key} code is {other}.")) == size:
            return other
    raise ValueError(f"needle_probes: no other value of the {key} code tokenizes to {size} tokens.")


@torch.no_grad()
def needle_scores(model: torch.nn.Module, probes: list[Calibration]) -> tuple[float, float]:
    """On needle probes (:func:`needle_probes`): the accuracy of :func:`probe_accuracy`, and how much of the hidden
    fact reaches the answer, in nats per answer token: the mean log-probability of the answer's tokens given the probe
    minus given the same probe with the asked fact's value swapped. The second is continuous where accuracy is 0 or 1:
    exactly 0 for a model that sees nothing beyond its window (the two prompts differ only there), a few nats for one
    that retrieves the fact. One forward per probe and one per counterfactual."""
    hits, gains = 0, []
    for probe in probes:
        if probe.counterfactual is None:
            raise ValueError("needle_scores needs needle probes (needle_probes), which carry a counterfactual.")
        logits, target = _answer_logits(model, probe.input_ids, probe)
        hits += bool(torch.equal(logits.argmax(-1), target))
        swapped, _ = _answer_logits(model, probe.counterfactual, probe)
        logps = [torch.log_softmax(x.float(), -1).gather(-1, target[:, None]).mean() for x in (logits, swapped)]
        gains.append((logps[0] - logps[1]).item())
    return hits / len(probes), sum(gains) / len(gains)


@torch.no_grad()
def probe_accuracy(model: torch.nn.Module, probes: list[Calibration]) -> float:
    """Share of probes whose every scored token is the model's argmax (teacher-forced: greedy decoding's answer)."""
    hits = 0
    for probe in probes:
        logits, target = _answer_logits(model, probe.input_ids, probe)
        hits += bool(torch.equal(logits.argmax(-1), target))
    return hits / len(probes)


def _answer_logits(model: torch.nn.Module, ids: torch.Tensor, probe: Calibration) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits at the probe's scored positions on ``ids`` (T,) (the probe or its counterfactual), (N, V),
    and the probe's answer tokens there, (N,)."""
    device = next(model.parameters()).device
    where = probe.scored.nonzero().flatten().to(device)
    return model(input_ids=ids[None].to(device)).logits[0, where], probe.input_ids.to(device)[where + 1]


def text_calibration(sequences: list[torch.Tensor], reach: int, per_sequence: int = 128,
                     seed: int = 0) -> list[Calibration]:
    """Text sequences (1-D token tensors, one document each), scored at up to ``per_sequence`` random positions past
    the window's ``reach`` (what the window alone cannot see)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for ids in sequences:
        beyond = torch.arange(reach, max(reach, len(ids) - 1))
        if len(beyond) == 0:
            raise ValueError(f"Calibration sequences of {len(ids)} tokens have nothing past the window's reach "
                             f"({reach}): use longer sequences.")
        chosen = beyond[torch.randperm(len(beyond), generator=g)[:per_sequence]]
        scored = torch.zeros(len(ids), dtype=torch.bool)
        scored[chosen] = True
        out.append(Calibration(ids, scored))
    return out


@torch.no_grad()
def head_scores(student: torch.nn.Module, teacher: torch.nn.Module, calibration: list[Calibration],
                batch_size: int = 4, candidates: list[list[int]] | None = None,
                teacher_logp: list[torch.Tensor] | None = None) -> HeadScores:
    """KL(teacher || student) at the scored positions with every KV head (or every one of ``candidates``) restored
    alone, against none restored (beyond those the student keeps already); heads not scored get 0. The teacher runs
    once (or not at all: ``teacher_logp`` from an earlier call on the same calibration); a head of layer l reruns the
    student from layer l only (the inputs of every layer are kept from the pass with none restored), about half a
    student forward per head on average."""
    config = student.config
    kept_heads = [list(p) for p in config.full_attention_heads]
    kept_layers = list(config.full_attention_layers)
    device = next(student.parameters()).device
    batches = _batches(calibration, batch_size, device)
    if teacher_logp is None:
        teacher_logp = [_scored_logp(teacher(input_ids=ids).logits, scored) for ids, scored in batches]
    tokens = sum(int(s.sum()) for _, s in batches)
    layer_inputs = []  # per batch, the input of every decoder layer with no head restored
    baseline = 0.0
    for (ids, scored), logp_t in zip(batches, teacher_logp):
        captured: list[torch.Tensor] = []
        hooks = [layer.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
                 for layer in student.model.layers]
        try:
            baseline += _kl(logp_t, _scored_logp(student(input_ids=ids).logits, scored))
        finally:
            for hook in hooks:
                hook.remove()
        layer_inputs.append(captured)
    baseline /= tokens

    L, KV = config.num_hidden_layers, config.num_key_value_heads
    scores = torch.zeros(L, KV)
    todo = [(l, h) for l in range(L) for h in range(KV)] if candidates is None else [tuple(c) for c in candidates]
    try:
        for layer, head in tqdm(todo, desc="scoring heads", unit="head", dynamic_ncols=True):
            if layer in kept_layers or [layer, head] in kept_heads:
                continue  # already kept: nothing to restore
            student.set_full_attention(kept_heads + [[layer, head]], kept_layers)
            total = 0.0
            for (ids, scored), logp_t, inputs in zip(batches, teacher_logp, layer_inputs):
                logits = student(inputs_embeds=inputs[layer], from_layer=layer).logits
                total += _kl(logp_t, _scored_logp(logits, scored))
            scores[layer, head] = baseline - total / tokens
    finally:
        student.set_full_attention(kept_heads, kept_layers)
    return HeadScores(scores, baseline, tokens, teacher_logp)


def choose_heads(scores: torch.Tensor, budget: float) -> list[list[int]]:
    """The ``round(budget x layers x KV heads)`` highest-scoring heads (at least one for a budget > 0), as
    ``[[layer, kv_head], ...]`` sorted by layer."""
    return sorted(_ranked(scores)[:_count(scores, budget)])


@torch.no_grad()
def choose_heads_greedy(student: torch.nn.Module, teacher: torch.nn.Module, calibration: list[Calibration],
                        scores: HeadScores, budget: float, pool: int = 3,
                        batch_size: int = 4) -> tuple[list[list[int]], list[float]]:
    """Heads chosen one at a time, each the one that lowers the KL most given those chosen before it: heads that
    only help together (one finds the fact, another copies it) and heads that do the same work are told apart, which
    scoring each head alone cannot do. Each round rescores the ``pool`` x (heads to choose) best heads of the
    single-head ``scores``. Returns the heads sorted by layer and the KL after each choice."""
    count = _count(scores.scores, budget)
    shortlist = _ranked(scores.scores)[:pool * count]
    kept_heads = [list(p) for p in student.config.full_attention_heads]
    kept_layers = list(student.config.full_attention_layers)
    chosen: list[list[int]] = []
    kl_after: list[float] = []
    try:
        for _ in range(count):
            student.set_full_attention(kept_heads + chosen, kept_layers)
            candidates = [h for h in shortlist if h not in chosen]
            result = head_scores(student, teacher, calibration, batch_size, candidates, scores.teacher_logp)
            best = max(candidates, key=lambda h: float(result.scores[h[0], h[1]]))
            chosen.append(best)
            kl_after.append(result.baseline - float(result.scores[best[0], best[1]]))
    finally:
        student.set_full_attention(kept_heads, kept_layers)
    return sorted(chosen), kl_after


def write_head_scores(result: HeadScores, chosen: list[list[int]], out: Path, meta: dict[str, Any]) -> dict[str, Path]:
    """``heads.json`` (scores by layer and KV head, the baseline KL, the chosen heads, how they were measured) and
    ``heads.png`` (a layers x KV heads heat map with the chosen heads marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "heads.json", "png": out / "heads.png"}
    payload = {**meta, "baseline_kl": result.baseline, "scored_tokens": result.tokens, "chosen": chosen,
               "scores": result.scores.tolist()}
    tmp = files["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    L, KV = result.scores.shape
    fig, ax = plt.subplots(figsize=(max(4.5, 2.5 + 0.5 * KV), 1.5 + 0.22 * L))
    image = ax.imshow(result.scores.numpy(), aspect="auto", cmap="viridis", origin="lower")
    for layer, head in chosen:
        ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(KV))
    ax.set_title(f"KL removed by restoring one head\n({meta.get('probe', '')} probe; kept heads in red)", fontsize=9)
    fig.colorbar(image, ax=ax, label="KL(teacher || student) lowered")
    fig.tight_layout()
    fig.savefig(files["png"], dpi=120)
    plt.close(fig)
    tmp.replace(files["json"])  # written last: its presence means the scoring finished
    return files


def _ranked(scores: torch.Tensor) -> list[list[int]]:
    """Every head of ``scores`` (L, KV) as [layer, kv_head], highest score first (ties in layer order)."""
    KV = scores.shape[1]
    return [[int(i) // KV, int(i) % KV] for i in torch.argsort(scores.flatten(), descending=True, stable=True)]


def _count(scores: torch.Tensor, budget: float) -> int:
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"The budget is a fraction of the KV heads in [0, 1], got {budget!r}.")
    return 0 if budget == 0 else max(1, round(budget * scores.numel()))


def _batches(calibration: list[Calibration], batch_size: int, device: torch.device):
    """Right-padded batches of equal-length groups: (ids (B, T), scored (B, T)); padding is never scored."""
    ordered = sorted(calibration, key=lambda c: len(c.input_ids))
    out = []
    for start in range(0, len(ordered), batch_size):
        group = ordered[start:start + batch_size]
        T = max(len(c.input_ids) for c in group)
        ids = torch.zeros(len(group), T, dtype=torch.long)
        scored = torch.zeros(len(group), T, dtype=torch.bool)
        for row, c in enumerate(group):
            ids[row, :len(c.input_ids)] = c.input_ids
            scored[row, :len(c.scored)] = c.scored
        out.append((ids.to(device), scored.to(device)))
    return out


def _scored_logp(logits: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:  # (B, T, V), (B, T) -> (N, V)
    return F.log_softmax(logits[scored].float(), dim=-1)


def _kl(logp_t: torch.Tensor, logp_s: torch.Tensor) -> float:  # summed over the scored positions
    return float((logp_t.exp() * (logp_t - logp_s)).sum())
