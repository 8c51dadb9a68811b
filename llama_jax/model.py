"""The LLaMA model: Attention, MLP, Block, and Llama with its layers stacked.

Every block's parameters are stacked along a leading L axis (logical name
'layers'), so a checkpoint is the same whether the layers run under
`jax.lax.scan` (one compiled block) or unrolled.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from llama_jax import attention as attn_lib
from llama_jax import sharding
from llama_jax.attention import KVCache
from llama_jax.config import LlamaConfig
from llama_jax.layers import (
    Dense,
    DotGeneral,
    Embed,
    LoraConfig,
    RMSNorm,
    apply_rope,
    fold_keys,
    rope_inv_freq,
)

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

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


def segment_positions(segment_ids_BT: jax.Array) -> jax.Array:
    """int32[B, T] positions that restart at 0 wherever the segment id changes."""
    t = segment_ids_BT.shape[1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids_BT.shape)
    starts = jnp.concatenate(
        [
            jnp.ones_like(segment_ids_BT[:, :1], dtype=bool),
            segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1],
        ],
        axis=1,
    )
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - start_idx


class Llama(nnx.Module):
    """LLaMA decoder. `model(tokens_BT)` returns logits dtype[B, T, V].

    dtype is the compute dtype, param_dtype the stored one. scan_layers runs the stacked
    blocks under `lax.scan` (compiles one block); False unrolls them. remat_policy is one
    of REMAT_POLICIES. attention_impl is one of attention.IMPLEMENTATIONS. quantized
    stores the block projections as int8 with per-output-channel scales (see quant.py;
    pass dot_general=quant.int8_dot_general); quantize_head and quantize_embed do the
    same to the untied LM head and to the embedding table (also the tied head). lora
    adds low-rank adapters to the block projections it targets (LORA_TARGETS paths;
    see lora.py); the base parameters keep their paths.
    """

    def __init__(
        self,
        config: LlamaConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        scan_layers: bool = True,
        remat_policy: str = "none",
        attention_impl: str = "auto",
        dot_general: DotGeneral = jax.lax.dot_general,
        quantized: bool = False,
        quantize_head: bool = False,
        quantize_embed: bool = False,
        lora: LoraConfig | None = None,
        rngs: nnx.Rngs,
    ):
        if remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"remat_policy={remat_policy!r} is unknown; "
                f"expected one of {sorted(REMAT_POLICIES)}"
            )
        if (quantize_head or quantize_embed) and not quantized:
            raise ValueError("quantize_head and quantize_embed need quantized=True")
        if quantized and dot_general is jax.lax.dot_general:
            raise ValueError(
                "a quantized model needs a dot_general that applies the kernel scales, "
                "e.g. dot_general=llama_jax.quant.int8_dot_general"
            )
        if lora is not None and set(lora.targets) - set(LORA_TARGETS):
            raise ValueError(
                f"LoRA targets {sorted(set(lora.targets) - set(LORA_TARGETS))} are not block "
                f"projections; expected some of {list(LORA_TARGETS)}"
            )
        # Checked here, resolved when traced ('auto' depends on the mesh's platform).
        attn_lib.check_implementation(attention_impl)
        impl = attention_impl
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.scan_layers = scan_layers
        self.remat_policy = remat_policy
        self.embed = Embed(
            config.vocab_size,
            config.embed_dim,
            dtype=dtype,
            param_dtype=param_dtype,
            init_std=config.initializer_range,
            rngs=rngs,
            quantized=quantize_embed,
        )

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return Block(
                config,
                dtype=dtype,
                param_dtype=param_dtype,
                impl=impl,
                dot_general=dot_general,
                rngs=rngs,
                quantized=quantized,
                lora=lora,
            )

        self.layers = make_blocks(rngs)
        self.final_norm = RMSNorm(
            config.embed_dim, eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype
        )
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Dense(
                (config.embed_dim,),
                (config.vocab_size,),
                in_names=("embed",),
                out_names=("vocab",),
                dtype=dtype,
                param_dtype=param_dtype,
                init_std=config.initializer_range,
                rngs=rngs,
                dot_general=dot_general if quantize_head else jax.lax.dot_general,
                quantized=quantize_head,
            )

    def __call__(
        self,
        tokens_BT: jax.Array,
        *,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        cache: KVCache | None = None,
        dropout_keys: jax.Array | None = None,
    ):
        """tokens: int[B, T] -> logits dtype[B, T, V], or (logits, cache) when a cache is
        given. See `hidden_states` for the other arguments."""
        h_BTD, cache = self.hidden_states(
            tokens_BT,
            positions_BT=positions_BT,
            segment_ids_BT=segment_ids_BT,
            cache=cache,
            dropout_keys=dropout_keys,
        )
        logits = self.unembed(h_BTD)
        return logits if cache is None else (logits, cache)

    def unembed(self, h_BTD: jax.Array, out_dtype=None) -> jax.Array:
        """Final hidden states dtype[B, T, D] -> logits out_dtype (default dtype)[B, T, V].
        Losses pass float32 so bf16 compute never rounds the logits."""
        if self.lm_head is None:
            return self.embed.attend(h_BTD, out_dtype)
        return self.lm_head(h_BTD, out_dtype)

    def hidden_states(
        self,
        tokens_BT: jax.Array,
        *,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        cache: KVCache | None = None,
        dropout_keys: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final-norm hidden states dtype[B, T, D] and the updated cache.

        segment_ids: int[B, T] document ids of a packed batch, 0 for padding; attention
          never crosses documents. Default: all ones.
        positions: int[B, T] rotary positions. Default: restart at 0 in each segment,
          or continue from `cache.end` when decoding.
        cache: a KVCache; this call's tokens are written at slots [end, end + T). A
          call that would write past the last slot returns NaN hidden states.
        dropout_keys: PRNG keys[B], one per row, for the LoRA adapters' dropout (each
          layer and projection folds in its own index); None (inference) applies none.
        """
        chex.assert_rank(tokens_BT, 2)
        chex.assert_type(tokens_BT, int)
        for other in (segment_ids_BT, positions_BT):
            if other is not None:
                chex.assert_equal_shape([tokens_BT, other])
        b, t = tokens_BT.shape
        if cache is not None and t > cache.max_len:
            raise ValueError(f"{t} tokens do not fit a KV cache of {cache.max_len} slots")
        packed = segment_ids_BT is not None
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones((b, t), jnp.int32)
        if positions_BT is None:
            if cache is None:
                positions_BT = segment_positions(segment_ids_BT)
            else:
                positions_BT = jnp.broadcast_to(cache.end + jnp.arange(t, dtype=jnp.int32), (b, t))
        x_BTD = sharding.constrain(self.embed(tokens_BT), ("batch", "length", "embed"))

        graphdef, params = nnx.split(self.layers)
        kv_segment_BS = None
        if cache is not None:
            kv_segment_BS = jax.lax.dynamic_update_slice(
                cache.segment_ids, segment_ids_BT.astype(jnp.int32), (0, cache.end)
            )

        def body(x, xs):
            layer_params, kv, keys_B = xs
            block = nnx.merge(graphdef, layer_params)
            kv_in = None if kv is None else (*kv, kv_segment_BS, cache.end, cache.empty)
            return block(x, positions_BT, segment_ids_BT, packed, kv_in, dropout_keys=keys_B)

        policy = REMAT_POLICIES[self.remat_policy]
        if policy is not None:
            body = jax.checkpoint(body, policy=policy, prevent_cse=not self.scan_layers)

        kv_in = None if cache is None else (cache.k, cache.v)
        keys_LB = None
        if dropout_keys is not None:
            n = self.config.num_layers
            keys_LB = jax.vmap(lambda k: jax.random.split(k, n), out_axes=1)(dropout_keys)
        if self.scan_layers:
            x_BTD, kv_out = jax.lax.scan(body, x_BTD, (params, kv_in, keys_LB))
        else:
            outs = []
            for i in range(self.config.num_layers):
                xs = jax.tree.map(lambda a, i=i: a[i], (params, kv_in, keys_LB))
                x_BTD, kv = body(x_BTD, xs)
                outs.append(kv)
            kv_out = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)

        h_BTD = self.final_norm(x_BTD)
        if cache is None:
            return h_BTD, None
        # Writing past the last slot would clamp silently and give wrong results; the
        # end is traced, so the overflow cannot raise here and poisons the output.
        overflow = cache.end + t > cache.max_len
        h_BTD = jnp.where(overflow, jnp.nan, h_BTD).astype(h_BTD.dtype)
        k, v = kv_out
        return h_BTD, KVCache(k=k, v=v, segment_ids=kv_segment_BS, end=cache.end + t)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty KVCache of max_len slots (dtype defaults to the compute dtype)."""
        c = self.config
        return KVCache.zeros(
            c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim, dtype or self.dtype
        )
