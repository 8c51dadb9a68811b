"""The transformer block: grouped-query Attention with rotary embeddings, the gated
MLP, and Block (pre-norm residual around both). Parameters are named by logical axes;
`model.Llama` stacks the blocks along a leading L axis.
"""

from __future__ import annotations

import jax
from flax import nnx

from llama_jax import sharding
from llama_jax.config import LlamaConfig
from llama_jax.nn import attention as attn_lib
from llama_jax.nn.layers import Dense, LoraConfig, RMSNorm, apply_rope, fold_keys, rope_inv_freq

# Module paths of the block projections: what LoRA adapters may target.
LORA_TARGETS = (
    "layers.attn.q_proj",
    "layers.attn.k_proj",
    "layers.attn.v_proj",
    "layers.attn.o_proj",
    "layers.mlp.gate_proj",
    "layers.mlp.up_proj",
    "layers.mlp.down_proj",
)


def _dense_args(config, use_bias, dtype, param_dtype, dot_general, rngs, quantized=False):
    return dict(
        dtype=dtype,
        param_dtype=param_dtype,
        init_std=config.initializer_range,
        use_bias=use_bias,
        dot_general=dot_general,
        rngs=rngs,
        quantized=quantized,
    )


def _lora_at(lora: LoraConfig | None, path: str) -> LoraConfig | None:
    return None if lora is None else lora.at(path)


class Attention(nnx.Module):
    def __init__(
        self,
        config: LlamaConfig,
        *,
        dtype,
        param_dtype,
        impl,
        dot_general,
        rngs,
        quantized,
        lora: LoraConfig | None = None,
    ):
        d, n, k, h = config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim
        common = _dense_args(
            config, config.attention_bias, dtype, param_dtype, dot_general, rngs, quantized
        )
        self.q_proj = Dense(
            (d,),
            (n, h),
            in_names=("embed",),
            out_names=("heads", "head_dim"),
            lora=_lora_at(lora, "layers.attn.q_proj"),
            **common,
        )
        self.k_proj = Dense(
            (d,),
            (k, h),
            in_names=("embed",),
            out_names=("kv_heads", "head_dim"),
            lora=_lora_at(lora, "layers.attn.k_proj"),
            **common,
        )
        self.v_proj = Dense(
            (d,),
            (k, h),
            in_names=("embed",),
            out_names=("kv_heads", "head_dim"),
            lora=_lora_at(lora, "layers.attn.v_proj"),
            **common,
        )
        self.o_proj = Dense(
            (n, h),
            (d,),
            in_names=("heads", "head_dim"),
            out_names=("embed",),
            lora=_lora_at(lora, "layers.attn.o_proj"),
            **common,
        )
        # A tuple keeps this static (hashable) in the module's graph definition.
        self.inv_freq = tuple(rope_inv_freq(config).tolist())
        self.impl = impl

    def __call__(
        self, x_BTD, positions_BT, segment_ids_BT, packed, kv_cache=None, dropout_keys=None
    ):
        """x: dtype[B, T, D] -> (dtype[B, T, D], updated (k, v) cache or None).

        kv_cache: (k[B, S, K, H], v[B, S, K, H], segment_ids[B, S] already holding this
        call's ids, end[] the slot of x's first token, empty: static, nothing written
        before this call). dropout_keys: keys[B] for the LoRA dropout, or None.
        """
        q_BTNH = self.q_proj(x_BTD, dropout_keys=fold_keys(dropout_keys, 0))
        k_BTKH = self.k_proj(x_BTD, dropout_keys=fold_keys(dropout_keys, 1))
        q_BTNH = apply_rope(q_BTNH, positions_BT, self.inv_freq)
        k_BTKH = apply_rope(k_BTKH, positions_BT, self.inv_freq)
        v_BTKH = self.v_proj(x_BTD, dropout_keys=fold_keys(dropout_keys, 2))
        q_BTNH = sharding.constrain(q_BTNH, ("batch", "length", "heads", "head_dim"))
        k_BTKH = sharding.constrain(k_BTKH, ("batch", "length", "kv_heads", "head_dim"))
        v_BTKH = sharding.constrain(v_BTKH, ("batch", "length", "kv_heads", "head_dim"))
        if kv_cache is None:
            out = attn_lib.attend(
                q_BTNH,
                k_BTKH,
                v_BTKH,
                q_segment_BT=segment_ids_BT,
                kv_segment_BS=segment_ids_BT,
                packed=packed,
                impl=self.impl,
            )
            return self.o_proj(out, dropout_keys=fold_keys(dropout_keys, 3)), None
        k_BSKH, v_BSKH, kv_segment_BS, end, empty = kv_cache
        start = (0, end, 0, 0)
        k_BSKH = jax.lax.dynamic_update_slice(k_BSKH, k_BTKH.astype(k_BSKH.dtype), start)
        v_BSKH = jax.lax.dynamic_update_slice(v_BSKH, v_BTKH.astype(v_BSKH.dtype), start)
        if empty:
            # Prefill: the cache held nothing, so this call's keys are all there is to
            # see; attending over them alone lets the fast kernels serve the prompt.
            out = attn_lib.attend(
                q_BTNH,
                k_BTKH.astype(k_BSKH.dtype).astype(q_BTNH.dtype),
                v_BTKH.astype(v_BSKH.dtype).astype(q_BTNH.dtype),
                q_segment_BT=segment_ids_BT,
                kv_segment_BS=segment_ids_BT,
                packed=packed,
                impl=self.impl,
            )
            return self.o_proj(out, dropout_keys=fold_keys(dropout_keys, 3)), (k_BSKH, v_BSKH)
        out = attn_lib.attend(
            q_BTNH,
            k_BSKH.astype(q_BTNH.dtype),
            v_BSKH.astype(q_BTNH.dtype),
            q_segment_BT=segment_ids_BT,
            kv_segment_BS=kv_segment_BS,
            q_offset=end,
            impl=self.impl,
        )
        return self.o_proj(out, dropout_keys=fold_keys(dropout_keys, 3)), (k_BSKH, v_BSKH)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(
        self,
        config: LlamaConfig,
        *,
        dtype,
        param_dtype,
        dot_general,
        rngs,
        quantized,
        lora: LoraConfig | None = None,
    ):
        d, f = config.embed_dim, config.mlp_dim
        common = _dense_args(
            config, config.mlp_bias, dtype, param_dtype, dot_general, rngs, quantized
        )
        self.gate_proj = Dense(
            (d,),
            (f,),
            in_names=("embed",),
            out_names=("mlp",),
            lora=_lora_at(lora, "layers.mlp.gate_proj"),
            **common,
        )
        self.up_proj = Dense(
            (d,),
            (f,),
            in_names=("embed",),
            out_names=("mlp",),
            lora=_lora_at(lora, "layers.mlp.up_proj"),
            **common,
        )
        self.down_proj = Dense(
            (f,),
            (d,),
            in_names=("mlp",),
            out_names=("embed",),
            lora=_lora_at(lora, "layers.mlp.down_proj"),
            **common,
        )

    def __call__(self, x_BTD, dropout_keys=None):
        gate_BTF = self.gate_proj(x_BTD, dropout_keys=fold_keys(dropout_keys, 0))
        up_BTF = self.up_proj(x_BTD, dropout_keys=fold_keys(dropout_keys, 1))
        h_BTF = sharding.constrain(jax.nn.silu(gate_BTF) * up_BTF, ("batch", "length", "mlp"))
        return self.down_proj(h_BTF, dropout_keys=fold_keys(dropout_keys, 2))


class Block(nnx.Module):
    def __init__(
        self,
        config: LlamaConfig,
        *,
        dtype,
        param_dtype,
        impl,
        dot_general,
        rngs,
        quantized,
        lora: LoraConfig | None = None,
    ):
        norm = dict(eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.attn_norm = RMSNorm(config.embed_dim, **norm)
        self.attn = Attention(
            config,
            dtype=dtype,
            param_dtype=param_dtype,
            impl=impl,
            dot_general=dot_general,
            rngs=rngs,
            quantized=quantized,
            lora=lora,
        )
        self.mlp_norm = RMSNorm(config.embed_dim, **norm)
        self.mlp = MLP(
            config,
            dtype=dtype,
            param_dtype=param_dtype,
            dot_general=dot_general,
            rngs=rngs,
            quantized=quantized,
            lora=lora,
        )

    def __call__(
        self, x_BTD, positions_BT, segment_ids_BT, packed, kv_cache=None, dropout_keys=None
    ):
        attn_out, kv = self.attn(
            self.attn_norm(x_BTD),
            positions_BT,
            segment_ids_BT,
            packed,
            kv_cache,
            dropout_keys=fold_keys(dropout_keys, 0),
        )
        x_BTD = x_BTD + attn_out
        x_BTD = x_BTD + self.mlp(self.mlp_norm(x_BTD), dropout_keys=fold_keys(dropout_keys, 1))
        return sharding.constrain(x_BTD, ("batch", "length", "embed")), kv
