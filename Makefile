# Two entry points (see README): `make demo` runs the main job, `make test` runs the tests. Both set up .venv first.
VENV := .venv/bin

.PHONY: setup demo test
setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/xlstm-distill run recipes/demo-cpu.yaml

test: setup
	$(VENV)/python -m pytest -q
