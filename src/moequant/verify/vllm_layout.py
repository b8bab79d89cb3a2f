"""The modules vLLM 0.26.0 builds for a checkpoint's architecture, read from config.json alone.

Written from vLLM's model files (``vllm/model_executor/models/{llama,mixtral,qwen2_moe,qwen3_moe,deepseek_v2}.py``,
vLLM 0.26.0 as released on PyPI, ``vllm/_version.py`` commit ``ffd46bfab``); see ``engine_vllm.py`` for the rules.
For each decoder layer: the fused linears vLLM creates (``qkv_proj`` from q/k/v, ``gate_up_proj`` from gate/up,
DeepSeek ``fused_qkv_a_proj`` from q_a/kv_a_proj_with_mqa), each with the on-disk shards it loads and their
``[out, in]``; whether vLLM passes the quantization config to it (routers: never); the ``FusedMoE`` experts (on-disk
projection names: Mixtral ``w1/w2/w3``, the others ``gate_proj/down_proj/up_proj``); the attention module whose
``k_scale``/``v_scale`` hold the KV-cache scales.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from moequant.errors import MoequantError


class LayoutError(MoequantError, ValueError):
    """config.json lacks what the architecture needs, or names an architecture this contract does not know."""


@dataclass(frozen=True)
class Shard:
    disk: str   # on-disk module name, e.g. "model.layers.0.self_attn.k_proj"
    out: int
    inp: int


@dataclass(frozen=True)
class Linear:
    prefix: str               # vLLM module prefix, e.g. "model.layers.0.self_attn.qkv_proj"
    cls: str                  # vLLM class name (compressed-tensors matches targets against it)
    shards: tuple[Shard, ...]
    quantizable: bool = True  # False: vLLM builds it with quant_config=None whatever the config says
    tied: bool = False        # lm_head tied to the embeddings: no tensor of its own on disk
    extras: tuple[str, ...] = ()   # further parameters vLLM registers on it (DeepSeek's router bias)
    hint: str = ""            # why vLLM lacks a parameter a checkpoint may carry, appended to that failure


@dataclass(frozen=True)
class Experts:
    prefix: str                      # vLLM FusedMoE prefix, e.g. "model.layers.1.mlp.experts"
    num: int
    names: tuple[str, str, str]      # on-disk (gate, down, up) projection names
    hidden: int
    inter: int

    def shapes(self) -> dict[str, tuple[int, int]]:
        gate, down, up = self.names
        return {gate: (self.inter, self.hidden), up: (self.inter, self.hidden), down: (self.hidden, self.inter)}


@dataclass(frozen=True)
class Layout:
    arch: str
    linears: list[Linear] = field(default_factory=list)
    experts: list[Experts] = field(default_factory=list)
    attention: list[str] = field(default_factory=list)   # module holding k_scale / v_scale
    packed: dict[str, tuple[str, ...]] = field(default_factory=dict)
    expands_star: bool = True   # the model class has an hf_to_vllm_mapper: ModelOpt "x*" -> "x", "x.*"
    mla: bool = False           # DeepSeek MLA: KV scales go through maybe_remap_kv_scale_name


def _get(cfg: dict, *keys: str, default=None):
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    if default is not None:
        return default
    raise LayoutError(f"config.json: none of {list(keys)} is set; vLLM needs it to build the model")


def _qkv(layout: Layout, cfg: dict, layer: str) -> None:
    hidden, heads = _get(cfg, "hidden_size"), _get(cfg, "num_attention_heads")
    kv_heads = _get(cfg, "num_key_value_heads", default=heads)
    head_dim = _get(cfg, "head_dim", default=hidden // heads)
    a = f"{layer}.self_attn"
    layout.linears.append(Linear(f"{a}.qkv_proj", "QKVParallelLinear", (
        Shard(f"{a}.q_proj", heads * head_dim, hidden), Shard(f"{a}.k_proj", kv_heads * head_dim, hidden),
        Shard(f"{a}.v_proj", kv_heads * head_dim, hidden))))
    layout.linears.append(Linear(f"{a}.o_proj", "RowParallelLinear", (Shard(f"{a}.o_proj", hidden, heads * head_dim),)))
    layout.attention.append(f"{a}.attn")


def _mla(layout: Layout, cfg: dict, layer: str) -> None:
    """DeepseekV2MLAAttention: fused_qkv_a_proj (q_lora_rank set) or q_proj + kv_a_proj_with_mqa."""
    hidden, heads = _get(cfg, "hidden_size"), _get(cfg, "num_attention_heads")
    nope, rope, v_dim = _get(cfg, "qk_nope_head_dim"), _get(cfg, "qk_rope_head_dim"), _get(cfg, "v_head_dim")
    kv_rank, q_rank = _get(cfg, "kv_lora_rank"), cfg.get("q_lora_rank")
    a = f"{layer}.self_attn"
    kv_a = Shard(f"{a}.kv_a_proj_with_mqa", kv_rank + rope, hidden)
    if q_rank is not None:
        layout.linears.append(Linear(f"{a}.fused_qkv_a_proj", "DeepSeekV2FusedQkvAProjLinear",
                                     (Shard(f"{a}.q_a_proj", q_rank, hidden), kv_a)))
        layout.linears.append(Linear(f"{a}.q_b_proj", "ColumnParallelLinear",
                                     (Shard(f"{a}.q_b_proj", heads * (nope + rope), q_rank),)))
    else:
        layout.linears.append(Linear(f"{a}.q_proj", "ColumnParallelLinear",
                                     (Shard(f"{a}.q_proj", heads * (nope + rope), hidden),)))
        layout.linears.append(Linear(kv_a.disk, "ReplicatedLinear", (kv_a,)))
    layout.linears.append(Linear(f"{a}.kv_b_proj", "ColumnParallelLinear",
                                 (Shard(f"{a}.kv_b_proj", heads * (nope + v_dim), kv_rank),)))
    layout.linears.append(Linear(f"{a}.o_proj", "RowParallelLinear", (Shard(f"{a}.o_proj", hidden, heads * v_dim),)))
    layout.attention.append(f"{a}.mla_attn.mla_attn")


def _mlp(layout: Layout, prefix: str, hidden: int, inter: int) -> None:
    """A dense gated MLP: MergedColumnParallelLinear gate_up_proj + RowParallelLinear down_proj."""
    layout.linears.append(Linear(f"{prefix}.gate_up_proj", "MergedColumnParallelLinear", (
        Shard(f"{prefix}.gate_proj", inter, hidden), Shard(f"{prefix}.up_proj", inter, hidden))))
    down = Shard(f"{prefix}.down_proj", hidden, inter)
    layout.linears.append(Linear(f"{prefix}.down_proj", "RowParallelLinear", (down,)))


def _router(layout: Layout, prefix: str, experts: int, hidden: int, quantizable: bool, **kw) -> None:
    layout.linears.append(Linear(prefix, "ReplicatedLinear", (Shard(prefix, experts, hidden),), quantizable, **kw))


def _lm_head(layout: Layout, cfg: dict, tied: bool) -> None:
    shard = Shard("lm_head", _get(cfg, "vocab_size"), _get(cfg, "hidden_size"))
    layout.linears.append(Linear("lm_head", "ParallelLMHead", (shard,), tied=tied))


def _n_experts(cfg: dict) -> int:
    return _get(cfg, "num_experts", "num_local_experts", "n_routed_experts")


def _llama(cfg: dict, layout: Layout) -> None:
    layout.packed.update(qkv_proj=("q_proj", "k_proj", "v_proj"), gate_up_proj=("gate_proj", "up_proj"))
    for i in range(_get(cfg, "num_hidden_layers")):
        _qkv(layout, cfg, f"model.layers.{i}")
        _mlp(layout, f"model.layers.{i}.mlp", _get(cfg, "hidden_size"), _get(cfg, "intermediate_size"))


def _mixtral(cfg: dict, layout: Layout) -> None:
    layout.packed.update(qkv_proj=("q_proj", "k_proj", "v_proj"))
    hidden, n = _get(cfg, "hidden_size"), _n_experts(cfg)
    for i in range(_get(cfg, "num_hidden_layers")):
        moe = f"model.layers.{i}.block_sparse_moe"
        _qkv(layout, cfg, f"model.layers.{i}")
        _router(layout, f"{moe}.gate", n, hidden, quantizable=False)
        layout.experts.append(Experts(f"{moe}.experts", n, ("w1", "w2", "w3"), hidden, _get(cfg, "intermediate_size")))


def _qwen_moe(cfg: dict, layout: Layout, v2: bool) -> None:
    """Qwen2-MoE / Qwen3-MoE: MoE where (i + 1) % decoder_sparse_step == 0 and i not in mlp_only_layers."""
    hidden, n = _get(cfg, "hidden_size"), _n_experts(cfg)
    only, step = cfg.get("mlp_only_layers") or [], _get(cfg, "decoder_sparse_step", default=1)
    shared = cfg.get("shared_expert_intermediate_size") or 0
    layout.packed.update(qkv_proj=("q_proj", "k_proj", "v_proj"))
    if only or (v2 and shared > 0):  # the model classes add gate_up_proj only then
        layout.packed["gate_up_proj"] = ("gate_proj", "up_proj")
    for i in range(_get(cfg, "num_hidden_layers")):
        mlp = f"model.layers.{i}.mlp"
        _qkv(layout, cfg, f"model.layers.{i}")
        if i in only or n <= 0 or (i + 1) % step != 0:
            _mlp(layout, mlp, hidden, _get(cfg, "intermediate_size"))
            continue
        _router(layout, f"{mlp}.gate", n, hidden, quantizable=not v2)  # Qwen3-MoE passes quant_config to its gate
        if shared > 0:
            _router(layout, f"{mlp}.shared_expert_gate", 1, hidden, quantizable=False)
            _mlp(layout, f"{mlp}.shared_expert", hidden, shared)
        layout.experts.append(Experts(f"{mlp}.experts", n, ("gate_proj", "down_proj", "up_proj"), hidden,
                                      _get(cfg, "moe_intermediate_size")))


def _deepseek(cfg: dict, layout: Layout) -> None:
    """DeepSeek-V2/V3 with MLA; MoE where i >= first_k_dense_replace and i % moe_layer_freq == 0."""
    if not (cfg.get("qk_nope_head_dim") or cfg.get("qk_rope_head_dim")):
        raise LayoutError("config.json: DeepSeek without qk_nope_head_dim/qk_rope_head_dim runs vLLM's MHA path, "
                          "which this contract does not model")
    hidden, n = _get(cfg, "hidden_size"), _n_experts(cfg)
    layout.packed.update(gate_up_proj=("gate_proj", "up_proj"))
    if cfg.get("q_lora_rank") is not None:
        layout.packed["fused_qkv_a_proj"] = ("q_a_proj", "kv_a_proj_with_mqa")
    first, freq = _get(cfg, "first_k_dense_replace", default=0), _get(cfg, "moe_layer_freq", default=1)
    # DeepseekV2MoE registers gate.e_score_correction_bias only for getattr(config, "topk_method") == "noaux_tc"
    bias = {"extras": ("e_score_correction_bias",)} if cfg.get("topk_method") == "noaux_tc" else {
        "hint": "; vLLM creates gate.e_score_correction_bias only when config.json sets topk_method 'noaux_tc' "
                "(DeepSeek-V3's own config does; without it vLLM also routes without the bias)"}
    for i in range(_get(cfg, "num_hidden_layers")):
        mlp = f"model.layers.{i}.mlp"
        _mla(layout, cfg, f"model.layers.{i}")
        if i < first or i % freq != 0:
            _mlp(layout, mlp, hidden, _get(cfg, "intermediate_size"))
            continue
        moe_inter = _get(cfg, "moe_intermediate_size")
        _router(layout, f"{mlp}.gate", n, hidden, quantizable=False, **bias)  # GateLinear: quant_config=None
        if cfg.get("n_shared_experts"):
            _mlp(layout, f"{mlp}.shared_experts", hidden, moe_inter * cfg["n_shared_experts"])
        layout.experts.append(Experts(f"{mlp}.experts", n, ("gate_proj", "down_proj", "up_proj"), hidden, moe_inter))


ARCHITECTURES = {
    "LlamaForCausalLM": _llama,
    "MixtralForCausalLM": _mixtral,
    "Qwen2MoeForCausalLM": lambda cfg, layout: _qwen_moe(cfg, layout, v2=True),
    "Qwen3MoeForCausalLM": lambda cfg, layout: _qwen_moe(cfg, layout, v2=False),
    "DeepseekV2ForCausalLM": _deepseek,
    "DeepseekV3ForCausalLM": _deepseek,
}
NO_MAPPER = {"DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"}  # no hf_to_vllm_mapper on these classes


def build_layout(config: dict) -> Layout:
    """The vLLM modules for ``config`` (a config.json dict); ``LayoutError`` names what is missing."""
    archs = config.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise LayoutError(f"config.json: architectures {archs} is not one of {sorted(ARCHITECTURES)}, the models "
                          "whose vLLM 0.26.0 loader this contract encodes; nothing was checked against vLLM")
    arch = archs[0]
    layout = Layout(arch, expands_star=arch not in NO_MAPPER, mla=arch in NO_MAPPER)
    ARCHITECTURES[arch](config, layout)
    _lm_head(layout, config, tied=config.get("tie_word_embeddings") is True)
    return layout
