"""The code tasks (xd_humaneval, xd_mbpp): the sandbox that runs model-written programs, the offline task YAMLs, and
the tasks' own scoring path on reference solutions."""

import ast
from pathlib import Path

import lm_eval
import pytest
import yaml

from xlstm_distill.evaluation.code_exec import SandboxLimits, humaneval_programs, pass_at_1, run_program
from xlstm_distill.evaluation.harness import _PreparedTasks, task_manager

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"
FAST = SandboxLimits(timeout_s=2.0, memory_mb=256)


# ---------------------------------------------------------------------------------------------- the sandbox


def test_correct_program_passes_and_wrong_one_fails():
    program = "def add(a, b):\n    return a + b\n"
    assert run_program(program + "assert add(2, 3) == 5\n", FAST).status == "passed"
    wrong = run_program("def add(a, b):\n    return a * b\nassert add(2, 3) == 5\n", FAST)
    assert wrong.status == "failed" and wrong.returncode == 1 and "AssertionError" in wrong.output
    assert run_program("def f(:\n", FAST).status == "failed"  # a syntax error


def test_infinite_loop_is_cut_at_the_time_limit():
    import time

    t0 = time.perf_counter()
    result = run_program("while True:\n    pass\n", SandboxLimits(timeout_s=1.0))
    assert result.status == "timeout" and not result.passed
    assert time.perf_counter() - t0 < 5


def test_memory_bomb_fails_cleanly():
    result = run_program("x = bytearray(4 * 1024 ** 3)\n", FAST)
    assert result.status == "failed" and "MemoryError" in result.output
    grow = run_program("x = []\nwhile True:\n    x.append('a' * 10 ** 6)\n", FAST)
    assert grow.status == "failed"


def test_crashes_and_exits_are_failures():
    assert run_program("import os\nos.abort()\n", FAST).status == "failed"  # killed by a signal
    assert run_program("import sys\nsys.exit(3)\n", FAST).returncode == 3
    assert run_program("import ctypes\nctypes.string_at(0)\n", FAST).status == "failed"  # a segmentation fault
    assert run_program("raise SystemExit(0)\n", FAST).passed  # exit status 0 is a pass, as in HumanEval's checker


def test_program_sees_no_parent_state(tmp_path, monkeypatch):
    monkeypatch.setenv("XD_SECRET", "parent")
    probe = ("import os, sys\n"
             "assert 'XD_SECRET' not in os.environ\n"
             "assert not any(name.startswith(('xlstm_distill', 'torch', 'pytest')) for name in sys.modules)\n"
             f"assert os.getcwd() != {str(Path.cwd())!r} and os.listdir('.') == ['program.py']\n"
             "open('left.txt', 'w').write('x')\n"
             "print(os.getcwd())\n")
    result = run_program(probe, FAST)
    assert result.passed, result.output
    assert not Path(result.output.strip()).exists()  # the working directory is removed afterwards


# ---------------------------------------------------------------------------------------------- the tasks


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def _yaml(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_Loader)


@pytest.fixture(scope="module")
def tasks():
    manager = task_manager(include_defaults=False)
    return {name: manager.load([name])["tasks"][name] for name in ("xd_humaneval", "xd_mbpp")}


def test_code_tasks_load_offline_with_lm_eval_prompts(tasks):
    from xlstm_distill.evaluation.offline import TASKS_DIR

    assert len(tasks["xd_humaneval"].eval_docs) == 164 and len(tasks["xd_mbpp"].eval_docs) == 500
    assert tasks["xd_mbpp"].eval_docs[0]["task_id"] == 11 and tasks["xd_mbpp"].get_config("num_fewshot") == 3
    for ours, theirs in (("xd_humaneval.yaml", "humaneval/humaneval.yaml"), ("xd_mbpp.yaml", "mbpp/mbpp.yaml")):
        a, b = _yaml(TASKS_DIR / ours), _yaml(LM_EVAL_TASKS / theirs)
        for key in ("output_type", "doc_to_text", "doc_to_target", "generation_kwargs", "target_delimiter",
                    "num_fewshot", "test_split", "unsafe_code"):
            assert a.get(key) == b.get(key), (ours, key)
    # MBPP's few-shot examples: lm-eval's list (read from its source: importing it needs the hub)
    tree = ast.parse((LM_EVAL_TASKS / "mbpp" / "utils.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "list_fewshot_samples")
    assert _yaml(TASKS_DIR / "xd_mbpp.yaml")["fewshot_config"]["samples"] == ast.literal_eval(fn.body[0].value)
    mbpp = tasks["xd_mbpp"]
    mbpp.set_fewshot_seed(1234)
    ctx = mbpp.fewshot_context(mbpp.eval_docs[0], num_fewshot=3)
    assert ctx.count("[BEGIN]") == 4 and ctx.count("[DONE]") == 3 and ctx.endswith("[BEGIN]\n")


def test_reference_solutions_pass_and_wrong_ones_fail_through_the_tasks(tasks):
    """The tasks' own scoring path (filter, target, metric) on a few documents: the dataset's reference solution
    passes, a wrong one fails."""
    humaneval = tasks["xd_humaneval"]
    for doc in (humaneval.eval_docs[i] for i in range(3)):
        target = humaneval.doc_to_target(doc)
        assert pass_at_1([target], humaneval_programs([[doc["canonical_solution"]]], [doc])[0]) == 1.0
        assert pass_at_1([target], humaneval_programs([["    return None\n"]], [doc])[0]) == 0.0
    mbpp = tasks["xd_mbpp"]
    for doc in (mbpp.eval_docs[i] for i in range(3)):
        target = mbpp.doc_to_target(doc)
        assert pass_at_1([target], [doc["code"]]) == 1.0
        assert pass_at_1([target], ["def nothing():\n    pass\n"]) == 0.0


def test_code_tasks_confirm_lm_evals_unsafe_flag_for_ours_only():
    assert _PreparedTasks(["xd_humaneval", "xd_mbpp"], None).confirm_unsafe_code
    assert not _PreparedTasks(["xd_gsm8k"], None).confirm_unsafe_code


def test_humaneval_end_to_end_on_a_tiny_model():
    """Generation, the filter and the sandboxed metric inside lm-eval (2 documents, 8 new tokens)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from xlstm_distill.evaluation import evaluate_models
    from xlstm_distill.teacher import resolve_teacher

    folder, gguf = resolve_teacher("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=1024)).eval()
    results = evaluate_models({"m": (model, tokenizer)}, ["xd_humaneval"], limit=2, batch_size=2, max_length=1024,
                              max_gen_toks=8)
    assert results["settings"]["metrics"]["xd_humaneval"] == "pass_at_1,create_test"
    assert results["models"]["m"]["scores"]["xd_humaneval"] == 0.0
