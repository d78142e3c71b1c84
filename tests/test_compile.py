"""torch.compile over the model: the kernel ops as custom ops (`kernels.library`), the row-sparse graph
break, the cached backend choice, the device-side id check and `parallel.compile`.

Parity tests compile with `backend="aot_eager"`: dynamo and AOTAutograd trace the blocks (exercising
the custom ops' fake and autograd registrations) but run the traced aten ops without inductor's
fusions, so compiled and eager losses agree to round-off. An inductor run is a slow test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kernels
from project.config import ConfigError, ModelConfig
from project.lit_module import LMModule
from project.model import Transformer
from project.optim import OptimConfig, build_optimizer
from project.parallel import compile_backend

TINY = {
    "vocab_size": 64,
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 2,
    "max_seq_len": 16,
    "n_routed_experts": 4,
    "moe_top_k": 2,
}
OP_OF = {"jtok": "jtok_gate", "jtok_m": "jtok_m_mix", "moe_jtok": "jtok_gate", "moe_jtok_m": "jtok_m_mix"}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch (no cache or recompile limit carried over) on the reference backend."""
    torch._dynamo.reset()
    kernels.set_backend("reference")
    yield
    kernels.set_backend(None)
    torch._dynamo.reset()


class Recorder:
    """A dynamo backend that records every graph's call targets, then runs it with `backend`."""

    def __init__(self, backend: str = "aot_eager"):
        self.backend, self.graphs = backend, []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return torch._dynamo.lookup_backend(self.backend)(gm, example_inputs)

    def calls(self, op: str) -> int:
        """How often the graphs call custom op `jtok::op` (one graph may serve several blocks)."""
        return sum(t in (f"jtok.{op}", f"jtok.{op}.default") for graph in self.graphs for t in graph)


def train_losses(variant: str, table_optimizer: str, backend=None, steps: int = 2):
    """(losses of `steps` optimizer steps, the first backward's gradients by parameter name (dense), the model)
    of a tiny model, its blocks compiled with `backend` or eager."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_dict(dict(variant=variant, **TINY)))
    optim_cfg = OptimConfig.from_dict({"table_optimizer": table_optimizer, "warmup_steps": 0})
    model.use_row_sparse_grads(optim_cfg.row_sparse_tables)
    opt, _ = build_optimizer(model, optim_cfg, steps)
    if backend is not None:
        for block in model.layers:
            block.compile(backend=backend)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    losses, grads = [], {}
    for _ in range(steps):
        out = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 64), ids[:, 1:].reshape(-1)) + out.aux_loss
        opt.zero_grad()
        loss.backward()
        if not grads:
            grads = {name: _dense(p.grad) for name, p in model.named_parameters() if p.grad is not None}
        opt.step()
        losses.append(loss.item())
    return losses, grads, model


def _dense(grad: torch.Tensor) -> torch.Tensor:
    return grad.to_dense() if grad.is_sparse else grad.clone()


def assert_grads_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float, rtol: float) -> None:
    """Each parameter's gradient within tolerance, the failure naming the parameter."""
    assert set(got) == set(want), set(got) ^ set(want)
    for name, want_grad in want.items():
        try:
            torch.testing.assert_close(got[name], want_grad, atol=atol, rtol=rtol)
        except AssertionError as err:
            raise AssertionError(f"{name}: {err}") from None


# Every variant once, the three ops each with dense (adamw) and row-sparse (adam) table gradients.
CASES = [
    ("baseline", "adamw"),
    ("moe", "adamw"),
    ("jtok", "adam"),
    ("jtok_m", "adam"),
    ("moe_jtok", "adamw"),
    ("moe_jtok_m", "adamw"),
    ("moe_jtok_m", "adam"),
]


@pytest.mark.parametrize("variant,table_optimizer", CASES)
def test_compiled_model_trains_like_eager(variant, table_optimizer):
    want, want_grads, _ = train_losses(variant, table_optimizer)
    rec = Recorder()
    got, got_grads, model = train_losses(variant, table_optimizer, rec)
    # aot_eager runs the eager model's aten ops in the same order (the custom ops' reference backward
    # recomputes the same forward), so only round-off may differ: seen equal losses and gradients <= 3e-8
    # apart (the MoE's). Gradients are compared one by one: Adam's normalisation hides a constant factor.
    assert set(want_grads) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert_grads_close(got_grads, want_grads, atol=1e-6, rtol=1e-5)
    assert got == pytest.approx(want, abs=1e-5), (got, want)
    assert rec.graphs, "nothing was compiled"
    assert (rec.calls("moe_experts") > 0) == variant.startswith("moe")
    row_sparse = table_optimizer == "adam" and variant in OP_OF
    # one graph serves both blocks; the row-sparse call is a graph break (resumed in further graphs)
    assert (len(rec.graphs) > 1) == row_sparse, rec.graphs
    if variant in OP_OF:
        # dense table gradients: the op is in the graph; row-sparse ones: it runs eagerly behind a graph break
        assert (rec.calls(OP_OF[variant]) > 0) == (not row_sparse)
        layouts = {t.weight.grad.layout for t in model.token_tables()}
        assert layouts == {torch.sparse_coo if row_sparse else torch.strided}


def _op_cases(gen: torch.Generator):
    """Small inputs of each custom op (N=7 tokens, d=6, V=5, n_e=3, K=2, E=4 experts of F=8), with the
    differentiable ones as leaves."""
    N, D, V, K = 7, 6, 5, 2

    def leaf(*shape):
        return torch.randn(*shape, generator=gen).requires_grad_(True)

    ids = torch.randint(0, V, (N,), generator=gen)
    w = torch.rand(N, K, generator=gen).requires_grad_(True)
    return {
        "jtok_gate": (leaf(N, D), ids, leaf(V, D), leaf(D), 1e-6, leaf(N, D)),
        "jtok_m_mix": (ids, leaf(3, V, D), torch.randint(0, 3, (N, K), generator=gen), w, leaf(D), 0.5, 1e-6),
        "moe_experts": (
            leaf(N, D),
            torch.randint(0, 4, (N, K), generator=gen),
            w,
            leaf(4, D, 8),
            leaf(4, D, 8),
            leaf(4, 8, D),
        ),
    }


def _first(out):
    return out[0] if isinstance(out, (list, tuple)) else out


def _leaves(args) -> list[torch.Tensor]:
    return [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


def _upstream(like: torch.Tensor) -> torch.Tensor:
    return torch.randn(like.shape, generator=torch.Generator().manual_seed(1)).to(like.dtype)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_custom_ops_pass_opcheck_and_match_the_reference(backend):
    use_triton = backend == "triton"  # the Triton functions through the interpreter (conftest), float32
    for name, args in _op_cases(torch.Generator().manual_seed(0)).items():
        op = getattr(torch.ops.jtok, name)
        result = torch.library.opcheck(op, (*args, use_triton))
        assert set(result.values()) == {"SUCCESS"}, (name, result)
        got = _first(op(*args, use_triton))
        want = getattr(kernels.reference, name)(*args)
        up = _upstream(want)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        for g, r in zip(torch.autograd.grad(got, _leaves(args), up), torch.autograd.grad(want, _leaves(args), up)):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_custom_op_skips_a_frozen_table_gradient(backend, monkeypatch):
    m, ids, table, scale, eps, res = _op_cases(torch.Generator().manual_seed(0))["jtok_gate"]
    calls, backward = [], torch.ops.jtok.jtok_gate_backward

    def spy(*args):
        out = backward(*args)
        calls.append((args[7], len(out)))  # (table_grad, the gradients returned)
        return out

    monkeypatch.setattr(torch.ops.jtok, "jtok_gate_backward", spy)
    for frozen in (True, False):
        tab = table.detach() if frozen else table
        wrt = (m, scale) if frozen else (m, scale, tab)
        calls.clear()
        out = kernels.library.jtok_gate(m, ids, tab, scale, eps, res, backend == "triton")
        grads = torch.autograd.grad(out.sum(), wrt)
        # a frozen table: the backward op is told so and returns no table-sized gradient
        assert calls == [(not frozen, 2 if frozen else 3)], calls
        want = torch.autograd.grad(kernels.reference.jtok_gate(m, ids, tab, scale, eps, res).sum(), wrt)
        for g, r in zip(grads, want):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_a_backend_change_after_compiling_recompiles():
    """The backend reaches the ops as a static argument: switching it re-traces (no stale fake/real mix)."""
    cases = _op_cases(torch.Generator().manual_seed(0))
    rec = Recorder()
    compiled = {name: torch.compile(getattr(kernels, name), backend=rec) for name in cases}
    results = {}
    for backend in ("reference", "triton"):  # triton: the interpreter on CPU tensors, float32
        kernels.set_backend(backend)
        for name, args in cases.items():
            out = compiled[name](*args)
            results[backend, name] = (out.detach(), *torch.autograd.grad(out, _leaves(args), _upstream(out)))
    assert len(rec.graphs) == 2 * len(cases), rec.graphs  # one graph per op and backend
    for name in cases:
        for got, want in zip(results["triton", name], results["reference", name]):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_reference_ops_run_without_autocast_as_their_fakes_promise():
    """Under CPU autocast (bf16): each op's output has its fake's dtype, and float32 operands are computed
    in float32 (to 1e-5; autocast's bf16 matmuls would be ~1e-2 off); the compiled entry points equal the
    eager ones to bf16 round-off (2e-2: both compute the experts in bf16 under autocast)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    rec = Recorder()
    for name, args in _op_cases(torch.Generator().manual_seed(0)).items():
        op = getattr(torch.ops.jtok, name)
        mode = FakeTensorMode()
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        want = getattr(kernels.reference, name)(*args)
        want_grads = torch.autograd.grad(want, _leaves(args), _upstream(want))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with mode:
                promised = _first(op(*fake_args, False))
            real = _first(op(*args, False))
            real_grads = torch.autograd.grad(real, _leaves(args), _upstream(real))
            eager = getattr(kernels, name)(*args)
            compiled = torch.compile(getattr(kernels, name), backend=rec)(*args)
        assert real.dtype == promised.dtype and real.stride() == promised.stride(), (name, real.dtype, promised)
        torch.testing.assert_close(real, want, atol=1e-5, rtol=1e-4)
        for g, r in zip(real_grads, want_grads):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
        assert compiled.dtype == eager.dtype, (name, compiled.dtype, eager.dtype)
        torch.testing.assert_close(compiled, eager, atol=2e-2, rtol=2e-2)
    assert rec.calls("moe_experts") == 1


def test_triton_custom_ops_run_inside_a_compiled_model():
    want, want_grads, _ = train_losses("jtok", "adamw")
    kernels.set_backend("triton")  # forced on CPU tensors: the interpreter (float32)
    rec = Recorder()
    got, got_grads, _ = train_losses("jtok", "adamw", rec)
    assert rec.calls("jtok_gate") > 0  # with its Triton extra (the row norms) in the fake
    # kernel vs reference round-off only (test_kernels.py sees <= ~5e-7 over 3 eager steps)
    assert_grads_close(got_grads, want_grads, atol=1e-5, rtol=1e-4)
    assert got == pytest.approx(want, abs=1e-4), (got, want)


# ----------------------------------------------------------------------------- backend choice and id checks


def test_backend_is_read_once_and_set_explicitly(monkeypatch):
    kernels.set_backend(None)
    monkeypatch.setenv("JTOK_KERNELS", "reference")
    assert kernels.backend() == "reference"
    monkeypatch.setenv("JTOK_KERNELS", "triton")
    assert kernels.backend() == "reference"  # cached: the environment is not read again
    kernels.set_backend(None)
    assert kernels.backend() == "triton"
    kernels.set_backend("AUTO")
    assert kernels.backend() == "auto"
    with pytest.raises(ValueError, match="not one of"):
        kernels.set_backend("cuda")


def test_check_ids_raises_eagerly_on_cpu_and_asserts_on_device_when_compiled():
    with pytest.raises(IndexError, match="token id 9 is outside the model's vocabulary"):
        kernels.check_ids(torch.tensor([1, 9]), 8, "model")
    rec = Recorder()
    checked = torch.compile(lambda ids: kernels.check_ids(ids, 8, "model") or ids + 1, backend=rec, fullgraph=True)
    assert checked(torch.tensor([1, 7])).tolist() == [2, 8]
    targets = [t for graph in rec.graphs for t in graph]
    assert any("_assert_async" in t for t in targets), targets  # one graph (fullgraph): no host sync broke it
    with pytest.raises(RuntimeError, match="outside the model's vocabulary"):
        checked(torch.tensor([1, 9]))
    with pytest.raises(RuntimeError, match="outside the model's vocabulary"):
        checked(torch.tensor([-1, 2]))


# ----------------------------------------------------------------------------- parallel.compile


def test_parallel_compile_compiles_each_block_in_place():
    module = LMModule({"variant": "jtok", **TINY}, {}, {"compile": "aot_eager", "param_dtype": "auto"})
    keys = list(module.state_dict())
    module.configure_model()
    compiled = [block._compiled_call_impl for block in module.model.layers]
    assert all(call is not None for call in compiled)
    module.configure_model()  # Lightning calls it again for every fit / validate: compiled once
    assert all(block._compiled_call_impl is call for block, call in zip(module.model.layers, compiled))
    assert module.parallel == {"param_dtype": "auto"}  # compile is not an FSDP2 setting
    assert list(module.state_dict()) == keys  # in place: checkpoints of eager and compiled runs are alike
    assert module.hparams["parallel"]["compile"] == "aot_eager"  # recorded, outside the model config resume compares
    out = module(torch.randint(0, 64, (2, 8)))
    assert out.logits.shape == (2, 8, 64)


def test_parallel_compile_settings():
    assert compile_backend(False) is None and compile_backend(None) is None
    assert compile_backend(True) == "inductor"
    assert compile_backend("aot_eager") == "aot_eager"
    with pytest.raises(ConfigError, match="parallel.compile='nope' must be true, false or a torch.compile backend"):
        compile_backend("nope")
    with pytest.raises(ConfigError, match="parallel.compile=1"):
        compile_backend(1)


def test_a_bad_parallel_compile_fails_before_anything_is_written(make_cfg):
    from project import pipeline

    cfg = make_cfg("parallel.compile=nope")
    with pytest.raises(ConfigError, match="parallel.compile='nope' must be true, false or a torch.compile backend"):
        pipeline.train(cfg)
    assert not Path(cfg.run_dir).exists()  # refused before the data is prepared or the run dir made


@pytest.mark.slow
def test_inductor_compiled_model_trains_like_eager():
    want, _, _ = train_losses("moe_jtok", "adam", steps=3)
    rec = Recorder("inductor")
    got, _, _ = train_losses("moe_jtok", "adam", rec, steps=3)
    assert rec.calls("moe_experts") > 0
    # inductor fuses and reorders float32 reductions: round-off grows to ~1e-6; 1e-4 leaves a wide margin
    assert got == pytest.approx(want, abs=1e-4), (got, want)


@pytest.mark.slow
def test_blocks_compile_after_fsdp2_and_train_like_eager(tmp_path):
    """`configure_model`'s order: FSDP2 first, then each FSDP-wrapped block compiled in place (one
    process, gloo; the row-sparse tables stay outside FSDP and behind their graph break)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from project.parallel import apply_compile, apply_fsdp

    def fsdp_train(compiled: bool) -> list[float]:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = Transformer(ModelConfig.from_dict(dict(variant="jtok", **TINY)))
        model.use_row_sparse_grads(True)
        apply_fsdp(model, init_device_mesh("cpu", (1,)), row_sparse_tables=True)
        if compiled:
            apply_compile(model, "aot_eager")
        opt, _ = build_optimizer(model, OptimConfig.from_dict({"warmup_steps": 0}), 3)
        ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
        losses = []
        for _ in range(3):
            logits = model(ids[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), ids[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        want, got = fsdp_train(False), fsdp_train(True)
    finally:
        dist.destroy_process_group()
    assert got == pytest.approx(want, abs=1e-5), (got, want)  # aot_eager: round-off only, as above
