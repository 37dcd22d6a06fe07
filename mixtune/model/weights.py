"""Mixtral weights on disk <-> mixtune's parameters.

Two layouts exist in practice and both load:
- classic (hub checkpoints, transformers 4): per-expert matrices
  model.layers.N.block_sparse_moe.experts.E.w1/w2/w3.weight and ...block_sparse_moe.gate.weight;
- fused (transformers 5): model.layers.N.mlp.experts.gate_up_proj / down_proj and ...mlp.gate.weight.
mixtune writes the classic layout, which every consumer reads. Only safetensors are ever read:
pickle files can run code when loaded.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import save_file

from .config import MixtralConfig

INDEX_FILE = "model.safetensors.index.json"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")

# Per-layer names that are the same in every layout and in mixtune.
SHARED_LAYER_KEYS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
)
TOP_KEYS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
# mixtune name (per layer) -> name in each layout. Experts are handled below: classic splits them.
ROUTER = "mlp.router.proj.weight"
GATE_UP = "mlp.experts.gate_up_proj"
DOWN = "mlp.experts.down_proj"
CLASSIC_ROUTER = "block_sparse_moe.gate.weight"
CLASSIC_EXPERT = "block_sparse_moe.experts.{e}.{w}.weight"  # w1 gate, w3 up, w2 down
FUSED = {ROUTER: "mlp.gate.weight", GATE_UP: "mlp.experts.gate_up_proj", DOWN: "mlp.experts.down_proj"}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as this Mixtral, with what is wrong in it."""


def _summarise(label: str, keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")
    return f"{label}: {shown}"


class CheckpointReader:
    """Lazy access to the tensors of a safetensors checkpoint (one file or sharded with an index)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: not a directory")
        index = self.directory / INDEX_FILE
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for pat in PICKLE_PATTERNS for p in self.directory.glob(pat))
            hint = (
                f" It holds pickle files ({', '.join(pickles)}), which mixtune never loads because "
                "unpickling can run arbitrary code; convert them to safetensors first."
                if pickles
                else ""
            )
            raise CheckpointError(f"{self.directory}: no *.safetensors weights found.{hint}")
        self._handles = {}
        self.key_to_file: dict[str, str] = {}
        for name in files:
            path = self.directory / name
            if not path.exists():
                raise CheckpointError(f"{path}: listed in {INDEX_FILE} but missing")
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as err:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
            self._handles[name] = handle
            for key in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                self.key_to_file[key] = name

    def keys(self) -> set[str]:
        return set(self.key_to_file)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self.key_to_file[key]].get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._handles[self.key_to_file[key]].get_tensor(key)
        except Exception as err:
            raise CheckpointError(
                f"{self.directory / self.key_to_file[key]}: cannot read {key} ({err})"
            ) from err


def expected_shapes(config: MixtralConfig) -> dict[str, tuple[int, ...]]:
    """Every mixtune parameter name and its shape (lm_head omitted when tied to the embeddings)."""
    D, I, E, V = config.hidden_size, config.intermediate_size, config.num_local_experts, config.vocab_size
    q_out = config.num_attention_heads * config.head_size
    kv_out = config.num_key_value_heads * config.head_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes.update(
            {
                p + "input_layernorm.weight": (D,),
                p + "post_attention_layernorm.weight": (D,),
                p + "self_attn.q_proj.weight": (q_out, D),
                p + "self_attn.k_proj.weight": (kv_out, D),
                p + "self_attn.v_proj.weight": (kv_out, D),
                p + "self_attn.o_proj.weight": (D, q_out),
                p + ROUTER: (E, D),
                p + GATE_UP: (E, 2 * I, D),
                p + DOWN: (E, D, I),
            }
        )
    return shapes


def _layout(keys: set[str]) -> str:
    classic = any(".block_sparse_moe." in k for k in keys)
    fused = any(k.endswith(".mlp.experts.gate_up_proj") or k.endswith(".mlp.gate.weight") for k in keys)
    if classic and fused:
        raise CheckpointError(
            "checkpoint mixes the classic (block_sparse_moe) and fused (mlp.experts) layouts"
        )
    return "classic" if classic else "fused"


def _source_keys(name: str, layout: str, num_experts: int) -> dict[str, tuple[str, ...]]:
    """For one mixtune parameter, the checkpoint keys it is built from (per sub-part)."""
    match = re.fullmatch(r"(model\.layers\.\d+\.)(.+)", name)
    if match is None:
        return {"": (name,)}
    prefix, rest = match.groups()
    if rest in SHARED_LAYER_KEYS:
        return {"": (prefix + rest,)}
    if layout == "fused":
        return {"": (prefix + FUSED[rest],)}
    if rest == ROUTER:
        return {"": (prefix + CLASSIC_ROUTER,)}
    experts = range(num_experts)
    if rest == GATE_UP:
        return {w: tuple(prefix + CLASSIC_EXPERT.format(e=e, w=w) for e in experts) for w in ("w1", "w3")}
    return {"w2": tuple(prefix + CLASSIC_EXPERT.format(e=e, w="w2") for e in experts)}


def _checked_plan(reader: CheckpointReader, config: MixtralConfig) -> dict[str, dict[str, tuple[str, ...]]]:
    """Map each parameter to its source keys, refusing missing, unexpected and mis-shaped tensors."""
    keys = reader.keys()
    layout = _layout(keys)
    shapes = expected_shapes(config)
    plan = {name: _source_keys(name, layout, config.num_local_experts) for name in shapes}
    used = {k for parts in plan.values() for group in parts.values() for k in group}
    missing = sorted(k for k in used if k not in keys)
    unexpected = sorted(k for k in keys - used if not (k == "lm_head.weight" and config.tie_word_embeddings))
    misshaped = []
    for name, parts in plan.items():
        want = shapes[name]
        for part, group in parts.items():
            # A classic expert matrix is one slice of the stacked parameter.
            if part in ("w1", "w3"):
                want_one = (config.intermediate_size, config.hidden_size)
            elif part == "w2":
                want_one = (config.hidden_size, config.intermediate_size)
            else:
                want_one = want
            for key in group:
                if key in keys and reader.shape(key) != want_one:
                    misshaped.append(f"{key} {list(reader.shape(key))} (expected {list(want_one)})")
    problems = [
        _summarise(label, items)
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped))
        if items
    ]
    if problems:
        raise CheckpointError(
            f"{reader.directory}: checkpoint does not match its config.json ({layout} layout). "
            + "; ".join(problems)
        )
    return plan


def _read_parameter(reader: CheckpointReader, parts: dict[str, tuple[str, ...]]) -> torch.Tensor:
    """One mixtune parameter from its source keys (classic experts are stacked here)."""
    if set(parts) == {""}:
        return reader.get(parts[""][0])
    if "w1" in parts:  # gate and up stacked per expert: (E, 2I, D)
        gate = torch.stack([reader.get(k) for k in parts["w1"]])
        up = torch.stack([reader.get(k) for k in parts["w3"]])
        return torch.cat((gate, up), dim=1)
    return torch.stack([reader.get(k) for k in parts["w2"]])


def iter_parameters(directory: str | Path, config: MixtralConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (mixtune name, tensor) one parameter at a time, so peak memory is one parameter."""
    reader = CheckpointReader(directory)
    for name, parts in _checked_plan(reader, config).items():
        yield name, _read_parameter(reader, parts)


def to_classic(state_dict: dict[str, torch.Tensor], config: MixtralConfig) -> dict[str, torch.Tensor]:
    """mixtune (or fused) names -> classic per-expert names, for writing."""
    out: dict[str, torch.Tensor] = {}
    inter = config.intermediate_size
    for name, tensor in state_dict.items():
        match = re.fullmatch(r"(model\.layers\.\d+\.)(.+)", name)
        rest = match.group(2) if match else None
        if rest in (ROUTER, FUSED[ROUTER]):
            out[match.group(1) + CLASSIC_ROUTER] = tensor
        elif rest == GATE_UP:
            for e in range(tensor.shape[0]):
                out[match.group(1) + CLASSIC_EXPERT.format(e=e, w="w1")] = tensor[e, :inter]
                out[match.group(1) + CLASSIC_EXPERT.format(e=e, w="w3")] = tensor[e, inter:]
        elif rest == DOWN:
            for e in range(tensor.shape[0]):
                out[match.group(1) + CLASSIC_EXPERT.format(e=e, w="w2")] = tensor[e]
        else:
            out[name] = tensor
    return out


def load_pretrained(cls, path, *, dtype=None, device="cpu", **config_overrides):
    """Build the model on the meta device (no wasted random init) and fill it from the checkpoint.

    Under DeepSpeed ZeRO-3 it is built partitioned instead, and no rank ever holds all of it.
    """
    from mixtune.distributed import zero3_enabled  # here: mixtune.distributed imports the model

    path = Path(path)
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: no config.json (is this a model directory?)")
    config = MixtralConfig.from_pretrained(path, **config_overrides)
    if zero3_enabled():
        return _load_partitioned(cls, path, config)
    dtype = dtype or _config_dtype(config)
    with torch.device("meta"):
        model = cls(config)
    for name, tensor in iter_parameters(path, config):
        module_name, _, param_name = name.rpartition(".")
        module = model.get_submodule(module_name)
        module._parameters[param_name] = torch.nn.Parameter(tensor.to(device=device, dtype=dtype))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def _load_partitioned(cls, path: Path, config: MixtralConfig):
    """Under DeepSpeed ZeRO-3: build partitioned, then fill one parameter at a time from rank 0.

    Every rank checks the checkpoint (headers only), so a bad one fails on all ranks at once rather
    than leaving the others waiting in a collective; only rank 0 reads tensors. The dtype is
    DeepSpeed's (see mixtune.distributed.partitioned_init).
    """
    from mixtune.distributed import load_partitioned, partitioned_init, rank

    reader = CheckpointReader(path)
    plan = _checked_plan(reader, config)
    with partitioned_init(skip_init=True):
        model = cls(config)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for name, parts in plan.items():
        load_partitioned(model, name, _read_parameter(reader, parts) if rank() == 0 else None)
    return model.eval()


def _config_dtype(config: MixtralConfig) -> torch.dtype:
    name = getattr(config, "dtype", None) or "float32"
    return getattr(torch, name) if isinstance(name, str) else name


def save_pretrained(model, directory, state_dict=None, max_shard_size="5GB") -> None:
    """config.json plus classic-layout safetensors shards and their index."""
    if getattr(model, "is_loaded_in_4bit", False):
        raise ValueError(
            "refusing to save a 4-bit model as Mixtral weights: NF4 codes are not a checkpoint any "
            "consumer reads; save the adapter, and merge it into the full-precision base (mixtune.export)"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if state_dict is None:
        state_dict = model.state_dict()
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("rotary.inv_freq")}
    if model.config.tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)
    config = copy.deepcopy(model.config)
    config.architectures = ["MixtralForCausalLM"]
    first = next(iter(state_dict.values()))
    config.dtype = str(first.dtype).removeprefix("torch.")
    # Trainers switch these runtime flags off or on for training; a checkpoint carries the defaults
    # its readers expect (transformers generates with the cache, without router logits).
    config.use_cache, config.output_router_logits = True, False
    config.save_pretrained(directory)
    classic = to_classic(state_dict, config)  # views into the parameters, no copy yet
    split = split_torch_state_dict_into_shards(classic, max_shard_size=max_shard_size)
    # One shard at a time is copied out of the stacked parameters, so exporting a large model
    # needs memory for the model plus one shard, not two models.
    for filename, keys in split.filename_to_tensors.items():
        shard = {k: classic[k].detach().to("cpu").clone() for k in keys}
        save_file(shard, str(directory / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {
            "metadata": {"total_size": split.metadata["total_size"]},
            "weight_map": split.tensor_to_filename,
        }
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
