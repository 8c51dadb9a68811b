"""The LLaMA model: Llama, the embedding, its blocks (`block.Block`) stacked, and the
LM head.

Every block's parameters are stacked along a leading L axis (logical name
'layers'), so a checkpoint is the same whether the layers run under
`jax.lax.scan` (one compiled block) or unrolled.
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from llama_jax import sharding
from llama_jax.config import LlamaConfig
from llama_jax.errors import ConfigError
from llama_jax.nn import attention as attn_lib
from llama_jax.nn.attention import KVCache
from llama_jax.nn.block import LORA_TARGETS, Block
from llama_jax.nn.layers import Dense, DotGeneral, Embed, LoraConfig, RMSNorm
from llama_jax.nn.signatures import Float, Ids, Int, checked

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


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
            raise ConfigError(
                f"remat_policy={remat_policy!r} is unknown; "
                f"expected one of {sorted(REMAT_POLICIES)}"
            )
        if (quantize_head or quantize_embed) and not quantized:
            raise ConfigError("quantize_head and quantize_embed need quantized=True")
        if quantized and dot_general is jax.lax.dot_general:
            raise ConfigError(
                "a quantized model needs a dot_general that applies the kernel scales, "
                "e.g. dot_general=llama_jax.quant.int8_dot_general"
            )
        if lora is not None and set(lora.targets) - set(LORA_TARGETS):
            raise ConfigError(
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

    @checked
    def __call__(
        self,
        tokens_BT: Int[Ids, "B T"],
        *,
        positions_BT: Int[Ids, "B T"] | None = None,
        segment_ids_BT: Int[Ids, "B T"] | None = None,
        cache: KVCache | None = None,
        dropout_keys: jax.Array | None = None,
    ) -> Float[jax.Array, "B T V"] | tuple[Float[jax.Array, "B T V"], KVCache]:
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
        h_BTD, cache, _ = self._forward(
            tokens_BT, positions_BT, segment_ids_BT, cache, dropout_keys, stops=()
        )
        return h_BTD, cache

    def layer_states(
        self,
        tokens_BT: jax.Array,
        layers: Sequence[int],
        *,
        segment_ids_BT: jax.Array | None = None,
        dropout_keys: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """`hidden_states` without a cache, and the outputs of `layers` (the residual
        stream after each, before the final norm) as dtype[M, B, T, D] in that order."""
        for i in layers:
            if not 0 <= i < self.config.num_layers:
                raise ConfigError(
                    f"layer {i} does not exist; the model has {self.config.num_layers}"
                )
        h_BTD, _, kept = self._forward(
            tokens_BT, None, segment_ids_BT, None, dropout_keys, stops=tuple(layers)
        )
        return h_BTD, jnp.stack(kept)

    def _forward(self, tokens_BT, positions_BT, segment_ids_BT, cache, dropout_keys, stops):
        chex.assert_rank(tokens_BT, 2)
        chex.assert_type(tokens_BT, int)
        for other in (segment_ids_BT, positions_BT):
            if other is not None:
                chex.assert_equal_shape([tokens_BT, other])
        b, t = tokens_BT.shape
        if cache is not None and t > cache.max_len:
            raise ConfigError(f"{t} tokens do not fit a KV cache of {cache.max_len} slots")
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
        # The layers run in spans ending after each layer in `stops`, whose outputs are
        # kept: no [L, B, T, D] stack of every layer's output is ever built.
        ends = sorted({i + 1 for i in stops} | {self.config.num_layers})
        kvs, kept, start = [], {}, 0
        for end in ends:
            xs = jax.tree.map(lambda a, s=start, e=end: a[s:e], (params, kv_in, keys_LB))
            if self.scan_layers:
                x_BTD, kv = jax.lax.scan(body, x_BTD, xs)
                kvs.append(kv)
            else:
                for i in range(end - start):
                    x_BTD, kv = body(x_BTD, jax.tree.map(lambda a, i=i: a[i], xs))
                    kvs.append(None if kv is None else jax.tree.map(lambda a: a[None], kv))
            kept[end - 1], start = x_BTD, end
        kv_out = None if cache is None else jax.tree.map(lambda *a: jnp.concatenate(a), *kvs)

        h_BTD = self.final_norm(x_BTD)
        kept = [kept[i] for i in stops]
        if cache is None:
            return h_BTD, None, kept
        # Writing past the last slot would clamp silently and give wrong results; the
        # end is traced, so the overflow cannot raise here and poisons the output.
        overflow = cache.end + t > cache.max_len
        h_BTD = jnp.where(overflow, jnp.nan, h_BTD).astype(h_BTD.dtype)
        k, v = kv_out
        return h_BTD, KVCache(k=k, v=v, segment_ids=kv_segment_BS, end=cache.end + t), kept

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty KVCache of max_len slots (dtype defaults to the compute dtype)."""
        c = self.config
        return KVCache.zeros(
            c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim, dtype or self.dtype
        )


def abstract_params(
    config: LlamaConfig,
    mesh,
    rules=sharding.DEFAULT_RULES,
    *,
    dtype=jnp.float32,
    param_dtype=None,
    **model_kwargs,
) -> tuple[nnx.GraphDef, dict]:
    """The model's graphdef and its parameters as a nested dict of ShapeDtypeStructs
    carrying their target shardings on `mesh`, built without allocating anything.
    dtype: compute dtype; param_dtype: stored dtype (default: dtype); other keyword
    arguments go to `Llama` (a quantized model's dot_general among them)."""
    param_dtype = jnp.dtype(param_dtype or dtype)
    graphdef, state = nnx.split(
        nnx.eval_shape(
            lambda: Llama(
                config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0), **model_kwargs
            )
        )
    )
    return graphdef, sharding.abstract_arrays(state, mesh, rules)
