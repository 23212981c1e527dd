"""The compact target encoding: bit fields, Exp-Golomb streams, quantization bound, Stage II loss, manifests."""

import json

import numpy as np
import pytest
import torch

from helpers import SyntheticPacks, tiny_teacher
from xlstm_distill.stages.distill import sparse_kl
from xlstm_distill.stages.target_codec import (CompactCodec, _dequantize, _quantize, exp_golomb_decode,
                                               exp_golomb_encode, pack_bits, unpack_bits)
from xlstm_distill.stages.targets import TargetMismatchError, TargetShards, teacher_topk, write_targets


@pytest.mark.parametrize("width", [1, 3, 4, 7, 8, 13, 16, 17, 25])
@pytest.mark.parametrize("count", [1, 5, 63, 101])
def test_pack_bits_round_trip_and_layout(width, count):
    values = np.random.default_rng(width * count).integers(0, 1 << width, count)
    packed = pack_bits(values, width)
    bits = "".join(format(int(v), f"0{width}b") for v in values)  # most significant bit first, back to back
    bits += "0" * (-len(bits) % 8)
    assert bytes(packed) == bytes(int(bits[i:i + 8], 2) for i in range(0, len(bits), 8))
    assert np.array_equal(unpack_bits(packed, width, count), values)


def test_variable_widths_and_exp_golomb_round_trip():
    rng = np.random.default_rng(0)
    widths = rng.integers(0, 26, 777)
    values = rng.integers(0, 1 << 25, 777) & ((1 << widths) - 1)
    assert np.array_equal(unpack_bits(pack_bits(values, widths), widths), values)
    gaps = rng.geometric(0.01, 1001) - 1
    for order in (0, 3, 7):
        unary, binary = exp_golomb_encode(gaps, order)
        assert np.array_equal(exp_golomb_decode(unary, binary, len(gaps), order), gaps)
    with pytest.raises(ValueError, match="does not fit"):
        pack_bits(np.array([8]), 3)


def test_quantization_error_is_within_half_a_step():
    high, low = torch.tensor([[-1.0, -0.5]]), torch.tensor([[-12.0, -3.0]])
    values = low.unsqueeze(-1) + torch.rand(1, 2, 500) * (high - low).unsqueeze(-1)
    for bits in (3, 4, 6):
        levels = _quantize(values, high, low, bits)
        assert levels.min() >= 0 and levels.max() <= (1 << bits) - 1
        error = (_dequantize(levels[0], high[0], low[0], bits) - values[0]).abs()
        step = ((high - low) / ((1 << bits) - 1))[0].unsqueeze(-1)
        assert (error <= step / 2 + 1e-5).all()
        assert error.max() > step.min() / 4  # the grid is as coarse as claimed, not finer


def _teacher_targets(N=3, T=40, V=3000, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, T, V, generator=g) * torch.linspace(1.0, 6.0, T).view(1, T, 1)  # flat to peaked
    ids, logp, log_rest = teacher_topk(logits, k)
    data = {"input_ids": torch.randint(0, V, (N, T), generator=g), "document_ids": torch.arange(T).div(7).floor()
            .long().expand(N, T), "loss_mask": torch.rand(N, T, generator=g) > 0.2}
    return data, ids, logp, log_rest, V


def test_codec_round_trip_keeps_ids_data_head_and_rest_mass():
    data, ids, logp, log_rest, V = _teacher_targets()
    codec = CompactCodec(exact_head=8, value_bits=4)
    shard = codec.encode(data, ids, logp, log_rest, V)
    for row in range(3):
        out = codec.decode(shard, row)
        for key in data:
            assert torch.equal(out[key], data[key][row].to(out[key].dtype))
        assert torch.equal(out["topk_ids"].sort(-1).values, ids[row].long().sort(-1).values)
        by_id = logp[row].gather(-1, ids[row].long().argsort(-1))
        stored = out["topk_logprobs"].gather(-1, out["topk_ids"].argsort(-1))
        head = torch.zeros_like(by_id, dtype=torch.bool).scatter_(-1, ids[row].long().argsort(-1).argsort(-1)[:, :8], True)
        torch.testing.assert_close(stored[head], by_id[head], atol=5e-3, rtol=2e-3)  # float16 head
        rest = 1 - out["topk_logprobs"].exp().sum(-1)  # what the residual loss sees
        torch.testing.assert_close(rest, log_rest[row].exp(), atol=1e-5, rtol=2e-3)


@pytest.mark.parametrize("mode", ["residual", "renormalize"])
def test_stage2_loss_from_compact_targets_matches_exact(mode):
    data, ids, logp, log_rest, V = _teacher_targets()
    shard = CompactCodec().encode(data, ids, logp, log_rest, V)
    stored = [CompactCodec().decode(shard, row) for row in range(3)]
    student = torch.randn(3, 40, V, generator=torch.Generator().manual_seed(1)) * 3
    exact = sparse_kl(student, ids, logp, mode)  # (N, T)
    compact = sparse_kl(student, torch.stack([s["topk_ids"] for s in stored]),
                        torch.stack([s["topk_logprobs"] for s in stored]), mode)
    assert exact.mean() > 1.0  # a student far from the teacher: the comparison means something
    assert (compact - exact).abs().max() < 0.03 and (compact - exact).abs().mean() < 5e-3


def _write(path, encoding="compact", k=12):
    return write_targets(tiny_teacher("llama"), SyntheticPacks(batch_size=2), path, k=k, num_sequences=6,
                         teacher_name="tiny", tok_hash="abc", seq_len=48, sequences_per_shard=4, encoding=encoding)


def test_manifest_records_encoding_and_measured_bytes_per_token(tmp_path):
    sizes = {}
    for encoding in ("exact", "compact"):
        manifest = _write(tmp_path / encoding, encoding)
        files = sum((tmp_path / encoding / s["file"]).stat().st_size for s in manifest["shards"])
        assert manifest["encoding"] == encoding and manifest["bytes_per_token"] == round(files / (6 * 48), 2)
        sizes[encoding] = manifest["bytes_per_token"]
    assert manifest["codec"] == CompactCodec().settings()
    assert sizes["compact"] < sizes["exact"]
    with pytest.raises(TargetMismatchError, match="set targets.encoding: compact"):  # resume in another encoding
        _write(tmp_path / "compact", "exact")


def test_format_1_folders_still_read(tmp_path):
    """A folder written before encodings existed (format 1, no `encoding`) reads as exact, batch for batch."""
    _write(tmp_path / "t", "exact")
    new = next(iter(TargetShards(tmp_path / "t", batch_size=3, seed=2)))
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    for key in ("encoding", "bytes_per_token"):
        del manifest[key]
    manifest["format"] = 1
    (tmp_path / "t" / "manifest.json").write_text(json.dumps(manifest))
    reader = TargetShards(tmp_path / "t", batch_size=3, seed=2)
    old = next(iter(reader))
    assert reader.encoding == "exact" and old["topk_logprobs"].dtype == torch.float16
    assert all(torch.equal(old[key], new[key]) for key in new)
    manifest["format"] = 3
    (tmp_path / "t" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TargetMismatchError, match="format 3.*upgrade xlstm-distill, or regenerate"):
        TargetShards(tmp_path / "t", batch_size=3)


def test_corrupt_or_mismatched_compact_targets_are_refused(tmp_path):
    manifest = _write(tmp_path / "t")
    with pytest.raises(TargetMismatchError, match="k=12, this run needs 16.*Regenerate"):
        TargetShards(tmp_path / "t", batch_size=2, expect={"k": 16})
    shard = tmp_path / "t" / manifest["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    reader = TargetShards(tmp_path / "t", batch_size=2)
    with pytest.raises(TargetMismatchError, match="corrupt .*delete it and regenerate"):
        reader.read(np.array([0, 5]))
