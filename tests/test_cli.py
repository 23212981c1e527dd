"""The command line: convert a teacher folder, generate from the student, clear errors, the reference page."""

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner
from transformers import AutoConfig

from helpers import tiny_recipe
from xlstm_distill.cli import app

runner = CliRunner()


def test_convert_then_generate(tmp_path):
    tiny_recipe(tmp_path, "unused")  # writes a tiny teacher folder with the SmolLM2 tokenizer
    out = tmp_path / "student"
    result = runner.invoke(app, ["convert", "--teacher", str(tmp_path / "teacher"), "--out", str(out),
                                 "--mixer", "linear_swa", "--window", "16", "--sinks", "2", "--backend", "native",
                                 "--kernel", "copy_sinks=none"])
    assert result.exit_code == 0, result.output
    config = AutoConfig.from_pretrained(out)
    assert (config.mixer, config.window_size, config.num_sink_tokens) == ("linear_swa", 16, 2)
    assert (config.kernels.mlstm, config.kernels.swa, config.kernels.copy_sinks) == ("native", "native", "none")
    result = runner.invoke(app, ["generate", "--model", str(out), "--prompt", "Hello", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output


def test_bad_arguments_are_refused(tmp_path):
    result = runner.invoke(app, ["convert", "--teacher", "smollm2-135m", "--out", str(tmp_path), "--mixer", "mamba"])
    assert result.exit_code != 0 and "mixer='mamba' is not supported" in str(result.exception)
    result = runner.invoke(app, ["convert", "--teacher", str(tmp_path / "nothing.gguf"), "--out", str(tmp_path)])
    assert result.exit_code != 0 and "does not exist" in str(result.exception)
    result = runner.invoke(app, ["convert", "--teacher", "smollm2-135m", "--out", str(tmp_path), "--kernel", "swa=fast"])
    assert result.exit_code != 0 and "kernels.swa='fast' is not a registered" in _text(result.output)
    recipe = tiny_recipe(tmp_path, "r")
    result = runner.invoke(app, ["distill", str(recipe), "--set", "distill.stepz=5"])
    assert result.exit_code == 1 and "unknown key(s) stepz; valid keys of distill" in _text(result.output)


def _text(output: str) -> str:
    """The words of a command's output, without the boxes rich draws around errors."""
    return " ".join(output.replace("│", " ").split())


def test_command_reference_is_current(tmp_path):
    """docs/cli.md is generated from the commands (make docs): it lists every command and option as they are."""
    out = tmp_path / "cli.md"
    typer = Path(sys.executable).with_name("typer")
    subprocess.run([str(typer), "xlstm_distill.cli", "utils", "docs", "--name", "xlstm-distill", "--title",
                    "Command reference", "--output", str(out)], check=True, capture_output=True)
    assert (Path(__file__).parents[1] / "docs" / "cli.md").read_text() == out.read_text()


def test_ruler_set_is_built_once_and_scored_by_evaluate(tmp_path, monkeypatch):
    """`data ruler` writes the prompts lm-eval builds; `evaluate --ruler-file` scores teacher and student from that
    file (generation replaced by an oracle that answers the needles at 384 tokens only) and writes the long-context
    report; a file that is not a RULER set is refused."""
    from xlstm_distill.evaluation import long_context

    tiny_recipe(tmp_path, "unused")
    teacher = tmp_path / "teacher"
    ruler = tmp_path / "ruler.json"
    result = runner.invoke(app, ["data", "ruler", "--tokenizer", str(teacher), "--task", "niah_single_1",
                                 "--lengths", "384,512", "--samples", "2", "--out", str(ruler)])
    assert result.exit_code == 0, result.output
    assert "4 prompts (niah_single_1 at 384, 512 tokens)" in result.output
    student = tmp_path / "student"
    assert runner.invoke(app, ["convert", "--teacher", str(teacher), "--out", str(student), "--window", "16"]).exit_code == 0
    monkeypatch.setattr(long_context, "generate_answers", lambda model, tok, requests, max_length, batch_size=8: [
        " ".join(r["outputs"]) if r["length"] == 384 else "no" for r in requests])
    result = runner.invoke(app, ["evaluate", "--teacher", str(teacher), "--student", f"hybrid={student}",
                                 "--ruler-file", str(ruler), "--device", "cpu", "--output-dir", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    report = (tmp_path / "ev" / "long_context.md").read_text()
    assert "| niah_single_1 | hybrid | 1.000 | 0.000 |" in report
    (tmp_path / "other.json").write_text("[]")
    result = runner.invoke(app, ["evaluate", "--teacher", str(teacher), "--student", str(student),
                                 "--ruler-file", str(tmp_path / "other.json"),
                                 "--device", "cpu", "--output-dir", str(tmp_path / "ev2")])
    message = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code != 0 and "is not a RULER set" in message, message


def test_evaluate_positions_reports_kl_by_position_and_the_memorys_gates(tmp_path):
    """`evaluate --positions FILE`: KL by position on the file's held-out long documents, and for a student with an
    output gate its mean per head and the memory's horizon (output_gates.json, .png, one summary line each)."""
    import json

    from helpers import REAL_TEXT

    tiny_recipe(tmp_path, "unused")
    teacher = tmp_path / "teacher"
    student = tmp_path / "student"
    assert runner.invoke(app, ["convert", "--teacher", str(teacher), "--out", str(student), "--window", "16"]).exit_code == 0
    words = REAL_TEXT.split()
    docs = [" ".join(words[i % 500:] + words[:i % 500]) for i in range(300)]  # the held-out split keeps 1 in 50
    (tmp_path / "long.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "ev"
    result = runner.invoke(app, ["evaluate", "--teacher", str(teacher), "--student", f"hybrid={student}",
                                 "--positions", str(tmp_path / "long.jsonl"), "--position-length", "64",
                                 "--position-documents", "2", "--position-bucket", "16", "--device", "cpu",
                                 "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert "| 48-63 |" in (out / "by_position.md").read_text()
    gates = json.loads((out / "output_gates.json").read_text())["hybrid"]
    assert len(gates["horizon"]) == 2 and gates["tokens"] == {"inside": 2 * 20, "beyond": 2 * 44}  # reach 16 + 4
    assert "hybrid: memory horizon median" in result.output and (out / "output_gates.png").stat().st_size > 0
