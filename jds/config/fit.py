"""Does a placement fit this model and this machine? Every refusal names the config key.

Checks: device ids exist; ``tp`` divides the query heads, KV heads and MLP width (each device
holds whole heads); ``pp`` fits the layer count; decode sequence lengths fit the model; and the
weights plus KV cache of every instance fit device memory. On CPU all virtual devices share the
host's memory, so the sum over all of them is what must fit.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from jds.config import ConfigError
from jds.config.placement import ColocatedInstance, DecodeInstance, Placement, PrefillBatching, PrefillInstance
from jds.config.stages import stage_spans
from jds.model.architecture import Architecture
from jds.scheduling.policy import PENDING_BATCHES

HOST_MEMORY_FRACTION = 0.8  # leave room for the runtime, compiled programs and activations
# Of an accelerator's memory, what a process serving on it lets JAX take (JAX's own default is
# 75%): vLLM's gpu_memory_utilization default, the rest left to the CUDA runtime and cuDNN.
DEVICE_MEMORY_FRACTION = "0.9"


def claim_device_memory() -> None:
    """Let JAX take ``DEVICE_MEMORY_FRACTION`` of each accelerator, unless
    ``XLA_PYTHON_CLIENT_MEM_FRACTION`` says otherwise: a serving process owns its accelerators,
    and the fit check reads JAX's limit. Takes effect only before JAX starts its backends; no
    effect on a CPU."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", DEVICE_MEMORY_FRACTION)


@dataclasses.dataclass(frozen=True)
class MemoryNeed:
    where: str
    weights: int  # bytes per device
    kv: int  # bytes per device
    devices: tuple[int, ...]
    transient: int = 0  # bytes per device of the largest buffers a program call holds beside them

    @property
    def per_device(self) -> int:
        return self.weights + self.kv + self.transient


def weight_bytes(arch: Architecture, itemsize: int, layers: int, tp: int, embed: bool, head: bool) -> int:
    """Bytes of weights one device holds: ``layers`` layers split ``tp`` ways, plus replicated extras."""
    d, f, hd = arch.hidden_size, arch.intermediate_size, arch.head_dim
    per_layer = (d * hd * (2 * arch.num_heads + 2 * arch.num_kv_heads) + 3 * d * f) // tp + 2 * d
    extra = arch.vocab_size * d * (embed + head) + (d if head else 0)
    return (layers * per_layer + extra) * itemsize


def kv_bytes(arch: Architecture, itemsize: int, layers: int, tp: int, slots: int, seq: int) -> int:
    return 2 * layers * slots * (arch.num_kv_heads // tp) * seq * arch.head_dim * itemsize


def page_bytes(arch: Architecture, itemsize: int, page_size: int) -> int:
    """Bytes of one KV page over every layer and device of an instance (what ``kv_memory_gb`` buys)."""
    return kv_bytes(arch, itemsize, arch.num_layers, 1, 1, page_size)


def instance_pages(inst: DecodeInstance | ColocatedInstance | PrefillInstance, arch: Architecture, itemsize: int, page_size: int) -> int:
    """The KV pages a (resolved) instance holds, in pages of ``page_size`` (a prefill instance's
    pool: none where it keeps no prefix cache)."""
    if isinstance(inst, PrefillInstance) and not inst.prefix_caching:
        return 0
    return inst.num_pages(page_bytes(arch, itemsize, page_size))


def prefill_tokens(batching: PrefillBatching, max_seq_len: int) -> int:
    """Padded tokens of an instance's largest prefill call: a batch of ``max_batch_tokens``, or
    one prompt as long as the sequences may be (a single prompt is never refused a batch)."""
    return max(batching.max_batch_tokens, max_seq_len)


def prefill_transient_bytes(arch: Architecture, itemsize: int, tp: int, tokens: int, longest: int, hands_off: bool) -> int:
    """What one prefill call of ``tokens`` padded tokens (prompts of up to ``longest``) holds beside
    the weights and the cache: the KV of every layer it returns, one layer's attention scores
    (float32, as XLA's attention makes them; cuDNN's flash attention keeps none) and one layer's
    MLP activations. Where it ``hands_off`` its KV to decode instances, batches' KV also waits on
    its transfer queue (``PENDING_BATCHES`` of them) and in the transfer thread's hands (one more,
    and the pages taken from it while they move): up to that KV again, that many times over."""
    waiting = PENDING_BATCHES + 2 if hands_off else 0
    kv = kv_bytes(arch, itemsize, arch.num_layers, tp, tokens, 1) * (1 + waiting)
    scores = tokens * longest * (arch.num_heads // tp) * 4
    mlp = 2 * tokens * (arch.intermediate_size // tp) * itemsize
    return kv + scores + mlp


def memory_needs(
    placement: Placement, arch: Architecture, itemsize: int, max_seq_len: int, weight_itemsize: int | None = None
) -> list[MemoryNeed]:
    """Per-device bytes each instance (each decode stage) needs, for the fit check and for logs.
    ``max_seq_len`` is the model's (instances may hold less); ``weight_itemsize`` the bytes held
    per weight where it differs from the activations' and cache's ``itemsize``
    (``held_weight_itemsize``)."""
    placement = placement.resolved(max_seq_len)
    longest = placement.max_seq_len  # what prefill instances are built for
    head = not arch.tie_embeddings
    w_itemsize = weight_itemsize or itemsize
    # A decode stage holds one delivery of the largest prefill batch's KV (its layers) until it
    # is inserted into the cache.
    delivered = max((prefill_tokens(p, longest) for p in placement.prefill), default=0)
    needs = []
    for where, inst in placement.named_instances():
        if isinstance(inst, PrefillInstance):
            w = weight_bytes(arch, w_itemsize, arch.num_layers, inst.tp, True, head)
            pages = instance_pages(inst, arch, itemsize, placement.page_size)
            kv = kv_bytes(arch, itemsize, arch.num_layers, inst.tp, pages, placement.page_size)
            transient = prefill_transient_bytes(arch, itemsize, inst.tp, prefill_tokens(inst, longest), longest, hands_off=True)
            needs.append(MemoryNeed(f"placement.{where}", w, kv, tuple(inst.devices), transient))
        elif isinstance(inst, DecodeInstance):
            pages = instance_pages(inst, arch, itemsize, inst.page_size)
            for span in stage_spans(arch.num_layers, inst.pp, inst.layers_per_stage):
                w = weight_bytes(arch, w_itemsize, span.num_layers, inst.tp, span.first, span.last and head)
                if span.last and not head and not span.first:
                    w += arch.vocab_size * arch.hidden_size * w_itemsize  # tied output needs the embedding too
                kv = kv_bytes(arch, itemsize, span.num_layers, inst.tp, pages, inst.page_size)
                transient = kv_bytes(arch, itemsize, span.num_layers, inst.tp, delivered, 1)
                needs.append(MemoryNeed(f"placement.{where} stage {span.index}", w, kv, tuple(inst.stage_devices(span.index)), transient))
        else:
            seq = inst.max_seq_len
            w = weight_bytes(arch, w_itemsize, arch.num_layers, inst.tp, True, head)
            kv = kv_bytes(arch, itemsize, arch.num_layers, inst.tp, instance_pages(inst, arch, itemsize, inst.page_size), inst.page_size)
            transient = prefill_transient_bytes(arch, itemsize, inst.tp, prefill_tokens(inst, seq), seq, hands_off=False)
            needs.append(MemoryNeed(f"placement.{where}", w, kv, tuple(inst.devices), transient))
    return needs


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _device_limit(device: Any) -> int | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return stats.get("bytes_limit") if stats else None


def check_placement(
    placement: Placement,
    arch: Architecture,
    itemsize: int,
    max_seq_len: int,
    devices: list[Any],
    weight_itemsize: int | None = None,
) -> None:
    """Raise ConfigError naming the key if the placement cannot run this model on these devices."""
    resolved = placement.resolved(max_seq_len)
    given = dict(placement.named_instances())
    for where, inst in resolved.named_instances():
        key = f"placement.{where}"
        missing = [d for d in inst.devices if d >= len(devices)]
        if missing:
            raise ConfigError(f"{key}.devices: {missing} do not exist; this machine has {len(devices)} devices (0..{len(devices) - 1})")
        for name, size in (("num_heads", arch.num_heads), ("num_kv_heads", arch.num_kv_heads), ("intermediate_size", arch.intermediate_size)):
            if size % inst.tp:
                raise ConfigError(f"{key}.tp: {inst.tp} does not divide the model's {name} ({size})")
        if isinstance(inst, DecodeInstance):
            try:
                stage_spans(arch.num_layers, inst.pp, inst.layers_per_stage)
            except ValueError as exc:
                raise ConfigError(f"{key}.{'pp' if inst.layers_per_stage is None else 'layers_per_stage'}: {exc}") from None
        if isinstance(inst, (DecodeInstance, ColocatedInstance)):
            if "page_size" in given[where].model_fields_set and inst.page_size > inst.max_seq_len:
                raise ConfigError(
                    f"{key}.page_size: {inst.page_size} positions exceed max_seq_len ({inst.max_seq_len}); "
                    "no sequence fills such a page, the rest of every one is memory held for nothing"
                )
            if inst.max_seq_len > arch.max_position_embeddings:
                named = f"{key}.max_seq_len" if given[where].max_seq_len is not None else "model.max_seq_len"  # the key the value came from
                raise ConfigError(f"{named}: {inst.max_seq_len} exceeds the model's max_position_embeddings ({arch.max_position_embeddings})")
        if isinstance(inst, PrefillInstance) and inst.prefix_caching:
            pages, longest, size = instance_pages(inst, arch, itemsize, placement.page_size), resolved.max_seq_len, placement.page_size
            if pages * size < longest:
                field = "kv_pages" if inst.kv_pages is not None else "kv_memory_gb"
                raise ConfigError(
                    f"{key}.{field}: its prefix cache's {pages} pages of {size} positions hold less than one prompt of max_seq_len "
                    f"({longest}); give it more, or set enable_prefix_caching: false"
                )
        if isinstance(inst, ColocatedInstance) and inst.chunked_prefill and inst.chunked_prefill > inst.max_seq_len:
            raise ConfigError(f"{key}.chunked_prefill: {inst.chunked_prefill} is longer than max_seq_len")
    needs = memory_needs(placement, arch, itemsize, max_seq_len, weight_itemsize)
    if all(d.platform == "cpu" for d in devices if d is not None):
        total = sum(n.per_device * len(n.devices) for n in needs)
        budget = int(_host_memory() * HOST_MEMORY_FRACTION)
        if total > budget:
            worst = max(needs, key=lambda n: n.per_device * len(n.devices))
            raise ConfigError(
                f"placement needs {_gib(total)} of host memory, {_gib(budget)} is usable; the largest part is "
                f"{worst.where}: {_gib(worst.weights)} weights + {_gib(worst.kv)} KV + {_gib(worst.transient)} transient per device "
                "(lower kv_pages, kv_memory_gb, or slots or max_seq_len, or use fewer instances)"
            )
        return
    for need in needs:
        for d in need.devices:
            if devices[d] is None:  # another process's
                continue
            limit = _device_limit(devices[d])
            if limit is not None and need.per_device > limit:
                raise ConfigError(
                    f"{need.where}: {_gib(need.weights)} weights + {_gib(need.kv)} KV + {_gib(need.transient)} transient per device exceed device {d}'s "
                    f"{_gib(limit)}, the part JAX may use (XLA_PYTHON_CLIENT_MEM_FRACTION: "
                    f"{os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', 'unset, 0.75')}); lower kv_pages, kv_memory_gb, or slots "
                    "or max_seq_len, or raise tp/pp"
                )
