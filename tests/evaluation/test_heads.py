"""Choosing the heads that keep full attention: retrieval probes, the score of every head (the KL removed by
restoring it alone), the budget, the files, the recipe step and the command."""

import json

import pytest
import torch
from typer.testing import CliRunner

import xlstm_distill as xd
from helpers import perturb_new_parameters, tiny_recipe, tiny_teacher
from xlstm_distill.evaluation.heads import (Calibration, choose_heads, head_scores, needle_probes, needle_scores,
                                            probe_accuracy, retrieval_probes, text_calibration, write_head_scores)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("heads")
    tiny_recipe(root, "unused")  # a folder with the SmolLM2 tokenizer
    return AutoTokenizer.from_pretrained(root / "teacher")


def test_retrieval_probes_score_the_answer_of_a_key_in_the_list(tokenizer):
    probes = retrieval_probes(tokenizer, count=3, length=200, seed=1)
    assert probes[0].input_ids.tolist() == retrieval_probes(tokenizer, 3, 200, seed=1)[0].input_ids.tolist()
    for probe in probes:
        assert 150 <= len(probe.input_ids) <= 200
        text = tokenizer.decode(probe.input_ids)
        key = text.split("what is the value of code ")[1].split("?")[0]
        value = text.splitlines()[-1].split(": ")[-1]
        assert f"code {key}: {value}\n" in text.split("Question")[0]  # the answer is in the list
        scored = probe.scored.nonzero().flatten()
        answer = tokenizer.decode(probe.input_ids[scored + 1])  # the tokens the scored positions predict
        assert answer == f"{value}\n"
    with pytest.raises(ValueError, match="length >= 32"):
        retrieval_probes(tokenizer, 1, 16)


def test_needle_probes_hide_facts_beyond_the_window_and_score_the_asked_digits(tokenizer):
    text = "A sentence of plain text. Another one follows here! Does a third ask? " * 40
    documents = [torch.tensor([tokenizer.eos_token_id] + tokenizer(text)["input_ids"])]  # a special token: dropped
    probes = needle_probes(documents, tokenizer, count=4, length=160, reach=48, needles=2, seed=3)
    assert probes[1].input_ids.tolist() == needle_probes(documents, tokenizer, 4, 160, 48, 2, seed=3)[1].input_ids.tolist()
    for probe in probes:
        assert len(probe.input_ids) <= 160 and tokenizer.eos_token_id not in probe.input_ids.tolist()
        text = tokenizer.decode(probe.input_ids)
        key = text.split("Question: What is the ")[1].split(" code?")[0]
        scored = probe.scored.nonzero().flatten()
        value = tokenizer.decode(probe.input_ids[scored + 1])  # the tokens the scored positions predict
        assert value.isdigit() and len(value) == 6  # the digits alone (the space before them is in the prompt)
        fact = tokenizer(f" The {key} code is {value}.", add_special_tokens=False)["input_ids"]
        ids = probe.input_ids.tolist()
        at = next(i for i in range(len(ids)) if ids[i:i + len(fact)] == fact)  # the fact, as inserted
        assert scored[0] - (at + len(fact)) > 48  # beyond the window's reach from the answer
        assert text.count(" code is ") == 3  # two facts and the question
        before = tokenizer.decode(ids[at - 1:at])
        assert before.rstrip(" ")[-1] in ".!?\n"  # inserted at the end of a sentence
        # the counterfactual: the same tokens except the asked fact's value (same length), the same answer
        other = probe.counterfactual.tolist()
        differ = [i for i in range(len(ids)) if ids[i] != other[i]]
        assert len(other) == len(ids) and differ and at + 4 <= min(differ) and max(differ) < at + len(fact) - 1
        swapped = tokenizer.decode(other[at:at + len(fact)])
        assert swapped.startswith(f" The {key} code is ") and swapped[-7:-1].isdigit() and swapped[-7:-1] != value
    with pytest.raises(ValueError, match="no room"):
        needle_probes(documents, tokenizer, 1, 80, reach=70)


def test_needle_information_is_the_answers_log_probability_gain_and_zero_beyond_the_window():
    """needle_scores: probe_accuracy's accuracy, and the information mean log p(answer | probe) - log p(answer | value
    swapped); exactly 0 for a student whose window cannot see the swapped tokens, not 0 for the teacher, who sees
    them."""
    teacher = tiny_teacher()
    g = torch.Generator().manual_seed(0)
    probes = []
    for _ in range(2):
        ids = torch.randint(3, 128, (40,), generator=g)
        swapped = ids.clone()
        swapped[5:8] = torch.randint(3, 128, (3,), generator=g)  # the "value", far before the answer
        probes.append(Calibration(ids, (torch.arange(40) >= 35) & (torch.arange(40) < 39), swapped))
    accuracy, gain = needle_scores(teacher, probes)
    assert accuracy == probe_accuracy(teacher, probes)
    expected = []
    for probe in probes:
        where = probe.scored.nonzero().flatten()
        logps = [torch.log_softmax(teacher(input_ids=x[None]).logits[0, where], -1)
                 .gather(-1, probe.input_ids[where + 1, None]).mean() for x in (probe.input_ids, probe.counterfactual)]
        expected.append((logps[0] - logps[1]).item())
    assert gain == pytest.approx(sum(expected) / 2, rel=1e-5) and abs(gain) > 1e-4
    window = xd.convert(teacher, xd.HybridConfig(mixer="swa", window_size=8, num_sink_tokens=2))
    assert needle_scores(window, probes)[1] == 0.0  # the swapped tokens lie beyond its window and sinks
    with pytest.raises(ValueError, match="counterfactual"):
        needle_scores(teacher, [Calibration(probes[0].input_ids, probes[0].scored)])


def test_text_calibration_scores_only_past_the_window():
    calibration = text_calibration([torch.arange(40), torch.arange(30)], reach=10, per_sequence=8)
    for c in calibration:
        where = c.scored.nonzero().flatten()
        assert len(where) == 8 and where.min() >= 10 and where.max() < len(c.input_ids) - 1
    with pytest.raises(ValueError, match="longer sequences"):
        text_calibration([torch.arange(10)], reach=10)


def test_head_scores_are_the_kl_each_restored_head_removes():
    teacher = tiny_teacher()
    student = xd.convert(teacher, xd.HybridConfig(window_size=4, num_sink_tokens=1, chunk_size=4,
                                                  full_attention_heads=[[1, 0]]))
    perturb_new_parameters(student)
    g = torch.Generator().manual_seed(0)
    calibration = [Calibration(torch.randint(3, 128, (24,), generator=g), torch.arange(24) >= 8) for _ in range(3)]
    result = head_scores(student, teacher, calibration, batch_size=2)
    assert result.scores.shape == (2, 2) and result.tokens == 3 * 16
    assert result.scores[1, 0] == 0  # already kept
    assert student.config.full_attention_heads == [[1, 0]]  # restored after scoring
    # the score of head (0, 1) by hand: the KL with it kept too, against the baseline
    ids = torch.stack([c.input_ids for c in calibration])
    mask = torch.stack([c.scored for c in calibration])
    with torch.no_grad():
        logp_t = torch.log_softmax(teacher(ids).logits[mask], -1)

        def kl(model):
            logp_s = torch.log_softmax(model(ids).logits[mask], -1)
            return float((logp_t.exp() * (logp_t - logp_s)).sum(-1).mean())

        base = kl(student)
        student.set_full_attention([[1, 0], [0, 1]])
        with_head = kl(student)
    assert result.baseline == pytest.approx(base, rel=1e-4)
    assert result.scores[0, 1] == pytest.approx(base - with_head, rel=1e-3, abs=1e-6)
    assert result.scores.abs().max() > 0
    # every head restored: the student is the teacher, so the KL with all kept is zero
    student.set_full_attention(layers=[0, 1])
    with torch.no_grad():
        assert kl(student) < 1e-8


def test_choose_heads_takes_the_best_within_the_budget(tmp_path):
    scores = torch.tensor([[0.1, 0.5, 0.0], [0.9, -0.2, 0.3]])
    assert choose_heads(scores, 0.0) == []
    assert choose_heads(scores, 0.01) == [[1, 0]]  # at least one
    assert choose_heads(scores, 0.5) == [[0, 1], [1, 0], [1, 2]]
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        choose_heads(scores, 1.5)
    from xlstm_distill.evaluation.heads import HeadScores

    files = write_head_scores(HeadScores(scores, 0.7, 12), [[1, 0]], tmp_path, {"probe": "retrieval"})
    saved = json.loads(files["json"].read_text())
    assert saved["chosen"] == [[1, 0]] and saved["scores"][1][0] == pytest.approx(0.9) and saved["baseline_kl"] == 0.7
    assert files["png"].stat().st_size > 0


def test_recipe_step_and_command_write_the_chosen_heads_into_the_student(tmp_path):
    from xlstm_distill.cli import app
    from xlstm_distill.stages import Pipeline, Recipe

    select = {"budget": 0.25, "probe": "retrieval", "samples": 2, "length": 48, "batch_size": 2}
    path = tiny_recipe(tmp_path, "heads", select_heads=select)
    Pipeline(Recipe.load(path)).convert()
    out = tmp_path / "heads"
    saved = json.loads((out / "select_heads" / "heads.json").read_text())
    assert len(saved["chosen"]) == 1 and saved["length"] == 48  # 25% of 2 layers x 2 KV heads
    config = json.loads((out / "student-init" / "config.json").read_text())
    assert config["full_attention_heads"] == saved["chosen"]
    student = xd.HybridForCausalLM.from_pretrained(out / "student-init")
    assert student.config.full_attention_heads == saved["chosen"]
    # the command: another budget reuses the saved scores and records the new choice
    result = CliRunner().invoke(app, ["select-heads", str(path), "--budget", "0.5", "--samples", "2", "--length", "48"])
    assert result.exit_code == 0, result.output
    again = json.loads((out / "select_heads" / "heads.json").read_text())
    assert again["scores"] == saved["scores"] and len(again["chosen"]) == 2 and again["budget"] == 0.5
    assert json.loads((out / "student-init" / "config.json").read_text())["full_attention_heads"] == again["chosen"]
    assert "2 KV heads keep full attention" in result.output
    # conflicting choices are refused at load
    with pytest.raises(ValueError, match="give one of them"):
        Recipe.load(path, ["student.full_attention_heads=[[0, 0]]"])


def test_recipe_step_scores_heads_on_needles_hidden_in_training_text(tmp_path):
    from xlstm_distill.stages import Pipeline, Recipe

    from helpers import REAL_TEXT

    (tmp_path / "long.jsonl").write_text("".join(json.dumps({"text": REAL_TEXT[i:i + 2000]}) + "\n"
                                                 for i in (0, 2000, 4000)))
    select = {"budget": 0.25, "probe": "needles", "method": "single", "samples": 2, "length": 96, "batch_size": 2}
    data = {"sources": [{"path": str(tmp_path / "long.jsonl"), "name": "long"}], "seq_len": 96}
    path = tiny_recipe(tmp_path, "needles", select_heads=select, data=data)
    Pipeline(Recipe.load(path)).convert()
    saved = json.loads((tmp_path / "needles" / "select_heads" / "heads.json").read_text())
    assert saved["probe"] == "needles" and saved["scored_tokens"] == 2 * 6  # the 6 digits of each answer
    assert len(saved["chosen"]) == 1
    # greedy on the saved scores: two heads, one at a time, the KL after each choice recorded
    Pipeline(Recipe.load(path, ["select_heads.method=greedy", "select_heads.budget=0.5"])).convert()
    greedy = json.loads((tmp_path / "needles" / "select_heads" / "heads.json").read_text())
    assert greedy["scores"] == saved["scores"] and len(greedy["chosen"]) == 2 and greedy["method"] == "greedy"
    assert len(greedy["kl_after_each_choice"]) == 2 and greedy["kl_after_each_choice"][0] < saved["baseline_kl"]
    config = json.loads((tmp_path / "needles" / "student-init" / "config.json").read_text())
    assert config["full_attention_heads"] == greedy["chosen"]
    with pytest.raises(ValueError, match="single, greedy"):
        Recipe.load(path, ["select_heads.method=best"])


def test_greedy_choice_adds_the_head_that_helps_most_given_those_chosen():
    from xlstm_distill.evaluation.heads import choose_heads_greedy

    teacher = tiny_teacher(num_hidden_layers=3)
    student = xd.convert(teacher, xd.HybridConfig(window_size=4, num_sink_tokens=1, chunk_size=4))
    perturb_new_parameters(student)
    g = torch.Generator().manual_seed(1)
    calibration = [Calibration(torch.randint(3, 128, (24,), generator=g), torch.arange(24) >= 8) for _ in range(3)]
    single = head_scores(student, teacher, calibration, batch_size=2)
    chosen, kl_after = choose_heads_greedy(student, teacher, calibration, single, budget=0.5, pool=2, batch_size=2)
    assert len(chosen) == 3 and student.config.full_attention_heads == []  # 50% of 6; the student left as it was
    first = choose_heads(single.scores, 1 / 6)[0]
    assert first in chosen and kl_after[0] == pytest.approx(single.baseline - float(single.scores.max()), rel=1e-4)
    assert kl_after == sorted(kl_after, reverse=True)  # each choice lowers the KL (the best of its round)
    student.set_full_attention(chosen)  # the last KL is that of the student with the chosen heads
    assert head_scores(student, teacher, calibration, batch_size=2, candidates=[]).baseline == pytest.approx(
        kl_after[-1], rel=1e-4)
