"""KV-cache scales: amax / 448 of exactly what the model's own cache stores (keys after RoPE; MLA latent and
k_pe), fp8-cast 1.0, and clear errors."""

import pytest
import torch
from biased_models import calib_ids, observe, prepared

from moequant.discover import decoder_layers
from moequant.kv_cache import KVObservationError, cache_argument, kv_cache_scales


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_kv_scales_are_amax_of_what_the_cache_stores(family):
    """fp8: amax / 448 of the states the model's own DynamicCache holds (keys after RoPE; MLA: latent, k_pe)."""
    model, plan, containers = prepared(family)
    ids = calib_ids(3, 20)
    _, stats = observe(model, plan, containers, "coverage", ids)
    mla = family == "deepseek_v3"
    scales = kv_cache_scales(stats.kv_amax, "fp8", mla=mla)
    layers_path, layers = decoder_layers(model)
    assert sorted(scales) == [f"{layers_path}.{i}.self_attn" for i in range(len(layers))]
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    for i in range(len(layers)):
        keys, values = cache.layers[i].keys, cache.layers[i].values
        s = scales[f"{layers_path}.{i}.self_attn"]
        k_amax, v_amax = keys.abs().max(), values.abs().max()
        if mla:
            k_amax = v_amax = torch.maximum(k_amax, v_amax)
        assert torch.equal(s.k_scale, k_amax / 448) and torch.equal(s.v_scale, v_amax / 448), i
    cast = kv_cache_scales(stats.kv_amax, "fp8-cast", mla=mla)
    assert all(float(s.k_scale) == 1.0 and float(s.v_scale) == 1.0 for s in cast.values())


def test_kv_errors():
    with pytest.raises(KVObservationError, match="no attention layer wrote to the KV cache"):
        kv_cache_scales({}, "fp8", mla=False)
    with pytest.raises(ValueError, match="unknown KV-cache scheme"):
        kv_cache_scales({"a": [torch.ones(()), torch.ones(())]}, "fp16", mla=False)
    with pytest.raises(Exception, match="takes no cache argument"):
        cache_argument(torch.nn.Linear(2, 2), "model.layers.0")
