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

How the stacked forward pass runs (:class:`Stack`'s ``path``): on a CPU, DCGAN generators and
discriminators (models/dcgan.py) go through *grouped layers*: the N networks' activations are
laid out as one batch with N·C channels (B, N·C, H, W); each convolution is one ``groups=N``
convolution, each BatchNorm one BatchNorm over the N·C channels (its running statistics a view
of the stacked buffers), each GroupNorm(1, C) one GroupNorm with N groups. That is the same
arithmetic per network; on the 2-core CPU it ran 1.4x (generator) and 1.6x (discriminator)
faster forward+backward than the vmapped call, whose batching rules move the batch dimension
between memory layouts around layers. Everything else, and every network on CUDA (where the
vmapped path was measured at 3.5-4.3x sequential), runs through ``vmap`` of ``functional_call``.
On the CPU the networks are stacked 32 at a time (:func:`chunk_slices`): larger stacks spill
the caches. simulations/scale.py measures whole rounds.

:func:`students_update` equals calling :func:`models.steps.student_update` for each student
in turn (``tests/test_batched.py`` checks parameters, running statistics, optimizer state
and teacher losses to 1e-5, on both paths). Pure PyTorch, no Flower.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.func import functional_call, grad, stack_module_state, vmap
from torch.optim.adam import adam as functional_adam

from models.dcgan import DCGANDiscriminator, DCGANGenerator
from models.losses import check_loss_kind, generator_loss
from models.steps import jrlf_feedback

__all__ = ["CPU_CHUNK", "PATHS", "Stack", "can_batch", "chunk_slices", "discriminators_step", "grouped_plan",
           "step_optimizers", "students_update", "teacher_feedback_batched"]

# the hyper-parameters that must agree for several Adams to step as one call
_ADAM_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
              "differentiable", "fused", "decoupled_weight_decay")


PATHS = ("auto", "grouped", "vmap")
# Networks per stacked computation on the CPU: 1,000 tiny DCGANs stacked at once ran at 9.3 ms per
# client and round, in stacks of 25-50 at 5.7 (their activations stay in the core's caches), and
# 100 at once 0.66 s against 0.56-0.59 s in stacks of 25-50 (simulations/scale.py, one thread).
# On CUDA one stack takes them all (fewer, larger kernels).
CPU_CHUNK = 32


def chunk_slices(n: int, device: torch.device | str, chunk: int | None = None) -> list[slice]:
    """The slices of ``n`` networks that are stacked together: ``chunk`` at a time, by default
    :data:`CPU_CHUNK` on the CPU and all ``n`` at once on any other device."""
    if chunk is None:
        chunk = CPU_CHUNK if torch.device(device).type == "cpu" else n
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk!r}")
    return [slice(i, min(i + chunk, n)) for i in range(0, n, chunk)]


_ACTIVATIONS = (nn.LeakyReLU, nn.ReLU, nn.Tanh, nn.Identity)


class Stack:
    """N modules of one architecture as stacked parameters (leaf tensors, ``requires_grad``)
    and buffers, and their forward pass as one computation (``path``: ``"grouped"`` layers or
    ``"vmap"``; ``"auto"`` picks grouped for a supported network on the CPU, see the module
    docstring).

    The stack is a copy: :meth:`write_buffers` copies the (updated) buffers back into the
    modules; parameters change only through the modules' optimizers (:func:`students_update`
    restacks them after each step).
    """

    def __init__(self, modules: Sequence[nn.Module], path: str = "auto") -> None:
        if not modules:
            raise ValueError("Stack needs at least one module")
        self.path, self.plan = _choose_path(path, modules[0])
        self.modules = list(modules)
        self.params, self.buffers = stack_module_state(self.modules)
        self.param_names = list(self.params)
        self._module_params = [dict(m.named_parameters()) for m in self.modules]
        self._module_buffers = [dict(m.named_buffers()) for m in self.modules]
        # the architecture without storage, for functional_call (the vmapped path only)
        self.base = copy.deepcopy(self.modules[0]).to("meta") if self.path == "vmap" else None

    def restack_params(self) -> None:
        """Fresh leaf stacks of the modules' current parameters (after their optimizers stepped)."""
        with torch.no_grad():
            for name in self.param_names:
                self.params[name] = torch.stack([mp[name] for mp in self._module_params]).requires_grad_(True)

    def __call__(self, x: Tensor) -> Tensor:
        """``torch.stack([m(x[n]) for n, m in enumerate(modules)])`` as one computation; running
        statistics of the stacked buffers are updated in place (train mode)."""
        if self.path == "grouped":
            return grouped_forward(self.plan, self.params, self.buffers, x,
                                   scores=isinstance(self.modules[0], DCGANDiscriminator))
        def one(params, buffers, xi):
            return functional_call(self.base, (params, buffers), (xi,))
        return vmap(one)(self.params, self.buffers, x)

    def grads_to_modules(self) -> None:
        """Each module's ``p.grad`` = its slice of the stacked gradient (a view, no copy)."""
        grads = {name: self.params[name].grad for name in self.param_names}
        for n, mp in enumerate(self._module_params):
            for name, p in mp.items():
                g = grads[name]
                p.grad = None if g is None else g[n]

    def write_buffers(self) -> None:
        with torch.no_grad():
            for n, mb in enumerate(self._module_buffers):
                for name, b in mb.items():
                    b.copy_(self.buffers[name][n])


# -------------------------------------------------------------------------------------------
# Grouped layers: N DCGANs as one network with N·C channels per layer
# -------------------------------------------------------------------------------------------
def grouped_plan(module: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """``[(parameter-name prefix, layer), ...]`` of a DCGAN generator or discriminator whose
    every layer the grouped path computes exactly (plain zero-padded (transposed) convolutions,
    BatchNorm2d with affine weights and a momentum, GroupNorm with one group, the activations);
    None for any other module (it keeps the vmapped path)."""
    if not isinstance(module, (DCGANGenerator, DCGANDiscriminator)):
        return None
    plan = []
    for i, layer in enumerate(module.net):
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            if (layer.groups != 1 or tuple(layer.dilation) != (1, 1) or layer.padding_mode != "zeros"
                    or isinstance(layer.padding, str) or tuple(layer.output_padding) != (0, 0)):
                return None
        elif isinstance(layer, nn.BatchNorm2d):
            if not (layer.affine and layer.track_running_stats) or layer.momentum is None:
                return None
        elif isinstance(layer, nn.GroupNorm):
            if layer.num_groups != 1 or not layer.affine:
                return None
        elif not isinstance(layer, _ACTIVATIONS):
            return None
        plan.append((f"net.{i}.", layer))
    return plan


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _choose_path(path: str, module: nn.Module) -> tuple[str, list[tuple[str, nn.Module]] | None]:
    """(the path that runs ``module``'s stack, its :func:`grouped_plan` when that is "grouped"):
    ``"auto"`` is grouped for a supported network on the CPU, else vmap."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    plan = grouped_plan(module) if path != "vmap" else None
    if path == "grouped" and plan is None:
        raise ValueError(f"{type(module).__name__} has no grouped path (DCGAN generators and discriminators of "
                         "Conv/ConvTranspose/BatchNorm/GroupNorm(1, C) layers only)")
    if path == "auto" and _device_of(module).type != "cpu":
        plan = None
    return ("grouped", plan) if plan is not None else ("vmap", None)


def _flat(t: Tensor) -> Tensor:
    """A stacked (N, a, b, ...) parameter as the (N·a, b, ...) weight of one grouped layer."""
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


# Which kernel runs each grouped layer: the fastest combination measured on a 2-core CPU (torch
# 2.x, oneDNN) for whole PrivacyGAN rounds of 100 DCGANs at batch 32 (simulations/scale.py):
# convolutions in channels-last memory (oneDNN's fast path for few channels per group; the
# default layout was faster for 16->32 channels alone, but converting between layouts around it
# cost more than it saved); a transposed convolution that outputs an image (fewer than 8
# channels) as one batched matrix product per network followed by col2im (``F.fold``), about
# 3x faster there than oneDNN's grouped deconvolution; wider transposed convolutions as
# grouped deconvolutions in the default layout.
_FEW_CHANNELS = 8


def _grouped_conv(x: Tensor, weight: Tensor, bias: Tensor | None, layer: nn.Conv2d) -> Tensor:
    w = _flat(weight).contiguous(memory_format=torch.channels_last)
    bias = None if bias is None else bias.reshape(-1)
    return F.conv2d(x.contiguous(memory_format=torch.channels_last), w, bias, layer.stride, layer.padding, 1,
                    weight.shape[0])


def _grouped_conv_transpose(x: Tensor, weight: Tensor, bias: Tensor | None, layer: nn.ConvTranspose2d) -> Tensor:
    n, cin, cout = weight.shape[:3]
    bias = None if bias is None else bias.reshape(-1)
    if cout >= _FEW_CHANNELS:
        return F.conv_transpose2d(x.contiguous(), _flat(weight), bias, layer.stride, layer.padding, 0, n)
    # col2im: network n's columns = W_n^T (Cout·kh·kw, Cin) @ its inputs (Cin, B·H·W), summed into place by fold
    b, _, h, w_ = x.shape
    kh, kw = weight.shape[3:]
    (sh, sw), (ph, pw) = layer.stride, layer.padding
    out_hw = ((h - 1) * sh - 2 * ph + kh, (w_ - 1) * sw - 2 * pw + kw)
    xi = x.reshape(b, n, cin, h * w_).permute(1, 2, 0, 3).reshape(n, cin, b * h * w_)
    cols = torch.bmm(weight.reshape(n, cin, cout * kh * kw).transpose(1, 2), xi)
    cols = cols.view(n, cout * kh * kw, b, h * w_).permute(2, 0, 1, 3).reshape(b, n * cout * kh * kw, h * w_)
    y = F.fold(cols, out_hw, (kh, kw), stride=(sh, sw), padding=(ph, pw))
    return y if bias is None else y + bias.view(1, -1, 1, 1)


def grouped_forward(plan: list[tuple[str, nn.Module]], params: dict[str, Tensor], buffers: dict[str, Tensor],
                    x: Tensor, scores: bool, keep_buffers: bool = False) -> Tensor:
    """N DCGANs (stacked ``params`` / ``buffers``, leading dimension N) on inputs ``x`` of shape
    (N, B, ...): latents (N, B, L) for a generator, images (N, B, C, H, W) for a
    discriminator. Returns (N, B, C, H, W) images, or (N, B) scores when ``scores`` (a
    discriminator), as the vmapped
    ``functional_call`` does. Network n's channels are channels n·C .. (n+1)·C − 1 of every
    layer, so each layer below is that layer of every network at once:

    * Conv2d / ConvTranspose2d -> one convolution with ``groups=N`` (weights (N·Cout, Cin, k, k),
      resp. (N·Cin, Cout, k, k) for a transposed one, are the stacked weights reshaped);
    * BatchNorm2d -> BatchNorm over N·C channels: each network's channel normalised with its
      own batch statistics, its running statistics (views of the stacked buffers) updated in
      place in train mode, and ``num_batches_tracked`` counted, as ``nn.BatchNorm2d`` does.
      ``keep_buffers=True`` leaves the buffers untouched (train mode normalises with the batch
      statistics all the same), as :func:`models.steps.generator_feedback` does for the teacher;
    * GroupNorm(1, C) -> GroupNorm with N groups over the N·C channels.
    """
    n, b = x.shape[0], x.shape[1]
    if x.dim() == 3:                                     # generator: (N, B, L) -> (B, N·L, 1, 1)
        x = x.transpose(0, 1).reshape(b, n * x.shape[2], 1, 1)
    else:   # discriminator: (N, B, C, H, W) -> (B, N·C, H, W), laid out channels-last in one copy
        c, h, w = x.shape[2:]
        x = x.permute(1, 3, 4, 0, 2).reshape(b, h, w, n * c).permute(0, 3, 1, 2)
    for prefix, layer in plan:
        if isinstance(layer, nn.Conv2d):
            x = _grouped_conv(x, params[prefix + "weight"], params.get(prefix + "bias"), layer)
        elif isinstance(layer, nn.ConvTranspose2d):
            x = _grouped_conv_transpose(x, params[prefix + "weight"], params.get(prefix + "bias"), layer)
        elif isinstance(layer, nn.BatchNorm2d):
            # eval mode normalises with the running statistics; train mode updates them unless kept
            use_buffers = not (layer.training and keep_buffers)
            rm = buffers[prefix + "running_mean"].reshape(-1) if use_buffers else None
            rv = buffers[prefix + "running_var"].reshape(-1) if use_buffers else None
            if layer.training and use_buffers:
                buffers[prefix + "num_batches_tracked"].add_(1)
            x = F.batch_norm(x, rm, rv, params[prefix + "weight"].reshape(-1), params[prefix + "bias"].reshape(-1),
                             layer.training, layer.momentum, layer.eps)
        elif isinstance(layer, nn.GroupNorm):
            x = F.group_norm(x, n, params[prefix + "weight"].reshape(-1), params[prefix + "bias"].reshape(-1), layer.eps)
        elif isinstance(layer, nn.LeakyReLU):
            x = F.leaky_relu(x, layer.negative_slope, inplace=layer.inplace)
        elif isinstance(layer, nn.ReLU):
            x = F.relu(x, inplace=layer.inplace)
        elif isinstance(layer, nn.Tanh):
            x = torch.tanh(x)
    if scores:                                           # (B, N, 1, 1) -> (N, B)
        return x.reshape(b, n).t()
    return x.reshape(b, n, x.shape[1] // n, *x.shape[2:]).transpose(0, 1)


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


def teacher_feedback_batched(D: nn.Module, x: Tensor, kind: str, path: str = "auto") -> tuple[Tensor, Tensor]:
    """For fakes ``x`` of shape (N, B, ...): per slice n the labels ``D(x[n])`` (N, B, ...) and
    the feedback ∂L_G(D(x[n]))/∂x[n], with D's weights shared and its buffers untouched (each
    slice normalises with its own batch statistics on a private copy of the buffers, as
    :func:`models.steps.generator_feedback` with ``keep_buffers=True`` does for one batch).
    ``path`` as for :class:`Stack`."""
    check_loss_kind(kind)
    n = x.shape[0]
    _, plan = _choose_path(path, D)
    if plan is not None:   # the grouped path with the teacher's weights repeated N times (see the module docstring)
        params = {name: p.detach().unsqueeze(0).expand(n, *p.shape) for name, p in D.named_parameters()}
        buffers = {name: b.detach().unsqueeze(0).expand(n, *b.shape) for name, b in D.named_buffers()}
        xg = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = grouped_forward(plan, params, buffers, xg, scores=True, keep_buffers=True)
            losses = vmap(lambda o: generator_loss(kind, o))(out)
            (feedback,) = torch.autograd.grad(losses.sum(), xg)    # slices independent: each its own gradient
        return out.detach(), feedback.detach()
    params = {name: p.detach() for name, p in D.named_parameters()}
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
                    stack: Stack | None = None, path: str = "auto", chunk: int | None = None) -> list[float]:
    """One JRLF step (thesis Eq. 5.9) of every student at once: student n gets
    ``models.steps.student_update(G_n, opt_n, z[n], local_feedback[n], teacher_d, alpha, loss)``.

    ``z`` is (N, B, latent), ``local_feedback`` (N, B, *sample). Returns each student's
    teacher loss L_G(D_T(G_n(z_n))) (NaN when α = 1). ``stack`` (a :class:`Stack` of these
    students' generators, its parameters current) saves restacking across a round's steps;
    on return its parameters are stale (the optimizers stepped): call ``restack_params``.
    Without ``stack`` the students are stacked ``chunk`` at a time (:func:`chunk_slices`) with
    ``path`` (:class:`Stack`); with one, as that one stack.
    """
    if stack is None:
        losses: list[float] = []
        for sl in chunk_slices(len(students), _device_of(students[0][0]), chunk):
            losses += students_update(students[sl], z[sl], local_feedback[sl], teacher_d, alpha, loss,
                                      stack=Stack([G for G, _ in students[sl]], path=path))
        return losses
    x = stack(z)
    teacher_losses = [float("nan")] * len(students)
    teacher_fb = None
    if alpha < 1.0:
        if teacher_d is None:
            raise ValueError("alpha < 1 needs a teacher discriminator")
        labels_t, teacher_fb = teacher_feedback_batched(teacher_d, x.detach(), loss,
                                                        path="grouped" if stack.path == "grouped" and grouped_plan(teacher_d) else "vmap")
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
                        kind: str, stack: Stack | None = None, path: str = "auto", chunk: int | None = None
                        ) -> tuple[list[dict[str, float]], Tensor, Tensor]:
    """What N PrivacyGAN clients do with one fake batch each, as one computation: client n makes
    ``models.steps.discriminator_step(D_n, opt_n, real[n], fake[n], kind)`` and then
    ``models.steps.generator_feedback(D_n, fake[n], kind)`` with the updated D_n.

    ``real`` and ``fake`` are (N, B, *sample). Returns per client the step's statistics (d_loss,
    d_real_acc, d_fake_acc, d_real_out, d_fake_out), and the labels (N, B, ...) and feedback
    (N, B, *sample). Only losses without a penalty or clipping (bce, hinge): the Wasserstein
    critics keep their one-by-one step. What a cohort's clients on one simulated node do
    (run config ``cohort-batching``; strategies.privacygan.client_discriminate_cohort) and the
    in-process batched baseline of simulations/scale.py. Without ``stack`` the clients are
    stacked ``chunk`` at a time (:func:`chunk_slices`).
    """
    check_loss_kind(kind)
    if kind not in ("bce", "hinge"):
        raise ValueError(f"discriminators_step supports bce and hinge, not {kind!r} (penalty / clipping)")
    from models.losses import discriminator_loss   # local: the module's public names stay the JRLF ones

    if stack is None:
        parts = [discriminators_step(discs[sl], real[sl], fake[sl], kind, stack=Stack([D for D, _ in discs[sl]], path=path))
                 for sl in chunk_slices(len(discs), _device_of(discs[0][0]), chunk)]
        if len(parts) == 1:
            return parts[0]
        return ([st for part in parts for st in part[0]], torch.cat([part[1] for part in parts]),
                torch.cat([part[2] for part in parts]))
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
