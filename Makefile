# Two entry points (see README): `make demo` runs the main job, `make test` runs the tests. Both set up .venv first.
VENV := .venv/bin

.PHONY: setup demo test docs
setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/xlstm-distill run recipes/demo-cpu.yaml

test: setup
	$(VENV)/python -m pytest -q

# The generated references: docs/cli.md (every command and option) and docs/recipes.md (every recipe key).
docs: setup
	$(VENV)/python -c "from xlstm_distill.stages import recipe_reference; print(recipe_reference(), end='')" > docs/recipes.md
	$(VENV)/typer xlstm_distill.cli utils docs --name xlstm-distill --title "Command reference" --output docs/cli.md
