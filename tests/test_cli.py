"""The command line: convert a teacher folder, generate from the student, clear errors."""

from typer.testing import CliRunner
from transformers import AutoConfig

from helpers import tiny_recipe
from xlstm_distill.cli import app

runner = CliRunner()


def test_convert_then_generate(tmp_path):
    tiny_recipe(tmp_path, "unused")  # writes a tiny teacher folder with the SmolLM2 tokenizer
    out = tmp_path / "student"
    result = runner.invoke(app, ["convert", "--teacher", str(tmp_path / "teacher"), "--out", str(out),
                                 "--mixer", "linear_swa", "--window", "16", "--sinks", "2"])
    assert result.exit_code == 0, result.output
    config = AutoConfig.from_pretrained(out)
    assert (config.mixer, config.window_size, config.num_sink_tokens) == ("linear_swa", 16, 2)
    result = runner.invoke(app, ["generate", "--model", str(out), "--prompt", "Hello", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output


def test_bad_arguments_are_refused(tmp_path):
    result = runner.invoke(app, ["convert", "--teacher", "smollm2-135m", "--out", str(tmp_path), "--mixer", "mamba"])
    assert result.exit_code != 0 and "mixer='mamba' is not supported" in str(result.exception)
    result = runner.invoke(app, ["convert", "--teacher", str(tmp_path / "nothing.gguf"), "--out", str(tmp_path)])
    assert result.exit_code != 0 and "does not exist" in str(result.exception)
