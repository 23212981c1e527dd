# Two entry points (see README): `make demo` runs the main job, `make test` runs the tests. Both set up .venv first.
VENV := .venv/bin

.PHONY: setup demo test
setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/xlstm-distill convert --teacher smollm2-135m --out runs/demo/student --window 512
	$(VENV)/xlstm-distill generate --model runs/demo/student --prompt "Write a haiku about the sea." --max-new-tokens 48

test: setup
	$(VENV)/python -m pytest -q
