"""Centralized reference (SPEC 1 and 4.5): one GAN trained on the union of the clients' data.

Not private — it stands for "all the data in one place", the upper bound the federated
strategies are compared against. It runs entirely in the server process and contacts
no client; given a Grid (from the ServerApp) it ignores it. One "round" is
``local_steps`` base-GAN steps (``models.steps.train_gan_step`` with
``client_disc_steps`` D updates per G update), so its records line up with the
rounds of ``fedavg`` and ``local``; it starts from the same networks (the run's seed)
and reports through the same recorder: one metrics record per round, sample grids,
the final evaluation and the ``server.pt`` checkpoint.

For a like-for-like comparison with ``dataparallel`` (N clients, batch B each), give it
a batch of N·B and ``local_steps = 1``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from models.steps import train_gan_step
from strategies.base import GANSettings, GlobalGANServer, Recorder, check_stop, log, param_dtype


@dataclass(frozen=True)
class CentralizedSettings(GANSettings):
    """One GAN in the server process; a "round" is ``local_steps`` steps."""

    local_steps: int = 25
    client_disc_steps: int = 1


class Centralized(GlobalGANServer):
    """Plain GAN training on ``sample_real(batch, torch.Generator) -> Tensor`` (the union data)."""

    def __init__(self, settings: CentralizedSettings, *,
                 sample_real: Callable[[int, torch.Generator], torch.Tensor],
                 make_generator: Callable[[], nn.Module], make_discriminator: Callable[[], nn.Module],
                 recorder: Recorder, evaluate: Callable[[dict[str, torch.Tensor]], dict] | None = None,
                 device: str = "cpu", sample_shape: tuple[int, ...] | None = None) -> None:
        super().__init__(settings, make_generator=make_generator, make_discriminator=make_discriminator,
                         recorder=recorder, evaluate=evaluate, device=device, sample_shape=sample_shape)
        self.sample_real = sample_real
        self.data_gen = torch.Generator().manual_seed(settings.seed * 1_000_003)
        self.latent_gen = torch.Generator(device=device).manual_seed(settings.seed * 31)
        self.steps = 0

    def run_round(self, rnd: int) -> dict:
        """``local_steps`` GAN steps; the record holds their mean statistics."""
        totals: dict[str, float] = {}
        n = self.s.local_steps
        for _ in range(n):
            real = self.sample_real(self.s.batch_size, self.data_gen).to(device=self.device, dtype=param_dtype(self.D))
            out = train_gan_step(self.G, self.D, self.opt_g, self.opt_d, real, kind=self.s.loss,
                                 d_steps=self.s.client_disc_steps, generator=self.latent_gen)
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + v
        self.steps += n
        stats = {k: totals.get(k, float("nan")) / max(1, n) for k in ("g_loss", "d_loss", "d_real_acc", "d_fake_acc")}
        return {"round": rnd, **stats, "steps": self.steps, "replies": 0, "dropped": 0, "dropped_reasons": {},
                "bytes_down": 0, "bytes_up": 0, "clients": {}}

    def checkpoint(self, rnd: int) -> dict:
        return {"round": rnd, "settings": asdict(self.s), "g": self.G.state_dict(), "d": self.D.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(), "steps": self.steps,
                "data_gen": self.data_gen.get_state(), "latent_gen": self.latent_gen.get_state()}

    def run(self, grid: object = None) -> dict:
        """Train; ``grid`` (the ServerApp's) is accepted and not used — no client is contacted."""
        s = self.s
        log.info("Centralized: %d rounds x %d steps on the union of the data", s.num_rounds, s.local_steps)
        last: dict = {}
        for rnd in range(1, s.num_rounds + 1):
            check_stop()
            t0 = time.monotonic()
            record = self.run_round(rnd)
            record["wall_time"] = time.monotonic() - t0
            self.finish_round(record, rnd)
            last = record
        return {"rounds": s.num_rounds, "last": last, "bytes_down": 0, "bytes_up": 0, "dropped_replies": 0,
                "clients": {}, "eval": self.last_eval, "steps": self.steps}


__all__ = ["Centralized", "CentralizedSettings"]
