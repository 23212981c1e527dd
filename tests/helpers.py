"""Test helpers: tiny random teachers of every supported family and synthetic packed data."""

from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoConfig

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=False)
FAMILY_EXTRAS = {
    "llama": {},
    "mistral": {"sliding_window": 4096},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "olmo2": {},
    "olmo3": {"sliding_window": 4096, "layer_types": ["sliding_attention", "full_attention"]},
    # Gemma: a teacher window (16) shorter than the tests' sequences, a query scale other than the head dimension;
    # Gemma 2 with attention and final logits soft-capped where they matter for these small weights (scores of about
    # 0.02, logits of about 5)
    "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 16, "attn_logit_softcapping": 0.02,
               "final_logit_softcapping": 30.0, "layer_types": ["sliding_attention", "full_attention"]},
    "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 16,
                    "layer_types": ["sliding_attention", "full_attention"]},
}


def tiny_teacher(model_type: str = "llama", seed: int = 0, logit_scale: float = 20.0, **overrides) -> torch.nn.Module:
    """A small random teacher of the given family, in eval mode; ``logit_scale`` sharpens its (non-tied) logits."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**TINY, **FAMILY_EXTRAS[model_type], **overrides})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # large logit margins: greedy decoding is not decided by rounding noise
        model.lm_head.weight.mul_(logit_scale)
    return model


def perturb_new_parameters(student: torch.nn.Module, scale: float = 0.5, seed: int = 0) -> None:
    """Give the new mixer parameters random values, so that tests exercise non-trivial gates and maps."""
    g = torch.Generator().manual_seed(seed)
    names = set(student.new_parameter_names())
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name in names:
                p.add_(torch.randn(p.shape, generator=g) * scale)



class SyntheticPacks:
    """Deterministic packed batches (3 documents per row) with a resumable position."""

    def __init__(self, batch_size: int = 4, seq_len: int = 48, vocab: int = 128, seed: int = 0, limit: int | None = None,
                 tokens: torch.Tensor | None = None):
        self.batch_size, self.seq_len, self.vocab, self.seed, self.limit = batch_size, seq_len, vocab, seed, limit
        self.tokens = tokens  # (N, seq_len): fixed token rows (e.g. teacher samples) used in turn instead of random ones
        self.position = 0

    def make(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 100003 + index)
        B, T = self.batch_size, self.seq_len
        ids = torch.randint(3, self.vocab, (B, T), generator=g)
        ids[:, 1::2] = (ids[:, 0::2] * 7 + 3) % self.vocab  # some learnable structure
        if self.tokens is not None:
            start = index * B % len(self.tokens)
            ids = self.tokens[start:start + B]
        doc = torch.zeros(B, T, dtype=torch.long)
        doc[:, T // 3:] = 1
        doc[:, 2 * T // 3:] = 2
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[:, [T // 3 - 1, 2 * T // 3 - 1, T - 1]] = False
        return {"input_ids": ids, "document_ids": doc, "loss_mask": mask}

    def __iter__(self):
        while self.limit is None or self.position < self.limit:
            self.position += 1
            yield self.make(self.position - 1)

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = state["position"]


def teacher_samples(teacher: torch.nn.Module, n: int, seq_len: int = 48, seed: int = 0) -> torch.Tensor:
    """(n, seq_len) token rows sampled from the teacher: data whose distribution the teacher is."""
    torch.manual_seed(seed)
    prompts = torch.randint(3, teacher.config.vocab_size, (n, 1))
    return teacher.generate(prompts, max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1, do_sample=True, pad_token_id=0)


def tiny_recipe(root, name: str, **sections):
    """Write (once) a tiny teacher folder with the SmolLM2 tokenizer and two named jsonl sources under ``root``,
    then a recipe ``root/name.yaml`` using them; ``sections`` override recipe entries. Returns the recipe path."""
    import json
    from pathlib import Path

    import yaml
    from transformers import AutoTokenizer

    from xlstm_distill.teacher import resolve_teacher

    root = Path(root)
    if not (root / "teacher" / "config.json").exists():
        folder, gguf = resolve_teacher("smollm2-135m")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        teacher = tiny_teacher("llama", vocab_size=len(tokenizer), logit_scale=3.0)
        teacher.save_pretrained(root / "teacher")
        tokenizer.save_pretrained(root / "teacher")
        g = torch.Generator().manual_seed(0)
        for domain, low in (("a", 300), ("b", 3000)):  # two "domains" with disjoint vocabularies
            words = tokenizer.convert_ids_to_tokens(torch.randint(low, low + 2000, (4000,), generator=g).tolist())
            with (root / f"{domain}.jsonl").open("w") as f:
                for i in range(200):
                    f.write(json.dumps({"text": " ".join(w.strip("Ġ") for w in words[i * 20:(i + 1) * 20])}) + "\n")
    spec = dict(name=name, out_dir=str(root / name), teacher=str(root / "teacher"),
                student=dict(window_size=8, num_sink_tokens=2, chunk_size=16),
                data=dict(sources=[{"path": str(root / "a.jsonl"), "name": "a"}, {"path": str(root / "b.jsonl"), "name": "b"}],
                          seq_len=64),
                align=dict(steps=2, batch_size=2, lr=1e-2, warmup_steps=1),
                targets=dict(k=8, num_sequences=16, batch_size=4),
                distill=dict(steps=4, batch_size=4, lr=1e-3, warmup_steps=1, checkpoint_every=2),
                evaluate=dict(held_out_sequences=2, batch_size=2))
    spec.update(sections)
    (root / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    return root / f"{name}.yaml"


REAL_TEXT = __import__("pathlib").Path(torch.__file__).read_text()[:6000]  # real (code) text that ships everywhere


def check_swa_reproduces(teacher: torch.nn.Module, tokenizer, length: int = 256, **config) -> None:
    """The ``swa`` student with a 512-token window is the real teacher on ``length`` tokens of real text."""
    import xlstm_distill as xd

    ids = tokenizer(REAL_TEXT, return_tensors="pt").input_ids[:, :length]
    student = xd.convert(teacher, xd.HybridConfig(mixer="swa", window_size=512, **config))
    with torch.no_grad():
        ref, out = teacher(ids).logits, student(ids).logits
    assert (ref - out).abs().max() <= 1e-3
    assert torch.equal(ref.argmax(-1), out.argmax(-1))


def check_cached_decoding(teacher: torch.nn.Module, tokenizer) -> torch.nn.Module:
    """The default student with a 64-token window (shorter than the 160 tokens: mLSTM and sinks matter) gives the same
    logits from its cache (150-token prefill, then single tokens) as from one forward. Returns the student."""
    import xlstm_distill as xd

    student = xd.convert(teacher, xd.HybridConfig(window_size=64))
    ids = tokenizer(REAL_TEXT, return_tensors="pt").input_ids[:, :160]
    with torch.no_grad():
        full = student(ids).logits
        out = student(ids[:, :150], use_cache=True)
        steps = [out.logits] + [student(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True).logits
                                for t in range(150, 160)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-3, rtol=1e-3)
    return student
