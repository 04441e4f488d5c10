"""A faster T3 decode loop with the same sampling semantics as the package's ``T3.inference``.

What it changes, and why:

- a static KV cache written in place (no per-step ``torch.cat`` of HF's dynamic cache), and
  attention over the used part of it only;
- no attention or hidden-state outputs, so PyTorch's SDPA kernel runs instead of the eager
  fallback that ``output_attentions=True`` forces;
- CFG, repetition penalty, temperature, min-p, top-p and the multinomial draw all stay on
  the device; the stop token is looked for every ``stop_check_every`` steps, not after each
  token, so the host never waits on the device per token (those are also the moments new
  tokens are handed to a streaming caller);
- it calls T3's own modules (``tfmr.layers``, ``speech_emb``, ``speech_head``...), so every
  transform applied to them (precision, int8, compile) applies here too;
- on CUDA (``cuda_graphs``) the single-token step is captured as a CUDA graph per bucket of
  cache length, so one token costs one graph launch instead of hundreds of kernel launches.
  A graph needs fixed shapes and addresses: the position is a device tensor, new keys and
  values are written with ``index_copy_`` at it, and attention reads the first ``bucket``
  cache positions under a mask of the used ones. That step runs eagerly too (``bucketed``),
  which is how it is checked on a CPU.
- on a CPU (``traced``) the single-token step is recorded once with ``torch.jit.trace`` and
  replayed by TorchScript's interpreter: the same operators without Python's per-operator
  cost, which was over a quarter of an int8 step at full size (docs/benchmarks.md). The step
  reads the position from a device tensor and the used cache length from it through a
  scripted helper, so one recording serves every position.
- with ``reuse_voice_prefix`` the keys and values of the prompt's first positions, which
  depend on the voice alone (speaker embedding, resampled reference speech tokens), are
  kept per T3 and voice, so a prefill runs over the text and what follows only.

The prompt is built exactly as upstream builds it, including its quirk of feeding the
start-of-speech embedding twice (once from ``prepare_input_embeds``, once as "BOS").
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from chatterbox.models.t3 import T3
from chatterbox.models.t3.modules.cond_enc import T3Cond
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .compiling import compile_hot


class StaticKVCache:
    """Keys and values for every layer, preallocated for ``max_len`` positions."""

    def __init__(self, n_layers: int, batch: int, heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (n_layers, batch, heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len


def _rotated_qkv(layer, x: torch.Tensor, cos, sin):
    """A Llama layer's queries, keys and values for ``x`` (B, T, D), as (B, heads, T,
    head_dim), with the rotary embedding applied to queries and keys."""
    attn = layer.self_attn
    batch, steps, _ = x.shape
    h = layer.input_layernorm(x)
    shape = (batch, steps, -1, attn.head_dim)
    projections = attn.q_proj, attn.k_proj, attn.v_proj
    fused = getattr(attn, "qkv_proj", None)  # int8 variants join the three (optimizations)
    if fused is not None:  # one matmul; the separate layers are slices of its output
        qkv = fused(h)
        q, k, v = (qkv[..., p.start:p.end] for p in projections)
    else:
        q, k, v = (projection(h) for projection in projections)
    q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def _layer_output(layer, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """The rest of the layer after attention: output projection, residual, MLP."""
    batch, steps, _ = x.shape
    x = x + layer.self_attn.o_proj(attended.transpose(1, 2).reshape(batch, steps, -1))
    h = layer.post_attention_layernorm(x)
    mlp = layer.mlp
    fused = getattr(mlp, "gate_up_proj", None)  # joined like qkv_proj
    if fused is None:
        return x + mlp(h)
    gate, up = fused(h).chunk(2, dim=-1)
    return x + mlp.down_proj(mlp.act_fn(gate) * up)


def _layer_forward(layer, x: torch.Tensor, cos, sin, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, start: int, causal: bool,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """One Llama decoder layer over ``x`` (B, T, D) placed at positions start..start+T-1.
    ``causal``: whether ``x`` holds several positions (the prefill) rather than one;
    ``mask`` (T, start+T), the causal mask of a prefill that starts past 0."""
    q, k, v = _rotated_qkv(layer, x, cos, sin)
    steps = x.shape[1]
    end = start + steps
    k_cache[:, :, start:end] = k
    v_cache[:, :, start:end] = v
    # A prefill from 0 needs only SDPA's causal flag (its mask is aligned to the top
    # left, right only when queries and keys start together); one from a cached prefix
    # brings its own mask; a single decode step attends to everything before it and needs
    # none. ``causal`` comes from the caller: under torch.compile with dynamic shapes
    # ``steps > 1`` would be symbolic, which SDPA refuses, breaking the compiled graph in
    # two at every layer.
    out = F.scaled_dot_product_attention(q, k_cache[:, :, :end], v_cache[:, :, :end],
                                         attn_mask=mask, is_causal=causal and mask is None,
                                         scale=layer.self_attn.scaling)
    return _layer_output(layer, x, out)


@torch.jit.script
def _up_to(cache: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Cache positions 0..pos of a (B, heads, L, head_dim) cache. Scripted, so that a
    traced step computes the length from ``pos`` on each call instead of keeping the one
    it was recorded at."""
    return cache[:, :, : int(pos[0]) + 1]


def _layer_forward_at(layer, x: torch.Tensor, cos, sin, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, pos: torch.Tensor,
                      mask: torch.Tensor | None) -> torch.Tensor:
    """One decoder layer for one token at the device-tensor position ``pos`` (shape (1,)).
    With ``mask`` (1, 1, 1, bucket) it attends to the first ``bucket`` cache positions
    under the mask, so that shapes and addresses do not depend on the position (a CUDA
    graph); without, to positions 0..pos, as :func:`_layer_forward` does (a traced step).
    Either way nothing in it depends on the position as a Python number."""
    q, k, v = _rotated_qkv(layer, x, cos, sin)
    k_cache.index_copy_(2, pos, k)
    v_cache.index_copy_(2, pos, v)
    if mask is None:
        keys, values = _up_to(k_cache, pos), _up_to(v_cache, pos)
    else:
        keys, values = k_cache[:, :, :mask.shape[-1]], v_cache[:, :, :mask.shape[-1]]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                         scale=layer.self_attn.scaling)
    return _layer_output(layer, x, out)


_COMPILED_STEPS: dict[tuple[str, str], object] = {}
# Per T3 module: its CUDA-graph steps (with their caches) and its traced steps, dropped
# with the module. Neither holds the module itself, or it would never be dropped.
_GRAPH_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TRACED_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Per T3 module: (prefix embeddings, keys, values) of the voices' own prompt positions
# (``reuse_voice_prefix``), the most recently used last; 8 MB each at full size in fp32.
_VOICE_PREFIXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
VOICE_PREFIXES_KEPT = 8


def layer_step(compile_mode: str, at_position: bool = False):
    """The per-layer step (``at_position``: the single-token one of :meth:`forward_at`),
    compiled once per process and mode when asked: this is the fast decoder's hot path,
    so it is what ``torch.compile`` targets. Under CUDA graphs the compiled step is what
    gets captured: the graph removes the launch gaps, compiling removes launches (a bf16
    step was about 1,200 small kernels, mostly elementwise ones Inductor fuses)."""
    function = _layer_forward_at if at_position else _layer_forward
    if compile_mode == "off":
        return function
    key = (function.__name__, compile_mode)
    if key not in _COMPILED_STEPS:
        _COMPILED_STEPS[key] = compile_hot(function, compile_mode)
    return _COMPILED_STEPS[key]


STEP_MODES = ("plain", "bucketed", "cuda-graph", "traced")
BUCKET = 64  # cache positions per CUDA graph: attention reads at most 63 unused ones


class FastT3Decoder:
    """Decode speech tokens from a T3 with a static cache and on-device sampling.

    ``step_mode``: ``plain`` slices the cache to the used length (any device); ``bucketed``
    is the CUDA-graph-ready step run eagerly; ``cuda-graph`` captures it (CUDA only);
    ``traced`` replays :meth:`forward_at` without a bucket, recorded by ``torch.jit.trace``
    (meant for CPUs, where Python's cost per operator is a large part of a step).
    """

    def __init__(self, t3: T3, stop_check_every: int = 16, step_mode: str = "plain",
                 reuse_voice_prefix: bool = False):
        if step_mode not in STEP_MODES:
            raise ValueError(f"step_mode must be one of {', '.join(STEP_MODES)}")
        self.t3 = t3
        self.stop_check_every = stop_check_every
        self.step_mode = step_mode
        self.reuse_voice_prefix = reuse_voice_prefix

    @property
    def dtype(self) -> torch.dtype:
        # Embeddings are never quantized, so they carry the compute precision.
        return self.t3.speech_emb.weight.dtype

    def forward(self, embeds: torch.Tensor, cache: StaticKVCache, start: int) -> torch.Tensor:
        """Run the transformer over ``embeds`` at ``start``; returns speech logits of the
        last position, (B, vocab)."""
        x = self._layers(embeds, cache, start)
        return self.t3.speech_head(self.t3.tfmr.norm(x[:, -1:]))[:, -1].float()

    def _layers(self, embeds: torch.Tensor, cache: StaticKVCache, start: int,
                compiled: bool = True) -> torch.Tensor:
        """The decoder layers over ``embeds`` at ``start``, filling ``cache`` there;
        ``compiled=False`` runs them eagerly even under torch.compile."""
        tfmr = self.t3.tfmr
        steps = embeds.shape[1]
        positions = torch.arange(start, start + steps, device=embeds.device).unsqueeze(0)
        cos, sin = tfmr.rotary_emb(embeds, positions)
        mask = None
        if start and steps > 1:
            mask = torch.ones(steps, start + steps, dtype=torch.bool,
                              device=embeds.device).tril(start)
        step = layer_step(getattr(self.t3, "compile_mode", "off") if compiled else "off")
        x = embeds
        for i, layer in enumerate(tfmr.layers):
            x = step(layer, x, cos, sin, cache.k[i], cache.v[i], start, steps > 1, mask)
        return x

    def _prefill(self, embeds: torch.Tensor, voice_positions: int,
                 cache: StaticKVCache) -> torch.Tensor:
        """The prompt through the layers into ``cache``; returns the last position's
        logits. With ``reuse_voice_prefix``, the first ``voice_positions`` (those that
        depend on the voice alone, the same in both CFG rows) come from a copy kept per T3
        and voice, so only the text and what follows run."""
        if not (self.reuse_voice_prefix and voice_positions):
            return self.forward(embeds, cache, 0)
        keys, values = self._voice_prefix(embeds[:1, :voice_positions])
        cache.k[:, :, :, :voice_positions] = keys
        cache.v[:, :, :, :voice_positions] = values
        return self.forward(embeds[:, voice_positions:], cache, voice_positions)

    def _voice_prefix(self, prefix: torch.Tensor):
        """The keys and values of ``prefix`` (1, n, D), computed once per T3 and content:
        a kept one is used only for an identical prefix."""
        kept = _VOICE_PREFIXES.setdefault(self.t3, [])
        for i, (embeds, keys, values) in enumerate(kept):
            if torch.equal(embeds, prefix):  # False for another shape too
                # By position: list.remove would compare the tuples' tensors with ==.
                kept.append(kept.pop(i))  # the most recently used last
                return keys, values
        # Eagerly, once per voice: compiled, its batch of one would be one more graph.
        cache = self._new_cache(1, prefix.shape[1])
        self._layers(prefix, cache, 0, compiled=False)
        kept.append((prefix.clone(), cache.k, cache.v))
        del kept[:-VOICE_PREFIXES_KEPT]
        return cache.k, cache.v

    def forward_at(self, embed: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   pos: torch.Tensor, bucket: int | None = None) -> torch.Tensor:
        """One token (B, 1, D) at device position ``pos`` (shape (1,)), with the caches of
        all layers (``StaticKVCache.k`` and ``.v``); returns (B, vocab) logits. With a
        ``bucket`` it attends to the first ``bucket`` cache positions under a mask of the
        used ones (graph-capturable); without, to the used ones only (traceable once for
        every position). Both compute what :meth:`forward` does for the same token."""
        tfmr = self.t3.tfmr
        cos, sin = tfmr.rotary_emb(embed, pos.view(1, 1))
        mask = None
        if bucket is not None:
            mask = (torch.arange(bucket, device=embed.device) <= pos).view(1, 1, 1, bucket)
        step = layer_step(getattr(self.t3, "compile_mode", "off"), at_position=True)
        x = embed
        for i, layer in enumerate(tfmr.layers):
            x = step(layer, x, cos, sin, k_cache[i], v_cache[i], pos, mask)
        return self.t3.speech_head(tfmr.norm(x))[:, -1].float()

    def traced_step(self, batch: int):
        """:meth:`forward_at` (no bucket) recorded once per T3, batch and precision (about two
        seconds at full size; the manager records it when it builds a variant)."""
        steps = _TRACED_STEPS.setdefault(self.t3, {})
        key = (batch, self.dtype)
        if key not in steps:
            t3 = self.t3
            # Recorded on small tensors of its own: the decode loop's are inference tensors,
            # which tracing cannot record in-place writes to.
            with torch.inference_mode(False), torch.no_grad():
                cache = self._new_cache(batch, 2)
                embed = torch.zeros(batch, 1, t3.cfg.hidden_size, dtype=self.dtype,
                                    device=t3.device)
                pos = torch.ones(1, dtype=torch.long, device=t3.device)
                steps[key] = torch.jit.trace(_TokenStep(t3), (embed, cache.k, cache.v, pos),
                                             check_trace=False)
        return steps[key]

    def _new_cache(self, batch: int, length: int) -> StaticKVCache:
        t3 = self.t3
        return StaticKVCache(len(t3.tfmr.layers), batch, t3.cfg.num_attention_heads, length,
                             t3.tfmr.layers[0].self_attn.head_dim, self.dtype, t3.device)

    def _cache_and_step(self, batch: int, length: int):
        """A cache for ``length`` positions and ``step(embed, position) -> logits`` for the
        decode loop, per ``step_mode``."""
        if self.step_mode == "plain":
            cache = self._new_cache(batch, length)
            return cache, lambda embed, position: self.forward(embed, cache, position)
        if self.step_mode == "traced":
            cache, traced = self._new_cache(batch, length), self.traced_step(batch)
            return cache, lambda embed, position: traced(
                embed, cache.k, cache.v, torch.tensor([position], device=embed.device))
        if self.step_mode == "bucketed":
            cache = self._new_cache(batch, length)

            def step(embed, position):
                pos = torch.tensor([position], device=embed.device)
                return self.forward_at(embed, cache.k, cache.v, pos,
                                       bucket_for(position, cache.max_len))
            return cache, step
        # Graphs hold the cache's addresses, so the cache and its graphs live as long as
        # this T3 and serve every later call that fits: stale entries past the current
        # position are masked out, and the prefill overwrites the start.
        steps = _GRAPH_STEPS.setdefault(self.t3, {})
        rounded = -(-length // 256) * 256
        key = (batch, self.dtype)
        if key not in steps or steps[key].cache.max_len < length:
            steps[key] = CudaGraphStep(self._new_cache(batch, rounded), batch,
                                       self.t3.cfg.hidden_size)
        graph_step = steps[key]
        return graph_step.cache, lambda embed, position: graph_step(self, embed, position)

    def generate(self, **sampling) -> torch.Tensor:
        """Same arguments and result as ``T3.inference``: (1, n) sampled tokens, ending
        with the stop token when one was drawn. ``text_tokens`` is the (2, L) CFG batch.
        Two differences for direct callers (the pipeline passes every setting and never
        ``stop_on_eos``): the defaults are ``ChatterboxTTS.generate``'s (``top_p`` 1.0,
        where ``T3.inference`` has 0.95), and ``stop_on_eos=False`` does decode past the
        stop token, where ``T3.inference`` ignores it and always stops."""
        return torch.cat(list(self.token_blocks(**sampling)), dim=1)

    @torch.inference_mode()
    def token_blocks(self, *, t3_cond: T3Cond, text_tokens: torch.Tensor,
                     max_new_tokens: int, temperature: float = 0.8, cfg_weight: float = 0.5,
                     repetition_penalty: float = 1.2, min_p: float = 0.05, top_p: float = 1.0,
                     stop_on_eos: bool = True, allow_stop: bool = True):
        """:meth:`generate` as it happens: yields (1, k) tensors of new tokens every
        ``stop_check_every`` steps (when the host looks at them anyway), the last one
        ending with the stop token when one was drawn. Streaming renders audio from them
        while decoding goes on. ``allow_stop=False`` masks the stop token's logit, as the
        pipeline's ``suppress_stop_token`` does for the stock decoder, so that exactly
        ``max_new_tokens`` are drawn (benchmarks)."""
        t3, hp = self.t3, self.t3.hp
        device = t3.device
        text_tokens = torch.atleast_2d(text_tokens).to(dtype=torch.long, device=device)
        start_token = hp.start_speech_token * torch.ones_like(text_tokens[:, :1])
        embeds, cond_length = t3.prepare_input_embeds(
            t3_cond=t3_cond, text_tokens=text_tokens, speech_tokens=start_token,
            cfg_weight=cfg_weight)
        # The conditioning's positions before the emotion one depend on the voice alone
        # (speaker embedding, resampled prompt speech tokens), when one voice is expanded
        # to both CFG rows.
        voice_positions = cond_length - int(bool(t3.hp.emotion_adv))
        if t3_cond.speaker_emb.shape[0] != 1:
            voice_positions = 0
        bos = t3.speech_emb(start_token[:1]) + t3.speech_pos_emb.get_fixed_embedding(0)
        embeds = torch.cat([embeds, bos.expand(embeds.shape[0], -1, -1)], dim=1)
        embeds = embeds.to(self.dtype)

        batch, prefix = embeds.shape[:2]
        cache, step_fn = self._cache_and_step(batch, prefix + max_new_tokens)
        logits = self._prefill(embeds, voice_positions, cache)

        # Tokens seen so far (BOS included, as upstream's repetition penalty sees it).
        seen = torch.zeros(1, logits.shape[-1], dtype=torch.bool, device=device)
        seen[0, hp.start_speech_token] = True
        tokens = torch.empty(max_new_tokens, dtype=torch.long, device=device)
        pos_emb = t3.speech_pos_emb.emb.weight  # row i is get_fixed_embedding(i)
        cfg = torch.tensor(cfg_weight, device=device)
        emitted = 0
        for step in range(max_new_tokens):
            if not allow_stop:  # finite, as in suppress_stop_token: CFG subtracts the rows
                logits[:, hp.stop_speech_token] = -1e4
            next_token = sample_token(logits, seen, cfg, temperature, repetition_penalty,
                                      min_p, top_p)
            tokens[step] = next_token[0, 0]
            seen.scatter_(1, next_token, True)
            done = step + 1 == max_new_tokens
            if done or (step + 1) % self.stop_check_every == 0:
                block = tokens[emitted: step + 1].clone()
                emitted = step + 1
                if stop_on_eos:
                    hits = (block == hp.stop_speech_token).nonzero()
                    if hits.numel():
                        yield block[: int(hits[0, 0]) + 1].unsqueeze(0)
                        return
                yield block.unsqueeze(0)
            if done:
                break
            embed = t3.speech_emb(next_token) + pos_emb[step + 1]
            # Contiguous, like the prefill's: a compiled step would otherwise specialize on
            # the expanded view's zero stride and compile a second time.
            embed = embed.expand(batch, -1, -1).to(self.dtype).contiguous()
            logits = step_fn(embed, prefix + step)


class _TokenStep(torch.nn.Module):
    """:meth:`FastT3Decoder.forward_at` as a module for ``torch.jit.trace``: the T3
    becomes a submodule, so its weights are recorded as the traced module's own
    parameters (shared, not copied) rather than as constants."""

    def __init__(self, t3: T3):
        super().__init__()
        self.t3 = t3

    def forward(self, embed, k_cache, v_cache, pos):
        return FastT3Decoder(self.t3).forward_at(embed, k_cache, v_cache, pos)


def bucket_for(position: int, max_len: int) -> int:
    """The cache length a step at ``position`` attends over: the next multiple of BUCKET
    that covers it, capped at the cache size."""
    return min(max_len, (position // BUCKET + 1) * BUCKET)


class CudaGraphStep:
    """The single-token step as CUDA graphs, one per cache bucket, captured on first use.

    Inputs are copied into static buffers and the logits read from a static output, as a
    graph replays fixed addresses. Sampling stays outside the graph (it draws from the
    generator, and costs a few kernels)."""

    def __init__(self, cache: StaticKVCache, batch: int, hidden_size: int):
        device = cache.k.device
        self.cache = cache
        self.embed = torch.zeros(batch, 1, hidden_size, dtype=cache.k.dtype, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def __call__(self, decoder: FastT3Decoder, embed: torch.Tensor,
                 position: int) -> torch.Tensor:
        # The decoder is an argument, not an attribute: this object lives in _GRAPH_STEPS
        # under the T3, and holding the decoder (and so the T3) would keep it alive forever.
        self.embed.copy_(embed)
        self.pos.fill_(position)
        bucket = bucket_for(position, self.cache.max_len)
        if bucket not in self.graphs:
            self.graphs[bucket] = self._capture(decoder, bucket)
        graph, logits = self.graphs[bucket]
        graph.replay()
        return logits

    def _capture(self, decoder: FastT3Decoder, bucket: int):
        def run():
            return decoder.forward_at(self.embed, self.cache.k, self.cache.v, self.pos, bucket)

        # Warm up on a side stream (lazy kernel setup must not land in the graph). Re-running
        # the step at the same position rewrites the same cache entries, so this is harmless.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = run()
        self.pool = graph.pool()
        return graph, logits


def sample_token(logits: torch.Tensor, seen: torch.Tensor, cfg: torch.Tensor,
                 temperature: float, repetition_penalty: float, min_p: float,
                 top_p: float) -> torch.Tensor:
    """One draw with upstream's processors, in upstream's order, without leaving the device.

    ``logits`` is the (2, V) CFG batch (row 0 conditional) or (1, V) without CFG.
    """
    cond = logits[0:1]
    if logits.shape[0] > 1:
        cond = cond + cfg * (cond - logits[1:2])
    # Repetition penalty on every token seen (HF's gather/scatter, as a mask).
    penalised = torch.where(cond < 0, cond * repetition_penalty, cond / repetition_penalty)
    scores = torch.where(seen, penalised, cond)
    if temperature != 1.0:
        scores = scores / temperature
    if min_p > 0.0:
        probs = scores.softmax(dim=-1)
        threshold = min_p * probs.amax(dim=-1, keepdim=True)
        scores = scores.masked_fill(probs < threshold, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        remove_sorted = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(1, order, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return torch.multinomial(scores.softmax(dim=-1), num_samples=1)
