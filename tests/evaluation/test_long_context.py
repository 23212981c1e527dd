"""Long-context evaluation: RULER tasks built offline with the model's tokenizer and scored per length; KL and
perplexity by position against simple truths (a student that is the teacher inside its window)."""

import json
import math

import pytest
import torch

import xlstm_distill as xd
from helpers import tiny_recipe, tiny_teacher
from xlstm_distill.evaluation.long_context import RulerTasks, by_position, ruler_scores, write_by_position, write_long_context


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("ruler")
    tiny_recipe(root, "unused")  # a folder with the SmolLM2 tokenizer
    return AutoTokenizer.from_pretrained(root / "teacher")


@pytest.fixture(scope="module")
def tasks(tokenizer):
    return RulerTasks(tokenizer, ["niah_single_1", "niah_multikey_2"], [512, 1024], samples=2)


def test_ruler_tasks_are_built_offline_and_scored_per_length(tokenizer, tasks, monkeypatch):
    """The tasks build their haystacks offline at each length (prompts within the length), the first `samples`
    documents of each length are evaluated, and the score is RULER's string match per length: answering with the
    needles scores 1, a wrong answer 0 (generation replaced by an oracle that is right on every second document)."""
    from xlstm_distill.evaluation import long_context

    built = tasks.ruler_set()
    for name in tasks.names:
        chosen = [r for r in built.requests if r["task"] == name]
        assert [r["length"] for r in chosen] == [512, 512, 1024, 1024]
        assert all(len(tokenizer(r["context"]).input_ids) <= r["length"] for r in chosen)

    def oracle(model, tok, requests, max_length, batch_size=8):
        return [" ".join(r["outputs"]).upper() if r["index"] % 2 == 0 else " nothing" for r in requests]

    monkeypatch.setattr(long_context, "generate_answers", oracle)
    model = tiny_teacher("llama", vocab_size=len(tokenizer))
    assert built.score(model, tokenizer, batch_size=2) == {name: {512: 0.5, 1024: 0.5} for name in tasks.names}


@pytest.mark.parametrize("batch_size", [1, 3])
def test_ruler_answers_are_lm_evals_answers(tokenizer, batch_size):
    """The built-in scorer answers every request exactly as lm-eval's HF model does (greedy, batched with left
    padding, longest first): the same text for the same prompts, a teacher and a student, batch 1 and 3."""
    from lm_eval.models.huggingface import HFLM

    built = RulerTasks(tokenizer, ["niah_single_1"], [384], samples=4)
    teacher = tiny_teacher("llama", vocab_size=len(tokenizer))
    student = xd.convert(teacher, xd.HybridConfig(window_size=16, num_sink_tokens=2))
    ruler = built.ruler_set()
    for model in (teacher, student):
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=384)
        theirs = lm.generate_until(built.tasks["niah_single_1"].instances, disable_tqdm=True)
        ours = ruler.answers(model, tokenizer, batch_size=batch_size)
        assert len(ours) == 4 and any(ours)
        assert ours == theirs


def test_ruler_set_is_saved_and_refused_with_another_tokenizer(tokenizer, tasks, tmp_path):
    """A saved RULER set loads back as it was and is scored without lm-eval; another tokenizer (its haystacks were
    sized in this one's tokens) and a file that is not a RULER set are refused with the command that builds one."""
    from transformers import AutoTokenizer

    from xlstm_distill.evaluation.long_context import RulerSet

    path = tasks.ruler_set().save(tmp_path / "ruler.json")
    loaded = RulerSet.load(path, tokenizer)
    assert (loaded.names, loaded.lengths, loaded.samples) == (tasks.names, [512, 1024], 2)
    assert loaded.requests == tasks.ruler_set().requests
    other = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    other.add_tokens(["<needle>"])
    with pytest.raises(ValueError, match="built with another tokenizer"):
        RulerSet.load(path, other)
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="not a RULER set.*xlstm-distill data ruler"):
        RulerSet.load(tmp_path / "other.json", tokenizer)
    with pytest.raises(FileNotFoundError, match="xlstm-distill data ruler"):
        RulerSet.load(tmp_path / "missing.json", tokenizer)


def test_ruler_scores_runs_every_model_and_writes_the_report(tokenizer, tasks, tmp_path, monkeypatch):
    from xlstm_distill.evaluation import long_context

    path = tasks.ruler_set().save(tmp_path / "ruler.json")
    monkeypatch.setattr(long_context, "generate_answers", lambda model, tok, requests, max_length, batch_size=8: [
        " ".join(r["outputs"]) for r in requests])
    teacher = tiny_teacher("llama", vocab_size=len(tokenizer))
    student = xd.convert(teacher, xd.HybridConfig(window_size=16, num_sink_tokens=2))
    results = ruler_scores({"teacher": (teacher, tokenizer), "student": (student, tokenizer)}, tokenizer,
                           ruler_file=path)
    perfect = {name: {512: 1.0, 1024: 1.0} for name in tasks.names}
    assert results["models"] == {"teacher": perfect, "student": perfect}
    assert results["settings"]["lengths"] == [512, 1024]
    assert list(results["within_window"]) == ["16"]  # the student's window; the teacher has none
    assert results["per_request"]["student"] == [1.0] * len(results["needle_distance"])
    beyond = results["beyond_window"]["16"]["student"]["niah_single_1"][1024]  # most needles lie beyond 16 tokens
    assert beyond["accuracy"] == 1.0 and 1 <= beyond["requests"] <= 2
    files = write_long_context(results, tmp_path)
    table = files["markdown"].read_text()
    assert "| niah_multikey_2 | student | 1.000 | 1.000 |" in table
    assert "| niah_multikey_2 | _needle in the last 16 tokens_ |" in table
    assert "more than 16 tokens before the prompt's end" in table and "| niah_single_1 | student | 1.000 (" in table
    assert files["plot"].stat().st_size > 0
    # read back from JSON (lengths as strings), the table is the same
    again = write_long_context(json.loads(files["json"].read_text()), tmp_path / "again")
    assert again["markdown"].read_text() == table
    with pytest.raises(ValueError, match="niah_single_2: not a RULER task that builds its data offline"):
        RulerTasks(tokenizer, ["niah_single_2"])


def test_within_window_counts_the_needles_a_window_can_see(tokenizer):
    """The share of needle values that begin within the last W tokens of the prompt: a needle near the end is seen
    by a window of 64, one at the start only by a window covering the whole prompt; a task with two values scores
    the share of its values inside."""
    from xlstm_distill.evaluation.long_context import RulerSet

    filler = " The grass is green." * 40  # about 200 tokens
    near_end = {"task": "niah_single_1", "length": 512, "index": 0, "max_gen_toks": 16, "until": [],
                "context": "Remember the number." + filler + " The number is 4096417. What is it?", "outputs": ["4096417"]}
    at_start = {**near_end, "index": 1, "context": "Remember the number. The number is 5551212." + filler + " What is it?",
                "outputs": ["5551212"]}
    both = {**near_end, "task": "niah_multikey_2", "context": at_start["context"][:-12] + " And 4096417. What are they?",
            "outputs": ["5551212", "4096417"]}
    ruler = RulerSet(["niah_single_1", "niah_multikey_2"], [512], 1, [near_end, at_start, both], "unused")
    assert ruler.within_window(tokenizer, 64) == {"niah_single_1": {512: 0.5}, "niah_multikey_2": {512: 0.5}}
    assert ruler.within_window(tokenizer, 512) == {"niah_single_1": {512: 1.0}, "niah_multikey_2": {512: 1.0}}
    assert ruler.within_window(tokenizer, 2) == {"niah_single_1": {512: 0.0}, "niah_multikey_2": {512: 0.0}}
    # accuracy beyond a window of 64: only the request whose every needle lies outside it counts
    distances = ruler.needle_distances(tokenizer)
    assert distances[0][0] <= 64 < distances[1][0] and distances[2][1] <= 64 < distances[2][0]
    assert ruler.beyond_window([1.0, 0.0, 0.5], 64, distances) == {
        "niah_single_1": {512: {"accuracy": 0.0, "requests": 1}}, "niah_multikey_2": {}}
    assert ruler.beyond_window([1.0, 1.0, 0.5], 64, distances)["niah_single_1"][512]["accuracy"] == 1.0


def test_by_position_is_zero_where_the_student_sees_what_the_teacher_sees(tmp_path):
    """A window covering the document: KL 0 everywhere and the teacher's perplexity. A window of 8 + 2 sinks: KL 0
    in the first bucket (every prefix inside the window), positive beyond it."""
    teacher = tiny_teacher("llama")
    g = torch.Generator().manual_seed(0)
    documents = [torch.randint(3, 128, (48,), generator=g) for _ in range(3)]
    full = xd.convert(teacher, xd.HybridConfig(mixer="swa", window_size=64, num_sink_tokens=0))
    narrow = xd.convert(teacher, xd.HybridConfig(mixer="swa", window_size=8, num_sink_tokens=2))
    rows = {"full": by_position(full, teacher, documents, bucket=8), "narrow": by_position(narrow, teacher, documents, 8)}
    assert rows["full"]["start"] == [0, 8, 16, 24, 32, 40] and rows["full"]["tokens"][-1] == 3 * 7
    assert max(rows["full"]["kl"]) < 1e-6
    torch.testing.assert_close(rows["full"]["student_ce"], rows["full"]["teacher_ce"])
    assert rows["narrow"]["kl"][0] < 1e-6 and min(rows["narrow"]["kl"][2:]) > 1e-3
    files = write_by_position(rows, tmp_path, 3, 48, 8, 8)
    assert "| 16-23 |" in files["markdown"].read_text() and files["plot"].stat().st_size > 0


def test_output_gates_report_the_memorys_share_per_layer_and_head(tmp_path):
    """A converted student's output gates are their initial value sigmoid(-3) everywhere (zero weights), except
    within the window's reach, where the exact student applies none; the memory's horizon is 1 / -log sigmoid(bias)
    of each head's initial forget bias, and it follows a changed bias; a mixer without an output gate reports nothing;
    linear_swa (no forget gate) no horizon; the heat maps are drawn."""
    from xlstm_distill.evaluation.long_context import output_gates, plot_output_gates

    teacher = tiny_teacher("llama")
    documents = [torch.randint(3, 128, (30,), generator=torch.Generator().manual_seed(0))]
    student = xd.convert(teacher, xd.HybridConfig(window_size=8, num_sink_tokens=2))
    gates = output_gates(student, documents, reach=10)
    assert gates["tokens"] == {"inside": 10, "beyond": 20}
    start = torch.sigmoid(torch.tensor(-3.0)).item()
    torch.testing.assert_close(torch.tensor(gates["beyond"]), torch.full((2, 4), start), atol=1e-6, rtol=1e-6)
    assert torch.tensor(gates["inside"]).eq(0).all()  # exact_within_window (the default): the window branch alone
    bias = torch.linspace(3.0, 6.0, 4)  # HybridConfig.forget_gate_bias, spread over the heads
    expected = 1 / -torch.nn.functional.logsigmoid(bias)  # 20.6 ... 404 tokens
    torch.testing.assert_close(torch.tensor(gates["horizon"]), expected.expand(2, 4), rtol=1e-5, atol=0)
    gate = student.model.layers[1].self_attn.gate_proj
    with torch.no_grad():
        gate.bias[4 + 2] = 9.0  # layer 1, head 2: forget bias 9 (layout [input, forget, output] x heads)
    horizon = torch.tensor(output_gates(student, documents, reach=10)["horizon"])
    assert horizon[1, 2].item() == pytest.approx(1 / math.log1p(math.exp(-9.0)), rel=1e-4)
    assert horizon[0, 2].item() == pytest.approx(expected[2].item(), rel=1e-5)
    assert "horizon" not in output_gates(xd.convert(teacher, xd.HybridConfig(mixer="linear_swa", window_size=8)),
                                         documents, 10)
    learned = xd.convert(teacher, xd.HybridConfig(window_size=8, num_sink_tokens=2, exact_within_window=False))
    torch.testing.assert_close(torch.tensor(output_gates(learned, documents, reach=10)["inside"]),
                               torch.full((2, 4), start), atol=1e-6, rtol=1e-6)
    assert output_gates(xd.convert(teacher, xd.HybridConfig(mixer="swa")), documents, 10) == {}
    # heads that keep full attention use no gate: NaN (KV head 1 of layer 0 = query heads 2, 3; all of layer 1)
    kept = xd.convert(teacher, xd.HybridConfig(window_size=8, num_sink_tokens=2, full_attention_heads=[[0, 1]],
                                               full_attention_layers=[1]))
    beyond = torch.tensor(output_gates(kept, documents, reach=10)["beyond"])
    assert beyond[0, 2:].isnan().all() and beyond[1].isnan().all()
    horizon = torch.tensor(output_gates(kept, documents, reach=10)["horizon"])
    assert horizon[0, 2:].isnan().all() and horizon[1].isnan().all() and horizon[0, :2].isfinite().all()
    torch.testing.assert_close(beyond[0, :2], torch.full((2,), start), atol=1e-6, rtol=1e-6)
    plot_output_gates({"student": gates}, tmp_path / "gates.png")
    assert (tmp_path / "gates.png").stat().st_size > 0
