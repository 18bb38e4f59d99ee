"""Pure-PyTorch GAN models, losses and training steps for fedgan.

Nothing in this package depends on Flower; the federated plumbing lives
elsewhere and only calls into these functions.
"""

from .dcgan import DCGANDiscriminator, DCGANGenerator, init_weights
from .factory import MODEL_KINDS, build_discriminator, build_generator
from .losses import (
    GP_WEIGHT,
    LOSS_KINDS,
    WGAN_CLIP,
    discriminator_loss,
    generator_loss,
    gradient_penalty,
    make_optimizer,
)
from .mlp import MLPDiscriminator, MLPGenerator
from .steps import (
    apply_feedback,
    discriminator_step,
    generator_feedback,
    generator_step,
    jrlf_feedback,
    sample_latent,
    train_gan_step,
)

__all__ = [
    "DCGANDiscriminator",
    "DCGANGenerator",
    "GP_WEIGHT",
    "LOSS_KINDS",
    "MLPDiscriminator",
    "MLPGenerator",
    "MODEL_KINDS",
    "WGAN_CLIP",
    "apply_feedback",
    "build_discriminator",
    "build_generator",
    "discriminator_loss",
    "discriminator_step",
    "generator_feedback",
    "generator_loss",
    "generator_step",
    "gradient_penalty",
    "init_weights",
    "jrlf_feedback",
    "make_optimizer",
    "sample_latent",
    "train_gan_step",
]
