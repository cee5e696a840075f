"""mpx's `TransformerLM` params in the tensor naming and layout other tools use.

    tensors = to_hub(params, config)            # {"h.0.attn.c_attn.weight": (D, 3D) array, ...}
    params = from_hub(tensors, config, dtype=np.float32)   # the model's pure-dict params
    write_safetensors("model.safetensors", tensors); read_safetensors("model.safetensors")

Each layout has the naming of the architecture it follows, as Hugging Face's PyTorch
models save them (the tensors of a ``.safetensors`` file):

* ``gpt2``, GPT-2: ``wte.weight`` (V, D), ``wpe.weight`` (max_len, D), per layer ``h.{i}.``
  ``ln_1``, ``attn.c_attn`` (fused q|k|v), ``attn.c_proj``, ``ln_2``, ``mlp.c_fc``,
  ``mlp.c_proj`` (each ``.weight`` and ``.bias``), then ``ln_f``. Its projections are Conv1D
  layers, stored (in, out) like mpx's kernels. A leading ``transformer.`` (GPT2LMHeadModel's
  files) is accepted.
* ``llama``, Llama: ``model.embed_tokens.weight``, per layer ``model.layers.{i}.``
  ``input_layernorm``, ``self_attn.{q,k,v,o}_proj``, ``post_attention_layernorm``,
  ``mlp.{gate,up,down}_proj`` (``.weight`` only), then ``model.norm.weight``. Its
  projections are ``nn.Linear``, stored (out, in): transposed here; q, k and v are
  concatenated into mpx's fused ``qkv`` kernel in the order the attention splits it. The
  rotary pairing (feature i with i + K/2) is Hugging Face's, so no row is permuted. Names
  without the leading ``model.`` (LlamaModel's files) are accepted.

Either: ``lm_head.weight`` (V, D), stored (out, in), when the head is not tied to the
embedding. A scanned model's stacked layers are unstacked (and stacked on the way in).
`to_hub` keeps the params' dtype; `from_hub` converts the file's to ``dtype``.

Read from a file, everything wrong is one `WeightsError` listing every problem: each
missing tensor with the shape expected, each misshaped one with its shape and the one
expected, and the unexpected ones. Tensors other tools save that are no parameters (GPT-2's
``attn.bias`` / ``attn.masked_bias`` causal-mask buffers, Llama's ``rotary_emb.inv_freq``,
an ``lm_head.weight`` equal to the tied embedding) are skipped and said (``say``): mpx
computes those itself. Any other extra tensor is an error, because a parameter the model
would drop (a bias Llama does not have, say) means the file holds another architecture.

The weights do not hold every part of the shape: ``num_heads``, ``rope_base`` and
``norm_eps`` must be given as the model was trained (GPT-2: 1e-5; Llama: its config's
``rms_norm_eps`` and ``rope_theta``).
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from mpx.nn import TransformerConfig


class WeightsError(ValueError):
    """The tensors of a file do not fit the model: every problem, one per line."""


class _Tensor(NamedTuple):
    """One tensor of the file and where it lives in mpx's params."""

    hub: str  # its name in the file; {i}: the layer
    path: str  # the mpx param under the model (or under a block), "attn/qkv/kernel"
    shape: tuple[int, ...]  # as stored in the file
    transposed: bool = False  # stored (out, in) (nn.Linear): mpx's kernel is its transpose
    columns: tuple[int, int] | None = None  # the slice of the mpx kernel's last axis it fills


def _gpt2(c: TransformerConfig) -> tuple[list[_Tensor], list[_Tensor]]:
    """GPT-2's tensors: (the model's, one layer's)."""
    if c.kv_heads != c.num_heads:
        raise ValueError(f"GPT-2's c_attn holds num_heads ({c.num_heads}) query, key and value heads; a gpt2-layout "
                         f"model with num_kv_heads={c.kv_heads} has no GPT-2 naming (use layout llama for "
                         "grouped-query attention)")
    d, f = c.d_model, c.d_ff
    model = [_Tensor("wte.weight", "embed/embedding", (c.vocab_size, d)),
             _Tensor("wpe.weight", "pos_embed/embedding", (c.max_len, d)),
             _Tensor("ln_f.weight", "ln_f/scale", (d,)), _Tensor("ln_f.bias", "ln_f/bias", (d,))]
    layer = [_Tensor("h.{i}.ln_1.weight", "ln1/scale", (d,)), _Tensor("h.{i}.ln_1.bias", "ln1/bias", (d,)),
             _Tensor("h.{i}.attn.c_attn.weight", "attn/qkv/kernel", (d, 3 * d)),
             _Tensor("h.{i}.attn.c_attn.bias", "attn/qkv/bias", (3 * d,)),
             _Tensor("h.{i}.attn.c_proj.weight", "attn/out/kernel", (d, d)),
             _Tensor("h.{i}.attn.c_proj.bias", "attn/out/bias", (d,)),
             _Tensor("h.{i}.ln_2.weight", "ln2/scale", (d,)), _Tensor("h.{i}.ln_2.bias", "ln2/bias", (d,)),
             _Tensor("h.{i}.mlp.c_fc.weight", "mlp/fc/kernel", (d, f)), _Tensor("h.{i}.mlp.c_fc.bias", "mlp/fc/bias", (f,)),
             _Tensor("h.{i}.mlp.c_proj.weight", "mlp/proj/kernel", (f, d)),
             _Tensor("h.{i}.mlp.c_proj.bias", "mlp/proj/bias", (d,))]
    return model, layer


def _llama(c: TransformerConfig) -> tuple[list[_Tensor], list[_Tensor]]:
    """Llama's tensors: (the model's, one layer's)."""
    d, f = c.d_model, c.d_ff
    q, kv = c.num_heads * (d // c.num_heads), c.kv_heads * (d // c.num_heads)
    model = [_Tensor("model.embed_tokens.weight", "embed/embedding", (c.vocab_size, d)),
             _Tensor("model.norm.weight", "ln_f/scale", (d,))]
    at = "model.layers.{i}."
    layer = [_Tensor(at + "input_layernorm.weight", "ln1/scale", (d,)),
             _Tensor(at + "self_attn.q_proj.weight", "attn/qkv/kernel", (q, d), True, (0, q)),
             _Tensor(at + "self_attn.k_proj.weight", "attn/qkv/kernel", (kv, d), True, (q, q + kv)),
             _Tensor(at + "self_attn.v_proj.weight", "attn/qkv/kernel", (kv, d), True, (q + kv, q + 2 * kv)),
             _Tensor(at + "self_attn.o_proj.weight", "attn/out/kernel", (d, q), True),
             _Tensor(at + "post_attention_layernorm.weight", "ln2/scale", (d,)),
             _Tensor(at + "mlp.gate_proj.weight", "mlp/gate/kernel", (f, d), True),
             _Tensor(at + "mlp.up_proj.weight", "mlp/up/kernel", (f, d), True),
             _Tensor(at + "mlp.down_proj.weight", "mlp/down/kernel", (d, f), True)]
    return model, layer


_LAYOUTS = {"gpt2": _gpt2, "llama": _llama}
HEAD = "lm_head.weight"
_UNTIED = " (a file without one ties its head to the embedding: set tie_embeddings true)"
_EMBED = {"gpt2": "wte.weight", "llama": "model.embed_tokens.weight"}
# Buffers other tools save beside the parameters; mpx computes them itself.
_BUFFERS = {"gpt2": re.compile(r"h\.\d+\.attn\.(bias|masked_bias)"),
            "llama": re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")}


def _spec(config: TransformerConfig) -> dict[str, tuple[int | None, _Tensor]]:
    """Every tensor of ``config``'s file by name: ``(its layer or None, what it is)``."""
    model, layer = _LAYOUTS[config.layout](config)
    if not config.tie_embeddings:
        model.append(_Tensor(HEAD, "head/kernel", (config.vocab_size, config.d_model), True))
    out = {t.hub: (None, t) for t in model}
    for i in range(config.num_layers):
        out.update({t.hub.format(i=i): (i, t) for t in layer})
    return out


def _canonical(name: str, layout: str) -> str:
    """A file's name as `_spec` spells it: GPT2LMHeadModel's ``transformer.`` dropped,
    LlamaModel's missing ``model.`` added."""
    if layout == "gpt2":
        return name.removeprefix("transformer.")
    return name if name.startswith("model.") or name == HEAD else "model." + name


def _get(tree: Mapping, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _put(tree: dict, path: str, value) -> None:
    *parents, last = path.split("/")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[last] = value


def _layers(params: Mapping, config: TransformerConfig) -> list[Mapping]:
    """Each block's params: a scanned model's stack cut along its leading axis."""
    blocks = params["blocks"]
    if not config.scan_layers:
        return [blocks[i] for i in range(config.num_layers)]
    import jax

    return [jax.tree.map(lambda a, i=i: a[i], blocks) for i in range(config.num_layers)]


def to_hub(params, config: TransformerConfig) -> dict[str, np.ndarray]:
    """``params`` (an `nnx.State` of the model's `nnx.Param`s, or its pure dict) as the
    tensors of ``config.layout``'s architecture (see the module docstring), each in the
    params' own dtype and C order (what a file writer needs)."""
    import jax
    from flax import nnx

    pure = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    pure = jax.tree.map(np.asarray, jax.device_get(pure))
    layers = _layers(pure, config)
    out = {}
    for name, (layer, t) in _spec(config).items():
        value = _get(pure if layer is None else layers[layer], t.path)
        if t.columns is not None:
            value = value[..., t.columns[0]:t.columns[1]]
        out[name] = np.ascontiguousarray(value.T if t.transposed else value)
    return out


def _shape(a) -> tuple[int, ...]:
    return tuple(int(n) for n in a.shape)


def _listed(lines: list[str], most: int = 12) -> list[str]:
    return lines if len(lines) <= most else lines[:most] + [f"... and {len(lines) - most} more"]


def from_hub(tensors: Mapping[str, Any], config: TransformerConfig, *, dtype=None,
             say: Callable[[str], None] | None = None) -> dict:
    """The pure-dict params of a `TransformerLM` of ``config`` (the tree of
    ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``) from the tensors of a file written in
    ``config.layout``'s naming. ``dtype``: the model's param dtype (None: each tensor's own).

    Every missing, misshaped or unexpected tensor is listed in one `WeightsError`; the
    buffers other tools save (see the module docstring) are skipped and said through ``say``.
    """
    spec = _spec(config)
    found: dict[str, str] = {}  # canonical name -> the file's
    problems, skipped = [], []
    for name in sorted(tensors):
        canonical = _canonical(name, config.layout)
        if canonical in found:
            problems.append(f"  twice: {found[canonical]} and {name} are both {canonical}")
        found[canonical] = name
    missing = [f"  missing: {n}, expected shape {t.shape}" + (_UNTIED if n == HEAD else "")
               for n, (_, t) in spec.items() if n not in found]
    misshaped = [f"  misshaped: {found[n]} has shape {_shape(tensors[found[n]])}, expected {t.shape}"
                 for n, (_, t) in spec.items() if n in found and _shape(tensors[found[n]]) != t.shape]
    unexpected = []
    for canonical, name in found.items():
        if canonical in spec:
            continue
        if _BUFFERS[config.layout].fullmatch(canonical) or (canonical == HEAD and _is_tied_copy(tensors, name, found,
                                                                                                config.layout)):
            skipped.append(name)
        elif canonical == HEAD:
            problems.append(f"  unexpected: {name} {_shape(tensors[name])}, a head of its own, but this model ties "
                            "its head to the embedding; set tie_embeddings false")
        else:
            unexpected.append(f"  unexpected: {name} {_shape(tensors[name])}")
    problems += _listed(missing) + _listed(misshaped) + _listed(unexpected)
    if problems:
        raise WeightsError(f"the weights do not fit a {config.layout}-layout model of d_model {config.d_model}, "
                           f"{config.num_layers} layers, d_ff {config.d_ff}, vocabulary {config.vocab_size} "
                           f"({len(missing)} missing, {len(misshaped)} misshaped, {len(unexpected)} unexpected):\n"
                           + "\n".join(problems) + _other_layout_hint(found, config.layout))
    if skipped and say is not None:
        say(f"skipped {len(skipped)} tensors that hold no parameters (mpx computes them): "
            + ", ".join(_listed(skipped, 4)))

    def value(name: str, t: _Tensor):
        a = np.asarray(tensors[found[name]])
        a = a.T if t.transposed else a
        return a if dtype is None else a.astype(dtype)

    top: dict = {}
    blocks: list[dict] = [{} for _ in range(config.num_layers)]
    pieces: dict[tuple[int, str], list] = {}
    for name, (layer, t) in spec.items():
        if t.columns is not None:  # a part of a fused kernel: joined below, in column order
            pieces.setdefault((layer, t.path), []).append((t.columns[0], value(name, t)))
        else:
            _put(top if layer is None else blocks[layer], t.path, value(name, t))
    for (i, path), parts in pieces.items():
        _put(blocks[i], path, np.concatenate([a for _, a in sorted(parts, key=lambda p: p[0])], axis=-1))
    if config.scan_layers:
        import jax

        top["blocks"] = jax.tree.map(lambda *a: np.stack(a), *blocks)
    else:
        top["blocks"] = dict(enumerate(blocks))
    return top


def _is_tied_copy(tensors, name: str, found: Mapping[str, str], layout: str) -> bool:
    embed = found.get(_EMBED[layout])
    return embed is not None and np.array_equal(np.asarray(tensors[name]), np.asarray(tensors[embed]))


def _other_layout_hint(found: Mapping[str, str], layout: str) -> str:
    other = next(k for k in _LAYOUTS if k != layout)
    if _EMBED[layout] not in found and _EMBED[other] in {_canonical(n, other) for n in found.values()}:
        return f"\nthe file names its tensors as a {other} model does: set the layout to {other}"
    return ""


def read_shape(tensors: Mapping[str, Any], config: TransformerConfig) -> dict[str, tuple[Any, Any]]:
    """``key -> (the weights' value, config's)`` for each shape key of `TransformerConfig`
    that the file's tensors give and that differs from ``config``: ``vocab_size``,
    ``d_model``, ``num_layers``, ``d_ff``, ``max_len`` (gpt2), ``num_kv_heads`` (llama, read
    with ``config``'s head size) and ``tie_embeddings`` (a head of its own or not). A tensor
    the file lacks gives nothing (`from_hub` lists it)."""
    layout = config.layout
    names = {_canonical(n, layout): n for n in tensors}

    def dim(name: str, axis: int):
        t = tensors.get(names.get(name, ""))
        return None if t is None or len(t.shape) <= axis else int(t.shape[axis])

    at = "h.0." if layout == "gpt2" else "model.layers.0."
    layers = {int(m[1]) for n in names if (m := re.match(r"(?:h|model\.layers)\.(\d+)\.", n))}
    read = {"vocab_size": dim(_EMBED[layout], 0), "d_model": dim(_EMBED[layout], 1),
            "num_layers": max(layers) + 1 if layers else None}
    if layout == "gpt2":
        read.update(d_ff=dim(at + "mlp.c_fc.weight", 1), max_len=dim("wpe.weight", 0))
    else:
        read["d_ff"] = dim(at + "mlp.gate_proj.weight", 0)
        kv, head_dim = dim(at + "self_attn.k_proj.weight", 0), config.d_model // config.num_heads
        if kv is not None and read["d_model"] == config.d_model and kv % head_dim == 0:
            read["num_kv_heads"] = kv // head_dim
    if _EMBED[layout] in names:
        read["tie_embeddings"] = HEAD not in names or _is_tied_copy(tensors, names[HEAD], names, layout)
    mine = {**{k: getattr(config, k) for k in read}, "num_kv_heads": config.kv_heads}
    return {k: (v, mine[k]) for k, v in read.items() if v is not None and v != mine[k]}


# ----------------------------------------------------------------------------- files


def read_safetensors(path: str | pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(tensors, metadata)`` of a ``.safetensors`` file, each tensor in its stored dtype
    (bfloat16 as `ml_dtypes.bfloat16`)."""
    from safetensors import SafetensorError, safe_open

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "No such file", str(path))
    try:
        with safe_open(str(path), framework="np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except SafetensorError as e:
        raise ValueError(f"cannot read {path} as a safetensors file ({e})") from None


def write_safetensors(path: str | pathlib.Path, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> pathlib.Path:
    """Write ``tensors`` (each dtype kept: F32, BF16, F16, ...) to a new file ``path``,
    atomically (a temporary sibling renamed at the end); an existing file is refused.

    ``metadata`` ``{"format": "pt"}`` is added: the names and layouts are PyTorch's, and
    Hugging Face's loaders read a file only with one of the formats they know."""
    from safetensors.numpy import save_file

    path = pathlib.Path(path).absolute()
    if path.exists():
        raise ValueError(f"{path} exists; give a new file (an existing file is never written over)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp),
                  metadata={"format": "pt", **(metadata or {})})
        tmp.rename(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
