"""Distillation stages: I (layer-wise alignment), teacher top-k targets, II (sparse KD); one shared trainer."""
