"""Many networks of one architecture trained as one computation, with the result of one at a time.

PrivacyGAN's server holds one student generator per client and, per round, makes the same
JRLF step (thesis Eq. 5.9) for every selected student. Done one student after another, a
round of N tiny DCGANs is N small forward/backward passes and N optimizer steps: on a GPU
mostly kernel launches, on a CPU mostly small convolutions. Here the N students become one
computation:

* :class:`Stack` holds the students' parameters and buffers stacked along a new first
  dimension (``torch.func.stack_module_state``) and runs ``functional_call`` under
  ``torch.func.vmap`` over it: student n sees only its own latents, so BatchNorm normalises
  each student's batch with that batch's statistics and updates that student's running
  statistics, exactly as ``G_n(z_n)`` does;
* the frozen teacher discriminator is queried the same way, its weights shared and its
  buffers cloned per student (what ``keep_buffers=True`` does for one);
* the gradient of every student comes out of one backward pass, and
  :func:`step_optimizers` applies all the students' Adam steps as one call of
  ``torch.optim.adam.adam`` (PyTorch's own functional Adam, the function ``Adam.step``
  calls), each parameter with its own moments and step count.

:func:`students_update` equals calling :func:`models.steps.student_update` for each student
in turn (``tests/test_batched.py`` checks parameters, running statistics, optimizer state
and teacher losses to 1e-5). Pure PyTorch, no Flower.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, stack_module_state, vmap
from torch.optim.adam import adam as functional_adam

from models.losses import check_loss_kind, generator_loss
from models.steps import jrlf_feedback

__all__ = ["Stack", "can_batch", "discriminators_step", "step_optimizers", "students_update", "teacher_feedback_batched"]

# the hyper-parameters that must agree for several Adams to step as one call
_ADAM_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
              "differentiable", "fused", "decoupled_weight_decay")


class Stack:
    """N modules of one architecture as stacked parameters (leaf tensors, ``requires_grad``)
    and buffers, and their forward pass as one vmapped call.

    The stack is a copy: :meth:`write_buffers` copies the (updated) buffers back into the
    modules; parameters change only through the modules' optimizers (:func:`students_update`
    restacks them after each step).
    """

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        if not modules:
            raise ValueError("Stack needs at least one module")
        self.modules = list(modules)
        self.base = copy.deepcopy(self.modules[0]).to("meta")   # the architecture, without storage
        self.params, self.buffers = stack_module_state(self.modules)
        self.param_names = list(self.params)

    def restack_params(self) -> None:
        """Fresh leaf stacks of the modules' current parameters (after their optimizers stepped)."""
        with torch.no_grad():
            for name in self.param_names:
                self.params[name] = torch.stack([dict(m.named_parameters())[name] for m in self.modules]
                                                ).requires_grad_(True)

    def __call__(self, x: Tensor) -> Tensor:
        """``torch.stack([m(x[n]) for n, m in enumerate(modules)])`` as one computation; running
        statistics of the stacked buffers are updated in place (train mode)."""
        def one(params, buffers, xi):
            return functional_call(self.base, (params, buffers), (xi,))
        return vmap(one)(self.params, self.buffers, x)

    def grads_to_modules(self) -> None:
        """Each module's ``p.grad`` = its slice of the stacked gradient (a view, no copy)."""
        for n, m in enumerate(self.modules):
            for name, p in m.named_parameters():
                g = self.params[name].grad
                p.grad = None if g is None else g[n]

    def write_buffers(self) -> None:
        with torch.no_grad():
            for n, m in enumerate(self.modules):
                for name, b in m.named_buffers():
                    b.copy_(self.buffers[name][n])


def can_batch(modules: Sequence[nn.Module]) -> bool:
    """Whether ``modules`` can be stacked: same parameter and buffer names, shapes, dtypes and
    devices, and all in the same train/eval mode."""
    if len(modules) < 2:
        return False
    def sig(m):
        return ([(n, tuple(p.shape), p.dtype, p.device) for n, p in m.named_parameters()],
                [(n, tuple(b.shape), b.dtype, b.device) for n, b in m.named_buffers()],
                [sub.training for sub in m.modules()], type(m))
    first = sig(modules[0])
    return all(sig(m) == first for m in modules[1:])


def teacher_feedback_batched(D: nn.Module, x: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """For fakes ``x`` of shape (N, B, ...): per slice n the labels ``D(x[n])`` (N, B, ...) and
    the feedback ∂L_G(D(x[n]))/∂x[n], with D's weights shared and its buffers untouched (each
    slice normalises with its own batch statistics on a private copy of the buffers, as
    :func:`models.steps.generator_feedback` with ``keep_buffers=True`` does for one batch)."""
    check_loss_kind(kind)
    params = {name: p.detach() for name, p in D.named_parameters()}
    n = x.shape[0]
    buffers = {name: b.detach().unsqueeze(0).expand(n, *b.shape).clone() for name, b in D.named_buffers()}

    def loss_of(xi, bufs):
        out = functional_call(D, (params, bufs), (xi,))
        return generator_loss(kind, out), out

    with torch.enable_grad():
        feedback, labels = vmap(grad(loss_of, has_aux=True))(x.detach(), buffers)
    return labels.detach(), feedback.detach()


def step_optimizers(optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """``opt.step()`` for every optimizer, as one call of PyTorch's functional Adam for those that
    can share it: plain :class:`torch.optim.Adam` with one parameter group, the same
    hyper-parameters, and state already made by an earlier ``step()``. The others (first steps,
    RMSprop, ...) step one by one. Same arithmetic as ``opt.step()``: the same function, each
    parameter with its own moments and step count."""
    shared: dict[tuple, list[torch.optim.Optimizer]] = {}
    for opt in optimizers:
        key = _adam_key(opt)
        if key is None:
            opt.step()
        else:
            shared.setdefault(key, []).append(opt)
    for group_opts in shared.values():
        if len(group_opts) == 1:
            group_opts[0].step()
            continue
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for opt in group_opts:
            for p in opt.param_groups[0]["params"]:
                if p.grad is None:
                    continue
                st = opt.state[p]
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(st["exp_avg"])
                exp_avg_sqs.append(st["exp_avg_sq"])
                steps.append(st["step"])
        g = group_opts[0].param_groups[0]
        beta1, beta2 = g["betas"]
        with torch.no_grad():
            functional_adam(params, grads, exp_avgs, exp_avg_sqs, [], steps,
                                  foreach=g["foreach"], capturable=g["capturable"], differentiable=g["differentiable"],
                                  fused=g["fused"], has_complex=False,
                                  amsgrad=False, beta1=beta1, beta2=beta2, lr=g["lr"],
                                  weight_decay=g["weight_decay"], eps=g["eps"], maximize=g["maximize"])


def _adam_key(opt: torch.optim.Optimizer) -> tuple | None:
    """Hyper-parameters of a plain Adam whose every parameter with a gradient has state; else None."""
    if type(opt) is not torch.optim.Adam or len(opt.param_groups) != 1:
        return None
    g = opt.param_groups[0]
    if (g.get("amsgrad") or g.get("fused") or g.get("capturable") or g.get("differentiable")
            or g.get("decoupled_weight_decay")):
        return None
    if isinstance(g["lr"], Tensor):
        return None
    for p in g["params"]:
        if p.grad is not None and ("step" not in opt.state.get(p, {})):
            return None
        if p.grad is not None and p.grad.is_sparse:
            return None
    return tuple((k, g.get(k)) for k in _ADAM_KEYS)


def students_update(students: Sequence[tuple[nn.Module, torch.optim.Optimizer]], z: Tensor,
                    local_feedback: Tensor, teacher_d: nn.Module | None, alpha: float, loss: str,
                    stack: Stack | None = None) -> list[float]:
    """One JRLF step (thesis Eq. 5.9) of every student at once: student n gets
    ``models.steps.student_update(G_n, opt_n, z[n], local_feedback[n], teacher_d, alpha, loss)``.

    ``z`` is (N, B, latent), ``local_feedback`` (N, B, *sample). Returns each student's
    teacher loss L_G(D_T(G_n(z_n))) (NaN when α = 1). ``stack`` (a :class:`Stack` of these
    students' generators, its parameters current) saves restacking across a round's steps;
    on return its parameters are stale (the optimizers stepped): call ``restack_params``.
    """
    if stack is None:
        stack = Stack([G for G, _ in students])
    x = stack(z)
    teacher_losses = [float("nan")] * len(students)
    teacher_fb = None
    if alpha < 1.0:
        if teacher_d is None:
            raise ValueError("alpha < 1 needs a teacher discriminator")
        labels_t, teacher_fb = teacher_feedback_batched(teacher_d, x.detach(), loss)
        teacher_losses = [float(generator_loss(loss, labels_t[n])) for n in range(len(students))]
    # --- JRLF gradient α·f_i + (1−α)·f_T through every G_n in one backward pass ---
    for p in stack.params.values():
        p.grad = None
    x.backward(jrlf_feedback(local_feedback.to(x.device), teacher_fb, alpha))
    stack.grads_to_modules()
    step_optimizers([opt for _, opt in students])
    stack.write_buffers()
    return teacher_losses


def discriminators_step(discs: Sequence[tuple[nn.Module, torch.optim.Optimizer]], real: Tensor, fake: Tensor,
                        kind: str, stack: Stack | None = None) -> tuple[list[dict[str, float]], Tensor, Tensor]:
    """What N PrivacyGAN clients do with one fake batch each, as one computation: client n makes
    ``models.steps.discriminator_step(D_n, opt_n, real[n], fake[n], kind)`` and then
    ``models.steps.generator_feedback(D_n, fake[n], kind)`` with the updated D_n.

    ``real`` and ``fake`` are (N, B, *sample). Returns per client the step's statistics (d_loss,
    d_real_acc, d_fake_acc, d_real_out, d_fake_out), and the labels (N, B, ...) and feedback
    (N, B, *sample). Only losses without a penalty or clipping (bce, hinge): the Wasserstein
    critics keep their one-by-one step. What a cohort's clients on one simulated node do
    (run config ``cohort-batching``; strategies.privacygan.client_discriminate_cohort) and the
    in-process batched baseline of simulations/scale.py.
    """
    check_loss_kind(kind)
    if kind not in ("bce", "hinge"):
        raise ValueError(f"discriminators_step supports bce and hinge, not {kind!r} (penalty / clipping)")
    from models.losses import discriminator_loss   # local: the module's public names stay the JRLF ones

    if stack is None:
        stack = Stack([D for D, _ in discs])
    fake = fake.detach()
    # --- D_n update: min L_D(D_n(real_n), D_n(fake_n)), real and fake in separate passes (BatchNorm) ---
    for p in stack.params.values():
        p.grad = None
    real_out, fake_out = stack(real), stack(fake)
    losses = vmap(lambda r, f: discriminator_loss(kind, r, f))(real_out, fake_out)
    losses.sum().backward()          # slices are independent: each D_n gets the gradient of its own loss
    stack.grads_to_modules()
    step_optimizers([opt for _, opt in discs])
    stack.write_buffers()
    stats = []
    with torch.no_grad():
        for n in range(len(discs)):
            r, f = real_out[n].detach(), fake_out[n].detach()
            stats.append({"d_loss": float(losses[n]), "d_real_acc": float((r > 0).float().mean()),
                          "d_fake_acc": float((f < 0).float().mean()), "d_real_out": float(r.mean()),
                          "d_fake_out": float(f.mean())})
    # --- feedback f_n = ∂L_G(D_n(x̃_n))/∂x̃_n with the updated D_n (its running statistics move, as in train mode) ---
    stack.restack_params()
    x = fake.clone().requires_grad_(True)
    with torch.enable_grad():
        out = stack(x)
        g_losses = vmap(lambda o: generator_loss(kind, o))(out)
        (feedback,) = torch.autograd.grad(g_losses.sum(), x)
    stack.write_buffers()
    return stats, out.detach(), feedback.detach()
