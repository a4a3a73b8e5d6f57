"""transformers integration: a small random Llama with attn_implementation="adaattn" against "sdpa".

No download: the model is built from a config in the test. Skipped when transformers is not installed.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ada = pytest.importorskip("adaattn_adapters.torch")


def _config(impl: str):
    return transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=128,
        vocab_size=100, attn_implementation=impl,
    )


@pytest.fixture
def models(rng):
    ada.register_transformers()
    torch.manual_seed(int(rng.integers(1 << 31)))
    ref = transformers.LlamaForCausalLM(_config("sdpa"))
    ours = transformers.LlamaForCausalLM(_config("adaattn"))
    ours.load_state_dict(ref.state_dict())
    assert (ref.config._attn_implementation, ours.config._attn_implementation) == ("sdpa", "adaattn")
    return ref, ours


def _ids(rng, batch=2, seq=13):
    return torch.from_numpy(rng.integers(0, 100, (batch, seq)))


def _max_rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def test_logits_and_gradients_match_sdpa(rng, models):
    ref, ours = models
    ids = _ids(rng)
    ref_logits, logits = ref(ids, labels=ids), ours(ids, labels=ids)
    assert _max_rel(logits.logits, ref_logits.logits) <= 1e-5
    ref_logits.loss.backward()
    logits.loss.backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert _max_rel(p.grad, q.grad) <= 1e-4, name


def test_unpadded_mask_and_cached_generation_match_sdpa(rng, models):
    """An all-ones attention_mask is dropped; decoding with a dynamic cache is bottom-right causal."""
    ref, ours = models
    ids = _ids(rng, batch=1)
    mask = torch.ones_like(ids)
    assert _max_rel(ours(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits) <= 1e-5
    kwargs = {"max_new_tokens": 6, "do_sample": False, "attention_mask": mask, "pad_token_id": 0}
    assert torch.equal(ours.generate(ids, **kwargs), ref.generate(ids, **kwargs))


def test_padding_mask_is_refused(rng, models):
    _, ours = models
    ids = _ids(rng)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with pytest.raises(ValueError, match="attention_mask"):
        ours(ids, attention_mask=mask)


def test_mask_reading(rng):
    """Materialised masks: all-visible → non-causal, bottom-right causal → causal, anything else → ValueError."""
    full = torch.ones(2, 1, 4, 6, dtype=torch.bool)
    causal = torch.ones(4, 6, dtype=torch.bool).tril(2).expand(2, 1, 4, 6)
    assert ada._causal_from_mask(full, 4, 6) is False
    assert ada._causal_from_mask(causal, 4, 6) is True
    additive = torch.zeros(2, 1, 4, 6).masked_fill(~causal, torch.finfo(torch.float32).min)
    assert ada._causal_from_mask(additive, 4, 6) is True
    with pytest.raises(ValueError, match="attention_mask"):
        ada._causal_from_mask(torch.ones(4, 6, dtype=torch.bool).tril(0), 4, 6)  # top-left: not ours


def test_unsupported_options_are_refused(rng):
    q = torch.zeros(1, 2, 3, 8)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="dropout"):
        ada.transformers_attention(module, q, q, q, None, dropout=0.1)
    with pytest.raises(ValueError, match="sliding_window"):
        ada.transformers_attention(module, q, q, q, None, sliding_window=2)


def test_compile_fullgraph(rng, models):
    torch._dynamo.reset()
    ref, ours = models
    ids = _ids(rng)
    compiled = torch.compile(ours, fullgraph=True)
    assert _max_rel(compiled(ids).logits, ref(ids).logits) <= 1e-5


@pytest.mark.gpu
def test_gpu_bf16_llama(rng, models):
    """bf16 on the GPU: adaattn's logits and gradients are as close to float32 SDPA as bf16 SDPA's are."""
    ref, ours = models
    ids = _ids(rng, batch=2, seq=200).cuda()
    ref32 = ref.cuda()
    logits32 = ref32(ids, labels=ids)
    logits32.loss.backward()
    grads32 = [p.grad.clone() for p in ref32.parameters()]
    errors = {}
    for name, model in (("sdpa", ref32.to(torch.bfloat16)), ("adaattn", ours.cuda().to(torch.bfloat16))):
        model.zero_grad()
        result = model(ids, labels=ids)
        result.loss.backward()
        errors[name] = (
            _max_rel(result.logits.float(), logits32.logits),
            max(_max_rel(p.grad.float(), g) for p, g in zip(model.parameters(), grads32)),
        )
    assert errors["adaattn"][0] <= 2 * errors["sdpa"][0] + 1e-3, errors
    assert errors["adaattn"][1] <= 2 * errors["sdpa"][1] + 1e-3, errors
