"""The ``placement:`` section of a config: which devices serve which phase, and how.

Two modes. ``disaggregated``: prefill instances (tensor parallel over their devices) and decode
instances (``pp`` pipeline stages of ``tp`` devices each) on disjoint devices, KV handed from one to
the other. ``colocated``: instances that run both phases on their own devices, the baseline every
disaggregation claim is measured against. This module checks what can be checked from the file
alone; ``check_placement`` in ``jds.config.fit`` checks it against the model and the machine.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

DEFAULT_SLOTS = 32  # rows a decode step computes at most, where the config does not say
DEFAULT_KV_ROWS = 8  # without slots, kv_pages or kv_memory_gb: the pages of this many max_seq_len sequences
DEFAULT_PAGE_SIZE = 64  # cache positions per KV page (measured in WORKSPACE.md)


class _Section(BaseModel):
    # strict: YAML's ``true`` is not a count of 1, nor "8" a number
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class _Process(_Section):
    """How a prefill or decode instance runs when roles run as processes."""

    cpus: list[NonNegativeInt] | None = Field(
        default=None, min_length=1, description="CPU cores this instance's process is pinned to when roles run as processes"
    )
    processes: PositiveInt = Field(
        default=1, description="processes (hosts) the instance spans with jax.distributed; its devices are split evenly among them"
    )

    def process_share(self, values: list[int] | None, process: int) -> list[int] | None:
        """Process ``process``'s even share of ``values`` (the instance's devices, or its cores)."""
        if values is None or self.processes == 1:
            return values
        n = len(values) // self.processes
        return values[process * n : (process + 1) * n] or values

    def _check_processes(self, devices: int) -> None:
        if devices % self.processes:
            raise ValueError(f"processes {self.processes} must divide the instance's {devices} devices")


class PrefillBatching(_Section):
    """How prompts are grouped into one prefill program call."""

    max_batch_tokens: PositiveInt = Field(
        default=4096, description="padded tokens per prefill batch (bucket x batch); a longer prompt runs alone"
    )
    max_batch: PositiveInt = Field(default=8, description="prompts per prefill batch (a power of two bounds compiles)")


class _KVMemory(_Section):
    kv_pages: PositiveInt | None = Field(
        default=None,
        description="KV pages the instance holds; default: kv_memory_gb's worth, else the positions of slots sequences of "
        f"max_seq_len ({DEFAULT_KV_ROWS} where slots is not given, and on a prefill instance)",
    )
    kv_memory_gb: PositiveFloat | None = Field(default=None, description="KV memory of the instance (all its layers and devices), in GiB")

    @model_validator(mode="after")
    def _one_kv_size(self) -> Self:
        if self.kv_pages is not None and self.kv_memory_gb is not None:
            raise ValueError("give kv_pages or kv_memory_gb, not both")
        return self

    def num_pages(self, page_bytes: int) -> int:
        """KV pages of this (resolved) instance, given the bytes of one page over all its layers
        and devices: as configured, or ``kv_memory_gb``'s worth."""
        if self.kv_pages is not None:
            return self.kv_pages
        if self.kv_memory_gb is None:
            raise ValueError("the instance is not resolved: call resolved(max_seq_len) first")
        return max(1, int(self.kv_memory_gb * 2**30) // page_bytes)


def _default_pages(rows: int, longest: int, page_size: int) -> int:
    return rows * -(-longest // page_size)


class PrefillInstance(PrefillBatching, _KVMemory, _Process):
    devices: list[NonNegativeInt] = Field(min_length=1)
    tp: PositiveInt = 1
    enable_prefix_caching: bool | None = Field(
        default=None,
        description="keep full KV pages of known prompts (kv_pages or kv_memory_gb of them) and reuse them for prompts that start "
        "the same; default on, except for an instance spanning several processes, which keeps none",
    )

    @model_validator(mode="after")
    def _tp_uses_all_devices(self) -> PrefillInstance:
        if len(self.devices) != self.tp:
            raise ValueError(f"tp {self.tp} needs exactly {self.tp} devices, got {len(self.devices)}")
        self._check_processes(len(self.devices))
        if self.enable_prefix_caching and self.processes > 1:
            raise ValueError("enable_prefix_caching: an instance spanning several processes keeps no prefix cache")
        return self

    @property
    def prefix_caching(self) -> bool:
        """Whether this instance keeps a pool of pages and a prefix cache in it."""
        return self.enable_prefix_caching is not False and self.processes == 1

    def resolved(self, longest: int, page_size: int) -> Self:
        """With ``kv_pages`` filled in where prefix caching needs a pool and nothing sizes it:
        the pages of ``DEFAULT_KV_ROWS`` sequences of ``longest`` (the placement's
        ``max_seq_len``)."""
        if not self.prefix_caching or self.kv_pages is not None or self.kv_memory_gb is not None:
            return self
        return self.model_copy(update={"kv_pages": _default_pages(DEFAULT_KV_ROWS, longest, page_size)})


class _DecodeSlots(_KVMemory):
    slots: PositiveInt | None = Field(
        default=None, description=f"rows a decode step computes at most: requests running at once (default {DEFAULT_SLOTS})"
    )
    max_seq_len: PositiveInt | None = Field(default=None, description="prompt + output limit; default model.max_seq_len")
    page_size: PositiveInt = Field(default=DEFAULT_PAGE_SIZE, description="cache positions per KV page")

    def resolved(self, max_seq_len: int) -> Self:
        """This instance with every default filled in: ``max_seq_len`` (the model's), ``slots``,
        and, unless ``kv_memory_gb`` sizes them, ``kv_pages``: as many as ``slots`` sequences of
        ``max_seq_len`` fill where slots are given (the memory a cache of whole rows took), else
        ``DEFAULT_KV_ROWS`` of them, with ``DEFAULT_SLOTS`` rows to share them."""
        longest = self.max_seq_len or max_seq_len
        update: dict[str, int] = {"max_seq_len": longest, "slots": self.slots or DEFAULT_SLOTS}
        if self.kv_pages is None and self.kv_memory_gb is None:
            update["kv_pages"] = _default_pages(self.slots or DEFAULT_KV_ROWS, longest, self.page_size)
        return self.model_copy(update=update)


class DecodeInstance(_DecodeSlots, _Process):
    devices: list[NonNegativeInt] = Field(min_length=1)
    pp: PositiveInt = 1
    tp: PositiveInt = 1
    layers_per_stage: list[PositiveInt] | None = Field(
        default=None, description="explicit stage split; default: as even as possible, earlier stages one larger"
    )
    microbatches: PositiveInt | None = Field(
        default=None, description="slots are split into this many microbatches that flow through the stages"
    )

    @model_validator(mode="after")
    def _shape(self) -> DecodeInstance:
        if len(self.devices) != self.pp * self.tp:
            raise ValueError(f"pp {self.pp} x tp {self.tp} needs {self.pp * self.tp} devices, got {len(self.devices)}")
        if self.layers_per_stage is not None and len(self.layers_per_stage) != self.pp:
            raise ValueError(f"layers_per_stage has {len(self.layers_per_stage)} entries for pp {self.pp}")
        if self.microbatches is not None and (self.slots or DEFAULT_SLOTS) % self.microbatches:
            raise ValueError(f"slots {self.slots or DEFAULT_SLOTS} is not a multiple of microbatches {self.microbatches}")
        self._check_processes(len(self.devices))
        return self

    def num_microbatches(self, cpu: bool) -> int:
        """Given, or automatic: 1 on CPU, else the largest divisor of ``slots`` not above ``pp``.

        Decode is memory-bound, so each microbatch re-reads its stage's weights. Stages on real,
        separate devices overlap and hide that; virtual CPU devices share the same cores, and
        there extra microbatches only add weight reads (measured in WORKSPACE.md).
        """
        if self.microbatches is not None:
            return self.microbatches
        if cpu:
            return 1
        return max(m for m in range(1, self.pp + 1) if self.slots % m == 0)

    def stage_devices(self, stage: int) -> list[int]:
        return self.devices[stage * self.tp : (stage + 1) * self.tp]


class ColocatedInstance(_DecodeSlots, PrefillBatching):
    devices: list[NonNegativeInt] = Field(min_length=1)
    tp: PositiveInt = 1
    chunked_prefill: PositiveInt | None = Field(
        default=None, description="prefill long prompts this many tokens at a time, between decode steps"
    )
    enable_prefix_caching: bool = Field(
        default=True, description="keep full KV pages of known prompts and reuse them for prompts that start the same"
    )

    @model_validator(mode="after")
    def _tp_uses_all_devices(self) -> ColocatedInstance:
        if len(self.devices) != self.tp:
            raise ValueError(f"tp {self.tp} needs exactly {self.tp} devices, got {len(self.devices)}")
        return self


def _default_instances() -> list[ColocatedInstance]:
    return [ColocatedInstance(devices=[0])]


class Placement(_Section):
    mode: Literal["disaggregated", "colocated"] = "colocated"
    prefill: list[PrefillInstance] = Field(default_factory=list)
    decode: list[DecodeInstance] = Field(default_factory=list)
    instances: list[ColocatedInstance] = Field(default_factory=list)
    cpus: list[NonNegativeInt] | None = Field(
        default=None, min_length=1, description="CPU cores the serving process is pinned to (benchmarks on a CPU machine)"
    )

    @field_validator("prefill", "decode", "instances", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _consistent(self) -> Placement:
        if self.mode == "disaggregated":
            if self.instances:
                raise ValueError("'instances' is for mode colocated; disaggregated uses 'prefill' and 'decode'")
            if not self.prefill or not self.decode:
                raise ValueError("mode disaggregated needs at least one 'prefill' and one 'decode' instance")
            if len({d.page_size for d in self.decode}) > 1:
                raise ValueError("decode instances must share one page_size: prefill hands its KV over in pages of that size")
        else:
            if self.prefill or self.decode:
                raise ValueError("'prefill' and 'decode' are for mode disaggregated; colocated uses 'instances'")
            if not self.instances:
                object.__setattr__(self, "instances", _default_instances())
        seen: dict[int, str] = {}
        for where, inst in self.named_instances():
            for d in inst.devices:
                if d in seen:
                    raise ValueError(f"device {d} is used by both {seen[d]} and {where}")
                seen[d] = where
        return self

    def named_instances(self) -> list[tuple[str, PrefillInstance | DecodeInstance | ColocatedInstance]]:
        """Every instance with its config path, e.g. ``("decode[1]", ...)``."""
        groups = {"prefill": self.prefill, "decode": self.decode, "instances": self.instances}
        return [(f"{name}[{i}]", inst) for name, group in groups.items() for i, inst in enumerate(group)]

    @property
    def devices(self) -> list[int]:
        return sorted(d for _, inst in self.named_instances() for d in inst.devices)

    def resolved(self, max_seq_len: int) -> Placement:
        """This placement with every instance's defaults filled in from the model's ``max_seq_len``.
        Whoever builds instances resolves the placement once and then reads ``max_seq_len`` off
        each instance (and the placement) as given."""
        decode = [d.resolved(max_seq_len) for d in self.decode]
        placed = self.model_copy(update={"decode": decode, "instances": [i.resolved(max_seq_len) for i in self.instances]})
        longest = placed.max_seq_len if decode else max_seq_len
        return placed.model_copy(update={"prefill": [p.resolved(longest, self.page_size) for p in self.prefill]})

    @property
    def page_size(self) -> int:
        """The decode instances' page size: what prefill instances cut their KV into (colocated
        instances each use their own)."""
        return self.decode[0].page_size if self.decode else DEFAULT_PAGE_SIZE

    @property
    def max_seq_len(self) -> int:
        """The longest sequence an instance of this (resolved) placement holds: what prefill is built for."""
        lengths = [i.max_seq_len for i in self.decode + self.instances]
        if None in lengths:
            raise ValueError("the placement is not resolved: call resolved(model.max_seq_len) first")
        return max(lengths)

    def describe(self) -> str:
        """One line per instance, for logs and ModelInfo."""
        parts = []
        for where, inst in self.named_instances():
            shape = f"tp={inst.tp}" + (f" pp={inst.pp}" if isinstance(inst, DecodeInstance) else "")
            extra = f" slots={inst.slots}" if not where.startswith("prefill") else ""
            parts.append(f"{where} devices={inst.devices} {shape}{extra}")
        return f"{self.mode}: " + "; ".join(parts)
