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
