#!/usr/bin/env python3
"""Record a kvscope trace (HDF5 schema v1, docs/trace-format.md) from a Hugging Face causal LM.

    record_trace.py --model NAME_OR_PATH (--prompt TEXT | --prompt-ids ID ...) --decode-steps S
                    --out FILE.h5 [--dtype float32|float16|bfloat16]
    record_trace.py --tiny-random-llama [--prompt TEXT | --prompt-ids ID ...] --decode-steps S --out FILE.h5

Supported architectures (config.model_type): llama, mistral, qwen2 -- decoder-only models with GQA
whose attention module projects with q_proj/k_proj/v_proj/o_proj and applies RoPE ("neox",
rotate-half) through the module-level function apply_rotary_pos_emb of its modeling file. Any
other architecture, or a Mistral/Qwen2 whose sliding window is shorter than prompt + decode, is
refused with one error. Tested with the transformers version pinned in python/requirements.txt
(install it with scripts/python-env).

What is recorded, and how: the model runs in float32 with eager attention, batch 1. Nothing of
the model is re-implemented; hooks copy what the model's own attention computes:
  - q, k after RoPE: the modeling module's apply_rotary_pos_emb is wrapped, and its return values
    (exactly the tensors the attention then uses and caches) are copied;
  - v: a forward hook on v_proj;
  - decode/o: a forward pre-hook on o_proj, whose input is the attention output of every q head
    (heads concatenated), i.e. before the output projection;
  - prefill/attn_colsum: the prefill runs with output_attentions=True, so the eager attention
    returns its causal softmax probabilities [q_heads, T, T]; a forward hook on the attention
    module sums them over the T queries and drops them (one layer's probabilities alive at a time).
The prefill is one forward over the prompt; each of the S decode steps is one forward of the
greedy (argmax) token through the model's own KV cache, so decode queries/keys carry positions
T, T+1, ... After the last step the recorded keys and values are compared with the model's KV
cache, bit for bit. Prompt and greedy tokens are stored in /recorder (ignored by kvscope).

Storage: q/k/v/o in --dtype (round to nearest even; a value that overflows float16/bfloat16 is an
error), attn_colsum in float32, root attributes written last, the file renamed into place only
when complete. Exit status: 0 on success, 2 on bad input (one line on stderr), 1 on other errors.

--tiny-random-llama builds a randomly initialised Llama with GQA (2 layers, hidden 64, 4 q heads,
2 kv heads, head dim 16, vocab 256) from a fixed seed, with no download; its "tokenizer" is UTF-8
bytes, and without a prompt it uses TINY_PROMPT_LEN fixed pseudo-random ids.
"""

import argparse
import os
import sys

import numpy as np

PRODUCER = "kvscope record_trace.py"
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
DTYPES = ("float32", "float16", "bfloat16")
CHUNK_BYTES = 512 * 1024  # target chunk size, as kvscope's own writer (WriteOptions::chunk_bytes)

TINY_SEED = 20261123
TINY_PROMPT_LEN = 40
# q/k/v weights of the tiny model are drawn with this std (transformers' default is 0.02, which
# makes every attention row almost uniform: a trace where keys hardly matter tests nothing).
TINY_INIT_STD = 0.25


class RecordError(Exception):
    """Bad input or a model the recorder cannot handle: reported as one line, exit status 2."""


# --------------------------------------------------------------------------------------------
# Model loading


def _import_torch_transformers():
    try:
        import torch
        import transformers
    except ImportError as e:
        raise RecordError(f"{e}; create the Python environment with scripts/python-env and run this "
                          "script with its python") from None
    return torch, transformers


def _transformers_attr(name):
    """transformers.NAME; transformers imports lazily, so a version that needs a newer torch fails here."""
    torch, transformers = _import_torch_transformers()
    try:
        return getattr(transformers, name)
    except Exception as e:
        raise RecordError(f"transformers {transformers.__version__} cannot load {name} with torch "
                          f"{torch.__version__} ({_first_line(e)}); install python/requirements.txt "
                          "with scripts/python-env") from None


def build_tiny_random_model(arch="llama", seed=TINY_SEED):
    """A tiny model with GQA (llama, mistral or qwen2), deterministic for a seed and transformers version."""
    torch, _ = _import_torch_transformers()
    prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[arch]
    extra = {"sliding_window": None} if arch != "llama" else {}  # full attention
    config = _transformers_attr(prefix + "Config")(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rope_theta=10000.0, tie_word_embeddings=False, attn_implementation="eager", **extra)
    torch.manual_seed(seed)
    model = _transformers_attr(prefix + "ForCausalLM")(config)
    with torch.no_grad():  # sharper attention than the default init (see TINY_INIT_STD)
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.weight.normal_(0.0, TINY_INIT_STD)
    return model.float().eval()


def build_tiny_random_llama(seed=TINY_SEED):
    return build_tiny_random_model("llama", seed)


def tiny_prompt_ids(seed=TINY_SEED, length=TINY_PROMPT_LEN):
    return np.random.default_rng(seed).integers(0, 256, size=length).tolist()


def _check_config(config, total_tokens):
    arch = getattr(config, "model_type", None)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise RecordError(f"unsupported architecture '{arch}': record_trace.py supports "
                          f"{', '.join(SUPPORTED_ARCHITECTURES)} (see its docstring)")
    # A sliding window hides old keys from the attention: kvscope replays the full cache. (Qwen2's
    # eager mask applies config.sliding_window even when use_sliding_window is false.)
    window = getattr(config, "sliding_window", None)
    if window is not None and total_tokens > window:
        raise RecordError(f"prompt + decode = {total_tokens} tokens exceeds the model's sliding window "
                          f"({window}); kvscope traces assume full attention")
    if getattr(config, "pretraining_tp", 1) != 1:
        config.pretraining_tp = 1  # same weights, same math; sliced matmuls would bypass the hooks


def load_model(name):
    """Loads a supported model from a hub name or local path, float32, eager attention."""
    torch, _ = _import_torch_transformers()
    auto_config, auto_model = _transformers_attr("AutoConfig"), _transformers_attr("AutoModelForCausalLM")
    try:
        config = auto_config.from_pretrained(name)
    except Exception as e:  # hub/file errors come in many types, often with multi-line text
        raise RecordError(f"cannot load the config of model '{name}': {_first_line(e)}") from None
    _check_config(config, 0)
    try:
        model = auto_model.from_pretrained(
            name, config=config, torch_dtype=torch.float32, attn_implementation="eager")
    except Exception as e:
        raise RecordError(f"cannot load model '{name}': {_first_line(e)}") from None
    return model.float().eval()


def _first_line(e):
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _modeling_module(model):
    """The modeling module whose apply_rotary_pos_emb the attention calls (llama, mistral, qwen2)."""
    arch = model.config.model_type
    if arch not in SUPPORTED_ARCHITECTURES:
        raise RecordError(f"unsupported architecture '{arch}': record_trace.py supports "
                          f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    import importlib
    try:
        module = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    except Exception as e:
        raise RecordError(f"cannot import transformers' {arch} code ({_first_line(e)}); install "
                          "python/requirements.txt with scripts/python-env") from None
    if not callable(getattr(module, "apply_rotary_pos_emb", None)):
        raise RecordError(f"transformers.models.{arch} has no apply_rotary_pos_emb: this transformers "
                          "version is not supported (use python/requirements.txt)")
    return module


# --------------------------------------------------------------------------------------------
# Capturing the attention's own tensors


class Capture:
    """Hooks on every attention layer; forward() runs the model once and returns, per layer,
    q [Hq, L, d], k/v [Hkv, L, d], o [Hq, L, d] (float32 torch tensors) and, when the forward
    asked for attention probabilities, colsum [Hq, L] (float64)."""

    def __init__(self, model):
        self.model = model
        self.module = _modeling_module(model)
        self.attn = [layer.self_attn for layer in model.model.layers]
        self.layer = None   # index of the attention module running now
        self.seen = None    # per layer: dict of what this forward captured
        self.handles = []
        self.original_rope = None

    def __enter__(self):
        self.original_rope = self.module.apply_rotary_pos_emb
        original = self.original_rope

        def rope(q, k, *args, **kwargs):  # the model's own RoPE, outputs copied on their way
            q_out, k_out = original(q, k, *args, **kwargs)
            self._put("q", q_out)
            self._put("k", k_out)
            return q_out, k_out

        self.module.apply_rotary_pos_emb = rope
        for index, attn in enumerate(self.attn):
            self.handles.append(attn.register_forward_pre_hook(self._enter_layer(index)))
            self.handles.append(attn.register_forward_hook(self._leave_layer))
            self.handles.append(attn.v_proj.register_forward_hook(
                lambda mod, args, out: self._put("v_proj", out)))
            self.handles.append(attn.o_proj.register_forward_pre_hook(
                lambda mod, args: self._put("o_proj", args[0])))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
        self.module.apply_rotary_pos_emb = self.original_rope
        return False

    def _enter_layer(self, index):
        def hook(module, args):
            self.layer = index
        return hook

    def _leave_layer(self, module, args, output):
        index, self.layer = self.layer, None
        # Eager attention returns (output, probabilities or None, ...): reduce and drop them.
        if isinstance(output, tuple) and len(output) > 1 and output[1] is not None:
            probs = output[1]
            if probs.dim() != 4 or probs.shape[0] != 1:
                raise RecordError(f"layer {index}: attention probabilities of shape {tuple(probs.shape)}, "
                                  "expected [1, q_heads, T, T]")
            self._put("colsum", probs[0].double().sum(dim=1), index)
            return (output[0], None) + tuple(output[2:])
        return output

    def _put(self, what, tensor, index=None):
        index = self.layer if index is None else index
        if index is None or self.seen is None:
            raise RecordError(f"captured '{what}' outside an attention layer: this model's attention "
                              "is not the supported Llama pattern")
        if what in self.seen[index]:
            raise RecordError(f"layer {index}: '{what}' was computed twice in one forward: this "
                              "model's attention is not the supported Llama pattern")
        self.seen[index][what] = tensor.detach().clone()

    def forward(self, **inputs):
        self.seen = [{} for _ in self.attn]
        out = self.model(**inputs)
        want_colsum = bool(inputs.get("output_attentions"))
        layers = []
        for index, got in enumerate(self.seen):
            missing = [w for w in ("q", "k", "v_proj", "o_proj") + (("colsum",) if want_colsum else ())
                       if w not in got]
            if missing:
                raise RecordError(f"layer {index}: the hooks did not see {', '.join(missing)}: this "
                                  "transformers version or model is not supported")
            q, k = got["q"][0].float(), got["k"][0].float()          # [H, L, d]
            hq, length, d = q.shape
            hkv = k.shape[0]
            if k.shape[1:] != (length, d) or hq % hkv:
                raise RecordError(f"layer {index}: q {tuple(q.shape)} and k {tuple(k.shape)} do not form GQA")
            # v_proj output and o_proj input are [1, L, heads * d], heads outermost.
            v = got["v_proj"][0].float().reshape(length, hkv, d).transpose(0, 1).contiguous()
            o = got["o_proj"][0].float().reshape(length, hq, d).transpose(0, 1).contiguous()
            layer = {"q": q.contiguous(), "k": k.contiguous(), "v": v, "o": o}
            if want_colsum:
                layer["colsum"] = got["colsum"]
            layers.append(layer)
        self.seen = None
        return out, layers


def _cache_layer(past, index):
    """(keys, values) of one layer of a transformers KV cache, whatever its class; None if unknown."""
    if hasattr(past, "key_cache"):                    # DynamicCache of the pinned transformers
        return past.key_cache[index], past.value_cache[index]
    if hasattr(past, "layers"):                       # later DynamicCache: one object per layer
        return past.layers[index].keys, past.layers[index].values
    if isinstance(past, (tuple, list)):               # legacy tuples
        return past[index][0], past[index][1]
    return None


def record(model, prompt_ids, decode_steps):
    """Runs prefill + greedy decode; returns a dict with everything the trace holds."""
    torch, _ = _import_torch_transformers()
    config = model.config
    vocab = config.vocab_size
    if not prompt_ids:
        raise RecordError("the prompt is empty")
    bad = [i for i in prompt_ids if not 0 <= i < vocab]
    if bad:
        raise RecordError(f"prompt id {bad[0]} is outside the vocabulary [0, {vocab})")
    if decode_steps < 0:
        raise RecordError(f"--decode-steps must be >= 0, got {decode_steps}")
    T, S = len(prompt_ids), decode_steps
    _check_config(config, T + S)

    with torch.no_grad(), Capture(model) as cap:
        ids = torch.tensor([prompt_ids], dtype=torch.long)
        # An explicit cache object keeps the model from converting to and from the deprecated
        # tuple format on every step.
        cache = _transformers_attr("DynamicCache")()
        out, prefill = cap.forward(input_ids=ids, past_key_values=cache, use_cache=True, output_attentions=True,
                                   **_last_logits_only(model))
        past = out.past_key_values
        generated = [int(out.logits[0, -1].argmax())]
        steps = []
        for _ in range(S):
            ids = torch.tensor([[generated[-1]]], dtype=torch.long)
            out, layers = cap.forward(input_ids=ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            generated.append(int(out.logits[0, -1].argmax()))
            steps.append(layers)

    layers = []
    for index, p in enumerate(prefill):
        layer = {"prefill_" + n: p[n].numpy() for n in ("q", "k", "v")}
        layer["attn_colsum"] = p["colsum"].numpy().astype(np.float32)
        for n in ("q", "k", "v", "o"):
            shape = (p[n].shape[0], 0, p[n].shape[2])
            layer["decode_" + n] = (torch.cat([s[index][n] for s in steps], dim=1).numpy() if steps
                                    else np.zeros(shape, np.float32))
        layers.append(layer)
        _check_against_cache(past, index, layer)

    first = prefill[0]
    return {
        "layers": layers,
        "q_heads": first["q"].shape[0], "kv_heads": first["k"].shape[0], "head_dim": first["q"].shape[2],
        "prompt_len": T, "decode_steps": S,
        "prompt_ids": list(prompt_ids), "generated_ids": generated,
        "rope_theta": _rope_theta(config), "rope_scaling": _rope_scaling_text(config),
    }


def _last_logits_only(model):
    """Asks for the logits of the last position only ([T, vocab] fp32 logits can be GiBs)."""
    import inspect
    params = inspect.signature(model.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):  # renamed in transformers 4.48
        if name in params:
            return {name: 1}
    return {}


def _check_against_cache(past, index, layer):
    """The recorded keys/values must be exactly what the model cached (and attended to)."""
    kv = _cache_layer(past, index)
    if kv is None:
        print(f"record_trace.py: warning: cannot read the KV cache ({type(past).__name__}); "
              "recorded keys not compared with it", file=sys.stderr)
        return
    for name, cached in zip(("k", "v"), kv):
        recorded = np.concatenate([layer["prefill_" + name], layer["decode_" + name]], axis=1)
        cached = cached[0].float().numpy()
        if cached.shape != recorded.shape or not np.array_equal(cached, recorded):
            raise RecordError(f"layer {index}: recorded {name} differ from the model's KV cache "
                              f"(shapes {recorded.shape} vs {cached.shape}): unsupported attention")


def _rope_theta(config):
    theta = getattr(config, "rope_theta", None)
    if theta is None:  # transformers 5 keeps it in rope_parameters
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    if theta is None or not float(theta) > 0:
        raise RecordError(f"the model config has no valid rope_theta ({theta!r})")
    return float(theta)


def _rope_scaling_text(config):
    """'none', or 'TYPE:FACTOR' followed by the other parameters, e.g. 'llama3:8.0 low_freq_factor=1.0'."""
    scaling = getattr(config, "rope_scaling", None) or {}
    scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
    kind = scaling.pop("rope_type", None) or scaling.pop("type", None)
    scaling.pop("type", None)
    if kind in (None, "default"):
        return "none"
    text = f"{kind}:{scaling.pop('factor', '?')}"
    text += "".join(f" {k}={v}" for k, v in sorted(scaling.items()))
    return text.encode("ascii", "replace").decode("ascii")[:4000]


# --------------------------------------------------------------------------------------------
# Writing schema v1


def _h5():
    import h5py
    return h5py


def _float16_type(h5py, fields, ebias):
    """A 16-bit IEEE-style float type built as docs/trace-format.md prescribes."""
    t = h5py.h5t.IEEE_F32LE.copy()
    t.set_fields(*fields)
    t.set_size(2)
    t.set_ebias(ebias)
    return t


def to_storage(x, dtype, what):
    """fp32 array -> (raw words in the file's byte layout, HDF5 type). Rounds to nearest even."""
    h5py = _h5()
    x = np.ascontiguousarray(x, dtype="<f4")
    if not np.isfinite(x).all():
        raise RecordError(f"{what} has NaN or Inf")
    if dtype == "float32":
        return x, h5py.h5t.IEEE_F32LE
    if dtype == "float16":
        with np.errstate(over="ignore"):
            words = x.astype("<f2")
        finite = np.isfinite(words)
        words = words.view("<u2")
        t = _float16_type(h5py, (15, 10, 5, 0, 10), 15)
    else:  # bfloat16: keep the top 16 bits of fp32, rounded to nearest even
        bits = x.view("<u4").astype(np.uint64)
        words = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
        finite = (words & 0x7F80) != 0x7F80
        t = _float16_type(h5py, (15, 7, 8, 0, 7), 127)
    if not finite.all():
        bad = x.reshape(-1)[np.argmin(finite.reshape(-1))]
        raise RecordError(f"{what}: value {bad} overflows {dtype}; record with a wider --dtype")
    return words, t


def _write_dataset(group, name, words, tid):
    """Chunked along tokens with fletcher32 like kvscope's writer; empty (S = 0) stays contiguous."""
    h5py = _h5()
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_obj_track_times(False)  # no timestamps: the same recording gives the same bytes
    if words.size:
        row_bytes = words.itemsize * (words.shape[2] if words.ndim == 3 else 1)
        tokens = max(1, min(words.shape[1], CHUNK_BYTES // row_bytes))
        dcpl.set_chunk((1, tokens) + words.shape[2:])
        dcpl.set_fletcher32()
    space = h5py.h5s.create_simple(words.shape)
    dset = h5py.h5d.create(group.id, name.encode(), tid, space, dcpl=dcpl)
    if words.size:  # memory type = file type: HDF5 converts nothing
        dset.write(h5py.h5s.ALL, h5py.h5s.ALL, words, mtype=tid)


def _group(parent, name):
    h5py = _h5()
    gcpl = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
    gcpl.set_obj_track_times(False)
    h5py.h5g.create(parent.id, name.encode(), gcpl=gcpl)
    return parent[name]


def _attr_string(obj, name, value):
    h5py = _h5()
    data = value.encode("ascii")
    tid = h5py.h5t.C_S1.copy()  # ASCII
    tid.set_size(len(data) + 1)
    tid.set_strpad(h5py.h5t.STR_NULLTERM)
    attr = h5py.h5a.create(obj.id, name.encode(), tid, h5py.h5s.create(h5py.h5s.SCALAR))
    attr.write(np.array(data, dtype=f"S{len(data) + 1}"), mtype=tid)


def write_trace(path, rec, model_name, dtype="float32"):
    """Writes `rec` (from record()) as schema v1; the file appears at `path` only when complete."""
    h5py = _h5()
    if dtype not in DTYPES:
        raise RecordError(f"--dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    tmp = path + ".partial"
    try:
        fcpl = h5py.h5p.create(h5py.h5p.FILE_CREATE)
        fcpl.set_obj_track_times(False)
        with h5py.File(h5py.h5f.create(tmp.encode(), h5py.h5f.ACC_TRUNC, fcpl=fcpl)) as f:
            layers = _group(f, "layers")
            for index, layer in enumerate(rec["layers"]):
                g = _group(layers, f"layer_{index}")
                pre, dec = _group(g, "prefill"), _group(g, "decode")
                for n in ("q", "k", "v"):
                    _write_dataset(pre, n, *to_storage(layer["prefill_" + n], dtype, f"layer {index}: prefill/{n}"))
                colsum = np.ascontiguousarray(layer["attn_colsum"], dtype="<f4")
                _write_dataset(pre, "attn_colsum", colsum, h5py.h5t.IEEE_F32LE)
                for n in ("q", "k", "v", "o"):
                    _write_dataset(dec, n, *to_storage(layer["decode_" + n], dtype, f"layer {index}: decode/{n}"))
            extra = _group(f, "recorder")  # ignored by kvscope; read by tests/python
            for name in ("prompt_ids", "generated_ids"):
                extra.create_dataset(name, data=np.array(rec[name], dtype="<i8"), track_times=False)
            # Root attributes last, as kvscope's writer does (an interrupted write has no 'schema').
            for name, value in (("schema", "kvscope.trace"), ("producer", PRODUCER),
                                ("model", model_name.encode("ascii", "replace").decode("ascii")[:4000]),
                                ("rope_scaling", rec["rope_scaling"]), ("rope_style", "neox"),
                                ("dtype", dtype)):
                _attr_string(f, name, value)
            ints = {"schema_version": 1, "layers": len(rec["layers"]), "q_heads": rec["q_heads"],
                    "kv_heads": rec["kv_heads"], "head_dim": rec["head_dim"], "prompt_len": rec["prompt_len"],
                    "decode_steps": rec["decode_steps"], "keys_post_rope": 1, "has_decode_outputs": 1,
                    "has_attn_colsum": 1}
            for name, value in ints.items():
                f.attrs.create(name, np.int64(value), dtype="<i8")
            f.attrs.create("rope_theta", np.float64(rec["rope_theta"]), dtype="<f8")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# --------------------------------------------------------------------------------------------
# Command line


def _parse_ids(words):
    ids = []
    for word in words:
        for part in word.replace(",", " ").split():
            try:
                ids.append(int(part))
            except ValueError:
                raise RecordError(f"--prompt-ids: '{part}' is not an integer token id") from None
    return ids


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv):
    p = _Parser(prog="record_trace.py",
                                description="Record a kvscope trace (HDF5 schema v1) from a Hugging Face causal LM.")
    p.add_argument("--model", help="hub name or local path of a llama/mistral/qwen2 model")
    p.add_argument("--tiny-random-llama", action="store_true",
                   help="record a tiny random Llama with GQA built from a fixed seed (no download)")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="prompt text (tokenized by the model's tokenizer)")
    prompt.add_argument("--prompt-ids", nargs="+", metavar="ID", help="prompt token ids (space or comma separated)")
    p.add_argument("--decode-steps", type=int, required=True, help="greedy decode steps S (>= 0)")
    p.add_argument("--out", required=True, help="trace file to write (.h5)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="storage dtype of q/k/v/o (default float32)")
    args = p.parse_args(argv)
    if args.tiny_random_llama == (args.model is not None):
        p.error("give exactly one of --model and --tiny-random-llama")
    if args.model is not None and args.prompt is None and args.prompt_ids is None:
        p.error("--model needs --prompt or --prompt-ids")
    if args.decode_steps < 0:
        p.error(f"--decode-steps must be >= 0, got {args.decode_steps}")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        p.error(f"--out: directory '{out_dir}' does not exist")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.tiny_random_llama:
            model, name = build_tiny_random_llama(), f"tiny-random-llama (seed {TINY_SEED})"
            if args.prompt_ids is not None:
                ids = _parse_ids(args.prompt_ids)
            elif args.prompt is not None:
                ids = list(args.prompt.encode("utf-8"))  # vocab 256: bytes are the tokens
            else:
                ids = tiny_prompt_ids()
        else:
            ids = _parse_ids(args.prompt_ids) if args.prompt_ids is not None else None
            model, name = load_model(args.model), args.model
            if ids is None:
                ids = _tokenize(args.model, args.prompt)
        rec = record(model, ids, args.decode_steps)
        write_trace(args.out, rec, name, args.dtype)
    except RecordError as e:
        print(f"record_trace.py: error: {e}", file=sys.stderr)
        return 2
    except (OSError, MemoryError) as e:
        print(f"record_trace.py: error: {_first_line(e)}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {name}, {len(rec['layers'])} layers, {rec['q_heads']} q heads, "
          f"{rec['kv_heads']} kv heads, head dim {rec['head_dim']}, prompt {rec['prompt_len']}, "
          f"decode {rec['decode_steps']}, {args.dtype}")
    return 0


def _tokenize(model_name, text):
    auto_tokenizer = _transformers_attr("AutoTokenizer")
    try:
        tokenizer = auto_tokenizer.from_pretrained(model_name)
    except Exception as e:
        raise RecordError(f"cannot load the tokenizer of '{model_name}': {_first_line(e)}") from None
    return list(tokenizer(text)["input_ids"])


if __name__ == "__main__":
    sys.exit(main())
