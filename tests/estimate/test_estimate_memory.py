"""Peak training-step memory of estimate() against the measured real step."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from test_estimate import cnn, first, llama, mlp
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_meta import estimate
from lightning_meta._estimate._track import LiveBytes
from support.measure import allocator_peak, measure_training_step
from support.zoo_models import TINY_DECODER

MODELS = {
    "mlp": (mlp, lambda: torch.randn(8, 32)),
    "cnn": (cnn, lambda: torch.randn(4, 3, 16, 16)),
    "llama": (llama, lambda: torch.randint(0, 256, (2, 12))),
}


def test_live_bytes_counts_storages_once_and_frees_them() -> None:
    tracker = LiveBytes()
    with tracker:
        a = torch.ones(256)  # 1 KiB
        view = a[:128]  # same storage: free
        a.mul_(2)  # in place: free
        b = a * 2  # 1 KiB more
        del a  # the view keeps the storage alive
        assert tracker.total == 2048
        del view
        assert tracker.total == 1024
        c = torch.zeros(512, dtype=torch.float64)  # 4 KiB
        del b, c
    assert tracker.peak == 1024 + 4096
    assert tracker.total == 0


def test_live_bytes_categories() -> None:
    tracker = LiveBytes()
    w = torch.ones(10)
    tracker.track(w, "parameters")
    tracker.allocate_as = "temporaries"
    with tracker:
        t = w + 1
        tracker.retag(t, "gradients")
    assert tracker.current["parameters"] == 40
    assert tracker.current["gradients"] == 40
    assert tracker.peak_breakdown["temporaries"] == 40  # what it was at the peak


# The convolutions' scratch bound (tested below): which kernel it names depends on
# the CPU (oneDNN's bfloat16 convolution with AVX-512, the slow im2col one with AVX2).
@pytest.mark.filterwarnings(
    "ignore:estimate. peak_bytes of .* may be too low by up to :lightning_meta.MetaTensorWarning"
)
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("name", list(MODELS))
def test_peak_within_ten_percent_of_measured(name: str, optimizer: str, precision: str) -> None:
    factory, make_input = MODELS[name]
    torch.manual_seed(0)
    x = make_input()
    est = estimate(factory, x, loss_fn=first, optimizer=optimizer, precision=precision)
    real = measure_training_step(
        factory(), (x,), loss_fn=first, optimizer=optimizer, precision=precision
    )
    assert abs(est.peak_bytes - real.peak_bytes) <= 0.10 * real.peak_bytes
    assert est.forward_flops == real.forward_flops
    assert est.backward_flops == real.backward_flops


@pytest.mark.parametrize("optimizer", ["sgd-momentum", "adam", None])
def test_plain_loop_and_other_optimizers(optimizer: str | None) -> None:
    x = torch.randint(0, 256, (2, 12))
    est = estimate(llama, x, loss_fn=first, optimizer=optimizer, loop="plain")
    real = measure_training_step(llama(), (x,), loss_fn=first, optimizer=optimizer, loop="plain")
    assert abs(est.peak_bytes - real.peak_bytes) <= 0.10 * real.peak_bytes


def test_lightning_loop_keeps_gradients_through_forward() -> None:
    lightning = estimate(mlp, "64,32:float32", loop="lightning")
    plain = estimate(mlp, "64,32:float32", loop="plain")
    assert lightning.peak_bytes >= plain.peak_bytes
    assert lightning.gradient_bytes == plain.gradient_bytes == lightning.parameter_bytes


def test_breakdown_adds_up() -> None:
    est = estimate(llama, "2,12:int64", optimizer="adamw")
    parts = est.peak_breakdown
    assert sum(parts.values()) == est.peak_bytes
    assert parts["parameters"] == est.parameter_bytes
    assert parts["optimizer_state"] == est.optimizer_state_bytes
    assert est.peak_phase in ("forward", "backward", "optimizer step")
    assert est.activation_bytes > 0


def test_tied_weights_counted_once() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.head(self.emb(x))
            return out

    x = torch.randint(0, 50, (4, 6))
    est = estimate(Tied, x)
    assert est.parameters == 800
    real = measure_training_step(Tied(), (x,))
    assert est.peak_bytes == real.peak_bytes


class _SelfCheckpointed(nn.Module):
    """Checkpoints its own block with torch.utils.checkpoint (non-reentrant)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(32, 256)
        self.b = nn.Linear(256, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = checkpoint(
            lambda t: self.b(torch.relu(self.a(t))), x, use_reentrant=False
        )
        return out


def _llama_checkpointed() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**TINY_DECODER, use_cache=False)
    model = LlamaForCausalLM(cfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


@pytest.mark.parametrize(
    ("factory", "make_input"),
    [
        (_SelfCheckpointed, lambda: torch.randn(8, 32)),
        (_llama_checkpointed, lambda: torch.randint(0, 256, (2, 12))),
    ],
    ids=["torch-checkpoint", "hf-gradient-checkpointing"],
)
def test_a_model_that_checkpoints_its_own_activations_matches_the_measured_step(
    factory: Callable[[], nn.Module], make_input: Callable[[], torch.Tensor]
) -> None:
    # the recomputation in backward must see the fake tensors the forward saw
    torch.manual_seed(0)
    x = make_input()
    est = estimate(factory, x, loss_fn=first, optimizer="adamw")
    real = measure_training_step(factory(), (x,), loss_fn=first, optimizer="adamw")
    assert est.peak_bytes == real.peak_bytes
    if torch.__version__.startswith(("2.7.", "2.8.")) and est.uncounted_forward_flops:
        # torch 2.7 and 2.8 only (guarantees.md, "Estimate"): the shape-only run takes
        # the CPU flash kernel (uncounted) where the real one takes the math
        # path (counted); together they are the real count.
        assert est.forward_flops + est.uncounted_forward_flops == real.forward_flops
        # flash's backward recomputes the scores, the math path's does not
        backward = est.backward_flops + est.uncounted_backward_flops
        assert est.backward_flops < real.backward_flops < backward
    else:
        assert est.forward_flops == real.forward_flops
        assert est.backward_flops == real.backward_flops


def _exact_peak(
    model: nn.Module, x: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor]
) -> int:
    """The peak of a real SGD step as estimate's step runs it, from allocator events.

    The output stays alive until backward ends (Lightning returns it from
    training_step). Measured on a step after two others, the second of them
    profiled (``warm_up``), so the frees of a step's gradients are seen.
    """
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> None:
        out = model(x)
        loss = loss_fn(out)
        for p in model.parameters():
            p.grad = None
        loss.backward()
        del out, loss
        opt.step()

    step()
    # What is alive before a step: the model, the input, the last step's gradients.
    alive = [x, *model.parameters(), *(p.grad for p in model.parameters())]
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in alive if t is not None
    }
    del alive  # the measured step frees these gradients
    return sum(storages.values()) + allocator_peak(step, warm_up=True)[0]


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(256, 768)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 4, 64).permute(2, 0, 3, 1, 4)
        out: torch.Tensor = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out


def _convs() -> nn.Module:
    return nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    ("factory", "shape", "precision", "kernel"),
    [
        (
            _convs,
            (4, 8, 16, 16),
            "64-true",
            r"slow_conv \(thnn_conv / im2col\), float64 in module '0'",
        ),
        (
            _convs,
            (2, 8, 32, 32),
            "64-true",
            r"slow_conv \(thnn_conv / im2col\), float64 in module '2'",
        ),
        (
            _Attention,
            (2, 128, 256),
            "32-true",
            r"flash attention for CPU, float32 in the root module",
        ),
        (
            _Attention,
            (1, 512, 256),
            "32-true",
            r"flash attention for CPU, float32 in the root module",
        ),
    ],
    ids=["conv64-small", "conv64-large", "flash32-128", "flash32-512"],
)
def test_kernel_scratch_the_fake_run_cannot_see_is_warned_of_and_bounds_the_real_peak(
    factory: Callable[[], nn.Module],
    shape: tuple[int, ...],
    precision: str,
    kernel: str,
    threads: int,
) -> None:
    # slow convolutions (im2col columns) and the CPU flash attention allocate
    # inside the kernel: the peak is not exact, so estimate says by how much at most
    from lightning_meta import MetaTensorWarning

    dtype = torch.float64 if precision == "64-true" else torch.float32
    x = torch.randn(*shape, dtype=dtype)

    def loss(out: torch.Tensor) -> torch.Tensor:
        return out.float().pow(2).mean()

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with pytest.warns(MetaTensorWarning, match=f"may be too low by up to .*{kernel}") as got:
            est = estimate(factory, x, optimizer="sgd", loss_fn=loss, precision=precision)
        torch.manual_seed(0)
        real = _exact_peak(factory().to(dtype), x, loss)
    finally:
        torch.set_num_threads(before)
    up_to = int(re.search(r"by up to (\d+) bytes", str(got[0].message)).group(1))  # type: ignore[union-attr]
    assert est.peak_bytes <= real <= est.peak_bytes + up_to


def _conv_head() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 32, 3))


def _transposed() -> nn.Module:
    return nn.Sequential(nn.ConvTranspose2d(16, 8, 3, stride=2), nn.ReLU())


def _grouped() -> nn.Module:
    # oneDNN runs it as im2col products: before, 10.9x its peak_bytes past the bound
    return nn.Sequential(nn.Conv2d(6, 10, 11, groups=2))


def _grouped_wide() -> nn.Module:
    # in bfloat16 each group's channels are padded: before, 1.8x past the bound
    return nn.Sequential(nn.Conv2d(16, 32, 1, groups=16))


def _conv1d() -> nn.Module:
    return nn.Sequential(nn.Conv1d(8, 32, 5), nn.GELU(), nn.Conv1d(32, 32, 3, groups=4))


@pytest.mark.parametrize(
    ("factory", "shape", "dtype"),
    [
        (_conv_head, (16, 3, 64, 64), torch.float32),
        (_conv_head, (16, 3, 64, 64), torch.bfloat16),
        (_convs, (4, 8, 16, 16), torch.float32),
        (_transposed, (8, 16, 16, 16), torch.float32),
        (_conv1d, (8, 8, 512), torch.bfloat16),
        (_grouped, (2, 6, 64, 64), torch.float32),
        (_grouped_wide, (2, 16, 80, 80), torch.bfloat16),
    ],
    ids=[
        "head-f32",
        "head-bf16",
        "convs-f32",
        "transposed-f32",
        "conv1d-bf16",
        "grouped-f32",
        "grouped-wide-bf16",
    ],
)
def test_onednn_convolutions_copies_are_warned_of_and_bound_the_real_peak(
    factory: Callable[[], nn.Module], shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    # oneDNN reorders input, output and weight into blocked layouts inside the
    # call, and the CPU kernel copies the expanded gradient of out.sum() first:
    # a single Conv2d measured 2.7x its peak_bytes, with no warning, before
    from lightning_meta import MetaTensorWarning

    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU runs bfloat16 convolutions in the slow kernels")
    x = torch.randn(*shape, dtype=dtype)
    precision = "32-true" if dtype == torch.float32 else "bf16-true"

    def loss(out: torch.Tensor) -> torch.Tensor:
        return out.sum()

    for threads in (1, 2):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with pytest.warns(
                MetaTensorWarning, match=r"may be too low by up to .*oneDNN convolution"
            ) as got:
                est = estimate(factory, x, optimizer="sgd", loss_fn=loss, precision=precision)
            torch.manual_seed(0)
            real = _exact_peak(factory().to(dtype), x, loss)
        finally:
            torch.set_num_threads(before)
        found = re.search(r"by up to (\d+) bytes", str(got[0].message))
        assert found is not None
        assert est.peak_bytes <= real <= est.peak_bytes + int(found.group(1))


def _mm_scratch(dtype: torch.dtype) -> tuple[int, int]:
    """Bytes one CPU ``mm`` allocates beyond its output (allocator events), and what
    :class:`LiveBytes` (a dispatch mode, as estimate and ``measure_training_step``)
    sees of the same call beyond its output."""
    a, b = torch.randn(64, 256, dtype=dtype), torch.randn(256, 256, dtype=dtype)
    torch.mm(a, b)
    peak, out = allocator_peak(lambda: torch.mm(a, b))
    tracker = LiveBytes()
    with tracker:
        seen = torch.mm(a, b)
    size = out.numel() * out.element_size()
    del seen
    return peak - size, tracker.peak - size


def test_bfloat16_cpu_matmul_scratch_is_outside_the_claim_and_small() -> None:
    # oneDNN's bfloat16 mm holds scratch while it runs (guarantees.md: 100 KB for
    # 64x256x256); a dispatch-level measurement, estimate's or measure_training_step's,
    # cannot see it, which is why the ±10 % claim is against that measurement
    # (on a CPU with AVX2 alone, an AMD EPYC here, the bfloat16 product runs a kernel
    # that holds none: 0 bytes).
    scratch, seen = _mm_scratch(torch.bfloat16)
    assert 0 <= scratch < 400 * 1024
    assert seen == 0
    assert _mm_scratch(torch.float32) == (0, 0)


def _layouts(rows: int, cols: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {
        "contiguous": torch.randn(rows, cols, dtype=dtype),
        "transposed": torch.randn(cols, rows, dtype=dtype).t(),
        "expanded rows": torch.randn(1, cols, dtype=dtype).expand(rows, cols),
        "expanded columns": torch.randn(rows, 1, dtype=dtype).expand(rows, cols),
        "sliced columns": torch.randn(rows, cols + 3, dtype=dtype)[:, :cols],
        "stepped": torch.randn(rows, 2 * cols, dtype=dtype)[:, ::2],
        "stepped transposed": torch.randn(cols, 2 * rows, dtype=dtype)[:, ::2].t(),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(8, 16, 4), (1, 16, 4), (8, 16, 1)], ids=str)
def test_matmul_operand_copies_are_the_clones_the_cpu_kernel_makes(
    shape: tuple[int, int, int], dtype: torch.dtype
) -> None:
    # Against what the real kernel does, seen by torch.profiler inside aten::mm:
    # an operand BLAS cannot take is cloned, and its bytes are counted.
    from lightning_meta._estimate._track import _matmul_copies

    m, k, n = shape
    for name_a, a in _layouts(m, k, dtype).items():
        for name_b, b in _layouts(k, n, dtype).items():
            for call in (
                lambda a=a, b=b: torch.mm(a, b),
                lambda a=a, b=b: torch.addmm(torch.zeros(n, dtype=dtype), a, b),
            ):
                with torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True
                ) as prof:
                    call()
                clones = [e for e in prof.events() if e.name == "aten::clone"]
                cloned = sum(e.input_shapes[0][0] * e.input_shapes[0][1] for e in clones)
                assert _matmul_copies((a, b)) == cloned * a.element_size(), (name_a, name_b)


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(64, 64)
        self.head = nn.Linear(64, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.relu(self.body(x)))
        return out


@pytest.mark.parametrize(
    ("factory", "x", "loss"),
    [
        # an expanded batch: the forward's addmm clones it (14.8x too low before)
        (lambda: nn.Linear(4096, 16), torch.randn(1, 4096).expand(512, 4096), "mean_square"),
        # estimate's default loss and the CLI's, output.sum(): its gradient is
        # expanded, and the head's backward mm clones it (1.63x too low before)
        (_Head, torch.randn(256, 64), "sum"),
        (_Head, torch.randn(256, 64), "mean"),
    ],
    ids=["expanded-batch", "sum-loss", "mean-loss"],
)
def test_peak_counts_the_copies_cpu_matmuls_make_of_their_operands(
    factory: Callable[[], nn.Module], x: torch.Tensor, loss: str
) -> None:
    losses: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "mean_square": lambda o: o.pow(2).mean(),
        "sum": lambda o: o.sum(),
        "mean": lambda o: o.mean(),
    }
    loss_fn = losses[loss]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        est = estimate(factory, x, optimizer="sgd", loss_fn=loss_fn)
        torch.manual_seed(0)
        real = _exact_peak(factory(), x, loss_fn)
    finally:
        torch.set_num_threads(before)
    # exact up to the profiler's own small allocations
    assert abs(real - est.peak_bytes) <= 64, (real, est.peak_bytes)
