"""`seqkern bench` on a CPU: the workloads seqkern exists for, against what a CPU user would run.

Each workload is one call a deployed model makes over and over, at the sizes people run:

* `emformer-*` / `conv_emformer-*`: streaming `infer` of one segment (16 frames plus 4 of right
  context) from a warm state (left context and memory full), torchaudio's base-sized
  configuration (512 wide, 8 heads, ffn 2048, 20 layers) and a small one (256, 4, 1024, 6
  layers), batch 1 and 16;
* `mega-beam*`: the decoder side of one transducer beam-search step with 4 or 8 hypotheses
  (batch their states, `inference` on the last labels, split the states back), ESPnet's
  MEGADecoder (block_size 256, upstream's other defaults); `mega-forward`: its forward on
  B = 4, L = 512 labels with one ragged row;
* `beats-10s`: ESPnet's BeatsEncoder (12 x 768, relative position bias with the GRU gate) on
  10 s of 16 kHz audio;
* `ema-L4096`: MEGA's multi-head damped EMA over (2, 4096, 512), 4 heads.

Providers, timed side by side in interleaved rounds (each round runs every provider once in
turn, order reversed every other round; `ratio_vs[b]` is the median over rounds of
ms(b) / ms(seqkern), `ratio_range[b]` its min and max):

* `seqkern`: `seqkern.swap` of the upstream model (the same Parameters);
* `upstream`: the real ESPnet / torchaudio module when it can be had (seqkern.bench.upstream),
  otherwise the eager transcription the tests prove equal to it (seqkern's module on the
  `reference` backend), labelled as such;
* `compile`: `torch.compile` of the upstream model's call (regional for the Emformers: each
  layer's `infer`, as PyTorch recommends for repeated blocks);
* `ort`, `ort-nospin`: ONNX Runtime (the optional `onnxruntime` extra) on the same per-segment
  graph exported with `torch.onnx.export` (dynamo), at torch's thread count, with its worker
  threads spinning (ORT's default) and not.

Every provider's outputs (and every returned state) are compared with upstream's before it is
timed; a provider that disagrees is reported as an error, not timed. Setting up a peer costs
time (an inductor compile, an ONNX export): each peer's setup seconds are recorded, and a
`budget` (seconds for the whole run) leaves out the peers whose estimated setup no longer fits,
saying which.
"""

from __future__ import annotations

import copy
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

import seqkern
from seqkern import backends
from seqkern.bench import upstream as _upstream

PEERS = ("upstream", "compile", "ort", "ort-nospin")
ROUNDS = 5
ROUND_S = 0.25  # seconds per provider per round (at least one call)
TOLERANCE = 1e-4  # max |provider - upstream| allowed before timing (fp32; seqkern is ~1e-6)

# Setup seconds assumed for a peer before one has been measured in this run (2-core AMD EPYC,
# cold caches: an inductor compile of a small ConvEmformer's layer ~30 s, a dynamo ONNX export
# of a 6-layer model ~20 s); replaced by the last measured value as the run goes.
SETUP_GUESS_S = {"compile": 30.0, "ort": 20.0}

EMFORMER_SIZES = {
    "small": dict(input_dim=256, num_heads=4, ffn_dim=1024, num_layers=6),
    "base": dict(input_dim=512, num_heads=8, ffn_dim=2048, num_layers=20),
}
EMFORMER_STREAM = dict(
    segment_length=16,
    left_context_length=32,
    right_context_length=4,
    max_memory_size=4,
    dropout=0.0,
)
# ESPnet's BeatsEncoder at the BEATs iter3 shape (relative position bias with the GRU gate)
BEATS_BASE = dict(
    encoder_layers=12,
    encoder_embed_dim=768,
    encoder_ffn_embed_dim=3072,
    encoder_attention_heads=12,
    embed_dim=512,
    conv_pos=128,
    conv_pos_groups=16,
    relative_position_embedding=True,
    num_buckets=320,
    max_distance=1280,
    gru_rel_pos=True,
    deep_norm=True,
    dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
    dropout_input=0.0,
    encoder_layerdrop=0.0,
)
WARM_SEGMENTS = 5  # enough to fill the left context (2 segments) and the memory (4)


@dataclass
class Run:
    """One workload, set up: the callables each provider times and what they return."""

    upstream_label: str
    calls: dict[str, Callable[[], object]]  # provider -> a call of the workload
    backend: dict[str, str | None] = field(default_factory=dict)  # provider -> use_backend
    setup_s: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # provider -> why it is not here


@dataclass
class Workload:
    name: str
    title: str
    unit: str  # what one call is: "segment", "step", "forward"
    setup: Callable[[Callable[[str], bool]], Run]  # arg: may this peer be set up (budget)?


def _perturbed(model: nn.Module, seed: int) -> nn.Module:
    """Upstream initialises many biases to zero: perturb every parameter so each term counts."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


def _flat(out) -> list[Tensor]:
    """Every tensor in a nested output (tuples, lists, dicts), in order."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flat(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flat(v)]
    return []


def max_diff(got, want) -> float:
    """max |got - want| over every tensor of two outputs of the same structure."""
    a, b = _flat(got), _flat(want)
    if len(a) != len(b):
        raise ValueError(f"{len(a)} output tensors, upstream returns {len(b)}")
    diffs = [
        float((torch.as_tensor(x).double() - torch.as_tensor(y).double()).abs().max())
        for x, y in zip(a, b, strict=True)
        if torch.as_tensor(y).numel()
    ]
    return max(diffs, default=0.0)


# --------------------------------------------------------------------------------------------
# The peers


def _first_line(err: Exception, limit: int = 200) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()  # (torch.export colours its errors)
    line = f"{type(err).__name__}: {(text.splitlines() or [''])[0][:limit]}"
    if err.__cause__ is not None:  # torch.export's wrapper names the step; the cause says why
        line += f" <- {_first_line(err.__cause__, limit)}"
    return line


def _timed(run: Run, name: str, build: Callable[[], Callable[[], object]]) -> None:
    """Set up peer `name` (its first call included: compiles happen there), recording the
    seconds; an exception becomes the reason it is skipped."""
    start = time.perf_counter()
    try:
        call = build()
        call()
    except Exception as err:  # noqa: BLE001 - report the peer as missing, keep the rest
        run.skipped[name] = _first_line(err)
        return
    run.calls[name] = call
    run.setup_s[name] = time.perf_counter() - start


def _ort_sessions(
    run: Run,
    module: nn.Module,
    args: tuple,
    unpack: Callable,
    allowed,
    feed: Callable[[], tuple] | None = None,
) -> None:
    """ONNX Runtime peers: `module(*args)` exported once (dynamo exporter), one session with
    ORT's spinning worker threads and one without. Each call feeds `feed()` (default: `args`;
    e.g. the step's batched states, built in Python as upstream's beam search does) and gives
    the outputs to `unpack`, which returns them in upstream's output structure."""
    try:
        import onnxruntime as ort
    except ImportError:
        for name in ("ort", "ort-nospin"):
            run.skipped[name] = "onnxruntime is not installed (pip install onnxruntime onnxscript)"
        return
    if not allowed("ort"):
        return
    start = time.perf_counter()
    path = Path(tempfile.mkdtemp(prefix="seqkern-bench-")) / "model.onnx"
    failures = []
    for dynamo in (True, False):  # the dynamo exporter, else the TorchScript one
        try:
            kw = dict(dynamo=True, optimize=True) if dynamo else dict(dynamo=False)
            torch.onnx.export(module, args, str(path), verbose=False, **kw)
            break
        except Exception as err:  # noqa: BLE001
            failures.append(f"{'dynamo' if dynamo else 'torchscript'}: {_first_line(err)}")
    else:
        reason = "torch.onnx.export failed (" + "; ".join(failures) + ")"
        run.skipped.update({"ort": reason, "ort-nospin": reason})
        return
    export_s = time.perf_counter() - start
    fixed = [a.numpy() for a in args]
    for name, spin in (("ort", "1"), ("ort-nospin", "0")):

        def build(spin=spin):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = torch.get_num_threads()
            opts.inter_op_num_threads = 1
            opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            names = [i.name for i in sess.get_inputs()]

            def call():
                values = fixed if feed is None else [a.numpy() for a in feed()]
                outs = sess.run(None, dict(zip(names, values, strict=True)))
                return unpack([torch.from_numpy(o) for o in outs])

            return call

        _timed(run, name, build)
        if name in run.setup_s:
            run.setup_s[name] += export_s


class _FirstOutput(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args: Tensor) -> Tensor:
        return self.model(*args)[0]


def _transcription_only(run: Run, up_backend: str | None, upstream: str) -> bool:
    """Where the upstream row is seqkern's transcription (`up_backend` set), the peers have
    nothing real to compile or export: mark them so and say True."""
    run.backend["upstream"] = up_backend
    if up_backend is None:
        return False
    why = f"needs the real {upstream} module (run tests/upstream/fetch.py)"
    run.skipped.update({p: why for p in ("compile", "ort", "ort-nospin")})
    return True


class _StepArgs(nn.Module):
    """`decoder.inference(labels, states)` with the per-block state dicts flattened into
    arguments and results (`nested` / `flat` convert)."""

    def __init__(self, decoder: nn.Module, nested: Callable, flat: Callable):
        super().__init__()
        self.decoder, self.nested, self.flat = decoder, nested, flat

    def forward(self, labels: Tensor, *flat: Tensor):
        out, states = self.decoder.inference(labels, self.nested(list(flat)))
        return (out, *self.flat(states))


class _StateArgs(nn.Module):
    """`model.infer(x, lengths, states)` with the states flattened into arguments (an ONNX
    graph takes tensors, not a list of lists)."""

    def __init__(self, model: nn.Module, per_layer: int):
        super().__init__()
        self.model, self.per_layer = model, per_layer

    def forward(self, x: Tensor, lengths: Tensor, *flat: Tensor):
        n = self.per_layer
        states = [list(flat[i : i + n]) for i in range(0, len(flat), n)]
        y, out_lengths, new_states = self.model.infer(x, lengths, states)
        return (y, out_lengths, *[t for s in new_states for t in s])


# --------------------------------------------------------------------------------------------
# Emformer / ConvEmformer streaming


def _emformer_setup(kind: str, size: str, batch: int):
    def setup(allowed) -> Run:
        cfg = {**EMFORMER_SIZES[size], **EMFORMER_STREAM}
        if kind == "conv_emformer":
            cfg["kernel_size"] = 8
        found = _upstream.torchaudio_emformers()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            if found is not None:
                cls = found[1] if kind == "conv_emformer" else found[0]
                up = _perturbed(cls(**cfg), 1)
                sk = seqkern.swap(copy.deepcopy(up))
                label, up_backend = found[2], None
            else:
                from seqkern.modules import emformer as ours

                cls = ours.ConvEmformer if kind == "conv_emformer" else ours.Emformer
                up = sk = _perturbed(cls(**cfg), 1)
                label = "eager transcription (seqkern's module on the reference backend)"
                up_backend = "reference"
        gen = torch.Generator().manual_seed(2)
        width = cfg["segment_length"] + cfg["right_context_length"]
        windows = [
            torch.randn(batch, width, cfg["input_dim"], generator=gen)
            for _ in range(WARM_SEGMENTS + 1)
        ]
        lengths = torch.full((batch,), width)
        states = None
        with torch.inference_mode(), backends.use_backend(up_backend) if up_backend else _null():
            for w in windows[:-1]:
                _, _, states = up.infer(w, lengths, states)
        x = windows[-1]

        def call(model):
            def step():
                # infer replaces entries of the state lists it is given: a fresh copy per call
                with torch.inference_mode():
                    return model.infer(x, lengths, [list(s) for s in states])

            return step

        run = Run(label, {"seqkern": call(sk), "upstream": call(up)})
        if _transcription_only(run, up_backend, "torchaudio"):
            return run
        if allowed("compile"):

            def compiled():
                cm = copy.deepcopy(up)
                for layer in cm.emformer_layers:
                    layer.infer = torch.compile(layer.infer, dynamic=False)
                return call(cm)

            _timed(run, "compile", compiled)
        flat = [t for s in states for t in s]
        per_layer = len(states[0])
        layers = len(states)

        def unpack(outs):
            y, out_lengths, rest = outs[0], outs[1], outs[2:]
            new = [list(rest[i * per_layer : (i + 1) * per_layer]) for i in range(layers)]
            return y, out_lengths, new

        _ort_sessions(run, _StateArgs(up, per_layer), (x, lengths, *flat), unpack, allowed)
        return run

    return setup


# --------------------------------------------------------------------------------------------
# MEGA decoder


def _mega_decoder():
    """(decoder, label, backend for its upstream row, seqkern's decoder)."""
    found = _upstream.espnet_class("espnet2.asr_transducer.decoder.mega_decoder", "MEGADecoder")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if found is not None:
            up = _perturbed(found[0](256, block_size=256), 1)
            up.set_device(torch.device("cpu"))
            sk = seqkern.swap(copy.deepcopy(up))
            return up, found[1], None, sk
        from seqkern.modules.mega import MEGADecoder

        up = _perturbed(MEGADecoder(256, block_size=256), 1)
        up.set_device(torch.device("cpu"))
        label = "eager transcription (seqkern's module on the reference backend)"
        return up, label, "reference", up


def _mega_beam_setup(beam: int, warm_steps: int = 8):
    def setup(allowed) -> Run:
        up, label, up_backend, sk = _mega_decoder()
        gen = torch.Generator().manual_seed(2)
        labels = torch.randint(1, up.vocab_size, (warm_steps + 1, beam, 1), generator=gen)
        with torch.no_grad(), backends.use_backend(up_backend) if up_backend else _null():
            hyps = [up.init_state() for _ in range(beam)]
            for t in range(warm_steps):
                _, batch = up.inference(labels[t], up.create_batch_states(hyps))
                hyps = [up.select_state(batch, i) for i in range(beam)]
        last = labels[-1]

        def call(dec, inference=None):
            inference = inference or dec.inference

            def step():
                with torch.inference_mode():
                    out, batch = inference(last, dec.create_batch_states(hyps))
                    return out, [dec.select_state(batch, i) for i in range(beam)]

            return step

        run = Run(label, {"seqkern": call(sk), "upstream": call(up)})
        if _transcription_only(run, up_backend, "ESPnet"):
            return run
        if allowed("compile"):
            _timed(run, "compile", lambda: call(up, torch.compile(up.inference, dynamic=False)))
        keys = sorted(hyps[0][0])  # each block's state: ema_state, prev_key, prev_value

        def flat(batch):
            return [block[k] for block in batch for k in keys]

        def nested(ts):
            return [dict(zip(keys, ts[i : i + len(keys)])) for i in range(0, len(ts), len(keys))]

        def unpack(outs):
            batch = nested(outs[1:])
            return outs[0], [up.select_state(batch, i) for i in range(beam)]

        batch = up.create_batch_states(hyps)
        _ort_sessions(
            run,
            _StepArgs(up, nested, flat),
            (last, *flat(batch)),
            unpack,
            allowed,
            feed=lambda: (last, *flat(up.create_batch_states(hyps))),
        )
        return run

    return setup


def _mega_forward_setup(batch: int = 4, length: int = 512):
    def setup(allowed) -> Run:
        up, label, up_backend, sk = _mega_decoder()
        gen = torch.Generator().manual_seed(2)
        labels = torch.randint(1, up.vocab_size, (batch, length), generator=gen)
        labels[:, 0] = 0  # the transducer's leading blank
        labels[-1, int(length * 0.75) :] = 0  # one ragged (right-padded) row

        def call(fn):
            def forward():
                with torch.inference_mode():
                    return fn(labels)

            return forward

        run = Run(label, {"seqkern": call(sk), "upstream": call(up)})
        if _transcription_only(run, up_backend, "ESPnet"):
            return run
        if allowed("compile"):
            _timed(run, "compile", lambda: call(torch.compile(up, dynamic=False)))
        _ort_sessions(run, up, (labels,), lambda outs: outs[0], allowed)
        return run

    return setup


# --------------------------------------------------------------------------------------------
# BEATs encoder, EMA


def _beats_setup(seconds: float = 10.0, batch: int = 1):
    def setup(allowed) -> Run:
        found = _upstream.espnet_class("espnet2.asr.encoder.beats_encoder", "BeatsEncoder")
        if found is None:
            raise _NoUpstream(
                "ESPnet's BeatsEncoder cannot be imported (it needs torchaudio importable), "
                "and seqkern has no transcription of the whole encoder"
            )
        cfg = BEATS_BASE

        def make():  # twice: weight_norm's computed weight keeps deepcopy off this model
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                return _perturbed(found[0](input_size=1, beats_config=cfg), 1)

        up, sk = make(), seqkern.swap(make())
        gen = torch.Generator().manual_seed(2)
        wav = torch.randn(batch, int(16000 * seconds), generator=gen)
        ilens = torch.full((batch,), wav.shape[1])

        def call(enc):
            def forward():
                with torch.inference_mode():
                    return enc(wav, ilens)[0]

            return forward

        run = Run(found[1], {"seqkern": call(sk), "upstream": call(up)})
        if allowed("compile"):
            _timed(run, "compile", lambda: call(torch.compile(up, dynamic=False)))
        _ort_sessions(run, _FirstOutput(up), (wav, ilens), lambda outs: outs[0], allowed)
        return run

    return setup


def _ema_setup(batch: int = 2, length: int = 4096, dim: int = 512, heads: int = 4):
    def setup(allowed) -> Run:
        from seqkern.bench.mega import _ema_upstream
        from seqkern.ops.ema import ema

        gen = torch.Generator().manual_seed(0)
        signs = torch.tensor([(-1.0) ** i for i in range(heads)]).view(1, heads, 1)
        x = torch.randn(batch, length, dim, generator=gen)
        damping = 0.5 * torch.randn(dim, heads, 1, generator=gen)
        decay = 0.5 * torch.randn(dim, heads, 1, generator=gen)
        expansion = signs + 0.1 * torch.randn(dim, heads, 1, generator=gen)
        projection = torch.randn(dim, heads, generator=gen)
        omega = torch.randn(dim, generator=gen)
        args = (x, damping, decay, expansion, projection, omega)

        def call(fn):
            def forward():
                with torch.inference_mode():
                    return fn(*args)

            return forward

        run = Run(
            "eager transcription of ESPnet's FFT formulation (seqkern.reference.ema)",
            {
                "seqkern": call(lambda *a: ema(*a[:5], omega=a[5])),
                "upstream": call(_ema_upstream),
            },
        )
        if allowed("compile"):
            _timed(run, "compile", lambda: call(torch.compile(_ema_upstream, dynamic=False)))
        why = "an op, not a model: no ONNX graph"
        run.skipped.update({"ort": why, "ort-nospin": why})
        return run

    return setup


class _NoUpstream(RuntimeError):
    pass


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _emformer_workloads(batch: int) -> list[Workload]:
    out = []
    for size in ("small", "base"):
        for kind, title in (("conv_emformer", "ConvEmformer"), ("emformer", "Emformer")):
            c = EMFORMER_SIZES[size]
            out.append(
                Workload(
                    f"{kind}-{size}-b{batch}",
                    f"{title} {size} ({c['input_dim']} wide, {c['num_layers']} layers) "
                    f"infer, B={batch}",
                    "segment",
                    _emformer_setup(kind, size, batch),
                )
            )
    return out


# In priority order: what a budget cuts comes last.
WORKLOADS: list[Workload] = [
    *_emformer_workloads(1),
    Workload("mega-beam4", "MEGA decoder beam-4 step", "step", _mega_beam_setup(4)),
    Workload("mega-beam8", "MEGA decoder beam-8 step", "step", _mega_beam_setup(8)),
    Workload("mega-forward", "MEGA decoder forward, B=4, L=512", "forward", _mega_forward_setup()),
    Workload("ema-L4096", "MEGA EMA (2, 4096, 512), 4 heads", "forward", _ema_setup()),
    Workload("beats-10s", "BEATs encoder (12 x 768), 10 s of audio", "forward", _beats_setup()),
    *_emformer_workloads(16),
]
BY_NAME = {w.name: w for w in WORKLOADS}


# --------------------------------------------------------------------------------------------
# The run


def run(
    names: list[str], budget_s: float | None, progress: bool = True, rounds: int = ROUNDS
) -> list[dict]:
    """Set up, check and time each named workload in turn; one row per (workload, provider),
    a skipped provider or workload included with its reason. `budget_s` (None: no limit) leaves
    out the peers whose estimated setup does not fit in what is left once every remaining
    workload has kept RESERVE_S for its own timing, and the workloads begun past it."""
    from seqkern.bench import _median, _Progress, time_rounds

    start = time.perf_counter()
    estimate = dict(SETUP_GUESS_S)
    rows: list[dict] = []
    bar = _Progress(len(names), progress)
    for i, name in enumerate(names):
        w = BY_NAME[name]
        base = dict(workload=w.name, title=w.title, unit=w.unit)

        def left() -> float:
            return float("inf") if not budget_s else budget_s - (time.perf_counter() - start)

        cut: dict[str, str] = {}
        n_left = len(names) - i

        def allowed(peer: str, cut=cut, n_left=n_left) -> bool:
            need = estimate[peer] + RESERVE_S * n_left
            if left() >= need:
                return True
            cut[peer] = (
                f"left out by the {budget_s:.0f} s budget (its setup, about "
                f"{estimate[peer]:.0f} s, did not fit); --budget 0 runs every peer"
            )
            return False

        if left() < RESERVE_S:
            rows.append(
                {**base, "provider": None, "skipped": f"left out by the {budget_s:.0f} s budget"}
            )
            bar.step(f"{w.name} (left out)")
            continue
        try:
            r = w.setup(allowed)
        except _NoUpstream as err:
            rows.append({**base, "provider": None, "skipped": str(err)})
            bar.step(f"{w.name} (no upstream)")
            continue
        for peer, why in cut.items():
            r.skipped.setdefault(peer, why)
            if peer == "ort":
                r.skipped.setdefault("ort-nospin", why)
        for peer, seconds in r.setup_s.items():
            if peer in estimate:
                estimate[peer] = seconds
        # outputs first: a provider that disagrees with upstream is an error, not a time
        with (
            backends.use_backend(r.backend.get("upstream"))
            if r.backend.get("upstream")
            else _null()
        ):
            want = r.calls["upstream"]()
        errors, max_err = {}, {}
        for p, fn in r.calls.items():
            if p == "upstream":
                continue
            try:
                max_err[p] = max_diff(fn(), want)
                if not max_err[p] <= TOLERANCE:
                    errors[p] = f"differs from upstream by {max_err[p]:.2e} (> {TOLERANCE:.0e})"
            except Exception as err:  # noqa: BLE001
                errors[p] = _first_line(err)
        order = [p for p in ("seqkern", *PEERS) if p in r.calls and p not in errors]
        timed = time_rounds(
            [r.calls[p] for p in order],
            torch.device("cpu"),
            quick=False,
            kernel_backends=[r.backend.get(p) for p in order],
            rounds=rounds,
            round_s=ROUND_S,
            min_calls=1,
        )
        per_round = {p: t[0] for p, t in zip(order, timed, strict=True)}
        for p in ("seqkern", *PEERS):
            row = {**base, "provider": p}
            if p == "upstream":
                row["label"] = r.upstream_label
            if p in r.setup_s:
                row["setup_s"] = r.setup_s[p]
            if p in max_err:
                row["max_err"] = max_err[p]
            if p in errors:
                row["error"] = errors[p]
            elif p in per_round:
                ms, iters = per_round[p], dict(zip(order, (t[1] for t in timed)))[p]
                row.update(ms=_median(ms), round_ms=ms, iters=iters)
            else:
                row["skipped"] = r.skipped.get(p, "not available")
            rows.append(row)
        seq = per_round.get("seqkern")
        if seq:
            row = next(x for x in rows if x["workload"] == w.name and x["provider"] == "seqkern")
            ratios = {
                b: [t / s for t, s in zip(per_round[b], seq, strict=True)]
                for b in PEERS
                if b in per_round
            }
            row["ratio_vs"] = {b: _median(x) for b, x in ratios.items()}
            row["ratio_range"] = {b: (min(x), max(x)) for b, x in ratios.items()}
        bar.step(w.name)
    bar.close()
    return rows


RESERVE_S = 8.0  # seconds kept for timing each workload not yet run, when a budget is set


def _cell(row: dict, peer: str) -> str:
    ratio = row.get("ratio_vs", {}).get(peer)
    if ratio is None:
        return "-"
    lo, hi = row["ratio_range"][peer]
    return f"{ratio:.2f}x ({lo:.2f}-{hi:.2f})"


def table(rows: list[dict]) -> str:
    """The headline: per workload, seqkern's ms per call and each peer's time over seqkern's
    (median over the rounds, min-max), then what each upstream row is and why cells are empty."""
    from seqkern.bench import _grid

    head = ["workload", "per", "seqkern ms", "upstream ms"] + [f"vs {p}" for p in PEERS]
    body, notes, labels = [], [], {}
    for name in dict.fromkeys(r["workload"] for r in rows):
        wrows = {r["provider"]: r for r in rows if r["workload"] == name}
        if None in wrows:
            notes.append(f"{name}: not run: {wrows[None]['skipped']}")
            continue
        seq, up = wrows["seqkern"], wrows["upstream"]
        fmt = lambda r: f"{r['ms']:.3f}" if r.get("ms") else ("ERROR" if r.get("error") else "-")  # noqa: E731
        body.append([name, seq["unit"], fmt(seq), fmt(up)] + [_cell(seq, p) for p in PEERS])
        labels.setdefault(up.get("label", "?"), []).append(name)
        for p, r in wrows.items():
            if r.get("error"):
                notes.append(f"{name} {p}: ERROR {r['error']}")
            elif r.get("skipped"):
                notes.append(f"{name} {p}: {r['skipped']}")
    lines = [
        "headline: peer ms / seqkern ms per call, median over the interleaved rounds (min-max);"
        " above 1: seqkern is faster",
        "",
        *_grid(head, body),
        "",
    ]
    lines += [f"upstream = {label}: {', '.join(ws)}" for label, ws in labels.items()]
    setups = [
        f"{r['workload']} {r['provider']} {r['setup_s']:.0f} s"
        for r in rows
        if r.get("setup_s") is not None
    ]
    if setups:
        lines.append("peer setup (compile / export, not in the timings): " + ", ".join(setups))
    return "\n".join(lines + notes)


def plot(rows: list[dict], path: Path, title: str) -> bool:
    """Each peer's time over seqkern's per workload (log scale, 1 marked): a bar right of the
    line is a workload where seqkern is faster than that peer. Whiskers: min-max over rounds."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from seqkern.bench import COLORS

    seq = [r for r in rows if r["provider"] == "seqkern" and r.get("ratio_vs")]
    if not seq:
        return False
    peers = [p for p in PEERS if any(p in r["ratio_vs"] for r in seq)]
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(seq) * max(1, len(peers)) / 2 + 2))
    height = 0.8 / len(peers)
    for j, peer in enumerate(peers):
        ys, vals, err = [], [], [[], []]
        for i, r in enumerate(seq):
            if peer in r["ratio_vs"]:
                v = r["ratio_vs"][peer]
                lo, hi = r["ratio_range"][peer]
                ys.append(i + j * height)
                vals.append(v)
                err[0].append(v - lo)
                err[1].append(hi - v)
        ax.barh(ys, vals, height, xerr=err, label=peer, color=COLORS.get(peer, "#bcbd22"))
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(seq))])
    ax.set_yticklabels([f"{r['workload']} (per {r['unit']})" for r in seq], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("peer time / seqkern time (log; right of 1: seqkern is faster)")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def markdown(result: dict) -> str:
    """A workload run's JSON as the README's Markdown table (`seqkern bench --markdown FILE`):
    the machine and run, then per workload seqkern's ms per call and each peer's time over
    seqkern's, median [min, max] over the rounds; an empty cell says the peer did not run."""
    rows = result["rows"]
    cpu = result.get("cpu", {}).get("model") or result["device"]
    lines = [
        f"{cpu}, {result['threads']} threads, fp32, torch {result['torch']}, "
        f"{result['rounds']} interleaved rounds, seqkern {result['commit']}, {result['date']}; "
        "each cell: the peer's time / seqkern's, median [min, max] (above 1: seqkern is faster)",
        "",
        "| workload | per | seqkern ms | upstream ms | "
        + " | ".join(f"vs {p}" for p in PEERS)
        + " |",
        "|---|---|---:|---:|" + "---:|" * len(PEERS),
    ]
    for name in dict.fromkeys(r["workload"] for r in rows):
        wrows = {r["provider"]: r for r in rows if r["workload"] == name}
        seq, up = wrows.get("seqkern"), wrows.get("upstream")
        if seq is None or up is None or not seq.get("ms"):
            continue
        cells = []
        for p in PEERS:
            v = seq.get("ratio_vs", {}).get(p)
            if v is None:
                cells.append("")
                continue
            lo, hi = seq["ratio_range"][p]
            cells.append(f"**{v:.2f}**" if v >= 1 else f"{v:.2f}")
            cells[-1] += f" [{lo:.2f}, {hi:.2f}]"
        ms = f"{up['ms']:.3f}" if up.get("ms") else ""
        lines.append(
            f"| {name} | {seq['unit']} | {seq['ms']:.3f} | {ms} | " + " | ".join(cells) + " |"
        )
    labels: dict[str, list[str]] = {}
    for r in rows:
        if r["provider"] == "upstream" and r.get("label"):
            labels.setdefault(r["label"], []).append(r["workload"])
    lines.append("")
    lines += [f"- upstream = {label}: {', '.join(ws)}" for label, ws in labels.items()]
    return "\n".join(lines) + "\n"
