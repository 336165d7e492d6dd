"""Values-only linear algebra inside a block (2026-12-07, sixth session).

torch's ``svdvals``, ``eigvalsh`` and the norms made of them ask ATen for the vectors
too when their input is a tensor subclass (so that the result could be differentiated):
on a block's fake tensor ``svdvals`` recorded ``_linalg_svd(compute_uv=True)``, whose
singular values differ in the last bits from eager's ``compute_uv=False``. A reservoir
scaled to a spectral radius (an echo state network) came out of ``materialize`` 6e-8
off, with no error. Each case is compared with eager construction bit for bit.

Two refusals of the same review: ``share_memory()`` in ``__init__`` raised torch's
"_share_fd_: only available on CPU" naming nothing, and a write through a tensor's
storage (``untyped_storage().fill_``) was described as a ``set_`` the user never called.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.linalg import svdvals  # bound at import: the block must see it all the same

import lightning_meta as lm

L = torch.linalg


def _dual_svdvals(w: torch.Tensor) -> torch.Tensor:
    with fwAD.dual_level():
        dual = fwAD.make_dual(w, torch.ones_like(w))
        return fwAD.unpack_dual(L.svdvals(dual)).primal[0]


RADIUS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "svdvals": lambda w: L.svdvals(w)[0],
    "svdvals_bound_at_import": lambda w: svdvals(w)[0],
    "eigvalsh": lambda w: L.eigvalsh(w @ w.T).max().sqrt(),
    "matrix_norm_2": lambda w: L.matrix_norm(w, ord=2),
    "matrix_norm_-2": lambda w: L.matrix_norm(w, ord=-2),
    "matrix_norm_nuc": lambda w: L.matrix_norm(w, ord="nuc"),
    "linalg_norm_2": lambda w: L.norm(w, 2),
    "cond": lambda w: L.cond(w),
    "torch_norm_nuc": lambda w: torch.norm(w, p="nuc"),
    "tensor_norm_nuc": lambda w: w.norm(p="nuc"),
    "nuclear_norm": lambda w: torch.nuclear_norm(w),  # deprecated, still called
    "matrix_rank_hermitian": lambda w: L.matrix_rank(w @ w.T, hermitian=True) + w.abs().max(),
    "torch_svd_values_only": lambda w: torch.svd(w, compute_uv=False).S[0],
    "tensor_svd_values_only": lambda w: w.svd(compute_uv=False)[1][0],
    # eager asks for the vectors under a transform or forward-mode AD: so must the block
    # (a first version asked for none there, 6e-8 off, and forward-mode AD crashed)
    "vmap_svdvals": lambda w: torch.func.vmap(L.svdvals)(w[None])[0, 0],
    "vmap_eigvalsh": lambda w: torch.func.vmap(L.eigvalsh)((w @ w.T)[None]).max().sqrt(),
    "jvp_svdvals": lambda w: torch.func.jvp(L.svdvals, (w,), (torch.ones_like(w),))[0][0],
    "forward_ad_svdvals": lambda w: _dual_svdvals(w),
    # controls: the vectors are asked for in eager too, or the values are the same
    "eigvals": lambda w: L.eigvals(w).abs().max(),
    "svd_S": lambda w: L.svd(w).S[0],
    "eigh_eigenvalues": lambda w: L.eigh(w @ w.T).eigenvalues.max().sqrt(),
}


class Reservoir(nn.Module):
    """An echo state network's recurrent matrix, scaled to spectral radius 0.9."""

    def __init__(self, how: str, n: int = 16) -> None:
        super().__init__()
        w = torch.rand(n, n) - 0.5
        self.register_buffer("w", w * (0.9 / RADIUS[how](w)))
        self.inp = nn.Linear(4, n)


@pytest.mark.filterwarnings("ignore:at::nuclear_norm is deprecated")
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("how", sorted(RADIUS))
def test_values_only_linear_algebra_replays_eagers_bits(how: str) -> None:
    torch.manual_seed(0)
    eager = Reservoir(how)
    after_eager = torch.get_rng_state()
    torch.manual_seed(0)
    with lm.deferred_init():
        deferred = Reservoir(how)
    lm.materialize(deferred)
    assert torch.equal(deferred.w, eager.w)
    assert torch.equal(torch.get_rng_state(), after_eager)


class Scaled(nn.Module):
    """A parameter divided by its spectral norm with grad on: eager asks for the vectors."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(12, 12))
        self.register_buffer("sigma", L.svdvals(self.weight)[0].detach())


def test_a_values_only_call_that_needs_a_gradient_keeps_eagers_vectors() -> None:
    torch.manual_seed(0)
    eager = Scaled()
    torch.manual_seed(0)
    with lm.deferred_init():
        deferred = Scaled()
    lm.materialize(deferred)
    assert torch.equal(deferred.sigma, eager.sigma)
    # and outside a block nothing is left in place
    assert torch.overrides._get_current_function_mode_stack() == []


class Shared(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        if how == "module":
            self.share_memory()
        else:
            self.lin.weight.share_memory_()


@pytest.mark.parametrize(("how", "named"), [("module", "Shared.share_memory()"),
                                            ("tensor", "Tensor.share_memory_()")])  # fmt: skip
def test_share_memory_in_the_block_is_refused_naming_the_call(how: str, named: str) -> None:
    assert Shared(how).lin.weight.is_shared()
    with pytest.raises(lm.MaterializationError, match="cannot record") as info:
        with lm.deferred_init():
            Shared(how)
    said = str(info.value)
    assert f"cannot record {named} issued at {__file__}:" in said
    assert "Fix: call share_memory() on the module after materialize" in said


class StorageWrite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.lin.bias.data.untyped_storage().fill_(0)


def test_a_write_through_a_storage_is_named_as_one() -> None:
    with pytest.raises(lm.MaterializationError, match="as torch does to write through a storage"):
        with lm.deferred_init():
            StorageWrite()
