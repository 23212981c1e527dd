"""``python -m xlstm_distill.cli`` (what ``torchrun -m`` launches)."""

from xlstm_distill.cli import app

app()
